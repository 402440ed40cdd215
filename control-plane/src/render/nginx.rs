//! `graylane render nginx`: the include file that puts graylane into nginx (Debian's nginx
//! with `libnginx-mod-http-lua`). It loads `libgraylane_nginx.so` (the strategy crate's own
//! `decide` behind a C ABI) through `nginx/lua/graylane.lua`, and gives each service an
//! upstream whose peer `balancer_by_lua` picks from the cluster's endpoints, and a server
//! whose `set_by_lua` decides into `$graylane_route` / `$graylane_lane`, which
//! `proxy_set_header` sends as `x-graylane-cluster` / `x-graylane-lane`.
//!
//! `--module native` renders the same for graylane's native nginx module instead
//! (`nginx/module`, built against the nginx that runs it): the same library decides, without
//! entering Lua on each request; its `graylane` directive sets the same variables and
//! `graylane_balancer` picks the peers.
//!
//! Every value is checked here, so the text is valid nginx and the library accepts it; the
//! library checks the configuration again when nginx starts (`nginx -t` fails on a bad one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use graylane_strategy::{Lane, StrategySpec};
use serde_json::json;

/// Where `docs/nginx.md` installs the library and the Lua glue.
pub const DEFAULT_LIB: &str = "/usr/local/lib/graylane/libgraylane_nginx.so";
pub const DEFAULT_LUA_DIR: &str = "/usr/local/share/graylane/lua";

/// A flag that cannot be rendered; names the flag.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
    #[error("--strategy {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--strategy {path}: {source}")]
    Strategy {
        path: PathBuf,
        #[source]
        source: graylane_strategy::Error,
    },
}

fn invalid(flag: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        flag,
        message: message.into(),
    }
}

/// `graylane render nginx` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A service to route (repeatable; one --listen each, in the same order).
    #[arg(long = "service", required = true)]
    pub services: Vec<String>,
    /// Where nginx listens for each service: PORT or IP:PORT.
    #[arg(long = "listen", required = true)]
    pub listen: Vec<String>,
    /// The control plane whose feed the workers follow, e.g. http://127.0.0.1:9911.
    #[arg(long)]
    pub control_plane: Option<String>,
    /// A file holding the feed token (read by each nginx worker; never printed).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A strategy file (JSON or YAML) to route by until the control plane answers, or
    /// without one; nginx reads it when it starts (its path goes in the configuration, so a
    /// million-id whitelist never passes through nginx's parser). Only with one --service.
    #[arg(long)]
    pub strategy: Option<PathBuf>,
    /// [SERVICE/]CLUSTER=IP:PORT (repeatable): endpoints of a cluster the control plane does
    /// not list (no discovery for it).
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
    /// [SERVICE/]CLUSTER to use when graylane cannot decide (default: the strategy's G
    /// cluster of highest weight).
    #[arg(long = "stable")]
    pub stable: Vec<String>,
    /// The request header naming the chosen cluster.
    #[arg(long, default_value = "x-graylane-cluster")]
    pub route_header: String,
    /// A response header `<cluster>;<reason>` (off unless given).
    #[arg(long)]
    pub reason_header: Option<String>,
    /// This workload's own lane (prod or gray), when nginx is a service's sidecar.
    #[arg(long)]
    pub own_lane: Option<String>,
    /// How long the control plane may hold a feed long-poll, in milliseconds.
    #[arg(long, default_value_t = 20_000)]
    pub wait_ms: u64,
    /// Idle upstream connections kept per worker.
    #[arg(long, default_value_t = 64)]
    pub keepalive: u32,
    /// Also serve each worker's graylane state as JSON at /graylane/status here (IP:PORT).
    #[arg(long)]
    pub status_listen: Option<String>,
    /// Path of libgraylane_nginx.so.
    #[arg(long, default_value = DEFAULT_LIB)]
    pub lib: PathBuf,
    /// Directory holding graylane.lua.
    #[arg(long, default_value = DEFAULT_LUA_DIR)]
    pub lua_dir: PathBuf,
    /// How nginx calls the library: `native` (graylane's own nginx module,
    /// ngx_http_graylane_module.so, loaded with `load_module` in nginx's main context) or
    /// `lua` (libnginx-mod-http-lua, LuaJIT's FFI: for an nginx the module is not built for).
    #[arg(long, value_enum, default_value_t = Module::Native)]
    pub module: Module,
}

/// The nginx module that calls the library.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Module {
    Lua,
    Native,
}

