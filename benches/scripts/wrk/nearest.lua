-- wrk script: GET /v1/drivers/nearest, cycling through the query points
-- of $HEXMATCH_PICKUPS (`lat,lon` per line, as `gen_drivers --pickups`
-- writes them); each wrk thread starts at a different point. k from
-- $HEXMATCH_K (default 10); $HEXMATCH_FILTER, if set, is appended to
-- every query (`capabilities=wheelchair`, `vehicle=van&capabilities=cash`).
-- Prints one RESULT line at the end.

local threads = {}
local next_tid = 0

function setup(thread)
  thread:set("tid", next_tid)
  next_tid = next_tid + 1
  table.insert(threads, thread)
end

local reqs = {}
local i = 0

function init(args)
  local k = os.getenv("HEXMATCH_K") or "10"
  local filter = os.getenv("HEXMATCH_FILTER") or ""
  if filter ~= "" then
    filter = "&" .. filter
  end
  for line in io.lines(os.getenv("HEXMATCH_PICKUPS")) do
    local lat, lon = line:match("^([^,]+),([^,]+)$")
    if lat then
      reqs[#reqs + 1] = wrk.format("GET", "/v1/drivers/nearest?lat=" .. lat .. "&lon=" .. lon .. "&k=" .. k .. filter)
    end
  end
  i = (tid * 997) % #reqs
end

function request()
  i = i % #reqs + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_s=%.2f rps=%.0f p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d " ..
    "errors_connect=%d errors_read=%d errors_write=%d errors_status=%d errors_timeout=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
