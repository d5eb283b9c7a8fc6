-- ARGV: prefix, dataset, version ms, version seq, bytes. Keeps the newest snapshot.
local p = ARGV[1]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local function newer(cur, nms, nseq)
  local ms, seq = string.match(cur, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  return ms and (ms > nms or (ms == nms and seq >= nseq))
end
-- A snapshot never claims more than the store holds (a store restored from an older copy must
-- not be handed a filter of the newer one).
if not newer(redis.call('GET', p..'version') or '0-0', tonumber(ARGV[3]), tonumber(ARGV[4])) then
  return 0
end
-- Keeps the newest snapshot.
local cur = redis.call('GET', p..'snapshot_version')
if cur and newer(cur, tonumber(ARGV[3]), tonumber(ARGV[4])) then return 0 end
redis.call('SET', p..'snapshot', ARGV[5])
redis.call('SET', p..'snapshot_version', ARGV[3]..'-'..ARGV[4])
return 1
