//! The root context: the Proxy-Wasm callbacks of one worker VM. Configuration is parsed once
//! (`on_configure`); the feed follower (`follower.rs`) does the rest, with this file as its
//! host.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use graylane_strategy::{hash::mix64, Compiled, Health, Lane, SizeLimits};

use crate::catalog;
use crate::config::{ControlPlane, PluginConfig, Serves};
use crate::destination::Destinations;
use crate::feed;
use crate::follower::{self, Follower, Installed};
use crate::host::{self, BufferType, LogLevel, MapType};
use crate::metrics::Metrics;
use crate::report::Reporter;
use crate::verdicts::Verdicts;

/// State the root context shares with its HTTP contexts (same VM, same thread).
pub struct Shared {
    pub route_header: String,
    pub reason_header: Option<String>,
    /// The services this VM routes, in the order it took them; never removed while the VM
    /// lives (a request in flight holds its index), only unlisted.
    pub services: Vec<Routed>,
    /// How a request finds its service, from its destination; `None` with one `service`
    /// (every request is that service's).
    pub destinations: Option<Destinations>,
    /// Whether requests are timed and their responses classified (traffic reports are on).
    pub reporting: bool,
    /// Signed gray cookies this VM has verified (bounded; keyed by the public key too, so
    /// one cache serves every service).
    pub verdicts: Verdicts,
    /// This worker's shared queue (the worker that installs a new version wakes the others
    /// through theirs), once registered.
    queue: Option<u32>,
    /// The shared-data list of the workers' queues.
    wake_key: String,
    /// This workload's lane per node label asked so far (`get_property` is costly: each label
    /// is read once per VM).
    lanes: Vec<(String, Option<Lane>)>,
    /// Counters of the catalog (serving every service).
    catalog_metrics: Option<Metrics>,
    rng: u64,
    pub debug: bool,
}

/// One service as the request path sees it.
pub struct Routed {
    pub name: String,
    /// The strategy in force and its health, with the preview evaluated beside it, if any.
    pub active: Option<Installed>,
    /// This workload's own lane, from the node label the strategy names (`lane.label`).
    pub own_lane: Option<Lane>,
    pub metrics: Metrics,
    /// Whether it is still served (in the catalog or the configuration).
    listed: bool,
}

impl Shared {
    /// The next random draw (SplitMix64; seeded per VM).
    pub fn draw(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.rng)
    }

    /// Routes service `at` by `installed` from now on. Its own lane is read from the node's
    /// label the strategy names, whichever way the strategy came (inline or from the feed).
    fn install(&mut self, at: usize, installed: Installed) {
        let label = installed.compiled.lane_label();
        let own_lane = match self.lanes.iter().find(|(l, _)| l == label) {
            Some((_, lane)) => *lane,
            None => {
                let lane = own_lane(label);
                self.lanes.push((label.to_string(), lane));
                lane
            }
        };
        let Some(svc) = self.services.get_mut(at) else {
            return;
        };
        svc.own_lane = own_lane;
        svc.metrics
            .clusters(installed.compiled.clusters().iter().map(|c| c.key.as_str()));
        // Another preview (or none) restarts its counts; the same one counts on across
        // versions and health.
        svc.metrics
            .preview(installed.preview.as_ref().map(|p| p.id));
        svc.active = Some(installed);
    }

    /// Counts an event of service `at`, or of the catalog (`None`).
    fn event(&self, at: Option<usize>, name: &'static str) {
        let metrics = match at {
            Some(i) => self.services.get(i).map(|s| &s.metrics),
            None => self.catalog_metrics.as_ref(),
        };
        if let Some(m) = metrics {
            m.event(name);
        }
    }

    fn flush(&self) {
        for s in &self.services {
            s.metrics.flush();
        }
        if let Some(m) = &self.catalog_metrics {
            m.flush();
        }
    }
}

/// What a worker keeps to follow one service: its feed and its traffic reports (same index
/// as `Shared::services`).
struct Feeds {
    follower: Option<Follower>,
    reporter: Option<Reporter>,
}

/// What serving another service takes (a filter serving several).
struct Serving {
    cp: ControlPlane,
    limits: SizeLimits,
    hosts: BTreeMap<String, String>,
    namespace: Option<String>,
    node: String,
}

