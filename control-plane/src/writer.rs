//! The one writer task: it owns the store and all mutable state, takes commands from a
//! channel (admin edits, file reloads, discovery events) and publishes `Arc<Snapshot>` on a
//! `watch` channel. An edit is acknowledged only after its version is durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use graylane_strategy::{Compiled, StrategySpec};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::diff;
use crate::discovery::{self, Endpoint, SourceKind};
use crate::edit::Edit;
use crate::snapshot::{ServiceView, Snapshot, SourceStatus};
use crate::store::{self, Store, StoredService, VersionRow};

/// A write refused or failed; `code` is stable for API clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{message}")]
pub struct WriteError {
    pub code: &'static str,
    pub field: Option<String>,
    pub message: String,
}

impl WriteError {
    fn new(code: &'static str, field: Option<String>, message: impl Into<String>) -> Self {
        WriteError {
            code,
            field,
            message: message.into(),
        }
    }
    fn store(e: store::Error) -> Self {
        WriteError::new("store_error", None, e.to_string())
    }
}

/// What a write made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Written {
    pub version: u64,
    /// False when the edit changed nothing (no new version).
    pub changed: bool,
    pub summary: Vec<String>,
}

pub type Reply = oneshot::Sender<Result<Written, WriteError>>;

/// What the writer is told.
#[derive(Debug)]
pub enum Command {
    Edit {
        who: String,
        service: String,
        edit: Edit,
        reply: Reply,
    },
    Revert {
        who: String,
        version: u64,
        reply: Reply,
    },
    /// The config file changed: its new content, or why it cannot be used.
    FileReloaded {
        result: Result<Box<Config>, config::Error>,
        hash: String,
    },
    Discovery(discovery::Event),
    /// Time passes (drain windows expire).
    Tick,
    /// Reads of the store (the writer owns it).
    History {
        limit: u64,
        reply: oneshot::Sender<Result<Vec<VersionRow>, WriteError>>,
    },
    Operations {
        limit: u64,
        reply: oneshot::Sender<Result<Vec<store::Operation>, WriteError>>,
    },
    Diff {
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<Vec<String>, WriteError>>,
    },
}

struct Current {
    stored: StoredService,
    compiled: Arc<Compiled>,
}

pub struct Writer {
    store: Store,
    version: u64,
    services: BTreeMap<String, Current>,
    /// Last endpoints per (source, service, cluster key).
    endpoints: BTreeMap<(SourceKind, String, String), Vec<Endpoint>>,
    snapshot: Snapshot,
    tx: watch::Sender<Arc<Snapshot>>,
    /// Envoy clusters whose registry set just became empty: the endpoints Envoy keeps (over
    /// xDS) until the drain window ends, while the filters (told healthy = 0) move traffic
    /// away. Without it, requests already routed there would meet an empty cluster.
    draining: BTreeMap<String, (Vec<Endpoint>, std::time::Instant)>,
    drain: std::time::Duration,
    /// First health generation of this process (Unix milliseconds at start), so that a
    /// restarted control plane never hands out a generation a filter already holds for
    /// other counts.
    health_base: u64,
}

/// How long xDS keeps a cluster's last endpoints after the registry emptied it.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn stored(spec: StrategySpec, changed_at: u64) -> StoredService {
    let json = serde_json::value::to_raw_value(&spec)
        .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
    StoredService {
        hash: store::hash(json.get().as_bytes()),
        spec: Arc::new(spec),
        json: Arc::new(json),
        changed_at,
    }
}