/// `text` as one nginx configuration argument, between single quotes.
fn nginx_quoted(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A path nginx and Lua can take between double quotes as is.
fn plain_path(flag: &'static str, p: &Path) -> Result<String, Error> {
    let s = p
        .to_str()
        .ok_or_else(|| invalid(flag, "not UTF-8"))?
        .to_string();
    if s.is_empty()
        || !p.is_absolute()
        || s.chars()
            .any(|c| c.is_control() || matches!(c, '"' | '\'' | '\\' | ';' | '{' | '}' | '$' | ' '))
    {
        return Err(invalid(
            flag,
            format!("{s:?}: give an absolute path without spaces, quotes, ';', '{{', '}}' or '$'"),
        ));
    }
    Ok(s)
}

/// `PORT` or `IP:PORT`.
fn listen(s: &str) -> Result<String, Error> {
    if let Ok(port) = s.parse::<u16>() {
        if port > 0 {
            return Ok(port.to_string());
        }
    }
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() > 0 => Ok(a.to_string()),
        _ => Err(invalid(
            "--listen",
            format!("{s:?}: expected PORT or IP:PORT"),
        )),
    }
}

/// `[SERVICE/]CLUSTER` -> (service, cluster); the service may be left out with one service.
fn qualified(flag: &'static str, s: &str, services: &[String]) -> Result<(String, String), Error> {
    let (svc, cluster) = match s.split_once('/') {
        Some((svc, c)) => (svc.to_string(), c.to_string()),
        None if services.len() == 1 => (services[0].clone(), s.to_string()),
        None => {
            return Err(invalid(
                flag,
                format!("{s:?}: name the service (SERVICE/CLUSTER) when rendering several"),
            ))
        }
    };
    if !services.contains(&svc) {
        return Err(invalid(flag, format!("{s:?}: no --service {svc}")));
    }
    if cluster.is_empty()
        || cluster.len() > 128
        || !cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|' | b':'))
    {
        return Err(invalid(flag, format!("{s:?}: not a cluster name")));
    }
    Ok((svc, cluster))
}

fn read_strategy(path: &Path) -> Result<StrategySpec, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let spec = if json {
        graylane_strategy::parse_json(text.as_bytes())
    } else {
        graylane_strategy::parse_yaml(&text)
    };
    spec.and_then(|s| graylane_strategy::Compiled::try_from(s.clone()).map(|_| s))
        .map_err(|source| Error::Strategy {
            path: path.to_path_buf(),
            source,
        })
}

/// A Lua long string holding `text` verbatim (a level of `=` the text does not close).
fn long_string(text: &str) -> String {
    let mut eq = String::new();
    while text.contains(&format!("]{eq}]")) {
        eq.push('=');
    }
    format!("[{eq}[{text}]{eq}]")
}

