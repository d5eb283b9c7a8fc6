-- KEYS-free: ARGV lock key, token. Deletes the lock if still ours.
if redis.call('GET', ARGV[1]) == ARGV[2] then return redis.call('DEL', ARGV[1]) end
return 0
