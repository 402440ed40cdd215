//! The HTTP context: extract -> decide -> apply. Serving several services, the request's
//! `:authority` is read first and mapped to one (`destination.rs`, no allocation); a request
//! to any other destination costs that read alone. Host calls per request: the headers the
//! strategy reads (each fetched on first use), one or two writes (the route and lane
//! headers), and with traffic reports on, the response's `:status` (plus two clock reads on the
//! one request in 8 that is timed, and `response.code_details` for error statuses). Counting
//! itself stays in the VM.
//!
//! With a preview installed, one request in its `every` is also decided by the candidate,
//! from the same request (headers, draw, lane, clock, cookie verdicts): no host call more,
//! and nothing the candidate decides reaches the request or its response; only the pair
//! (live cluster -> candidate cluster) is counted.

use std::cell::OnceCell;
use std::cell::RefCell;
use std::ops::Deref;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use graylane_strategy::hash::mix64;
use graylane_strategy::{
    decide_with, tenant_of, Compiled, Decision, Headers, Health, Lane, Reason, RequestView,
};
use smallvec::SmallVec;

use crate::follower::Preview;
use crate::host::{self, Action, HostBytes, LogLevel, MapType, Status};
use crate::metrics::Metrics;
use crate::root::Shared;
use crate::verdicts::{Cached, Verdicts};

/// One request in this many is timed for the latency histogram.
const LATENCY_SAMPLE: u64 = 8;

/// Decorrelates the preview's sample from the draw's other uses: its low bits (per-request
/// percentages), `mix64(draw ^ ..)` with decide's own constant (weighted ties) and bits 32..
/// (latency timing).
const PREVIEW_SALT: u64 = 0x7072_6576_6965_7721; // "preview!"

/// The lane header when no strategy (which may rename it) is known yet.
const DEFAULT_LANE_HEADER: &str = "x-graylane-lane";

pub struct Http {
    shared: Rc<RefCell<Shared>>,
    /// `<cluster>;<reason>` for the optional response header.
    reason: Option<(String, String)>,
    /// With traffic reports on: the service and where this request is counted, when it was
    /// routed (µs), and the response's status and time once its headers arrive.
    counted: Option<(usize, usize, Option<u64>)>,
    response: Option<(Option<u16>, Option<u64>)>,
}

impl Http {
    pub fn new(shared: Rc<RefCell<Shared>>) -> Http {
        Http {
            shared,
            reason: None,
            counted: None,
            response: None,
        }
    }
}

/// The host's clock in microseconds (for upstream latency).
fn now_micros() -> Option<u64> {
    let t = host::get_current_time().ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
}

/// The response's status, read from its headers.
fn response_status() -> Option<u16> {
    let v = host::get_map_value_bytes(MapType::HttpResponseHeaders, ":status").ok()??;
    std::str::from_utf8(&v).ok()?.parse().ok()
}

/// Whether the response came from the upstream, not from Envoy itself (a local reply: the
/// upstream reset, refused the connection, timed out, had no healthy endpoint). Asked only for
/// error statuses: Envoy's `response.code_details` is `via_upstream` for upstream answers.
fn via_upstream() -> bool {
    host::get_property(&["response", "code_details"])
        .ok()
        .flatten()
        .is_some_and(|d| d == b"via_upstream")
}

/// Request headers fetched on first use (from Envoy: one small host call each, instead of
/// serialising every header of the request up front), each at most once.
struct Lazy<'n, F, V> {
    names: &'n [String],
    /// On the stack for up to four names (a strategy rarely reads more): no allocation.
    values: SmallVec<[OnceCell<Option<V>>; 4]>,
    fetch: F,
}

impl<'n, V, F: Fn(&str) -> Option<V>> Lazy<'n, F, V> {
    fn new(names: &'n [String], fetch: F) -> Lazy<'n, F, V> {
        Lazy {
            names,
            values: names.iter().map(|_| OnceCell::new()).collect(),
            fetch,
        }
    }
}

impl<V: Deref<Target = [u8]>, F: Fn(&str) -> Option<V>> Headers for Lazy<'_, F, V> {
    fn get(&self, name: &str) -> Option<&[u8]> {
        let i = self.names.iter().position(|n| n == name)?;
        self.values
            .get(i)?
            .get_or_init(|| (self.fetch)(name))
            .as_deref()
    }
}

