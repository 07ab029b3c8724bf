-- End a request from outside its worker (a client's cancel, the queue timeout).
-- KEYS: meta, events, job. ARGV: now_ms, terminal event payload, retention_ms, meta_ttl_ms, maxlen, final
-- state, error text, queued_only ('1': end it only if it is still queued: the queue timeout), owner (a
-- request of another owner is answered as unknown; '' for any owner).
-- A queued request ends here (its terminal event is written now); a running one is flagged and its worker
-- writes the terminal event within one engine step. Returns {code, state}: 1 cancelled now, 2 flagged,
-- 0 already ended, -1 unknown.
local meta, ev, job = KEYS[1], KEYS[2], KEYS[3]
local cur = redis.call('HMGET', meta, 'state', 'last_seq', 'owner')
if not cur[1] then return {-1, ''} end
if ARGV[9] ~= '' and cur[3] ~= ARGV[9] then return {-1, ''} end
if cur[1] == 'queued' then
  local seq = tonumber(cur[2]) + 1
  redis.call('XADD', ev, 'MAXLEN', '~', ARGV[5], seq .. '-0', 'd', ARGV[2])
  redis.call('HSET', meta, 'state', ARGV[6], 'last_seq', seq, 'finished_ms', ARGV[1], 'error', ARGV[7])
  redis.call('PEXPIRE', ev, ARGV[3])
  redis.call('PEXPIRE', job, ARGV[3])
  redis.call('PEXPIRE', meta, ARGV[4])
  return {1, ARGV[6]}
elseif cur[1] == 'running' and ARGV[8] ~= '1' then
  redis.call('HSET', meta, 'cancel', '1')
  return {2, 'running'}
end
return {0, cur[1]}
