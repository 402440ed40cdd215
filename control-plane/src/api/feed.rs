//! The filters' feed: a long-poll per service.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::value::RawValue;

use super::error::Error;
use super::extract::DataPlane;
use super::types::{ErrorBody, FeedQuery, FeedReply};
use super::AppState;
use graylane_strategy::feed::{names_digest, Catalog, CatalogQuery, Listed, PreviewReply};

/// Longest a feed long-poll is held.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Long-poll for the filters: answers at once when the service's strategy or health moved
/// past what the caller holds (or the caller's versions are from another store, `epoch`),
/// else waits for a change (at most `wait_ms`, capped at 30 s), else `304`. `strategy` is
/// `null` when only health changed. Callers that evaluate previews say which one they hold
/// (`preview=<id>`, 0: none): a preview started or ended is news to them, and the answer
/// carries the running one (its candidate only when the caller does not hold it yet).
#[utoipa::path(get, path = "/v1/feed/{service}", tag = "data plane",
    params(("service" = String, Path), FeedQuery),
    responses((status = OK, body = inline(FeedReply<Object>)),
              (status = NOT_MODIFIED, description = "nothing new within wait_ms"),
              (status = UNAUTHORIZED, body = ErrorBody), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn feed(
    State(st): State<AppState>,
    _: DataPlane,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<FeedQuery>,
) -> Response {
    if !st.snapshots.borrow().services.contains_key(&name) {
        // Unknown names are answered, never recorded.
        return Error::no_service(&name).into_response();
    }
    let node = headers
        .get("x-graylane-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_string();
    st.metrics.polled(&node, &name, q.version);
    let mut rx = st.snapshots.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    loop {
        let snap = rx.borrow_and_update().clone();
        let Some(s) = snap.services.get(&name).cloned() else {
            return Error::no_service(&name).into_response();
        };
        let other_store = snap.epoch != q.epoch;
        // The running preview, for callers that evaluate previews (`preview=` in the query).
        let preview = snap
            .previews
            .get(&name)
            .filter(|p| p.record.is_running() && q.preview.is_some());
        let preview_id = preview.map_or(0, |p| p.record.id);
        let preview_news = q.preview.is_some_and(|held| held != preview_id);
        if other_store || s.version != q.version || s.health != q.health || preview_news {
            let send_strategy = other_store || s.version != q.version;
            st.metrics.pushed(send_strategy);
            if send_strategy {
                // Made once per version, off the async workers (large whitelists).
                let view = s.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    view.json();
                })
                .await;
            }
            let reply = FeedReply::<&RawValue> {
                service: name.clone(),
                epoch: snap.epoch,
                version: s.version,
                health: s.health,
                strategy: send_strategy.then(|| s.json()),
                healthy: s.healthy.clone(),
                endpoints: q.endpoints.then(|| s.endpoints.clone()),
                preview: preview.map(|p| PreviewReply {
                    id: p.record.id,
                    every: p.record.every,
                    strategy: (q.preview != Some(p.record.id)).then(|| p.json()),
                }),
            };
            let etag = format!("\"{}-{}-{}-{preview_id}\"", snap.epoch, s.version, s.health);
            return (StatusCode::OK, [(header::ETAG, etag)], Json(reply)).into_response();
        }
        // Woken only when this service's view is replaced (not by every publish: a thousand
        // followers of other services sleep on). The snapshot is not held while waiting: it
        // would keep every other service's replaced views (strategies, JSON) alive.
        let stopped = snap.stopped.clone();
        drop(snap);
        tokio::select! {
            () = s.superseded.cancelled() => {}
            () = stopped.cancelled() => {
                return Error::Unavailable("the control plane is shutting down").into_response();
            },
            () = tokio::time::sleep_until(deadline) => {
                return StatusCode::NOT_MODIFIED.into_response();
            }
        }
    }
}

/// Every service this control plane manages, for filters that serve them all (they follow
/// each one's feed): answers at once when the set of names differs from the caller's
/// (`digest`), else waits for it to change (at most `wait_ms`, capped at 30 s), else `304`.
/// A strategy's new version alone is not news here (each service's own feed carries it).
#[utoipa::path(get, path = "/v1/feed", tag = "data plane",
    params(CatalogQuery),
    responses((status = OK, body = Catalog),
              (status = NOT_MODIFIED, description = "the same services within wait_ms"),
              (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn catalog(
    State(st): State<AppState>,
    _: DataPlane,
    Query(q): Query<CatalogQuery>,
) -> Response {
    let mut rx = st.snapshots.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms).min(MAX_WAIT);
    loop {
        let snap = rx.borrow_and_update().clone();
        // BTreeMap: sorted by name.
        let digest = names_digest(snap.services.keys().map(String::as_str));
        if digest != q.digest {
            let reply = Catalog {
                epoch: snap.epoch,
                digest,
                services: snap
                    .services
                    .iter()
                    .map(|(name, s)| Listed {
                        name: name.clone(),
                        version: s.version,
                    })
                    .collect(),
            };
            return (StatusCode::OK, Json(reply)).into_response();
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                return Error::Unavailable("the control plane is shutting down").into_response();
            },
            () = tokio::time::sleep_until(deadline) => {
                return StatusCode::NOT_MODIFIED.into_response();
            }
        }
    }
}
