//! The pure index from a namespace's EndpointSlices (and, for the pod-label mode, its pods'
//! labels) to every cluster's healthy endpoints. No IO: the watch hands it the reflector's
//! slices and its memo of pod labels.
//!
//! An endpoint is healthy when `ready` is not false (unset means ready, per the API) and
//! `terminating` is not true. `serving`-but-terminating endpoints are not used: graylane falls
//! back to another cluster instead of draining into one that is going away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ::kube::api::{PartialObjectMeta, ResourceExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use tracing::debug;

use super::{Assign, Target, SERVICE_NAME_LABEL};
use crate::discovery::Endpoint;

/// A pod as the pod watch sees it: metadata only.
pub(super) type PodMeta = PartialObjectMeta<Pod>;

/// One pod's values of the labels graylane maps.
pub(super) type Labels = BTreeMap<String, String>;

/// Pod name -> its mapped labels, for the pods of one namespace.
pub(super) type PodLabels = BTreeMap<String, Labels>;

/// A pod's values of the label `keys`.
pub(super) fn mapped_labels(pod: &PodMeta, keys: &BTreeSet<String>) -> Labels {
    pod.labels()
        .iter()
        .filter(|(k, _)| keys.contains(*k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Healthy, deduplicated endpoints of every cluster of `t` (each present, maybe empty).
pub(super) fn endpoints_of(
    t: &Target,
    slices: &[Arc<EndpointSlice>],
    pods: &PodLabels,
) -> BTreeMap<String, Vec<Endpoint>> {
    let mut out: BTreeMap<String, BTreeSet<Endpoint>> = t
        .assign
        .clusters()
        .into_iter()
        .map(|c| (c.to_owned(), BTreeSet::new()))
        .collect();
    for slice in slices {
        if slice.labels().get(SERVICE_NAME_LABEL) != Some(&t.k8s_service) {
            continue;
        }
        // Envoy endpoints are IP addresses; FQDN slices (deprecated) are not used.
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(port) = pick_port(slice, t.port.as_deref()) else {
            debug!(slice = %slice.name_any(), "no usable port");
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| healthy(e)) {
            let cluster = match &t.assign {
                Assign::Fixed(c) => Some(c.as_str()),
                Assign::PodLabel { key, clusters } => {
                    pod_label(ep, &t.namespace, key, pods).and_then(|v| clusters.get(v))
                }
            };
            let Some(set) = cluster.and_then(|c| out.get_mut(c)) else {
                continue;
            };
            for address in &ep.addresses {
                set.insert(Endpoint {
                    address: address.clone(),
                    port,
                });
            }
        }
    }
    out.into_iter()
        .map(|(c, set)| (c, set.into_iter().collect()))
        .collect()
}

/// Ready (unset counts as ready, as the API documents) and not terminating.
pub(super) fn healthy(ep: &SliceEndpoint) -> bool {
    let Some(c) = &ep.conditions else {
        return true;
    };
    c.ready != Some(false) && c.terminating != Some(true)
}

/// The slice's port named `name`; without a name the only port, else `http`, else the first.
pub(super) fn pick_port(slice: &EndpointSlice, name: Option<&str>) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let chosen = match name {
        Some(n) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
        None if ports.len() == 1 => ports.first(),
        None => ports
            .iter()
            .find(|p| p.name.as_deref() == Some("http"))
            .or_else(|| ports.first()),
    }?;
    chosen
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// The value of label `key` on the pod behind `ep` (its `targetRef`), among the pods of
/// `namespace`.
pub(super) fn pod_label<'p>(
    ep: &SliceEndpoint,
    namespace: &str,
    key: &str,
    pods: &'p PodLabels,
) -> Option<&'p str> {
    let r = ep.target_ref.as_ref()?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    if r.namespace.as_deref().is_some_and(|ns| ns != namespace) {
        return None;
    }
    let labels = pods.get(r.name.as_deref()?)?;
    labels.get(key).map(String::as_str)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use serde_json::json;

    use super::*;

    fn slice(json: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn endpoint(json: serde_json::Value) -> SliceEndpoint {
        serde_json::from_value(json).unwrap()
    }

    fn target(svc: &str, assign: Assign) -> Target {
        Target {
            service: "web".into(),
            namespace: "default".into(),
            k8s_service: svc.into(),
            port: None,
            assign,
        }
    }

    fn fixed(cluster: &str, svc: &str) -> Target {
        target(svc, Assign::Fixed(cluster.into()))
    }

    fn ep(address: &str, port: u16) -> Endpoint {
        Endpoint {
            address: address.into(),
            port,
        }
    }

    #[test]
    fn documented_example_is_one_ready_endpoint() {
        let s: EndpointSlice =
            serde_json::from_str(include_str!("../../../tests/fixtures/endpointslice.json"))
                .unwrap();
        let out = endpoints_of(&fixed("B", "example"), &[Arc::new(s)], &PodLabels::new());
        assert_eq!(out["B"], [ep("10.1.2.3", 80)]);
    }

    #[test]
    fn conditions_dedup_and_ports() {
        let e =
            |addr: &str, cond: serde_json::Value| json!({"addresses": [addr], "conditions": cond});
        let a = slice(json!({
            "metadata": {"name": "web-a", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}],
            "endpoints": [
                e("10.0.0.1", json!({"ready": true})),
                e("10.0.0.2", json!({"ready": false, "serving": true, "terminating": true})),
                e("10.0.0.3", json!({})),
                e("10.0.0.4", json!({"ready": false})),
            ]
        }));
        let b = slice(json!({
            "metadata": {"name": "web-b", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [e("10.0.0.1", json!({"ready": true, "serving": true, "terminating": false}))]
        }));
        let fqdn = slice(json!({
            "metadata": {"name": "web-fqdn", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "FQDN",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [e("web.example.com", json!({"ready": true}))]
        }));
        let other = slice(json!({
            "metadata": {"name": "api-a", "labels": {SERVICE_NAME_LABEL: "api"}},
            "addressType": "IPv4",
            "ports": [{"port": 1}],
            "endpoints": [e("10.9.9.9", json!({"ready": true}))]
        }));
        let out = endpoints_of(&fixed("A", "web"), &[a, b, fqdn, other], &PodLabels::new());
        assert_eq!(out["A"], [ep("10.0.0.1", 8080), ep("10.0.0.3", 8080)]);
    }

    #[test]
    fn ports_are_picked_by_name_then_only_then_http_then_first() {
        let s = |ports: serde_json::Value| -> EndpointSlice {
            serde_json::from_value(
                json!({"metadata": {}, "addressType": "IPv4", "ports": ports, "endpoints": []}),
            )
            .unwrap()
        };
        let two = s(json!([{"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}]));
        assert_eq!(pick_port(&two, None), Some(8080));
        assert_eq!(pick_port(&two, Some("metrics")), Some(9090));
        assert_eq!(pick_port(&two, Some("grpc")), None);
        let unnamed = s(json!([{"port": 7000}, {"port": 7001}]));
        assert_eq!(pick_port(&unnamed, None), Some(7000));
        assert_eq!(
            pick_port(&s(json!([{"name": "x", "port": 81}])), None),
            Some(81)
        );
        assert_eq!(pick_port(&s(json!([{"port": 0}])), None), None);
        assert_eq!(pick_port(&s(json!([{"port": 70000}])), None), None);
        assert_eq!(pick_port(&s(json!([])), None), None);
    }

    #[test]
    fn pod_label_follows_the_target_ref_within_the_namespace() {
        let pods: PodLabels = [
            (
                "web-a".to_owned(),
                Labels::from([("profile".into(), "gray".into())]),
            ),
            ("web-b".to_owned(), Labels::new()),
        ]
        .into();
        let of = |target_ref: serde_json::Value| {
            endpoint(json!({"addresses": ["10.0.0.1"], "targetRef": target_ref}))
        };
        let label = |e: &SliceEndpoint| pod_label(e, "shop", "profile", &pods).map(str::to_owned);
        assert_eq!(
            label(&of(json!({"kind": "Pod", "name": "web-a"}))).as_deref(),
            Some("gray")
        );
        assert_eq!(
            label(&of(
                json!({"kind": "Pod", "namespace": "shop", "name": "web-a"})
            ))
            .as_deref(),
            Some("gray")
        );
        assert_eq!(
            label(&of(
                json!({"kind": "Pod", "namespace": "other", "name": "web-a"})
            )),
            None
        );
        assert_eq!(label(&of(json!({"kind": "Node", "name": "web-a"}))), None);
        assert_eq!(label(&of(json!({"kind": "Pod", "name": "web-b"}))), None);
        assert_eq!(label(&of(json!({"kind": "Pod", "name": "gone"}))), None);
        assert_eq!(label(&endpoint(json!({"addresses": ["10.0.0.1"]}))), None);
    }

    #[test]
    fn pod_label_mode_sorts_endpoints_into_clusters() {
        let t = Target {
            namespace: "shop".into(),
            ..target(
                "web",
                Assign::PodLabel {
                    key: "profile".into(),
                    clusters: serde_json::from_value(json!({"gray": "A", "prod": "B"})).unwrap(),
                },
            )
        };
        let of = |addr: &str, pod: &str| json!({"addresses": [addr], "targetRef": {"kind": "Pod", "name": pod}});
        let s = slice(json!({
            "metadata": {"name": "web-1", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [of("10.0.0.1", "a"), of("10.0.0.2", "b"), of("10.0.0.3", "c"),
                          of("10.0.0.4", "unknown"), {"addresses": ["10.0.0.5"]}]
        }));
        let labels = |v: &str| Labels::from([("profile".into(), v.into())]);
        let pods: PodLabels = [
            ("a".to_owned(), labels("gray")),
            ("b".to_owned(), labels("prod")),
            ("c".to_owned(), labels("canary")),
        ]
        .into();
        let out = endpoints_of(&t, &[s], &pods);
        assert_eq!(out["A"], [ep("10.0.0.1", 8080)]);
        assert_eq!(out["B"], [ep("10.0.0.2", 8080)]);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn mapped_labels_keep_only_the_mapped_keys() {
        let pod: PodMeta = serde_json::from_value(json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "a", "labels": {"profile": "gray", "app": "web", "pod-template-hash": "5c4b"}}
        }))
        .unwrap();
        let keys = BTreeSet::from(["profile".to_owned(), "lane".to_owned()]);
        assert_eq!(
            mapped_labels(&pod, &keys),
            Labels::from([("profile".into(), "gray".into())])
        );
    }
}
