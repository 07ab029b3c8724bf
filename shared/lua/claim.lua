-- Take a request. KEYS: meta. ARGV: worker_id, now_ms, takeover ('1': a running request whose worker lost
-- its lease may be taken too), queue entry id. Returns {attempt, last_seq}; attempt 0 when it cannot be
-- taken (cancelled meanwhile, ended, expired, or running from another queue entry). The new attempt number
-- fences every earlier holder's appends.
-- A claim sent again (its reply was lost to a broken connection, and the client retried it) finds the
-- request running for this worker from this entry and answers what the first one did: it must not read
-- as "taken by someone else", or the worker would acknowledge an entry it holds.
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'running' and ARGV[3] ~= '1' then
  local holder = redis.call('HMGET', KEYS[1], 'worker', 'entry', 'attempt', 'last_seq')
  if holder[1] == ARGV[1] and holder[2] == ARGV[4] then
    return {tonumber(holder[3]), tonumber(holder[4])}
  end
end
if not (st == 'queued' or (st == 'running' and ARGV[3] == '1')) then return {0, 0} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'entry', ARGV[4], 'started_ms', ARGV[2])
return {attempt, tonumber(redis.call('HGET', KEYS[1], 'last_seq'))}
