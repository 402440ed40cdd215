//! Into a REAL Envoy over ADS (CDS + EDS): the REAL graylane .wasm in that Envoy skips a
//! version with no healthy instance. Under steady load, the gray instance leaving makes its
//! whitelisted tenants fall back to prod with zero failed requests; it coming back returns them
//! to gray. The load is counted per phase, and each phase lasts until it has enough answers, so
//! a slow machine only makes the test slower.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graylane_e2e::fakes::consul::{instance, Consul};
use graylane_e2e::fakes::kube::{cond, ready, slice, ApiServer, Kind};
use graylane_e2e::{
    count_by_body, cpu_seconds, fetch, get, rss_mib, runtime, wait_until, wasm_path, Envoy,
    Upstream,
};

use crate::control_plane::{runtime_of_two, ControlPlane};

const SERVICES: &str = "  web:
    route-strategy:
      A: {status: Y, id: {ids: [1, 2, 3]}}
      B: {status: G, id: {all: true}}
";

/// An Envoy that knows only the control plane: clusters A and B come over ADS.
fn envoy(cp: &ControlPlane) -> Envoy {
    let plugin = serde_json::json!({"service": "web", "reason_header": "x-graylane-reason",
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let yaml = format!(
        r#"node: {{id: e2e-ads, cluster: e2e}}
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: graylane_xds}}}}]
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            validate_clusters: false
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes:
              - match: {{prefix: "/", headers: [{{name: x-graylane-cluster, present_match: true}}]}}
                route: {{cluster_header: x-graylane-cluster}}
              - match: {{prefix: "/"}}
                route: {{cluster: B}}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: graylane
                root_id: graylane
                failure_policy: FAIL_CLOSED
                vm_config:
                  vm_id: graylane
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: {wasm}}}}}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {plugin}
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: graylane_xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment: {{cluster_name: graylane_xds, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds}}}}}}}}}]}}]}}
  - name: graylane_cp
    type: STATIC
    load_assignment: {{cluster_name: graylane_cp, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {api}}}}}}}}}]}}]}}
"#,
        wasm = serde_json::Value::String(wasm_path().display().to_string()),
        plugin = serde_json::Value::String(plugin.to_string()),
        xds = cp.xds,
        api = cp.api,
    );
    Envoy::start(&yaml, 2).unwrap()
}

/// One answer to the load: the upstream's name, or what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Served(String),
    Failed(String),
}

/// Each phase's name and answers, in order.
type Phases = Vec<(String, Vec<Answer>)>;

/// Steady load for tenant 2 (whitelisted for gray) from two client threads until stopped.
/// Every answer is counted in the phase during which its request was sent.
struct Load {
    stop: Arc<AtomicBool>,
    phase: Arc<AtomicUsize>,
    /// Answers per phase, with the phases' names.
    phases: Arc<Mutex<Phases>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Answers a steady phase must have.
const STEADY: usize = 50;
/// Consecutive answers from the new version that show a switch has finished.
const SETTLED: usize = 20;
/// How long any phase may take, however slow the machine.
const PHASE_LIMIT: Duration = Duration::from_secs(60);

impl Load {
    fn start(port: u16, first_phase: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(AtomicUsize::new(0));
        let phases = Arc::new(Mutex::new(vec![(first_phase.to_owned(), Vec::new())]));
        let threads = (0..2)
            .map(|_| {
                let (stop, phase, phases) = (stop.clone(), phase.clone(), phases.clone());
                std::thread::spawn(move || {
                    let url = format!("http://127.0.0.1:{port}/");
                    while !stop.load(Ordering::SeqCst) {
                        let sent_in = phase.load(Ordering::SeqCst);
                        let answer = match runtime().block_on(fetch(&url, &[("x-tenant-id", "2")]))
                        {
                            Ok((200, body, _)) => Answer::Served(body),
                            Ok((status, body, _)) => {
                                Answer::Failed(format!("HTTP {status}: {body}"))
                            }
                            Err(e) => Answer::Failed(format!("{e:#}")),
                        };
                        phases.lock().unwrap()[sent_in].1.push(answer);
                    }
                })
            })
            .collect();
        Load {
            stop,
            phase,
            phases,
            threads,
        }
    }

