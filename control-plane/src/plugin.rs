//! The filter's `.wasm`, served by the control plane with its sha256, so that an Istio
//! WasmPlugin can load it without a registry:
//! `url: http://graylane.graylane-system.svc.cluster.local:9901/v1/plugin.wasm` plus
//! `sha256: <hex>` (istio-agent fetches the URL and checks the module's sha256).
//!
//! `graylane.yaml` names the file (`plugin: {wasm: /usr/share/graylane/graylane_filter.wasm}`,
//! relative to the config file); it is read and hashed once at start, then served from memory.
//! Neither route needs a token: the module is no secret, and istio-agent sends none. The routes
//! are part of the API's router and document ([`routes`]); the loaded module reaches them as a
//! request extension (`serve` adds it), so without one they answer 404.
//!
//! - `GET /v1/plugin.wasm`: the module, `application/wasm`, with `ETag: "sha256:<hex>"`,
//!   `Repr-Digest: sha-256=:<base64>:` (RFC 9530) and `X-Graylane-Sha256: <hex>`;
//!   `If-None-Match` with the same ETag answers 304.
//! - `GET /v1/plugin`: `{"sha256": "<hex>", "size": <bytes>, "path": "/v1/plugin.wasm"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
// base64: already in the dependency tree (through kube and reqwest); RFC 4648 with padding.
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::api::types::ErrorBody;

/// The `plugin:` block of `graylane.yaml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The filter's `.wasm` (relative paths are relative to the config file).
    pub wasm: PathBuf,
}

/// Why the plugin could not be loaded; names the config field.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{file}: plugin.wasm: cannot read {path}: {source}")]
    Read {
        file: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: plugin.wasm: {path} is not a WebAssembly module (no \\0asm header)")]
    NotWasm { file: String, path: PathBuf },
}

/// A loaded module: its bytes and their sha256, computed once.
#[derive(Debug, Clone)]
pub struct Plugin {
    bytes: Bytes,
    sha256: String,
    etag: HeaderValue,
    repr_digest: HeaderValue,
}

/// The JSON of `GET /v1/plugin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Info {
    pub sha256: String,
    pub size: u64,
    pub path: String,
}

pub const WASM_PATH: &str = "/v1/plugin.wasm";

impl Plugin {
    /// Reads `cfg.wasm` (relative to `config_file`'s directory) and hashes it.
    pub fn load(cfg: &Config, config_file: &Path) -> Result<Plugin, Error> {
        let path = match config_file.parent() {
            Some(dir) if cfg.wasm.is_relative() => dir.join(&cfg.wasm),
            _ => cfg.wasm.clone(),
        };
        let file = config_file.display().to_string();
        let bytes = std::fs::read(&path).map_err(|source| Error::Read {
            file: file.clone(),
            path: path.clone(),
            source,
        })?;
        Plugin::new(bytes).ok_or(Error::NotWasm { file, path })
    }

    /// The module in `bytes`, or `None` if it does not start with the Wasm magic.
    pub fn new(bytes: Vec<u8>) -> Option<Plugin> {
        if bytes.len() < 8 || bytes[..4] != *b"\0asm" {
            return None;
        }
        let digest = Sha256::digest(&bytes);
        let sha256: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        // Both are ASCII built from hex and base64 digits: always valid header values.
        let etag = HeaderValue::from_str(&format!("\"sha256:{sha256}\"")).ok()?;
        let repr_digest =
            HeaderValue::from_str(&format!("sha-256=:{}:", STANDARD.encode(digest))).ok()?;
        Some(Plugin {
            bytes: Bytes::from(bytes),
            sha256,
            etag,
            repr_digest,
        })
    }

    /// Lowercase hex: the WasmPlugin's `sha256` field for an `http://` URL.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    pub fn info(&self) -> Info {
        Info {
            sha256: self.sha256.clone(),
            size: self.bytes.len() as u64,
            path: WASM_PATH.into(),
        }
    }
}

/// `GET /v1/plugin.wasm` and `GET /v1/plugin`, for the API's router (`api::api` merges them,
/// so they are in the OpenAPI document). The module comes from an `Extension<Arc<Plugin>>`
/// layer: `api::router(..).layer(Extension(plugin))`.
pub fn routes<S: Clone + Send + Sync + 'static>() -> OpenApiRouter<S> {
    OpenApiRouter::new()
        .routes(routes!(wasm))
        .routes(routes!(info))
}

fn none() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            code: "not_found".into(),
            message: "no plugin configured (set plugin.wasm in graylane.yaml)".into(),
            field: Some("plugin.wasm".into()),
        }),
    )
        .into_response()
}

/// The filter's .wasm, for an Istio WasmPlugin's `url` (with `sha256`).
#[utoipa::path(get, path = "/v1/plugin.wasm", tag = "data plane",
    responses((status = OK, description = "the module; ETag \"sha256:<hex>\", Repr-Digest, X-Graylane-Sha256",
                content_type = "application/wasm", body = Vec<u8>),
              (status = NOT_MODIFIED, description = "If-None-Match names this module"),
              (status = NOT_FOUND, description = "no plugin configured", body = ErrorBody)))]
pub async fn wasm(plugin: Option<Extension<Arc<Plugin>>>, headers: HeaderMap) -> Response {
    let Some(Extension(p)) = plugin else {
        return none();
    };
    let cached = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == p.etag.to_str().unwrap_or_default()
        });
    let common = [
        (header::ETAG, p.etag.clone()),
        (
            header::HeaderName::from_static("repr-digest"),
            p.repr_digest.clone(),
        ),
        (
            header::HeaderName::from_static("x-graylane-sha256"),
            HeaderValue::from_str(&p.sha256).unwrap_or(HeaderValue::from_static("")),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if cached {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (
        StatusCode::OK,
        common,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/wasm"),
        )],
        p.bytes.clone(),
    )
        .into_response()
}

/// The module's sha256 and size.
#[utoipa::path(get, path = "/v1/plugin", tag = "data plane",
    responses((status = OK, description = "the served module", body = Info),
              (status = NOT_FOUND, description = "no plugin configured", body = ErrorBody)))]
pub async fn info(plugin: Option<Extension<Arc<Plugin>>>) -> Response {
    match plugin {
        Some(Extension(p)) => Json(p.info()).into_response(),
        None => none(),
    }
}
