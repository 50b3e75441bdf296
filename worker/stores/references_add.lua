-- Record a reference to a cached base unless its eviction has begun
-- (worker/stores/redis_references.py): 1 if recorded.
-- KEYS[1]  the references: hash, holder -> when recorded
-- KEYS[2]  the eviction marker
-- ARGV[1]  the holder
-- ARGV[2]  when recorded
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
