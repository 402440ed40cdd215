//! Real upstream HTTP servers that say which version answered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::client::fetch;
use crate::runtime::runtime;

/// An HTTP/1.1 server on loopback. Every request is answered `200` with body = its name and
/// header `x-upstream: <name>`, except `GET /echo`, answered with the request headers it
/// received as a JSON object (to assert what Envoy and the filter set, e.g. `x-graylane-lane`).
///
/// A forwarding upstream ([`Upstream::start_forwarding`]) instead calls the next service
/// with the same path and the incoming headers, and answers `<name>-><next body>`: a chain
/// A -> B reads `A-gray->B-prod`.
///
/// Stops (closing its connections) when dropped.
pub struct Upstream {
    name: String,
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

struct Service {
    name: String,
    next: Option<String>,
    /// The `host` the next hop is called with (else the URL's).
    next_host: Option<String>,
    hits: Arc<AtomicU64>,
}

impl Upstream {
    /// Starts an upstream named `name` on `127.0.0.1:0`.
    pub fn start(name: &str) -> Upstream {
        Self::serve(name, SocketAddr::from(([127, 0, 0, 1], 0)), None, None)
            .unwrap_or_else(|e| panic!("starting upstream {name}: {e:#}"))
    }

    /// Starts an upstream that forwards each request to `next_url` (`http://127.0.0.1:PORT`,
    /// typically the next service's Envoy listener) with all incoming headers (cookie,
    /// `x-tenant-id`, `x-graylane-lane`, ...) except hop-by-hop ones, `host` and Envoy's
    /// internal `x-envoy-*`, and answers `<name>-><next body>`.
    pub fn start_forwarding(name: &str, next_url: &str) -> Upstream {
        let next = next_url.trim_end_matches('/').to_owned();
        Self::serve(
            name,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(next),
            None,
        )
        .unwrap_or_else(|e| panic!("starting upstream {name}: {e:#}"))
    }

    /// As [`Upstream::start_forwarding`], calling the next service by name: `host` (e.g. `b`
    /// or `b.prod.svc.cluster.local:8080`, as an application in a mesh calls through its
    /// sidecar) instead of the URL's address.
    pub fn start_calling(name: &str, next_url: &str, host: &str) -> Upstream {
        let next = next_url.trim_end_matches('/').to_owned();
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        Self::serve(name, addr, Some(next), Some(host.to_owned()))
            .unwrap_or_else(|e| panic!("starting upstream {name}: {e:#}"))
    }

    /// Starts an upstream on a fixed address (the demo's backends).
    pub fn start_at(name: &str, addr: SocketAddr) -> anyhow::Result<Upstream> {
        Self::serve(name, addr, None, None)
    }

    fn serve(
        name: &str,
        addr: SocketAddr,
        next: Option<String>,
        next_host: Option<String>,
    ) -> anyhow::Result<Upstream> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let service = Arc::new(Service {
            name: name.to_owned(),
            next,
            next_host,
            hits: hits.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let listener = {
            let _guard = runtime().enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        runtime().spawn(accept_loop(listener, service, stopped));
        Ok(Upstream {
            name: name.to_owned(),
            addr,
            hits,
            stop,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far (an R cluster must stay at 0).
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let handler = service_fn(move |req| handle(service.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), handler);
            tokio::select! {
                _ = conn => {}
                _ = stopped.changed() => {}
            }
        });
    }
}

/// Not forwarded to the next hop: hop-by-hop headers, the ones the client recomputes, and
/// Envoy's internal `x-envoy-*` (an application would not pass those on either).
fn forwardable(name: &str) -> bool {
    !matches!(
        name,
        "host"
            | "content-length"
            | "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "proxy-connection"
    ) && !name.starts_with("x-envoy-")
}

/// Paths with a behaviour: `/status/<code>` answers that status; `/reset` closes the
/// connection without an answer (Envoy then replies 503 itself: "no response").
async fn handle(
    service: Arc<Service>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    service.hits.fetch_add(1, Ordering::Relaxed);
    if req.uri().path() == "/reset" {
        return Err(std::io::Error::other("reset on request"));
    }
    if let Some(code) = req.uri().path().strip_prefix("/status/") {
        let status = code.parse::<u16>().unwrap_or(500);
        let response = Response::builder()
            .status(status)
            .header("x-upstream", service.name.as_str())
            .body(Full::new(Bytes::from(service.name.clone())));
        return Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))));
    }
    let (status, content_type, body) = match &service.next {
        Some(next) => {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut headers: Vec<(String, String)> = req
                .headers()
                .iter()
                .filter(|(k, _)| forwardable(k.as_str()))
                .map(|(k, v)| {
                    let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                    (k.as_str().to_owned(), v)
                })
                .collect();
            if let Some(host) = &service.next_host {
                headers.push(("host".to_owned(), host.clone()));
            }
            match fetch(&format!("{next}{path}"), &headers).await {
                Ok((200, body, _)) => (200, "text/plain", format!("{}->{body}", service.name)),
                Ok((status, body, _)) => (
                    502,
                    "text/plain",
                    format!("{}->HTTP {status}: {body}", service.name),
                ),
                Err(e) => (502, "text/plain", format!("{}->error: {e:#}", service.name)),
            }
        }
        None if req.uri().path() == "/echo" => {
            let mut map = serde_json::Map::new();
            for (k, v) in req.headers() {
                let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
                match map.get_mut(k.as_str()) {
                    Some(serde_json::Value::String(s)) => {
                        s.push_str(", ");
                        s.push_str(&v);
                    }
                    _ => {
                        map.insert(k.as_str().to_owned(), serde_json::Value::String(v));
                    }
                }
            }
            let json = serde_json::Value::Object(map).to_string();
            (200, "application/json", json)
        }
        None => (200, "text/plain", service.name.clone()),
    };
    let response = Response::builder()
        .status(status)
        .header("x-upstream", service.name.as_str())
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)));
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"bad header")))))
}
