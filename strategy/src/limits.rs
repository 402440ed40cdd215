//! Size limits of a strategy: how many ids, intervals and match rules one service may have.
//! Checked on the parsed strategy before it is compiled, by the control plane (on every edit
//! and on the config file) and by the filter (on its plugin configuration and on every feed
//! answer), so an oversized strategy is refused with an error naming the field and the limit,
//! and never replaces a good one.

use serde::{Deserialize, Serialize};

use crate::{Error, StrategySpec};

/// The limits, per service (summed over its clusters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SizeLimits {
    /// Whitelisted ids (numeric and string), over every cluster.
    #[serde(default = "default_ids")]
    pub ids: usize,
    /// Whitelisted intervals, over every cluster.
    #[serde(default = "default_intervals")]
    pub intervals: usize,
    /// Cookie and header rules, counting each value of a `one_of` as one, over every cluster.
    #[serde(default = "default_rules")]
    pub rules: usize,
}

fn default_ids() -> usize {
    5_000_000
}
fn default_intervals() -> usize {
    1_000_000
}
fn default_rules() -> usize {
    10_000
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits {
            ids: default_ids(),
            intervals: default_intervals(),
            rules: default_rules(),
        }
    }
}

impl SizeLimits {
    /// Checks `spec`; the error names the first cluster field that takes the service past a
    /// limit (`route-strategy.<cluster>.id.ids`, `.id.interval`, `.cookies` / `.headers`).
    pub fn check(&self, spec: &StrategySpec) -> Result<(), Error> {
        let (mut ids, mut intervals, mut rules) = (0usize, 0usize, 0usize);
        for (key, c) in &spec.clusters {
            let at = |field: &str| format!("route-strategy.{key}.{field}");
            ids += c.id.ids.len();
            if ids > self.ids {
                return Err(over(at("id.ids"), ids, self.ids, "ids"));
            }
            intervals += c.id.interval.len();
            if intervals > self.intervals {
                return Err(over(
                    at("id.interval"),
                    intervals,
                    self.intervals,
                    "intervals",
                ));
            }
            for (field, list) in [("cookies", &c.cookies), ("headers", &c.headers)] {
                rules += list
                    .iter()
                    .map(|m| m.one_of.as_ref().map_or(1, |v| v.len().max(1)))
                    .sum::<usize>();
                if rules > self.rules {
                    return Err(over(at(field), rules, self.rules, "rules"));
                }
            }
        }
        Ok(())
    }
}

fn over(path: String, n: usize, limit: usize, what: &str) -> Error {
    Error::Invalid {
        path,
        message: format!(
            "the service has {n} {what} here, more than the limit of {limit} (limits.{what})"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn each_limit_names_the_field_that_passes_it() {
        let spec = crate::parse_json(
            br#"{"route-strategy": {
                "A": {"status": "Y", "id": {"ids": [1, 2, 3], "interval": [[1, 5], [9, 10]]},
                      "headers": [{"name": "x-a", "one_of": ["1", "2", "3"]}]},
                "B": {"status": "G", "id": {"all": true, "ids": [4, "acme"]},
                      "cookies": [{"name": "c", "exact": "1"}]}}}"#,
        )
        .unwrap();
        assert!(SizeLimits::default().check(&spec).is_ok());
        let exact = SizeLimits {
            ids: 5,
            intervals: 2,
            rules: 4,
        };
        assert!(exact.check(&spec).is_ok(), "limits are inclusive");
        let e = SizeLimits { ids: 4, ..exact }.check(&spec).unwrap_err();
        assert_eq!(e.path(), "route-strategy.B.id.ids");
        assert_eq!(
            e.to_string(),
            "route-strategy.B.id.ids: the service has 5 ids here, more than the limit of 4 (limits.ids)"
        );
        let e = SizeLimits {
            intervals: 1,
            ..exact
        }
        .check(&spec)
        .unwrap_err();
        assert_eq!(e.path(), "route-strategy.A.id.interval");
        let e = SizeLimits { rules: 3, ..exact }.check(&spec).unwrap_err();
        assert_eq!(e.path(), "route-strategy.B.cookies");
    }
}
