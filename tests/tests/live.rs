//! Issue 4 end to end: the real control plane (`graylane serve`, its CLI) feeding a real
//! Envoy with 2 workers. A state change through the CLI moves traffic; with the control plane
//! stopped Envoy keeps routing by its last snapshot; restarted, updates resume; an invalid edit
//! of the config file leaves routing unchanged and shows the error in the API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use graylane_e2e::{count_by_body, free_port, get, ControlPlane, Envoy, EnvoyConfig, Upstream};
use serde_json::json;

const WRITE: &str = "write-token-e2e";
const READ: &str = "read-token-e2e";

fn config(port: u16, data: &std::path::Path, a_status: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:{port}
data_dir: {data}
tokens:
  - {{name: ops, token: {WRITE}, role: write}}
  - {{name: viewer, token: {READ}, role: read}}
services:
  web:
    route-strategy:
      A:
        status: {a_status}
        id:
          all: false
          ids: [1, 2, 3]
          interval: [[1,100], [600,10000]]
      B:
        status: G
        id:
          all: true
"#,
        data = data.display()
    )
}

/// The body every one of `n` requests for `tenant` got, if they all agree.
fn route(envoy: &Envoy, tenant: &str) -> Option<String> {
    let counts = count_by_body(envoy.port("ingress"), "/", &[("x-tenant-id", tenant)], 40);
    (counts.len() == 1).then(|| counts.into_keys().next().unwrap())
}

