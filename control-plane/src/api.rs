//! The admin HTTP API (JSON), the filters' feed and `/metrics`, as one axum router.
//!
//! Handlers read the latest `Arc<Snapshot>` from the writer's `watch` channel and send writes
//! (and store reads) to the writer as commands; none holds a lock across `.await`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use graylane_strategy::feed;
use graylane_strategy::id::{IdList, Interval};
use graylane_strategy::{
    decide, Health, Lane, PercentBy, PercentSpec, RequestView, State as ClusterState, StrategySpec,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::Role;
use crate::edit::Edit;
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::writer::{Command, WriteError, Written};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub commands: mpsc::Sender<Command>,
    pub metrics: Arc<Metrics>,
}

/// Longest a feed long-poll is held.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// An API error: a stable code, a message, and the field at fault.
#[derive(Debug, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }
    fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let status = match e.code {
            "not_found" => StatusCode::NOT_FOUND,
            "invalid" => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            code: e.code,
            message: e.message,
            field: e.field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(&self)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router. Tests drive it with `oneshot`; `serve` binds it to a listener.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/services", get(services))
        .route("/v1/services/{service}", get(service).put(replace))
        .route(
            "/v1/services/{service}/clusters/{cluster}/state",
            put(set_state),
        )
        .route(
            "/v1/services/{service}/clusters/{cluster}/whitelist/add",
            post(whitelist_add),
        )
        .route(
            "/v1/services/{service}/clusters/{cluster}/whitelist/remove",
            post(whitelist_remove),
        )
        .route(
            "/v1/services/{service}/clusters/{cluster}/percent",
            put(set_percent),
        )
        .route("/v1/services/{service}/explain", post(explain))
        .route("/v1/history", get(history))
        .route("/v1/diff", get(diff))
        .route("/v1/revert", post(revert))
        .route("/v1/operations", get(operations))
        .route("/v1/feed/{service}", get(feed))
        // A million ids in one call is ~8 MB of JSON.
        .layer(DefaultBodyLimit::max(256 << 20))
        .with_state(state)
}

/// Checks the bearer token; returns the token's name.
fn auth(state: &AppState, headers: &HeaderMap, need: Role) -> ApiResult<String> {
    let snap = state.snapshots.borrow().clone();
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing bearer token",
        ));
    };
    let Some(tok) = snap.tokens.iter().find(|t| t.token == given) else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown token",
        ));
    };
    if tok.role < need {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("token {:?} may only read", tok.name),
        ));
    }
    Ok(tok.name.clone())
}

async fn ask<T>(
    state: &AppState,
    make: impl FnOnce(oneshot::Sender<Result<T, WriteError>>) -> Command,
) -> ApiResult<T> {
    let (tx, rx) = oneshot::channel();
    let unavailable = || {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the store is shutting down",
        )
    };
    state
        .commands
        .send(make(tx))
        .await
        .map_err(|_| unavailable())?;
    Ok(rx.await.map_err(|_| unavailable())??)
}

async fn write(
    state: &AppState,
    who: String,
    service: String,
    edit: Edit,
) -> ApiResult<Json<Written>> {
    let w = ask(state, |reply| Command::Edit {
        who,
        service,
        edit,
        reply,
    })
    .await?;
    Ok(Json(w))
}

#[derive(Serialize)]
struct ClusterOut {
    key: String,
    envoy_cluster: String,
    status: ClusterState,
    weight: graylane_strategy::Weight,
    all: bool,
    ids: usize,
    intervals: usize,
    percent: Option<PercentSpec>,
    healthy: Option<u32>,
}

fn service_out(name: &str, snap: &Snapshot) -> Option<Value> {
    let s = snap.services.get(name)?;
    let clusters: Vec<ClusterOut> = s
        .spec
        .clusters
        .iter()
        .map(|(k, c)| ClusterOut {
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
    Some(json!({"name": name, "version": s.version, "health": s.health, "clusters": clusters}))
}

async fn status(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let snap = st.snapshots.borrow().clone();
    let services: Vec<Value> = snap
        .services
        .keys()
        .filter_map(|n| service_out(n, &snap))
        .collect();
    Ok(Json(json!({
        "version": snap.version,
        "services": services,
        "config_error": snap.config_error,
        "reload_failures": snap.reload_failures,
        "sources": snap.sources.iter().map(|(k, v)| (k.as_str(), v)).collect::<BTreeMap<_, _>>(),
    })))
}

async fn services(State(st): State<AppState>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let snap = st.snapshots.borrow().clone();
    let list: Vec<Value> = snap
        .services
        .keys()
        .filter_map(|n| service_out(n, &snap))
        .collect();
    Ok(Json(json!({"version": snap.version, "services": list})))
}

fn not_found(service: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no service {service:?}"),
    )
    .field("service")
}

async fn service(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let snap = st.snapshots.borrow().clone();
    let s = snap.services.get(&name).ok_or_else(|| not_found(&name))?;
    Ok(Json(
        json!({"name": name, "version": s.version, "health": s.health,
        "healthy": s.healthy, "strategy": &*s.spec}),
    ))
}

/// A JSON body parsed with the field path in the error.
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    graylane_strategy::spec::parse_json_as(bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()).field(e.path().to_string())
    })
}

