//! The C ABI LuaJIT's FFI calls (`nginx/lua/graylane.lua` declares the same functions).
//!
//! The only unsafe code of the crate is here: reading the pointers and lengths LuaJIT
//! hands over, and owning the handle across calls. Every function catches panics (an unwind
//! must never cross into nginx) and answers "error", which the Lua side turns into the
//! stable cluster. Strings go out by copy into the caller's buffer; nothing returned points
//! into a snapshot the feed thread may replace.

use std::cell::OnceCell;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::raw::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::config::Config;
use crate::router::{Outcome, Router};

/// A byte string from Lua: `ptr == NULL` is "absent" (a Lua `nil`).
#[repr(C)]
pub struct Str {
    pub ptr: *const u8,
    pub len: usize,
}

/// What `graylane_decide` fills in.
#[repr(C)]
pub struct Decision {
    /// Index of the chosen cluster in the description, -1 when no cluster can serve.
    pub cluster: i32,
    /// Index of the reason code in the description's `reasons` line.
    pub reason: i32,
    /// 1 when a cluster was skipped for health.
    pub fallback: i32,
}

/// `graylane_decide`: decided (see `Decision`).
pub const DECIDED: i32 = 0;
/// The generation moved: describe again and retry.
pub const STALE: i32 = 1;
/// No strategy yet: use the stable cluster.
pub const NO_STRATEGY: i32 = 2;
/// Bad arguments or an internal error: use the stable cluster.
pub const ERROR: i32 = -1;

/// Most header values one decision reads without a heap allocation.
const STACK_VALUES: usize = 16;

/// The opaque handle Lua holds, one per service per worker.
pub struct Handle {
    router: Arc<Router>,
}

fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}

/// The bytes at `ptr..ptr+len`, or `None` for a null pointer.
///
/// # Safety
/// `ptr` must be null or valid for `len` bytes for the duration of the call.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the caller (LuaJIT, passing a Lua string and its length) guarantees it.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}

/// Copies `text` into `buf` (at most `cap` bytes) and returns its full length, so a caller
/// with too small a buffer can retry with a larger one.
///
/// # Safety
/// `buf` must be null or valid for `cap` bytes.
unsafe fn copy_out(text: &[u8], buf: *mut u8, cap: usize) -> usize {
    if !buf.is_null() {
        let n = text.len().min(cap);
        // SAFETY: `buf` is valid for `cap >= n` bytes; `text` for `n`; they cannot overlap
        // (ours is Rust-owned memory).
        unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), buf, n) };
    }
    text.len()
}

/// Longest IP address text (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
const IP_TEXT: usize = 45;

/// Writes `ip` as text into `out` and returns its length. IPv4 digit by digit: the balancer
/// asks for a peer on every request, and `to_string` (the formatting machinery and a heap
/// allocation) was most of that call's cost.
fn ip_text(ip: IpAddr, out: &mut [u8; IP_TEXT]) -> usize {
    match ip {
        IpAddr::V4(v4) => {
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out[n] = b'.';
                    n += 1;
                }
                if octet >= 100 {
                    out[n] = b'0' + octet / 100;
                    n += 1;
                }
                if octet >= 10 {
                    out[n] = b'0' + octet / 10 % 10;
                    n += 1;
                }
                out[n] = b'0' + octet % 10;
                n += 1;
            }
            n
        }
        IpAddr::V6(v6) => {
            let mut w = &mut out[..];
            let before = w.len();
            // An IPv6 address's text always fits IP_TEXT bytes.
            match write!(w, "{v6}") {
                Ok(()) => before - w.len(),
                Err(_) => 0,
            }
        }
    }
}

/// # Safety
/// `h` must be null or a pointer returned by `graylane_open` and not yet closed.
unsafe fn router<'a>(h: *const Handle) -> Option<&'a Router> {
    // SAFETY: see above; the handle stays alive until graylane_close.
    unsafe { h.as_ref() }.map(|h| &*h.router)
}

fn parse(cfg: *const u8, len: usize) -> Result<Config, String> {
    // SAFETY: LuaJIT passes a Lua string and its length.
    let text = unsafe { bytes(cfg, len) }.ok_or("no configuration")?;
    Config::parse(text).map_err(|e| e.to_string())
}

