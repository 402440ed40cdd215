//! The catalog: which services the control plane manages, for a filter serving them all
//! (`services: "all"`). One worker per Envoy long-polls `GET /v1/feed` (a lease, as each
//! service's feed has) and publishes the names in shared data; every worker takes them on its
//! tick and follows each service's own feed. The catalog carries names only: strategies come
//! through each service's feed (`follower.rs`).
//!
//! Shared data (one `vm_id`; `:` is in no service name, so these keys meet no service's):
//! - `graylane:catalog/list`:  `<digest>\n<JSON names>`
//! - `graylane:catalog/lease`: `<owner> <deadline ms>`
//!
//! Like the follower, no host call is made here directly (`follower::Host`).

use std::time::Duration;

use graylane_strategy::feed::{Catalog, CatalogQuery};

use crate::config::ControlPlane;
use crate::feed;
use crate::follower::Host;

const LIST_KEY: &str = "graylane:catalog/list";
const LEASE_KEY: &str = "graylane:catalog/lease";

/// Shortest and longest wait after a failed poll.
const BACKOFF_MIN_MS: u64 = 200;
const BACKOFF_MAX_MS: u64 = 5_000;

/// One worker's view of the catalog.
#[derive(Debug)]
pub struct Follower {
    cp: ControlPlane,
    me: u64,
    /// The digest of the names this worker holds (0: none yet).
    held: u64,
    in_flight: Option<u32>,
    /// When the call in flight was made (ms).
    polled_at_ms: u64,
    next_poll_ms: u64,
    backoff_ms: u64,
}

impl Follower {
    pub fn new(cp: ControlPlane, me: u64) -> Follower {
        Follower {
            cp,
            me,
            held: 0,
            in_flight: None,
            polled_at_ms: 0,
            next_poll_ms: 0,
            backoff_ms: 0,
        }
    }

    /// Every tick: the names another worker fetched, if news; then polls if this worker holds
    /// the lease.
    pub fn on_tick(&mut self, host: &impl Host) -> Option<Vec<String>> {
        let news = self.sync(host);
        self.poll(host);
        news
    }

    /// At configure time (and when woken): the names another worker fetched already.
    pub fn sync(&mut self, host: &impl Host) -> Option<Vec<String>> {
        let (bytes, _) = host.shared_get(LIST_KEY)?;
        let (digest, names) = decode(&bytes?)?;
        (digest != self.held).then(|| {
            self.held = digest;
            names
        })
    }

    /// The answer to the call `token`, if it is this follower's: `Some(names)` when they are
    /// news.
    pub fn on_response<B: crate::follower::Body + ?Sized>(
        &mut self,
        host: &impl Host,
        token: u32,
        status: u16,
        body: &B,
    ) -> Option<Option<Vec<String>>> {
        if self.in_flight != Some(token) {
            return None;
        }
        self.in_flight = None;
        let now = host.now_ms().unwrap_or(0);
        Some(match status {
            // The list of names is small: read whole.
            200 => {
                match serde_json::from_reader::<_, Catalog>(std::io::BufReader::new(body.open())) {
                    Ok(c) => {
                        self.backoff_ms = 0;
                        host.event("catalog_ok");
                        let names: Vec<String> = c.services.into_iter().map(|s| s.name).collect();
                        host.shared_set(LIST_KEY, &encode(c.digest, &names), None);
                        let news = c.digest != self.held;
                        self.held = c.digest;
                        if news {
                            host.wake_others();
                            self.poll(host);
                        }
                        news.then_some(names)
                    }
                    Err(e) => {
                        self.failed(host, now, &format!("invalid answer: {e}"));
                        None
                    }
                }
            }
            304 => {
                self.backoff_ms = 0;
                // A long-poll that ran out: armed again at once (as the strategy feed's). One
                // answered sooner than a tick waits for the tick, so it cannot spin.
                if now.saturating_sub(self.polled_at_ms) >= self.cp.tick_ms {
                    self.poll(host);
                }
                None
            }
            other => {
                self.failed(host, now, &format!("status {other}"));
                None
            }
        })
    }

    fn poll(&mut self, host: &impl Host) {
        let Some(now) = host.now_ms() else {
            return;
        };
        let lease_ms = (self.cp.tick_ms * 10).max(1_000);
        if !feed::take_lease(host, LEASE_KEY, self.me, now, lease_ms)
            || self.in_flight.is_some()
            || now < self.next_poll_ms
        {
            return;
        }
        let query = CatalogQuery {
            digest: self.held,
            wait_ms: self.cp.wait_ms,
        };
        let path = query.path();
        let auth = self.cp.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", self.cp.authority.as_str()),
        ];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let timeout = Duration::from_millis(self.cp.wait_ms + 5_000);
        match host.dispatch(&self.cp.cluster, &headers, None, timeout) {
            Ok(token) => {
                self.in_flight = Some(token);
                self.polled_at_ms = now;
            }
            Err(e) => self.failed(host, now, &format!("dispatch: {e}")),
        }
    }

    fn failed(&mut self, host: &impl Host, now: u64, why: &str) {
        host.event("catalog_failed");
        self.backoff_ms = (self.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        self.next_poll_ms = now + self.backoff_ms;
        host.warn(&format!(
            "graylane: catalog failed, keeping the services followed: {why}"
        ));
    }
}

