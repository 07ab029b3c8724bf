-- Take a place among an owner's open streams. KEYS: the owner's leases (sorted set stream id -> lease
-- end). ARGV: now_ms, lease_end_ms, limit, stream id, key_ttl_ms. Leases that ran out (their gateway died)
-- are dropped first. Returns 1 when the place is taken, 0 when the owner already has ``limit`` streams open.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
