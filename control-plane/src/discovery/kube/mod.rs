//! Kubernetes source: its settings (`Config`), one service's mapping (`Mapping`) and the
//! targets it expands to, the pure index from EndpointSlices to endpoints (`index`), and the
//! namespace watch (`run`, in `watch`).
//!
//! Slices carry the Service's labels, never the pods', so a mapping says how an endpoint finds
//! its cluster, in one of three [`Mode`]s:
//! - `services`: one Service per cluster (`web-prod` -> B, `web-gray` -> A);
//! - `namespaces`: the same Service in one namespace per cluster (seed 003's prod and gray);
//! - `pod_label`: one Service over both deployments; each endpoint's `targetRef` pod is looked
//!   up and its label (e.g. `profile`) picks the cluster.

mod index;
mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{Clusters, Name};

pub use self::watch::run;

/// The label the EndpointSlice controller puts on every slice of a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Global Kubernetes settings (`discovery.kubernetes` in graylane.yaml).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// kubeconfig context to use; without it the client is inferred (`$KUBECONFIG` or
    /// `~/.kube/config`, else the in-cluster service account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
}

impl Config {
    /// Builds the client `run` takes.
    pub async fn client(&self) -> Result<::kube::Client, Error> {
        let config = match &self.context {
            Some(context) => {
                let opts = ::kube::config::KubeConfigOptions {
                    context: Some(context.clone()),
                    ..Default::default()
                };
                ::kube::Config::from_kubeconfig(&opts).await?
            }
            None => ::kube::Config::infer().await?,
        };
        Ok(::kube::Client::try_from(config)?)
    }
}

/// One graylane service's Kubernetes mapping (`services.<name>.discovery.kubernetes`).
/// Parsing it is the whole check: a value of this type holds exactly one valid mode.
///
/// ```yaml
/// kubernetes: {namespace: shop, services: {web-gray: A, web-prod: B}}            # Service per cluster
/// kubernetes: {service: web, namespaces: {gray: A, prod: B}}                     # namespace per cluster
/// kubernetes: {service: web, pod_label: profile, clusters: {gray: A, prod: B}}  # pod label
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub mode: Mode,
    /// Port name to use when the slices list several ports (default: the only port, else
    /// the one named `http`, else the first).
    pub port: Option<Name>,
}

/// How a mapping's endpoints find their cluster. `namespace` defaults to the client's,
/// `service` (the Kubernetes Service) to the graylane service's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One Service per cluster, all in `namespace`.
    Services {
        namespace: Option<DnsLabel>,
        services: Names,
    },
    /// The same Service in one namespace per cluster.
    Namespaces {
        service: Option<DnsLabel>,
        namespaces: Names,
    },
    /// One Service; the `label` of each endpoint's pod picks the cluster through `clusters`.
    PodLabel {
        namespace: Option<DnsLabel>,
        service: Option<DnsLabel>,
        label: LabelKey,
        clusters: Clusters,
    },
}

/// Written back with the fields it was read from (one mode's fields and `port`).
impl Serialize for Mapping {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = serializer.serialize_map(None)?;
        match &self.mode {
            Mode::Services {
                namespace,
                services,
            } => {
                if let Some(n) = namespace {
                    m.serialize_entry("namespace", n)?;
                }
                m.serialize_entry("services", services)?;
            }
            Mode::Namespaces {
                service,
                namespaces,
            } => {
                if let Some(s) = service {
                    m.serialize_entry("service", s)?;
                }
                m.serialize_entry("namespaces", namespaces)?;
            }
            Mode::PodLabel {
                namespace,
                service,
                label,
                clusters,
            } => {
                if let Some(n) = namespace {
                    m.serialize_entry("namespace", n)?;
                }
                if let Some(s) = service {
                    m.serialize_entry("service", s)?;
                }
                m.serialize_entry("pod_label", label)?;
                m.serialize_entry("clusters", clusters)?;
            }
        }
        if let Some(p) = &self.port {
            m.serialize_entry("port", p)?;
        }
        m.end()
    }
}

