//! Discovery: which instances of every graylane cluster are healthy right now.
//!
//! ```text
//!  consul::run  /v1/health/service (blocking queries) ──┐
//!                                                       ├─ Event ──> the writer task
//!  kube::run    EndpointSlices (watcher + reflector) ───┘
//! ```
//!
//! Each source is a module of three concerns: its configuration (`Config`, the global block,
//! and `Mapping`, one service's mapping of registry instances to graylane clusters, parsed into
//! a type that can only hold a valid mapping), a pure index from the registry's answers to
//! endpoints (`consul::health`, `kube::index`), and its watch loop (`run`).
//!
//! A source runs as one long-lived task and sends [`Event`]s on an mpsc channel: the full
//! healthy set of a (service, cluster) whenever it changes, `Stale` when the source loses or
//! regains its registry, `Synced` once. A source never sends an empty set because of its own
//! outage: while stale the writer keeps the last known endpoints.

pub mod consul;
pub mod kube;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// One healthy endpoint (the feed's own type: data planes read the same).
pub use graylane_strategy::feed::Endpoint;

/// What a discovery source tells the writer.
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
    /// The source lost (stale=true) or regained its registry. While stale, the writer keeps
    /// the last known endpoints.
    Stale {
        source: SourceKind,
        stale: bool,
        error: Option<String>,
    },
    /// Every part of the source (each Consul service, each Kubernetes namespace) has delivered
    /// its first complete answer: its endpoints are now the registry's, not partial. Sent once.
    Synced { source: SourceKind },
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

/// Global source config: the top-level `discovery:` block of graylane.yaml.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<consul::Config>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<kube::Config>,
}

/// Per-service discovery config, embedded under each service in graylane.yaml as
/// `discovery:`. Parsing it is the only check: a value of this type is a valid mapping.
///
/// Serialized back as it is written (`graylane install` embeds it in the ConfigMap it renders).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDiscovery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<consul::Mapping>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<kube::Mapping>,
}

impl ServiceDiscovery {
    /// Every graylane cluster this config maps instances to (so the config loader can check
    /// they exist in the service's strategy).
    pub fn clusters(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        if let Some(c) = &self.consul {
            out.extend(c.clusters.clusters());
        }
        if let Some(k) = &self.kubernetes {
            out.extend(k.clusters());
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Every service's mappings, per source.
#[derive(Debug, Clone, Default)]
pub struct Mappings {
    pub consul: Vec<(String, consul::Mapping)>,
    pub kube: Vec<(String, kube::Mapping)>,
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

/// Runs every configured source until `shutdown`: Consul for the services with a `consul`
/// mapping, Kubernetes for those with a `kubernetes` mapping. A source whose global block is
/// missing while services use it, or whose client cannot be built, reports `Stale` with the
/// reason and does not run. `kube_client`, if given, is used instead of building one from the
/// config (tests pass a client of their fake API server). On a config reload that changes
/// discovery, cancel `shutdown` and call `run` again: a fresh run sends every mapped cluster's
/// set once synced.
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
            Some(c) => consul::run(c, consul_services, tx.clone(), shutdown.clone()).await,
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
            (None, None) => kube::Config::default().client().await,
        };
        match client {
            Ok(client) => kube::run(client, kube_services, tx.clone(), shutdown.clone()).await,
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

/// Why a value of a mapping was refused (the config loader adds the field's path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("must not be empty")]
    Blank,
    #[error("map at least one value to a cluster")]
    NoCluster,
}

/// A registry name that is not blank (a Consul service name, a meta key, a port name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        if s.trim().is_empty() {
            return Err(Error::Blank);
        }
        Ok(Name(s))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registry value (a Consul tag or meta value, a pod label value) -> the graylane cluster
/// its instances belong to; at least one entry. Several values may feed one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<String, String>")]
pub struct Clusters(BTreeMap<String, String>);

impl Clusters {
    /// The cluster of instances carrying `value`.
    pub fn get(&self, value: &str) -> Option<&str> {
        self.0.get(value).map(String::as_str)
    }

    /// Every mapped cluster, once per value (so maybe repeated).
    pub fn clusters(&self) -> impl Iterator<Item = &str> {
        self.0.values().map(String::as_str)
    }
}

impl TryFrom<BTreeMap<String, String>> for Clusters {
    type Error = Error;
    fn try_from(map: BTreeMap<String, String>) -> Result<Self, Error> {
        if map.is_empty() {
            return Err(Error::NoCluster);
        }
        Ok(Clusters(map))
    }
}

/// A duration written as `250ms`, `30s`, `5m`, `1h` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The longest duration the config accepts (7 days): anything longer is a typo, and a
    /// deadline that far (`Instant + d`) could overflow and panic.
    pub const MAX: Duration = Duration::from_secs(7 * 24 * 3600);

    fn bounded(d: Duration, written: &dyn fmt::Display) -> Result<Self, String> {
        if d > Self::MAX {
            return Err(format!(
                "duration {written} is too long: at most 7 days (168h)"
            ));
        }
        Ok(HumanDuration(d))
    }

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
        let d = Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}"))?;
        Self::bounded(d, &format_args!("{s:?}"))
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
            Raw::Secs(n) => {
                HumanDuration::bounded(Duration::from_secs(n), &n).map_err(serde::de::Error::custom)
            }
            Raw::Text(s) => HumanDuration::parse(&s).map_err(serde::de::Error::custom),
        }
    }
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

    /// One part has synced (each part calls this once); `false` when the writer is gone.
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

