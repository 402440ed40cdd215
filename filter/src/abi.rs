//! The filter's Proxy-Wasm entry points (ABI 0.2.1), in place of an SDK's dispatcher (why:
//! host.rs).
//!
//! Envoy enters the VM once for each exported callback a request reaches, so the filter
//! exports only what it uses: per request, the context's creation (which names the request's
//! root context: several plugin configurations may share one VM), the request headers, the
//! response headers (the reason header, a report's status) and the log (a report's end). It
//! exports neither `proxy_on_done` nor `proxy_on_delete` (Envoy then treats a context as done
//! at once): a request keeps no state in the VM unless it is reported or given a reason
//! header, and that state ends with its log. A root context Envoy has let go of stops ticking;
//! a tick of another root in the VM drops it once both a minute and a thousand other ticks
//! have passed (`root::gone`).
//!
//! One VM is one thread: the state lives in a thread-local, borrowed for one callback at a
//! time. The host never calls back into the VM during a host call except to allocate memory
//! (Envoy defers a local reply until the callback returns), and the allocator touches no state;
//! a borrow that fails anyway leaves the request alone instead of trapping the VM.
#![allow(unsafe_code)] // The exports are C ABI functions named by the ABI.

use std::cell::RefCell;

use rustc_hash::FxHashMap;

use crate::host::Action;
use crate::http::Http;
use crate::root::{now_ms, Root};

/// More requests than this awaiting their log means logs are being lost: the state is dropped
/// rather than grown without bound.
const MAX_PENDING: usize = 100_000;

struct RootSlot {
    id: u32,
    root: Root,
    /// When it was created or last ticked: the host's clock (ms) and the VM's tick count.
    seen_ms: u64,
    seen_tick: u64,
}

#[derive(Default)]
struct Vm {
    roots: Vec<RootSlot>,
    /// Ticks of every root so far.
    ticks: u64,
    /// The request context Envoy created last, and its root: Envoy creates a request's context
    /// just before its request headers.
    created: (u32, u32),
    /// Requests reported or given a reason header, until their log.
    pending: FxHashMap<u32, Http>,
}

thread_local! {
    static VM: RefCell<Vm> = RefCell::new(Vm::default());
}

/// Runs `f` on the VM's state; `otherwise` if it is borrowed already.
fn with_vm<T>(otherwise: T, f: impl FnOnce(&mut Vm) -> T) -> T {
    VM.with(|vm| match vm.try_borrow_mut() {
        Ok(mut vm) => f(&mut vm),
        Err(_) => otherwise,
    })
}

fn with_root<T: Copy>(id: u32, otherwise: T, f: impl FnOnce(&mut Root) -> T) -> T {
    with_vm(otherwise, |vm| {
        match vm.roots.iter_mut().find(|r| r.id == id) {
            Some(slot) => f(&mut slot.root),
            None => otherwise,
        }
    })
}

extern "C" {
    #[cfg(target_os = "wasi")]
    fn __wasm_call_ctors();
}

/// Run by the host once, before anything else: WASI's static constructors.
#[no_mangle]
pub extern "C" fn _initialize() {
    // SAFETY: the linker's constructor list, run once as a WASI reactor must.
    #[cfg(target_os = "wasi")]
    unsafe {
        __wasm_call_ctors();
    }
}

#[no_mangle]
pub extern "C" fn proxy_abi_version_0_2_1() {}

/// Memory the host fills with a value it returns; host.rs takes it back (a `Vec`, or the
/// scratch buffer a header read offered).
#[no_mangle]
pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
    crate::host::allocate(size)
}

#[no_mangle]
pub extern "C" fn proxy_on_context_create(context: u32, parent: u32) {
    with_vm((), |vm| {
        if parent == 0 {
            let seen_tick = vm.ticks;
            vm.roots.push(RootSlot {
                id: context,
                root: Root::new(),
                seen_ms: now_ms().unwrap_or(0),
                seen_tick,
            });
        } else {
            vm.created = (context, parent);
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_vm_start(_root: u32, _vm_configuration_size: usize) -> u32 {
    1
}

#[no_mangle]
pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
    u32::from(with_root(root, false, |r| r.on_configure(size)))
}

#[no_mangle]
pub extern "C" fn proxy_on_tick(root: u32) {
    let now = now_ms().unwrap_or(0);
    with_vm((), |vm| {
        vm.ticks += 1;
        let ticks = vm.ticks;
        // Roots Envoy let go of (they tick no more).
        vm.roots.retain(|r| {
            r.id == root
                || !crate::root::gone(
                    now.saturating_sub(r.seen_ms),
                    ticks.saturating_sub(r.seen_tick),
                )
        });
        if vm.pending.len() > MAX_PENDING {
            vm.pending.clear();
        }
        if let Some(slot) = vm.roots.iter_mut().find(|r| r.id == root) {
            slot.seen_ms = now;
            slot.seen_tick = ticks;
            slot.root.on_tick();
        }
    });
}

#[no_mangle]
pub extern "C" fn proxy_on_queue_ready(root: u32, queue: u32) {
    with_root(root, (), |r| r.on_queue_ready(queue));
}

#[no_mangle]
pub extern "C" fn proxy_on_http_call_response(
    root: u32,
    token: u32,
    _headers: usize,
    body_size: usize,
    _trailers: usize,
) {
    with_root(root, (), |r| r.on_http_call_response(token, body_size));
}

#[no_mangle]
pub extern "C" fn proxy_on_request_headers(context: u32, _headers: usize, _end: u32) -> u32 {
    with_vm(Action::Continue, |vm| {
        let root = match vm.created {
            (c, root) if c == context => root,
            // Not seen created (not expected): the VM's only root, if it has one.
            _ => match vm.roots.as_slice() {
                [only] => only.id,
                _ => return Action::Continue,
            },
        };
        let Some(shared) = vm
            .roots
            .iter()
            .find(|r| r.id == root)
            .and_then(|r| r.root.shared())
        else {
            return Action::Continue;
        };
        let mut http = Http::new(shared);
        let action = http.on_request_headers();
        if http.pending() {
            vm.pending.insert(context, http);
        }
        action
    }) as u32
}

#[no_mangle]
pub extern "C" fn proxy_on_response_headers(context: u32, _headers: usize, _end: u32) -> u32 {
    with_vm((), |vm| {
        if vm.pending.is_empty() {
            return;
        }
        if let Some(http) = vm.pending.get_mut(&context) {
            http.on_response_headers();
        }
    });
    Action::Continue as u32
}

#[no_mangle]
pub extern "C" fn proxy_on_log(context: u32) {
    with_vm((), |vm| {
        if vm.pending.is_empty() {
            return;
        }
        if let Some(mut http) = vm.pending.remove(&context) {
            http.on_log();
        }
    });
}
