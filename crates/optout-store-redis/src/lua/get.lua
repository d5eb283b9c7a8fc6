-- ARGV: prefix, bucket, number. Returns marker, version, then value and source name
-- for national, then for type 1 ('' when absent).
local p, b, n = ARGV[1], ARGV[2], ARGV[3]
local marker = redis.call('HGET', p..'marker', 'dataset_id') or ''
local out = {marker, redis.call('GET', p..'version') or '0-0'}
for t = 1, 2 do
  local g = redis.call('GET', p..'gen:'..t) or '0'
  local v = redis.call('HGET', p..'d:'..t..':'..g..':'..b, n)
  if v then
    -- `now,sid` or, type 1, `now,sid,practices`.
    local sid = string.match(v, '^[^,]*,(%d+)')
    out[#out + 1] = v
    out[#out + 1] = (sid and redis.call('HGET', p..'src', sid)) or ''
  else
    out[#out + 1] = ''
    out[#out + 1] = ''
  end
end
return out