    /// Starts the next phase: requests sent from now on count in it.
    fn next_phase(&self, name: &str) {
        let mut phases = self.phases.lock().unwrap();
        phases.push((name.to_owned(), Vec::new()));
        self.phase.store(phases.len() - 1, Ordering::SeqCst);
    }

    /// Waits until the current phase's answers satisfy `done`; fails at once on a failed
    /// request, naming its phase.
    fn wait(&self, what: &str, done: impl Fn(&[Answer]) -> bool) {
        wait_until(what, PHASE_LIMIT, || {
            let (failure, done) = {
                let phases = self.phases.lock().unwrap();
                let failure = phases.iter().find_map(|(name, answers)| {
                    answers.iter().find_map(|a| match a {
                        Answer::Failed(e) => Some(format!("{name:?}: {e}")),
                        Answer::Served(_) => None,
                    })
                });
                let (_, answers) = &phases[self.phase.load(Ordering::SeqCst)];
                (failure, done(answers))
            };
            if let Some(failure) = failure {
                panic!("a request failed during phase {failure}");
            }
            done
        });
    }

    /// Waits until the last [`SETTLED`] answers of the current phase all came from `body`.
    fn settles_on(&self, body: &str) {
        let served = Answer::Served(body.to_owned());
        self.wait(&format!("the load settles on {body}"), |a| {
            a.len() >= SETTLED && a[a.len() - SETTLED..].iter().all(|x| *x == served)
        });
    }

    /// Waits until the current phase has [`STEADY`] answers.
    fn steady(&self) {
        self.wait(&format!("{STEADY} answers"), |a| a.len() >= STEADY);
    }

    /// Stops the load; the answers of every phase.
    fn stop(mut self) -> Phases {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            t.join().unwrap();
        }
        self.phases.lock().unwrap().clone()
    }
}

impl Drop for Load {
    /// Also when a test fails: the clients stop instead of hammering a dead Envoy.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Waits until 20 requests of `tenant` in a row reach `want`.
fn wait_routes(envoy: &Envoy, tenant: &str, want: &str) {
    wait_until(
        &format!("tenant {tenant} reaches {want}"),
        Duration::from_secs(30),
        || {
            let c = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", tenant)], 20);
            c.get(want) == Some(&20)
        },
    );
}

/// The common script, in phases that each last until a condition holds: both versions serve;
/// gray leaves under load (tenant 2 to prod); prod serves; gray returns (back to gray); gray
/// serves. Not one request may fail in any phase.
fn scenario(envoy: &Envoy, gray_leaves: impl FnOnce(), gray_returns: impl FnOnce()) {
    wait_routes(envoy, "2", "gray");
    wait_routes(envoy, "300", "prod");
    let load = Load::start(envoy.port("ingress"), "gray serves");
    load.steady();
    load.settles_on("gray");

    load.next_phase("gray leaves");
    gray_leaves();
    load.settles_on("prod");

    load.next_phase("prod serves");
    load.steady();
    let (_, body, headers) = get(envoy.port("ingress"), "/", &[("x-tenant-id", "2")]);
    assert_eq!(body, "prod");
    assert_eq!(headers["x-graylane-reason"], "B;all,fallback_unhealthy");

    load.next_phase("gray returns");
    gray_returns();
    load.settles_on("gray");

    load.next_phase("gray serves again");
    load.steady();
    let phases = load.stop();
    for (name, answers) in &phases {
        let failed: Vec<&Answer> = answers
            .iter()
            .filter(|a| matches!(a, Answer::Failed(_)))
            .collect();
        let by = |b: &str| {
            answers
                .iter()
                .filter(|a| **a == Answer::Served(b.into()))
                .count()
        };
        eprintln!(
            "phase {name:?}: {} requests ({} gray, {} prod, {} failed)",
            answers.len(),
            by("gray"),
            by("prod"),
            failed.len()
        );
        assert!(failed.is_empty(), "phase {name:?}: {failed:?}");
    }
    // Each phase waited for its answers: the switches happened under load.
    assert!(phases[1].1.len() >= SETTLED && phases[3].1.len() >= SETTLED);
}

#[test]
fn discovery_consul_to_envoy_over_ads_gray_leaves_and_returns_without_errors() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let rt = runtime_of_two();
    let (fake, url) = rt.block_on(Consul::start());
    let both = || {
        vec![
            instance("127.0.0.1", "", gray.port(), "gray", "passing"),
            instance("127.0.0.1", "", prod.port(), "prod", "passing"),
        ]
    };
    fake.set_service("web", both());
    let discovery = format!("discovery:\n  consul: {{address: \"{url}\", wait: 2s}}");
    let services = format!(
        "{SERVICES}    discovery:\n      consul: {{service: web, meta: profile, clusters: {{gray: A, prod: B}}}}\n"
    );
    let cp = ControlPlane::start(rt, &services, &discovery, None);
    let envoy = envoy(&cp);
    // Envoy got both clusters and their endpoints over ADS, none written by hand.
    let clusters = envoy.admin("/clusters");
    assert!(
        clusters.contains(&format!("A::127.0.0.1:{}", gray.port())),
        "{clusters}"
    );
    assert!(
        clusters.contains(&format!("B::127.0.0.1:{}", prod.port())),
        "{clusters}"
    );
    scenario(
        &envoy,
        || {
            fake.set_service(
                "web",
                vec![instance("127.0.0.1", "", prod.port(), "prod", "passing")],
            )
        },
        || fake.set_service("web", both()),
    );