fn encode(digest: u64, names: &[String]) -> Vec<u8> {
    let mut out = format!("{digest}\n").into_bytes();
    out.extend_from_slice(&serde_json::to_vec(names).unwrap_or_else(|_| b"[]".to_vec()));
    out
}

fn decode(bytes: &[u8]) -> Option<(u64, Vec<String>)> {
    let nl = bytes.iter().position(|b| *b == b'\n')?;
    let digest = std::str::from_utf8(bytes.get(..nl)?).ok()?.parse().ok()?;
    let names = serde_json::from_slice(bytes.get(nl + 1..)?).ok()?;
    Some((digest, names))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::cell::{Cell, RefCell};

    #[derive(Default)]
    struct Envoy {
        data: crate::shared_fake::SharedData,
        calls: RefCell<Vec<String>>,
        events: RefCell<Vec<&'static str>>,
        now: Cell<u64>,
    }

    impl Host for Envoy {
        fn now_ms(&self) -> Option<u64> {
            Some(self.now.get())
        }
        fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
            self.data.get(key)
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            self.data.set(key, value, cas)
        }
        fn dispatch(
            &self,
            _: &str,
            headers: &[(&str, &str)],
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<u32, String> {
            let path = headers.iter().find(|(k, _)| *k == ":path").unwrap().1;
            let mut calls = self.calls.borrow_mut();
            calls.push(path.to_string());
            Ok(calls.len() as u32)
        }
        fn event(&self, name: &'static str) {
            self.events.borrow_mut().push(name);
        }
        fn warn(&self, _: &str) {}
    }

    fn cp() -> ControlPlane {
        serde_json::from_str(r#"{"cluster": "graylane_cp", "wait_ms": 1000}"#).unwrap()
    }

    fn answer(names: &[&str]) -> Vec<u8> {
        let digest = graylane_strategy::feed::names_digest(names.iter().copied());
        let services: Vec<_> = names
            .iter()
            .map(|n| serde_json::json!({"name": n, "version": 1}))
            .collect();
        serde_json::json!({"epoch": 1, "digest": digest, "services": services})
            .to_string()
            .into_bytes()
    }

    /// A 304 that ends a held long-poll arms the next one at once; one answered at once waits
    /// for the tick.
    #[test]
    fn a_long_poll_that_ran_out_is_armed_again_at_once() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut w = Follower::new(cp(), 1);
        w.on_tick(&envoy); // claims the lease
        w.on_tick(&envoy); // polls
        assert_eq!(envoy.calls.borrow().len(), 1);
        assert_eq!(w.on_response(&envoy, 1, 304, &[]), Some(None));
        assert_eq!(envoy.calls.borrow().len(), 1, "answered at once: the tick");
        w.on_tick(&envoy);
        assert_eq!(envoy.calls.borrow().len(), 2);
        envoy.now.set(2_000);
        assert_eq!(w.on_response(&envoy, 2, 304, &[]), Some(None));
        assert_eq!(envoy.calls.borrow().len(), 3, "held a second: at once");
    }

    #[test]
    fn one_worker_polls_and_every_worker_takes_the_names_once() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let (mut w1, mut w2) = (Follower::new(cp(), 1), Follower::new(cp(), 2));
        assert_eq!(w1.on_tick(&envoy), None); // claims the lease
        assert_eq!(w2.on_tick(&envoy), None); // sees it taken
        assert_eq!(w1.on_tick(&envoy), None); // polls
        assert_eq!(*envoy.calls.borrow(), ["/v1/feed?digest=0&wait_ms=1000"]);
        let got = w1.on_response(&envoy, 1, 200, &answer(&["a", "b"]));
        assert_eq!(got, Some(Some(vec!["a".to_string(), "b".to_string()])));
        // News: polled again at once, naming what it holds.
        let digest = graylane_strategy::feed::names_digest(["a", "b"]);
        assert_eq!(
            envoy.calls.borrow().last().unwrap(),
            &format!("/v1/feed?digest={digest}&wait_ms=1000")
        );
        assert_eq!(w2.on_tick(&envoy).unwrap(), ["a", "b"]);
        assert_eq!(w2.on_tick(&envoy), None, "taken once");
        assert_eq!(w1.on_tick(&envoy), None, "its own, not news");
        // Not its call; then a 304; then a failure backs off.
        assert_eq!(w2.on_response(&envoy, 2, 200, &answer(&["x"])), None);
        assert_eq!(w1.on_response(&envoy, 2, 304, &[]), Some(None));
        w1.on_tick(&envoy);
        let calls = envoy.calls.borrow().len();
        assert_eq!(w1.on_response(&envoy, calls as u32, 503, &[]), Some(None));
        w1.on_tick(&envoy);
        assert_eq!(envoy.calls.borrow().len(), calls, "backing off");
        envoy.now.set(10_000);
        w1.on_tick(&envoy);
        assert_eq!(envoy.calls.borrow().len(), calls + 1);
        assert_eq!(
            *envoy.events.borrow(),
            ["catalog_ok", "catalog_failed"],
            "counted"
        );
        // Garbage is a failure too, and keeps the names held.
        let t = envoy.calls.borrow().len() as u32;
        assert_eq!(w1.on_response(&envoy, t, 200, b"[1,"), Some(None));
        assert_eq!(w2.on_tick(&envoy), None);
    }
}
