-- Renew a worker's leases. KEYS: queue. ARGV: group, consumer, entry ids... Each entry still pending for
-- this consumer has its idle time reset (XCLAIM ... JUSTID does not count a delivery); returns the ids
-- renewed. An entry another worker has claimed is left alone: its lease is lost.
local renewed = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