    // The control plane goes away and the registry changes meanwhile: once Envoy has lost its
    // ADS stream and the filter its feed, Envoy keeps the clusters and endpoints it had and
    // routes as before.
    let mut cp = cp;
    let feed_failed = || {
        envoy
            .stat("wasmcustom.graylane.web.feed_failed")
            .unwrap_or(0)
    };
    let failed_before = feed_failed();
    cp.stop();
    let (gray2, prod2) = (Upstream::start("gray-2"), Upstream::start("prod-2"));
    fake.set_service(
        "web",
        vec![
            instance("127.0.0.1", "", gray2.port(), "gray", "passing"),
            instance("127.0.0.1", "", prod2.port(), "prod", "passing"),
        ],
    );
    wait_until(
        "Envoy's ADS stream is down and the filter counted a failed feed poll",
        Duration::from_secs(30),
        || envoy.stat("control_plane.connected_state") == Some(0) && feed_failed() > failed_before,
    );
    let c = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", "2")], 100);
    assert_eq!(c.get("gray"), Some(&100), "{c:?}");
    let c = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", "300")], 100);
    assert_eq!(c.get("prod"), Some(&100), "{c:?}");
    // Back on the same ports: Envoy reconnects and resyncs to what the registry says now.
    cp.restart();
    wait_routes(&envoy, "2", "gray-2");
    wait_routes(&envoy, "300", "prod-2");
    drop(cp);
}

