-- GET /billing/balance/{user_id} over the 1,000 seeded users.
dofile(debug.getinfo(1, "S").source:sub(2):match("(.*/)") .. "common.lua")

function request()
  return wrk.format("GET", "/billing/balance/" .. user_id(), {["Authorization"] = "Bearer " .. token})
end