/// A request header from Envoy.
fn request_header(name: &str) -> Option<HostBytes> {
    host::get_map_value_bytes(MapType::HttpRequestHeaders, name)
        .ok()
        .flatten()
}

fn set(name: &str, value: Option<&[u8]>) -> bool {
    host::set_map_value_bytes(MapType::HttpRequestHeaders, name, value).is_ok()
}

/// Unix seconds from the host's clock; `None` when the host cannot tell (an error, or a time
/// before 1970), and then no expiring cookie is honoured. (It used to become 0, before every
/// expiry, so expired cookies passed.)
fn unix_seconds(clock: Result<SystemTime, Status>) -> Option<u64> {
    Some(clock.ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// What one request offers its decisions (the live one and a preview's), each fact the same
/// for both: its headers, the workload's lane, the draw, and the host's clock, read at most
/// once and only when a strategy needs it.
struct Request<'a, F> {
    headers: &'a dyn Headers,
    own_lane: Option<Lane>,
    draw: u64,
    clock: F,
    now: OnceCell<Option<u64>>,
}

impl<'a, F: Fn() -> Result<SystemTime, Status>> Request<'a, F> {
    fn new(headers: &'a dyn Headers, own_lane: Option<Lane>, draw: u64, clock: F) -> Self {
        Request {
            headers,
            own_lane,
            draw,
            clock,
            now: OnceCell::new(),
        }
    }

    /// The request as `c` reads it (the clock asked only if `c` needs it).
    fn view(&self, c: &Compiled) -> RequestView<'a> {
        let now = if c.needs_clock() {
            *self.now.get_or_init(|| unix_seconds((self.clock)()))
        } else {
            None
        };
        RequestView {
            headers: self.headers,
            tenant: None,
            own_lane: self.own_lane,
            now,
            draw: self.draw,
        }
    }
}

/// One request's facts -> decide, with signed cookies checked through the VM's `verdicts`.
/// Host-free (the host's answers are arguments), so it is unit-tested natively.
fn decide_request(
    c: &Compiled,
    health: &Health,
    request: &Request<'_, impl Fn() -> Result<SystemTime, Status>>,
    verdicts: &mut Verdicts,
) -> (Decision, Checked) {
    let req = request.view(c);
    let cached = Cached::new(verdicts);
    let d = decide_with(c, health, &req, &cached);
    let checked = Checked {
        verified: cached.verified.get(),
        remembered: cached.remembered.get(),
        no_clock: c.needs_clock() && req.now.is_none(),
    };
    (d, checked)
}

/// What checking signed cookies took for one request (counted in the metrics).
#[derive(Debug, Default, PartialEq, Eq)]
struct Checked {
    verified: u32,
    remembered: u32,
    no_clock: bool,
}

impl Checked {
    /// Both decisions' work, for a request the preview evaluated too.
    fn and(self, other: Checked) -> Checked {
        Checked {
            verified: self.verified + other.verified,
            remembered: self.remembered + other.remembered,
            no_clock: self.no_clock || other.no_clock,
        }
    }
}

/// Whether the preview evaluates the request of `draw`: one in `every` (0 and 1: all).
fn sampled(draw: u64, every: u32) -> bool {
    every <= 1 || mix64(draw ^ PREVIEW_SALT).is_multiple_of(u64::from(every))
}

/// The preview's candidate decides the request the live strategy decided as `live_d` (the
/// same request, cookie verdicts included); the pair is counted in `metrics`, with the
/// request's tenant (as the live strategy reads it) when it would move. Decides nothing for
/// the request itself. Host-free, like [`decide_request`].
fn preview_request(
    live: &Compiled,
    live_d: &Decision,
    p: &Preview,
    request: &Request<'_, impl Fn() -> Result<SystemTime, Status>>,
    verdicts: &mut Verdicts,
    metrics: &mut Metrics,
) -> Checked {
    let cand = &*p.compiled;
    let (d, checked) = decide_request(cand, &p.health, request, verdicts);
    let from = live_d.target(live).map(|t| t.key.as_str());
    let to = d.target(cand).map(|t| t.key.as_str());
    metrics.preview_pair(from, to, || tenant_of(live, &request.view(live)));
    checked
}

impl Http {
    /// Whether this request waits for its response or log (a report, a reason header).
    pub fn pending(&self) -> bool {
        self.counted.is_some() || self.reason.is_some()
    }

