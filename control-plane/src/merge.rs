//! File edits and API edits, merged three ways (as `kubectl apply` does with its
//! last-applied configuration). Pure.
//!
//! - `base`: the strategies of the config file as last applied;
//! - `file`: the strategies of the file as read now;
//! - `live`: the strategies in force (the file's, plus what the API changed since).
//!
//! A reload applies what changed in the file since `base` and keeps everything else of `live`,
//! field by field: objects merge key by key (services, clusters, a cluster's fields, `id`,
//! `percent`...), anything else (a state, a weight, a list of ids, a rule list) is one field.
//! A field the file changed and the API changed too, to different values, is a conflict: the
//! live value stays (an operator's API edit is never undone by a file edit made without
//! knowing it) and the conflict is reported, unless the operator asks for the file to win
//! (`graylane reload --file-wins`). Without a `base` (a store from before this rule), the file
//! is applied as it is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// A field changed in the file and through the API since the file was last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Conflict {
    /// `services.web.route-strategy.A.status`.
    pub field: String,
    /// The value in the file, and the live one (kept), shortened when long.
    pub file: String,
    pub live: String,
}

/// What a reload makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    /// Every service's strategy after the merge (JSON, as the strategy type serialises).
    pub services: BTreeMap<String, Value>,
    pub conflicts: Vec<Conflict>,
    /// The base of the next merge: the file, except that a conflict the live value won keeps
    /// its old base, so it stays a conflict (and `--file-wins` can still take the file's
    /// value) until the file or the API agree.
    pub next_base: BTreeMap<String, Value>,
}

/// The file's value wins conflicts, or the live one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    Live,
    File,
}

