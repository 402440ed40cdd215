//! Cookies: reading a `Cookie` header, and the signed gray cookie.
//!
//! Signed form: `1.<tenant>.<expiry>.<hmac>` where `<hmac>` is the lowercase hex
//! HMAC-SHA256, under the configured key, of `1.<tenant>.<expiry>` (expiry in Unix seconds).
//! It is valid only for the same tenant id as the request's, before its expiry.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::id::{parse_id, parse_u64, Id};

type HmacSha256 = Hmac<Sha256>;

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
    /// Absent, says prod, forged, expired, or bound to another tenant.
    NotGray(Rejected),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    Absent,
    SaysProd,
    Malformed,
    BadSignature,
    Expired,
    OtherTenant,
}

impl Rejected {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Absent => "absent",
            Rejected::SaysProd => "says prod",
            Rejected::Malformed => "malformed",
            Rejected::BadSignature => "bad signature",
            Rejected::Expired => "expired",
            Rejected::OtherTenant => "bound to another tenant",
        }
    }
}

/// Produces the signed cookie value for `tenant`, valid until `expires` (Unix seconds).
pub fn sign(key: &[u8], tenant: &Id, expires: u64) -> String {
    let payload = format!("1.{tenant}.{expires}");
    let sig = mac(key, payload.as_bytes());
    format!("{payload}.{sig}")
}

fn mac(key: &[u8], payload: &[u8]) -> String {
    // HMAC accepts keys of any length; the error arm cannot happen but is not unwrapped.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return String::new();
    };
    m.update(payload);
    hex(&m.finalize().into_bytes())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn unhex(s: &[u8]) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let val = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.chunks(2)
        .map(|p| Some(val(p[0])? << 4 | val(p[1])?))
        .collect()
}

/// Checks a signed gray cookie value against the request's tenant and the time.
pub fn verify_signed(key: &[u8], value: &[u8], tenant: Option<&Id>, now: u64) -> Verdict {
    let parts = (|| {
        let last = value.iter().rposition(|b| *b == b'.')?;
        let (payload, sig) = (&value[..last], &value[last + 1..]);
        let exp_dot = payload.iter().rposition(|b| *b == b'.')?;
        let (head, exp) = (&payload[..exp_dot], &payload[exp_dot + 1..]);
        let flag_dot = head.iter().position(|b| *b == b'.')?;
        let (flag, who) = (&head[..flag_dot], &head[flag_dot + 1..]);
        Some((payload, sig, flag, who, parse_u64(exp)?))
    })();
    let Some((payload, sig, flag, who, exp)) = parts else {
        return Verdict::NotGray(Rejected::Malformed);
    };
    let Some(sig) = unhex(sig) else {
        return Verdict::NotGray(Rejected::Malformed);
    };
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return Verdict::NotGray(Rejected::BadSignature);
    };
    m.update(payload);
    if m.verify_slice(&sig).is_err() {
        return Verdict::NotGray(Rejected::BadSignature);
    }
    if exp <= now {
        return Verdict::NotGray(Rejected::Expired);
    }
    if tenant.is_none() || parse_id(who).as_ref() != tenant {
        return Verdict::NotGray(Rejected::OtherTenant);
    }
    if flag != b"1" {
        return Verdict::NotGray(Rejected::SaysProd);
    }
    Verdict::Gray
}

/// Checks seed 003's plain cookie: `1` is gray.
pub fn verify_plain(value: &[u8]) -> Verdict {
    if value == b"1" {
        Verdict::Gray
    } else {
        Verdict::NotGray(Rejected::SaysProd)
    }
}