/// Checks a configuration without starting anything (nginx's master, so `nginx -t` fails on
/// an invalid one). Returns 0 when valid, else -1 with the message in `err`.
///
/// # Safety
/// `cfg` valid for `len` bytes; `err` null or valid for `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn graylane_check(
    cfg: *const u8,
    len: usize,
    err: *mut u8,
    cap: usize,
) -> i32 {
    guard(ERROR, || match parse(cfg, len) {
        Ok(_) => 0,
        Err(msg) => {
            // SAFETY: `err` as the caller promised.
            unsafe { copy_out(msg.as_bytes(), err, cap) };
            ERROR
        }
    })
}

/// Opens one service's router in this worker and starts following the feed. Returns null
/// on error, with the message in `err`.
///
/// # Safety
/// As `graylane_check`.
#[no_mangle]
pub unsafe extern "C" fn graylane_open(
    cfg: *const u8,
    len: usize,
    err: *mut u8,
    cap: usize,
) -> *mut Handle {
    guard(std::ptr::null_mut(), || {
        let opened = parse(cfg, len)
            .and_then(|c| Router::open(c).map_err(|e| e.to_string()))
            .map(|router| Box::into_raw(Box::new(Handle { router })));
        match opened {
            Ok(h) => h,
            Err(msg) => {
                // SAFETY: `err` as the caller promised.
                unsafe { copy_out(msg.as_bytes(), err, cap) };
                std::ptr::null_mut()
            }
        }
    })
}

/// Stops the feed thread and frees the handle.
///
/// # Safety
/// `h` from `graylane_open`, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn graylane_close(h: *mut Handle) {
    guard((), || {
        if !h.is_null() {
            // SAFETY: `h` came from Box::into_raw in graylane_open and is closed once.
            let handle = unsafe { Box::from_raw(h) };
            handle.router.close();
        }
    });
}

/// The snapshot's generation (0 on a bad handle): when it differs from the one the caller
/// described, describe again.
///
/// # Safety
/// `h` from `graylane_open`.
#[no_mangle]
pub unsafe extern "C" fn graylane_generation(h: *const Handle) -> u32 {
    // SAFETY: as promised by the caller.
    guard(0, || unsafe { router(h) }.map_or(0, Router::generation))
}

/// Copies the snapshot's description (see `Snapshot::describe`) into `buf`; returns its
/// length (larger than `cap`: call again with a larger buffer), 0 on error.
///
/// # Safety
/// `h` from `graylane_open`; `buf` valid for `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn graylane_describe(h: *const Handle, buf: *mut u8, cap: usize) -> usize {
    guard(0, || {
        // SAFETY: as promised by the caller.
        let Some(r) = (unsafe { router(h) }) else {
            return 0;
        };
        let snap = r.current();
        // SAFETY: as promised by the caller.
        unsafe { copy_out(snap.describe().as_bytes(), buf, cap) }
    })
}

/// Decides for one request. `values[i]` is the value of the i-th needed header of
/// generation `generation` (null `ptr`: the request has none). Returns `DECIDED` with `out`
/// filled, `STALE`, `NO_STRATEGY` or `ERROR`.
///
/// # Safety
/// `h` from `graylane_open`; `values` valid for `n` entries, each valid as `Str`; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn graylane_decide(
    h: *const Handle,
    generation: u32,
    values: *const Str,
    n: usize,
    out: *mut Decision,
) -> i32 {
    guard(ERROR, || {
        // SAFETY: as promised by the caller.
        let (Some(r), Some(out)) = (unsafe { router(h) }, unsafe { out.as_mut() }) else {
            return ERROR;
        };
        let given: &[Str] = if values.is_null() || n == 0 {
            &[]
        } else {
            // SAFETY: `values` is valid for `n` entries.
            unsafe { std::slice::from_raw_parts(values, n) }
        };
        let mut stack: [Option<&[u8]>; STACK_VALUES] = [None; STACK_VALUES];
        let mut heap: Vec<Option<&[u8]>> = Vec::new();
        let vals: &[Option<&[u8]>] = if given.len() <= STACK_VALUES {
            for (slot, s) in stack.iter_mut().zip(given) {
                // SAFETY: each entry is a Lua string (or null) alive during the call.
                *slot = unsafe { bytes(s.ptr, s.len) };
            }
            &stack[..given.len()]
        } else {
            // SAFETY: as above.
            heap.extend(given.iter().map(|s| unsafe { bytes(s.ptr, s.len) }));
            &heap
        };
        fill(r.decide(generation, vals), out)
    })
}

