//! The library's configuration (JSON, one per service), handed over by the Lua glue when an
//! nginx worker starts. Parsed once into types that only hold valid values; the error names
//! the field at fault.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use graylane_strategy::spec::parse_json_as;
use graylane_strategy::{Compiled, Lane, StrategySpec};
use serde::Deserialize;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not JSON, or a field of the wrong type or unknown.
    #[error("{0}")]
    Parse(#[source] graylane_strategy::Error),
    /// Parsed, but a value is not acceptable.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The token file could not be read.
    #[error("control_plane.token_file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The strategy file could not be read.
    #[error("strategy_file {path}: {source}")]
    StrategyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The strategy file's strategy is invalid.
    #[error("strategy_file {path}: {source}")]
    StrategyFileInvalid {
        path: PathBuf,
        #[source]
        source: graylane_strategy::Error,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// As written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    service: String,
    #[serde(default = "default_route_header")]
    route_header: String,
    #[serde(default)]
    reason_header: Option<String>,
    #[serde(default)]
    strategy: Option<StrategySpec>,
    #[serde(default)]
    strategy_file: Option<PathBuf>,
    #[serde(default)]
    control_plane: Option<ControlPlaneSpec>,
    #[serde(default)]
    endpoints: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    stable: Option<String>,
    #[serde(default)]
    own_lane: Option<Lane>,
    #[serde(default = "default_drain_ms")]
    drain_ms: u64,
    #[serde(default)]
    limits: graylane_strategy::SizeLimits,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneSpec {
    url: String,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<PathBuf>,
    #[serde(default = "default_wait_ms")]
    wait_ms: u64,
}

// The token never appears in a log line or an error.
impl fmt::Debug for ControlPlaneSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlaneSpec")
            .field("url", &self.url)
            .field("token_file", &self.token_file)
            .field("wait_ms", &self.wait_ms)
            .finish_non_exhaustive()
    }
}

fn default_route_header() -> String {
    "x-graylane-cluster".into()
}

fn default_wait_ms() -> u64 {
    20_000
}

fn default_drain_ms() -> u64 {
    10_000
}

/// One service's configuration, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The service this handle routes (names the feed).
    pub service: String,
    /// Request header naming the chosen cluster for the upstream (lowercase).
    pub route_header: String,
    /// Optional response header `<cluster>;<reason>` (lowercase).
    pub reason_header: Option<String>,
    /// The strategy to start with until the control plane answers, compiled.
    pub strategy: Option<Arc<Compiled>>,
    pub control_plane: Option<ControlPlane>,
    /// Static endpoints per cluster key, for clusters the feed does not list.
    pub endpoints: BTreeMap<String, Vec<SocketAddr>>,
    /// The cluster used when no decision can be made; default: the strategy's G cluster.
    pub stable: Option<String>,
    /// The lane of the workload this nginx fronts, when it is a sidecar.
    pub own_lane: Option<Lane>,
    /// How long a cluster the registry emptied keeps its last endpoints for requests already
    /// routed to it (new decisions skip it at once: its healthy count is 0). As the control
    /// plane's drain window for Envoy.
    pub drain: Duration,
    /// Ids, intervals and rules a strategy may have, here and from the feed (as the Envoy
    /// filter's `limits`).
    pub limits: graylane_strategy::SizeLimits,
}

/// Where the feed is.
#[derive(Clone)]
pub struct ControlPlane {
    /// `http://host:port` (or https), no trailing slash.
    pub url: String,
    pub token: Option<String>,
    /// How long the control plane may hold a long-poll.
    pub wait: Duration,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .field("wait", &self.wait)
            .finish()
    }
}

