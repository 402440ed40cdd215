//! Istio routes kept in step with the strategies (`istio: {apply: true}` in graylane.yaml).
//!
//! A task follows the writer's published snapshots (never the writer itself): whenever a
//! managed service's strategy version changes, and once at start, it renders the service's
//! DestinationRule(s) and VirtualService with the code `graylane render istio` prints with
//! ([`crate::render::istio::render`]), and applies each object whose rendered body differs
//! from what it last applied, by server-side apply (field manager `graylane`, forced). Each
//! service applies on its own (one request at a time per service, several services at once);
//! a failure is logged, counted, shown by `graylane status` and retried with backoff, and
//! never holds up the writer or another service.
//!
//! ```text
//!  writer ── watch<Arc<Snapshot>> ──▶ mesh task: version changed? render ─▶ changed objects
//!                                          │                                   │ PATCH (apply)
//!                                          └── status (graylane status) ◀── Kubernetes API
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use graylane_strategy::StrategySpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::types::IstioRoutes;
use crate::metrics::Metrics;
use crate::render::istio::{self, Layout, Options};
use crate::snapshot::Snapshot;

/// The field manager of graylane's server-side applies.
pub const FIELD_MANAGER: &str = "graylane";

/// First and longest wait before a failed service is applied again.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(30);
/// One apply request's limit (a hung API server must not hold a service forever).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `istio:` in graylane.yaml, as written: the options of `graylane render istio`, for every
/// service, and per service (`services:`) what differs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Apply the rendered resources to the Kubernetes API (off: `graylane render istio`
    /// prints them, for GitOps).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub apply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_header: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// One service's options under `istio.services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// False: this service's routes are not applied (managed another way).
    #[serde(default = "yes", skip_serializing_if = "Clone::clone")]
    pub apply: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Layout>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Cluster key -> profile value (the subset's or the namespace's name).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub profiles: BTreeMap<String, String>,
    /// Gateways (`namespace/name`) the VirtualService also binds to, besides the mesh.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Extra hosts of the VirtualService (the gateway's external names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

fn yes() -> bool {
    true
}

/// `istio:`, checked: whether to apply, and each service's render options.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub apply: bool,
    /// As written (`graylane install` carries it into the pod's graylane.yaml).
    pub spec: Spec,
    defaults: Options,
    /// Per service listed: whether it is applied, and its options.
    services: BTreeMap<String, (bool, Options)>,
}

impl Config {
    /// Checks `spec` against the services of the file; the error is (field, message).
    pub fn from_spec(
        spec: Spec,
        services: &BTreeMap<String, crate::config::ServiceConfig>,
    ) -> Result<Config, (String, String)> {
        let written = spec.clone();
        let base = Options::default();
        let defaults = Options {
            layout: spec.layout.unwrap_or(base.layout),
            namespace: spec.namespace.unwrap_or(base.namespace),
            vs_namespace: spec.vs_namespace,
            domain: spec.domain.unwrap_or(base.domain),
            port: spec.port,
            label: spec.label.unwrap_or(base.label),
            route_header: spec.route_header.unwrap_or(base.route_header),
            ..base
        };
        defaults.check().map_err(|e| option_error("istio", e))?;
        let mut per = BTreeMap::new();
        for (name, s) in spec.services {
            let field = format!("istio.services.{name}");
            if !services.contains_key(&name) {
                return Err((field, format!("no service {name:?} in services")));
            }
            let o = Options {
                layout: s.layout.unwrap_or(defaults.layout),
                namespace: s.namespace.unwrap_or_else(|| defaults.namespace.clone()),
                vs_namespace: s.vs_namespace.or_else(|| defaults.vs_namespace.clone()),
                port: s.port.or(defaults.port),
                profiles: s.profiles,
                gateways: s.gateways,
                hosts: s.hosts,
                ..defaults.clone()
            };
            o.check().map_err(|e| option_error(&field, e))?;
            per.insert(name, (s.apply, o));
        }
        let cfg = Config {
            apply: spec.apply,
            spec: written,
            defaults,
            services: per,
        };
        if cfg.apply {
            // Each strategy of the file must render: a service that cannot is named now,
            // not found later by the task.
            for (name, svc) in services {
                if let Some(opts) = cfg.options(name) {
                    istio::render(name, &svc.strategy, &opts).map_err(|e| match e {
                        istio::Error::Option { .. } => option_error("istio", e),
                        other => (format!("services.{name}"), other.to_string()),
                    })?;
                }
            }
        }
        Ok(cfg)
    }

