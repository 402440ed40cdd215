//! The host calls of the Proxy-Wasm ABI 0.2.1 the filter makes, with safe signatures.
//!
//! Why not the Rust SDK (`proxy-wasm`): its dispatcher exports every callback of the ABI and
//! keeps a context per request that Envoy must create, enter and delete through the VM; Envoy
//! enters the VM once per exported callback a request reaches, whatever the filter does in it.
//! Measured in `make bench` (baselines (t) and (s): the same work with the SDK's dispatcher and
//! with none), that dispatch alone cost 1.7–2.7 % of Envoy's throughput. The filter therefore
//! owns its entry points (`abi.rs`) and makes its host calls here; the SDK stays in the bench's
//! baseline filter, as what a user's own filter would be built with.
//!
//! Values the host returns (a header, a property, a buffer) are written into memory the host
//! asks the VM for through `proxy_on_memory_allocate` (`abi.rs`); each wrapper takes that
//! allocation back as a `Vec` and frees it. A header read offers the host a small scratch
//! buffer instead (`HostBytes`): the request path reads its tenant and `:status` without the
//! allocator (measured: about 500 of Envoy's instructions a request, ~1 % of its throughput).
#![allow(unsafe_code)] // The ABI is a C ABI: raw pointers in, raw pointers out.

use std::cell::{Cell, UnsafeCell};
use std::ops::Deref;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Header values up to this long are read into the VM's scratch buffer.
const SCRATCH_LEN: usize = 256;

/// A buffer a header read offers the host instead of the allocator: the host asks the VM for
/// the value's memory during the read, and a tenant id or a `:status` needs no `malloc` and
/// `free` (dlmalloc: more code and instructions on a request's path than the rest of the
/// read's work in the VM). One value at a time; a second value, a longer one, or any other
/// host call's value is allocated as before.
struct Scratch {
    /// A header read is under way and the buffer is free: the next allocation may take it.
    offered: Cell<bool>,
    /// A [`HostBytes`] holds it.
    held: Cell<bool>,
    buf: UnsafeCell<[u8; SCRATCH_LEN]>,
}

thread_local! {
    static SCRATCH: Scratch = const {
        Scratch {
            offered: Cell::new(false),
            held: Cell::new(false),
            buf: UnsafeCell::new([0; SCRATCH_LEN]),
        }
    };
}

/// Memory for a value the host is about to return (`proxy_on_memory_allocate`): the scratch
/// buffer when a header read offers it and the value fits, else the allocator's; taken back
/// by the host call's wrapper.
pub fn allocate(size: usize) -> *mut u8 {
    let scratch = SCRATCH.with(|s| {
        (s.offered.get() && size <= SCRATCH_LEN).then(|| {
            s.offered.set(false);
            s.held.set(true);
            s.buf.get().cast::<u8>()
        })
    });
    scratch
        .unwrap_or_else(|| std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size)).as_mut_ptr())
}

/// A value the host returned: in the scratch buffer, or allocated. Only a header read makes
/// one, so a value in the scratch buffer is always the one that holds it.
pub struct HostBytes(Held);

enum Held {
    Scratch(usize),
    Heap(Vec<u8>),
}

impl Deref for HostBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            // SAFETY: the buffer is held by this value alone (`held`) and its first `len`
            // bytes were written by the host; nothing writes it until this value is dropped.
            Held::Scratch(len) => SCRATCH.with(|s| unsafe {
                std::slice::from_raw_parts(s.buf.get().cast::<u8>(), (*len).min(SCRATCH_LEN))
            }),
            Held::Heap(v) => v,
        }
    }
}

impl Drop for HostBytes {
    fn drop(&mut self) {
        if let Held::Scratch(_) = self.0 {
            SCRATCH.with(|s| s.held.set(false));
        }
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HostBytes").field(&&**self).finish()
    }
}

/// A host call's result other than success (`proxy_result_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    NotFound,
    BadArgument,
    ParseFailure,
    Empty,
    CasMismatch,
    InternalFailure,
    Unimplemented,
    Other(u32),
}

impl Status {
    fn of(code: u32) -> Result<(), Status> {
        Err(match code {
            0 => return Ok(()),
            1 => Status::NotFound,
            2 => Status::BadArgument,
            4 => Status::ParseFailure,
            7 => Status::Empty,
            8 => Status::CasMismatch,
            10 => Status::InternalFailure,
            12 => Status::Unimplemented,
            other => Status::Other(other),
        })
    }
}

