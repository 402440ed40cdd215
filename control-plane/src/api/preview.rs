//! Previews (dry runs) of a candidate strategy: start one, read what the filters counted,
//! apply it (the next version) or discard it (`crate::preview` is the model; the writer runs
//! it; the filters count it in their traffic reports).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::error::{Error, Result};
use super::extract::{Body, Reader, Writer};
use super::types::{ErrorBody, Force};
use super::AppState;
use crate::preview::{self, Applied, Start, View};
use crate::writer::PreviewEnd;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The view of `service`'s current or last preview as of now.
fn view_of(st: &AppState, service: &str) -> Result<View> {
    let snap = st.snapshots.borrow().clone();
    let live = snap
        .previews
        .get(service)
        .ok_or_else(|| Error::not_found("preview", format!("{service} has had no preview")))?;
    let (pairs, nodes) = st.metrics.preview(service, live.record.id);
    let service_view = snap.services.get(service).map(|s| &**s);
    Ok(preview::view(
        &live.record,
        pairs,
        nodes,
        service_view,
        now_ms(),
    ))
}

/// Starts a preview: the filters evaluate the candidate beside the live strategy (which keeps
/// routing) and count what would move. The candidate is checked as a new version would be;
/// a preview already running for the service is replaced.
#[utoipa::path(post, path = "/v1/services/{service}/preview", tag = "services",
    params(("service" = String, Path), Force),
    request_body = Start,
    security(("bearer" = [])),
    responses((status = CREATED, body = View), (status = BAD_REQUEST, body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody), (status = CONFLICT, body = ErrorBody)))]
pub async fn start(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path(service): Path<String>,
    Query(f): Query<Force>,
    Body(start): Body<Start>,
) -> Result<(StatusCode, Json<View>)> {
    st.writer
        .start_preview(who, service.clone(), start, f.force)
        .await?;
    Ok((StatusCode::CREATED, Json(view_of(&st, &service)?)))
}

/// A service's running (or last) preview and what the filters counted: requests per pair of
/// clusters (live -> candidate), distinct tenants of the moves, one sentence summing it up.
#[utoipa::path(get, path = "/v1/services/{service}/preview", tag = "services",
    params(("service" = String, Path)),
    security(("bearer" = [])),
    responses((status = OK, body = View), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn get(
    State(st): State<AppState>,
    _: Reader,
    Path(service): Path<String>,
) -> Result<Json<View>> {
    Ok(Json(view_of(&st, &service)?))
}

/// Applies the running preview: its candidate becomes the next version (refused if the live
/// strategy changed since the preview started, unless forced).
#[utoipa::path(post, path = "/v1/services/{service}/preview/apply", tag = "services",
    params(("service" = String, Path), Force),
    security(("bearer" = [])),
    responses((status = OK, body = Applied), (status = NOT_FOUND, body = ErrorBody),
              (status = CONFLICT, body = ErrorBody), (status = BAD_REQUEST, body = ErrorBody)))]
pub async fn apply(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path(service): Path<String>,
    Query(f): Query<Force>,
) -> Result<Json<Applied>> {
    let ended = st
        .writer
        .end_preview(who, service.clone(), PreviewEnd::Apply { force: f.force })
        .await?;
    let written = ended
        .written
        .ok_or(Error::Unavailable("the apply made no version"))?;
    Ok(Json(Applied {
        preview: view_of(&st, &service)?,
        written,
    }))
}

/// Discards the running preview (the filters stop evaluating it; its counts stay readable).
#[utoipa::path(delete, path = "/v1/services/{service}/preview", tag = "services",
    params(("service" = String, Path)),
    security(("bearer" = [])),
    responses((status = OK, body = View), (status = NOT_FOUND, body = ErrorBody),
              (status = CONFLICT, body = ErrorBody)))]
pub async fn discard(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path(service): Path<String>,
) -> Result<Json<View>> {
    st.writer
        .end_preview(who, service.clone(), PreviewEnd::Discard)
        .await?;
    Ok(Json(view_of(&st, &service)?))
}
