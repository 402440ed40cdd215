//! Liveness, readiness, metrics and the API document.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = OK, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the store is open, the config loaded, and every discovery source has synced
/// once (until then Envoy must not be pointed here: its endpoints would be incomplete).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = OK, description = "ready", body = String),
              (status = SERVICE_UNAVAILABLE, description = "not ready yet", body = String)))]
pub async fn readyz(State(st): State<AppState>) -> Response {
    let snap = st.snapshots.borrow().clone();
    let waiting: Vec<&str> = snap
        .sources
        .iter()
        .filter(|(_, s)| !s.synced)
        .map(|(k, _)| k.as_str())
        .collect();
    if waiting.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = format!("not ready: waiting for {} to sync\n", waiting.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

/// Prometheus metrics (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = OK, description = "Prometheus text format", body = String)))]
pub async fn metrics(State(st): State<AppState>) -> Response {
    let snap = st.snapshots.borrow().clone();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(&snap),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = OK, description = "the OpenAPI document", body = Object)))]
pub async fn openapi(State(st): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.get().cloned().unwrap_or_default(),
    )
        .into_response()
}
