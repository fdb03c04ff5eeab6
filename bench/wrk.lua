-- wrk script for python -m bench: optional pacing, and percentiles printed in a form bench/http.py reads.
-- WRK_PACE_MS > 0: each connection waits a random 0..2*WRK_PACE_MS ms between requests (open-ish loop);
-- otherwise each connection sends its next request as soon as the answer arrives (closed loop).
local pace = tonumber(os.getenv("WRK_PACE_MS") or "0")

if pace > 0 then
  function delay()
    return math.random(0, 2 * pace)
  end
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format("bench requests %d\n", summary.requests))
  io.write(string.format("bench errors %d\n",
    errors.connect + errors.read + errors.write + errors.status + errors.timeout))
  io.write(string.format("bench seconds %.3f\n", summary.duration / 1e6))
  for _, p in ipairs({50, 99}) do
    io.write(string.format("bench p%d %.3f\n", p, latency:percentile(p) / 1000))
  end
end
