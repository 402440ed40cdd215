//! Traffic reports to the control plane. Every worker publishes its own cumulative counts in
//! shared data when they moved (on its tick, never on the request path); the worker holding
//! the feed's poll lease gathers every worker's latest counts and sends them as one report, at
//! most every `report_ms`. Counts are cumulative with a sequence number per worker, so a report
//! that fails is made up by the next one and the control plane never counts anything twice.
//!
//! Shared data, per service (one `vm_id`, every worker sees the same keys):
//! - `graylane/<service>/traffic/workers`: the workers that published, JSON `[id, ...]` (CAS)
//! - `graylane/<service>/traffic/<worker>`: that worker's `WorkerCounts` as JSON
//!
//! Like the follower, no host call is made here directly (`follower::Host`).

use std::time::Duration;

use graylane_strategy::traffic::{report_path, WorkerCounts};

use crate::config::ControlPlane;
use crate::feed;
use crate::follower::Host;

/// At most this many workers are remembered per service (VMs come and go with configuration
/// reloads; the oldest entries leave first, their last counts already reported).
pub const MAX_WORKERS: usize = 64;

fn workers_key(service: &str) -> String {
    format!("graylane/{service}/traffic/workers")
}

fn counts_key(service: &str, worker: u64) -> String {
    format!("graylane/{service}/traffic/{worker}")
}

/// One worker's reporter.
#[derive(Debug)]
pub struct Reporter {
    service: String,
    /// The Envoy node id, as the control plane lists it.
    node: String,
    me: u64,
    every_ms: u64,
    seq: u64,
    /// `Metrics::activity` at the last publication (a worker that counted nothing publishes
    /// nothing: Envoy's main-thread VM, a VM about to be replaced).
    published: u64,
    next_send_ms: u64,
    in_flight: Option<(u32, u64)>,
}

impl Reporter {
    /// `None` when reports are off (`report_ms: 0`).
    pub fn new(service: &str, node: String, me: u64, cp: &ControlPlane) -> Option<Reporter> {
        (cp.report_ms > 0).then(|| Reporter {
            service: service.to_string(),
            node,
            me,
            every_ms: cp.report_ms,
            seq: 0,
            published: 0,
            next_send_ms: 0,
            in_flight: None,
        })
    }

    /// Publishes this worker's counts if they moved; `counts` builds them (with the next
    /// sequence number) only then.
    pub fn publish(
        &mut self,
        host: &impl Host,
        activity: u64,
        counts: impl FnOnce(u64, u64) -> WorkerCounts,
    ) {
        if activity == 0 {
            return; // nothing counted yet: not even registered
        }
        // Checked every tick, not only before a publication: counts published while absent
        // from the list would never be sent, and a racing first registration can remove this
        // worker after it checked (see `feed::ensure_listed`).
        let listed = feed::ensure_listed(host, &workers_key(&self.service), self.me, MAX_WORKERS);
        if !listed || self.published == activity {
            return;
        }
        let wc = counts(self.me, self.seq + 1);
        let Ok(json) = serde_json::to_vec(&wc) else {
            return;
        };
        if host.shared_set(&counts_key(&self.service, self.me), &json, None) {
            self.seq += 1;
            self.published = activity;
        }
    }

    /// On the tick of the worker holding the lease: sends every worker's latest counts, at
    /// most every `report_ms`, one report in flight at a time.
    pub fn send(&mut self, host: &impl Host, cp: &ControlPlane) {
        let Some(now) = host.now_ms() else {
            return;
        };
        if let Some((_, since)) = self.in_flight {
            // A call Envoy never answered (it always answers, with a timeout at worst).
            if now < since + self.timeout().as_millis() as u64 * 2 {
                return;
            }
            self.in_flight = None;
        }
        if now < self.next_send_ms {
            return;
        }
        self.next_send_ms = now + self.every_ms;
        let Some(body) = self.body(host) else {
            return;
        };
        let path = report_path(&self.service);
        let auth = cp.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = vec![
            (":method", "POST"),
            (":path", path.as_str()),
            (":authority", cp.authority.as_str()),
            ("content-type", "application/json"),
            ("x-graylane-node", self.node.as_str()),
        ];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        match host.dispatch(&cp.cluster, &headers, Some(&body), self.timeout()) {
            Ok(token) => self.in_flight = Some((token, now)),
            Err(e) => {
                host.event("report_failed");
                host.warn(&format!(
                    "graylane: traffic report not sent (the next one carries its counts): {e}"
                ));
            }
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.every_ms.clamp(1_000, 5_000))
    }

