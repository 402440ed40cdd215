//! Envoy's endpoints over gRPC xDS: an ADS server (state of the world) with CDS and EDS.
//!
//! Every Envoy cluster that a discovery source maps (see `Snapshot::endpoints`) becomes an
//! EDS cluster over ADS, and its healthy endpoints its `ClusterLoadAssignment`. Each stream
//! keeps, per resource type, the version and nonce it sent; a request whose nonce is not the
//! last one sent is stale and ignored; an ACK records the version; a NACK (`error_detail`)
//! is logged and the last good state is kept (nothing is resent until something changes).
//! CDS goes before EDS, so a new cluster is known before its endpoints arrive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
use futures::Stream;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::discovery::Endpoint;
use crate::snapshot::Snapshot;

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xds server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("xds: listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What one ADS stream has sent and been told, per resource type.
#[derive(Debug, Default)]
struct TypeState {
    subscribed: bool,
    /// Resource names asked for (EDS); empty is wildcard.
    names: BTreeSet<String>,
    sent_version: Option<u64>,
    nonce: Option<String>,
    acked: Option<String>,
    /// EDS: the endpoints last sent per cluster, so a push carries only what changed (EDS is
    /// not a state-of-the-world-complete type: an omitted assignment keeps its last value).
    /// Shared with the snapshot: an unchanged cluster is told by its pointer.
    sent: BTreeMap<String, Arc<Vec<Endpoint>>>,
}

/// The ADS service over the writer's snapshots.
#[derive(Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl Ads {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>) -> Ads {
        Ads { snapshots }
    }
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: m.encode_to_vec(),
    }
}

/// The CDS resource of one cluster: EDS over ADS.
pub fn cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: LbPolicy::RoundRobin as i32,
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource::default(),
                )),
                ..ConfigSource::default()
            }),
            service_name: String::new(),
        }),
        ..Cluster::default()
    }
}

/// The EDS resource of one cluster.
pub fn load_assignment(name: &str, endpoints: &[Endpoint]) -> ClusterLoadAssignment {
    let lb_endpoints = endpoints
        .iter()
        .map(|e| LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(PbEndpoint {
                address: Some(Address {
                    address: Some(AddressKind::SocketAddress(SocketAddress {
                        address: e.address.clone(),
                        port_specifier: Some(PortSpecifier::PortValue(u32::from(e.port))),
                        ..SocketAddress::default()
                    })),
                }),
                ..PbEndpoint::default()
            })),
            ..LbEndpoint::default()
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints,
            ..LocalityLbEndpoints::default()
        }],
        ..ClusterLoadAssignment::default()
    }
}

/// One stream's state machine: takes requests and snapshots, says what to send.
#[derive(Debug, Default)]
pub struct AdsStream {
    types: BTreeMap<String, TypeState>,
    nonce: u64,
}

