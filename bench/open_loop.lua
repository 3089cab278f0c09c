-- wrk script for bench/serve_load.py: POST the PNG in $BODY, each connection waiting an exponential time
-- (mean $MEAN_MS) before each request. Over many connections the arrivals then form a steady, Poisson-like
-- stream at connections / mean rate, as an open loop would send them, and not synchronized bursts.
local mean_ms = tonumber(os.getenv("MEAN_MS") or "1000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"
local file = assert(io.open(os.getenv("BODY"), "rb"))
wrk.body = file:read("*all")
file:close()

function setup(thread)
  thread:set("seed", math.random(1, 1000000000))
end

function init(args)
  math.randomseed(seed)
end

function delay()
  if mean_ms <= 0 then return 0 end
  return -math.log(1 - math.random()) * mean_ms
end
