//! One service's router inside one nginx worker: the snapshot in force (strategy, health,
//! endpoints), replaced whole by the feed thread and read by the request path; the one call
//! of `graylane_strategy::decide` in this crate; the cluster's endpoints for the balancer.
//!
//! ```text
//!  feed thread ── Reply ──▶ apply ──▶ RwLock<Arc<Snapshot>> ◀── decide / peer (nginx's thread)
//! ```

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use graylane_strategy::hash::mix64;
use graylane_strategy::{Compiled, Headers, Health, Lane, Reason, RequestView, State};

use crate::config::Config;
use crate::feed::{self, Reply};

/// The strategy, health and endpoints in force, never changed once published.
#[derive(Debug)]
pub struct Snapshot {
    /// Moves whenever the strategy (so the cluster list and the headers it reads) or the
    /// feed's endpoints change; the Lua side caches its view of the snapshot per generation.
    pub generation: u32,
    /// The feed's store, strategy version and health generation this came from (all 0: the
    /// configuration's own strategy).
    pub epoch: u64,
    pub version: u64,
    pub health: u64,
    pub compiled: Option<Arc<Compiled>>,
    /// Healthy endpoint counts by cluster (from the registry, through the feed).
    pub healthy: Health,
    /// Endpoints the feed listed, by cluster key (kept across health-only answers).
    feed_endpoints: Option<BTreeMap<String, Vec<SocketAddr>>>,
    /// Endpoints in force by cluster key: the feed's, else the configuration's.
    endpoints: BTreeMap<String, Vec<SocketAddr>>,
    /// Clusters that just lost their last endpoint: the endpoints they had, until when, for
    /// requests decided before (nginx's balancer runs after the decision, and the feed may
    /// land in between).
    draining: BTreeMap<String, (Vec<SocketAddr>, Instant)>,
    /// The cluster used when no decision can be made.
    stable: Option<usize>,
    /// What the Lua side caches (see [`Snapshot::describe`]).
    description: String,
    /// When this worker installed it (microseconds since the Unix epoch; 0 if the clock is
    /// before 1970): the status page shows it, so an operator (and the propagation bench)
    /// can tell when each worker started deciding by it.
    installed_unix_micros: u64,
}

impl Snapshot {
    fn build(
        config: &Config,
        generation: u32,
        (epoch, version, health): (u64, u64, u64),
        compiled: Option<Arc<Compiled>>,
        healthy: &BTreeMap<String, Option<u32>>,
        feed_endpoints: Option<BTreeMap<String, Vec<SocketAddr>>>,
        prev: Option<&Snapshot>,
    ) -> Snapshot {
        let mut endpoints = config.endpoints.clone();
        if let Some(fed) = &feed_endpoints {
            for (k, v) in fed {
                endpoints.insert(k.clone(), v.clone());
            }
        }
        let now = Instant::now();
        let empty = |k: &str| endpoints.get(k).is_none_or(Vec::is_empty);
        let mut draining = BTreeMap::new();
        if let Some(p) = prev {
            for (k, (eps, until)) in &p.draining {
                if *until > now && empty(k) {
                    draining.insert(k.clone(), (eps.clone(), *until));
                }
            }
            for (k, eps) in &p.endpoints {
                if !eps.is_empty() && empty(k) {
                    draining.insert(k.clone(), (eps.clone(), now + config.drain));
                }
            }
        }
        let stable = compiled.as_deref().and_then(|c| stable_cluster(c, config));
        let healthy = compiled.as_deref().map_or(Health::UNKNOWN, |c| {
            Health::from_counts(c, healthy.iter().map(|(k, v)| (k, *v)))
        });
        let mut s = Snapshot {
            generation,
            epoch,
            version,
            health,
            compiled,
            healthy,
            feed_endpoints,
            endpoints,
            draining,
            stable,
            description: String::new(),
            installed_unix_micros: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        };
        s.description = s.render_description(config);
        s
    }

    /// A line-oriented description for the Lua side, read once per generation:
    ///
    /// ```text
    /// generation 3
    /// route_header x-graylane-cluster
    /// reason_header x-graylane-reason     (only when configured)
    /// lane_header x-graylane-lane
    /// needed x-tenant-id cookie :path     (the request headers decide may read, in order)
    /// reasons all id interval ...         (reason codes by ordinal)
    /// cluster A A gray                    (key, route header value, lane; by index)
    /// stable B B prod                     (when there is one)
    /// peer A 10.0.0.7 8080                (each endpoint in force: cluster key, IP, port)
    /// ```
    ///
    /// Every word is a validated name (no spaces or newlines).
    pub fn describe(&self) -> &str {
        &self.description
    }

