-- KEYS: the marker. ARGV: prefix, dataset, the sequence number the last seal must have (0: none
-- yet), the new seal's line. Appends a seal of the changes trail (`changes_seals`) when the last
-- one is ARGV[3]: a compare-and-set, so replicas sealing at once never fork the seals' chain.
-- Returns 1, or 0 when another replica sealed first.
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local seq = '0'
local last = redis.call('XREVRANGE', p..'changes_seals', '+', '-', 'COUNT', 1)
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 's' then seq = fields[i + 1] end
  end
end
if seq ~= ARGV[3] then
  return 0
end
redis.call('XADD', p..'changes_seals', '*', 's', tostring(tonumber(seq) + 1), 'l', ARGV[4])
return 1