/// The include file for nginx's http context.
pub fn render(a: &Args) -> Result<String, Error> {
    if a.services.len() != a.listen.len() {
        return Err(invalid(
            "--listen",
            format!(
                "{} --service but {} --listen: give one each, in the same order",
                a.services.len(),
                a.listen.len()
            ),
        ));
    }
    for s in &a.services {
        if !token(s) {
            return Err(invalid(
                "--service",
                format!("{s:?}: use letters, digits, '-', '_' or '.'"),
            ));
        }
    }
    if !token(&a.route_header) {
        return Err(invalid("--route-header", "not a valid header name"));
    }
    if a.reason_header.as_deref().is_some_and(|h| !token(h)) {
        return Err(invalid("--reason-header", "not a valid header name"));
    }
    let control_plane = a
        .control_plane
        .as_deref()
        .map(|u| {
            let u = u.trim_end_matches('/');
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"));
            match rest {
                Some(r) if !r.is_empty() && !r.contains(['/', '?', '#', ' ', '"']) => {
                    Ok(u.to_string())
                }
                _ => Err(invalid(
                    "--control-plane",
                    format!("{u:?}: expected http://host:port"),
                )),
            }
        })
        .transpose()?;
    let strategy = a.strategy.as_deref().map(read_strategy).transpose()?;
    let strategy_file = a
        .strategy
        .as_deref()
        .map(|p| {
            let abs = std::fs::canonicalize(p).map_err(|source| Error::Read {
                path: p.to_path_buf(),
                source,
            })?;
            plain_path("--strategy", &abs)
        })
        .transpose()?;
    if strategy.is_some() && a.services.len() != 1 {
        return Err(invalid("--strategy", "only with a single --service"));
    }
    if strategy.is_none() && control_plane.is_none() {
        return Err(invalid(
            "--control-plane",
            "give --control-plane, --strategy, or both",
        ));
    }
    if a.wait_ms > 300_000 {
        return Err(invalid("--wait-ms", "at most 300000"));
    }
    let own_lane = a
        .own_lane
        .as_deref()
        .map(|l| match l {
            "prod" => Ok(Lane::Prod),
            "gray" => Ok(Lane::Gray),
            other => Err(invalid("--own-lane", format!("{other:?}: prod or gray"))),
        })
        .transpose()?;
    let token_file = a
        .token_file
        .as_deref()
        .map(|p| plain_path("--token-file", p))
        .transpose()?;
    let lib = plain_path("--lib", &a.lib)?;
    let lua_dir = plain_path("--lua-dir", &a.lua_dir)?;
    let listens: Vec<String> = a
        .listen
        .iter()
        .map(|l| listen(l))
        .collect::<Result<_, _>>()?;
    let status_listen = a
        .status_listen
        .as_deref()
        .map(|s| match s.parse::<SocketAddr>() {
            Ok(addr) => Ok(addr.to_string()),
            Err(_) => Err(invalid(
                "--status-listen",
                format!("{s:?}: expected IP:PORT"),
            )),
        })
        .transpose()?;

    let mut endpoints: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for e in &a.endpoints {
        let (name, addr) = e.split_once('=').ok_or_else(|| {
            invalid(
                "--endpoint",
                format!("{e:?}: expected [SERVICE/]CLUSTER=IP:PORT"),
            )
        })?;
        let (svc, cluster) = qualified("--endpoint", name, &a.services)?;
        let addr: SocketAddr = addr.parse().map_err(|_| {
            invalid(
                "--endpoint",
                format!("{e:?}: {addr:?} is not IP:PORT (nginx's balancer takes addresses)"),
            )
        })?;
        endpoints
            .entry(svc)
            .or_default()
            .entry(cluster)
            .or_default()
            .push(addr.to_string());
    }
    let mut stable: BTreeMap<String, String> = BTreeMap::new();
    for s in &a.stable {
        let (svc, cluster) = qualified("--stable", s, &a.services)?;
        if let Some(st) = &strategy {
            if !st.clusters.contains_key(&cluster) {
                return Err(invalid(
                    "--stable",
                    format!("the strategy has no cluster {cluster:?}"),
                ));
            }
        }
        if stable.insert(svc.clone(), cluster).is_some() {
            return Err(invalid("--stable", format!("two for service {svc}")));
        }
    }

    let mut configs = Vec::new();
    for svc in &a.services {
        let mut cfg = json!({"service": svc, "route_header": a.route_header});
        if let Some(h) = &a.reason_header {
            cfg["reason_header"] = json!(h);
        }
        if let Some(url) = &control_plane {
            let mut cp = json!({"url": url, "wait_ms": a.wait_ms});
            if let Some(f) = &token_file {
                cp["token_file"] = json!(f);
            }
            cfg["control_plane"] = cp;
        }
        if let Some(path) = &strategy_file {
            cfg["strategy_file"] = json!(path);
        }
        if let Some(eps) = endpoints.get(svc) {
            cfg["endpoints"] = json!(eps);
        }
        if let Some(st) = stable.get(svc) {
            cfg["stable"] = json!(st);
        }
        if let Some(l) = own_lane {
            cfg["own_lane"] = json!(l);
        }
        configs.push((svc, cfg.to_string()));
    }

    let version = env!("CARGO_PKG_VERSION");
    let mut out = match a.module {
        Module::Lua => {
            let mut table = String::new();
            for (svc, cfg) in &configs {
                let _ = writeln!(table, "            [\"{svc}\"] = {},", long_string(cfg));
            }
            format!(
                "# graylane for nginx, rendered by `graylane render nginx` ({version}): include it in the http\n\
                 # context (Debian: /etc/nginx/conf.d/graylane.conf). Needs libnginx-mod-http-lua.\n\
                 # Each request is decided by libgraylane_nginx.so with graylane's own decide(); each\n\
                 # worker follows the control plane's feed and keeps its last snapshot when it is away.\n\
                 lua_package_path \"{lua_dir}/?.lua;;\";\n\
                 init_by_lua_block {{\n    \
                     -- A global: each request's chunk finds the module without calling require.\n    \
                     graylane = require(\"graylane\")\n    \
                     graylane.init({{\n        \
                         lib = \"{lib}\",\n        \
                         services = {{\n{table}        }},\n    \
                     }})\n\
                 }}\n\
                 init_worker_by_lua_block {{ graylane.start() }}\n"
            )
        }
        Module::Native => {
            let mut out = format!(
                "# graylane for nginx, rendered by `graylane render nginx --module native` ({version}):\n\
                 # include it in the http context (Debian: /etc/nginx/conf.d/graylane.conf) and load\n\
                 # graylane's module in the main context (Debian: /etc/nginx/modules-enabled/):\n\
                 #     load_module modules/ngx_http_graylane_module.so;\n\
                 # Each request is decided by libgraylane_nginx.so with graylane's own decide(); each\n\
                 # worker follows the control plane's feed and keeps its last snapshot when it is away.\n\
                 graylane_library {lib};\n"
            );
            for (svc, cfg) in &configs {
                let _ = writeln!(out, "graylane_service {svc} {};", nginx_quoted(cfg));
            }
            out
        }
    };
    // The reason header, when configured: a variable graylane sets, added to every response
    // (`always`: 5xx answers from the upstream carry it too, as Envoy's do).
    let reason_add = match &a.reason_header {
        Some(h) => format!("\n        add_header {h} $graylane_reason always;"),
        None => String::new(),
    };
    for (svc, listen) in a.services.iter().zip(&listens) {
        let room = match a.module {
            Module::Lua => "ngx_lua's context, the balancer's peer",
            Module::Native => "its decision, the balancer's peer",
        };
        let (balancer, decide) = match a.module {
            Module::Lua => (
                format!(
                    "server 0.0.0.1;  # never used: balancer_by_lua sets every peer\n    \
                     balancer_by_lua_block {{ graylane.balance(\"{svc}\") }}"
                ),
                format!(
                    "set $graylane_lane \"\";{}\n        \
                     set_by_lua_block $graylane_route {{ return graylane.route(\"{svc}\") }}",
                    if a.reason_header.is_some() {
                        "\n        set $graylane_reason \"\";"
                    } else {
                        ""
                    }
                ),
            ),
            Module::Native => (
                format!(
                    "server 0.0.0.1;  # never used: graylane_balancer sets every peer\n    \
                     graylane_balancer {svc};"
                ),
                format!("graylane {svc};"),
            ),
        };
        let _ = write!(
            out,
            "\n# service {svc}: graylane picks the cluster, the balancer one of its endpoints.\n\
             upstream graylane_{up} {{\n    \
                 {balancer}\n    \
                 keepalive {keepalive};\n\
             }}\n\
             server {{\n    \
                 listen {listen} reuseport;\n    \
                 # Room for what graylane adds to a request ({room}): at the default 4k\n    \
                 # nginx mallocs more pool blocks per request.\n    \
                 request_pool_size 16k;\n    \
                 location / {{\n        \
                     # graylane decides: $graylane_route is the chosen cluster's name (\"\" when no\n        \
                     # cluster can serve), $graylane_lane its lane. proxy_set_header sends them on\n        \
                     # and drops any copy the client sent (an empty value sends nothing).\n        \
                     {decide}\n        \
                     if ($graylane_route = \"\") {{\n            \
                         add_header x-graylane-reason no_cluster always;\n            \
                         return 503;\n        \
                     }}\n        \
                     proxy_pass http://graylane_{up};\n        \
                     proxy_http_version 1.1;\n        \
                     proxy_set_header Connection \"\";\n        \
                     proxy_set_header Host $host;\n        \
                     proxy_set_header {route} $graylane_route;\n        \
                     proxy_set_header x-graylane-lane $graylane_lane;{reason_add}\n    \
                 }}\n\
             }}\n",
            up = svc.replace(['-', '.'], "_"),
            keepalive = a.keepalive,
            route = a.route_header,
        );
    }
    if let Some(addr) = status_listen {
        let handler = match a.module {
            Module::Lua => "content_by_lua_block { graylane.status() }",
            Module::Native => "graylane_status;",
        };
        let _ = write!(
            out,
            "\n# Each worker's graylane state (strategy version, endpoints, feed counters).\n\
             server {{\n    \
                 listen {addr} reuseport;\n    \
                 location = /graylane/status {{ {handler} }}\n\
             }}\n"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: Args,
    }

    fn args(argv: &[&str]) -> Args {
        Cmd::try_parse_from(std::iter::once("render").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn one_service_with_a_control_plane() {
        let out = render(&args(&[
            "--module",
            "lua",
            "--service",
            "web",
            "--listen",
            "10000",
            "--control-plane",
            "http://127.0.0.1:9911/",
            "--endpoint",
            "A=127.0.0.1:18081",
            "--endpoint",
            "B=127.0.0.1:18082",
            "--reason-header",
            "x-graylane-reason",
            "--status-listen",
            "127.0.0.1:9901",
        ]))
        .unwrap();
        assert!(out.contains("listen 10000 reuseport;"), "{out}");
        assert!(out.contains(r#""url":"http://127.0.0.1:9911""#), "{out}");
        assert!(
            out.contains(r#""endpoints":{"A":["127.0.0.1:18081"],"B":["127.0.0.1:18082"]}"#),
            "{out}"
        );
        assert!(out.contains("upstream graylane_web {"), "{out}");
        assert!(out.contains("listen 127.0.0.1:9901 reuseport;"), "{out}");
        assert!(out.contains(r#"route("web")"#), "{out}");
    }

    /// The location as `docs/nginx.md` shows it: the decision in variables, sent upstream by
    /// `proxy_set_header` (which drops client copies), 503 when no cluster can serve, and the
    /// reason header only when asked for.
    #[test]
    fn the_location_sends_the_decision_with_proxy_set_header() {
        let base = [
            "--service",
            "web",
            "--listen",
            "10000",
            "--control-plane",
            "http://cp:9911",
        ];
        let with_reason: Vec<&str> = base
            .iter()
            .copied()
            .chain(["--reason-header", "x-why", "--route-header", "x-cluster"])
            .collect();
        fn lua<'a>(a: &[&'a str]) -> Vec<&'a str> {
            [a, &["--module", "lua"]].concat()
        }
        let out = render(&args(&lua(&with_reason))).unwrap();
        let location = r#"    location / {
        # graylane decides: $graylane_route is the chosen cluster's name ("" when no
        # cluster can serve), $graylane_lane its lane. proxy_set_header sends them on
        # and drops any copy the client sent (an empty value sends nothing).
        set $graylane_lane "";
        set $graylane_reason "";
        set_by_lua_block $graylane_route { return graylane.route("web") }
        if ($graylane_route = "") {
            add_header x-graylane-reason no_cluster always;
            return 503;
        }
        proxy_pass http://graylane_web;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header x-cluster $graylane_route;
        proxy_set_header x-graylane-lane $graylane_lane;
        add_header x-why $graylane_reason always;
    }
"#;
        assert!(out.contains(location), "{out}");
        assert!(out.contains("    request_pool_size 16k;\n"), "{out}");
        assert!(
            out.contains(r#"balancer_by_lua_block { graylane.balance("web") }"#),
            "{out}"
        );
        let out = render(&args(&lua(&base))).unwrap();
        assert!(!out.contains("graylane_reason"), "{out}");
        assert!(!out.contains("x-why"), "{out}");
        assert!(
            out.contains("proxy_set_header x-graylane-cluster $graylane_route;\n        proxy_set_header x-graylane-lane $graylane_lane;\n    }"),
            "{out}"
        );
    }

    /// The same location through the native module (the default): its `graylane` directive
    /// in place of set_by_lua, `graylane_balancer` in place of balancer_by_lua, the
    /// configuration as one quoted argument (no Lua), and the status page its handler.
    #[test]
    fn the_native_module_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.yaml");
        std::fs::write(
            &file,
            "route-strategy:\n  A: {status: Y, id: {ids: [1]}}\n  B: {status: G, id: {all: true}}\n",
        )
        .unwrap();
        let file = file.display().to_string();
        let out = render(&args(&[
            "--service",
            "web",
            "--listen",
            "10000",
            "--strategy",
            &file,
            "--stable",
            "B",
            "--reason-header",
            "x-why",
            "--status-listen",
            "127.0.0.1:9901",
        ]))
        .unwrap();
        assert!(!out.contains("lua"), "{out}");
        assert!(
            out.contains("#     load_module modules/ngx_http_graylane_module.so;\n"),
            "{out}"
        );
        assert!(
            out.contains(&format!("graylane_library {DEFAULT_LIB};\n")),
            "{out}"
        );
        assert!(
            out.contains(r#"graylane_service web '{"reason_header":"x-why","route_header":"x-graylane-cluster","service":"web","stable":"B","strategy_file":"#),
            "{out}"
        );
        let location = r#"    location / {
        # graylane decides: $graylane_route is the chosen cluster's name ("" when no
        # cluster can serve), $graylane_lane its lane. proxy_set_header sends them on
        # and drops any copy the client sent (an empty value sends nothing).
        graylane web;
        if ($graylane_route = "") {
            add_header x-graylane-reason no_cluster always;
            return 503;
        }
        proxy_pass http://graylane_web;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header x-graylane-cluster $graylane_route;
        proxy_set_header x-graylane-lane $graylane_lane;
        add_header x-why $graylane_reason always;
    }
"#;
        assert!(out.contains(location), "{out}");
        assert!(
            out.contains("    server 0.0.0.1;  # never used: graylane_balancer sets every peer\n    graylane_balancer web;\n    keepalive 64;\n"),
            "{out}"
        );
        assert!(
            out.contains("location = /graylane/status { graylane_status; }"),
            "{out}"
        );
    }

    /// A configuration argument survives nginx's quoting: `\\` and `'` escaped, nothing else.
    #[test]
    fn nginx_quoting_escapes_backslashes_and_single_quotes() {
        assert_eq!(nginx_quoted(r#"{"a":"b"}"#), r#"'{"a":"b"}'"#);
        assert_eq!(nginx_quoted(r#"it's \ "#), r#"'it\'s \\ '"#);
    }
    #[test]
    fn long_string_never_closes_early() {
        assert_eq!(long_string("a"), "[[a]]");
        assert_eq!(long_string("x]]y"), "[=[x]]y]=]");
        assert_eq!(long_string("x]]y]=]"), "[==[x]]y]=]]==]");
    }

    #[test]
    fn errors_name_the_flag() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--listen",
                    "2",
                    "--control-plane",
                    "http://a:1",
                ],
                "--listen",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "0",
                    "--control-plane",
                    "http://a:1",
                ],
                "--listen",
            ),
            (&["--service", "web", "--listen", "1"], "--control-plane"),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--control-plane",
                    "a:1",
                ],
                "--control-plane",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--control-plane",
                    "http://a:1",
                    "--endpoint",
                    "A=host:1",
                ],
                "--endpoint",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--service",
                    "api",
                    "--listen",
                    "1",
                    "--listen",
                    "2",
                    "--control-plane",
                    "http://a:1",
                    "--endpoint",
                    "A=1.2.3.4:1",
                ],
                "--endpoint",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--control-plane",
                    "http://a:1",
                    "--lib",
                    "relative.so",
                ],
                "--lib",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--control-plane",
                    "http://a:1",
                    "--lua-dir",
                    "/a b",
                ],
                "--lua-dir",
            ),
            (
                &[
                    "--service",
                    "w b",
                    "--listen",
                    "1",
                    "--control-plane",
                    "http://a:1",
                ],
                "--service",
            ),
            (
                &[
                    "--service",
                    "web",
                    "--listen",
                    "1",
                    "--control-plane",
                    "http://a:1",
                    "--own-lane",
                    "blue",
                ],
                "--own-lane",
            ),
        ];
        for (argv, flag) in cases {
            let e = render(&args(argv))
                .err()
                .unwrap_or_else(|| panic!("accepted {argv:?}"));
            assert!(e.to_string().starts_with(flag), "{argv:?}: {e}");
        }
    }

    #[test]
    fn a_strategy_file_is_validated_and_embedded() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("s.yaml");
        std::fs::write(&good, "route-strategy:\n  A: {status: Y, id: {ids: [1]}}\n  B: {status: G, id: {all: true}}\n").unwrap();
        let g = good.display().to_string();
        let out = render(&args(&[
            "--service",
            "web",
            "--listen",
            "1",
            "--strategy",
            &g,
            "--stable",
            "B",
        ]))
        .unwrap();
        assert!(out.contains(r#""stable":"B""#), "{out}");
        let abs = std::fs::canonicalize(&good).unwrap();
        assert!(
            out.contains(&format!(r#""strategy_file":"{}""#, abs.display())),
            "{out}"
        );
        let e = render(&args(&[
            "--service",
            "web",
            "--listen",
            "1",
            "--strategy",
            &g,
            "--stable",
            "C",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("no cluster"), "{e}");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "route-strategy:\n  A: {status: X}\n").unwrap();
        let e = render(&args(&[
            "--service",
            "web",
            "--listen",
            "1",
            "--strategy",
            &bad.display().to_string(),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("route-strategy.A.status"), "{e}");
    }
}
