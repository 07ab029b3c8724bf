-- Take over queue entries whose holders stopped renewing them: one XAUTOCLAIM step, unless the server has
-- not been up long enough for their idle time to mean anything. KEYS: queue. ARGV: group, consumer,
-- min_idle_ms, start id, count. Returns XAUTOCLAIM's reply ({next start id, entries, deleted ids}), or
-- {'0-0', {}, {}} while the server has been up for less than min_idle_ms.
-- A restarted server restores its pending entries with the idle time they had plus the time it was down,
-- when no holder could renew them: until it has been up for a lease timeout, live holders may not have
-- renewed theirs yet. Checked here, in the same atomic step as the claim, so that no restart can fall
-- between the check and the claim (a client may send a claim again on a new connection).
local info = redis.call('INFO', 'server')
local uptime_s = tonumber(string.match(info, 'uptime_in_seconds:(%d+)'))
if uptime_s * 1000 < tonumber(ARGV[3]) then return {'0-0', {}, {}} end
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
