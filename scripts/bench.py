#!/usr/bin/env python3
"""make bench: graylane measured side by side against what a user would pick instead.

(a) Envoy, no wasm: native header-match routes (exact ids and a regex for a range);
(b) Envoy with an empty Proxy-Wasm filter (bench/noop-filter);
(c) Envoy with graylane: 100,000 ids, 1,000 intervals and a stable percentage;
(d) Envoy with a Lua filter doing the same job (table of ids, binary search of the intervals, a
tenant percentage, and both headers graylane writes: the route and the lane);
(e) Envoy with a Proxy-Wasm filter that reads the tenant header and writes the two routing
    headers without deciding anything: the floor of any filter that routes by
    `cluster_header` and tells the next hop its lane (bench/noop-filter, mode `headers`);
(t) the same floor with the SDK's body, trailer and `on_done` callbacks unexported
    (`graylane-oci trim`): the least an SDK-built filter doing this job costs on this Envoy;
(u) (t) reading each response's `:status` besides, as traffic reports must (issue 11);
(r) the same job written against the Proxy-Wasm ABI with no SDK, exporting only the request
    headers callback: the least any Proxy-Wasm filter doing this job can cost on this Envoy
    (bench/raw-filter);
(s) (r) also exporting, as callbacks that do nothing, the other per-request callbacks graylane
    exports (context creation, response headers, log; filter/src/abi.rs): the least a filter
    that needs them costs, whatever it does in them.

All nine Envoys (1 worker each, so the proxy is the bottleneck) run at once; wrk alternates
between them round after round, so machine noise hits all alike; medians of the rounds are
reported, and ratios. Then each of them alone under callgrind: the instructions Envoy runs a
request, counted, not timed, so other jobs on the machine do not move them (the throughput
moves by a few per cent round to round on two shared cores, more than some of the goals' margins;
instructions are not time, so both are shown). Both clusters are served by one upstream process (release build, two
ports): with one process per cluster, every configuration that splits traffic between A and
B would also split it between two processes competing for the same two cores, which costs
more than anything measured here and is not the proxy's doing. Then: decide() natively
(criterion), memory per VM with 1,000,000 ids (inline and over the feed; BENCH_ONLY=memory runs
it alone and only prints), and propagation from an API write to every Envoy worker (1 and 4
workers); a request's cost in the filter's own code under V8 with the host calls stubbed
(scripts/vm-request-bench.mjs, BENCH_ONLY=vm alone). BENCH_KEEP=1 keeps the work directory (Envoy logs) for a look afterwards.

Traffic reports and previews (BENCH_ONLY=reports runs them alone and only prints): Envoys (1
worker) with graylane following the control plane and the strategy of (c), (i) reporting every
second, (j) with reports off, (k) reporting with a preview running on every request (a
candidate with another percentage and 1,000 more ids, decided beside the live strategy), and
(e) the header-writing floor again, alternated the same way, then each under callgrind; then the
requests the control plane counted, and what the preview predicted.

Signed gray cookies (BENCH_ONLY=cookie runs them alone and only prints): three Envoys (1
worker) with graylane routing by the cookie alone, alternated the same way: (h) requests
without a cookie, (f) the same signed cookie on every request (verified once, then answered
from the VM's cache), (g) a new signed cookie on every request (4,096 tenants in turn, four
times what the cache holds, so every request verifies a signature). The cookies are minted by
the control plane (`POST /v1/services/bench/gray-cookie`). Then the same natively (criterion).

nginx (its own section, BENCH_ONLY=nginx runs it alone and only prints; BENCH_ONLY=nginx-instructions
only its callgrind counts): nginx (1 worker)
with graylane (libgraylane_nginx.so, the same strategy) against a plain `proxy_pass` and
against a `map` whitelist of the same 100,000 ids (the intervals as one regex) and against (f) the
floor of graylane's nginx design (its Lua phases and headers, deciding nothing), alternated the
same way; the instructions nginx itself executes per request in each (callgrind: counted, so
other jobs on the machine do not move them, unlike the throughput); the memory of an nginx
worker holding 1,000,000 ids that came over the feed; and propagation from an API write to
every nginx worker.

The control plane (BENCH_ONLY=control-plane runs it alone and only prints): the admin API with
a million ids in a service, then the real `graylane serve` with 100 services x 100,000 ids and
1,000 simulated filters long-polling its feed (control-plane/tests/bench.rs).
"""
import json, os, re, shutil, signal, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVOY = os.environ["ENVOY_BIN"]
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
WASM = os.environ.get("GRAYLANE_BENCH_WASM") or os.path.join(TARGET, "wasm32-wasip1/release/graylane_filter.wasm")
NOOP = os.path.join(TARGET, "wasm32-wasip1/release/graylane_noop_filter.wasm")
NOOP_TRIMMED = os.path.join(TARGET, "wasm32-wasip1/release/graylane_noop_filter.trimmed.wasm")  # scripts/bench
RAW = os.path.join(TARGET, "wasm32-wasip1/release/graylane_raw_filter.wasm")
RAW_CALLBACKS = os.path.join(TARGET, "wasm32-wasip1/release/graylane_raw_filter.callbacks.wasm")  # scripts/bench
BACKEND = os.path.join(TARGET, "release/demo-backend")
NGINX = "/usr/sbin/nginx"
NGINX_LIB = os.path.join(TARGET, "nginx/libgraylane_nginx.so")
NGINX_MODULE = os.path.join(TARGET, "nginx/ngx_http_graylane_module.so")
GRAYLANE = os.path.join(TARGET, "debug/graylane")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "7"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
work = tempfile.mkdtemp(prefix="graylane-bench-")
procs = []
nginxes = []  # nginx masters: stopped with TERM (a KILLed master leaves its workers running)

def stop_nginxes():
    for p in nginxes:
        try:
            p.terminate()
            p.wait(timeout=10)
        except Exception:
            pass
    del nginxes[:]

def cleanup(*_):
    stop_nginxes()
    for p in procs:
        try:
            p.kill()
            p.wait(timeout=5)
        except Exception:
            pass
    if os.environ.get("BENCH_KEEP"):
        print(f"bench: logs kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)

signal.signal(signal.SIGTERM, lambda *a: (cleanup(), sys.exit(1)))

def start(cmd, log):
    p = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    procs.append(p)
    return p

def get(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except Exception as e:
        return 0, str(e)

def routes_to(port, tenant):
    """The body (the upstream's name) of a request for `tenant`, or None."""
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"x-tenant-id": tenant})
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.read().decode()
    except Exception:
        return None

def wait(cond, what, secs=120):
    end = time.time() + secs
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")

# ---- the strategy: 100,000 ids, 1,000 intervals, a stable 5 % ------------------------------
IDS = [i * 17 for i in range(1, 100_001)]                       # up to 1.7M
INTERVALS = [[3_000_000 + i * 1_000, 3_000_000 + i * 1_000 + 99] for i in range(1_000)]
PERCENT = 5

def strategy(ids=IDS, intervals=INTERVALS):
    return {"route-strategy": {
        "A": {"status": "Y", "id": {"ids": ids, "interval": intervals},
              "percent": {"value": PERCENT, "by": "tenant"}},
        "B": {"status": "G", "id": {"all": True}}}}

ROUTES_BY_HEADER = """
              - match: {prefix: "/", headers: [{name: x-graylane-cluster, present_match: true}]}
                route: {cluster_header: x-graylane-cluster}
              - match: {prefix: "/"}
                route: {cluster: B}"""

