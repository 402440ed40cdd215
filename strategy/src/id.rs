//! Tenant / user ids: parsing, the whitelist as written, and its compiled index.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id accepted from a request or a configuration; longer is "no id".
pub const MAX_ID_LEN: usize = 128;

/// A tenant or user id: numeric when it parses as `u64`, else an opaque string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Id {
    Num(u64),
    Str(String),
}

/// The id a piece of text denotes, or `None` for garbage (empty, too long, control
/// characters, separators). Garbage is "no id", never an error.
pub fn parse_id(raw: &[u8]) -> Option<Id> {
    let raw = trim(raw);
    if raw.is_empty() || raw.len() > MAX_ID_LEN {
        return None;
    }
    if raw.iter().all(u8::is_ascii_digit) {
        return parse_u64(raw).map(Id::Num).or_else(|| text_id(raw));
    }
    text_id(raw)
}

fn text_id(raw: &[u8]) -> Option<Id> {
    let ok = raw
        .iter()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\'));
    if !ok {
        return None;
    }
    std::str::from_utf8(raw)
        .ok()
        .map(|s| Id::Str(s.to_string()))
}

/// The numeric id of ASCII digits, if it fits in `u64`.
pub fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    // Overflow told by comparison: on wasm32 a checked 64-bit multiply is a call to a
    // 128-bit multiply (`__multi3`) for every digit, on every request's tenant id.
    const LIMIT: u64 = u64::MAX / 10;
    let mut n: u64 = 0;
    for d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = u64::from(d - b'0');
        if n > LIMIT || (n == LIMIT && d > u64::MAX % 10) {
            return None;
        }
        n = n * 10 + d;
    }
    Some(n)
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if first.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = b {
        if last.is_ascii_whitespace() {
            b = rest;
        } else {
            break;
        }
    }
    b
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Num(n) => write!(f, "{n}"),
            Id::Str(s) => f.write_str(s),
        }
    }
}

/// The `ids` list as written: numbers and strings. Deserialised by streaming straight into
/// [`Nums`] (4 bytes an id below 2^32) so that a million ids never pass through an
/// intermediate vector of enums; this keeps the filter's wasm heap (which never shrinks) small.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdList {
    pub nums: Nums,
    pub strs: Vec<String>,
}

impl IdList {
    pub fn len(&self) -> usize {
        self.nums.len() + self.strs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Adds one id given as text (numeric text becomes a number).
    pub fn push(&mut self, id: Id) {
        match id {
            Id::Num(n) => self.nums.push(n),
            Id::Str(s) => self.strs.push(s),
        }
    }
}

/// Numeric ids: 4 bytes each below 2^32 (nearly every tenant id in practice), 8 above. A
/// million ids cost 4 MB instead of 8, both while a strategy is parsed and once compiled;
/// in a wasm VM, whose heap never shrinks, the peak is what stays resident.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nums {
    narrow: Vec<u32>,
    wide: Vec<u64>,
}

impl Nums {
    pub fn len(&self) -> usize {
        self.narrow.len() + self.wide.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn push(&mut self, n: u64) {
        match u32::try_from(n) {
            Ok(small) => self.narrow.push(small),
            Err(_) => self.wide.push(n),
        }
    }
    /// The ids: those below 2^32 first, each part in its own order (ascending once sorted).
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.narrow
            .iter()
            .map(|n| u64::from(*n))
            .chain(self.wide.iter().copied())
    }
    /// Sorts ascending and drops repeats.
    pub fn sort_dedup(&mut self) {
        self.narrow.sort_unstable();
        self.narrow.dedup();
        self.wide.sort_unstable();
        self.wide.dedup();
    }
    /// Keeps the ids for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        self.narrow.retain(|n| keep(u64::from(*n)));
        self.wide.retain(|n| keep(*n));
    }
    pub fn to_vec(&self) -> Vec<u64> {
        self.iter().collect()
    }
}

impl Extend<u64> for Nums {
    fn extend<I: IntoIterator<Item = u64>>(&mut self, iter: I) {
        for n in iter {
            self.push(n);
        }
    }
}

impl FromIterator<u64> for Nums {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Self {
        let mut out = Nums::default();
        out.extend(iter);
        out
    }
}

impl From<Vec<u64>> for Nums {
    fn from(v: Vec<u64>) -> Self {
        v.into_iter().collect()
    }
}

