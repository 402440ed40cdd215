//! The HTTP context: extract -> decide -> apply. One host call reads the headers, one or
//! two write the route and lane headers, two count.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

use std::cell::OnceCell;

use graylane_strategy::{decide, Headers, Reason, RequestView};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, MapType};

use crate::root::Shared;

/// The lane header when no strategy (which may rename it) is known yet.
const DEFAULT_LANE_HEADER: &str = "x-graylane-lane";

pub struct Http {
    shared: Rc<RefCell<Shared>>,
    /// `<cluster>;<reason>` for the optional response header.
    reason: Option<(String, String)>,
}

impl Http {
    pub fn new(shared: Rc<RefCell<Shared>>) -> Http {
        Http {
            shared,
            reason: None,
        }
    }
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
        let now = if c.needs_clock() {
            hostcalls::get_current_time()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs())
        } else {
            0
        };
        let req = RequestView {
            headers: &headers,
            tenant: None,
            own_lane: s.own_lane,
            now,
            draw,
        };
        let d = decide(c, &active.health, &req);
        let target = d.target(c);
        s.metrics.decision(d.cluster, &d.reason);
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
}
