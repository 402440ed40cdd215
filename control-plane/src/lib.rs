//! graylane control plane.
