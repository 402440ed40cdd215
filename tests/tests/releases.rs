//! Issue 12 end to end: the one-by-one release with instance drivers. The real control plane
//! (`graylane serve`, its CLI), a real Envoy with 2 workers running the real .wasm, real
//! upstreams (A and B say which version answered), steady load from the test with every
//! response checked. Instances are started and stopped by the control plane's drivers:
//! - Kubernetes: the fake API server's Deployments scale through their `scale` subresource
//!   and their EndpointSlices follow; discovery hands the counts to the filters, whose
//!   `weight: endpoints` shares follow them;
//! - hooks over the fake Consul: the hook appends what it was asked to a file and the test,
//!   as the platform, registers or removes instances in the fake Consul; the control plane is
//!   SIGKILLed while a hook's instance is not up yet, and the hook is not run again;
//! - an operator aborts a one-by-one halfway: instances and strategy come back as before;
//! - a gray upgrade and a switch (B first scaled to A's size), then `release rollback`; the
//!   gray upgrade waits for an approval at each step, where the tenants Envoy sends to B are
//!   checked one by one against the control plane's `explain` of that step's version;
//! - and the latency gate: a gray upgrade to a version that answers 200 ms late aborts by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graylane_e2e::fakes::consul::{instance, Consul};
use graylane_e2e::fakes::kube::ApiServer;
use graylane_e2e::{
    fetch, free_port, runtime, wait_until, ControlPlane, Envoy, EnvoyConfig, Upstream,
};
use serde_json::{json, Value};

const WRITE: &str = "write-token-e2e";
const READ: &str = "read-token-e2e";

