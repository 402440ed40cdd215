//! How many distinct tenants: a bounded sketch, exact while small.
//!
//! A preview counts the tenants whose requests would move. A set of every id would grow with
//! the traffic (a million tenants), so the sketch keeps the ids' hashes exactly up to
//! [`EXACT`] of them and then becomes a HyperLogLog of 2^[`P`] one-byte registers (1 KiB,
//! standard error 1.04/√1024 ≈ 3.3 %). Sketches from every worker of every Envoy merge (union
//! of the exact sets; register-wise max), so the control plane adds them up without double
//! counting a tenant seen by two workers.
//!
//! Written here rather than taken from a HyperLogLog crate: the filter (wasm) and the control
//! plane must agree on the hash and on a wire format that merges across processes, and the
//! exact mode for small counts (what a test or a short preview sees) is not what those crates
//! offer; the estimator is twenty lines.

use serde::{Deserialize, Serialize};

use crate::decide::tenant_hash;
use crate::id::Id;

/// Distinct hashes kept exactly before switching to registers.
pub const EXACT: usize = 256;
/// log2 of the number of registers.
pub const P: u32 = 10;
const M: usize = 1 << P;
/// The salt of the tenant hash the sketch uses (any fixed value; never a percentage's salt).
const SALT: u64 = 0x6772_6179_6c61_6e65; // "graylane"

/// Distinct tenants, exactly while at most [`EXACT`], then estimated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TenantSketch {
    /// The tenants' hashes, sorted, while exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    exact: Vec<u64>,
    /// HyperLogLog registers (base64 of 2^P bytes), once past [`EXACT`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "registers")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    hll: Option<Vec<u8>>,
}

impl TenantSketch {
    /// Counts `tenant`.
    pub fn insert(&mut self, tenant: &Id) {
        self.insert_hash(tenant_hash(SALT, tenant));
    }

    fn insert_hash(&mut self, h: u64) {
        if let Some(regs) = &mut self.hll {
            observe(regs, h);
            return;
        }
        if let Err(at) = self.exact.binary_search(&h) {
            self.exact.insert(at, h);
            if self.exact.len() > EXACT {
                self.grow();
            }
        }
    }

    fn grow(&mut self) {
        let mut regs = vec![0u8; M];
        for h in self.exact.drain(..) {
            observe(&mut regs, h);
        }
        self.hll = Some(regs);
    }

    /// Adds every tenant of `other`.
    pub fn merge(&mut self, other: &TenantSketch) {
        match (&mut self.hll, &other.hll) {
            (Some(a), Some(b)) => {
                for (x, y) in a.iter_mut().zip(b) {
                    *x = (*x).max(*y);
                }
            }
            (Some(a), None) => {
                for h in &other.exact {
                    observe(a, *h);
                }
            }
            (None, Some(_)) => {
                let mine = std::mem::take(&mut self.exact);
                *self = other.clone();
                for h in mine {
                    self.insert_hash(h);
                }
            }
            (None, None) => {
                for h in &other.exact {
                    self.insert_hash(*h);
                }
            }
        }
    }

    /// Whether [`TenantSketch::count`] is exact.
    pub fn is_exact(&self) -> bool {
        self.hll.is_none()
    }

    /// Distinct tenants: exact, or HyperLogLog's estimate (linear counting while registers
    /// are still empty, as the original paper's small-range correction).
    pub fn count(&self) -> u64 {
        let Some(regs) = &self.hll else {
            return self.exact.len() as u64;
        };
        let m = M as f64;
        let sum: f64 = regs.iter().map(|r| 2f64.powi(-i32::from(*r))).sum();
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let zeros = regs.iter().filter(|r| **r == 0).count();
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }
}

/// Register `h`'s top P bits, keeping the rank of the rest (position of its first one bit).
fn observe(regs: &mut [u8], h: u64) {
    let index = (h >> (64 - P)) as usize;
    let rest = (h << P) | (1 << (P - 1));
    let rank = rest.leading_zeros() as u8 + 1;
    if let Some(r) = regs.get_mut(index) {
        *r = (*r).max(rank);
    }
}

/// Registers as base64 on the wire; a value of another length is refused.
mod registers {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_some(&STANDARD.encode(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)?;
        if bytes.len() != super::M || bytes.iter().any(|r| *r > 64 - super::P as u8 + 1) {
            return Err(serde::de::Error::custom(
                "hll: not a sketch of 1024 registers",
            ));
        }
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn of(range: std::ops::Range<u64>) -> TenantSketch {
        let mut s = TenantSketch::default();
        for t in range {
            s.insert(&Id::Num(t));
        }
        s
    }

    #[test]
    fn exact_while_small_and_merges_without_double_counting() {
        let mut a = of(0..100);
        a.insert(&Id::Num(5));
        assert_eq!((a.count(), a.is_exact()), (100, true));
        let b = of(50..200);
        a.merge(&b);
        assert_eq!((a.count(), a.is_exact()), (200, true));
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<TenantSketch>(&json).unwrap(), a);
        assert_eq!(TenantSketch::default().count(), 0);
    }

    #[test]
    fn estimates_within_a_few_percent_once_large() {
        for n in [300u64, 1_000, 10_000, 100_000, 1_000_000] {
            let s = of(0..n);
            assert!(!s.is_exact());
            let err = (s.count() as f64 - n as f64).abs() / n as f64;
            assert!(err < 0.07, "{n}: {} ({err})", s.count());
        }
        // Halves seen by two workers merge to the whole, large or mixed.
        let mut a = of(0..50_000);
        a.merge(&of(25_000..100_000));
        let mut b = of(0..10);
        b.merge(&of(0..100_000));
        for s in [a, b] {
            let err = (s.count() as f64 - 100_000.0).abs() / 100_000.0;
            assert!(err < 0.07, "{}", s.count());
        }
        let big = of(0..5_000);
        let json = serde_json::to_string(&big).unwrap();
        assert!(json.len() < 1_500, "{}", json.len());
        assert_eq!(serde_json::from_str::<TenantSketch>(&json).unwrap(), big);
        assert!(serde_json::from_str::<TenantSketch>(r#"{"hll":"AAAA"}"#).is_err());
    }
}

#[cfg(test)]
mod pair_tests {
    #![allow(clippy::unwrap_used)]
    use crate::traffic::Pair;
    use crate::Id;

    #[test]
    fn a_pair_of_many_tenants_survives_the_wire() {
        let mut p = Pair {
            from: Some("B".into()),
            to: Some("A".into()),
            ..Pair::default()
        };
        for t in 0..10_000u64 {
            p.count(Some(&Id::Num(t * 7)));
        }
        let json = serde_json::to_string(&p).unwrap();
        let back: Pair = serde_json::from_str(&json).unwrap();
        let n = back.tenants.count();
        assert!(
            (9_300..=10_700).contains(&n),
            "{n} {}",
            &json[..200.min(json.len())]
        );
    }
}
