-- Forget an acknowledged (or rejected) message (worker/delivery/broker.py): its record goes
-- only while it is this consumer's (or nobody's): another worker may have taken it since.
-- KEYS[1]  unacked: hash, delivery tag -> the message's record
-- KEYS[2]  unacked_index: sorted set, delivery tag -> when it was taken
-- KEYS[3]  unacked_owner: hash, delivery tag -> the consumer that took it
-- ARGV[1]  the delivery tag
-- ARGV[2]  the consumer
local owner = redis.call('HGET', KEYS[3], ARGV[1])
if owner and owner ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
