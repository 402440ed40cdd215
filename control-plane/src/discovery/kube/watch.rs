//! The Kubernetes watch: `discovery.k8s.io/v1` EndpointSlices through kube's watcher +
//! reflector, one watch per namespace.
//!
//! Each namespace watch selects the slices of the Services graylane maps
//! (`kubernetes.io/service-name in (...)`); with the pod-label mode, a second, metadata-only
//! watch follows the namespace's pods. Each stream goes through `default_backoff` and a
//! reflector, so a relist (watcher `Init` .. `InitApply` .. `InitDone`, e.g. after the apiserver
//! answered a watch with a 410 `Expired` ERROR event) swaps the store atomically and slices
//! deleted meanwhile disappear. Nothing is sent before the first `InitDone` of every stream.
//!
//! What the watch knows between events (which stream has listed, which is failing, the pods'
//! labels) is a small [`State`]: inputs in, effects out, no IO, unit-tested. The loop turns
//! stream items into inputs and carries the effects out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ::kube::api::{Api, ResourceExt};
use ::kube::runtime::reflector::{self, ObjectRef, Store};
use ::kube::runtime::watcher::{self, watcher};
use ::kube::runtime::WatchStreamExt;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::index::{self, Labels, PodLabels, PodMeta};
use super::{Assign, Mapping, Target, SERVICE_NAME_LABEL};
use crate::discovery::{send, Endpoint, Event, SourceKind, StaleTracker, SyncGate};

/// How often a failing stream's apiserver is probed.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// Watches every listed service until `shutdown`. `services` pairs the graylane service name
/// with its Kubernetes mapping.
pub async fn run(
    client: ::kube::Client,
    services: Vec<(String, Mapping)>,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let default_ns = client.default_namespace().to_owned();
    let mut by_ns: BTreeMap<String, Vec<Target>> = BTreeMap::new();
    for (name, mapping) in &services {
        for t in mapping.targets(name, &default_ns) {
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
            parts: Parts {
                slices: format!("{ns}/endpointslices"),
                pods: format!("{ns}/pods"),
            },
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

// ---- the state -------------------------------------------------------------------------------

/// One of a namespace's watch streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Slices,
    Pods,
}

/// One watch stream's progress.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Stream {
    /// It has delivered its first complete list.
    synced: bool,
    /// Its last attempt failed, and nothing has answered since.
    failing: bool,
}

/// What a namespace watch knows between events (the reflector stores aside).
#[derive(Debug)]
struct State {
    slices: Stream,
    /// `None` when no target of the namespace maps by pod label (no pod watch).
    pods: Option<Stream>,
    /// The pods' mapped labels, to skip pod events that change nothing graylane reads (most
    /// pod updates are status changes) and to look endpoints' pods up.
    labels: PodLabels,
}

/// A stream item, reduced to what the state needs (the loop reads it out of the stores).
#[derive(Debug)]
enum Input {
    /// The slices' (re)list finished.
    SlicesListed,
    /// A slice changed: the Kubernetes Service it belongs to (`None`: unlabelled).
    SliceChanged(Option<String>),
    /// The pods' (re)list finished: every pod's mapped labels.
    PodsListed(PodLabels),
    /// A pod changed: its mapped labels now (`None`: it is gone).
    PodChanged {
        name: String,
        labels: Option<Labels>,
    },
    /// A stream failed (its watcher retries on its own, with backoff).
    Failed(Which, String),
    /// A failing stream's apiserver answered a probe.
    Answered(Which),
}

/// Which targets to recompute.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    All,
    /// The targets fed by this Kubernetes Service.
    Service(String),
    /// The pod-label targets (a pod's mapped labels changed).
    PodTargets,
}

/// What the loop does after an input, in this order.
#[derive(Debug, Default, PartialEq, Eq)]
struct Effects {
    /// Report this stream failing (to the source's stale tracker).
    failed: Option<(Which, String)>,
    /// Start the probe timer: the namespace's first failing stream.
    start_probe: bool,
    /// Report this stream answering again.
    recovered: Option<Which>,
    /// Recompute these targets and send the sets that changed.
    recompute: Option<Scope>,
    /// Every stream has now listed once: tell the sync gate (once per namespace).
    synced: bool,
}

impl State {
    fn new(watch_pods: bool) -> Self {
        State {
            slices: Stream::default(),
            pods: watch_pods.then(Stream::default),
            labels: PodLabels::new(),
        }
    }

    /// Every stream has listed: the stores are the apiserver's, not partial.
    fn complete(&self) -> bool {
        self.slices.synced && self.pods.is_none_or(|p| p.synced)
    }

    /// Some stream is failing: probe its apiserver.
    fn probing(&self) -> bool {
        self.slices.failing || self.pods.is_some_and(|p| p.failing)
    }

