//! The root context: configuration, the current snapshot, the live feed.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use graylane_strategy::{hash::mix64, parse_json, Compiled, Lane};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};

use crate::config::{ControlPlane, PluginConfig};
use crate::feed::{self, FeedResponse, Healthy};
use crate::http::Http;
use crate::metrics::Metrics;

/// The strategy in force, with the feed versions it came from (0 = from the plugin config).
pub struct Active {
    pub compiled: Compiled,
    pub version: u64,
    pub health: u64,
}

/// State the root context shares with its HTTP contexts (same VM, same thread).
pub struct Shared {
    pub service: String,
    pub route_header: String,
    pub reason_header: Option<String>,
    pub active: Option<Active>,
    /// This workload's own lane, from the node label (cached: `get_property` is costly).
    pub own_lane: Option<Lane>,
    pub metrics: Metrics,
    rng: u64,
    pub debug: bool,
}

impl Shared {
    /// The next random draw (SplitMix64; seeded per VM).
    pub fn draw(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.rng)
    }
}

pub struct Root {
    shared: Option<Rc<RefCell<Shared>>>,
    cp: Option<ControlPlane>,
    /// Identifies this VM in the poll lease.
    me: u64,
    in_flight: Option<u32>,
    next_poll_ms: u64,
    backoff_ms: u64,
}

fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn log(level: LogLevel, msg: &str) {
    let _ = hostcalls::log(level, msg);
}

impl Root {
    pub fn new() -> Root {
        let seed = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        Root {
            shared: None,
            cp: None,
            me: mix64(seed) >> 1,
            in_flight: None,
            next_poll_ms: 0,
            backoff_ms: 0,
        }
    }

    fn service(&self) -> Option<String> {
        self.shared
            .as_ref()
            .and_then(|s| s.try_borrow().ok().map(|s| s.service.clone()))
    }

    /// Installs `compiled` as the active snapshot.
    fn install(&self, mut compiled: Compiled, version: u64, health: u64, healthy: &Healthy) {
        let Some(shared) = &self.shared else { return };
        let Ok(mut s) = shared.try_borrow_mut() else {
            return;
        };
        for (key, h) in healthy {
            compiled.set_healthy(key, *h);
        }
        let keys: Vec<String> = compiled.clusters().iter().map(|c| c.key.clone()).collect();
        s.metrics.clusters(keys.iter().map(String::as_str));
        s.active = Some(Active {
            compiled,
            version,
            health,
        });
        s.metrics.event("snapshot_installed");
    }

