//! Into a REAL nginx without a reload (issue 15): each nginx worker follows the control plane's
//! feed (with `endpoints=true`) in `libgraylane_nginx.so`, whose balancer sends each request to
//! an instance of the cluster graylane's `decide` chose. Under steady load, instances are added,
//! replaced and removed in Consul with zero failed requests; with the control plane stopped,
//! nginx keeps its last endpoints. Each step lasts until its answers show it (counted from the
//! registry change on), never a fixed time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graylane_control_plane::render::nginx::{render, Args, Module};
use graylane_e2e::fakes::consul::{instance, Consul};
use graylane_e2e::{
    count_by_body, fetch, free_port, get, nginx_lib, nginx_lua_dir, nginx_via, runtime, wait_until,
    Nginx, Upstream, Via,
};

use crate::control_plane::{runtime_of_two, ControlPlane};

/// One answer: tenant, status (0: no HTTP answer), body (with the headers when it failed).
type Answer = (&'static str, u16, String);

/// Answers per tenant, from one registry change on, that show where traffic settled.
const SETTLED: usize = 40;

/// Steady load until stopped, alternating tenant 2 (gray's whitelist) and tenant 300: every
/// answer by tenant and body, and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Answer>>>,
    /// Answers before this index came before the last registry change.
    from: AtomicUsize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let url = format!("http://127.0.0.1:{port}/");
            while !s.load(Ordering::SeqCst) {
                for t in ["2", "300"] {
                    let answer = match runtime().block_on(fetch(&url, &[("x-tenant-id", t)])) {
                        Ok((200, body, _)) => (t, 200, body),
                        Ok((status, body, headers)) => (t, status, format!("{body} {headers:?}")),
                        Err(e) => (t, 0, format!("{e:#}")),
                    };
                    b.lock().unwrap().push(answer);
                }
            }
        });
        Load {
            stop,
            seen,
            from: AtomicUsize::new(0),
            thread: Some(thread),
        }
    }

    /// Answers so far.
    fn answers(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// The registry changes now: later waits count only the answers from here on.
    fn mark(&self) {
        self.from.store(self.answers(), Ordering::SeqCst);
    }

    /// Waits until, since the last [`Load::mark`], `tenant` has [`SETTLED`] answers whose last
    /// [`SETTLED`] came only from `bodies` (all of them). Fails at once on a failed request.
    fn settles_on(&self, tenant: &str, bodies: &[&str]) {
        wait_until(
            &format!("tenant {tenant} settles on {bodies:?}"),
            Duration::from_secs(60),
            || {
                let (failed, last) = {
                    let seen = self.seen.lock().unwrap();
                    let failed = seen.iter().find(|(_, s, _)| *s != 200).cloned();
                    let last: Vec<String> = seen[self.from.load(Ordering::SeqCst)..]
                        .iter()
                        .rev()
                        .filter(|(t, _, _)| *t == tenant)
                        .take(SETTLED)
                        .map(|(_, _, b)| b.clone())
                        .collect();
                    (failed, last)
                };
                if let Some(f) = failed {
                    panic!("a request failed: {f:?}");
                }
                last.len() == SETTLED
                    && last.iter().all(|b| bodies.contains(&b.as_str()))
                    && bodies.iter().all(|b| last.iter().any(|l| l == b))
            },
        );
    }

    /// Waits until `n` more answers came in.
    fn more(&self, n: usize) {
        let until = self.answers() + n;
        wait_until(
            &format!("{n} more answers"),
            Duration::from_secs(60),
            || self.answers() >= until,
        );
    }

    /// Stops; returns the failed answers and how many there were in all.
    fn stop(mut self) -> (Vec<Answer>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let seen = self.seen.lock().unwrap();
        let failed = seen.iter().filter(|(_, s, _)| *s != 200).cloned().collect();
        (failed, seen.len())
    }
}