/// Issue 10: under steady load, the registry goes down, then the control plane is stopped
/// and started again while it is still down. The restarted control plane serves Envoy the
/// endpoints it kept from its last run (marked stale) instead of an empty cluster set, so not
/// one request fails and Envoy keeps both clusters; when the registry is back, it syncs again.
#[test]
fn a_restart_with_the_registry_down_fails_no_request_and_keeps_the_clusters() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let rt = runtime_of_two();
    let (fake, _) = rt.block_on(Consul::start());
    // The agent the control plane talks to, on an address this test can take down.
    let (listener, addr) = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    });
    let agent = tokio_util::sync::CancellationToken::new();
    {
        let _guard = rt.enter();
        fake.serve(listener, agent.clone());
    }
    fake.set_service(
        "web",
        vec![
            instance("127.0.0.1", "", gray.port(), "gray", "passing"),
            instance("127.0.0.1", "", prod.port(), "prod", "passing"),
        ],
    );
    let discovery = format!("discovery:\n  consul: {{address: \"http://{addr}\", wait: 2s}}");
    let services = format!(
        "{SERVICES}    discovery:\n      consul: {{service: web, meta: profile, clusters: {{gray: A, prod: B}}}}\n"
    );
    let mut cp = ControlPlane::start(rt, &services, &discovery, None);
    let envoy = envoy(&cp);
    wait_routes(&envoy, "2", "gray");
    let load = Load::start(envoy.port("ingress"), "registry up");
    load.settles_on("gray");

    load.next_phase("registry down");
    agent.cancel();
    load.steady();

    load.next_phase("control plane stopped, registry down");
    let connected = || envoy.stat("control_plane.connected_state");
    cp.stop();
    wait_until(
        "Envoy's ADS stream is down",
        Duration::from_secs(30),
        || connected() == Some(0),
    );
    load.steady();

    load.next_phase("control plane restarted, registry down");
    let cds = || {
        envoy
            .stat("cluster_manager.cds.update_success")
            .unwrap_or(0)
    };
    let cds_before = cds();
    cp.restart();
    // The restarted control plane answers (with what it kept), it is not merely silent.
    wait_until(
        "Envoy is back on ADS and took a cluster set from the restarted control plane",
        Duration::from_secs(30),
        || connected() == Some(1) && cds() > cds_before,
    );
    // Long enough for the restarted control plane to answer CDS and EDS and for Envoy to
    // apply them: an empty answer would show as failed requests within this phase.
    std::thread::sleep(Duration::from_secs(2));
    load.steady();
    load.settles_on("gray");
    let clusters = envoy.admin("/clusters");
    for (cluster, port) in [("A", gray.port()), ("B", prod.port())] {
        assert!(
            clusters.contains(&format!("{cluster}::127.0.0.1:{port}")),
            "{cluster} kept its endpoint: {clusters}"
        );
    }
    let phases = load.stop();
    let failed: Vec<(&str, &str)> = phases
        .iter()
        .flat_map(|(name, answers)| {
            answers.iter().filter_map(move |a| match a {
                Answer::Failed(e) => Some((name.as_str(), e.as_str())),
                Answer::Served(_) => None,
            })
        })
        .collect();
    assert_eq!(failed, Vec::<(&str, &str)>::new());
    assert_eq!(phases.len(), 4);
    drop(cp);
}

#[test]
fn discovery_kubernetes_to_envoy_over_ads_gray_leaves_and_returns_without_errors() {
    let (gray, prod) = (Upstream::start("gray"), Upstream::start("prod"));
    let rt = runtime_of_two();
    let (fake, client) = rt.block_on(ApiServer::start());
    // One Service per profile (web-gray, web-prod); slices carry the port of each backend.
    let put = |name: &str, service: &str, port: u16, ep: serde_json::Value| {
        let mut s = slice(name, service, vec![ep]);
        s["ports"] = serde_json::json!([{"name": "http", "protocol": "TCP", "port": port}]);
        fake.apply(Kind::Slice, "shop", s);
    };
    put("web-gray-1", "web-gray", gray.port(), ready("127.0.0.1"));
    put("web-prod-1", "web-prod", prod.port(), ready("127.0.0.1"));
    let services = format!(
        "{SERVICES}    discovery:\n      kubernetes: {{namespace: shop, services: {{web-gray: A, web-prod: B}}}}\n"
    );
    let cp = ControlPlane::start(rt, &services, "discovery: {kubernetes: {}}", Some(client));
    let envoy = envoy(&cp);
    scenario(
        &envoy,
        // The gray pod is terminating: not ready any more.
        || {
            put(
                "web-gray-1",
                "web-gray",
                gray.port(),
                cond(
                    "127.0.0.1",
                    serde_json::json!({"ready": false, "serving": true, "terminating": true}),
                ),
            )
        },
        || put("web-gray-1", "web-gray", gray.port(), ready("127.0.0.1")),
    );
    drop(cp);
}

/// Benchmark (run by `make bench`): 10,000 instances across 100 services in the fake Consul,
/// 1 % of them changing every second, served to a real Envoy over ADS. Reports the time from
/// a registry change to Envoy's endpoint update (p50, p99) and the control plane's CPU and
/// memory (this process: control plane and fake Consul together). Consul as it is today: a
/// service's blocking query returns when that service changes (a per-service index).
#[test]
#[ignore = "benchmark: run by make bench"]
fn discovery_bench_envoy_churn() {
    churn(true);
}

/// The same with one global index, as older Consul answers health queries: every change
/// wakes every service's blocking query (each is fetched, parsed and found unchanged), so
/// the registry side does 100 times the work.
#[test]
#[ignore = "benchmark: run by make bench"]
fn discovery_bench_envoy_churn_global_index() {
    churn(false);
}