/// A string as lua-nginx-module's FFI hands it over (`ngx_http_lua_ffi_str_t`).
#[repr(C)]
pub struct NgxStr {
    pub len: c_int,
    pub data: *const u8,
}

/// One request header as `ngx_http_lua_ffi_req_get_headers` fills it in
/// (`ngx_http_lua_ffi_table_elt_t`; not raw: the name is nginx's lowercase copy).
#[repr(C)]
pub struct NgxHeader {
    pub key: NgxStr,
    pub value: NgxStr,
}

/// # Safety
/// `s.data` valid for `s.len` bytes (or null) during the call.
unsafe fn ngx_bytes<'a>(s: &NgxStr) -> Option<&'a [u8]> {
    let len = usize::try_from(s.len).ok()?;
    // SAFETY: as promised by the caller.
    unsafe { bytes(s.data, len) }
}

/// The request's headers as nginx holds them, answered the way nginx 1.22 answers
/// `$http_<name>` (what the Lua side read before, one variable per needed header): the
/// first header of that name, where `-` and `_` are the same and case does not matter;
/// for the names nginx keeps as a list, all of them joined (`cookie` with `; `,
/// `x-forwarded-for` with `, `), by their exact name.
struct Request<'a> {
    headers: &'a [NgxHeader],
    path: Option<&'a [u8]>,
    /// `JOINED[i]`'s headers joined, when the request has several (made on first use).
    joined: [OnceCell<Option<Vec<u8>>>; 2],
}

/// nginx's own header variables that join every header of their name.
const JOINED: [(&str, &[u8]); 2] = [("cookie", b"; "), ("x-forwarded-for", b", ")];
/// nginx's own header variables that take the first header of their exact name.
const EXACT: [&str; 4] = ["host", "user-agent", "referer", "via"];

/// How nginx matches a header to `$http_<name>` (`name` with `-` as `_`), case-insensitively.
fn loose_eq(key: &[u8], name: &str) -> bool {
    let norm = |b: u8| {
        if b == b'-' {
            b'_'
        } else {
            b.to_ascii_lowercase()
        }
    };
    key.len() == name.len()
        && key
            .iter()
            .zip(name.bytes())
            .all(|(&k, n)| norm(k) == norm(n))
}

impl<'a> Request<'a> {
    /// # Safety
    /// Every entry of `headers` points at valid bytes (`len` of them) while `'a` lasts.
    unsafe fn new(headers: &'a [NgxHeader], path: Option<&'a [u8]>) -> Self {
        Request {
            headers,
            path,
            joined: Default::default(),
        }
    }

    /// The values of the headers named `name`, in order.
    fn named<'s>(&'s self, name: &'s str, exact: bool) -> impl Iterator<Item = &'a [u8]> + 's {
        let want = name.as_bytes();
        self.headers.iter().filter_map(move |h| {
            // SAFETY: `new`'s contract.
            let key = unsafe { ngx_bytes(&h.key)? };
            // nginx hands the names over in lowercase: equal bytes are the common hit, and a
            // length apart the common miss; only then the case- and `_`-blind comparison.
            let hit = key.len() == want.len()
                && (key == want
                    || if exact {
                        key.eq_ignore_ascii_case(want)
                    } else {
                        loose_eq(key, name)
                    });
            // SAFETY: `new`'s contract.
            hit.then(|| unsafe { ngx_bytes(&h.value) }).flatten()
        })
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        if name == ":path" {
            return self.path;
        }
        if let Some(i) = JOINED.iter().position(|(n, _)| *n == name) {
            let joined = self.joined[i].get_or_init(|| {
                let mut all = self.named(name, true);
                let (first, second) = (all.next()?, all.next()?);
                let mut v = first.to_vec();
                for value in std::iter::once(second).chain(all) {
                    v.extend_from_slice(JOINED[i].1);
                    v.extend_from_slice(value);
                }
                Some(v)
            });
            if let Some(v) = joined {
                return Some(v);
            }
        }
        let exact = JOINED.iter().any(|(n, _)| *n == name) || EXACT.contains(&name);
        self.named(name, exact).next()
    }
}