fn token_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    /// Parses and checks a configuration; reads the token file if one is named.
    pub fn parse(bytes: &[u8]) -> Result<Config, Error> {
        let mut spec: Spec = parse_json_as(bytes).map_err(Error::Parse)?;
        if !token_like(&spec.service) {
            return Err(invalid("service", "use letters, digits, '-', '_' or '.'"));
        }
        if !token_like(&spec.route_header) {
            return Err(invalid("route_header", "not a valid header name"));
        }
        if spec
            .reason_header
            .as_deref()
            .is_some_and(|h| !token_like(h))
        {
            return Err(invalid("reason_header", "not a valid header name"));
        }
        let (spec, from_file) = match spec.strategy_file.take() {
            Some(_) if spec.strategy.is_some() => {
                return Err(invalid(
                    "strategy_file",
                    "give strategy or strategy_file, not both",
                ))
            }
            Some(path) => {
                let s = read_strategy(&path)?;
                (
                    Spec {
                        strategy: Some(s),
                        ..spec
                    },
                    Some(path),
                )
            }
            None => (spec, None),
        };
        if spec.strategy.is_none() && spec.control_plane.is_none() {
            return Err(invalid(
                "strategy",
                "give a strategy (or strategy_file), a control_plane, or both",
            ));
        }
        let mut endpoints = BTreeMap::new();
        for (key, list) in spec.endpoints {
            let mut addrs = Vec::with_capacity(list.len());
            for (i, text) in list.iter().enumerate() {
                let addr: SocketAddr = text.parse().map_err(|_| {
                    invalid(
                        format!("endpoints.{key}[{i}]"),
                        format!(
                            "{text:?} is not IP:port (nginx's balancer takes addresses, not names)"
                        ),
                    )
                })?;
                addrs.push(addr);
            }
            endpoints.insert(key, addrs);
        }
        if let (Some(stable), Some(s)) = (&spec.stable, &spec.strategy) {
            if !s.clusters.contains_key(stable) {
                return Err(invalid(
                    "stable",
                    format!("the strategy has no cluster {stable:?}"),
                ));
            }
        }
        if spec.drain_ms > 300_000 {
            return Err(invalid("drain_ms", "at most 300000"));
        }
        let control_plane = spec.control_plane.map(control_plane).transpose()?;
        let strategy = spec
            .strategy
            .map(|s| spec.limits.check(&s).and_then(|()| Compiled::try_from(s)))
            .transpose()
            .map_err(|e| match from_file {
                Some(path) => Error::StrategyFileInvalid { path, source: e },
                None => Error::Parse(e.within("strategy")),
            })?
            .map(Arc::new);
        Ok(Config {
            service: spec.service,
            route_header: spec.route_header.to_ascii_lowercase(),
            reason_header: spec.reason_header.map(|h| h.to_ascii_lowercase()),
            strategy,
            control_plane,
            endpoints,
            stable: spec.stable,
            own_lane: spec.own_lane,
            drain: Duration::from_millis(spec.drain_ms),
            limits: spec.limits,
        })
    }
}

/// A strategy file: JSON when it ends in `.json`, else YAML (as the control plane's config).
fn read_strategy(path: &std::path::Path) -> Result<StrategySpec, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::StrategyFile {
        path: path.to_path_buf(),
        source,
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let parsed = if json {
        graylane_strategy::parse_json(text.as_bytes())
    } else {
        graylane_strategy::parse_yaml(&text)
    };
    parsed.map_err(|source| Error::StrategyFileInvalid {
        path: path.to_path_buf(),
        source,
    })
}