# (a): what a user writes natively: a few exact ids and one range as a regex.
ROUTES_NATIVE = """
              - match: {prefix: "/", headers: [{name: x-tenant-id, string_match: {exact: "17"}}]}
                route: {cluster: A}
              - match: {prefix: "/", headers: [{name: x-tenant-id, string_match: {exact: "34"}}]}
                route: {cluster: A}
              - match: {prefix: "/", headers: [{name: x-tenant-id, string_match: {safe_regex: {regex: "^30[0-9][0-9][0-9][0-9][0-9]$"}}}]}
                route: {cluster: A}
              - match: {prefix: "/"}
                route: {cluster: B}"""

def wasm_filter(path, config):
    return f"""
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: bench
                root_id: bench
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: bench
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {json.dumps(path)}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {json.dumps(config)}"""

def lua_filter():
    ids = ",".join(f"[{i}]=true" for i in IDS)
    lo = ",".join(str(a) for a, _ in INTERVALS)
    hi = ",".join(str(b) for _, b in INTERVALS)
    code = f"""
local ids = {{{ids}}}
local lo = {{{lo}}}
local hi = {{{hi}}}
local function in_intervals(t)
  local l, r = 1, #lo
  while l <= r do
    local m = math.floor((l + r) / 2)
    if t < lo[m] then r = m - 1 elseif t > hi[m] then l = m + 1 else return true end
  end
  return false
end
function envoy_on_request(h)
  local t = tonumber(h:headers():get("x-tenant-id"))
  local gray = false
  if t then
    gray = ids[t] or in_intervals(t) or ((t * 2654435761) % 4294967296) % 10000 < {PERCENT * 100}
  end
  local headers = h:headers()
  headers:replace("x-graylane-cluster", gray and "A" or "B")
  headers:replace("x-graylane-lane", gray and "gray" or "prod")
end
"""
    return f"""
          - name: envoy.filters.http.lua
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
              default_source_code: {{inline_string: {json.dumps(code)}}}"""

def envoy_config(name, routes, filters, admin_port, port, extra_clusters=""):
    return f"""
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}}}
static_resources:
  listeners:
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:{routes}
          http_filters:{filters}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: A
    type: STATIC
    load_assignment: {{cluster_name: A, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18181}}}}}}}}]}}]}}
  - name: B
    type: STATIC
    load_assignment: {{cluster_name: B, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 18182}}}}}}}}]}}]}}
{extra_clusters}"""

def run_envoy(name, yaml_text, admin_port, concurrency=1):
    path = os.path.join(work, f"{name}.yaml")
    open(path, "w").write(yaml_text)
    p = start([ENVOY, "-c", path, "--concurrency", str(concurrency), "--disable-hot-restart",
               "-l", "warn"], os.path.join(work, f"{name}.log"))
    wait(lambda: get(f"http://127.0.0.1:{admin_port}/ready")[1].strip() == "LIVE", f"envoy {name}")
    return p

def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0

WRK_LUA = os.path.join(work, "tenants.lua")

def tenants_script():
    """wrk's default load: random tenant ids (written on first use, so that a section run alone,
    BENCH_ONLY=..., sends tenants too: without the script wrk sends no tenant header at all)."""
    if not os.path.exists(WRK_LUA):
        open(WRK_LUA, "w").write("""
math.randomseed(42)
request = function()
  return wrk.format("GET", "/", {["x-tenant-id"] = tostring(math.random(1, 4000000))})
end
""")
    return WRK_LUA

def wrk(port, script=None, with_total=False):
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{SECONDS}s", "--latency", "-s", script or tenants_script(),
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = int(errors.group(1)) if errors else 0
    if with_total:
        return rps, p99, errors, int(re.search(r"(\d+) requests in", out).group(1))
    return rps, p99, errors

PACED_LUA = os.path.join(work, "tenants-paced.lua")

def callgrind_count(pid, url, prefix):
    """Instructions a request costs the process `pid` running under callgrind (started with
    --instr-atstart=no and --callgrind-out-file=<prefix>). Counted, not timed: other jobs on
    the machine do not move the figure.

    Marginal: valgrind runs the proxy some 50 times slower, so work done per second (ticks,
    traffic reports, the feed's long poll) would weigh 50 times more on each request than at
    full speed. So two windows of `SECONDS` each are counted, one at full load and one paced
    (each connection waits 40 ms between requests): the work per second is in both, and the
    difference in instructions over the difference in requests is what a request itself
    costs. Warmed first by 3 s of load (V8 and LuaJIT compile). wrk: one thread, 4
    connections."""
    if not os.path.exists(PACED_LUA):
        open(PACED_LUA, "w").write(open(tenants_script()).read() + "\ndelay = function() return 40 end\n")
    d, base = os.path.split(prefix)
    def load(secs, script):
        text = subprocess.run(["wrk", "-t1", "-c4", f"-d{secs}s", "-s", script, url],
                              capture_output=True, text=True).stdout
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        assert not errors, f"{prefix}: {errors.group(0)} while counting"
        return int(re.search(r"(\d+) requests in", text).group(1))
    def counted(script):
        """(instructions, requests) of one window: instrumented, loaded, dumped."""
        before = set(os.listdir(d))
        subprocess.run(["callgrind_control", "-i", "on", str(pid)], capture_output=True)
        requests = load(SECONDS, script)
        subprocess.run(["callgrind_control", "-i", "off", str(pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True)
        total = 0
        for f in set(os.listdir(d)) - before:
            if f.startswith(base):
                for line in open(os.path.join(d, f)):
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
        return total, requests
    load(3, tenants_script())
    full, n_full = counted(tenants_script())
    paced, n_paced = counted(PACED_LUA)
    assert full > 0 and paced > 0, f"{prefix}: no callgrind dump counted ({full}, {paced})"
    assert n_full > 2 * n_paced, f"{prefix}: {n_full} requests at full load, {n_paced} paced: not far enough apart"
    return (full - paced) / (n_full - n_paced)

def envoy_instructions(names, ready=None):
    """Instructions Envoy (all its threads, user space) runs a request, for each config in
    `names` (`{name: port}`, the configs run_envoy wrote; their Envoys stopped first), one at a
    time under callgrind; `ready(port)` tells when one may be measured (default: it answers)."""
    out = {}
    if shutil.which("valgrind") is None:
        return out
    for name, port in names.items():
        # Each run its own prefix: a config counted in two sections (e) would otherwise dump
        # over the first run's files, and nothing new would be counted.
        prefix = os.path.join(work, f"callgrind.envoy.{len(os.listdir(work))}.{name}")
        p = start(["valgrind", "--tool=callgrind", "--smc-check=all-non-file", "--instr-atstart=no",
                   f"--callgrind-out-file={prefix}", ENVOY, "-c", os.path.join(work, f"{name}.yaml"),
                   "--concurrency", "1", "--disable-hot-restart", "-l", "warn"],
                  os.path.join(work, f"callgrind-{name}.log"))
        wait(lambda: (ready or (lambda q: get(f"http://127.0.0.1:{q}/", timeout=5)[0] == 200))(port),
             f"envoy {name} under valgrind", secs=300)
        out[name] = callgrind_count(p.pid, f"http://127.0.0.1:{port}/", prefix)
        p.terminate()
        p.wait()
        print(f"bench: envoy {name} under callgrind: {out[name]:.0f} instructions a request", flush=True)
    return out

def spread(rs):
    return "median of the per-round ratios {:.3f}, range {:.2f}-{:.2f}".format(statistics.median(rs), min(rs), max(rs))

def throughput():
    configs = {
        "a_native": (ROUTES_NATIVE, ""),
        "b_noop_wasm": (ROUTES_BY_HEADER, wasm_filter(NOOP, "{}")),
        "c_graylane": (ROUTES_BY_HEADER, wasm_filter(WASM, json.dumps({"service": "bench", "strategy": strategy()}))),
        "d_lua": (ROUTES_BY_HEADER, lua_filter()),
        "e_headers_only": (ROUTES_BY_HEADER, wasm_filter(NOOP, "headers")),
        # The floor (e) with the SDK's unused callbacks unexported (graylane-oci trim): the least
        # an SDK-built filter that reads the tenant and writes the two headers costs here.
        "t_floor_trimmed": (ROUTES_BY_HEADER, wasm_filter(NOOP_TRIMMED, "headers")),
        # (t) reading each response's :status besides, as graylane's traffic reports must: what
        # that one read costs any Proxy-Wasm filter here (issue 11's reports goal).
        "u_floor_status": (ROUTES_BY_HEADER, wasm_filter(NOOP_TRIMMED, "headers+status")),
        # The same job with no SDK, only the request callback exported (r), and with graylane's
        # other per-request callbacks exported besides, doing nothing (s).
        "r_raw": (ROUTES_BY_HEADER, wasm_filter(RAW, "")),
        "s_raw_callbacks": (ROUTES_BY_HEADER, wasm_filter(RAW_CALLBACKS, "")),
    }
    ports, pids = {}, {}
    for i, (name, (routes, filters)) in enumerate(configs.items()):
        port, admin = 18200 + i, 18300 + i
        pids[name] = run_envoy(name, envoy_config(name, routes, filters, admin, port), admin).pid
        ports[name] = port
        st, body = get(f"http://127.0.0.1:{port}/")
        assert st == 200, f"{name}: {st} {body}"
    results = {n: [] for n in configs}
    for r in range(ROUNDS):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            results[name].append(wrk(ports[name]))
        print(f"bench: round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{n} {results[n][-1][0]:.0f} rps" + (f" ({results[n][-1][2]} non-2xx)" if results[n][-1][2] else "")
            for n in configs), flush=True)
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
               sum(x[2] for x in v)) for n, v in results.items()}
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    instr = envoy_instructions(ports)
    return med, instr

