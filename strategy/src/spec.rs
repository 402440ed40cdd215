//! The strategy as written (JSON or YAML), with serde. Unknown fields are errors.
//!
//! Seed 000's block is accepted verbatim:
//!
//! ```yaml
//! route-strategy:
//!   A: {status: Y, id: {all: false, ids: [1, 2, 3], interval: [[1, 100], [600, 10000]]}}
//!   B: {status: G, id: {all: true}}
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::{IdList, Interval};

/// One service's strategy: its clusters (versions) and how requests are identified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StrategySpec {
    /// Where the tenant/user id comes from, tried in order. Default: header `x-tenant-id`,
    /// then cookie `tenantId`.
    #[serde(default = "default_identity")]
    pub identity: Vec<IdentitySource>,
    /// The `tenantGray` cookie of seed 003 (signed by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gray_cookie: Option<GrayCookieSpec>,
    /// The lane header set for the next hop, and whether to trust it on input.
    #[serde(default)]
    pub lane: LaneSpec,
    /// A cluster with fewer healthy endpoints than this is skipped (when its count is known).
    #[serde(default = "one")]
    pub min_healthy: u32,
    /// The clusters, by name. Seed 000 calls this block `route-strategy`.
    #[serde(
        rename = "route-strategy",
        alias = "route_strategy",
        alias = "clusters"
    )]
    pub clusters: BTreeMap<String, ClusterSpec>,
}

fn default_identity() -> Vec<IdentitySource> {
    vec![
        IdentitySource {
            header: Some("x-tenant-id".into()),
            ..IdentitySource::default()
        },
        IdentitySource {
            cookie: Some("tenantId".into()),
            ..IdentitySource::default()
        },
    ]
}

fn one() -> u32 {
    1
}

/// One place a tenant id may be found: exactly one of `header`, `cookie`, `query`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IdentitySource {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// Seed 000's cluster states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum State {
    /// Red: no traffic at all; may be stopped.
    R,
    /// Yellow: gray, about to be released; wins over G for the requests it matches.
    Y,
    /// Green: serving.
    G,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::R => "R",
            State::Y => "Y",
            State::G => "G",
        })
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_uppercase().as_str() {
            "R" | "RED" => Ok(State::R),
            "Y" | "YELLOW" => Ok(State::Y),
            "G" | "GREEN" => Ok(State::G),
            other => Err(format!("unknown state {other:?}: expected R, Y or G")),
        }
    }
}

/// The lane a request travels in across services (seed 003's prod / gray environments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Prod,
    Gray,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Prod => "prod",
            Lane::Gray => "gray",
        }
    }
    /// The lane a label or header value names: `gray` (any case) is gray, anything else prod.
    pub fn from_value(v: &[u8]) -> Lane {
        if v.eq_ignore_ascii_case(b"gray") || v.eq_ignore_ascii_case(b"grey") {
            Lane::Gray
        } else {
            Lane::Prod
        }
    }
}

/// One cluster (version) of the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// R, Y or G.
    #[serde(alias = "state")]
    pub status: State,
    /// The Envoy cluster name; defaults to the cluster's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Share among clusters of equal state that match (levelled traffic, A/B/C ties): a
    /// number, or `endpoints` to share by healthy endpoint counts (one-by-one replacement).
    #[serde(default, skip_serializing_if = "Weight::is_default")]
    pub weight: Weight,
    /// The lane this cluster puts a request in for the next hop. Default: Y is gray, else prod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
    /// The id whitelist.
    #[serde(default, skip_serializing_if = "IdSpec::is_empty")]
    pub id: IdSpec,
    /// Matches when the service's gray cookie says gray (and is valid).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gray_cookie: bool,
    /// Matches when any of these cookies matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cookies: Vec<MatchSpec>,
    /// Matches when any of these headers matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<MatchSpec>,
    /// Matches requests whose caller is in this lane (seed 003 scenario b).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_lane: Option<Lane>,
    /// Matches this share of requests (seed 003's 80:20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<PercentSpec>,
}

