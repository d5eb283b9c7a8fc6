-- Step 1 of a change. KEYS: the marker. ARGV: prefix, dataset, type, source, log maxlen,
-- 'a'|'r', the numbers (comma-separated), now, the audit record (JSON), the newest version the
-- writing replica saw, the audit record's MAC ('' without an audit key), the practice (type 1;
-- '' for the national type). Logs the change (adds
-- with their numbers; removals before anything is deleted) and registers it as an intent:
-- `intent:{id}` holds what finishing it needs, `intents` the ids with their start time,
-- `intents_of` a count per type (an import waits for none), `pending` the numbers being added
-- (a scan treats them as opted out), `inflight:{t}` a count per number of the changes under way.
-- A change of a number that another change of the same type has under way is refused before
-- anything is written (OPTOUTBUSY): changes of one number run one after the other, in version
-- order, so finishing an older one (its writer died; another replica recovers it) can never undo
-- a newer one. Returns {log entry id (the change's version), generation
-- of the type, generation of the other type, source id, whether the store still held the seen
-- version}.
local p, t = ARGV[1], ARGV[3]
local refused = refuse(p, ARGV[2], t)
if refused then return refused end
local inflight = p..'inflight:'..t
for n in string.gmatch(ARGV[7], '[^,]+') do
  if redis.call('HEXISTS', inflight, n) == 1 then
    return redis.error_reply('OPTOUTBUSY another change of one of these numbers is under way')
  end
end
local other = (t == '1') and '2' or '1'
local g = redis.call('GET', p..'gen:'..t) or '0'
local go = redis.call('GET', p..'gen:'..other) or '0'
local sid = intern(p, ARGV[4])
local add = ARGV[6] == 'a'
local count = 0
for _ in string.gmatch(ARGV[7], '[^,]+') do count = count + 1 end
local held = holds(p, ARGV[10])
local id = log(p, {'a', add and ARGV[7] or '', 'r', add and 0 or count})
trim(p, tonumber(ARGV[5]))
redis.call('HSET', p..'intent:'..id, 't', t, 'k', ARGV[6], 'g', g, 'go', go,
  'v', ARGV[8]..','..sid, 'n', ARGV[7], 'audit', ARGV[9], 'm', ARGV[11], 'pr', ARGV[12] or '')
redis.call('HSET', p..'intents', id, ARGV[8])
redis.call('HINCRBY', p..'intents_of', t, 1)
for n in string.gmatch(ARGV[7], '[^,]+') do redis.call('HINCRBY', inflight, n, 1) end
if add then
  for n in string.gmatch(ARGV[7], '[^,]+') do redis.call('HINCRBY', p..'pending', n, 1) end
end
return {id, g, go, tostring(sid), held}
