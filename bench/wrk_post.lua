-- Loaded with `wrk -s bench/wrk_post.lua` by the `checks` scenario of
-- bench/run.sh: every request is a POST of the file named by BENCH_BODY_FILE,
-- with Content-Type BENCH_CONTENT_TYPE (default application/json); other
-- headers come from wrk's -H. The request is set once, at the top level, and
-- there is no request()/response() hook, so wrk still builds it once per
-- thread and sends it as fast as with its default GET (wrk.format adds the
-- Content-Length). done() comes from wrk_report.lua, the same RESULT line.
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "wrk_report.lua")

local path = os.getenv("BENCH_BODY_FILE")
if not path or path == "" then
  error("wrk_post.lua: set BENCH_BODY_FILE to the file to POST")
end
local f = assert(io.open(path, "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
