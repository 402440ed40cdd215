//! Consul's `/v1/health/service/<name>` answer and the pure grouping of its entries into
//! graylane clusters.
//!
//! An instance is healthy when every one of its checks (node and service) is `passing`. Its
//! address is `Service.Address`, or `Node.Address` when that is empty.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Mapping;
use crate::discovery::Endpoint;

/// The parts of one `/v1/health/service` entry graylane reads (Consul adds fields freely).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Entry {
    node: Node,
    service: AgentService,
    #[serde(default, deserialize_with = "null_as_default")]
    checks: Vec<Check>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Check {
    status: String,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Parses an answer's body.
pub(super) fn parse(body: &[u8]) -> Result<Vec<Entry>, serde_json::Error> {
    serde_json::from_slice(body)
}

impl Entry {
    /// Every check passes (a node in maintenance has a critical check, so it is excluded).
    fn healthy(&self) -> bool {
        self.checks.iter().all(|c| c.status == "passing")
    }

    /// Where the instance listens: none without an address or with port 0.
    fn endpoint(&self) -> Option<Endpoint> {
        let address = if self.service.address.is_empty() {
            &self.node.address
        } else {
            &self.service.address
        };
        (!address.is_empty() && self.service.port != 0).then(|| Endpoint {
            address: address.clone(),
            port: self.service.port,
        })
    }

    /// The clusters `mapping` puts this instance in: by its meta value, or by its tags.
    fn clusters<'m>(&self, mapping: &'m Mapping) -> Vec<&'m str> {
        match &mapping.meta {
            Some(key) => self
                .service
                .meta
                .as_ref()
                .and_then(|m| m.get(key.as_str()))
                .and_then(|v| mapping.clusters.get(v))
                .into_iter()
                .collect(),
            None => self
                .service
                .tags
                .iter()
                .flatten()
                .filter_map(|t| mapping.clusters.get(t))
                .collect(),
        }
    }
}

/// Healthy endpoints of every cluster `mapping` names (each present, maybe empty), sorted and
/// deduplicated.
pub(super) fn group(mapping: &Mapping, entries: &[Entry]) -> BTreeMap<String, Vec<Endpoint>> {
    let mut out: BTreeMap<String, Vec<Endpoint>> = mapping
        .clusters
        .clusters()
        .map(|c| (c.to_owned(), Vec::new()))
        .collect();
    for e in entries.iter().filter(|e| e.healthy()) {
        let Some(endpoint) = e.endpoint() else {
            continue;
        };
        for c in e.clusters(mapping) {
            out.entry(c.to_owned()).or_default().push(endpoint.clone());
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn entries(json: &str) -> Vec<Entry> {
        parse(json.as_bytes()).unwrap()
    }

    fn mapping(yaml: &str) -> Mapping {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn documented_sample_parses_and_is_healthy() {
        // The verbatim sample response of Consul's docs (see tests/fixtures/SOURCES.md).
        let e = entries(include_str!(
            "../../../tests/fixtures/consul_health_service.json"
        ));
        assert_eq!(e.len(), 1);
        assert!(e[0].healthy());
        assert_eq!(
            e[0].endpoint(),
            Some(Endpoint {
                address: "10.1.10.12".into(),
                port: 8000
            })
        );
    }

    #[test]
    fn empty_service_address_means_node_address() {
        // Prometheus' fixture has `"Address": ""` on the service.
        let e = entries(include_str!(
            "../../../tests/fixtures/consul_health_service.prometheus-test.json"
        ));
        assert_eq!(
            e[0].endpoint(),
            Some(Endpoint {
                address: "1.1.1.1".into(),
                port: 3341
            })
        );
    }

    #[test]
    fn grouping_by_meta_and_by_tag() {
        let json = r#"[
          {"Node":{"Address":"10.0.0.1"},"Service":{"Address":"","Port":80,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[{"Status":"passing"},{"Status":"passing"}]},
          {"Node":{"Address":"10.0.0.2"},"Service":{"Address":"10.9.9.2","Port":80,"Tags":null,"Meta":{"profile":"prod"}},
           "Checks":[{"Status":"passing"}]},
          {"Node":{"Address":"10.0.0.3"},"Service":{"Address":"","Port":80,"Tags":["prod"],"Meta":{"profile":"prod"}},
           "Checks":[{"Status":"passing"},{"Status":"warning"}]},
          {"Node":{"Address":"10.0.0.4"},"Service":{"Address":"","Port":80,"Tags":["gray","prod"],"Meta":null},
           "Checks":null},
          {"Node":{"Address":"10.0.0.1"},"Service":{"ID":"same-again","Address":"10.0.0.1","Port":80,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[{"Status":"passing"}]},
          {"Node":{"Address":""},"Service":{"Address":"","Port":80,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[]},
          {"Node":{"Address":"10.0.0.6"},"Service":{"Address":"","Port":0,"Tags":["gray"],"Meta":{"profile":"gray"}},
           "Checks":[]}
        ]"#;
        let e = entries(json);
        let addrs = |v: &Vec<Endpoint>| v.iter().map(|e| e.address.clone()).collect::<Vec<_>>();
        let g = group(
            &mapping("meta: profile\nclusters: {gray: A, prod: B}\n"),
            &e,
        );
        assert_eq!(addrs(&g["A"]), ["10.0.0.1"]);
        assert_eq!(addrs(&g["B"]), ["10.9.9.2"]); // 10.0.0.3 has a warning check
        let g = group(&mapping("clusters: {gray: A, prod: B}\n"), &e);
        assert_eq!(addrs(&g["A"]), ["10.0.0.1", "10.0.0.4"]);
        assert_eq!(addrs(&g["B"]), ["10.0.0.4"]);
        // Every mapped cluster is present, even with no instance; unmapped values go nowhere.
        let g = group(&mapping("meta: profile\nclusters: {canary: C}\n"), &e);
        assert_eq!(g.len(), 1);
        assert!(g["C"].is_empty());
    }
}
