//! Failed authentications (a missing or unknown token; a known token with the wrong role is
//! not a guess and is not counted), per peer address: after a burst of them a peer is answered `429`
//! (without looking at its token) until its window ends, and the burst is logged once, so
//! guessing tokens is slow and visible, and the log cannot be flooded. A peer that
//! authenticates keeps no state. Pure: the time is an argument (unit tests below); the API
//! holds one in `AppState`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a window of failures lasts, and so how long a blocked peer waits.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Peers remembered at once (failed attempts from many addresses cannot grow the table).
const MAX_PEERS: usize = 10_000;

#[derive(Debug)]
struct Window {
    start: Instant,
    failures: u32,
}

#[derive(Debug)]
pub struct Guard {
    /// Failures within a window that block the peer for the rest of it (`limits.failed_auth`).
    max: u32,
    peers: Mutex<HashMap<IpAddr, Window>>,
}

impl Guard {
    pub fn new(max: u32) -> Guard {
        Guard {
            max: max.max(1),
            peers: Mutex::default(),
        }
    }

    /// How long `peer` must wait, if it is blocked now.
    pub fn blocked(&self, peer: IpAddr, now: Instant) -> Option<Duration> {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let w = peers.get(&peer)?;
        let end = w.start + WINDOW;
        (w.failures >= self.max && now < end).then(|| end - now)
    }

    /// Counts a failed authentication of `peer` (`why`: missing, unknown, wrong role); logs
    /// the first of a window and the one that blocks the peer.
    pub fn failed(&self, peer: IpAddr, now: Instant, why: &str) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, w| now < w.start + WINDOW);
            if peers.len() >= MAX_PEERS {
                tracing::warn!(%peer, why, "authentication failed (peer table full: not tracked)");
                return;
            }
        }
        let w = peers.entry(peer).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now >= w.start + WINDOW {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures += 1;
        if w.failures == 1 {
            tracing::warn!(%peer, why, "authentication failed");
        } else if w.failures == self.max {
            tracing::warn!(
                %peer,
                why,
                failures = self.max,
                window_secs = WINDOW.as_secs(),
                "authentication failed repeatedly: the peer is refused (429) until the window ends"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_burst_of_failures_blocks_the_peer_for_the_rest_of_its_window() {
        let g = Guard::new(10);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..9u64 {
            g.failed(a, t0 + Duration::from_millis(i), "unknown token");
            assert_eq!(g.blocked(a, t0 + Duration::from_millis(100)), None);
        }
        g.failed(a, t0 + Duration::from_secs(1), "unknown token");
        assert_eq!(
            g.blocked(a, t0 + Duration::from_secs(3)),
            Some(Duration::from_secs(7))
        );
        assert_eq!(g.blocked(b, t0 + Duration::from_secs(3)), None, "per peer");
        assert_eq!(g.blocked(a, t0 + WINDOW), None, "the window ended");
        // A new window starts from zero.
        g.failed(a, t0 + WINDOW, "unknown token");
        assert_eq!(g.blocked(a, t0 + WINDOW), None);
    }
}