pub struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    feeds: Vec<Feeds>,
    /// Serving every service: the control plane's list of them.
    catalog: Option<catalog::Follower>,
    /// Serving several services (listed or all).
    serving: Option<Serving>,
    /// Identifies this VM in the poll lease; seeds its random draws.
    me: u64,
}

/// The Proxy-Wasm host as a follower sees it; counts go to service `at`'s metrics (`None`:
/// the catalog's).
struct ProxyWasm<'a> {
    shared: &'a RefCell<Shared>,
    at: Option<usize>,
}

/// The host's clock in Unix milliseconds.
pub fn now_ms() -> Option<u64> {
    host::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
}

/// The VM's linear memory: what it ever grew to (a wasm heap never shrinks), so the peak of
/// parsing and compiling a strategy. Logged, so that an operator sees what a whitelist costs.
fn heap_kib() -> usize {
    #[cfg(target_arch = "wasm32")]
    {
        core::arch::wasm32::memory_size(0) * 64
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        0
    }
}

fn log(level: LogLevel, msg: &str) {
    let _ = host::log(level, msg);
}

impl follower::Host for ProxyWasm<'_> {
    fn now_ms(&self) -> Option<u64> {
        now_ms()
    }
    fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        host::get_shared_data(key).ok()
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        host::set_shared_data(key, value, cas).is_ok()
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, String> {
        host::dispatch_http_call(cluster, headers, body, timeout).map_err(|s| format!("{s:?}"))
    }
    fn event(&self, name: &'static str) {
        if let Ok(s) = self.shared.try_borrow() {
            s.event(self.at, name);
        }
    }
    fn warn(&self, msg: &str) {
        log(LogLevel::Warn, msg);
    }
    fn wake_others(&self) {
        let Ok(s) = self.shared.try_borrow() else {
            return;
        };
        let (Some((list, _)), mine) = (self.shared_get(&s.wake_key), s.queue) else {
            return;
        };
        for token in feed::decode_list(list.as_deref()) {
            let Ok(token) = u32::try_from(token) else {
                continue;
            };
            if Some(token) != mine {
                // A queue whose VM is gone answers NotFound: nothing to do.
                let _ = host::enqueue_shared_queue(token, b"news");
            }
        }
    }
}

/// Whether a root context that last ticked `ms` ago, `ticks` ticks of the VM's roots ago, is
/// gone (Envoy let go of it: a configured root ticks at least every `metrics::FLUSH`, 500 ms).
/// Both must be large: a step of the host's clock alone, or a VM whose many roots tick fast,
/// never drops a root that still serves requests.
pub fn gone(ms: u64, ticks: u64) -> bool {
    ms >= 60_000 && ticks >= 1_000
}

/// At most this many workers' queues are listed (VMs come and go with configuration
/// reloads; the oldest leave first).
const MAX_WAKE: usize = 256;

/// The shared-data list of the workers' queues when serving several services (`:` is in no
/// service name).
const MANY_WAKE_KEY: &str = "graylane:wake";

impl Root {
    pub fn new() -> Root {
        let seed = host::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Root {
            shared: None,
            feeds: Vec::new(),
            catalog: None,
            serving: None,
            me: mix64(seed) >> 1,
        }
    }

