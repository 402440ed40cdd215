//! `graylane render istio`: Istio-native routing for each managed service, from its strategy.
//!
//! The filter names the chosen version in the route header (`x-graylane-cluster: <envoy
//! cluster>`); Envoy selects the route again after the filter writes it, so a VirtualService
//! whose routes match that header's exact values sends each request to the chosen version:
//!
//! ```text
//!  VirtualService b (hosts: every host of b's versions)
//!    x-graylane-cluster == outbound|8080|gray|b.prod.svc.cluster.local  -> b.prod, subset gray
//!    x-graylane-cluster == outbound|8080|prod|b.prod.svc.cluster.local  -> b.prod, subset prod
//!    no header (filter not loaded, failed open, unmanaged caller)       -> the G version(s)
//!  DestinationRule b.prod: subsets by the `profile` label   (subsets layout)
//!  -- or one host per namespace, b.prod... / b.gray... (namespaces layout, seed 003)
//! ```
//!
//! Where each version lives comes from its Envoy cluster name when that is an Istio outbound
//! cluster name (`outbound|PORT|SUBSET|HOST`), else from the options: the layout, and each
//! cluster's profile (`--profile KEY=VALUE`, else its explicit `lane`, else its key). Pure:
//! strategy and options in, documents out. The default route follows the strategy's G
//! clusters, so re-render on every version (a release swaps the stable cluster): the control
//! plane does it itself with `istio.apply` (mesh.rs, the same [`render`]).
//!
//! Header hygiene: the route header must not come from a client. A VirtualService's
//! `headers.request.remove` is applied by the router after the route was chosen, so it cannot
//! protect the choice; a WasmPlugin stripping it is Wasm too (and fails the same way as the
//! filter). So one EnvoyFilter merges an early header mutation into the connection manager of
//! every gateway and sidecar outbound listener, which runs before any HTTP filter and before
//! route selection ([`header_hygiene`], docs/istio.md).

use std::collections::{BTreeMap, BTreeSet};

use graylane_strategy::{State, StrategySpec};
use serde_json::{json, Value};

use super::Document;

/// What is wrong, and with which field or option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("services.{service}.route-strategy: no G cluster, so requests without the route header would have nowhere to go")]
    NoStable { service: String },
    #[error("services.{service}.route-strategy.{cluster}: {message}")]
    Cluster {
        service: String,
        cluster: String,
        message: String,
    },
    #[error("--{option}: {message}")]
    Option {
        option: &'static str,
        message: String,
    },
}

/// Where the versions of a service live, when their cluster names do not say.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// One Service; versions are subsets selected by the profile label.
    Subsets,
    /// One Service per namespace, the namespace named by the profile (seed 003).
    Namespaces,
}

/// How to render.
#[derive(Debug, Clone)]
pub struct Options {
    pub layout: Layout,
    /// The service's namespace (subsets layout, for clusters without an Istio name).
    pub namespace: String,
    /// Where the VirtualService goes; default: the namespace of the first host (sorted).
    /// DestinationRules always go to their host's namespace, where Istio looks them up.
    pub vs_namespace: Option<String>,
    pub domain: String,
    pub port: Option<u16>,
    /// The pod label that subsets select on.
    pub label: String,
    /// Cluster key -> profile value.
    pub profiles: BTreeMap<String, String>,
    pub route_header: String,
    /// Gateways (`namespace/name`) the VirtualService also binds to, besides the mesh.
    pub gateways: Vec<String>,
    /// Extra hosts (the gateway's external names).
    pub hosts: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            layout: Layout::Subsets,
            namespace: "default".into(),
            vs_namespace: None,
            domain: "cluster.local".into(),
            port: None,
            label: "profile".into(),
            profiles: BTreeMap::new(),
            route_header: "x-graylane-cluster".into(),
            gateways: Vec::new(),
            hosts: Vec::new(),
        }
    }
}

