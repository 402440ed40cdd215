//! `graylane.yaml`: what users edit. Services and their strategies (seed 000's
//! `route-strategy` block as-is under each service), tokens, listen address, data directory,
//! discovery, the private keys gray cookies are signed with (`cookie_keys`). Errors name the
//! file, line, column and field (never a secret's value).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graylane_strategy::{spec::parse_yaml_as, Compiled, StrategySpec};
use serde::{Deserialize, Serialize};

use crate::cookie;
use crate::discovery;
use crate::discovery::HumanDuration;

/// The whole file.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub xds_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tokens: Vec<Token>,
    pub feed_token: Option<Secret>,
    pub limits: Limits,
    pub discovery: discovery::Config,
    pub services: BTreeMap<String, ServiceConfig>,
    /// `cookie_keys` and `cookie_ttl`: the gray cookie generator (`Debug` shows key ids and
    /// public keys only).
    pub cookie_generator: cookie::Generator,
    /// The filter's .wasm served at /v1/plugin.wasm (see plugin.rs).
    pub plugin: Option<crate::plugin::Config>,
    /// TLS for `listen` and `xds_listen` (see tls.rs); plain TCP without it.
    pub tls: Option<crate::tls::Config>,
    /// Who starts and stops each cluster's instances for the releases (`instances:`).
    pub instances: crate::instances::Config,
    /// Istio routing resources rendered from the strategies, and applied when `apply` is on
    /// (`istio:`, see mesh.rs).
    pub istio: crate::mesh::Config,
    /// Each service's release gates where a release does not set them (`releases:`).
    pub releases: BTreeMap<String, crate::release::GatesSpec>,
}

/// The file as parsed in the first pass: each service is kept as a YAML value and parsed in a
/// second pass, so that errors inside a strategy get their full field path.
#[derive(Debug, Deserialize)]
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
    pub feed_token: Option<Secret>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub discovery: discovery::Config,
    /// Private Ed25519 keys to sign gray cookies with (`POST .../gray-cookie`), by key id.
    #[serde(default)]
    cookie_keys: Vec<cookie::KeySpec>,
    /// Lifetime of an issued gray cookie (`24h` by default, at most `168h`).
    #[serde(default)]
    cookie_ttl: Option<HumanDuration>,
    services: BTreeMap<String, ServiceFile>,
    #[serde(default)]
    pub plugin: Option<crate::plugin::Config>,
    #[serde(default)]
    pub tls: Option<crate::tls::Config>,
    /// Instance drivers per service and cluster (Kubernetes Deployments, hooks).
    #[serde(default)]
    instances: crate::instances::Config,
    /// Istio routes: render options, and whether the control plane applies them.
    #[serde(default)]
    istio: crate::mesh::Spec,
    /// Release gates per service (`releases: {web: {bake_secs: 30, approval: true}}`).
    #[serde(default)]
    releases: BTreeMap<String, crate::release::GatesSpec>,
}

/// One service: its strategy (whose fields, `route-strategy:` first of all, sit right under
/// the service's name) and where its endpoints come from (`discovery:`).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub discovery: Option<discovery::ServiceDiscovery>,
    pub strategy: StrategySpec,
    /// The strategy, compiled while the file was checked (the writer takes it as it is).
    pub compiled: Arc<Compiled>,
}

/// One service's block as written: its strategy and its discovery mapping, not yet checked.
#[derive(Debug)]
struct ServiceFile {
    discovery: Option<discovery::ServiceDiscovery>,
    strategy: StrategySpec,
}

/// An API token and what it may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub name: String,
    pub token: Secret,
    pub role: Role,
}

/// A secret from the config file (an API or feed token): its `Debug` prints `<redacted>`, so a
/// config, snapshot or error that is logged never shows it. Only [`Secret::expose`] reads it,
/// and only the constant-time comparison in `api::extract` does.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a token may do: `read` reads; `write` reads and edits strategies; `issuer` only asks
/// for gray cookies (the auth service's token: it cannot read whitelists or edit, and a
/// write token cannot issue, so a leaked operator token mints no cookie that would outlive a
/// whitelist change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Write,
    Issuer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Issuer => "issuer",
        }
    }

    /// Whether a token of this role may do what `need` allows.
    pub fn allows(self, need: Role) -> bool {
        matches!(
            (self, need),
            (Role::Read, Role::Read)
                | (Role::Write, Role::Read | Role::Write)
                | (Role::Issuer, Role::Issuer)
        )
    }
}

