-- KEYS: the marker. ARGV: prefix, dataset, acknowledgement id, audit json, its MAC ('' without
-- an audit key). Records an admin's acknowledgement that the store went back in time, with
-- its audit record in the changes trail. Returns the id.
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
redis.call('SET', p..'regression_ack', ARGV[3])
local v = redis.call('GET', p..'version') or '0-0'
record(p, ARGV[4], ARGV[5], v, 0)
return ARGV[3]
