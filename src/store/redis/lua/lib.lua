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
local function trim(p, maxlen)
  local len = redis.call('XLEN', p..'log')
  if len <= maxlen then return end
  local old = redis.call('XRANGE', p..'log', '-', '+', 'COUNT', len - maxlen)
  for _, e in ipairs(old) do redis.call('XDEL', p..'log', e[1]) end
  redis.call('SET', p..'log_floor', old[#old][1])
end
