//! Validation errors. Each names the field at fault with a dotted path.

/// A strategy could not be parsed or validated.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// Syntax or type error while parsing, with the path of the field and, for YAML, the
    /// position in the text.
    #[error("{path}: {message}{}", location.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
    Parse {
        path: String,
        message: String,
        location: Option<(usize, usize)>,
    },
    /// The document parsed but breaks a rule of the model.
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Error {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The dotted path of the field at fault.
    pub fn path(&self) -> &str {
        match self {
            Error::Parse { path, .. } | Error::Invalid { path, .. } => path,
        }
    }

    /// Prefixes the path, for errors found inside a larger document.
    #[must_use]
    pub fn within(self, prefix: &str) -> Self {
        let join = |p: String| {
            if p.is_empty() || p == "." {
                prefix.to_string()
            } else {
                format!("{prefix}.{p}")
            }
        };
        match self {
            Error::Parse {
                path,
                message,
                location,
            } => Error::Parse {
                path: join(path),
                message,
                location,
            },
            Error::Invalid { path, message } => Error::Invalid {
                path: join(path),
                message,
            },
        }
    }
}
