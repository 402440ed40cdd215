//! Kubernetes source: `discovery.k8s.io/v1` EndpointSlices through kube's watcher + reflector.
//!
//! One watch per namespace, selecting the slices of the Services graylane maps
//! (`kubernetes.io/service-name in (...)`); with the pod-label mapping, a second,
//! metadata-only watch of the namespace's pods. Each stream goes through `default_backoff` and
//! a reflector, so a relist (watcher `Init` .. `InitApply` .. `InitDone`, e.g. after the
//! apiserver answered a watch with a 410 `Expired` ERROR event) swaps the store atomically and
//! slices deleted meanwhile disappear. Nothing is sent before the first `InitDone`.
//!
//! Slices carry the Service's labels, never the pods', so `profile` is found one of three ways:
//! - `services`: one Service per cluster (`web-prod` -> B, `web-gray` -> A);
//! - `namespaces`: the same Service in one namespace per cluster (seed 003's prod and gray);
//! - `pod_label`: one Service over both deployments; each endpoint's `targetRef` pod is looked
//!   up and its label (e.g. `profile`) picks the cluster.
//!
//! An endpoint is healthy when `ready` is not false (unset means ready, per the API) and
//! `terminating` is not true. `serving`-but-terminating endpoints are not used: graylane falls
//! back to another cluster instead of draining into one that is going away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ::kube::api::{Api, PartialObjectMeta, ResourceExt};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::watcher::{self, watcher};
use ::kube::runtime::WatchStreamExt;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{send, Endpoint, Error, Event, SourceKind, StaleTracker, SyncGate};

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Global Kubernetes settings (`discovery.kubernetes` in graylane.yaml).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeConfig {
    /// kubeconfig context to use; without it the client is inferred (`$KUBECONFIG` or
    /// `~/.kube/config`, else the in-cluster service account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

impl KubeConfig {
    /// Builds the client `run_kube` takes.
    pub async fn client(&self) -> Result<::kube::Client, Error> {
        let config = match &self.context {
            Some(context) => {
                let opts = ::kube::config::KubeConfigOptions {
                    context: Some(context.clone()),
                    ..Default::default()
                };
                ::kube::Config::from_kubeconfig(&opts)
                    .await
                    .map_err(|e| Error::KubeClient(e.to_string()))?
            }
            None => ::kube::Config::infer()
                .await
                .map_err(|e| Error::KubeClient(e.to_string()))?,
        };
        ::kube::Client::try_from(config).map_err(|e| Error::KubeClient(e.to_string()))
    }
}

/// One graylane service's Kubernetes mapping (`services.<name>.discovery.kubernetes`).
/// Exactly one of `services`, `namespaces`, `pod_label` is set.
///
/// ```yaml
/// kubernetes: {namespace: shop, services: {web-gray: A, web-prod: B}}            # Service per cluster
/// kubernetes: {service: web, namespaces: {gray: A, prod: B}}                     # namespace per cluster
/// kubernetes: {service: web, pod_label: profile, clusters: {gray: A, prod: B}}  # pod label
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeService {
    /// Namespace of the Service(s) (default: the client's namespace). Not used with
    /// `namespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Kubernetes Service name for `namespaces` and `pod_label` (default: the graylane
    /// service name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Kubernetes Service name -> graylane cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, String>,
    /// Namespace -> graylane cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub namespaces: BTreeMap<String, String>,
    /// Pod label whose value picks the cluster through `clusters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_label: Option<String>,
    /// Pod label value -> graylane cluster (with `pod_label`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, String>,
    /// Port name to use when the slices list several ports (default: the only port, else
    /// the one named `http`, else the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
}

impl KubeService {
    pub fn validate(&self, service: &str) -> Result<(), Error> {
        let modes = usize::from(!self.services.is_empty())
            + usize::from(!self.namespaces.is_empty())
            + usize::from(self.pod_label.is_some());
        if modes != 1 {
            return Err(Error::config(
                "kubernetes",
                format!(
                    "service {service:?}: set exactly one of `services`, `namespaces`, `pod_label`"
                ),
            ));
        }
        if self.pod_label.is_some() && self.clusters.is_empty() {
            return Err(Error::config(
                "kubernetes.clusters",
                "`pod_label` needs `clusters` (label value -> cluster)",
            ));
        }
        if self.pod_label.is_none() && !self.clusters.is_empty() {
            return Err(Error::config(
                "kubernetes.clusters",
                "`clusters` only goes with `pod_label`",
            ));
        }
        if !self.namespaces.is_empty() && self.namespace.is_some() {
            return Err(Error::config(
                "kubernetes.namespace",
                "`namespace` does not go with `namespaces`",
            ));
        }
        for (field, map) in [
            ("services", &self.services),
            ("namespaces", &self.namespaces),
        ] {
            let mut seen = BTreeSet::new();
            for cluster in map.values() {
                if !seen.insert(cluster) {
                    return Err(Error::config(
                        format!("kubernetes.{field}"),
                        format!("cluster {cluster:?} is mapped twice"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn mapped_clusters(&self) -> impl Iterator<Item = &str> {
        self.services
            .values()
            .chain(self.namespaces.values())
            .chain(self.clusters.values())
            .map(String::as_str)
    }

    fn targets(&self, service: &str, default_ns: &str) -> Vec<Target> {
        let ns = self.namespace.as_deref().unwrap_or(default_ns);
        let k8s_service = self.service.as_deref().unwrap_or(service);
        let target = |namespace: &str, k8s_service: &str, mapping: Mapping| Target {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            k8s_service: k8s_service.to_owned(),
            port: self.port.clone(),
            mapping,
        };
        if !self.services.is_empty() {
            self.services
                .iter()
                .map(|(svc, cluster)| target(ns, svc, Mapping::Fixed(cluster.clone())))
                .collect()
        } else if !self.namespaces.is_empty() {
            self.namespaces
                .iter()
                .map(|(n, cluster)| target(n, k8s_service, Mapping::Fixed(cluster.clone())))
                .collect()
        } else if let Some(key) = &self.pod_label {
            vec![target(
                ns,
                k8s_service,
                Mapping::PodLabel {
                    key: key.clone(),
                    clusters: self.clusters.clone(),
                },
            )]
        } else {
            Vec::new()
        }
    }
}

/// One Kubernetes Service feeding one graylane service.
#[derive(Debug, Clone)]
struct Target {
    service: String,
    namespace: String,
    k8s_service: String,
    port: Option<String>,
    mapping: Mapping,
}

#[derive(Debug, Clone)]
enum Mapping {
    Fixed(String),
    PodLabel {
        key: String,
        clusters: BTreeMap<String, String>,
    },
}

impl Mapping {
    fn clusters(&self) -> Vec<&String> {
        match self {
            Mapping::Fixed(c) => vec![c],
            Mapping::PodLabel { clusters, .. } => clusters.values().collect(),
        }
    }
}

/// Watches every listed service until `shutdown`. `services` pairs the graylane service name
/// with its Kubernetes mapping. Invalid mappings are logged and skipped.
pub async fn run_kube(
    client: ::kube::Client,
    services: Vec<(String, KubeService)>,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let default_ns = client.default_namespace().to_owned();
    let mut by_ns: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    for (name, svc) in &services {
        if let Err(err) = svc.validate(name) {
            warn!(service = %name, error = %err, "kubernetes mapping skipped");
            continue;
        }
        for t in svc.targets(name, &default_ns) {
            by_ns.entry(t.namespace.clone()).or_default().push(t);
        }
    }
    let tracker = Arc::new(StaleTracker::new(SourceKind::Kubernetes));
    let gate = Arc::new(SyncGate::new(SourceKind::Kubernetes, by_ns.len()));
    let tasks = tokio_util::task::TaskTracker::new();
    for (ns, targets) in by_ns {
        let span = tracing::info_span!("kube_watch", namespace = %ns);
        let w = NamespaceWatch {
            gate: gate.clone(),
            namespace: ns,
            targets,
            tracker: tracker.clone(),
            tx: tx.clone(),
            last: BTreeMap::new(),
        };
        tasks.spawn(w.run(client.clone(), shutdown.clone()).instrument(span));
    }
    tasks.close();
    tasks.wait().await;
}

type SliceStream = BoxStream<'static, watcher::Result<watcher::Event<EndpointSlice>>>;
type PodMeta = PartialObjectMeta<Pod>;
type PodStream = BoxStream<'static, watcher::Result<watcher::Event<PodMeta>>>;

struct NamespaceWatch {
    gate: Arc<SyncGate>,
    namespace: String,
    targets: Vec<Target>,
    tracker: Arc<StaleTracker>,
    tx: mpsc::Sender<Event>,
    /// Last set sent per (service, cluster).
    last: BTreeMap<(String, String), Vec<Endpoint>>,
}

/// How often a failing stream's apiserver is probed.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// A one-item list of what a watch selects: succeeds when the apiserver serves it again.
struct Probe<K> {
    api: Api<K>,
    params: ::kube::api::ListParams,
}

impl<K> Probe<K>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    fn new(api: Api<K>, selector: &str) -> Self {
        let mut params = ::kube::api::ListParams::default().limit(1);
        if !selector.is_empty() {
            params = params.labels(selector);
        }
        Probe { api, params }
    }

    async fn ok(&self) -> bool {
        self.api.list(&self.params).await.is_ok()
    }
}

/// Which targets a change affects.
enum Scope {
    All,
    /// The targets fed by this Kubernetes Service.
    Service(String),
    /// The pod-label targets (a pod's mapped label changed).
    PodTargets,
}

/// What a watch stream item means for us.
enum Step {
    /// Nothing to recompute.
    Nothing,
    /// The relist finished: the store is complete.
    Synced,
    /// An object changed: recompute what depends on it.
    Changed(Option<String>),
    /// The stream failed (the watcher retries after its backoff).
    Failed(String),
}

fn classify<K: ResourceExt>(
    item: Option<watcher::Result<watcher::Event<K>>>,
    key: impl Fn(&K) -> Option<String>,
) -> Option<Step> {
    Some(match item? {
        Ok(watcher::Event::Init) => Step::Nothing,
        Ok(watcher::Event::InitApply(_)) => Step::Nothing,
        Ok(watcher::Event::InitDone) => Step::Synced,
        Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => Step::Changed(key(&o)),
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            // The apiserver compacted our resourceVersion: the watcher relists. Not an outage.
            info!(message = %status.message, "resourceVersion expired, relisting");
            Step::Nothing
        }
        Err(err) => Step::Failed(err.to_string()),
    })
}

impl NamespaceWatch {
    async fn run(mut self, client: ::kube::Client, shutdown: CancellationToken) {
        let names: BTreeSet<&str> = self
            .targets
            .iter()
            .map(|t| t.k8s_service.as_str())
            .collect();
        let selector = format!(
            "{SERVICE_NAME_LABEL} in ({})",
            names.into_iter().collect::<Vec<_>>().join(",")
        );
        let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &self.namespace);
        let slices_probe = Probe::new(api.clone(), &selector);
        let (slices, writer) = reflector::store::<EndpointSlice>();
        // managedFields are the bulk of an object and never read: dropped before the store.
        let slices_watch = watcher(api, watcher::Config::default().labels(&selector))
            .map_ok(|ev| ev.modify(|s| s.managed_fields_mut().clear()))
            .default_backoff();
        let mut slice_events: SliceStream = reflector::reflector(writer, slices_watch).boxed();

        let pod_keys: BTreeSet<String> = self
            .targets
            .iter()
            .filter_map(|t| match &t.mapping {
                Mapping::PodLabel { key, .. } => Some(key.clone()),
                Mapping::Fixed(_) => None,
            })
            .collect();
        let mut pods_probe = None;
        let (pods, mut pod_events): (Option<Store<PodMeta>>, PodStream) = if pod_keys.is_empty() {
            (None, futures::stream::pending().boxed())
        } else {
            let mut cfg = watcher::Config::default();
            if let [only] = pod_keys.iter().collect::<Vec<_>>()[..] {
                cfg = cfg.labels(only); // "key exists"
            }
            // Metadata only: graylane needs the pods' labels, nothing else.
            let api: Api<PodMeta> = Api::namespaced(client, &self.namespace);
            pods_probe = Some(Probe::new(
                api.clone(),
                cfg.label_selector.as_deref().unwrap_or(""),
            ));
            let (store, writer) = reflector::store::<PodMeta>();
            let pods_watch = watcher(api, cfg)
                .map_ok(|ev| {
                    ev.modify(|p| {
                        p.managed_fields_mut().clear();
                        p.annotations_mut().clear();
                    })
                })
                .default_backoff();
            let stream = reflector::reflector(writer, pods_watch).boxed();
            (Some(store), stream)
        };
        let mut slices_synced = false;
        let mut pods_synced = pods.is_none();
        // Pod name -> its values of the mapped labels, to skip pod events that change nothing
        // graylane reads (most pod updates are status changes).
        let mut pod_labels: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        let slices_part = format!("{}/endpointslices", self.namespace);
        let pods_part = format!("{}/pods", self.namespace);
        // While a stream is failing, a cheap list probes the apiserver: a watch that resumes
        // quietly reports nothing, so without it stale would last until the next change.
        let (mut slices_failing, mut pods_failing) = (false, false);
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let input = tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.tx.closed() => return,
                item = slice_events.next() => Some((classify(item, |s: &EndpointSlice| {
                    s.labels().get(SERVICE_NAME_LABEL).cloned()
                }), false)),
                item = pod_events.next() => Some((classify(item, |p: &PodMeta| Some(p.name_any())), true)),
                _ = probe.tick(), if slices_failing || pods_failing => None,
            };
            let Some((step, is_pods)) = input else {
                if slices_failing && slices_probe.ok().await {
                    slices_failing = false;
                    if let Some(ev) = self.tracker.ok(&slices_part) {
                        if !send(&self.tx, ev).await {
                            return;
                        }
                    }
                }
                let pods_back = match &pods_probe {
                    Some(p) if pods_failing => p.ok().await,
                    _ => false,
                };
                if pods_back {
                    pods_failing = false;
                    if let Some(ev) = self.tracker.ok(&pods_part) {
                        if !send(&self.tx, ev).await {
                            return;
                        }
                    }
                }
                continue;
            };
            let Some(step) = step else {
                warn!("watch stream ended");
                return;
            };
            let part = if is_pods { &pods_part } else { &slices_part };
            let was_synced = slices_synced && pods_synced;
            let scope = match step {
                Step::Nothing => None,
                Step::Failed(err) => {
                    warn!(error = %err, "watch failed; the watcher retries with backoff");
                    if !(slices_failing || pods_failing) {
                        probe.reset();
                    }
                    if is_pods {
                        pods_failing = true;
                    } else {
                        slices_failing = true;
                    }
                    if let Some(ev) = self.tracker.fail(part, err) {
                        if !send(&self.tx, ev).await {
                            return;
                        }
                    }
                    None
                }
                Step::Synced if is_pods => {
                    pods_synced = true;
                    pod_labels = pods
                        .iter()
                        .flat_map(|p| p.state())
                        .map(|p| (p.name_any(), mapped_labels(&p, &pod_keys)))
                        .collect();
                    Some(Scope::PodTargets)
                }
                Step::Synced => {
                    slices_synced = true;
                    Some(Scope::All)
                }
                Step::Changed(Some(pod)) if is_pods => {
                    let now = pods
                        .as_ref()
                        .and_then(|p| p.get(&ObjectRef::new(&pod).within(&self.namespace)))
                        .map(|p| mapped_labels(&p, &pod_keys));
                    if pod_labels.get(&pod) == now.as_ref() {
                        None
                    } else {
                        match now {
                            Some(v) => pod_labels.insert(pod, v),
                            None => pod_labels.remove(&pod),
                        };
                        Some(Scope::PodTargets)
                    }
                }
                Step::Changed(Some(service)) => Some(Scope::Service(service)),
                Step::Changed(None) if is_pods => Some(Scope::PodTargets),
                Step::Changed(None) => Some(Scope::All),
            };
            let Some(mut scope) = scope else { continue };
            if is_pods {
                pods_failing = false;
            } else {
                slices_failing = false;
            }
            if let Some(ev) = self.tracker.ok(part) {
                if !send(&self.tx, ev).await {
                    return;
                }
            }
            if !(slices_synced && pods_synced) {
                continue;
            }
            if !was_synced {
                // Both stores just became complete: compute everything once.
                scope = Scope::All;
            }
            if !self.recompute(&slices, pods.as_ref(), &scope).await {
                return;
            }
            if !was_synced && !self.gate.part_done(&self.tx).await {
                return;
            }
        }
    }

    /// Recomputes the targets in `scope`; sends what changed. `false` when the store is gone.
    async fn recompute(
        &mut self,
        slices: &Store<EndpointSlice>,
        pods: Option<&Store<PodMeta>>,
        scope: &Scope,
    ) -> bool {
        let state = slices.state();
        let mut events = Vec::new();
        for t in &self.targets {
            let wanted = match scope {
                Scope::All => true,
                Scope::Service(s) => *s == t.k8s_service,
                Scope::PodTargets => matches!(t.mapping, Mapping::PodLabel { .. }),
            };
            if !wanted {
                continue;
            }
            for (cluster, endpoints) in endpoints_of(t, &state, pods) {
                let key = (t.service.clone(), cluster.clone());
                if self.last.get(&key) != Some(&endpoints) {
                    debug!(service = %t.service, %cluster, count = endpoints.len(), "endpoints changed");
                    self.last.insert(key, endpoints.clone());
                    events.push(Event::Endpoints {
                        source: SourceKind::Kubernetes,
                        service: t.service.clone(),
                        cluster,
                        endpoints,
                    });
                }
            }
        }
        for ev in events {
            if !send(&self.tx, ev).await {
                return false;
            }
        }
        true
    }
}

/// A pod's values of the labels graylane maps.
fn mapped_labels(pod: &PodMeta, keys: &BTreeSet<String>) -> BTreeMap<String, String> {
    pod.labels()
        .iter()
        .filter(|(k, _)| keys.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Healthy, deduplicated endpoints of every cluster of `t` (each present, maybe empty).
fn endpoints_of(
    t: &Target,
    slices: &[Arc<EndpointSlice>],
    pods: Option<&Store<PodMeta>>,
) -> BTreeMap<String, Vec<Endpoint>> {
    let mut out: BTreeMap<String, BTreeSet<Endpoint>> = t
        .mapping
        .clusters()
        .into_iter()
        .map(|c| (c.clone(), BTreeSet::new()))
        .collect();
    for slice in slices {
        if slice.labels().get(SERVICE_NAME_LABEL) != Some(&t.k8s_service) {
            continue;
        }
        // Envoy endpoints are IP addresses; FQDN slices (deprecated) are not used.
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(port) = pick_port(slice, t.port.as_deref()) else {
            debug!(slice = %slice.name_any(), "no usable port");
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| healthy(e)) {
            let cluster = match &t.mapping {
                Mapping::Fixed(c) => Some(c),
                Mapping::PodLabel { key, clusters } => {
                    pod_label(ep, &t.namespace, key, pods).and_then(|v| clusters.get(&v))
                }
            };
            let Some(set) = cluster.and_then(|c| out.get_mut(c)) else {
                continue;
            };
            for address in &ep.addresses {
                set.insert(Endpoint {
                    address: address.clone(),
                    port,
                });
            }
        }
    }
    out.into_iter()
        .map(|(c, set)| (c, set.into_iter().collect()))
        .collect()
}

/// Ready (unset counts as ready, as the API documents) and not terminating.
pub(crate) fn healthy(ep: &SliceEndpoint) -> bool {
    let Some(c) = &ep.conditions else {
        return true;
    };
    c.ready != Some(false) && c.terminating != Some(true)
}

fn pick_port(slice: &EndpointSlice, name: Option<&str>) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let chosen = match name {
        Some(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
        None if ports.len() == 1 => ports.first(),
        None => ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .or_else(|| ports.first()),
    }?;
    chosen
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

fn pod_label(
    ep: &SliceEndpoint,
    namespace: &str,
    key: &str,
    pods: Option<&Store<PodMeta>>,
) -> Option<String> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    let name = r.name.as_deref()?;
    let ns = r.namespace.as_deref().unwrap_or(namespace);
    let pod = pods?.get(&ObjectRef::new(name).within(ns))?;
    pod.labels().get(key).cloned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn slice(json: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn fixed(cluster: &str, svc: &str) -> Target {
        Target {
            service: "web".into(),
            namespace: "default".into(),
            k8s_service: svc.into(),
            port: None,
            mapping: Mapping::Fixed(cluster.into()),
        }
    }

    #[test]
    fn documented_example_is_one_ready_endpoint() {
        let s: EndpointSlice =
            serde_json::from_str(include_str!("../../tests/fixtures/endpointslice.json")).unwrap();
        let out = endpoints_of(&fixed("B", "example"), &[Arc::new(s)], None);
        assert_eq!(
            out["B"],
            [Endpoint {
                address: "10.1.2.3".into(),
                port: 80
            }]
        );
    }

    #[test]
    fn conditions_dedup_and_ports() {
        let ep = |addr: &str, cond: serde_json::Value| serde_json::json!({"addresses": [addr], "conditions": cond});
        let a = slice(serde_json::json!({
            "metadata": {"name": "web-a", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                ep("10.0.0.1", serde_json::json!({"ready": true})),
                ep("10.0.0.2", serde_json::json!({"ready": false, "serving": true, "terminating": true})),
                ep("10.0.0.3", serde_json::json!({})),
                ep("10.0.0.4", serde_json::json!({"ready": false})),
            ]
        }));
        let b = slice(serde_json::json!({
            "metadata": {"name": "web-b", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [ep("10.0.0.1", serde_json::json!({"ready": true, "serving": true, "terminating": false}))]
        }));
        let fqdn = slice(serde_json::json!({
            "metadata": {"name": "web-fqdn", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "FQDN",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [ep("web.example.com", serde_json::json!({"ready": true}))]
        }));
        let other = slice(serde_json::json!({
            "metadata": {"name": "api-a", "labels": {SERVICE_NAME_LABEL: "api"}},
            "addressType": "IPv4",
            "ports": [{"port": 1}],
            "endpoints": [ep("10.9.9.9", serde_json::json!({"ready": true}))]
        }));
        let out = endpoints_of(&fixed("A", "web"), &[a, b, fqdn, other], None);
        let addrs: Vec<(&str, u16)> = out["A"]
            .iter()
            .map(|e| (e.address.as_str(), e.port))
            .collect();
        assert_eq!(addrs, [("10.0.0.1", 8080), ("10.0.0.3", 8080)]);
    }

    #[test]
    fn validation() {
        let ok: KubeService =
            serde_saphyr::from_str("services: {web-gray: A, web-prod: B}\n").unwrap();
        ok.validate("web").unwrap();
        let ok: KubeService =
            serde_saphyr::from_str("service: web\nnamespaces: {gray: A, prod: B}\n").unwrap();
        ok.validate("web").unwrap();
        let ok: KubeService =
            serde_saphyr::from_str("pod_label: profile\nclusters: {gray: A, prod: B}\n").unwrap();
        ok.validate("web").unwrap();
        for bad in [
            "{}",
            "services: {a: A}\nnamespaces: {b: B}\n",
            "pod_label: profile\n",
            "services: {a: A}\nclusters: {x: A}\n",
            "services: {a: A, b: A}\n",
        ] {
            let k: KubeService = serde_saphyr::from_str(bad).unwrap();
            assert!(k.validate("web").is_err(), "{bad}");
        }
        assert!(serde_saphyr::from_str::<KubeService>("servces: {}\n").is_err());
    }
}
