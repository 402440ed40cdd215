//! Validation and compilation: a `StrategySpec` becomes a `Compiled` index, built once and
//! never rebuilt per request.

use crate::error::Error;
use crate::hash::BUCKETS;
use crate::id::IdIndex;
use crate::spec::{
    ClusterSpec, GrayCookieMode, IdentitySource, Lane, LaneSpec, MatchSpec, PercentBy, State,
    StrategySpec,
};

/// Most clusters one service may have (decide keeps its candidates on the stack).
pub const MAX_CLUSTERS: usize = 16;

/// A validated, compiled strategy.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub(crate) clusters: Vec<CompiledCluster>,
    pub(crate) identity: Vec<Source>,
    pub(crate) gray_cookie: Option<GrayCookie>,
    pub(crate) lane: LaneSpec,
    pub(crate) min_healthy: u32,
    /// Every request header a decision may read (lowercase), so a host can fetch just these.
    pub(crate) needed: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Source {
    Header(String),
    Cookie(String),
    Query(String),
}

#[derive(Debug, Clone)]
pub(crate) struct GrayCookie {
    pub name: String,
    pub mode: GrayCookieMode,
    pub key: Vec<u8>,
}

/// One cluster, compiled.
#[derive(Debug, Clone)]
pub struct CompiledCluster {
    pub key: String,
    pub envoy: String,
    pub state: State,
    pub weight: u32,
    pub lane: Lane,
    pub ids: IdIndex,
    pub gray_cookie: bool,
    pub cookies: Vec<Matcher>,
    pub headers: Vec<Matcher>,
    pub caller_lane: Option<Lane>,
    pub percent: Option<Percent>,
    pub healthy: Option<u32>,
}

/// A compiled cookie or header condition.
#[derive(Debug, Clone)]
pub struct Matcher {
    pub name: String,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Exact(Vec<u8>),
    Prefix(Vec<u8>),
    OneOf(Vec<Vec<u8>>),
}

impl Matcher {
    pub fn matches(&self, value: &[u8]) -> bool {
        match &self.op {
            Op::Exact(e) => value == e.as_slice(),
            Op::Prefix(p) => value.starts_with(p),
            Op::OneOf(set) => set.iter().any(|s| s.as_slice() == value),
        }
    }
}

/// A compiled percentage: a request or tenant whose bucket is below `threshold` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent {
    /// In `0..=10_000`.
    pub threshold: u32,
    pub by: PercentBy,
    pub salt: u64,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|' | b':'))
}

fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b';')
}

impl Compiled {
    /// Validates and compiles. Consumes the spec so that large id lists are sorted in place.
    pub fn compile(spec: StrategySpec) -> Result<Compiled, Error> {
        validate(&spec)?;
        let StrategySpec {
            identity,
            gray_cookie,
            lane,
            min_healthy,
            clusters,
        } = spec;
        let identity: Vec<Source> = identity
            .into_iter()
            .filter_map(|s| match s {
                IdentitySource {
                    header: Some(h), ..
                } => Some(Source::Header(h.to_ascii_lowercase())),
                IdentitySource {
                    cookie: Some(c), ..
                } => Some(Source::Cookie(c)),
                IdentitySource { query: Some(q), .. } => Some(Source::Query(q)),
                _ => None,
            })
            .collect();
        let gray_cookie = gray_cookie.map(|g| GrayCookie {
            name: g.name,
            mode: g.mode,
            key: g.key.map(String::into_bytes).unwrap_or_default(),
        });
        let lane = LaneSpec {
            header: lane.header.to_ascii_lowercase(),
            ..lane
        };
        let clusters: Vec<CompiledCluster> = clusters
            .into_iter()
            .map(|(key, c)| compile_cluster(key, c))
            .collect();
        let needed = needed_headers(&identity, gray_cookie.is_some(), &lane, &clusters);
        Ok(Compiled {
            clusters,
            identity,
            gray_cookie,
            lane,
            min_healthy,
            needed,
        })
    }

    /// The request headers decisions may read (lowercase; `cookie` and `:path` included when
    /// cookies or the query string matter). A host may fetch only these.
    pub fn needed_headers(&self) -> &[String] {
        &self.needed
    }

