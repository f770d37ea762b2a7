-- POST /billing/holds/{hold_id}/capture: amount 1 with usage metadata and its own Idempotency-Key, as an
-- orchestrator streaming a run's tokens sends. The bench seeds one root hold per connection, each on its own
-- account, and passes their ids in a file; it runs one wrk thread per connection, and thread t takes every t-th
-- hold: so each connection streams into a hold of its own, as one agent run does.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

local common_init = init
local mine = {}
local next_hold = 0
local body = '{"amount":1,"metadata":{"run_id":"bench-run","model":"bench-model","input_tokens":10,"output_tokens":2}}'

function init(args)
  common_init(args)
  local i = 0
  for line in io.lines(holds_file) do
    if line ~= "" then
      if i % thread_count == (thread_id - 1) % thread_count then table.insert(mine, line) end
      i = i + 1
    end
  end
  assert(#mine > 0, "no holds for thread " .. thread_id .. " in " .. holds_file)
end

function request()
  next_hold = next_hold % #mine + 1
  return wrk.format("POST", "/billing/holds/" .. mine[next_hold] .. "/capture", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = next_key(),
  }, body)
end
