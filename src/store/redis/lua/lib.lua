-- Helpers prepended to the scripts that change opt-outs (see scripts.rs).
-- An error reply unless the store holds dataset `id` and no import of type `t` holds its lock.
local function refuse(p, id, t)
  if redis.call('HGET', p..'marker', 'dataset_id') ~= id then
    return redis.error_reply('OPTOUTDATASET marker missing or changed')
  end
  if redis.call('EXISTS', p..'lock:'..t) == 1 then
    return redis.error_reply('OPTOUTLOCKED an import of this type is being applied')
  end
end
-- The small id of a source, interned on first use.
local function intern(p, source)
  local sid = redis.call('HGET', p..'srcid', source)
  if sid then return sid end
  sid = redis.call('INCR', p..'srcnext')
  redis.call('HSET', p..'srcid', source, sid)
  redis.call('HSET', p..'src', sid, source)
  return sid
end
-- Appends a change-log entry (field/value pairs `fields`) and its id to the index of ids that
-- replicas check continuity against (see continuity.rs); sets the version. Returns the id.
local function log(p, fields)
  local id = redis.call('XADD', p..'log', '*', unpack(fields))
  redis.call('HSET', p..'ids', id, 1)
  redis.call('SET', p..'version', id)
  return id
end
-- Appends an audit record (`json`) to the changes trail with the change's version `v`, the count
-- `n` and, when the replica has the audit key, the MAC it made of the record (`m`).
-- `mac` is '' (or false, from an intent of an older version) when there is none.
local function record(p, json, mac, v, n)
  if mac and mac ~= '' then
    redis.call('XADD', p..'changes', '*', 'r', json, 'v', v, 'n', n, 'm', mac)
  else
    redis.call('XADD', p..'changes', '*', 'r', json, 'v', v, 'n', n)
  end
end
local function trim(p, maxlen)
  local len = redis.call('XLEN', p..'log')
  if len <= maxlen then return end
  local old = redis.call('XRANGE', p..'log', '-', '+', 'COUNT', len - maxlen)
  for _, e in ipairs(old) do
    redis.call('XDEL', p..'log', e[1])
    redis.call('HDEL', p..'ids', e[1])
  end
  redis.call('SET', p..'log_floor', old[#old][1])
end
-- 1 if the store still holds the change-log entry `seen` (a version a replica saw reached):
-- in the index of ids, in the log itself (entries logged before the index), or trimmed from both
-- (at or below the floor: no proof either way). 0 if it lost it.
local function holds(p, seen)
  if seen == '' or seen == '0-0' then return 1 end
  if redis.call('HEXISTS', p..'ids', seen) == 1 then return 1 end
  if #redis.call('XRANGE', p..'log', seen, seen, 'COUNT', 1) > 0 then return 1 end
  local fms, fseq = string.match(redis.call('GET', p..'log_floor') or '0-0', '^(%d+)-(%d+)$')
  local sms, sseq = string.match(seen, '^(%d+)-(%d+)$')
  fms, fseq, sms, sseq = tonumber(fms), tonumber(fseq), tonumber(sms), tonumber(sseq)
  if sms and fms and (sms < fms or (sms == fms and sseq <= fseq)) then return 1 end
  return 0
end
