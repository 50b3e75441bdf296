-- Release a lease lock, only by its holder (worker/stores/redis_locks.py), and wake a waiter.
-- KEYS[1]  the lock: string, the holder's token
-- KEYS[2]  the wake list: one element pushed on release, expiring
-- ARGV[1]  the token
-- ARGV[2]  the wake list's expiry, ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('DEL', KEYS[2])
  redis.call('RPUSH', KEYS[2], 1)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 1
end
return 0
