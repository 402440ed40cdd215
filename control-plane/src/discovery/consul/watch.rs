//! The Consul watch: one `/v1/health/service/<name>` blocking-query loop per service.
//!
//! The blocking-query contract (Consul docs, "Blocking Queries / Implementation Details"):
//! - the first query (and the first after a reset) carries no `index` and returns at once;
//! - the next ones carry `index=<X-Consul-Index>` and `wait`, and return when the index passes
//!   it or `wait` expires (plus up to wait/16 of server jitter): a return is no proof of change;
//! - an unchanged index means no change: nothing is sent;
//! - an index that goes backwards resets the loop to index 0;
//! - an index of 0 is never used to block (it would return at once, forever): it becomes 1;
//! - calls are rate-limited (token bucket) and errors back off exponentially with jitter.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::HeaderValue;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::health;
use super::{BackoffConfig, Config, Error, Mapping, RateLimit};
use crate::discovery::{send, Endpoint, Event, SourceKind, StaleTracker, SyncGate};

/// Watches every listed service until `shutdown`. `services` pairs the graylane service name
/// with its Consul mapping.
pub async fn run(
    cfg: Config,
    services: Vec<(String, Mapping)>,
    tx: mpsc::Sender<Event>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(err) => {
            let _ = send(
                &tx,
                Event::Stale {
                    source: SourceKind::Consul,
                    stale: true,
                    error: Some(format!("building the HTTP client: {err}")),
                },
            )
            .await;
            return;
        }
    };
    let cfg = Arc::new(cfg);
    let tracker = Arc::new(StaleTracker::new(SourceKind::Consul));
    let gate = Arc::new(SyncGate::new(SourceKind::Consul, services.len()));
    let tasks = tokio_util::task::TaskTracker::new();
    for (name, mapping) in services {
        let span = tracing::info_span!("consul_watch", service = %name);
        let watch = ServiceWatch {
            gate: gate.clone(),
            consul_name: mapping
                .service
                .as_ref()
                .map_or_else(|| name.clone(), ToString::to_string),
            service: name,
            mapping,
            cfg: cfg.clone(),
            client: client.clone(),
            tracker: tracker.clone(),
            tx: tx.clone(),
        };
        tasks.spawn(watch.run(shutdown.clone()).instrument(span));
    }
    tasks.close();
    tasks.wait().await;
}

struct ServiceWatch {
    gate: Arc<SyncGate>,
    service: String,
    consul_name: String,
    mapping: Mapping,
    cfg: Arc<Config>,
    client: reqwest::Client,
    tracker: Arc<StaleTracker>,
    tx: mpsc::Sender<Event>,
}