    fn render_description(&self, config: &Config) -> String {
        let mut out = format!(
            "generation {}\nroute_header {}\n",
            self.generation, config.route_header
        );
        if let Some(h) = &config.reason_header {
            out.push_str(&format!("reason_header {h}\n"));
        }
        out.push_str("reasons");
        for code in Reason::CODES {
            out.push(' ');
            out.push_str(code);
        }
        out.push('\n');
        match &self.compiled {
            Some(c) => {
                out.push_str(&format!("lane_header {}\nneeded", c.lane_header()));
                for h in c.needed_headers() {
                    out.push(' ');
                    out.push_str(h);
                }
                out.push('\n');
                for cl in c.clusters() {
                    out.push_str(&format!(
                        "cluster {} {} {}\n",
                        cl.key,
                        cl.envoy,
                        cl.lane.as_str()
                    ));
                }
                if let Some(cl) = self.stable.and_then(|i| c.clusters().get(i)) {
                    out.push_str(&format!(
                        "stable {} {} {}\n",
                        cl.key,
                        cl.envoy,
                        cl.lane.as_str()
                    ));
                }
            }
            None => {
                out.push_str("lane_header x-graylane-lane\nneeded\n");
                if let Some(key) = &config.stable {
                    out.push_str(&format!("stable {key} {key} prod\n"));
                }
            }
        }
        // The balancer takes these as they are; a cluster with none (draining, or never
        // listed) asks the library (`graylane_peer`).
        for (key, list) in &self.endpoints {
            for a in list {
                out.push_str(&format!("peer {key} {} {}\n", a.ip(), a.port()));
            }
        }
        out
    }
}

impl Snapshot {
    /// Endpoint `index` (modulo their number) of cluster `key`, and how many it has; a
    /// cluster that just lost its last endpoint answers with those it had, while it drains.
    fn peer(&self, key: &str, index: u32) -> Option<(SocketAddr, usize)> {
        let list = self
            .endpoints
            .get(key)
            .filter(|l| !l.is_empty())
            .or_else(|| {
                self.draining
                    .get(key)
                    .filter(|(_, until)| *until > Instant::now())
                    .map(|(l, _)| l)
            })?;
        let n = list.len();
        let i = usize::try_from(index).ok()? % n.max(1);
        list.get(i).map(|a| (*a, n))
    }

    /// Cluster `i`'s (key, route header value, lane), as the description's `cluster` line.
    fn cluster(&self, i: usize) -> Option<(&str, &str, &'static str)> {
        let cl = self.compiled.as_deref()?.clusters().get(i)?;
        Some((&cl.key, &cl.envoy, cl.lane.as_str()))
    }

    /// The stable cluster's (index, key, route, lane), as the description's `stable` line
    /// (without a strategy: the configured one, in the prod lane).
    fn stable<'s>(&'s self, config: &'s Config) -> Option<(usize, &'s str, &'s str, &'static str)> {
        match &self.compiled {
            Some(_) => {
                let i = self.stable?;
                self.cluster(i).map(|(k, r, l)| (i, k, r, l))
            }
            None => config
                .stable
                .as_deref()
                .map(|k| (STABLE_WITHOUT_STRATEGY, k, k, Lane::Prod.as_str())),
        }
    }
}

/// The round-robin slot of the configured stable cluster when no strategy names it.
const STABLE_WITHOUT_STRATEGY: usize = RR_SLOTS - 1;
/// The lane header the rendered configuration sends with `proxy_set_header`.
const DEFAULT_LANE_HEADER: &str = "x-graylane-lane";
/// Round-robin counters per router, by cluster index (modulo).
const RR_SLOTS: usize = 64;

/// Where a request goes, as the native module acts on it (one snapshot for all of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed<'s> {
    /// The cluster's key, its route header value and its lane.
    pub key: &'s str,
    pub route: &'s str,
    pub lane: &'static str,
    /// The reason code; `no_snapshot` or `error` when the library could not decide (the
    /// stable cluster).
    pub code: &'static str,
    /// A cluster was skipped for health (the reason header says `,fallback_unhealthy`).
    pub fallback: bool,
    /// The strategy's lane header when it is not `x-graylane-lane` (the module sets it on
    /// the request itself, as the Lua side does).
    pub lane_header: Option<&'s str>,
    /// The cluster's next endpoint (round robin per worker), its index and how many the
    /// cluster has; `None` when it has none.
    pub peer: Option<(SocketAddr, u32, usize)>,
}

