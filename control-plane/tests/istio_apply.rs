//! `istio: {apply: true}`: the control plane (a real `serve::run`) applies each service's
//! DestinationRule and VirtualService to the fake Kubernetes API server
//! (`graylane_e2e::fakes::kube`) by server-side apply, through the real `kube::Client`:
//! once at start, what `graylane render istio` prints for the same options; after a swap of
//! the stable cluster exactly one new VirtualService whose default route goes to the new
//! stable subset; nothing for a version whose render is unchanged; every applied body valid
//! against Istio's schemas (scripts/validate_manifests.py, the validator of `make
//! validate-manifests`); an API server error retried until it succeeds, counted in /metrics
//! and shown by `graylane status` meanwhile; after a restart, each object sent once again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use graylane_control_plane::api::types::{IstioRoutes, Status, WhitelistChange};
use graylane_control_plane::cli::Cli;
use graylane_control_plane::client::Client;
use graylane_control_plane::release::{Action, Procedure, Status as ReleaseStatus};
use graylane_control_plane::serve::Loaded;
use graylane_e2e::fakes::kube::{ApiServer, Applied};
use graylane_strategy::id::IdList;
use graylane_strategy::{State, StrategySpec};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "write-token-0123";

const CONFIG: &str = "tokens: [{name: ops, token: write-token-0123, role: write}]
data_dir: data
istio:
  apply: true
  namespace: shop
  port: 8080
  services:
    web:
      profiles: {A: v1, B: v2}
      gateways: [istio-system/shop]
      hosts: [shop.example.com]
services:
  web:
    route-strategy:
      A: {status: G, id: {all: true}}
      B: {status: R, id: {ids: [1, 2, 3]}}
  api:
    route-strategy:
      prod: {status: G, cluster: 'outbound|8080||api.prod.svc.cluster.local', id: {all: true}}
      gray: {status: Y, cluster: 'outbound|8080||api.gray.svc.cluster.local', id: {ids: [7]}}
";