def memory():
    """RSS of Envoy with graylane holding 1,000,000 ids, at 1 and 3 workers; per VM = half the
    difference. The same with a 3-id strategy gives the VM's fixed cost. Twice: the strategy
    inline in the plugin configuration, and the strategy arriving over the control plane's feed
    (a scripted feed in the control plane's wire format: one worker fetches it, the others take
    it from shared data)."""
    out = {}
    big = strategy(ids=list(range(1, 3_000_000, 3)), intervals=INTERVALS)  # 1,000,000 ids
    small = strategy(ids=[1, 2, 3], intervals=[[1, 100]])
    feed_port = 18440
    for label, strat in (("1M ids", big), ("3 ids", small)):
        for via in ("plugin configuration", "feed"):
            feed = None
            extra = ""
            if via == "feed":
                feed = Feed("mem", strat, feed_port)
                cfg = json.dumps({"service": "mem", "control_plane": {"cluster": "feed", "report_ms": 0}})
                extra = f"""
  - name: feed
    type: STATIC
    load_assignment: {{cluster_name: feed, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {feed_port}}}}}}}}}]}}]}}"""
            else:
                cfg = json.dumps({"service": "mem", "strategy": strat})
            rss = {}
            for workers in (1, 3):
                name = f"mem_{label.replace(' ', '')}_{via.split()[0]}_{workers}"
                admin = 18400 + workers
                p = run_envoy(name, envoy_config(name, ROUTES_BY_HEADER, wasm_filter(WASM, cfg), admin, 18410 + workers, extra),
                              admin, workers)
                if feed:
                    def installed():
                        text = get(f"http://127.0.0.1:{admin}/stats?filter=graylane.mem.snapshot_installed$")[1]
                        return sum(int(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.strip()) >= workers
                    wait(installed, f"every worker of {name} holding the feed's strategy")
                for _ in range(20):
                    get(f"http://127.0.0.1:{18410 + workers}/")
                time.sleep(1.0)
                rss[workers] = rss_mib(p.pid)
                p.kill(); p.wait()
            if feed:
                feed.server.shutdown(); feed.server.server_close()
                feed_port += 1
            out[f"{label}, {via}"] = (rss[1], rss[3], (rss[3] - rss[1]) / 2)
    return out

def vm_cost(rounds=5):
    """A request's cost in the filter's own code under V8, free of Envoy (scripts/vm-request-
    bench.mjs: Node runs the .wasm with the host calls stubbed): the floor's filter (e) and
    graylane, alternating, medians of `rounds`."""
    runs = {"headers": [], "graylane": []}
    for _ in range(rounds):
        for mode, wasm in (("headers", NOOP), ("graylane", WASM)):
            out = subprocess.run(["node", "--no-warnings", os.path.join(ROOT, "scripts/vm-request-bench.mjs"), wasm, mode],
                                 capture_output=True, text=True, check=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    e = statistics.median(r["ns_per_request"] for r in runs["headers"])
    c = statistics.median(r["ns_per_request"] for r in runs["graylane"])
    calls = (runs["headers"][0]["host_calls"], runs["graylane"][0]["host_calls"])
    return [("a request in the filter's own code under V8 (Node, host calls stubbed): the floor's filter (e) / graylane",
             f"{e / 1000:.2f} / {c / 1000:.2f} us", f"host calls a request {calls[0]:g} / {calls[1]:g}; medians of {rounds} alternating runs")]

def criterion():
    out = subprocess.run(["cargo", "bench", "-p", "graylane-strategy", "--bench", "decide", "--",
                          "--warm-up-time", "1", "--measurement-time", "3"],
                         capture_output=True, text=True, cwd=ROOT)
    out = out.stdout + out.stderr
    res = {}
    for name, a, ua, b, ub, c, uc in re.findall(
            r"decide_1M_ids_10k_intervals/(\w+)\s+time:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+) ([\d.]+) (\S+)\]", out):
        res[name] = f"{b} {ub}"
    if not res:
        print("bench: criterion output not understood:\n" + out[-2000:])
    return res

def propagation():
    out = subprocess.run(["cargo", "test", "-q", "-p", "graylane-e2e", "--test", "propagation", "--",
                          "--ignored", "--nocapture"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ))
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("propagation:")]
    if not lines:
        print(out.stdout[-3000:], out.stderr[-3000:])
    return lines

def churn():
    out = subprocess.run(["cargo", "test", "-q", "--profile", "native-bench", "-p", "graylane-e2e", "--test", "discovery",
                          "discovery_bench_envoy_churn", "--", "--ignored", "--nocapture"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("churn: registry")]
    if not lines:
        print(out.stdout[-3000:], out.stderr[-3000:])
    return lines

# ---- traffic reports ----------------------------------------------------------------------

def reports():
    """What traffic reports and previews cost the request path: Envoys (1 worker) with graylane
    following the same control plane and the same strategy as (c), reports on (i, every second),
    off (j, report_ms 0), reports on with a preview evaluated on every request (k, its own
    service, so (i) does not evaluate it), and the floor (e), alternated round by round. Then
    whether the control plane counted every request that (i) answered, and the preview's
    summary."""
    cp_dir = os.path.join(work, "reports-cp")
    os.makedirs(cp_dir)
    cp_port = 18720
    open(os.path.join(cp_dir, "graylane.yaml"), "w").write(
        f"listen: 127.0.0.1:{cp_port}\ndata_dir: data\n"
        "tokens: [{name: bench, token: bench-read-token, role: read}, "
        "{name: ops, token: bench-write-token, role: write}]\n"
        "services:\n  bench: " + json.dumps(strategy()) + "\n  bench2: " + json.dumps(strategy()) + "\n")
    cp = start([GRAYLANE, "serve", "--config", os.path.join(cp_dir, "graylane.yaml")], os.path.join(work, "reports-cp.log"))
    wait(lambda: get(f"http://127.0.0.1:{cp_port}/healthz")[0] == 200, "the control plane")
    cp_cluster = f"""  - name: graylane_cp
    type: STATIC
    load_assignment: {{cluster_name: graylane_cp, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {cp_port}}}}}}}}}]}}]}}
"""
    def api(method, path, body=None, token="bench-read-token"):
        req = urllib.request.Request(f"http://127.0.0.1:{cp_port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"authorization": f"Bearer {token}", "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    # The candidate: 10 % instead of 5 %, and 1,000 more ids.
    candidate = strategy(ids=IDS + [2_000_000 + i for i in range(1_000)])
    candidate["route-strategy"]["A"]["percent"]["value"] = PERCENT * 2
    api("POST", "/v1/services/bench2/preview", {"strategy": candidate, "expires_secs": 3600}, "bench-write-token")
    configs = {"i_reports_on": ("bench", 1000), "j_reports_off": ("bench", 0),
               "k_preview": ("bench2", 1000), "e_headers_only": (None, None)}
    ports, pids = {}, {}
    for i, (name, (service, every)) in enumerate(configs.items()):
        port, admin = 18700 + i, 18710 + i
        if service is None:
            filters = wasm_filter(NOOP, "headers")
        else:
            plugin = json.dumps({"service": service, "control_plane": {"cluster": "graylane_cp", "report_ms": every}})
            filters = wasm_filter(WASM, plugin)
        pids[name] = run_envoy(name, envoy_config(name, ROUTES_BY_HEADER, filters, admin, port, cp_cluster), admin).pid
        ports[name] = port
        if service is not None:
            # The strategy arrives over the feed: tenant 17 is listed for A.
            wait(lambda: routes_to(port, "17") == "A", f"{name} following the feed")
    def counted():
        return sum(c["total"]["requests"] for c in api("GET", "/v1/services/bench/traffic")["clusters"])
    time.sleep(2.0)
    before = counted()
    results = {n: [] for n in configs}
    sent = 0
    for r in range(ROUNDS):
        # Which runs first alternates too: a round's first run would otherwise always be (i).
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            rps, p99, errors, total = wrk(ports[name], with_total=True)
            results[name].append((rps, p99, errors))
            sent += total if name == "i_reports_on" else 0
        print(f"bench: reports round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{n} {results[n][-1][0]:.0f} rps" for n in configs), flush=True)
    time.sleep(3.0)  # the last report
    got = counted() - before
    preview = api("GET", "/v1/services/bench2/preview")
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    # Counted the same way, one at a time, the graylane ones once they follow the feed.
    instr = envoy_instructions(ports, ready=lambda port: routes_to(port, "17") in ("A", "B") and (
        port == ports["e_headers_only"] or routes_to(port, "17") == "A"))
    print("bench: preview pairs: " + json.dumps([{k: p[k] for k in ("from", "to", "requests", "tenants", "tenants_exact", "examples")}
                                                 for p in preview["pairs"]]), flush=True)
    cp.kill(); cp.wait()
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), sum(x[2] for x in v))
           for n, v in results.items()}
    i, j, k, e = (med[n] for n in ("i_reports_on", "j_reports_off", "k_preview", "e_headers_only"))
    per_round = lambda x, y: [a[0] / b[0] for a, b in zip(results[x], results[y])]
    rows = [
        ("traffic reports, graylane following the control plane: reports on (i) / off (j)",
         f"{i[0]:.0f} / {j[0]:.0f} req/s", f"p99 {i[1]:.2f} / {j[1]:.2f} ms"),
        ("ratio i/j (what reports cost the request path) [goal >= 0.99]", f"{i[0] / j[0]:.3f}",
         spread(per_round("i_reports_on", "j_reports_off"))),
        ("requests wrk completed through (i) / requests the control plane counted for it",
         f"{sent} / {got}", "wrk stops with requests in flight: counted >= completed"),
        ("preview on every request (k) / the header writes alone (e), same run [goal >= 0.93]",
         f"{k[0] / e[0]:.3f}", f"{k[0]:.0f} / {e[0]:.0f} req/s; " + spread(per_round("k_preview", "e_headers_only"))),
        ("preview on every request (k) / reports on without a preview (i)", f"{k[0] / i[0]:.3f}",
         spread(per_round("k_preview", "i_reports_on"))),
    ]
    if instr:
        rows += [
            ("Envoy instructions a request, all its threads (callgrind; i/j/k/e)",
             " / ".join(f"{instr[n] / 1000:.1f}k" for n in ("i_reports_on", "j_reports_off", "k_preview", "e_headers_only")),
             "counted, not timed: other jobs do not move it"),
            ("ratio i/j by the instructions a request (j's / i's) [goal >= 0.99]",
             f"{instr['j_reports_off'] / instr['i_reports_on']:.3f}", ""),
            ("ratio k/e by the instructions a request (e's / k's) [goal >= 0.93]",
             f"{instr['e_headers_only'] / instr['k_preview']:.3f}", ""),
        ]
    rows += [
        ("what the preview predicted (5 % -> 10 % of tenants, +1,000 ids)", preview["summary"].replace("|", "/"), ""),
    ]
    for p in procs[1:]:  # all but the upstream process
        if p.poll() is None:
            p.kill()
    return rows

