//! Discovery: which instances of every graylane cluster are healthy right now.
//!
//! ```text
//!  Consul /v1/health/service (blocking queries) ──┐
//!                                                 ├─ Event ──> store writer task
//!  Kubernetes EndpointSlices (watcher+reflector) ─┘
//! ```
//!
//! Each source runs as one long-lived task (`consul::run_consul`, `kube::run_kube`) and sends
//! [`Event`]s on an mpsc channel: the full healthy set of a (service, cluster) whenever it
//! changes, and `Stale` when the source loses or regains its registry. A source never sends an
//! empty set because of its own outage: while stale the store keeps the last known endpoints.

pub mod consul;
pub mod kube;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use self::consul::{run_consul, ConsulConfig, ConsulService};
pub use self::kube::{run_kube, KubeConfig, KubeService};

/// One healthy endpoint (the feed's own type: data planes read the same).
pub use graylane_strategy::feed::Endpoint;

/// What a discovery source tells the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The full current set of healthy endpoints of one graylane cluster of one service, from
    /// one source. Sorted and deduplicated.
    Endpoints {
        source: SourceKind,
        service: String,
        cluster: String,
        endpoints: Vec<Endpoint>,
    },
    /// The source lost (stale=true) or regained its registry. While stale, the store keeps the
    /// last known endpoints.
    Stale {
        source: SourceKind,
        stale: bool,
        error: Option<String>,
    },
    /// Every part of the source (each Consul service, each Kubernetes namespace) has delivered
    /// its first complete answer: its endpoints are now the registry's, not partial. Sent once.
    Synced { source: SourceKind },
}

/// Counts the parts of one source that have not delivered their first complete answer; the
/// last one sends [`Event::Synced`].
pub(crate) struct SyncGate {
    source: SourceKind,
    left: std::sync::atomic::AtomicUsize,
}

impl SyncGate {
    pub(crate) fn new(source: SourceKind, parts: usize) -> Self {
        SyncGate {
            source,
            left: std::sync::atomic::AtomicUsize::new(parts),
        }
    }

    /// One part has synced (each part calls this once); `false` when the store is gone.
    pub(crate) async fn part_done(&self, tx: &mpsc::Sender<Event>) -> bool {
        use std::sync::atomic::Ordering;
        let before = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        if before == 1 {
            return send(
                tx,
                Event::Synced {
                    source: self.source,
                },
            )
            .await;
        }
        true
    }
}

/// Every service's validated mappings, per source.
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    pub consul: Vec<(String, ConsulService)>,
    pub kube: Vec<(String, KubeService)>,
}

impl Mappings {
    pub fn is_empty(&self) -> bool {
        self.consul.is_empty() && self.kube.is_empty()
    }

    /// The sources in use.
    pub fn sources(&self) -> Vec<SourceKind> {
        let mut out = Vec::new();
        if !self.consul.is_empty() {
            out.push(SourceKind::Consul);
        }
        if !self.kube.is_empty() {
            out.push(SourceKind::Kubernetes);
        }
        out
    }
}

/// Which registry an event comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Consul,
    Kubernetes,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Consul => "consul",
            SourceKind::Kubernetes => "kubernetes",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-service discovery config, embedded under each service in graylane.yaml as `discovery:`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDiscovery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulService>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeService>,
}

impl ServiceDiscovery {
    /// Checks the mapping. `service` is the graylane service name (used in messages and as
    /// the default registry name).
    pub fn validate(&self, service: &str) -> Result<(), Error> {
        if let Some(c) = &self.consul {
            c.validate(service)?;
        }
        if let Some(k) = &self.kubernetes {
            k.validate(service)?;
        }
        Ok(())
    }

