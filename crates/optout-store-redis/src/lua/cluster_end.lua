-- Step 3. KEYS: the marker. ARGV: prefix, dataset, the change's id, the numbers that gained or
-- lost the type, patients delta, the numbers changed (absent from an older replica: the first).
-- Counts the change, writes its audit record and retires the intent, once: a
-- second run returns what the first recorded. Returns the numbers changed. With neither the intent
-- nor the record of its finishing here, step 1 was lost (the metadata's master failed over before
-- passing it on): no log entry, no audit record, so the change is refused (OPTOUTLOST), never
-- reported done.
local p, id = ARGV[1], ARGV[3]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
local key = p..'intent:'..id
if redis.call('EXISTS', key) == 0 then
  local finished = redis.call('GET', p..'finished:'..id)
  if not finished then
    return redis.error_reply('OPTOUTLOST the change was lost from the store after it began')
  end
  return tonumber(finished)
end
local t = redis.call('HGET', key, 't')
local add = redis.call('HGET', key, 'k') == 'a'
local moved = tonumber(ARGV[4])
local applied = tonumber(ARGV[6] or ARGV[4])
-- `0 - moved`, not `-moved`: Lua's -0 is "-0" as text, which HINCRBY refuses.
redis.call('HINCRBY', p..'counts', t, add and moved or (0 - moved))
redis.call('HINCRBY', p..'counts', 'patients', ARGV[5])
-- The record's MAC was made by the replica that began the change.
record(p, redis.call('HGET', key, 'audit'), redis.call('HGET', key, 'm'), id, applied)
local inflight = p..'inflight:'..t
for n in string.gmatch(redis.call('HGET', key, 'n'), '[^,]+') do
  if add and redis.call('HINCRBY', p..'pending', n, -1) <= 0 then redis.call('HDEL', p..'pending', n) end
  if redis.call('HINCRBY', inflight, n, -1) <= 0 then redis.call('HDEL', inflight, n) end
end
redis.call('DEL', key)
redis.call('HDEL', p..'intents', id)
redis.call('HINCRBY', p..'intents_of', t, -1)
redis.call('SET', p..'finished:'..id, applied, 'PX', 86400000)
return applied
