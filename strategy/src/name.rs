//! The names graylane accepts, checked in one place for the strategy, the control plane and
//! the filters alike.

/// Service names: letters, digits, `-`, `_`, `.`; at most 128 bytes.
pub fn service(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Cluster keys and Envoy cluster names: as services, plus `|` and `:` (Istio's
/// `outbound|8080||b.prod.svc.cluster.local`).
pub fn cluster(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'|' | b':'))
}

/// Header, cookie and query parameter names: visible ASCII without `;`; at most 128 bytes.
pub fn token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() && b != b';')
}

/// Gray cookie key ids (`k2026a`): letters, digits, `-`, `_`; at most 32 bytes (they travel
/// in every signed cookie, between dots).
pub fn key_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(service("web-1.prod_x"));
        assert!(!service("web|1") && !service("") && !service(&"a".repeat(129)));
        assert!(cluster("outbound|8080||b.prod.svc.cluster.local"));
        assert!(!cluster("a b"));
        assert!(token("x-tenant-id") && token(":path"));
        assert!(!token("a;b") && !token("a b"));
        assert!(key_id("k2026a") && key_id("old_key-1"));
        assert!(!key_id("") && !key_id("k.1") && !key_id(&"k".repeat(33)));
    }
}