/// The configured stable cluster, else the strategy's G cluster of highest weight.
fn stable_cluster(c: &Compiled, config: &Config) -> Option<usize> {
    let clusters = c.clusters();
    if let Some(key) = &config.stable {
        if let Some(i) = clusters.iter().position(|cl| &cl.key == key) {
            return Some(i);
        }
    }
    clusters
        .iter()
        .enumerate()
        .filter(|(_, cl)| cl.state == State::G)
        .max_by_key(|(i, _)| (Health::UNKNOWN.weight(c, *i), std::cmp::Reverse(*i)))
        .map(|(i, _)| i)
}

/// The decision the Lua side acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `cluster` indexes the described clusters (`None`: no cluster can serve);
    /// `reason` indexes the reason codes; `fallback`: a cluster was skipped for health.
    Decided {
        cluster: Option<usize>,
        reason: usize,
        fallback: bool,
    },
    /// The snapshot moved past the caller's generation: describe again and retry.
    Stale,
    /// No strategy yet: the stable cluster, if any.
    NoStrategy,
}

/// Request headers handed over by the Lua side: `header(i, names[i])` is the value of
/// `names[i]` (the snapshot's needed headers), `None` when the request has none.
struct Given<'a, 'v, F> {
    names: &'a [String],
    header: F,
    values: PhantomData<&'v [u8]>,
}

impl<'v, F: Fn(usize, &str) -> Option<&'v [u8]>> Headers for Given<'_, 'v, F> {
    fn get(&self, name: &str) -> Option<&[u8]> {
        let i = self.names.iter().position(|n| n == name)?;
        (self.header)(i, name)
    }
}

/// Feed counters for the status page and the log.
#[derive(Debug, Default)]
pub struct Stats {
    ok: AtomicU64,
    not_modified: AtomicU64,
    failed: AtomicU64,
    in_a_row: AtomicU64,
    endpoints_skipped: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Signed gray cookies: signatures verified, and answered from the worker's cache.
    cookies_verified: AtomicU64,
    cookies_remembered: AtomicU64,
}

impl Stats {
    pub(crate) fn not_modified(&self) {
        self.not_modified.fetch_add(1, Ordering::Relaxed);
        self.in_a_row.store(0, Ordering::Relaxed);
    }

    fn ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.in_a_row.store(0, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, e: &feed::Error) {
        // The error first: whoever sees the count move finds its error.
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.in_a_row.fetch_add(1, Ordering::Relaxed);
    }

    /// Log the 1st, 2nd, 4th, 8th... failure in a row, not every retry of an outage.
    pub(crate) fn should_log_failure(&self) -> bool {
        self.in_a_row.load(Ordering::Relaxed).is_power_of_two()
    }
}

/// One service's router in one nginx worker.
#[derive(Debug)]
pub struct Router {
    config: Config,
    state: RwLock<Arc<Snapshot>>,
    rng: AtomicU64,
    closed: AtomicBool,
    wake: (Mutex<()>, Condvar),
    pub(crate) stats: Stats,
    /// Signed gray cookies this worker verified (the filter's bounded cache, shared code): a
    /// cookie's signature is checked once, then looked up. Locked only by the worker's own
    /// thread (nginx calls decide from its one event loop), so never contended.
    verdicts: Mutex<graylane_strategy::verdicts::Verdicts>,
    /// The native module's round robin, by cluster index (the Lua side keeps its own).
    rr: [AtomicU32; RR_SLOTS],
}