/// Decides for one request from its headers as nginx holds them (one call: the Lua side
/// hands over nginx's own list, `ngx_http_lua_ffi_req_get_headers`, without making a Lua
/// string of any), and `path`, the request's `$request_uri` (null unless the description's
/// `needed` line has `:path`). Answers as `graylane_decide`.
///
/// # Safety
/// `h` from `graylane_open`; `headers` valid for `n` entries, each pointing at `len` valid
/// bytes; `path` null or valid for `path_len`; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn graylane_decide_request(
    h: *const Handle,
    generation: u32,
    headers: *const NgxHeader,
    n: usize,
    path: *const u8,
    path_len: usize,
    out: *mut Decision,
) -> i32 {
    guard(ERROR, || {
        // SAFETY: as promised by the caller.
        let (Some(r), Some(out)) = (unsafe { router(h) }, unsafe { out.as_mut() }) else {
            return ERROR;
        };
        let given: &[NgxHeader] = if headers.is_null() || n == 0 {
            &[]
        } else {
            // SAFETY: `headers` is valid for `n` entries.
            unsafe { std::slice::from_raw_parts(headers, n) }
        };
        // SAFETY: each entry points into the request nginx is serving, alive during the call;
        // `path` as promised by the caller.
        let request = unsafe { Request::new(given, bytes(path, path_len)) };
        fill(r.decide_by(generation, |_, name| request.get(name)), out)
    })
}

/// Writes a decision for the Lua side; returns the status code.
fn fill(outcome: Outcome, out: &mut Decision) -> i32 {
    match outcome {
        Outcome::Decided {
            cluster,
            reason,
            fallback,
        } => {
            out.cluster = cluster.and_then(|c| i32::try_from(c).ok()).unwrap_or(-1);
            out.reason = i32::try_from(reason).unwrap_or(-1);
            out.fallback = i32::from(fallback);
            DECIDED
        }
        Outcome::Stale => STALE,
        Outcome::NoStrategy => NO_STRATEGY,
    }
}

/// Endpoint `index` (modulo their number) of cluster `key`: its IP as text in `addr`
/// (returns the text's length), the port in `port`, the cluster's endpoint count in `count`.
/// Returns -1 when the cluster has no endpoint.
///
/// # Safety
/// `h` from `graylane_open`; `key` valid for `len`; `addr` for `cap`; `port`, `count` valid.
#[no_mangle]
pub unsafe extern "C" fn graylane_peer(
    h: *const Handle,
    key: *const u8,
    len: usize,
    index: u32,
    addr: *mut u8,
    cap: usize,
    port: *mut u16,
    count: *mut u32,
) -> i32 {
    guard(ERROR, || {
        // SAFETY: as promised by the caller.
        let (Some(r), Some(key)) = (unsafe { router(h) }, unsafe { bytes(key, len) }) else {
            return ERROR;
        };
        let Some((peer, n)) = r.peer(key, index) else {
            return ERROR;
        };
        let mut text = [0u8; IP_TEXT];
        let len = ip_text(peer.ip(), &mut text);
        // SAFETY: as promised by the caller.
        unsafe {
            if let Some(p) = port.as_mut() {
                *p = peer.port();
            }
            if let Some(c) = count.as_mut() {
                *c = u32::try_from(n).unwrap_or(u32::MAX);
            }
            i32::try_from(copy_out(&text[..len], addr, cap)).unwrap_or(ERROR)
        }
    })
}

