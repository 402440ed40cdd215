//! Crash safety: the real `graylane serve` takes writes through the API and is killed with
//! SIGKILL at random moments; after each restart every acknowledged version is there, with
//! its content, and history is contiguous.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TOKEN: &str = "crash-test-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The daemon; SIGKILLed and reaped on drop.
struct Daemon(Child);

impl Daemon {
    fn kill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(config: &std::path::Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_graylane"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(child)
}

async fn wait_up(client: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("graylane serve did not come up");
}

/// A tiny deterministic generator (no dependency, reproducible rounds).
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_version() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("graylane.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: data\ntokens: [{{name: crash, token: {TOKEN}, role: write}}]\n\
             services:\n  web:\n    route-strategy:\n      A: {{status: Y, id: {{ids: [1]}}}}\n      B: {{status: G, id: {{all: true}}}}\n"
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut acked: Vec<(u64, u64)> = Vec::new(); // (version, id added)
    let mut seed = 0x5eed_u64;
    let mut id = 1_000u64;
    for round in 0..6 {
        let mut child = spawn(&config);
        wait_up(&client, &base).await;
        // Everything acknowledged before is still there.
        check(&client, &base, &acked).await;
        let kill_after = Duration::from_millis(50 + next(&mut seed) % 400);
        let start = Instant::now();
        let mut killed = false;
        while !killed {
            id += 1;
            let write = client
                .post(format!("{base}/v1/services/web/clusters/A/whitelist/add"))
                .bearer_auth(TOKEN)
                .json(&json!({"ids": [id]}))
                .send();
            tokio::select! {
                r = write => {
                    if let Ok(r) = r {
                        if r.status().is_success() {
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            if let Some(ver) = v["version"].as_u64() {
                                acked.push((ver, id));
                            }
                        }
                    }
                }
                () = tokio::time::sleep(kill_after.saturating_sub(start.elapsed())) => {
                    child.kill(); // possibly mid-write
                    killed = true;
                }
            }
            if !killed && start.elapsed() >= kill_after {
                child.kill();
                killed = true;
            }
        }
        eprintln!(
            "round {round}: {} versions acknowledged so far",
            acked.len()
        );
    }
    let mut child = spawn(&config);
    wait_up(&client, &base).await;
    check(&client, &base, &acked).await;
    child.kill();
    assert!(
        acked.len() >= 6,
        "too few writes to mean anything: {}",
        acked.len()
    );
}

async fn check(client: &reqwest::Client, base: &str, acked: &[(u64, u64)]) {
    let hist: Value = client
        .get(format!("{base}/v1/history?limit=100000"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<u64> = hist["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_u64().unwrap())
        .collect();
    // Contiguous history from 1 to the latest.
    let latest = versions.first().copied().unwrap_or(0);
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=latest).collect::<Vec<_>>(), "history has gaps");
    for (v, _) in acked {
        assert!(
            *v <= latest,
            "acknowledged version {v} lost (latest {latest})"
        );
    }
    // The content of every acknowledged write is in force.
    let svc: Value = client
        .get(format!("{base}/v1/services/web"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<u64> = svc["strategy"]["route-strategy"]["A"]["id"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    for (v, id) in acked {
        assert!(
            ids.binary_search(id).is_ok(),
            "id {id} acknowledged in version {v} is missing"
        );
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Option<Value> {
    let r = client.get(url).bearer_auth(TOKEN).send().await.ok()?;
    r.json().await.ok()
}

/// A gray upgrade (7 steps, 1 s of bake each) while the daemon is SIGKILLed at random
/// moments, again and again: after each restart the release resumes where it was, and when it
/// has succeeded every step made exactly one version (none repeated, none skipped), in order,
/// ending with A R and B G.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_mid_release_resumes_without_repeating_a_step() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("graylane.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: data\ntokens: [{{name: ops, token: {TOKEN}, role: write}}]\n\
             services:\n  web:\n    route-strategy:\n      A: {{status: G, id: {{all: true}}}}\n      B: {{status: R, id: {{all: false}}}}\n"
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut child = spawn(&config);
    wait_up(&client, &base).await;
    let started = client
        .post(format!("{base}/v1/services/web/releases"))
        .bearer_auth(TOKEN)
        .json(&json!({"procedure": "gray-upgrade", "to": "B", "gates": {"bake_secs": 1}}))
        .send()
        .await
        .unwrap();
    assert!(started.status().is_success(), "{:?}", started.text().await);
    let mut seed = 0xdead_beef_u64;
    let mut kills = 0;
    let state = loop {
        // Let it run a little, then SIGKILL it, possibly between a version and the release's
        // own save; restart.
        tokio::time::sleep(Duration::from_millis(next(&mut seed) % 1_200)).await;
        child.kill();
        kills += 1;
        child = spawn(&config);
        wait_up(&client, &base).await;
        let r = get_json(&client, &format!("{base}/v1/services/web/release"))
            .await
            .unwrap();
        let state = r["status"]["state"].as_str().unwrap_or("").to_string();
        eprintln!(
            "kill {kills}: at {} {} {}",
            r["at"], r["phase"], r["waiting"]
        );
        if state != "running" || kills >= 100 {
            break state;
        }
    };
    assert_eq!(state, "succeeded", "after {kills} kills");
    assert!(kills >= 3, "the release outran the kills ({kills})");
    eprintln!("release succeeded across {kills} SIGKILLs");
    let ops = get_json(&client, &format!("{base}/v1/operations?limit=1000"))
        .await
        .unwrap();
    let mut steps: Vec<(String, u64)> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["what"].as_str().unwrap().starts_with("release 1 step "))
        .filter_map(|o| {
            let v = o["version_after"].as_u64()?;
            let what = o["what"].as_str().unwrap();
            Some((what.split(':').next().unwrap().to_string(), v))
        })
        .collect();
    steps.sort_by_key(|(_, v)| *v);
    let names: Vec<&str> = steps.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(
        names,
        (1..=7)
            .map(|i| format!("release 1 step {i}/7"))
            .collect::<Vec<_>>(),
        "one version per step, in order: {steps:?}"
    );
    let svc = get_json(&client, &format!("{base}/v1/services/web"))
        .await
        .unwrap();
    let rs = &svc["strategy"]["route-strategy"];
    assert_eq!(
        (rs["A"]["status"].as_str(), rs["B"]["status"].as_str()),
        (Some("R"), Some("G"))
    );
    child.kill();
}
