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
-- Type 1 practices (see optout_core::practice). A type 1 value is `now,sid,P1;P2`; one written
-- before practices were, `now,sid`, belongs to the unknown practice '?'.
local function practices_of(v)
  local list = {}
  local third = string.match(v, '^[^,]*,[^,]*,(.*)$')
  if third then
    for q in string.gmatch(third, '[^;]+') do list[#list + 1] = q end
  end
  if #list == 0 then list[1] = '?' end
  return list
end
local function with_practices(v, list)
  return string.match(v, '^([^,]*,[^,]*)')..','..table.concat(list, ';')
end
-- Records (add) or withdraws practice `pr`'s type 1 objection for number `n` in bucket `key`;
-- `value` is a new record's `now,sid`. Returns whether the record changed (0/1) and whether the
-- number gained or lost type 1 (0/1): it holds type 1 while any practice does.
local function practice_change(key, n, value, pr, add)
  local cur = redis.call('HGET', key, n)
  if add then
    if not cur then
      redis.call('HSET', key, n, value..','..pr)
      return 1, 1
    end
    local list = practices_of(cur)
    for _, q in ipairs(list) do
      if q == pr then return 0, 0 end
    end
    list[#list + 1] = pr
    redis.call('HSET', key, n, with_practices(cur, list))
    return 1, 0
  end
  if not cur then return 0, 0 end
  local rest, found = {}, false
  for _, q in ipairs(practices_of(cur)) do
    if q == pr then found = true else rest[#rest + 1] = q end
  end
  if not found then return 0, 0 end
  if #rest == 0 then
    redis.call('HDEL', key, n)
    return 1, 1
  end
  redis.call('HSET', key, n, with_practices(cur, rest))
  return 1, 0
end