/// An endpoint as the native nginx module connects to it (no text to parse): `family` 4
/// or 6 (0: none), `addr` the address's bytes in network order (the first 4 for IPv4).
#[repr(C)]
pub struct Peer {
    pub family: u16,
    pub port: u16,
    pub addr: [u8; 16],
    /// Which endpoint of the cluster (the round robin's count), and how many it has.
    pub index: u32,
    pub count: u32,
    /// `IP:PORT` (`[IPv6]:PORT`), nginx's name for the peer (logs, `$upstream_addr`).
    pub name_len: u32,
    pub name: [u8; PEER_NAME],
}

/// Longest `[IPv6]:PORT`.
const PEER_NAME: usize = IP_TEXT + 8;

impl Default for Peer {
    fn default() -> Self {
        Peer {
            family: 0,
            port: 0,
            addr: [0; 16],
            index: 0,
            count: 0,
            name_len: 0,
            name: [0; PEER_NAME],
        }
    }
}

impl Peer {
    fn of(addr: SocketAddr, index: u32, count: usize) -> Peer {
        let mut p = Peer {
            port: addr.port(),
            index,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            ..Peer::default()
        };
        let mut ip = [0u8; IP_TEXT];
        let ip_len = ip_text(addr.ip(), &mut ip);
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            p.name[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        match addr.ip() {
            IpAddr::V4(v4) => {
                p.family = 4;
                p.addr[..4].copy_from_slice(&v4.octets());
                put(&ip[..ip_len]);
            }
            IpAddr::V6(v6) => {
                p.family = 6;
                p.addr = v6.octets();
                put(b"[");
                put(&ip[..ip_len]);
                put(b"]");
            }
        }
        put(b":");
        let mut digits = [0u8; 5];
        let mut port = addr.port();
        let mut n = 0;
        loop {
            digits[4 - n] = b'0' + (port % 10) as u8;
            n += 1;
            port /= 10;
            if port == 0 {
                break;
            }
        }
        put(&digits[5 - n..]);
        p.name_len = at as u32;
        p
    }
}

/// What `graylane_route_request` fills in. The texts follow each other in the caller's
/// buffer: route, lane, key, reason, lane header.
#[repr(C)]
#[derive(Default)]
pub struct Routed {
    /// `DECIDED`, or `ERROR` when no cluster can serve (the module answers 503).
    pub status: i32,
    /// The route header's value (the cluster's route name).
    pub route_len: u32,
    /// The lane (prod or gray).
    pub lane_len: u32,
    /// The cluster's key (what `graylane_peer_at` takes).
    pub key_len: u32,
    /// `<key>;<reason code>`, only when the configuration names a reason header.
    pub reason_len: u32,
    /// The strategy's own lane header when it is not `x-graylane-lane`.
    pub lane_header_len: u32,
    /// The cluster's next endpoint (family 0: it has none).
    pub peer: Peer,
}

/// Decides for one request and picks the chosen cluster's next endpoint, in one call and
/// from one snapshot (the native module's entry; the Lua side uses `graylane_decide_request`
/// and `graylane_peer`): `headers` as nginx holds them, `path` the request's
/// `$request_uri`. A request the library cannot decide goes to the stable cluster. The
/// texts go into `buf`; returns their total length (larger than `cap`: nothing was written,
/// call again with a larger buffer), 0 on error.
///
/// # Safety
/// As `graylane_decide_request`; `buf` valid for `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn graylane_route_request(
    h: *const Handle,
    headers: *const NgxHeader,
    n: usize,
    path: *const u8,
    path_len: usize,
    buf: *mut u8,
    cap: usize,
    out: *mut Routed,
) -> usize {
    guard(0, || {
        // SAFETY: as promised by the caller.
        let (Some(r), Some(out)) = (unsafe { router(h) }, unsafe { out.as_mut() }) else {
            return 0;
        };
        let given: &[NgxHeader] = if headers.is_null() || n == 0 {
            &[]
        } else {
            // SAFETY: `headers` is valid for `n` entries.
            unsafe { std::slice::from_raw_parts(headers, n) }
        };
        // SAFETY: each entry points into the request nginx is serving, alive during the call;
        // `path` as promised by the caller.
        let request = unsafe { Request::new(given, bytes(path, path_len)) };
        let reason = r.reason_header().is_some();
        r.route_by(
            |_, name| request.get(name),
            |routed| {
                *out = Routed::default();
                let Some(routed) = routed else {
                    out.status = ERROR;
                    return 1; // nothing to write; not 0, which is an error
                };
                let fallback = if routed.fallback {
                    ",fallback_unhealthy"
                } else {
                    ""
                };
                // `<key>;<code>[,fallback_unhealthy]`, only when a reason header is configured.
                let reason_parts: [&str; 4] = if reason {
                    [routed.key, ";", routed.code, fallback]
                } else {
                    [""; 4]
                };
                let lane_header = routed.lane_header.unwrap_or("");
                let texts: [&str; 8] = [
                    routed.route,
                    routed.lane,
                    routed.key,
                    reason_parts[0],
                    reason_parts[1],
                    reason_parts[2],
                    reason_parts[3],
                    lane_header,
                ];
                let total: usize = texts.iter().map(|t| t.len()).sum();
                if total > cap || buf.is_null() {
                    return total;
                }
                let mut at = 0;
                for t in texts {
                    // SAFETY: `buf` is valid for `cap >= total` bytes; `t` is ours.
                    unsafe { std::ptr::copy_nonoverlapping(t.as_ptr(), buf.add(at), t.len()) };
                    at += t.len();
                }
                let len = |t: &str| u32::try_from(t.len()).unwrap_or(0);
                out.status = DECIDED;
                out.route_len = len(routed.route);
                out.lane_len = len(routed.lane);
                out.key_len = len(routed.key);
                out.reason_len = reason_parts.iter().map(|t| len(t)).sum();
                out.lane_header_len = len(lane_header);
                if let Some((addr, index, count)) = routed.peer {
                    out.peer = Peer::of(addr, index, count);
                }
                total.max(1)
            },
        )
    })
}