/// What `graylane render istio` prints for `args` (one implementation: the task's objects
/// must be these documents), without the header-hygiene EnvoyFilter (not the task's).
async fn rendered(args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["graylane", "render", "istio", "--no-header-hygiene"];
    argv.extend_from_slice(args);
    let out = graylane_control_plane::cli::run(Cli::try_parse_from(argv).unwrap())
        .await
        .unwrap();
    out.split("---\n")
        .filter(|d| {
            d.lines()
                .any(|l| !l.starts_with('#') && !l.trim().is_empty())
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap())
        .collect()
}

/// Waits for the status's Istio routes to satisfy `pred`; returns the status. The bound (60 s)
/// is past the longest retry backoff (30 s) of a loaded machine's slow run.
async fn wait_status(c: &Client, what: &str, pred: impl Fn(&[IstioRoutes]) -> bool) -> Status {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.status().await.unwrap();
        if pred(s.istio.as_deref().unwrap_or_default()) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            s.istio
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `web`'s release to satisfy `pred`; returns web's strategy version then.
async fn wait_release(
    c: &Client,
    what: &str,
    pred: impl Fn(&graylane_control_plane::release::Release) -> bool,
) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = c.release("web").await.unwrap();
        if pred(&r) {
            return c.service("web").await.unwrap().version;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn routes<'a>(routes: &'a [IstioRoutes], service: &str) -> &'a IstioRoutes {
    routes.iter().find(|r| r.service == service).unwrap()
}

/// In step: every object of its current version applied, no error.
fn in_step(r: &[IstioRoutes], service: &str, version: u64) -> bool {
    r.iter().any(|x| {
        x.service == service
            && x.version == version
            && x.applied_version == Some(version)
            && x.error.is_none()
    })
}

fn ok(applied: &[Applied]) -> Vec<&Applied> {
    applied.iter().filter(|a| a.status < 300).collect()
}

/// The VirtualService's default route: the http route without a match.
fn default_route(vs: &Value) -> Vec<(String, Option<String>)> {
    let http = vs["spec"]["http"].as_array().unwrap();
    let default: Vec<&Value> = http.iter().filter(|r| r.get("match").is_none()).collect();
    assert_eq!(default.len(), 1, "{vs}");
    assert_eq!(
        default[0],
        http.last().unwrap(),
        "the default route is last"
    );
    default[0]["route"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["destination"]["host"].as_str().unwrap().to_string(),
                d["destination"]["subset"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_applies_the_istio_routes_of_every_version_by_server_side_apply() {
    let (fake, kube) = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("graylane.yaml");
    std::fs::write(&path, CONFIG).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(graylane_control_plane::serve::run(
        listener,
        None,
        Loaded::read(&path).unwrap(),
        Some(kube.clone()),
        stop.clone(),
    ));
    let c = Client::new(&base, Some(TOKEN.into())).unwrap();

    // At start: web's DestinationRule and VirtualService, api's VirtualService (one host per
    // namespace: no subsets, no DestinationRule), each created once.
    let s = wait_status(&c, "both services applied at start", |r| {
        r.len() == 2 && r.iter().all(|x| x.applied_version == Some(x.version))
    })
    .await;
    let start = s.version;
    let applied = fake.applied();
    let mut objects: Vec<(&str, &str, &str, u16)> = applied
        .iter()
        .map(|a| {
            (
                a.resource.as_str(),
                a.namespace.as_str(),
                a.name.as_str(),
                a.status,
            )
        })
        .collect();
    objects.sort();
    assert_eq!(
        objects,
        [
            ("destinationrules", "shop", "graylane-web", 201),
            ("virtualservices", "gray", "graylane-api", 201),
            ("virtualservices", "shop", "graylane-web", 201),
        ]
    );
    for a in &applied {
        assert_eq!(a.content_type, "application/apply-patch+yaml");
        assert_eq!(a.field_manager.as_deref(), Some("graylane"));
        assert!(a.force, "forced: graylane owns these fields");
    }
    let istio = s.istio.unwrap();
    assert_eq!(routes(&istio, "web").objects_applied, 2);
    assert_eq!(routes(&istio, "api").objects_applied, 1);
    assert_eq!(routes(&istio, "web").failures, 0);
    // The same documents `graylane render istio --config` prints from the same file (its
    // `istio:` options): what GitOps would commit is what the control plane applies.
    let config = path.display().to_string();
    let want = rendered(&["--config", &config]).await;
    let body = |res: &str, ns: &str, name: &str| {
        applied
            .iter()
            .find(|a| a.resource == res && a.namespace == ns && a.name == name)
            .unwrap()
            .body
            .clone()
    };
    assert_eq!(
        vec![
            body("virtualservices", "gray", "graylane-api"),
            body("destinationrules", "shop", "graylane-web"),
            body("virtualservices", "shop", "graylane-web"),
        ],
        want
    );
    assert_eq!(
        default_route(&body("virtualservices", "shop", "graylane-web")),
        [("web.shop.svc.cluster.local".to_string(), Some("v1".into()))]
    );

    // A release (blue-green switch, approval between its steps) swaps the stable cluster from
    // A to B. Its first version isolates B as Y: one new VirtualService with a route to B, the
    // default route still on A.
    let mut start_switch =
        graylane_control_plane::release::Start::new(Procedure::Switch, "B", "istio.apply test");
    start_switch.gates.approval = Some(true);
    c.start_release("web", &start_switch).await.unwrap();
    let isolated = wait_release(&c, "the isolate step", |r| r.at == 1).await;
    assert!(isolated > start);
    wait_status(&c, "the isolate step applied", |r| {
        in_step(r, "web", isolated)
    })
    .await;
    let applied = fake.applied();
    assert_eq!(applied.len(), 4, "{applied:#?}");
    let iso = &applied[3];
    assert_eq!(
        (iso.resource.as_str(), iso.name.as_str(), iso.status),
        ("virtualservices", "graylane-web", 200)
    );
    assert_eq!(
        default_route(&iso.body),
        [("web.shop.svc.cluster.local".to_string(), Some("v1".into()))]
    );
    assert_eq!(
        iso.body["spec"]["http"].as_array().unwrap().len(),
        3,
        "B, A, default"
    );

    // Its swap (A R, B G, one version): exactly one new VirtualService, whose default route
    // goes to B's subset; the DestinationRule (same subsets) is not sent.
    c.release_action("web", Action::Approve, "go")
        .await
        .unwrap();
    let swapped = wait_release(&c, "the swap", |r| r.status == ReleaseStatus::Succeeded).await;
    assert!(swapped > isolated);
    wait_status(&c, "the swap applied", |r| in_step(r, "web", swapped)).await;
    let applied = fake.applied();
    assert_eq!(applied.len(), 5, "{applied:#?}");
    let new = &applied[4];
    assert_eq!(
        (
            new.resource.as_str(),
            new.namespace.as_str(),
            new.name.as_str()
        ),
        ("virtualservices", "shop", "graylane-web")
    );
    assert_eq!(new.status, 200, "an update of the object created at start");
    assert_eq!(
        default_route(&new.body),
        [("web.shop.svc.cluster.local".to_string(), Some("v2".into()))]
    );
    // A is R: no route may send to it any more.
    assert!(
        !new.body.to_string().contains("\"v1\""),
        "A's subset is gone from the routes: {}",
        new.body
    );
    assert_eq!(
        fake.istio_object("virtualservices", "shop", "graylane-web")
            .unwrap()["spec"],
        new.body["spec"]
    );

    // A version whose render is unchanged (a whitelist edit) applies nothing.
    let edit = WhitelistChange {
        ids: IdList {
            nums: vec![8].into(),
            strs: Vec::new(),
        },
        ..WhitelistChange::default()
    };
    let edited = c
        .whitelist("api", "gray", true, &edit)
        .await
        .unwrap()
        .version;
    assert!(edited > swapped);
    let s = wait_status(&c, "the whitelist edit seen", |r| in_step(r, "api", edited)).await;
    assert_eq!(
        fake.applied().len(),
        5,
        "nothing applied for an unchanged render"
    );
    assert_eq!(
        routes(s.istio.as_deref().unwrap(), "api").objects_applied,
        1
    );

    // Every applied body is valid against Istio's schemas.
    let bodies: Vec<Value> = ok(&fake.applied()).iter().map(|a| a.body.clone()).collect();
    let file = dir.path().join("applied.yaml");
    let text: String = bodies
        .iter()
        .map(|b| format!("---\n{}\n", serde_json::to_string_pretty(b).unwrap()))
        .collect();
    std::fs::write(&file, text).unwrap();
    let python = root().join(".tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup (it installs the manifest validators)",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(root().join("scripts/validate_manifests.py"))
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("5 passed, 0 failed (5 documents;"),
        "{stdout}"
    );

    // The API server fails: the service shows the error and is retried with backoff until
    // the API server answers again; the writer and the other service are not held up.
    fake.fail_applies(usize::MAX);
    let mut web: StrategySpec = c.service("web").await.unwrap().strategy;
    web.clusters.get_mut("A").unwrap().status = State::G;
    web.clusters.get_mut("B").unwrap().status = State::R;
    let back = c.replace("web", &web).await.unwrap().version;
    let s = wait_status(&c, "the failure shown", |r| {
        let w = routes(r, "web");
        w.version == back && w.error.is_some()
    })
    .await;
    let w = routes(s.istio.as_deref().unwrap(), "web");
    assert_eq!(
        w.applied_version,
        Some(swapped),
        "the last good version stays"
    );
    let e = w.error.as_deref().unwrap();
    assert!(
        e.contains(
            "VirtualService shop/graylane-web: 500 InternalError: etcdserver: request timed out"
        ),
        "{e}"
    );
    let status_cli = graylane_control_plane::cli::run(
        Cli::try_parse_from(["graylane", "--server", &base, "--token", TOKEN, "status"]).unwrap(),
    )
    .await
    .unwrap();
    let line = status_cli
        .lines()
        .find(|l| l.starts_with("istio routes web:"))
        .unwrap();
    assert!(
        line.contains(&format!("version {back}, applied version {swapped}"))
            && line.contains("FAILING")
            && line.contains("etcdserver: request timed out"),
        "{status_cli}"
    );
    // The writer still writes meanwhile, and the other service is applied as usual.
    let edited = c
        .whitelist(
            "api",
            "gray",
            true,
            &WhitelistChange {
                ids: IdList {
                    nums: vec![9].into(),
                    strs: Vec::new(),
                },
                ..WhitelistChange::default()
            },
        )
        .await
        .unwrap()
        .version;
    wait_status(&c, "api in step during web's failures", |r| {
        in_step(r, "api", edited)
    })
    .await;
    fake.fail_applies(0);
    let s = wait_status(&c, "the retry succeeded", |r| in_step(r, "web", back)).await;
    let applied = fake.applied();
    let failed = applied.iter().filter(|a| a.status == 500).count();
    assert!(failed >= 1);
    let good = ok(&applied);
    assert_eq!(
        good.len(),
        6,
        "one more VirtualService once the API server answers"
    );
    assert_eq!(
        default_route(&good[5].body),
        [("web.shop.svc.cluster.local".to_string(), Some("v1".into()))]
    );
    let w = routes(s.istio.as_deref().unwrap(), "web");
    assert_eq!(w.failures, failed as u64, "every failed request counted");
    assert_eq!(w.objects_applied, 5);
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        format!("graylane_istio_apply_errors_total{{service=\"web\"}} {failed}"),
        "graylane_istio_applied_total{service=\"web\"} 5".to_string(),
        "graylane_istio_applied_total{service=\"api\"} 1".to_string(),
        format!("graylane_istio_applied_version{{service=\"web\"}} {back}"),
    ] {
        assert!(metrics.contains(&want), "{want} not in\n{metrics}");
    }
    assert!(!metrics.contains("graylane_istio_apply_errors_total{service=\"api\"}"));
    stop.cancel();
    server.await.unwrap().unwrap();

    // A restart (same store) applies each object once again: it does not know what the
    // cluster holds, and server-side apply of the same body changes nothing there.
    let before = fake.applied().len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let server = tokio::spawn(graylane_control_plane::serve::run(
        listener,
        None,
        Loaded::read(&path).unwrap(),
        Some(kube),
        stop.clone(),
    ));
    let c = Client::new(&base, Some(TOKEN.into())).unwrap();
    wait_status(&c, "both services applied after the restart", |r| {
        r.len() == 2 && r.iter().all(|x| x.applied_version == Some(x.version))
    })
    .await;
    let again: Vec<(String, String, String, u16)> = fake.applied()[before..]
        .iter()
        .map(|a| {
            (
                a.resource.clone(),
                a.namespace.clone(),
                a.name.clone(),
                a.status,
            )
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(fake.applied().len(), before + 3);
    assert_eq!(
        again,
        [
            (
                "destinationrules".into(),
                "shop".into(),
                "graylane-web".into(),
                200
            ),
            (
                "virtualservices".into(),
                "gray".into(),
                "graylane-api".into(),
                200
            ),
            (
                "virtualservices".into(),
                "shop".into(),
                "graylane-web".into(),
                200
            ),
        ]
    );
    stop.cancel();
    server.await.unwrap().unwrap();
}
