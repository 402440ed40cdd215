//! TLS for the admin API, the feed and the xDS server (rustls).
//!
//! `tls` in `graylane.yaml` names PEM files (relative to the config file), read once at start:
//! the server's certificate chain and private key, and optionally `client_ca`, the CAs whose
//! client certificates are accepted. With `client_ca`:
//! - xDS requires a client certificate from every Envoy (mutual TLS);
//! - on `listen`, the handshake asks for a client certificate without requiring one, and the
//!   data plane's routes (the feed, traffic reports) refuse a connection that did not
//!   present a valid one (`401`); the admin API keeps its bearer tokens, so the CLI needs no
//!   client certificate, and the plugin's .wasm stays downloadable as without TLS (Istio's
//!   agent fetches it without a client certificate; its sha256 is what makes it safe).
//!
//! The HTTP listener runs its own accept loop (axum's `serve` has no TLS): each connection's
//! handshake has a deadline, and whether it presented a client certificate travels to the
//! handlers as a request extension ([`ClientCert`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// `tls` in `graylane.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PEM: the server's certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, PKCS#1 or SEC1). Read once; never logged.
    pub key: PathBuf,
    /// PEM: CAs whose client certificates are accepted (xDS requires one; the feed too).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// Why TLS cannot start: the field and file at fault.
#[derive(Debug, thiserror::Error)]
#[error("tls.{field} ({}): {message}", .path.display())]
pub struct Error {
    pub field: &'static str,
    pub path: PathBuf,
    pub message: String,
}

/// What a connection to the HTTP listener presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCert {
    /// Whether client certificates are required for the data plane's routes.
    pub required: bool,
    /// Whether this connection presented one that verified against `client_ca`.
    pub presented: bool,
}

/// The PEM material, read and checked.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// For the HTTP listener (ALPN h2 and http/1.1; client certificates optional).
    pub http: Arc<ServerConfig>,
    /// For xDS, as tonic takes it: certificate chain and key PEM, client CA PEM.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error {
        field,
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })
}

fn certs(
    field: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |message: String| Error {
        field,
        path: path.to_path_buf(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// The crypto provider: ring, as kube's rustls uses it (set once per process).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Loaded {
    /// Reads `cfg`'s files (relative to `base`, the config file's directory) and checks that
    /// the key matches the certificate.
    pub fn load(cfg: &Config, base: &Path) -> Result<Loaded, Error> {
        let at = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let (cert_path, key_path) = (at(&cfg.cert), at(&cfg.key));
        let cert_pem = read("cert", &cert_path)?;
        let chain = certs("cert", &cert_path, &cert_pem)?;
        let key_pem = read("key", &key_path)?;
        // The key's bytes never reach an error message.
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| Error {
            field: "key",
            path: key_path.clone(),
            message: "no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file".into(),
        })?;
        let (verifier, client_ca_pem) = match &cfg.client_ca {
            Some(p) => {
                let path = at(p);
                let pem = read("client_ca", &path)?;
                let mut roots = RootCertStore::empty();
                for c in certs("client_ca", &path, &pem)? {
                    roots.add(c).map_err(|e| Error {
                        field: "client_ca",
                        path: path.clone(),
                        message: format!("not a usable CA certificate: {e}"),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| Error {
                            field: "client_ca",
                            path: path.clone(),
                            message: e.to_string(),
                        })?;
                (Some(verifier), Some(pem))
            }
            None => (None, None),
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error {
                field: "cert",
                path: cert_path.clone(),
                message: e.to_string(),
            })?;
        let builder = match verifier {
            Some(v) => builder.with_client_cert_verifier(v),
            None => builder.with_no_client_auth(),
        };
        let mut http = builder.with_single_cert(chain, key).map_err(|e| Error {
            field: "key",
            path: key_path,
            message: format!("does not fit the certificate: {e}"),
        })?;
        http.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Loaded {
            http: Arc::new(http),
            cert_pem,
            key_pem,
            client_ca_pem,
        })
    }

    /// Whether the data plane's routes require a client certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// tonic's TLS settings for the xDS server: client certificates required with `client_ca`.
    pub fn xds(&self) -> tonic::transport::ServerTlsConfig {
        let identity = tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem);
        let tls = tonic::transport::ServerTlsConfig::new().identity(identity);
        match &self.client_ca_pem {
            Some(ca) => tls.client_ca_root(tonic::transport::Certificate::from_pem(ca)),
            None => tls,
        }
    }
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves `app` over TLS on `listener` until `shutdown`; connections in flight then finish
/// their requests (graceful shutdown, as `axum::serve`'s).
pub async fn serve(
    listener: TcpListener,
    tls: &Loaded,
    app: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls.http.clone());
    let required = tls.requires_client_cert();
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, as hyper does.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, app, stop) = (acceptor.clone(), app.clone(), shutdown.clone());
        connections.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let presented = stream
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let app = app
                .layer(Extension(ClientCert {
                    required,
                    presented,
                }))
                .layer(Extension(ConnectInfo::<SocketAddr>(peer)));
            let service = TowerToHyperService::new(app);
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                },
                () = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}
