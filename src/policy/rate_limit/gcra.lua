-- GCRA for one route and client key, on Redis's own clock, in integer
-- microseconds (exact in Lua's doubles until the year 2255). The same
-- arithmetic as governor's (the in-process limiter), so both backends answer
-- alike; the redis-gcra script (rwz/redis-gcra) is the reference for its shape.
--
-- KEYS[1]  the key: its value is the theoretical arrival time (TAT)
-- ARGV[1]  t:   the emission interval, one request's cost (µs, >= 1)
-- ARGV[2]  tau: the tolerance, t * (burst - 1) (µs)
--
-- Returns {1, remaining} when allowed (and counted), {0, wait_us} when not.
-- A refused request writes nothing. The key expires when its bucket would be
-- full again (at most burst * t from now), where absent and full are the same.

-- Redis before 5 replicates scripts verbatim, which forbids a write after
-- TIME; 5 and later replicate effects by default, 7 always.
if redis.replicate_commands then
  redis.replicate_commands()
end

local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
local earliest = tat - tau
if now < earliest then
  return {0, earliest - now}
end

local next_tat = math.max(tat, now) + t
local ttl_ms = math.ceil((next_tat - now) / 1000)
-- '%.0f': tostring() would print a 16-digit number in exponent notation.
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', ttl_ms)
return {1, math.floor(math.min(now + tau + t - next_tat, tau + t) / t)}