impl Router {
    /// Builds the router from its configuration and, with a control plane, starts the
    /// thread that follows the feed. Call it in the nginx worker (never in the master: a
    /// thread does not survive `fork`).
    pub fn open(config: Config) -> Result<Arc<Router>, graylane_strategy::Error> {
        let compiled = config.strategy.clone();
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let snapshot = Snapshot::build(
            &config,
            1,
            (0, 0, 0),
            compiled,
            &BTreeMap::new(),
            None,
            None,
        );
        let cp = config.control_plane.clone();
        let router = Arc::new(Router {
            config,
            state: RwLock::new(Arc::new(snapshot)),
            rng: AtomicU64::new(mix64(seed)),
            closed: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            stats: Stats::default(),
            verdicts: Mutex::new(graylane_strategy::verdicts::Verdicts::default()),
            rr: std::array::from_fn(|_| AtomicU32::new(0)),
        });
        if let Some(cp) = cp {
            let r = router.clone();
            std::thread::Builder::new()
                .name(format!("graylane-feed-{}", router.config.service))
                .spawn(move || feed::follow(r, cp))
                .map_err(|e| graylane_strategy::Error::Invalid {
                    path: "control_plane".into(),
                    message: format!("cannot start the feed thread: {e}"),
                })?;
        }
        Ok(router)
    }

    /// The response header naming the cluster and reason, when configured.
    pub fn reason_header(&self) -> Option<&str> {
        self.config.reason_header.as_deref()
    }

    pub fn service(&self) -> &str {
        &self.config.service
    }

    /// The snapshot in force.
    pub fn current(&self) -> Arc<Snapshot> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn generation(&self) -> u32 {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }

    /// What this worker holds: the feed's (epoch, version, health).
    pub(crate) fn held(&self) -> (u64, u64, u64) {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        (s.epoch, s.version, s.health)
    }

    /// Stops the feed thread (it ends after its poll in flight).
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _guard = self.wake.0.lock().unwrap_or_else(PoisonError::into_inner);
        self.wake.1.notify_all();
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Sleeps `d`, or less if closed meanwhile.
    pub(crate) fn sleep(&self, d: Duration) {
        let guard = self.wake.0.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_closed() {
            return;
        }
        let _ = self.wake.1.wait_timeout(guard, d);
    }

    /// The next random draw (SplitMix64 over an atomic counter).
    fn draw(&self) -> u64 {
        mix64(self.rng.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    /// Decides for a request whose needed headers (in the order of generation `generation`'s
    /// description) have `values`.
    pub fn decide(&self, generation: u32, values: &[Option<&[u8]>]) -> Outcome {
        self.decide_by(generation, |i, _| values.get(i).copied().flatten())
    }

    /// Decides for a request whose needed header number `i`, named `name` (in the order of
    /// generation `generation`'s description), is `header(i, name)`; asked only for the
    /// headers the decision reads, and never for one the strategy does not need.
    pub fn decide_by<'v>(
        &self,
        generation: u32,
        header: impl Fn(usize, &str) -> Option<&'v [u8]>,
    ) -> Outcome {
        let snap = self.state.read().unwrap_or_else(PoisonError::into_inner);
        if snap.generation != generation {
            return Outcome::Stale;
        }
        self.decide_in(&snap, header)
    }

    /// Decides by snapshot `snap` (the one in force, read-locked by the caller).
    fn decide_in<'v>(
        &self,
        snap: &Snapshot,
        header: impl Fn(usize, &str) -> Option<&'v [u8]>,
    ) -> Outcome {
        let Some(c) = snap.compiled.as_deref() else {
            return Outcome::NoStrategy;
        };
        let headers = Given {
            names: c.needed_headers(),
            header,
            values: PhantomData,
        };
        // A clock before 1970 is no clock: then no expiring cookie is honoured.
        let now = if c.needs_clock() {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        } else {
            None
        };
        let req = RequestView {
            headers: &headers,
            tenant: None,
            own_lane: self.config.own_lane,
            now,
            draw: self.draw(),
        };
        // The one decision of this crate: graylane-strategy's own, with verified cookies
        // remembered (the decision is `decide`'s; the cache only saves work).
        let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        let cached = graylane_strategy::verdicts::Cached::new(&mut verdicts);
        let d = graylane_strategy::decide_with(c, &snap.healthy, &req, &cached);
        let st = &self.stats;
        // Most requests carry no signed cookie: no atomic write for them.
        let (verified, remembered) = (cached.verified.get(), cached.remembered.get());
        if verified > 0 {
            st.cookies_verified
                .fetch_add(u64::from(verified), Ordering::Relaxed);
        }
        if remembered > 0 {
            st.cookies_remembered
                .fetch_add(u64::from(remembered), Ordering::Relaxed);
        }
        Outcome::Decided {
            cluster: d.cluster,
            reason: d.reason.ordinal(),
            fallback: d.fallback.is_some(),
        }
    }

