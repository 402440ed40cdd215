//! `graylane serve`: the daemon. Tasks: the writer, the config-file watcher, discovery, and
//! the HTTP server (admin API, feed, metrics), supervised with a `TaskTracker` and stopped by
//! one `CancellationToken`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{self, AppState};
use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::store::{self, Store};
use crate::writer::{Command, WriteError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] config::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("loading the store: {0}")]
    Writer(#[from] WriteError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
}

/// How often the config file is checked for edits.
const WATCH_EVERY: Duration = Duration::from_millis(200);

fn file_hash(path: &Path) -> Option<(String, String)> {
    let text = std::fs::read_to_string(path).ok()?;
    Some((store::hash(text.as_bytes()), text))
}

/// Loads `config_path`, binds its `listen` address and serves until `shutdown`.
pub async fn serve(config_path: PathBuf, shutdown: CancellationToken) -> Result<(), Error> {
    let cfg = Config::load(&config_path)?;
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let xds = match cfg.xds_listen {
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
    run(listener, xds, config_path, cfg, None, shutdown).await
}

/// Serves the API on `listener` and, if given, xDS on `xds` (tests pass listeners bound to
/// port 0, and may pass the Kubernetes client of a fake API server).
pub async fn run(
    listener: TcpListener,
    xds: Option<TcpListener>,
    config_path: PathBuf,
    cfg: Config,
    kube_client: Option<kube::Client>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let hash = file_hash(&config_path).map(|(h, _)| h).unwrap_or_default();
    let store = Store::open(&cfg.data_dir)?;
    let (writer, snapshots) = Writer::open(store, &cfg, &hash)?;
    let (commands, rx) = mpsc::channel::<Command>(1024);
    let tracker = TaskTracker::new();

    tracker.spawn(
        writer
            .run(rx, shutdown.clone())
            .instrument(tracing::info_span!("writer")),
    );
    let ticks = commands.clone();
    let stop = shutdown.clone();
    tracker.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => if ticks.send(Command::Tick).await.is_err() { return },
            }
        }
    });
    tracker.spawn(
        watch_file(
            config_path.clone(),
            hash,
            commands.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("config_watch", file = %config_path.display())),
    );
    let discovered: Vec<_> = cfg
        .services
        .iter()
        .filter_map(|(n, s)| s.discovery.clone().map(|d| (n.clone(), d)))
        .collect();
    if !discovered.is_empty() {
        let (dtx, mut drx) = mpsc::channel(1024);
        tracker.spawn(
            crate::discovery::run(
                cfg.discovery.clone(),
                discovered,
                kube_client,
                dtx,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("discovery")),
        );
        let fwd = commands.clone();
        tracker.spawn(
            async move {
                while let Some(ev) = drx.recv().await {
                    if fwd.send(Command::Discovery(ev)).await.is_err() {
                        return;
                    }
                }
            }
            .instrument(tracing::info_span!("discovery_forward")),
        );
    }
    if let Some(xds) = xds {
        let addr = xds.local_addr().map(|a| a.to_string()).unwrap_or_default();
        let (snaps, stop) = (snapshots.clone(), shutdown.clone());
        tracker.spawn(
            async move {
                if let Err(e) = crate::xds::run(xds, snaps, stop).await {
                    tracing::error!(error = %e, "xDS server stopped");
                }
            }
            .instrument(tracing::info_span!("xds", %addr)),
        );
    }
    let state = AppState {
        snapshots,
        commands,
        metrics: Arc::new(Metrics::default()),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%addr, "serving the admin API, feed and metrics");
    let stop = shutdown.clone();
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    served.map_err(Error::Http)
}

/// Polls the config file; a changed file is parsed and handed to the writer, valid or not.
async fn watch_file(
    path: PathBuf,
    mut last: String,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some((hash, text)) = file_hash(&path) else {
            continue; // mid-rename or briefly missing: keep the running version
        };
        if hash == last {
            continue;
        }
        last = hash.clone();
        let result = Config::parse(&text, &path).map(Box::new);
        match &result {
            Ok(_) => tracing::info!("config file changed"),
            Err(e) => tracing::warn!(error = %e, "config file changed but is invalid"),
        }
        if commands
            .send(Command::FileReloaded { result, hash })
            .await
            .is_err()
        {
            return;
        }
    }
}
