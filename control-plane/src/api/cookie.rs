//! Seed 003's cookie generator over HTTP: the auth service (a token of role `issuer`) asks for
//! a tenant's gray cookie and sets what it gets. The cookie value is a bearer credential for
//! the gray lane, so it is answered, never logged.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::Json;

use super::error::{Error, Result};
use super::extract::{Body, Issuer};
use super::types::{ErrorBody, GrayCookie, GrayCookieRequest};
use super::AppState;
use crate::cookie::{self, Issued};

/// A tenant's gray cookie: signed `tenantGray=1.<tenant>.<expiry>.<key id>.<signature>` when
/// the live strategy puts the tenant in gray by its id (a Y cluster's `id.ids`,
/// `id.interval` or `id.all`), else `tenantGray=0`. Signed with a private key of
/// `cookie_keys` whose public key the strategy lists; `409` when there is none.
#[utoipa::path(post, path = "/v1/services/{service}/gray-cookie", tag = "gray cookies",
    params(("service" = String, Path, description = "service name")),
    request_body = GrayCookieRequest, security(("bearer" = [])),
    responses((status = OK, body = GrayCookie),
              (status = BAD_REQUEST, description = "not a tenant id", body = ErrorBody),
              (status = FORBIDDEN, description = "the token's role is not issuer", body = ErrorBody),
              (status = NOT_FOUND, body = ErrorBody),
              (status = CONFLICT, description = "no private key matches a public key the \
                  strategy lists, or the strategy has no signed gray cookie", body = ErrorBody)))]
pub async fn gray_cookie(
    State(st): State<AppState>,
    Issuer(who): Issuer,
    Path(service): Path<String>,
    Body(b): Body<GrayCookieRequest>,
) -> Result<Json<GrayCookie>> {
    let snap = st.snapshots.borrow().clone();
    let s = snap
        .services
        .get(&service)
        .ok_or_else(|| Error::no_service(&service))?;
    let tenant =
        graylane_strategy::parse_id(b.tenant.as_bytes()).ok_or_else(|| Error::Invalid {
            field: "tenant".into(),
            message: "not a tenant id: digits, or up to 128 characters without ';', ',', '\"', \
                      '\\' or spaces"
                .into(),
        })?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| Error::Unavailable("the control plane's clock is before 1970"))?
        .as_secs();
    let generator = &snap.cookie_generator;
    let issued = generator
        .issue(&service, &s.compiled, &tenant, now)
        .map_err(|e| Error::Conflict {
            field: match e {
                cookie::Error::NotSigned { .. } => "gray_cookie",
                _ => "gray_cookie.keys",
            }
            .into(),
            message: e.to_string(),
        })?;
    let name = s
        .compiled
        .gray_cookie()
        .map_or("tenantGray", |(n, _)| n)
        .to_string();
    let answer = match issued {
        Issued::Gray {
            value,
            key_id,
            expires,
            cluster,
            reason,
        } => {
            let max_age = expires.saturating_sub(now);
            tracing::info!(%who, %service, %tenant, %key_id, expires, "gray cookie issued");
            GrayCookie {
                set_cookie: set_cookie(&name, &value, max_age),
                service,
                version: s.version,
                tenant: tenant.to_string(),
                gray: true,
                name,
                value,
                max_age,
                expires: Some(expires),
                key_id: Some(key_id),
                cluster: Some(cluster),
                reason: Some(reason.code().to_string()),
            }
        }
        Issued::NotGray => {
            let max_age = generator.ttl_secs;
            tracing::info!(%who, %service, %tenant, "tenant not in gray: cookie 0");
            GrayCookie {
                set_cookie: set_cookie(&name, "0", max_age),
                service,
                version: s.version,
                tenant: tenant.to_string(),
                gray: false,
                name,
                value: "0".into(),
                max_age,
                expires: None,
                key_id: None,
                cluster: None,
                reason: None,
            }
        }
    };
    Ok(Json(answer))
}

/// A `Set-Cookie` value: scripts cannot read it, it travels over HTTPS only, and it is not
/// sent on cross-site subrequests.
fn set_cookie(name: &str, value: &str, max_age: u64) -> String {
    format!("{name}={value}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=Lax")
}
