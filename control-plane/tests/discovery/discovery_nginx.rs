//! Issue 15 end to end: endpoints from the registry reach a REAL nginx without a reload. The
//! control plane (in-process, as `graylane serve` composes it) follows the fake Consul; each nginx worker follows
//! the control plane's feed (with `endpoints=true`) in `libgraylane_nginx.so`, whose balancer
//! sends each request to an instance of the cluster graylane's `decide` chose. Under steady
//! load, instances are added, replaced and removed in Consul with zero failed requests; with
//! the control plane stopped, nginx keeps its last endpoints.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graylane_control_plane::render::nginx::{render, Args};
use graylane_e2e::{free_port, get, nginx_lib, nginx_lua_dir, Nginx, Upstream};

use crate::discovery_consul::{instance, FakeConsul};
use crate::discovery_envoy::ControlPlane;

/// One answer: tenant, status, body (with the headers when it failed).
type Answer = (&'static str, u16, String);

/// Steady load until stopped, alternating tenant 2 (gray's whitelist) and tenant 300: every
/// answer by tenant and body, and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Answer>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                for t in ["2", "300"] {
                    let (status, body, headers) = get(port, "/", &[("x-tenant-id", t)]);
                    let body = if status == 200 {
                        body
                    } else {
                        format!("{body} {headers:?}")
                    };
                    b.lock().unwrap().push((t, status, body));
                }
            }
        });
        Load {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Waits until the last 40 answers for `tenant` came only from `bodies` (all of them).
    fn settles_on(&self, tenant: &str, bodies: &[&str]) {
        let start = Instant::now();
        loop {
            let last: Vec<String> = {
                let seen = self.seen.lock().unwrap();
                seen.iter()
                    .rev()
                    .filter(|(t, _, _)| *t == tenant)
                    .take(40)
                    .map(|(_, _, b)| b.clone())
                    .collect()
            };
            if last.len() == 40
                && last.iter().all(|b| bodies.contains(&b.as_str()))
                && bodies.iter().all(|b| last.iter().any(|l| l == b))
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "tenant {tenant} never settled on {bodies:?}; last {last:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
    };
    Nginx::start(&render(&args).unwrap(), 2, port, status_port).unwrap()
}

#[test]
fn discovery_consul_endpoints_reach_nginx_without_a_failed_request() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (fake, consul_url) = rt.block_on(FakeConsul::start());
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
    let start = Instant::now();
    while !nginx
        .status_by_worker(Duration::from_secs(10))
        .values()
        .all(|s| s["web"]["version"].as_u64() > Some(0))
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no strategy from the feed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let load = Load::start(nginx.port());
    load.settles_on("2", &["gray-1"]);
    load.settles_on("300", &["prod-1"]);
    // New instances registered: traffic spreads to them.
    reg(&["gray-1", "gray-2", "prod-1", "prod-2"]);
    load.settles_on("2", &["gray-1", "gray-2"]);
    load.settles_on("300", &["prod-1", "prod-2"]);
    // The first ones deregistered (a one-by-one replacement): only the new ones serve.
    reg(&["gray-2", "prod-2"]);
    load.settles_on("2", &["gray-2"]);
    load.settles_on("300", &["prod-2"]);
    let before = (ups["gray-1"].hits(), ups["prod-1"].hits());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        (ups["gray-1"].hits(), ups["prod-1"].hits()),
        before,
        "a deregistered instance still gets traffic"
    );
    // Gray leaves the registry: its tenants fall back to prod (graylane's health rule).
    reg(&["prod-2"]);
    load.settles_on("2", &["prod-2"]);
    let (_, _, headers) = get(nginx.port(), "/", &[("x-tenant-id", "2")]);
    assert_eq!(headers["x-graylane-reason"], "B;all,fallback_unhealthy");
    // And comes back.
    reg(&["gray-2", "prod-2"]);
    load.settles_on("2", &["gray-2"]);
    let (failed, total) = load.stop();
    assert!(
        failed.is_empty(),
        "failed requests ({} of {total}): {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(total > 200, "too little load to mean anything: {total}");

    // The control plane stops: every worker keeps its last endpoints (and strategy).
    cp.stop();
    reg(&["gray-1", "prod-1"]);
    for _ in 0..5 {
        for (t, want) in [("2", "gray-2"), ("300", "prod-2")] {
            let c = graylane_e2e::count_by_body(
                nginx.port(),
                "/",
                &[("x-tenant-id", t), ("connection", "close")],
                20,
            );
            assert_eq!(c.get(want), Some(&20), "tenant {t}: {c:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Back: the registry's present state arrives.
    cp.restart();
    let start = Instant::now();
    loop {
        let c = graylane_e2e::count_by_body(
            nginx.port(),
            "/",
            &[("x-tenant-id", "2"), ("connection", "close")],
            20,
        );
        if c.get("gray-1") == Some(&20) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never resynced: {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