fn wait_route(envoy: &Envoy, tenant: &str, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if route(envoy, tenant).as_deref() == Some(want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "tenant {tenant} did not reach {want} within {within:?} (now {:?})",
            route(envoy, tenant)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "CLI failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn cli_moves_traffic_envoy_survives_the_control_plane_and_bad_edits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config(port, &dir.path().join("data"), "Y")).unwrap();
    let mut cp = ControlPlane::start(&cfg_path, port);

    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    // No strategy in Envoy's config: everything the filter knows comes from the feed.
    let plugin = json!({"service": "web", "reason_header": "x-graylane-reason",
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("B")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 2).unwrap();
    let secs = Duration::from_secs;

    // The first snapshot arrives from the control plane.
    wait_route(&envoy, "2", "A", secs(20));
    assert_eq!(route(&envoy, "300").as_deref(), Some("B"));
    assert_eq!(route(&envoy, "700").as_deref(), Some("A"));

    // A read token cannot write; the CLI says so and exits non-zero.
    let denied = cp.cli(READ, &["set-state", "web", "A", "R"]);
    assert!(!denied.status.success());
    assert_eq!(route(&envoy, "2").as_deref(), Some("A"));

    // Flip A to R through the CLI: tenant 2 moves to B on every worker.
    ok(&cp.cli(WRITE, &["set-state", "web", "A", "R"]));
    let took = wait_route(&envoy, "2", "B", secs(5));
    eprintln!("CLI write -> every worker routing by it: {took:?}");
    let status = ok(&cp.cli(READ, &["status"]));
    let rows: Vec<Vec<&str>> = status
        .lines()
        .filter(|l| l.trim_start().starts_with("web"))
        .map(|l| l.split_whitespace().take(4).collect())
        .collect();
    assert_eq!(
        rows,
        vec![vec!["web", "A", "A", "R"], vec!["web", "B", "B", "G"]],
        "{status}"
    );

    // Explain agrees with Envoy (the same decide()).
    let explained = ok(&cp.cli(READ, &["explain", "web", "--tenant", "700"]));
    assert!(
        explained.starts_with("web (version 2): -> B (Envoy cluster B, lane "),
        "{explained}"
    );

    // Control plane down: Envoy keeps routing by its last snapshot.
    cp.kill();
    std::thread::sleep(Duration::from_millis(300));
    for t in ["2", "700", "300"] {
        assert_eq!(
            route(&envoy, t).as_deref(),
            Some("B"),
            "tenant {t} with the control plane down"
        );
    }
    let (status, _, _) = get(envoy.port("ingress"), "/", &[("x-tenant-id", "2")]);
    assert_eq!(status, 200);

    // Restarted (same data): history survived, updates resume.
    cp.restart();
    ok(&cp.cli(WRITE, &["set-state", "web", "A", "Y"]));
    wait_route(&envoy, "2", "A", secs(10));
    let history = ok(&cp.cli(READ, &["history"]));
    assert!(history.lines().count() >= 3, "{history}");

    // An invalid edit of the file: rejected, visible in the API, routing unchanged.
    let bad = config(port, &dir.path().join("data"), "X");
    std::fs::write(&cfg_path, bad).unwrap();
    let api = format!("{}/v1/status", cp.url());
    let deadline = Instant::now() + secs(10);
    let shown = loop {
        let (code, body, _) = graylane_e2e::runtime()
            .block_on(graylane_e2e::fetch(
                &api,
                &[("authorization", format!("Bearer {READ}"))],
            ))
            .unwrap();
        if code == 200 && body.contains("\"config_error\":{") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "config error never shown: {code} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let err = &shown["config_error"];
    assert_eq!(
        err["field"], "services.web.route-strategy.A.status",
        "{err}"
    );
    assert_eq!(
        err["location"],
        serde_json::json!([10, 17]),
        "line, column of the X in `status: X`: {err}"
    );
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant `X`"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(route(&envoy, "2").as_deref(), Some("A"));
    assert_eq!(route(&envoy, "300").as_deref(), Some("B"));
}

/// Requests for tenants 0..1000 in turn from one thread until stopped: (answers by body,
/// failed answers with their status).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(std::collections::BTreeMap<String, usize>, Vec<u16>)>,
}

impl Load {
    fn start(port: u16) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut bodies, mut failed) = (std::collections::BTreeMap::new(), Vec::new());
            let mut tenant = 0u32;
            while !s.load(Ordering::Relaxed) {
                let t = tenant.to_string();
                let (status, body, _) = get(port, "/", &[("x-tenant-id", &t)]);
                if status == 200 {
                    *bodies.entry(body).or_insert(0) += 1;
                } else {
                    failed.push(status);
                }
                tenant = (tenant + 1) % 1000;
            }
            (bodies, failed)
        });
        Load { stop, thread }
    }

    fn stop(self) -> (std::collections::BTreeMap<String, usize>, Vec<u16>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `release status` until its first line shows `state`.
fn wait_release(cp: &ControlPlane, state: &str, within: Duration) -> String {
    let start = Instant::now();
    loop {
        let out = ok(&cp.cli(READ, &["release", "status", "web"]));
        if out
            .lines()
            .next()
            .is_some_and(|l| l.ends_with(&format!("({state})")))
        {
            return out;
        }
        assert!(start.elapsed() < within, "release never {state}:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_gray_upgrade_and_an_aborted_rollback_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    let config = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\ntokens:\n  - {{name: ops, token: {WRITE}, role: write}}\n  - {{name: viewer, token: {READ}, role: read}}\nservices:\n  web:\n    route-strategy:\n      A: {{status: G, id: {{all: true}}}}\n      B: {{status: R, id: {{all: false, ids: [5]}}}}\n",
        dir.path().join("data").display()
    );
    std::fs::write(&cfg_path, config).unwrap();
    let cp = ControlPlane::start(&cfg_path, port);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = json!({"service": "web",
        "control_plane": {"cluster": "graylane_cp", "wait_ms": 5000, "tick_ms": 50}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("A")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 2).unwrap();
    let secs = Duration::from_secs;
    // The filter follows the feed (tenant 5 goes to A by the fallback too: wait for the poll).
    let metrics = format!("{}/metrics", cp.url());
    let start = Instant::now();
    loop {
        let (_, body, _) = graylane_e2e::runtime()
            .block_on(graylane_e2e::fetch::<&str, &str>(&metrics, &[]))
            .unwrap();
        if body.contains("graylane_filters_current{service=\"web\"} 1") {
            break;
        }
        assert!(start.elapsed() < secs(20), "no filter follows web:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Seed 000's gray upgrade: isolate B (Y), tenants 1 and 2, 10 % and 50 % of tenants, all,
    // swap; each step one version, the next only once every filter holds it and a second has
    // passed (so the load sees every step).
    let load = Load::start(envoy.port("ingress"));
    let started = ok(&cp.cli(
        WRITE,
        &[
            "release",
            "start",
            "web",
            "gray-upgrade",
            "--to",
            "B",
            "--ids",
            "1,2",
            "--steps",
            "10,50",
            "--bake",
            "1",
            "--reason",
            "v2",
        ],
    ));
    assert!(
        started.starts_with("release 1 of web: gray-upgrade from A to B ("),
        "{started}"
    );
    let t0 = Instant::now();
    let done = wait_release(&cp, "succeeded", secs(60));
    let (bodies, failed) = load.stop();
    eprintln!("release: {:?} after start; load {bodies:?}", t0.elapsed());
    assert_eq!(
        failed,
        Vec::<u16>::new(),
        "failed requests during the release"
    );
    assert!(bodies.get("A").is_some_and(|n| *n > 0), "{bodies:?}");
    assert!(bodies.get("B").is_some_and(|n| *n > 0), "{bodies:?}");
    for t in ["1", "5", "300", "999"] {
        wait_route(&envoy, t, "B", secs(5));
    }
    assert_eq!(
        done.lines()
            .filter(|l| l.ends_with("converged: the filter holds version 7"))
            .count(),
        1,
        "the swap waited for the filter:\n{done}"
    );
    assert_eq!(
        done.lines()
            .filter(|l| l.ends_with("drained: A had no request for 10 s"))
            .count(),
        1,
        "the swap waited for the filters' reports of A's traffic:\n{done}"
    );
    let history = ok(&cp.cli(READ, &["history"]));
    let by_release = history
        .lines()
        .filter(|l| l.contains("release 1 (ops)"))
        .count();
    assert_eq!(
        by_release, 6,
        "isolate, ids, 10 %, 50 %, all, swap:\n{history}"
    );

    // A rollback to A stopped after its first step (A takes everyone as Y) and aborted: the
    // strategy from before it is back, B serves again.
    let load = Load::start(envoy.port("ingress"));
    ok(&cp.cli(
        WRITE,
        &[
            "release",
            "start",
            "web",
            "rollback",
            "--to",
            "A",
            "--approval",
        ],
    ));
    let waiting = wait_release(&cp, "running", secs(30));
    let start = Instant::now();
    while !ok(&cp.cli(READ, &["release", "status", "web"])).contains("waiting: approval") {
        assert!(start.elapsed() < secs(30), "{waiting}");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_route(&envoy, "300", "A", secs(5));
    let aborted = ok(&cp.cli(WRITE, &["release", "abort", "web", "--why", "5xx on A"]));
    assert!(
        aborted.starts_with(
            "release 2 of web: rollback from B to A (aborted: aborted by ops: 5xx on A)"
        ),
        "{aborted}"
    );
    for t in ["1", "5", "300", "999"] {
        wait_route(&envoy, t, "B", secs(5));
    }
    let (_, failed) = load.stop();
    assert_eq!(
        failed,
        Vec::<u16>::new(),
        "failed requests during the rollback and abort"
    );
}

/// A gray upgrade to a broken version (every answer of B is a 502) with an error gate: the
/// first step that sends B tenants shows it in the traffic reports, and the release aborts by
/// itself, restoring the strategy from before it; afterwards no tenant reaches B.
#[test]
fn the_error_gate_aborts_a_release_to_a_broken_version_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    let config = format!(
        "listen: 127.0.0.1:{port}\ndata_dir: {}\ntokens:\n  - {{name: ops, token: {WRITE}, role: write}}\n  - {{name: viewer, token: {READ}, role: read}}\nservices:\n  web:\n    route-strategy:\n      A: {{status: G, id: {{all: true}}}}\n      B: {{status: R, id: {{all: false}}}}\n",
        dir.path().join("data").display()
    );
    std::fs::write(&cfg_path, config).unwrap();
    let cp = ControlPlane::start(&cfg_path, port);
    // B answers every request with a 502 (it forwards to a port nobody listens on).
    let (a, b) = (
        Upstream::start("A"),
        Upstream::start_forwarding("B", "http://127.0.0.1:9"),
    );
    let plugin = json!({"service": "web", "control_plane": {"cluster": "graylane_cp",
        "wait_ms": 5000, "tick_ms": 50, "report_ms": 200}});
    let envoy_cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .fallback("A")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&envoy_cfg, 2).unwrap();
    let secs = Duration::from_secs;
    let load = Load::start(envoy.port("ingress"));
    ok(&cp.cli(
        WRITE,
        &[
            "release",
            "start",
            "web",
            "gray-upgrade",
            "--to",
            "B",
            "--steps",
            "50",
            "--bake",
            "5",
            "--max-error-percent",
            "5",
        ],
    ));
    let start = Instant::now();
    let aborted = loop {
        let out = ok(&cp.cli(READ, &["release", "status", "web"]));
        if out.lines().next().is_some_and(|l| l.contains("(aborted: ")) {
            break out;
        }
        assert!(start.elapsed() < secs(40), "release never aborted:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (bodies, failed) = load.stop();
    assert!(
        !aborted.lines().any(|l| l.starts_with("waiting:")),
        "{aborted}"
    );
    let first = aborted.lines().next().unwrap();
    assert!(
        first.starts_with(
            "release 1 of web: gray-upgrade from A to B (aborted: aborted by the error gate: "
        ),
        "{aborted}"
    );
    assert!(
        first.contains(" requests to B failed in the last 10 s ("),
        "{first}"
    );
    // Tenants did reach B (that is what the gate saw), then every one is back on A.
    assert!(
        failed.iter().all(|s| *s == 502) && !failed.is_empty(),
        "{failed:?}"
    );
    assert!(bodies.get("A").is_some_and(|n| *n > 0), "{bodies:?}");
    for t in ["1", "5", "300", "999"] {
        wait_route(&envoy, t, "A", secs(5));
    }
    let status = ok(&cp.cli(READ, &["status"]));
    let rows: Vec<Vec<&str>> = status
        .lines()
        .filter(|l| l.trim_start().starts_with("web"))
        .map(|l| l.split_whitespace().take(4).collect())
        .collect();
    assert_eq!(
        rows,
        vec![vec!["web", "A", "A", "G"], vec!["web", "B", "B", "R"]],
        "the strategy from before the release: {status}"
    );
}

/// Per cluster of `web`: (requests, [2xx, 3xx, 4xx, 5xx, none]) since the control plane
/// started, over every node; and per node.
type Totals = std::collections::BTreeMap<String, (u64, [u64; 5])>;

fn totals(t: &graylane_control_plane::api::types::Traffic) -> (Totals, Totals) {
    let classes = |r: &graylane_control_plane::api::types::ResponseClasses| {
        [r.c2xx, r.c3xx, r.c4xx, r.c5xx, r.none]
    };
    let all = t
        .clusters
        .iter()
        .map(|c| {
            (
                c.cluster.clone(),
                (c.total.requests, classes(&c.total.responses)),
            )
        })
        .collect();
    let per_node = t
        .nodes
        .iter()
        .flat_map(|n| {
            n.clusters.iter().map(move |c| {
                (
                    format!("{}/{}", n.node, c.cluster),
                    (c.requests, classes(&c.responses)),
                )
            })
        })
        .collect();
    (all, per_node)
}

/// Issue 11: every filter reports what it saw; the control plane's totals per cluster and
/// response class equal exactly what was sent through two Envoys of two workers each (200s,
/// 503s and 404s from the backends, connections reset by a backend); a stopped Envoy is shown
/// stale and its counts are kept.
#[test]
fn traffic_reports_add_up_exactly_over_two_envoys_and_a_stopped_one_is_shown_stale() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config(port, &dir.path().join("data"), "Y")).unwrap();
    let cp = ControlPlane::start(&cfg_path, port);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = json!({"service": "web", "control_plane": {"cluster": "graylane_cp",
        "wait_ms": 5000, "tick_ms": 50, "report_ms": 200}});
    let envoy = |node: &str| {
        let cfg = EnvoyConfig::new()
            .graylane(&plugin)
            .node_id(node)
            .fallback("B")
            .cluster("A", a.port())
            .cluster("B", b.port())
            .cluster("graylane_cp", port)
            .render();
        Envoy::start(&cfg, 2).unwrap()
    };
    let (e1, e2) = (envoy("edge-1"), envoy("edge-2"));
    let secs = Duration::from_secs;
    wait_route(&e1, "2", "A", secs(20));
    wait_route(&e2, "2", "A", secs(20));

    let client = graylane_control_plane::client::Client::new(&cp.url(), Some(READ.into())).unwrap();
    let read = || {
        graylane_e2e::runtime()
            .block_on(client.traffic("web"))
            .unwrap()
    };
    // What the warm-up sent, once every report of it has arrived (unchanged for 3 reports).
    let mut base = totals(&read());
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = totals(&read());
        if now == base {
            break;
        }
        base = now;
    }

    // Tenant 2 goes to A, tenant 300 to B. Each (envoy, tenant, path, count, class).
    let plan: [(&Envoy, &str, &str, u64, usize); 6] = [
        (&e1, "2", "/", 30, 0),
        (&e1, "2", "/status/503", 7, 3),
        (&e1, "300", "/reset", 5, 4),
        (&e1, "300", "/", 20, 0),
        (&e2, "300", "/", 11, 0),
        (&e2, "2", "/status/404", 4, 2),
    ];
    let (mut want, mut want_nodes) = base.clone();
    for (envoy, tenant, path, n, class) in plan {
        let replies = graylane_e2e::get_all(
            envoy.port("ingress"),
            (0..n)
                .map(|_| graylane_e2e::Req::new(path).header("x-tenant-id", tenant))
                .collect(),
        );
        assert_eq!(replies.len() as u64, n);
        let cluster = if tenant == "2" { "A" } else { "B" };
        let node = if std::ptr::eq(envoy, &e1) {
            "edge-1"
        } else {
            "edge-2"
        };
        for m in [
            want.entry(cluster.to_string()).or_default(),
            want_nodes.entry(format!("{node}/{cluster}")).or_default(),
        ] {
            m.0 += n;
            m.1[class] += n;
        }
    }
    let start = Instant::now();
    while totals(&read()) != (want.clone(), want_nodes.clone()) {
        assert!(
            start.elapsed() < secs(10),
            "totals never added up: want {want:?} {want_nodes:?}, got {:?}",
            totals(&read())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing is counted twice: reports keep coming (cumulative), the totals stay.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(totals(&read()), (want.clone(), want_nodes.clone()));
    assert_eq!(want["A"].1[3], 7, "503s answered by A's backend");
    assert_eq!(want["B"].1[4], 5, "resets: no response");

    // /metrics carries the same counts, labelled by service, cluster and class.
    let (_, metrics, _) = graylane_e2e::runtime()
        .block_on(graylane_e2e::fetch::<&str, &str>(
            &format!("{}/metrics", cp.url()),
            &[],
        ))
        .unwrap();
    for (cluster, class, n) in [("A", "5xx", 7), ("A", "4xx", 4), ("B", "none", 5)] {
        let line = format!(
            "graylane_traffic_responses_total{{service=\"web\",cluster=\"{cluster}\",class=\"{class}\"}} {n}"
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }

    // graylane top --once: one row per cluster, with the state and the filters.
    let top = ok(&cp.cli(READ, &["top", "--once"]));
    let rows: Vec<Vec<&str>> = top
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(
        rows,
        vec![vec!["web", "A", "Y"], vec!["web", "B", "G"]],
        "{top}"
    );

    // edge-2 stops: shown stale, its counts kept in the totals.
    drop(e2);
    let start = Instant::now();
    loop {
        let t = read();
        let stale: Vec<(&str, bool)> = t.nodes.iter().map(|n| (n.node.as_str(), n.stale)).collect();
        if stale == [("edge-1", false), ("edge-2", true)] {
            assert_eq!(t.stale_nodes, 1);
            assert_eq!(totals(&t), (want.clone(), want_nodes.clone()));
            break;
        }
        assert!(
            start.elapsed() < secs(15),
            "edge-2 never shown stale: {stale:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = ok(&cp.cli(READ, &["traffic", "web"]));
    assert!(
        shown
            .lines()
            .any(|l| l.trim_start().starts_with("edge-2") && l.contains("STALE")),
        "{shown}"
    );
}

/// Issue 11, part 2: a preview over a known set of tenants predicts exactly the moves that
/// applying the candidate then makes (same tenants, same counts), and routes nothing
/// differently while it runs. An invalid candidate is refused naming the field; an edit with
/// `--dry-run` makes no version.
#[test]
fn a_preview_predicts_exactly_the_moves_that_applying_it_makes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg_path = dir.path().join("graylane.yaml");
    std::fs::write(&cfg_path, config(port, &dir.path().join("data"), "Y")).unwrap();
    let cp = ControlPlane::start(&cfg_path, port);
    let (a, b) = (Upstream::start("A"), Upstream::start("B"));
    let plugin = json!({"service": "web", "control_plane": {"cluster": "graylane_cp",
        "wait_ms": 5000, "tick_ms": 50, "report_ms": 200}});
    let cfg = EnvoyConfig::new()
        .graylane(&plugin)
        .node_id("edge-1")
        .fallback("B")
        .cluster("A", a.port())
        .cluster("B", b.port())
        .cluster("graylane_cp", port)
        .render();
    let envoy = Envoy::start(&cfg, 2).unwrap();
    let secs = Duration::from_secs;
    wait_route(&envoy, "2", "A", secs(20));

    // Live: A (Y) has 1..=100 and 600..=10000, B is G. The candidate adds 101..=110 to A.
    let candidate = dir.path().join("candidate.yaml");
    let write_candidate = |interval: &str| {
        std::fs::write(
            &candidate,
            format!(
                "route-strategy:\n  A: {{status: Y, id: {{ids: [1, 2, 3], interval: [[1, 100], {interval}, [600, 10000]]}}}}\n  B: {{status: G, id: {{all: true}}}}\n"
            ),
        )
        .unwrap()
    };
    write_candidate("[120, 110]");
    let path = candidate.to_str().unwrap();
    let refused = cp.cli(WRITE, &["preview", "web", "--file", path]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("route-strategy.A.id.interval[1]"), "{err}");
    write_candidate("[101, 110]");
    let started = ok(&cp.cli(WRITE, &["preview", "web", "--file", path, "--why", "e2e"]));
    assert!(started.contains("  web.A: intervals"), "{started}");

    let client = graylane_control_plane::client::Client::new(&cp.url(), Some(READ.into())).unwrap();
    let view = || {
        graylane_e2e::runtime()
            .block_on(client.preview("web"))
            .unwrap()
    };
    // Every worker holds the preview once probes (tenant 5000: A -> A) are counted by both.
    let probe = || {
        graylane_e2e::get_all(
            envoy.port("ingress"),
            (0..16)
                .map(|_| graylane_e2e::Req::new("/").header("x-tenant-id", "5000"))
                .collect(),
        )
    };
    let start = Instant::now();
    while view().requests == 0 {
        assert!(
            start.elapsed() < secs(10),
            "no worker evaluated the preview"
        );
        probe();
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500)); // the other worker: woken in milliseconds
                                                    // The counts before the measured requests, once every report has arrived.
    let pairs = |v: &graylane_control_plane::preview::View| -> Vec<(String, String, u64, u64)> {
        v.pairs
            .iter()
            .map(|p| {
                (
                    p.from.clone().unwrap_or_default(),
                    p.to.clone().unwrap_or_default(),
                    p.requests,
                    p.tenants,
                )
            })
            .collect()
    };
    let mut base = pairs(&view());
    loop {
        std::thread::sleep(Duration::from_millis(700));
        let now = pairs(&view());
        if now == base {
            break;
        }
        base = now;
    }
    let probes = base
        .iter()
        .find(|p| p.0 == "A" && p.1 == "A")
        .map_or(0, |p| p.2);

    // Tenants 90..=119, four requests each: 90..=100 stay on A, 101..=110 would move from B to
    // A, 111..=119 stay on B.
    let tenants: Vec<u32> = (90..=119).collect();
    let send = || -> std::collections::BTreeMap<u32, String> {
        let replies = graylane_e2e::get_all(
            envoy.port("ingress"),
            tenants
                .iter()
                .flat_map(|t| {
                    (0..4).map(move |_| {
                        graylane_e2e::Req::new("/").header("x-tenant-id", t.to_string())
                    })
                })
                .collect(),
        );
        let mut by_tenant = std::collections::BTreeMap::new();
        for (i, (status, body, _)) in replies.iter().enumerate() {
            assert_eq!(*status, 200, "{body}");
            let t = tenants[i / 4];
            let prev = by_tenant.insert(t, body.clone());
            assert!(
                prev.is_none_or(|p| &p == body),
                "tenant {t} went to two clusters"
            );
        }
        by_tenant
    };
    let before = send();
    // The preview routed nothing differently: the live strategy's answers.
    for (t, cluster) in &before {
        let live = if *t <= 100 { "A" } else { "B" };
        assert_eq!(cluster, live, "tenant {t} during the preview");
    }
    let want = vec![
        ("B".to_string(), "A".to_string(), 40, 10),
        ("A".to_string(), "A".to_string(), probes + 44, 0),
        ("B".to_string(), "B".to_string(), 36, 0),
    ];
    let start = Instant::now();
    while pairs(&view()) != want {
        assert!(
            start.elapsed() < secs(10),
            "the preview never added up: want {want:?}, got {:?}",
            pairs(&view())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let v = view();
    let predicted: Vec<String> = v.pairs[0].examples.clone();
    assert_eq!(
        predicted,
        (101..=110).map(|t| t.to_string()).collect::<Vec<_>>()
    );
    assert!(v.pairs[0].tenants_exact);
    assert_eq!(v.nodes, 1);
    let expected_tail = "40 (";
    assert!(
        v.summary.contains(expected_tail)
            && v.summary
                .ends_with(" would move B -> A, from 10 tenants; none would move to an R cluster"),
        "{}",
        v.summary
    );
    let shown = ok(&cp.cli(READ, &["preview", "web"]));
    assert!(shown.contains(&v.summary), "{shown}");

    // Applied: the same requests now go where the preview said, and nowhere else.
    let applied = ok(&cp.cli(WRITE, &["preview", "web", "apply"]));
    assert!(applied.contains("applied as version 2 by ops"), "{applied}");
    wait_route(&envoy, "105", "A", secs(10));
    let after = send();
    let moved: Vec<String> = tenants
        .iter()
        .filter(|t| before[t] != after[t])
        .map(|t| {
            assert_eq!(
                (before[t].as_str(), after[t].as_str()),
                ("B", "A"),
                "tenant {t}"
            );
            t.to_string()
        })
        .collect();
    assert_eq!(
        moved, predicted,
        "the tenants that moved are the ones predicted"
    );
    assert_eq!(moved.len() * 4, 40, "and as many requests");

    // --dry-run: a preview of the edit, no version.
    let dry = ok(&cp.cli(WRITE, &["--dry-run", "set-state", "web", "A", "G"]));
    assert!(dry.contains("web.A: status Y -> G"), "{dry}");
    let status = ok(&cp.cli(READ, &["status"]));
    assert!(status.starts_with("version 2\n"), "{status}");
    let discarded = ok(&cp.cli(WRITE, &["preview", "web", "discard"]));
    assert!(discarded.contains("discarded by ops"), "{discarded}");
}
