//! TLS on the admin API, the feed and xDS (`tls` in graylane.yaml), with a CA, a server and a
//! client certificate made in the test (`graylane_e2e::pki`, rcgen): the CLI's client trusts the CA; plain HTTP and
//! untrusted clients are refused; with `client_ca`, the feed needs a client certificate while
//! the admin API keeps its tokens; xDS refuses a client without a certificate. Bad files are
//! errors at start that name the field.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use graylane_control_plane::client::Client;
use graylane_control_plane::serve::{self, Loaded};
use tokio_util::sync::CancellationToken;

struct Pki {
    ca_pem: String,
}

fn issue(dir: &Path) -> Pki {
    Pki {
        ca_pem: graylane_e2e::pki::issue(dir).unwrap(),
    }
}

const CONFIG: &str = "tokens:
  - {name: viewer, token: read-token-1, role: read}
data_dir: data
services:
  web:
    route-strategy:
      A: {status: Y, id: {ids: [1]}}
      B: {status: G, id: {all: true}}
";

async fn start(dir: &Path, tls: &str) -> (u16, u16, CancellationToken) {
    let path = dir.join("graylane.yaml");
    std::fs::write(&path, format!("{CONFIG}{tls}")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let xds = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (port, xds_port) = (
        listener.local_addr().unwrap().port(),
        xds.local_addr().unwrap().port(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(serve::run(
        listener,
        Some(xds),
        Loaded::read(&path).unwrap(),
        None,
        stop.clone(),
    ));
    (port, xds_port, stop)
}

#[tokio::test]
async fn the_api_and_the_feed_speak_tls_and_the_feed_can_require_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = issue(dir.path());
    let (port, xds_port, stop) = start(
        dir.path(),
        "tls: {cert: server.crt, key: server.key, client_ca: ca.crt}\n",
    )
    .await;
    let base = format!("https://127.0.0.1:{port}");

    // The CLI's client, trusting the test CA: the admin API answers with a token, no
    // client certificate needed.
    let client = Client::with_ca(
        &base,
        Some("read-token-1".into()),
        Some(pki.ca_pem.as_bytes()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        match client.status().await {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "no TLS answer: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(status.version, 1);
    assert_eq!(status.services[0].name, "web");

    // A client that does not trust the CA gives up at the handshake; plain HTTP gets nothing.
    let untrusting = Client::new(&base, Some("read-token-1".into())).unwrap();
    let err = untrusting.status().await.unwrap_err().to_string();
    assert!(err.starts_with("cannot reach https://127.0.0.1:"), "{err}");
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP must not be served on a TLS listener"
    );

    // The feed: refused without a client certificate, answered with one the CA signed.
    let ca = reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap();
    let feed = format!("{base}/v1/feed/web?wait_ms=0");
    let anonymous = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .build()
        .unwrap();
    let r = anonymous.get(&feed).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        body["message"],
        "a client certificate signed by tls.client_ca is required"
    );
    let mut identity = std::fs::read(dir.path().join("client.crt")).unwrap();
    identity.extend(std::fs::read(dir.path().join("client.key")).unwrap());
    let envoy = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .build()
        .unwrap();
    let r = envoy.get(&feed).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let reply: serde_json::Value = r.json().await.unwrap();
    assert_eq!(reply["strategy"]["route-strategy"]["B"]["status"], "G");
    // The admin API over the same connection kind: HTTP/2 by ALPN works too.
    let h2 = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.version()),
        (200, reqwest::Version::HTTP_2)
    );

    // xDS: a TLS handshake without a client certificate is refused; with one it completes.
    let xds = format!("https://127.0.0.1:{xds_port}/");
    let h2_anonymous = reqwest::Client::builder()
        .add_root_certificate(ca.clone())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    assert!(
        h2_anonymous.post(&xds).send().await.is_err(),
        "xDS answered a client without a certificate"
    );
    let h2_envoy = reqwest::Client::builder()
        .add_root_certificate(ca)
        .identity(reqwest::Identity::from_pem(&identity).unwrap())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2_envoy.post(&xds).send().await.unwrap();
    // gRPC answers unknown paths with a gRPC status, over a completed mTLS handshake.
    assert_eq!(r.status().as_u16(), 200, "{r:?}");
    assert!(r.headers().contains_key("grpc-status"), "{r:?}");
    stop.cancel();
}

#[tokio::test]
async fn bad_tls_files_stop_the_start_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    issue(dir.path());
    std::fs::write(dir.path().join("junk.pem"), "not a pem\n").unwrap();
    let cases = [
        ("tls: {cert: missing.crt, key: server.key}\n", "tls.cert ("),
        ("tls: {cert: junk.pem, key: server.key}\n", "tls.cert ("),
        ("tls: {cert: server.crt, key: junk.pem}\n", "tls.key ("),
        ("tls: {cert: server.crt, key: client.key}\n", "tls.key ("),
        (
            "tls: {cert: server.crt, key: server.key, client_ca: junk.pem}\n",
            "tls.client_ca (",
        ),
    ];
    for (tls, want) in cases {
        let path = dir.path().join("graylane.yaml");
        std::fs::write(&path, format!("{CONFIG}{tls}")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = serve::run(
            listener,
            None,
            Loaded::read(&path).unwrap(),
            None,
            CancellationToken::new(),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.starts_with(want), "{tls}: {err}");
        let key = std::fs::read_to_string(dir.path().join("server.key")).unwrap();
        assert!(
            !err.contains(key.lines().nth(1).unwrap()),
            "a key in the error"
        );
    }
}