impl IntoIterator for Nums {
    type Item = u64;
    type IntoIter = std::iter::Chain<
        std::iter::Map<std::vec::IntoIter<u32>, fn(u32) -> u64>,
        std::vec::IntoIter<u64>,
    >;
    fn into_iter(self) -> Self::IntoIter {
        let widen: fn(u32) -> u64 = u64::from;
        self.narrow.into_iter().map(widen).chain(self.wide)
    }
}

impl Serialize for IdList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for n in self.nums.iter() {
            seq.serialize_element(&n)?;
        }
        for t in &self.strs {
            seq.serialize_element(t)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for IdList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of ids (non-negative integers or strings)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IdList, A::Error> {
                let mut out = IdList::default();
                while let Some(one) = seq.next_element::<OneId>()? {
                    out.push(one.0);
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }
}

/// One element of `ids`: a `u64` or a string that is a valid id.
struct OneId(Id);

impl<'de> Deserialize<'de> for OneId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OneId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an id: a non-negative integer or a non-empty string without spaces")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OneId, E> {
                Ok(OneId(Id::Num(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OneId, E> {
                u64::try_from(v)
                    .map(|n| OneId(Id::Num(n)))
                    .map_err(|_| E::custom(format!("id {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<OneId, E> {
                parse_id(v.as_bytes())
                    .map(OneId)
                    .ok_or_else(|| E::custom(format!("{v:?} is not a valid id")))
            }
        }
        d.deserialize_any(V)
    }
}

/// A closed interval `[lo, hi]` of numeric ids, as `[1, 100]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interval {
    pub lo: u64,
    pub hi: u64,
}

impl Serialize for Interval {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        [self.lo, self.hi].serialize(s)
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<u64>::deserialize(d)?;
        match v.as_slice() {
            [lo, hi] if lo <= hi => Ok(Interval { lo: *lo, hi: *hi }),
            [lo, hi] => Err(de::Error::custom(format!(
                "interval [{lo}, {hi}] is empty: the lower bound exceeds the upper"
            ))),
            _ => Err(de::Error::custom(format!(
                "an interval is two numbers [low, high], got {} numbers",
                v.len()
            ))),
        }
    }
}

/// Compiled whitelist: sorted, deduplicated numeric ids (a radix directory, then binary
/// search; 4 bytes an id below 2^32, 8 above; or, when the ids are dense enough that one bit
/// per value from the first to the last takes no more room, that bitmap), sorted disjoint
/// merged intervals (binary search) and a hash set of string ids.
#[derive(Debug, Clone, Default)]
pub struct IdIndex {
    pub all: bool,
    narrow: Numbers<u32>,
    wide: Numbers<u64>,
    intervals: Vec<Interval>,
    strs: HashSet<String>,
}

/// Sorted distinct numbers with a radix directory: slot `b` holds the numbers whose offset
/// from `nums[0]`, shifted right by `shift`, is `b`; `starts[b]..starts[b+1]` is where they
/// sit. Narrows a million-id binary search to a few cache lines with one subtraction and one
/// shift (no division: on wasm32 a 128-bit division is a library call).
#[derive(Debug, Clone, Default)]
struct Sorted<T> {
    nums: Vec<T>,
    starts: Vec<u32>,
    shift: u32,
}

/// A dense set: one bit per value from `first` on (a lookup reads one word), kept when it
/// takes no more room than the sorted array would.
#[derive(Debug, Clone, Default)]
struct Bits {
    words: Vec<u64>,
    first: u64,
    len: usize,
}

/// Sorted distinct numbers, in whichever of the two layouts is smaller.
#[derive(Debug, Clone)]
enum Numbers<T> {
    Sorted(Sorted<T>),
    Bits(Bits),
}

impl<T> Default for Numbers<T> {
    fn default() -> Self {
        Numbers::Bits(Bits::default())
    }
}

/// Why an id matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdHit {
    All,
    Listed,
    Interval(Interval),
}

impl IdIndex {
    /// Builds the index, consuming (and sorting in place) the lists as written.
    pub fn build(all: bool, ids: IdList, mut intervals: Vec<Interval>) -> Self {
        let IdList { nums, strs } = ids;
        intervals.sort_unstable();
        let mut merged: Vec<Interval> = Vec::with_capacity(intervals.len());
        for iv in intervals {
            match merged.last_mut() {
                Some(last) if iv.lo <= last.hi.saturating_add(1) => {
                    last.hi = last.hi.max(iv.hi);
                }
                _ => merged.push(iv),
            }
        }
        IdIndex {
            all,
            narrow: Numbers::new(nums.narrow),
            wide: Numbers::new(nums.wide),
            intervals: merged,
            strs: strs.into_iter().collect(),
        }
    }

    /// Whether the index can match anything at all.
    pub fn is_empty(&self) -> bool {
        !self.all && self.ids() == 0 && self.intervals.is_empty()
    }

    pub fn ids(&self) -> usize {
        self.narrow.len() + self.wide.len() + self.strs.len()
    }

    pub fn intervals(&self) -> &[Interval] {
        &self.intervals
    }

    fn contains_num(&self, n: u64) -> bool {
        match u32::try_from(n) {
            Ok(small) => self.narrow.contains(small),
            Err(_) => self.wide.contains(n),
        }
    }

    /// Whether `id` is whitelisted, and by what.
    pub fn lookup(&self, id: Option<&Id>) -> Option<IdHit> {
        if self.all {
            return Some(IdHit::All);
        }
        match id? {
            Id::Num(n) => {
                if self.contains_num(*n) {
                    return Some(IdHit::Listed);
                }
                // First interval whose upper bound is >= n.
                let i = self.intervals.partition_point(|iv| iv.hi < *n);
                match self.intervals.get(i) {
                    Some(iv) if iv.lo <= *n => Some(IdHit::Interval(*iv)),
                    _ => None,
                }
            }
            Id::Str(s) => self.strs.contains(s).then_some(IdHit::Listed),
        }
    }
}

impl<T: Copy + Ord + Into<u64>> Numbers<T> {
    /// Sorts and deduplicates `nums` in place (no second copy), then keeps them as a bitmap
    /// when that is no larger than the array, else as the array with its directory.
    fn new(mut nums: Vec<T>) -> Self {
        nums.sort_unstable();
        nums.dedup();
        match Bits::new(&nums) {
            Some(bits) => Numbers::Bits(bits),
            None => Numbers::Sorted(Sorted::new(nums)),
        }
    }

    fn len(&self) -> usize {
        match self {
            Numbers::Sorted(s) => s.nums.len(),
            Numbers::Bits(b) => b.len,
        }
    }

    fn contains(&self, n: T) -> bool {
        match self {
            Numbers::Sorted(s) => s.contains(n),
            Numbers::Bits(b) => b.contains(n.into()),
        }
    }
}

impl Bits {
    /// The bitmap of sorted distinct `nums`, if it takes no more room than they do.
    fn new<T: Copy + Into<u64>>(nums: &[T]) -> Option<Bits> {
        let (first, last): (u64, u64) = ((*nums.first()?).into(), (*nums.last()?).into());
        let words = (last - first) / 64 + 1;
        let array = std::mem::size_of_val(nums) as u64;
        if words.saturating_mul(8) > array {
            return None;
        }
        let mut bits = vec![0u64; usize::try_from(words).ok()?];
        for n in nums {
            let o = (*n).into() - first;
            if let Some(w) = bits.get_mut(usize::try_from(o / 64).unwrap_or(usize::MAX)) {
                *w |= 1 << (o % 64);
            }
        }
        Some(Bits {
            words: bits,
            first,
            len: nums.len(),
        })
    }

    fn contains(&self, n: u64) -> bool {
        let Some(o) = n.checked_sub(self.first) else {
            return false;
        };
        usize::try_from(o / 64)
            .ok()
            .and_then(|w| self.words.get(w))
            .is_some_and(|w| (w >> (o % 64)) & 1 == 1)
    }
}

impl<T: Copy + Ord + Into<u64>> Sorted<T> {
    /// Keeps sorted distinct `nums` and builds the directory.
    fn new(mut nums: Vec<T>) -> Self {
        nums.shrink_to_fit();
        let (starts, shift) = directory(&nums);
        Sorted {
            nums,
            starts,
            shift,
        }
    }

    fn slot(&self, n: u64) -> Option<usize> {
        let first: u64 = (*self.nums.first()?).into();
        let b = usize::try_from(radix(n.checked_sub(first)?, self.shift)).ok()?;
        // The last slot is `starts.len() - 2`: numbers above it are above `nums`' last.
        (b < self.starts.len().saturating_sub(1)).then_some(b)
    }

    fn contains(&self, n: T) -> bool {
        match self.slot(n.into()) {
            None => false,
            Some(b) => {
                let lo = self.starts.get(b).map_or(0, |x| *x as usize);
                let hi = self
                    .starts
                    .get(b + 1)
                    .map_or(self.nums.len(), |x| *x as usize);
                self.nums
                    .get(lo..hi)
                    .is_some_and(|run| run.binary_search(&n).is_ok())
            }
        }
    }
}

/// The directory slot of an id `offset` above the first id (a shift of 64 puts every id in
/// slot 0).
fn radix(offset: u64, shift: u32) -> u64 {
    offset.checked_shr(shift).unwrap_or(0)
}

/// Builds the radix directory for sorted `nums`: about one slot per 8 ids, at most 65,536
/// slots, each covering `2^shift` consecutive id values.
fn directory<T: Copy + Into<u64>>(nums: &[T]) -> (Vec<u32>, u32) {
    let (Some(&first), Some(&last)) = (nums.first(), nums.last()) else {
        return (Vec::new(), 0);
    };
    let (first, last): (u64, u64) = (first.into(), last.into());
    let want = (nums.len() / 8).clamp(1, 65_536) as u64;
    let span = last - first;
    let mut shift = 0u32;
    while shift < 64 && radix(span, shift) >= want {
        shift += 1;
    }
    let slots = usize::try_from(radix(span, shift)).unwrap_or(0) + 1;
    let mut starts = Vec::with_capacity(slots + 1);
    let mut i = 0usize;
    for b in 0..slots as u64 {
        // First id whose slot is >= b.
        while let Some(&n) = nums.get(i) {
            if radix(n.into() - first, shift) >= b {
                break;
            }
            i += 1;
        }
        starts.push(u32::try_from(i).unwrap_or(u32::MAX));
    }
    starts.push(u32::try_from(nums.len()).unwrap_or(u32::MAX));
    (starts, shift)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Digits parse as `str::parse` does, up to `u64::MAX` and not one past it.
    #[test]
    fn numeric_ids_parse_up_to_u64_max() {
        for text in [
            "0",
            "007",
            "4711",
            "1844674407370955161",
            "18446744073709551609",
            "18446744073709551610",
            "18446744073709551615",
            "18446744073709551616",
            "18446744073709551620",
            "19000000000000000000",
            "99999999999999999999",
            "184467440737095516150",
        ] {
            assert_eq!(
                parse_u64(text.as_bytes()),
                text.parse::<u64>().ok(),
                "{text}"
            );
        }
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"12a"), None);
        // Past u64: a text id, as before.
        assert_eq!(
            parse_id(b"18446744073709551616"),
            Some(Id::Str("18446744073709551616".into()))
        );
    }

    /// Dense ids take the bitmap (no larger than the array it replaces), sparse ones the
    /// sorted array; both answer alike at the edges.
    #[test]
    fn dense_ids_take_a_bitmap_sparse_ones_the_array() {
        let dense: Vec<u32> = (1_000..=2_999).step_by(3).collect();
        let s = Numbers::new(dense.clone());
        let Numbers::Bits(bits) = &s else {
            panic!("dense ids kept as an array")
        };
        assert_eq!((bits.len, s.len()), (dense.len(), dense.len()));
        assert_eq!(bits.words.len(), (2_998 - 1_000) / 64 + 1);
        let sparse: Vec<u32> = (0..1_000).map(|i| i * 1_000).collect();
        let a = Numbers::new(sparse.clone());
        assert!(matches!(&a, Numbers::Sorted(x) if x.nums.len() == 1_000));
        for (set, list) in [(&s, &dense), (&a, &sparse)] {
            for n in [
                0,
                999,
                1_000,
                1_001,
                2_998,
                2_999,
                3_000,
                999_000,
                999_001,
                u32::MAX,
            ] {
                assert_eq!(set.contains(n), list.contains(&n), "{n}");
            }
        }
        let top = Numbers::new(vec![u32::MAX - 1, u32::MAX]);
        assert!(matches!(top, Numbers::Bits(_)));
        assert!(top.contains(u32::MAX) && top.contains(u32::MAX - 1) && !top.contains(0));
    }
}
