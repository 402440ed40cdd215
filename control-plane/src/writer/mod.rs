//! The one writer task: it owns the store and all mutable state and publishes
//! `Arc<Snapshot>` on a `watch` channel. It waits on three things at once (`select!`): admin
//! commands, discovery events, and its own next deadline (the end of a drain window). An edit
//! is acknowledged only after its version is durable; SQLite runs on `spawn_blocking`, never
//! on the async workers. It also runs the release procedures (`releases.rs`): each release's
//! state machine is advanced after every command and event and at its own wake-up time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use graylane_strategy::{Compiled, StrategySpec};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::api::types::{SourceStatus, Written};
use crate::config::{self, Config};
use crate::diff;
use crate::discovery::{self, Endpoint};
use crate::edit::Edit;
use crate::endpoints::{self, Index};
use crate::release::Release;
use crate::snapshot::{ServiceView, Snapshot};
use crate::store::{self, Store, StoredService, VersionRow};

mod previews;
mod releases;

pub use previews::{status_word as preview_status_word, End as PreviewEnd, Ended as PreviewEnded};
pub use releases::{Followers, Seen};

/// A write refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    NotFound { field: String, message: String },
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// Valid, but not now (the state moved since the caller looked).
    #[error("{message}")]
    Conflict { field: String, message: String },
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("the writer has stopped")]
    Stopped,
}

impl Error {
    fn not_found(field: &str, message: impl Into<String>) -> Self {
        Error::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }
}

pub type Reply = oneshot::Sender<Result<Written, Error>>;

/// The answer to a release command: the release as it is after it.
pub type ReleaseReply = oneshot::Sender<Result<Release, Error>>;

/// What the writer is told.
#[derive(Debug)]
pub enum Command {
    Edit {
        who: String,
        service: String,
        edit: Edit,
        force: bool,
        reply: Reply,
    },
    Revert {
        who: String,
        version: u64,
        /// Only this service (the others untouched).
        service: Option<String>,
        force: bool,
        reply: Reply,
    },
    /// Starts a release of `service`.
    StartRelease {
        who: String,
        service: String,
        start: crate::release::Start,
        reply: ReleaseReply,
    },
    /// An operator's action on `service`'s running release.
    ReleaseAction {
        who: String,
        service: String,
        action: crate::release::Action,
        why: String,
        reply: ReleaseReply,
    },
    /// Starts a preview (dry run) of a candidate for `service`.
    StartPreview {
        who: String,
        service: String,
        start: crate::preview::Start,
        force: bool,
        reply: oneshot::Sender<Result<crate::preview::Record, Error>>,
    },
    /// Applies or discards `service`'s running preview.
    EndPreview {
        who: String,
        service: String,
        end: PreviewEnd,
        reply: oneshot::Sender<Result<PreviewEnded, Error>>,
    },
    /// Applies the config file last read again, its values winning conflicts with API edits
    /// when `prefer` says so (`graylane reload --file-wins`).
    ReapplyFile {
        who: String,
        prefer: crate::merge::Prefer,
        reply: oneshot::Sender<Result<(Written, Vec<crate::merge::Conflict>), Error>>,
    },
    /// The config file changed: its new content (and content hash), or why it cannot be used.
    FileReloaded {
        result: Result<Box<Config>, config::Error>,
        hash: String,
    },
}

/// A handle that sends the writer commands and waits for its answer.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
}

impl Handle {
    pub fn new(tx: mpsc::Sender<Command>) -> Handle {
        Handle { tx }
    }

    /// Edits one service; answers once the new version is durable. `force` accepts a version
    /// that leaves the service no cluster able to take default traffic.
    pub async fn edit(
        &self,
        who: String,
        service: String,
        edit: Edit,
        force: bool,
    ) -> Result<Written, Error> {
        self.ask(|reply| Command::Edit {
            who,
            service,
            edit,
            force,
            reply,
        })
        .await
    }

    /// Makes a new version equal to `version`; with `service`, only that service takes its
    /// strategy of `version` (the others are untouched).
    pub async fn revert(
        &self,
        who: String,
        version: u64,
        service: Option<String>,
        force: bool,
    ) -> Result<Written, Error> {
        self.ask(|reply| Command::Revert {
            who,
            version,
            service,
            force,
            reply,
        })
        .await
    }

    /// Applies the config file last read again (see [`Command::ReapplyFile`]).
    pub async fn reapply_file(
        &self,
        who: String,
        prefer: crate::merge::Prefer,
    ) -> Result<(Written, Vec<crate::merge::Conflict>), Error> {
        self.ask_for(|reply| Command::ReapplyFile { who, prefer, reply })
            .await
    }

    /// Hands the writer a reloaded config file.
    pub async fn file_reloaded(&self, result: Result<Box<Config>, config::Error>, hash: String) {
        let _ = self.tx.send(Command::FileReloaded { result, hash }).await;
    }

    /// Starts a release; answers once it is stored (its first step may already be made).
    pub async fn start_release(
        &self,
        who: String,
        service: String,
        start: crate::release::Start,
    ) -> Result<Release, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::StartRelease {
                who,
                service,
                start,
                reply: tx,
            })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Approves, pauses, resumes or aborts `service`'s running release.
    pub async fn release_action(
        &self,
        who: String,
        service: String,
        action: crate::release::Action,
        why: String,
    ) -> Result<Release, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::ReleaseAction {
                who,
                service,
                action,
                why,
                reply: tx,
            })
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }

    /// Starts a preview; answers once it is stored and published to the feed.
    pub async fn start_preview(
        &self,
        who: String,
        service: String,
        start: crate::preview::Start,
        force: bool,
    ) -> Result<crate::preview::Record, Error> {
        self.ask_for(|reply| Command::StartPreview {
            who,
            service,
            start,
            force,
            reply,
        })
        .await
    }

    /// Applies (a new version) or discards `service`'s running preview.
    pub async fn end_preview(
        &self,
        who: String,
        service: String,
        end: PreviewEnd,
    ) -> Result<PreviewEnded, Error> {
        self.ask_for(|reply| Command::EndPreview {
            who,
            service,
            end,
            reply,
        })
        .await
    }

    async fn ask(&self, make: impl FnOnce(Reply) -> Command) -> Result<Written, Error> {
        self.ask_for(make).await
    }

    async fn ask_for<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Error>>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)?
    }
}

struct Current {
    stored: StoredService,
    compiled: Arc<Compiled>,
}

/// A strategy proposed for a new version, with its compiled form when its source (the
/// config file) compiled it already.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub spec: StrategySpec,
    pub compiled: Option<Arc<Compiled>>,
}

impl From<StrategySpec> for Candidate {
    fn from(spec: StrategySpec) -> Self {
        Candidate {
            spec,
            compiled: None,
        }
    }
}