async fn replace(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    let who = auth(&st, &headers, Role::Write)?;
    let strategy: StrategySpec = body(&raw)?;
    write(
        &st,
        who,
        name,
        Edit::Replace {
            strategy: Box::new(strategy),
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: ClusterState,
}

async fn set_state(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((service, cluster)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    let who = auth(&st, &headers, Role::Write)?;
    let b: StateBody = body(&raw)?;
    write(
        &st,
        who,
        service,
        Edit::SetState {
            cluster,
            state: b.state,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WhitelistBody {
    #[serde(default)]
    ids: IdList,
    #[serde(default)]
    intervals: Vec<Interval>,
    #[serde(default)]
    all: Option<bool>,
}

async fn whitelist(
    st: AppState,
    headers: HeaderMap,
    (service, cluster): (String, String),
    raw: &[u8],
    add: bool,
) -> ApiResult<Json<Written>> {
    let who = auth(&st, &headers, Role::Write)?;
    let b: WhitelistBody = body(raw)?;
    let edit = Edit::Whitelist {
        cluster,
        add,
        ids: b.ids,
        intervals: b.intervals,
        all: b.all,
    };
    write(&st, who, service, edit).await
}

async fn whitelist_add(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    whitelist(st, headers, p, &raw, true).await
}

async fn whitelist_remove(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(p): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    whitelist(st, headers, p, &raw, false).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PercentBody {
    /// `null` removes the percentage rule.
    percent: Option<PercentSpec>,
}

async fn set_percent(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path((service, cluster)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    let who = auth(&st, &headers, Role::Write)?;
    let b: PercentBody = body(&raw)?;
    write(
        &st,
        who,
        service,
        Edit::SetPercent {
            cluster,
            percent: b.percent,
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainBody {
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    cookies: BTreeMap<String, String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    caller_lane: Option<Lane>,
    /// The random draw (per-request percentages, weighted ties); 0 if absent.
    #[serde(default)]
    draw: u64,
}

/// Explains a decision with the filter's own `decide`, on the current version and health.
async fn explain(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let b: ExplainBody = body(&raw)?;
    let snap = st.snapshots.borrow().clone();
    let s = snap.services.get(&name).ok_or_else(|| not_found(&name))?;
    let mut hdrs: Vec<(String, Vec<u8>)> = b
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_bytes().to_vec()))
        .collect();
    if !b.cookies.is_empty() {
        let cookie: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
        hdrs.push(("cookie".into(), cookie.join("; ").into_bytes()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let req = RequestView {
        headers: &hdrs,
        tenant: b.tenant.as_deref().map(str::as_bytes),
        own_lane: b.caller_lane,
        now,
        draw: b.draw,
    };
    // Health as the filters hold it.
    let compiled = &*s.compiled;
    let health = Health::from_counts(compiled, s.healthy.iter().map(|(k, v)| (k, *v)));
    let d = decide(compiled, &health, &req);
    let e = d.explain(compiled, &req);
    Ok(Json(
        json!({"service": name, "version": s.version, "decision": e}),
    ))
}

#[derive(Deserialize)]
struct Limit {
    #[serde(default = "default_limit")]
    limit: u64,
}

fn default_limit() -> u64 {
    100
}

async fn history(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let rows = ask(&st, |reply| Command::History {
        limit: q.limit,
        reply,
    })
    .await?;
    Ok(Json(json!({"versions": rows})))
}

async fn operations(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Limit>,
) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let rows = ask(&st, |reply| Command::Operations {
        limit: q.limit,
        reply,
    })
    .await?;
    Ok(Json(json!({"operations": rows})))
}

#[derive(Deserialize)]
struct DiffQuery {
    from: u64,
    to: u64,
}

async fn diff(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<DiffQuery>,
) -> ApiResult<Json<Value>> {
    auth(&st, &headers, Role::Read)?;
    let changes = ask(&st, |reply| Command::Diff {
        from: q.from,
        to: q.to,
        reply,
    })
    .await?;
    Ok(Json(
        json!({"from": q.from, "to": q.to, "changes": changes}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevertBody {
    version: u64,
}

async fn revert(
    State(st): State<AppState>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> ApiResult<Json<Written>> {
    let who = auth(&st, &headers, Role::Write)?;
    let b: RevertBody = body(&raw)?;
    let w = ask(&st, |reply| Command::Revert {
        who,
        version: b.version,
        reply,
    })
    .await?;
    Ok(Json(w))
}

/// The filters' long-poll: answers at once when the service's strategy or health moved past
/// what the caller holds (or the caller's versions come from another store), else waits
/// (bounded) for a change, else `304`.
async fn feed(
    State(st): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<feed::Query>,
) -> Response {
    if let Some(want) = st.snapshots.borrow().feed_token.clone() {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(want.as_str()) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "feed token required",
            )
            .into_response();
        }
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
        let Some(s) = snap.services.get(&name) else {
            return not_found(&name).into_response();
        };
        let other_store = snap.epoch != q.epoch;
        if other_store || s.version != q.version || s.health != q.health {
            let send_strategy = other_store || s.version != q.version;
            st.metrics.pushed(send_strategy);
            let reply = feed::Reply::<&RawValue> {
                service: name.clone(),
                epoch: snap.epoch,
                version: s.version,
                health: s.health,
                strategy: send_strategy.then_some(&**s.json),
                healthy: s.healthy.clone(),
                endpoints: q.endpoints.then(|| s.endpoints.clone()),
            };
            let etag = format!("\"{}-{}-{}\"", snap.epoch, s.version, s.health);
            return (StatusCode::OK, [(header::ETAG, etag)], Json(reply)).into_response();
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() {
                return StatusCode::SERVICE_UNAVAILABLE.into_response();
            },
            () = tokio::time::sleep_until(deadline) => {
                return StatusCode::NOT_MODIFIED.into_response();
            }
        }
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    let snap = st.snapshots.borrow().clone();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&snap),
    )
        .into_response()
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

/// Percent spec helper for the CLI.
pub fn percent(value: f64, by: PercentBy) -> PercentSpec {
    PercentSpec { value, by, salt: 0 }
}
