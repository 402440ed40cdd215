//! Which endpoints serve each cluster: a pure index of what the discovery sources reported,
//! and the Envoy clusters' endpoints as the xDS server serves them, drain windows included.
//! No IO and no clock of its own (time is an argument), so both are unit-tested directly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::discovery::{Endpoint, SourceKind};

/// The last set each source reported, per (service, cluster key). Sets kept by the last run
/// (the store) are *restored*: served until their source has synced, then replaced by what it
/// reports (or dropped when it reports nothing for that cluster any more).
#[derive(Debug, Default)]
pub struct Index {
    sets: BTreeMap<(String, String), BTreeMap<SourceKind, Entry>>,
    /// Changed since last taken, to be kept for the next run.
    dirty: BTreeSet<(SourceKind, String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    endpoints: Vec<Endpoint>,
    restored: bool,
}

impl Index {
    /// Records `source`'s current set for a cluster; true when what is served changed.
    pub fn set(
        &mut self,
        source: SourceKind,
        service: &str,
        cluster: &str,
        endpoints: Vec<Endpoint>,
    ) -> bool {
        let by_source = self
            .sets
            .entry((service.to_string(), cluster.to_string()))
            .or_default();
        let entry = Entry {
            endpoints,
            restored: false,
        };
        match by_source.get(&source) {
            Some(e) if *e == entry => return false,
            Some(e) if e.endpoints == entry.endpoints => {
                // Confirmed by the source: no longer restored, nothing served changes.
                by_source.insert(source, entry);
                return false;
            }
            _ => {}
        }
        by_source.insert(source, entry);
        self.dirty
            .insert((source, service.to_string(), cluster.to_string()));
        true
    }

    /// A set kept by the last run, served until `source` syncs.
    pub fn restore(
        &mut self,
        source: SourceKind,
        service: &str,
        cluster: &str,
        endpoints: Vec<Endpoint>,
    ) {
        self.sets
            .entry((service.to_string(), cluster.to_string()))
            .or_default()
            .entry(source)
            .or_insert(Entry {
                endpoints,
                restored: true,
            });
    }

    /// `source` has synced: its restored sets that it did not report again are dropped.
    /// Returns the services whose endpoints changed.
    pub fn synced(&mut self, source: SourceKind) -> BTreeSet<String> {
        let mut changed = BTreeSet::new();
        for ((service, cluster), by_source) in self.sets.iter_mut() {
            if by_source.get(&source).is_some_and(|e| e.restored) {
                by_source.remove(&source);
                changed.insert(service.clone());
                self.dirty
                    .insert((source, service.clone(), cluster.clone()));
            }
        }
        self.sets.retain(|_, by_source| !by_source.is_empty());
        changed
    }

    /// Whether any set of `source` is still the one restored from the last run.
    pub fn has_restored(&self, source: SourceKind) -> bool {
        self.sets
            .values()
            .any(|by_source| by_source.get(&source).is_some_and(|e| e.restored))
    }

    /// The sets changed since the last call, as rows to keep (`None`: gone).
    pub fn take_dirty(&mut self) -> Vec<crate::store::EndpointRow> {
        std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|(source, service, cluster)| {
                let endpoints = self
                    .sets
                    .get(&(service.clone(), cluster.clone()))
                    .and_then(|by_source| by_source.get(&source))
                    .filter(|e| !e.restored)
                    .map(|e| e.endpoints.clone());
                crate::store::EndpointRow {
                    source,
                    service,
                    cluster,
                    endpoints,
                }
            })
            .collect()
    }

    /// Whether rows wait to be kept.
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The healthy endpoints of a cluster over every source (sorted, deduplicated), or `None`
    /// when no source maps it.
    pub fn cluster(&self, service: &str, cluster: &str) -> Option<Vec<Endpoint>> {
        let by_source = self.sets.get(&(service.to_string(), cluster.to_string()))?;
        let set: BTreeSet<&Endpoint> = by_source.values().flat_map(|e| &e.endpoints).collect();
        Some(set.into_iter().cloned().collect())
    }
}

/// The endpoints xDS serves per Envoy cluster. A cluster whose registry set becomes empty
/// keeps serving its last endpoints for the drain window (requests already routed there, and
/// filters not yet told to move away, still find a host), then has none.
#[derive(Debug)]
pub struct Envoy {
    /// Shared with the snapshots and the xDS streams: a publish copies pointers, and a
    /// stream tells an unchanged cluster by the pointer.
    served: BTreeMap<String, Arc<Vec<Endpoint>>>,
    /// Emptied clusters still serving their last endpoints, and until when.
    draining: BTreeMap<String, Instant>,
    drain: Duration,
}

impl Envoy {
    pub fn new(drain: Duration) -> Envoy {
        Envoy {
            served: BTreeMap::new(),
            draining: BTreeMap::new(),
            drain,
        }
    }

    /// What xDS serves.
    pub fn served(&self) -> &BTreeMap<String, Arc<Vec<Endpoint>>> {
        &self.served
    }

    /// Cluster `name`'s registry set is now `endpoints`; true when what is served changed.
    pub fn update(&mut self, name: &str, endpoints: Vec<Endpoint>, now: Instant) -> bool {
        if endpoints.is_empty() {
            match self.served.get(name) {
                Some(cur) if !cur.is_empty() => {
                    // Keep serving the last endpoints until the window ends (not re-armed by
                    // later empty reports).
                    self.draining
                        .entry(name.to_string())
                        .or_insert(now + self.drain);
                    false
                }
                Some(_) => false,
                None => {
                    self.served.insert(name.to_string(), Arc::new(Vec::new()));
                    true
                }
            }
        } else {
            self.draining.remove(name);
            if self.served.get(name).is_some_and(|cur| **cur == endpoints) {
                return false;
            }
            self.served.insert(name.to_string(), Arc::new(endpoints));
            true
        }
    }