    pub fn on_request_headers(&mut self) -> Action {
        let Ok(mut s) = self.shared.try_borrow_mut() else {
            return Action::Continue;
        };
        let s = &mut *s;
        let draw = s.draw();
        // Serving several services: the request's destination names its service (one host
        // call); any other destination is left alone.
        let at = match &s.destinations {
            None => 0,
            Some(d) => {
                let Some(i) = request_header(":authority").and_then(|h| d.find(&h)) else {
                    return Action::Continue;
                };
                i
            }
        };
        let Some(svc) = s.services.get_mut(at) else {
            return Action::Continue;
        };
        let Some(active) = &svc.active else {
            // No strategy yet: never let a client-sent routing header choose the cluster
            // or the lane.
            set(&s.route_header, None);
            set(DEFAULT_LANE_HEADER, None);
            svc.metrics.event("no_snapshot");
            return Action::Continue;
        };
        let c = &*active.compiled;
        let preview = active.preview.as_deref().filter(|p| sampled(draw, p.every));
        // Only the headers the strategies read, each fetched the first time a decision asks
        // (a tenant found in its header never costs a cookie lookup), once for both.
        let names = preview.map_or(c.needed_headers(), |p| p.headers.as_slice());
        let headers = Lazy::new(names, request_header);
        let request = Request::new(&headers, svc.own_lane, draw, host::get_current_time);
        let (d, mut checked) = decide_request(c, &active.health, &request, &mut s.verdicts);
        let target = d.target(c);
        let counted = svc.metrics.decision(d.cluster, &d.reason);
        // Before the route and lane headers are written: the candidate reads the request as
        // it arrived.
        if let Some(p) = preview {
            let more = preview_request(c, &d, p, &request, &mut s.verdicts, &mut svc.metrics);
            checked = checked.and(more);
        }
        if s.reporting {
            // Latency is timed on one request in LATENCY_SAMPLE (two clock reads saved on the
            // others; the histogram's quantiles stay those of the traffic).
            let timed = (draw >> 32) % LATENCY_SAMPLE == 0;
            self.counted = counted.map(|c| (at, c, if timed { now_micros() } else { None }));
        }
        for _ in 0..checked.verified {
            svc.metrics.event("cookie_verified");
        }
        for _ in 0..checked.remembered {
            svc.metrics.event("cookie_remembered");
        }
        if checked.no_clock {
            svc.metrics.event("no_clock");
        }
        if d.fallback.is_some() {
            svc.metrics.event("fallback_unhealthy");
        }
        if s.debug {
            let _ = host::log(
                LogLevel::Debug,
                &format!("graylane {}: {}", svc.name, d.detail(c)),
            );
        }
        if s.reason_header.is_some() {
            let cluster = target.map_or("-", |t| t.key.as_str()).to_string();
            let mut code = d.reason.code().to_string();
            if d.fallback.is_some() {
                code.push_str(",fallback_unhealthy");
            }
            self.reason = Some((cluster, code));
        }
        match target {
            Some(t) => {
                let ok = set(&s.route_header, Some(t.envoy.as_bytes()))
                    & set(c.lane_header(), Some(t.lane.as_str().as_bytes()));
                if !ok {
                    svc.metrics.event("host_error");
                }
                Action::Continue
            }
            None => {
                debug_assert_eq!(d.reason, Reason::NoCluster);
                let _ = host::send_http_response(
                    503,
                    &[("x-graylane-reason", "no_cluster")],
                    b"graylane: no cluster can serve this request\n",
                );
                Action::Pause
            }
        }
    }

    pub fn on_response_headers(&mut self) {
        if let (Some((_, _, routed)), None) = (self.counted, self.response) {
            let answered = routed.and_then(|_| now_micros());
            self.response = Some((response_status(), answered));
        }
        if let Some((cluster, code)) = self.reason.take() {
            if let Some(name) = self
                .shared
                .try_borrow()
                .ok()
                .and_then(|s| s.reason_header.clone())
            {
                let value = format!("{cluster};{code}");
                let _ = host::set_map_value_bytes(
                    MapType::HttpResponseHeaders,
                    &name,
                    Some(value.as_bytes()),
                );
            }
        }
    }

