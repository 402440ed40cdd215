//! Issue 15 end to end: a real nginx (Debian's, with the Lua module) routes by graylane's own
//! `decide`, through `libgraylane_nginx.so` and the configuration `graylane render nginx`
//! prints, to real upstream servers. `decide` run natively is the reference: seed 000 over
//! every tenant 0..=20000 (and the Envoy filter's answers, for the same requests), generated
//! strategies and requests, the routing headers, failure to the stable cluster, hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;

use graylane_e2e::{
    get, get_all, nginx_via, render_nginx, Envoy, EnvoyConfig, Nginx, Reply, Req, Upstream, Via,
};
use graylane_strategy::hash::mix64;
use graylane_strategy::{decide, Compiled, Health, RequestView};
use serde_json::{json, Value};

fn seed_000() -> Value {
    json!({"route-strategy": {
        "A": {"status": "Y", "id": {"all": false, "ids": [1, 2, 3], "interval": [[1, 100], [600, 10000]]}},
        "B": {"status": "G", "id": {"all": true}}}})
}

fn write(dir: &Path, name: &str, v: &Value) -> String {
    let p = dir.join(name);
    std::fs::write(&p, v.to_string()).unwrap();
    p.display().to_string()
}

/// `--endpoint KEY=127.0.0.1:PORT` for each upstream (named by its cluster key).
fn endpoint_flags(ups: &[Upstream]) -> Vec<String> {
    ups.iter()
        .flat_map(|u| {
            [
                "--endpoint".to_string(),
                format!("{}=127.0.0.1:{}", u.name(), u.port()),
            ]
        })
        .collect()
}

/// `graylane render nginx`'s arguments for seed 000's strategy (written in `dir`) served by
/// `ups`, no reason header.
fn seed_000_args(dir: &Path, ups: &[Upstream]) -> Vec<String> {
    let mut args = vec!["--strategy".to_string(), write(dir, "s.json", &seed_000())];
    args.extend(endpoint_flags(ups));
    args
}

