//! A typed client of the admin API: the CLI and the tests call the control plane through it,
//! with the request and response types the server itself uses (`api::types`).

use std::time::Duration;

use graylane_strategy::{State, StrategySpec};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::types::{
    Diff, ErrorBody, ExplainRequest, ExplainResponse, GrayCookie, GrayCookieRequest, History,
    Operations, PercentChange, Revert, ServiceDetail, ServiceList, StateChange, Status,
    WhitelistChange, Written,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{status}: {message}{}", field.as_ref().map(|f| format!(" (field {f})")).unwrap_or_default())]
    Api {
        status: u16,
        code: String,
        message: String,
        field: Option<String>,
    },
    #[error("{server} answered {status} with an unexpected body: {source}")]
    Decode {
        server: String,
        status: u16,
        #[source]
        source: serde_json::Error,
    },
}

/// The admin API of one control plane.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
    force: bool,
}

impl Client {
    /// `server` is the API's base URL (`http://127.0.0.1:9901`); `token` a bearer token.
    pub fn new(server: &str, token: Option<String>) -> Result<Client, Error> {
        Client::with_ca(server, token, None)
    }

    /// As [`Client::new`], trusting the CA certificates in `ca_pem` (PEM) for an `https://`
    /// server whose certificate no public CA signed (`tls` in graylane.yaml).
    pub fn with_ca(
        server: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Client, Error> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
        if let Some(pem) = ca_pem {
            let certs =
                reqwest::Certificate::from_pem_bundle(pem).map_err(|source| Error::Connect {
                    server: server.to_string(),
                    source,
                })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|source| Error::Connect {
            server: server.to_string(),
            source,
        })?;
        Ok(Client {
            http,
            server: server.trim_end_matches('/').to_string(),
            token,
            force: false,
        })
    }