impl AdsStream {
    /// Handles a request; returns the responses to send now.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Snapshot,
    ) -> Vec<DiscoveryResponse> {
        let t = self.types.entry(req.type_url.clone()).or_default();
        if !req.response_nonce.is_empty() && t.nonce.as_deref() != Some(req.response_nonce.as_str())
        {
            return Vec::new(); // stale: answers an older response
        }
        if let Some(err) = &req.error_detail {
            tracing::warn!(type_url = %req.type_url, nonce = %req.response_nonce, version = %req.version_info,
                error = %err.message, "Envoy rejected (NACK) a response; keeping the last good state");
            return Vec::new();
        }
        let names: BTreeSet<String> = req.resource_names.iter().cloned().collect();
        if !snap.xds_ready {
            // Nothing yet: Envoy keeps what it has until discovery (or the last run's
            // endpoints) can say which clusters exist.
            t.subscribed = true;
            t.names = names;
            return Vec::new();
        }
        let first = !t.subscribed;
        let names_changed = t.names != names;
        t.subscribed = true;
        t.names = names;
        if first || names_changed {
            // Newly named clusters get their assignment even if unchanged on our side.
            let keep = t.names.clone();
            t.sent.retain(|n, _| keep.contains(n));
        }
        if !req.response_nonce.is_empty() {
            t.acked = Some(req.version_info.clone());
        }
        if first || names_changed {
            let type_url = req.type_url.clone();
            return self.response(&type_url, snap).into_iter().collect();
        }
        Vec::new()
    }

    /// A new snapshot: CDS first, then EDS, for the types subscribed, when they changed.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        if !snap.xds_ready {
            return out;
        }
        for type_url in [CDS, EDS] {
            let version = version_of(type_url, snap);
            let due = self
                .types
                .get(type_url)
                .is_some_and(|t| t.subscribed && t.sent_version != Some(version));
            if due {
                out.extend(self.response(type_url, snap));
            }
        }
        out
    }

    fn response(&mut self, type_url: &str, snap: &Snapshot) -> Option<DiscoveryResponse> {
        let resources: Vec<Any> = match type_url {
            CDS => snap
                .endpoints
                .keys()
                .map(|n| any(CDS, &cluster(n)))
                .collect(),
            EDS => {
                let t = self.types.get_mut(type_url)?;
                let mut out = Vec::new();
                for (n, eps) in snap.endpoints.iter() {
                    let wanted = t.names.is_empty() || t.names.contains(n);
                    let unchanged = t
                        .sent
                        .get(n)
                        .is_some_and(|s| Arc::ptr_eq(s, eps) || **s == **eps);
                    if wanted && !unchanged {
                        out.push(any(EDS, &load_assignment(n, eps)));
                        t.sent.insert(n.clone(), eps.clone());
                    }
                }
                out
            }
            _ => Vec::new(),
        };
        let version = version_of(type_url, snap);
        if type_url == EDS && resources.is_empty() {
            if let Some(t) = self.types.get_mut(type_url) {
                if t.sent_version.is_some() {
                    t.sent_version = Some(version); // nothing this stream holds changed
                    return None;
                }
            }
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        let t = self.types.entry(type_url.to_string()).or_default();
        t.sent_version = Some(version);
        t.nonce = Some(nonce.clone());
        Some(DiscoveryResponse {
            version_info: version.to_string(),
            resources,
            type_url: type_url.to_string(),
            nonce,
            ..DiscoveryResponse::default()
        })
    }

    /// The version Envoy last acknowledged for a type.
    pub fn acked(&self, type_url: &str) -> Option<&str> {
        self.types.get(type_url).and_then(|t| t.acked.as_deref())
    }
}

/// CDS changes only when the set of clusters does; EDS whenever any endpoint does.
fn version_of(type_url: &str, snap: &Snapshot) -> u64 {
    if type_url == CDS {
        snap.clusters_version
    } else {
        snap.endpoints_version
    }
}

