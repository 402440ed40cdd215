-- graylane for nginx: the glue between nginx's Lua module and libgraylane_nginx.so, which
-- decides with graylane-strategy's own decide() and follows the control plane's feed in a
-- thread of its own per worker. Nothing is decided here: this file only hands the request's
-- headers over (LuaJIT FFI), sets the routing variables, and gives the balancer its peer.
--
--   init_by_lua_block        graylane.init{lib = "/path/libgraylane_nginx.so", services = {web = [[json]]}}
--                            (loads the library, checks every configuration: `nginx -t` fails on a bad one)
--   init_worker_by_lua_block graylane.start()        (opens each service in this worker: starts its feed thread)
--   set_by_lua_block $graylane_route { return graylane.route("web") }
--                            (decides: the cluster's route name, "" when none can serve; sets
--                            $graylane_lane, and $graylane_reason when a reason header is configured)
--   balancer_by_lua_block    graylane.balance("web") (the chosen cluster's next endpoint)
--   content_by_lua_block     graylane.status()       (each service's snapshot and feed counters, JSON)
--
-- `graylane render nginx` makes this module the global `graylane` in init_by_lua, so each
-- request's chunk finds it without calling `require` (200 instructions a request less).
--
-- The location sends the decision upstream with `proxy_set_header <route header>
-- $graylane_route; proxy_set_header x-graylane-lane $graylane_lane;` (nginx's proxy module then
-- drops any copy the client sent, and sends nothing for an empty value), answers 503 when
-- $graylane_route is empty, and adds the reason header with `add_header` when configured;
-- `graylane render nginx` writes all of it. set_by_lua runs without a coroutine, and nothing
-- here touches ngx.ctx (a table per request): see the slots below.
--
-- Failure: a library that cannot decide (no strategy yet, an error) sends the request to the
-- stable cluster, never to gray; no stable cluster known means 503, never a client's choice.

local ffi = require("ffi")

local base = require("resty.core.base")
-- ngx_lua loads these itself; required here for the FFI declarations used below.
require("resty.core.var")
require("resty.core.request")
require("ngx.balancer")

local ngx = ngx
local C = ffi.C
local get_request = base.get_request
local set_header = ngx.req.set_header
local ffi_string = ffi.string
local tonumber = tonumber

ffi.cdef [[
typedef struct graylane_handle graylane_handle;
typedef struct { const char *ptr; size_t len; } graylane_str;
typedef struct { int32_t cluster; int32_t reason; int32_t fallback; } graylane_decision;
int graylane_check(const char *cfg, size_t len, char *err, size_t cap);
graylane_handle *graylane_open(const char *cfg, size_t len, char *err, size_t cap);
void graylane_close(graylane_handle *h);
uint32_t graylane_generation(const graylane_handle *h);
size_t graylane_describe(const graylane_handle *h, char *buf, size_t cap);
int graylane_decide(const graylane_handle *h, uint32_t generation, const graylane_str *values,
                    size_t n, graylane_decision *out);
int graylane_decide_request(const graylane_handle *h, uint32_t generation, const void *headers,
                            size_t n, const char *path, size_t path_len, graylane_decision *out);
int graylane_peer(const graylane_handle *h, const char *key, size_t len, uint32_t index,
                  char *addr, size_t cap, uint16_t *port, uint32_t *count);
size_t graylane_status(const graylane_handle *h, char *buf, size_t cap);
]]

local DECIDED, STALE, NO_STRATEGY = 0, 1, 2
local DEFAULT_ROUTE_HEADER, DEFAULT_LANE_HEADER = "x-graylane-cluster", "x-graylane-lane"
-- The variables the rendered location holds the decision in (see the top of this file).
local ROUTE_VAR, LANE_VAR, REASON_VAR = "graylane_route", "graylane_lane", "graylane_reason"
-- More tries after a failed connection, when the cluster has more endpoints.
local MAX_MORE_TRIES = 2
local ERR_CAP = 4096

local M = { _VERSION = "0.2.0" }

local lib          -- the loaded library
local configs = {} -- service name -> configuration JSON (init_by_lua, the master)
local services = {} -- service name -> this worker's state (init_worker_by_lua)

local function load_error(err)
  return ffi_string(err)
end

-- Each request's routing decision and tries, for the balancer, in a table of slots indexed
-- by the request's address (no per-request Lua table, ngx.ctx, is made, and no nginx variable
-- is read back): route() writes the slot, balance() reads it when it still names the same
-- request. A request whose slot another one took meanwhile (both alive at once) reads the
-- decision back from $graylane_route, and retries with the cluster's next endpoint.
local SLOTS = 4096 -- init's `slots` option changes it (tests take 1, so requests collide)
local slot_r, slot_base, slot_tries, slot_key
local function make_slots(n)
  SLOTS = n
  slot_r = ffi.new("void *[?]", n)       -- the request a slot holds
  slot_base = ffi.new("uint32_t[?]", n)  -- its first endpoint's index
  slot_tries = ffi.new("uint32_t[?]", n) -- its tries after the first
  slot_key = {}                          -- its cluster key (a Lua string)
end
make_slots(SLOTS)
local intptr = ffi.typeof("intptr_t")
local floor = math.floor
local function slot_of(r)
  -- Doubles only (no 64-bit cdata to box): request addresses are far below 2^53.
  return floor(tonumber(ffi.cast(intptr, r)) / 16) % SLOTS
end

--- In init_by_lua: loads the library and checks every service's configuration.
-- opts.lib: path of libgraylane_nginx.so; opts.services: {name = JSON text}; opts.slots:
-- how many requests' decisions the balancer finds without reading $graylane_route (4096).
function M.init(opts)
  if opts.slots ~= nil then
    local n = tonumber(opts.slots)
    if not n or n < 1 or n % 1 ~= 0 then
      error("graylane: slots: " .. tostring(opts.slots) .. " is not a positive integer", 0)
    end
    make_slots(n)
  end
  lib = ffi.load(opts.lib)
  for name, json in pairs(opts.services or {}) do
    local err = ffi.new("char[?]", ERR_CAP)
    if lib.graylane_check(json, #json, err, ERR_CAP - 1) ~= 0 then
      error("graylane: service " .. name .. ": invalid configuration: " .. load_error(err), 0)
    end
    configs[name] = json
  end
end

--- Words of a line.
local function words(line)
  local out = {}
  for w in line:gmatch("%S+") do
    out[#out + 1] = w
  end
  return out
end

-- The request as nginx holds it, read through ngx_lua's own FFI (as resty.core does) without
-- making a Lua string of anything: the header list in one call (ngx.req.get_headers' C side,
-- lowercase names) and $request_uri (ngx.var's C side). The pointers stay valid for the
-- request; the library copies nothing it keeps.
local headers_count = C.ngx_http_lua_ffi_req_get_headers_count
local headers_get = C.ngx_http_lua_ffi_req_get_headers
local headers_truncated = ffi.new("int[1]")
local headers_cap = 32
local headers = ffi.new("ngx_http_lua_ffi_table_elt_t[?]", headers_cap)
local var_get = C.ngx_http_lua_ffi_var_get
local var_set = C.ngx_http_lua_ffi_var_set
local var_value = ffi.new("char *[1]")
local var_len = ffi.new("size_t[1]")
local var_err = ffi.new("char *[1]")
local var_lowcase = ffi.new("char[32]")
local var_lowcase_u = ffi.new("unsigned char[32]")
local VAR_ERR_CAP = 256
local var_errbuf = ffi.new("unsigned char[?]", VAR_ERR_CAP)
local var_errlen = ffi.new("size_t[1]")
local REQUEST_URI = "request_uri"

-- The balancer through ngx_lua's FFI (ngx.balancer's C side): the peer without a Lua string
-- for the address (the library's text as is), and the retry state.
local set_peer = C.ngx_http_lua_ffi_balancer_set_current_peer
local set_more_tries = C.ngx_http_lua_ffi_balancer_set_more_tries
local last_failure = C.ngx_http_lua_ffi_balancer_get_last_failure
local balancer_err = ffi.new("char *[1]")
local failure_status = ffi.new("int[1]")

--- Sets the nginx variable `name` of request `r` (it must exist: the rendered `set`).
local function set_var(r, name, value)
  var_errlen[0] = VAR_ERR_CAP
  if var_set(r, name, #name, var_lowcase_u, value, #value, var_errbuf, var_errlen) ~= 0 then
    error("cannot set $" .. name .. ": " .. ffi_string(var_errbuf, var_errlen[0]), 0)
  end
end

--- Reads the library's description of the snapshot in force (once per generation).
local function refresh(s)
  local len = tonumber(lib.graylane_describe(s.h, s.buf, s.cap))
  while len > s.cap do
    s.cap = len * 2
    s.buf = ffi.new("char[?]", s.cap)
    len = tonumber(lib.graylane_describe(s.h, s.buf, s.cap))
  end
  if len == 0 then
    error("graylane: no description from the library", 0)
  end
  local d = { path = false, clusters = {}, reasons = {}, reason_header = false, by_route = {},
              peers = {},
              route_header = DEFAULT_ROUTE_HEADER, lane_header = DEFAULT_LANE_HEADER }
  for line in ffi_string(s.buf, len):gmatch("[^\n]+") do
    local w = words(line)
    local k = w[1]
    if k == "generation" then
      d.gen = tonumber(w[2])
    elseif k == "route_header" then
      d.route_header = w[2]
    elseif k == "reason_header" then
      d.reason_header = w[2]
    elseif k == "lane_header" then
      d.lane_header = w[2]
    elseif k == "needed" then
      for i = 2, #w do
        d.path = d.path or w[i] == ":path" -- $request_uri; headers come as nginx's list
      end
    elseif k == "reasons" then
      for i = 2, #w do
        d.reasons[i - 1] = w[i]
      end
    elseif k == "cluster" then
      d.clusters[#d.clusters + 1] = { key = w[2], route = w[3], lane = w[4] }
    elseif k == "stable" then
      d.stable = { key = w[2], route = w[3], lane = w[4] }
    elseif k == "peer" then
      local list = d.peers[w[2]] or {}
      list[#list + 1] = { addr = w[3], port = tonumber(w[4]) }
      d.peers[w[2]] = list
    end
  end
  -- The balancer finds the cluster by the route name $graylane_route holds (the first
  -- cluster of that name).
  for _, c in ipairs(d.clusters) do
    d.by_route[c.route] = d.by_route[c.route] or c.key
  end
  if d.stable then
    d.by_route[d.stable.route] = d.by_route[d.stable.route] or d.stable.key
  end
  s.d = d
end

--- In init_worker_by_lua: opens every configured service in this worker.
function M.start()
  for name, json in pairs(configs) do
    local err = ffi.new("char[?]", ERR_CAP)
    local h = lib.graylane_open(json, #json, err, ERR_CAP - 1)
    if h == nil then
      ngx.log(ngx.ERR, "graylane: service ", name, ": ", load_error(err))
    else
      local s = {
        h = h, name = name, cap = 4096, rr = {}, out = ffi.new("graylane_decision"),
        addr = ffi.new("char[64]"), port = ffi.new("uint16_t[1]"), count = ffi.new("uint32_t[1]"),
      }
      s.buf = ffi.new("char[?]", s.cap)
      refresh(s)
      services[name] = s
    end
  end
end

--- Routes request `r` to `c` ({key, route, lane}) with reason code `code`: sets $graylane_lane
-- (and $graylane_reason), keeps the cluster for the balancer, and answers the route name for
-- $graylane_route.
local function send_to(r, d, c, code)
  local i = slot_of(r)
  slot_r[i], slot_key[i] = r, c.key
  if d.lane_header == DEFAULT_LANE_HEADER then
    set_var(r, LANE_VAR, c.lane)
  else
    -- A strategy naming its own lane header: the rendered proxy_set_header line names the
    -- default one (sent empty, so not at all), this one is set on the request itself.
    set_header(d.lane_header, c.lane)
  end
  if d.reason_header then
    set_var(r, REASON_VAR, c.key .. ";" .. code)
  end
  return c.route
end

--- The stable cluster, when the library cannot decide (`why`: no_snapshot, error); "" (503)
-- when there is none.
local function to_stable(r, s, why)
  local d = s and s.d
  if not (d and d.stable) then
    return ""
  end
  return send_to(r, d, d.stable, why)
end

local function decide(r, s)
  local h, out = s.h, s.out
  local n = headers_count(r, 0, headers_truncated) -- 0: every header, as $http_* sees them
  if n < 0 then
    error("cannot read the request headers (" .. n .. ")", 0)
  end
  if n > headers_cap then
    headers_cap = n * 2
    headers = ffi.new("ngx_http_lua_ffi_table_elt_t[?]", headers_cap)
  end
  if n > 0 and headers_get(r, headers, n, 0) ~= 0 then
    error("cannot read the request headers", 0)
  end
  local path, path_len = nil, 0
  local d = s.d
  for _ = 1, 4 do -- the description held, then up to three fresh ones
    if d.path and not path then
      local rc = var_get(r, REQUEST_URI, #REQUEST_URI, var_lowcase, 0, var_value, var_len, var_err)
      if rc ~= 0 then
        error("cannot read $request_uri (" .. rc .. ")", 0)
      end
      path, path_len = var_value[0], var_len[0]
    end
    local rc = lib.graylane_decide_request(h, d.gen, headers, n, path, path_len, out)
    if rc == DECIDED then
      local c = d.clusters[out.cluster + 1]
      if not c then
        return ""
      end
      local code = d.reasons[out.reason + 1] or "unknown"
      if out.fallback ~= 0 then
        code = code .. ",fallback_unhealthy"
      end
      return send_to(r, d, c, code)
    elseif rc == NO_STRATEGY then
      return to_stable(r, s, "no_snapshot")
    elseif rc ~= STALE then
      return to_stable(r, s, "error")
    end
    refresh(s)
    d = s.d
  end
  return to_stable(r, s, "error")
end

--- In set_by_lua ($graylane_route): decides for this request; answers the chosen cluster's
-- route name ("" when no cluster can serve: the location answers 503) and sets
-- $graylane_lane (and $graylane_reason when configured).
function M.route(name)
  local r = get_request()
  local s = services[name]
  local ok, route = pcall(decide, r, s)
  if not ok then
    ngx.log(ngx.ERR, "graylane: service ", name, ": ", route)
    ok, route = pcall(to_stable, r, s, "error")
    if not ok then
      ngx.log(ngx.ERR, "graylane: service ", name, ": ", route)
      return ""
    end
  end
  return route
end

local function balance_error(...)
  ngx.log(ngx.ERR, "graylane: ", ...)
  return ngx.exit(ngx.ERROR)
end

--- In balancer_by_lua: the next endpoint (round robin per worker) of the cluster route()
-- chose; on a retry after a failed connection, the endpoint after the one that failed.
function M.balance(name)
  local s = services[name]
  if not s then
    return balance_error("service ", name, " is not open in this worker")
  end
  local r = get_request()
  local i = slot_of(r)
  local first = last_failure(r, failure_status, balancer_err) == 0
  local key, index
  if slot_r[i] == r then
    key = slot_key[i]
    if first then
      index = s.rr[key] or 0
      s.rr[key] = (index + 1) % 0x40000000
      slot_base[i], slot_tries[i] = index, 0
    else
      local tries = slot_tries[i] + 1
      slot_tries[i] = tries
      index = slot_base[i] + tries
    end
  else
    -- The slot went to another request: the decision from $graylane_route, the next endpoint.
    if var_get(r, ROUTE_VAR, #ROUTE_VAR, var_lowcase, 0, var_value, var_len, var_err) ~= 0
        or var_len[0] == 0 then
      return balance_error("balancer without a routing decision ($", ROUTE_VAR, " unset)")
    end
    local route = ffi_string(var_value[0], var_len[0])
    key = s.d.by_route[route] or route
    index = s.rr[key] or 0
    s.rr[key] = (index + 1) % 0x40000000
  end
  -- The endpoints in force, from the description (read again whenever they change); a
  -- cluster without any there (one just emptied, draining) asks the library.
  local peers = s.d.peers[key]
  local count = peers and #peers or 0
  local rc
  if count > 0 then
    local p = peers[index % count + 1]
    rc = set_peer(r, p.addr, #p.addr, p.port, balancer_err)
  else
    local len = lib.graylane_peer(s.h, key, #key, index, s.addr, 64, s.port, s.count)
    if len < 0 then
      return balance_error("service ", s.name, ": cluster ", key, " has no endpoint")
    end
    rc = set_peer(r, s.addr, len, s.port[0], balancer_err)
    count = s.count[0]
  end
  if rc ~= 0 then
    return balance_error("set_current_peer: ", ffi_string(balancer_err[0]))
  end
  if first and count > 1 then
    set_more_tries(r, math.min(count - 1, MAX_MORE_TRIES), balancer_err)
  end
end

--- In content_by_lua: every service's state in this worker, as JSON.
function M.status()
  local parts = {}
  local buf_cap = 16384
  local buf = ffi.new("char[?]", buf_cap)
  for name, s in pairs(services) do
    local len = tonumber(lib.graylane_status(s.h, buf, buf_cap))
    if len > buf_cap then
      buf_cap = len
      buf = ffi.new("char[?]", buf_cap)
      len = tonumber(lib.graylane_status(s.h, buf, buf_cap))
    end
    parts[#parts + 1] = string.format("%q:%s", name, ffi_string(buf, math.min(len, buf_cap)))
  end
  ngx.header.content_type = "application/json"
  ngx.say("{", table.concat(parts, ","), "}")
end

return M