    /// Endpoint `index` (modulo their number) of cluster `key`, and how many it has; a
    /// cluster that just lost its last endpoint answers with those it had, while it drains.
    pub fn peer(&self, key: &[u8], index: u32) -> Option<(SocketAddr, usize)> {
        let key = std::str::from_utf8(key).ok()?;
        self.current().peer(key, index)
    }

    /// Decides for a request (`header(i, name)` as in [`Router::decide_by`]) and picks the
    /// chosen cluster's next endpoint, all from the snapshot in force, and hands the result
    /// to `then`. A request the library cannot decide (no strategy yet, a snapshot that
    /// keeps moving) goes to the stable cluster; `then(None)` when no cluster can serve.
    pub fn route_by<'v, R>(
        &self,
        header: impl Fn(usize, &str) -> Option<&'v [u8]>,
        then: impl FnOnce(Option<Routed<'_>>) -> R,
    ) -> R {
        // One read lock for the decision and the endpoint (the feed thread takes the write
        // lock only to swap the Arc).
        let snap = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let chosen = match self.decide_in(&snap, header) {
            Outcome::Decided {
                cluster: Some(i),
                reason,
                fallback,
            } => snap.cluster(i).map(|(key, route, lane)| {
                let code = Reason::CODES.get(reason).copied().unwrap_or("unknown");
                (i, key, route, lane, code, fallback)
            }),
            Outcome::Decided { cluster: None, .. } => None,
            Outcome::NoStrategy => snap
                .stable(&self.config)
                .map(|(i, key, route, lane)| (i, key, route, lane, "no_snapshot", false)),
            // Not answered by decide_in (no generation to be stale against).
            Outcome::Stale => snap
                .stable(&self.config)
                .map(|(i, key, route, lane)| (i, key, route, lane, "error", false)),
        };
        let Some((i, key, route, lane, code, fallback)) = chosen else {
            return then(None);
        };
        let next = self.rr[i % RR_SLOTS].fetch_add(1, Ordering::Relaxed);
        let lane_header = snap
            .compiled
            .as_deref()
            .map(Compiled::lane_header)
            .filter(|h| *h != DEFAULT_LANE_HEADER);
        then(Some(Routed {
            key,
            route,
            lane,
            code,
            fallback,
            lane_header,
            peer: snap.peer(key, next).map(|(a, n)| (a, next, n)),
        }))
    }

