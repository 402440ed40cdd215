//! The real control plane (`graylane serve`) as a child process, and its CLI.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::envoy::repo_root;
use crate::runtime::{runtime, wait_until};

/// The `graylane` binary: `$GRAYLANE_BIN`, else built (once per test process) with cargo.
pub fn graylane_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("GRAYLANE_BIN").filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "-q",
                "-p",
                "graylane-control-plane",
                "--bin",
                "graylane",
            ])
            .status()
            .expect("running cargo build for the control plane");
        assert!(status.success(), "building graylane failed: {status}");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target"));
        target.join("debug/graylane")
    })
    .clone()
}

/// A free loopback port (bound, then released: the daemon binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `graylane serve --config FILE` on a fixed port; killed (SIGKILL) on drop.
pub struct ControlPlane {
    child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    log: PathBuf,
    /// Extra environment of the daemon (e.g. `KUBECONFIG` of a fake API server).
    env: Vec<(String, String)>,
}

impl ControlPlane {
    /// Starts the daemon on `config` (which must say `listen: 127.0.0.1:<port>`) and waits
    /// until its API answers.
    pub fn start(config: &Path, port: u16) -> ControlPlane {
        Self::start_with_env(config, port, &[])
    }

    /// As [`ControlPlane::start`], with extra environment variables for the daemon.
    pub fn start_with_env(config: &Path, port: u16, env: &[(&str, &str)]) -> ControlPlane {
        let log = config.with_extension("log");
        let mut cp = ControlPlane {
            child: None,
            port,
            config: config.to_path_buf(),
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        cp.restart();
        cp
    }

    /// Starts it again (same config, data and port) after `kill`.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("control plane log");
        let child = Command::new(graylane_bin())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawning graylane serve");
        self.child = Some(child);
        let url = self.url();
        wait_until("the control plane answers", Duration::from_secs(30), || {
            runtime()
                .block_on(crate::client::fetch::<&str, &str>(
                    &format!("{url}/healthz"),
                    &[],
                ))
                .is_ok_and(|(s, _, _)| s == 200)
        });
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Runs the CLI against this daemon with `token`.
    pub fn cli(&self, token: &str, args: &[&str]) -> Output {
        Command::new(graylane_bin())
            .args(args)
            .env("GRAYLANE_SERVER", self.url())
            .env("GRAYLANE_TOKEN", token)
            .output()
            .expect("running the graylane CLI")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- control plane log ----\n{}\n---- end ----", self.log());
        }
    }
}
