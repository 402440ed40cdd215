//! The live feed as one worker hands it to the others, through Envoy's shared data (one
//! `vm_id`, so every worker sees the same keys), per service:
//! - `graylane/<service>/strategy/<i>`: `<epoch> <version>\n<piece i>`: the feed answer that
//!   carried the strategy, in pieces of [`PIECE`] bytes (written first). A worker parses the
//!   strategy while it reads the pieces one by one, so no VM ever holds the whole text (a
//!   million ids are 8 MB of JSON).
//! - `graylane/<service>/strategy`: `<epoch> <version> <pieces>` (written after the pieces)
//! - `graylane/<service>/preview`:  `<id> <every>\n<candidate JSON>` (the preview running, if
//!   any; written before the health record, and only when its id changes)
//! - `graylane/<service>/health`:   `<epoch> <version> <health> <preview>\n<healthy JSON>`
//!   (small; the commit point: a worker reads it every tick, the strategy only when the version
//!   moved and the preview only when its id did; a record without `<preview>` means 0, none)
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

/// A feed answer's strategy alone (the other members are skipped without being kept).
#[derive(Debug, serde::Deserialize)]
pub struct StrategyOf {
    #[serde(default)]
    pub strategy: Option<graylane_strategy::StrategySpec>,
}

/// A feed answer's preview alone, its candidate kept raw until it is compiled.
#[derive(Debug, serde::Deserialize)]
pub struct PreviewOf {
    #[serde(default)]
    pub preview: Option<graylane_strategy::feed::PreviewReply<Box<RawValue>>>,
}

/// Healthy endpoint count per cluster key, as the feed carries it.
pub type Healthy = BTreeMap<String, Option<u32>>;

/// Which strategy a worker holds: the store's identity (`epoch`), the strategy's version, the
/// health generation and the preview's id (0: none; held even when its candidate was invalid,
/// so it is not fetched again). All zero: the plugin configuration's own strategy, or none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub epoch: u64,
    pub version: u64,
    pub health: u64,
    pub preview: u64,
}

impl Held {
    /// Whether `other` is news for a worker holding `self`: another store (epoch), a later
    /// version, or the same version with other health or another preview (any other id:
    /// preview ids are not ordered, and 0 is a preview stopped).
    pub fn is_older_than(&self, other: &Held) -> bool {
        self.epoch != other.epoch
            || other.version > self.version
            || (other.version == self.version
                && (other.health != self.health || other.preview != self.preview))
    }
}

pub fn strategy_key(service: &str) -> String {
    format!("graylane/{service}/strategy")
}
pub fn health_key(service: &str) -> String {
    format!("graylane/{service}/health")
}
pub fn preview_key(service: &str) -> String {
    format!("graylane/{service}/preview")
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

/// A poll lease at `key`: true when `me` holds it (renewed with CAS until `now + lease_ms`)
/// and should poll now.
///
/// Envoy's shared data has no atomic create (a CAS of 0 means "unconditional"), so a free
/// or expired lease is only *claimed* in one tick and used from the next, if the claim is
/// still this VM's: of several workers claiming at once, the last writer wins and the
/// others see its claim before they poll.
pub fn take_lease(
    host: &impl crate::follower::Host,
    key: &str,
    me: u64,
    now: u64,
    lease_ms: u64,
) -> bool {
    let Some((cur, cas)) = host.shared_get(key) else {
        return false;
    };
    let value = encode_lease(me, now + lease_ms);
    match cur.as_deref().and_then(decode_lease) {
        Some((owner, _)) if owner == me => host.shared_set(key, &value, Some(cas)),
        Some((_, until)) if until >= now => false,
        _ => {
            host.shared_set(key, &value, Some(cas));
            false
        }
    }
}

/// How much of a feed answer one shared-data piece holds (and a worker holds at once while
/// it copies or parses one).
pub const PIECE: usize = 256 * 1024;

/// The key of piece `i` of the answer that carried `service`'s strategy.
pub fn piece_key(service: &str, i: u32) -> String {
    format!("graylane/{service}/strategy/{i}")
}

/// `<epoch> <version>\n<bytes>`: one piece of the answer that carried that version.
pub fn encode_piece(epoch: u64, version: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = format!("{epoch} {version}\n").into_bytes();
    out.extend_from_slice(bytes);
    out
}

/// `(epoch, version, offset of the bytes)` of a piece.
pub fn decode_piece(bytes: &[u8]) -> Option<(u64, u64, usize)> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (e, v) = head.split_once(' ')?;
    Some((e.parse().ok()?, v.parse().ok()?, nl + 1))
}

