//! The control plane's live feed, followed by a thread of its own in each nginx worker: a
//! blocking long-poll (`GET /v1/feed/<service>?epoch=E&version=V&health=H&wait_ms=W&endpoints=true`)
//! whose answers replace the router's snapshot. A failed or invalid answer keeps the last
//! good snapshot and backs off; the request path never waits for the feed.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use graylane_strategy::feed;
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

/// A 200 answer, the type the control plane writes; the strategy parsed as it is read.
pub type Reply = feed::Reply<Incoming>;

/// The strategy of an answer, parsed into the spec while the answer is read (never held as
/// text). `Reply`'s `#[serde(default)]` on its generic `strategy` field makes serde ask for
/// `Default`: "no strategy" is that default.
#[derive(Debug, Default)]
pub struct Incoming(pub Option<StrategySpec>);

impl<'de> Deserialize<'de> for Incoming {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StrategySpec::deserialize(d).map(|s| Incoming(Some(s)))
    }
}

/// Parses an answer as it is read (a million-id strategy is never held as text whole).
pub fn read_reply(body: impl Read) -> Result<Reply, Error> {
    parse_json_reader_as(std::io::BufReader::with_capacity(64 * 1024, body)).map_err(Error::Parse)
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
    let (epoch, version, health) = router.held();
    let query = feed::Query {
        epoch,
        version,
        health,
        wait_ms: u64::try_from(cp.wait.as_millis()).unwrap_or(u64::MAX),
        endpoints: true,
        // nginx routes by the live strategy only: previews are the Envoy filter's.
        preview: None,
    };
    let url = format!("{}{}", cp.url, query.path(router.service()));
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
            read_reply(reader).map(|r| Polled::Changed(Box::new(r)))
        }
        304 => Ok(Polled::NotModified),
        status => Err(Error::Status { url, status }),
    }
}