/// Steady load on Envoy's ingress from four client threads, random tenants; every answer is
/// counted by the version that answered, anything else is a failure.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<BTreeMap<String, u64>>>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    started: Instant,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..4u64)
            .map(|t| {
                let (stop, answers, failures) = (stop.clone(), answers.clone(), failures.clone());
                std::thread::spawn(move || {
                    let url = format!("http://127.0.0.1:{port}/");
                    let mut tenant = t * 7_919 + 1;
                    while !stop.load(Ordering::SeqCst) {
                        tenant = (tenant * 48_271) % 2_147_483_647;
                        let id = (tenant % 100_000).to_string();
                        match runtime().block_on(fetch(&url, &[("x-tenant-id", id.as_str())])) {
                            Ok((200, body, _)) if body == "A" || body == "B" => {
                                *answers.lock().unwrap().entry(body).or_default() += 1;
                            }
                            Ok((status, body, _)) => failures
                                .lock()
                                .unwrap()
                                .push(format!("tenant {id}: HTTP {status}: {body}")),
                            Err(e) => failures.lock().unwrap().push(format!("tenant {id}: {e:#}")),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            answers,
            failures,
            threads,
            started: Instant::now(),
        }
    }

    fn answers(&self) -> BTreeMap<String, u64> {
        self.answers.lock().unwrap().clone()
    }

    /// Waits until the load has had `n` answers (so a release starts under steady load).
    fn warm(&self, n: u64) {
        wait_until("the load runs", Duration::from_secs(20), || {
            self.check();
            self.answers().values().sum::<u64>() >= n
        });
    }

    /// Fails at once on a failed request.
    fn check(&self) {
        let f = self.failures.lock().unwrap();
        assert!(f.is_empty(), "{} failed requests, first: {}", f.len(), f[0]);
    }

    /// Stops; returns the answers per version and the requests per second.
    fn stop(mut self) -> (BTreeMap<String, u64>, f64) {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        self.check();
        let answers = self.answers();
        let total: u64 = answers.values().sum();
        (answers, total as f64 / self.started.elapsed().as_secs_f64())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn config(port: u16, data: &Path, discovery: &str, mapping: &str, instances: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:{port}
data_dir: {data}
tokens:
  - {{name: ops, token: {WRITE}, role: write}}
  - {{name: viewer, token: {READ}, role: read}}
discovery:
  {discovery}
services:
  web:
    route-strategy:
      A: {{status: G, id: {{all: true}}}}
      B: {{status: R}}
    discovery:
      {mapping}
instances:
  web:
{instances}"#,
        data = data.display()
    )
}

/// Envoy with static clusters A and B (one upstream each); the filter follows the control
/// plane and weighs A and B by their healthy instance counts.
fn envoy(port: u16, a: &Upstream, b: &Upstream) -> Envoy {
    let plugin = json!({"service": "web", "control_plane":
        {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("A")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    Envoy::start(&cfg, 2).unwrap()
}

fn cli(cp: &ControlPlane, token: &str, args: &[&str]) -> Result<String, String> {
    let out = cp.cli(token, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn api(cp: &ControlPlane, path: &str) -> Value {
    let auth = format!("Bearer {READ}");
    let (status, body, _) = runtime()
        .block_on(fetch(
            &format!("{}{path}", cp.url()),
            &[("authorization", auth.as_str())],
        ))
        .unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Starts the release `args` once discovery knows A's `instances` healthy instances (a
/// procedure that brings B up to A's size needs A's count first).
fn start_once_a_has(cp: &ControlPlane, instances: u64, args: &[&str]) {
    wait_until("the release starts", Duration::from_secs(20), || {
        api(cp, "/v1/services/web")["healthy"]["A"] == instances && {
            cli(cp, WRITE, args).unwrap();
            true
        }
    });
}

/// Starts the release once discovery knows A's instances (one-by-one needs their count).
fn start_release(cp: &ControlPlane) {
    let start = [
        "release",
        "start",
        "web",
        "one-by-one",
        "--to",
        "B",
        "--converge",
        "30",
    ];
    wait_until(
        "the one-by-one release starts",
        Duration::from_secs(20),
        || match cli(cp, WRITE, &start) {
            Ok(_) => true,
            // Refused only while discovery does not know A's instances yet.
            Err(e) => {
                assert!(e.contains("knows no healthy instance of A"), "{e}");
                false
            }
        },
    );
}

fn wait_succeeded(cp: &ControlPlane, load: &Load, within: Duration) -> Value {
    let mut r = Value::Null;
    wait_until("the release succeeds", within, || {
        load.check();
        r = api(cp, "/v1/services/web/release");
        assert!(
            !matches!(r["status"]["state"].as_str(), Some("aborted" | "paused")),
            "{r:#}"
        );
        r["status"]["state"] == "succeeded"
    });
    r
}

fn states(cp: &ControlPlane) -> Vec<(String, String)> {
    let v = api(cp, "/v1/services/web");
    v["strategy"]["route-strategy"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, c)| (k.clone(), c["status"].as_str().unwrap().to_string()))
        .collect()
}

/// After the release every request goes to B.
fn only_b(envoy: &Envoy) {
    let port = envoy.port("ingress");
    wait_until("every request reaches B", Duration::from_secs(10), || {
        (0..50).all(|t| {
            let (s, body, _) = graylane_e2e::get(port, "/", &[("x-tenant-id", &t.to_string())]);
            s == 200 && body == "B"
        })
    });
}

/// web over the fake Kubernetes API server: Deployments web-a (3 replicas) and web-b (0)
/// scaled by the control plane's Kubernetes driver, a real Envoy in front of A and B.
struct Kube {
    fake: Arc<ApiServer>,
    cp: ControlPlane,
    envoy: Envoy,
    _upstreams: (Upstream, Upstream),
    _dir: tempfile::TempDir,
}

fn kube() -> Kube {
    let dir = tempfile::tempdir().unwrap();
    let (fake, _) = runtime().block_on(ApiServer::start());
    // The daemon reaches it through a kubeconfig.
    let addr = fake.address();
    let pool = |base: u16| {
        (0..3)
            .map(|i| ("127.0.0.1".to_string(), base + i))
            .collect()
    };
    fake.deployment("shop", "web-a", "web-a", pool(31_000), 3);
    fake.deployment("shop", "web-b", "web-b", pool(32_000), 0);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\nusers: [{{name: u, user: {{}}}}]\ncontexts: [{{name: fake, context: {{cluster: fake, user: u, namespace: shop}}}}]\ncurrent-context: fake\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let cfg = dir.path().join("graylane.yaml");
    std::fs::write(
        &cfg,
        config(
            port,
            &dir.path().join("data"),
            "kubernetes: {}",
            "kubernetes: {namespace: shop, services: {web-a: A, web-b: B}}",
            "    A: {kubernetes: {namespace: shop, deployment: web-a}}\n    B: {kubernetes: {namespace: shop, deployment: web-b}}\n",
        ),
    )
    .unwrap();
    let cp =
        ControlPlane::start_with_env(&cfg, port, &[("KUBECONFIG", kubeconfig.to_str().unwrap())]);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let envoy = envoy(port, &a, &b);
    Kube {
        fake,
        cp,
        envoy,
        _upstreams: (a, b),
        _dir: dir,
    }
}

/// The scales the fake API server was asked for, in order: (deployment, replicas).
fn scales(fake: &ApiServer) -> Vec<(String, u32)> {
    fake.scales()
        .into_iter()
        .map(|(_, name, n)| (name, n))
        .collect()
}

#[test]
fn one_by_one_with_kubernetes_scaling_under_load_fails_no_request() {
    let k = kube();
    let (fake, cp, envoy) = (&k.fake, &k.cp, &k.envoy);
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    start_release(cp);
    let r = wait_succeeded(cp, &load, Duration::from_secs(60));
    only_b(envoy);
    let (answers, rps) = load.stop();
    eprintln!("one-by-one over Kubernetes: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    // One scale per step, in order, each once.
    let scales = scales(fake);
    let want: Vec<(String, u32)> = [
        ("web-b", 1),
        ("web-a", 2),
        ("web-b", 2),
        ("web-a", 1),
        ("web-b", 3),
        ("web-a", 0),
    ]
    .iter()
    .map(|(k, n)| (k.to_string(), *n))
    .collect();
    assert_eq!(scales, want, "{r:#}");
    assert_eq!(fake.replicas("shop", "web-a"), Some(0));
    assert_eq!(fake.replicas("shop", "web-b"), Some(3));
    assert_eq!(
        states(cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    // Both served while they shared the traffic.
    assert!(answers["A"] > 0 && answers["B"] > 0, "{answers:?}");
}

/// An operator aborts a one-by-one release halfway (two of A's three instances replaced):
/// A's instances come back first, then the strategy from before the release, then B's
/// instances go; under steady load, not one request fails.
#[test]
fn a_one_by_one_aborted_halfway_restores_strategy_and_instances_under_load() {
    let k = kube();
    let (fake, cp, envoy) = (&k.fake, &k.cp, &k.envoy);
    let before = api(cp, "/v1/services/web")["strategy"].clone();
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    // With approvals, the release stops before each step: the abort lands at a known one.
    let start = [
        "release",
        "start",
        "web",
        "one-by-one",
        "--to",
        "B",
        "--approval",
    ];
    wait_until(
        "the one-by-one release starts",
        Duration::from_secs(20),
        || match cli(cp, WRITE, &start) {
            Ok(_) => true,
            Err(e) => {
                assert!(e.contains("knows no healthy instance of A"), "{e}");
                false
            }
        },
    );
    // Steps: B up to 1, the join, A down to 2, B up to 2, then (step 5) A down to 1.
    for step in 2..=5 {
        wait_until(
            "the release waits for an approval",
            Duration::from_secs(30),
            || {
                load.check();
                let r = api(cp, "/v1/services/web/release");
                assert_eq!(r["status"]["state"], "running", "{r:#}");
                r["gates_now"] == json!([{"gate": "approval", "service": "web", "step": step}])
            },
        );
        if step < 5 {
            cli(cp, WRITE, &["release", "approve", "web"]).unwrap();
        }
    }
    assert_eq!(
        (
            fake.replicas("shop", "web-a"),
            fake.replicas("shop", "web-b")
        ),
        (Some(2), Some(2))
    );
    let status = cli(cp, READ, &["release", "status", "web"]).unwrap();
    assert!(
        status.contains("\ngate: approval: step 5 waits for `graylane release approve web`\n"),
        "{status}"
    );
    let aborted = cli(cp, WRITE, &["release", "abort", "web", "--why", "halfway"]).unwrap();
    assert!(
        aborted.starts_with(
            "release 1 of web: one-by-one from A to B (aborted: aborted by ops: halfway)"
        ),
        "{aborted}"
    );
    let mut r = Value::Null;
    wait_until("the abort is done", Duration::from_secs(30), || {
        load.check();
        r = api(cp, "/v1/services/web/release");
        r["status"]["version"].is_u64() && fake.replicas("shop", "web-b") == Some(0)
    });
    assert_eq!(api(cp, "/v1/services/web")["strategy"], before, "{r:#}");
    // Each instance count back as before the release, A's before the strategy's restore.
    assert_eq!(
        scales(fake),
        [
            ("web-b", 1),
            ("web-a", 2),
            ("web-b", 2),
            ("web-a", 3),
            ("web-b", 0)
        ]
        .iter()
        .map(|(k, n)| (k.to_string(), *n))
        .collect::<Vec<_>>(),
        "{r:#}"
    );
    assert_eq!(fake.replicas("shop", "web-a"), Some(3));
    // The load goes on over the restored strategy.
    load.warm(load.answers().values().sum::<u64>() + 500);
    let port = envoy.port("ingress");
    wait_until("every tenant on A", Duration::from_secs(10), || {
        (0..50).all(|t| graylane_e2e::get(port, "/", &[("x-tenant-id", &t.to_string())]).1 == "A")
    });
    let (answers, rps) = load.stop();
    eprintln!("one-by-one aborted halfway: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    assert!(
        answers["A"] > 0 && answers["B"] > 0,
        "B served before the abort: {answers:?}"
    );
}

/// Tenants probed at each step of a gated release.
const PROBED: u64 = 300;

/// Which of the probed tenants Envoy sends to B, once that agrees exactly with what the
/// control plane's `explain` says of the current version, tenant by tenant (the filters may
/// take a moment to hold the version the release just made).
fn b_tenants_agreeing_with_explain(cp: &ControlPlane, envoy: &Envoy) -> Vec<u64> {
    let client = graylane_control_plane::client::Client::new(&cp.url(), Some(READ.into())).unwrap();
    let port = envoy.port("ingress");
    let mut routed = Vec::new();
    wait_until(
        "Envoy routes as explain says",
        Duration::from_secs(10),
        || {
            let mut envoy_b = Vec::new();
            let mut explained_b = Vec::new();
            for t in 0..PROBED {
                let tenant = t.to_string();
                let (s, body, _) = graylane_e2e::get(port, "/", &[("x-tenant-id", &tenant)]);
                assert_eq!(s, 200, "tenant {t}: {body}");
                if body == "B" {
                    envoy_b.push(t);
                }
                let req = graylane_control_plane::api::types::ExplainRequest {
                    tenant: Some(tenant),
                    ..Default::default()
                };
                let e = runtime().block_on(client.explain("web", &req)).unwrap();
                if e.decision.cluster.as_deref() == Some("B") {
                    explained_b.push(t);
                }
            }
            routed = envoy_b.clone();
            envoy_b == explained_b
        },
    );
    routed
}

/// A gray upgrade with the Kubernetes driver: B first scaled to A's size, then isolated, 20 %,
/// 50 %, everyone, the swap; under load, both versions serve on the way, not one request fails.
/// Each step waits for an approval, and at each one the tenants Envoy sends to B are exactly
/// those `explain` names for that step's version: none while B is isolated, then a fifth and a
/// half of them (by tenant: the 20 % are among the 50 %), then all.
#[test]
fn a_gray_upgrade_with_kubernetes_scaling_under_load_fails_no_request() {
    let k = kube();
    let (fake, cp, envoy) = (&k.fake, &k.cp, &k.envoy);
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    let start = [
        "release",
        "start",
        "web",
        "gray-upgrade",
        "--to",
        "B",
        "--steps",
        "20,50",
        "--approval",
    ];
    start_once_a_has(cp, 3, &start);
    // At each approval: the step just made, and the tenants that reach B under it.
    let mut seen: Vec<(String, Vec<u64>)> = Vec::new();
    let r = loop {
        let mut r = Value::Null;
        wait_until("an approval or the end", Duration::from_secs(60), || {
            load.check();
            r = api(cp, "/v1/services/web/release");
            assert!(
                !matches!(r["status"]["state"].as_str(), Some("aborted")),
                "{r:#}"
            );
            r["status"]["state"] == "succeeded"
                || r["waiting"]
                    .as_str()
                    .is_some_and(|w| w.starts_with("approval before step"))
        });
        if r["status"]["state"] == "succeeded" {
            break r;
        }
        let at = r["at"].as_u64().unwrap() as usize;
        let made = r["steps"][at - 1]["step"].as_str().unwrap().to_string();
        seen.push((made, b_tenants_agreeing_with_explain(cp, envoy)));
        cli(cp, WRITE, &["release", "approve", "web"]).unwrap();
    };
    let counts: Vec<(&str, usize)> = seen.iter().map(|(s, b)| (s.as_str(), b.len())).collect();
    eprintln!("gray upgrade, tenants of {PROBED} on B after each step: {counts:?}");
    let after =
        |step: &str, nth: usize| &seen.iter().filter(|(s, _)| s == step).nth(nth).unwrap().1;
    assert!(after("isolate", 0).is_empty(), "{counts:?}");
    let (p20, p50) = (after("percent", 0), after("percent", 1));
    assert!((40..=80).contains(&p20.len()), "{counts:?}");
    assert!((120..=180).contains(&p50.len()), "{counts:?}");
    assert!(
        p20.iter().all(|t| p50.contains(t)),
        "a tenant on B at 20 % left it at 50 %"
    );
    assert_eq!(after("all", 0).len() as u64, PROBED, "{counts:?}");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        ["scale", "isolate", "percent", "percent", "all", "swap"]
    );
    only_b(envoy);
    let (answers, rps) = load.stop();
    eprintln!("gray upgrade over Kubernetes: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    assert!(answers["A"] > 0 && answers["B"] > 0, "{answers:?}");
    assert_eq!(
        states(cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    // A is kept (R, its instances up) for a rollback.
    assert_eq!(scales(fake), [("web-b".to_string(), 3)]);
    assert_eq!(fake.replicas("shop", "web-a"), Some(3));
}

/// A switch with the Kubernetes driver (B first scaled to A's size), then `release rollback`
/// back to A, under load: each procedure's final states exact, not one request failed.
#[test]
fn a_switch_then_release_rollback_with_kubernetes_scaling_fail_no_request() {
    let k = kube();
    let (fake, cp, envoy) = (&k.fake, &k.cp, &k.envoy);
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    let start = ["release", "start", "web", "switch", "--to", "B"];
    // Started once discovery knows A's 3 instances (B is then brought up to 3).
    start_once_a_has(cp, 3, &start);
    let r = wait_succeeded(cp, &load, Duration::from_secs(60));
    only_b(envoy);
    assert_eq!(
        states(cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())],
        "{r:#}"
    );
    let back = cli(
        cp,
        WRITE,
        &["release", "rollback", "web", "--why", "v2 is slow"],
    )
    .unwrap();
    assert!(
        back.starts_with("release 2 of web: rollback from B to A ("),
        "{back}"
    );
    let r = wait_succeeded(cp, &load, Duration::from_secs(60));
    assert_eq!(r["reason"], "rollback of release 1: v2 is slow");
    let port = envoy.port("ingress");
    wait_until("every tenant on A", Duration::from_secs(10), || {
        (0..50).all(|t| graylane_e2e::get(port, "/", &[("x-tenant-id", &t.to_string())]).1 == "A")
    });
    let (answers, rps) = load.stop();
    eprintln!("switch and rollback over Kubernetes: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    assert!(answers["A"] > 0 && answers["B"] > 0, "{answers:?}");
    assert_eq!(
        states(cp),
        [("A".into(), "G".into()), ("B".into(), "R".into())]
    );
    // B up to A's size once, before it took traffic; A had its instances all along.
    assert_eq!(scales(fake), [("web-b".to_string(), 3)]);
}

/// web over the fake Consul (`profile` meta: a for A, b for B), each cluster's instances
/// started and stopped by a hook that appends "<cluster> <n>" to a file; the test plays the
/// platform and registers what the hooks ask for.
struct Hooks {
    dir: tempfile::TempDir,
    consul: Arc<Consul>,
    cp: ControlPlane,
    envoy: Envoy,
    _upstreams: (Upstream, Upstream),
}

impl Hooks {
    fn start(a: u16, b: u16) -> Hooks {
        let dir = tempfile::tempdir().unwrap();
        let (consul, url) = runtime().block_on(Consul::start());
        consul.set_service("web", Hooks::instances(a, b));
        let hooks = dir.path().join("hooks.log");
        let hook = |cluster: &str| {
            format!(
                "    {cluster}: {{hooks: {{scale: ['/bin/sh', '-c', 'echo \"$0 $1\" >> {}', '{{cluster}}', '{{n}}'], timeout: 10s}}}}\n",
                hooks.display()
            )
        };
        let port = free_port();
        let cfg = dir.path().join("graylane.yaml");
        std::fs::write(
            &cfg,
            config(
                port,
                &dir.path().join("data"),
                &format!("consul: {{address: \"{url}\", wait: 2s}}"),
                "consul: {service: web, meta: profile, clusters: {a: A, b: B}}",
                &format!("{}{}", hook("A"), hook("B")),
            ),
        )
        .unwrap();
        let cp = ControlPlane::start(&cfg, port);
        let upstreams = (Upstream::start("A"), Upstream::start("B"));
        let envoy = envoy(port, &upstreams.0, &upstreams.1);
        Hooks {
            dir,
            consul,
            cp,
            envoy,
            _upstreams: upstreams,
        }
    }

    /// `a` instances of A and `b` of B, all passing.
    fn instances(a: u16, b: u16) -> Vec<Value> {
        let mut v: Vec<Value> = (0..a)
            .map(|i| instance("127.0.0.1", "", 31_000 + i, "a", "passing"))
            .collect();
        v.extend((0..b).map(|i| instance("127.0.0.1", "", 32_000 + i, "b", "passing")));
        v
    }

    /// What the hooks were asked, in order.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("hooks.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// Seed 000's gray upgrade, its rollback and a switch, with hooks over Consul, under load:
/// only the gray upgrade needs an instance (B up to A's size, one hook); the rollback finds A
/// kept with its instances, the switch finds B's; each final state exact, no request failed.
#[test]
fn a_gray_upgrade_its_rollback_and_a_switch_with_hooks_over_consul_fail_no_request() {
    let h = Hooks::start(2, 0);
    let (cp, envoy) = (&h.cp, &h.envoy);
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    let start = [
        "release",
        "start",
        "web",
        "gray-upgrade",
        "--to",
        "B",
        "--steps",
        "50",
    ];
    start_once_a_has(cp, 2, &start);
    wait_until("the hook brings B up", Duration::from_secs(30), || {
        load.check();
        !h.lines().is_empty()
    });
    assert_eq!(h.lines(), ["B 2"]);
    h.consul.set_service("web", Hooks::instances(2, 2));
    wait_succeeded(cp, &load, Duration::from_secs(60));
    only_b(envoy);
    assert_eq!(
        states(cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    cli(cp, WRITE, &["release", "rollback", "web", "--why", "test"]).unwrap();
    let r = wait_succeeded(cp, &load, Duration::from_secs(60));
    assert_eq!(r["procedure"], "rollback", "{r:#}");
    let port = envoy.port("ingress");
    wait_until("every tenant on A", Duration::from_secs(10), || {
        (0..50).all(|t| graylane_e2e::get(port, "/", &[("x-tenant-id", &t.to_string())]).1 == "A")
    });
    assert_eq!(
        states(cp),
        [("A".into(), "G".into()), ("B".into(), "R".into())]
    );
    cli(
        cp,
        WRITE,
        &["release", "start", "web", "switch", "--to", "B"],
    )
    .unwrap();
    wait_succeeded(cp, &load, Duration::from_secs(60));
    only_b(envoy);
    let (answers, rps) = load.stop();
    eprintln!("gray upgrade, rollback, switch over hooks: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    assert!(answers["A"] > 0 && answers["B"] > 0, "{answers:?}");
    assert_eq!(
        states(cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    // Instances were asked for once: B up to A's size for the gray upgrade.
    assert_eq!(h.lines(), ["B 2"]);
}

#[test]
fn one_by_one_with_hooks_over_consul_survives_a_sigkill_without_running_a_hook_twice() {
    let mut h = Hooks::start(2, 0);
    let load = Load::start(h.envoy.port("ingress"));
    load.warm(500);
    let instances = Hooks::instances;
    start_release(&h.cp);
    // The test is the platform: what a hook asks for shows up in Consul. The third hook
    // ("B 2") is answered only after the control plane was killed and restarted.
    let (mut na, mut nb) = (2u16, 0u16);
    for (i, want) in ["B 1", "A 1", "B 2", "A 0"].iter().enumerate() {
        wait_until(&format!("hook {want}"), Duration::from_secs(30), || {
            load.check();
            h.lines().len() > i
        });
        assert_eq!(h.lines()[i], *want, "{:?}", h.lines());
        if i == 2 {
            h.cp.kill();
            std::thread::sleep(Duration::from_millis(300));
            h.cp.restart();
            // The restarted control plane waits for B's second instance without asking again.
            wait_until("the resumed release waits", Duration::from_secs(10), || {
                api(&h.cp, "/v1/services/web/release")["waiting"]
                    == "instances: B has 1 of 2 healthy instances"
            });
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(h.lines().len(), 3, "{:?}", h.lines());
        }
        let (cluster, n) = want.split_once(' ').unwrap();
        let n: u16 = n.parse().unwrap();
        if cluster == "A" {
            na = n;
        } else {
            nb = n;
        }
        h.consul.set_service("web", instances(na, nb));
    }
    let r = wait_succeeded(&h.cp, &load, Duration::from_secs(30));
    only_b(&h.envoy);
    let (answers, rps) = load.stop();
    eprintln!("one-by-one over hooks with a SIGKILL: {answers:?}, {rps:.0} requests/s");
    assert!(rps >= 200.0, "{rps:.0} requests/s");
    assert_eq!(h.lines(), ["B 1", "A 1", "B 2", "A 0"], "{r:#}");
    assert_eq!(
        states(&h.cp),
        [("A".into(), "R".into()), ("B".into(), "G".into())]
    );
    let log: Vec<&str> = r["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("asking the instance driver"))
            .count(),
        4,
        "{log:#?}"
    );
}

/// A server that answers "B" after 200 ms: a new version that works, slowly.
fn slow_b() -> u16 {
    runtime().block_on(async {
        let app = axum::Router::new().fallback(|| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            "B"
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        port
    })
}

/// The latency gate: a gray upgrade to a version that answers every request, but 200 ms
/// late, aborts by itself once the reports show its p99 above 3 times the stable one's; the
/// reason is in `release status`; no request fails; afterwards every tenant is on A again.
#[test]
fn the_latency_gate_aborts_a_release_to_a_slow_version_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("graylane.yaml");
    let config = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\ntokens:\n  - {{name: ops, token: {WRITE}, role: write}}\n  - {{name: viewer, token: {READ}, role: read}}\nservices:\n  web:\n    route-strategy:\n      A: {{status: G, id: {{all: true}}}}\n      B: {{status: R}}\n",
        dir.path().join("data").display()
    );
    std::fs::write(&cfg, config).unwrap();
    let cp = ControlPlane::start(&cfg, port);
    let a = Upstream::start("A");
    let plugin = json!({"service": "web", "control_plane": {"cluster": "graylane_cp",
        "wait_ms": 5000, "tick_ms": 50, "report_ms": 200}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("A")
        .cluster("A", a.port())
        .cluster("B", slow_b())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 2).unwrap();
    let load = Load::start(envoy.port("ingress"));
    load.warm(500);
    let started = cli(
        &cp,
        WRITE,
        &[
            "release",
            "start",
            "web",
            "gray-upgrade",
            "--to",
            "B",
            "--steps",
            "20",
            "--bake",
            "5",
            "--max-p99-ratio",
            "3",
            "--min-requests",
            "20",
        ],
    );
    assert!(started.is_ok(), "{started:?}");
    let mut status = String::new();
    wait_until("the release aborts", Duration::from_secs(40), || {
        load.check();
        status = cli(&cp, READ, &["release", "status", "web"]).unwrap();
        // Aborted, and the writer has made the version that restores the strategy (a status
        // read between the two shows the abort alone).
        status
            .lines()
            .next()
            .is_some_and(|l| l.contains("(aborted: "))
            && status.contains(": the strategy from before the release")
    });
    let first = status.lines().next().unwrap();
    assert!(
        first.starts_with(
            "release 1 of web: gray-upgrade from A to B (aborted: aborted by the latency gate: \
             p99 of B is "
        ),
        "{status}"
    );
    assert!(first.contains(" ms over the last 10 s, "), "{status}");
    assert!(
        status.contains("version 4: the strategy from before the release"),
        "{status}"
    );
    // Every tenant is back on A; not one request failed, slow ones included.
    let port = envoy.port("ingress");
    wait_until("every tenant on A", Duration::from_secs(10), || {
        (0..50).all(|t| graylane_e2e::get(port, "/", &[("x-tenant-id", &t.to_string())]).1 == "A")
    });
    let (answers, rps) = load.stop();
    eprintln!("latency gate: {answers:?}, {rps:.0} requests/s; {first}");
    assert!(answers.get("B").is_some_and(|n| *n > 0), "{answers:?}");
    assert_eq!(
        states(&cp),
        [("A".into(), "G".into()), ("B".into(), "R".into())]
    );
}