impl Mapping {
    /// Every cluster the mapping feeds.
    pub(crate) fn clusters(&self) -> Vec<&str> {
        match &self.mode {
            Mode::Services { services: n, .. } | Mode::Namespaces { namespaces: n, .. } => {
                n.iter().map(|(_, cluster)| cluster).collect()
            }
            Mode::PodLabel { clusters, .. } => clusters.clusters().collect(),
        }
    }

    /// The Kubernetes Services that feed graylane service `service`; `default_ns` is the
    /// client's namespace.
    fn targets(&self, service: &str, default_ns: &str) -> Vec<Target> {
        let target = |namespace: &str, k8s_service: &str, assign: Assign| Target {
            service: service.to_owned(),
            namespace: namespace.to_owned(),
            k8s_service: k8s_service.to_owned(),
            port: self.port.as_ref().map(ToString::to_string),
            assign,
        };
        let ns_or_default = |ns: &Option<DnsLabel>| -> String {
            ns.as_ref()
                .map_or_else(|| default_ns.to_owned(), ToString::to_string)
        };
        let svc_or_default = |svc: &Option<DnsLabel>| -> String {
            svc.as_ref()
                .map_or_else(|| service.to_owned(), ToString::to_string)
        };
        match &self.mode {
            Mode::Services {
                namespace,
                services,
            } => {
                let ns = ns_or_default(namespace);
                services
                    .iter()
                    .map(|(svc, cluster)| target(&ns, svc, Assign::Fixed(cluster.to_owned())))
                    .collect()
            }
            Mode::Namespaces {
                service: svc,
                namespaces,
            } => {
                let svc = svc_or_default(svc);
                namespaces
                    .iter()
                    .map(|(ns, cluster)| target(ns, &svc, Assign::Fixed(cluster.to_owned())))
                    .collect()
            }
            Mode::PodLabel {
                namespace,
                service: svc,
                label,
                clusters,
            } => vec![target(
                &ns_or_default(namespace),
                &svc_or_default(svc),
                Assign::PodLabel {
                    key: label.to_string(),
                    clusters: clusters.clone(),
                },
            )],
        }
    }
}

/// One Kubernetes Service (in one namespace) feeding one graylane service.
#[derive(Debug, Clone)]
struct Target {
    /// The graylane service.
    service: String,
    namespace: String,
    k8s_service: String,
    port: Option<String>,
    assign: Assign,
}

/// How a target's endpoints find their cluster.
#[derive(Debug, Clone)]
enum Assign {
    /// All to one cluster.
    Fixed(String),
    /// By the value of their pod's label `key`.
    PodLabel { key: String, clusters: Clusters },
}

impl Assign {
    fn clusters(&self) -> Vec<&str> {
        match self {
            Assign::Fixed(c) => vec![c.as_str()],
            Assign::PodLabel { clusters, .. } => clusters.clusters().collect(),
        }
    }
}

/// A Kubernetes object name that is an RFC 1123 DNS label (namespaces, Services): lowercase
/// letters, digits and '-', starting and ending with a letter or digit, at most 63.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct DnsLabel(String);

impl TryFrom<String> for DnsLabel {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let bytes = s.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= 63
            && bytes.iter().all(|&b| ok(b) || b == b'-')
            && bytes.first().is_some_and(|&b| ok(b))
            && bytes.last().is_some_and(|&b| ok(b));
        if valid {
            Ok(DnsLabel(s))
        } else {
            Err(Error::NotDnsLabel(s))
        }
    }
}

impl fmt::Display for DnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A label key: `[prefix/]name`, the name at most 63 characters of letters, digits, '-', '_',
/// '.', starting and ending with a letter or digit; the prefix a DNS subdomain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct LabelKey(String);