    /// Cluster `name` is no longer mapped by any service; true when it was served.
    pub fn remove(&mut self, name: &str) -> bool {
        self.draining.remove(name);
        self.served.remove(name).is_some()
    }

    /// When the next drain window ends.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining.values().min().copied()
    }

    /// Ends the drain windows that are over at `now`; true when what is served changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let over: Vec<String> = self
            .draining
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in &over {
            self.draining.remove(name);
            self.served.insert(name.clone(), Arc::new(Vec::new()));
        }
        !over.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: "10.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn index_unions_sources_and_reports_changes_only() {
        let mut i = Index::default();
        assert_eq!(i.cluster("web", "A"), None);
        assert!(i.set(SourceKind::Consul, "web", "A", vec![ep(2), ep(1)]));
        assert!(!i.set(SourceKind::Consul, "web", "A", vec![ep(2), ep(1)]));
        assert!(i.set(SourceKind::Kubernetes, "web", "A", vec![ep(1), ep(3)]));
        assert_eq!(i.cluster("web", "A"), Some(vec![ep(1), ep(2), ep(3)]));
        assert!(i.set(SourceKind::Consul, "web", "A", vec![]));
        assert_eq!(i.cluster("web", "A"), Some(vec![ep(1), ep(3)]));
        assert!(i.set(SourceKind::Kubernetes, "web", "A", vec![]));
        assert_eq!(i.cluster("web", "A"), Some(vec![]), "mapped, none healthy");
        assert_eq!(i.cluster("web", "B"), None);
    }

    #[test]
    fn restored_sets_serve_until_their_source_syncs_and_changes_are_kept() {
        let mut i = Index::default();
        i.restore(SourceKind::Consul, "web", "A", vec![ep(1)]);
        i.restore(SourceKind::Consul, "web", "gone", vec![ep(9)]);
        i.restore(SourceKind::Kubernetes, "api", "B", vec![ep(5)]);
        assert!(i.has_restored(SourceKind::Consul));
        assert_eq!(i.cluster("web", "A"), Some(vec![ep(1)]));
        assert!(!i.is_dirty(), "restoring writes nothing back");
        // Consul confirms A unchanged (nothing served changes), replaces nothing else yet.
        assert!(!i.set(SourceKind::Consul, "web", "A", vec![ep(1)]));
        // It syncs: `gone` was not reported again and is dropped; Kubernetes' stays.
        let changed = i.synced(SourceKind::Consul);
        assert_eq!(changed, BTreeSet::from(["web".to_string()]));
        assert!(!i.has_restored(SourceKind::Consul));
        assert!(i.has_restored(SourceKind::Kubernetes));
        assert_eq!(i.cluster("web", "gone"), None);
        assert_eq!(i.cluster("api", "B"), Some(vec![ep(5)]));
        // What is kept: `gone` deleted. A was confirmed, not changed.
        let rows = i.take_dirty();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].cluster.as_str(), rows[0].endpoints.clone()),
            ("gone", None)
        );
        assert!(i.set(SourceKind::Consul, "web", "A", vec![ep(2)]));
        let rows = i.take_dirty();
        assert_eq!(rows[0].endpoints, Some(vec![ep(2)]));
        assert!(!i.is_dirty());
    }

    #[test]
    fn an_emptied_cluster_drains_for_the_window_then_has_none() {
        let t0 = Instant::now();
        let mut e = Envoy::new(Duration::from_secs(10));
        assert!(e.update("A", vec![ep(1)], t0));
        assert_eq!(e.next_deadline(), None);
        // Emptied: still served, a deadline is set.
        assert!(!e.update("A", vec![], t0 + Duration::from_secs(1)));
        assert_eq!(*e.served()["A"], vec![ep(1)]);
        let deadline = t0 + Duration::from_secs(11);
        assert_eq!(e.next_deadline(), Some(deadline));
        // More empty reports do not move the deadline.
        assert!(!e.update("A", vec![], t0 + Duration::from_secs(5)));
        assert_eq!(e.next_deadline(), Some(deadline));
        assert!(!e.expire(deadline - Duration::from_millis(1)));
        assert!(e.expire(deadline));
        assert_eq!(*e.served()["A"], Vec::<Endpoint>::new());
        assert_eq!(e.next_deadline(), None);
        assert!(!e.expire(deadline + Duration::from_secs(60)));
        // Instances back: served at once.
        assert!(e.update("A", vec![ep(2)], deadline + Duration::from_secs(61)));
        assert_eq!(*e.served()["A"], vec![ep(2)]);
    }

    #[test]
    fn instances_returning_during_the_window_end_it() {
        let t0 = Instant::now();
        let mut e = Envoy::new(Duration::from_secs(10));
        e.update("A", vec![ep(1)], t0);
        e.update("A", vec![], t0);
        assert!(e.update("A", vec![ep(3)], t0 + Duration::from_secs(2)));
        assert_eq!(e.next_deadline(), None);
        assert!(!e.expire(t0 + Duration::from_secs(30)));
        assert_eq!(*e.served()["A"], vec![ep(3)]);
        // A cluster first seen empty is served empty, with no window.
        assert!(e.update("B", vec![], t0));
        assert_eq!(e.next_deadline(), None);
        assert!(e.remove("B"));
        assert!(!e.served().contains_key("B"));
    }
}