    /// Every graylane cluster this config maps instances to (so the config loader can check
    /// they exist in the service's strategy).
    pub fn clusters(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Some(c) = &self.consul {
            out.extend(c.clusters.values().map(String::as_str));
        }
        if let Some(k) = &self.kubernetes {
            out.extend(k.mapped_clusters());
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Global source config: the top-level `discovery:` block of graylane.yaml.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubeConfig>,
}

/// Runs every configured source until `shutdown`: Consul for the services with a `consul`
/// mapping, Kubernetes for those with a `kubernetes` mapping. A source whose global block is
/// missing while services use it, or whose client cannot be built, reports `Stale` with the
/// reason and does not run. `kube_client`, if given, is used instead of building one from
/// the config (tests pass a client of their fake API server). On a config reload that changes discovery, cancel `shutdown` and
/// call `run` again: a fresh run sends every mapped cluster's set once synced.
pub async fn run(
    cfg: Config,
    mappings: Mappings,
    kube_client: Option<::kube::Client>,
    tx: mpsc::Sender<Event>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Mappings {
        consul: consul_services,
        kube: kube_services,
    } = mappings;
    let consul = async {
        if consul_services.is_empty() {
            return;
        }
        match cfg.consul {
            Some(c) => run_consul(c, consul_services, tx.clone(), shutdown.clone()).await,
            None => {
                let error = "services map Consul instances but `discovery.consul` is missing";
                tracing::warn!(error);
                let _ = send(&tx, stale(SourceKind::Consul, error.into())).await;
            }
        }
    };
    let kube = async {
        if kube_services.is_empty() {
            return;
        }
        let client = match (kube_client, &cfg.kubernetes) {
            (Some(c), _) => Ok(c),
            (None, Some(k)) => k.client().await,
            (None, None) => KubeConfig::default().client().await,
        };
        match client {
            Ok(client) => run_kube(client, kube_services, tx.clone(), shutdown.clone()).await,
            Err(err) => {
                tracing::warn!(error = %err, "kubernetes discovery not started");
                let _ = send(&tx, stale(SourceKind::Kubernetes, err.to_string())).await;
            }
        }
    };
    tokio::join!(consul, kube);
}

fn stale(source: SourceKind, error: String) -> Event {
    Event::Stale {
        source,
        stale: true,
        error: Some(error),
    }
}

/// Discovery errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The discovery config is wrong; `field` is its path below the service.
    #[error("discovery.{field}: {message}")]
    Config { field: String, message: String },
    /// A request to Consul failed before an answer arrived.
    #[error("consul request failed: {0}")]
    ConsulHttp(#[source] reqwest::Error),
    /// Consul answered with an error status; its body is plain text, kept here.
    #[error("consul answered {status}: {body}")]
    ConsulStatus { status: u16, body: String },
    /// Consul's answer had no usable `X-Consul-Index` header.
    #[error("consul answer without a valid X-Consul-Index header")]
    ConsulIndex,
    /// Consul's body was not the documented `/v1/health/service` JSON.
    #[error("consul answer is not valid health JSON: {0}")]
    ConsulBody(#[source] serde_json::Error),
    /// Building the Kubernetes client failed.
    #[error("kubernetes client: {0}")]
    KubeClient(String),
}

impl Error {
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A duration written as `250ms`, `30s`, `5m`, `1h` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: expected e.g. 250ms, 30s, 5m"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "" | "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
        };
        if !secs.is_finite() || secs < 0.0 {
            return Err(format!("invalid duration {s:?}"));
        }
        Ok(HumanDuration(Duration::from_secs_f64(secs)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(HumanDuration(Duration::from_secs(n))),
            Raw::Text(s) => HumanDuration::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// Tracks which parts of one source (a Consul service loop, a Kubernetes namespace watch) are
/// failing, so the source as a whole reports `Stale` only on transitions.
pub(crate) struct StaleTracker {
    source: SourceKind,
    failing: Mutex<BTreeMap<String, String>>,
}

impl StaleTracker {
    pub(crate) fn new(source: SourceKind) -> Self {
        StaleTracker {
            source,
            failing: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records a failure of `part`; returns the event to send when the source becomes stale.
    pub(crate) fn fail(&self, part: &str, error: String) -> Option<Event> {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = failing.is_empty();
        failing.insert(part.to_owned(), error.clone());
        was_empty.then(|| Event::Stale {
            source: self.source,
            stale: true,
            error: Some(format!("{part}: {error}")),
        })
    }

    /// Records a success of `part`; returns the event to send when the source recovers.
    pub(crate) fn ok(&self, part: &str) -> Option<Event> {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        let removed = failing.remove(part).is_some();
        (removed && failing.is_empty()).then_some(Event::Stale {
            source: self.source,
            stale: false,
            error: None,
        })
    }
}

/// Sends an event; `false` when the store is gone (the source should stop).
pub(crate) async fn send(tx: &mpsc::Sender<Event>, event: Event) -> bool {
    tx.send(event).await.is_ok()
}

/// Cheap randomness for backoff jitter (no extra dependency): a fresh `RandomState` hash.
pub(crate) fn jitter01() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn durations_parse() {
        let d = |s: &str| HumanDuration::parse(s).unwrap().0;
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("30s"), Duration::from_secs(30));
        assert_eq!(d("5m"), Duration::from_secs(300));
        assert_eq!(d("2"), Duration::from_secs(2));
        assert!(HumanDuration::parse("5 parsecs").is_err());
        assert!(HumanDuration::parse("").is_err());
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
        assert_eq!(HumanDuration(Duration::from_secs(30)).to_string(), "30s");
    }

    #[test]
    fn graylane_yaml_blocks_parse() {
        let global: Config = serde_saphyr::from_str(
            "consul: {address: 'http://consul:8500', token: t, wait: 1m}\nkubernetes: {context: prod}\n",
        )
        .unwrap();
        assert_eq!(global.consul.unwrap().wait.0, Duration::from_secs(60));
        assert_eq!(global.kubernetes.unwrap().context.as_deref(), Some("prod"));
        let sd: ServiceDiscovery = serde_saphyr::from_str(
            "consul: {meta: profile, clusters: {gray: A, prod: B}}\n\
             kubernetes: {service: web, namespaces: {gray: A, prod: B}}\n",
        )
        .unwrap();
        sd.validate("web").unwrap();
        assert_eq!(sd.clusters(), ["A", "B"]);
        let err = serde_saphyr::from_str::<ServiceDiscovery>("consol: {}\n").unwrap_err();
        assert!(err.to_string().contains("consol"), "{err}");
        let bad: ServiceDiscovery =
            serde_saphyr::from_str("kubernetes: {services: {a: A}, pod_label: p}\n").unwrap();
        let err = bad.validate("web").unwrap_err();
        assert!(err.to_string().starts_with("discovery.kubernetes"), "{err}");
    }

    #[test]
    fn stale_tracker_reports_transitions_only() {
        let t = StaleTracker::new(SourceKind::Consul);
        assert!(matches!(
            t.fail("web", "boom".into()),
            Some(Event::Stale { stale: true, .. })
        ));
        assert!(t.fail("api", "boom".into()).is_none());
        assert!(t.ok("web").is_none());
        assert!(t.ok("web").is_none());
        assert!(matches!(
            t.ok("api"),
            Some(Event::Stale { stale: false, .. })
        ));
        assert!(t.ok("api").is_none());
    }

    #[test]
    fn jitter_is_in_unit_interval() {
        for _ in 0..100 {
            let j = jitter01();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
