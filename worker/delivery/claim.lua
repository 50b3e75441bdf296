-- The claim (worker/delivery/broker.py): pops one message from the first of the queues that
-- holds one and records it as kombu would ([payload, exchange, routing key]), with its owner, in
-- one step; a message kombu could not record (no delivery tag) is returned unrecorded, as BRPOP
-- would. The claim counts as a beat of its consumer (worker/delivery/beat.lua's sorted set).
-- KEYS[i]      for i = 1..n, n = #KEYS - 4: the queues' lists, in the order to try
-- KEYS[n + 1]  unacked: hash, delivery tag -> the message's record
-- KEYS[n + 2]  unacked_index: sorted set, delivery tag -> when it was taken (the worker's clock)
-- KEYS[n + 3]  unacked_owner: hash, delivery tag -> the consumer that took it
-- KEYS[n + 4]  unacked_consumers: sorted set, consumer -> its last beat (Redis's clock)
-- ARGV[1]      the consumer
-- ARGV[2]      the worker's time (kombu scores unacked_index with it)
local n = #KEYS - 4
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    local tag, info
    if ok and type(message) == 'table' and type(message.properties) == 'table' then
      tag = message.properties.delivery_tag
      info = message.properties.delivery_info
    end
    if type(tag) ~= 'string' or type(info) ~= 'table' or info.exchange == nil
        or info.routing_key == nil then
      return {KEYS[i], item, 0}
    end
    local record = '[' .. item .. ',' .. cjson.encode(info.exchange) .. ','
      .. cjson.encode(info.routing_key) .. ']'
    redis.call('ZADD', KEYS[n + 2], ARGV[2], tag)
    redis.call('HSET', KEYS[n + 1], tag, record)
    redis.call('HSET', KEYS[n + 3], tag, ARGV[1])
    local now = redis.call('TIME')
    redis.call('ZADD', KEYS[n + 4], now[1] + now[2] / 1000000, ARGV[1])
    return {KEYS[i], item, 1}
  end
end
return false