    fn failing(&self, which: Which) -> bool {
        self.stream(which).is_some_and(|s| s.failing)
    }

    fn stream(&self, which: Which) -> Option<&Stream> {
        match which {
            Which::Slices => Some(&self.slices),
            Which::Pods => self.pods.as_ref(),
        }
    }

    fn stream_mut(&mut self, which: Which) -> Option<&mut Stream> {
        match which {
            Which::Slices => Some(&mut self.slices),
            Which::Pods => self.pods.as_mut(),
        }
    }

    /// One input: the new state, and what to do about it.
    fn on(&mut self, input: Input) -> Effects {
        let was_complete = self.complete();
        let mut fx = Effects::default();
        let (which, scope) = match input {
            Input::Failed(which, error) => {
                let probing = self.probing();
                if let Some(s) = self.stream_mut(which) {
                    s.failing = true;
                }
                fx.start_probe = !probing && self.probing();
                fx.failed = Some((which, error));
                return fx;
            }
            Input::Answered(which) => (which, None),
            Input::SlicesListed => {
                self.slices.synced = true;
                (Which::Slices, Some(Scope::All))
            }
            Input::SliceChanged(Some(service)) => (Which::Slices, Some(Scope::Service(service))),
            Input::SliceChanged(None) => (Which::Slices, Some(Scope::All)),
            Input::PodsListed(labels) => {
                self.labels = labels;
                if let Some(p) = &mut self.pods {
                    p.synced = true;
                }
                (Which::Pods, Some(Scope::PodTargets))
            }
            Input::PodChanged { name, labels } => {
                let changed = self.labels.get(&name) != labels.as_ref();
                match labels {
                    Some(l) => self.labels.insert(name, l),
                    None => self.labels.remove(&name),
                };
                (Which::Pods, changed.then_some(Scope::PodTargets))
            }
        };
        // Any answer proves the stream works again.
        if let Some(s) = self.stream_mut(which) {
            if s.failing {
                s.failing = false;
                fx.recovered = Some(which);
            }
        }
        if self.complete() {
            if was_complete {
                fx.recompute = scope;
            } else {
                // Every store just became complete: compute everything once.
                fx.recompute = Some(Scope::All);
                fx.synced = true;
            }
        }
        fx
    }
}

// ---- the loop --------------------------------------------------------------------------------

type SliceStream = BoxStream<'static, watcher::Result<watcher::Event<EndpointSlice>>>;
type PodStream = BoxStream<'static, watcher::Result<watcher::Event<PodMeta>>>;

/// The names a namespace's streams report failures under.
struct Parts {
    slices: String,
    pods: String,
}

impl Parts {
    fn of(&self, which: Which) -> &str {
        match which {
            Which::Slices => &self.slices,
            Which::Pods => &self.pods,
        }
    }
}

struct NamespaceWatch {
    gate: Arc<SyncGate>,
    namespace: String,
    parts: Parts,
    targets: Vec<Target>,
    tracker: Arc<StaleTracker>,
    tx: mpsc::Sender<Event>,
    /// Last set sent per (service, cluster).
    last: BTreeMap<(String, String), Vec<Endpoint>>,
}

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

/// What a watch stream item means.
enum Step<K> {
    /// Nothing to act on (a relist starting or in progress, a routine 410).
    Nothing,
    /// The relist finished: the store is complete.
    Listed,
    /// An object changed (applied or deleted).
    Changed(K),
    /// The stream failed.
    Failed(String),
}

