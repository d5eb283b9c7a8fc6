-- KEYS: the marker, the staged snapshot (the dataset id, then the bytes; see snapshot.rs).
-- ARGV: prefix, dataset, version ms, version seq, the staged length. Moves the staged snapshot into
-- place if it is whole and the newest the store may hold (1), or drops it: 0 when it is not the
-- newest, -1 when it is not whole.
local p, staged = ARGV[1], KEYS[2]
local ms, seq = tonumber(ARGV[3]), tonumber(ARGV[4])
-- Every answer but placing it drops the staged snapshot.
local function drop(answer)
  redis.call('DEL', staged)
  return answer
end
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return drop(redis.error_reply('OPTOUTDATASET marker missing or changed'))
end
-- Expired half-way and recreated by a later chunk, or cut short: not the snapshot that was sent.
if redis.call('STRLEN', staged) ~= tonumber(ARGV[5]) then
  return drop(-1)
end
local function newer(cur)
  local cms, cseq = string.match(cur, '^(%d+)-(%d+)$')
  cms, cseq = tonumber(cms), tonumber(cseq)
  return cms and (cms > ms or (cms == ms and cseq >= seq))
end
-- A snapshot never claims more than the store holds (a store restored from an older copy must
-- not be handed a filter of the newer one).
if not newer(redis.call('GET', p..'version') or '0-0') then
  return drop(0)
end
-- Keeps the newest snapshot.
local cur = redis.call('GET', p..'snapshot_version')
if cur and newer(cur) then
  return drop(0)
end
redis.call('RENAME', staged, p..'snapshot')
redis.call('PERSIST', p..'snapshot')
redis.call('SET', p..'snapshot_version', ARGV[3]..'-'..ARGV[4])
return 1
