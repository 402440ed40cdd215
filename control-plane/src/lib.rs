//! graylane control plane.

pub mod discovery;
