//! The API's errors: one exhaustive enum, mapped to an HTTP status and a stable code in one
//! place, sources kept for the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::ErrorBody;
use crate::{store, writer};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("{message}")]
    NotFound { field: String, message: String },
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// The request is fine but the configuration cannot serve it (e.g. no signing key the
    /// strategy lists).
    #[error("{message}")]
    Conflict { field: String, message: String },
    #[error("the body is larger than this route accepts (see `limits` in graylane.yaml)")]
    TooLarge,
    #[error("{0}")]
    Unavailable(&'static str),
    /// Too many failed authentications from this address: retry after this many seconds.
    #[error("too many failed authentications from this address: retry in {0} s")]
    TooManyFailures(u64),
    #[error(transparent)]
    Store(#[from] store::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Error::NotFound {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn no_service(name: &str) -> Self {
        Error::not_found("service", format!("no service {name:?}"))
    }

    /// The status and stable code of each error.
    fn status(&self) -> (StatusCode, &'static str) {
        match self {
            Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            Error::Invalid { .. } => (StatusCode::BAD_REQUEST, "invalid"),
            Error::Conflict { .. } => (StatusCode::CONFLICT, "conflict"),
            Error::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Error::TooManyFailures(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_failures"),
            Error::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "store_error"),
        }
    }
}

impl From<writer::Error> for Error {
    fn from(e: writer::Error) -> Self {
        match e {
            writer::Error::NotFound { field, message } => Error::NotFound { field, message },
            writer::Error::Invalid { field, message } => Error::Invalid { field, message },
            writer::Error::Conflict { field, message } => Error::Conflict { field, message },
            writer::Error::Store(s) => Error::Store(s),
            writer::Error::Stopped => Error::Unavailable("the control plane is shutting down"),
        }
    }
}

impl From<graylane_strategy::Error> for Error {
    fn from(e: graylane_strategy::Error) -> Self {
        Error::Invalid {
            field: e.path().to_string(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status();
        if status.is_server_error() {
            tracing::error!(error = &self as &dyn std::error::Error, "request failed");
        }
        let field = match &self {
            Error::NotFound { field, .. }
            | Error::Invalid { field, .. }
            | Error::Conflict { field, .. } => Some(field.clone()),
            _ => None,
        };
        let body = ErrorBody {
            code: code.to_string(),
            message: self.to_string(),
            field,
        };
        let mut response = (status, Json(body)).into_response();
        if let Error::TooManyFailures(secs) = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        response
    }
}