/// `proxy_action_t`: what the host does with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue = 0,
    Pause = 1,
}

/// `proxy_map_type_t` (the ABI's names).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapType {
    HttpRequestHeaders = 0,
    HttpResponseHeaders = 2,
    HttpCallResponseHeaders = 6,
}

/// `proxy_buffer_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferType {
    HttpCallResponseBody = 4,
    PluginConfiguration = 7,
}

/// `proxy_log_level_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

/// `proxy_metric_type_t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter = 0,
}

mod ffi {
    #[link(wasm_import_module = "env")]
    extern "C" {
        pub fn proxy_log(level: u32, message: *const u8, message_len: usize) -> u32;
        pub fn proxy_get_log_level(level: *mut u32) -> u32;
        pub fn proxy_get_current_time_nanoseconds(time: *mut u64) -> u32;
        pub fn proxy_set_tick_period_milliseconds(period: u32) -> u32;
        pub fn proxy_get_buffer_bytes(
            buffer: u32,
            start: usize,
            max_len: usize,
            data: *mut *mut u8,
            len: *mut usize,
        ) -> u32;
        pub fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *mut *mut u8,
            value_len: *mut usize,
        ) -> u32;
        pub fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
        pub fn proxy_remove_header_map_value(map: u32, key: *const u8, key_len: usize) -> u32;
        pub fn proxy_get_property(
            path: *const u8,
            path_len: usize,
            value: *mut *mut u8,
            value_len: *mut usize,
        ) -> u32;
        pub fn proxy_get_shared_data(
            key: *const u8,
            key_len: usize,
            value: *mut *mut u8,
            value_len: *mut usize,
            cas: *mut u32,
        ) -> u32;
        pub fn proxy_set_shared_data(
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
            cas: u32,
        ) -> u32;
        pub fn proxy_register_shared_queue(name: *const u8, name_len: usize, id: *mut u32) -> u32;
        pub fn proxy_enqueue_shared_queue(id: u32, value: *const u8, value_len: usize) -> u32;
        pub fn proxy_dequeue_shared_queue(
            id: u32,
            value: *mut *mut u8,
            value_len: *mut usize,
        ) -> u32;
        #[allow(clippy::too_many_arguments)]
        pub fn proxy_http_call(
            upstream: *const u8,
            upstream_len: usize,
            headers: *const u8,
            headers_len: usize,
            body: *const u8,
            body_len: usize,
            trailers: *const u8,
            trailers_len: usize,
            timeout_ms: u32,
            token: *mut u32,
        ) -> u32;
        #[allow(clippy::too_many_arguments)]
        pub fn proxy_send_local_response(
            status: u32,
            details: *const u8,
            details_len: usize,
            body: *const u8,
            body_len: usize,
            headers: *const u8,
            headers_len: usize,
            grpc_status: i32,
        ) -> u32;
        pub fn proxy_define_metric(
            kind: u32,
            name: *const u8,
            name_len: usize,
            id: *mut u32,
        ) -> u32;
        pub fn proxy_increment_metric(id: u32, offset: i64) -> u32;
    }
}

/// Takes back a value the host wrote into an allocation of exactly `len` bytes it asked
/// `proxy_on_memory_allocate` for.
///
/// SAFETY: `data` is null, or a pointer `proxy_on_memory_allocate` returned for `len` bytes
/// that nothing else owns.
unsafe fn owned(data: *mut u8, len: usize) -> Vec<u8> {
    if data.is_null() {
        Vec::new()
    } else {
        Vec::from_raw_parts(data, len, len)
    }
}

