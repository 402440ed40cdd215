//! A `StrategySpec` becomes a `Compiled` index through one `TryFrom`: every rule is checked
//! while it is compiled, so a `Compiled` can only hold a valid strategy. Built once, shared
//! immutably (`Arc`), never rebuilt or cloned per request; runtime facts (health) are
//! arguments of `decide`, never fields here.

use std::sync::Arc;

use crate::cookie::{TrustedKey, MAX_KEYS};
use crate::error::Error;
use crate::hash::BUCKETS;
use crate::id::IdIndex;
use crate::spec::{
    ClusterSpec, GrayCookieMode, GrayCookieSpec, IdentitySource, Lane, LaneSpec, MatchSpec,
    PercentSpec, State, StrategySpec, Weight,
};

/// Most clusters one service may have (decide keeps its candidates on the stack).
pub const MAX_CLUSTERS: usize = 16;

/// A validated, compiled strategy.
#[derive(Debug)]
pub struct Compiled {
    pub(crate) clusters: Vec<CompiledCluster>,
    pub(crate) identity: Vec<Source>,
    pub(crate) gray_cookie: Option<GrayCookie>,
    pub(crate) lane: LaneSpec,
    pub(crate) min_healthy: u32,
    /// Every request header a decision may read (lowercase), so a host can fetch just these.
    pub(crate) needed: Vec<String>,
}

/// Where a tenant id is read from.
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
    /// Public keys only (signed mode).
    pub keys: Vec<TrustedKey>,
}

/// One cluster, compiled.
#[derive(Debug)]
pub struct CompiledCluster {
    pub key: String,
    pub envoy: String,
    pub state: State,
    pub weight: Weight,
    pub lane: Lane,
    /// Shared, so that a new version whose whitelist did not change reuses it.
    pub ids: Arc<IdIndex>,
    pub gray_cookie: bool,
    pub cookies: Vec<Matcher>,
    pub headers: Vec<Matcher>,
    pub caller_lane: Option<Lane>,
    pub percent: Option<Percent>,
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

    /// `lower`: header names are compared lowercase (as Envoy hands them over); cookie names
    /// are case-sensitive.
    fn parse(m: MatchSpec, lower: bool, path: &str) -> Result<Matcher, Error> {
        if !valid_token(&m.name) {
            return Err(Error::invalid(path, "empty or invalid name"));
        }
        let op = match (m.exact, m.prefix, m.one_of) {
            (Some(e), None, None) => Op::Exact(e.into_bytes()),
            (None, Some(p), None) => Op::Prefix(p.into_bytes()),
            (None, None, Some(set)) => Op::OneOf(set.into_iter().map(String::into_bytes).collect()),
            _ => {
                return Err(Error::invalid(
                    path,
                    "give exactly one of exact, prefix, one_of",
                ))
            }
        };
        let name = if lower {
            m.name.to_ascii_lowercase()
        } else {
            m.name
        };
        Ok(Matcher { name, op })
    }
}

/// A compiled percentage: a request or tenant whose bucket is below `threshold` matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Percent {
    /// In `0..=10_000`.
    pub threshold: u32,
    pub by: crate::spec::PercentBy,
    pub salt: u64,
}

impl Percent {
    fn parse(p: PercentSpec, path: &str) -> Result<Percent, Error> {
        if !p.value.is_finite() || !(0.0..=100.0).contains(&p.value) {
            return Err(Error::invalid(
                path,
                format!("{} is not a percentage from 0 to 100", p.value),
            ));
        }
        Ok(Percent {
            threshold: percent_threshold(p.value),
            by: p.by,
            salt: p.salt,
        })
    }
}

use crate::name::{cluster as valid_name, token as valid_token};

impl Compiled {
    /// The request headers decisions may read (lowercase; `cookie` and `:path` included when
    /// cookies or the query string matter). A host may fetch only these.
    pub fn needed_headers(&self) -> &[String] {
        &self.needed
    }

    pub fn clusters(&self) -> &[CompiledCluster] {
        &self.clusters
    }