# ---- signed gray cookies -------------------------------------------------------------------
COOKIE_TENANTS = 4096

def cookies():
    """Envoy worker time for a request with a signed gray cookie: none, remembered, verified."""
    cp_dir = os.path.join(work, "cookie-cp")
    os.makedirs(cp_dir)
    key = os.path.join(cp_dir, "bench.key")
    gen = subprocess.run([GRAYLANE, "keygen", "--id", "bench", "--out", key], capture_output=True, text=True, check=True)
    public = re.search(r'public_key: "([^"]+)"', gen.stdout).group(1)
    keys = [{"id": "bench", "public_key": public}]
    cp_port = 18620
    open(os.path.join(cp_dir, "graylane.yaml"), "w").write(
        f"listen: 127.0.0.1:{cp_port}\ndata_dir: data\n"
        "tokens: [{name: bench, token: bench-issuer-token, role: issuer}]\n"
        "cookie_keys: [{id: bench, private_key_file: bench.key}]\n"
        "services:\n  bench:\n"
        f"    gray_cookie: {{keys: [{{id: bench, public_key: \"{public}\"}}]}}\n"
        f"    route-strategy: {{A: {{status: Y, id: {{interval: [[1, {COOKIE_TENANTS}]]}}}}, B: {{status: G, id: {{all: true}}}}}}\n")
    cp = start([GRAYLANE, "serve", "--config", os.path.join(cp_dir, "graylane.yaml")], os.path.join(work, "cookie-cp.log"))
    wait(lambda: get(f"http://127.0.0.1:{cp_port}/healthz")[0] == 200, "the control plane")
    minted = []
    for t in range(1, COOKIE_TENANTS + 1):
        req = urllib.request.Request(f"http://127.0.0.1:{cp_port}/v1/services/bench/gray-cookie",
                                     data=json.dumps({"tenant": str(t)}).encode(), method="POST",
                                     headers={"authorization": "Bearer bench-issuer-token",
                                              "content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            answer = json.loads(r.read())
        assert answer["gray"], answer
        minted.append(answer["value"])
    cp.kill(); cp.wait()
    lua = lambda name, body: (open(os.path.join(work, name), "w").write(body), os.path.join(work, name))[1]
    scripts = {
        "h_no_cookie": lua("no_cookie.lua", """
request = function()
  return wrk.format("GET", "/", {["x-tenant-id"] = "1"})
end
"""),
        "f_remembered": lua("remembered.lua", f"""
request = function()
  return wrk.format("GET", "/", {{["x-tenant-id"] = "1", ["cookie"] = "tenantGray={minted[0]}"}})
end
"""),
        # wrk's two threads take disjoint halves, each cycling through 2,048 cookies, so that
        # between two visits of a cookie 4,096 others are verified and remembered: always a miss.
        "g_verified": lua("verified.lua", "local cookies = {" + ",".join(f'"{v}"' for v in minted) + """}
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end
local n = 0
request = function()
  local half = #cookies / 2
  n = n % half + 1
  local t = (id % 2) * half + n
  return wrk.format("GET", "/", {["x-tenant-id"] = tostring(t), ["cookie"] = "tenantGray=" .. cookies[t]})
end
"""),
    }
    plugin = json.dumps({"service": "bench", "strategy": {"gray_cookie": {"keys": keys}, "route-strategy": {
        "A": {"status": "Y", "gray_cookie": True}, "B": {"status": "G", "id": {"all": True}}}}})
    ports = {}
    for i, name in enumerate(scripts):
        port, admin = 18600 + i, 18610 + i
        run_envoy(name, envoy_config(name, ROUTES_BY_HEADER, wasm_filter(WASM, plugin), admin, port), admin)
        ports[name] = (port, admin)
    # The cookie routes: tenant 1 with its cookie reaches A, without it B.
    req = urllib.request.Request(f"http://127.0.0.1:{ports['f_remembered'][0]}/",
                                 headers={"x-tenant-id": "1", "cookie": f"tenantGray={minted[0]}"})
    assert urllib.request.urlopen(req, timeout=5).read().decode() == "A", "the minted cookie does not route"
    assert get(f"http://127.0.0.1:{ports['h_no_cookie'][0]}/")[1] == "B"
    results = {n: [] for n in scripts}
    for r in range(ROUNDS):
        for name, script in scripts.items():
            results[name].append(wrk(ports[name][0], script))
        print(f"bench: cookie round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{n} {results[n][-1][0]:.0f} rps" for n in scripts), flush=True)
    time.sleep(1.0)  # the filter flushes its counters on its tick
    def counter(name, what):
        body = get(f"http://127.0.0.1:{ports[name][1]}/stats?filter=graylane")[1]
        m = re.search(rf"wasmcustom\.graylane\.bench\.{what}: (\d+)", body)
        return int(m.group(1)) if m else 0
    med = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v), sum(x[2] for x in v))
           for n, v in results.items()}
    h, f, g = med["h_no_cookie"], med["f_remembered"], med["g_verified"]
    us = lambda x: 1e6 / x[0]
    rows = [
        ("signed gray cookie in Envoy, throughput: no cookie (h) / the same cookie, remembered (f) / a new cookie each request, verified (g)",
         f"{h[0]:.0f} / {f[0]:.0f} / {g[0]:.0f} req/s", f"p99 {h[1]:.2f} / {f[1]:.2f} / {g[1]:.2f} ms"),
        ("signed gray cookie, Envoy worker time a request over no cookie: remembered (f) / first verification (g)",
         f"{us(f) - us(h):.1f} / {us(g) - us(h):.1f} us", "1/throughput; the worker is saturated"),
        ("signatures verified / answered from the cache: (f) / (g)",
         f"{counter('f_remembered', 'cookie_verified')} / {counter('f_remembered', 'cookie_remembered')}; "
         f"{counter('g_verified', 'cookie_verified')} / {counter('g_verified', 'cookie_remembered')}",
         "the filter's counters"),
        ("non-2xx responses during the cookie runs (h/f/g)", f"{h[2]}/{f[2]}/{g[2]}", ""),
    ]
    for p in procs[1:]:  # all but the upstream process
        if p.poll() is None:
            p.kill()
    return rows