    pub fn clusters(&self) -> &[CompiledCluster] {
        &self.clusters
    }

    /// The cluster with this key.
    pub fn cluster(&self, key: &str) -> Option<&CompiledCluster> {
        self.clusters.iter().find(|c| c.key == key)
    }

    /// Sets a cluster's healthy endpoint count (from the registry); `None` means unknown.
    /// Returns false when there is no such cluster.
    pub fn set_healthy(&mut self, key: &str, healthy: Option<u32>) -> bool {
        match self.clusters.iter_mut().find(|c| c.key == key) {
            Some(c) => {
                c.healthy = healthy;
                true
            }
            None => false,
        }
    }

    /// The lane header's name (lowercase).
    pub fn lane_header(&self) -> &str {
        &self.lane.header
    }

    /// Whether an incoming lane header is trusted.
    pub fn trusts_lane_header(&self) -> bool {
        self.lane.trust
    }

    /// The node label that names the workload's own lane.
    pub fn lane_label(&self) -> &str {
        &self.lane.label
    }

    /// Whether decisions need the clock (signed gray cookies), so callers can skip reading it.
    pub fn needs_clock(&self) -> bool {
        self.gray_cookie
            .as_ref()
            .is_some_and(|g| g.mode == GrayCookieMode::Signed)
    }

    /// Whether a cluster is healthy enough to receive traffic.
    pub fn is_healthy(&self, c: &CompiledCluster) -> bool {
        c.healthy.is_none_or(|h| h >= self.min_healthy)
    }
}

fn needed_headers(
    identity: &[Source],
    gray_cookie: bool,
    lane: &LaneSpec,
    clusters: &[CompiledCluster],
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |h: &str| {
        if !out.iter().any(|x| x == h) {
            out.push(h.to_string());
        }
    };
    for s in identity {
        match s {
            Source::Header(h) => add(h),
            Source::Cookie(_) => add("cookie"),
            Source::Query(_) => add(":path"),
        }
    }
    for c in clusters {
        if (c.gray_cookie && gray_cookie) || !c.cookies.is_empty() {
            add("cookie");
        }
        for m in &c.headers {
            add(&m.name);
        }
        if c.caller_lane.is_some() && lane.trust {
            add(&lane.header);
        }
    }
    out
}

fn compile_cluster(key: String, c: ClusterSpec) -> CompiledCluster {
    let envoy = c.cluster.unwrap_or_else(|| key.clone());
    let lane = c.lane.unwrap_or(if c.status == State::Y {
        Lane::Gray
    } else {
        Lane::Prod
    });
    let matchers = |v: Vec<MatchSpec>, lower: bool| -> Vec<Matcher> {
        v.into_iter()
            .filter_map(|m| {
                let name = if lower {
                    m.name.to_ascii_lowercase()
                } else {
                    m.name
                };
                let op = match (m.exact, m.prefix, m.one_of) {
                    (Some(e), None, None) => Op::Exact(e.into_bytes()),
                    (None, Some(p), None) => Op::Prefix(p.into_bytes()),
                    (None, None, Some(set)) => {
                        Op::OneOf(set.into_iter().map(String::into_bytes).collect())
                    }
                    _ => return None, // excluded by validate()
                };
                Some(Matcher { name, op })
            })
            .collect()
    };
    CompiledCluster {
        ids: IdIndex::build(c.id.all, c.id.ids, c.id.interval),
        cookies: matchers(c.cookies, false),
        headers: matchers(c.headers, true),
        percent: c.percent.map(|p| Percent {
            threshold: percent_threshold(p.value),
            by: p.by,
            salt: p.salt,
        }),
        key,
        envoy,
        state: c.status,
        weight: c.weight,
        lane,
        gray_cookie: c.gray_cookie,
        caller_lane: c.caller_lane,
        healthy: c.healthy,
    }
}

/// Percent (0..=100) to a bucket threshold in 0..=10_000.
fn percent_threshold(value: f64) -> u32 {
    let t = (value * (BUCKETS as f64) / 100.0).round();
    if t <= 0.0 {
        0
    } else if t >= BUCKETS as f64 {
        BUCKETS as u32
    } else {
        t as u32
    }
}