    /// Applies a feed answer: a new strategy, or health and endpoints for the one in force.
    /// An answer that cannot be used changes nothing.
    pub fn apply(&self, reply: Reply) -> Result<(), feed::Error> {
        if reply.service != self.config.service {
            return Err(feed::Error::Rejected(format!(
                "for service {:?}, expected {:?}",
                reply.service, self.config.service
            )));
        }
        let cur = self.current();
        let (compiled, new_strategy) = match reply.strategy.and_then(|s| s.0) {
            Some(spec) => {
                let c = self
                    .config
                    .limits
                    .check(&spec)
                    .and_then(|()| Compiled::try_from(spec))
                    .map_err(|e| {
                        feed::Error::Parse(
                            e.within(&format!("strategy (version {})", reply.version)),
                        )
                    })?;
                (Arc::new(c), true)
            }
            // Health (and endpoints) only: for the strategy this worker holds.
            None => match &cur.compiled {
                Some(c) if (cur.epoch, cur.version) == (reply.epoch, reply.version) => {
                    (c.clone(), false)
                }
                _ => {
                    return Err(feed::Error::Rejected(format!(
                    "health-only answer for version {} (epoch {}) that this worker does not hold",
                    reply.version, reply.epoch
                )))
                }
            },
        };
        let feed_endpoints = match reply.endpoints {
            Some(map) => Some(self.addresses(map)),
            None => cur.feed_endpoints.clone(),
        };
        // A new strategy or new endpoints: a new generation, so the Lua side reads them.
        let moved = new_strategy || feed_endpoints != cur.feed_endpoints;
        let generation = cur.generation.wrapping_add(u32::from(moved));
        let snap = Snapshot::build(
            &self.config,
            generation,
            (reply.epoch, reply.version, reply.health),
            Some(compiled),
            &reply.healthy,
            feed_endpoints,
            Some(&cur),
        );
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snap);
        self.stats.ok();
        Ok(())
    }

    /// Feed endpoints as socket addresses; names nginx's balancer cannot take are skipped.
    fn addresses(
        &self,
        map: BTreeMap<String, Vec<graylane_strategy::feed::Endpoint>>,
    ) -> BTreeMap<String, Vec<SocketAddr>> {
        map.into_iter()
            .map(|(key, list)| {
                let addrs: Vec<SocketAddr> = list
                    .iter()
                    .filter_map(|e| match e.address.parse::<IpAddr>() {
                        Ok(ip) => Some(SocketAddr::new(ip, e.port)),
                        Err(_) => {
                            self.stats.endpoints_skipped.fetch_add(1, Ordering::Relaxed);
                            None
                        }
                    })
                    .collect();
                (key, addrs)
            })
            .collect()
    }

    /// The worker's view, as JSON, for a status location.
    pub fn status(&self) -> String {
        let s = self.current();
        let clusters: Vec<serde_json::Value> = s
            .compiled
            .as_deref()
            .map(|c| {
                c.clusters()
                    .iter()
                    .enumerate()
                    .map(|(i, cl)| {
                        serde_json::json!({
                            "key": cl.key, "route": cl.envoy, "state": cl.state.to_string(),
                            "lane": cl.lane.as_str(), "healthy": s.healthy.get(i),
                            "endpoints": s.endpoints.get(&cl.key).map(|v| v.iter().map(ToString::to_string).collect::<Vec<_>>()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let st = &self.stats;
        let last_error = st
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "service": self.config.service,
            "pid": std::process::id(),
            "generation": s.generation,
            "epoch": s.epoch,
            "version": s.version,
            "health": s.health,
            "installed_unix_micros": s.installed_unix_micros,
            "strategy": s.compiled.is_some(),
            "clusters": clusters,
            "feed": {
                "control_plane": self.config.control_plane.as_ref().map(|c| c.url.clone()),
                "ok": st.ok.load(Ordering::Relaxed),
                "not_modified": st.not_modified.load(Ordering::Relaxed),
                "failed": st.failed.load(Ordering::Relaxed),
                "endpoints_skipped": st.endpoints_skipped.load(Ordering::Relaxed),
                "last_error": last_error,
            },
            "cookies": {
                "verified": st.cookies_verified.load(Ordering::Relaxed),
                "remembered": st.cookies_remembered.load(Ordering::Relaxed),
            },
        })
        .to_string()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use graylane_strategy::cookie::{self, SigningKey};
    use graylane_strategy::Id;

    /// A worker verifies a signed gray cookie once, then answers it from its cache (as the
    /// Envoy filter does); a forged one is verified every time and never gray.
    #[test]
    fn a_signed_cookie_is_verified_once_per_worker() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let public = cookie::public_key_text(&key.verifying_key());
        let cfg = format!(
            r#"{{"service": "web", "strategy": {{
                "gray_cookie": {{"keys": [{{"id": "k1", "public_key": "{public}"}}]}},
                "route-strategy": {{"prod": {{"status": "G", "id": {{"all": true}}}},
                                   "gray": {{"status": "Y", "gray_cookie": true}}}}}}}}"#
        );
        let router = Router::open(Config::parse(cfg.as_bytes()).unwrap()).unwrap();
        let generation = router.generation();
        let names = router
            .current()
            .compiled
            .clone()
            .unwrap()
            .needed_headers()
            .to_vec();
        let good = format!(
            "tenantGray={}",
            cookie::sign(&key, "k1", &Id::Num(42), u64::MAX / 2)
        );
        let forged = format!("{}A", &good[..good.len() - 1]);
        let decide = |cookie: &str| {
            let values: Vec<Option<&[u8]>> = names
                .iter()
                .map(|n| match n.as_str() {
                    "x-tenant-id" => Some(&b"42"[..]),
                    "cookie" => Some(cookie.as_bytes()),
                    _ => None,
                })
                .collect();
            match router.decide(generation, &values) {
                Outcome::Decided { cluster, .. } => cluster,
                other => panic!("{other:?}"),
            }
        };
        let gray = router
            .current()
            .compiled
            .clone()
            .unwrap()
            .cluster("gray")
            .unwrap()
            .0;
        for _ in 0..5 {
            assert_eq!(decide(&good), Some(gray));
        }
        for _ in 0..3 {
            assert_ne!(decide(&forged), Some(gray));
        }
        let status: serde_json::Value = serde_json::from_str(&router.status()).unwrap();
        assert_eq!(
            status["cookies"],
            serde_json::json!({"verified": 4, "remembered": 4})
        );
        router.close();
    }
}
