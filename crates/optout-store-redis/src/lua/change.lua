-- ARGV: prefix, dataset, 'a'|'r', type, now, source, maxlen, audit json, the newest version the
-- writing replica saw, the audit record's MAC ('' without an audit key), the practice (type 1;
-- '' for the national type), bucket/number pairs.
-- The audit record goes to the changes trail (`changes`), which check traffic never trims.
-- Returns {version, numbers changed, whether the store still held that seen version before the
-- change}. A type 1 change records or withdraws one practice's objection: a number gains type 1
-- with its first practice and loses it with its last.
local p, t = ARGV[1], ARGV[4]
local refused = refuse(p, ARGV[2], t)
if refused then return refused end
local other = (t == '1') and '2' or '1'
local g = redis.call('GET', p..'gen:'..t) or '0'
local go = redis.call('GET', p..'gen:'..other) or '0'
local sid = intern(p, ARGV[6])
local value = ARGV[5]..','..sid
local add = ARGV[3] == 'a'
local pr = ARGV[11]
local applied, moved_count, patients = 0, 0, 0
local added = {}
local held = holds(p, ARGV[9])
for i = 12, #ARGV, 2 do
  local b, n = ARGV[i], ARGV[i + 1]
  local key = p..'d:'..t..':'..g..':'..b
  local changed, moved
  if pr ~= '' then
    changed, moved = practice_change(key, n, value, pr, add)
  else
    if add then changed = redis.call('HSETNX', key, n, value) else changed = redis.call('HDEL', key, n) end
    moved = changed
  end
  if changed == 1 then applied = applied + 1 end
  if moved == 1 then
    moved_count = moved_count + 1
    if add then added[#added + 1] = n end
    if redis.call('HEXISTS', p..'d:'..other..':'..go..':'..b, n) == 0 then
      if add then patients = patients + 1 else patients = patients - 1 end
    end
  end
end
-- `0 - moved_count`, not `-moved_count`: Lua's -0 is "-0" as text, which HINCRBY refuses.
redis.call('HINCRBY', p..'counts', t, add and moved_count or (0 - moved_count))
redis.call('HINCRBY', p..'counts', 'patients', patients)
local id = log(p, {'a', table.concat(added, ','), 'r', add and 0 or moved_count})
trim(p, tonumber(ARGV[7]))
record(p, ARGV[8], ARGV[10], id, applied)
return {id, applied, held}
