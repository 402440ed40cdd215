//! The filter's cache of verified gray cookies is the strategy crate's (shared with the nginx
//! library): `graylane_strategy::verdicts`.

pub use graylane_strategy::verdicts::{Cached, Verdicts, CAPACITY};
