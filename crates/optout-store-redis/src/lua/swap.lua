-- ARGV: prefix, dataset, type, lock token, new generation, added csv, removed, new
-- count, patients delta, maxlen, audit json, changes, "listed" or "unlisted", the list's date in
-- ms ("" for a MERGE: it does not make the list complete), the population's size ("" unless a
-- national check round trip, whose population was staged at population:<generation>), the newest
-- version the writing replica saw, the audit record's MAC ('' without an audit key), the
-- practice whose type 1 list this is ('' otherwise: a REPLACE of type 1 then dates the practice's
-- list, and the type 1 list's date is its oldest practice's). Returns
-- {version, old generation, whether the store still held that seen version}. An unlisted import (more added numbers than a log entry lists) is
-- logged with `u`: replicas rebuild their filters from a scan.
local p, t = ARGV[1], ARGV[3]
if redis.call('HGET', p..'marker', 'dataset_id') ~= ARGV[2] then
  return redis.error_reply('OPTOUTDATASET marker missing or changed')
end
if redis.call('GET', p..'lock:'..t) ~= ARGV[4] then
  return redis.error_reply('OPTOUTLOCKED the import lock was lost')
end
-- Checked before anything is written (a script's writes are not undone by a later error).
local staged_population = p..'population:'..ARGV[5]
if ARGV[15] ~= '' and redis.call('EXISTS', staged_population) == 0 then
  return redis.error_reply('OPTOUTREFUSED the staged population is gone (it expired?); import again')
end
local held = holds(p, ARGV[16])
local old = redis.call('GET', p..'gen:'..t) or '0'
redis.call('SET', p..'gen:'..t, ARGV[5])
redis.call('HSET', p..'counts', t, ARGV[8])
redis.call('HINCRBY', p..'counts', 'patients', ARGV[9])
local id
if ARGV[13] == 'unlisted' then
  -- `a` is not a list of numbers: a replica too old to know `u` fails to read the entry (and
  -- withholds while it cannot follow) rather than read it as "nothing added".
  id = log(p, {'a', 'unlisted', 'r', ARGV[7], 'u', 1})
else
  id = log(p, {'a', ARGV[6], 'r', ARGV[7]})
end
if ARGV[14] ~= '' and ARGV[18] and ARGV[18] ~= '' then
  redis.call('HSET', p..'t1_practices', ARGV[18], ARGV[14])
  local oldest, oldest_ms
  for _, at in ipairs(redis.call('HVALS', p..'t1_practices')) do
    if oldest_ms == nil or tonumber(at) < oldest_ms then oldest, oldest_ms = at, tonumber(at) end
  end
  redis.call('HSET', p..'coverage', 'as_of:'..t, oldest, 'version', id)
elseif ARGV[14] ~= '' then
  redis.call('HSET', p..'coverage', 'as_of:'..t, ARGV[14], 'version', id)
end
if ARGV[15] ~= '' then
  redis.call('RENAME', staged_population, p..'population')
  redis.call('PERSIST', p..'population')
  redis.call('HSET', p..'coverage', 'population_len', ARGV[15])
end
trim(p, tonumber(ARGV[10]))
redis.call('DEL', p..'lock:'..t)
record(p, ARGV[11], ARGV[17], id, ARGV[12])
return {id, tonumber(old), held}
