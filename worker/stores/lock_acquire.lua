-- Acquire a lease lock (worker/stores/redis_locks.py): {fence, 0} when acquired, {0, pttl} when
-- someone else holds it. A fence is never below Redis's clock in microseconds: a failover to a
-- replica that had not received the last increments would otherwise hand out a fence again (and
-- two holders would share temporaries, `<target>.part.<fence>`); a new master's clock is past
-- every fence the old one gave (a failover takes seconds), so fences stay unique and growing.
-- KEYS[1]  the lock: string, the holder's token, expiring with the lease
-- KEYS[2]  the fence counter
-- ARGV[1]  the token
-- ARGV[2]  the lease, ms
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if fence < floor then
    fence = floor
    redis.call('SET', KEYS[2], string.format('%d', floor))
  end
  return {fence, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
