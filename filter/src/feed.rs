//! The live feed as one worker hands it to the others, through Envoy's shared data (one
//! `vm_id`, so every worker sees the same keys), per service:
//! - `graylane/<service>/strategy`: `<epoch> <version>\n<strategy JSON>` (large; written first)
//! - `graylane/<service>/health`:   `<epoch> <version> <health>\n<healthy JSON>` (small; the
//!   commit point: a worker reads it every tick and the strategy only when the version moved)
//! - `graylane/<service>/lease`:    `<owner> <deadline ms>`: which worker polls (CAS)
//!
//! The answers themselves are `graylane_strategy::feed::Reply`, the type the control plane
//! writes.

use std::collections::BTreeMap;

use serde_json::value::RawValue;

/// A `200` answer of the feed, with the strategy kept raw until it is compiled.
pub type FeedResponse = graylane_strategy::feed::Reply<Box<RawValue>>;

/// Parses a feed answer; the error says what is wrong.
pub fn parse_reply(body: &[u8]) -> Result<FeedResponse, String> {
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

/// Healthy endpoint count per cluster key, as the feed carries it.
pub type Healthy = BTreeMap<String, Option<u32>>;

/// Which strategy a worker holds: the store's identity (`epoch`), the strategy's version and
/// the health generation. All zero: the plugin configuration's own strategy, or none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    pub version: u64,
    pub health: u64,
}

impl Held {
    /// Whether `other` is news for a worker holding `self`: another store (epoch), a later
    /// version, or the same version with other health.
    pub fn is_older_than(&self, other: &Held) -> bool {
        self.epoch != other.epoch
            || other.version > self.version
            || (other.version == self.version && other.health != self.health)
    }
}

pub fn strategy_key(service: &str) -> String {
    format!("graylane/{service}/strategy")
}
pub fn health_key(service: &str) -> String {
    format!("graylane/{service}/health")
}
/// The shared queues of the workers following `service` (JSON `[token, ...]`): the worker
/// that installs a new version wakes the others through them.
pub fn wake_key(service: &str) -> String {
    format!("graylane/{service}/wake")
}

/// Makes sure `item` is in the JSON list at `key` (at most `max` entries, the oldest leave
/// first), checked by reading it back: Envoy's shared data has no atomic create (a CAS token
/// of 0, when the key does not exist yet, is unconditional), so two workers adding themselves
/// at once may overwrite each other; the one that lost sees it on the read back and adds
/// itself again, this time against a real token. A few tries; false: try again later.
pub fn ensure_listed(host: &impl crate::follower::Host, key: &str, item: u64, max: usize) -> bool {
    for _ in 0..4 {
        let Some((cur, cas)) = host.shared_get(key) else {
            return false;
        };
        let mut list = decode_list(cur.as_deref());
        if list.contains(&item) {
            return true;
        }
        list.push(item);
        if list.len() > max {
            list.drain(..list.len() - max);
        }
        let Ok(json) = serde_json::to_vec(&list) else {
            return false;
        };
        host.shared_set(key, &json, Some(cas));
    }
    false
}

/// A list written by [`ensure_listed`] (empty when absent or unreadable).
pub fn decode_list(bytes: Option<&[u8]>) -> Vec<u64> {
    bytes
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

pub fn lease_key(service: &str) -> String {
    format!("graylane/{service}/lease")
}

/// `<epoch> <version>\n<json>`.
pub fn encode_strategy(epoch: u64, version: u64, json: &[u8]) -> Vec<u8> {
    let mut out = format!("{epoch} {version}\n").into_bytes();
    out.extend_from_slice(json);
    out
}

/// `(epoch, version, json)`.
pub fn decode_strategy(bytes: &[u8]) -> Option<(u64, u64, &[u8])> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (e, v) = head.split_once(' ')?;
    Some((e.parse().ok()?, v.parse().ok()?, bytes.get(nl + 1..)?))
}

/// `<epoch> <version> <health>\n<healthy json>`.
pub fn encode_health(held: &Held, healthy: &Healthy) -> Vec<u8> {
    let mut out = format!("{} {} {}\n", held.epoch, held.version, held.health).into_bytes();
    out.extend_from_slice(&serde_json::to_vec(healthy).unwrap_or_else(|_| b"{}".to_vec()));
    out
}

pub fn decode_health(bytes: &[u8]) -> Option<(Held, Healthy)> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let mut it = head.split(' ');
    let held = Held {
        epoch: it.next()?.parse().ok()?,
        version: it.next()?.parse().ok()?,
        health: it.next()?.parse().ok()?,
    };
    if it.next().is_some() {
        return None;
    }
    let healthy = serde_json::from_slice(bytes.get(nl + 1..)?).ok()?;
    Some((held, healthy))
}

/// `<owner> <deadline ms>`.
pub fn encode_lease(owner: u64, deadline_ms: u64) -> Vec<u8> {
    format!("{owner} {deadline_ms}").into_bytes()
}

pub fn decode_lease(bytes: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (o, d) = s.split_once(' ')?;
    Some((o.parse().ok()?, d.parse().ok()?))
}
