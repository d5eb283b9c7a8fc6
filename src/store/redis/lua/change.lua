-- ARGV: prefix, dataset, 'a'|'r', type, now, source, maxlen, audit json, the newest version the
-- writing replica saw, the audit record's MAC ('' without an audit key), bucket/number pairs.
-- The audit record goes to the changes trail (`changes`), which check traffic never trims. Returns {version, applied, whether the store
-- still held that seen version before the change}.
local p, t = ARGV[1], ARGV[4]
local refused = refuse(p, ARGV[2], t)
if refused then return refused end
local other = (t == '1') and '2' or '1'
local g = redis.call('GET', p..'gen:'..t) or '0'
local go = redis.call('GET', p..'gen:'..other) or '0'
local sid = intern(p, ARGV[6])
local value = ARGV[5]..','..sid
local add = ARGV[3] == 'a'
local applied, patients = 0, 0
local added = {}
local held = holds(p, ARGV[9])
for i = 11, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local key = p..'d:'..t..':'..g..':'..b
  local changed
  if add then changed = redis.call('HSETNX', key, n, value) else changed = redis.call('HDEL', key, n) end
  if changed == 1 then
    applied = applied + 1
    if add then added[#added + 1] = n end
    if redis.call('HEXISTS', p..'d:'..other..':'..go..':'..b, n) == 0 then
      if add then patients = patients + 1 else patients = patients - 1 end
    end
  end
end
-- `0 - applied`, not `-applied`: Lua's -0 is "-0" as text, which HINCRBY refuses.
redis.call('HINCRBY', p..'counts', t, add and applied or (0 - applied))
redis.call('HINCRBY', p..'counts', 'patients', patients)
local id = log(p, {'a', table.concat(added, ','), 'r', add and 0 or applied})
trim(p, tonumber(ARGV[7]))
record(p, ARGV[8], ARGV[10], id, applied)
return {id, applied, held}
