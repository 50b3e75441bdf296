-- Take a message a dead host's worker left unacknowledged (worker/delivery/hosts.py, the
-- sweep): its record, removed, or nil when another sweeper took it first.
-- KEYS[1]  unacked: hash, delivery tag -> the message's record
-- KEYS[2]  unacked_index: sorted set, delivery tag -> when it was taken
-- ARGV[1]  the delivery tag
local message = redis.call('HGET', KEYS[1], ARGV[1])
if message then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return message
