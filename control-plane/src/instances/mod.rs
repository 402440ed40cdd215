//! Instance drivers: who starts and stops a cluster's instances for the releases (seed 000's
//! "start B at A's size", one-by-one's "one instance up, one down"). Per cluster, in
//! graylane.yaml's `instances:` section:
//!
//! ```yaml
//! instances:
//!   web:
//!     A: {kubernetes: {namespace: shop, deployment: web-a}}   # the Deployment's scale subresource
//!     B: {hooks: {scale: ["/usr/local/bin/scale", "{cluster}", "{n}"], timeout: 60s}}
//! ```
//!
//! A cluster without a driver is scaled by someone else while the release waits and says
//! for what. A driver only asks; the release then waits for discovery (Kubernetes' ready
//! endpoints, Consul's health) to show the instances healthy.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod hook;
pub mod kube;

/// Starts and stops instances. IO lives behind it; the release machine only says what it
/// wants ([`crate::release::Effect::Scale`]).
pub trait Driver: Send + Sync + 'static {
    /// Whether this driver starts and stops `service`'s `cluster`.
    fn drives(&self, service: &str, cluster: &str) -> bool;
    /// Asks for `to` instances of `cluster` (`current`: its healthy count now, if known);
    /// returns what the driver printed (a tail), once it has asked.
    fn scale(
        &self,
        service: &str,
        cluster: &str,
        current: Option<u32>,
        to: u32,
    ) -> BoxFuture<'static, Result<String, Error>>;
}

/// A driver that could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{service}/{cluster} has no instance driver")]
    NotDriven { service: String, cluster: String },
    #[error("scaling Deployment {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: ::kube::Error,
    },
    #[error("Kubernetes driver for {cluster}: no Kubernetes client (discovery.kubernetes)")]
    NoKubeClient { cluster: String },
    #[error(transparent)]
    Hook(#[from] hook::Error),
}

/// One cluster's driver, as configured (a value of this type is valid: parsing checks it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ClusterDriver {
    /// Scale this Deployment through its `scale` subresource.
    Kubernetes(kube::Deployment),
    /// Run these commands.
    Hooks(hook::Hooks),
}

/// `instances:` in graylane.yaml: service -> cluster -> driver.
pub type Config = BTreeMap<String, BTreeMap<String, ClusterDriver>>;

/// The configured drivers, one per cluster.
pub struct Drivers {
    config: Config,
    kube: Option<::kube::Client>,
}

impl Drivers {
    /// `kube`: the client for Kubernetes drivers (from `discovery.kubernetes`); without one a
    /// Kubernetes driver answers with an error (the release pauses and says why).
    pub fn new(config: Config, kube: Option<::kube::Client>) -> Drivers {
        Drivers { config, kube }
    }

    fn get(&self, service: &str, cluster: &str) -> Option<&ClusterDriver> {
        self.config.get(service)?.get(cluster)
    }
}

impl Driver for Drivers {
    fn drives(&self, service: &str, cluster: &str) -> bool {
        self.get(service, cluster).is_some()
    }

    fn scale(
        &self,
        service: &str,
        cluster: &str,
        current: Option<u32>,
        to: u32,
    ) -> BoxFuture<'static, Result<String, Error>> {
        let not_driven = || Error::NotDriven {
            service: service.to_string(),
            cluster: cluster.to_string(),
        };
        match self.get(service, cluster).cloned() {
            None => Box::pin(futures::future::ready(Err(not_driven()))),
            Some(ClusterDriver::Kubernetes(d)) => {
                let client = self.kube.clone();
                let cluster = cluster.to_string();
                Box::pin(async move {
                    let Some(client) = client else {
                        return Err(Error::NoKubeClient { cluster });
                    };
                    kube::scale(client, &d, to).await
                })
            }
            Some(ClusterDriver::Hooks(h)) => {
                let (service, cluster) = (service.to_string(), cluster.to_string());
                Box::pin(async move { Ok(hook::run(&h, &service, &cluster, current, to).await?) })
            }
        }
    }
}

/// Checks `instances:` against the services and their strategies; the error names the field.
pub fn check(
    config: &Config,
    has_cluster: impl Fn(&str, &str) -> Option<bool>,
) -> Result<(), (String, String)> {
    for (service, clusters) in config {
        for cluster in clusters.keys() {
            match has_cluster(service, cluster) {
                None => {
                    return Err((
                        format!("instances.{service}"),
                        format!("no service {service:?}"),
                    ))
                }
                Some(false) => {
                    return Err((
                        format!("instances.{service}.{cluster}"),
                        format!("{service}'s strategy has no cluster {cluster:?}"),
                    ))
                }
                Some(true) => {}
            }
        }
    }
    Ok(())
}

/// A driver that records what it was asked and answers at once (tests of the writer).
#[derive(Default)]
pub struct Recorder {
    pub driven: Vec<(String, String)>,
    pub asked: std::sync::Mutex<Vec<(String, String, u32)>>,
}

impl Recorder {
    pub fn new(driven: &[(&str, &str)]) -> Arc<Recorder> {
        Arc::new(Recorder {
            driven: driven
                .iter()
                .map(|(s, c)| (s.to_string(), c.to_string()))
                .collect(),
            asked: std::sync::Mutex::default(),
        })
    }

    pub fn asked(&self) -> Vec<(String, String, u32)> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Driver for Recorder {
    fn drives(&self, service: &str, cluster: &str) -> bool {
        self.driven
            .iter()
            .any(|(s, c)| s == service && c == cluster)
    }

    fn scale(
        &self,
        service: &str,
        cluster: &str,
        _current: Option<u32>,
        to: u32,
    ) -> BoxFuture<'static, Result<String, Error>> {
        self.asked.lock().unwrap_or_else(|p| p.into_inner()).push((
            service.to_string(),
            cluster.to_string(),
            to,
        ));
        Box::pin(futures::future::ready(Ok(String::new())))
    }
}
