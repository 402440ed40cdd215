//! `graylane serve`: the daemon. Tasks: the writer, the config-file watcher, discovery, the
//! xDS server and the HTTP server (admin API, feed, metrics), supervised with a `TaskTracker`
//! and stopped by one `CancellationToken`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::RecursiveMode;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{self, AppState};
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::store::{self, Store};
use crate::supervisor::supervise;
use crate::writer::{self, Handle, Writer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("loading the store: {0}")]
    Writer(#[from] writer::Error),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plugin(#[from] crate::plugin::Error),
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
    #[error("the writer task stopped")]
    WriterStopped,
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
}

/// Quiet time after the last change to the config file before it is read.
const SETTLE: Duration = Duration::from_millis(150);

/// The config file as read once: its text's hash and what it parses to.
pub struct Loaded {
    pub path: PathBuf,
    pub hash: String,
    pub config: Config,
}

impl Loaded {
    /// Reads and parses `path`, once.
    pub fn read(path: &Path) -> Result<Loaded, config::Error> {
        let text = std::fs::read_to_string(path).map_err(|e| config::Error {
            file: path.display().to_string(),
            location: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Ok(Loaded {
            path: path.to_path_buf(),
            hash: store::hash(text.as_bytes()),
            config: Config::parse(&text, path)?,
        })
    }
}

/// Loads `config_path`, binds its `listen` address and serves until `shutdown`.
pub async fn serve(config_path: PathBuf, shutdown: CancellationToken) -> Result<(), Error> {
    let loaded = Loaded::read(&config_path)?;
    let listen = loaded.config.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let xds = match loaded.config.xds_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen {
                    addr: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    run(listener, xds, loaded, None, shutdown).await
}

/// Serves the API on `listener` and, if given, xDS on `xds` (tests pass listeners bound to
/// port 0, and may pass the Kubernetes client of a fake API server).
pub async fn run(
    listener: TcpListener,
    xds: Option<TcpListener>,
    loaded: Loaded,
    kube_client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Loaded { path, hash, config } = loaded;
    let plugin = config
        .plugin
        .as_ref()
        .map(|p| crate::plugin::Plugin::load(p, &path));
    let plugin = plugin.transpose()?.map(Arc::new);
    // TLS files are read before anything starts: a bad certificate is an error at start.
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let tls = config
        .tls
        .as_ref()
        .map(|t| crate::tls::Loaded::load(t, &base))
        .transpose()?;
    let store = Store::open(&config.data_dir)?;
    let (writer, snapshots) = Writer::open(store, &config, &hash)?;
    let history = writer.reader()?;
    let (commands, rx) = mpsc::channel(1024);
    let (events, events_rx) = mpsc::channel(1024);
    let handle = Handle::new(commands);
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();

    // The writer owns the state: if it stops, the daemon stops (with an error), it is not
    // restarted behind the API's back.
    let mut writer = writer;
    let m = metrics.clone();
    writer.set_followers(Arc::new(move |service: &str| m.versions_held(service)));
    let m = metrics.clone();
    writer.set_traffic(Arc::new(move |service: &str, clusters: &[String]| {
        m.traffic(service, clusters)
    }));
    // Kubernetes instance drivers use the discovery's client (a test's fake API server), else
    // one built like discovery builds its own.
    let wants_kube = config
        .instances
        .values()
        .flat_map(|c| c.values())
        .any(|d| matches!(d, crate::instances::ClusterDriver::Kubernetes(_)));
    let driver_client = match (&kube_client, wants_kube || config.istio.apply) {
        (Some(c), _) => Some(c.clone()),
        (None, true) => {
            match config
                .discovery
                .kubernetes
                .clone()
                .unwrap_or_default()
                .client()
                .await
            {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(error = %e,
                        "no Kubernetes client: Kubernetes instance drivers and istio.apply will fail");
                    None
                }
            }
        }
        (None, false) => None,
    };
    writer.set_instances(Arc::new(crate::instances::Drivers::new(
        config.instances.clone(),
        driver_client.clone(),
    )));
    let writer_task = tokio::spawn(
        writer
            .run(rx, events_rx, shutdown.clone())
            .instrument(tracing::info_span!("writer")),
    );
    // The others are supervised: restarted with backoff when they stop or panic.
    let (h, p, stop) = (handle.clone(), path.clone(), shutdown.clone());
    tracker.spawn(supervise(
        "config_watch",
        move || watch_file(p.clone(), hash.clone(), h.clone(), stop.clone()),
        metrics.clone(),
        shutdown.clone(),
    ));
    let mappings = config.mappings();
    if !mappings.is_empty() {
        let (dcfg, stop) = (config.discovery.clone(), shutdown.clone());
        tracker.spawn(supervise(
            "discovery",
            move || {
                crate::discovery::run(
                    dcfg.clone(),
                    mappings.clone(),
                    kube_client.clone(),
                    events.clone(),
                    stop.clone(),
                )
            },
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(xds) = xds {
        let addr = xds.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(%addr, "serving xDS (ADS)");
        let std = xds.into_std().map_err(|source| Error::Listen {
            addr: addr.clone(),
            source,
        })?;
        let (snaps, stop) = (snapshots.clone(), shutdown.clone());
        let xds_tls = tls.as_ref().map(crate::tls::Loaded::xds);
        tracker.spawn(supervise(
            "xds",
            move || {
                let listener = std.try_clone().and_then(TcpListener::from_std);
                let (snaps, stop, tls) = (snaps.clone(), stop.clone(), xds_tls.clone());
                async move {
                    let result = match listener {
                        Ok(l) => crate::xds::run(l, snaps, tls, stop)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    if let Err(e) = result {
                        tracing::error!(error = %e, "xDS server stopped");
                    }
                }
            },
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    // The Istio routes follow the published snapshots (not the writer): see mesh.rs.
    let mut istio_status = None;
    if config.istio.apply {
        let (tx, rx) = tokio::sync::watch::channel(Arc::new(Vec::new()));
        istio_status = Some(rx);
        let apply: crate::mesh::Apply = match driver_client {
            Some(c) => crate::mesh::kube_applier(c),
            None => Arc::new(|o: crate::mesh::Object| {
                Box::pin(async move { Err(format!("{}: no Kubernetes client", o.key)) })
            }),
        };
        let istio = Arc::new(config.istio.clone());
        let (snaps, m, stop) = (snapshots.clone(), metrics.clone(), shutdown.clone());
        tracker.spawn(supervise(
            "istio_apply",
            move || {
                crate::mesh::run(
                    istio.clone(),
                    snaps.clone(),
                    apply.clone(),
                    tx.clone(),
                    m.clone(),
                    stop.clone(),
                )
            },
            metrics.clone(),
            shutdown.clone(),
        ));
    }
    let mut state = AppState::new(snapshots, handle, history, metrics);
    if let Some(rx) = istio_status {
        state = state.with_istio(rx);
    }
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "serving the admin API, feed and metrics");
    let app = api::router(state, &config.limits);
    let app = match plugin {
        Some(p) => app.layer(axum::Extension(p)),
        None => app,
    };
    let stop = shutdown.clone();
    let server = async move {
        match &tls {
            Some(tls) => crate::tls::serve(listener, tls, app, stop).await,
            None => {
                axum::serve(
                    listener,
                    // The peer's address: failed authentications are counted per address.
                    app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
            }
        }
    };
    let stop = shutdown.clone();
    let writer_watch = async move {
        let ended = writer_task.await;
        if !stop.is_cancelled() {
            tracing::error!(?ended, "the writer stopped: shutting down");
            stop.cancel();
            return Err(Error::WriterStopped);
        }
        Ok(())
    };
    let (served, writer) = tokio::join!(server, writer_watch);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    served.map_err(Error::Http)?;
    writer
}

/// Follows the config file (inotify through `notify`, debounced): a changed file is read once
/// it has been quiet for a moment and reads the same twice (a file caught half-written is not
/// applied), parsed, and handed to the writer, valid or not.
async fn watch_file(path: PathBuf, mut last: String, writer: Handle, shutdown: CancellationToken) {
    let (tx, mut rx) = mpsc::channel::<()>(1);
    // The directory is watched, not the file: editors replace files by rename.
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let name = path.file_name().map(|n| n.to_os_string());
    let debouncer = notify_debouncer_full::new_debouncer(
        SETTLE,
        None,
        move |r: notify_debouncer_full::DebounceEventResult| {
            let ours = match &r {
                Ok(events) => events
                    .iter()
                    .any(|e| e.paths.iter().any(|p| p.file_name() == name.as_deref())),
                Err(_) => true,
            };
            if ours {
                let _ = tx.try_send(());
            }
        },
    );
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the config file; edits need a restart");
            return;
        }
    };
    if let Err(e) = debouncer.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::error!(error = %e, dir = %dir.display(), "cannot watch the config directory");
        return;
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = rx.recv() => if got.is_none() { return },
        }
        let Some(text) = read_settled(&path).await else {
            continue; // mid-rename, briefly missing, or still being written: the next event
        };
        let hash = store::hash(text.as_bytes());
        if hash == last {
            continue;
        }
        last = hash.clone();
        let result = Config::parse(&text, &path).map(Box::new);
        match &result {
            Ok(_) => tracing::info!("config file changed"),
            Err(e) => tracing::warn!(error = %e, "config file changed but is invalid"),
        }
        writer.file_reloaded(result, hash).await;
    }
}

/// The file's text, if it reads the same twice a moment apart.
async fn read_settled(path: &Path) -> Option<String> {
    let first = tokio::fs::read_to_string(path).await.ok()?;
    tokio::time::sleep(Duration::from_millis(30)).await;
    let second = tokio::fs::read_to_string(path).await.ok()?;
    (first == second).then_some(first)
}
