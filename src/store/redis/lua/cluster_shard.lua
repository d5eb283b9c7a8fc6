-- Step 2, once per shard. KEYS: the shard's marker. ARGV: dataset, 'a'|'r', record value, the
-- shard's result key for this change, then per number: its key, the other type's key, the
-- number. Applies once: a second run (a recovery) returns the remembered result. Returns
-- {applied, patients delta}.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('OPTOUTDATASET a shard marker is missing or changed')
end
local done = redis.call('GET', ARGV[4])
if done then
  local a, d = string.match(done, '^(-?%d+),(-?%d+)$')
  return {tonumber(a), tonumber(d)}
end
local add = ARGV[2] == 'a'
local applied, patients = 0, 0
for i = 5, #ARGV, 3 do
  local key, other, n = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local changed
  if add then changed = redis.call('HSETNX', key, n, ARGV[3]) else changed = redis.call('HDEL', key, n) end
  if changed == 1 then
    applied = applied + 1
    if redis.call('HEXISTS', other, n) == 0 then
      if add then patients = patients + 1 else patients = patients - 1 end
    end
  end
end
redis.call('SET', ARGV[4], applied..','..patients, 'PX', 86400000)
return {applied, patients}