impl TryFrom<String> for LabelKey {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        let (prefix, name) = match s.split_once('/') {
            Some((p, n)) => (Some(p), n),
            None => (None, s.as_str()),
        };
        let alnum = |b: &u8| b.is_ascii_alphanumeric();
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && name.as_bytes().first().is_some_and(alnum)
            && name.as_bytes().last().is_some_and(alnum);
        let prefix_ok = prefix.is_none_or(|p| {
            !p.is_empty()
                && p.len() <= 253
                && p.split('.')
                    .all(|label| DnsLabel::try_from(label.to_owned()).is_ok())
        });
        if name_ok && prefix_ok {
            Ok(LabelKey(s))
        } else {
            Err(Error::NotLabelKey(s))
        }
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Kubernetes names (Services or namespaces), each feeding its own cluster: at least one,
/// and no cluster fed twice (a cluster is one Service's endpoints).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BTreeMap<DnsLabel, String>")]
pub struct Names(BTreeMap<DnsLabel, String>);

impl Names {
    /// (name, cluster) pairs, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.0.as_str(), v.as_str()))
    }
}

impl TryFrom<BTreeMap<DnsLabel, String>> for Names {
    type Error = Error;
    fn try_from(map: BTreeMap<DnsLabel, String>) -> Result<Self, Error> {
        if map.is_empty() {
            return Err(Error::Empty);
        }
        let mut seen = BTreeSet::new();
        if let Some(twice) = map.values().find(|c| !seen.insert(*c)) {
            return Err(Error::Twice(twice.clone()));
        }
        Ok(Names(map))
    }
}

/// Kubernetes errors: the client could not be built, or a mapping is not valid (the config
/// loader adds the field's path to the latter).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes client: {0}")]
    Kubeconfig(#[from] ::kube::config::KubeconfigError),
    #[error("kubernetes client: {0}")]
    Infer(#[from] ::kube::config::InferConfigError),
    #[error("kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
    #[error("{0:?} is not a Kubernetes name (lowercase letters, digits and '-', at most 63)")]
    NotDnsLabel(String),
    #[error("{0:?} is not a label key ([prefix/]name)")]
    NotLabelKey(String),
    #[error("map at least one name to a cluster")]
    Empty,
    #[error("cluster {0:?} is mapped twice")]
    Twice(String),
    #[error("set one of `services`, `namespaces`, `pod_label`")]
    NoMode,
    #[error("`pod_label` needs `clusters` (label value -> cluster)")]
    NoClusters,
    #[error("duplicate field `{0}`")]
    Duplicate(&'static str),
    #[error("`{set}` and `{field}` do not go together: {hint}")]
    Conflict {
        set: &'static str,
        field: &'static str,
        hint: &'static str,
    },
}

// ---- parsing ---------------------------------------------------------------------------------
//
// A hand-written visitor rather than `#[serde(try_from)]`: a field that contradicts one already
// read is refused while its own value is parsed, so the error's path names that field
// (`discovery.kubernetes.clusters`), not only the mapping. What is still missing at the end
// (no mode, `pod_label` without `clusters`) is reported at the mapping, as serde reports a
// missing field.

const FIELDS: &[&str] = &[
    "namespace",
    "service",
    "services",
    "namespaces",
    "pod_label",
    "clusters",
    "port",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Namespace,
    Service,
    Services,
    Namespaces,
    PodLabel,
    Clusters,
    Port,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Namespace => "namespace",
            Field::Service => "service",
            Field::Services => "services",
            Field::Namespaces => "namespaces",
            Field::PodLabel => "pod_label",
            Field::Clusters => "clusters",
            Field::Port => "port",
        }
    }
}

const ONE_MODE: &str = "set one of `services`, `namespaces`, `pod_label`";

/// Fields that never go together, in either order, and what to do instead.
const EXCLUSIVE: [(Field, Field, &str); 7] = [
    (Field::Services, Field::Namespaces, ONE_MODE),
    (Field::Services, Field::PodLabel, ONE_MODE),
    (Field::Namespaces, Field::PodLabel, ONE_MODE),
    (
        Field::Services,
        Field::Clusters,
        "`clusters` goes with `pod_label`",
    ),
    (
        Field::Namespaces,
        Field::Clusters,
        "`clusters` goes with `pod_label`",
    ),
    (
        Field::Namespaces,
        Field::Namespace,
        "each namespace is a key of `namespaces`",
    ),
    (
        Field::Services,
        Field::Service,
        "each Service is a key of `services`",
    ),
];

