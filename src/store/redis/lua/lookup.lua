-- ARGV: prefix, then bucket/number pairs. Returns marker, version, then per number a
-- bit set of types held (1 national, 2 type 1).
local p = ARGV[1]
local marker = redis.call('HGET', p..'marker', 'dataset_id')
if not marker then return {''} end
local version = redis.call('GET', p..'version') or '0-0'
local g1 = redis.call('GET', p..'gen:1') or '0'
local g2 = redis.call('GET', p..'gen:2') or '0'
local out = {marker, version}
for i = 2, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local m = 0
  if redis.call('HEXISTS', p..'d:1:'..g1..':'..b, n) == 1 then m = m + 1 end
  if redis.call('HEXISTS', p..'d:2:'..g2..':'..b, n) == 1 then m = m + 2 end
  out[#out + 1] = m
end
return out
