-- POST /billing/charge-tokens, each request with its own Idempotency-Key, as a real orchestrator sends.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function request()
  local body = string.format('{"user_id":"%s","amount":1,"description":"bench charge"}', user_id())
  return wrk.format("POST", "/billing/charge-tokens", {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = next_key(),
  }, body)
end