/// A mapping as its fields arrive; each is checked against those already set.
#[derive(Default)]
struct Spec {
    namespace: Option<DnsLabel>,
    service: Option<DnsLabel>,
    services: Option<Names>,
    namespaces: Option<Names>,
    pod_label: Option<LabelKey>,
    clusters: Option<Clusters>,
    port: Option<Name>,
}

impl Spec {
    fn has(&self, f: Field) -> bool {
        match f {
            Field::Namespace => self.namespace.is_some(),
            Field::Service => self.service.is_some(),
            Field::Services => self.services.is_some(),
            Field::Namespaces => self.namespaces.is_some(),
            Field::PodLabel => self.pod_label.is_some(),
            Field::Clusters => self.clusters.is_some(),
            Field::Port => self.port.is_some(),
        }
    }

    /// Why `field` cannot join the fields already set, if it cannot.
    fn conflict(&self, field: Field) -> Option<Error> {
        if self.has(field) {
            return Some(Error::Duplicate(field.name()));
        }
        EXCLUSIVE.iter().find_map(|&(a, b, hint)| {
            let other = match field {
                f if f == a => b,
                f if f == b => a,
                _ => return None,
            };
            self.has(other).then(|| Error::Conflict {
                set: other.name(),
                field: field.name(),
                hint,
            })
        })
    }

    /// The mapping, once every field is read: exactly one mode, complete.
    fn finish(self) -> Result<Mapping, Error> {
        let Spec {
            namespace,
            service,
            services,
            namespaces,
            pod_label,
            clusters,
            port,
        } = self;
        let mode = if let Some(services) = services {
            Mode::Services {
                namespace,
                services,
            }
        } else if let Some(namespaces) = namespaces {
            Mode::Namespaces {
                service,
                namespaces,
            }
        } else if let Some(label) = pod_label {
            Mode::PodLabel {
                namespace,
                service,
                label,
                clusters: clusters.ok_or(Error::NoClusters)?,
            }
        } else {
            return Err(Error::NoMode);
        };
        Ok(Mapping { mode, port })
    }
}

impl<'de> Deserialize<'de> for Mapping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct("Mapping", FIELDS, MappingVisitor)
    }
}

struct MappingVisitor;

impl<'de> Visitor<'de> for MappingVisitor {
    type Value = Mapping;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a Kubernetes mapping (`services`, `namespaces` or `pod_label`)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Mapping, A::Error> {
        let mut spec = Spec::default();
        while let Some(field) = map.next_key::<Field>()? {
            let conflict = spec.conflict(field);
            match field {
                Field::Namespace => {
                    spec.namespace = Some(map.next_value_seed(Checked::new(conflict))?)
                }
                Field::Service => spec.service = Some(map.next_value_seed(Checked::new(conflict))?),
                Field::Services => {
                    spec.services = Some(map.next_value_seed(Checked::new(conflict))?)
                }
                Field::Namespaces => {
                    spec.namespaces = Some(map.next_value_seed(Checked::new(conflict))?);
                }
                Field::PodLabel => {
                    spec.pod_label = Some(map.next_value_seed(Checked::new(conflict))?)
                }
                Field::Clusters => {
                    spec.clusters = Some(map.next_value_seed(Checked::new(conflict))?)
                }
                Field::Port => spec.port = Some(map.next_value_seed(Checked::new(conflict))?),
            }
        }
        spec.finish().map_err(de::Error::custom)
    }
}

/// A field's value, refused when the field conflicts with one already set: the error is raised
/// inside the field, so its path names it.
struct Checked<T> {
    conflict: Option<Error>,
    value: PhantomData<T>,
}

