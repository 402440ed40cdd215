//! Seed 003's cookie generator: the control plane mints a tenant's `tenantGray` cookie,
//! signed with a private Ed25519 key that only it holds (`cookie_keys` in graylane.yaml),
//! when the live strategy puts the tenant in gray by its id; else `tenantGray=0`.
//!
//! Private keys stay inside [`PrivateKey`]: it has no `Serialize`, its `Debug` prints the key
//! id and the public key only, and errors about a key name its field, never its value. The
//! strategies (so the feed, the API and every filter) carry the public keys.
//!
//! A cookie is signed only with a key the strategy lists under the same id and the same
//! public key, and not past its `not_after`: the control plane never answers a cookie the
//! filters could not verify.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use graylane_strategy::cookie::{self, SigningKey};
use graylane_strategy::{Compiled, GrayCookieMode, Id, Reason};
use serde::Deserialize;

/// Default lifetime of a minted cookie: a day, a working session's length (the auth
/// service of seed 003 sets it at login).
pub const DEFAULT_TTL_SECS: u64 = 86_400;

/// Longest lifetime `cookie_ttl` accepts: a cookie cannot be revoked before its expiry (only
/// by retiring its key), so a week at most (also the longest duration the config takes).
pub const MAX_TTL_SECS: u64 = 7 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A `cookie_keys` entry that cannot be used (`field` names it; the message never holds
    /// the key).
    #[error("{field}: {message}")]
    Key { field: String, message: String },
    /// The strategy has no signed gray cookie (none, or plain mode).
    #[error("service {service:?} does not use signed gray cookies ({why}): list public keys under gray_cookie.keys (mode signed; `graylane keygen` makes a pair)")]
    NotSigned { service: String, why: &'static str },
    /// No configured private key matches a public key the strategy lists (or each such
    /// key is past its `not_after`).
    #[error("no private key in cookie_keys matches a usable public key of service {service:?} (gray_cookie.keys lists {listed:?}; cookie_keys has {configured:?}): a cookie signed now could not be verified by the filters")]
    NoKey {
        service: String,
        listed: Vec<String>,
        configured: Vec<String>,
    },
}

/// One `cookie_keys` entry as written: the private key inline or in a file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub id: String,
    /// The private key: base64 of its 32-byte seed (what `graylane keygen` prints).
    #[serde(default)]
    private_key: Option<Secret>,
    /// A file holding the private key (base64), relative to graylane.yaml; mode 0600.
    #[serde(default)]
    private_key_file: Option<PathBuf>,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("id", &self.id)
            .field(
                "private_key",
                &self.private_key.as_ref().map(|_| "<redacted>"),
            )
            .field("private_key_file", &self.private_key_file)
            .finish()
    }
}

/// Text that is a secret: parsed from the file, never printed.
struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Secret;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a private key in base64")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret(v.to_string()))
            }
        }
        // A non-string value is refused without repeating it.
        d.deserialize_str(Visit)
    }
}

/// A private key the control plane signs gray cookies with.
#[derive(Clone)]
pub struct PrivateKey {
    id: String,
    key: Arc<SigningKey>,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateKey")
            .field("id", &self.id)
            .field("public_key", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// A key from its 32-byte seed.
    pub fn from_seed(id: &str, seed: &[u8; 32]) -> PrivateKey {
        PrivateKey {
            id: id.to_string(),
            key: Arc::new(SigningKey::from_bytes(seed)),
        }
    }

    /// A new random key (the operating system's randomness).
    pub fn generate(id: &str) -> Result<PrivateKey, String> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|e| format!("no randomness: {e}"))?;
        Ok(PrivateKey::from_seed(id, &seed))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key, as strategies list it (base64).
    pub fn public_key(&self) -> String {
        cookie::public_key_text(&self.key.verifying_key())
    }

    /// The private key as `cookie_keys` takes it (base64 of the seed). Only `keygen` calls
    /// this, to hand a new key to its operator.
    pub fn private_key_text(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(STANDARD.encode(self.key.to_bytes()))
    }