impl ServiceWatch {
    async fn run(self, shutdown: CancellationToken) {
        let mut index: u64 = 0;
        let mut last: Option<BTreeMap<String, Vec<Endpoint>>> = None;
        // The last answer's body: an identical one is not parsed again. With one global index
        // (older Consul) every change anywhere answers every service's blocking query, and
        // nearly all of those answers repeat the last one byte for byte.
        let mut last_body: Option<bytes::Bytes> = None;
        let mut bucket = TokenBucket::new(&self.cfg.rate, Instant::now());
        let mut backoff = Backoff::new(&self.cfg.backoff);
        loop {
            let delay = bucket.acquire(Instant::now());
            if !delay.is_zero() && !sleep_or_cancel(delay, &shutdown).await {
                return;
            }
            let result = tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.tx.closed() => return,
                r = self.fetch(index) => r,
            };
            let (raw_index, body) = match result {
                Ok(r) => r,
                Err(err) => {
                    if !self.failed(&err, &mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if let Some(ev) = self.tracker.ok(&self.service) {
                if !send(&self.tx, ev).await {
                    return;
                }
            }
            // Index 0 is a server bug; blocking on it would return at once, forever.
            let new_index = raw_index.max(1);
            if index != 0 && new_index == index {
                debug!(index, "unchanged index");
                continue;
            }
            let next = if new_index < index {
                info!(
                    old = index,
                    new = new_index,
                    "X-Consul-Index went backwards: reset"
                );
                0
            } else {
                new_index
            };
            if last.is_some() && last_body.as_ref() == Some(&body) {
                index = next;
                continue;
            }
            let entries = match health::parse(&body) {
                Ok(e) => e,
                Err(e) => {
                    if !self.failed(&Error::Body(e), &mut backoff, &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            let groups = health::group(&self.mapping, &entries);
            for (cluster, endpoints) in &groups {
                let changed = last.as_ref().and_then(|l| l.get(cluster)) != Some(endpoints);
                if changed {
                    debug!(%cluster, count = endpoints.len(), "endpoints changed");
                    let ev = Event::Endpoints {
                        source: SourceKind::Consul,
                        service: self.service.clone(),
                        cluster: cluster.clone(),
                        endpoints: endpoints.clone(),
                    };
                    if !send(&self.tx, ev).await {
                        return;
                    }
                }
            }
            if last.is_none() && !self.gate.part_done(&self.tx).await {
                return;
            }
            last = Some(groups);
            last_body = Some(body);
            index = next;
        }
    }

    /// A failed call or an unreadable answer: reported (stale), then a backoff; `false` when
    /// the watch must stop.
    async fn failed(
        &self,
        err: &Error,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = backoff.next(jitter01());
        warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "consul query failed");
        if let Some(ev) = self.tracker.fail(&self.service, err.to_string()) {
            if !send(&self.tx, ev).await {
                return false;
            }
        }
        sleep_or_cancel(delay, shutdown).await
    }

    /// One `/v1/health/service` call: blocking when `index > 0`. The index and the body.
    async fn fetch(&self, index: u64) -> Result<(u64, bytes::Bytes), Error> {
        let base = self.cfg.address.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}/v1/health/service/"))
            .map_err(|e| Error::Address(e.to_string()))?;
        url.path_segments_mut()
            .map_err(|()| Error::Address("not a base URL".into()))?
            .pop_if_empty()
            .push(&self.consul_name);
        let wait = self.cfg.wait.0.min(Duration::from_secs(600));
        {
            let mut q = url.query_pairs_mut();
            if index > 0 {
                q.append_pair("index", &index.to_string());
                q.append_pair("wait", &format!("{}ms", wait.as_millis()));
            }
            if let Some(dc) = &self.cfg.datacenter {
                q.append_pair("dc", dc);
            }
            if self.cfg.stale {
                q.append_key_only("stale");
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        // Consul may hold the call for wait + wait/16; give it a margin beyond that.
        let timeout = wait + wait / 16 + Duration::from_secs(5);
        let mut req = self.client.get(url).timeout(timeout);
        if let Some(token) = &self.cfg.token {
            let mut v = HeaderValue::from_str(token).map_err(|_| Error::Token)?;
            v.set_sensitive(true);
            req = req.header("X-Consul-Token", v);
        }
        let resp = req.send().await.map_err(Error::Http)?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let mut body = body.trim().to_owned();
            if body.len() > 512 {
                let cut = (0..=512)
                    .rev()
                    .find(|&i| body.is_char_boundary(i))
                    .unwrap_or(0);
                body.truncate(cut);
            }
            return Err(Error::Status {
                status: status.as_u16(),
                body,
            });
        }
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or(Error::Index)?;
        let bytes = resp.bytes().await.map_err(Error::Http)?;
        Ok((new_index, bytes))
    }
}

/// Sleeps `d`; `false` if shutdown came first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

/// A token bucket on tokio's clock. `acquire` reserves a token and says how long to wait.
#[derive(Debug)]
struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: &RateLimit, now: Instant) -> Self {
        let burst = f64::from(rate.burst.max(1));
        TokenBucket {
            per_second: rate.per_second.max(0.001),
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn acquire(&mut self, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }
}

/// Exponential backoff with equal jitter.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    fn new(cfg: &BackoffConfig) -> Self {
        Backoff {
            initial: cfg.initial.0,
            max: cfg.max.0.max(cfg.initial.0),
            attempt: 0,
        }
    }

    /// The next delay; `r` is a uniform draw in [0, 1).
    fn next(&mut self, r: f64) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        let base = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base / 2 + base.mul_f64(r.clamp(0.0, 1.0) / 2.0)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Cheap randomness for backoff jitter (no extra dependency): a fresh `RandomState` hash.
fn jitter01() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::discovery::HumanDuration;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            &RateLimit {
                per_second: 10.0,
                burst: 2,
            },
            t0,
        );
        assert_eq!(b.acquire(t0), Duration::ZERO);
        assert_eq!(b.acquire(t0), Duration::ZERO);
        let d = b.acquire(t0);
        assert!((d.as_secs_f64() - 0.1).abs() < 1e-9, "{d:?}");
        // Reserved: the next caller waits behind it.
        let d = b.acquire(t0);
        assert!((d.as_secs_f64() - 0.2).abs() < 1e-9, "{d:?}");
        // Refills over time, never above the burst.
        let d = b.acquire(t0 + Duration::from_secs(10));
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let mut b = Backoff::new(&BackoffConfig {
            initial: HumanDuration(Duration::from_millis(100)),
            max: HumanDuration(Duration::from_millis(1000)),
        });
        assert_eq!(b.next(0.0), Duration::from_millis(50));
        let d = b.next(0.999_999);
        assert!(
            d > Duration::from_millis(199) && d <= Duration::from_millis(200),
            "{d:?}"
        );
        assert_eq!(b.next(0.5), Duration::from_millis(300));
        for _ in 0..40 {
            assert!(b.next(0.999) <= Duration::from_millis(1000));
        }
        b.reset();
        assert_eq!(b.next(0.0), Duration::from_millis(50));
    }

    #[test]
    fn jitter_is_in_unit_interval() {
        for _ in 0..100 {
            let j = jitter01();
            assert!((0.0..1.0).contains(&j));
        }
    }

    /// The loop's waits on tokio's clock: with time paused, the bucket's delays are exact.
    #[tokio::test(start_paused = true)]
    async fn rate_limited_calls_wait_on_tokio_time() {
        let shutdown = CancellationToken::new();
        let mut bucket = TokenBucket::new(
            &RateLimit {
                per_second: 20.0,
                burst: 2,
            },
            Instant::now(),
        );
        let t0 = Instant::now();
        for _ in 0..12 {
            let d = bucket.acquire(Instant::now());
            assert!(sleep_or_cancel(d, &shutdown).await);
        }
        // Two from the burst, then one per 50 ms (the timer wheel rounds to milliseconds).
        let took = t0.elapsed().as_millis();
        assert!((495..=510).contains(&took), "{took} ms");
        shutdown.cancel();
        assert!(!sleep_or_cancel(Duration::from_secs(3600), &shutdown).await);
    }
}