/// Request body limits (`limits:` in graylane.yaml).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Most routes: state changes, percentages, explain, revert.
    #[serde(default = "default_body_bytes")]
    pub body_bytes: usize,
    /// Whitelist uploads and whole strategies (a million ids is about 8 MB of JSON).
    #[serde(default = "default_upload_bytes")]
    pub upload_bytes: usize,
    /// Failed authentications (a missing or unknown token) one address may make within 10 s;
    /// past them it is answered 429 until the 10 s end, and the burst is logged once.
    #[serde(default = "default_failed_auth")]
    pub failed_auth: u32,
    /// Ids, intervals and match rules one service's strategy may have (the filters check
    /// the same limits, from their own plugin configuration).
    #[serde(default)]
    pub strategy: graylane_strategy::SizeLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_bytes: default_body_bytes(),
            upload_bytes: default_upload_bytes(),
            failed_auth: default_failed_auth(),
            strategy: graylane_strategy::SizeLimits::default(),
        }
    }
}

fn default_body_bytes() -> usize {
    64 << 10
}

fn default_failed_auth() -> u32 {
    20
}

fn default_upload_bytes() -> usize {
    256 << 20
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("graylane-data")
}

/// A configuration that could not be used: where and why.
#[derive(
    Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, thiserror::Error,
)]
#[error("{file}{}: {field}: {message}", location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct Error {
    pub file: String,
    /// Line and column.
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
        let cookie_ttl_secs = match raw.cookie_ttl {
            None => cookie::DEFAULT_TTL_SECS,
            Some(d) if (1..=cookie::MAX_TTL_SECS).contains(&d.0.as_secs()) => d.0.as_secs(),
            Some(_) => {
                return Err(Error {
                    file: file.clone(),
                    location: locate(text, "cookie_ttl"),
                    field: "cookie_ttl".into(),
                    message: format!(
                        "between 1s and {}h (a cookie cannot be revoked before it expires)",
                        cookie::MAX_TTL_SECS / 3600
                    ),
                })
            }
        };
        let base = path.parent().unwrap_or(Path::new(""));
        let cookie_keys = cookie::Keys::load(&raw.cookie_keys, base).map_err(|e| {
            let (field, message) = match e {
                cookie::Error::Key { field, message } => (field, message),
                other => (String::from("cookie_keys"), other.to_string()),
            };
            Error {
                file: file.clone(),
                location: locate(text, &field),
                field,
                message,
            }
        })?;
        let mut services = BTreeMap::new();
        let mut cfg = Config {
            listen: raw.listen,
            xds_listen: raw.xds_listen,
            data_dir: raw.data_dir,
            tokens: raw.tokens,
            feed_token: raw.feed_token,
            limits: raw.limits,
            discovery: raw.discovery,
            services: BTreeMap::new(),
            cookie_generator: cookie::Generator {
                keys: cookie_keys,
                ttl_secs: cookie_ttl_secs,
            },
            plugin: raw.plugin,
            tls: raw.tls,
            instances: raw.instances,
            istio: crate::mesh::Config::default(),
            releases: raw.releases,
        };
        for (name, svc) in raw.services {
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
            if !valid_service_name(&name) {
                return Err(at(
                    String::new(),
                    "service names use letters, digits, '-', '_' or '.'".into(),
                ));
            }
            let compiled = cfg
                .limits
                .strategy
                .check(&svc.strategy)
                .and_then(|()| Compiled::try_from(svc.strategy.clone()))
                .map_err(|e| at(e.path().to_string(), strip_path(&e)))?;
            if !svc
                .strategy
                .clusters
                .values()
                .any(|c| c.status == graylane_strategy::State::G)
            {
                return Err(at(
                    "route-strategy".into(),
                    "no G cluster: requests matching no Y rule would have nowhere to go".into(),
                ));
            }
            if let Some(d) = &svc.discovery {
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
            let ServiceFile {
                discovery,
                strategy,
            } = svc;
            services.insert(
                name,
                ServiceConfig {
                    discovery,
                    strategy,
                    compiled: Arc::new(compiled),
                },
            );
        }
        cfg.services = services;
        crate::instances::check(&cfg.instances, |s, c| {
            cfg.services
                .get(s)
                .map(|svc| svc.strategy.clusters.contains_key(c))
        })
        .map_err(|(field, message)| Error {
            file: file.clone(),
            location: locate(text, &field),
            field,
            message,
        })?;
        cfg.istio = crate::mesh::Config::from_spec(raw.istio, &cfg.services).map_err(
            |(field, message)| Error {
                file: file.clone(),
                location: locate(text, &field),
                field,
                message,
            },
        )?;
        for (service, gates) in &cfg.releases {
            let field = format!("releases.{service}");
            let message = if !cfg.services.contains_key(service) {
                Some(format!("no service {service:?} in services"))
            } else {
                gates.resolve().err().map(|e| e.to_string())
            };
            if let Some(message) = message {
                return Err(Error {
                    file: file.clone(),
                    location: locate(text, &field),
                    field,
                    message,
                });
            }
        }
        for (i, t) in cfg.tokens.iter().enumerate() {
            if t.token.expose().len() < 8 {
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

    /// Every service's discovery mappings, per source.
    pub fn mappings(&self) -> discovery::Mappings {
        let mut m = discovery::Mappings::default();
        for (name, svc) in &self.services {
            if let Some(d) = &svc.discovery {
                if let Some(c) = &d.consul {
                    m.consul.push((name.clone(), c.clone()));
                }
                if let Some(k) = &d.kubernetes {
                    m.kube.push((name.clone(), k.clone()));
                }
            }
        }
        m
    }

    /// The strategies, as candidates for a version (compiled already).
    pub fn strategies(&self) -> BTreeMap<String, crate::writer::Candidate> {
        self.services
            .iter()
            .map(|(k, v)| {
                let c = crate::writer::Candidate {
                    spec: v.strategy.clone(),
                    compiled: Some(v.compiled.clone()),
                };
                (k.clone(), c)
            })
            .collect()
    }
}

/// One service's block: `discovery:` is taken aside while the rest is read as the strategy,
/// in one pass (so errors keep their path, line and column, and the strategy is read by its
/// own typed deserializer: `status: Y` stays the state Y, never YAML's boolean).
impl<'de> Deserialize<'de> for ServiceFile {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let side = std::cell::RefCell::new(None);
        let strategy = StrategySpec::deserialize(aside::Intercept {
            inner: d,
            side: &side,
        })?;
        Ok(ServiceFile {
            discovery: side.into_inner(),
            strategy,
        })
    }
}

/// A deserializer that hands every key of a map to the strategy except `discovery`, whose
/// value it deserializes into a side slot.
mod aside {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

    use crate::discovery::ServiceDiscovery;

    pub(super) struct Intercept<'a, D> {
        pub inner: D,
        pub side: &'a RefCell<Option<ServiceDiscovery>>,
    }

    impl<'de, D: de::Deserializer<'de>> de::Deserializer<'de> for Intercept<'_, D> {
        type Error = D::Error;

        fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
            self.inner.deserialize_any(Wrap {
                inner: visitor,
                side: self.side,
            })
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> Result<V::Value, D::Error> {
            self.inner.deserialize_struct(
                name,
                fields,
                Wrap {
                    inner: visitor,
                    side: self.side,
                },
            )
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    struct Wrap<'a, V> {
        inner: V,
        side: &'a RefCell<Option<ServiceDiscovery>>,
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
        type Value = V::Value;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            self.inner.expecting(f)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.inner.visit_map(Map {
                inner: map,
                side: self.side,
            })
        }
    }

    struct Map<'a, A> {
        inner: A,
        side: &'a RefCell<Option<ServiceDiscovery>>,
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<'_, A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(
            &mut self,
            seed: K,
        ) -> Result<Option<K::Value>, A::Error> {
            loop {
                let Some(key) = self.inner.next_key::<String>()? else {
                    return Ok(None);
                };
                if key == "discovery" {
                    let d: ServiceDiscovery = self.inner.next_value()?;
                    *self.side.borrow_mut() = Some(d);
                    continue;
                }
                let key: de::value::StringDeserializer<A::Error> = key.into_deserializer();
                return seed.deserialize(key).map(Some);
            }
        }

        fn next_value_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<T::Value, A::Error> {
            self.inner.next_value_seed(seed)
        }
    }
}

