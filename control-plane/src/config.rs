//! `graylane.yaml`: what users edit. Services and their strategies (seed 000's
//! `route-strategy` block as-is under each service), tokens, listen address, data directory,
//! discovery. Errors name the file, line, column and field.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use graylane_strategy::{spec::parse_yaml_as, Compiled, StrategySpec};
use serde::{Deserialize, Serialize};

use crate::discovery;

/// The whole file.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub xds_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tokens: Vec<Token>,
    pub feed_token: Option<String>,
    pub discovery: discovery::Config,
    pub services: BTreeMap<String, ServiceConfig>,
}

/// The file as parsed in the first pass: each service is kept as a YAML value and parsed in a
/// second pass, so that errors inside a strategy get their full field path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// Admin API, feed and metrics.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Envoy's gRPC xDS (ADS), if set.
    #[serde(default)]
    pub xds_listen: Option<SocketAddr>,
    /// Where the store keeps its database (relative to the config file).
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub tokens: Vec<Token>,
    /// Bearer token the filters must send to the feed; none means the feed is open.
    #[serde(default)]
    pub feed_token: Option<String>,
    #[serde(default)]
    pub discovery: discovery::Config,
    pub services: BTreeMap<String, serde_yaml::Value>,
}

/// One service: its strategy (whose fields, `route-strategy:` first of all, sit right under
/// the service's name) and where its endpoints come from (`discovery:`).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub discovery: Option<discovery::ServiceDiscovery>,
    pub strategy: StrategySpec,
}

/// An API token and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub token: String,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("graylane-data")
}

/// A configuration that could not be used: where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{file}{}: {field}: {message}", location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct Error {
    pub file: String,
    pub location: Option<(usize, usize)>,
    pub field: String,
    pub message: String,
}

impl Config {
    /// Reads and validates `path`; every service's strategy is compiled as a check.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error {
            file: path.display().to_string(),
            location: None,
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text` (read from `path`, for messages and relative paths).
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let file = path.display().to_string();
        let raw: RawConfig = parse_yaml_as(text).map_err(|e| {
            let (field, message, location) = match e {
                graylane_strategy::Error::Parse {
                    path,
                    message,
                    location,
                } => (path, message, location),
                graylane_strategy::Error::Invalid { path, message } => (path, message, None),
            };
            Error {
                file: file.clone(),
                location: location.or_else(|| locate(text, &field)),
                field,
                message,
            }
        })?;
        let mut services = BTreeMap::new();
        for (name, value) in raw.services {
            let svc = service_config(&name, value).map_err(|(field, message)| Error {
                file: file.clone(),
                location: locate(text, &field),
                field,
                message,
            })?;
            services.insert(name, svc);
        }
        let mut cfg = Config {
            listen: raw.listen,
            xds_listen: raw.xds_listen,
            data_dir: raw.data_dir,
            tokens: raw.tokens,
            feed_token: raw.feed_token,
            discovery: raw.discovery,
            services,
        };
        for (name, svc) in &cfg.services {
            let at = |field: String, message: String| {
                let field = if field.is_empty() {
                    format!("services.{name}")
                } else {
                    format!("services.{name}.{field}")
                };
                Error {
                    file: file.clone(),
                    location: locate(text, &field),
                    field,
                    message,
                }
            };
            if !valid_service_name(name) {
                return Err(at(
                    String::new(),
                    "service names use letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if let Err(e) = Compiled::try_from(svc.strategy.clone()) {
                return Err(at(e.path().to_string(), strip_path(&e)));
            }
            if let Some(d) = &svc.discovery {
                if let Err(e) = d.validate(name) {
                    return Err(at("discovery".into(), e.to_string()));
                }
                for c in d.clusters() {
                    if !svc.strategy.clusters.contains_key(c) {
                        return Err(at(
                            "discovery".into(),
                            format!(
                                "maps instances to cluster {c:?}, which the strategy does not have"
                            ),
                        ));
                    }
                }
            }
        }
        for (i, t) in cfg.tokens.iter().enumerate() {
            if t.token.len() < 8 {
                return Err(Error {
                    file: file.clone(),
                    location: None,
                    field: format!("tokens[{i}].token"),
                    message: "tokens must be at least 8 characters".into(),
                });
            }
        }
        if cfg.data_dir.is_relative() {
            if let Some(dir) = path.parent() {
                cfg.data_dir = dir.join(&cfg.data_dir);
            }
        }
        Ok(cfg)
    }

    /// The strategies alone.
    pub fn strategies(&self) -> BTreeMap<String, StrategySpec> {
        self.services
            .iter()
            .map(|(k, v)| (k.clone(), v.strategy.clone()))
            .collect()
    }
}

/// Second pass over one service: `discovery:` apart, the rest is the strategy.
fn service_config(name: &str, value: serde_yaml::Value) -> Result<ServiceConfig, (String, String)> {
    let at = |path: &str| {
        if path.is_empty() || path == "." {
            format!("services.{name}")
        } else {
            format!("services.{name}.{path}")
        }
    };
    let serde_yaml::Value::Mapping(mut map) = value else {
        return Err((
            at(""),
            "a service is a mapping with `route-strategy:`".into(),
        ));
    };
    let discovery = match map.remove("discovery") {
        None => None,
        Some(d) => Some(
            serde_path_to_error::deserialize::<_, discovery::ServiceDiscovery>(d).map_err(|e| {
                let p = e.path().to_string();
                (at(&format!("discovery.{p}")), e.into_inner().to_string())
            })?,
        ),
    };
    let strategy: StrategySpec = serde_path_to_error::deserialize(serde_yaml::Value::Mapping(map))
        .map_err(|e| {
            let p = e.path().to_string();
            (at(&p), e.into_inner().to_string())
        })?;
    Ok(ServiceConfig {
        discovery,
        strategy,
    })
}

pub fn valid_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn strip_path(e: &graylane_strategy::Error) -> String {
    match e {
        graylane_strategy::Error::Parse { message, .. }
        | graylane_strategy::Error::Invalid { message, .. } => message.clone(),
    }
}

/// The line and column of the field at `path` (`services.web.route-strategy.A.status`) in
/// the YAML text: each key is searched for after the previous one. Used for errors found
/// after parsing (and inside flattened maps, where the parser's position is lost).
pub fn locate(text: &str, path: &str) -> Option<(usize, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0usize;
    let mut found = None;
    for seg in path.split('.') {
        let key = seg.split('[').next().unwrap_or(seg);
        if key.is_empty() {
            continue;
        }
        let hit = lines.iter().enumerate().skip(from).find_map(|(i, l)| {
            let t = l.trim_start().trim_start_matches("- ");
            let quoted = format!("\"{key}\":");
            (t.starts_with(&format!("{key}:")) || t.starts_with(&quoted))
                .then(|| (i, l.len() - l.trim_start().len() + 1))
        });
        match hit {
            Some((i, col)) => {
                from = i;
                found = Some((i + 1, col));
            }
            None => break,
        }
    }
    found
}
