//! Consul source: `/v1/health/service/<name>` blocking queries, one loop per service.
//!
//! The blocking-query contract (Consul docs, "Blocking Queries / Implementation Details"):
//! - the first query (and the first after a reset) carries no `index` and returns at once;
//! - the next ones carry `index=<X-Consul-Index>` and `wait`, and return when the index passes
//!   it or `wait` expires (plus up to wait/16 of server jitter) — a return is no proof of change;
//! - an unchanged index means no change: nothing is sent;
//! - an index that goes backwards resets the loop to index 0;
//! - an index of 0 is never used to block (it would return at once, forever): it becomes 1;
//! - calls are rate-limited (token bucket) and errors back off exponentially with jitter.
//!
//! An instance is healthy when every one of its checks (node and service) is `passing`. Its
//! address is `Service.Address`, or `Node.Address` when that is empty.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{
    jitter01, send, Endpoint, Error, Event, HumanDuration, SourceKind, StaleTracker, SyncGate,
};

/// Global Consul settings (`discovery.consul` in graylane.yaml). `Debug` hides the token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulConfig {
    /// Base URL of the Consul HTTP API (an agent, usually).
    #[serde(default = "default_address")]
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// `dc` query parameter (default: the agent's datacenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// `stale` consistency mode: any server may answer (spreads load, may lag the leader).
    #[serde(default)]
    pub stale: bool,
    /// Blocking query `wait` (Consul caps it at 10m).
    #[serde(default = "default_wait")]
    pub wait: HumanDuration,
    /// Token bucket between the calls of one service loop.
    #[serde(default)]
    pub rate: RateLimit,
    /// Exponential backoff with jitter after errors.
    #[serde(default)]
    pub backoff: BackoffConfig,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("datacenter", &self.datacenter)
            .field("stale", &self.stale)
            .field("wait", &self.wait)
            .field("rate", &self.rate)
            .field("backoff", &self.backoff)
            .finish()
    }
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: default_address(),
            token: None,
            datacenter: None,
            stale: false,
            wait: default_wait(),
            rate: RateLimit::default(),
            backoff: BackoffConfig::default(),
        }
    }
}

fn default_address() -> String {
    "http://127.0.0.1:8500".into()
}

fn default_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

/// Token bucket: `per_second` calls on average, bursts of up to `burst`. The default follows
/// Consul's advice (a token bucket with a burst of 2: quick successive deliveries, then
/// polling at a steady rate) with one call a second per service under churn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 1.0,
            burst: 2,
        }
    }
}

/// Backoff after errors: `initial`, doubling up to `max`, with "equal jitter" (each delay is
/// drawn uniformly from [d/2, d]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    pub initial: HumanDuration,
    pub max: HumanDuration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: HumanDuration(Duration::from_millis(500)),
            max: HumanDuration(Duration::from_secs(30)),
        }
    }
}

/// One graylane service's Consul mapping (`services.<name>.discovery.consul`).
///
/// ```yaml
/// consul:
///   service: web            # Consul service name (default: the graylane service name)
///   meta: profile           # pick the cluster by Service.Meta["profile"]; omit to pick by tag
///   clusters: {gray: A, prod: B}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsulService {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `Service.Meta` key whose value selects the cluster. Without it, tags select: an
    /// instance belongs to every cluster whose key is one of its tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<String>,
    /// Meta value (or tag) -> graylane cluster.
    pub clusters: BTreeMap<String, String>,
}

impl ConsulService {
    pub fn validate(&self, service: &str) -> Result<(), Error> {
        if self.clusters.is_empty() {
            return Err(Error::config(
                "consul.clusters",
                format!("service {service:?}: map at least one tag or meta value to a cluster"),
            ));
        }
        if matches!(&self.service, Some(s) if s.trim().is_empty()) {
            return Err(Error::config("consul.service", "must not be empty"));
        }
        if matches!(&self.meta, Some(s) if s.trim().is_empty()) {
            return Err(Error::config("consul.meta", "must not be empty"));
        }
        Ok(())
    }

