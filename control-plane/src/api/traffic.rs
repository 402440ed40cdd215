//! What the data plane saw: the filters send their traffic reports here, operators read the
//! sums (`graylane traffic`, `graylane top`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use graylane_strategy::traffic::Report;

use super::error::{Error, Result};
use super::extract::{Body, DataPlane, Reader};
use super::types::{ErrorBody, Traffic};
use super::AppState;

/// Largest report accepted: 64 workers of a few clusters each take a few tens of KB.
pub const REPORT_BYTES: usize = 1 << 20;

/// The cluster keys of `service`, in strategy order.
fn cluster_keys(st: &AppState, service: &str) -> Result<Vec<String>> {
    let snap = st.snapshots.borrow().clone();
    let s = snap
        .services
        .get(service)
        .ok_or_else(|| Error::no_service(service))?;
    Ok(s.spec.clusters.keys().cloned().collect())
}

/// A filter's traffic report: every worker's cumulative counts with a sequence number (the
/// filter's lease holder sends one per Envoy, every `report_ms`). Authenticated like the feed.
#[utoipa::path(post, path = "/v1/traffic/{service}", tag = "data plane",
    params(("service" = String, Path)), request_body = Report,
    responses((status = NO_CONTENT, description = "counted"),
              (status = BAD_REQUEST, body = ErrorBody), (status = UNAUTHORIZED, body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody)))]
pub async fn report(
    State(st): State<AppState>,
    _: DataPlane,
    Path(service): Path<String>,
    Body(report): Body<Report>,
) -> Result<StatusCode> {
    let clusters = cluster_keys(&st, &service)?;
    let preview = st
        .snapshots
        .borrow()
        .previews
        .get(&service)
        .map(|p| p.record.id);
    st.metrics
        .traffic_report(&service, report, &clusters, preview)
        .map_err(|e| Error::Invalid {
            field: "node".into(),
            message: e.to_string(),
        })?;
    Ok(StatusCode::NO_CONTENT)
}

/// What the data plane saw for a service: per cluster over the last 10 s, 60 s and since the
/// control plane started (requests, responses by class, upstream latency), per reason, per
/// reporting Envoy (stale ones flagged, their counts kept).
#[utoipa::path(get, path = "/v1/services/{service}/traffic", tag = "services",
    params(("service" = String, Path)), security(("bearer" = [])),
    responses((status = OK, body = Traffic), (status = UNAUTHORIZED, body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody)))]
pub async fn traffic(
    State(st): State<AppState>,
    _: Reader,
    Path(service): Path<String>,
) -> Result<Json<Traffic>> {
    let clusters = cluster_keys(&st, &service)?;
    let mut t = st.metrics.traffic(&service, &clusters);
    let current = st
        .snapshots
        .borrow()
        .services
        .get(&service)
        .map_or(0, |s| s.version);
    let held = st.metrics.versions_held(&service);
    t.filters_polling = held.len();
    t.filters_current = held.iter().filter(|v| **v == current).count();
    Ok(Json(t))
}