/// A value out of a call that returns one: `None` when the host has none (`NotFound`, or
/// `Empty` for a queue).
fn returned(call: impl FnOnce(*mut *mut u8, *mut usize) -> u32) -> Result<Option<Vec<u8>>, Status> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut len: usize = 0;
    match Status::of(call(&mut data, &mut len)) {
        // SAFETY: on success the host wrote a pointer it got from proxy_on_memory_allocate.
        Ok(()) => Ok(Some(unsafe { owned(data, len) })),
        Err(Status::NotFound | Status::Empty) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `proxy_map` encoding of header pairs: the count, each pair's two lengths, then each key and
/// value followed by a NUL (all integers u32, little-endian).
fn pairs(list: &[(&str, &str)]) -> Vec<u8> {
    let size = 4 + list
        .iter()
        .map(|(k, v)| 8 + k.len() + v.len() + 2)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let len32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(&len32(list.len()));
    for (k, v) in list {
        out.extend_from_slice(&len32(k.len()));
        out.extend_from_slice(&len32(v.len()));
    }
    for (k, v) in list {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

pub fn log(level: LogLevel, message: &str) -> Result<(), Status> {
    // SAFETY: the message outlives the call; the host copies it.
    Status::of(unsafe { ffi::proxy_log(level as u32, message.as_ptr(), message.len()) })
}

pub fn get_log_level() -> Result<LogLevel, Status> {
    let mut level = 0u32;
    // SAFETY: the host writes one u32.
    Status::of(unsafe { ffi::proxy_get_log_level(&mut level) })?;
    Ok(match level {
        0 => LogLevel::Trace,
        1 => LogLevel::Debug,
        2 => LogLevel::Info,
        3 => LogLevel::Warn,
        4 => LogLevel::Error,
        _ => LogLevel::Critical,
    })
}

pub fn get_current_time() -> Result<SystemTime, Status> {
    let mut nanos = 0u64;
    // SAFETY: the host writes one u64.
    Status::of(unsafe { ffi::proxy_get_current_time_nanoseconds(&mut nanos) })?;
    Ok(UNIX_EPOCH + Duration::from_nanos(nanos))
}

pub fn set_tick_period(period: Duration) -> Result<(), Status> {
    // SAFETY: no pointers.
    Status::of(unsafe { ffi::proxy_set_tick_period_milliseconds(millis(period)) })
}

pub fn get_buffer(
    buffer: BufferType,
    start: usize,
    max_len: usize,
) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the host writes a pointer and a length.
    returned(|data, len| unsafe {
        ffi::proxy_get_buffer_bytes(buffer as u32, start, max_len, data, len)
    })
}

pub fn get_map_value_bytes(map: MapType, key: &str) -> Result<Option<HostBytes>, Status> {
    // SAFETY: the key outlives the call; the host writes a pointer and a length.
    offering_scratch(|data, len| unsafe {
        ffi::proxy_get_header_map_value(map as u32, key.as_ptr(), key.len(), data, len)
    })
}

/// As [`returned`], with the scratch buffer offered to the host for the value (if free).
fn offering_scratch(
    call: impl FnOnce(*mut *mut u8, *mut usize) -> u32,
) -> Result<Option<HostBytes>, Status> {
    let (scratch, free) = SCRATCH.with(|s| {
        let free = !s.held.get();
        s.offered.set(free);
        (s.buf.get().cast::<u8>(), free)
    });
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut len: usize = 0;
    let status = Status::of(call(&mut data, &mut len));
    let taken = SCRATCH.with(|s| {
        s.offered.set(false);
        free && s.held.get()
    });
    if taken && !(status.is_ok() && data == scratch) {
        // Taken, but the call failed or returned other memory: the buffer is free again.
        SCRATCH.with(|s| s.held.set(false));
    }
    match status {
        Ok(()) if data == scratch => Ok(Some(HostBytes(Held::Scratch(len)))),
        // SAFETY: on success the host wrote a pointer it got from proxy_on_memory_allocate.
        Ok(()) => Ok(Some(HostBytes(Held::Heap(unsafe { owned(data, len) })))),
        Err(Status::NotFound | Status::Empty) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sets header `key` to `value`, replacing any it had, or removes it (`None`).
pub fn set_map_value_bytes(map: MapType, key: &str, value: Option<&[u8]>) -> Result<(), Status> {
    // SAFETY: key and value outlive the call; the host copies them.
    Status::of(unsafe {
        match value {
            Some(v) => ffi::proxy_replace_header_map_value(
                map as u32,
                key.as_ptr(),
                key.len(),
                v.as_ptr(),
                v.len(),
            ),
            None => ffi::proxy_remove_header_map_value(map as u32, key.as_ptr(), key.len()),
        }
    })
}

/// A property (Envoy's attributes), its path's segments joined by NUL.
pub fn get_property(path: &[&str]) -> Result<Option<Vec<u8>>, Status> {
    let joined = path.join("\0");
    // SAFETY: the path outlives the call; the host writes a pointer and a length.
    returned(|data, len| unsafe {
        ffi::proxy_get_property(joined.as_ptr(), joined.len(), data, len)
    })
}

/// Shared data under `key` and its CAS token (0 when the key is absent).
pub fn get_shared_data(key: &str) -> Result<(Option<Vec<u8>>, u32), Status> {
    let mut cas = 0u32;
    // SAFETY: the key outlives the call; the host writes a pointer, a length and the token.
    let value = returned(|data, len| unsafe {
        ffi::proxy_get_shared_data(key.as_ptr(), key.len(), data, len, &mut cas)
    })?;
    Ok((value, cas))
}

/// Stores shared data; with `cas`, only if the key still has that token (else `CasMismatch`).
pub fn set_shared_data(key: &str, value: &[u8], cas: Option<u32>) -> Result<(), Status> {
    // SAFETY: key and value outlive the call; the host copies them.
    Status::of(unsafe {
        ffi::proxy_set_shared_data(
            key.as_ptr(),
            key.len(),
            value.as_ptr(),
            value.len(),
            cas.unwrap_or(0),
        )
    })
}

pub fn register_shared_queue(name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the name outlives the call; the host writes one u32.
    Status::of(unsafe { ffi::proxy_register_shared_queue(name.as_ptr(), name.len(), &mut id) })?;
    Ok(id)
}

pub fn enqueue_shared_queue(id: u32, value: &[u8]) -> Result<(), Status> {
    // SAFETY: the value outlives the call; the host copies it.
    Status::of(unsafe { ffi::proxy_enqueue_shared_queue(id, value.as_ptr(), value.len()) })
}

/// The next item of a queue, `None` when it is empty.
pub fn dequeue_shared_queue(id: u32) -> Result<Option<Vec<u8>>, Status> {
    // SAFETY: the host writes a pointer and a length.
    returned(|data, len| unsafe { ffi::proxy_dequeue_shared_queue(id, data, len) })
}

/// An HTTP call to Envoy cluster `upstream`; its answer arrives in `on_http_call_response`
/// under the returned token.
pub fn dispatch_http_call(
    upstream: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<u32, Status> {
    let headers = pairs(headers);
    let trailers = pairs(&[]);
    let body = body.unwrap_or_default();
    let mut token = 0u32;
    // SAFETY: every buffer outlives the call; the host copies them and writes one u32.
    Status::of(unsafe {
        ffi::proxy_http_call(
            upstream.as_ptr(),
            upstream.len(),
            headers.as_ptr(),
            headers.len(),
            body.as_ptr(),
            body.len(),
            trailers.as_ptr(),
            trailers.len(),
            millis(timeout),
            &mut token,
        )
    })?;
    Ok(token)
}

/// Answers the request here instead of sending it upstream.
pub fn send_http_response(
    status: u32,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(), Status> {
    let headers = pairs(headers);
    // SAFETY: every buffer outlives the call; the host copies them.
    Status::of(unsafe {
        ffi::proxy_send_local_response(
            status,
            "".as_ptr(),
            0,
            body.as_ptr(),
            body.len(),
            headers.as_ptr(),
            headers.len(),
            -1,
        )
    })
}

pub fn define_metric(kind: MetricType, name: &str) -> Result<u32, Status> {
    let mut id = 0u32;
    // SAFETY: the name outlives the call; the host writes one u32.
    Status::of(unsafe {
        ffi::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

pub fn increment_metric(id: u32, offset: i64) -> Result<(), Status> {
    // SAFETY: no pointers.
    Status::of(unsafe { ffi::proxy_increment_metric(id, offset) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn pairs_are_encoded_as_the_abi_map() {
        let got = pairs(&[(":path", "/x"), ("a", "")]);
        let mut want = Vec::new();
        for n in [2u32, 5, 2, 1, 0] {
            want.extend_from_slice(&n.to_le_bytes());
        }
        want.extend_from_slice(b":path\0/x\0a\0\0");
        assert_eq!(got, want);
        assert_eq!(pairs(&[]), 0u32.to_le_bytes());
    }

    #[test]
    fn results_map_to_statuses() {
        assert_eq!(Status::of(0), Ok(()));
        assert_eq!(Status::of(1), Err(Status::NotFound));
        assert_eq!(Status::of(8), Err(Status::CasMismatch));
        assert_eq!(Status::of(99), Err(Status::Other(99)));
    }

    /// What Envoy does in a read: asks the VM for memory (`proxy_on_memory_allocate`), copies
    /// the value in, writes its pointer and length; then answers `code`.
    fn host_returns(value: &[u8], code: u32) -> impl FnOnce(*mut *mut u8, *mut usize) -> u32 + '_ {
        move |data, len| {
            let p = allocate(value.len());
            // SAFETY: `p` has room for `value` (scratch or allocator), as in the host.
            unsafe {
                std::ptr::copy_nonoverlapping(value.as_ptr(), p, value.len());
                *data = p;
                *len = value.len();
            }
            code
        }
    }

    fn in_scratch(v: &Option<HostBytes>) -> bool {
        matches!(v, Some(HostBytes(Held::Scratch(_))))
    }

    #[test]
    fn header_values_use_the_scratch_buffer_one_at_a_time() {
        let a = offering_scratch(host_returns(b"4711", 0)).unwrap();
        assert!(in_scratch(&a));
        assert_eq!(a.as_deref(), Some(&b"4711"[..]));
        // The buffer is held: a second value is allocated, and both stay intact.
        let b = offering_scratch(host_returns(b"tenantGray=x", 0)).unwrap();
        assert!(!in_scratch(&b));
        assert_eq!(b.as_deref(), Some(&b"tenantGray=x"[..]));
        assert_eq!(a.as_deref(), Some(&b"4711"[..]));
        drop(a);
        let c = offering_scratch(host_returns(b"200", 0)).unwrap();
        assert!(in_scratch(&c));
        assert_eq!(c.as_deref(), Some(&b"200"[..]));
        drop(c);
        // Longer than the buffer: allocated.
        let long = vec![b'x'; SCRATCH_LEN + 1];
        let d = offering_scratch(host_returns(&long, 0)).unwrap();
        assert!(!in_scratch(&d));
        assert_eq!(d.as_deref(), Some(&long[..]));
        let fits = vec![b'y'; SCRATCH_LEN];
        let e = offering_scratch(host_returns(&fits, 0)).unwrap();
        assert!(in_scratch(&e));
        assert_eq!(e.as_deref(), Some(&fits[..]));
    }

    #[test]
    fn only_a_header_read_may_take_the_scratch_buffer() {
        // Any other call's value (a buffer, a property, shared data) is allocated.
        let v = returned(host_returns(b"config", 0)).unwrap();
        assert_eq!(v.as_deref(), Some(&b"config"[..]));
        let p = allocate(3);
        assert_ne!(p, SCRATCH.with(|s| s.buf.get().cast::<u8>()));
        // SAFETY: allocated above with capacity 3 by the allocator.
        drop(unsafe { owned(p, 3) });
        // A read that found nothing leaves the buffer free.
        assert_eq!(offering_scratch(|_, _| 1).map(|v| v.is_none()), Ok(true));
        assert!(in_scratch(
            &offering_scratch(host_returns(b"1", 0)).unwrap()
        ));
    }

    #[test]
    fn a_read_answered_in_other_memory_leaves_the_buffer_free() {
        // A host that asks twice and returns the second: the value is the allocator's.
        let v = offering_scratch(|data, len| {
            let _first = allocate(4);
            let p = allocate(2);
            // SAFETY: `p` has room for 2 bytes (the allocator's).
            unsafe {
                std::ptr::copy_nonoverlapping(b"ok".as_ptr(), p, 2);
                *data = p;
                *len = 2;
            }
            0
        })
        .unwrap();
        assert!(!in_scratch(&v));
        assert_eq!(v.as_deref(), Some(&b"ok"[..]));
        assert!(in_scratch(
            &offering_scratch(host_returns(b"4", 0)).unwrap()
        ));
    }

    #[test]
    fn a_read_that_fails_after_taking_the_buffer_frees_it() {
        assert_eq!(
            offering_scratch(host_returns(b"x", 2)).map(|v| v.is_none()),
            Err(Status::BadArgument)
        );
        assert!(in_scratch(
            &offering_scratch(host_returns(b"2", 0)).unwrap()
        ));
        assert_eq!(
            offering_scratch(host_returns(b"gone", 1)).map(|v| v.is_none()),
            Ok(true)
        );
        assert!(in_scratch(
            &offering_scratch(host_returns(b"3", 0)).unwrap()
        ));
    }
}
