//! The feed follower: which strategy this worker holds, when to poll the control plane, who
//! polls (a lease in shared data), backoff after failures, and installing what arrives, from
//! the network or from another worker. No host call is made here directly: the host is a small
//! trait, Proxy-Wasm in the filter (`root.rs`) and a fake in the unit tests below.
//!
//! One worker per Envoy polls (it holds the lease, renewed with CAS); it installs what it
//! fetched and publishes it in shared data, strategy first and health last (the commit
//! point). Every worker's tick reads the small health record and takes the strategy only when
//! it is news (another epoch, a later version, or other health).
//!
//! A preview (a candidate strategy the control plane wants evaluated beside the live one)
//! travels the same way, in its own key; its id is part of what a worker holds, so a preview
//! started, replaced or stopped is news. A candidate that does not compile never costs the
//! live strategy anything: the worker holds its id, evaluates nothing, and counts
//! `preview_invalid`.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;
use std::time::Duration;

use graylane_strategy::feed::{Query, Reply};
use graylane_strategy::spec::parse_json_reader_as;
use graylane_strategy::{parse_json, Compiled, Health, SizeLimits, StrategySpec};
use serde::de::IgnoredAny;

use crate::config::ControlPlane;
use crate::feed::{self, Healthy, Held};

/// What the follower needs from its host.
pub trait Host {
    /// Wall-clock milliseconds, if the host can tell.
    fn now_ms(&self) -> Option<u64>;
    /// A shared-data value and its CAS token; `None` when the host call failed.
    fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)>;
    /// Sets a shared-data value, only if its CAS token is still `cas` (when given).
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool;
    /// Starts an HTTP call to the control plane; returns its token.
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, String>;
    /// Counts an event (a metric).
    fn event(&self, name: &'static str);
    /// Logs a warning.
    fn warn(&self, msg: &str);
    /// Tells the other workers that shared data holds news, so they take it now instead of
    /// at their next tick (which stays the safety net). Best effort.
    fn wake_others(&self) {}
}

/// A feed answer's body, read in pieces (as often as needed) rather than held whole: in the
/// filter, Envoy's buffer of the call's response; in tests, a slice.
pub trait Body {
    /// A reader from the body's first byte.
    fn open(&self) -> Box<dyn Read + '_>;
}

impl<T: AsRef<[u8]> + ?Sized> Body for T {
    fn open(&self) -> Box<dyn Read + '_> {
        Box::new(self.as_ref())
    }
}

/// The answer that carried a strategy version, read back from shared data piece by piece
/// (see `feed.rs`). A piece of another version (a writer between its writes) ends the read
/// with an error and sets `stale`.
struct Pieces<'a, H: Host> {
    host: &'a H,
    service: &'a str,
    epoch: u64,
    version: u64,
    count: u32,
    next: u32,
    piece: Vec<u8>,
    at: usize,
    stale: &'a Cell<bool>,
}

