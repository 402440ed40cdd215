//! graylane's decision model: one service's strategy, validated, compiled and decided.
//!
//! ```text
//!  StrategySpec (serde: JSON / YAML, seed 000's `route-strategy` as-is)
//!        │  Compiled::try_from   (checked while compiled; errors name the field)
//!        ▼
//!  Compiled (immutable: sorted id vectors, disjoint intervals, matchers)   Health (counts now)
//!        │                                                                   │
//!  RequestView (headers, caller lane, now, draw) ──▶ decide(&Compiled, &Health, &RequestView)
//!                                                     ──▶ Decision { cluster, reason }
//! ```
//!
//! No IO, no clock, no randomness: time and random draws are arguments, so the filter (wasm)
//! and the control plane's explain API get the same answer for the same input.

pub mod cookie;
mod decide;
pub mod error;
pub mod hash;
pub mod id;
pub mod limits;
pub mod name;
pub mod request;
pub mod sketch;
pub mod spec;
pub mod traffic;
pub mod verdicts;

pub use decide::{
    decide, decide_with, gray_whitelist, tenant_hash, tenant_of, Decision, Explanation, Fallback,
    Reason,
};
pub use error::Error;
pub use id::{parse_id, Id};
pub use limits::SizeLimits;
pub use request::{Headers, RequestView};
pub use spec::{
    ClusterSpec, GrayCookieMode, GrayCookieSpec, IdSpec, IdentitySource, Lane, LaneSpec, MatchSpec,
    PercentBy, PercentSpec, PublicKeySpec, State, StrategySpec, Weight,
};

mod compiled;
pub mod feed;
mod health;
pub use compiled::{Compiled, CompiledCluster, Matcher, Percent, MAX_CLUSTERS};
pub use health::Health;
pub use spec::parse_json;
#[cfg(feature = "yaml")]
pub use spec::parse_yaml;
