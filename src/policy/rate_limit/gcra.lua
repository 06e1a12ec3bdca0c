-- GCRA for one route and client key, on Redis's own clock, in integer
-- microseconds (exact in Lua's doubles until the year 2255). The same
-- arithmetic as governor's (the in-process limiter), so both backends answer
-- alike; the redis-gcra script (rwz/redis-gcra) is the reference for its shape.
-- Needs Redis 5 or later, which replicate a script's effects rather than the
-- script, so that a write may follow TIME.
--
-- KEYS[1]  the key: its value is the theoretical arrival time (TAT)
-- ARGV[1]  t:   the emission interval, one request's cost (µs, >= 1)
-- ARGV[2]  tau: the tolerance, t * (burst - 1) (µs)
--
-- Returns {1, remaining} when allowed (and counted), {0, wait_us} when not.
-- A refused request writes nothing. The key expires when its bucket would be
-- full again (at most burst * t from now), where absent and full are the same.
--
-- Every call costs Redis CPU on every request of every instance: keep it to
-- the three commands and plain arithmetic.

local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = clock[1] * 1000000 + clock[2]

local tat = tonumber(redis.call('GET', KEYS[1])) or now
local earliest = tat - tau
if now < earliest then
  return {0, earliest - now}
end

if tat < now then
  tat = now
end
local next_tat = tat + t
-- A number argument reaches Redis as "%.17g" (or shortest round-trip): an
-- integer below 2^53 prints whole and tonumber() reads it back exactly.
redis.call('SET', KEYS[1], next_tat, 'PX', math.ceil((next_tat - now) / 1000))
local remaining = now + tau + t - next_tat
if remaining > tau + t then
  remaining = tau + t
end
return {1, math.floor(remaining / t)}
