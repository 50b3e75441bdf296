-- Extend a lease lock, only by its holder (worker/stores/redis_locks.py): 1 if extended.
-- KEYS[1]  the lock: string, the holder's token
-- ARGV[1]  the token
-- ARGV[2]  the new lease, ms
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
