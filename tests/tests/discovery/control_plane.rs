//! The control plane in-process, as `graylane serve` composes it, on a tokio runtime of its own
//! (the harness blocks): stopped and restarted on the same ports and data.

use graylane_control_plane::serve::Loaded;
use tokio_util::sync::CancellationToken;

/// The control plane, served from a tokio runtime of its own (the harness blocks).
pub struct ControlPlane {
    rt: tokio::runtime::Runtime,
    /// The port of its API and feed.
    pub api: u16,
    /// The port of its xDS (ADS) server.
    pub xds: u16,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    path: std::path::PathBuf,
    kube: Option<kube::Client>,
    _dir: tempfile::TempDir,
}

impl ControlPlane {
    pub fn start(
        rt: tokio::runtime::Runtime,
        services_yaml: &str,
        discovery_yaml: &str,
        kube: Option<kube::Client>,
    ) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("graylane.yaml");
        let text = format!("data_dir: data\n{discovery_yaml}\nservices:\n{services_yaml}");
        std::fs::write(&path, &text).unwrap();
        let (api_l, xds_l) = rt.block_on(async {
            (
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
        });
        let (api, xds) = (
            api_l.local_addr().unwrap().port(),
            xds_l.local_addr().unwrap().port(),
        );
        let mut cp = ControlPlane {
            rt,
            api,
            xds,
            stop: CancellationToken::new(),
            task: None,
            path,
            kube,
            _dir: dir,
        };
        cp.serve(api_l, xds_l);
        cp
    }

    fn serve(&mut self, api: tokio::net::TcpListener, xds: tokio::net::TcpListener) {
        self.stop = CancellationToken::new();
        let loaded = Loaded::read(&self.path).unwrap();
        let (s, kube) = (self.stop.clone(), self.kube.clone());
        self.task = Some(self.rt.spawn(async move {
            if let Err(e) =
                graylane_control_plane::serve::run(api, Some(xds), loaded, kube, s).await
            {
                eprintln!("control plane stopped: {e}");
            }
        }));
    }

    /// Stops it (closing the ADS stream and the feed).
    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = self.rt.block_on(t);
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        let (api, xds) = (self.api, self.xds);
        let (api_l, xds_l) = self.rt.block_on(async move {
            (
                tokio::net::TcpListener::bind(("127.0.0.1", api))
                    .await
                    .unwrap(),
                tokio::net::TcpListener::bind(("127.0.0.1", xds))
                    .await
                    .unwrap(),
            )
        });
        self.serve(api_l, xds_l);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A multi-threaded runtime for the control plane and the fakes.
pub fn runtime_of_two() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}