fn churn(per_service_index: bool) {
    const SERVICES: usize = 100;
    const PER: u16 = 100; // instances per service: 50 gray, 50 prod
    let rt = runtime_of_two();
    let (fake, url) = rt.block_on(Consul::start());
    fake.index_per_service(per_service_index);
    // Instance j of service i listens (nominally) on 127.0.0.1:(20000 + i*PER + j); Envoy never
    // connects (no traffic, no health checks), it only holds the endpoints.
    let entries = |i: usize, up: &[bool]| -> Vec<serde_json::Value> {
        (0..PER)
            .filter(|j| up[usize::from(*j)])
            .map(|j| {
                let port = 20_000 + (i as u16) * PER + j;
                let profile = if j % 2 == 0 { "gray" } else { "prod" };
                instance("127.0.0.1", "", port, profile, "passing")
            })
            .collect()
    };
    let mut up: Vec<Vec<bool>> = vec![vec![true; usize::from(PER)]; SERVICES];
    let mut services = String::new();
    for (i, u) in up.iter().enumerate() {
        fake.set_service(&format!("svc{i}"), entries(i, u));
        services.push_str(&format!(
            "  svc{i}:\n    route-strategy:\n      gray: {{status: Y, cluster: svc{i}-gray, id: {{ids: [1]}}}}\n      prod: {{status: G, cluster: svc{i}-prod, id: {{all: true}}}}\n    discovery:\n      consul: {{service: svc{i}, meta: profile, clusters: {{gray: gray, prod: prod}}}}\n"
        ));
    }
    let discovery = format!(
        "discovery:\n  consul: {{address: \"{url}\", wait: 30s, rate: {{per_second: 50, burst: 50}}}}"
    );
    let cp = ControlPlane::start(rt, &services, &discovery, None);
    let envoy = envoy(&cp);
    let members = |svc: usize| -> Option<u64> {
        envoy.stat(&format!("cluster.svc{svc}-gray.membership_total"))
    };
    let start = Instant::now();
    wait_until(
        "Envoy has all 10,000 endpoints",
        Duration::from_secs(120),
        || (0..SERVICES).all(|i| members(i) == Some(u64::from(PER / 2))),
    );
    eprintln!(
        "churn: all 10,000 endpoints in Envoy after {:?}",
        start.elapsed()
    );
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let mut seed = 7u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        (seed >> 33) as usize
    };
    let mut took = Vec::new();
    for round in 0..30 {
        // 1 % per second: 100 instances flip each second, in 10 steps of 10 (the pace of the
        // churn: this sleep drives the load, it waits for nothing).
        for _ in 0..10 {
            let mut touched = std::collections::BTreeSet::new();
            for _ in 0..10 {
                let (i, j) = (rnd() % SERVICES, rnd() % usize::from(PER));
                if i == round % SERVICES {
                    continue; // the tracked service changes only as measured below
                }
                up[i][j] = !up[i][j];
                touched.insert(i);
            }
            for i in touched {
                fake.set_service(&format!("svc{i}"), entries(i, &up[i]));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The measured change: one gray instance of one service leaves or returns.
        let i = round % SERVICES;
        up[i][0] = !up[i][0];
        let want = up[i].iter().step_by(2).filter(|u| **u).count() as u64;
        let t = Instant::now();
        fake.set_service(&format!("svc{i}"), entries(i, &up[i]));
        // A gray set emptied by the registry is held for the drain window: never here, since
        // 49 other gray instances stay. Polled tightly: the poll interval is the resolution.
        while members(i) != Some(want) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "svc{i} never updated in Envoy: has {:?}, want {want}; round {round}; control plane: {:?}",
                members(i),
                get(cp.api, &format!("/v1/feed/svc{i}?version=0"), &[]).1
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        took.push(t.elapsed());
    }
    let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    took.sort();
    let pct = |p: f64| took[((took.len() - 1) as f64 * p).round() as usize];
    println!(
        "churn: registry change -> Envoy endpoint update (10,000 instances, 100 services, 1 %/s, {}) = p50 {:.1} ms, p99 {:.1} ms; control plane + fake Consul CPU {:.0} % of a core, RSS {:.0} MiB",
        if per_service_index {
            "per-service index"
        } else {
            "one global index"
        },
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        cpu * 100.0,
        rss_mib()
    );
    drop(cp);
}