    /// Runs `f` with service `at`'s follower and its host; installs what it returns.
    fn follow(
        &mut self,
        at: usize,
        f: impl FnOnce(&mut Follower, &ProxyWasm<'_>) -> Option<Installed>,
    ) {
        let (Some(follower), Some(shared)) = (
            self.feeds.get_mut(at).and_then(|x| x.follower.as_mut()),
            self.shared.as_ref(),
        ) else {
            return;
        };
        let host = ProxyWasm {
            shared,
            at: Some(at),
        };
        if let Some(installed) = f(follower, &host) {
            if let Ok(mut s) = shared.try_borrow_mut() {
                s.install(at, installed);
                // Installs are rare: their count reaches Envoy's stats now, not at the tick.
                s.flush();
                log(
                    LogLevel::Debug,
                    &format!(
                        "graylane: strategy installed; wasm memory {} KiB",
                        heap_kib()
                    ),
                );
            }
        }
    }

    /// Every service's follower: `f`.
    fn follow_all(&mut self, f: impl Fn(&mut Follower, &ProxyWasm<'_>) -> Option<Installed>) {
        for at in 0..self.feeds.len() {
            self.follow(at, &f);
        }
    }

    /// Serves exactly `names` (several services): follows those not followed yet (taking
    /// what another worker fetched for them already), unlists the others, and rebuilds the
    /// destination table.
    fn serve(&mut self, names: &[String]) {
        let (Some(serving), Some(shared)) = (self.serving.as_ref(), self.shared.as_ref()) else {
            return;
        };
        let Ok(mut s) = shared.try_borrow_mut() else {
            return;
        };
        let mut added = Vec::new();
        for svc in s.services.iter_mut() {
            svc.listed = names.contains(&svc.name);
        }
        for name in names {
            if !graylane_strategy::name::service(name) || s.services.iter().any(|x| &x.name == name)
            {
                continue;
            }
            s.services.push(Routed {
                name: name.clone(),
                active: None,
                own_lane: None,
                metrics: Metrics::new(name),
                listed: true,
            });
            self.feeds.push(Feeds {
                follower: Some(Follower::new(
                    name.clone(),
                    serving.cp.clone(),
                    serving.limits,
                    self.me,
                    None,
                )),
                reporter: Reporter::new(name, serving.node.clone(), self.me, &serving.cp),
            });
            added.push(s.services.len() - 1);
        }
        let listed = s
            .services
            .iter()
            .enumerate()
            .filter(|(_, x)| x.listed)
            .map(|(i, x)| (i, x.name.as_str()));
        let table = Destinations::new(listed, &serving.hosts, serving.namespace.as_deref());
        s.destinations = Some(table);
        drop(s);
        for at in added {
            self.follow(at, |f, host| f.on_start(host));
        }
    }

    /// The catalog's news, if any, served.
    fn catalog(
        &mut self,
        f: impl FnOnce(&mut catalog::Follower, &ProxyWasm<'_>) -> Option<Vec<String>>,
    ) {
        let (Some(c), Some(shared)) = (self.catalog.as_mut(), self.shared.as_ref()) else {
            return;
        };
        let names = f(c, &ProxyWasm { shared, at: None });
        if let Some(names) = names {
            self.serve(&names);
        }
    }
}

impl Root {
    /// Registers this worker's shared queue (on its first tick: a VM Envoy only configures
    /// and destroys never ticks) and keeps it in the list of queues.
    fn register_queue(&mut self) {
        if self.feeds.iter().all(|f| f.follower.is_none()) && self.catalog.is_none() {
            return;
        }
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        let (wake_key, queue) = match shared.try_borrow() {
            Ok(s) => (s.wake_key.clone(), s.queue),
            Err(_) => return,
        };
        let queue = match queue {
            Some(q) => q,
            None => {
                let name = format!("{wake_key}/{}", self.me);
                let Ok(q) = host::register_shared_queue(&name) else {
                    return;
                };
                if let Ok(mut s) = shared.try_borrow_mut() {
                    s.queue = Some(q);
                }
                q
            }
        };
        let host = ProxyWasm { shared, at: None };
        feed::ensure_listed(&host, &wake_key, u64::from(queue), MAX_WAKE);
    }

    /// Whether service `at` is still served.
    fn listed(&self, at: usize) -> bool {
        self.shared
            .as_ref()
            .and_then(|s| s.try_borrow().ok())
            .and_then(|s| s.services.get(at).map(|x| x.listed))
            .unwrap_or(false)
    }

    /// Publishes this worker's traffic counts, per service; the lease holder of a service
    /// also sends its report.
    fn report(&mut self) {
        let listed: Vec<bool> = (0..self.feeds.len()).map(|at| self.listed(at)).collect();
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        for (at, feeds) in self.feeds.iter_mut().enumerate() {
            if !listed.get(at).copied().unwrap_or(false) {
                continue;
            }
            let (Some(r), Some(f)) = (feeds.reporter.as_mut(), feeds.follower.as_ref()) else {
                continue;
            };
            let host = ProxyWasm {
                shared,
                at: Some(at),
            };
            if let Ok(s) = shared.try_borrow() {
                if let Some(svc) = s.services.get(at) {
                    r.publish(&host, svc.metrics.activity(), |me, seq| {
                        svc.metrics.worker_counts(me, seq)
                    });
                }
            }
            if f.holds_lease() {
                r.send(&host, f.control_plane());
            }
        }
    }
}

/// This Envoy's node id (`node.id` of its bootstrap; Envoy's attribute `xds.node`), naming it
/// in traffic reports.
fn node_id() -> String {
    node_string(&["xds", "node", "id"]).unwrap_or_else(|| "unknown".into())
}

/// A non-empty string property of the node.
fn node_string(path: &[&str]) -> Option<String> {
    host::get_property(path)
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
}

impl Root {
    /// The state its requests share, once configured.
    pub fn shared(&self) -> Option<Rc<RefCell<Shared>>> {
        self.shared.clone()
    }

    pub fn on_http_call_response(&mut self, token: u32, body_size: usize) {
        let status = host::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        if let Some(shared) = self.shared.as_ref() {
            for (at, feeds) in self.feeds.iter_mut().enumerate() {
                let host = ProxyWasm {
                    shared,
                    at: Some(at),
                };
                if let Some(r) = feeds.reporter.as_mut() {
                    if r.on_response(&host, token, status) {
                        return;
                    }
                }
            }
        }
        // Read in pieces by whichever follower the call is its (never whole: see Follower).
        let body = HostBody {
            kind: BufferType::HttpCallResponseBody,
            size: if status == 200 { body_size } else { 0 },
        };
        let mut catalog_call = false;
        self.catalog(|c, host| {
            let answer = c.on_response(host, token, status, &body);
            catalog_call = answer.is_some();
            answer.flatten()
        });
        if !catalog_call {
            // Each follower takes only its own call.
            self.follow_all(|f, host| f.on_response(host, token, status, &body));
        }
    }

    pub fn on_configure(&mut self, size: usize) -> bool {
        if size == 0 {
            log(LogLevel::Error, "graylane: no plugin configuration");
            return false;
        }
        let reader = std::io::BufReader::with_capacity(
            CONFIG_CHUNK,
            HostReader {
                kind: BufferType::PluginConfiguration,
                offset: 0,
                size,
            },
        );
        let cfg = match PluginConfig::parse_reader(reader) {
            Ok(c) => c,
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("graylane: invalid configuration: {e}"),
                );
                return false;
            }
        };
        let serves = cfg.serves();
        let PluginConfig {
            route_header,
            reason_header,
            strategy,
            healthy,
            control_plane,
            limits,
            hosts,
            ..
        } = cfg;
        let compiled = match strategy
            .map(|s| limits.check(&s).and_then(|()| Compiled::try_from(s)))
            .transpose()
        {
            Ok(c) => c.map(Rc::new),
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("graylane: invalid configuration: strategy.{e}"),
                );
                return false;
            }
        };
        let debug = matches!(host::get_log_level(), Ok(LogLevel::Debug | LogLevel::Trace));
        let wake_key = match &serves {
            Serves::One(service) => feed::wake_key(service),
            _ => MANY_WAKE_KEY.to_string(),
        };
        let mut shared = Shared {
            route_header: route_header.to_ascii_lowercase(),
            reason_header: reason_header.map(|h| h.to_ascii_lowercase()),
            services: Vec::new(),
            destinations: None,
            reporting: control_plane.as_ref().is_some_and(|cp| cp.report_ms > 0),
            verdicts: Verdicts::default(),
            queue: None,
            wake_key,
            lanes: Vec::new(),
            catalog_metrics: None,
            rng: self.me,
            debug,
        };
        let tick = control_plane.as_ref().map_or(crate::metrics::FLUSH, |cp| {
            Duration::from_millis(cp.tick_ms).min(crate::metrics::FLUSH)
        });
        match serves {
            Serves::One(service) => {
                shared.services.push(Routed {
                    name: service.clone(),
                    active: None,
                    own_lane: None,
                    metrics: Metrics::new(&service),
                    listed: true,
                });
                if let Some(c) = &compiled {
                    let health = Health::from_counts(c, healthy.iter().map(|(k, v)| (k, Some(*v))));
                    shared.install(
                        0,
                        Installed {
                            compiled: c.clone(),
                            health,
                            preview: None,
                        },
                    );
                }
                self.shared = Some(Rc::new(RefCell::new(shared)));
                self.feeds.push(Feeds {
                    reporter: control_plane
                        .as_ref()
                        .and_then(|cp| Reporter::new(&service, node_id(), self.me, cp)),
                    follower: control_plane
                        .map(|cp| Follower::new(service, cp, limits, self.me, compiled)),
                });
                self.follow(0, |f, host| f.on_start(host));
            }
            serves => {
                // Checked by the configuration: serving by destination takes a control plane.
                let Some(cp) = control_plane else {
                    return false;
                };
                let namespace = node_string(&["xds", "node", "metadata", "NAMESPACE"])
                    .or_else(|| node_string(&["node", "metadata", "NAMESPACE"]));
                shared.destinations = Some(Destinations::default());
                if serves == Serves::All {
                    shared.catalog_metrics = Some(Metrics::catalog());
                    self.catalog = Some(catalog::Follower::new(cp.clone(), self.me));
                }
                self.shared = Some(Rc::new(RefCell::new(shared)));
                self.serving = Some(Serving {
                    cp,
                    limits,
                    hosts,
                    namespace,
                    node: node_id(),
                });
                match serves {
                    Serves::Listed(names) => self.serve(&names),
                    _ => self.catalog(|c, host| c.sync(host)),
                }
            }
        }
        // The tick flushes counters and, with a control plane, drives the feeds.
        let _ = host::set_tick_period(tick);
        log(
            LogLevel::Info,
            &format!("graylane: configured; wasm memory {} KiB", heap_kib()),
        );
        true
    }

    pub fn on_tick(&mut self) {
        self.catalog(|c, host| c.on_tick(host));
        self.register_queue();
        // A service the control plane no longer lists is not polled (nor reported).
        for at in 0..self.feeds.len() {
            if self.listed(at) {
                self.follow(at, |f, host| f.on_tick(host));
            }
        }
        if let Some(s) = self.shared.as_ref().and_then(|s| s.try_borrow().ok()) {
            s.flush();
        }
        self.report();
    }

    /// Another worker installed a new version (or a new list of services): take it now.
    pub fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = host::dequeue_shared_queue(queue_id) {}
        self.catalog(|c, host| c.sync(host));
        self.follow_all(|f, host| f.on_start(host));
    }
}

