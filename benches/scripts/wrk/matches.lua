-- wrk script: POST /v1/matches (reserve the nearest driver for a new
-- order at a pickup of $HEXMATCH_PICKUPS), and, once its 201 has come
-- back, POST /v1/matches/{order_id}/release on the next request of the
-- same thread, so the pool of available drivers stays as it was. About
-- half the requests are claims and half releases. Prints one RESULT line.

local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local points = {}
local pending = {}
local n = 0
local headers = { ["Content-Type"] = "application/json" }
created, released, other = 0, 0, 0

function init(args)
  for line in io.lines(os.getenv("HEXMATCH_PICKUPS")) do
    local lat, lon = line:match("^([^,]+),([^,]+)$")
    if lat then points[#points + 1] = { lat, lon } end
  end
  n = (tid * 997) % #points
end

function request()
  local id = table.remove(pending)
  if id then
    return wrk.format("POST", "/v1/matches/" .. id .. "/release", headers, "{}")
  end
  n = n + 1
  local p = points[n % #points + 1]
  local body = '{"order_id":"wrk-' .. tid .. '-' .. n .. '","pickup":{"lat":' .. p[1] .. ',"lon":' .. p[2] .. '}}'
  return wrk.format("POST", "/v1/matches", headers, body)
end

function response(status, hdrs, body)
  if status == 201 then
    created = created + 1
    local id = body:match('"order_id":"([^"]+)"')
    if id then pending[#pending + 1] = id end
  elseif status == 200 then
    released = released + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local c, r, o = 0, 0, 0
  for _, t in ipairs(threads) do
    c = c + t:get("created")
    r = r + t:get("released")
    o = o + t:get("other")
  end
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_s=%.2f rps=%.0f claims=%d claims_per_s=%.0f releases=%d other_status=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d " ..
    "errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d\n",
    summary.requests, secs, summary.requests / secs, c, c / secs, r, o,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