impl Writer {
    /// Loads the latest version from the store; the config file (`cfg`, whose content hash is
    /// `hash`) becomes a new version when it changed since it was last applied (or the store is
    /// empty). Returns the writer and the receiver of its snapshots.
    pub fn open(
        store: Store,
        cfg: &Config,
        hash: &str,
    ) -> Result<(Writer, watch::Receiver<Arc<Snapshot>>), WriteError> {
        let version = store.latest_version().map_err(WriteError::store)?;
        let loaded = store.services_at(version).map_err(WriteError::store)?;
        let mut services = BTreeMap::new();
        for (name, s) in loaded {
            let compiled = Compiled::try_from((*s.spec).clone())
                .map_err(|e| WriteError::new("store_error", None, format!("stored {name}: {e}")))?;
            services.insert(
                name,
                Current {
                    compiled: Arc::new(compiled),
                    stored: s,
                },
            );
        }
        let snapshot = Snapshot {
            epoch: store.epoch().map_err(WriteError::store)?,
            tokens: Arc::new(cfg.tokens.clone()),
            feed_token: cfg.feed_token.clone(),
            ..Snapshot::default()
        };
        let (tx, rx) = watch::channel(Arc::new(snapshot.clone()));
        let mut w = Writer {
            store,
            version,
            services,
            endpoints: BTreeMap::new(),
            snapshot,
            tx,
            draining: BTreeMap::new(),
            drain: DRAIN,
            health_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(1)),
        };
        let applied = w.store.meta("config_hash").map_err(WriteError::store)?;
        if version == 0 || applied.as_deref() != Some(hash) {
            w.commit("file", "load config file", cfg.strategies(), Some(hash))?;
        }
        w.publish();
        Ok((w, rx))
    }

    /// Runs until `shutdown` or until every sender is gone.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Command>, shutdown: CancellationToken) {
        loop {
            let cmd = tokio::select! {
                () = shutdown.cancelled() => return,
                cmd = rx.recv() => match cmd { Some(c) => c, None => return },
            };
            self.handle(cmd);
        }
    }

    /// Handles one command (public for tests that drive the writer without a task).
    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Edit {
                who,
                service,
                edit,
                reply,
            } => {
                let r = self.edit(&who, &service, edit);
                if let Err(e) = &r {
                    tracing::info!(%who, %service, code = e.code, error = %e, "edit rejected");
                }
                let _ = reply.send(r);
            }
            Command::Revert {
                who,
                version,
                reply,
            } => {
                let r = self.revert(&who, version);
                let _ = reply.send(r);
            }
            Command::FileReloaded { result, hash } => match result {
                Ok(cfg) => {
                    self.snapshot.config_error = None;
                    self.snapshot.tokens = Arc::new(cfg.tokens.clone());
                    self.snapshot.feed_token = cfg.feed_token.clone();
                    if let Err(e) =
                        self.commit("file", "reload config file", cfg.strategies(), Some(&hash))
                    {
                        tracing::warn!(error = %e, "config file rejected by the store");
                        self.snapshot.reload_failures += 1;
                    }
                    self.publish();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "config file rejected; the running version stays");
                    self.snapshot.config_error = Some(e);
                    self.snapshot.reload_failures += 1;
                    self.publish();
                }
            },
            Command::Discovery(ev) => self.discovery(ev),
            Command::Tick => {
                let now = std::time::Instant::now();
                let before = self.draining.len();
                self.draining.retain(|_, (_, until)| *until > now);
                if self.draining.len() != before {
                    self.publish();
                }
            }
            Command::History { limit, reply } => {
                let _ = reply.send(self.store.history(limit).map_err(WriteError::store));
            }
            Command::Operations { limit, reply } => {
                let _ = reply.send(self.store.operations(limit).map_err(WriteError::store));
            }
            Command::Diff { from, to, reply } => {
                let _ = reply.send(self.diff(from, to));
            }
        }
    }

    fn diff(&self, from: u64, to: u64) -> Result<Vec<String>, WriteError> {
        let at = |v: u64| -> Result<BTreeMap<String, StrategySpec>, WriteError> {
            if self.store.version(v).map_err(WriteError::store)?.is_none() {
                return Err(WriteError::new(
                    "not_found",
                    Some("version".into()),
                    format!("no version {v}"),
                ));
            }
            Ok(self
                .store
                .services_at(v)
                .map_err(WriteError::store)?
                .into_iter()
                .map(|(k, s)| (k, Arc::unwrap_or_clone(s.spec)))
                .collect())
        };
        Ok(diff::summarize(&at(from)?, &at(to)?))
    }

    fn edit(&mut self, who: &str, service: &str, edit: Edit) -> Result<Written, WriteError> {
        let Some(cur) = self.services.get(service) else {
            return Err(WriteError::new(
                "not_found",
                Some("service".into()),
                format!("no service {service:?}"),
            ));
        };
        let what = edit.describe(service);
        let mut spec = (*cur.stored.spec).clone();
        edit.apply(&mut spec)
            .map_err(|e| WriteError::new("not_found", Some(e.field.clone()), e.to_string()))?;
        let mut all: BTreeMap<String, StrategySpec> = BTreeMap::new();
        all.insert(service.to_string(), spec);
        self.commit_partial(who, &what, all, None)
    }

    fn revert(&mut self, who: &str, version: u64) -> Result<Written, WriteError> {
        if self
            .store
            .version(version)
            .map_err(WriteError::store)?
            .is_none()
        {
            return Err(WriteError::new(
                "not_found",
                Some("version".into()),
                format!("no version {version}"),
            ));
        }
        let old = self.store.services_at(version).map_err(WriteError::store)?;
        let specs = old
            .into_iter()
            .map(|(k, v)| (k, Arc::unwrap_or_clone(v.spec)))
            .collect();
        self.commit(who, &format!("revert to version {version}"), specs, None)
    }

    /// Makes a version where the services in `changed` take these strategies, the others stay.
    fn commit_partial(
        &mut self,
        who: &str,
        what: &str,
        changed: BTreeMap<String, StrategySpec>,
        hash: Option<&str>,
    ) -> Result<Written, WriteError> {
        self.commit_inner(who, what, changed, false, hash)
    }

    /// Makes a version where the services are exactly `all`.
    fn commit(
        &mut self,
        who: &str,
        what: &str,
        all: BTreeMap<String, StrategySpec>,
        hash: Option<&str>,
    ) -> Result<Written, WriteError> {
        self.commit_inner(who, what, all, true, hash)
    }

    fn commit_inner(
        &mut self,
        who: &str,
        what: &str,
        specs: BTreeMap<String, StrategySpec>,
        exact: bool,
        hash: Option<&str>,
    ) -> Result<Written, WriteError> {
        let version = self.version + 1;
        let names: BTreeSet<String> = specs.keys().cloned().collect();
        let mut next: BTreeMap<String, Current> = BTreeMap::new();
        let mut summary = Vec::new();
        for (name, spec) in specs {
            let old = self.services.get(&name);
            if old.is_some_and(|o| *o.stored.spec == spec) {
                continue;
            }
            diff::one(
                &name,
                old.map(|o| &*o.stored.spec),
                Some(&spec),
                &mut summary,
            );
            let compiled = Compiled::try_from(spec.clone()).map_err(|e| {
                WriteError::new(
                    "invalid",
                    Some(format!("services.{name}.{}", e.path())),
                    format!("services.{name}.{e}"),
                )
            })?;
            next.insert(
                name,
                Current {
                    stored: stored(spec, version),
                    compiled: Arc::new(compiled),
                },
            );
        }
        let removed: Vec<String> = if exact {
            self.services
                .keys()
                .filter(|k| !names.contains(*k))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for name in &removed {
            diff::one(
                name,
                self.services.get(name).map(|o| &*o.stored.spec),
                None,
                &mut summary,
            );
        }
        if summary.is_empty() {
            if let Some(h) = hash {
                self.store
                    .set_meta("config_hash", h)
                    .map_err(WriteError::store)?;
            }
            let _ =
                self.store
                    .log_operation(now(), who, &format!("{what} (no change)"), self.version);
            return Ok(Written {
                version: self.version,
                changed: false,
                summary,
            });
        }
        // Every service of the new version, for the store.
        let mut rows: BTreeMap<String, StoredService> = BTreeMap::new();
        for (name, cur) in &self.services {
            if !removed.contains(name) && !next.contains_key(name) {
                rows.insert(name.clone(), cur.stored.clone());
            }
        }
        for (name, cur) in &next {
            rows.insert(name.clone(), cur.stored.clone());
        }
        let row = VersionRow {
            version,
            at: now(),
            author: who.to_string(),
            summary: summary.clone(),
        };
        let meta: Vec<(&str, &str)> = hash.map(|h| vec![("config_hash", h)]).unwrap_or_default();
        self.store
            .commit(&row, &rows, (who, what), &meta)
            .map_err(WriteError::store)?;
        self.version = version;
        for name in &removed {
            self.services.remove(name);
        }
        self.services.extend(next);
        tracing::info!(version, %who, %what, changes = ?summary, "new version");
        self.publish();
        Ok(Written {
            version,
            changed: true,
            summary,
        })
    }

    fn discovery(&mut self, ev: discovery::Event) {
        match ev {
            discovery::Event::Endpoints {
                source,
                service,
                cluster,
                endpoints,
            } => {
                self.endpoints.insert((source, service, cluster), endpoints);
                self.publish();
            }
            discovery::Event::Stale {
                source,
                stale,
                error,
            } => {
                self.snapshot
                    .sources
                    .insert(source, SourceStatus { stale, error });
                self.publish();
            }
        }
    }

    /// Rebuilds and publishes the snapshot.
    fn publish(&mut self) {
        let prev = self.tx.borrow().clone();
        let mut services = BTreeMap::new();
        let mut envoy: BTreeMap<String, BTreeSet<Endpoint>> = BTreeMap::new();
        for (name, cur) in &self.services {
            let mut healthy = BTreeMap::new();
            let mut by_key = BTreeMap::new();
            for (key, c) in &cur.stored.spec.clusters {
                let mut set: BTreeSet<Endpoint> = BTreeSet::new();
                let mut mapped = false;
                for ((_, s, k), eps) in &self.endpoints {
                    if s == name && k == key {
                        mapped = true;
                        set.extend(eps.iter().cloned());
                    }
                }
                healthy.insert(
                    key.clone(),
                    mapped.then(|| u32::try_from(set.len()).unwrap_or(u32::MAX)),
                );
                if mapped {
                    let envoy_name = c.cluster.clone().unwrap_or_else(|| key.clone());
                    envoy
                        .entry(envoy_name)
                        .or_default()
                        .extend(set.iter().cloned());
                    by_key.insert(key.clone(), set.into_iter().collect::<Vec<_>>());
                }
            }
            let health = match prev.services.get(name) {
                Some(p) if p.healthy == healthy && p.endpoints == by_key => p.health,
                Some(p) => p.health + 1,
                None => self.health_base,
            };
            services.insert(
                name.clone(),
                ServiceView {
                    spec: cur.stored.spec.clone(),
                    json: cur.stored.json.clone(),
                    compiled: cur.compiled.clone(),
                    version: cur.stored.changed_at,
                    health,
                    healthy,
                    endpoints: by_key,
                },
            );
        }
        let mut endpoints: BTreeMap<String, Vec<Endpoint>> = envoy
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect();
        let now = std::time::Instant::now();
        for (name, eps) in endpoints.iter_mut() {
            if !eps.is_empty() {
                self.draining.remove(name);
                continue;
            }
            let held = self.draining.get(name).map(|(e, _)| e.clone()).or_else(|| {
                prev.endpoints
                    .get(name)
                    .filter(|e| !e.is_empty())
                    .cloned()
                    .inspect(|e| {
                        self.draining
                            .insert(name.clone(), (e.clone(), now + self.drain));
                    })
            });
            if let Some(h) = held {
                *eps = h;
            }
        }
        let endpoints_version = if *prev.endpoints == endpoints {
            prev.endpoints_version
        } else {
            prev.endpoints_version + 1
        };
        let clusters_version = if prev.endpoints.keys().eq(endpoints.keys()) {
            prev.clusters_version
        } else {
            prev.clusters_version + 1
        };
        self.snapshot = Snapshot {
            version: self.version,
            services,
            endpoints: Arc::new(endpoints),
            endpoints_version,
            clusters_version,
            ..self.snapshot.clone()
        };
        self.tx.send_replace(Arc::new(self.snapshot.clone()));
    }
}
