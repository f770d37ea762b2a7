-- Shared by the workloads: user ids are the bench's seeded ones, 00000000-0000-4000-8000-<12-digit n>.
-- Args (after --): token, mode ("spread", "hot", "grants" or "holds"), nonce (makes Idempotency-Keys unique per run),
-- then for captures a file of hold ids (one a line) and the number of wrk threads.
local counter = 0

local threads = {}
token, mode, nonce, holds_file, thread_count = "", "spread", "0", "", 1

function setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function init(args)
  token, mode, nonce = args[1], args[2] or "spread", args[3] or "0"
  holds_file, thread_count = args[4] or "", tonumber(args[5] or "1")
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function user_id()
  local n = 1
  if mode == "grants" then n = math.random(2001, 3000)  -- the accounts with 5 live grants each
  elseif mode ~= "hot" then n = math.random(1, 1000) end
  return string.format("00000000-0000-4000-8000-%012d", n)
end

function next_key()
  counter = counter + 1
  return string.format("bench-%s-%d-%d", nonce, thread_id, counter)
end

function done(summary, latency, requests)
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "non_2xx": %d, "socket_errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
