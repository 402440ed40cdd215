//! A real nginx (Debian's) running graylane's nginx library through graylane's native module
//! (`nginx/module`, built against this nginx's source by `scripts/nginx-module`) or, with
//! `GRAYLANE_NGINX_VIA=lua`, through `libnginx-mod-http-lua`; configured by the real
//! `graylane render nginx`. `make test` runs the nginx tests both ways.
//!
//! ```text
//!  test ──▶ nginx :P (N workers, reuseport) ──set_by_lua──▶ libgraylane_nginx.so decide
//!                                            ──balancer_by_lua──▶ Upstream "A" | "B"
//!           nginx :S /graylane/status (one worker's snapshot and feed counters)
//! ```
//!
//! nginx runs in the foreground (`daemon off`) from a temp dir with its own pid file, temp
//! paths and error log; dropped, it is stopped (TERM, then KILL of the master and its
//! workers) and, during a panic, its log is printed and the directory kept.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::client::fetch;
use crate::control_plane::{free_port, graylane_bin};
use crate::envoy::repo_root;
use crate::runtime::runtime;

/// How nginx calls graylane's library (`graylane render nginx --module`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// graylane's native nginx module.
    Native,
    /// libnginx-mod-http-lua and LuaJIT's FFI.
    Lua,
}

impl Via {
    /// The `--module` value.
    pub fn flag(self) -> &'static str {
        match self {
            Via::Native => "native",
            Via::Lua => "lua",
        }
    }
}

/// The nginx binary: `$NGINX_BIN`, else Debian's `/usr/sbin/nginx` (scripts/setup installs it).
pub fn nginx_bin() -> PathBuf {
    match std::env::var_os("NGINX_BIN").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from("/usr/sbin/nginx"),
    }
}

/// The modules Debian's nginx loads for Lua (`/etc/nginx/modules-enabled` does the same).
const MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
];

/// `$var`'s path when set (it must exist), else `build` run once, which answers the path it
/// built. Both nginx artefacts are found this way: `make test` names them, a lone `cargo test`
/// builds them.
fn given_or_built(var: &str, cell: &'static OnceLock<PathBuf>, build: fn() -> PathBuf) -> PathBuf {
    cell.get_or_init(|| {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "{var}={} does not exist", p.display());
            return p;
        }
        build()
    })
    .clone()
}

/// The cargo target directory (`$CARGO_TARGET_DIR`, else the repository's `target`).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// `libgraylane_nginx.so`: `$GRAYLANE_NGINX_LIB`, else built once per test process with
/// `cargo build -p graylane-nginx --profile nginx` (a no-op when it is up to date).
pub fn nginx_lib() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    given_or_built("GRAYLANE_NGINX_LIB", &LIB, || {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(repo_root())
            .args(["build", "-q", "-p", "graylane-nginx", "--profile", "nginx"])
            .status()
            .expect("running cargo build for graylane-nginx");
        assert!(status.success(), "building graylane-nginx failed: {status}");
        target_dir().join("nginx/libgraylane_nginx.so")
    })
}

/// How the tests' nginx calls the library: `$GRAYLANE_NGINX_VIA` (`native`, the default, or
/// `lua`).
pub fn nginx_via() -> Via {
    match std::env::var("GRAYLANE_NGINX_VIA").as_deref() {
        Ok("lua") => Via::Lua,
        Ok("native") | Ok("") | Err(_) => Via::Native,
        Ok(other) => panic!("GRAYLANE_NGINX_VIA={other:?}: native or lua"),
    }
}

/// `ngx_http_graylane_module.so`: `$GRAYLANE_NGINX_MODULE`, else built once per test process
/// with `scripts/nginx-module` (a no-op when it is up to date).
pub fn nginx_module() -> PathBuf {
    static MODULE: OnceLock<PathBuf> = OnceLock::new();
    given_or_built("GRAYLANE_NGINX_MODULE", &MODULE, || {
        let out = target_dir().join("nginx/ngx_http_graylane_module.so");
        let status = Command::new(repo_root().join("scripts/nginx-module"))
            .arg(&out)
            .status()
            .expect("running scripts/nginx-module");
        assert!(
            status.success(),
            "building the nginx module failed: {status}"
        );
        out
    })
}

/// `nginx/lua` (graylane.lua).
pub fn nginx_lua_dir() -> PathBuf {
    repo_root().join("nginx/lua")
}