/// How much of the plugin configuration one host call reads.
const CONFIG_CHUNK: usize = 64 * 1024;

/// One of Envoy's buffers (the plugin configuration, a call's response body) read in
/// pieces, one host call a chunk.
struct HostReader {
    kind: BufferType,
    offset: usize,
    size: usize,
}

impl std::io::Read for HostReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = out.len().min(self.size.saturating_sub(self.offset));
        if want == 0 {
            return Ok(0);
        }
        let chunk = host::get_buffer(self.kind, self.offset, want)
            .map_err(|s| std::io::Error::other(format!("reading {:?}: {s:?}", self.kind)))?
            .unwrap_or_default();
        let n = chunk.len().min(want);
        if n == 0 {
            // The host says there is less than it announced: stop here (the parser then
            // reports where the text ended).
            self.size = self.offset;
            return Ok(0);
        }
        out[..n].copy_from_slice(&chunk[..n]);
        self.offset += n;
        Ok(n)
    }
}

/// A buffer of Envoy's that a follower reads, in pieces, as often as it needs.
struct HostBody {
    kind: BufferType,
    size: usize,
}

impl crate::follower::Body for HostBody {
    fn open(&self) -> Box<dyn std::io::Read + '_> {
        Box::new(std::io::BufReader::with_capacity(
            CONFIG_CHUNK,
            HostReader {
                kind: self.kind,
                offset: 0,
                size: self.size,
            },
        ))
    }
}

/// This workload's lane from its node label (Istio puts pod labels in node metadata
/// `LABELS`); read once per VM and label.
fn own_lane(label: &str) -> Option<Lane> {
    if label.is_empty() {
        return None;
    }
    let paths: [&[&str]; 2] = [
        &["xds", "node", "metadata", "LABELS", label],
        &["node", "metadata", "LABELS", label],
    ];
    for path in paths {
        if let Ok(Some(v)) = host::get_property(path) {
            if !v.is_empty() {
                return Some(Lane::from_value(&v));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::gone;

    #[test]
    fn a_root_is_gone_only_after_a_minute_and_a_thousand_ticks_both() {
        assert!(!gone(0, 0));
        // The host's clock stepped an hour ahead between two of its ticks: still serving.
        assert!(!gone(3_600_000, 5));
        // Many other roots ticking fast: still serving.
        assert!(!gone(400, 1_000_000));
        assert!(!gone(59_999, 5_000));
        assert!(!gone(600_000, 999));
        assert!(gone(60_000, 1_000));
    }
}