    pub fn on_log(&mut self) {
        let Some((service, at, routed)) = self.counted.take() else {
            return;
        };
        let (status, micros) = match self.response.take() {
            Some((status, answered)) => {
                let local = status.is_some_and(|s| s >= 400) && !via_upstream();
                let micros = routed.zip(answered).map(|(a, b)| b.saturating_sub(a));
                (if local { None } else { status }, micros)
            }
            // Reset before any response headers.
            None => (None, None),
        };
        if let Some(svc) = self
            .shared
            .try_borrow_mut()
            .ok()
            .as_mut()
            .and_then(|s| s.services.get_mut(service))
        {
            svc.metrics.finished(at, status, micros);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use graylane_strategy::cookie::{self, SigningKey};
    use graylane_strategy::Id;
    use std::time::Duration;

    fn strategy(k: &SigningKey) -> Compiled {
        let public = cookie::public_key_text(&k.verifying_key());
        let spec = format!(
            r#"{{"gray_cookie": {{"keys": [{{"id": "k1", "public_key": "{public}"}}]}},
            "route-strategy": {{"prod": {{"status": "G", "id": {{"all": true}}}},
                               "gray": {{"status": "Y", "gray_cookie": true}}}}}}"#
        );
        Compiled::try_from(graylane_strategy::parse_json(spec.as_bytes()).unwrap()).unwrap()
    }