/// A cluster's share among clusters of equal state that match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weight {
    /// A fixed weight, 1 to 1,000,000.
    Fixed(u32),
    /// The cluster's healthy endpoint count (1 while unknown): while both an old and a new
    /// cluster are G during a one-by-one replacement, one new instance among ten gets a tenth
    /// of the traffic, not half.
    Endpoints,
}

impl Default for Weight {
    fn default() -> Self {
        Weight::Fixed(1)
    }
}

impl Weight {
    fn is_default(&self) -> bool {
        *self == Weight::Fixed(1)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Weight::Fixed(w) => write!(f, "{w}"),
            Weight::Endpoints => f.write_str("endpoints"),
        }
    }
}

impl Serialize for Weight {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Weight::Fixed(w) => s.serialize_u32(*w),
            Weight::Endpoints => s.serialize_str("endpoints"),
        }
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a weight from 1 to 1000000, or `endpoints`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Weight, E> {
                u32::try_from(v)
                    .map(Weight::Fixed)
                    .map_err(|_| E::custom(format!("weight {v} is above 1000000")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Weight, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("weight {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Weight, E> {
                match v {
                    "endpoints" => Ok(Weight::Endpoints),
                    other => other
                        .parse::<u64>()
                        .map_err(|_| {
                            E::custom(format!("weight {other:?}: a number or `endpoints`"))
                        })
                        .and_then(|n| self.visit_u64(n)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Seed 000's `id` block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct IdSpec {
    /// Every id (and requests without one).
    #[serde(default)]
    pub all: bool,
    #[serde(default, skip_serializing_if = "IdList::is_empty")]
    pub ids: IdList,
    /// Closed ranges: `[[1, 100], [600, 10000]]`.
    #[serde(default, alias = "intervals", skip_serializing_if = "Vec::is_empty")]
    pub interval: Vec<Interval>,
}

impl IdSpec {
    pub fn is_empty(&self) -> bool {
        !self.all && self.ids.is_empty() && self.interval.is_empty()
    }
}

/// A cookie or header condition: `name` and exactly one of `exact`, `prefix`, `one_of`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
}

/// A share of traffic, `value` in percent (0 to 100, resolution 0.01).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PercentSpec {
    pub value: f64,
    /// `request`: each request drawn anew; `tenant`: the tenant id hashed into a stable bucket.
    #[serde(default)]
    pub by: PercentBy,
    /// Hash salt, to decorrelate services that split by tenant.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub salt: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PercentBy {
    #[default]
    Request,
    Tenant,
}

/// The gray cookie of seed 003 (`tenantGray=1`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(from = "RawGrayCookieSpec")]
pub struct GrayCookieSpec {
    pub name: String,
    pub mode: GrayCookieMode,
    /// The Ed25519 public keys a `signed` cookie may be signed with, by key id. Old and new
    /// keys are listed together while keys rotate. Public keys only: the private keys stay in
    /// the control plane (`cookie_keys` in graylane.yaml) or the auth service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PublicKeySpec>,
}

impl Default for GrayCookieSpec {
    fn default() -> Self {
        GrayCookieSpec {
            name: default_gray_cookie(),
            mode: GrayCookieMode::default(),
            keys: Vec::new(),
        }
    }
}

/// `gray_cookie` as written, with the HMAC `key` of earlier versions recognised only to be
/// refused with a message saying what to do instead.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrayCookieSpec {
    #[serde(default = "default_gray_cookie")]
    name: String,
    #[serde(default)]
    mode: GrayCookieMode,
    #[serde(default)]
    keys: Vec<PublicKeySpec>,
    #[serde(default)]
    #[allow(dead_code)]
    key: Option<RemovedHmacKey>,
}

impl From<RawGrayCookieSpec> for GrayCookieSpec {
    fn from(r: RawGrayCookieSpec) -> Self {
        GrayCookieSpec {
            name: r.name,
            mode: r.mode,
            keys: r.keys,
        }
    }
}

/// The HMAC key of earlier versions: never accepted (whoever could read a strategy, through
/// the feed, a read token or any sidecar's config, could mint gray cookies with it).
enum RemovedHmacKey {}

impl<'de> Deserialize<'de> for RemovedHmacKey {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "HMAC keys are no longer accepted (anyone who can read the strategy could mint \
             gray cookies with one): remove `key`, run `graylane keygen`, list its public key \
             under `gray_cookie.keys` and keep the private key in graylane.yaml's `cookie_keys` \
             (docs/configuration.md)",
        ))
    }
}

