//! Signed gray cookies verified once per VM (the Envoy filter) or per worker (the nginx
//! library): a bounded cache of the cookies whose Ed25519
//! signature checked out, so the request path pays a verification (tens of microseconds)
//! once per cookie and VM, and a lookup after that.
//!
//! Only good signatures are remembered, keyed on the whole cookie value and the public key
//! it was checked under (compared byte for byte, never trusted on a hash): a forged or
//! garbage cookie can never be answered from here, nor evict a genuine one, since only the
//! holder of a private key can make an entry. Everything a cookie claims besides its
//! signature (key id listed and not retired, expiry, tenant) is checked by `decide` on every
//! request before it asks, so an entry whose cookie expired or whose key was removed is
//! simply never asked for again, and ages out.
//!
//! Eviction is CLOCK (second chance): a hit sets one bit, a miss sweeps a hand over the
//! slots. That is an LRU's behaviour for this load at the cost of a flag per hit, without a
//! linked list relinked on every request or a dependency (the `lru` crate) with unsafe code.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::cookie::{Signatures, Signed};
use crate::hash::stable_hash;

/// Slots per VM. A slot holds one cookie value (at most `cookie::MAX_VALUE_LEN` = 300 bytes,
/// about 130 for a numeric tenant) and a 32-byte key, so the cache stays under 400 KiB per
/// VM even when full of the longest cookies (about 200 KiB with numeric tenants). 1024 covers
/// the gray tenants one worker sees within a cookie's lifetime in the deployments of seed
/// 003 (a gray whitelist of tens to hundreds of tenants); beyond it the only cost is a
/// verification again for a cookie that was evicted.
pub const CAPACITY: usize = 1024;

struct Slot {
    value: Box<[u8]>,
    key: [u8; 32],
    /// Hit since the hand last passed.
    referenced: bool,
}

/// The cookies this VM has verified.
pub struct Verdicts {
    slots: Vec<Slot>,
    /// Hash of the value -> slot (a second value with the same hash replaces the first).
    index: HashMap<u64, usize>,
    hand: usize,
    capacity: usize,
}