/// `graylane render nginx` for `service` on `port` with the status page on `status_port`,
/// this repository's library and Lua glue, and `extra` flags. Panics when the CLI fails.
pub fn render_nginx(service: &str, port: u16, status_port: u16, extra: &[&str]) -> String {
    let out = Command::new(graylane_bin())
        .args(["render", "nginx", "--service", service])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--status-listen", &format!("127.0.0.1:{status_port}")])
        .arg("--lib")
        .arg(nginx_lib())
        .arg("--lua-dir")
        .arg(nginx_lua_dir())
        .arg("--module")
        .arg(nginx_via().flag())
        .args(extra)
        .output()
        .expect("running graylane render nginx");
    assert!(
        out.status.success(),
        "graylane render nginx failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 from graylane render nginx")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// The main context around an http-context include.
fn main_conf(dir: &Path, http: &str, workers: u32) -> String {
    let d = dir.display();
    let mut modules: String = MODULES
        .iter()
        .map(|m| format!("load_module {m};\n"))
        .collect();
    // graylane's module only for a configuration that uses it: it defines $graylane_route
    // and $graylane_lane, which the Lua configuration `set`s itself.
    if http.contains("graylane_library ") {
        modules.push_str(&format!("load_module {};\n", nginx_module().display()));
    }
    // As root, nginx would run its workers as `nobody`, who cannot enter the temp dir.
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "daemon off;\n{user}worker_processes {workers};\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n{modules}\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    \
         client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n    \
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         {http}\n}}\n"
    )
}

/// A running nginx with graylane.
pub struct Nginx {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    log: PathBuf,
    port: u16,
    status_port: u16,
}

const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Nginx {
    /// Renders with `graylane render nginx` (see [`render_nginx`]) and starts nginx with
    /// `workers` worker processes. Returns once the status page answers.
    pub fn graylane(service: &str, extra: &[&str], workers: u32) -> anyhow::Result<Nginx> {
        let (port, status_port) = (free_port(), free_port());
        let http = render_nginx(service, port, status_port, extra);
        Self::start(&http, workers, port, status_port)
    }

    /// Starts nginx on an http-context include that listens on `port` and serves
    /// `/graylane/status` on `status_port`.
    pub fn start(http: &str, workers: u32, port: u16, status_port: u16) -> anyhow::Result<Nginx> {
        let dir = tempfile::Builder::new()
            .prefix("graylane-nginx-")
            .tempdir()
            .context("creating nginx's temp dir")?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, main_conf(dir.path(), http, workers))
            .context("writing nginx.conf")?;
        let log = dir.path().join("error.log");
        let out = File::create(dir.path().join("stderr.log")).context("nginx stderr")?;
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {}", nginx_bin().display()))?;
        let mut nginx = Nginx {
            child: Some(child),
            dir: Some(dir),
            log,
            port,
            status_port,
        };
        if let Err(e) = nginx.wait_ready() {
            bail!("{e:#}\n---- nginx log ----\n{}", nginx.log());
        }
        Ok(nginx)
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("nginx exited during start-up: {status}");
                }
            }
            if self.try_status().is_some() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("nginx not answering on its status port within {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_status(&self) -> Option<serde_json::Value> {
        let url = format!("http://127.0.0.1:{}/graylane/status", self.status_port);
        let (status, body, _) = runtime()
            .block_on(fetch(&url, &[("connection", "close")]))
            .ok()?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The port nginx routes on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The master's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The worker processes' pids (children of the master), sorted.
    pub fn workers(&self) -> Vec<u32> {
        children(self.pid())
    }

    /// The status of whichever worker answers (a new connection each time, so over several
    /// calls every worker answers; see [`Nginx::status_by_worker`]).
    pub fn status(&self) -> serde_json::Value {
        self.try_status().expect("nginx's status page answers")
    }

    /// One status per worker (keyed by pid), asking on new connections until every worker
    /// has answered. Panics after `within`.
    pub fn status_by_worker(&self, within: Duration) -> BTreeMap<u32, serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut seen = BTreeMap::new();
        loop {
            let workers = self.workers();
            if !workers.is_empty() && workers.iter().all(|w| seen.contains_key(w)) {
                seen.retain(|pid, _| workers.contains(pid));
                return seen;
            }
            if let Some(s) = self.try_status() {
                for (_, svc) in s.as_object().into_iter().flatten() {
                    if let Some(pid) = svc["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
                        seen.insert(pid, s.clone());
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "not every worker answered within {within:?}: workers {workers:?}, seen {:?}",
                seen.keys().collect::<Vec<_>>()
            );
        }
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        let mut text = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(dir) = &self.dir {
            text.push_str(
                &std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default(),
            );
        }
        text
    }

    /// Stops nginx: TERM to the master, then KILL to it and its workers.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let workers = children(child.id());
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        for w in workers {
            if Path::new(&format!("/proc/{w}")).exists() {
                let _ = Command::new("kill")
                    .args(["-KILL", &w.to_string()])
                    .status();
            }
        }
    }
}

/// Pids whose parent is `parent` (from /proc).
fn children(parent: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let after = s.rsplit_once(") ")?.1;
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect();
    out.sort_unstable();
    out
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        let verbose = std::env::var_os("GRAYLANE_E2E_LOG").is_some();
        if std::thread::panicking() || verbose {
            let kept = self.dir.take().map(|d| d.keep());
            eprintln!(
                "---- nginx log (config and log kept in {}) ----\n{}\n---- end of nginx log ----",
                kept.map(|p| p.display().to_string()).unwrap_or_default(),
                self.log()
            );
        }
    }
}