impl Options {
    /// Checks the options themselves (the strategy is checked by [`render`]); the error names
    /// the option (`--namespace`; `istio.namespace` in graylane.yaml).
    pub fn check(&self) -> Result<(), Error> {
        let opts = self;
        for (option, ns) in [
            ("namespace", Some(&opts.namespace)),
            ("vs-namespace", opts.vs_namespace.as_ref()),
        ] {
            if ns.is_some_and(|ns| !dns_label(ns)) {
                return Err(Error::Option {
                    option,
                    message: "a DNS label".into(),
                });
            }
        }
        if !dns_label(
            &opts
                .label
                .replace(['.', '/', '_'], "-")
                .to_ascii_lowercase(),
        ) {
            return Err(Error::Option {
                option: "label",
                message: "a label key".into(),
            });
        }
        for g in &opts.gateways {
            if g.is_empty() || g.contains(char::is_whitespace) {
                return Err(Error::Option {
                    option: "gateway",
                    message: format!("{g:?}: namespace/name"),
                });
            }
        }
        for (key, profile) in &self.profiles {
            if !dns_label(profile) {
                return Err(Error::Option {
                    option: "profile",
                    message: format!("{key}={profile}: the profile is not a DNS label"),
                });
            }
        }
        if self.route_header.is_empty()
            || !self
                .route_header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(Error::Option {
                option: "route-header",
                message: "a lowercase header name".into(),
            });
        }
        if !dns_name(&self.domain) {
            return Err(Error::Option {
                option: "domain",
                message: "a DNS name".into(),
            });
        }
        Ok(())
    }
}

/// Where one version's requests go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Destination {
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
}

