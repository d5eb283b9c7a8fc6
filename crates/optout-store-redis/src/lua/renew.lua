-- KEYS-free: ARGV lock key, token, lease ms. Extends the lock's lease if it is still ours.
if redis.call('GET', ARGV[1]) == ARGV[2] then return redis.call('PEXPIRE', ARGV[1], ARGV[3]) end
return 0
