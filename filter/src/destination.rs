//! Which managed service a request goes to, from its destination: the `:authority` (host) as
//! the caller's outbound route sees it. Host-free and allocation-free per request.
//!
//! The host is taken without its `:port` and trailing dot, in any case (lowercased once into a
//! stack buffer; longer than a DNS name's 253 bytes: no service), then:
//! 1. an exact entry of the plugin configuration's `hosts` (`shop.example.com` -> `a`);
//! 2. a Kubernetes service name: `<name>`, `<name>.<namespace>`, or
//!    `<name>.<namespace>.svc[.<cluster domain>]`, mapped to the managed service
//!    `<name>.<namespace>` if there is one (a service named with its namespace), else
//!    `<name>`. A bare `<name>` is in the caller's own namespace (the node's `NAMESPACE`, as
//!    Kubernetes' DNS search path resolves it), so `<name>.<own namespace>` comes first there.
//!
//! Anything else (`b.example.com`, an IP address, `[::1]`) is no managed service: the request
//! is left alone.

use std::collections::BTreeMap;

/// The lookup table: service names and configured hosts, lowercased and sorted.
#[derive(Debug, Clone, Default)]
pub struct Destinations {
    /// `(name, index)`: every service served, by its name.
    names: Vec<(String, usize)>,
    /// `(host, index)`: the configuration's `hosts` whose service is served.
    hosts: Vec<(String, usize)>,
    /// This workload's namespace, lowercased.
    namespace: Option<String>,
}

impl Destinations {
    /// `services`: each served service's index and name; `hosts`: host -> service name (hosts
    /// of services not served are left out); `namespace`: the node's own.
    pub fn new<'a>(
        services: impl IntoIterator<Item = (usize, &'a str)>,
        hosts: &BTreeMap<String, String>,
        namespace: Option<&str>,
    ) -> Destinations {
        let mut names: Vec<(String, usize)> = services
            .into_iter()
            .map(|(i, n)| (n.to_ascii_lowercase(), i))
            .collect();
        names.sort();
        names.dedup_by(|a, b| a.0 == b.0);
        let mut hosts: Vec<(String, usize)> = hosts
            .iter()
            .filter_map(|(host, service)| {
                let lower = service.to_ascii_lowercase();
                let at = names
                    .binary_search_by(|(n, _)| n.as_str().cmp(&lower))
                    .ok()?;
                let i = names.get(at)?.1;
                Some((host.trim_end_matches('.').to_ascii_lowercase(), i))
            })
            .collect();
        hosts.sort();
        Destinations {
            names,
            hosts,
            namespace: namespace
                .filter(|n| !n.is_empty())
                .map(str::to_ascii_lowercase),
        }
    }

    /// The index of the service `authority` goes to, if it is one served.
    pub fn find(&self, authority: &[u8]) -> Option<usize> {
        let raw = strip_port(authority)?;
        // Lowercased once, on the stack (a DNS name is at most 253 bytes).
        let mut buf = [0u8; MAX_HOST];
        let host = buf.get_mut(..raw.len())?;
        for (to, from) in host.iter_mut().zip(raw) {
            *to = from.to_ascii_lowercase();
        }
        let host = &*host;
        if let Some(i) = lookup(&self.hosts, host) {
            return Some(i);
        }
        let mut labels = host.split(|b| *b == b'.');
        let name = labels.next().filter(|l| !l.is_empty())?;
        let namespace = labels.next();
        match labels.next() {
            None | Some(b"svc") => {}
            Some(_) => return None,
        }
        let qualified = match namespace {
            Some([]) => return None,
            // `<name>.<namespace>`: the host's own first two labels.
            Some(ns) => host
                .get(..name.len() + 1 + ns.len())
                .and_then(|q| lookup(&self.names, q)),
            // A bare name: `<name>.<own namespace>`.
            None => self.namespace.as_deref().and_then(|ns| {
                let mut q = [0u8; MAX_HOST];
                let len = name.len() + 1 + ns.len();
                let out = q.get_mut(..len)?;
                let (n, rest) = out.split_at_mut(name.len());
                n.copy_from_slice(name);
                let (dot, tail) = rest.split_first_mut()?;
                *dot = b'.';
                tail.copy_from_slice(ns.as_bytes());
                lookup(&self.names, out)
            }),
        };
        qualified.or_else(|| lookup(&self.names, name))
    }
}

/// The longest host name looked up (DNS: 253).
const MAX_HOST: usize = 253;

/// The host without `:port` and trailing dot; `None` for an IPv6 literal or an empty host.
fn strip_port(authority: &[u8]) -> Option<&[u8]> {
    if authority.first() == Some(&b'[') {
        return None;
    }
    let host = match authority.iter().rposition(|b| *b == b':') {
        Some(at) => authority.get(..at)?,
        None => authority,
    };
    let host = host.strip_suffix(b".").unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// The index of the key equal to `key` (lowercase bytes).
fn lookup(table: &[(String, usize)], key: &[u8]) -> Option<usize> {
    let at = table
        .binary_search_by(|(k, _)| k.as_bytes().cmp(key))
        .ok()?;
    table.get(at).map(|(_, i)| *i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(namespace: Option<&str>) -> Destinations {
        let hosts = BTreeMap::from([
            ("Shop.Example.com".to_string(), "a".to_string()),
            ("ghost.example.com".to_string(), "not-served".to_string()),
        ]);
        Destinations::new(
            [(0, "a"), (1, "b"), (2, "c.gray"), (3, "C")],
            &hosts,
            namespace,
        )
    }

    #[test]
    fn hosts_map_to_services_by_name_namespace_and_configured_host() {
        let d = table(Some("prod"));
        for (host, want) in [
            ("a", Some(0)),
            ("a:8080", Some(0)),
            ("A.prod", Some(0)),
            ("a.gray.svc", Some(0)),
            ("a.gray.svc.cluster.local", Some(0)),
            ("a.gray.svc.cluster.local.:8080", Some(0)),
            ("b.prod.SVC.corp.example", Some(1)),
            ("shop.example.com", Some(0)),
            ("SHOP.example.com:443", Some(0)),
            // Namespace-qualified names come first; the bare name otherwise.
            ("c.gray", Some(2)),
            ("c.gray.svc.cluster.local:80", Some(2)),
            ("c.prod.svc.cluster.local", Some(3)),
            ("c", Some(3)),
            // Not a service name: left alone.
            ("b.example.com", None),
            ("www.b.prod.svc.cluster.local", None),
            ("d", None),
            ("d.prod.svc.cluster.local", None),
            ("ghost.example.com", None),
            ("10.0.0.1:8080", None),
            ("[::1]:8080", None),
            ("", None),
            (":80", None),
            (".prod", None),
            ("a..svc", None),
            (&"x".repeat(254), None),
            (&format!("a.{}", "x".repeat(251)), Some(0)),
            ("ab", None),
            ("a.b", Some(0)),
        ] {
            assert_eq!(d.find(host.as_bytes()), want, "{host:?}");
        }
    }

    #[test]
    fn a_bare_name_is_in_the_callers_namespace() {
        assert_eq!(table(Some("gray")).find(b"c"), Some(2));
        assert_eq!(table(Some("GRAY")).find(b"c:8080"), Some(2));
        assert_eq!(table(Some("prod")).find(b"c"), Some(3));
        assert_eq!(table(None).find(b"c"), Some(3));
        assert_eq!(table(Some("")).find(b"c"), Some(3));
        assert_eq!(Destinations::default().find(b"a"), None);
    }
}
