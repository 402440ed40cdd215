//! Services: status, strategies, the edits (one line each: auth and body are extractors, the
//! write is `writer::Handle::edit`), and explain.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::Json;
use graylane_strategy::{decide, RequestView, StrategySpec};

use super::error::{Error, Result};
use super::extract::{Body, Reader, Writer};
use super::types::{
    ClusterSummary, ErrorBody, ExplainRequest, ExplainResponse, Force, PercentChange,
    ServiceDetail, ServiceList, ServiceSummary, StateChange, Status, WhitelistChange, Written,
};
use super::AppState;
use crate::edit::Edit;
use crate::snapshot::{ServiceView, Snapshot};

fn summary(name: &str, s: &ServiceView) -> ServiceSummary {
    let clusters = s
        .spec
        .clusters
        .iter()
        .map(|(k, c)| ClusterSummary {
            key: k.clone(),
            envoy_cluster: c.cluster.clone().unwrap_or_else(|| k.clone()),
            status: c.status,
            weight: c.weight,
            all: c.id.all,
            ids: c.id.ids.len(),
            intervals: c.id.interval.len(),
            percent: c.percent.clone(),
            healthy: s.healthy.get(k).copied().flatten(),
        })
        .collect();
    ServiceSummary {
        name: name.to_string(),
        version: s.version,
        health: s.health,
        clusters,
    }
}

fn summaries(snap: &Snapshot) -> Vec<ServiceSummary> {
    snap.services.iter().map(|(n, s)| summary(n, s)).collect()
}

/// Version, services and clusters, the config file's error, discovery sources.
#[utoipa::path(get, path = "/v1/status", tag = "services", security(("bearer" = [])),
    responses((status = OK, body = Status), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn status(State(st): State<AppState>, _: Reader) -> Json<Status> {
    let snap = st.snapshots.borrow().clone();
    Json(Status {
        version: snap.version,
        services: summaries(&snap),
        config_error: snap.config_error.clone(),
        config_conflicts: snap.config_conflicts.clone(),
        reload_failures: snap.reload_failures,
        sources: snap
            .sources
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect(),
        istio: st.istio.as_ref().map(|rx| rx.borrow().as_ref().clone()),
    })
}

/// Services and their clusters.
#[utoipa::path(get, path = "/v1/services", tag = "services", security(("bearer" = [])),
    responses((status = OK, body = ServiceList), (status = UNAUTHORIZED, body = ErrorBody)))]
pub async fn list(State(st): State<AppState>, _: Reader) -> Json<ServiceList> {
    let snap = st.snapshots.borrow().clone();
    Json(ServiceList {
        version: snap.version,
        services: summaries(&snap),
    })
}

/// A service's strategy.
#[utoipa::path(get, path = "/v1/services/{service}", tag = "services",
    params(("service" = String, Path, description = "service name")), security(("bearer" = [])),
    responses((status = OK, body = ServiceDetail), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn get(
    State(st): State<AppState>,
    _: Reader,
    Path(name): Path<String>,
) -> Result<Json<ServiceDetail>> {
    let snap = st.snapshots.borrow().clone();
    let s = snap
        .services
        .get(&name)
        .ok_or_else(|| Error::no_service(&name))?;
    Ok(Json(ServiceDetail {
        name,
        version: s.version,
        health: s.health,
        healthy: s.healthy.clone(),
        strategy: (*s.spec).clone(),
    }))
}

/// Replaces a service's strategy.
#[utoipa::path(put, path = "/v1/services/{service}", tag = "services",
    params(("service" = String, Path, description = "service name"), Force),
    request_body = StrategySpec,
    security(("bearer" = [])),
    responses((status = OK, body = Written), (status = BAD_REQUEST, body = ErrorBody),
              (status = FORBIDDEN, body = ErrorBody)))]
pub async fn replace(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path(service): Path<String>,
    Query(f): Query<Force>,
    Body(strategy): Body<StrategySpec>,
) -> Result<Json<Written>> {
    let edit = Edit::Replace {
        strategy: Box::new(strategy),
    };
    Ok(Json(st.writer.edit(who, service, edit, f.force).await?))
}

/// Sets a cluster's state: R, Y or G.
#[utoipa::path(put, path = "/v1/services/{service}/clusters/{cluster}/state", tag = "services",
    params(("service" = String, Path), ("cluster" = String, Path), Force),
    request_body = StateChange,
    security(("bearer" = [])),
    responses((status = OK, body = Written), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn set_state(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path((service, cluster)): Path<(String, String)>,
    Query(f): Query<Force>,
    Body(b): Body<StateChange>,
) -> Result<Json<Written>> {
    let edit = Edit::SetState {
        cluster,
        state: b.state,
    };
    Ok(Json(st.writer.edit(who, service, edit, f.force).await?))
}

fn whitelist(cluster: String, add: bool, b: WhitelistChange) -> Edit {
    Edit::Whitelist {
        cluster,
        add,
        ids: b.ids,
        intervals: b.intervals,
        all: b.all,
    }
}

/// Adds ids and intervals in bulk (a million ids in one call).
#[utoipa::path(post, path = "/v1/services/{service}/clusters/{cluster}/whitelist/add",
    tag = "services", params(("service" = String, Path), ("cluster" = String, Path), Force),
    request_body = WhitelistChange, security(("bearer" = [])),
    responses((status = OK, body = Written), (status = PAYLOAD_TOO_LARGE, body = ErrorBody)))]
