-- ARGV: prefix, dataset, first bucket, last bucket. Returns the numbers of both
-- current generations in those buckets.
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local g1 = redis.call('GET', p..'gen:1') or '0'
local g2 = redis.call('GET', p..'gen:2') or '0'
local out = {}
for b = tonumber(ARGV[3]), tonumber(ARGV[4]) do
  for _, n in ipairs(redis.call('HKEYS', p..'d:1:'..g1..':'..b)) do out[#out + 1] = n end
  for _, n in ipairs(redis.call('HKEYS', p..'d:2:'..g2..':'..b)) do out[#out + 1] = n end
end
return out
