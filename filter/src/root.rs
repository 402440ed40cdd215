//! The root context: the Proxy-Wasm callbacks of one worker VM. Configuration is parsed once
//! (`on_configure`); the feed follower (`follower.rs`) does the rest, with this file as its
//! host.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use graylane_strategy::{hash::mix64, Compiled, Health, Lane};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};

use crate::config::PluginConfig;
use crate::feed;
use crate::follower::{self, Follower, Installed};
use crate::http::Http;
use crate::metrics::Metrics;
use crate::report::Reporter;
use crate::verdicts::Verdicts;

/// State the root context shares with its HTTP contexts (same VM, same thread).
pub struct Shared {
    pub service: String,
    pub route_header: String,
    pub reason_header: Option<String>,
    /// The strategy in force and its health, with the preview evaluated beside it, if any.
    pub active: Option<Installed>,
    /// This workload's own lane, from the node label (cached: `get_property` is costly).
    pub own_lane: Option<Lane>,
    pub metrics: Metrics,
    /// Whether requests are timed and their responses classified (traffic reports are on).
    pub reporting: bool,
    /// Signed gray cookies this VM has verified (bounded).
    pub verdicts: Verdicts,
    /// This worker's shared queue (the worker that installs a new version wakes the others
    /// through theirs), once registered.
    queue: Option<u32>,
    rng: u64,
    pub debug: bool,
}

impl Shared {
    /// The next random draw (SplitMix64; seeded per VM).
    pub fn draw(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.rng)
    }

    fn install(&mut self, installed: Installed) {
        self.metrics
            .clusters(installed.compiled.clusters().iter().map(|c| c.key.as_str()));
        // Another preview (or none) restarts its counts; the same one counts on across
        // versions and health.
        self.metrics
            .preview(installed.preview.as_ref().map(|p| p.id));
        self.active = Some(installed);
    }
}

pub struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    follower: Option<Follower>,
    reporter: Option<Reporter>,
    /// Identifies this VM in the poll lease; seeds its random draws.
    me: u64,
}

/// The Proxy-Wasm host as the follower sees it; counts go to this VM's metrics.
struct ProxyWasm<'a> {
    shared: &'a RefCell<Shared>,
}

fn now_ms() -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
}

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

impl follower::Host for ProxyWasm<'_> {
    fn now_ms(&self) -> Option<u64> {
        now_ms()
    }
    fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
        hostcalls::get_shared_data(key)
            .ok()
            .map(|(v, cas)| (v, cas.unwrap_or(0)))
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        hostcalls::set_shared_data(key, Some(value), cas).is_ok()
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), body, vec![], timeout)
            .map_err(|s| format!("{s:?}"))
    }
    fn event(&self, name: &'static str) {
        if let Ok(s) = self.shared.try_borrow() {
            s.metrics.event(name);
        }
    }
    fn warn(&self, msg: &str) {
        log(LogLevel::Warn, msg);
    }
    fn wake_others(&self) {
        let Ok(s) = self.shared.try_borrow() else {
            return;
        };
        let (Some((list, _)), mine) = (self.shared_get(&feed::wake_key(&s.service)), s.queue)
        else {
            return;
        };
        for token in feed::decode_list(list.as_deref()) {
            let Ok(token) = u32::try_from(token) else {
                continue;
            };
            if Some(token) != mine {
                // A queue whose VM is gone answers NotFound: nothing to do.
                let _ = hostcalls::enqueue_shared_queue(token, Some(b"news"));
            }
        }
    }
}

/// At most this many workers' queues are listed per service (VMs come and go with
/// configuration reloads; the oldest leave first).
const MAX_WAKE: usize = 256;

impl Root {
    pub fn new() -> Root {
        let seed = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Root {
            shared: None,
            follower: None,
            reporter: None,
            me: mix64(seed) >> 1,
        }
    }

    /// Runs `f` with the follower and its host; installs what it returns.
    fn follow(&mut self, f: impl FnOnce(&mut Follower, &ProxyWasm<'_>) -> Option<Installed>) {
        let (Some(follower), Some(shared)) = (self.follower.as_mut(), self.shared.as_ref()) else {
            return;
        };
        let host = ProxyWasm { shared };
        if let Some(installed) = f(follower, &host) {
            if let Ok(mut s) = shared.try_borrow_mut() {
                s.install(installed);
                // Installs are rare: their count reaches Envoy's stats now, not at the tick.
                s.metrics.flush();
            }
        }
    }
}

impl Root {
    /// Registers this worker's shared queue (on its first tick: a VM Envoy only configures
    /// and destroys never ticks) and keeps it in the service's list.
    fn register_queue(&mut self) {
        if self.follower.is_none() {
            return;
        }
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        let (service, queue) = match shared.try_borrow() {
            Ok(s) => (s.service.clone(), s.queue),
            Err(_) => return,
        };
        let queue = match queue {
            Some(q) => q,
            None => {
                let name = format!("graylane/{service}/wake/{}", self.me);
                let Ok(q) = hostcalls::register_shared_queue(&name) else {
                    return;
                };
                if let Ok(mut s) = shared.try_borrow_mut() {
                    s.queue = Some(q);
                }
                q
            }
        };
        let host = ProxyWasm { shared };
        feed::ensure_listed(&host, &feed::wake_key(&service), u64::from(queue), MAX_WAKE);
    }

