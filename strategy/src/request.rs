//! What a request offers to the decision: its headers as Envoy hands them over, the
//! caller's own lane (from the sidecar's node labels), the time and a random draw.

use crate::cookie;

/// One request, as seen by `decide`. Header names are lowercase, as Envoy gives them;
/// `:path` carries the query string.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub headers: &'a [(String, Vec<u8>)],
    /// An explicit tenant id (the explain API); when `None` the id is extracted from the
    /// request by the strategy's identity sources.
    pub tenant: Option<&'a [u8]>,
    /// The lane of the workload this filter runs beside (node metadata `LABELS`), if known.
    pub own_lane: Option<crate::Lane>,
    /// Unix seconds, for signed-cookie expiry.
    pub now: u64,
    /// A uniformly random `u64`, for per-request percentages and weighted ties.
    pub draw: u64,
}

impl<'a> RequestView<'a> {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The value of cookie `name`, searching every `cookie` header.
    pub fn cookie(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("cookie"))
            .find_map(|(_, v)| cookie::find(v, name))
    }

    /// The value of query parameter `name` in `:path` (not percent-decoded).
    pub fn query(&self, name: &str) -> Option<&'a [u8]> {
        let path = self.header(":path")?;
        let q = path.iter().position(|b| *b == b'?')?;
        let query = &path[q + 1..];
        let query = query
            .iter()
            .position(|b| *b == b'#')
            .map_or(query, |h| &query[..h]);
        query.split(|b| *b == b'&').find_map(|pair| {
            let eq = pair.iter().position(|b| *b == b'=');
            let (k, v) = match eq {
                Some(e) => (&pair[..e], &pair[e + 1..]),
                None => (pair, &[][..]),
            };
            (k == name.as_bytes()).then_some(v)
        })
    }
}