/// One public key that signed gray cookies may be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PublicKeySpec {
    /// The key id carried in each cookie (`k2026a`): letters, digits, `-`, `_`; at most 32.
    pub id: String,
    /// The Ed25519 public key: 32 bytes in base64 (what `graylane keygen` prints).
    pub public_key: String,
    /// Unix seconds from which cookies signed with this key are no longer honoured (the end
    /// of a rotation window); none: until the key is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

fn default_gray_cookie() -> String {
    "tenantGray".into()
}

/// How the gray cookie is trusted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum GrayCookieMode {
    /// `1.<tenant>.<expiry>.<key id>.<Ed25519 signature>`: bound to the tenant id and an
    /// expiry, signed by a private key the filters never see; forgeries stay prod.
    #[default]
    Signed,
    /// Seed 003's plain `tenantGray=1`: only where the edge (auth service) sets it and strips
    /// what clients send.
    Plain,
}

/// The lane header for the next hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LaneSpec {
    #[serde(default = "default_lane_header")]
    pub header: String,
    /// Trust the lane header on incoming requests (a callee behind a trusted caller).
    /// Untrusted, it is ignored and overwritten.
    #[serde(default)]
    pub trust: bool,
    /// Node label naming the workload's own lane (Istio `LABELS`), e.g. `profile`.
    #[serde(default = "default_lane_label")]
    pub label: String,
}

impl Default for LaneSpec {
    fn default() -> Self {
        LaneSpec {
            header: default_lane_header(),
            trust: false,
            label: default_lane_label(),
        }
    }
}

fn default_lane_header() -> String {
    "x-graylane-lane".into()
}

fn default_lane_label() -> String {
    "profile".into()
}

/// Parses a strategy from JSON; the error names the field's path and position.
pub fn parse_json(bytes: &[u8]) -> Result<StrategySpec, crate::Error> {
    parse_json_as(bytes)
}

/// Parses any serde type from JSON with a field path in the error. Anything but whitespace
/// after the value is an error too.
pub fn parse_json_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, crate::Error> {
    json_with_path(&mut serde_json::Deserializer::from_slice(bytes))
}

/// As [`parse_json_as`], reading the JSON from `reader` as it parses: a host that can hand
/// the text over in pieces (the filter's plugin configuration) never holds all of it at
/// once. `reader` should be buffered (serde_json reads it byte by byte).
pub fn parse_json_reader_as<T, R>(reader: R) -> Result<T, crate::Error>
where
    T: serde::de::DeserializeOwned,
    R: std::io::Read,
{
    json_with_path(&mut serde_json::Deserializer::from_reader(reader))
}

fn json_with_path<'de, T, R>(de: &mut serde_json::Deserializer<R>) -> Result<T, crate::Error>
where
    T: serde::de::DeserializeOwned,
    R: serde_json::de::Read<'de>,
{
    let parse_error = |path: String, inner: serde_json::Error| {
        let message = strip_position(&inner.to_string());
        crate::Error::Parse {
            path: field_path(path, &message),
            message,
            location: (inner.line() > 0).then(|| (inner.line(), inner.column())),
        }
    };
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        parse_error(path, e.into_inner())
    })?;
    de.end().map_err(|e| parse_error(".".to_string(), e))?;
    Ok(value)
}

/// Parses a strategy from YAML; the error names the field's path, line and column.
#[cfg(feature = "yaml")]
pub fn parse_yaml(text: &str) -> Result<StrategySpec, crate::Error> {
    parse_yaml_as(text)
}