    /// Healthy endpoints of every mapped cluster (every cluster present, maybe empty).
    fn group(&self, entries: &[HealthEntry]) -> BTreeMap<String, Vec<Endpoint>> {
        let mut out: BTreeMap<String, Vec<Endpoint>> = self
            .clusters
            .values()
            .map(|c| (c.clone(), Vec::new()))
            .collect();
        for e in entries {
            if !e.healthy() {
                continue;
            }
            let Some(endpoint) = e.endpoint() else {
                continue;
            };
            let clusters: Vec<&String> = match &self.meta {
                Some(key) => e
                    .service
                    .meta
                    .as_ref()
                    .and_then(|m| m.get(key))
                    .and_then(|v| self.clusters.get(v))
                    .into_iter()
                    .collect(),
                None => e
                    .service
                    .tags
                    .iter()
                    .flatten()
                    .filter_map(|t| self.clusters.get(t))
                    .collect(),
            };
            for c in clusters {
                out.entry(c.clone()).or_default().push(endpoint.clone());
            }
        }
        for v in out.values_mut() {
            v.sort();
            v.dedup();
        }
        out
    }
}

/// The parts of one `/v1/health/service` entry we read (Consul adds fields freely).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: Node,
    service: AgentService,
    #[serde(default, deserialize_with = "null_as_default")]
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl HealthEntry {
    /// Every check passes (a node in maintenance has a critical check, so it is excluded).
    fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status == "passing")
    }

    fn endpoint(&self) -> Option<Endpoint> {
        let address = if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        };
        (!address.is_empty() && self.service.port != 0).then(|| Endpoint {
            address: address.clone(),
            port: self.service.port,
        })
    }
}

/// A token bucket on tokio's clock. `acquire` reserves a token and says how long to wait.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: &RateLimit, now: Instant) -> Self {
        let burst = f64::from(rate.burst.max(1));
        TokenBucket {
            per_second: rate.per_second.max(0.001),
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub(crate) fn acquire(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

/// Exponential backoff with equal jitter.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(cfg: &BackoffConfig) -> Self {
        Backoff {
            initial: cfg.initial.0,
            max: cfg.max.0.max(cfg.initial.0),
            attempt: 0,
        }
    }

    /// The next delay; `r` is a uniform draw in [0, 1).
    pub(crate) fn next(&mut self, r: f64) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base / 2 + base.mul_f64(r.clamp(0.0, 1.0) / 2.0)
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Watches every listed service until `shutdown`. `services` pairs the graylane service name
/// with its Consul mapping. Invalid mappings are logged and skipped.
pub async fn run_consul(
    cfg: ConsulConfig,
    services: Vec<(String, ConsulService)>,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(err) => {
            let _ = tx
                .send(Event::Stale {
                    source: SourceKind::Consul,
                    stale: true,
                    error: Some(format!("building the HTTP client: {err}")),
                })
                .await;
            return;
        }
    };
    let cfg = Arc::new(cfg);
    let tracker = Arc::new(StaleTracker::new(SourceKind::Consul));
    let services: Vec<_> = services
        .into_iter()
        .filter(|(name, svc)| match svc.validate(name) {
            Ok(()) => true,
            Err(err) => {
                warn!(service = %name, error = %err, "consul mapping skipped");
                false
            }
        })
        .collect();
    let gate = Arc::new(SyncGate::new(SourceKind::Consul, services.len()));
    let tasks = tokio_util::task::TaskTracker::new();
    for (name, svc) in services {
        let watch = ServiceWatch {
            gate: gate.clone(),
            consul_name: svc.service.clone().unwrap_or_else(|| name.clone()),
            service: name.clone(),
            mapping: svc,
            cfg: cfg.clone(),
            client: client.clone(),
            tracker: tracker.clone(),
            tx: tx.clone(),
        };
        let span = tracing::info_span!("consul_watch", service = %name);
        tasks.spawn(watch.run(shutdown.clone()).instrument(span));
    }
    tasks.close();
    tasks.wait().await;
}

struct ServiceWatch {
    gate: Arc<SyncGate>,
    service: String,
    consul_name: String,
    mapping: ConsulService,
    cfg: Arc<ConsulConfig>,
    client: reqwest::Client,
    tracker: Arc<StaleTracker>,
    tx: mpsc::Sender<Event>,
}

