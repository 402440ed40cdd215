//! Cookies: reading a `Cookie` header, and seed 003's gray cookie, signed.
//!
//! Signed form: `1.<tenant>.<expiry>.<kid>.<sig>`. `<sig>` is the Ed25519 signature, in
//! base64url without padding, of everything before its dot, made with the private key whose
//! id is `<kid>`; `<expiry>` is in Unix seconds. A cookie is honoured only under a public key
//! the strategy lists for that id (and before that key's `not_after`), before its expiry, for
//! the request's own tenant id. `0` says "not gray".
//!
//! Strategies, and so the feed and every filter, hold public keys only; the private keys stay
//! in the control plane (or the auth service). No data plane can mint a cookie.
//!
//! Checking a signature costs tens of microseconds, so `decide` asks a [`Signatures`] for it:
//! [`Uncached`] checks every time, a host may remember verdicts (the filter keeps a bounded
//! cache per VM). Everything else (format, key id, expiry, tenant) is checked first, without
//! cryptography, so a cookie that fails those never costs a verification.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _};
pub use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::Error;
use crate::id::{parse_id, parse_u64, Id};
use crate::spec::PublicKeySpec;

/// The longest gray cookie value considered: a signed one with the longest tenant id (128
/// bytes), expiry, key id (32) and signature (86) fits; anything longer is malformed.
pub const MAX_VALUE_LEN: usize = 300;

/// Most public keys one service trusts at once (a rotation needs two or three).
pub const MAX_KEYS: usize = 8;

/// The value of cookie `name` in one `Cookie` header value (`a=1; b=2`), unquoted.
pub fn find<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|b| *b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|b| *b == b'=')?;
        let (k, v) = (&pair[..eq], &pair[eq + 1..]);
        if trim(k) != name.as_bytes() {
            return None;
        }
        let v = trim(v);
        Some(match v {
            [b'"', inner @ .., b'"'] => inner,
            _ => v,
        })
    })
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or(&[])
}

/// What a gray cookie says, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Valid and says gray.
    Gray,
    /// Absent, says prod, or not to be honoured (why).
    NotGray(Rejected),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Absent,
    SaysProd,
    Malformed,
    /// Signed with a key id the strategy does not list.
    UnknownKey,
    /// The key's `not_after` has passed.
    KeyRetired,
    BadSignature,
    Expired,
    OtherTenant,
    /// The host could not read the time, so no expiring cookie can be honoured.
    NoClock,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Absent => "absent",
            Rejected::SaysProd => "says prod",
            Rejected::Malformed => "malformed",
            Rejected::UnknownKey => "unknown key id",
            Rejected::KeyRetired => "key past its not_after",
            Rejected::BadSignature => "bad signature",
            Rejected::Expired => "expired",
            Rejected::OtherTenant => "bound to another tenant",
            Rejected::NoClock => "no clock to check its expiry",
        }
    }
}

