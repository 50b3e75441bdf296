-- A beat of a live process (or host), in Redis's clock (worker/delivery/liveness.py). The first
-- beat after Redis started again records the outage, from the last beat before it to Redis's
-- start, so that silences do not count the time Redis was down.
-- KEYS[1]  beats: sorted set, member -> the time of its last beat
-- KEYS[2]  clock: hash, Redis's run id at the last beat ('run') and that beat's time ('seen')
-- KEYS[3]  outages: list of "<last beat before> <Redis's start>", the latest 100
-- ARGV[1]  the member that beats
-- ARGV[2]  Redis's run id, as INFO reports it
-- ARGV[3]  Redis's uptime in seconds, as INFO reports it
-- ARGV[4]  seconds the three keys are kept after the beat (0: for ever)
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
if redis.call('HGET', KEYS[2], 'run') ~= ARGV[2] then
  local seen = tonumber(redis.call('HGET', KEYS[2], 'seen'))
  local boot = now - tonumber(ARGV[3])
  if seen and seen < boot then
    redis.call('RPUSH', KEYS[3], string.format('%.3f %.3f', seen, boot))
    redis.call('LTRIM', KEYS[3], -100, -1)
  end
  redis.call('HSET', KEYS[2], 'run', ARGV[2])
end
redis.call('HSET', KEYS[2], 'seen', string.format('%.3f', now))
local keep = tonumber(ARGV[4])
if keep > 0 then
  redis.call('EXPIRE', KEYS[1], keep)
  redis.call('EXPIRE', KEYS[2], keep)
  redis.call('EXPIRE', KEYS[3], keep)
end
return 1
