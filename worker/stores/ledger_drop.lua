-- Delete a disk's record from a host's device ledger only if that owner holds it
-- (worker/stores/redis_ledger.py): 1 if deleted.
-- KEYS[1]  the host's ledger: hash, disk -> its record (JSON)
-- ARGV[1]  the disk
-- ARGV[2]  the owner
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
if cjson.decode(raw)['owner'] ~= ARGV[2] then return 0 end
return redis.call('HDEL', KEYS[1], ARGV[1])