    /// The render options of `service`; `None` when its routes are not applied.
    pub fn options(&self, service: &str) -> Option<Options> {
        match self.services.get(service) {
            Some((false, _)) => None,
            _ => Some(self.render_options(service)),
        }
    }

    /// The render options of `service`, applied or not (`graylane render istio --config`).
    pub fn render_options(&self, service: &str) -> Options {
        match self.services.get(service) {
            Some((_, o)) => o.clone(),
            None => self.defaults.clone(),
        }
    }
}

/// The config field of a render option (`--vs-namespace` -> `<at>.vs_namespace`).
fn option_error(at: &str, e: istio::Error) -> (String, String) {
    match e {
        istio::Error::Option { option, message } => {
            let field = match option {
                "gateway" => "gateways",
                "profile" => "profiles",
                "host" => "hosts",
                other => other,
            }
            .replace('-', "_");
            (format!("{at}.{field}"), message)
        }
        other => (at.to_string(), other.to_string()),
    }
}

/// One Kubernetes object's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// An object to apply: who it is, and its whole body (as `graylane render istio` prints it).
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub key: Key,
    pub body: Value,
}

/// The objects of one service: its DestinationRule(s) and VirtualService.
pub fn objects(
    service: &str,
    spec: &StrategySpec,
    opts: &Options,
) -> Result<Vec<Object>, istio::Error> {
    let docs = istio::render(service, spec, opts)?;
    Ok(docs
        .into_iter()
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
            Object {
                key: Key {
                    api_version: s(&d.value["apiVersion"]),
                    kind: s(&d.value["kind"]),
                    namespace: s(&d.value["metadata"]["namespace"]),
                    name: s(&d.value["metadata"]["name"]),
                },
                body: d.value,
            }
        })
        .collect())
}

/// Applies one object; the error says why, for the log and `graylane status`.
pub type Apply = Arc<dyn Fn(Object) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Server-side apply through the Kubernetes API: `PATCH` with
/// `application/apply-patch+yaml`, `fieldManager=graylane`, `force=true` (graylane owns
/// these objects' fields: another manager's edit of them is taken back at the next version).
pub fn kube_applier(client: kube::Client) -> Apply {
    use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
    Arc::new(move |o: Object| {
        let client = client.clone();
        Box::pin(async move {
            let (group, version) = o
                .key
                .api_version
                .split_once('/')
                .unwrap_or(("", o.key.api_version.as_str()));
            let resource = ApiResource {
                group: group.to_string(),
                version: version.to_string(),
                api_version: o.key.api_version.clone(),
                kind: o.key.kind.clone(),
                // VirtualService -> virtualservices, DestinationRule -> destinationrules.
                plural: format!("{}s", o.key.kind.to_ascii_lowercase()),
            };
            let api: Api<DynamicObject> = Api::namespaced_with(client, &o.key.namespace, &resource);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let patch = Patch::Apply(&o.body);
            match tokio::time::timeout(REQUEST_TIMEOUT, api.patch(&o.key.name, &params, &patch))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(kube::Error::Api(status))) => Err(format!(
                    "{}: {} {}: {}",
                    o.key, status.code, status.reason, status.message
                )),
                Ok(Err(e)) => Err(format!("{}: {e}", o.key)),
                Err(_) => Err(format!(
                    "{}: no answer within {}s",
                    o.key,
                    REQUEST_TIMEOUT.as_secs()
                )),
            }
        })
    })
}

/// The wait before attempt `attempt + 1` (after `attempt` failures in a row, from 0).
fn backoff(attempt: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(2u32.saturating_pow(attempt.min(16)))
        .min(LONGEST_RETRY)
}

/// One service as the task follows it.
struct Service {
    /// The strategy version to apply, and its strategy.
    version: u64,
    spec: Arc<StrategySpec>,
    /// Not yet applied at `version`.
    dirty: bool,
    /// Applying now (one job per service at a time).
    busy: bool,
    /// Failures in a row, and when to try again.
    attempt: u32,
    retry_at: Option<Instant>,
    /// The body last applied of each object.
    applied: BTreeMap<Key, Value>,
    status: IstioRoutes,
}

/// What a job reports: the service, the version it applied, the objects applied, and the
/// error that stopped it.
type Done = (String, u64, Vec<Object>, Option<String>);

