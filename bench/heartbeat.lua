-- wrk script: POST the legacy heartbeat of 3 started agents, rotating the hostname over
-- HOSTS simulated hosts (default 10000) named sim-000000000, sim-000000001, ... exactly
-- as ops-loadgen names them. Each of the THREADS wrk threads (default 2: set it to wrk's
-- -t) walks its own residue class, so together they cover every host.
--
--   HOSTS=1000000 THREADS=2 wrk -t2 -c64 -d10s --latency -s bench/heartbeat.lua http://127.0.0.1:2000

local hosts = tonumber(os.getenv("HOSTS") or "10000")
local stride = tonumber(os.getenv("THREADS") or "2")
local created = 0
local counter = 0

-- Runs in wrk's main Lua state, once per thread before it starts.
function setup(thread)
   thread:set("id", created)
   created = created + 1
end

-- Runs in each thread's own Lua state.
function init(args)
   counter = id
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   -- The body's tail never changes; only the hostname does.
   tail = string.format(
      '","realAgents":[' ..
      '{"name":"agent-0","version":"1.0.0","status":"started","timestamp":%d},' ..
      '{"name":"agent-1","version":"1.0.0","status":"started","timestamp":%d},' ..
      '{"name":"agent-2","version":"1.0.0","status":"started","timestamp":%d}]}',
      os.time(), os.time(), os.time())
end

function request()
   local host = counter % hosts
   counter = counter + stride
   return wrk.format(nil, "/heartbeat", nil, string.format('{"hostname":"sim-%09d', host) .. tail)
end

-- A 200 whose body carries an errorMessage is still an answer to wrk; ops-loadgen checks
-- bodies. Here we only count non-2xx, which wrk reports itself.