impl Destination {
    /// Parses an Istio outbound cluster name, `outbound|8080|gray|b.prod.svc.cluster.local`
    /// (the subset may be empty).
    pub fn from_istio_cluster(name: &str) -> Option<Destination> {
        let mut parts = name.split('|');
        let (Some("outbound"), Some(port), Some(subset), Some(host), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
        if !dns_name(host) {
            return None;
        }
        Some(Destination {
            host: host.to_string(),
            subset: (!subset.is_empty()).then(|| subset.to_string()),
            port: Some(port),
        })
    }

    fn value(&self) -> Value {
        let mut d = json!({"host": self.host});
        if let Some(s) = &self.subset {
            d["subset"] = json!(s);
        }
        if let Some(p) = self.port {
            d["port"] = json!({"number": p});
        }
        d
    }

    /// The namespace in `<name>.<namespace>.svc.<domain>`.
    fn namespace(&self) -> Option<&str> {
        let mut it = self.host.split('.');
        let (_, ns, svc) = (it.next()?, it.next()?, it.next()?);
        (svc == "svc").then_some(ns)
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// One version of the service, as rendered.
#[derive(Debug, Clone)]
struct Version {
    key: String,
    /// The route header's value for it.
    envoy_cluster: String,
    state: State,
    weight: u32,
    dest: Destination,
}

fn versions(service: &str, spec: &StrategySpec, opts: &Options) -> Result<Vec<Version>, Error> {
    let err = |cluster: &str, message: String| Error::Cluster {
        service: service.into(),
        cluster: cluster.into(),
        message,
    };
    let mut out: Vec<Version> = Vec::new();
    for (key, c) in &spec.clusters {
        let envoy_cluster = c.cluster.clone().unwrap_or_else(|| key.clone());
        let dest = match Destination::from_istio_cluster(&envoy_cluster) {
            Some(d) => d,
            None => {
                let profile = opts
                    .profiles
                    .get(key)
                    .cloned()
                    .or_else(|| c.lane.map(|l| l.as_str().to_string()))
                    .unwrap_or_else(|| key.clone());
                if !dns_label(&profile) {
                    return Err(err(
                        key,
                        format!(
                            "profile {profile:?} is not a DNS label; give the cluster an Istio name \
                             (cluster: outbound|PORT|SUBSET|HOST), a lane, or --profile {key}=VALUE"
                        ),
                    ));
                }
                match opts.layout {
                    Layout::Subsets => Destination {
                        host: format!("{service}.{}.svc.{}", opts.namespace, opts.domain),
                        subset: Some(profile),
                        port: opts.port,
                    },
                    Layout::Namespaces => Destination {
                        host: format!("{service}.{profile}.svc.{}", opts.domain),
                        subset: None,
                        port: opts.port,
                    },
                }
            }
        };
        if let Some(other) = out.iter().find(|v| v.dest == dest) {
            return Err(err(
                key,
                format!("goes to the same destination as cluster {}", other.key),
            ));
        }
        if let Some(other) = out.iter().find(|v| v.envoy_cluster == envoy_cluster) {
            return Err(err(
                key,
                format!(
                    "has the same Envoy cluster name as cluster {}: the route header could not tell them apart",
                    other.key
                ),
            ));
        }
        out.push(Version {
            key: key.clone(),
            envoy_cluster,
            state: c.status,
            // `endpoints` weights follow live endpoint counts, which a static route cannot:
            // the default route (used only without the filter) gives those equal shares.
            weight: match c.weight {
                graylane_strategy::Weight::Fixed(w) => w,
                graylane_strategy::Weight::Endpoints => 1,
            },
            dest,
        });
    }
    Ok(out)
}

/// Integer percentages summing to 100, in proportion to `weights` (largest remainder).
fn percentages(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let mut out: Vec<u32> = weights
        .iter()
        .map(|w| (u64::from(*w) * 100 / total) as u32)
        .collect();
    let mut rest = 100 - out.iter().sum::<u32>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse((u64::from(weights[i]) * 100) % total));
    for i in order {
        if rest == 0 {
            break;
        }
        out[i] += 1;
        rest -= 1;
    }
    out
}

fn name_of(service: &str) -> String {
    format!(
        "graylane-{}",
        service.replace(['_', '.'], "-").to_ascii_lowercase()
    )
}

fn labels(service: &str) -> Value {
    json!({"app.kubernetes.io/managed-by": "graylane", "graylane.io/service": service})
}

/// The DestinationRule(s) and the VirtualService of one service.
pub fn render(service: &str, spec: &StrategySpec, opts: &Options) -> Result<Vec<Document>, Error> {
    opts.check()?;
    if !spec.clusters.values().any(|c| c.status == State::G) {
        return Err(Error::NoStable {
            service: service.into(),
        });
    }
    let versions = versions(service, spec, opts)?;
    let stable: Vec<&Version> = versions.iter().filter(|v| v.state == State::G).collect();
    // Where the VirtualService goes must not depend on states (a re-render after a release
    // would leave the old one behind): the namespace given, else the first host's.
    let first_host = versions.iter().map(|v| &v.dest).min();
    let namespace = match (
        &opts.vs_namespace,
        first_host.and_then(Destination::namespace),
    ) {
        (Some(ns), _) => ns.clone(),
        (None, Some(ns)) => ns.to_string(),
        (None, None) => opts.namespace.clone(),
    };
    let name = name_of(service);
    let mut docs = Vec::new();

    // DestinationRules: one per host that has subsets.
    let mut subsets: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for v in &versions {
        if let Some(s) = &v.dest.subset {
            subsets.entry(&v.dest.host).or_default().insert(s);
        }
    }
    let many = subsets.len() > 1;
    for (i, (host, names)) in subsets.iter().enumerate() {
        let dr_ns = Destination {
            host: (*host).to_string(),
            subset: None,
            port: None,
        }
        .namespace()
        .unwrap_or(&namespace)
        .to_string();
        docs.push(Document::new(
            &format!(
                "{service}: its versions as subsets of {host}, by the pods' `{}` label.",
                opts.label
            ),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": if many { format!("{name}-{i}") } else { name.clone() },
                    "namespace": dr_ns, "labels": labels(service)},
                "spec": {"host": host, "subsets": names.iter().map(|s| json!({
                    "name": s, "labels": {opts.label.as_str(): s}})).collect::<Vec<_>>()}}),
        ));
    }

    // The VirtualService: a route per version the filter may choose (R never), then the
    // default route to the G version(s).
    let mut hosts: BTreeSet<String> = versions.iter().map(|v| v.dest.host.clone()).collect();
    hosts.extend(opts.hosts.iter().cloned());
    let mut http = Vec::new();
    let mut chosen: Vec<&Version> = versions.iter().filter(|v| v.state != State::R).collect();
    chosen.sort_by_key(|v| (v.state != State::Y, v.key.clone()));
    for v in &chosen {
        http.push(json!({
            "name": format!("graylane-{}", v.key.to_ascii_lowercase()),
            "match": [{"headers": {opts.route_header.as_str(): {"exact": v.envoy_cluster}}}],
            "route": [{"destination": v.dest.value()}],
        }));
    }
    let default: Vec<Value> = if let [one] = stable.as_slice() {
        vec![json!({"destination": one.dest.value()})]
    } else {
        let weights: Vec<u32> = stable.iter().map(|v| v.weight).collect();
        stable
            .iter()
            .zip(percentages(&weights))
            .map(|(v, w)| json!({"destination": v.dest.value(), "weight": w}))
            .collect()
    };
    http.push(json!({"name": "graylane-default", "route": default}));
    let mut spec_v = json!({"hosts": hosts, "http": http});
    if !opts.gateways.is_empty() {
        let mut gw = vec!["mesh".to_string()];
        gw.extend(opts.gateways.iter().cloned());
        spec_v["gateways"] = json!(gw);
    }
    let y: Vec<&str> = versions
        .iter()
        .filter(|v| v.state == State::Y)
        .map(|v| v.key.as_str())
        .collect();
    docs.push(Document::new(
        &format!(
            "{service}: the filter names the version in {h}; these routes send each request to it.
Without the header, the G version{s} ({g}) serve{es}. Versions in gray (Y): {y}.
Re-render after every change of state: the default route follows the strategy's G clusters.",
            h = opts.route_header,
            s = if stable.len() > 1 { "s" } else { "" },
            es = if stable.len() > 1 { "" } else { "s" },
            g = stable
                .iter()
                .map(|v| v.key.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            y = if y.is_empty() {
                "none".to_string()
            } else {
                y.join(", ")
            },
        ),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": namespace, "labels": labels(service)},
            "spec": spec_v}),
    ));
    Ok(docs)
}