/// A public key signed cookies may be signed with, as the strategy lists it (checked).
#[derive(Clone, PartialEq, Eq)]
pub struct TrustedKey {
    id: String,
    key: VerifyingKey,
    not_after: Option<u64>,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedKey")
            .field("id", &self.id)
            .field("public_key", &public_key_text(&self.key))
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl TrustedKey {
    /// Checks one entry of `gray_cookie.keys` (`path` names it in errors).
    pub fn parse(spec: &PublicKeySpec, path: &str) -> Result<TrustedKey, Error> {
        if !crate::name::key_id(&spec.id) {
            return Err(Error::invalid(
                format!("{path}.id"),
                "key ids use letters, digits, '-' or '_' (at most 32)",
            ));
        }
        let key = parse_public_key(&spec.public_key)
            .map_err(|m| Error::invalid(format!("{path}.public_key"), m))?;
        Ok(TrustedKey {
            id: spec.id.clone(),
            key,
            not_after: spec.not_after,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The public key's 32 bytes (what a cache of verdicts compares).
    pub fn public_bytes(&self) -> &[u8; 32] {
        self.key.as_bytes()
    }

    pub fn not_after(&self) -> Option<u64> {
        self.not_after
    }
}

/// The Ed25519 public key in `text` (base64 of 32 bytes), checked: a valid curve point, and
/// not one of small order (for which signatures prove nothing).
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, &'static str> {
    let mut bytes = [0u8; 32];
    let n = STANDARD
        .decode_slice(text.trim(), &mut bytes)
        .map_err(|_| "not base64 of a 32-byte Ed25519 public key")?;
    if n != 32 {
        return Err("not base64 of a 32-byte Ed25519 public key");
    }
    let key = VerifyingKey::from_bytes(&bytes).map_err(|_| "not an Ed25519 public key")?;
    if key.is_weak() {
        return Err("a weak (small-order) Ed25519 public key");
    }
    Ok(key)
}

/// A public key as strategies write it: base64 of its 32 bytes.
pub fn public_key_text(key: &VerifyingKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// A signed cookie whose claims passed, with its signature still to be checked: what
/// [`Signatures`] gets, and what a cache of verdicts keys on.
pub struct Signed<'a> {
    value: &'a [u8],
    message: &'a [u8],
    signature: Signature,
    key: &'a TrustedKey,
    expires: u64,
}

impl Signed<'_> {
    /// The whole cookie value (message and signature).
    pub fn value(&self) -> &[u8] {
        self.value
    }

    /// The key it claims to be signed with.
    pub fn key(&self) -> &TrustedKey {
        self.key
    }

    /// Its expiry, Unix seconds.
    pub fn expires(&self) -> u64 {
        self.expires
    }

    /// Checks the signature: Ed25519 `verify_strict` (no malleable or small-order forms).
    pub fn verify(&self) -> bool {
        self.key
            .key
            .verify_strict(self.message, &self.signature)
            .is_ok()
    }
}

/// Where `decide` gets a signature checked. The answer must be `cookie.verify()`'s; a host
/// may remember it (keyed on the value and the public key), never guess it.
pub trait Signatures {
    fn verify(&self, cookie: &Signed<'_>) -> bool;
}

/// Checks every signature anew (explain, tests, hosts without a cache).
pub struct Uncached;

impl Signatures for Uncached {
    fn verify(&self, cookie: &Signed<'_>) -> bool {
        cookie.verify()
    }
}

/// A signed value split into its parts (from the right: the tenant id may hold dots).
struct Parts<'a> {
    message: &'a [u8],
    tenant: &'a [u8],
    expires: u64,
    kid: &'a [u8],
    signature: Signature,
}

fn split(value: &[u8]) -> Option<Parts<'_>> {
    if value.len() > MAX_VALUE_LEN {
        return None;
    }
    let dot = value.iter().rposition(|b| *b == b'.')?;
    let (message, sig) = (&value[..dot], &value[dot + 1..]);
    let dot = message.iter().rposition(|b| *b == b'.')?;
    let (head, kid) = (&message[..dot], &message[dot + 1..]);
    let dot = head.iter().rposition(|b| *b == b'.')?;
    let (head, expires) = (&head[..dot], parse_u64(&head[dot + 1..])?);
    let tenant = head.strip_prefix(b"1.")?;
    // 64 bytes are 86 characters; base64's canonical check rejects other spellings.
    if sig.len() != 86 {
        return None;
    }
    let mut bytes = [0u8; 66];
    let n = URL_SAFE_NO_PAD.decode_slice(sig, &mut bytes).ok()?;
    let bytes: [u8; 64] = bytes.get(..n)?.try_into().ok()?;
    Some(Parts {
        message,
        tenant,
        expires,
        kid,
        signature: Signature::from_bytes(&bytes),
    })
}

/// Checks a signed gray cookie value against the trusted `keys`, the request's tenant and
/// the time (`None`: unknown, so nothing that expires is honoured). Claims first, then the
/// signature through `signatures`.
pub fn verify_signed(
    keys: &[TrustedKey],
    value: &[u8],
    tenant: Option<&Id>,
    now: Option<u64>,
    signatures: &dyn Signatures,
) -> Verdict {
    if value == b"0" {
        return Verdict::NotGray(Rejected::SaysProd);
    }
    let Some(p) = split(value) else {
        return Verdict::NotGray(Rejected::Malformed);
    };
    let Some(key) = keys.iter().find(|k| k.id.as_bytes() == p.kid) else {
        return Verdict::NotGray(Rejected::UnknownKey);
    };
    let Some(now) = now else {
        return Verdict::NotGray(Rejected::NoClock);
    };
    if key.not_after.is_some_and(|t| now >= t) {
        return Verdict::NotGray(Rejected::KeyRetired);
    }
    if p.expires <= now {
        return Verdict::NotGray(Rejected::Expired);
    }
    if tenant.is_none() || parse_id(p.tenant).as_ref() != tenant {
        return Verdict::NotGray(Rejected::OtherTenant);
    }
    let signed = Signed {
        value,
        message: p.message,
        signature: p.signature,
        key,
        expires: p.expires,
    };
    if !signatures.verify(&signed) {
        return Verdict::NotGray(Rejected::BadSignature);
    }
    Verdict::Gray
}

/// The signed cookie value saying `tenant` is gray until `expires` (Unix seconds), signed
/// with `key` under id `kid`. Only the control plane (or an auth service) holds a `key`.
pub fn sign(key: &SigningKey, kid: &str, tenant: &Id, expires: u64) -> String {
    let message = format!("1.{tenant}.{expires}.{kid}");
    let signature = key.sign(message.as_bytes());
    format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
}

/// Checks seed 003's plain cookie: `1` is gray.
pub fn verify_plain(value: &[u8]) -> Verdict {
    if value == b"1" {
        Verdict::Gray
    } else {
        Verdict::NotGray(Rejected::SaysProd)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn trusted(id: &str, k: &SigningKey, not_after: Option<u64>) -> TrustedKey {
        let spec = PublicKeySpec {
            id: id.into(),
            public_key: public_key_text(&k.verifying_key()),
            not_after,
        };
        TrustedKey::parse(&spec, "keys[0]").unwrap()
    }

    #[test]
    fn signed_cookies_are_checked_claims_first() {
        let (k1, k2) = (key(1), key(2));
        let keys = [trusted("k1", &k1, None), trusted("k2", &k2, Some(1_500))];
        let t42 = Id::Num(42);
        let check = |v: &str, tenant: u64, now: Option<u64>| {
            verify_signed(&keys, v.as_bytes(), Some(&Id::Num(tenant)), now, &Uncached)
        };
        let good = sign(&k1, "k1", &t42, 2_000);
        assert_eq!(check(&good, 42, Some(1_000)), Verdict::Gray);
        let no = |r| Verdict::NotGray(r);
        assert_eq!(check(&good, 43, Some(1_000)), no(Rejected::OtherTenant));
        assert_eq!(check(&good, 42, Some(2_000)), no(Rejected::Expired));
        assert_eq!(check(&good, 42, None), no(Rejected::NoClock));
        // Rotation: k2 verifies until its not_after.
        let by_k2 = sign(&k2, "k2", &t42, 2_000);
        assert_eq!(check(&by_k2, 42, Some(1_499)), Verdict::Gray);
        assert_eq!(check(&by_k2, 42, Some(1_500)), no(Rejected::KeyRetired));
        // Signed by k2's private key but claiming k1: forged.
        let wrong = sign(&k2, "k1", &t42, 2_000);
        assert_eq!(check(&wrong, 42, Some(1_000)), no(Rejected::BadSignature));
        assert_eq!(
            check(&sign(&k1, "k9", &t42, 2_000), 42, Some(1_000)),
            no(Rejected::UnknownKey)
        );
        // A changed claim breaks the signature.
        let moved = good.replacen("1.42.2000", "1.42.2001", 1);
        assert_eq!(check(&moved, 42, Some(1_000)), no(Rejected::BadSignature));
        assert_eq!(check("0", 42, Some(1_000)), no(Rejected::SaysProd));
        for bad in [
            "1",
            "1.42.2000.k1",
            "1.42.x.k1.AAAA",
            "2.42.2000.k1.AAAA",
            "",
        ] {
            assert_eq!(
                check(bad, 42, Some(1_000)),
                no(Rejected::Malformed),
                "{bad}"
            );
        }
        // The HMAC form of earlier versions is malformed.
        assert_eq!(
            check("1.42.2000.0123abcd", 42, Some(1_000)),
            no(Rejected::Malformed)
        );
    }

    #[test]
    fn string_tenants_with_dots_round_trip() {
        let k = key(3);
        let keys = [trusted("k", &k, None)];
        let t = Id::Str("acme.eu".into());
        let v = sign(&k, "k", &t, 10);
        assert_eq!(
            verify_signed(&keys, v.as_bytes(), Some(&t), Some(5), &Uncached),
            Verdict::Gray
        );
    }

    #[test]
    fn public_keys_are_checked() {
        let k = key(4).verifying_key();
        assert_eq!(parse_public_key(&public_key_text(&k)).unwrap(), k);
        assert!(parse_public_key("AAAA").is_err());
        assert!(parse_public_key("not base64!").is_err());
        // The identity point has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(parse_public_key(&STANDARD.encode(identity)).is_err());
    }
}