pub use graylane_strategy::name::service as valid_service_name;

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_service_block_is_its_strategy_and_its_discovery() {
        let text = "services:\n  web:\n    route-strategy:\n      A:\n        status: Y\n        id:\n          all: false\n          interval:[[1,100], [600,10000]]\n      B: {status: G, id: {all: true}}\n    discovery:\n      consul: {meta: profile, clusters: {gray: A, prod: B}}\n";
        let cfg = Config::parse(text, Path::new("g.yaml")).unwrap();
        let web = &cfg.services["web"];
        assert_eq!(
            web.strategy.clusters["A"].status,
            graylane_strategy::State::Y
        );
        assert_eq!(web.strategy.clusters["A"].id.interval.len(), 2);
        assert!(web.discovery.as_ref().unwrap().consul.is_some());
        assert_eq!(cfg.mappings().consul.len(), 1);
    }

    #[test]
    fn release_gates_per_service_hold_only_valid_values_and_errors_name_the_field() {
        let base = "services:\n  web:\n    route-strategy:\n      A: {status: G, id: {all: true}}\n      B: {status: R}\n";
        let text = format!("{base}releases:\n  web: {{bake_secs: 30, approval: true}}\n");
        let cfg = Config::parse(&text, Path::new("g.yaml")).unwrap();
        assert_eq!(
            cfg.releases["web"],
            crate::release::GatesSpec {
                bake_secs: Some(30),
                approval: Some(true),
                ..Default::default()
            }
        );
        let bad = |releases: &str| {
            Config::parse(&format!("{base}releases:\n{releases}"), Path::new("g.yaml")).unwrap_err()
        };
        let e = bad("  shop: {bake_secs: 30}\n");
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("releases.shop", "no service \"shop\" in services")
        );
        let e = bad("  web: {max_error_percent: 120}\n");
        assert_eq!(e.field, "releases.web", "{e}");
        assert!(e.message.contains("a share of requests, 0 to 100"), "{e}");
        let e = bad("  web: {bake: 30}\n");
        assert!(e.to_string().contains("bake"), "{e}");
    }

    #[test]
    fn instance_drivers_hold_only_valid_values_and_errors_name_the_field() {
        let base = "services:\n  web:\n    route-strategy:\n      A: {status: G, id: {all: true}}\n      B: {status: R}\n";
        let text = format!(
            "{base}instances:\n  web:\n    A: {{kubernetes: {{namespace: shop, deployment: web-a}}}}\n    B: {{hooks: {{scale: ['/usr/local/bin/scale', '{{cluster}}', '{{n}}'], timeout: 30s}}}}\n"
        );
        let cfg = Config::parse(&text, Path::new("g.yaml")).unwrap();
        use crate::instances::ClusterDriver;
        assert!(matches!(
            cfg.instances["web"]["A"],
            ClusterDriver::Kubernetes(_)
        ));
        let ClusterDriver::Hooks(h) = &cfg.instances["web"]["B"] else {
            panic!("{:?}", cfg.instances)
        };
        assert_eq!(h.timeout, std::time::Duration::from_secs(30));
        let bad = |instances: &str| {
            Config::parse(
                &format!("{base}instances:\n{instances}"),
                Path::new("g.yaml"),
            )
            .unwrap_err()
        };
        let e = bad("  web:\n    C: {kubernetes: {namespace: shop, deployment: web-c}}\n");
        assert_eq!(e.field, "instances.web.C");
        assert!(e.message.contains("no cluster \"C\""), "{e}");
        let e = bad("  shop:\n    A: {kubernetes: {namespace: shop, deployment: web-a}}\n");
        assert_eq!(e.field, "instances.shop");
        let e = bad("  web:\n    A: {kubernetes: {namespace: Shop_1, deployment: web-a}}\n");
        assert_eq!(e.field, "instances.web.A.kubernetes.namespace", "{e}");
        let e = bad("  web:\n    A: {hooks: {scale: ['scale.sh']}}\n");
        assert!(e.field.starts_with("instances.web.A"), "{e}");
        assert!(e.to_string().contains("absolute path"), "{e}");
        let e = bad("  web:\n    A: {kubernetes: {namespace: shop, deployment: web-a}, hooks: {scale: ['/x']}}\n");
        assert!(e.field.starts_with("instances.web.A"), "{e}");
    }

    #[test]
    fn istio_is_off_by_default_and_its_errors_name_the_field() {
        let base = "services:\n  web:\n    route-strategy:\n      a: {status: G, id: {all: true}}\n      b: {status: Y, id: {ids: [1]}}\n";
        let cfg = Config::parse(base, Path::new("g.yaml")).unwrap();
        assert!(!cfg.istio.apply);
        let on = format!("{base}istio:\n  apply: true\n  namespace: shop\n  services:\n    web: {{gateways: [istio-system/shop], profiles: {{a: v1}}}}\n");
        let cfg = Config::parse(&on, Path::new("g.yaml")).unwrap();
        assert!(cfg.istio.apply);
        let web = cfg.istio.options("web").unwrap();
        assert_eq!(
            web.namespace, "shop",
            "the section's value, for every service"
        );
        assert_eq!(web.gateways, ["istio-system/shop"]);
        assert_eq!(web.profiles["a"], "v1");
        let off = format!("{base}istio:\n  apply: true\n  services:\n    web: {{apply: false}}\n");
        let cfg = Config::parse(&off, Path::new("g.yaml")).unwrap();
        assert!(cfg.istio.options("web").is_none(), "not applied");
        let bad = |istio: &str| {
            Config::parse(&format!("{base}istio:\n{istio}"), Path::new("g.yaml")).unwrap_err()
        };
        for (istio, field, line) in [
            ("  services:\n    shop: {}\n", "istio.services.shop", 8),
            ("  namespace: Shop\n", "istio.namespace", 7),
            ("  route_header: X-Cluster\n", "istio.route_header", 7),
            (
                "  services:\n    web: {gateways: ['istio system']}\n",
                "istio.services.web.gateways",
                8,
            ),
            (
                "  services:\n    web: {profiles: {a: V_1}}\n",
                "istio.services.web.profiles",
                8,
            ),
            ("  colour: red\n", "istio.colour", 7),
        ] {
            let e = bad(istio);
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.location.map(|l| l.0), Some(line), "{e}");
        }
        // With apply on, every service must render: cluster keys are not DNS labels here.
        let upper = "services:\n  web:\n    route-strategy:\n      A: {status: G, id: {all: true}}\nistio: {apply: true}\n";
        let e = Config::parse(upper, Path::new("g.yaml")).unwrap_err();
        assert_eq!(e.field, "services.web", "{e}");
        assert!(
            e.message.contains("profile \"A\" is not a DNS label"),
            "{e}"
        );
        // Off, the same file loads (nothing is rendered by the control plane).
        let upper_off = upper.replace("apply: true", "apply: false");
        assert!(Config::parse(&upper_off, Path::new("g.yaml")).is_ok());
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let text = "tokens:\n  - {name: ci, token: write-secret-0123, role: write}\nfeed_token: feed-secret-4567\ndiscovery:\n  consul: {address: 'http://c:8500', token: consul-secret-89ab}\nservices:\n  web:\n    route-strategy:\n      B: {status: G, id: {all: true}}\n";
        let cfg = Config::parse(text, Path::new("g.yaml")).unwrap();
        assert_eq!(cfg.tokens[0].token.expose(), "write-secret-0123");
        let shown = format!("{cfg:?} {cfg:#?}");
        for secret in [
            "write-secret-0123",
            "feed-secret-4567",
            "consul-secret-89ab",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(shown.matches("<redacted>").count(), 6, "{shown}");
    }

    #[test]
    fn errors_name_file_line_column_and_field() {
        let cases = [
            (
                "services:\n  web:\n    route-strategy:\n      A: {status: X}\n",
                "services.web.route-strategy.A.status",
                4,
            ),
            (
                "services:\n  web:\n    route-strategy:\n      A: {status: G}\n    colour: red\n",
                "services.web.colour",
                5,
            ),
            (
                "services:\n  web:\n    route-strategy:\n      A: {status: G}\n    discovery:\n      consol: {}\n",
                "services.web.discovery.consol",
                6,
            ),
            ("listen: nowhere\nservices: {}\n", "listen", 1),
        ];
        for (text, field, line) in cases {
            let e = Config::parse(text, Path::new("g.yaml")).expect_err(text);
            assert_eq!(e.field, field, "{e}");
            assert_eq!(e.location.map(|l| l.0), Some(line), "{e}");
            assert_eq!(e.file, "g.yaml");
            assert!(!e.message.contains("line "), "position only once: {e}");
        }
    }
}
