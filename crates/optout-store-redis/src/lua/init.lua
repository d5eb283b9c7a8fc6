-- ARGV: prefix, dataset id, buckets, now, shard tags (comma-separated, cluster only), national
-- coverage mode ("list" or "population"), the owning organisation ('' for none).
-- Returns 1 if initialised, 0 if it already was.
local p = ARGV[1]
if redis.call('EXISTS', p..'marker') == 1 then return 0 end
redis.call('HSET', p..'marker', 'dataset_id', ARGV[2], 'buckets', ARGV[3], 'created_at_ms', ARGV[4])
if ARGV[5] and ARGV[5] ~= '' then redis.call('HSET', p..'marker', 'shards', ARGV[5]) end
redis.call('HSET', p..'coverage', 'mode', ARGV[6])
if ARGV[7] and ARGV[7] ~= '' then redis.call('HSET', p..'coverage', 'owner', ARGV[7]) end
redis.call('SET', p..'version', '0-0')
redis.call('SET', p..'log_floor', '0-0')
return 1
