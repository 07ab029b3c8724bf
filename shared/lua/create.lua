-- Record a new request and, on one server, enqueue it. KEYS: meta, job[, queue]. ARGV: running_ttl_ms, job
-- payload, then the metadata's field/value pairs. Returns the queue entry id, or 1 without a queue key.
-- Sent again (a reply lost to a broken connection, the client retried it), it must not undo what a worker
-- did meanwhile: the fields a claim or an append changes are set only where absent, the rest never change,
-- and the claim script skips the second queue entry. On a cluster the queue lives in another hash slot: the
-- caller enqueues after this returned, so no worker can pull an entry whose request is not yet recorded.
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('HSETNX', KEYS[1], 'state', 'queued')
redis.call('HSETNX', KEYS[1], 'attempt', '0')
redis.call('HSETNX', KEYS[1], 'last_seq', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[1])
if KEYS[3] then
  return redis.call('XADD', KEYS[3], '*', 'd', ARGV[2])
end
return 1