impl ServiceWatch {
    async fn run(self, shutdown: CancellationToken) {
        let mut index: u64 = 0;
        let mut last: Option<BTreeMap<String, Vec<Endpoint>>> = None;
        let mut bucket = TokenBucket::new(&self.cfg.rate, Instant::now());
        let mut backoff = Backoff::new(&self.cfg.backoff);
        loop {
            let delay = bucket.acquire(Instant::now());
            if !delay.is_zero() && !sleep_or_cancel(delay, &shutdown).await {
                return;
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.tx.closed() => return,
                r = self.fetch(index) => r,
            };
            let (raw_index, entries) = match result {
                Ok(r) => r,
                Err(err) => {
                    let delay = backoff.next(jitter01());
                    warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "consul query failed");
                    if let Some(ev) = self.tracker.fail(&self.service, err.to_string()) {
                        if !send(&self.tx, ev).await {
                            return;
                        }
                    }
                    if !sleep_or_cancel(delay, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if let Some(ev) = self.tracker.ok(&self.service) {
                if !send(&self.tx, ev).await {
                    return;
                }
            }
            // Index 0 is a server bug; blocking on it would return at once, forever.
            let new_index = raw_index.max(1);
            if index != 0 && new_index == index {
                debug!(index, "unchanged index");
                continue;
            }
            let next = if new_index < index {
                info!(
                    old = index,
                    new = new_index,
                    "X-Consul-Index went backwards: reset"
                );
                0
            } else {
                new_index
            };
            let groups = self.mapping.group(&entries);
            for (cluster, endpoints) in &groups {
                let changed = last.as_ref().and_then(|l| l.get(cluster)) != Some(endpoints);
                if changed {
                    debug!(%cluster, count = endpoints.len(), "endpoints changed");
                    let ev = Event::Endpoints {
                        source: SourceKind::Consul,
                        service: self.service.clone(),
                        cluster: cluster.clone(),
                        endpoints: endpoints.clone(),
                    };
                    if !send(&self.tx, ev).await {
                        return;
                    }
                }
            }
            if last.is_none() && !self.gate.part_done(&self.tx).await {
                return;
            }
            last = Some(groups);
            index = next;
        }
    }

    /// One `/v1/health/service` call: blocking when `index > 0`.
    async fn fetch(&self, index: u64) -> Result<(u64, Vec<HealthEntry>), Error> {
        let base = self.cfg.address.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}/v1/health/service/"))
            .map_err(|e| Error::config("consul.address", e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| Error::config("consul.address", "not a base URL"))?
            .pop_if_empty()
            .push(&self.consul_name);
        let wait = self.cfg.wait.0.min(Duration::from_secs(600));
        {
            let mut q = url.query_pairs_mut();
            if index > 0 {
                q.append_pair("index", &index.to_string());
                q.append_pair("wait", &format!("{}ms", wait.as_millis()));
            }
            if let Some(dc) = &self.cfg.datacenter {
                q.append_pair("dc", dc);
            }
            if self.cfg.stale {
                q.append_key_only("stale");
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        // Consul may hold the call for wait + wait/16; give it a margin beyond that.
        let timeout = wait + wait / 16 + Duration::from_secs(5);
        let mut req = self.client.get(url).timeout(timeout);
        if let Some(token) = &self.cfg.token {
            let mut v = HeaderValue::from_str(token)
                .map_err(|e| Error::config("consul.token", e.to_string()))?;
            v.set_sensitive(true);
            req = req.header("X-Consul-Token", v);
        }
        let resp = req.send().await.map_err(Error::ConsulHttp)?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let mut body = body.trim().to_owned();
            if body.len() > 512 {
                let cut = (0..=512)
                    .rev()
                    .find(|&i| body.is_char_boundary(i))
                    .unwrap_or(0);
                body.truncate(cut);
            }
            return Err(Error::ConsulStatus {
                status: status.as_u16(),
                body,
            });
        }
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(Error::ConsulIndex)?;
        let bytes = resp.bytes().await.map_err(Error::ConsulHttp)?;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&bytes).map_err(Error::ConsulBody)?;
        Ok((new_index, entries))
    }
}

/// Sleeps `d`; `false` if shutdown came first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn entries(json: &str) -> Vec<HealthEntry> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn documented_sample_parses_and_is_healthy() {
        // The verbatim sample response of Consul's docs (see tests/fixtures/SOURCES.md).
        let e = entries(include_str!(
            "../../tests/fixtures/consul_health_service.json"
        ));
        assert_eq!(e.len(), 1);
        assert!(e[0].healthy());
        assert_eq!(
            e[0].endpoint(),
            Some(Endpoint {
                address: "10.1.10.12".into(),
                port: 8000
            })
        );
    }

