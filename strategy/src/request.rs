//! What a request offers to the decision: its headers as Envoy hands them over, the
//! caller's own lane (from the sidecar's node labels), the time and a random draw.

use crate::cookie;

/// Where `decide` reads request headers from. Names are lowercase, as Envoy gives them;
/// `:path` carries the query string. A host can fetch lazily: `decide` asks only for what
/// its strategy reads (`Compiled::needed_headers`), and only when it needs it.
pub trait Headers {
    /// The value of header `name` (its first value).
    fn get(&self, name: &str) -> Option<&[u8]>;
}

impl Headers for [(String, Vec<u8>)] {
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

impl Headers for Vec<(String, Vec<u8>)> {
    fn get(&self, name: &str) -> Option<&[u8]> {
        Headers::get(self.as_slice(), name)
    }
}

/// One request, as seen by `decide`.
#[derive(Clone, Copy)]
pub struct RequestView<'a> {
    pub headers: &'a dyn Headers,
    /// An explicit tenant id (the explain API); when `None` the id is extracted from the
    /// request by the strategy's identity sources.
    pub tenant: Option<&'a [u8]>,
    /// The lane of the workload this filter runs beside (node metadata `LABELS`), if known.
    pub own_lane: Option<crate::Lane>,
    /// Unix seconds, for signed-cookie expiry; `None` when the host cannot tell the time
    /// (then no signed cookie is honoured: each one expires).
    pub now: Option<u64>,
    /// A uniformly random `u64`, for per-request percentages and weighted ties.
    pub draw: u64,
}

impl<'a> RequestView<'a> {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.get(name)
    }

    /// The value of cookie `name` in the `cookie` header (Envoy joins HTTP/2 cookie crumbs
    /// into one).
    pub fn cookie(&self, name: &str) -> Option<&'a [u8]> {
        self.headers
            .get("cookie")
            .and_then(|v| cookie::find(v, name))
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

impl std::fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestView")
            .field("tenant", &self.tenant)
            .field("own_lane", &self.own_lane)
            .field("now", &self.now)
            .field("draw", &self.draw)
            .finish_non_exhaustive()
    }
}