/// Endpoint `index` (modulo their number) of cluster `key` into `out` (the native module's
/// retries). Returns 0, or -1 when the cluster has no endpoint.
///
/// # Safety
/// `h` from `graylane_open`; `key` valid for `len`; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn graylane_peer_at(
    h: *const Handle,
    key: *const u8,
    len: usize,
    index: u32,
    out: *mut Peer,
) -> i32 {
    guard(ERROR, || {
        // SAFETY: as promised by the caller.
        let (Some(r), Some(key), Some(out)) =
            (unsafe { router(h) }, unsafe { bytes(key, len) }, unsafe {
                out.as_mut()
            })
        else {
            return ERROR;
        };
        match r.peer(key, index) {
            Some((addr, n)) => {
                *out = Peer::of(addr, index, n);
                0
            }
            None => ERROR,
        }
    })
}

/// The worker's status as JSON into `buf`; returns its length (call again when larger than
/// `cap`), 0 on error.
///
/// # Safety
/// `h` from `graylane_open`; `buf` valid for `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn graylane_status(h: *const Handle, buf: *mut u8, cap: usize) -> usize {
    guard(0, || {
        // SAFETY: as promised by the caller.
        let Some(r) = (unsafe { router(h) }) else {
            return 0;
        };
        // SAFETY: as promised by the caller.
        unsafe { copy_out(r.status().as_bytes(), buf, cap) }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ngx(s: &[u8]) -> NgxStr {
        NgxStr {
            len: c_int::try_from(s.len()).unwrap(),
            data: s.as_ptr(),
        }
    }

    /// `(name, value)` pairs as nginx's header list (pointing into `list`).
    fn header_list(list: &[(&[u8], &[u8])]) -> Vec<NgxHeader> {
        list.iter()
            .map(|(k, v)| NgxHeader {
                key: ngx(k),
                value: ngx(v),
            })
            .collect()
    }

    /// The header list is answered as nginx 1.22 answers `$http_<name>`, which the Lua side
    /// read before: first value, `-`/`_` and case alike; `cookie` and `x-forwarded-for`
    /// joined, by exact name; `:path` is `$request_uri`.
    #[test]
    fn headers_are_read_as_nginx_variables_read_them() {
        let list: &[(&[u8], &[u8])] = &[
            (b"host", b"example.com"),
            (b"x_tenant_id", b"7"),
            (b"x-tenant-id", b"8"),
            (b"cookie", b"a=1"),
            (b"x-forwarded-for", b"10.0.0.1"),
            (b"cookie", b"tenantId=9"),
            (b"x-forwarded-for", b"10.0.0.2"),
            (b"x-forwarded_for", b"10.0.0.3"),
            (b"user_agent", b"not the user agent"),
            (b"x-version", b""),
        ];
        let headers = header_list(list);
        // SAFETY: `list` outlives `r`.
        let r = unsafe { Request::new(&headers, Some(b"/p?tenant=3")) };
        let get = |name: &str| r.get(name).map(|v| String::from_utf8(v.to_vec()).unwrap());
        assert_eq!(get("x-tenant-id").as_deref(), Some("7"));
        assert_eq!(get("x_tenant_id").as_deref(), Some("7"));
        assert_eq!(get("cookie").as_deref(), Some("a=1; tenantId=9"));
        assert_eq!(
            get("x-forwarded-for").as_deref(),
            Some("10.0.0.1, 10.0.0.2")
        );
        assert_eq!(get("host").as_deref(), Some("example.com"));
        assert_eq!(get("user-agent"), None);
        assert_eq!(get("x-version").as_deref(), Some(""));
        assert_eq!(get("x-missing"), None);
        assert_eq!(get(":path").as_deref(), Some("/p?tenant=3"));

        let one = [NgxHeader {
            key: ngx(b"cookie"),
            value: ngx(b"tenantId=4"),
        }];
        // SAFETY: `one` outlives `r`.
        let r = unsafe { Request::new(&one, None) };
        assert_eq!(r.get("cookie"), Some(&b"tenantId=4"[..]));
        assert_eq!(r.get(":path"), None);
        assert_eq!(r.get("x-tenant-id"), None);
    }

    /// The balancer's address text is what `Display` gives, for every kind of address.
    #[test]
    fn ip_text_is_the_display_text() {
        let mut cases: Vec<IpAddr> = [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.0.8",
            "9.99.100.255",
            "192.168.10.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1:2:3:4",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.128",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "1:2:3:4:5:6:7:8",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        cases.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, 7])));
        for ip in cases {
            let mut out = [0u8; IP_TEXT];
            let n = ip_text(ip, &mut out);
            assert_eq!(
                std::str::from_utf8(&out[..n]).unwrap(),
                ip.to_string(),
                "{ip}"
            );
        }
    }

    /// nginx's peer name is `SocketAddr`'s text, for every kind of address and port.
    #[test]
    fn a_peers_name_is_the_display_text() {
        for text in [
            "127.0.0.1:80",
            "10.0.0.8:0",
            "255.255.255.255:65535",
            "[::1]:8080",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            "[::ffff:192.0.2.128]:9",
        ] {
            let addr: SocketAddr = text.parse().unwrap();
            let p = Peer::of(addr, 3, 5);
            let name = std::str::from_utf8(&p.name[..p.name_len as usize]).unwrap();
            assert_eq!(name, addr.to_string());
            assert_eq!((p.port, p.index, p.count), (addr.port(), 3, 5));
            match addr.ip() {
                IpAddr::V4(v4) => assert_eq!((p.family, &p.addr[..4]), (4, &v4.octets()[..])),
                IpAddr::V6(v6) => assert_eq!((p.family, p.addr), (6, v6.octets())),
            }
        }
    }

    fn open(cfg: &str) -> *mut Handle {
        let mut err = [0u8; 256];
        // SAFETY: both valid for their lengths.
        let h =
            unsafe { graylane_open(cfg.as_ptr().cast(), cfg.len(), err.as_mut_ptr().cast(), 255) };
        assert!(!h.is_null(), "{}", String::from_utf8_lossy(&err));
        h
    }

    /// The texts `graylane_route_request` wrote, in order: route, lane, key, reason, lane
    /// header.
    fn texts(buf: &[u8], out: &Routed) -> [String; 5] {
        let mut at = 0;
        [
            out.route_len,
            out.lane_len,
            out.key_len,
            out.reason_len,
            out.lane_header_len,
        ]
        .map(|n| {
            let t = String::from_utf8(buf[at..at + n as usize].to_vec()).unwrap();
            at += n as usize;
            t
        })
    }

    fn route(h: *mut Handle, headers: &[(&[u8], &[u8])], cap: usize) -> (usize, Routed, Vec<u8>) {
        let list = header_list(headers);
        let mut out = Routed::default();
        let mut buf = vec![0u8; cap];
        // SAFETY: all valid for their lengths, `h` open.
        let n = unsafe {
            graylane_route_request(
                h,
                list.as_ptr(),
                list.len(),
                std::ptr::null(),
                0,
                buf.as_mut_ptr(),
                cap,
                &mut out,
            )
        };
        (n, out, buf)
    }

    /// The native module's one call: the decision, its texts and the cluster's next endpoint
    /// (round robin), the stable cluster without a strategy, 503 (-1) when none can serve,
    /// and a buffer too small answered with the length needed.
    #[test]
    fn route_request_decides_and_picks_the_endpoint_in_one_call() {
        let cfg = r#"{"service":"web","reason_header":"x-why","strategy":{"route-strategy":{
            "A":{"status":"Y","id":{"ids":[7]}},"B":{"status":"G","id":{"all":true}}}},
            "endpoints":{"A":["10.0.0.1:81"],"B":["10.0.0.2:82","[::1]:83"]}}"#;
        let h = open(cfg);
        let (n, out, buf) = route(h, &[(b"x-tenant-id", b"7")], 256);
        assert_eq!((n, out.status), (10, DECIDED));
        assert_eq!(
            texts(&buf, &out),
            ["A", "gray", "A", "A;id", ""].map(String::from)
        );
        let name = |p: &Peer| String::from_utf8(p.name[..p.name_len as usize].to_vec()).unwrap();
        assert_eq!((name(&out.peer), out.peer.count), ("10.0.0.1:81".into(), 1));

        let mut names = Vec::new();
        for _ in 0..3 {
            let (_, out, buf) = route(h, &[(b"x-tenant-id", b"8")], 256);
            assert_eq!(
                texts(&buf, &out),
                ["B", "prod", "B", "B;all", ""].map(String::from)
            );
            names.push((name(&out.peer), out.peer.index, out.peer.count));
        }
        assert_eq!(
            names,
            [
                ("10.0.0.2:82".into(), 0, 2),
                ("[::1]:83".into(), 1, 2),
                ("10.0.0.2:82".into(), 2, 2)
            ]
        );
        let mut retry = Peer::default();
        // SAFETY: valid pointers, `h` open.
        assert_eq!(
            unsafe { graylane_peer_at(h, b"B".as_ptr(), 1, 3, &mut retry) },
            0
        );
        assert_eq!(name(&retry), "[::1]:83");
        // SAFETY: as above.
        assert_eq!(
            unsafe { graylane_peer_at(h, b"C".as_ptr(), 1, 0, &mut retry) },
            ERROR
        );

        let (n, out, _) = route(h, &[(b"x-tenant-id", b"7")], 3);
        assert_eq!(
            (n, out.status),
            (10, DECIDED),
            "too small: the length needed"
        );
        // SAFETY: opened above, not used again.
        unsafe { graylane_close(h) };

        let h = open(
            r#"{"service":"web","stable":"B","control_plane":{"url":"http://127.0.0.1:9"},
            "endpoints":{"B":["10.0.0.2:82"]}}"#,
        );
        let (_, out, buf) = route(h, &[(b"x-tenant-id", b"7")], 256);
        assert_eq!(out.status, DECIDED);
        assert_eq!(
            texts(&buf, &out),
            ["B", "prod", "B", "", ""].map(String::from)
        );
        // SAFETY: opened above, not used again.
        unsafe { graylane_close(h) };

        let h = open(r#"{"service":"web","control_plane":{"url":"http://127.0.0.1:9"}}"#);
        let (n, out, _) = route(h, &[], 256);
        assert_eq!(
            (n, out.status),
            (1, ERROR),
            "no strategy, no stable cluster: 503"
        );
        // SAFETY: opened above, not used again.
        unsafe { graylane_close(h) };
    }
}
