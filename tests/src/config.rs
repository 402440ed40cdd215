//! Envoy configs for tests: `{{NAME}}` templating and a builder for the common shape
//! (one listener, optionally the graylane filter, routes by `x-graylane-cluster`; more listeners
//! with their own plugin configuration in the same VM).

use std::fmt::Write as _;

use crate::envoy::wasm_path;

/// Replaces every `{{NAME}}` in `template` by its value. Panics when a placeholder is left
/// without a value, so a typo fails the test instead of reaching Envoy.
pub fn render<K: AsRef<str>, V: ToString>(template: &str, vars: &[(K, V)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{}}}}}", k.as_ref()), &v.to_string());
    }
    if let Some(at) = out.find("{{") {
        let end = out[at..].find("}}").map_or(out.len(), |e| at + e + 2);
        panic!("template placeholder {} has no value", &out[at..end]);
    }
    out
}

/// A bootstrap with one listener `ingress` on `127.0.0.1:0`, admin on port 0, and static
/// clusters on loopback ports. Routes: a request carrying `x-graylane-cluster` goes to the
/// cluster it names (`cluster_header`); others to the fallback cluster if one is set, else
/// a 404 from Envoy. With [`EnvoyConfig::graylane`], the graylane filter runs before the
/// router (the real .wasm, V8, `failure_policy: FAIL_CLOSED`, so a broken filter fails the
/// test instead of silently passing traffic).
#[derive(Debug, Clone, Default)]
pub struct EnvoyConfig {
    clusters: Vec<(String, u16)>,
    plugin: Option<String>,
    fallback: Option<String>,
    node_labels: Vec<(String, String)>,
    route_header: Option<String>,
    failure_policy: Option<String>,
    node_id: Option<String>,
    /// More listeners, each with the same routes and its own graylane plugin configuration
    /// (the same VM: one `vm_id`).
    more: Vec<(String, String)>,
}

impl EnvoyConfig {
    pub fn new() -> EnvoyConfig {
        EnvoyConfig::default()
    }

    /// A static cluster `name` with one endpoint `127.0.0.1:port`.
    pub fn cluster(mut self, name: &str, port: u16) -> EnvoyConfig {
        self.clusters.push((name.to_owned(), port));
        self
    }

    /// Adds the graylane filter with this plugin configuration (the JSON of CONTEXT.md:
    /// `{"service": .., "route_header": .., "strategy": {..}, ..}`).
    pub fn graylane(mut self, plugin_config: &serde_json::Value) -> EnvoyConfig {
        if let Some(h) = plugin_config["route_header"].as_str() {
            self.route_header = Some(h.to_owned());
        }
        self.plugin = Some(plugin_config.to_string());
        self
    }

    /// Requests without the route header go to `cluster`.
    pub fn fallback(mut self, cluster: &str) -> EnvoyConfig {
        self.fallback = Some(cluster.to_owned());
        self
    }

    /// A label in the node metadata `LABELS` (as an Istio sidecar has), e.g. `profile=gray`.
    pub fn node_label(mut self, key: &str, value: &str) -> EnvoyConfig {
        self.node_labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The bootstrap's `node.id` (default `graylane-e2e`): names this Envoy in traffic reports.
    pub fn node_id(mut self, id: &str) -> EnvoyConfig {
        self.node_id = Some(id.to_owned());
        self
    }

    /// The filter's `failure_policy` (default `FAIL_CLOSED`).
    pub fn failure_policy(mut self, policy: &str) -> EnvoyConfig {
        self.failure_policy = Some(policy.to_owned());
        self
    }

    /// The bootstrap YAML (JSON strings are valid YAML scalars, so values are quoted as JSON).
    /// Another listener `name`, routed as `ingress` is, with the graylane filter configured by
    /// `plugin_config` in the same VM (`vm_id`) as `ingress`'s.
    pub fn listener(mut self, name: &str, plugin_config: &serde_json::Value) -> EnvoyConfig {
        self.more.push((name.to_owned(), plugin_config.to_string()));
        self
    }

    pub fn render(&self) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let route_header = q(self.route_header.as_deref().unwrap_or("x-graylane-cluster"));
        let mut routes = format!(
            "- match: {{prefix: \"/\", headers: [{{name: {route_header}, present_match: true}}]}}\n  \
             route: {{cluster_header: {route_header}}}\n"
        );
        if let Some(fb) = &self.fallback {
            let _ = write!(
                routes,
                "- match: {{prefix: \"/\"}}\n  route: {{cluster: {}}}\n",
                q(fb)
            );
        }
        let filters = |plugin: Option<&String>| {
            plugin.map_or_else(String::new, |plugin| {
                render(
                    WASM_FILTER,
                    &[
                        (
                            "POLICY",
                            self.failure_policy
                                .as_deref()
                                .unwrap_or("FAIL_CLOSED")
                                .to_owned(),
                        ),
                        ("WASM", q(&wasm_path().display().to_string())),
                        ("PLUGIN", q(plugin)),
                    ],
                )
            })
        };
        let mut listeners = String::new();
        for (name, plugin) in std::iter::once(("ingress", self.plugin.as_ref()))
            .chain(self.more.iter().map(|(n, p)| (n.as_str(), Some(p))))
        {
            listeners.push_str(&render(
                LISTENER,
                &[
                    ("NAME", name.to_owned()),
                    ("ROUTES", indent(&routes, 12)),
                    ("FILTERS", indent(&filters(plugin), 8)),
                ],
            ));
        }
        let mut clusters = String::new();
        for (name, port) in &self.clusters {
            clusters.push_str(&render(
                CLUSTER,
                &[("NAME", q(name)), ("PORT", port.to_string())],
            ));
        }
        let labels: Vec<String> = self
            .node_labels
            .iter()
            .map(|(k, v)| format!("{}: {}", q(k), q(v)))
            .collect();
        render(
            BOOTSTRAP,
            &[
                ("NODE", q(self.node_id.as_deref().unwrap_or("graylane-e2e"))),
                ("LABELS", labels.join(", ")),
                ("LISTENERS", indent(&listeners, 2)),
                ("CLUSTERS", indent(&clusters, 2)),
            ],
        )
    }
}

fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

const BOOTSTRAP: &str = r#"node:
  id: {{NODE}}
  cluster: graylane-e2e
  metadata: {LABELS: {{{LABELS}}}}
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
static_resources:
  listeners:
{{LISTENERS}}  clusters:
{{CLUSTERS}}"#;

const LISTENER: &str = r#"- name: {{NAME}}
  address: {socket_address: {address: 127.0.0.1, port_value: 0}}
  filter_chains:
  - filters:
    - name: envoy.filters.network.http_connection_manager
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
        stat_prefix: {{NAME}}
        route_config:
          name: local
          virtual_hosts:
          - name: all
            domains: ["*"]
            routes:
{{ROUTES}}        http_filters:
{{FILTERS}}        - name: envoy.filters.http.router
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#;

const WASM_FILTER: &str = r#"- name: envoy.filters.http.wasm
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
    config:
      name: graylane
      root_id: graylane
      failure_policy: {{POLICY}}
      vm_config:
        vm_id: graylane
        runtime: envoy.wasm.runtime.v8
        code: {local: {filename: {{WASM}}}}
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: {{PLUGIN}}
"#;

const CLUSTER: &str = r#"- name: {{NAME}}
  type: STATIC
  connect_timeout: 1s
  load_assignment:
    cluster_name: {{NAME}}
    endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: {{PORT}}}}}}]}]
"#;