    fn at(secs: u64) -> Result<SystemTime, Status> {
        Ok(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// The target and what checking the cookie took, for tenant 42 sending `value`.
    fn route(
        c: &Compiled,
        value: &str,
        clock: Result<SystemTime, Status>,
        verdicts: &mut Verdicts,
    ) -> (String, Checked) {
        let headers = vec![
            ("x-tenant-id".to_string(), b"42".to_vec()),
            (
                "cookie".to_string(),
                format!("tenantGray={value}").into_bytes(),
            ),
        ];
        let request = Request::new(&headers, None, 0, || clock);
        let (d, checked) = decide_request(c, &Health::UNKNOWN, &request, verdicts);
        (d.target(c).unwrap().key.clone(), checked)
    }

    #[test]
    fn without_a_clock_no_expiring_cookie_is_honoured() {
        let k = SigningKey::from_bytes(&[5; 32]);
        let c = strategy(&k);
        let expired = cookie::sign(&k, "k1", &Id::Num(42), 1_000);
        let mut v = Verdicts::default();
        assert_eq!(
            route(&c, &expired, at(999), &mut v).0,
            "gray",
            "before its expiry"
        );
        assert_eq!(
            route(&c, &expired, at(1_000), &mut v).0,
            "prod",
            "at its expiry"
        );
        // The host cannot tell the time: today's and yesterday's cookies alike stay prod
        // (the old code took the time as 0, before every expiry, and routed them to gray).
        let (target, checked) = route(&c, &expired, Err(Status::InternalFailure), &mut v);
        assert_eq!(target, "prod", "host clock failed");
        assert!(checked.no_clock);
        let before_1970 = UNIX_EPOCH.checked_sub(Duration::from_secs(5)).unwrap();
        assert_eq!(
            route(&c, &expired, Ok(before_1970), &mut v).0,
            "prod",
            "clock before 1970"
        );
        assert_eq!(unix_seconds(Err(Status::InternalFailure)), None);
        assert_eq!(unix_seconds(at(7)), Some(7));
    }

    #[test]
    fn a_cookie_is_verified_once_per_vm() {
        let k = SigningKey::from_bytes(&[6; 32]);
        let c = strategy(&k);
        let good = cookie::sign(&k, "k1", &Id::Num(42), 5_000);
        let mut v = Verdicts::default();
        let first = route(&c, &good, at(10), &mut v);
        assert_eq!(first.0, "gray");
        assert_eq!((first.1.verified, first.1.remembered), (1, 0));
        for _ in 0..5 {
            let again = route(&c, &good, at(11), &mut v);
            assert_eq!(again.0, "gray");
            assert_eq!((again.1.verified, again.1.remembered), (0, 1));
        }
        // Remembered, yet still bound to its expiry.
        assert_eq!(route(&c, &good, at(5_000), &mut v).0, "prod");
    }

    fn compile(json: &str) -> Compiled {
        Compiled::try_from(graylane_strategy::parse_json(json.as_bytes()).unwrap()).unwrap()
    }

    /// A Y for ids 1..=`gray`, B G for everyone.
    fn gray_up_to(gray: u64) -> Compiled {
        let ids: Vec<String> = (1..=gray).map(|i| i.to_string()).collect();
        compile(&format!(
            r#"{{"route-strategy": {{"A": {{"status": "Y", "id": {{"ids": [{}]}}}},
                "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#,
            ids.join(", ")
        ))
    }

    #[test]
    fn many_tenants_moving_by_percentage_are_estimated() {
        let ids: Vec<String> = (1..=100_000u64).map(|i| (i * 17).to_string()).collect();
        let strat = |pct: u32, extra: &str| {
            compile(&format!(
                r#"{{"route-strategy": {{"A": {{"status": "Y", "id": {{"ids": [{}{extra}], "interval": [[3000000, 3000099]]}}, "percent": {{"value": {pct}, "by": "tenant"}}}},
                    "B": {{"status": "G", "id": {{"all": true}}}}}}}}"#,
                ids.join(",")
            ))
        };
        let live = strat(5, "");
        let p = Preview::new(
            3,
            1,
            Rc::new(strat(10, ", 2000000, 2000001")),
            &live,
            &Default::default(),
        );
        let mut metrics = Metrics::default();
        metrics.preview(Some(3));
        let mut verdicts = Verdicts::default();
        for t in 1..=20_000u64 {
            let tenant = mix64(t) % 4_000_000 + 1;
            let value = tenant.to_string().into_bytes();
            let fetch = |name: &str| (name == "x-tenant-id").then(|| value.clone());
            let headers = Lazy::new(&p.headers, fetch);
            let clock = || -> Result<SystemTime, Status> { panic!("no clock") };
            let request = Request::new(&headers, None, mix64(t), clock);
            let (d, _) = decide_request(&live, &Health::UNKNOWN, &request, &mut verdicts);
            preview_request(&live, &d, &p, &request, &mut verdicts, &mut metrics);
        }
        let counts = metrics.worker_counts(1, 1).preview.unwrap();
        let json = serde_json::to_string(&counts).unwrap();
        let back: graylane_strategy::traffic::PreviewCounts = serde_json::from_str(&json).unwrap();
        let moved = back.pairs.iter().find(|x| x.from != x.to).unwrap();
        let n = moved.tenants.count();
        // About 5 % of the tenants move; (nearly) every request is a distinct tenant.
        assert!(
            (moved.requests * 93 / 100..=moved.requests * 107 / 100).contains(&n),
            "{} requests, {n} tenants, headers {:?}",
            moved.requests,
            p.headers
        );
    }

    #[test]
    fn a_preview_counts_where_the_candidate_would_send_each_request() {
        let live = gray_up_to(10);
        let cand = Rc::new(gray_up_to(20));
        let p = Preview::new(3, 1, cand, &live, &Default::default());
        let mut metrics = Metrics::default();
        metrics.preview(Some(3));
        let mut verdicts = Verdicts::default();
        let fetched = std::cell::Cell::new(0);
        for t in 1..=40u64 {
            let value = t.to_string().into_bytes();
            let fetch = |name: &str| {
                fetched.set(fetched.get() + 1);
                (name == "x-tenant-id").then(|| value.clone())
            };
            let headers = Lazy::new(&p.headers, fetch);
            let clock = || -> Result<SystemTime, Status> { panic!("no strategy needs the clock") };
            let request = Request::new(&headers, None, mix64(t), clock);
            let (d, _) = decide_request(&live, &Health::UNKNOWN, &request, &mut verdicts);
            let expected = if t <= 10 { "A" } else { "B" };
            assert_eq!(d.target(&live).unwrap().key, expected, "live routes {t}");
            preview_request(&live, &d, &p, &request, &mut verdicts, &mut metrics);
        }
        // One fetch per request and header, shared by both decisions and the tenant.
        assert_eq!(fetched.get(), 40);
        let counts = metrics.worker_counts(1, 1).preview.unwrap();
        assert_eq!(counts.id, 3);
        let got: Vec<_> = counts
            .pairs
            .iter()
            .map(|x| {
                (
                    x.from.as_deref().unwrap(),
                    x.to.as_deref().unwrap(),
                    x.requests,
                    x.tenants.count(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("A", "A", 10, 0), ("B", "A", 10, 10), ("B", "B", 20, 0)]
        );
        let examples: Vec<String> = (11..=20).map(|t: u64| t.to_string()).collect();
        assert_eq!(counts.pairs[1].examples, examples);
        assert!(counts.pairs[0].examples.is_empty() && counts.pairs[2].examples.is_empty());
    }

    #[test]
    fn a_candidate_without_a_cluster_counts_as_none() {
        let live = gray_up_to(1);
        let cand = Rc::new(compile(
            r#"{"route-strategy": {"A": {"status": "Y", "id": {"ids": [1]}}}}"#,
        ));
        let p = Preview::new(1, 1, cand, &live, &Default::default());
        let mut metrics = Metrics::default();
        metrics.preview(Some(1));
        let mut verdicts = Verdicts::default();
        let headers = vec![("x-tenant-id".to_string(), b"2".to_vec())];
        let request = Request::new(&headers, None, 0, || at(1));
        let (d, _) = decide_request(&live, &Health::UNKNOWN, &request, &mut verdicts);
        preview_request(&live, &d, &p, &request, &mut verdicts, &mut metrics);
        let pair = &metrics.worker_counts(1, 1).preview.unwrap().pairs[0];
        assert_eq!(
            (
                pair.from.as_deref(),
                pair.to.as_deref(),
                pair.tenants.count()
            ),
            (Some("B"), None, 1)
        );
    }

    #[test]
    fn the_preview_sample_is_one_in_every_and_apart_from_latency_timing() {
        let draws: Vec<u64> = (0..80_000u64)
            .map(|i| mix64(i.wrapping_mul(0x9e37)))
            .collect();
        for every in [0, 1] {
            assert!(
                draws.iter().all(|d| sampled(*d, every)),
                "every {every}: all"
            );
        }
        let near = |got: usize, want: f64| (got as f64 - want).abs() / want < 0.05;
        for every in [2u32, 4, 10] {
            let n = draws.iter().filter(|d| sampled(**d, every)).count();
            assert!(near(n, 80_000.0 / f64::from(every)), "every {every}: {n}");
            // Among the requests timed for latency, the same share is sampled.
            let timed: Vec<_> = draws
                .iter()
                .filter(|d| (**d >> 32) % LATENCY_SAMPLE == 0)
                .collect();
            let both = timed.iter().filter(|d| sampled(***d, every)).count();
            let want = timed.len() as f64 / f64::from(every);
            assert!((both as f64 - want).abs() / want < 0.1, "{every}: {both}");
        }
    }

    #[test]
    fn the_candidate_reads_headers_the_live_strategy_does_not_each_fetched_once() {
        let live = gray_up_to(1);
        let cand = Rc::new(compile(
            r#"{"route-strategy": {"beta": {"status": "Y", "headers": [{"name": "x-beta", "exact": "1"}]},
                "B": {"status": "G", "id": {"all": true}}}}"#,
        ));
        let p = Preview::new(2, 1, cand, &live, &Default::default());
        assert!(p.headers.starts_with(live.needed_headers()));
        assert!(p.headers.iter().any(|h| h == "x-beta"));
        let mut metrics = Metrics::default();
        metrics.preview(Some(2));
        let mut verdicts = Verdicts::default();
        let fetched = RefCell::new(Vec::new());
        let fetch = |name: &str| {
            fetched.borrow_mut().push(name.to_string());
            match name {
                "x-tenant-id" => Some(b"7".to_vec()),
                "x-beta" => Some(b"1".to_vec()),
                _ => None,
            }
        };
        let headers = Lazy::new(&p.headers, fetch);
        let request = Request::new(&headers, None, 0, || at(1));
        let (d, _) = decide_request(&live, &Health::UNKNOWN, &request, &mut verdicts);
        preview_request(&live, &d, &p, &request, &mut verdicts, &mut metrics);
        let pairs = metrics.worker_counts(1, 1).preview.unwrap().pairs;
        assert_eq!(
            (
                pairs[0].from.as_deref(),
                pairs[0].to.as_deref(),
                &pairs[0].examples[..]
            ),
            (Some("B"), Some("beta"), &["7".to_string()][..])
        );
        let mut names = fetched.into_inner();
        names.sort();
        assert_eq!(names, ["x-beta", "x-tenant-id"], "each once");
    }
}
