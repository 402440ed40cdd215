//! Resources for other systems, rendered from graylane's own model as YAML documents:
//! `graylane render istio` (routing) here, `graylane install` (deployment) beside it.

pub mod istio;

use serde_json::Value;

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
