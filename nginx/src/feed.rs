//! The control plane's live feed, followed by a thread of its own in each nginx worker: a
//! blocking long-poll (`GET /v1/feed/<service>?version=V&health=H&wait_ms=W&endpoints=true`)
//! whose answers replace the router's snapshot. A failed or invalid answer keeps the last
//! good snapshot and backs off; the request path never waits for the feed.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use graylane_strategy::spec::parse_json_reader_as;
use graylane_strategy::StrategySpec;
use serde::Deserialize;

use crate::config::ControlPlane;
use crate::router::Router;

/// A feed answer that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("feed answer: {0}")]
    Parse(#[source] graylane_strategy::Error),
    #[error("feed answer: {0}")]
    Rejected(String),
}

/// One endpoint as the feed lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
}

/// A 200 answer of the feed (the same fields the Proxy-Wasm filter reads, plus the endpoints
/// this library asks for).
#[derive(Debug, Deserialize)]
pub struct Reply {
    pub service: String,
    pub version: u64,
    pub health: u64,
    /// The strategy, or `null` when only health or endpoints moved.
    #[serde(default)]
    pub strategy: Option<StrategySpec>,
    /// Healthy endpoint count per cluster key; `null` is unknown.
    #[serde(default)]
    pub healthy: BTreeMap<String, Option<u32>>,
    /// Endpoints per cluster key, when the control plane knows them.
    #[serde(default)]
    pub endpoints: Option<BTreeMap<String, Vec<Endpoint>>>,
}

impl Reply {
    /// Parses an answer as it is read (a million-id strategy is never held as text whole).
    pub fn read(body: impl Read) -> Result<Reply, Error> {
        parse_json_reader_as(std::io::BufReader::with_capacity(64 * 1024, body))
            .map_err(Error::Parse)
    }
}

/// What one poll brought.
enum Polled {
    Changed(Box<Reply>),
    NotModified,
}

/// The longest pause between two failed polls.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(200);

/// Follows the feed until the router is closed. Runs in its own thread.
pub fn follow(router: Arc<Router>, cp: ControlPlane) {
    // Hold a little longer than the control plane may hold the poll.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(cp.wait + Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let node = format!("nginx-{}", std::process::id());
    let mut backoff = Duration::ZERO;
    while !router.is_closed() {
        let outcome = poll(&agent, &router, &cp, &node).and_then(|p| match p {
            Polled::Changed(reply) => router.apply(*reply),
            Polled::NotModified => {
                router.stats.not_modified();
                Ok(())
            }
        });
        match outcome {
            Ok(()) => backoff = Duration::ZERO,
            Err(e) => {
                router.stats.failed(&e);
                if router.stats.should_log_failure() {
                    eprintln!(
                        "graylane[{}] {}: feed failed, keeping the last snapshot: {e}",
                        std::process::id(),
                        router.service()
                    );
                }
                backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                router.sleep(backoff);
            }
        }
    }
}

fn poll(
    agent: &ureq::Agent,
    router: &Router,
    cp: &ControlPlane,
    node: &str,
) -> Result<Polled, Error> {
    let (version, health) = router.versions();
    let url = format!(
        "{}/v1/feed/{}?version={version}&health={health}&wait_ms={}&endpoints=true",
        cp.url,
        router.service(),
        cp.wait.as_millis()
    );
    let mut req = agent.get(&url).header("x-graylane-node", node);
    if let Some(t) = &cp.token {
        req = req.header("authorization", &format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| Error::Transport {
        url: url.clone(),
        message: e.to_string(),
    })?;
    match resp.status().as_u16() {
        200 => {
            let reader = resp.into_body().into_reader();
            Reply::read(reader).map(|r| Polled::Changed(Box::new(r)))
        }
        304 => Ok(Polled::NotModified),
        status => Err(Error::Status { url, status }),
    }
}
