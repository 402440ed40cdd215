//! Versions, diffs, reverts and the operation log.

use axum::extract::{Query, State};
use axum::Json;

use super::error::{Error, Result};
use super::extract::{Body, Reader, Writer};
use super::types::{
    Diff, DiffRange, ErrorBody, Force, History, Limit, Operations, Revert, Written,
};
use super::AppState;
use crate::diff;

/// Versions, newest first.
#[utoipa::path(get, path = "/v1/history", tag = "history", params(Limit),
    security(("bearer" = [])),
    responses((status = OK, body = History), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn history(
    State(st): State<AppState>,
    _: Reader,
    Query(q): Query<Limit>,
) -> Result<Json<History>> {
    let versions = st.history.history(q.limit).await?;
    Ok(Json(History { versions }))
}

/// The operation log: who, what, when, versions before and after.
#[utoipa::path(get, path = "/v1/operations", tag = "history", params(Limit),
    security(("bearer" = [])),
    responses((status = OK, body = Operations), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn operations(
    State(st): State<AppState>,
    _: Reader,
    Query(q): Query<Limit>,
) -> Result<Json<Operations>> {
    let operations = st.history.operations(q.limit).await?;
    Ok(Json(Operations { operations }))
}

/// What changed between two versions.
#[utoipa::path(get, path = "/v1/diff", tag = "history", params(DiffRange),
    security(("bearer" = [])),
    responses((status = OK, body = Diff), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn diff(
    State(st): State<AppState>,
    _: Reader,
    Query(q): Query<DiffRange>,
) -> Result<Json<Diff>> {
    let at = |v: u64| {
        let history = st.history.clone();
        async move {
            history
                .strategies_at(v)
                .await?
                .ok_or_else(|| Error::not_found("version", format!("no version {v}")))
        }
    };
    let (from, to) = (at(q.from).await?, at(q.to).await?);
    let changes = tokio::task::spawn_blocking(move || diff::summarize(&from, &to))
        .await
        .map_err(|_| Error::Unavailable("the diff could not be computed"))?;
    Ok(Json(Diff {
        from: q.from,
        to: q.to,
        changes,
    }))
}

/// Makes a new version equal to an earlier one.
#[utoipa::path(post, path = "/v1/revert", tag = "history", request_body = Revert, params(Force),
    security(("bearer" = [])),
    responses((status = OK, body = Written), (status = NOT_FOUND, body = ErrorBody),
              (status = FORBIDDEN, body = ErrorBody)))]
pub async fn revert(
    State(st): State<AppState>,
    Writer(who): Writer,
    Query(f): Query<Force>,
    Body(b): Body<Revert>,
) -> Result<Json<Written>> {
    Ok(Json(
        st.writer.revert(who, b.version, b.service, f.force).await?,
    ))
}