type Out = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaOut = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Out;
    type DeltaAggregatedResourcesStream = DeltaOut;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let mut snapshots = self.snapshots.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(
            async move {
                let mut stream = AdsStream::default();
                loop {
                    let out = tokio::select! {
                        msg = inbound.message() => match msg {
                            Ok(Some(r)) => {
                                // The snapshot is marked seen here, so whatever changed since
                                // the last push must go out now too, or `changed()` would never
                                // report it.
                                let snap = snapshots.borrow_and_update().clone();
                                let mut out = stream.on_request(&r, &snap);
                                out.extend(stream.on_snapshot(&snap));
                                out
                            }
                            Ok(None) | Err(_) => return,
                        },
                        changed = snapshots.changed() => {
                            if changed.is_err() { return; }
                            let snap = snapshots.borrow_and_update().clone();
                            stream.on_snapshot(&snap)
                        }
                    };
                    for r in out {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            .instrument(tracing::info_span!("ads_stream", %peer)),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaOut>, Status> {
        Err(Status::unimplemented(
            "graylane serves state-of-the-world ADS only",
        ))
    }
}

/// Serves ADS on `listener` until `shutdown`, over TLS when `tls` is given (with client
/// certificates required when it names client CAs).
pub async fn run(
    listener: TcpListener,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(AggregatedDiscoveryServiceServer::new(Ads::new(snapshots)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn snap(version: u64, clusters: &[(&str, u16)]) -> Snapshot {
        let endpoints = clusters
            .iter()
            .map(|(n, p)| {
                (
                    n.to_string(),
                    Arc::new(vec![Endpoint {
                        address: "127.0.0.1".into(),
                        port: *p,
                    }]),
                )
            })
            .collect();
        Snapshot {
            endpoints: Arc::new(endpoints),
            endpoints_version: version,
            clusters_version: version,
            xds_ready: true,
            ..Snapshot::default()
        }
    }

    fn req(type_url: &str, version: &str, nonce: &str, names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.into(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            ..DiscoveryRequest::default()
        }
    }

    #[test]
    fn nothing_is_answered_until_the_endpoints_are_known() {
        let mut s = AdsStream::default();
        let mut not_ready = snap(1, &[]);
        not_ready.xds_ready = false;
        // Envoy asks; a control plane that just started (no source synced, nothing kept)
        // answers nothing, so Envoy keeps the clusters it has.
        assert!(s.on_request(&req(CDS, "", "", &[]), &not_ready).is_empty());
        assert!(s.on_snapshot(&not_ready).is_empty());
        // Known: the pending subscription is answered.
        let ready = snap(2, &[("A", 1)]);
        let out = s.on_snapshot(&ready);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].type_url.as_str(), out[0].resources.len()), (CDS, 1));
    }

    #[test]
    fn versions_nonces_ack_nack_and_order() {
        let mut s = AdsStream::default();
        let v1 = snap(1, &[("A", 1), ("B", 2)]);
        // First CDS request: all clusters, version 1.
        let out = s.on_request(&req(CDS, "", "", &[]), &v1);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].version_info.as_str(), out[0].resources.len()),
            ("1", 2)
        );
        let cds_nonce = out[0].nonce.clone();
        let c = Cluster::decode(out[0].resources[0].value.as_slice()).unwrap();
        assert_eq!(c.name, "A");
        // ACK: nothing more to send; recorded.
        assert!(s
            .on_request(&req(CDS, "1", &cds_nonce, &[]), &v1)
            .is_empty());
        assert_eq!(s.acked(CDS), Some("1"));
        // EDS for the clusters named.
        let out = s.on_request(&req(EDS, "", "", &["A"]), &v1);
        assert_eq!(out[0].resources.len(), 1);
        let cla = ClusterLoadAssignment::decode(out[0].resources[0].value.as_slice()).unwrap();
        assert_eq!(cla.cluster_name, "A");
        let eds_nonce = out[0].nonce.clone();
        // A request answering an older nonce is stale: ignored.
        assert!(s
            .on_request(&req(EDS, "0", &cds_nonce, &["A", "B"]), &v1)
            .is_empty());
        // A NACK keeps the last good state and sends nothing.
        let mut nack = req(EDS, "1", &eds_nonce, &["A"]);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad".into(),
            details: vec![],
        });
        assert!(s.on_request(&nack, &v1).is_empty());
        assert_eq!(s.acked(EDS), None);
        // A new snapshot: CDS before EDS, both at version 2.
        let v2 = snap(2, &[("A", 3), ("B", 2), ("C", 4)]);
        let out = s.on_snapshot(&v2);
        let types: Vec<&str> = out.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, vec![CDS, EDS]);
        assert!(out.iter().all(|r| r.version_info == "2"));
        // The same snapshot again: nothing.
        assert!(s.on_snapshot(&v2).is_empty());
    }
}
