-- wrk script: POST /v1/events with NDJSON bodies read from $BODIES (one file per body), in turn.
local bodies = {}
local token = os.getenv("TOKEN")

function init(args)
  local dir = os.getenv("BODIES")
  local p = io.popen('ls "' .. dir .. '"')
  for name in p:lines() do
    local f = io.open(dir .. "/" .. name, "rb")
    bodies[#bodies + 1] = f:read("*a")
    f:close()
  end
  p:close()
end

local i = 0
function request()
  i = i % #bodies + 1
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/x-ndjson",
  }, bodies[i])
end

local non_202 = 0
function response(status, headers, body)
  if status ~= 202 then non_202 = non_202 + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("non-202 answers: %d\n", non_202))
end