/// `<epoch> <version> <pieces>`: the strategy's record, written once its pieces are.
pub fn encode_strategy(epoch: u64, version: u64, pieces: u32) -> Vec<u8> {
    format!("{epoch} {version} {pieces}").into_bytes()
}

/// `(epoch, version, pieces)`.
pub fn decode_strategy(bytes: &[u8]) -> Option<(u64, u64, u32)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut it = text.split(' ');
    let (e, v, n) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    Some((e.parse().ok()?, v.parse().ok()?, n.parse().ok()?))
}

/// `<id> <every>\n<candidate json>`.
pub fn encode_preview(id: u64, every: u32, json: &[u8]) -> Vec<u8> {
    let mut out = format!("{id} {every}\n").into_bytes();
    out.extend_from_slice(json);
    out
}

/// `(id, every, json)`.
pub fn decode_preview(bytes: &[u8]) -> Option<(u64, u32, &[u8])> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let (id, every) = head.split_once(' ')?;
    Some((id.parse().ok()?, every.parse().ok()?, bytes.get(nl + 1..)?))
}

/// `<epoch> <version> <health> <preview>\n<healthy json>`.
pub fn encode_health(held: &Held, healthy: &Healthy) -> Vec<u8> {
    let mut out = format!(
        "{} {} {} {}\n",
        held.epoch, held.version, held.health, held.preview
    )
    .into_bytes();
    out.extend_from_slice(&serde_json::to_vec(healthy).unwrap_or_else(|_| b"{}".to_vec()));
    out
}

/// A health record; one of three header fields (written before previews) has preview 0.
pub fn decode_health(bytes: &[u8]) -> Option<(Held, Healthy)> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(bytes.get(..nl)?).ok()?;
    let mut it = head.split(' ');
    let held = Held {
        epoch: it.next()?.parse().ok()?,
        version: it.next()?.parse().ok()?,
        health: it.next()?.parse().ok()?,
        preview: match it.next() {
            Some(p) => p.parse().ok()?,
            None => 0,
        },
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn health_records_carry_the_preview_and_older_ones_still_decode() {
        let held = Held {
            epoch: 1,
            version: 2,
            health: 3,
            preview: 4,
        };
        let healthy = Healthy::from([("A".to_string(), Some(2))]);
        assert_eq!(
            decode_health(&encode_health(&held, &healthy)),
            Some((held, healthy))
        );
        let (old, _) = decode_health(b"1 2 3\n{}").unwrap();
        assert_eq!(old, Held { preview: 0, ..held });
        for bad in [
            &b"1 2\n{}"[..],
            b"1 2 3 4 5\n{}",
            b"1 2 3 x\n{}",
            b"1 2 3 4",
        ] {
            assert_eq!(
                decode_health(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let doc = encode_preview(9, 4, b"{}");
        assert_eq!(decode_preview(&doc), Some((9, 4, &b"{}"[..])));
        assert_eq!(decode_preview(b"9\n{}"), None);
    }

    #[test]
    fn another_preview_is_news_unless_the_record_is_behind() {
        let mine = Held {
            epoch: 1,
            version: 5,
            health: 2,
            preview: 3,
        };
        for (other, news) in [
            (mine, false),
            (Held { preview: 4, ..mine }, true),
            (Held { preview: 0, ..mine }, true),
            (Held { preview: 2, ..mine }, true),
            (Held { version: 6, ..mine }, true),
            // A record behind this worker's version is not news, whatever its preview.
            (
                Held {
                    version: 4,
                    preview: 0,
                    ..mine
                },
                false,
            ),
        ] {
            assert_eq!(mine.is_older_than(&other), news, "{other:?}");
        }
    }
}