    /// The cluster with this key, with its index.
    pub fn cluster(&self, key: &str) -> Option<(usize, &CompiledCluster)> {
        self.clusters.iter().enumerate().find(|(_, c)| c.key == key)
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

    /// The fewest healthy endpoints a cluster needs (when its count is known).
    pub fn min_healthy(&self) -> u32 {
        self.min_healthy
    }

    /// The gray cookie's name and mode, if the strategy has one.
    pub fn gray_cookie(&self) -> Option<(&str, GrayCookieMode)> {
        self.gray_cookie.as_ref().map(|g| (g.name.as_str(), g.mode))
    }

    /// The public keys signed gray cookies may be signed with (empty unless signed mode).
    pub fn gray_cookie_keys(&self) -> &[TrustedKey] {
        self.gray_cookie.as_ref().map_or(&[], |g| g.keys.as_slice())
    }

    /// Whether decisions need the clock (signed gray cookies), so callers can skip reading it.
    pub fn needs_clock(&self) -> bool {
        self.gray_cookie
            .as_ref()
            .is_some_and(|g| g.mode == GrayCookieMode::Signed)
    }
}

impl TryFrom<StrategySpec> for Compiled {
    type Error = Error;

    /// Checks every rule while compiling; the error names the field. Consumes the spec so
    /// that large id lists are sorted in place.
    fn try_from(spec: StrategySpec) -> Result<Compiled, Error> {
        Compiled::reusing(spec, |_| None)
    }
}

impl Compiled {
    /// As `try_from`, taking the id index of cluster `key` from `reuse` when it gives one: a
    /// caller that knows a cluster's whitelist did not change (a state flip on a million ids)
    /// skips rebuilding it. The spec's own lists for that cluster are then dropped unread.
    pub fn reusing(
        spec: StrategySpec,
        reuse: impl Fn(&str) -> Option<Arc<IdIndex>>,
    ) -> Result<Compiled, Error> {
        let StrategySpec {
            identity,
            gray_cookie,
            lane,
            min_healthy,
            clusters,
        } = spec;
        if identity.is_empty() {
            return Err(Error::invalid(
                "identity",
                "at least one identity source is needed",
            ));
        }
        let identity = identity
            .into_iter()
            .enumerate()
            .map(|(i, s)| Source::parse(s, &format!("identity[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let gray_cookie = gray_cookie.map(GrayCookie::parse).transpose()?;
        if !valid_token(&lane.header) {
            return Err(Error::invalid(
                "lane.header",
                "empty or invalid header name",
            ));
        }
        let lane = LaneSpec {
            header: lane.header.to_ascii_lowercase(),
            ..lane
        };
        if clusters.is_empty() {
            return Err(Error::invalid(
                "route-strategy",
                "at least one cluster is needed",
            ));
        }
        if clusters.len() > MAX_CLUSTERS {
            return Err(Error::invalid(
                "route-strategy",
                format!("at most {MAX_CLUSTERS} clusters per service"),
            ));
        }
        let mut compiled: Vec<CompiledCluster> = Vec::with_capacity(clusters.len());
        for (key, c) in clusters {
            let ids = reuse(&key);
            let cl = CompiledCluster::parse(key, c, gray_cookie.is_some(), ids)?;
            if compiled.iter().any(|o| o.envoy == cl.envoy) {
                return Err(Error::invalid(
                    format!("route-strategy.{}.cluster", cl.key),
                    format!("Envoy cluster {:?} is used by two clusters", cl.envoy),
                ));
            }
            compiled.push(cl);
        }
        let needed = needed_headers(&identity, gray_cookie.is_some(), &lane, &compiled);
        Ok(Compiled {
            clusters: compiled,
            identity,
            gray_cookie,
            lane,
            min_healthy,
            needed,
        })
    }
}

impl Source {
    fn parse(s: IdentitySource, path: &str) -> Result<Source, Error> {
        let source = match s {
            IdentitySource {
                header: Some(h),
                cookie: None,
                query: None,
            } => Source::Header(h.to_ascii_lowercase()),
            IdentitySource {
                header: None,
                cookie: Some(c),
                query: None,
            } => Source::Cookie(c),
            IdentitySource {
                header: None,
                cookie: None,
                query: Some(q),
            } => Source::Query(q),
            _ => {
                return Err(Error::invalid(
                    path,
                    "give exactly one of header, cookie, query",
                ))
            }
        };
        let (Source::Header(name) | Source::Cookie(name) | Source::Query(name)) = &source;
        if !valid_token(name) {
            return Err(Error::invalid(
                path,
                "the name is empty or has invalid characters",
            ));
        }
        Ok(source)
    }
}

impl GrayCookie {
    fn parse(g: GrayCookieSpec) -> Result<GrayCookie, Error> {
        if !valid_token(&g.name) {
            return Err(Error::invalid(
                "gray_cookie.name",
                "empty or invalid cookie name",
            ));
        }
        match g.mode {
            GrayCookieMode::Signed if g.keys.is_empty() => {
                return Err(Error::invalid(
                    "gray_cookie.keys",
                    "signed mode needs at least one public key ({id, public_key}; \
                     `graylane keygen` makes a pair)",
                ))
            }
            GrayCookieMode::Plain if !g.keys.is_empty() => {
                return Err(Error::invalid(
                    "gray_cookie.keys",
                    "keys are for signed mode; plain cookies are not signed",
                ))
            }
            _ => {}
        }
        if g.keys.len() > MAX_KEYS {
            return Err(Error::invalid(
                "gray_cookie.keys",
                format!("at most {MAX_KEYS} keys"),
            ));
        }
        let mut keys: Vec<TrustedKey> = Vec::with_capacity(g.keys.len());
        for (i, k) in g.keys.iter().enumerate() {
            let key = TrustedKey::parse(k, &format!("gray_cookie.keys[{i}]"))?;
            if keys.iter().any(|o| o.id() == key.id()) {
                return Err(Error::invalid(
                    format!("gray_cookie.keys[{i}].id"),
                    format!("key id {:?} is listed twice", key.id()),
                ));
            }
            keys.push(key);
        }
        Ok(GrayCookie {
            name: g.name,
            mode: g.mode,
            keys,
        })
    }
}

impl CompiledCluster {
    fn parse(
        key: String,
        c: ClusterSpec,
        has_gray_cookie: bool,
        ids: Option<Arc<IdIndex>>,
    ) -> Result<Self, Error> {
        let at = |f: &str| format!("route-strategy.{key}{f}");
        if !valid_name(&key) {
            return Err(Error::invalid(
                at(""),
                "cluster names use letters, digits, '-', '_', '.', ':' or '|'",
            ));
        }
        let envoy = c.cluster.unwrap_or_else(|| key.clone());
        if !valid_name(&envoy) {
            return Err(Error::invalid(at(".cluster"), "invalid Envoy cluster name"));
        }
        if let Weight::Fixed(w) = c.weight {
            if w == 0 || w > 1_000_000 {
                return Err(Error::invalid(
                    at(".weight"),
                    "weight must be 1 to 1000000, or `endpoints`",
                ));
            }
        }
        if c.gray_cookie && !has_gray_cookie {
            return Err(Error::invalid(
                at(".gray_cookie"),
                "the service has no gray_cookie section",
            ));
        }
        let matchers = |list: Vec<MatchSpec>, field: &str, lower: bool| {
            list.into_iter()
                .enumerate()
                .map(|(i, m)| Matcher::parse(m, lower, &at(&format!(".{field}[{i}]"))))
                .collect::<Result<Vec<_>, _>>()
        };
        let cookies = matchers(c.cookies, "cookies", false)?;
        let headers = matchers(c.headers, "headers", true)?;
        let percent = c
            .percent
            .map(|p| Percent::parse(p, &at(".percent.value")))
            .transpose()?;
        let lane = c.lane.unwrap_or(if c.status == State::Y {
            Lane::Gray
        } else {
            Lane::Prod
        });
        Ok(CompiledCluster {
            ids: ids.unwrap_or_else(|| Arc::new(IdIndex::build(c.id.all, c.id.ids, c.id.interval))),
            cookies,
            headers,
            percent,
            envoy,
            state: c.status,
            weight: c.weight,
            lane,
            gray_cookie: c.gray_cookie,
            caller_lane: c.caller_lane,
            key,
        })
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