/// Merges `file` into `live` given `base` (see the module's doc).
pub fn three_way(
    base: Option<&BTreeMap<String, Value>>,
    file: &BTreeMap<String, Value>,
    live: &BTreeMap<String, Value>,
    prefer: Prefer,
) -> Merged {
    let Some(base) = base else {
        return Merged {
            services: file.clone(),
            conflicts: Vec::new(),
            next_base: file.clone(),
        };
    };
    let wrap = |m: &BTreeMap<String, Value>| {
        Value::Object(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    };
    let mut conflicts = Vec::new();
    let (merged, next) = merge(
        Some(&wrap(base)),
        Some(&wrap(file)),
        Some(&wrap(live)),
        "services",
        prefer,
        &mut conflicts,
    );
    let unwrap = |v: Option<Value>| match v {
        Some(Value::Object(m)) => m.into_iter().collect(),
        _ => BTreeMap::new(),
    };
    Merged {
        services: unwrap(merged),
        conflicts,
        next_base: unwrap(next),
    }
}

/// One field (absent: `None`) merged, and its next base; `None` when absent.
fn merge(
    base: Option<&Value>,
    file: Option<&Value>,
    live: Option<&Value>,
    at: &str,
    prefer: Prefer,
    conflicts: &mut Vec<Conflict>,
) -> (Option<Value>, Option<Value>) {
    if file == base {
        return (live.cloned(), file.cloned()); // the file did not touch it
    }
    if live == base || live == file {
        return (file.cloned(), file.cloned()); // only the file changed it (or both alike)
    }
    // Both changed it, differently: objects merge key by key, anything else is a conflict.
    if let (Some(Value::Object(f)), Some(Value::Object(l))) = (file, live) {
        let empty = Map::new();
        let b = match base {
            Some(Value::Object(b)) => b,
            _ => &empty,
        };
        let mut keys: Vec<&String> = b.keys().chain(f.keys()).chain(l.keys()).collect();
        keys.sort();
        keys.dedup();
        let (mut out, mut next) = (Map::new(), Map::new());
        for k in keys {
            let field = format!("{at}.{k}");
            let (v, n) = merge(b.get(k), f.get(k), l.get(k), &field, prefer, conflicts);
            if let Some(v) = v {
                out.insert(k.clone(), v);
            }
            if let Some(n) = n {
                next.insert(k.clone(), n);
            }
        }
        return (Some(Value::Object(out)), Some(Value::Object(next)));
    }
    conflicts.push(Conflict {
        field: at.to_string(),
        file: short(file),
        live: short(live),
    });
    match prefer {
        Prefer::File => (file.cloned(), file.cloned()),
        Prefer::Live => (live.cloned(), base.cloned()),
    }
}

/// A value as a conflict shows it: absent, or its JSON, shortened past 80 characters.
fn short(v: Option<&Value>) -> String {
    let Some(v) = v else {
        return "(absent)".into();
    };
    if let Value::Array(items) = v {
        if items.len() > 8 {
            return format!("a list of {}", items.len());
        }
    }
    let text = v.to_string();
    if text.chars().count() > 80 {
        let cut: String = text.chars().take(77).collect();
        format!("{cut}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn services(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    fn web(a: Value, b: Value) -> Value {
        json!({"route-strategy": {"A": a, "B": b}})
    }

    #[test]
    fn the_file_applies_its_own_changes_and_keeps_the_apis() {
        let base = services(
            json!({"web": web(json!({"status": "Y", "id": {"ids": [1]}}),
                                             json!({"status": "G", "id": {"all": true}})),
                                    "old": web(json!({"status": "G"}), json!({"status": "R"}))}),
        );
        // The API set A to G; the file adds id 2 to A, drops service old, adds service new.
        let live = services(
            json!({"web": web(json!({"status": "G", "id": {"ids": [1]}}),
                                             json!({"status": "G", "id": {"all": true}})),
                                    "old": web(json!({"status": "G"}), json!({"status": "R"}))}),
        );
        let file = services(
            json!({"web": web(json!({"status": "Y", "id": {"ids": [1, 2]}}),
                                             json!({"status": "G", "id": {"all": true}})),
                                    "new": web(json!({"status": "G"}), json!({"status": "R"}))}),
        );
        let m = three_way(Some(&base), &file, &live, Prefer::Live);
        assert_eq!(m.conflicts, vec![]);
        assert_eq!(
            m.services,
            services(
                json!({"web": web(json!({"status": "G", "id": {"ids": [1, 2]}}),
                                      json!({"status": "G", "id": {"all": true}})),
                            "new": web(json!({"status": "G"}), json!({"status": "R"}))})
            )
        );
        // No base: the file as it is.
        let m = three_way(None, &file, &live, Prefer::Live);
        assert_eq!(m.services, file);
    }

    #[test]
    fn a_field_both_changed_keeps_the_live_value_unless_the_file_must_win() {
        let base = services(
            json!({"web": web(json!({"status": "Y", "id": {"ids": [1]}}), json!({"status": "G"}))}),
        );
        let live = services(
            json!({"web": web(json!({"status": "R", "id": {"ids": (1..=20).collect::<Vec<u32>>()}}), json!({"status": "G"}))}),
        );
        let file = services(
            json!({"web": web(json!({"status": "G", "id": {"ids": [1, 2]}}), json!({"status": "G", "weight": 3}))}),
        );
        let m = three_way(Some(&base), &file, &live, Prefer::Live);
        assert_eq!(
            m.conflicts,
            vec![
                Conflict {
                    field: "services.web.route-strategy.A.id.ids".into(),
                    file: "[1,2]".into(),
                    live: "a list of 20".into(),
                },
                Conflict {
                    field: "services.web.route-strategy.A.status".into(),
                    file: "\"G\"".into(),
                    live: "\"R\"".into(),
                },
            ]
        );
        let a = &m.services["web"]["route-strategy"]["A"];
        assert_eq!(a["status"], "R");
        assert_eq!(a["id"]["ids"].as_array().unwrap().len(), 20);
        assert_eq!(
            m.services["web"]["route-strategy"]["B"]["weight"], 3,
            "the file's own change"
        );
        // The next base keeps the conflicts' old values: the same file again still conflicts.
        let again = three_way(Some(&m.next_base), &file, &m.services, Prefer::Live);
        assert_eq!(again.conflicts, m.conflicts);
        assert_eq!(again.services, m.services);
        let m = three_way(Some(&base), &file, &live, Prefer::File);
        assert_eq!(m.conflicts.len(), 2, "still reported");
        assert_eq!(m.services, file);
        assert_eq!(m.next_base, file);
    }
}