/// Sends an event; `false` when the writer is gone (the source should stop).
pub(crate) async fn send(tx: &mpsc::Sender<Event>, event: Event) -> bool {
    tx.send(event).await.is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

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
        // Range-checked, never a panic: these overflowed Duration or a later Instant + d.
        for long in ["1e300s", "99999999999999999999h", "169h", "10081m"] {
            let e = HumanDuration::parse(long).unwrap_err();
            assert!(
                e.contains("invalid") || e.contains("at most 7 days"),
                "{long}: {e}"
            );
        }
        assert_eq!(d("168h"), HumanDuration::MAX);
        let e = serde_saphyr::from_str::<HumanDuration>("18446744073709551615").unwrap_err();
        assert!(e.to_string().contains("at most 7 days"), "{e}");
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
            "consul: {meta: profile, clusters: {gray: A, prod: B, canary: A}}\n\
             kubernetes: {service: web, namespaces: {gray: A, prod: B}}\n",
        )
        .unwrap();
        assert_eq!(sd.clusters(), ["A", "B"]);
        let err = serde_saphyr::from_str::<ServiceDiscovery>("consol: {}\n").unwrap_err();
        assert!(err.to_string().contains("consol"), "{err}");
    }

    /// A graylane.yaml whose service `web` has `discovery` = `block`, through the real loader.
    fn load(block: &str) -> Result<crate::config::Config, crate::config::Error> {
        let text = format!(
            "services:\n  web:\n    route-strategy:\n      A: {{status: Y}}\n      B: {{status: G}}\n    discovery:\n{block}"
        );
        crate::config::Config::parse(&text, Path::new("g.yaml"))
    }

    #[test]
    fn a_bad_mapping_is_refused_at_load_naming_its_field_and_line() {
        // (mapping, field at fault below `services.web.discovery`, its line, message part)
        let cases = [
            ("      consul: {clusters: {}}\n", "consul.clusters", 7, "at least one"),
            ("      consul: {service: ' ', clusters: {g: A}}\n", "consul.service", 7, "empty"),
            ("      consul: {meta: '', clusters: {g: A}}\n", "consul.meta", 7, "empty"),
            ("      consul: {meta: p}\n", "consul", 7, "missing field `clusters`"),
            (
                "      kubernetes:\n        namespace: shop\n        services: {web-gray: A}\n        pod_label: profile\n",
                "kubernetes.pod_label",
                10,
                "`services` and `pod_label` do not go together",
            ),
            (
                "      kubernetes:\n        services: {a: A}\n        clusters: {gray: A}\n",
                "kubernetes.clusters",
                9,
                "`clusters` goes with `pod_label`",
            ),
            (
                // Missing at the end: reported at the mapping, as serde reports a missing field.
                "      kubernetes:\n        pod_label: profile\n        service: web\n",
                "kubernetes",
                8,
                "`pod_label` needs `clusters`",
            ),
            (
                "      kubernetes: {service: web}\n",
                "kubernetes",
                7,
                "set one of `services`, `namespaces`, `pod_label`",
            ),
            (
                "      kubernetes:\n        namespaces: {gray: A, prod: A}\n",
                "kubernetes.namespaces",
                8,
                "cluster \"A\" is mapped twice",
            ),
            (
                "      kubernetes:\n        services: {Web_Gray: A}\n",
                "kubernetes.services.Web_Gray",
                8,
                "not a Kubernetes name",
            ),
            (
                "      kubernetes:\n        namespaces: {gray: A}\n        namespace: shop\n",
                "kubernetes.namespace",
                9,
                "`namespaces` and `namespace` do not go together",
            ),
            (
                "      kubernetes:\n        servces: {a: A}\n",
                "kubernetes.servces",
                8,
                "unknown field",
            ),
        ];
        let mut wrong = Vec::new();
        for (block, field, line, says) in cases {
            let e = load(block).expect_err(block);
            if e.field != format!("services.web.discovery.{field}")
                || e.location.map(|l| l.0) != Some(line)
                || !e.message.contains(says)
            {
                wrong.push(format!("{block:?}: {e}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        // A valid mapping to a cluster the strategy lacks: refused once, by the loader.
        let e = load("      consul: {clusters: {gray: C}}\n").unwrap_err();
        assert!(e.message.contains("\"C\""), "{e}");
        let cfg = load("      consul: {clusters: {gray: A}}\n").unwrap();
        assert_eq!(cfg.mappings().consul.len(), 1);
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
}