/// Follows `snapshots` until `shutdown`, applying each managed service's routes; publishes
/// what it did on `status`.
pub async fn run(
    config: Arc<Config>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    apply: Apply,
    status: watch::Sender<Arc<Vec<IstioRoutes>>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut jobs: JoinSet<Done> = JoinSet::new();
    let mut job_service: HashMap<tokio::task::Id, String> = HashMap::new();
    loop {
        // What the latest snapshot wants.
        let snap = snapshots.borrow_and_update().clone();
        services.retain(|name, _| snap.services.contains_key(name));
        for (name, view) in &snap.services {
            if config.options(name).is_none() {
                continue;
            }
            let s = services.entry(name.clone()).or_insert_with(|| Service {
                version: view.version,
                spec: view.spec.clone(),
                dirty: true,
                busy: false,
                attempt: 0,
                retry_at: None,
                applied: BTreeMap::new(),
                status: IstioRoutes {
                    service: name.clone(),
                    version: view.version,
                    ..IstioRoutes::default()
                },
            });
            if s.version != view.version {
                s.version = view.version;
                s.spec = view.spec.clone();
                s.status.version = view.version;
                s.dirty = true;
                s.attempt = 0;
                s.retry_at = None;
            }
        }
        // Start what is due.
        let now = Instant::now();
        for (name, s) in &mut services {
            if !s.dirty || s.busy || s.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let Some(opts) = config.options(name) else {
                continue;
            };
            let objs = match objects(name, &s.spec, &opts) {
                Ok(o) => o,
                Err(e) => {
                    // The same strategy renders the same: no retry until the next version.
                    tracing::warn!(service = %name, version = s.version, error = %e,
                        "cannot render the service's Istio routes; not applied");
                    metrics.istio_failed(name);
                    s.dirty = false;
                    s.status.failures += 1;
                    s.status.error = Some(e.to_string());
                    continue;
                }
            };
            let changed: Vec<Object> = objs
                .into_iter()
                .filter(|o| s.applied.get(&o.key) != Some(&o.body))
                .collect();
            if changed.is_empty() {
                s.dirty = false;
                s.attempt = 0;
                s.status.applied_version = Some(s.version);
                s.status.error = None;
                metrics.istio_version(name, s.version);
                continue;
            }
            s.busy = true;
            let (apply, service, version) = (apply.clone(), name.clone(), s.version);
            let span = tracing::info_span!("istio_apply", service = %name, version);
            let job = jobs.spawn(
                async move {
                    let mut done = Vec::new();
                    for o in changed {
                        if let Err(e) = apply(o.clone()).await {
                            return (service, version, done, Some(e));
                        }
                        tracing::info!(object = %o.key, "applied");
                        done.push(o);
                    }
                    (service, version, done, None)
                }
                .instrument(span),
            );
            job_service.insert(job.id(), name.clone());
        }
        status.send_replace(Arc::new(
            services.values().map(|s| s.status.clone()).collect(),
        ));

        let next_retry = services
            .values()
            .filter(|s| s.dirty && !s.busy)
            .filter_map(|s| s.retry_at)
            .min();
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = snapshots.changed() => if changed.is_err() { return },
            Some(joined) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                let (service, version, done, error) = match joined {
                    Ok((id, done)) => {
                        job_service.remove(&id);
                        done
                    }
                    Err(e) => {
                        // A panic: a failure of the version it was applying (retried with
                        // backoff, not at once).
                        let service = job_service.remove(&e.id()).unwrap_or_default();
                        let version = services.get(&service).map_or(0, |s| s.version);
                        (service, version, Vec::new(), Some(format!("the apply job failed: {e}")))
                    }
                };
                let Some(s) = services.get_mut(&service) else { continue };
                s.busy = false;
                for o in done {
                    metrics.istio_applied(&service);
                    s.status.objects_applied += 1;
                    s.applied.insert(o.key, o.body);
                }
                match error {
                    None if version == s.version => {
                        s.dirty = false;
                        s.attempt = 0;
                        s.retry_at = None;
                        s.status.applied_version = Some(version);
                        s.status.error = None;
                        metrics.istio_version(&service, version);
                        tracing::info!(service = %service, version, "Istio routes applied");
                    }
                    None => {} // a newer version came meanwhile: applied next round
                    Some(e) if version != s.version => {
                        // Superseded: the newer version is applied at once.
                        metrics.istio_failed(&service);
                        s.status.failures += 1;
                        s.status.error = Some(e);
                    }
                    Some(e) => {
                        let wait = backoff(s.attempt);
                        tracing::warn!(service = %service, version, attempt = s.attempt + 1,
                            retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                            error = %e, "applying the Istio routes failed; retrying");
                        metrics.istio_failed(&service);
                        s.attempt = s.attempt.saturating_add(1);
                        s.retry_at = Some(Instant::now() + wait);
                        s.status.failures += 1;
                        s.status.error = Some(e);
                    }
                }
            }
            () = async {
                match next_retry {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    use std::sync::{Mutex, OnceLock};

    use crate::snapshot::ServiceView;
    use graylane_strategy::Compiled;

    fn view(yaml: &str, version: u64) -> Arc<ServiceView> {
        let spec: StrategySpec = serde_saphyr::from_str(yaml).unwrap();
        Arc::new(ServiceView {
            compiled: Arc::new(Compiled::try_from(spec.clone()).unwrap()),
            spec: Arc::new(spec),
            version,
            health: 0,
            healthy: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            json: Arc::new(OnceLock::new()),
            superseded: CancellationToken::new(),
        })
    }

    const OK: &str =
        "route-strategy: {a: {status: G, id: {all: true}}, b: {status: Y, id: {ids: [1]}}}";
    /// Cluster keys that are not DNS labels: no profile, the render fails.
    const BAD: &str = "route-strategy: {A: {status: G, id: {all: true}}}";

    fn snapshot(services: &[(&str, &str, u64)]) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            services: services
                .iter()
                .map(|(n, y, v)| (n.to_string(), view(y, *v)))
                .collect(),
            ..Snapshot::default()
        })
    }

    /// A service whose API calls never answer holds up no other; a service that cannot be
    /// rendered is reported once, not retried until its strategy changes.
    #[tokio::test(start_paused = true)]
    async fn a_hung_service_holds_up_no_other_and_a_render_error_waits_for_a_new_version() {
        let calls: Arc<Mutex<Vec<Key>>> = Arc::default();
        let seen = calls.clone();
        let apply: Apply = Arc::new(move |o: Object| {
            seen.lock().unwrap().push(o.key.clone());
            Box::pin(async move {
                if o.key.name == "graylane-hung" {
                    std::future::pending::<()>().await;
                }
                Ok(())
            })
        });
        let config = Arc::new(Config {
            apply: true,
            ..Config::default()
        });
        let (snap_tx, snap_rx) = watch::channel(snapshot(&[
            ("hung", OK, 1),
            ("api", OK, 1),
            ("bad", BAD, 1),
        ]));
        let (tx, mut rx) = watch::channel(Arc::new(Vec::new()));
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            config,
            snap_rx,
            apply,
            tx,
            metrics.clone(),
            stop.clone(),
        ));
        let of = |s: &[IstioRoutes], n: &str| s.iter().find(|r| r.service == n).cloned().unwrap();
        rx.wait_for(|s| s.len() == 3 && of(s, "api").applied_version == Some(1))
            .await
            .unwrap();
        // An hour later: the hung service is still waiting, nothing else was asked again.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        let s = rx.borrow().clone();
        assert_eq!(
            of(&s, "api").objects_applied,
            2,
            "its DestinationRule and VirtualService"
        );
        assert_eq!(of(&s, "hung").applied_version, None);
        assert_eq!(of(&s, "hung").error, None);
        let bad = of(&s, "bad");
        assert_eq!((bad.failures, bad.applied_version), (1, None));
        assert!(bad
            .error
            .unwrap()
            .contains("profile \"A\" is not a DNS label"));
        // (Services apply concurrently: the order across them is not fixed.)
        let mut names: Vec<String> = calls
            .lock()
            .unwrap()
            .iter()
            .map(|k| k.to_string())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "DestinationRule default/graylane-api",
                "DestinationRule default/graylane-hung",
                "VirtualService default/graylane-api",
            ]
        );
        // A new version of the bad service that renders is applied at once.
        snap_tx.send_replace(snapshot(&[("hung", OK, 1), ("api", OK, 1), ("bad", OK, 2)]));
        rx.wait_for(|s| of(s, "bad").applied_version == Some(2))
            .await
            .unwrap();
        assert_eq!(of(&rx.borrow(), "bad").error, None);
        assert_eq!(calls.lock().unwrap().len(), 5);
        let text = metrics.render(&Snapshot::default());
        assert!(
            text.contains("graylane_istio_apply_errors_total{service=\"bad\"} 1"),
            "{text}"
        );
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn backoff_doubles_from_one_second_to_thirty() {
        let waits: Vec<u64> = (0..7).map(|a| backoff(a).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(backoff(u32::MAX), LONGEST_RETRY);
    }
}
