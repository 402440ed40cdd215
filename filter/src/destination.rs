//! Which managed service a request goes to, from its destination: the `:authority` (host) as
//! the caller's outbound route sees it. Host-free and allocation-free per request.
//!
//! The host is taken without its `:port` and trailing dot, in any case, then:
//! 1. an exact entry of the plugin configuration's `hosts` (`shop.example.com` -> `a`);
//! 2. a Kubernetes service name: `<name>`, `<name>.<namespace>`, or
//!    `<name>.<namespace>.svc[.<cluster domain>]`, mapped to the managed service
//!    `<name>.<namespace>` if there is one (a service named with its namespace), else
//!    `<name>`. A bare `<name>` is in the caller's own namespace (the node's `NAMESPACE`, as
//!    Kubernetes' DNS search path resolves it), so `<name>.<own namespace>` comes first there.
//!
//! Anything else (`b.example.com`, an IP address, `[::1]`) is no managed service: the request
//! is left alone.

use std::cmp::Ordering;
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
        let host = strip_port(authority)?;
        if let Some(i) = lookup(&self.hosts, &[host]) {
            return Some(i);
        }
        let mut labels = host.split(|b| *b == b'.');
        let name = labels.next().filter(|l| !l.is_empty())?;
        let namespace = labels.next();
        match labels.next() {
            None => {}
            Some(svc) if svc.eq_ignore_ascii_case(b"svc") => {}
            Some(_) => return None,
        }
        let namespace = match namespace {
            Some([]) => return None,
            Some(ns) => Some(ns),
            None => self.namespace.as_deref().map(str::as_bytes),
        };
        if let Some(i) = namespace.and_then(|ns| lookup(&self.names, &[name, ns])) {
            return Some(i);
        }
        lookup(&self.names, &[name])
    }
}

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

/// The index of the key equal (ignoring ASCII case) to `parts` joined by dots.
fn lookup(table: &[(String, usize)], parts: &[&[u8]]) -> Option<usize> {
    let at = table
        .binary_search_by(|(key, _)| cmp_joined(key, parts))
        .ok()?;
    table.get(at).map(|(_, i)| *i)
}

/// `key` (lowercase) against `parts` joined by `.`, lowercased on the fly.
fn cmp_joined(key: &str, parts: &[&[u8]]) -> Ordering {
    let joined = parts.iter().enumerate().flat_map(|(i, p)| {
        let dot: &[u8] = if i == 0 { b"" } else { b"." };
        dot.iter().chain(p.iter()).map(u8::to_ascii_lowercase)
    });
    key.bytes().cmp(joined)
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