pub struct Writer {
    store: Arc<Mutex<Store>>,
    /// Keeps the WAL short after commits, off their path (`None`: an in-memory store).
    checkpointer: Option<store::Checkpointer>,
    version: u64,
    services: BTreeMap<String, Current>,
    index: Index,
    envoy: endpoints::Envoy,
    snapshot: Snapshot,
    tx: watch::Sender<Arc<Snapshot>>,
    /// When the endpoints changed since last kept are written to the store.
    persist_at: Option<Instant>,
    /// First health generation of this process (Unix milliseconds at start), so that a
    /// restarted control plane never hands out a generation a filter already holds for
    /// other counts.
    health_base: u64,
    /// Each service's current (or last) release.
    releases: BTreeMap<String, Release>,
    next_release: u64,
    /// When a release wants to be looked at again (a gate nothing announces).
    release_wake: Option<Instant>,
    /// The versions the filters of a service hold (for the convergence gate).
    followers: Option<Followers>,
    seen: Option<Seen>,
    /// `limits.strategy` of the config in force: every new version is checked against it.
    size_limits: graylane_strategy::SizeLimits,
    /// Each service's current (or last) preview.
    previews: BTreeMap<String, Arc<crate::preview::Live>>,
    /// The highest preview id handed out (ids never repeat, across restarts too).
    last_preview: u64,
    /// When the first running preview expires.
    preview_wake: Option<Instant>,
    /// The config file as last read (valid), and its hash: `graylane reload` applies it again.
    last_file: Option<(Box<Config>, String)>,
    /// Who starts and stops instances (none: someone else, while releases wait).
    instances: Option<Arc<dyn crate::instances::Driver>>,
    /// Instance drivers' answers, sent back by the tasks that ran them (a hook may take
    /// seconds; the writer does not wait for it).
    scaled_tx: mpsc::UnboundedSender<releases::Scaled>,
    scaled_rx: Option<mpsc::UnboundedReceiver<releases::Scaled>>,
}

/// The `meta` key of the config file's strategies as last applied: the base of the three-way
/// merge of the next reload (`crate::merge`).
const APPLIED: &str = "config_applied";
/// A config file merged into the live strategies: the candidates, the conflicts, the next base.
type FileMerge = (
    BTreeMap<String, Candidate>,
    Vec<crate::merge::Conflict>,
    String,
);

/// The `meta` key of the conflicts of the last applied file (shown by `status` after a restart).
const CONFLICTS: &str = "config_conflicts";

/// How long xDS keeps a cluster's last endpoints after the registry emptied it.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Changed endpoints are kept in the store at most this often (the registry is the truth;
/// the store only bridges a restart).
pub const PERSIST_EVERY: Duration = Duration::from_secs(1);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compiles `spec`, reusing the id indexes of clusters whose whitelist equals `prev`'s (a
/// state flip on a million ids does not sort them again).
fn compile(
    spec: &StrategySpec,
    prev: Option<&Current>,
) -> Result<Compiled, graylane_strategy::Error> {
    let reusable = |key: &str| {
        let prev = prev?;
        let old = prev.stored.spec.clusters.get(key)?;
        let new = spec.clusters.get(key)?;
        if old.id != new.id {
            return None;
        }
        prev.compiled.cluster(key).map(|(_, c)| c.ids.clone())
    };
    Compiled::reusing(spec.clone(), reusable)
}

