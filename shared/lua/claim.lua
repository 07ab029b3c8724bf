-- Take a request. KEYS: meta. ARGV: worker_id, now_ms, takeover ('1': a running request whose worker lost
-- its lease may be taken too). Returns {attempt, last_seq}; attempt 0 when it cannot be taken (cancelled
-- meanwhile, ended, expired). The new attempt number fences every earlier holder's appends.
local st = redis.call('HGET', KEYS[1], 'state')
if not (st == 'queued' or (st == 'running' and ARGV[3] == '1')) then return {0, 0} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'started_ms', ARGV[2])
return {attempt, tonumber(redis.call('HGET', KEYS[1], 'last_seq'))}
