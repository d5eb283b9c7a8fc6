-- ARGV: prefix, the types asked for (bits: 1 national, 2 type 1), then bucket/number pairs.
-- Returns marker, version, then per number a bit set of the types asked for that it holds.
local p = ARGV[1]
local marker = redis.call('HGET', p..'marker', 'dataset_id')
if not marker then return {''} end
local version = redis.call('GET', p..'version') or '0-0'
local asked = tonumber(ARGV[2])
-- A type not asked for is not read at all: each is a key lookup and a listpack scan a number.
local k1, k2 = false, false
if asked % 2 == 1 then k1 = p..'d:1:'..(redis.call('GET', p..'gen:1') or '0')..':' end
if asked >= 2 then k2 = p..'d:2:'..(redis.call('GET', p..'gen:2') or '0')..':' end
local out = {marker, version}
for i = 3, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local m = 0
  if k1 and redis.call('HEXISTS', k1..b, n) == 1 then m = 1 end
  if k2 and redis.call('HEXISTS', k2..b, n) == 1 then m = m + 2 end
  out[#out + 1] = m
end
return out
