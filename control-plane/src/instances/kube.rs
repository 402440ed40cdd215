//! The Kubernetes driver: a cluster is one Deployment, scaled through its `scale` subresource
//! (the only permission it needs: `get`/`patch` on `deployments/scale`). The release then
//! waits for the Deployment's ready endpoints through discovery.

use k8s_openapi::api::apps::v1::Deployment as K8sDeployment;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use super::Error;
use crate::discovery::kube::DnsLabel;

/// Which Deployment a cluster is (`{namespace: shop, deployment: web-a}`). Both are DNS
/// labels (a Deployment name may be a longer DNS subdomain; graylane asks for the common,
/// stricter form so that a typo is caught when the file is read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub namespace: DnsLabel,
    pub deployment: DnsLabel,
}

/// Sets the Deployment's replicas to `to` (a merge patch of the scale subresource: the same
/// request `kubectl scale` makes); returns what the API server says it now wants.
pub async fn scale(client: kube::Client, d: &Deployment, to: u32) -> Result<String, Error> {
    let api: Api<K8sDeployment> = Api::namespaced(client, &d.namespace.to_string());
    let name = d.deployment.to_string();
    let patch = serde_json::json!({"spec": {"replicas": to}});
    let scale = api
        .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|source| Error::Kube {
            namespace: d.namespace.to_string(),
            name: name.clone(),
            source,
        })?;
    let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or_default();
    Ok(format!(
        "Deployment {}/{name}: replicas {replicas}",
        d.namespace
    ))
}
