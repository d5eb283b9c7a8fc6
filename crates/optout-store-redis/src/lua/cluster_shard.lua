-- Step 2, once per shard. KEYS: the shard's marker. ARGV: dataset, 'a'|'r', record value, the
-- shard's result key for this change, the practice (type 1; '' for the national type), then per
-- number: its key, the other type's key, the number. Applies once: a second run (a recovery)
-- returns the remembered result. Returns {numbers that gained or lost the type, patients delta,
-- numbers changed} (a type 1 change of one practice may change a record without moving the type).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('OPTOUTDATASET a shard marker is missing or changed')
end
local done = redis.call('GET', ARGV[4])
if done then
  local a, d, c = string.match(done, '^(-?%d+),(-?%d+),?(-?%d*)$')
  if c == nil or c == '' then c = a end
  return {tonumber(a), tonumber(d), tonumber(c)}
end
local add = ARGV[2] == 'a'
local pr = ARGV[5]
local moved_count, patients, applied = 0, 0, 0
for i = 6, #ARGV, 3 do
  local key, other, n = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local changed, moved
  if pr ~= '' then
    changed, moved = practice_change(key, n, ARGV[3], pr, add)
  else
    if add then changed = redis.call('HSETNX', key, n, ARGV[3]) else changed = redis.call('HDEL', key, n) end
    moved = changed
  end
  if changed == 1 then applied = applied + 1 end
  if moved == 1 then
    moved_count = moved_count + 1
    if redis.call('HEXISTS', other, n) == 0 then
      if add then patients = patients + 1 else patients = patients - 1 end
    end
  end
end
redis.call('SET', ARGV[4], moved_count..','..patients..','..applied, 'PX', 86400000)
return {moved_count, patients, applied}
