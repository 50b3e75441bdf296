-- Begin evicting a cached base if nothing refers to it (worker/stores/redis_references.py):
-- 1 if the eviction marker was set.
-- KEYS[1]  the references: hash, holder -> when recorded
-- KEYS[2]  the eviction marker
-- ARGV[1]  the marker's lifetime, ms
if redis.call('HLEN', KEYS[1]) > 0 then
  return 0
end
redis.call('SET', KEYS[2], 1, 'PX', ARGV[1])
return 1