/// Checks every rule of the model; the error names the field.
pub fn validate(spec: &StrategySpec) -> Result<(), Error> {
    if spec.identity.is_empty() {
        return Err(Error::invalid(
            "identity",
            "at least one identity source is needed",
        ));
    }
    for (i, s) in spec.identity.iter().enumerate() {
        let set = [&s.header, &s.cookie, &s.query]
            .iter()
            .filter(|x| x.is_some())
            .count();
        let path = format!("identity[{i}]");
        if set != 1 {
            return Err(Error::invalid(
                path,
                "give exactly one of header, cookie, query",
            ));
        }
        let name = s.header.as_ref().or(s.cookie.as_ref()).or(s.query.as_ref());
        if !name.is_some_and(|n| valid_token(n)) {
            return Err(Error::invalid(
                path,
                "the name is empty or has invalid characters",
            ));
        }
    }
    if let Some(g) = &spec.gray_cookie {
        if !valid_token(&g.name) {
            return Err(Error::invalid(
                "gray_cookie.name",
                "empty or invalid cookie name",
            ));
        }
        if g.mode == GrayCookieMode::Signed && g.key.as_ref().is_none_or(|k| k.len() < 16) {
            return Err(Error::invalid(
                "gray_cookie.key",
                "signed mode needs a key of at least 16 bytes",
            ));
        }
    }
    if !valid_token(&spec.lane.header) {
        return Err(Error::invalid(
            "lane.header",
            "empty or invalid header name",
        ));
    }
    if spec.clusters.is_empty() {
        return Err(Error::invalid(
            "route-strategy",
            "at least one cluster is needed",
        ));
    }
    if spec.clusters.len() > MAX_CLUSTERS {
        return Err(Error::invalid(
            "route-strategy",
            format!("at most {MAX_CLUSTERS} clusters per service"),
        ));
    }
    let mut envoy_names = Vec::new();
    for (key, c) in &spec.clusters {
        let at = |f: &str| format!("route-strategy.{key}{f}");
        if !valid_name(key) {
            return Err(Error::invalid(
                at(""),
                "cluster names use letters, digits, '-', '_', '.', ':' or '|'",
            ));
        }
        let envoy = c.cluster.as_deref().unwrap_or(key);
        if !valid_name(envoy) {
            return Err(Error::invalid(at(".cluster"), "invalid Envoy cluster name"));
        }
        if envoy_names.contains(&envoy) {
            return Err(Error::invalid(
                at(".cluster"),
                format!("Envoy cluster {envoy:?} is used by two clusters"),
            ));
        }
        envoy_names.push(envoy);
        if c.weight == 0 || c.weight > 1_000_000 {
            return Err(Error::invalid(at(".weight"), "weight must be 1 to 1000000"));
        }
        if c.gray_cookie && spec.gray_cookie.is_none() {
            return Err(Error::invalid(
                at(".gray_cookie"),
                "the service has no gray_cookie section",
            ));
        }
        for (field, list) in [("cookies", &c.cookies), ("headers", &c.headers)] {
            for (i, m) in list.iter().enumerate() {
                let path = at(&format!(".{field}[{i}]"));
                if !valid_token(&m.name) {
                    return Err(Error::invalid(path, "empty or invalid name"));
                }
                let ops = [m.exact.is_some(), m.prefix.is_some(), m.one_of.is_some()]
                    .iter()
                    .filter(|x| **x)
                    .count();
                if ops != 1 {
                    return Err(Error::invalid(
                        path,
                        "give exactly one of exact, prefix, one_of",
                    ));
                }
            }
        }
        if let Some(p) = &c.percent {
            if !p.value.is_finite() || !(0.0..=100.0).contains(&p.value) {
                return Err(Error::invalid(
                    at(".percent.value"),
                    format!("{} is not a percentage from 0 to 100", p.value),
                ));
            }
        }
    }
    Ok(())
}

impl TryFrom<StrategySpec> for Compiled {
    type Error = Error;
    fn try_from(spec: StrategySpec) -> Result<Self, Error> {
        Compiled::compile(spec)
    }
}