    /// Publishes this worker's traffic counts; the lease holder also sends the report.
    fn report(&mut self) {
        let (Some(r), Some(f), Some(shared)) = (
            self.reporter.as_mut(),
            self.follower.as_ref(),
            self.shared.as_ref(),
        ) else {
            return;
        };
        let host = ProxyWasm { shared };
        if let Ok(s) = shared.try_borrow() {
            r.publish(&host, s.metrics.activity(), |me, seq| {
                s.metrics.worker_counts(me, seq)
            });
        }
        if f.holds_lease() {
            r.send(&host, f.control_plane());
        }
    }
}

/// This Envoy's node id (`node.id` of its bootstrap; Envoy's attribute `xds.node`), naming it
/// in traffic reports.
fn node_id() -> String {
    hostcalls::get_property(vec!["xds", "node", "id"])
        .ok()
        .flatten()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _t: usize) {
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|s| std::str::from_utf8(&s).ok()?.parse::<u16>().ok())
            .unwrap_or(0);
        if let (Some(r), Some(shared)) = (self.reporter.as_mut(), self.shared.as_ref()) {
            if r.on_response(&ProxyWasm { shared }, token, status) {
                return;
            }
        }
        let body = if status == 200 {
            hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                .ok()
                .flatten()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        self.follow(|f, host| f.on_response(host, token, status, &body));
    }
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        if size == 0 {
            log(LogLevel::Error, "graylane: no plugin configuration");
            return false;
        }
        let reader =
            std::io::BufReader::with_capacity(CONFIG_CHUNK, ConfigReader { offset: 0, size });
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
        let PluginConfig {
            service,
            route_header,
            reason_header,
            strategy,
            healthy,
            control_plane,
            limits,
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
        let own_lane = compiled.as_ref().and_then(|c| own_lane(c.lane_label()));
        let debug = matches!(
            hostcalls::get_log_level(),
            Ok(LogLevel::Debug | LogLevel::Trace)
        );
        let mut shared = Shared {
            service: service.clone(),
            route_header: route_header.to_ascii_lowercase(),
            reason_header: reason_header.map(|h| h.to_ascii_lowercase()),
            active: None,
            own_lane,
            metrics: Metrics::new(&service),
            reporting: control_plane.as_ref().is_some_and(|cp| cp.report_ms > 0),
            verdicts: Verdicts::default(),
            queue: None,
            rng: self.me,
            debug,
        };
        if let Some(c) = &compiled {
            let health = Health::from_counts(c, healthy.iter().map(|(k, v)| (k, Some(*v))));
            shared.install(Installed {
                compiled: c.clone(),
                health,
                preview: None,
            });
        }
        self.shared = Some(Rc::new(RefCell::new(shared)));
        // The tick flushes counters and, with a control plane, drives the feed.
        let tick = control_plane.as_ref().map_or(crate::metrics::FLUSH, |cp| {
            Duration::from_millis(cp.tick_ms).min(crate::metrics::FLUSH)
        });
        let _ = hostcalls::set_tick_period(tick);
        self.reporter = control_plane
            .as_ref()
            .and_then(|cp| Reporter::new(&service, node_id(), self.me, cp));
        self.follower =
            control_plane.map(|cp| Follower::new(service, cp, limits, self.me, compiled));
        self.follow(|f, host| f.on_start(host));
        true
    }

    fn on_tick(&mut self) {
        self.register_queue();
        self.follow(|f, host| f.on_tick(host));
        if let Some(s) = self.shared.as_ref().and_then(|s| s.try_borrow().ok()) {
            s.metrics.flush();
        }
        self.report();
    }

    /// Another worker installed a new version: take it now.
    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue_id) {}
        self.follow(|f, host| f.on_start(host));
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Http::new(shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// How much of the plugin configuration one host call reads.
const CONFIG_CHUNK: usize = 64 * 1024;

/// The plugin configuration read in pieces, one host call a chunk.
struct ConfigReader {
    offset: usize,
    size: usize,
}

impl std::io::Read for ConfigReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = out.len().min(self.size.saturating_sub(self.offset));
        if want == 0 {
            return Ok(0);
        }
        let chunk = hostcalls::get_buffer(BufferType::PluginConfiguration, self.offset, want)
            .map_err(|s| std::io::Error::other(format!("reading the configuration: {s:?}")))?
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

/// This workload's lane from its node label (Istio puts pod labels in node metadata
/// `LABELS`); read once per configuration.
fn own_lane(label: &str) -> Option<Lane> {
    if label.is_empty() {
        return None;
    }
    let paths: [&[&str]; 2] = [
        &["xds", "node", "metadata", "LABELS", label],
        &["node", "metadata", "LABELS", label],
    ];
    for path in paths {
        if let Ok(Some(v)) = hostcalls::get_property(path.to_vec()) {
            if !v.is_empty() {
                return Some(Lane::from_value(&v));
            }
        }
    }
    None
}
