//! The C ABI LuaJIT's FFI calls (`nginx/lua/graylane.lua` declares the same functions).
//!
//! The only unsafe code of the crate is here: reading the pointers and lengths LuaJIT
//! hands over, and owning the handle across calls. Every function catches panics (an unwind
//! must never cross into nginx) and answers "error", which the Lua side turns into the
//! stable cluster. Strings go out by copy into the caller's buffer; nothing returned points
//! into a snapshot the feed thread may replace.

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
        match r.decide(generation, vals) {
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
    })
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
        let ip = peer.ip().to_string();
        // SAFETY: as promised by the caller.
        unsafe {
            if let Some(p) = port.as_mut() {
                *p = peer.port();
            }
            if let Some(c) = count.as_mut() {
                *c = u32::try_from(n).unwrap_or(u32::MAX);
            }
            i32::try_from(copy_out(ip.as_bytes(), addr, cap)).unwrap_or(ERROR)
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