impl<T> Checked<T> {
    fn new(conflict: Option<Error>) -> Self {
        Checked {
            conflict,
            value: PhantomData,
        }
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Checked<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        match self.conflict {
            Some(e) => Err(de::Error::custom(e)),
            None => T::deserialize(d),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(yaml: &str) -> Result<Mapping, String> {
        serde_saphyr::from_str::<Mapping>(yaml).map_err(|e| e.to_string())
    }

    fn targets(yaml: &str) -> Vec<(String, String, String)> {
        parse(yaml)
            .unwrap()
            .targets("web", "default")
            .into_iter()
            .map(|t| {
                let how = match t.assign {
                    Assign::Fixed(c) => c,
                    Assign::PodLabel { key, .. } => format!("label {key}"),
                };
                (t.namespace, t.k8s_service, how)
            })
            .collect()
    }

    fn own(v: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
        v.iter()
            .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
            .collect()
    }

    #[test]
    fn each_mode_parses_into_its_targets() {
        assert_eq!(
            targets("namespace: shop\nservices: {web-gray: A, web-prod: B}\n"),
            own(&[("shop", "web-gray", "A"), ("shop", "web-prod", "B")])
        );
        assert_eq!(
            targets("services: {web-gray: A}\n"),
            own(&[("default", "web-gray", "A")])
        );
        assert_eq!(
            targets("service: api\nnamespaces: {gray: A, prod: B}\n"),
            own(&[("gray", "api", "A"), ("prod", "api", "B")])
        );
        assert_eq!(
            targets("namespaces: {gray: A}\n"),
            own(&[("gray", "web", "A")])
        );
        assert_eq!(
            targets("pod_label: app.kubernetes.io/profile\nclusters: {gray: A, prod: B}\n"),
            own(&[("default", "web", "label app.kubernetes.io/profile")])
        );
        let m = parse("pod_label: profile\nclusters: {gray: A, canary: A, prod: B}\nport: http\n")
            .unwrap();
        assert_eq!(m.port.as_ref().map(Name::as_str), Some("http"));
        let mut clusters = m.clusters();
        clusters.sort_unstable();
        assert_eq!(clusters, ["A", "A", "B"]);
    }

    #[test]
    fn a_mapping_is_written_back_as_it_was_read() {
        for yaml in [
            "namespace: shop\nservices: {web-gray: A, web-prod: B}\nport: http\n",
            "service: api\nnamespaces: {gray: A, prod: B}\n",
            "namespace: shop\nservice: web\npod_label: app.kubernetes.io/profile\nclusters: {gray: A, prod: B}\n",
        ] {
            let m = parse(yaml).unwrap();
            let json = serde_json::to_string(&m).unwrap();
            let back: Mapping = serde_json::from_str(&json).unwrap();
            assert_eq!(back, m, "{json}");
        }
    }

    #[test]
    fn only_valid_mappings_parse() {
        for (bad, says) in [
            ("{}", "set one of"),
            ("service: web\n", "set one of"),
            (
                "services: {a: A}\nnamespaces: {b: B}\n",
                "do not go together",
            ),
            ("pod_label: profile\n", "needs `clusters`"),
            ("pod_label: profile\nclusters: {}\n", "at least one"),
            (
                "services: {a: A}\nclusters: {x: A}\n",
                "`clusters` goes with `pod_label`",
            ),
            (
                "clusters: {x: A}\nservices: {a: A}\n",
                "`clusters` goes with `pod_label`",
            ),
            ("services: {a: A, b: A}\n", "mapped twice"),
            ("services: {}\n", "at least one"),
            ("services: {Web: A}\n", "not a Kubernetes name"),
            (
                "services: {a: A}\nnamespace: -shop\n",
                "not a Kubernetes name",
            ),
            (
                "namespaces: {a: A}\nnamespace: shop\n",
                "do not go together",
            ),
            ("services: {a: A}\nservice: web\n", "do not go together"),
            (
                "pod_label: 'no spaces'\nclusters: {x: A}\n",
                "not a label key",
            ),
            ("pod_label: '-x'\nclusters: {x: A}\n", "not a label key"),
            (
                "pod_label: 'Bad_Prefix/x'\nclusters: {x: A}\n",
                "not a label key",
            ),
            ("services: {a: A}\nport: ''\n", "empty"),
            ("servces: {a: A}\n", "unknown field"),
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