/// How full it is; never the cookies, which are credentials.
impl std::fmt::Debug for Verdicts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verdicts")
            .field("cookies", &self.slots.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for Verdicts {
    fn default() -> Self {
        Verdicts::with_capacity(CAPACITY)
    }
}

/// The index key of a cookie value: a hash of its last 16 bytes, which are signature (random
/// to anyone without the private key), so hashing the whole value would buy nothing. Two
/// values with one key only cost a miss: entries are compared byte for byte.
fn hash(value: &[u8]) -> u64 {
    let tail = value.get(value.len().saturating_sub(16)..).unwrap_or(value);
    stable_hash(0x6772_6179_636f_6f6b, tail)
}

impl Verdicts {
    pub fn with_capacity(capacity: usize) -> Verdicts {
        Verdicts {
            slots: Vec::new(),
            index: HashMap::new(),
            hand: 0,
            capacity: capacity.max(1),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether `value` was verified under `key` (and marks it used).
    pub fn remembered(&mut self, value: &[u8], key: &[u8; 32]) -> bool {
        let Some(&at) = self.index.get(&hash(value)) else {
            return false;
        };
        match self.slots.get_mut(at) {
            Some(s) if *s.value == *value && s.key == *key => {
                s.referenced = true;
                true
            }
            _ => false,
        }
    }

    /// Records that `value`'s signature verified under `key`.
    pub fn remember(&mut self, value: &[u8], key: &[u8; 32]) {
        let h = hash(value);
        let slot = Slot {
            value: value.into(),
            key: *key,
            referenced: false,
        };
        if let Some(&at) = self.index.get(&h) {
            if let Some(s) = self.slots.get_mut(at) {
                *s = slot;
                return;
            }
        }
        if self.slots.len() < self.capacity {
            self.index.insert(h, self.slots.len());
            self.slots.push(slot);
            return;
        }
        // Second chance: clear reference bits until an unreferenced slot comes round.
        let n = self.slots.len();
        loop {
            self.hand %= n;
            let at = self.hand;
            self.hand += 1;
            let Some(s) = self.slots.get_mut(at) else {
                return;
            };
            if s.referenced {
                s.referenced = false;
                continue;
            }
            let old = hash(&s.value);
            if self.index.get(&old) == Some(&at) {
                self.index.remove(&old);
            }
            *s = slot;
            self.index.insert(h, at);
            return;
        }
    }
}

/// [`Signatures`] for one request: answers from the VM's [`Verdicts`], verifies (and
/// remembers) what it does not hold, and counts both for the metrics.
pub struct Cached<'a> {
    verdicts: RefCell<&'a mut Verdicts>,
    /// Signatures verified (cache misses).
    pub verified: Cell<u32>,
    /// Signatures answered from the cache.
    pub remembered: Cell<u32>,
}

impl<'a> Cached<'a> {
    pub fn new(verdicts: &'a mut Verdicts) -> Cached<'a> {
        Cached {
            verdicts: RefCell::new(verdicts),
            verified: Cell::new(0),
            remembered: Cell::new(0),
        }
    }
}

impl Signatures for Cached<'_> {
    fn verify(&self, cookie: &Signed<'_>) -> bool {
        let key = cookie.key().public_bytes();
        let Ok(mut verdicts) = self.verdicts.try_borrow_mut() else {
            self.verified.set(self.verified.get() + 1);
            return cookie.verify();
        };
        if verdicts.remembered(cookie.value(), key) {
            self.remembered.set(self.remembered.get() + 1);
            return true;
        }
        self.verified.set(self.verified.get() + 1);
        let ok = cookie.verify();
        if ok {
            verdicts.remember(cookie.value(), key);
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cookie::{self, SigningKey, Verdict};
    use crate::{Compiled, Id, PublicKeySpec};

    fn keys(k: &SigningKey, id: &str) -> Vec<cookie::TrustedKey> {
        let spec = PublicKeySpec {
            id: id.into(),
            public_key: cookie::public_key_text(&k.verifying_key()),
            not_after: None,
        };
        vec![cookie::TrustedKey::parse(&spec, "keys[0]").unwrap()]
    }

    fn check(
        cache: &mut Verdicts,
        keys: &[cookie::TrustedKey],
        v: &str,
        t: u64,
    ) -> (Verdict, u32, u32) {
        let cached = Cached::new(cache);
        let verdict =
            cookie::verify_signed(keys, v.as_bytes(), Some(&Id::Num(t)), Some(100), &cached);
        (verdict, cached.verified.get(), cached.remembered.get())
    }

    #[test]
    fn a_cookie_is_verified_once_and_forgeries_are_never_remembered() {
        let k = SigningKey::from_bytes(&[1; 32]);
        let trusted = keys(&k, "k1");
        let mut cache = Verdicts::default();
        let good = cookie::sign(&k, "k1", &Id::Num(7), 1_000);
        assert_eq!(check(&mut cache, &trusted, &good, 7), (Verdict::Gray, 1, 0));
        assert_eq!(check(&mut cache, &trusted, &good, 7), (Verdict::Gray, 0, 1));
        assert_eq!(cache.len(), 1);
        // Claims are checked before the cache: another tenant costs nothing and is refused.
        let (v, verified, remembered) = check(&mut cache, &trusted, &good, 8);
        assert!(matches!(v, Verdict::NotGray(_)));
        assert_eq!((verified, remembered), (0, 0));
        // A forgery (same claims, signed by another key) is verified every time, never kept.
        let forged = cookie::sign(&SigningKey::from_bytes(&[2; 32]), "k1", &Id::Num(7), 1_000);
        for _ in 0..3 {
            let (v, verified, _) = check(&mut cache, &trusted, &forged, 7);
            assert_eq!(v, Verdict::NotGray(cookie::Rejected::BadSignature));
            assert_eq!(verified, 1);
        }
        assert_eq!(cache.len(), 1);
        // The same value under another public key (a key id given to a new key) is a miss.
        let other = keys(&SigningKey::from_bytes(&[3; 32]), "k1");
        let (v, verified, remembered) = check(&mut cache, &other, &good, 7);
        assert_eq!(v, Verdict::NotGray(cookie::Rejected::BadSignature));
        assert_eq!((verified, remembered), (1, 0));
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let mut cache = Verdicts::with_capacity(4);
        let key = [9u8; 32];
        let v = |i: u32| format!("1.{i}.100.k.sig");
        for i in 0..4 {
            cache.remember(v(i).as_bytes(), &key);
        }
        assert!(cache.remembered(v(0).as_bytes(), &key));
        // Four more: 0 (used) survives the first sweep; everything else is replaced in turn.
        for i in 4..7 {
            cache.remember(v(i).as_bytes(), &key);
        }
        assert_eq!(cache.len(), 4);
        assert!(cache.remembered(v(0).as_bytes(), &key));
        for i in 1..4 {
            assert!(!cache.remembered(v(i).as_bytes(), &key), "{i} evicted");
        }
        for i in 4..7 {
            assert!(cache.remembered(v(i).as_bytes(), &key), "{i} kept");
        }
        assert!(!cache.remembered(v(0).as_bytes(), &[8u8; 32]), "other key");
        for i in 0..10_000 {
            cache.remember(v(i).as_bytes(), &key);
        }
        assert_eq!((cache.len(), cache.index.len()), (4, 4));
    }

    #[test]
    fn decide_with_the_cache_decides_as_decide() {
        let k = SigningKey::from_bytes(&[4; 32]);
        let public = cookie::public_key_text(&k.verifying_key());
        let spec = format!(
            r#"{{"gray_cookie": {{"keys": [{{"id": "k", "public_key": "{public}"}}]}},
            "route-strategy": {{"prod": {{"status": "G"}}, "gray": {{"status": "Y", "gray_cookie": true}}}}}}"#
        );
        let c = Compiled::try_from(crate::parse_json(spec.as_bytes()).unwrap()).unwrap();
        let good = cookie::sign(&k, "k", &Id::Num(5), 1_000);
        let ck = format!("tenantGray={good}");
        let headers = vec![
            ("x-tenant-id".to_string(), b"5".to_vec()),
            ("cookie".to_string(), ck.into_bytes()),
        ];
        let mut cache = Verdicts::default();
        for now in [Some(10), Some(10), Some(999), Some(1_000), None] {
            let req = crate::RequestView {
                headers: &headers,
                tenant: None,
                own_lane: None,
                now,
                draw: 0,
            };
            let cached = Cached::new(&mut cache);
            let d = crate::decide_with(&c, &crate::Health::UNKNOWN, &req, &cached);
            assert_eq!(
                d,
                crate::decide(&c, &crate::Health::UNKNOWN, &req),
                "{now:?}"
            );
        }
    }
}