/// The EnvoyFilter that removes graylane's headers from requests before any filter sees
/// them and before the route is selected: at gateways (the mesh's edge) the route and lane
/// headers, in sidecars' outbound chains the route header only (a trusted caller's lane
/// header may travel on; the filter decides whether to trust it). It merges an early header
/// mutation into the connection manager (`early_header_mutation_extensions`): an HTTP filter
/// inserted first would be too late, because Envoy keeps the route it selected by the client's
/// header (tests/tests/standalone.rs shows it with a real Envoy).
pub fn header_hygiene(
    route_headers: &BTreeSet<String>,
    lane_headers: &BTreeSet<String>,
    namespace: &str,
) -> Document {
    let remove = |headers: Vec<&String>| -> Value {
        json!({"typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "early_header_mutation_extensions": [{
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": headers.iter().map(|h| json!({"remove": h})).collect::<Vec<_>>(),
                },
            }],
        }})
    };
    let patch = |context: &str, value: Value| {
        json!({
            "applyTo": "NETWORK_FILTER",
            "match": {"context": context, "listener": {"filterChain": {"filter": {
                "name": "envoy.filters.network.http_connection_manager"}}}},
            "patch": {"operation": "MERGE", "value": value},
        })
    };
    let edge: Vec<&String> = route_headers.iter().chain(lane_headers.iter()).collect();
    Document::new(
        &format!(
            "Clients cannot choose a version: graylane's headers are removed before any filter
and before routing, at gateways ({}) and in sidecars'
outbound chains (the route header only). Without this, a client could name a version
whenever the filter is not running (FAIL_OPEN). No VirtualService can do it: its
headers.request.remove applies after the route is chosen.",
            edge.iter()
                .map(|h| h.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
        "metadata": {"name": "graylane-header-hygiene", "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "graylane"}},
        "spec": {"configPatches": [
            patch("GATEWAY", remove(edge.clone())),
            patch("SIDECAR_OUTBOUND", remove(route_headers.iter().collect())),
        ]}}),
    )
}

