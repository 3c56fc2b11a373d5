-- wrk script: POST /v1/events with NDJSON bodies read from $BODIES (one file per body), in turn.
-- Every pass after the first (and every pass of the second thread) gives the transfer ids a
-- prefix naming the thread and the pass, so requests carry new transfers, not repeats. Bodies
-- are split at the ids once, and joined with the prefix by table.concat (C, one copy).
local bodies = {}
local token = os.getenv("TOKEN")
local marker = '"transferId":"'

local threads = 0
function setup(thread)
  thread:set("thread_id", threads)
  threads = threads + 1
end

local function split(text)
  local parts, start = {}, 1
  while true do
    local at = string.find(text, marker, start, true)
    if not at then break end
    parts[#parts + 1] = string.sub(text, start, at - 1)
    start = at + #marker
  end
  parts[#parts + 1] = string.sub(text, start)
  return parts
end

function init(args)
  local dir = os.getenv("BODIES")
  local p = io.popen('ls "' .. dir .. '"')
  for name in p:lines() do
    local f = io.open(dir .. "/" .. name, "rb")
    bodies[#bodies + 1] = split(f:read("*a"))
    f:close()
  end
  p:close()
end

local i = 0
local pass = 0
function request()
  i = i % #bodies + 1
  if i == 1 then pass = pass + 1 end
  local prefix = marker
  if pass > 1 or thread_id ~= 0 then
    prefix = marker .. "t" .. thread_id .. "p" .. pass .. "-"
  end
  return wrk.format("POST", nil, {
    ["Authorization"] = "Bearer " .. token,
    ["Content-Type"] = "application/x-ndjson",
  }, table.concat(bodies[i], prefix))
end

local non_202 = 0
function response(status, headers, body)
  if status ~= 202 then non_202 = non_202 + 1 end
end

function done(summary, latency, requests)
  io.write(string.format("non-202 answers: %d\n", non_202))
end
