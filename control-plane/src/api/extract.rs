//! Extractors every handler shares: who is calling (the bearer token, checked before any body
//! is read) and the JSON body (limited per route, errors naming the field).

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::Error;
use super::AppState;
use crate::config::{Role, Token};

/// A caller allowed to read (any known token).
pub struct Reader(#[allow(dead_code)] pub String);

/// A caller allowed to write; holds the token's name (the author of what it writes).
pub struct Writer(pub String);

/// A caller allowed to ask for gray cookies (role `issuer`: the auth service); holds the
/// token's name.
pub struct Issuer(pub String);

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// Compares secrets in constant time (both hashed first, so their lengths do not leak).
pub fn same_secret(given: &str, want: &str) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(want));
    a.ct_eq(&b).into()
}

/// A data plane's call (the feed, traffic reports): with a feed token configured, the caller
/// must present it; with TLS client CAs configured, its connection must have presented a
/// client certificate they verify.
pub struct DataPlane;

impl FromRequestParts<AppState> for DataPlane {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let cert = parts.extensions.get::<crate::tls::ClientCert>().copied();
        if cert.is_some_and(|c| c.required && !c.presented) {
            return Err(Error::Unauthorized(
                "a client certificate signed by tls.client_ca is required",
            ));
        }
        guarded(state, &parts.extensions, || {
            let want = state.snapshots.borrow().feed_token.clone();
            match want {
                Some(want)
                    if !bearer(&parts.headers)
                        .is_some_and(|given| same_secret(given, want.expose())) =>
                {
                    Err(Error::Unauthorized("feed token required"))
                }
                _ => Ok(DataPlane),
            }
        })
    }
}

/// The token `given` names, comparing with every token (no early exit).
fn find<'t>(tokens: &'t [Token], given: &str) -> Option<&'t Token> {
    let mut found = None;
    for t in tokens {
        if same_secret(given, t.token.expose()) {
            found = Some(t);
        }
    }
    found
}

/// The peer's address (absent when the router is driven without a socket, as in tests).
fn peer(extensions: &axum::http::Extensions) -> IpAddr {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

/// Runs `check` unless the peer is blocked for failing too often; counts its failures.
fn guarded<T>(
    state: &AppState,
    extensions: &axum::http::Extensions,
    check: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    let peer = peer(extensions);
    let now = std::time::Instant::now();
    if let Some(wait) = state.guard.blocked(peer, now) {
        return Err(Error::TooManyFailures(wait.as_secs().max(1)));
    }
    check().inspect_err(|e| {
        if matches!(e, Error::Unauthorized(_)) {
            state.guard.failed(peer, now, &e.to_string());
        }
    })
}

fn authorize(state: &AppState, parts: &Parts, need: Role) -> Result<String, Error> {
    guarded(state, &parts.extensions, || {
        let snap = state.snapshots.borrow().clone();
        let given = bearer(&parts.headers).ok_or(Error::Unauthorized("missing bearer token"))?;
        let tok = find(&snap.tokens, given).ok_or(Error::Unauthorized("unknown token"))?;
        if !tok.role.allows(need) {
            return Err(Error::Forbidden(format!(
                "token {:?} has role {}; this needs {}",
                tok.name,
                tok.role.as_str(),
                need.as_str()
            )));
        }
        Ok(tok.name.clone())
    })
}

impl FromRequestParts<AppState> for Reader {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        authorize(state, parts, Role::Read).map(Reader)
    }
}

impl FromRequestParts<AppState> for Writer {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        authorize(state, parts, Role::Write).map(Writer)
    }
}

impl FromRequestParts<AppState> for Issuer {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        authorize(state, parts, Role::Issuer).map(Issuer)
    }
}

/// A JSON body of type `T`, parsed with the field path in errors. Its size is bounded by the
/// route's `DefaultBodyLimit`; a larger one is a JSON `413`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = Error;
    async fn from_request(req: Request, state: &S) -> Result<Self, Error> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(f) if f.status().as_u16() == 413 => Error::TooLarge,
            other => Error::Invalid {
                field: "body".into(),
                message: other.body_text(),
            },
        })?;
        let value = graylane_strategy::spec::parse_json_as(&bytes)?;
        Ok(Body(value))
    }
}