fn control_plane(cp: ControlPlaneSpec) -> Result<ControlPlane, Error> {
    let url = cp.url.trim_end_matches('/').to_string();
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    if rest.is_none_or(|r| r.is_empty() || r.contains(['/', '?', '#', ' '])) {
        return Err(invalid(
            "control_plane.url",
            "expected http://host:port (or https://) without a path",
        ));
    }
    if cp.wait_ms > 300_000 {
        return Err(invalid("control_plane.wait_ms", "at most 300000"));
    }
    let token = match (cp.token, cp.token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "control_plane.token",
                "give token or token_file, not both",
            ))
        }
        (Some(t), None) => Some(t),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| Error::TokenFile { path, source })?;
            Some(text.trim().to_string())
        }
        (None, None) => None,
    };
    if token
        .as_deref()
        .is_some_and(|t| t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(invalid(
            "control_plane.token",
            "empty or not printable ASCII",
        ));
    }
    Ok(ControlPlane {
        url,
        token,
        wait: Duration::from_millis(cp.wait_ms),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(json: &str) -> Result<Config, Error> {
        Config::parse(json.as_bytes())
    }

    #[test]
    fn minimal_with_strategy() {
        let c = parse(
            r#"{"service":"web","strategy":{"route-strategy":{"B":{"status":"G","id":{"all":true}}}},
                "endpoints":{"B":["127.0.0.1:8080","[::1]:9"]}}"#,
        )
        .unwrap();
        assert_eq!(c.route_header, "x-graylane-cluster");
        assert_eq!(c.endpoints["B"].len(), 2);
        assert!(c.control_plane.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"service":"web"}"#, "strategy"),
            (
                r#"{"service":"w b","control_plane":{"url":"http://x:1"}}"#,
                "service",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"ftp://x"}}"#,
                "control_plane.url",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"http://x:1/feed"}}"#,
                "control_plane.url",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"http://x:1","wait_ms":400000}}"#,
                "control_plane.wait_ms",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"http://x:1"},"endpoints":{"A":["localhost:80"]}}"#,
                "endpoints.A[0]",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"http://x:1"},"colour":1}"#,
                "colour",
            ),
            (
                r#"{"service":"web","strategy":{"route-strategy":{"A":{"status":"X"}}}}"#,
                "strategy.route-strategy.A.status",
            ),
            (
                r#"{"service":"web","strategy":{"route-strategy":{"A":{"status":"G","weight":0}}}}"#,
                "strategy.route-strategy.A.weight",
            ),
            (
                r#"{"service":"web","stable":"C","strategy":{"route-strategy":{"A":{"status":"G"}}}}"#,
                "stable",
            ),
            (
                r#"{"service":"web","control_plane":{"url":"http://x:1","token":"a","token_file":"/f"}}"#,
                "control_plane.token",
            ),
        ];
        for (json, field) in cases {
            let e = parse(json)
                .err()
                .unwrap_or_else(|| panic!("accepted {json}"));
            assert!(e.to_string().contains(field), "{json}: {e}");
        }
    }

    #[test]
    fn a_strategy_file_json_or_yaml() {
        let dir = std::env::temp_dir().join(format!("graylane-nginx-sf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let yaml = dir.join("s.yaml");
        std::fs::write(
            &yaml,
            "route-strategy:\n  A: {status: Y, id: {ids: [1]}}\n  B: {status: G}\n",
        )
        .unwrap();
        let json = dir.join("s.json");
        std::fs::write(&json, r#"{"route-strategy":{"A":{"status":"X"}}}"#).unwrap();
        let cfg = |p: &std::path::Path| {
            format!(
                r#"{{"service":"web","strategy_file":{}}}"#,
                serde_json::Value::String(p.display().to_string())
            )
        };
        let c = parse(&cfg(&yaml)).unwrap();
        assert_eq!(c.strategy.unwrap().clusters().len(), 2);
        let e = parse(&cfg(&json)).unwrap_err().to_string();
        assert!(
            e.contains("route-strategy.A.status") && e.contains("s.json"),
            "{e}"
        );
        let e = parse(&cfg(&dir.join("missing.json")))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("strategy_file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_file_is_read_and_never_printed() {
        let dir = std::env::temp_dir().join(format!("graylane-nginx-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        let json = format!(
            r#"{{"service":"web","control_plane":{{"url":"http://127.0.0.1:1","token_file":{}}}}}"#,
            serde_json::Value::String(path.display().to_string())
        );
        let c = parse(&json).unwrap();
        let cp = c.control_plane.unwrap();
        assert_eq!(cp.token.as_deref(), Some("s3cret-token"));
        assert!(!format!("{cp:?}").contains("s3cret"));
        let missing = json.replace("token\"", "nope\"");
        assert!(parse(&missing).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