/// `graylane render istio` flags. With `--config`, the options not given come from the file's
/// `istio:` section (per service), so that what is printed is what the control plane applies
/// with `istio.apply`; else from the defaults shown.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Services to render (default: every service).
    pub services: Vec<String>,
    /// Render from this graylane.yaml (strategies and `istio:` options) instead of the
    /// control plane's current version.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Where versions live when their cluster names are not Istio outbound cluster names
    /// [default: subsets].
    #[arg(long, value_enum)]
    pub layout: Option<Layout>,
    /// The services' namespace (subsets layout, clusters without Istio names) [default:
    /// default].
    #[arg(long)]
    pub namespace: Option<String>,
    /// The VirtualServices' namespace (default: their first host's).
    #[arg(long)]
    pub vs_namespace: Option<String>,
    /// [default: cluster.local]
    #[arg(long)]
    pub domain: Option<String>,
    /// The services' port, when they have several.
    #[arg(long)]
    pub port: Option<u16>,
    /// The pod label the subsets select on [default: profile].
    #[arg(long)]
    pub label: Option<String>,
    /// A cluster's profile: KEY=VALUE (repeatable).
    #[arg(long = "profile")]
    pub profiles: Vec<String>,
    /// [default: x-graylane-cluster]
    #[arg(long)]
    pub route_header: Option<String>,
    /// Also bind the VirtualServices to this gateway (namespace/name, repeatable).
    #[arg(long = "gateway")]
    pub gateways: Vec<String>,
    /// Extra hosts for the VirtualServices (the gateway's external names).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Leave out the header-hygiene EnvoyFilter.
    #[arg(long)]
    pub no_header_hygiene: bool,
    /// Namespace of the EnvoyFilter (Istio's root namespace: it applies mesh-wide).
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,
}

impl Args {
    /// `base` (the defaults, or a file's options for one service) with the flags given on top.
    pub fn options(&self, base: Options) -> Result<Options, Error> {
        let mut profiles = base.profiles;
        for kv in &self.profiles {
            let (k, v) = kv.split_once('=').ok_or_else(|| Error::Option {
                option: "profile",
                message: format!("{kv:?}: expected KEY=VALUE"),
            })?;
            profiles.insert(k.to_string(), v.to_string());
        }
        let or = |flag: &Vec<String>, file: Vec<String>| {
            if flag.is_empty() {
                file
            } else {
                flag.clone()
            }
        };
        Ok(Options {
            layout: self.layout.unwrap_or(base.layout),
            namespace: self.namespace.clone().unwrap_or(base.namespace),
            vs_namespace: self.vs_namespace.clone().or(base.vs_namespace),
            domain: self.domain.clone().unwrap_or(base.domain),
            port: self.port.or(base.port),
            label: self.label.clone().unwrap_or(base.label),
            profiles,
            route_header: self.route_header.clone().unwrap_or(base.route_header),
            gateways: or(&self.gateways, base.gateways),
            hosts: or(&self.hosts, base.hosts),
        })
    }
}

/// Renders `specs` (service -> strategy) as the YAML stream `graylane render istio` prints;
/// `file` is the `istio:` section of `--config`'s file, if any.
pub fn run(
    args: &Args,
    specs: &BTreeMap<String, StrategySpec>,
    file: Option<&crate::mesh::Config>,
) -> Result<String, Error> {
    let base = |service: &str| match file {
        Some(f) => f.render_options(service),
        None => Options::default(),
    };
    let names: Vec<&String> = if args.services.is_empty() {
        specs.keys().collect()
    } else {
        args.services.iter().collect()
    };
    let mut docs = Vec::new();
    let mut lanes = BTreeSet::new();
    let mut route_headers = BTreeSet::new();
    for name in names {
        let spec = specs.get(name).ok_or_else(|| Error::Option {
            option: "services",
            message: format!("no service {name:?}"),
        })?;
        let opts = args.options(base(name))?;
        lanes.insert(spec.lane.header.clone());
        route_headers.insert(opts.route_header.clone());
        docs.extend(render(name, spec, &opts)?);
    }
    if !args.no_header_hygiene {
        if !dns_label(&args.root_namespace) {
            return Err(Error::Option {
                option: "root-namespace",
                message: "a DNS label".into(),
            });
        }
        if route_headers.is_empty() {
            route_headers.insert(args.options(base(""))?.route_header);
        }
        docs.insert(
            0,
            header_hygiene(&route_headers, &lanes, &args.root_namespace),
        );
    }
    Ok(super::to_yaml(&docs))
}