    /// The report: `{"node": .., "workers": [<each worker's published JSON>]}`, the workers'
    /// JSON copied as published (no parse).
    fn body(&self, host: &impl Host) -> Option<Vec<u8>> {
        let (list, _) = host.shared_get(&workers_key(&self.service))?;
        let list = feed::decode_list(Some(&list?));
        let node = serde_json::to_string(&self.node).ok()?;
        let mut out = format!("{{\"node\":{node},\"workers\":[").into_bytes();
        let mut any = false;
        for w in list {
            let Some((Some(json), _)) = host.shared_get(&counts_key(&self.service, w)) else {
                continue;
            };
            if any {
                out.push(b',');
            }
            out.extend_from_slice(&json);
            any = true;
        }
        out.extend_from_slice(b"]}");
        any.then_some(out)
    }

    /// The answer to a call; true if it was this reporter's.
    pub fn on_response(&mut self, host: &impl Host, token: u32, status: u16) -> bool {
        if self.in_flight.map(|(t, _)| t) != Some(token) {
            return false;
        }
        self.in_flight = None;
        if (200..300).contains(&status) {
            host.event("report_ok");
        } else {
            host.event("report_failed");
            host.warn(&format!(
                "graylane: traffic report answered {status} (the next one carries its counts)"
            ));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use graylane_strategy::traffic::{Counts, Report};
    use std::cell::{Cell, RefCell};

    #[derive(Default)]
    struct Envoy {
        data: crate::shared_fake::SharedData,
        sent: RefCell<Vec<(String, Vec<u8>)>>,
        events: RefCell<Vec<&'static str>>,
        now: Cell<u64>,
    }

    impl Host for Envoy {
        fn now_ms(&self) -> Option<u64> {
            Some(self.now.get())
        }
        fn shared_get(&self, key: &str) -> Option<(Option<Vec<u8>>, u32)> {
            self.data.get(key)
        }
        fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
            self.data.set(key, value, cas)
        }
        fn dispatch(
            &self,
            _: &str,
            headers: &[(&str, &str)],
            body: Option<&[u8]>,
            _: Duration,
        ) -> Result<u32, String> {
            let path = headers.iter().find(|(k, _)| *k == ":path").unwrap().1;
            let mut sent = self.sent.borrow_mut();
            sent.push((path.to_string(), body.unwrap_or_default().to_vec()));
            Ok(sent.len() as u32)
        }
        fn event(&self, name: &'static str) {
            self.events.borrow_mut().push(name);
        }
        fn warn(&self, _: &str) {}
    }

    fn cp() -> ControlPlane {
        serde_json::from_str(r#"{"cluster": "graylane_cp", "report_ms": 1000}"#).unwrap()
    }

    fn counts(requests: u64) -> impl FnOnce(u64, u64) -> WorkerCounts {
        move |worker, seq| {
            let mut c = Counts::default();
            for _ in 0..requests {
                c.request();
            }
            WorkerCounts {
                worker,
                seq,
                clusters: [("A".to_string(), c)].into(),
                reasons: Default::default(),
                preview: None,
            }
        }
    }

    #[test]
    fn the_holder_sends_every_workers_latest_counts() {
        let envoy = Envoy::default();
        let mut w1 = Reporter::new("web", "node-1".into(), 11, &cp()).unwrap();
        let mut w2 = Reporter::new("web", "node-1".into(), 22, &cp()).unwrap();
        w1.publish(&envoy, 1, counts(3));
        w2.publish(&envoy, 1, counts(5));
        // Nothing moved: nothing published (the sequence stays).
        w2.publish(&envoy, 1, counts(99));
        w1.send(&envoy, &cp());
        let sent = envoy.sent.borrow().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, "/v1/traffic/web");
        let report: Report = serde_json::from_slice(&sent[0].1).unwrap();
        assert_eq!(report.node, "node-1");
        let got: Vec<(u64, u64, u64)> = report
            .workers
            .iter()
            .map(|w| (w.worker, w.seq, w.clusters["A"].requests))
            .collect();
        assert_eq!(got, vec![(11, 1, 3), (22, 1, 5)]);

        // At most one report per report_ms, one in flight.
        envoy.now.set(500);
        w1.send(&envoy, &cp());
        envoy.now.set(1_000);
        w1.send(&envoy, &cp());
        assert_eq!(envoy.sent.borrow().len(), 1, "the first is still in flight");
        assert!(w1.on_response(&envoy, 1, 503));
        assert!(!w1.on_response(&envoy, 7, 200), "not its call");
        envoy.now.set(2_000);
        w2.publish(&envoy, 2, counts(8));
        w1.send(&envoy, &cp());
        let sent = envoy.sent.borrow().clone();
        assert_eq!(sent.len(), 2);
        // The failed report's counts are in the next one (cumulative).
        let report: Report = serde_json::from_slice(&sent[1].1).unwrap();
        let w2_counts = &report.workers[1];
        assert_eq!((w2_counts.seq, w2_counts.clusters["A"].requests), (2, 8));
        assert_eq!(*envoy.events.borrow(), vec!["report_failed"]);
    }

    #[test]
    fn a_worker_whose_registration_was_overwritten_adds_itself_again() {
        let envoy = Envoy::default();
        let mut w1 = Reporter::new("web", "n".into(), 11, &cp()).unwrap();
        let mut w2 = Reporter::new("web", "n".into(), 22, &cp()).unwrap();
        w1.publish(&envoy, 1, counts(1));
        // Worker 22 registered at the same time, unconditionally (no list existed yet): its
        // write replaced 11's.
        envoy.shared_set(&workers_key("web"), b"[22]", None);
        w2.publish(&envoy, 1, counts(2));
        w1.publish(&envoy, 2, counts(3));
        let (list, _) = envoy.shared_get(&workers_key("web")).unwrap();
        let list: Vec<u64> = serde_json::from_slice(&list.unwrap()).unwrap();
        assert_eq!(list, vec![22, 11]);
        w1.send(&envoy, &cp());
        let report: Report = serde_json::from_slice(&envoy.sent.borrow()[0].1).unwrap();
        let got: Vec<(u64, u64)> = report
            .workers
            .iter()
            .map(|w| (w.worker, w.clusters["A"].requests))
            .collect();
        assert_eq!(got, vec![(22, 2), (11, 3)]);
    }

    #[test]
    fn reports_can_be_turned_off_and_the_worker_list_is_bounded() {
        let off: ControlPlane =
            serde_json::from_str(r#"{"cluster": "graylane_cp", "report_ms": 0}"#).unwrap();
        assert!(Reporter::new("web", "n".into(), 1, &off).is_none());
        let envoy = Envoy::default();
        for me in 0..(MAX_WORKERS as u64 + 10) {
            let mut w = Reporter::new("web", "n".into(), me, &cp()).unwrap();
            w.publish(&envoy, 1, counts(1));
        }
        let (list, _) = envoy.shared_get(&workers_key("web")).unwrap();
        let list: Vec<u64> = serde_json::from_slice(&list.unwrap()).unwrap();
        assert_eq!(list.len(), MAX_WORKERS);
        assert_eq!(list[0], 10, "the oldest left first");
    }
}
