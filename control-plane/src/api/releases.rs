//! Release procedures: start one, follow it, act on it (`crate::release` is the model; the
//! writer runs it). Every action is in the operation log with who and why.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;

use super::error::{Error, Result};
use super::extract::{Body, Reader, Writer};
use super::types::{ErrorBody, Limit, ReleaseActionBody, Releases};
use super::AppState;
use crate::release::{Action, Release, Start};

/// Starts a release of a service (one at a time per service).
#[utoipa::path(post, path = "/v1/services/{service}/releases", tag = "releases",
    params(("service" = String, Path)),
    request_body = Start,
    security(("bearer" = [])),
    responses((status = CREATED, body = Release), (status = BAD_REQUEST, body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody), (status = FORBIDDEN, body = ErrorBody)))]
pub async fn start(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path(service): Path<String>,
    Body(start): Body<Start>,
) -> Result<(StatusCode, Json<Release>)> {
    let r = st.writer.start_release(who, service, start).await?;
    Ok((StatusCode::CREATED, Json(r)))
}

/// A service's current release, or its last one: steps, where it is, what it waits for, log.
#[utoipa::path(get, path = "/v1/services/{service}/release", tag = "releases",
    params(("service" = String, Path)),
    security(("bearer" = [])),
    responses((status = OK, body = Release), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn current(
    State(st): State<AppState>,
    _: Reader,
    Path(service): Path<String>,
) -> Result<Json<Release>> {
    let snap = st.snapshots.borrow().clone();
    snap.releases
        .get(&service)
        .cloned()
        .map(Json)
        .ok_or_else(|| Error::not_found("release", format!("{service} has had no release")))
}

/// A service's releases, newest first (`?limit=`, default 100).
#[utoipa::path(get, path = "/v1/services/{service}/releases", tag = "releases",
    params(("service" = String, Path), Limit),
    security(("bearer" = [])),
    responses((status = OK, body = Releases), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn history(
    State(st): State<AppState>,
    _: Reader,
    Path(service): Path<String>,
    Query(q): Query<Limit>,
) -> Result<Json<Releases>> {
    let releases = st.history.releases_of(service, q.limit).await?;
    Ok(Json(Releases { releases }))
}

/// Every service's current or last release.
#[utoipa::path(get, path = "/v1/releases", tag = "releases",
    security(("bearer" = [])),
    responses((status = OK, body = Releases), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn list(State(st): State<AppState>, _: Reader) -> Json<Releases> {
    let snap = st.snapshots.borrow().clone();
    Json(Releases {
        releases: snap.releases.values().cloned().collect(),
    })
}

/// Approves the next step, pauses, resumes, aborts (restoring the strategy from before), or
/// rolls back: a running release as by `abort`; after a release succeeded, a `rollback` release
/// to the cluster it replaced is started and returned (409 when there is nothing to roll back).
#[utoipa::path(post, path = "/v1/services/{service}/release/{action}", tag = "releases",
    params(("service" = String, Path), ("action" = Action, Path)),
    request_body = ReleaseActionBody,
    security(("bearer" = [])),
    responses((status = OK, body = Release), (status = BAD_REQUEST, body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody), (status = CONFLICT, body = ErrorBody),
              (status = FORBIDDEN, body = ErrorBody)))]
pub async fn act(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path((service, action)): Path<(String, Action)>,
    Body(b): Body<ReleaseActionBody>,
) -> Result<Json<Release>> {
    Ok(Json(
        st.writer
            .release_action(who, service, action, b.why)
            .await?,
    ))
}