    #[test]
    fn empty_service_address_means_node_address() {
        // Prometheus' fixture has `"Address": ""` on the service.
        let e = entries(include_str!(
            "../../tests/fixtures/consul_health_service.prometheus-test.json"
        ));
        assert_eq!(
            e[0].endpoint(),
            Some(Endpoint {
                address: "1.1.1.1".into(),
                port: 3341
            })
        );
    }

    #[test]
    fn grouping_by_meta_and_by_tag() {
        let json = r#"[
          {"Node":{"Address":"10.0.0.1"},"Service":{"Address":"","Port":80,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[{"Status":"passing"},{"Status":"passing"}]},
          {"Node":{"Address":"10.0.0.2"},"Service":{"Address":"10.9.9.2","Port":80,"Tags":null,"Meta":{"profile":"prod"}},
           "Checks":[{"Status":"passing"}]},
          {"Node":{"Address":"10.0.0.3"},"Service":{"Address":"","Port":80,"Tags":["prod"],"Meta":{"profile":"prod"}},
           "Checks":[{"Status":"passing"},{"Status":"warning"}]},
          {"Node":{"Address":"10.0.0.4"},"Service":{"Address":"","Port":80,"Tags":["gray","prod"],"Meta":null},
           "Checks":null},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"same-again","Address":"10.0.0.1","Port":80,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[{"Status":"passing"}]}
        ]"#;
        let e = entries(json);
        let clusters: BTreeMap<String, String> =
            [("gray".into(), "A".into()), ("prod".into(), "B".into())].into();
        let by_meta = ConsulService {
            service: None,
            meta: Some("profile".into()),
            clusters: clusters.clone(),
        };
        let g = by_meta.group(&e);
        let addrs = |v: &Vec<Endpoint>| v.iter().map(|e| e.address.clone()).collect::<Vec<_>>();
        assert_eq!(addrs(&g["A"]), ["10.0.0.1"]);
        assert_eq!(addrs(&g["B"]), ["10.9.9.2"]); // 10.0.0.3 has a warning check
        let by_tag = ConsulService {
            service: None,
            meta: None,
            clusters,
        };
        let g = by_tag.group(&e);
        assert_eq!(addrs(&g["A"]), ["10.0.0.1", "10.0.0.4"]);
        assert_eq!(addrs(&g["B"]), ["10.0.0.4"]);
    }

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            &RateLimit {
                per_second: 10.0,
                burst: 2,
            },
            t0,
        );
        assert_eq!(b.acquire(t0), Duration::ZERO);
        assert_eq!(b.acquire(t0), Duration::ZERO);
        let d = b.acquire(t0);
        assert!((d.as_secs_f64() - 0.1).abs() < 1e-9, "{d:?}");
        // Reserved: the next caller waits behind it.
        let d = b.acquire(t0);
        assert!((d.as_secs_f64() - 0.2).abs() < 1e-9, "{d:?}");
        // Refills over time, never above the burst.
        let d = b.acquire(t0 + Duration::from_secs(10));
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(&BackoffConfig {
            initial: HumanDuration(Duration::from_millis(100)),
            max: HumanDuration(Duration::from_millis(1000)),
        });
        assert_eq!(b.next(0.0), Duration::from_millis(50));
        let d = b.next(0.999_999);
        assert!(
            d > Duration::from_millis(199) && d <= Duration::from_millis(200),
            "{d:?}"
        );
        assert_eq!(b.next(0.5), Duration::from_millis(300));
        for _ in 0..40 {
            assert!(b.next(0.999) <= Duration::from_millis(1000));
        }
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(50));
    }

    #[test]
    fn config_yaml_round_trip() {
        let cfg: ConsulConfig = serde_saphyr::from_str(
            "address: http://consul:8500\ntoken: s3cr3t\ndatacenter: dc2\nstale: true\nwait: 30s\nrate: {per_second: 2, burst: 3}\n",
        )
        .unwrap();
        assert_eq!(cfg.wait.0, Duration::from_secs(30));
        assert_eq!(cfg.rate.burst, 3);
        assert!(!format!("{cfg:?}").contains("s3cr3t"));
        assert!(serde_saphyr::from_str::<ConsulConfig>("adress: x\n").is_err());
        let svc: ConsulService =
            serde_saphyr::from_str("meta: profile\nclusters: {gray: A, prod: B}\n").unwrap();
        svc.validate("web").unwrap();
        let svc: ConsulService = serde_saphyr::from_str("clusters: {}\n").unwrap();
        assert!(svc.validate("web").is_err());
    }
}