/// Parses any serde type from YAML with a field path, line and column in the error.
///
/// Seed 000 writes `interval:[[1,100], [600,10000]]` without a space after the colon,
/// which YAML reads as a plain scalar; a key directly followed by `[` or `{` is otherwise
/// always a syntax error, so that one space is inserted before parsing.
#[cfg(feature = "yaml")]
pub fn parse_yaml_as<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, crate::Error> {
    let fixed = fix_flow_after_colon(text);
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str(&fixed, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            path = e.path().to_string();
            e.into_inner()
        })
    })
    .map_err(|e| {
        let location = e
            .location()
            .map(|l| (l.line() as usize, l.column() as usize))
            .filter(|(l, _)| *l > 0);
        let message = yaml_message(&e);
        crate::Error::Parse {
            path: field_path(path, &message),
            message,
            location,
        }
    })
}

/// serde-saphyr's message without its `error: line L column C:` prefix and source snippet
/// (the position is reported separately).
#[cfg(feature = "yaml")]
fn yaml_message(e: &serde_saphyr::Error) -> String {
    let text = e.without_snippet().to_string();
    let first = text.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let message = match first.split_once(": ") {
        Some((pos, rest)) if pos.starts_with("line ") => rest,
        _ => first,
    };
    strip_position(message)
}

#[cfg(feature = "yaml")]
fn fix_flow_after_colon(text: &str) -> std::borrow::Cow<'_, str> {
    let needs = |line: &str| -> Option<usize> {
        let t = line.trim_start();
        let t = t.strip_prefix("- ").unwrap_or(t);
        let key_len = t
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
            .count();
        if key_len == 0 {
            return None;
        }
        let rest = &t[key_len..];
        if rest.starts_with(":[") || rest.starts_with(":{") {
            Some(line.len() - rest.len() + 1)
        } else {
            None
        }
    };
    if !text.lines().any(|l| needs(l).is_some()) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        match needs(line) {
            Some(at) => {
                out.push_str(&line[..at]);
                out.push(' ');
                out.push_str(&line[at..]);
            }
            None => out.push_str(line),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The path of the field at fault. An unknown field is reported by serde at its parent; its
/// own name (from the message) completes the path.
fn field_path(path: String, message: &str) -> String {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name);
    let path = if path.is_empty() {
        ".".to_string()
    } else {
        path
    };
    match unknown {
        Some(name) if path == "." => name.to_string(),
        Some(name) if path != name && !path.ends_with(&format!(".{name}")) => {
            format!("{path}.{name}")
        }
        _ => path,
    }
}

/// serde_json (and serde-saphyr, for errors raised inside nested values) append "at line L
/// column C"; the position is reported separately.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// OpenAPI schemas of the types with hand-written serde forms.
#[cfg(feature = "openapi")]
mod schema {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::openapi::{RefOr, Schema};

    use super::Weight;
    use crate::id::{IdList, Interval};

    fn integer() -> ObjectBuilder {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(0))
    }

    impl utoipa::PartialSchema for IdList {
        fn schema() -> RefOr<Schema> {
            ArrayBuilder::new()
                .items(
                    OneOfBuilder::new()
                        .item(integer())
                        .item(ObjectBuilder::new().schema_type(Type::String)),
                )
                .description(Some(
                    "Tenant ids: non-negative integers or strings without spaces",
                ))
                .into()
        }
    }
    impl utoipa::ToSchema for IdList {}

    impl utoipa::PartialSchema for Interval {
        fn schema() -> RefOr<Schema> {
            ArrayBuilder::new()
                .items(integer())
                .min_items(Some(2))
                .max_items(Some(2))
                .description(Some(
                    "A closed range of numeric ids: [low, high], low <= high",
                ))
                .into()
        }
    }
    impl utoipa::ToSchema for Interval {}

    impl utoipa::PartialSchema for Weight {
        fn schema() -> RefOr<Schema> {
            OneOfBuilder::new()
                .item(integer().minimum(Some(1)).maximum(Some(1_000_000)))
                .item(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .enum_values(Some(["endpoints"])),
                )
                .description(Some(
                    "A fixed weight, or `endpoints`: the cluster's healthy endpoint count",
                ))
                .into()
        }
    }
    impl utoipa::ToSchema for Weight {}
}
