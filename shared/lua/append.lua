-- Append events to running requests of one partition (one hash slot), as the worker holding each.
-- One call per partition per engine step: a worker with a hundred running requests sends at most
-- sixteen scripts per step, not a hundred.
-- KEYS: meta, events, job of each request in turn.
-- ARGV: maxlen, running_ttl_ms, retention_ms, meta_ttl_ms, now_ms, then for each request: attempt,
--   first_seq, n (payload count), refresh ('1': renew the running TTL of its keys), final_state ('' unless
--   its last event is terminal), finish_reason, prompt_tokens, completion_tokens, error, then n payloads.
-- Returns a flat list, two entries per request: {last_seq, cancel_requested} on success, or {code,
-- last_seq} with code -1 (request gone), -2 (fenced: another attempt owns the request), -3 (request
-- already ended), -4 (first_seq is not last_seq + 1: the caller resends from last_seq + 1).
local maxlen, running_ttl, retention, meta_ttl, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local function append(meta, ev, job, a)
  local cur = redis.call('HMGET', meta, 'attempt', 'last_seq', 'state', 'cancel')
  if not cur[1] then return -1, 0 end
  local last = tonumber(cur[2])
  if cur[1] ~= ARGV[a] then return -2, last end
  if cur[3] ~= 'running' then return -3, last end
  local first, n = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if first ~= last + 1 then return -4, last end
  for i = 1, n do
    redis.call('XADD', ev, 'MAXLEN', '~', maxlen, (first + i - 1) .. '-0', 'd', ARGV[a + 8 + i])
  end
  last = first + n - 1
  if ARGV[a + 4] ~= '' then
    redis.call('HSET', meta, 'last_seq', last, 'state', ARGV[a + 4], 'finish_reason', ARGV[a + 5],
               'prompt_tokens', ARGV[a + 6], 'completion_tokens', ARGV[a + 7], 'error', ARGV[a + 8],
               'finished_ms', now)
    redis.call('PEXPIRE', ev, retention)
    redis.call('PEXPIRE', job, retention)
    redis.call('PEXPIRE', meta, meta_ttl)
  else
    redis.call('HSET', meta, 'last_seq', last)
    if ARGV[a + 3] == '1' then
      redis.call('PEXPIRE', ev, running_ttl)
      redis.call('PEXPIRE', job, running_ttl)
      redis.call('PEXPIRE', meta, running_ttl)
    end
  end
  if cur[4] == '1' then return last, 1 end
  return last, 0
end
local out = {}
local a = 6
for r = 0, #KEYS / 3 - 1 do
  local code, value = append(KEYS[r * 3 + 1], KEYS[r * 3 + 2], KEYS[r * 3 + 3], a)
  out[#out + 1] = code
  out[#out + 1] = value
  a = a + 9 + tonumber(ARGV[a + 2])
end
return out
