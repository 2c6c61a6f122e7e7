-- wrk script for Warden's benchmark: cycles through pre-built, pre-signed requests.
--
-- Environment (read in every Lua state wrk creates):
--   BENCH_WRK_REQUESTS  the request file written by bench/events.py (RequestFile.write)
--   BENCH_WRK_THREADS   wrk's -t (thread i takes requests i, i+T, i+2T, ...)
--   BENCH_WRK_ADDRS     optional "host:port,host:port": thread i connects to entry i mod n
--                       (several gateway processes behind no load balancer)
--   BENCH_WRK_DELAY_MS  optional mean pause before each request on a connection, drawn
--                       uniformly from [0, 2 * mean] so connections do not move in step
--                       (paced runs: rate ~ connections * 1000 / (mean + latency))
--   BENCH_WRK_OUT       where done() writes its JSON summary
--
-- The summary holds wrk's own counters and latency percentiles (microseconds), the
-- responses counted per HTTP status across threads, and how many times a thread
-- wrapped around its requests (a workload of unique events must not wrap).

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   local addrs = os.getenv("BENCH_WRK_ADDRS")
   if addrs and addrs ~= "" then
      local list = {}
      for entry in string.gmatch(addrs, "[^,]+") do
         table.insert(list, entry)
      end
      local host, port = string.match(list[(thread_count % #list) + 1], "^(.+):(%d+)$")
      thread.addr = wrk.lookup(host, port)[1]
   end
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local function read_requests(path, nthreads, my_id)
   local f = assert(io.open(path, "rb"))
   local magic, nbodies, nrequests = string.match(f:read("*l"), "^(%S+) (%d+) (%d+)$")
   assert(magic == "WRKREQ1", "not a request file: " .. path)
   nbodies, nrequests = tonumber(nbodies), tonumber(nrequests)
   local my_heads, my_bodies, needed = {}, {}, {}
   for i = 0, nrequests - 1 do
      local index, len = string.match(f:read("*l"), "^(%d+) (%d+)$")
      index, len = tonumber(index), tonumber(len)
      if i % nthreads == my_id then
         table.insert(my_heads, f:read(len))
         table.insert(my_bodies, index)
         needed[index] = true
      else
         f:seek("cur", len)
      end
   end
   local bodies = {}
   for j = 0, nbodies - 1 do
      local len = tonumber(f:read("*l"))
      if needed[j] then
         bodies[j] = f:read(len)
      else
         f:seek("cur", len)
      end
   end
   f:close()
   return my_heads, my_bodies, bodies
end

function init(args)
   local nthreads = tonumber(os.getenv("BENCH_WRK_THREADS") or "1")
   heads, body_of, bodies = read_requests(os.getenv("BENCH_WRK_REQUESTS"), nthreads, tid)
   count = #heads
   assert(count > 0, "thread " .. tid .. " has no requests")
   position = 0
   wraps = 0
   statuses = {}
end

function request()
   position = position + 1
   if position > count then
      position = 1
      wraps = wraps + 1
   end
   return heads[position] .. bodies[body_of[position]]
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
end

local mean_delay = tonumber(os.getenv("BENCH_WRK_DELAY_MS") or "0")
if mean_delay > 0 then
   function delay()
      return math.random() * 2 * mean_delay
   end
end

function done(summary, latency, requests)
   local by_status, total_wraps, per_thread = {}, 0, {}
   for _, thread in ipairs(threads) do
      local counts = thread:get("statuses") or {}
      for status, n in pairs(counts) do
         by_status[status] = (by_status[status] or 0) + n
      end
      total_wraps = total_wraps + (thread:get("wraps") or 0)
      table.insert(per_thread, tostring(thread:get("count") or 0))
   end
   local parts = {}
   for status, n in pairs(by_status) do
      table.insert(parts, string.format('"%d": %d', status, n))
   end
   local pct = {}
   for _, p in ipairs({50, 90, 95, 99, 99.9}) do
      table.insert(pct, string.format('"%s": %d', tostring(p), latency:percentile(p)))
   end
   local e = summary.errors
   local out = assert(io.open(os.getenv("BENCH_WRK_OUT"), "w"))
   out:write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "max": %d, "mean": %.1f, "stdev": %.1f, ' ..
      '"percentiles": {%s}}, "statuses": {%s}, "wraps": %d, "requests_per_thread": [%s]}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.max, latency.mean, latency.stdev,
      table.concat(pct, ", "), table.concat(parts, ", "), total_wraps,
      table.concat(per_thread, ", ")))
   out:close()
end