/// nginx (2 workers) routing `strategy` for service web to `ups`, with the reason header.
fn nginx_for(dir: &Path, strategy: &Value, ups: &[Upstream], more: &[&str]) -> Nginx {
    let file = write(dir, "strategy.json", strategy);
    let mut args = vec![
        "--strategy".to_string(),
        file,
        "--reason-header".into(),
        "x-graylane-reason".into(),
    ];
    args.extend(endpoint_flags(ups));
    args.extend(more.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Nginx::graylane("web", &args, 2).unwrap()
}

fn compile(strategy: &Value) -> Compiled {
    Compiled::try_from(graylane_strategy::parse_json(strategy.to_string().as_bytes()).unwrap())
        .unwrap()
}

/// Native decide on a request given as (lowercase name, value) headers.
fn native(c: &Compiled, headers: &[(String, String)], draw: u64) -> (Option<String>, &'static str) {
    let hs: Vec<(String, Vec<u8>)> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let req = RequestView {
        headers: &hs,
        tenant: None,
        own_lane: None,
        now: Some(now),
        draw,
    };
    let d = decide(c, &Health::UNKNOWN, &req);
    (d.target(c).map(|t| t.key.clone()), d.reason.code())
}

/// What nginx did with a request: the cluster whose upstream answered (`None`: 503
/// no_cluster), and the reason header.
fn routed(reply: &Reply) -> (Option<String>, String) {
    let (status, body, headers) = reply;
    let reason = headers
        .get("x-graylane-reason")
        .cloned()
        .unwrap_or_default();
    match status {
        200 => (headers.get("x-upstream").cloned(), reason),
        503 if reason == "no_cluster" => (None, reason),
        other => panic!("HTTP {other}: {body} {headers:?}"),
    }
}

#[test]
fn seed_000_every_tenant_0_to_20000_as_native_decide_and_the_envoy_filter() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let nginx = nginx_for(dir.path(), &seed_000(), &ups, &[]);
    let plugin =
        json!({"service": "web", "reason_header": "x-graylane-reason", "strategy": seed_000()});
    let cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("B")
        .cluster("A", ups[0].port())
        .cluster("B", ups[1].port())
        .render();
    let envoy = Envoy::start(&cfg, 2).unwrap();
    let c = compile(&seed_000());

    let tenants: Vec<u64> = (0..=20_000).collect();
    let reqs = |_: ()| -> Vec<Req> {
        tenants
            .iter()
            .map(|t| Req::new("/").header("x-tenant-id", t.to_string()))
            .collect()
    };
    let by_nginx = get_all(nginx.port(), reqs(()));
    let by_envoy = get_all(envoy.port("ingress"), reqs(()));
    let mut wrong = Vec::new();
    for (i, t) in tenants.iter().enumerate() {
        let (key, code) = native(&c, &[("x-tenant-id".into(), t.to_string())], 0);
        let want = (key.clone(), format!("{};{code}", key.unwrap_or_default()));
        let (n, e) = (routed(&by_nginx[i]), routed(&by_envoy[i]));
        if n != want || e != want {
            wrong.push((t, want, n, e));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} tenants differ, first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // The split itself, exactly: 100 + 9,401 tenants in A.
    let in_a = by_nginx.iter().filter(|r| r.1 == "A").count();
    assert_eq!(in_a, 9_501);
    assert_eq!(ups[0].hits() + ups[1].hits(), 2 * 20_001);
}

#[test]
fn routing_headers_replace_what_the_client_sent() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let nginx = nginx_for(dir.path(), &seed_000(), &ups, &[]);
    // Two copies of each: none may reach the upstream (the echo joins repeated headers).
    let spoof = [
        ("x-tenant-id", "300"),
        ("x-graylane-cluster", "A"),
        ("x-graylane-cluster", "A"),
        ("x-graylane-lane", "gray"),
        ("x-graylane-lane", "gray"),
    ];
    for _ in 0..50 {
        let (status, body, headers) = get(nginx.port(), "/echo", &spoof);
        assert_eq!(status, 200);
        assert_eq!(headers["x-upstream"], "B");
        let echoed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echoed["x-graylane-cluster"], "B", "{echoed}");
        assert_eq!(echoed["x-graylane-lane"], "prod", "{echoed}");
    }
    let (_, body, headers) = get(nginx.port(), "/echo", &[("x-tenant-id", "7")]);
    let echoed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            echoed["x-graylane-cluster"].as_str(),
            echoed["x-graylane-lane"].as_str()
        ),
        (Some("A"), Some("gray"))
    );
    assert_eq!(headers["x-graylane-reason"], "A;interval");
}

/// A strategy naming a lane header of its own: nginx sets that one, replacing the client's,
/// and sends no `x-graylane-lane` at all (the rendered line's value is empty), not even the
/// client's copy.
#[test]
fn a_lane_header_of_the_strategys_own_replaces_the_clients() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let mut strategy = seed_000();
    strategy["lane"] = json!({"header": "x-lane"});
    let nginx = nginx_for(dir.path(), &strategy, &ups, &[]);
    for (tenant, cluster, lane) in [("7", "A", "gray"), ("300", "B", "prod")] {
        let spoof = [
            ("x-tenant-id", tenant),
            ("x-lane", "spoofed"),
            ("x-graylane-lane", "gray"),
            ("x-graylane-cluster", "A"),
        ];
        let (status, body, headers) = get(nginx.port(), "/echo", &spoof);
        assert_eq!(status, 200);
        assert_eq!(headers["x-upstream"], cluster);
        let echoed: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echoed["x-graylane-cluster"], cluster, "{echoed}");
        assert_eq!(echoed["x-lane"], lane, "{echoed}");
        assert_eq!(echoed.get("x-graylane-lane"), None, "{echoed}");
    }
}