pub async fn whitelist_add(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path((service, cluster)): Path<(String, String)>,
    Query(f): Query<Force>,
    Body(b): Body<WhitelistChange>,
) -> Result<Json<Written>> {
    let edit = whitelist(cluster, true, b);
    Ok(Json(st.writer.edit(who, service, edit, f.force).await?))
}

/// Removes ids and intervals.
#[utoipa::path(post, path = "/v1/services/{service}/clusters/{cluster}/whitelist/remove",
    tag = "services", params(("service" = String, Path), ("cluster" = String, Path), Force),
    request_body = WhitelistChange, security(("bearer" = [])),
    responses((status = OK, body = Written), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn whitelist_remove(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path((service, cluster)): Path<(String, String)>,
    Query(f): Query<Force>,
    Body(b): Body<WhitelistChange>,
) -> Result<Json<Written>> {
    let edit = whitelist(cluster, false, b);
    Ok(Json(st.writer.edit(who, service, edit, f.force).await?))
}

/// Sets or clears a cluster's percentage.
#[utoipa::path(put, path = "/v1/services/{service}/clusters/{cluster}/percent", tag = "services",
    params(("service" = String, Path), ("cluster" = String, Path), Force),
    request_body = PercentChange,
    security(("bearer" = [])),
    responses((status = OK, body = Written), (status = BAD_REQUEST, body = ErrorBody)))]
pub async fn set_percent(
    State(st): State<AppState>,
    Writer(who): Writer,
    Path((service, cluster)): Path<(String, String)>,
    Query(f): Query<Force>,
    Body(b): Body<PercentChange>,
) -> Result<Json<Written>> {
    let edit = Edit::SetPercent {
        cluster,
        percent: b.percent,
    };
    Ok(Json(st.writer.edit(who, service, edit, f.force).await?))
}

/// Which cluster serves this request, and why: the filter's own `decide` on the current
/// version and health (the compiled strategy is shared, never copied).
#[utoipa::path(post, path = "/v1/services/{service}/explain", tag = "services",
    params(("service" = String, Path)), request_body = ExplainRequest, security(("bearer" = [])),
    responses((status = OK, body = ExplainResponse), (status = NOT_FOUND, body = ErrorBody)))]
pub async fn explain(
    State(st): State<AppState>,
    _: Reader,
    Path(name): Path<String>,
    Body(b): Body<ExplainRequest>,
) -> Result<Json<ExplainResponse>> {
    let snap = st.snapshots.borrow().clone();
    let s = snap
        .services
        .get(&name)
        .ok_or_else(|| Error::no_service(&name))?;
    let mut headers: Vec<(String, Vec<u8>)> = b
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    if !b.cookies.is_empty() {
        let cookie: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        headers.push(("cookie".into(), cookie.join("; ").into_bytes()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    let req = RequestView {
        headers: &headers,
        tenant: b.tenant.as_deref().map(str::as_bytes),
        own_lane: b.caller_lane,
        now,
        draw: b.draw,
    };
    let d = decide(&s.compiled, &s.health(), &req);
    Ok(Json(ExplainResponse {
        service: name,
        version: s.version,
        decision: d.explain(&s.compiled, &req),
    }))
}

/// Applies the config file last read again, merged three ways with the API's edits (docs:
/// "Edits of the file"); with `prefer=file` the file's values win the conflicts.
#[utoipa::path(post, path = "/v1/config/reload", tag = "services",
    params(crate::api::types::ReloadQuery), security(("bearer" = [])),
    responses((status = OK, body = crate::api::types::Reloaded), (status = BAD_REQUEST, body = ErrorBody),
              (status = FORBIDDEN, body = ErrorBody)))]
pub async fn reload(
    State(st): State<AppState>,
    Writer(who): Writer,
    Query(q): Query<crate::api::types::ReloadQuery>,
) -> Result<Json<crate::api::types::Reloaded>> {
    let prefer = match q.prefer {
        crate::api::types::PreferParam::Live => crate::merge::Prefer::Live,
        crate::api::types::PreferParam::File => crate::merge::Prefer::File,
    };
    let (written, conflicts) = st.writer.reapply_file(who, prefer).await?;
    Ok(Json(crate::api::types::Reloaded { written, conflicts }))
}
