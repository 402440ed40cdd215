//! A pooled HTTP/1.1 client (keep-alive, so 10,000 requests take a second or two) with
//! blocking helpers for tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::runtime::runtime;

/// Response headers, lowercase names; repeated headers joined with `, `.
pub type Headers = BTreeMap<String, String>;

/// Status, body (lossy UTF-8) and headers of one response.
pub type Reply = (u16, String, Headers);

/// One request for [`get_all`]: a path (with query) and extra headers.
#[derive(Debug, Clone, Default)]
pub struct Req {
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Req {
    pub fn new(path: impl Into<String>) -> Req {
        Req {
            path: path.into(),
            headers: Vec::new(),
        }
    }

    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// How many requests [`get_all`] keeps in flight (one pooled connection each).
const IN_FLIGHT: usize = 8;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

pub(crate) fn client() -> &'static Client<HttpConnector, Empty<Bytes>> {
    static CLIENT: OnceLock<Client<HttpConnector, Empty<Bytes>>> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(64)
            .build(connector)
    })
}

/// GET `url` (absolute, `http://host:port/path?query`) with `headers`; async.
pub async fn fetch<K: AsRef<str>, V: AsRef<str>>(
    url: &str,
    headers: &[(K, V)],
) -> anyhow::Result<Reply> {
    let mut builder = hyper::Request::get(url);
    for (k, v) in headers {
        builder = builder.header(k.as_ref(), v.as_ref());
    }
    let request = builder.body(Empty::<Bytes>::new())?;
    let response = tokio::time::timeout(REQUEST_TIMEOUT, client().request(request))
        .await
        .map_err(|_| anyhow::anyhow!("GET {url}: no response within {REQUEST_TIMEOUT:?}"))?
        .map_err(|e| anyhow::anyhow!("GET {url}: {e:?}"))?;
    let status = response.status().as_u16();
    let mut out = Headers::new();
    for (name, value) in response.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        out.entry(name.as_str().to_owned())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), out))
}

fn url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

/// GET `http://127.0.0.1:{port}{path}` with `headers`; panics on a transport error.
/// Blocking: call it from a plain `#[test]`, not from inside a tokio runtime.
pub fn get(port: u16, path: &str, headers: &[(&str, &str)]) -> Reply {
    let url = url(port, path);
    runtime()
        .block_on(fetch(&url, headers))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Sends all `requests` to `port`, [`IN_FLIGHT`] at a time over kept-alive connections, and
/// returns the replies in request order. Panics on a transport error.
pub fn get_all(port: u16, requests: Vec<Req>) -> Vec<Reply> {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    runtime().block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..IN_FLIGHT.min(requests.len()) {
            let (requests, next) = (requests.clone(), next.clone());
            workers.spawn(async move {
                let mut done = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(req) = requests.get(i) else {
                        return Ok::<_, anyhow::Error>(done);
                    };
                    done.push((i, fetch(&url(port, &req.path), &req.headers).await?));
                }
            });
        }
        let mut replies: Vec<Option<Reply>> = vec![None; requests.len()];
        while let Some(joined) = workers.join_next().await {
            let done = joined
                .expect("request worker panicked")
                .unwrap_or_else(|e| panic!("{e:#}"));
            for (i, reply) in done {
                replies[i] = Some(reply);
            }
        }
        replies
            .into_iter()
            .map(|r| r.expect("every request got a reply"))
            .collect()
    })
}

/// Counts replies by body. A non-200 reply counts under `"HTTP <status>: <body>"`, so an
/// exact-count assertion shows what went wrong.
pub fn count_replies(replies: &[Reply]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (status, body, _) in replies {
        let key = if *status == 200 {
            body.clone()
        } else {
            format!("HTTP {status}: {}", body.trim_end())
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// Sends `n` identical requests and counts the replies by body (the upstream's name).
pub fn count_by_body(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    n: usize,
) -> HashMap<String, usize> {
    count_by_body_with(port, n, |_| {
        let mut req = Req::new(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req
    })
}

/// Sends `n` requests, the i-th built by `make(i)` (e.g. tenant `i`), and counts by body.
pub fn count_by_body_with(
    port: u16,
    n: usize,
    make: impl FnMut(usize) -> Req,
) -> HashMap<String, usize> {
    let requests: Vec<Req> = (0..n).map(make).collect();
    count_replies(&get_all(port, requests))
}
