//! The live feed: what the control plane answers, and how one worker's fetch is handed to
//! the others through shared data.
//!
//! Shared data, per service (one `vm_id`, so every worker sees the same keys):
//! - `graylane/<service>/strategy`: `<version>\n<strategy JSON>` (large; written first)
//! - `graylane/<service>/health`:   `<version> <health>\n<healthy JSON>` (small; the commit
//!   point: a worker reads it every tick and the strategy only when the version moved)
//! - `graylane/<service>/lease`:    `<owner> <deadline ms>`: which worker polls (CAS)

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A 200 answer of `GET /v1/feed/<service>`.
#[derive(Debug, Deserialize)]
pub struct FeedResponse {
    pub service: String,
    pub version: u64,
    pub health: u64,
    /// The strategy, or `null` when the poller's version is current (health-only change).
    #[serde(default)]
    pub strategy: Option<Box<RawValue>>,
    /// Healthy endpoint count per cluster key; `null` is unknown.
    #[serde(default)]
    pub healthy: BTreeMap<String, Option<u32>>,
}

impl FeedResponse {
    pub fn parse(body: &[u8]) -> Result<FeedResponse, String> {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    }
}

pub fn strategy_key(service: &str) -> String {
    format!("graylane/{service}/strategy")
}
pub fn health_key(service: &str) -> String {
    format!("graylane/{service}/health")
}
pub fn lease_key(service: &str) -> String {
    format!("graylane/{service}/lease")
}

/// `<version>\n<json>`.
pub fn encode_strategy(version: u64, json: &[u8]) -> Vec<u8> {
    let mut out = format!("{version}\n").into_bytes();
    out.extend_from_slice(json);
    out
}

pub fn decode_strategy(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let v = std::str::from_utf8(bytes.get(..nl)?).ok()?.parse().ok()?;
    Some((v, bytes.get(nl + 1..)?))
}

/// `<version> <health>\n<healthy json>`.
pub fn encode_health(
    version: u64,
    health: u64,
    healthy: &BTreeMap<String, Option<u32>>,
) -> Vec<u8> {
    let mut out = format!("{version} {health}\n").into_bytes();
    out.extend_from_slice(&serde_json::to_vec(healthy).unwrap_or_else(|_| b"{}".to_vec()));
    out
}

pub type Healthy = BTreeMap<String, Option<u32>>;

pub fn decode_health(bytes: &[u8]) -> Option<(u64, u64, Healthy)> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (v, h) = head.split_once(' ')?;
    let healthy = serde_json::from_slice(bytes.get(nl + 1..)?).ok()?;
    Some((v.parse().ok()?, h.parse().ok()?, healthy))
}

/// `<owner> <deadline ms>`.
pub fn decode_lease(bytes: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (o, d) = s.split_once(' ')?;
    Some((o.parse().ok()?, d.parse().ok()?))
}