fn classify<K>(item: watcher::Result<watcher::Event<K>>) -> Step<K> {
    match item {
        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => Step::Nothing,
        Ok(watcher::Event::InitDone) => Step::Listed,
        Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => Step::Changed(o),
        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
            // The apiserver compacted our resourceVersion: the watcher relists. Not an outage.
            info!(message = %status.message, "resourceVersion expired, relisting");
            Step::Nothing
        }
        Err(err) => Step::Failed(err.to_string()),
    }
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
            .filter_map(|t| match &t.assign {
                Assign::PodLabel { key, .. } => Some(key.clone()),
                Assign::Fixed(_) => None,
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
        let mut state = State::new(pods.is_some());
        // While a stream is failing, a cheap list probes the apiserver: a watch that resumes
        // quietly reports nothing, so without it stale would last until the next change.
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let inputs: Vec<Input> = tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.tx.closed() => return,
                item = slice_events.next() => {
                    let Some(item) = item else { break };
                    match classify(item) {
                        Step::Nothing => Vec::new(),
                        Step::Listed => vec![Input::SlicesListed],
                        Step::Changed(s) => vec![Input::SliceChanged(s.labels().get(SERVICE_NAME_LABEL).cloned())],
                        Step::Failed(e) => vec![Input::Failed(Which::Slices, e)],
                    }
                }
                item = pod_events.next() => {
                    let Some(item) = item else { break };
                    match classify(item) {
                        Step::Nothing => Vec::new(),
                        Step::Listed => vec![Input::PodsListed(
                            pods.iter()
                                .flat_map(|p| p.state())
                                .map(|p| (p.name_any(), index::mapped_labels(&p, &pod_keys)))
                                .collect(),
                        )],
                        Step::Changed(p) => {
                            let name = p.name_any();
                            let now = pods
                                .as_ref()
                                .and_then(|s| s.get(&ObjectRef::new(&name).within(&self.namespace)))
                                .map(|p| index::mapped_labels(&p, &pod_keys));
                            vec![Input::PodChanged { name, labels: now }]
                        }
                        Step::Failed(e) => vec![Input::Failed(Which::Pods, e)],
                    }
                }
                _ = probe.tick(), if state.probing() => {
                    let mut answered = Vec::new();
                    if state.failing(Which::Slices) && slices_probe.ok().await {
                        answered.push(Input::Answered(Which::Slices));
                    }
                    if let Some(p) = &pods_probe {
                        if state.failing(Which::Pods) && p.ok().await {
                            answered.push(Input::Answered(Which::Pods));
                        }
                    }
                    answered
                }
            };
            for input in inputs {
                let fx = state.on(input);
                if fx.start_probe {
                    probe.reset();
                }
                if !self.carry_out(fx, &slices, &state.labels).await {
                    return;
                }
            }
        }
        warn!("watch stream ended");
    }

    /// Reports, recomputes and sends what `fx` says; `false` when the writer is gone.
    async fn carry_out(
        &mut self,
        fx: Effects,
        slices: &Store<EndpointSlice>,
        labels: &PodLabels,
    ) -> bool {
        if let Some((which, error)) = fx.failed {
            warn!(%error, "watch failed; the watcher retries with backoff");
            if let Some(ev) = self.tracker.fail(self.parts.of(which), error) {
                if !send(&self.tx, ev).await {
                    return false;
                }
            }
        }
        if let Some(which) = fx.recovered {
            if let Some(ev) = self.tracker.ok(self.parts.of(which)) {
                if !send(&self.tx, ev).await {
                    return false;
                }
            }
        }
        if let Some(scope) = fx.recompute {
            if !self.recompute(slices, labels, &scope).await {
                return false;
            }
        }
        !fx.synced || self.gate.part_done(&self.tx).await
    }

    /// Recomputes the targets in `scope`; sends what changed. `false` when the writer is gone.
    async fn recompute(
        &mut self,
        slices: &Store<EndpointSlice>,
        labels: &PodLabels,
        scope: &Scope,
    ) -> bool {
        let state = slices.state();
        let mut events = Vec::new();
        for t in &self.targets {
            let wanted = match scope {
                Scope::All => true,
                Scope::Service(s) => *s == t.k8s_service,
                Scope::PodTargets => matches!(t.assign, Assign::PodLabel { .. }),
            };
            if !wanted {
                continue;
            }
            for (cluster, endpoints) in index::endpoints_of(t, &state, labels) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(profile: &str) -> Labels {
        Labels::from([("profile".to_owned(), profile.to_owned())])
    }

    fn recompute(scope: Scope) -> Effects {
        Effects {
            recompute: Some(scope),
            ..Effects::default()
        }
    }

    #[test]
    fn slices_alone_sync_at_their_first_list_and_only_then() {
        let mut s = State::new(false);
        assert!(!s.complete() && !s.probing());
        // Nothing is computed from a store that has not listed.
        assert_eq!(
            s.on(Input::SliceChanged(Some("web".into()))),
            Effects::default()
        );
        assert_eq!(
            s.on(Input::SlicesListed),
            Effects {
                recompute: Some(Scope::All),
                synced: true,
                ..Effects::default()
            }
        );
        // Synced once: a relist recomputes everything, without a second `synced`.
        assert_eq!(s.on(Input::SlicesListed), recompute(Scope::All));
        assert_eq!(
            s.on(Input::SliceChanged(Some("web-gray".into()))),
            recompute(Scope::Service("web-gray".into()))
        );
        assert_eq!(s.on(Input::SliceChanged(None)), recompute(Scope::All));
    }

    #[test]
    fn with_pods_the_namespace_syncs_when_both_streams_listed() {
        let mut s = State::new(true);
        assert_eq!(s.on(Input::SlicesListed), Effects::default());
        assert!(!s.complete());
        let listed = PodLabels::from([("a".to_owned(), labels("gray"))]);
        assert_eq!(
            s.on(Input::PodsListed(listed.clone())),
            Effects {
                recompute: Some(Scope::All),
                synced: true,
                ..Effects::default()
            }
        );
        assert_eq!(s.labels, listed);
        // The other order too.
        let mut s = State::new(true);
        assert_eq!(s.on(Input::PodsListed(listed)), Effects::default());
        assert_eq!(
            s.on(Input::SlicesListed),
            Effects {
                recompute: Some(Scope::All),
                synced: true,
                ..Effects::default()
            }
        );
        // A pod relist recomputes the pod-label targets only.
        assert_eq!(
            s.on(Input::PodsListed(PodLabels::new())),
            recompute(Scope::PodTargets)
        );
    }

    #[test]
    fn pod_events_count_only_when_a_mapped_label_changes() {
        let mut s = State::new(true);
        s.on(Input::SlicesListed);
        s.on(Input::PodsListed(PodLabels::from([(
            "a".to_owned(),
            labels("gray"),
        )])));
        let changed = |name: &str, l: Option<Labels>| Input::PodChanged {
            name: name.into(),
            labels: l,
        };
        // A status update: same mapped labels, nothing to do.
        assert_eq!(s.on(changed("a", Some(labels("gray")))), Effects::default());
        // Relabelled: recompute, and the memo follows.
        assert_eq!(
            s.on(changed("a", Some(labels("prod")))),
            recompute(Scope::PodTargets)
        );
        assert_eq!(s.labels["a"], labels("prod"));
        // A new pod, then it goes away.
        assert_eq!(
            s.on(changed("b", Some(labels("gray")))),
            recompute(Scope::PodTargets)
        );
        assert_eq!(s.on(changed("b", None)), recompute(Scope::PodTargets));
        assert!(!s.labels.contains_key("b"));
        // A pod never seen goes away: nothing to do.
        assert_eq!(s.on(changed("c", None)), Effects::default());
    }

    #[test]
    fn failures_start_the_probe_once_and_any_answer_recovers_the_stream() {
        let mut s = State::new(true);
        s.on(Input::SlicesListed);
        s.on(Input::PodsListed(PodLabels::new()));
        let fx = s.on(Input::Failed(Which::Slices, "500".into()));
        assert_eq!(
            fx,
            Effects {
                failed: Some((Which::Slices, "500".into())),
                start_probe: true,
                ..Effects::default()
            }
        );
        assert!(s.probing() && s.failing(Which::Slices) && !s.failing(Which::Pods));
        // The second failing stream: already probing.
        let fx = s.on(Input::Failed(Which::Pods, "403".into()));
        assert!(!fx.start_probe);
        assert_eq!(fx.failed, Some((Which::Pods, "403".into())));
        // A slice event proves the slices' stream works: recovered, and its change computed.
        assert_eq!(
            s.on(Input::SliceChanged(Some("web".into()))),
            Effects {
                recovered: Some(Which::Slices),
                recompute: Some(Scope::Service("web".into())),
                ..Effects::default()
            }
        );
        assert!(s.probing());
        // A pod event that changes nothing still proves the pods' stream works.
        assert_eq!(
            s.on(Input::PodChanged {
                name: "x".into(),
                labels: None
            }),
            Effects {
                recovered: Some(Which::Pods),
                ..Effects::default()
            }
        );
        assert!(!s.probing());
        // An answer for a stream that is not failing is no news.
        assert_eq!(s.on(Input::Answered(Which::Slices)), Effects::default());
    }

    #[test]
    fn a_probe_answer_clears_a_failure_without_recomputing() {
        let mut s = State::new(false);
        s.on(Input::SlicesListed);
        s.on(Input::Failed(Which::Slices, "leader changed".into()));
        assert_eq!(
            s.on(Input::Answered(Which::Slices)),
            Effects {
                recovered: Some(Which::Slices),
                ..Effects::default()
            }
        );
        assert!(!s.probing());
        // Failing again starts the probe again.
        assert!(s.on(Input::Failed(Which::Slices, "x".into())).start_probe);
    }

    #[test]
    fn a_failure_before_the_first_list_recovers_with_it() {
        let mut s = State::new(false);
        assert!(
            s.on(Input::Failed(Which::Slices, "forbidden".into()))
                .start_probe
        );
        assert_eq!(
            s.on(Input::SlicesListed),
            Effects {
                recovered: Some(Which::Slices),
                recompute: Some(Scope::All),
                synced: true,
                ..Effects::default()
            }
        );
    }

    #[test]
    fn without_a_pod_watch_pod_inputs_touch_no_stream() {
        let mut s = State::new(false);
        s.on(Input::SlicesListed);
        let fx = s.on(Input::Failed(Which::Pods, "x".into()));
        assert!(!s.probing() && !fx.start_probe);
        assert_eq!(s.on(Input::Answered(Which::Pods)), Effects::default());
    }
}