impl Writer {
    /// Loads the latest version from the store; the config file (`cfg`, whose content hash is
    /// `hash`) becomes a new version when it changed since it was last applied (or the store
    /// is empty). Returns the writer and the receiver of its snapshots. Runs before the
    /// runtime's tasks start (blocking here is fine).
    pub fn open(
        store: Store,
        cfg: &Config,
        hash: &str,
    ) -> Result<(Writer, watch::Receiver<Arc<Snapshot>>), Error> {
        let version = store.latest_version()?;
        let mut services = BTreeMap::new();
        for (name, s) in store.services_at(version)? {
            let compiled = Compiled::try_from((*s.spec).clone()).map_err(|e| Error::Invalid {
                field: format!("services.{name}"),
                message: format!("stored strategy of {name} is invalid: {e}"),
            })?;
            services.insert(
                name,
                Current {
                    compiled: Arc::new(compiled),
                    stored: s,
                },
            );
        }
        let sources = cfg
            .mappings()
            .sources()
            .into_iter()
            .map(|s| (s, SourceStatus::default()))
            .collect();
        let snapshot = Snapshot {
            sources,
            epoch: store.epoch()?,
            tokens: Arc::new(cfg.tokens.clone()),
            feed_token: cfg.feed_token.clone(),
            cookie_generator: cfg.cookie_generator.clone(),
            ..Snapshot::default()
        };
        let (tx, rx) = watch::channel(Arc::new(snapshot.clone()));
        let applied = store.meta("config_hash")?;
        let base = store.meta(APPLIED)?;
        let kept_conflicts: Vec<crate::merge::Conflict> = store
            .meta(CONFLICTS)?
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default();
        let kept = store.load_endpoints()?;
        let kept_releases = store.releases()?;
        let kept_previews = store.meta_prefixed("preview/")?;
        let (scaled_tx, scaled_rx) = mpsc::unbounded_channel();
        let checkpointer = store.checkpointer()?;
        let mut w = Writer {
            checkpointer,
            store: Arc::new(Mutex::new(store)),
            version,
            services,
            index: Index::default(),
            envoy: endpoints::Envoy::new(DRAIN),
            snapshot,
            tx,
            persist_at: None,
            health_base: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_millis()).unwrap_or(1)),
            releases: BTreeMap::new(),
            next_release: 1,
            release_wake: None,
            followers: None,
            seen: None,
            size_limits: cfg.limits.strategy,
            previews: BTreeMap::new(),
            last_preview: 0,
            preview_wake: None,
            last_file: Some((Box::new(cfg.clone()), hash.to_string())),
            instances: None,
            scaled_tx,
            scaled_rx: Some(scaled_rx),
        };
        w.snapshot.config_conflicts = kept_conflicts;
        w.load_releases(kept_releases);
        w.load_previews(kept_previews);
        w.restore(kept);
        for name in w.services.keys().cloned().collect::<Vec<_>>() {
            w.refresh_service(&name);
        }
        w.refresh_envoy();
        if version == 0 || applied.as_deref() != Some(hash) {
            // The file changed while the daemon was down: merged like a live reload.
            let (specs, conflicts, applied) =
                w.file_merge(cfg, base, crate::merge::Prefer::Live)?;
            let conflicts_json = serde_json::to_string(&conflicts).unwrap_or_default();
            w.note_conflicts(conflicts);
            let plan = w.plan(
                "file",
                "load config file",
                specs,
                Scope::Exact { force: false },
            )?;
            let meta = [
                ("config_hash", hash),
                (APPLIED, applied.as_str()),
                (CONFLICTS, conflicts_json.as_str()),
            ];
            if let Some(plan) = plan {
                let mut store = w.store.lock().unwrap_or_else(|p| p.into_inner());
                store.commit(&plan.row, &plan.rows, ("file", "load config file"), &meta)?;
                drop(store);
                w.apply(plan);
            } else {
                let store = w.store.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in meta {
                    store.set_meta(k, v)?;
                }
            }
        }
        w.publish();
        Ok((w, rx))
    }

    /// Serves the endpoints kept by the last run (for clusters the strategies still have and
    /// sources still in use) until each source syncs.
    fn restore(&mut self, rows: Vec<store::EndpointRow>) {
        for r in rows {
            let mapped = self.snapshot.sources.contains_key(&r.source)
                && self
                    .services
                    .get(&r.service)
                    .is_some_and(|c| c.stored.spec.clusters.contains_key(&r.cluster));
            if let (true, Some(eps)) = (mapped, r.endpoints) {
                self.index.restore(r.source, &r.service, &r.cluster, eps);
            }
        }
        for (source, status) in self.snapshot.sources.iter_mut() {
            status.restored = self.index.has_restored(*source);
        }
        if self.snapshot.sources.values().any(|s| s.restored) {
            tracing::info!("serving the endpoints kept by the last run until discovery syncs");
        }
    }

    /// A reader of the store on its own connection.
    pub fn reader(&self) -> Result<store::Reader, Error> {
        Ok(self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reader()?)
    }

    /// Runs until `shutdown` or until the command senders are gone.
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut discovery: mpsc::Receiver<discovery::Event>,
        shutdown: CancellationToken,
    ) {
        // However it ends, the feed's long-polls learn that the writer is gone.
        let _stopped = self.snapshot.stopped.clone().drop_guard();
        let mut discovering = true;
        let (_keep, mut scaled) = match self.scaled_rx.take() {
            Some(rx) => (None, rx),
            None => {
                let (tx, rx) = mpsc::unbounded_channel();
                (Some(tx), rx)
            }
        };
        // Releases kept by the last run move on now: a release restarted in a bake or between
        // steps would otherwise wait for the next command or discovery event (forever, with
        // neither), since its wake-up time died with the last run.
        self.drive_releases().await;
        loop {
            let deadline = self.envoy.next_deadline();
            let persist = self.persist_at;
            let wake = self.release_wake;
            let preview_wake = self.preview_wake;
            tokio::select! {
                () = shutdown.cancelled() => {
                    self.persist().await;
                    return;
                }
                cmd = commands.recv() => match cmd {
                    Some(c) => {
                        self.handle(c).await;
                        self.drive_releases().await;
                    }
                    None => return,
                },
                ev = discovery.recv(), if discovering => match ev {
                    Some(ev) => {
                        self.discovery(ev);
                        self.drive_releases().await;
                    }
                    None => discovering = false,
                },
                Some(done) = scaled.recv() => {
                    self.scaled(done).await;
                    self.drive_releases().await;
                }
                () = sleep_until(wake), if wake.is_some() => {
                    self.release_wake = None;
                    self.drive_releases().await;
                }
                () = sleep_until(preview_wake), if preview_wake.is_some() => {
                    self.expire_previews().await;
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    if self.envoy.expire(Instant::now()) {
                        self.publish_endpoints();
                    }
                }
                () = sleep_until(persist), if persist.is_some() => self.persist().await,
            }
        }
    }

    /// Handles one command.
    pub async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Edit {
                who,
                service,
                edit,
                force,
                reply,
            } => {
                let r = self.edit(&who, &service, edit, force).await;
                if let Err(e) = &r {
                    tracing::info!(%who, %service, error = %e, "edit rejected");
                }
                let _ = reply.send(r);
            }
            Command::Revert {
                who,
                version,
                service,
                force,
                reply,
            } => {
                let r = self.revert(&who, version, service.as_deref(), force).await;
                let _ = reply.send(r);
            }
            Command::StartRelease {
                who,
                service,
                start,
                reply,
            } => {
                let r = self.start_release(&who, &service, start).await;
                let _ = reply.send(r);
            }
            Command::ReleaseAction {
                who,
                service,
                action,
                why,
                reply,
            } => {
                let r = self.release_action(&who, &service, action, &why).await;
                let _ = reply.send(r);
            }
            Command::StartPreview {
                who,
                service,
                start,
                force,
                reply,
            } => {
                let r = self.start_preview(&who, &service, start, force).await;
                if let Err(e) = &r {
                    tracing::info!(%who, %service, error = %e, "preview refused");
                }
                let _ = reply.send(r);
            }
            Command::EndPreview {
                who,
                service,
                end,
                reply,
            } => {
                let r = self.end_preview(&who, &service, end).await;
                let _ = reply.send(r);
            }
            Command::ReapplyFile { who, prefer, reply } => {
                let r = match self.last_file.clone() {
                    Some((cfg, hash)) => {
                        let what = match prefer {
                            crate::merge::Prefer::File => {
                                format!("reload config file by {who}, the file winning conflicts")
                            }
                            crate::merge::Prefer::Live => format!("reload config file by {who}"),
                        };
                        let r = self.apply_file(&cfg, &hash, &what, prefer).await;
                        r.map(|w| (w, self.snapshot.config_conflicts.clone()))
                    }
                    None => Err(Error::not_found("config", "no config file was read")),
                };
                self.publish();
                let _ = reply.send(r);
            }
            Command::FileReloaded { result, hash } => match result {
                Ok(cfg) => {
                    self.snapshot.config_error = None;
                    self.snapshot.tokens = Arc::new(cfg.tokens.clone());
                    self.size_limits = cfg.limits.strategy;
                    self.snapshot.feed_token = cfg.feed_token.clone();
                    self.snapshot.cookie_generator = cfg.cookie_generator.clone();
                    self.last_file = Some((cfg.clone(), hash.clone()));
                    let r = self
                        .apply_file(
                            &cfg,
                            &hash,
                            "reload config file",
                            crate::merge::Prefer::Live,
                        )
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "config file rejected; the running version stays");
                        let field = match &e {
                            Error::Invalid { field, .. }
                            | Error::NotFound { field, .. }
                            | Error::Conflict { field, .. } => field.clone(),
                            _ => String::new(),
                        };
                        self.snapshot.config_error = Some(config::Error {
                            file: "graylane.yaml".into(),
                            location: None,
                            field,
                            message: e.to_string(),
                        });
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
        }
    }

    /// What applying `cfg` makes of every service's strategy: what the file changed since it
    /// was last applied (`base`, JSON of the strategies then), merged into the live strategies
    /// (`crate::merge`); the conflicts; the next base, as JSON.
    fn file_merge(
        &self,
        cfg: &Config,
        base: Option<String>,
        prefer: crate::merge::Prefer,
    ) -> Result<FileMerge, Error> {
        let json = |spec: &StrategySpec| serde_json::to_value(spec).unwrap_or_default();
        let file: BTreeMap<String, serde_json::Value> = cfg
            .services
            .iter()
            .map(|(k, v)| (k.clone(), json(&v.strategy)))
            .collect();
        let live: BTreeMap<String, serde_json::Value> = self
            .services
            .iter()
            .map(|(k, c)| (k.clone(), json(&c.stored.spec)))
            .collect();
        // A base that cannot be read is no base: the file applies as it is (the rule before).
        let base: Option<BTreeMap<String, serde_json::Value>> =
            base.and_then(|b| serde_json::from_str(&b).ok());
        let merged = crate::merge::three_way(base.as_ref(), &file, &live, prefer);
        let mut from_file = cfg.strategies();
        let mut out = BTreeMap::new();
        for (name, value) in merged.services {
            // The file's or the live strategy as it is keeps its compiled form.
            let same_as = |m: &BTreeMap<String, serde_json::Value>| m.get(&name) == Some(&value);
            let kept = if same_as(&file) {
                from_file.remove(&name)
            } else if same_as(&live) {
                self.services.get(&name).map(|c| Candidate {
                    spec: (*c.stored.spec).clone(),
                    compiled: Some(c.compiled.clone()),
                })
            } else {
                None
            };
            let candidate = match kept {
                Some(c) => c,
                None => serde_json::from_value::<StrategySpec>(value)
                    .map(Candidate::from)
                    .map_err(|e| Error::Invalid {
                        field: format!("services.{name}"),
                        message: format!(
                            "the file's changes merged into {name}'s live strategy do not make \
                             a strategy: {e}"
                        ),
                    })?,
            };
            out.insert(name, candidate);
        }
        let applied = serde_json::to_string(&merged.next_base).unwrap_or_default();
        Ok((out, merged.conflicts, applied))
    }

    fn note_conflicts(&mut self, conflicts: Vec<crate::merge::Conflict>) {
        for c in &conflicts {
            tracing::warn!(field = %c.field, file = %c.file, live = %c.live,
                "changed in the file and through the API: the live value stays");
        }
        self.snapshot.config_conflicts = conflicts;
    }

    /// Applies `cfg` (whose content hash is `hash`) merged three ways (see `file_merge`).
    async fn apply_file(
        &mut self,
        cfg: &Config,
        hash: &str,
        what: &str,
        prefer: crate::merge::Prefer,
    ) -> Result<Written, Error> {
        let store = self.store.clone();
        let base = blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .meta(APPLIED)
        })
        .await?;
        let (specs, conflicts, applied) = self.file_merge(cfg, base, prefer)?;
        let meta = vec![
            ("config_hash", hash.to_string()),
            (APPLIED, applied),
            (
                CONFLICTS,
                serde_json::to_string(&conflicts).unwrap_or_default(),
            ),
        ];
        let written = self
            .commit("file", what, specs, Scope::Exact { force: false }, meta)
            .await?;
        self.note_conflicts(conflicts);
        Ok(written)
    }

    async fn edit(
        &mut self,
        who: &str,
        service: &str,
        edit: Edit,
        force: bool,
    ) -> Result<Written, Error> {
        let Some(cur) = self.services.get(service) else {
            return Err(Error::not_found(
                "service",
                format!("no service {service:?}"),
            ));
        };
        let what = edit.describe(service);
        let mut spec = (*cur.stored.spec).clone();
        edit.apply(&mut spec).map_err(|e| Error::NotFound {
            field: e.field.clone(),
            message: e.to_string(),
        })?;
        let changed = BTreeMap::from([(service.to_string(), spec.into())]);
        self.commit(who, &what, changed, Scope::Partial { force }, Vec::new())
            .await
    }

    async fn revert(
        &mut self,
        who: &str,
        version: u64,
        service: Option<&str>,
        force: bool,
    ) -> Result<Written, Error> {
        let store = self.store.clone();
        let old = blocking(move || {
            let store = store.lock().unwrap_or_else(|p| p.into_inner());
            if !store.has_version(version)? {
                return Ok(None);
            }
            Ok(Some(store.services_at(version)?))
        })
        .await?
        .ok_or_else(|| Error::not_found("version", format!("no version {version}")))?;
        let specs: BTreeMap<String, Candidate> = old
            .into_iter()
            .filter(|(k, _)| service.is_none_or(|s| s == k))
            .map(|(k, v)| (k, Arc::unwrap_or_clone(v.spec).into()))
            .collect();
        match service {
            None => {
                self.commit(
                    who,
                    &format!("revert to version {version}"),
                    specs,
                    Scope::Exact { force },
                    Vec::new(),
                )
                .await
            }
            Some(s) if specs.is_empty() => Err(Error::not_found(
                "service",
                format!("version {version} has no service {s:?}"),
            )),
            Some(s) => {
                self.commit(
                    who,
                    &format!("revert {s} to version {version}"),
                    specs,
                    Scope::Partial { force },
                    Vec::new(),
                )
                .await
            }
        }
    }

    /// Makes a version where the services in `specs` take these strategies (see [`Scope`]).
    /// Durable before it returns.
    async fn commit(
        &mut self,
        who: &str,
        what: &str,
        specs: BTreeMap<String, Candidate>,
        scope: Scope,
        meta: Vec<(&'static str, String)>,
    ) -> Result<Written, Error> {
        let plan = self.plan(who, what, specs, scope)?;
        let store = self.store.clone();
        let (who_s, what_s) = (who.to_string(), what.to_string());
        let Some(plan) = plan else {
            let version = self.version;
            blocking(move || {
                let store = store.lock().unwrap_or_else(|p| p.into_inner());
                for (k, v) in &meta {
                    store.set_meta(k, v)?;
                }
                store.log_operation(now(), &who_s, &format!("{what_s} (no change)"), version)
            })
            .await?;
            return Ok(Written {
                version: self.version,
                changed: false,
                summary: Vec::new(),
            });
        };
        let (row, rows) = (plan.row.clone(), plan.rows.clone());
        blocking(move || {
            let mut store = store.lock().unwrap_or_else(|p| p.into_inner());
            let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
            store.commit(&row, &rows, (&who_s, &what_s), &meta)
        })
        .await?;
        if let Some(c) = &self.checkpointer {
            c.start();
        }
        let written = Written {
            version: plan.row.version,
            changed: true,
            summary: plan.row.summary.clone(),
        };
        tracing::info!(version = written.version, %who, %what, changes = ?written.summary, "new version");
        self.apply(plan);
        self.publish();
        Ok(written)
    }

    /// Validates and prepares a version (compiled strategies, rows to store), or `None` when
    /// nothing changes. Nothing is applied yet.
    fn plan(
        &self,
        who: &str,
        _what: &str,
        specs: BTreeMap<String, Candidate>,
        scope: Scope,
    ) -> Result<Option<Plan>, Error> {
        let version = self.version + 1;
        let names: BTreeSet<String> = specs.keys().cloned().collect();
        let mut next: BTreeMap<String, Current> = BTreeMap::new();
        let mut summary = Vec::new();
        for (name, Candidate { spec, compiled }) in specs {
            let old = self.services.get(&name);
            if old.is_some_and(|o| *o.stored.spec == spec) {
                continue;
            }
            if !config::valid_service_name(&name) {
                return Err(Error::Invalid {
                    field: format!("services.{name}"),
                    message: format!(
                        "service {name:?}: names use letters, digits, '-', '_' or '.'"
                    ),
                });
            }
            diff::one(
                &name,
                old.map(|o| &*o.stored.spec),
                Some(&spec),
                &mut summary,
            );
            let invalid = |e: graylane_strategy::Error| Error::Invalid {
                field: format!("services.{name}.{}", e.path()),
                message: format!("services.{name}.{e}"),
            };
            self.size_limits.check(&spec).map_err(invalid)?;
            let compiled = match compiled {
                Some(c) => c,
                None => Arc::new(compile(&spec, old).map_err(invalid)?),
            };
            if !scope.force() {
                self.check_default(&name, &spec)?;
            }
            next.insert(
                name,
                Current {
                    stored: StoredService::new(spec, version, old.map(|o| &o.stored)),
                    compiled,
                },
            );
        }
        let removed: Vec<String> = if matches!(scope, Scope::Exact { .. }) {
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
            return Ok(None);
        }
        let mut rows: BTreeMap<String, StoredService> = BTreeMap::new();
        for (name, cur) in &self.services {
            if !removed.contains(name) && !next.contains_key(name) {
                rows.insert(name.clone(), cur.stored.clone());
            }
        }
        for (name, cur) in &next {
            rows.insert(name.clone(), cur.stored.clone());
        }
        Ok(Some(Plan {
            row: VersionRow {
                version,
                at: now(),
                author: who.to_string(),
                summary,
            },
            rows,
            next,
            removed,
        }))
    }

    /// A version must leave each service a cluster able to take default traffic: a G cluster,
    /// and not only unhealthy ones while another cluster of the service is healthy.
    fn check_default(&self, name: &str, spec: &StrategySpec) -> Result<(), Error> {
        let field = format!("services.{name}.route-strategy");
        let green: Vec<&String> = spec
            .clusters
            .iter()
            .filter(|(_, c)| c.status == graylane_strategy::State::G)
            .map(|(k, _)| k)
            .collect();
        if green.is_empty() {
            return Err(Error::Invalid {
                field,
                message: format!(
                    "{name} would have no G cluster: every request matching no Y rule would get \
                     a 503. To move to another cluster, `graylane release start {name} switch \
                     --to <cluster>` swaps the states in one version; or set the new cluster G \
                     before the old one R (both G share by weight), or force it"
                ),
            });
        }
        let healthy = |k: &str| {
            self.index
                .cluster(name, k)
                .map(|e| u32::try_from(e.len()).unwrap_or(u32::MAX) >= spec.min_healthy)
        };
        let green_ok = green.iter().any(|k| healthy(k) != Some(false));
        let other_ok = spec.clusters.keys().find(|k| healthy(k) == Some(true));
        if let (false, Some(other)) = (green_ok, other_ok) {
            return Err(Error::Invalid {
                field,
                message: format!(
                    "{name}'s G clusters ({}) have no healthy endpoint while {other} has: \
                     traffic would leave healthy instances for none. Bring them up first, or \
                     force it",
                    green
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(())
    }

    /// Makes a committed plan current.
    fn apply(&mut self, plan: Plan) {
        self.version = plan.row.version;
        for name in &plan.removed {
            self.services.remove(name);
            self.snapshot.services.remove(name);
        }
        let changed: Vec<String> = plan.next.keys().cloned().collect();
        for (name, mut cur) in plan.next {
            cur.stored = cur.stored.committed();
            self.services.insert(name, cur);
        }
        for name in &changed {
            self.refresh_service(name);
        }
        self.refresh_envoy();
    }

    fn discovery(&mut self, ev: discovery::Event) {
        match ev {
            discovery::Event::Endpoints {
                source,
                service,
                cluster,
                endpoints,
            } => {
                if self.index.set(source, &service, &cluster, endpoints) {
                    self.refresh_service(&service);
                    self.refresh_envoy_for(&service);
                    self.publish();
                }
                self.schedule_persist();
            }
            discovery::Event::Stale {
                source,
                stale,
                error,
            } => {
                let s = self.snapshot.sources.entry(source).or_default();
                s.stale = stale;
                s.error = error;
                self.publish();
            }
            discovery::Event::Synced { source } => {
                let changed = self.index.synced(source);
                let status = self.snapshot.sources.entry(source).or_default();
                status.synced = true;
                status.restored = false;
                for service in &changed {
                    self.refresh_service(service);
                }
                self.refresh_envoy();
                self.schedule_persist();
                self.publish();
            }
        }
    }

    fn schedule_persist(&mut self) {
        if self.persist_at.is_none() && self.index.is_dirty() {
            self.persist_at = Some(Instant::now() + PERSIST_EVERY);
        }
    }

    /// Keeps the endpoints changed since the last time in the store.
    async fn persist(&mut self) {
        self.persist_at = None;
        let rows = self.index.take_dirty();
        if rows.is_empty() {
            return;
        }
        let store = self.store.clone();
        let r = blocking(move || {
            store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_endpoints(&rows)
        })
        .await;
        match r {
            Ok(()) => {
                if let Some(c) = &self.checkpointer {
                    c.start();
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not keep the endpoints for the next start"),
        }
    }

    /// Rebuilds one service's view from its strategy and the endpoint index.
    fn refresh_service(&mut self, name: &str) {
        let Some(cur) = self.services.get(name) else {
            self.snapshot.services.remove(name);
            return;
        };
        let mut healthy = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for key in cur.stored.spec.clusters.keys() {
            let eps = self.index.cluster(name, key);
            healthy.insert(
                key.clone(),
                eps.as_ref()
                    .map(|e| u32::try_from(e.len()).unwrap_or(u32::MAX)),
            );
            if let Some(eps) = eps {
                endpoints.insert(key.clone(), eps);
            }
        }
        let prev = self.snapshot.services.get(name);
        let health = match prev {
            Some(p) if p.healthy == healthy && p.endpoints == endpoints => p.health,
            Some(p) => p.health + 1,
            None => self.health_base,
        };
        // The feed JSON is per strategy version: kept while only health moves.
        let json = match prev {
            Some(p) if p.version == cur.stored.changed_at => p.json.clone(),
            _ => Arc::new(OnceLock::new()),
        };
        let view = ServiceView {
            spec: cur.stored.spec.clone(),
            compiled: cur.compiled.clone(),
            version: cur.stored.changed_at,
            health,
            healthy,
            endpoints,
            json,
            superseded: CancellationToken::new(),
        };
        self.snapshot
            .services
            .insert(name.to_string(), Arc::new(view));
    }

    /// Recomputes what xDS serves from every service's mapped clusters (a strategy changed:
    /// clusters may have come or gone).
    fn refresh_envoy(&mut self) {
        let wanted = self.wanted(None);
        let gone: Vec<String> = self
            .envoy
            .served()
            .keys()
            .filter(|n| !wanted.contains_key(*n))
            .cloned()
            .collect();
        for n in gone {
            self.envoy.remove(&n);
        }
        self.update_envoy(wanted);
    }

    /// Recomputes what xDS serves for the Envoy clusters `service` maps (its endpoints
    /// changed): only those clusters' endpoints are gathered and compared, not every
    /// service's (with 10,000 instances under churn, gathering all of them on every registry
    /// event was most of the control plane's work).
    fn refresh_envoy_for(&mut self, service: &str) {
        let Some(view) = self.snapshot.services.get(service) else {
            return;
        };
        let names: BTreeSet<String> = view
            .spec
            .clusters
            .iter()
            .map(|(key, c)| c.cluster.clone().unwrap_or_else(|| key.clone()))
            .collect();
        let wanted = self.wanted(Some(&names));
        self.update_envoy(wanted);
    }

    /// The endpoints of the Envoy clusters in `only` (all when `None`), gathered from every
    /// service that maps them.
    fn wanted(&self, only: Option<&BTreeSet<String>>) -> BTreeMap<String, BTreeSet<Endpoint>> {
        let mut wanted: BTreeMap<String, BTreeSet<Endpoint>> = BTreeMap::new();
        for view in self.snapshot.services.values() {
            for (key, eps) in &view.endpoints {
                let envoy = view
                    .spec
                    .clusters
                    .get(key)
                    .and_then(|c| c.cluster.as_deref())
                    .unwrap_or(key);
                if only.is_some_and(|o| !o.contains(envoy)) {
                    continue;
                }
                wanted
                    .entry(envoy.to_string())
                    .or_default()
                    .extend(eps.iter().cloned());
            }
        }
        wanted
    }

    fn update_envoy(&mut self, wanted: BTreeMap<String, BTreeSet<Endpoint>>) {
        let now = Instant::now();
        for (n, set) in wanted {
            self.envoy.update(&n, set.into_iter().collect(), now);
        }
        self.publish_endpoints_into_snapshot();
    }

    fn publish_endpoints_into_snapshot(&mut self) {
        let served = self.envoy.served();
        let same = self.snapshot.endpoints.len() == served.len()
            && self
                .snapshot
                .endpoints
                .iter()
                .zip(served)
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        if !same {
            if !self.snapshot.endpoints.keys().eq(served.keys()) {
                self.snapshot.clusters_version += 1;
            }
            // Pointers: each cluster's list is shared, not copied.
            self.snapshot.endpoints = Arc::new(served.clone());
            self.snapshot.endpoints_version += 1;
        }
    }

    fn publish_endpoints(&mut self) {
        self.publish_endpoints_into_snapshot();
        self.publish();
    }

    /// Publishes the snapshot.
    fn publish(&mut self) {
        self.snapshot.version = self.version;
        self.snapshot.xds_ready = self
            .snapshot
            .sources
            .values()
            .all(|s| s.synced || s.restored);
        let prev = self.tx.borrow().clone();
        // A preview started or ended is news to its service's followers: their view is
        // renewed so that the old one can be marked superseded.
        if !Arc::ptr_eq(&prev.previews, &self.snapshot.previews) {
            let (old, new) = (&prev.previews, &self.snapshot.previews);
            let moved: BTreeSet<String> = old
                .keys()
                .chain(new.keys())
                .filter(|n| match (old.get(*n), new.get(*n)) {
                    (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                    (None, None) => false,
                    _ => true,
                })
                .cloned()
                .collect();
            for name in moved {
                let Some(view) = self.snapshot.services.get(&name) else {
                    continue;
                };
                if prev
                    .services
                    .get(&name)
                    .is_some_and(|p| Arc::ptr_eq(p, view))
                {
                    let renewed = Arc::new(view.renewed());
                    self.snapshot.services.insert(name, renewed);
                }
            }
        }
        self.tx.send_replace(Arc::new(self.snapshot.clone()));
        // Published first, then the replaced views marked: a long-poll woken by its view
        // reads the snapshot that replaced it. The others sleep on.
        for (name, view) in &prev.services {
            if !self
                .snapshot
                .services
                .get(name)
                .is_some_and(|v| Arc::ptr_eq(v, view))
            {
                view.superseded.cancel();
            }
        }
    }
}

/// Which services a version sets, and whether it may leave one without a default cluster.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// The services named take these strategies; the others stay (an edit).
    Partial { force: bool },
    /// Exactly these services; those not named are removed (a config file, a revert).
    Exact { force: bool },
}

impl Scope {
    fn force(self) -> bool {
        match self {
            Scope::Partial { force } | Scope::Exact { force } => force,
        }
    }
}

/// A validated version, not yet applied.
struct Plan {
    row: VersionRow,
    rows: BTreeMap<String, StoredService>,
    next: BTreeMap<String, Current>,
    removed: Vec<String>,
}

/// Runs a store call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, store::Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(store::Error::Task(e.to_string())))?
        .map_err(Error::Store)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::discovery::{Event, SourceKind};
    use graylane_strategy::State;

    const CONFIG: &str = r#"
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1, 2, 3]}}
      B: {status: G, id: {all: true}}
"#;

    struct Running {
        handle: Handle,
        events: mpsc::Sender<Event>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        _stop: tokio_util::sync::DropGuard,
    }

    fn start(config: &str) -> Running {
        start_driven(config, None)
    }

    fn start_driven(config: &str, driver: Option<Arc<dyn crate::instances::Driver>>) -> Running {
        let cfg = Config::parse(config, std::path::Path::new("graylane.yaml")).unwrap();
        let (mut writer, snapshots) = Writer::open(Store::memory().unwrap(), &cfg, "h0").unwrap();
        if let Some(d) = driver {
            writer.set_instances(d);
        }
        let (ctx, crx) = mpsc::channel(16);
        let (etx, erx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        tokio::spawn(writer.run(crx, erx, stop.clone()));
        Running {
            handle: Handle::new(ctx),
            events: etx,
            snapshots,
            _stop: stop.drop_guard(),
        }
    }

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: "10.0.0.1".into(),
            port,
        }
    }

    async fn endpoints(r: &Running, cluster: &str, eps: Vec<Endpoint>) {
        r.events
            .send(Event::Endpoints {
                source: SourceKind::Consul,
                service: "web".into(),
                cluster: cluster.into(),
                endpoints: eps,
            })
            .await
            .unwrap();
    }

    /// Waits (paused clock: instantly) until the published snapshot satisfies `f`.
    async fn until(r: &mut Running, f: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        loop {
            let s = r.snapshots.borrow_and_update().clone();
            if f(&s) {
                return s;
            }
            r.snapshots.changed().await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_emptied_cluster_drains_for_its_window_then_is_served_empty() {
        let mut r = start(CONFIG);
        endpoints(&r, "A", vec![ep(1)]).await;
        let s = until(&mut r, |s| {
            s.endpoints.get("A").is_some_and(|e| **e == vec![ep(1)])
        })
        .await;
        assert_eq!(s.services["web"].healthy["A"], Some(1));
        let emptied_at = Instant::now();
        endpoints(&r, "A", vec![]).await;
        // The filters are told at once (no healthy endpoint), Envoy keeps the endpoint.
        let s = until(&mut r, |s| s.services["web"].healthy["A"] == Some(0)).await;
        assert_eq!(*s.endpoints["A"], vec![ep(1)]);
        // A repeated empty report does not extend the window.
        tokio::time::sleep(Duration::from_secs(5)).await;
        endpoints(&r, "A", vec![]).await;
        let s = until(&mut r, |s| s.endpoints["A"].is_empty()).await;
        let took = Instant::now() - emptied_at;
        assert!(
            took >= DRAIN && took < DRAIN + Duration::from_millis(50),
            "drained after {took:?}"
        );
        // And stays empty: nothing re-arms it.
        tokio::time::sleep(DRAIN * 3).await;
        assert!(r.snapshots.borrow().endpoints["A"].is_empty());
        drop(s);
    }

    const WITH_CONSUL: &str = r#"
discovery: {consul: {address: "http://127.0.0.1:1"}}
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1, 2, 3]}}
      B: {status: G, id: {all: true}}
    discovery:
      consul: {meta: profile, clusters: {gray: A, prod: B}}
"#;

    #[tokio::test]
    async fn a_release_resumes_after_a_restart_at_its_step_without_repeating_an_edit() {
        use crate::release::{Action, Gates, Procedure, Start, Status};
        let dir = tempfile::tempdir().unwrap();
        let config = "services:\n  web:\n    route-strategy:\n      A: {status: G, id: {all: true}}\n      B: {status: R}\n";
        let cfg = Config::parse(config, std::path::Path::new("g.yaml")).unwrap();
        let run = |writer: Writer| {
            let (ctx, crx) = mpsc::channel(16);
            let (etx, erx) = mpsc::channel(16);
            let stop = CancellationToken::new();
            let task = tokio::spawn(writer.run(crx, erx, stop.clone()));
            (Handle::new(ctx), stop, task, etx)
        };
        let start = |procedure, to: &str, approval| Start {
            procedure,
            to: to.into(),
            from: None,
            ids: None,
            intervals: Vec::new(),
            percents: None,
            by: None,
            gates: Gates {
                approval,
                ..Gates::default()
            }
            .into(),
            reason: String::new(),
        };
        let (writer, _) = Writer::open(Store::open(dir.path()).unwrap(), &cfg, "h").unwrap();
        let (h, stop, task, _e) = run(writer);
        let r = h
            .start_release(
                "ops".into(),
                "web".into(),
                start(Procedure::Switch, "B", true),
            )
            .await
            .unwrap();
        assert_eq!(
            (r.at, r.waiting.as_str()),
            (1, "approval before step 2: A R, B G")
        );
        stop.cancel();
        task.await.unwrap();
        // Restarted: the release is where it was; nothing is made again.
        let (writer, snaps) = Writer::open(Store::open(dir.path()).unwrap(), &cfg, "h").unwrap();
        assert_eq!(
            snaps.borrow().version,
            2,
            "the file's version and the isolate step"
        );
        let kept = snaps.borrow().releases["web"].clone();
        assert_eq!((kept.at, kept.status.clone()), (1, Status::Running));
        let (h, _stop, _task, _e) = run(writer);
        let r = h
            .release_action("ops".into(), "web".into(), Action::Approve, String::new())
            .await
            .unwrap();
        assert_eq!(r.status, Status::Succeeded, "{:?}", r.log);
        assert_eq!(snaps.borrow().version, 3, "only the swap is new");
        let r2 = h
            .start_release(
                "ops".into(),
                "web".into(),
                start(Procedure::Rollback, "A", false),
            )
            .await
            .unwrap();
        assert_eq!(
            (r2.id, r2.status),
            (2, Status::Succeeded),
            "ids go on after a restart"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_serves_the_kept_endpoints_until_discovery_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse(WITH_CONSUL, std::path::Path::new("g.yaml")).unwrap();
        // First run: nothing kept, so xDS waits for discovery.
        let (writer, mut snaps) =
            Writer::open(Store::open(dir.path()).unwrap(), &cfg, "h").unwrap();
        assert!(!snaps.borrow().xds_ready);
        let (ctx, crx) = mpsc::channel(16);
        let (etx, erx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(writer.run(crx, erx, stop.clone()));
        for (cluster, port) in [("A", 1), ("B", 2)] {
            etx.send(Event::Endpoints {
                source: SourceKind::Consul,
                service: "web".into(),
                cluster: cluster.into(),
                endpoints: vec![ep(port)],
            })
            .await
            .unwrap();
        }
        etx.send(Event::Synced {
            source: SourceKind::Consul,
        })
        .await
        .unwrap();
        loop {
            if snaps.borrow_and_update().xds_ready {
                break;
            }
            snaps.changed().await.unwrap();
        }
        // Kept within PERSIST_EVERY; a clean stop keeps what is pending too.
        tokio::time::sleep(PERSIST_EVERY * 2).await;
        stop.cancel();
        task.await.unwrap();
        drop(ctx);
        // Second run, the registry down: the kept endpoints are served at once, marked.
        let (writer, snaps) = Writer::open(Store::open(dir.path()).unwrap(), &cfg, "h").unwrap();
        let s = snaps.borrow().clone();
        assert!(s.xds_ready);
        assert_eq!(*s.endpoints["A"], vec![ep(1)]);
        assert_eq!(*s.endpoints["B"], vec![ep(2)]);
        assert_eq!(s.services["web"].healthy["A"], Some(1));
        assert!(s.sources[&SourceKind::Consul].restored);
        // Discovery syncs and reports only B: A's kept endpoints go (drained first).
        let (_ctx, crx) = mpsc::channel(16);
        let (etx, erx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let mut snaps2 = snaps.clone();
        tokio::spawn(writer.run(crx, erx, stop.clone()));
        etx.send(Event::Endpoints {
            source: SourceKind::Consul,
            service: "web".into(),
            cluster: "B".into(),
            endpoints: vec![ep(3)],
        })
        .await
        .unwrap();
        etx.send(Event::Synced {
            source: SourceKind::Consul,
        })
        .await
        .unwrap();
        loop {
            let s = snaps2.borrow_and_update().clone();
            if !s.sources[&SourceKind::Consul].restored {
                assert_eq!(
                    s.services["web"].healthy["A"], None,
                    "A no longer mapped by a live source"
                );
                assert_eq!(*s.endpoints["B"], vec![ep(3)]);
                break;
            }
            snaps2.changed().await.unwrap();
        }
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn health_generations_move_only_when_counts_or_endpoints_do() {
        let mut r = start(CONFIG);
        let h0 = until(&mut r, |_| true).await.services["web"].health;
        endpoints(&r, "A", vec![ep(1)]).await;
        let s = until(&mut r, |s| s.services["web"].health == h0 + 1).await;
        let version = s.services["web"].version;
        // Same set again: nothing to publish.
        endpoints(&r, "A", vec![ep(1)]).await;
        endpoints(&r, "B", vec![ep(2)]).await;
        let s = until(&mut r, |s| s.services["web"].healthy["B"] == Some(1)).await;
        assert_eq!(s.services["web"].health, h0 + 2);
        // Same count, another instance: the generation moves (nginx balances by endpoints).
        endpoints(&r, "B", vec![ep(3)]).await;
        let s = until(&mut r, |s| s.services["web"].health == h0 + 3).await;
        assert_eq!(
            s.services["web"].version, version,
            "health is not a new version"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn edits_are_durable_versions_and_a_flip_reuses_the_whitelist_index() {
        let mut r = start(CONFIG);
        let before = until(&mut r, |_| true).await;
        let ids_before = before.services["web"]
            .compiled
            .cluster("A")
            .unwrap()
            .1
            .ids
            .clone();
        let w = r
            .handle
            .edit(
                "ops".into(),
                "web".into(),
                Edit::SetState {
                    cluster: "A".into(),
                    state: State::R,
                },
                false,
            )
            .await
            .unwrap();
        assert_eq!(w.version, 2);
        assert_eq!(w.summary, vec!["web.A: status Y -> R".to_string()]);
        let s = until(&mut r, |s| s.version == 2).await;
        let ids_after = s.services["web"]
            .compiled
            .cluster("A")
            .unwrap()
            .1
            .ids
            .clone();
        assert!(
            Arc::ptr_eq(&ids_before, &ids_after),
            "the id index was rebuilt"
        );
        // The same edit again changes nothing.
        let w = r
            .handle
            .edit(
                "ops".into(),
                "web".into(),
                Edit::SetState {
                    cluster: "A".into(),
                    state: State::R,
                },
                false,
            )
            .await
            .unwrap();
        assert!(!w.changed);
        // Unknown service and cluster are named.
        let e = r
            .handle
            .edit(
                "ops".into(),
                "nope".into(),
                Edit::SetState {
                    cluster: "A".into(),
                    state: State::R,
                },
                false,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::NotFound { ref field, .. } if field == "service"),
            "{e}"
        );
        // Revert brings version 1's strategy back as version 3.
        let w = r.handle.revert("ops".into(), 1, None, false).await.unwrap();
        assert_eq!(w.version, 3);
        let s = until(&mut r, |s| s.version == 3).await;
        assert_eq!(s.services["web"].spec.clusters["A"].status, State::Y);
        let e = r
            .handle
            .revert("ops".into(), 99, None, false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::NotFound { ref field, .. } if field == "version"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn revert_of_one_service_leaves_the_others_as_they_are() {
        let mut r = start(
            "services:\n  web:\n    route-strategy:\n      A: {status: Y, id: {ids: [1]}}\n      B: {status: G, id: {all: true}}\n  shop:\n    route-strategy:\n      C: {status: Y, id: {ids: [1]}}\n      D: {status: G, id: {all: true}}\n",
        );
        let set = |cluster: &str| Edit::SetState {
            cluster: cluster.into(),
            state: State::R,
        };
        let h = r.handle.clone();
        h.edit("ops".into(), "web".into(), set("A"), false)
            .await
            .unwrap();
        h.edit("ops".into(), "shop".into(), set("C"), false)
            .await
            .unwrap();
        let w = h
            .revert("ops".into(), 1, Some("web".into()), false)
            .await
            .unwrap();
        assert_eq!(w.version, 4);
        assert_eq!(w.summary, vec!["web.A: status R -> Y".to_string()]);
        let s = until(&mut r, |s| s.version == 4).await;
        assert_eq!(s.services["web"].spec.clusters["A"].status, State::Y);
        assert_eq!(s.services["shop"].spec.clusters["C"].status, State::R);
        let e = h
            .revert("ops".into(), 1, Some("cart".into()), false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, Error::NotFound { ref field, .. } if field == "service"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_one_by_one_asks_the_driver_once_per_step_and_follows_discovery() {
        use crate::release::{Procedure, Start, Status};
        let driver = crate::instances::Recorder::new(&[("web", "A"), ("web", "B")]);
        let mut r = start_driven(
            "services:\n  web:\n    route-strategy:\n      A: {status: R}\n      B: {status: G, id: {all: true}}\n",
            Some(driver.clone()),
        );
        endpoints(&r, "B", vec![ep(1), ep(2)]).await;
        endpoints(&r, "A", Vec::new()).await;
        until(&mut r, |s| {
            s.services["web"].healthy.get("B") == Some(&Some(2))
                && s.services["web"].healthy.get("A") == Some(&Some(0))
        })
        .await;
        let start = Start {
            procedure: Procedure::OneByOne,
            to: "A".into(),
            from: None,
            ids: None,
            intervals: Vec::new(),
            percents: None,
            by: None,
            gates: crate::release::GatesSpec::default(),
            reason: String::new(),
        };
        r.handle
            .start_release("ops".into(), "web".into(), start)
            .await
            .unwrap();
        // Each scale the driver is asked for shows up in discovery, as a platform would do it.
        let mut a = Vec::new();
        let mut b = vec![ep(1), ep(2)];
        for (i, (cluster, n)) in [("A", 1u16), ("B", 1), ("A", 2), ("B", 0)]
            .into_iter()
            .enumerate()
        {
            until(&mut r, |_| driver.asked().len() > i).await;
            assert_eq!(
                &driver.asked()[i],
                &("web".to_string(), cluster.to_string(), u32::from(n))
            );
            let eps = if cluster == "A" { &mut a } else { &mut b };
            eps.resize_with(usize::from(n), || ep(100));
            for (i, e) in eps.iter_mut().enumerate() {
                *e = ep(if cluster == "A" { 100 } else { 1 } + i as u16);
            }
            endpoints(&r, cluster, eps.clone()).await;
        }
        let s = until(&mut r, |s| {
            s.releases
                .get("web")
                .is_some_and(|x| x.status == Status::Succeeded)
        })
        .await;
        assert_eq!(driver.asked().len(), 4, "{:?}", driver.asked());
        assert_eq!(s.services["web"].spec.clusters["A"].status, State::G);
        assert_eq!(s.services["web"].spec.clusters["B"].status, State::R);
    }
}