impl<H: Host> Read for Pieces<'_, H> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.piece.len() {
            if self.next >= self.count {
                return Ok(0);
            }
            let key = feed::piece_key(self.service, self.next);
            let piece = self.host.shared_get(&key).and_then(|(v, _)| v);
            let Some((e, v, at)) = piece.as_deref().and_then(feed::decode_piece) else {
                self.stale.set(true);
                return Err(std::io::Error::other("a piece of the strategy is missing"));
            };
            if (e, v) != (self.epoch, self.version) {
                self.stale.set(true);
                return Err(std::io::Error::other("a piece of another strategy version"));
            }
            self.piece = piece.unwrap_or_default();
            self.at = at;
            self.next += 1;
        }
        let rest = self.piece.get(self.at..).unwrap_or_default();
        let n = rest.len().min(out.len());
        out[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

/// A strategy ready to route by, with its health, and the preview evaluated beside it.
#[derive(Debug, Clone)]
pub struct Installed {
    pub compiled: Rc<Compiled>,
    pub health: Health,
    pub preview: Option<Rc<Preview>>,
}

/// A candidate strategy decided beside the live one on a sample of requests, never routed by.
#[derive(Debug)]
pub struct Preview {
    /// Its id in the feed (never 0).
    pub id: u64,
    /// One request in `every` is evaluated (0 and 1: every request).
    pub every: u32,
    pub compiled: Rc<Compiled>,
    /// The candidate's health, from the same healthy counts as the live strategy's.
    pub health: Health,
    /// The request headers either strategy reads (the live one's first), so one request's
    /// headers are fetched once for both decisions.
    pub headers: Vec<String>,
}

impl Preview {
    pub fn new(
        id: u64,
        every: u32,
        compiled: Rc<Compiled>,
        live: &Compiled,
        healthy: &Healthy,
    ) -> Preview {
        let health = Health::from_counts(&compiled, healthy.iter().map(|(k, v)| (k, *v)));
        let mut headers = live.needed_headers().to_vec();
        for h in compiled.needed_headers() {
            if !headers.contains(h) {
                headers.push(h.clone());
            }
        }
        Preview {
            id,
            every,
            compiled,
            health,
            headers,
        }
    }
}

/// A compiled candidate and its sampling rate, as the follower keeps it (its id is in `Held`).
type Candidate = (u32, Rc<Compiled>);

/// One service's feed follower.
#[derive(Debug)]
pub struct Follower {
    service: String,
    cp: ControlPlane,
    limits: SizeLimits,
    /// This VM in the poll lease.
    me: u64,
    in_flight: Option<u32>,
    /// When the call in flight was made (ms).
    polled_at_ms: u64,
    /// Whether this worker held the poll lease at its last tick (it also sends the traffic
    /// reports).
    holder: bool,
    next_poll_ms: u64,
    backoff_ms: u64,
    held: Held,
    compiled: Option<Rc<Compiled>>,
    /// The preview's candidate, if one is held and compiled.
    candidate: Option<Candidate>,
}

/// Shortest and longest wait after a failed poll.
const BACKOFF_MIN_MS: u64 = 200;
const BACKOFF_MAX_MS: u64 = 2_000;

impl Follower {
    /// A follower starting from `initial` (the plugin configuration's strategy, if any).
    pub fn new(
        service: String,
        cp: ControlPlane,
        limits: SizeLimits,
        me: u64,
        initial: Option<Rc<Compiled>>,
    ) -> Self {
        Follower {
            service,
            cp,
            limits,
            me,
            in_flight: None,
            polled_at_ms: 0,
            holder: false,
            next_poll_ms: 0,
            backoff_ms: 0,
            held: Held::default(),
            compiled: initial,
            candidate: None,
        }
    }

    /// The control plane this follower polls.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// Whether this worker held the poll lease at its last tick.
    pub fn holds_lease(&self) -> bool {
        self.holder
    }

    /// What this worker holds.
    #[cfg(test)]
    pub fn held(&self) -> Held {
        self.held
    }

    /// At configure time: take what another worker fetched already, but claim nothing. (Envoy
    /// configures a VM only to check the configuration and then destroys it; a lease it
    /// claimed would keep every worker from polling until it expired.)
    pub fn on_start(&mut self, host: &impl Host) -> Option<Installed> {
        self.sync_from_shared(host)
    }

    /// Every tick: take what another worker fetched, then poll if this worker holds the lease.
    /// Returns a new strategy or health to route by, if any.
    pub fn on_tick(&mut self, host: &impl Host) -> Option<Installed> {
        let update = self.sync_from_shared(host);
        self.poll(host);
        update
    }

    /// The answer to the call `token` (`status` 0 when the call failed without one).
    pub fn on_response<B: Body + ?Sized>(
        &mut self,
        host: &impl Host,
        token: u32,
        status: u16,
        body: &B,
    ) -> Option<Installed> {
        if self.in_flight != Some(token) {
            return None;
        }
        self.in_flight = None;
        let now = host.now_ms().unwrap_or(0);
        let before = self.held;
        match status {
            200 => match self.on_reply(host, body) {
                Ok(update) => {
                    self.backoff_ms = 0;
                    host.event("feed_ok");
                    // News: the long-poll is armed again at once, so a change made right
                    // after this one is not left waiting for the next tick. (An answer that
                    // brought nothing new, which the control plane never sends, waits for the
                    // tick: a server repeating itself cannot make the filter spin.)
                    if self.held != before {
                        self.poll(host);
                    }
                    update
                }
                Err(e) => {
                    host.event("feed_invalid");
                    self.failed(host, now, &e);
                    None
                }
            },
            304 => {
                self.backoff_ms = 0;
                host.event("feed_not_modified");
                // The long-poll ran out with nothing new: armed again at once, so a change
                // made right after it is not left waiting for the next tick (with 4 workers,
                // one change in 50 was). A 304 answered sooner than a tick waits for the tick:
                // a server that does not hold polls cannot make the filter spin.
                if now.saturating_sub(self.polled_at_ms) >= self.cp.tick_ms {
                    self.poll(host);
                }
                None
            }
            other => {
                self.failed(host, now, &format!("status {other}"));
                None
            }
        }
    }

    /// Holds `compiled` and `candidate` as `held`; the health of both from `healthy`.
    fn install(
        &mut self,
        compiled: Rc<Compiled>,
        candidate: Option<Candidate>,
        held: Held,
        healthy: &Healthy,
    ) -> Installed {
        let health = Health::from_counts(&compiled, healthy.iter().map(|(k, v)| (k, *v)));
        let preview = candidate.as_ref().map(|(every, c)| {
            Rc::new(Preview::new(
                held.preview,
                *every,
                c.clone(),
                &compiled,
                healthy,
            ))
        });
        self.compiled = Some(compiled.clone());
        self.candidate = candidate;
        self.held = held;
        Installed {
            compiled,
            health,
            preview,
        }
    }

    /// A strategy within the size limits, compiled.
    fn compile(&self, spec: StrategySpec) -> Result<Compiled, graylane_strategy::Error> {
        self.limits.check(&spec)?;
        Compiled::try_from(spec)
    }

    /// The strategy of a feed answer read from `answer`, parsed straight into its types (the
    /// answer's other members skipped) and compiled.
    fn compile_answer(&self, answer: impl Read) -> Result<Compiled, String> {
        let spec = parse_json_reader_as::<feed::StrategyOf, _>(answer)
            .map_err(|e| e.to_string())?
            .strategy
            .ok_or("the answer carries no strategy")?;
        self.compile(spec).map_err(|e| e.to_string())
    }

    /// Preview `id`'s candidate compiled as a live strategy would be; `None` when it does not
    /// compile (counted and logged: the preview is then held without a candidate, never
    /// fetched again, and nothing else is refused for it).
    fn compile_candidate(
        &self,
        host: &impl Host,
        id: u64,
        every: u32,
        json: &[u8],
    ) -> Option<Candidate> {
        match parse_json(json).and_then(|s| self.compile(s)) {
            Ok(c) => {
                host.event("preview_installed");
                Some((every, Rc::new(c)))
            }
            Err(e) => {
                host.event("preview_invalid");
                host.warn(&format!(
                    "graylane: preview {id} invalid, not evaluated: {e}"
                ));
                None
            }
        }
    }

    /// Picks up what another worker fetched.
    fn sync_from_shared(&mut self, host: &impl Host) -> Option<Installed> {
        let (bytes, _) = host.shared_get(&feed::health_key(&self.service))?;
        let (held, healthy) = feed::decode_health(&bytes?)?;
        if !self.held.is_older_than(&held) {
            return None;
        }
        // Both documents are read (and checked against the record) before anything is
        // compiled, so a worker between its writes costs no compilation nor event.
        let new_version = (held.epoch, held.version) != (self.held.epoch, self.held.version);
        let pieces = if new_version {
            let (doc, _) = host.shared_get(&feed::strategy_key(&self.service))?;
            let (e, v, n) = feed::decode_strategy(&doc?)?;
            if (e, v) != (held.epoch, held.version) {
                return None; // a writer is between its writes; next tick
            }
            Some(n)
        } else {
            None
        };
        let new_preview = held.preview != self.held.preview && held.preview != 0;
        let preview = if new_preview {
            let (doc, _) = host.shared_get(&feed::preview_key(&self.service))?;
            Some(doc?)
        } else {
            None
        };
        let preview = preview
            .as_deref()
            .map(feed::decode_preview)
            .map(|d| d.filter(|(id, _, _)| *id == held.preview));
        if matches!(preview, Some(None)) {
            return None; // a writer is between its writes; next tick
        }
        let compiled = match pieces {
            None => self.compiled.clone()?,
            Some(count) => {
                let stale = Cell::new(false);
                let reader = Pieces {
                    host,
                    service: &self.service,
                    epoch: held.epoch,
                    version: held.version,
                    count,
                    next: 0,
                    piece: Vec::new(),
                    at: 0,
                    stale: &stale,
                };
                match self.compile_answer(reader) {
                    _ if stale.get() => return None, // overwritten while read; next tick
                    Ok(c) => {
                        host.event("snapshot_installed");
                        Rc::new(c)
                    }
                    Err(e) => {
                        host.event("feed_invalid");
                        host.warn(&format!("graylane: shared snapshot invalid: {e}"));
                        return None;
                    }
                }
            }
        };
        let candidate = match preview.flatten() {
            Some((id, every, json)) => self.compile_candidate(host, id, every, json),
            None if held.preview == self.held.preview => self.candidate.clone(),
            None => None, // stopped
        };
        Some(self.install(compiled, candidate, held, &healthy))
    }

    /// The poll lease of this service (see [`feed::take_lease`]).
    fn take_lease(&self, host: &impl Host, now: u64) -> bool {
        feed::take_lease(
            host,
            &feed::lease_key(&self.service),
            self.me,
            now,
            self.lease_ms(),
        )
    }

    /// How long a lease lasts without renewal: the holder renews it every tick (also while
    /// its call is in flight), so a holder that is gone (its VM destroyed or reloaded) is
    /// replaced within this time.
    fn lease_ms(&self) -> u64 {
        (self.cp.tick_ms * 10).max(1_000)
    }

    fn poll(&mut self, host: &impl Host) {
        let Some(now) = host.now_ms() else {
            return;
        };
        // Renewed first, so the lease holds while a long-poll is in flight.
        let holder = self.take_lease(host, now);
        self.holder = holder;
        if !holder || self.in_flight.is_some() || now < self.next_poll_ms {
            return;
        }
        let query = Query {
            epoch: self.held.epoch,
            version: self.held.version,
            health: self.held.health,
            wait_ms: self.cp.wait_ms,
            endpoints: false,
            preview: Some(self.held.preview),
        };
        let path = query.path(&self.service);
        let node = self.me.to_string();
        let auth = self.cp.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", self.cp.authority.as_str()),
            ("x-graylane-node", node.as_str()),
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
            Err(e) => {
                let why = format!("dispatch to cluster {}: {e}", self.cp.cluster);
                self.failed(host, now, &why);
            }
        }
    }

    fn failed(&mut self, host: &impl Host, now: u64, why: &str) {
        host.event("feed_failed");
        self.backoff_ms = (self.backoff_ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        self.next_poll_ms = now + self.backoff_ms;
        host.warn(&format!(
            "graylane: feed failed, keeping the last snapshot: {why}"
        ));
    }

    /// Publishes the answer that carried a new strategy to the other workers: its pieces,
    /// then the record naming them.
    fn share<B: Body + ?Sized>(&self, host: &impl Host, held: &Held, body: &B) {
        let mut reader = body.open();
        let mut pieces = 0u32;
        loop {
            let mut piece = Vec::with_capacity(feed::PIECE);
            if let Err(e) = reader
                .by_ref()
                .take(feed::PIECE as u64)
                .read_to_end(&mut piece)
            {
                host.warn(&format!("graylane: feed answer not shared: {e}"));
                return;
            }
            if piece.is_empty() {
                break;
            }
            let doc = feed::encode_piece(held.epoch, held.version, &piece);
            host.shared_set(&feed::piece_key(&self.service, pieces), &doc, None);
            pieces += 1;
            if piece.len() < feed::PIECE {
                break;
            }
        }
        let doc = feed::encode_strategy(held.epoch, held.version, pieces);
        host.shared_set(&feed::strategy_key(&self.service), &doc, None);
    }

    fn on_reply<B: Body + ?Sized>(
        &mut self,
        host: &impl Host,
        body: &B,
    ) -> Result<Option<Installed>, String> {
        // Read in passes, each streaming from the body: what the answer says (its strategy
        // skipped), then the strategy alone, parsed straight into the strategy's types. So a
        // VM never holds the text of a million ids next to the ids themselves.
        let reply: Reply<IgnoredAny> =
            parse_json_reader_as(body.open()).map_err(|e| e.to_string())?;
        if reply.service != self.service {
            return Err(format!(
                "feed for service {:?}, expected {:?}",
                reply.service, self.service
            ));
        }
        let mut held = Held {
            epoch: reply.epoch,
            version: reply.version,
            health: reply.health,
            preview: 0,
        };
        let compiled = match &reply.strategy {
            Some(_) => {
                let compiled = self
                    .compile_answer(body.open())
                    .map_err(|e| format!("strategy version {}: {e}", reply.version))?;
                host.event("snapshot_installed");
                // Strategy first, preview next, health last: the health key is the commit
                // point.
                self.share(host, &held, body);
                Rc::new(compiled)
            }
            None => {
                let same = (held.epoch, held.version) == (self.held.epoch, self.held.version);
                self.compiled.clone().filter(|_| same).ok_or_else(|| {
                    format!(
                        "health-only answer for version {} that this worker does not hold",
                        reply.version
                    )
                })?
            }
        };
        // The preview never refuses the answer: a candidate that does not compile is held
        // (by id) without being evaluated.
        let candidate = match &reply.preview {
            None => None,
            Some(p) => match &p.strategy {
                Some(_) => {
                    held.preview = p.id;
                    let raw = parse_json_reader_as::<feed::PreviewOf, _>(body.open())
                        .ok()
                        .and_then(|x| x.preview?.strategy);
                    let json = raw.as_ref().map_or(&b""[..], |r| r.get().as_bytes());
                    // Shared even when invalid: every worker then holds the same id.
                    let doc = feed::encode_preview(p.id, p.every, json);
                    host.shared_set(&feed::preview_key(&self.service), &doc, None);
                    self.compile_candidate(host, p.id, p.every, json)
                }
                None if p.id == self.held.preview => {
                    held.preview = p.id;
                    self.candidate.clone()
                }
                None => {
                    // Sent without its candidate for a preview this worker does not hold:
                    // hold none, so the next query asks for it again.
                    host.event("preview_invalid");
                    host.warn(&format!(
                        "graylane: preview {} sent without its candidate, which this worker \
                         does not hold",
                        p.id
                    ));
                    None
                }
            },
        };
        let installed = self.install(compiled, candidate, held, &reply.healthy);
        let h = feed::encode_health(&held, &reply.healthy);
        host.shared_set(&feed::health_key(&self.service), &h, None);
        host.wake_others();
        Ok(Some(installed))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::cell::{Cell, RefCell};

    /// Shared data and calls of one Envoy, seen by every worker's follower.
    #[derive(Default)]
    struct Envoy {
        data: crate::shared_fake::SharedData,
        calls: RefCell<Vec<(u64, String)>>,
        next_token: Cell<u32>,
        /// The last token answered (one call is in flight at a time).
        answered: Cell<u32>,
        events: RefCell<Vec<&'static str>>,
        now: Cell<u64>,
        clock_broken: Cell<bool>,
        dispatch_fails: Cell<bool>,
    }

    /// One worker's view of the Envoy.
    struct Worker<'e> {
        envoy: &'e Envoy,
        me: u64,
    }

    impl Host for Worker<'_> {
        fn now_ms(&self) -> Option<u64> {
            (!self.envoy.clock_broken.get()).then(|| self.envoy.now.get())
        }
        fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
            self.envoy.data.get(key)
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            self.envoy.data.set(key, value, cas)
        }
        fn dispatch(
            &self,
            _: &str,
            headers: &[(&str, &str)],
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<u32, String> {
            if self.envoy.dispatch_fails.get() {
                return Err("BadArgument".into());
            }
            let path = headers.iter().find(|(k, _)| *k == ":path").unwrap().1;
            self.envoy
                .calls
                .borrow_mut()
                .push((self.me, path.to_string()));
            let t = self.envoy.next_token.get() + 1;
            self.envoy.next_token.set(t);
            Ok(t)
        }
        fn event(&self, name: &'static str) {
            self.envoy.events.borrow_mut().push(name);
        }
        fn warn(&self, _: &str) {}
    }

    fn cp() -> ControlPlane {
        serde_json::from_str(r#"{"cluster": "graylane_cp", "wait_ms": 1000}"#).unwrap()
    }

    const SEED: &str = r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [1]}}, "B": {"status": "G", "id": {"all": true}}}}"#;

    fn reply(
        epoch: u64,
        version: u64,
        health: u64,
        strategy: Option<&str>,
        healthy: &str,
    ) -> Vec<u8> {
        format!(
            r#"{{"service": "web", "epoch": {epoch}, "version": {version}, "health": {health}, "strategy": {}, "healthy": {healthy}}}"#,
            strategy.unwrap_or("null")
        )
        .into_bytes()
    }

    /// `body` (a [`reply`]) with `"preview": preview`.
    fn with_preview(mut body: Vec<u8>, preview: &str) -> Vec<u8> {
        body.pop(); // the closing brace
        body.extend_from_slice(format!(r#", "preview": {preview}}}"#).as_bytes());
        body
    }

    const CANDIDATE: &str = r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [1, 2]}}, "B": {"status": "G", "id": {"all": true}}}}"#;

    fn count(envoy: &Envoy, event: &str) -> usize {
        envoy
            .events
            .borrow()
            .iter()
            .filter(|e| **e == event)
            .count()
    }

    fn last_path(envoy: &Envoy) -> String {
        envoy.calls.borrow().last().unwrap().1.clone()
    }

    /// The worker whose call is in flight, and its token: ticks every worker until one
    /// polls, unless a call is already waiting for its answer. The caller answers it.
    fn poll_once(envoy: &Envoy, workers: &mut [(Worker<'_>, Follower)]) -> (usize, u32) {
        for _ in 0..3 {
            if envoy.next_token.get() > envoy.answered.get() {
                let t = envoy.next_token.get();
                envoy.answered.set(t);
                let me = envoy.calls.borrow().last().unwrap().0;
                let i = workers.iter().position(|(w, _)| w.me == me).unwrap();
                return (i, t);
            }
            for (w, f) in workers.iter_mut() {
                f.on_tick(w);
            }
            envoy.now.set(envoy.now.get() + 100);
        }
        panic!("nobody polled");
    }

    fn workers(envoy: &Envoy, n: u64) -> Vec<(Worker<'_>, Follower)> {
        (1..=n)
            .map(|me| {
                (
                    Worker { envoy, me },
                    Follower::new("web".into(), cp(), SizeLimits::default(), me, None),
                )
            })
            .collect()
    }

    #[test]
    fn a_vm_configured_then_destroyed_does_not_hold_the_lease() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        // Envoy's configuration check: a VM configured (on_start) and never ticked.
        let (w0, mut f0) = (
            Worker {
                envoy: &envoy,
                me: 99,
            },
            Follower::new("web".into(), cp(), SizeLimits::default(), 99, None),
        );
        assert!(f0.on_start(&w0).is_none());
        assert!(envoy.data.borrow().is_empty(), "claimed at configure time");
        // The workers poll from their second tick (claim, then use).
        let mut ws = workers(&envoy, 2);
        for _ in 0..2 {
            for (w, f) in ws.iter_mut() {
                f.on_tick(w);
            }
            envoy.now.set(envoy.now.get() + 100);
        }
        assert_eq!(envoy.calls.borrow().len(), 1);
    }

    #[test]
    fn a_lease_whose_holder_is_gone_passes_to_another_worker_within_its_time() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let (i, _token) = poll_once(&envoy, &mut ws);
        // The holder's call is in flight for a long time; it renews every tick meanwhile.
        for _ in 0..50 {
            for (w, f) in ws.iter_mut() {
                f.on_tick(w);
            }
            envoy.now.set(envoy.now.get() + 100);
        }
        assert_eq!(
            envoy.calls.borrow().len(),
            1,
            "nobody else polled while it held"
        );
        // The holder's VM is gone: within the lease time (10 ticks) the other one polls.
        let (w, f) = &mut ws[1 - i];
        for _ in 0..12 {
            f.on_tick(w);
            envoy.now.set(envoy.now.get() + 100);
        }
        assert_eq!(envoy.calls.borrow().len(), 2);
    }

    #[test]
    fn one_worker_polls_and_every_worker_installs_each_version_once() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 3);
        let (i, token) = poll_once(&envoy, &mut ws);
        // Nobody else polls while the lease holder's call is in flight.
        for (w, f) in ws.iter_mut() {
            f.on_tick(w);
        }
        assert_eq!(envoy.calls.borrow().len(), 1);
        assert!(envoy.calls.borrow()[0]
            .1
            .starts_with("/v1/feed/web?epoch=0&version=0&health=0"));
        let (w, f) = &mut ws[i];
        let got = f.on_response(w, token, 200, &reply(7, 3, 5, Some(SEED), r#"{"A": 0}"#));
        let got = got.expect("installed");
        assert_eq!(got.health.get(0), Some(0));
        assert_eq!(
            f.held(),
            Held {
                epoch: 7,
                version: 3,
                health: 5,
                preview: 0,
            }
        );
        // The others take it from shared data on their next tick, once.
        for (j, (w, f)) in ws.iter_mut().enumerate() {
            let up = f.on_tick(w);
            assert_eq!(up.is_some(), j != i, "worker {j}");
            assert_eq!(
                f.held(),
                Held {
                    epoch: 7,
                    version: 3,
                    health: 5,
                    preview: 0,
                }
            );
            assert!(f.on_tick(w).is_none(), "installed twice");
        }
        let installs = envoy
            .events
            .borrow()
            .iter()
            .filter(|e| **e == "snapshot_installed")
            .count();
        assert_eq!(installs, 3);
    }

    #[test]
    fn health_only_answers_keep_the_strategy_and_move_every_worker() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        f.on_response(w, t, 200, &reply(1, 2, 1, Some(SEED), "{}"))
            .unwrap();
        for (w, f) in ws.iter_mut() {
            f.on_tick(w);
        }
        let (i, t) = poll_once(&envoy, &mut ws);
        assert!(envoy
            .calls
            .borrow()
            .last()
            .unwrap()
            .1
            .contains("epoch=1&version=2&health=1"));
        let (w, f) = &mut ws[i];
        let up = f
            .on_response(w, t, 200, &reply(1, 2, 2, None, r#"{"A": 0, "B": 4}"#))
            .unwrap();
        assert_eq!((up.health.get(0), up.health.get(1)), (Some(0), Some(4)));
        let other = 1 - i;
        let (w, f) = &mut ws[other];
        let up = f.on_tick(w).expect("health reaches the other worker");
        assert_eq!(up.health.get(1), Some(4));
        // A health-only answer for a version this worker does not hold is refused.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        assert!(f
            .on_response(w, t, 200, &reply(1, 9, 3, None, "{}"))
            .is_none());
        assert_eq!(f.held().version, 2);
        assert_eq!(envoy.events.borrow().last(), Some(&"feed_failed"));
    }

    #[test]
    fn a_new_epoch_wins_even_with_a_lower_version() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        f.on_response(w, t, 200, &reply(1, 40, 1, Some(SEED), "{}"))
            .unwrap();
        for (w, f) in ws.iter_mut() {
            f.on_tick(w);
        }
        // The control plane lost its store: epoch 2 starts again at version 1.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let up = f.on_response(
            w,
            t,
            200,
            &reply(
                2,
                1,
                1,
                Some(r#"{"route-strategy": {"B": {"status": "G"}}}"#),
                "{}",
            ),
        );
        assert_eq!(up.unwrap().compiled.clusters().len(), 1);
        for (w, f) in ws.iter_mut() {
            f.on_tick(w);
            assert_eq!(
                f.held(),
                Held {
                    epoch: 2,
                    version: 1,
                    health: 1,
                    preview: 0,
                },
                "every worker alike"
            );
        }
    }

    #[test]
    fn failures_back_off_and_keep_what_is_held() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 1);
        let (_, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[0];
        f.on_response(w, t, 200, &reply(1, 1, 1, Some(SEED), "{}"))
            .unwrap();
        // A good answer arms the long-poll again at once.
        assert_eq!(envoy.calls.borrow().len(), 2);
        // Garbage, an invalid strategy, an error status: each keeps version 1.
        for (status, body) in [
            (200, b"not json".to_vec()),
            (200, reply(1, 2, 1, Some(r#"{"route-strategy": {}}"#), "{}")),
            (503, Vec::new()),
        ] {
            let (w, f) = &mut ws[0];
            let calls = envoy.calls.borrow().len();
            let t = envoy.next_token.get();
            assert!(f.on_response(w, t, status, &body).is_none());
            assert_eq!(f.held().version, 1);
            // Backing off: no poll right away, neither at once nor at the next tick.
            f.on_tick(w);
            assert_eq!(envoy.calls.borrow().len(), calls);
            // After the backoff, the tick polls again.
            envoy.now.set(envoy.now.get() + 5_000);
            f.on_tick(w);
            assert_eq!(envoy.calls.borrow().len(), calls + 1);
        }
        // A response to an unknown token is ignored.
        let (w, f) = &mut ws[0];
        assert!(f
            .on_response(w, 999, 200, &reply(1, 5, 1, Some(SEED), "{}"))
            .is_none());
        // The call in flight fails; without a clock the follower does not poll at all.
        let t = envoy.next_token.get();
        assert!(f.on_response(w, t, 503, &[]).is_none());
        envoy.now.set(envoy.now.get() + 5_000);
        envoy.clock_broken.set(true);
        let calls = envoy.calls.borrow().len();
        f.on_tick(w);
        assert_eq!(envoy.calls.borrow().len(), calls);
        // A dispatch the host refuses counts as a failure.
        envoy.clock_broken.set(false);
        envoy.dispatch_fails.set(true);
        f.on_tick(w);
        assert_eq!(envoy.events.borrow().last(), Some(&"feed_failed"));
    }

    #[test]
    fn news_arms_the_long_poll_again_at_once_and_a_repeated_answer_does_not() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 1);
        let (_, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[0];
        assert!(f
            .on_response(w, t, 200, &reply(1, 1, 1, Some(SEED), "{}"))
            .is_some());
        assert_eq!(
            envoy.calls.borrow().len(),
            2,
            "polling again without a tick"
        );
        // The same answer again (a server repeating itself): no new call until the tick.
        let t = envoy.next_token.get();
        f.on_response(w, t, 200, &reply(1, 1, 1, None, "{}"));
        assert_eq!(envoy.calls.borrow().len(), 2);
        // Nor after a 304 answered at once (a server not holding the poll).
        f.on_tick(w);
        let t = envoy.next_token.get();
        f.on_response(w, t, 304, &[]);
        assert_eq!(envoy.calls.borrow().len(), 3);
        // A 304 that ends a long-poll held for a tick or more: armed again at once.
        f.on_tick(w);
        assert_eq!(envoy.calls.borrow().len(), 4);
        envoy.now.set(envoy.now.get() + 20_000);
        let t = envoy.next_token.get();
        f.on_response(w, t, 304, &[]);
        assert_eq!(envoy.calls.borrow().len(), 5, "re-armed without a tick");
    }

    #[test]
    fn a_strategy_over_the_size_limits_is_refused_and_the_last_one_kept() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let w = Worker {
            envoy: &envoy,
            me: 1,
        };
        let limits = SizeLimits {
            ids: 2,
            ..SizeLimits::default()
        };
        let mut f = Follower::new("web".into(), cp(), limits, 1, None);
        let mut answer = |version: u64, ids: &str| {
            envoy.now.set(envoy.now.get() + 5_000);
            f.on_tick(&w); // claims the lease
            f.on_tick(&w); // polls
            let t = envoy.next_token.get();
            let strategy = format!(
                r#"{{"route-strategy": {{"A": {{"status": "Y", "id": {{"ids": {ids}}}}}, "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#
            );
            let installed = f.on_response(&w, t, 200, &reply(1, version, 1, Some(&strategy), "{}"));
            (installed.is_some(), f.held().version)
        };
        assert_eq!(answer(1, "[1, 2]"), (true, 1), "at the limit");
        assert_eq!(
            answer(2, "[1, 2, 3]"),
            (false, 1),
            "over it: version 1 kept"
        );
        assert_eq!(envoy.events.borrow().last(), Some(&"feed_failed"));
        assert!(envoy.events.borrow().contains(&"feed_invalid"));
    }

    #[test]
    fn a_worker_between_the_two_writes_waits_for_the_next_tick() {
        let envoy = Envoy::default();
        let w = Worker {
            envoy: &envoy,
            me: 1,
        };
        let mut f = Follower::new("web".into(), cp(), SizeLimits::default(), 1, None);
        // Health already names version 3, the strategy key still holds version 2.
        let answer = |v: u64| reply(1, v, 1, Some(SEED), "{}");
        let publish = |v: u64| {
            w.shared_set(
                &feed::piece_key("web", 0),
                &feed::encode_piece(1, v, &answer(v)),
                None,
            );
            w.shared_set(
                &feed::strategy_key("web"),
                &feed::encode_strategy(1, v, 1),
                None,
            );
        };
        publish(2);
        let held = Held {
            epoch: 1,
            version: 3,
            health: 1,
            preview: 0,
        };
        w.shared_set(
            &feed::health_key("web"),
            &feed::encode_health(&held, &Healthy::new()),
            None,
        );
        assert!(f.sync_from_shared(&w).is_none());
        // The record names version 3 but its piece is still version 2's: a writer between
        // its writes, not an invalid snapshot.
        w.shared_set(
            &feed::strategy_key("web"),
            &feed::encode_strategy(1, 3, 1),
            None,
        );
        assert!(f.sync_from_shared(&w).is_none());
        assert_eq!(count(&envoy, "feed_invalid"), 0);
        publish(3);
        assert!(f.sync_from_shared(&w).is_some());
        assert_eq!(f.held(), held);
    }

    /// A strategy of many pieces (a million ids' worth of JSON is 32 pieces) reaches the
    /// other workers whole, in order.
    #[test]
    fn a_strategy_larger_than_a_piece_reaches_every_worker_exactly() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let ids: Vec<String> = (0..200_000u64).map(|i| (i * 3).to_string()).collect();
        let big = format!(
            r#"{{"route-strategy": {{"A": {{"status": "Y", "id": {{"ids": [{}]}}}}, "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#,
            ids.join(",")
        );
        let body = reply(1, 4, 1, Some(&big), "{}");
        assert!(body.len() > 4 * feed::PIECE, "{} bytes", body.len());
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let mine = f.on_response(w, t, 200, &body).unwrap();
        let (_, _, pieces) = feed::decode_strategy(
            &envoy
                .data
                .get(&feed::strategy_key("web"))
                .unwrap()
                .0
                .unwrap(),
        )
        .unwrap();
        assert_eq!(pieces as usize, body.len().div_ceil(feed::PIECE));
        let other = 1 - i;
        let (w, f) = &mut ws[other];
        let theirs = f
            .on_tick(w)
            .expect("the other worker installs from shared data");
        for id in [0u64, 3, 599_997, 1, 599_998, 600_000] {
            let probe = graylane_strategy::Id::Num(id);
            let hit = |c: &Compiled| c.cluster("A").unwrap().1.ids.lookup(Some(&probe));
            assert_eq!(hit(&theirs.compiled), hit(&mine.compiled), "id {id}");
            assert_eq!(hit(&mine.compiled).is_some(), id % 3 == 0 && id < 600_000);
        }
        assert_eq!(count(&envoy, "snapshot_installed"), 2);
        assert_eq!(count(&envoy, "feed_invalid"), 0);
    }

    #[test]
    fn a_preview_reaches_every_worker_outlives_a_new_version_and_stops_with_the_reply() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let (i, t) = poll_once(&envoy, &mut ws);
        assert!(
            last_path(&envoy).ends_with("&preview=0"),
            "{}",
            last_path(&envoy)
        );
        let (w, f) = &mut ws[i];
        let body = with_preview(
            reply(1, 1, 1, Some(SEED), r#"{"A": 3}"#),
            &format!(r#"{{"id": 4, "every": 2, "strategy": {CANDIDATE}}}"#),
        );
        let up = f.on_response(w, t, 200, &body).expect("installed");
        let p = up.preview.clone().expect("preview");
        assert_eq!((p.id, p.every, p.health.get(0)), (4, 2, Some(3)));
        assert_eq!(
            p.headers,
            up.compiled.needed_headers(),
            "the same identity sources"
        );
        assert_eq!(f.held().preview, 4);
        assert!(
            last_path(&envoy).ends_with("&preview=4"),
            "armed again, naming it"
        );
        // The other worker takes it from shared data.
        let (w, f) = &mut ws[1 - i];
        let other = f
            .on_tick(w)
            .expect("shared")
            .preview
            .expect("preview shared");
        assert_eq!(
            (other.id, other.every, other.health.get(0)),
            (4, 2, Some(3))
        );
        assert_eq!(other.compiled.clusters().len(), 2);
        assert!(f.on_tick(w).is_none(), "taken once");
        assert_eq!(count(&envoy, "preview_installed"), 2);

        // A new live version; the preview is named, not sent: both workers keep theirs.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let seed2 = r#"{"route-strategy": {"B": {"status": "G", "id": {"all": true}}}}"#;
        let body = with_preview(
            reply(1, 2, 1, Some(seed2), r#"{"A": 1}"#),
            r#"{"id": 4, "every": 2, "strategy": null}"#,
        );
        let kept = f.on_response(w, t, 200, &body).unwrap().preview.unwrap();
        assert_eq!(
            (kept.id, kept.health.get(0)),
            (4, Some(1)),
            "health recomputed"
        );
        let (w, f) = &mut ws[1 - i];
        let up = f.on_tick(w).unwrap();
        assert_eq!(up.compiled.clusters().len(), 1, "version 2");
        let kept = up.preview.unwrap();
        assert!(
            Rc::ptr_eq(&kept.compiled, &other.compiled),
            "not compiled again"
        );
        assert_eq!(kept.health.get(0), Some(1));
        assert_eq!(count(&envoy, "preview_installed"), 2);

        // Another preview, nothing else new: still news for every worker.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let body = with_preview(
            reply(1, 2, 1, None, r#"{"A": 1}"#),
            &format!(r#"{{"id": 5, "every": 1, "strategy": {CANDIDATE}}}"#),
        );
        assert_eq!(
            f.on_response(w, t, 200, &body).unwrap().preview.unwrap().id,
            5
        );
        let (w, f) = &mut ws[1 - i];
        let p = f.on_tick(w).unwrap().preview.unwrap();
        assert_eq!((p.id, p.every), (5, 1));

        // An answer without a preview: it stopped, in every worker.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let up = f.on_response(w, t, 200, &reply(1, 2, 1, None, r#"{"A": 1}"#));
        assert!(up.unwrap().preview.is_none());
        assert_eq!(f.held().preview, 0);
        assert!(last_path(&envoy).ends_with("&preview=0"));
        let (w, f) = &mut ws[1 - i];
        let up = f.on_tick(w).expect("the stop is news");
        assert!(up.preview.is_none());
        assert_eq!(up.compiled.clusters().len(), 1, "the live strategy stays");
        assert_eq!(f.held().preview, 0);
    }

    #[test]
    fn an_invalid_candidate_leaves_the_live_strategy_and_is_not_fetched_again() {
        let envoy = Envoy::default();
        envoy.now.set(1_000);
        let mut ws = workers(&envoy, 2);
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let body = with_preview(
            reply(1, 1, 1, Some(SEED), "{}"),
            r#"{"id": 9, "every": 1, "strategy": {"route-strategy": {}}}"#,
        );
        let up = f
            .on_response(w, t, 200, &body)
            .expect("the live strategy installs");
        assert_eq!(up.compiled.clusters().len(), 2);
        assert!(up.preview.is_none());
        assert_eq!(f.held().version, 1);
        assert_eq!(f.held().preview, 9, "held, so not asked for again");
        assert!(last_path(&envoy).ends_with("&preview=9"));
        assert_eq!(count(&envoy, "preview_invalid"), 1);
        assert_eq!(
            count(&envoy, "feed_invalid") + count(&envoy, "feed_failed"),
            0
        );
        // The other worker: the live strategy, no preview, the same id held; once.
        let (w, f) = &mut ws[1 - i];
        let up = f.on_tick(w).expect("shared");
        assert_eq!(up.compiled.clusters().len(), 2);
        assert!(up.preview.is_none());
        assert_eq!(f.held().preview, 9);
        for _ in 0..3 {
            assert!(f.on_tick(w).is_none());
        }
        assert_eq!(count(&envoy, "preview_invalid"), 2);
        // The control plane names it without sending it again: still nothing to evaluate.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let body = with_preview(
            reply(1, 1, 2, None, "{}"),
            r#"{"id": 9, "every": 1, "strategy": null}"#,
        );
        let up = f.on_response(w, t, 200, &body).unwrap();
        assert!(up.preview.is_none());
        assert_eq!((f.held().health, f.held().preview), (2, 9));
        assert_eq!(count(&envoy, "preview_invalid"), 2);
        // One named but never received: none held, so the next query asks for it.
        let (i, t) = poll_once(&envoy, &mut ws);
        let (w, f) = &mut ws[i];
        let body = with_preview(
            reply(1, 1, 2, None, "{}"),
            r#"{"id": 10, "every": 1, "strategy": null}"#,
        );
        assert!(f.on_response(w, t, 200, &body).unwrap().preview.is_none());
        assert_eq!(f.held().preview, 0);
        assert!(last_path(&envoy).ends_with("&preview=0"));
    }
}
