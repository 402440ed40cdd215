//! Runtime health: how many healthy endpoints each cluster has right now. A fact of the
//! moment, not of the strategy, so `decide` takes it as an argument and the compiled strategy
//! stays immutable and shared.

use crate::compiled::{Compiled, MAX_CLUSTERS};
use crate::spec::Weight;

/// Healthy endpoint counts by cluster index (as in [`Compiled::clusters`]); `None` is
/// unknown. `Copy` and allocation-free: a filter keeps one per strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    counts: [Option<u32>; MAX_CLUSTERS],
}

impl Default for Health {
    fn default() -> Self {
        Health::UNKNOWN
    }
}

impl Health {
    /// Nothing known: every cluster counts as healthy.
    pub const UNKNOWN: Health = Health {
        counts: [None; MAX_CLUSTERS],
    };

    /// Counts given by cluster key (as the control plane publishes them). Keys the strategy
    /// does not have are ignored; clusters not named stay unknown.
    pub fn from_counts<K: AsRef<str>>(
        c: &Compiled,
        counts: impl IntoIterator<Item = (K, Option<u32>)>,
    ) -> Health {
        let mut h = Health::UNKNOWN;
        for (key, n) in counts {
            if let Some((i, _)) = c.cluster(key.as_ref()) {
                h.set(i, n);
            }
        }
        h
    }

    /// The count of cluster `i`, if known.
    pub fn get(&self, i: usize) -> Option<u32> {
        self.counts.get(i).copied().flatten()
    }

    /// Sets the count of cluster `i` (ignored past [`MAX_CLUSTERS`]).
    pub fn set(&mut self, i: usize, count: Option<u32>) {
        if let Some(slot) = self.counts.get_mut(i) {
            *slot = count;
        }
    }

    /// Whether cluster `i` may take traffic: its count, when known, reaches the strategy's
    /// `min_healthy`.
    pub fn is_healthy(&self, c: &Compiled, i: usize) -> bool {
        self.get(i).is_none_or(|n| n >= c.min_healthy())
    }

    /// Cluster `i`'s weight among equals: fixed, or its healthy endpoint count (1 while
    /// unknown) for `weight: endpoints`.
    pub fn weight(&self, c: &Compiled, i: usize) -> u64 {
        match c.clusters().get(i).map(|cl| cl.weight) {
            Some(Weight::Fixed(w)) => u64::from(w),
            Some(Weight::Endpoints) => u64::from(self.get(i).unwrap_or(1)),
            None => 0,
        }
    }
}
