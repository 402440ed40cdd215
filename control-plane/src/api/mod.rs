//! The admin HTTP API (JSON), the filters' feed and `/metrics`, as one axum router.
//!
//! Every route is registered through utoipa-axum's `routes!`, which takes the route from the
//! handler's `#[utoipa::path]`: the OpenAPI document (`/v1/openapi.json`) is generated from the
//! same handlers and types (`types.rs`), so a route cannot be served undocumented. Handlers
//! read the latest `Arc<Snapshot>`, send writes to the writer task (`writer::Handle`), read
//! history through their own store connection; none holds a lock across `.await`.

mod cookie;
mod error;
mod extract;
mod feed;
mod guard;
mod history;
mod ops;
mod preview;
mod releases;
mod services;
mod traffic;
pub mod types;

use std::sync::{Arc, OnceLock};

use axum::extract::DefaultBodyLimit;
use axum::Router;
use tokio::sync::watch;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};
use utoipa_axum::routes;

pub use error::Error;
pub use extract::{bearer, same_secret};

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::{store, writer};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub writer: writer::Handle,
    pub history: store::Reader,
    pub metrics: Arc<Metrics>,
    /// What the Istio routes task did (`istio.apply`), when it runs.
    pub istio: Option<watch::Receiver<Arc<Vec<types::IstioRoutes>>>>,
    /// Failed authentications per peer (bursts are refused).
    guard: Arc<guard::Guard>,
    /// The OpenAPI document, as served.
    openapi: Arc<OnceLock<String>>,
}

impl AppState {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        writer: writer::Handle,
        history: store::Reader,
        metrics: Arc<Metrics>,
    ) -> AppState {
        AppState {
            snapshots,
            writer,
            history,
            metrics,
            istio: None,
            guard: Arc::new(guard::Guard::new(Limits::default().failed_auth)),
            openapi: Arc::new(OnceLock::new()),
        }
    }

    /// With the Istio routes task's status (shown by `GET /v1/status`).
    pub fn with_istio(mut self, istio: watch::Receiver<Arc<Vec<types::IstioRoutes>>>) -> Self {
        self.istio = Some(istio);
        self
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "graylane control plane",
        description = "Admin API (bearer tokens: read, write or issuer), the filters' feed, \
                       metrics. Errors are JSON {code, message, field}."
    ),
    modifiers(&Bearer),
    tags(
        (name = "services", description = "Strategies, cluster states, whitelists, explain"),
        (name = "history", description = "Versions, diffs, reverts, the operation log"),
        (name = "releases", description = "Release procedures: gray upgrade, switch, rollback"),
        (name = "gray cookies", description = "Seed 003's cookie generator (role issuer)"),
        (name = "data plane", description = "The filters' feed"),
        (name = "operations", description = "Health, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Bounds a route's body size.
fn limited(
    (schemas, paths, method): UtoipaMethodRouter<AppState>,
    bytes: usize,
) -> UtoipaMethodRouter<AppState> {
    (schemas, paths, method.layer(DefaultBodyLimit::max(bytes)))
}

/// Every route with its documentation. Only `routes!` is used here: a route added any other
/// way would be missing from the document.
fn api(limits: &Limits) -> OpenApiRouter<AppState> {
    let small = limits.body_bytes;
    let upload = limits.upload_bytes;
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi))
        .routes(routes!(services::status))
        .routes(routes!(services::list))
        .routes(limited(routes!(services::get, services::replace), upload))
        .routes(limited(routes!(services::set_state), small))
        .routes(limited(routes!(services::whitelist_add), upload))
        .routes(limited(routes!(services::whitelist_remove), upload))
        .routes(limited(routes!(services::set_percent), small))
        .routes(limited(routes!(services::explain), small))
        .routes(limited(routes!(cookie::gray_cookie), small))
        .routes(routes!(history::history))
        .routes(routes!(history::diff))
        .routes(limited(routes!(history::revert), small))
        .routes(limited(routes!(releases::start), small))
        .routes(routes!(releases::current))
        .routes(routes!(releases::list))
        .routes(routes!(releases::history))
        .routes(limited(routes!(releases::act), small))
        .routes(limited(
            routes!(preview::start, preview::get, preview::discard),
            upload,
        ))
        .routes(limited(routes!(preview::apply), small))
        .routes(routes!(services::reload))
        .routes(routes!(history::operations))
        .routes(routes!(traffic::traffic))
        .routes(limited(routes!(traffic::report), traffic::REPORT_BYTES))
        .routes(routes!(feed::feed))
        .routes(routes!(feed::catalog))
        .merge(crate::plugin::routes())
}

/// The OpenAPI document, as generated.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    api(&Limits::default()).into_openapi()
}

/// The router. Tests drive it with `oneshot`; `serve` binds it to a listener.
pub fn router(mut state: AppState, limits: &Limits) -> Router {
    state.guard = Arc::new(guard::Guard::new(limits.failed_auth));
    let (router, doc) = api(limits).split_for_parts();
    let json = doc.to_pretty_json().unwrap_or_else(|_| "{}".into());
    let _ = state.openapi.set(json);
    router
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .with_state(state)
}