/// A request decided before its balancer runs (its body is still on the way) while another
/// request is decided and served is routed by its own decision. Through Lua the balancer finds
/// each request's decision in a slot the request's address picks; here every request shares
/// the one slot, so the first request's decision is read back from `$graylane_route`. The
/// native module keeps each request's decision in the request itself.
#[test]
fn a_request_whose_slot_was_taken_keeps_its_own_decision() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let args = seed_000_args(dir.path(), &ups);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (port, status_port) = (graylane_e2e::free_port(), graylane_e2e::free_port());
    let mut http = render_nginx("web", port, status_port, &args);
    if nginx_via() == Via::Lua {
        let init = "graylane.init({";
        http = http.replace(init, &format!("{init}\n        slots = 1,"));
        assert!(http.contains("slots = 1,"), "{http}");
    }
    let nginx = Nginx::start(&http, 1, port, status_port).unwrap();

    // Tenant 2 (A, by id) sends its headers; nginx's 100 Continue says it is decided and
    // waiting for the body (the balancer runs once the body is in).
    let mut a = TcpStream::connect(("127.0.0.1", nginx.port())).unwrap();
    a.write_all(
        b"POST / HTTP/1.1\r\nHost: web\r\nx-tenant-id: 2\r\nContent-Length: 4\r\n\
          Expect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut cont = [0u8; 25];
    a.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    // Tenant 300 (B) is decided and served meanwhile: it takes the one slot.
    let (status, body, _) = get(nginx.port(), "/", &[("x-tenant-id", "300")]);
    assert_eq!((status, body.as_str()), (200, "B"));
    // A's body: its balancer runs now, and finds another request in the slot.
    a.write_all(b"ping").unwrap();
    let mut reply = String::new();
    a.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains("\r\nx-upstream: A\r\n"), "{reply}");
    assert!(reply.ends_with("\r\n\r\nA"), "{reply}");
    assert_eq!((ups[0].hits(), ups[1].hits()), (1, 1));
}

/// `nginx -s reload` (SIGHUP to the master): the new workers open the library again (a feed
/// thread each, the library loaded once) and route as the old ones did; the old ones exit.
#[test]
fn a_reload_starts_new_workers_that_route_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let args = seed_000_args(dir.path(), &ups);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nginx = Nginx::graylane("web", &args, 2).unwrap();
    let before = nginx.workers();
    assert_eq!(before.len(), 2, "{before:?}");
    for _ in 0..2 {
        let old = nginx.workers();
        let status = std::process::Command::new("kill")
            .args(["-HUP", &nginx.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let now = nginx.workers();
            if now.len() == 2 && now.iter().all(|w| !old.contains(w)) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no new workers after SIGHUP: {old:?} -> {now:?}\n{}",
                nginx.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        for (tenant, want) in [("2", "A"), ("700", "A"), ("300", "B"), ("20000", "B")] {
            for _ in 0..4 {
                // No kept-alive connection is left for the next reload: an old worker still
                // holding one from the client's pool can outlive the test's deadline.
                let (status, body, _) = get(
                    nginx.port(),
                    "/",
                    &[("x-tenant-id", tenant), ("connection", "close")],
                );
                assert_eq!((status, body.as_str()), (200, want), "tenant {tenant}");
            }
        }
    }
    let log = nginx.log();
    assert!(
        !log.contains("[emerg]") && !log.contains("[alert]"),
        "{log}"
    );
}

#[test]
fn the_reason_header_is_optional() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let args = seed_000_args(dir.path(), &ups);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let nginx = Nginx::graylane("web", &args, 1).unwrap();
    let (status, body, headers) = get(nginx.port(), "/", &[("x-tenant-id", "2")]);
    assert_eq!((status, body.as_str()), (200, "A"));
    assert!(!headers.contains_key("x-graylane-reason"), "{headers:?}");
}

#[test]
fn no_strategy_yet_goes_to_the_stable_cluster_never_gray() {
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    // A control plane that is not there: the library has no strategy, ever.
    let nowhere = format!("http://127.0.0.1:{}", graylane_e2e::free_port());
    let mut args = vec![
        "--control-plane".to_string(),
        nowhere,
        "--reason-header".into(),
        "x-graylane-reason".into(),
    ];
    args.extend(endpoint_flags(&ups));
    let with_stable: Vec<String> = args
        .iter()
        .cloned()
        .chain(["--stable".into(), "B".into()])
        .collect();
    let with_stable: Vec<&str> = with_stable.iter().map(String::as_str).collect();
    let nginx = Nginx::graylane("web", &with_stable, 2).unwrap();
    let replies = get_all(
        nginx.port(),
        (0..200)
            .map(|t| {
                Req::new("/")
                    .header("x-tenant-id", (t % 5).to_string())
                    .header("x-graylane-cluster", "A")
            })
            .collect(),
    );
    for r in &replies {
        assert_eq!((r.0, r.1.as_str()), (200, "B"), "{r:?}");
        assert_eq!(r.2["x-graylane-reason"], "B;no_snapshot");
    }
    assert_eq!(ups[0].hits(), 0);
    // Without a stable cluster, nothing can be routed: 503, and never a client's choice.
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let none = Nginx::graylane("web", &args, 1).unwrap();
    let (status, _, headers) = get(none.port(), "/", &[("x-graylane-cluster", "A")]);
    assert_eq!(status, 503);
    assert_eq!(headers["x-graylane-reason"], "no_cluster");
    assert_eq!(ups[0].hits(), 0);
}

