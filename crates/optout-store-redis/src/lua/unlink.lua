-- KEYS: buckets of one generation of one type. ARGV: that type's generation key, the generation.
-- Unlinks the buckets unless the generation is the current one: a generation is unlinked after
-- an import replaced it (or when an import is abandoned), and by then a lost reply (the swap
-- landed, its caller was cut off) or a store restored from an older copy may have made it
-- current again. Deleting the current generation would read as "nobody opted out". Returns 1 if
-- unlinked, 0 if the generation is current.
if redis.call('GET', ARGV[1]) == ARGV[2] then return 0 end
redis.call('UNLINK', unpack(KEYS))
return 1