    /// Writes accept a version that leaves a service no cluster able to take default traffic.
    #[must_use]
    pub fn forced(mut self, force: bool) -> Client {
        self.force = force;
        self
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, Error> {
        let force = self.force && method != Method::GET;
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = if force {
            format!("{}{path}{sep}force=true", self.server)
        } else {
            format!("{}{path}", self.server)
        };
        let mut req = self.http.request(method, url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let connect = |source| Error::Connect {
            server: self.server.clone(),
            source,
        };
        let resp = req.send().await.map_err(connect)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(connect)?;
        if status >= 400 {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => Error::Api {
                    status,
                    code: e.code,
                    message: e.message,
                    field: e.field,
                },
                Err(_) => Error::Api {
                    status,
                    code: String::new(),
                    message: String::from_utf8_lossy(&bytes).trim().to_string(),
                    field: None,
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| Error::Decode {
            server: self.server.clone(),
            status,
            source,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn start_release(
        &self,
        service: &str,
        start: &crate::release::Start,
    ) -> Result<crate::release::Release, Error> {
        let path = format!("/v1/services/{service}/releases");
        self.call(Method::POST, &path, Some(start)).await
    }

    pub async fn release(&self, service: &str) -> Result<crate::release::Release, Error> {
        self.get(&format!("/v1/services/{service}/release")).await
    }

    pub async fn releases(&self) -> Result<crate::api::types::Releases, Error> {
        self.get("/v1/releases").await
    }

    pub async fn release_action(
        &self,
        service: &str,
        action: crate::release::Action,
        why: &str,
    ) -> Result<crate::release::Release, Error> {
        let path = format!("/v1/services/{service}/release/{action}");
        let body = crate::api::types::ReleaseActionBody { why: why.into() };
        self.call(Method::POST, &path, Some(&body)).await
    }

    /// Starts a preview (dry run) of a candidate.
    pub async fn start_preview(
        &self,
        service: &str,
        start: &crate::preview::Start,
    ) -> Result<crate::preview::View, Error> {
        let path = format!("/v1/services/{service}/preview");
        self.call(Method::POST, &path, Some(start)).await
    }

    /// A service's running (or last) preview and what the filters counted.
    pub async fn preview(&self, service: &str) -> Result<crate::preview::View, Error> {
        self.get(&format!("/v1/services/{service}/preview")).await
    }

    /// Applies the running preview (its candidate becomes the next version).
    pub async fn apply_preview(&self, service: &str) -> Result<crate::preview::Applied, Error> {
        let path = format!("/v1/services/{service}/preview/apply");
        self.call::<(), _>(Method::POST, &path, None).await
    }

    /// Discards the running preview.
    pub async fn discard_preview(&self, service: &str) -> Result<crate::preview::View, Error> {
        let path = format!("/v1/services/{service}/preview");
        self.call::<(), _>(Method::DELETE, &path, None).await
    }

    /// Applies the config file again (`file_wins`: its values win conflicts with API edits).
    pub async fn reload(&self, file_wins: bool) -> Result<crate::api::types::Reloaded, Error> {
        let prefer = if file_wins { "file" } else { "live" };
        let path = format!("/v1/config/reload?prefer={prefer}");
        self.call::<(), _>(Method::POST, &path, None).await
    }

    pub async fn status(&self) -> Result<Status, Error> {
        self.get("/v1/status").await
    }

    pub async fn services(&self) -> Result<ServiceList, Error> {
        self.get("/v1/services").await
    }

    /// What the data plane saw for a service.
    pub async fn traffic(&self, service: &str) -> Result<crate::api::types::Traffic, Error> {
        self.get(&format!("/v1/services/{service}/traffic")).await
    }

    /// One service's summary (as listed).
    pub async fn service_summary(
        &self,
        service: &str,
    ) -> Result<crate::api::types::ServiceSummary, Error> {
        self.services()
            .await?
            .services
            .into_iter()
            .find(|s| s.name == service)
            .ok_or_else(|| Error::Api {
                status: 404,
                code: "not_found".into(),
                message: format!("no service {service:?}"),
                field: Some("service".into()),
            })
    }

    pub async fn service(&self, name: &str) -> Result<ServiceDetail, Error> {
        self.get(&format!("/v1/services/{name}")).await
    }

    pub async fn replace(&self, name: &str, strategy: &StrategySpec) -> Result<Written, Error> {
        self.call(Method::PUT, &format!("/v1/services/{name}"), Some(strategy))
            .await
    }

    pub async fn set_state(
        &self,
        service: &str,
        cluster: &str,
        state: State,
    ) -> Result<Written, Error> {
        let path = format!("/v1/services/{service}/clusters/{cluster}/state");
        self.call(Method::PUT, &path, Some(&StateChange { state }))
            .await
    }

    /// Adds (`add`) or removes ids and intervals.
    pub async fn whitelist(
        &self,
        service: &str,
        cluster: &str,
        add: bool,
        change: &WhitelistChange,
    ) -> Result<Written, Error> {
        let verb = if add { "add" } else { "remove" };
        let path = format!("/v1/services/{service}/clusters/{cluster}/whitelist/{verb}");
        self.call(Method::POST, &path, Some(change)).await
    }

    pub async fn set_percent(
        &self,
        service: &str,
        cluster: &str,
        change: &PercentChange,
    ) -> Result<Written, Error> {
        let path = format!("/v1/services/{service}/clusters/{cluster}/percent");
        self.call(Method::PUT, &path, Some(change)).await
    }

    pub async fn explain(
        &self,
        service: &str,
        req: &ExplainRequest,
    ) -> Result<ExplainResponse, Error> {
        let path = format!("/v1/services/{service}/explain");
        self.call(Method::POST, &path, Some(req)).await
    }

    pub async fn history(&self, limit: u64) -> Result<History, Error> {
        self.get(&format!("/v1/history?limit={limit}")).await
    }

    pub async fn operations(&self, limit: u64) -> Result<Operations, Error> {
        self.get(&format!("/v1/operations?limit={limit}")).await
    }

    pub async fn diff(&self, from: u64, to: u64) -> Result<Diff, Error> {
        self.get(&format!("/v1/diff?from={from}&to={to}")).await
    }

    pub async fn revert(&self, version: u64, service: Option<String>) -> Result<Written, Error> {
        self.call(
            Method::POST,
            "/v1/revert",
            Some(&Revert { version, service }),
        )
        .await
    }

    /// A service's releases, newest first.
    pub async fn release_history(
        &self,
        service: &str,
    ) -> Result<crate::api::types::Releases, Error> {
        self.get(&format!("/v1/services/{service}/releases")).await
    }

    /// A tenant's gray cookie (needs a token of role `issuer`).
    pub async fn gray_cookie(&self, service: &str, tenant: &str) -> Result<GrayCookie, Error> {
        let path = format!("/v1/services/{service}/gray-cookie");
        let body = GrayCookieRequest {
            tenant: tenant.to_string(),
        };
        self.call(Method::POST, &path, Some(&body)).await
    }
}