    /// Applies a health-only change to the active snapshot, if it is at `version`.
    fn apply_health(&self, version: u64, health: u64, healthy: &Healthy) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        let Ok(mut s) = shared.try_borrow_mut() else {
            return false;
        };
        match s.active.as_mut() {
            Some(a) if a.version == version => {
                for (key, h) in healthy {
                    a.compiled.set_healthy(key, *h);
                }
                a.health = health;
                true
            }
            _ => false,
        }
    }

    fn versions(&self) -> (u64, u64) {
        self.shared
            .as_ref()
            .and_then(|s| s.try_borrow().ok())
            .and_then(|s| s.active.as_ref().map(|a| (a.version, a.health)))
            .unwrap_or((0, 0))
    }

    fn event(&self, name: &'static str) {
        if let Some(s) = self.shared.as_ref().and_then(|s| s.try_borrow().ok()) {
            s.metrics.event(name);
        }
    }

    /// Picks up what another worker fetched.
    fn sync_from_shared(&self) {
        let Some(service) = self.service() else {
            return;
        };
        let Ok((Some(bytes), _)) = hostcalls::get_shared_data(&feed::health_key(&service)) else {
            return;
        };
        let Some((version, health, healthy)) = feed::decode_health(&bytes) else {
            return;
        };
        let (have_v, have_h) = self.versions();
        if version == have_v && health == have_h {
            return;
        }
        if version == have_v {
            self.apply_health(version, health, &healthy);
            return;
        }
        if version < have_v {
            return;
        }
        let Ok((Some(doc), _)) = hostcalls::get_shared_data(&feed::strategy_key(&service)) else {
            return;
        };
        match feed::decode_strategy(&doc) {
            Some((v, json)) if v == version => match parse_json(json).and_then(Compiled::compile) {
                Ok(c) => self.install(c, version, health, &healthy),
                Err(e) => {
                    self.event("feed_invalid");
                    log(
                        LogLevel::Warn,
                        &format!("graylane: shared snapshot invalid: {e}"),
                    );
                }
            },
            _ => {} // a writer is between its two writes; next tick
        }
    }

    /// The poll lease: true when this VM holds it (renewed with CAS) and should poll now.
    ///
    /// Envoy's shared data has no atomic create (a CAS of 0 means "unconditional"), so a
    /// free or expired lease is only *claimed* in one tick and used from the next, if the
    /// claim is still this VM's: of several workers claiming at once, the last writer wins
    /// and the others see its claim before they poll.
    fn take_lease(&self, service: &str, now: u64, cp: &ControlPlane) -> bool {
        let key = feed::lease_key(service);
        let Ok((cur, cas)) = hostcalls::get_shared_data(&key) else {
            return false;
        };
        let deadline = now + cp.wait_ms + 10_000;
        let value = format!("{} {deadline}", self.me);
        match cur.as_deref().and_then(feed::decode_lease) {
            Some((owner, _)) if owner == self.me => matches!(
                hostcalls::set_shared_data(&key, Some(value.as_bytes()), cas),
                Ok(())
            ),
            Some((_, until)) if until >= now => false,
            _ => {
                let _ = hostcalls::set_shared_data(&key, Some(value.as_bytes()), cas);
                false
            }
        }
    }

    fn poll(&mut self) {
        let Some(cp) = self.cp.clone() else { return };
        if self.in_flight.is_some() {
            return;
        }
        let now = now_ms();
        if now < self.next_poll_ms {
            return;
        }
        let Some(service) = self.service() else {
            return;
        };
        if !self.take_lease(&service, now, &cp) {
            return;
        }
        let (v, h) = self.versions();
        let path = format!(
            "/v1/feed/{service}?version={v}&health={h}&wait_ms={}",
            cp.wait_ms
        );
        let node = self.me.to_string();
        let auth = cp.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", cp.authority.as_str()),
            ("x-graylane-node", node.as_str()),
        ];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let timeout = Duration::from_millis(cp.wait_ms + 5_000);
        match hostcalls::dispatch_http_call(&cp.cluster, headers, None, vec![], timeout) {
            Ok(token) => self.in_flight = Some(token),
            Err(status) => {
                self.failed(
                    now,
                    &format!("dispatch to cluster {}: {status:?}", cp.cluster),
                );
            }
        }
    }

    fn failed(&mut self, now: u64, why: &str) {
        self.event("feed_failed");
        self.backoff_ms = (self.backoff_ms * 2).clamp(200, 2_000);
        self.next_poll_ms = now + self.backoff_ms;
        log(
            LogLevel::Warn,
            &format!("graylane: feed failed, keeping the last snapshot: {why}"),
        );
    }

    fn on_feed(&mut self, body: &[u8]) -> Result<(), String> {
        let service = self.service().unwrap_or_default();
        let resp = FeedResponse::parse(body)?;
        if resp.service != service {
            return Err(format!(
                "feed for service {:?}, expected {service:?}",
                resp.service
            ));
        }
        match &resp.strategy {
            Some(raw) => {
                let compiled = parse_json(raw.get().as_bytes())
                    .and_then(Compiled::compile)
                    .map_err(|e| format!("strategy version {}: {e}", resp.version))?;
                self.install(compiled, resp.version, resp.health, &resp.healthy);
                // Strategy first, then health: the health key is the commit point.
                let doc = feed::encode_strategy(resp.version, raw.get().as_bytes());
                let _ = hostcalls::set_shared_data(&feed::strategy_key(&service), Some(&doc), None);
            }
            None => {
                if !self.apply_health(resp.version, resp.health, &resp.healthy) {
                    return Err(format!(
                        "health-only answer for version {} that this worker does not hold",
                        resp.version
                    ));
                }
            }
        }
        let h = feed::encode_health(resp.version, resp.health, &resp.healthy);
        let _ = hostcalls::set_shared_data(&feed::health_key(&service), Some(&h), None);
        Ok(())
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _t: usize) {
        if self.in_flight != Some(token) {
            return;
        }
        self.in_flight = None;
        let now = now_ms();
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .unwrap_or_default();
        match status.as_slice() {
            b"200" => {
                let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                match self.on_feed(&body) {
                    Ok(()) => {
                        self.backoff_ms = 0;
                        self.event("feed_ok");
                    }
                    Err(e) => {
                        self.event("feed_invalid");
                        self.failed(now, &e);
                    }
                }
            }
            b"304" => {
                self.backoff_ms = 0;
                self.event("feed_not_modified");
            }
            other => {
                let why = format!("status {}", String::from_utf8_lossy(other));
                self.failed(now, &why);
            }
        }
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
            control_plane,
        } = cfg;
        let compiled = match strategy.map(Compiled::compile).transpose() {
            Ok(c) => c,
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("graylane: invalid configuration: strategy.{e}"),
                );
                return false;
            }
        };
        let own_lane = compiled.as_ref().and_then(|c| own_lane(c.lane_label()));
        let mut metrics = Metrics::new(&service);
        if let Some(c) = &compiled {
            metrics.clusters(c.clusters().iter().map(|c| c.key.as_str()));
        }
        let debug = matches!(
            hostcalls::get_log_level(),
            Ok(LogLevel::Debug | LogLevel::Trace)
        );
        let shared = Shared {
            service,
            route_header: route_header.to_ascii_lowercase(),
            reason_header: reason_header.map(|h| h.to_ascii_lowercase()),
            active: compiled.map(|compiled| Active {
                compiled,
                version: 0,
                health: 0,
            }),
            own_lane,
            metrics,
            rng: self.me,
            debug,
        };
        self.shared = Some(Rc::new(RefCell::new(shared)));
        // The tick flushes counters and, with a control plane, drives the feed.
        let tick = control_plane.as_ref().map_or(crate::metrics::FLUSH, |cp| {
            Duration::from_millis(cp.tick_ms).min(crate::metrics::FLUSH)
        });
        let _ = hostcalls::set_tick_period(tick);
        self.cp = control_plane;
        self.sync_from_shared();
        true
    }

    fn on_tick(&mut self) {
        if self.cp.is_some() {
            self.sync_from_shared();
            self.poll();
        }
        if let Some(s) = self.shared.as_ref().and_then(|s| s.try_borrow().ok()) {
            s.metrics.flush();
        }
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