    /// Whether `trusted` is this key's public half under this key's id.
    fn matches(&self, trusted: &cookie::TrustedKey) -> bool {
        trusted.id() == self.id && trusted.public_bytes() == self.key.verifying_key().as_bytes()
    }
}

/// The private keys of `cookie_keys`, in the file's order.
#[derive(Debug, Clone, Default)]
pub struct Keys(Arc<Vec<PrivateKey>>);

impl Keys {
    pub fn new(keys: Vec<PrivateKey>) -> Keys {
        Keys(Arc::new(keys))
    }

    /// Reads `cookie_keys` (files relative to `base`, the config file's directory).
    pub fn load(specs: &[KeySpec], base: &Path) -> Result<Keys, Error> {
        let mut keys: Vec<PrivateKey> = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let at = |field: &str, message: String| Error::Key {
                field: format!("cookie_keys[{i}]{field}"),
                message,
            };
            if !graylane_strategy::name::key_id(&s.id) {
                return Err(at(
                    ".id",
                    "key ids use letters, digits, '-' or '_' (at most 32)".into(),
                ));
            }
            if keys.iter().any(|k| k.id == s.id) {
                return Err(at(".id", format!("key id {:?} is listed twice", s.id)));
            }
            let text = match (&s.private_key, &s.private_key_file) {
                (Some(t), None) => zeroize::Zeroizing::new(t.0.clone()),
                (None, Some(file)) => {
                    let path = base.join(file);
                    std::fs::read_to_string(&path)
                        .map(zeroize::Zeroizing::new)
                        .map_err(|e| {
                            at(
                                ".private_key_file",
                                format!("cannot read {}: {e}", path.display()),
                            )
                        })?
                }
                _ => {
                    return Err(at(
                        "",
                        "give exactly one of private_key and private_key_file".into(),
                    ))
                }
            };
            let field = if s.private_key.is_some() {
                ".private_key"
            } else {
                ".private_key_file"
            };
            let seed = parse_seed(&text).map_err(|m| at(field, m.into()))?;
            keys.push(PrivateKey::from_seed(&s.id, &seed));
        }
        Ok(Keys::new(keys))
    }

    pub fn ids(&self) -> Vec<String> {
        self.0.iter().map(|k| k.id.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The 32-byte seed in `text` (base64, surrounding whitespace ignored).
fn parse_seed(text: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, &'static str> {
    let mut buf = zeroize::Zeroizing::new([0u8; 48]);
    let n = STANDARD
        .decode_slice(text.trim(), &mut *buf)
        .map_err(|_| "not base64 of a 32-byte Ed25519 private key (`graylane keygen` makes one)")?;
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    match buf.get(..n) {
        Some(b) if n == 32 => seed.copy_from_slice(b),
        _ => return Err("not a 32-byte Ed25519 private key (`graylane keygen` makes one)"),
    }
    Ok(seed)
}

/// The cookie generator as configured: the private keys and the cookies' lifetime.
#[derive(Debug, Clone)]
pub struct Generator {
    pub keys: Keys,
    pub ttl_secs: u64,
}

impl Default for Generator {
    fn default() -> Self {
        Generator {
            keys: Keys::default(),
            ttl_secs: DEFAULT_TTL_SECS,
        }
    }
}

impl Generator {
    /// [`issue`] with these keys and lifetime.
    pub fn issue(
        &self,
        service: &str,
        c: &Compiled,
        tenant: &Id,
        now: u64,
    ) -> Result<Issued, Error> {
        issue(&self.keys, service, c, tenant, now, self.ttl_secs)
    }
}

/// What the generator answers for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Issued {
    /// The tenant is in gray: a signed cookie value.
    Gray {
        value: String,
        key_id: String,
        expires: u64,
        /// The Y cluster whose id rule put the tenant in gray, and the rule.
        cluster: String,
        reason: Reason,
    },
    /// The tenant is not in gray: `0`.
    NotGray,
}

/// Seed 003's cookie generator for one tenant of `service` (compiled `c`), at `now` (Unix
/// seconds), valid for `ttl` seconds (less if the key retires sooner).
pub fn issue(
    keys: &Keys,
    service: &str,
    c: &Compiled,
    tenant: &Id,
    now: u64,
    ttl: u64,
) -> Result<Issued, Error> {
    let why = match c.gray_cookie() {
        None => Some("no gray_cookie"),
        Some((_, GrayCookieMode::Plain)) => Some("gray_cookie mode plain"),
        Some((_, GrayCookieMode::Signed)) => None,
    };
    if let Some(why) = why {
        return Err(Error::NotSigned {
            service: service.to_string(),
            why,
        });
    }
    // Among the configured keys the strategy lists (same id and public key) and still in
    // force, the one that lives longest (no `not_after` first), then the file's order: during
    // a rotation, the new key.
    let listed = c.gray_cookie_keys();
    let mut best: Option<(&PrivateKey, u64)> = None;
    for k in keys.0.iter() {
        let Some(t) = listed.iter().find(|t| k.matches(t)) else {
            continue;
        };
        let until = t.not_after().unwrap_or(u64::MAX);
        if until <= now {
            continue;
        }
        if best.is_none_or(|(_, b)| until > b) {
            best = Some((k, until));
        }
    }
    let Some((key, until)) = best else {
        return Err(Error::NoKey {
            service: service.to_string(),
            listed: listed.iter().map(|t| t.id().to_string()).collect(),
            configured: keys.ids(),
        });
    };
    let Some((i, reason)) = graylane_strategy::gray_whitelist(c, tenant) else {
        return Ok(Issued::NotGray);
    };
    let expires = now.saturating_add(ttl).min(until);
    Ok(Issued::Gray {
        value: cookie::sign(&key.key, &key.id, tenant, expires),
        key_id: key.id.clone(),
        expires,
        cluster: c
            .clusters()
            .get(i)
            .map(|cl| cl.key.clone())
            .unwrap_or_default(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn compiled(keys: &[(&PrivateKey, Option<u64>)]) -> Compiled {
        let keys: Vec<serde_json::Value> = keys
            .iter()
            .map(|(k, na)| {
                let mut v = serde_json::json!({"id": k.id(), "public_key": k.public_key()});
                if let Some(t) = na {
                    v["not_after"] = (*t).into();
                }
                v
            })
            .collect();
        let spec = serde_json::json!({
            "gray_cookie": {"keys": keys},
            "route-strategy": {
                "A": {"status": "Y", "id": {"ids": [1, 2], "interval": [[600, 700]]}, "gray_cookie": true},
                "B": {"status": "G", "id": {"all": true}}}});
        Compiled::try_from(graylane_strategy::parse_json(spec.to_string().as_bytes()).unwrap())
            .unwrap()
    }

    fn verify(c: &Compiled, value: &str, tenant: u64, now: u64) -> cookie::Verdict {
        cookie::verify_signed(
            c.gray_cookie_keys(),
            value.as_bytes(),
            Some(&Id::Num(tenant)),
            Some(now),
            &cookie::Uncached,
        )
    }

    #[test]
    fn whitelisted_tenants_get_a_cookie_the_strategy_verifies() {
        let k = PrivateKey::from_seed("k1", &[1; 32]);
        let keys = Keys::new(vec![k.clone()]);
        let c = compiled(&[(&k, None)]);
        let got = issue(&keys, "web", &c, &Id::Num(650), 1_000, 60).unwrap();
        let Issued::Gray {
            value,
            key_id,
            expires,
            cluster,
            reason,
        } = got
        else {
            panic!("{got:?}")
        };
        assert_eq!(
            (key_id.as_str(), expires, cluster.as_str()),
            ("k1", 1_060, "A")
        );
        assert!(matches!(reason, Reason::IdInterval(_)));
        assert_eq!(verify(&c, &value, 650, 1_059), cookie::Verdict::Gray);
        assert_ne!(verify(&c, &value, 650, 1_060), cookie::Verdict::Gray);
        assert_eq!(
            issue(&keys, "web", &c, &Id::Num(5), 1_000, 60).unwrap(),
            Issued::NotGray
        );
    }

    #[test]
    fn the_key_must_be_listed_and_in_force() {
        let (old, new) = (
            PrivateKey::from_seed("old", &[1; 32]),
            PrivateKey::from_seed("new", &[2; 32]),
        );
        let both = Keys::new(vec![old.clone(), new.clone()]);
        // During a rotation the key that lives longer signs; the cookie ends with its key.
        let c = compiled(&[(&old, Some(2_000)), (&new, None)]);
        let kid = |r: Issued| match r {
            Issued::Gray {
                key_id, expires, ..
            } => (key_id, expires),
            Issued::NotGray => panic!("not gray"),
        };
        assert_eq!(
            kid(issue(&both, "web", &c, &Id::Num(1), 1_000, 60).unwrap()).0,
            "new"
        );
        let only_old = Keys::new(vec![old.clone()]);
        assert_eq!(
            kid(issue(&only_old, "web", &c, &Id::Num(1), 1_000, 5_000).unwrap()),
            ("old".to_string(), 2_000),
            "capped at the key's not_after"
        );
        let e = issue(&only_old, "web", &c, &Id::Num(1), 2_000, 60).unwrap_err();
        assert!(matches!(e, Error::NoKey { .. }), "{e}");
        // Same id, another public key: never used.
        let impostor = Keys::new(vec![PrivateKey::from_seed("new", &[3; 32])]);
        let e = issue(&impostor, "web", &c, &Id::Num(1), 1_000, 60).unwrap_err();
        assert!(e.to_string().contains("could not be verified"), "{e}");
        // Refused before the whitelist is consulted: not-gray tenants too.
        assert!(issue(&impostor, "web", &c, &Id::Num(5), 1_000, 60).is_err());
        let plain = Compiled::try_from(
            graylane_strategy::parse_json(
                br#"{"gray_cookie": {"mode": "plain"}, "route-strategy": {"B": {"status": "G"}}}"#,
            )
            .unwrap(),
        )
        .unwrap();
        let e = issue(&both, "web", &plain, &Id::Num(1), 1_000, 60).unwrap_err();
        assert!(matches!(e, Error::NotSigned { .. }), "{e}");
    }

    #[test]
    fn keys_load_inline_or_from_a_file_and_never_print() {
        let k = PrivateKey::generate("k1").unwrap();
        let secret = k.private_key_text();
        let dir = std::env::temp_dir().join(format!("graylane-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k2.key"), format!("{}\n", &*secret)).unwrap();
        let yaml = format!(
            "- {{id: k1, private_key: \"{}\"}}\n- {{id: k2, private_key_file: k2.key}}\n",
            &*secret
        );
        let specs: Vec<KeySpec> = serde_saphyr::from_str(&yaml).unwrap();
        let keys = Keys::load(&specs, &dir).unwrap();
        assert_eq!(keys.ids(), ["k1", "k2"]);
        assert_eq!(keys.0[1].public_key(), k.public_key());
        for shown in [format!("{keys:?}"), format!("{specs:?}"), format!("{k:?}")] {
            assert!(!shown.contains(&*secret), "{shown}");
            assert!(
                shown.contains(&k.public_key()) || shown.contains("redacted"),
                "{shown}"
            );
        }
        let bad = |yaml: &str| {
            let specs: Vec<KeySpec> = serde_saphyr::from_str(yaml).unwrap();
            Keys::load(&specs, &dir).unwrap_err()
        };
        let e = bad("- {id: k1, private_key: \"c2hvcnQ=\"}\n");
        assert!(
            matches!(&e, Error::Key { field, .. } if field == "cookie_keys[0].private_key"),
            "{e}"
        );
        assert!(!e.to_string().contains("c2hvcnQ="), "{e}");
        let e = bad("- {id: k1, private_key_file: nowhere.key}\n");
        assert!(
            matches!(&e, Error::Key { field, .. } if field == "cookie_keys[0].private_key_file"),
            "{e}"
        );
        let e = bad("- {id: \"k.1\", private_key_file: k2.key}\n");
        assert!(
            matches!(&e, Error::Key { field, .. } if field == "cookie_keys[0].id"),
            "{e}"
        );
        let e = bad("- {id: k1}\n");
        assert!(
            matches!(&e, Error::Key { field, .. } if field == "cookie_keys[0]"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