impl Drop for Load {
    /// Also when a test fails: the client stops instead of hammering a dead nginx.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// nginx (2 workers) for service web following `cp_url`, with no endpoint of its own: its
/// configuration rendered in-process by `render nginx` (what `graylane render nginx` prints).
fn nginx(cp_url: &str) -> Nginx {
    let (port, status_port) = (free_port(), free_port());
    let args = Args {
        services: vec!["web".into()],
        listen: vec![format!("127.0.0.1:{port}")],
        control_plane: Some(cp_url.into()),
        token_file: None,
        strategy: None,
        endpoints: vec![],
        stable: vec![],
        route_header: "x-graylane-cluster".into(),
        reason_header: Some("x-graylane-reason".into()),
        own_lane: None,
        wait_ms: 5_000,
        keepalive: 64,
        status_listen: Some(format!("127.0.0.1:{status_port}")),
        lib: nginx_lib(),
        lua_dir: nginx_lua_dir(),
        module: match nginx_via() {
            Via::Native => Module::Native,
            Via::Lua => Module::Lua,
        },
    };
    Nginx::start(&render(&args).unwrap(), 2, port, status_port).unwrap()
}

/// Failed feed polls per nginx worker (by pid).
fn feed_failures(nginx: &Nginx) -> BTreeMap<u32, u64> {
    nginx
        .status_by_worker(Duration::from_secs(10))
        .into_iter()
        .map(|(pid, s)| (pid, s["web"]["feed"]["failed"].as_u64().unwrap_or(0)))
        .collect()
}

#[test]
fn discovery_consul_endpoints_reach_nginx_without_a_failed_request() {
    let rt = runtime_of_two();
    let (fake, consul_url) = rt.block_on(Consul::start());
    let ups: BTreeMap<&str, Upstream> = ["gray-1", "gray-2", "prod-1", "prod-2"]
        .into_iter()
        .map(|n| (n, Upstream::start(n)))
        .collect();
    let reg = |names: &[&str]| {
        let entries = names
            .iter()
            .map(|n| {
                let profile = n.split('-').next().unwrap();
                instance("127.0.0.1", "", ups[n].port(), profile, "passing")
            })
            .collect();
        fake.set_service("web", entries);
    };
    reg(&["gray-1", "prod-1"]);

    let services = "  web:\n    route-strategy:\n      A: {status: Y, id: {ids: [1, 2, 3]}}\n      B: {status: G, id: {all: true}}\n    discovery:\n      consul: {service: web, meta: profile, clusters: {gray: A, prod: B}}\n";
    let discovery = format!("discovery:\n  consul: {{address: \"{consul_url}\", wait: 2s}}");
    let mut cp = ControlPlane::start(rt, services, &discovery, None);
    // No endpoint in nginx's configuration: all of them come from Consul through the feed.
    let cp_url = format!("http://127.0.0.1:{}", cp.api);
    let nginx = nginx(&cp_url);
    // Until a worker's first feed answer it knows no strategy (and, here, no stable cluster).
    wait_until(
        "every worker has a strategy from the feed",
        Duration::from_secs(20),
        || {
            nginx
                .status_by_worker(Duration::from_secs(10))
                .values()
                .all(|s| s["web"]["version"].as_u64() > Some(0))
        },
    );

    let load = Load::start(nginx.port());
    load.settles_on("2", &["gray-1"]);
    load.settles_on("300", &["prod-1"]);
    // New instances registered: traffic spreads to them.
    load.mark();
    reg(&["gray-1", "gray-2", "prod-1", "prod-2"]);
    load.settles_on("2", &["gray-1", "gray-2"]);
    load.settles_on("300", &["prod-1", "prod-2"]);
    // The first ones deregistered (a one-by-one replacement): only the new ones serve.
    load.mark();
    reg(&["gray-2", "prod-2"]);
    load.settles_on("2", &["gray-2"]);
    load.settles_on("300", &["prod-2"]);
    let before = (ups["gray-1"].hits(), ups["prod-1"].hits());
    load.more(100);
    assert_eq!(
        (ups["gray-1"].hits(), ups["prod-1"].hits()),
        before,
        "a deregistered instance still gets traffic"
    );
    // Gray leaves the registry: its tenants fall back to prod (graylane's health rule).
    load.mark();
    reg(&["prod-2"]);
    load.settles_on("2", &["prod-2"]);
    let (_, _, headers) = get(nginx.port(), "/", &[("x-tenant-id", "2")]);
    assert_eq!(headers["x-graylane-reason"], "B;all,fallback_unhealthy");
    // And comes back.
    load.mark();
    reg(&["gray-2", "prod-2"]);
    load.settles_on("2", &["gray-2"]);
    let (failed, total) = load.stop();
    assert!(
        failed.is_empty(),
        "failed requests ({} of {total}): {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );

    // The control plane stops and the registry changes meanwhile: once every worker has seen
    // its feed fail, each still routes by its last endpoints (and strategy).
    let failures = feed_failures(&nginx);
    cp.stop();
    reg(&["gray-1", "prod-1"]);
    wait_until(
        "every nginx worker counted a failed feed poll",
        Duration::from_secs(30),
        || {
            feed_failures(&nginx)
                .iter()
                .all(|(pid, n)| failures.get(pid).is_some_and(|b| n > b))
        },
    );
    for (t, want) in [("2", "gray-2"), ("300", "prod-2")] {
        let c = count_by_body(
            nginx.port(),
            "/",
            &[("x-tenant-id", t), ("connection", "close")],
            40,
        );
        assert_eq!(c.get(want), Some(&40), "tenant {t}: {c:?}");
    }
    // Back: the registry's present state arrives.
    cp.restart();
    wait_until("nginx resyncs to gray-1", Duration::from_secs(20), || {
        let c = count_by_body(
            nginx.port(),
            "/",
            &[("x-tenant-id", "2"), ("connection", "close")],
            20,
        );
        c.get("gray-1") == Some(&20)
    });
}
