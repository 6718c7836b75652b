-- wrk script: POST /v1/locations with $HEXMATCH_BATCH (default 100)
-- drivers of this thread (`ev-<thread>-<i>`, at one point of downtown
-- Chicago), all set offline on one request and available on the next:
-- after the first request, which creates them, every item changes a
-- driver's status, so each request publishes HEXMATCH_BATCH
-- `driver.status` events. Prints one RESULT line.

local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local headers = { ["Content-Type"] = "application/json" }
local bodies = {}
local flip = 0
ok, other = 0, 0

function init(args)
  local batch = tonumber(os.getenv("HEXMATCH_BATCH") or "100")
  for k, status in ipairs({ "offline", "available" }) do
    local items = {}
    for i = 1, batch do
      items[i] = '{"driver_id":"ev-' .. tid .. '-' .. i .. '","lat":41.8781,"lon":-87.6298,"status":"' .. status .. '"}'
    end
    bodies[k] = "[" .. table.concat(items, ",") .. "]"
  end
end

function request()
  flip = 3 - (flip == 0 and 2 or flip)
  return wrk.format("POST", "/v1/locations", headers, bodies[flip])
end

function response(status, hdrs, body)
  if status == 200 then ok = ok + 1 else other = other + 1 end
end

function done(summary, latency, requests)
  local o, x = 0, 0
  for _, t in ipairs(threads) do
    o = o + t:get("ok")
    x = x + t:get("other")
  end
  local secs = summary.duration / 1e6
  io.write(string.format(
    "RESULT requests=%d duration_s=%.2f rps=%.0f ok=%d other_status=%d p50_us=%d p99_us=%d\n",
    summary.requests, secs, summary.requests / secs, o, x,
    latency:percentile(50), latency:percentile(99)))
end
