-- Count a submission in its owner's current one-minute window unless the window is full.
-- KEYS: window counter. ARGV: limit, ttl_ms. Returns 1 when counted, 0 when the limit is reached.
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
if n == 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
