//! `graylane render <target>`: configuration for another system, rendered from graylane's own
//! model and printed for the operator to install: an nginx include file (`nginx`), Istio
//! routing resources as YAML documents (`istio`); `graylane install` (deployment) is beside it.
//! Pure text generation: nothing is changed anywhere.

pub mod istio;
pub mod nginx;

use clap::Subcommand;
use serde_json::Value;

/// What `graylane render` can produce.
#[derive(Debug, Subcommand)]
pub enum Target {
    /// An nginx include file (http context): graylane's Lua glue, one upstream and one server
    /// per service.
    Nginx(Box<nginx::Args>),
    /// DestinationRules and VirtualServices routing by the filter's header, and the
    /// header-hygiene EnvoyFilter.
    Istio(Box<istio::Args>),
}

/// One output document: a comment saying what it is for, and the resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub comment: String,
    pub value: Value,
}

impl Document {
    pub fn new(comment: &str, value: Value) -> Document {
        Document {
            comment: comment.trim().to_string(),
            value,
        }
    }
}

/// The documents as one YAML stream (`---` before each), each preceded by its comment.
pub fn to_yaml(docs: &[Document]) -> String {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        for line in d.comment.lines().filter(|_| !d.comment.is_empty()) {
            if line.is_empty() {
                out.push_str("#\n");
            } else {
                out.push_str(&format!("# {line}\n"));
            }
        }
        out.push_str(&yaml(&d.value));
    }
    out
}

/// YAML text of `value`: multi-line strings as literal blocks (`|`), single-line strings as
/// plain or quoted scalars, never folded (`>`), so that long commands and type URLs read as
/// written. serde-saphyr, the project's YAML library, quotes what YAML would read otherwise
/// (`"Y"`, `"0.1.0"`, `"false"`).
pub fn yaml(value: &impl serde::Serialize) -> String {
    let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX };
    serde_saphyr::to_string_with_options(value, options).unwrap_or_default()
}