def criterion_cookie():
    """decide() with a signed cookie natively: the first verification, and from the cache."""
    res = {}
    for pkg, bench in (("graylane-strategy", "cookie"), ("graylane-filter", "verdicts")):
        out = subprocess.run(["cargo", "bench", "-p", pkg, "--bench", bench, "--",
                              "--warm-up-time", "1", "--measurement-time", "3"],
                             capture_output=True, text=True, cwd=ROOT)
        out = out.stdout + out.stderr
        for name, b, ub in re.findall(r"(gray_cookie\S*/\w+)\s+time:\s+\[[\d.]+ \S+ ([\d.]+) (\S+) [\d.]+ \S+\]", out):
            res[name] = f"{b} {ub}"
        if not res:
            print("bench: criterion output not understood:\n" + out[-2000:])
    return [(f"decide() with a signed cookie, native, {k}", v, "criterion") for k, v in res.items()]

# ---- nginx --------------------------------------------------------------------------------
def nginx_start(name, http, workers=1, wrapper=()):
    """nginx with `workers` workers; with a `wrapper` (valgrind), one process and no master."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    single = "master_process off;\n" if wrapper else ""
    conf = (f"daemon off;\n{single}{user}worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n"
            "load_module /usr/lib/nginx/modules/ndk_http_module.so;\n"
            "load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;\n"
            + (f"load_module {NGINX_MODULE};\n" if "graylane_library" in http else "")
            + "events { worker_connections 4096; }\n"
            f"http {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;"
            f" uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n{http}\n}}\n")
    open(os.path.join(d, "nginx.conf"), "w").write(conf)
    p = subprocess.Popen(list(wrapper) + [NGINX, "-p", d, "-c", os.path.join(d, "nginx.conf"), "-e", os.path.join(d, "error.log")],
                         stdout=open(os.path.join(d, "stderr.log"), "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    nginxes.append(p)
    return p

UPSTREAMS = """
upstream a_up { server 127.0.0.1:18181; keepalive 64; }
upstream b_up { server 127.0.0.1:18182; keepalive 64; }"""
PROXY = """proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host;"""

def render_nginx(service, port, status_port, extra, module="native"):
    out = subprocess.run([GRAYLANE, "render", "nginx", "--service", service, "--listen", f"127.0.0.1:{port}",
                          "--status-listen", f"127.0.0.1:{status_port}", "--lib", NGINX_LIB,
                          "--lua-dir", os.path.join(ROOT, "nginx/lua"),
                          "--endpoint", "A=127.0.0.1:18181", "--endpoint", "B=127.0.0.1:18182",
                          "--module", module] + extra,
                         capture_output=True, text=True, check=True)
    return out.stdout

# The floor of graylane's nginx design: set_by_lua returning the route and setting the lane
# variable, both sent with proxy_set_header, balancer_by_lua setting a fixed peer, the same
# request pool size as rendered, deciding nothing (as (e) is for the Envoy filter).
NGINX_FLOOR = """
upstream floor_up {{
    server 0.0.0.1;
    balancer_by_lua_block {{ require("ngx.balancer").set_current_peer("127.0.0.1", 18182) }}
    keepalive 64;
}}
server {{ listen 127.0.0.1:{port}; request_pool_size 16k; location / {{
    set $graylane_lane "";
    set_by_lua_block $graylane_route {{ ngx.var.graylane_lane = "prod"; return "B" }}
    if ($graylane_route = "") {{ return 503; }}
    proxy_pass http://floor_up; {proxy}
    proxy_set_header x-graylane-cluster $graylane_route; proxy_set_header x-graylane-lane $graylane_lane; }} }}"""

# Plain proxy_pass with the request pool graylane's rendered server asks for (instructions
# only): what that setting alone saves nginx without graylane.
NGINX_PLAIN_POOL = """
server {{ listen 127.0.0.1:{port}; request_pool_size 16k; location / {{ proxy_pass http://b_up; {proxy} }} }}"""

def nginx_configs(ports):
    """(p) plain proxy_pass, (m) a map whitelist, (g) graylane (its native module), (l) graylane
    through Lua, and (f) the floor of the Lua design when `ports` names it, listening on
    `ports`."""
    path = os.path.join(work, "nginx-strategy.json")
    json.dump(strategy(), open(path, "w"))
    entries = "\n".join(f"    {i} a_up;" for i in IDS)
    configs = {
        "n_plain": UPSTREAMS + f"""
server {{ listen 127.0.0.1:{ports["n_plain"]}; location / {{ proxy_pass http://b_up; {PROXY} }} }}""",
        "n_map": UPSTREAMS + f"""
map_hash_max_size 262144;
map_hash_bucket_size 64;
map $http_x_tenant_id $wl_up {{
    default b_up;
    ~^30[0-9][0-9][0-9][0-9][0-9]$ a_up;
{entries}
}}
server {{ listen 127.0.0.1:{ports["n_map"]}; location / {{ proxy_set_header x-graylane-cluster $wl_up; proxy_pass http://$wl_up; {PROXY} }} }}""",
        "n_graylane": render_nginx("bench", ports["n_graylane"], ports["n_graylane"] + 10, ["--strategy", path]),
        "n_lua": render_nginx("lua", ports["n_lua"], ports["n_lua"] + 10, ["--strategy", path], module="lua"),
    }
    if "n_floor" in ports:
        configs["n_floor"] = NGINX_FLOOR.format(port=ports["n_floor"], proxy=PROXY)
    if "n_plain_pool" in ports:
        configs["n_plain_pool"] = UPSTREAMS + NGINX_PLAIN_POOL.format(port=ports["n_plain_pool"], proxy=PROXY)
    return configs

def nginx_throughput():
    ports = {"n_plain": 18500, "n_map": 18501, "n_graylane": 18502, "n_floor": 18503, "n_lua": 18504}
    configs = nginx_configs(ports)
    for name, http in configs.items():
        nginx_start(name, http)
        wait(lambda: get(f"http://127.0.0.1:{ports[name]}/")[0] == 200, f"nginx {name}")
    results = {n: [] for n in configs}
    for r in range(ROUNDS):
        for name in (list(configs) if r % 2 == 0 else list(reversed(configs))):
            results[name].append(wrk(ports[name]))
        print(f"bench: nginx round {r + 1}/{ROUNDS}: " + ", ".join(
            f"{n} {results[n][-1][0]:.0f} rps" for n in configs)
            + f"; g/p {results['n_graylane'][-1][0] / results['n_plain'][-1][0]:.2f}"
            + f", l/p {results['n_lua'][-1][0] / results['n_plain'][-1][0]:.2f}", flush=True)
    out = {n: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
               sum(x[2] for x in v)) for n, v in results.items()}
    for key, name in (("rounds", "n_graylane"), ("floor_rounds", "n_floor"), ("lua_rounds", "n_lua")):
        rounds = [x[0] / p[0] for x, p in zip(results[name], results["n_plain"])]
        out[key] = (statistics.median(rounds), min(rounds), max(rounds))
    return out

def nginx_instructions():
    """Instructions nginx itself executes per request (callgrind, one process, user space
    only): the same configurations, counted instead of timed, so other jobs on the machine
    do not move the figure. Warmed first (LuaJIT compiles its traces), then counted over
    `SECONDS` of wrk (one thread, 4 connections: valgrind is some 50 times slower)."""
    if shutil.which("valgrind") is None:
        return {}
    ports = {"n_plain": 18540, "n_map": 18541, "n_graylane": 18542, "n_floor": 18543, "n_plain_pool": 18544,
             "n_lua": 18545}
    out = {}
    for name, http in nginx_configs(ports).items():
        cg = os.path.join(work, f"callgrind.{name}")
        p = nginx_start(f"cg_{name}", http, wrapper=("valgrind", "--tool=callgrind", "--smc-check=all-non-file",
                                                     "--instr-atstart=no", f"--callgrind-out-file={cg}"))
        url = f"http://127.0.0.1:{ports[name]}/"
        wait(lambda: get(url, timeout=5)[0] == 200, f"nginx {name} under valgrind")
        load = lambda secs: subprocess.run(["wrk", "-t1", "-c4", f"-d{secs}s", "-s", tenants_script(), url],
                                           capture_output=True, text=True).stdout
        load(3)
        subprocess.run(["callgrind_control", "-i", "on", str(p.pid)], capture_output=True)
        text = load(SECONDS)
        subprocess.run(["callgrind_control", "-i", "off", str(p.pid)], capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(p.pid)], capture_output=True)
        stop_nginxes()
        requests = int(re.search(r"(\d+) requests in", text).group(1))
        total = 0
        for f in os.listdir(work):
            if f.startswith(f"callgrind.{name}"):
                for line in open(os.path.join(work, f)):
                    if line.startswith("totals:"):
                        total += int(line.split()[1])
        out[name] = total / max(requests, 1)
    return out

class Feed:
    """A scripted feed (the control plane's wire format) serving one strategy, then 304s."""
    def __init__(self, service, strat, port):
        import http.server, threading
        body = json.dumps({"service": service, "epoch": 1, "version": 1, "health": 1,
                           "strategy": strat, "healthy": {}}).encode()
        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if "version=1&" in self.path:
                    time.sleep(1.0)
                    self.send_response(304); self.send_header("content-length", "0"); self.end_headers()
                else:
                    self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
                    self.wfile.write(body)
            def log_message(self, *a):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

def worker_pids(master):
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                stat = open(f"/proc/{p}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == master:
                out.append(int(p))
    return out

def nginx_memory():
    """RSS of each nginx worker holding a strategy that came over the feed: 1,000,000 ids, and
    a 3-id strategy; the difference is what the ids cost a worker."""
    big = strategy(ids=list(range(1, 3_000_000, 3)), intervals=INTERVALS)
    small = strategy(ids=[1, 2, 3], intervals=[[1, 100]])
    out = {}
    for i, (label, strat) in enumerate((("1M ids", big), ("3 ids", small))):
        feed_port, port, status = 18530 + i, 18520 + i, 18525 + i
        feed = Feed("mem", strat, feed_port)
        p = nginx_start(f"mem{i}", render_nginx("mem", port, status,
                                                ["--control-plane", f"http://127.0.0.1:{feed_port}"]), workers=2)
        wait(lambda: all('"version":1' in get(f"http://127.0.0.1:{status}/graylane/status")[1] for _ in range(6)),
             f"nginx mem {label}")
        for _ in range(20):
            get(f"http://127.0.0.1:{port}/")
        time.sleep(1.0)
        rss = [rss_mib(w) for w in worker_pids(p.pid)]
        out[label] = (sum(rss) / max(len(rss), 1), rss)
        stop_nginxes()
        feed.server.shutdown()
    return out

def nginx_propagation():
    out = subprocess.run(["cargo", "test", "-q", "-p", "graylane-e2e", "--test", "nginx_live", "--",
                          "--ignored", "--nocapture"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, GRAYLANE_NGINX_LIB=NGINX_LIB, GRAYLANE_BIN=GRAYLANE))
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("propagation:")]
    if not lines:
        print(out.stdout[-3000:], out.stderr[-3000:])
    return lines

def control_plane():
    """The admin API with a million ids: explain, a state flip, the upload (release build);
    then the control plane at scale (issue 13, goal 6): the real `graylane serve` as a child
    process with 100 services x 100,000 ids and 1,000 simulated filters long-polling its feed
    over loopback: state flips acknowledged, reaching the filters, the daemon's RSS and CPU.
    One test at a time (they would share the 2 cores)."""
    out = subprocess.run(["cargo", "test", "-q", "--profile", "native-bench", "-p", "graylane-control-plane", "--test", "bench",
                          "--", "--ignored", "--nocapture", "--test-threads=1"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    # libtest's progress dot ends without a newline: a test's first line may follow it.
    lines = [l[l.index("control plane:"):] for l in (out.stdout + out.stderr).splitlines() if "control plane:" in l]
    if not lines:
        print(out.stdout[-3000:], out.stderr[-3000:])
    return lines

def nginx_instruction_rows(ins):
    return [("nginx instructions per request (callgrind, user space): p / m / g (graylane, native module) / "
             "l (graylane through Lua) / (f) the floor of the Lua design (set_by_lua setting the two variables "
             "proxy_set_header sends, balancer_by_lua setting a fixed peer, no decision) / (p16) p with the Lua "
             "design's request_pool_size 16k",
             f"{ins['n_plain']:,.0f} / {ins['n_map']:,.0f} / {ins['n_graylane']:,.0f} / {ins['n_lua']:,.0f}"
             f" / {ins['n_floor']:,.0f} / {ins['n_plain_pool']:,.0f}",
             f"over (p): graylane {ins['n_graylane'] - ins['n_plain']:,.0f}, through Lua "
             f"{ins['n_lua'] - ins['n_plain']:,.0f}, of which the Lua floor {ins['n_floor'] - ins['n_plain']:,.0f}; "
             "counted, not timed")]

def nginx_rows():
    n = nginx_throughput()
    stop_nginxes()
    ins = nginx_instructions()
    mem = nginx_memory()
    prop = nginx_propagation()
    plain, wl, gl, fl, lu = n["n_plain"], n["n_map"], n["n_graylane"], n["n_floor"], n["n_lua"]
    rows = [
        ("nginx throughput (p) plain proxy_pass", f"{plain[0]:.0f} req/s", f"p99 {plain[1]:.2f} ms"),
        ("nginx throughput (m) map whitelist, 100k ids + a regex", f"{wl[0]:.0f} req/s", f"p99 {wl[1]:.2f} ms"),
        ("nginx throughput (g) graylane (its native module), 100k ids + 1k intervals + percentage", f"{gl[0]:.0f} req/s", f"p99 {gl[1]:.2f} ms"),
        ("ratio g/p (graylane / plain) [goal >= 0.90]", f"{gl[0] / plain[0]:.2f}",
         "median of the per-round ratios {:.2f}, range {:.2f}-{:.2f}".format(*n["rounds"])),
        ("nginx throughput (l) graylane through Lua (set_by_lua, balancer_by_lua), the same strategy", f"{lu[0]:.0f} req/s", f"p99 {lu[1]:.2f} ms"),
        ("ratio l/p (graylane through Lua / plain)", f"{lu[0] / plain[0]:.2f}",
         "median of the per-round ratios {:.2f}, range {:.2f}-{:.2f}".format(*n["lua_rounds"])),
        ("nginx throughput (f) the floor of the Lua design, deciding nothing", f"{fl[0]:.0f} req/s", f"p99 {fl[1]:.2f} ms"),
        ("ratio f/p (the Lua floor / plain)", f"{fl[0] / plain[0]:.2f}",
         "median of the per-round ratios {:.2f}, range {:.2f}-{:.2f}".format(*n["floor_rounds"])),
        ("ratio l/f (graylane through Lua / the Lua floor)", f"{lu[0] / fl[0]:.2f}", ""),
        ("ratio g/l (native module / Lua)", f"{gl[0] / lu[0]:.2f}", ""),
        ("ratio g/m (graylane / map whitelist)", f"{gl[0] / wl[0]:.2f}", ""),
        ("nginx worker time per request over (p): graylane", f"{1e6 / gl[0] - 1e6 / plain[0]:.1f} us", "1/throughput; the worker is saturated"),
        ("non-2xx responses during the nginx runs (p/m/g/l/f)", f"{plain[2]}/{wl[2]}/{gl[2]}/{lu[2]}/{fl[2]}", ""),
    ]
    if ins:
        rows += nginx_instruction_rows(ins)
    (big, big_each), (small, small_each) = mem["1M ids"], mem["3 ids"]
    rows.append(("nginx worker RSS, strategy from the feed: 1M ids / 3 ids",
                 f"{big:.1f} / {small:.1f} MiB", f"1M ids cost {big - small:.1f} MiB per worker (workers: {', '.join(f'{x:.1f}' for x in big_each)})"))
    for line in prop:
        rows.append((line.split(":", 1)[1].split("=")[0].strip(), line.split("=", 1)[1].strip() if "=" in line else line, ""))
    return rows

def main():
    backend = start([BACKEND, "A", "18181", "B", "18182"], os.path.join(work, "backends.log"))
    wait(lambda: get("http://127.0.0.1:18181/")[0] == 200 and get("http://127.0.0.1:18182/")[0] == 200, "backends")
    time.sleep(0.2)
    if backend.poll() is not None:
        # Something else answered on its ports (another bench, a test): its figures would not be ours.
        sys.exit(f"bench: the upstream exited ({open(os.path.join(work, 'backends.log')).read().splitlines()[0]}); "
                 "ports 18181/18182 are taken")
    print(f"bench: envoy {ENVOY}; {ROUNDS} rounds x {SECONDS} s per config, alternating", flush=True)
    only = os.environ.get("BENCH_ONLY", "")
    if only == "memory":
        rows = [(f"Envoy RSS with graylane, {label}: 1 worker / 3 workers", f"{r1:.0f} / {r3:.0f} MiB", f"per VM {per:.1f} MiB")
                for label, (r1, r3, per) in memory().items()]
        print("\n| figure | value | note |\n|---|---|---|\n" + "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows))
        return
    if only == "vm":
        rows = vm_cost()
        print("\n| figure | value | note |\n|---|---|---|\n" + "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows))
        return
    if only == "nginx-instructions":
        # The nginx section's callgrind counts alone (deterministic, about a minute).
        rows = nginx_instruction_rows(nginx_instructions())
        print("\n| figure | value | note |\n|---|---|---|\n" + "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows))
        return
    if only in ("nginx", "cookie", "reports", "control-plane"):
        rows = {"nginx": nginx_rows, "cookie": lambda: cookies() + criterion_cookie(), "reports": reports,
                "control-plane": lambda: [(l.split(":", 1)[1].split("=")[0].strip(), l.split("=", 1)[1].strip(), "")
                                          for l in control_plane()]}[only]()
        print("\n| figure | value | note |\n|---|---|---|\n" + "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows))
        return
    med, instr = throughput()
    for p in procs[1:]:  # all but the upstream process
        p.kill()
    cookie_rows = cookies() if only == "" else []
    report_rows = reports() if only == "" else []
    crit = criterion() if only in ("", "criterion") else {}
    vm_rows = vm_cost() if only == "" else []
    mem = memory() if only in ("", "memory") else {}
    prop = propagation() if only in ("", "propagation") else []
    prop += churn() if only in ("", "churn") else []
    prop += control_plane() if only in ("", "control-plane") else []
    nginx = nginx_rows() if only == "" else []
    configs_order = ("a_native", "b_noop_wasm", "c_graylane", "d_lua", "e_headers_only", "t_floor_trimmed",
                     "u_floor_status", "r_raw", "s_raw_callbacks")
    a, b, c, d, e, t, u, r, s = (med[k] for k in configs_order)
    us = lambda x: 1e6 / x[0]
    rows = [
        ("throughput (a) no wasm, native header-match routes", f"{a[0]:.0f} req/s", f"p99 {a[1]:.2f} ms"),
        ("throughput (b) empty Proxy-Wasm filter", f"{b[0]:.0f} req/s", f"p99 {b[1]:.2f} ms"),
        ("throughput (c) graylane, 100k ids + 1k intervals + percentage", f"{c[0]:.0f} req/s", f"p99 {c[1]:.2f} ms"),
        ("throughput (d) Lua filter, same check and the same two header writes", f"{d[0]:.0f} req/s", f"p99 {d[1]:.2f} ms"),
        ("throughput (e) Proxy-Wasm filter writing the two routing headers only", f"{e[0]:.0f} req/s", f"p99 {e[1]:.2f} ms"),
        ("throughput (t) the floor (e) with the SDK's unused callbacks unexported (trimmed)", f"{t[0]:.0f} req/s", f"p99 {t[1]:.2f} ms"),
        ("ratio c/a [goal >= 0.85]", f"{c[0] / a[0]:.2f}", ""),
        ("ratio c/b [goal >= 0.95]", f"{c[0] / b[0]:.2f}", ""),
        ("ratio c/d (graylane vs Lua)", f"{c[0] / d[0]:.2f}", ""),
        ("ratio e/b (the two header writes alone)", f"{e[0] / b[0]:.2f}", ""),
        ("ratio c/e (graylane vs the header writes alone)", f"{c[0] / e[0]:.2f}", ""),
        ("throughput (u) (t) reading each response's :status besides", f"{u[0]:.0f} req/s", f"p99 {u[1]:.2f} ms"),
        ("ratio t/d (the least an SDK-built filter doing this job costs, vs Lua)", f"{t[0] / d[0]:.2f}", ""),
        ("ratio u/t (the :status read alone, which traffic reports need)", f"{u[0] / t[0]:.3f}", ""),
        ("ratio c/t (graylane vs that SDK-built least)", f"{c[0] / t[0]:.2f}", ""),
        ("throughput (r) the same job with no SDK, only the request callback exported", f"{r[0]:.0f} req/s", f"p99 {r[1]:.2f} ms"),
        ("throughput (s) (r) exporting graylane's other per-request callbacks besides, empty", f"{s[0]:.0f} req/s", f"p99 {s[1]:.2f} ms"),
        ("ratio r/d (the least any Proxy-Wasm filter doing this job costs, vs Lua)", f"{r[0] / d[0]:.2f}", ""),
        ("ratio s/d (the least a filter with graylane's callbacks costs, vs Lua)", f"{s[0] / d[0]:.2f}", ""),
        ("ratio c/s (graylane vs that least)", f"{c[0] / s[0]:.2f}", ""),
        ("Envoy worker time per request over (b): the header writes (e) / graylane (c)",
         f"{us(e) - us(b):.1f} / {us(c) - us(b):.1f} us", "1/throughput; the worker is saturated"),
        ("non-2xx responses during the runs (a/b/c/d/e/t/u/r/s)", "/".join(str(x[2]) for x in (a, b, c, d, e, t, u, r, s)), ""),
    ]
    if instr:
        rows.append(("Envoy instructions a request, all its threads (callgrind; a/b/c/d/e/t/u/r/s)",
                     " / ".join(f"{instr[n] / 1000:.1f}k" for n in configs_order), "counted, not timed: other jobs do not move it"))
        for x, y, goal in (("c_graylane", "e_headers_only", " [goal >= 0.97]"), ("c_graylane", "d_lua", " [goal >= 1.0]"),
                           ("t_floor_trimmed", "d_lua", ""), ("c_graylane", "t_floor_trimmed", ""),
                           ("u_floor_status", "t_floor_trimmed", " [the reports' goal: >= 0.99]"),
                           ("r_raw", "d_lua", ""), ("s_raw_callbacks", "d_lua", ""), ("c_graylane", "s_raw_callbacks", ""),
                           ("c_graylane", "b_noop_wasm", ""), ("c_graylane", "a_native", "")):
            rows.append((f"ratio {x[0]}/{y[0]} by the instructions a request ({y[0]}'s / {x[0]}'s){goal}",
                         f"{instr[y] / instr[x]:.3f}", ""))
    for k, v in crit.items():
        rows.append((f"decide(), 1M ids + 10k intervals, native, {k} [goal < 150 ns]", v, "criterion"))
    for label, (r1, r3, per) in mem.items():
        rows.append((f"Envoy RSS with graylane, {label}: 1 worker / 3 workers", f"{r1:.0f} / {r3:.0f} MiB", f"per VM {per:.1f} MiB"))
    for line in prop:
        rows.append((line.split(":", 1)[1].split("=")[0].strip(), line.split("=", 1)[1].strip() if "=" in line else line, ""))
    rows += vm_rows
    rows += report_rows
    rows += cookie_rows
    rows += criterion_cookie() if only in ("", "criterion") else []
    rows += nginx
    table = "| figure | value | note |\n|---|---|---|\n" + "\n".join(f"| {r[0]} | {r[1]} | {r[2]} |" for r in rows)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = (f"# make bench results ({stamp})\n\nEnvoy: `{subprocess.run([ENVOY, '--version'], capture_output=True, text=True).stdout.strip()}`\n"
            f"{ROUNDS} alternating rounds of {SECONDS} s per config, wrk -t2 -c32, Envoy --concurrency 1; medians.\n"
            f"Upstreams: one release-built demo-backend process serving both clusters.\n"
            f"Machine: {os.cpu_count()} cores, shared; only the ratios measured side by side are meaningful.\n\n{table}\n")
    print("\n" + table)
    if only:
        # A part alone (BENCH_ONLY=throughput, criterion, ...) leaves the full run's file alone.
        print(f"\nbench: BENCH_ONLY={only}: bench/results.md left as it was")
    else:
        open(os.path.join(ROOT, "bench", "results.md"), "w").write(text)
        print("\nbench: written to bench/results.md")

try:
    main()
finally:
    cleanup()
