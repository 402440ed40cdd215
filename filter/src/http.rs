//! The HTTP context: extract -> decide -> apply. Host calls per request: the headers the
//! strategy reads (each fetched on first use), one or two writes (the route and lane
//! headers), and with traffic reports on, the response's `:status` (plus two clock reads on the
//! one request in 8 that is timed, and `response.code_details` for error statuses). Counting
//! itself stays in the VM.

use std::cell::OnceCell;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use graylane_strategy::{
    decide_with, Compiled, Decision, Headers, Health, Lane, Reason, RequestView,
};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType, Status};

use crate::root::Shared;
use crate::verdicts::{Cached, Verdicts};

/// One request in this many is timed for the latency histogram.
const LATENCY_SAMPLE: u64 = 8;

/// The lane header when no strategy (which may rename it) is known yet.
const DEFAULT_LANE_HEADER: &str = "x-graylane-lane";

pub struct Http {
    shared: Rc<RefCell<Shared>>,
    /// `<cluster>;<reason>` for the optional response header.
    reason: Option<(String, String)>,
    /// With traffic reports on: where this request is counted, when it was routed (µs), and
    /// the response's status and time once its headers arrive.
    counted: Option<(usize, Option<u64>)>,
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
    let t = hostcalls::get_current_time().ok()?;
    u64::try_from(t.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()
}

/// The response's status, read from its headers.
fn response_status() -> Option<u16> {
    let v = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status").ok()??;
    std::str::from_utf8(&v).ok()?.parse().ok()
}

/// Whether the response came from the upstream, not from Envoy itself (a local reply: the
/// upstream reset, refused the connection, timed out, had no healthy endpoint). Asked only for
/// error statuses: Envoy's `response.code_details` is `via_upstream` for upstream answers.
fn via_upstream() -> bool {
    hostcalls::get_property(vec!["response", "code_details"])
        .ok()
        .flatten()
        .is_some_and(|d| d == b"via_upstream")
}

impl Context for Http {}

/// Request headers fetched from Envoy on first use, one small host call each, instead of
/// serialising every header of the request up front.
struct Lazy<'n> {
    names: &'n [String],
    values: Vec<OnceCell<Option<Vec<u8>>>>,
}

impl<'n> Lazy<'n> {
    fn new(names: &'n [String]) -> Lazy<'n> {
        Lazy {
            names,
            values: names.iter().map(|_| OnceCell::new()).collect(),
        }
    }
}

impl Headers for Lazy<'_> {
    fn get(&self, name: &str) -> Option<&[u8]> {
        let i = self.names.iter().position(|n| n == name)?;
        self.values
            .get(i)?
            .get_or_init(|| {
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, name)
                    .ok()
                    .flatten()
            })
            .as_deref()
    }
}

fn set(name: &str, value: Option<&[u8]>) -> bool {
    hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value).is_ok()
}

/// Unix seconds from the host's clock; `None` when the host cannot tell (an error, or a time
/// before 1970), and then no expiring cookie is honoured. (It used to become 0, before every
/// expiry, so expired cookies passed.)
fn unix_seconds(clock: Result<SystemTime, Status>) -> Option<u64> {
    Some(clock.ok()?.duration_since(UNIX_EPOCH).ok()?.as_secs())
}

/// One request's facts -> decide, with signed cookies checked through the VM's `verdicts`;
/// the clock is asked only when the strategy needs it. Host-free (the host's answers are
/// arguments), so it is unit-tested natively.
fn decide_request(
    c: &Compiled,
    health: &Health,
    headers: &dyn Headers,
    own_lane: Option<Lane>,
    draw: u64,
    clock: impl FnOnce() -> Result<SystemTime, Status>,
    verdicts: &mut Verdicts,
) -> (Decision, Checked) {
    let now = if c.needs_clock() {
        unix_seconds(clock())
    } else {
        None
    };
    let req = RequestView {
        headers,
        tenant: None,
        own_lane,
        now,
        draw,
    };
    let cached = Cached::new(verdicts);
    let d = decide_with(c, health, &req, &cached);
    let checked = Checked {
        verified: cached.verified.get(),
        remembered: cached.remembered.get(),
        no_clock: c.needs_clock() && now.is_none(),
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

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Ok(mut s) = self.shared.try_borrow_mut() else {
            return Action::Continue;
        };
        let s = &mut *s;
        let draw = s.draw();
        let Some(active) = &s.active else {
            // No strategy yet: never let a client-sent routing header choose the cluster
            // or the lane.
            set(&s.route_header, None);
            set(DEFAULT_LANE_HEADER, None);
            s.metrics.event("no_snapshot");
            return Action::Continue;
        };
        let c = &*active.compiled;
        // Only the headers this strategy reads, each fetched the first time `decide` asks
        // (a tenant found in its header never costs a cookie lookup).
        let headers = Lazy::new(c.needed_headers());
        let (d, checked) = decide_request(
            c,
            &active.health,
            &headers,
            s.own_lane,
            draw,
            hostcalls::get_current_time,
            &mut s.verdicts,
        );
        let target = d.target(c);
        let at = s.metrics.decision(d.cluster, &d.reason);
        if s.reporting {
            // Latency is timed on one request in LATENCY_SAMPLE (two clock reads saved on the
            // others; the histogram's quantiles stay those of the traffic).
            let timed = (draw >> 32) % LATENCY_SAMPLE == 0;
            self.counted = at.map(|at| (at, if timed { now_micros() } else { None }));
        }
        for _ in 0..checked.verified {
            s.metrics.event("cookie_verified");
        }
        for _ in 0..checked.remembered {
            s.metrics.event("cookie_remembered");
        }
        if checked.no_clock {
            s.metrics.event("no_clock");
        }
        if d.fallback.is_some() {
            s.metrics.event("fallback_unhealthy");
        }
        if s.debug {
            let _ = hostcalls::log(
                LogLevel::Debug,
                &format!("graylane {}: {}", s.service, d.detail(c)),
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
                    s.metrics.event("host_error");
                }
                Action::Continue
            }
            None => {
                debug_assert_eq!(d.reason, Reason::NoCluster);
                let _ = hostcalls::send_http_response(
                    503,
                    vec![("x-graylane-reason", "no_cluster")],
                    Some(b"graylane: no cluster can serve this request\n"),
                );
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let (Some((_, routed)), None) = (self.counted, self.response) {
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
                let _ = hostcalls::set_map_value_bytes(
                    MapType::HttpResponseHeaders,
                    &name,
                    Some(value.as_bytes()),
                );
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some((at, routed)) = self.counted.take() else {
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
        if let Ok(mut s) = self.shared.try_borrow_mut() {
            s.metrics.finished(at, status, micros);
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
        let (d, checked) =
            decide_request(c, &Health::UNKNOWN, &headers, None, 0, || clock, verdicts);
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
}
