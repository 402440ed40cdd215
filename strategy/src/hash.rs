//! Stable, explicit hashing for tenant-stable percentages.
//!
//! FNV-1a (64 bit) over the id's canonical bytes, then the SplitMix64 finaliser for
//! avalanche. Defined on `u64` only, never `usize` (32-bit on wasm) nor `DefaultHasher`
//! (unspecified across releases). Golden vectors in the tests pin it on every target.

/// Number of percentage buckets: 10,000 (a resolution of 0.01 %).
pub const BUCKETS: u64 = 10_000;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// SplitMix64 finaliser: a bijective mix of all 64 bits.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over `bytes`, seeded with `salt`, then mixed.
pub fn stable_hash(salt: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ mix64(salt);
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    mix64(h)
}

/// The bucket in `0..BUCKETS` of a hash value.
pub fn bucket(h: u64) -> u32 {
    // BUCKETS < 2^32, so the remainder always fits.
    (h % BUCKETS) as u32
}