#[test]
fn an_invalid_configuration_stops_nginx_from_starting_naming_the_field() {
    let http = format!(
        "lua_package_path \"{}/?.lua;;\";\n\
         init_by_lua_block {{ require(\"graylane\").init({{lib = \"{}\", services = {{web = [[{}]]}}}}) }}\n\
         init_worker_by_lua_block {{ require(\"graylane\").start() }}\n\
         server {{ listen 127.0.0.1:{}; location / {{ return 200; }} }}",
        graylane_e2e::nginx_lua_dir().display(),
        graylane_e2e::nginx_lib().display(),
        json!({"service": "web", "strategy": {"route-strategy": {"A": {"status": "X"}}}}),
        graylane_e2e::free_port(),
    );
    let err = match Nginx::start(
        &http,
        1,
        graylane_e2e::free_port(),
        graylane_e2e::free_port(),
    ) {
        Ok(n) => panic!("nginx started with an invalid strategy:\n{}", n.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("invalid configuration"), "{err}");
    assert!(err.contains("strategy.route-strategy.A.status"), "{err}");
}

// ---- generated strategies and requests ---------------------------------------------------

/// A seeded generator (SplitMix64), so a failure names a seed that reproduces it.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const KEYS: [&str; 4] = ["A", "B", "C", "D"];
const VALUES: [&str; 5] = ["v1", "v2", "beta", "beta-7", "x"];
/// The key signed gray cookies are signed with here (a test key, never a real one).
fn gray_key() -> graylane_strategy::cookie::SigningKey {
    graylane_strategy::cookie::SigningKey::from_bytes(&[0x2a; 32])
}

/// `gray_cookie` in signed mode, trusting [`gray_key`] as `k1`.
fn signed_gray_cookie() -> Value {
    let public = graylane_strategy::cookie::public_key_text(&gray_key().verifying_key());
    json!({"mode": "signed", "keys": [{"id": "k1", "public_key": public}]})
}

fn matcher(g: &mut Gen, names: &[&str]) -> Value {
    let name = *g.pick(names);
    match g.below(3) {
        0 => json!({"name": name, "exact": g.pick(&VALUES)}),
        1 => json!({"name": name, "prefix": g.pick(&["v", "be", "x"])}),
        _ => json!({"name": name, "one_of": [g.pick(&VALUES), g.pick(&VALUES)]}),
    }
}

/// A random valid strategy over 2 to 4 clusters: every rule kind, states, weights.
fn strategy(g: &mut Gen) -> Value {
    let n = 2 + g.below(3) as usize;
    let mut clusters = serde_json::Map::new();
    for (i, key) in KEYS.iter().take(n).enumerate() {
        let status = if i == 0 && g.chance(85) {
            "G"
        } else {
            *g.pick(&["R", "Y", "Y", "G"])
        };
        let mut c = json!({"status": status});
        if g.chance(30) {
            c["weight"] = json!(1 + g.below(5));
        }
        if g.chance(20) {
            c["cluster"] = json!(format!("web-{key}-v{}", 1 + g.below(9)));
        }
        if g.chance(15) {
            c["lane"] = json!(g.pick(&["prod", "gray"]));
        }
        let mut id = json!({});
        if g.chance(12) {
            id["all"] = json!(true);
        }
        if g.chance(50) {
            let ids: Vec<u64> = (0..g.below(20)).map(|_| g.below(300)).collect();
            id["ids"] = json!(ids);
        }
        if g.chance(40) {
            let ivs: Vec<[u64; 2]> = (0..1 + g.below(3))
                .map(|_| {
                    let lo = g.below(300);
                    [lo, lo + g.below(60)]
                })
                .collect();
            id["interval"] = json!(ivs);
        }
        c["id"] = id;
        if g.chance(25) {
            c["cookies"] = json!((0..1 + g.below(2))
                .map(|_| matcher(g, &["ck1", "ck2"]))
                .collect::<Vec<_>>());
        }
        if g.chance(25) {
            c["headers"] = json!((0..1 + g.below(2))
                .map(|_| matcher(g, &["x-h1", "X-H2"]))
                .collect::<Vec<_>>());
        }
        if g.chance(35) {
            let value = *g.pick(&[0.0, 10.0, 33.33, 50.0, 80.0, 100.0]);
            let by = *g.pick(&["request", "tenant"]);
            c["percent"] = json!({"value": value, "by": by, "salt": g.below(1000)});
        }
        if g.chance(15) {
            c["gray_cookie"] = json!(true);
        }
        if g.chance(10) {
            c["caller_lane"] = json!("gray");
        }
        clusters.insert((*key).to_string(), c);
    }
    let mut s = json!({"route-strategy": clusters});
    if g.chance(50) {
        s["identity"] =
            json!([{"header": "x-tenant-id"}, {"cookie": "tenantId"}, {"query": "tenant"}]);
    }
    s["gray_cookie"] = if g.chance(50) {
        json!({"mode": "plain"})
    } else {
        signed_gray_cookie()
    };
    if g.chance(50) {
        s["lane"] = json!({"trust": true});
    }
    s
}

/// A random request: (path, headers) with lowercase header names.
fn request(g: &mut Gen) -> (String, Vec<(String, String)>) {
    let mut headers = Vec::new();
    let tenant = g.below(320);
    match g.below(6) {
        0 => {}
        1 => headers.push((
            "x-tenant-id".to_string(),
            g.pick(&["abc", "-5", "", "1.5", "99999999999999999999"])
                .to_string(),
        )),
        _ => headers.push(("x-tenant-id".to_string(), tenant.to_string())),
    }
    let mut crumbs = Vec::new();
    if g.chance(30) {
        crumbs.push(format!("tenantId={}", g.below(320)));
    }
    for ck in ["ck1", "ck2"] {
        if g.chance(30) {
            crumbs.push(format!("{ck}={}", g.pick(&VALUES)));
        }
    }
    if g.chance(20) {
        let t = graylane_strategy::Id::Num(tenant);
        let signed = graylane_strategy::cookie::sign(&gray_key(), "k1", &t, 4_000_000_000);
        crumbs.push(format!(
            "tenantGray={}",
            g.pick(&["1", "0", signed.as_str()])
        ));
    }
    if !crumbs.is_empty() {
        headers.push(("cookie".to_string(), crumbs.join("; ")));
    }
    for h in ["x-h1", "x-h2"] {
        if g.chance(30) {
            headers.push((h.to_string(), g.pick(&VALUES).to_string()));
        }
    }
    if g.chance(15) {
        headers.push((
            "x-graylane-lane".to_string(),
            g.pick(&["gray", "prod"]).to_string(),
        ));
    }
    let path = if g.chance(25) {
        format!("/echo?tenant={}&x=1", g.below(320))
    } else {
        "/echo".to_string()
    };
    (path, headers)
}

type Headers = Vec<(String, String)>;
/// A cluster key (`None`: no cluster) and a reason code.
type Outcome = (Option<String>, &'static str);

/// Native outcomes of a request over many draws: (cluster, reason) -> probability.
fn native_distribution(
    c: &Compiled,
    path: &str,
    headers: &[(String, String)],
    draws: u64,
) -> BTreeMap<(Option<String>, &'static str), f64> {
    let mut hs = headers.to_vec();
    hs.push((":path".into(), path.into()));
    let mut out = BTreeMap::new();
    for i in 0..draws {
        *out.entry(native(c, &hs, mix64(i ^ 0xdead_beef)))
            .or_insert(0.0) += 1.0 / draws as f64;
    }
    out
}

fn to_req(path: &str, headers: &[(String, String)]) -> Req {
    let mut r = Req::new(path);
    for (k, v) in headers {
        r = r.header(k, v);
    }
    r
}

/// Many generated strategies, each in its own nginx: every deterministic request routed
/// exactly as native `decide` (cluster, reason, route and lane headers); a request whose
/// answer depends on the random draw (a per-request percentage, a weighted tie) lands only
/// on clusters native `decide` can pick, with shares within 5 standard deviations.
#[test]
fn generated_strategies_route_as_native_decide() {
    let ups: Vec<Upstream> = KEYS.iter().map(|k| Upstream::start(k)).collect();
    let strategies: u64 = std::env::var("GRAYLANE_EQUIVALENCE_STRATEGIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let (mut exact, mut statistical) = (0usize, 0usize);
    for seed in 0..strategies {
        let mut g = Gen(seed.wrapping_mul(0x1000_0001));
        let s = strategy(&mut g);
        let c = compile(&s);
        let dir = tempfile::tempdir().unwrap();
        let nginx = nginx_for(dir.path(), &s, &ups, &[]);
        let mut fixed: Vec<(String, Headers, Outcome)> = Vec::new();
        let mut random = Vec::new();
        for _ in 0..150 {
            let (path, headers) = request(&mut g);
            let dist = native_distribution(&c, &path, &headers, 64);
            if dist.len() == 1 {
                let only = dist.into_keys().next().unwrap();
                fixed.push((path, headers, only));
            } else if random.len() < 3 {
                random.push((path, headers));
            }
        }
        let replies = get_all(
            nginx.port(),
            fixed.iter().map(|(p, h, _)| to_req(p, h)).collect(),
        );
        for ((path, headers, (key, code)), reply) in fixed.iter().zip(&replies) {
            let (got, reason) = routed(reply);
            let ctx = || {
                format!("seed {seed}, strategy {s}\nrequest {path} {headers:?}\nreply {reply:?}")
            };
            assert_eq!(&got, key, "{}", ctx());
            let want_reason = match key {
                Some(k) => format!("{k};{code}"),
                None => "no_cluster".into(),
            };
            assert!(
                reason == want_reason || reason == format!("{want_reason},fallback_unhealthy"),
                "{}",
                ctx()
            );
            if let Some(k) = key {
                let (_, t) = c.cluster(k).unwrap();
                let echoed: Value = serde_json::from_str(&reply.1).unwrap();
                assert_eq!(echoed["x-graylane-cluster"], t.envoy.as_str(), "{}", ctx());
                assert_eq!(echoed["x-graylane-lane"], t.lane.as_str(), "{}", ctx());
            }
            exact += 1;
        }
        for (path, headers) in random {
            const N: usize = 300;
            let dist = native_distribution(&c, &path, &headers, 20_000);
            let replies = get_all(
                nginx.port(),
                (0..N).map(|_| to_req(&path, &headers)).collect(),
            );
            let mut got: HashMap<Option<String>, usize> = HashMap::new();
            for r in &replies {
                let (key, reason) = routed(r);
                let code = reason
                    .split(';')
                    .nth(1)
                    .unwrap_or("no_cluster")
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                assert!(
                    dist.keys().any(|(k, c)| *k == key && *c == code),
                    "seed {seed}: nginx chose {key:?} ({reason}), native never does: {dist:?}\nstrategy {s}\nrequest {path} {headers:?}"
                );
                *got.entry(key).or_insert(0) += 1;
            }
            let mut by_cluster: HashMap<Option<String>, f64> = HashMap::new();
            for ((k, _), p) in &dist {
                *by_cluster.entry(k.clone()).or_insert(0.0) += p;
            }
            for (k, p) in by_cluster {
                let n = *got.get(&k).unwrap_or(&0) as f64;
                let mean = N as f64 * p;
                let sd = (N as f64 * p * (1.0 - p)).sqrt();
                assert!(
                    (n - mean).abs() <= 5.0 * sd + 3.0,
                    "seed {seed}: cluster {k:?} got {n} of {N}, native share {p:.3}\nstrategy {s}\nrequest {path} {headers:?}"
                );
            }
            statistical += 1;
        }
    }
    eprintln!("equivalence: {strategies} strategies, {exact} exact requests, {statistical} statistical checks");
    assert!(
        exact > 20 * strategies as usize,
        "too few deterministic requests: {exact}"
    );
    assert!(
        statistical > 5,
        "too few random-dependent requests: {statistical}"
    );
}

// ---- hostile input -------------------------------------------------------------------------

#[test]
fn hostile_input_never_gets_a_5xx_nor_crashes_a_worker() {
    let dir = tempfile::tempdir().unwrap();
    let ups = vec![Upstream::start("A"), Upstream::start("B")];
    let s = json!({
        "identity": [{"header": "x-tenant-id"}, {"cookie": "tenantId"}, {"query": "tenant"}],
        "gray_cookie": signed_gray_cookie(),
        "lane": {"trust": true},
        "route-strategy": {
            "A": {"status": "Y", "gray_cookie": true, "id": {"ids": [1, 2, 3], "interval": [[1, 100]]},
                  "cookies": [{"name": "ck1", "prefix": "be"}], "headers": [{"name": "x-h1", "one_of": ["a", "b"]}],
                  "caller_lane": "gray", "percent": {"value": 10, "by": "tenant"}},
            "B": {"status": "G", "id": {"all": true}}}});
    let nginx = nginx_for(dir.path(), &s, &ups, &[]);
    let workers = nginx.workers();
    assert_eq!(workers.len(), 2);
    let long = "9".repeat(4_000);
    let crumbs: String = (0..300).map(|i| format!("c{i}=v{i}; ")).collect();
    let utf8 = "ténant-☃-𝄞";
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![("x-tenant-id", long.clone())],
        vec![("x-tenant-id", "18446744073709551616".into())],
        vec![("x-tenant-id", "-1".into())],
        vec![("x-tenant-id", "0x10".into())],
        vec![("x-tenant-id", " 2 ".into())],
        vec![("x-tenant-id", utf8.into())],
        vec![("x-tenant-id", "1".into()), ("x-tenant-id", "500".into())],
        vec![("cookie", crumbs.clone())],
        vec![("cookie", "tenantId".into())],
        vec![("cookie", "=;;=;tenantId=;tenantGray=".into())],
        vec![("cookie", format!("tenantGray=1.2.{long}.zz; tenantId=2"))],
        vec![("cookie", "tenantGray=1.2.3.4.5.6; ck1=be".into())],
        vec![("cookie", format!("tenantId={utf8}"))],
        vec![("x-h1", long.clone())],
        vec![("x-graylane-lane", long.clone())],
        vec![("x-graylane-lane", utf8.into())],
        vec![
            ("x-graylane-cluster", "A".into()),
            ("x-graylane-cluster", "../../etc".into()),
        ],
    ];
    let paths = [
        "/".to_string(),
        format!("/?tenant={long}"),
        "/?tenant=&tenant=2&&=&tenant".into(),
        "/?tenant=%00%ff".into(),
        format!("/?{}", "a=1&".repeat(500)),
        "/%2e%2e/%00".into(),
    ];
    let mut reqs = Vec::new();
    for _ in 0..5 {
        for case in &cases {
            for path in &paths {
                let mut r = Req::new(path.clone());
                for (k, v) in case {
                    r = r.header(*k, v.clone());
                }
                reqs.push(r);
            }
        }
    }
    let replies = get_all(nginx.port(), reqs);
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for (status, body, headers) in &replies {
        assert!(*status < 500, "HTTP {status}: {body} {headers:?}");
        *by_status.entry(*status).or_insert(0) += 1;
    }
    eprintln!(
        "hostile input: {} requests by status {by_status:?}",
        replies.len()
    );
    assert!(
        by_status.get(&200).copied().unwrap_or(0) > replies.len() / 2,
        "{by_status:?}"
    );
    // Still the same workers, nothing crashed, and still routing right.
    assert_eq!(nginx.workers(), workers);
    let log = nginx.log();
    assert!(
        !log.contains("exited on signal") && !log.contains("panicked"),
        "{log}"
    );
    assert_eq!(get(nginx.port(), "/", &[("x-tenant-id", "2")]).1, "A");
    assert_eq!(
        get(nginx.port(), "/", &[("x-tenant-id", "300"), ("x-h1", "zz")]).0,
        200
    );
}
