//! Baselines (r) and (s) of `make bench`: the least any Proxy-Wasm filter doing graylane's job
//! (read the tenant header, write the route and lane headers) can cost in Envoy, so that what
//! graylane's filter costs can be told from what the ABI itself costs.
//!
//! Written against the Proxy-Wasm ABI 0.2.1 directly, with no SDK: the Rust SDK exports every
//! callback of the ABI and keeps a context per request (created, looked up and deleted through
//! host calls), so a filter built with it cannot show the floor. Nor does it call graylane's
//! own host calls (filter/src/host.rs): linking the filter's crate would bring its exports in.
//! Envoy enters the VM once per exported callback a request reaches, so (r) exports only
//! `proxy_on_request_headers` (and the
//! allocator the host needs to return the header's value). (s), the `graylane-callbacks`
//! feature, also exports the other per-request callbacks graylane's filter exports (context
//! creation, response headers, log: filter/src/abi.rs), each doing nothing: what having them
//! costs any filter, whatever it does in them.
//!
//! The split is the bench's: a tenant id ending in 0 goes to A (lane gray), any other to B.
//! Nothing here is shipped; `make bench` builds it.

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // The ABI is a C ABI: its imports and exports are raw pointers.
mod abi {
    /// `proxy_map_type` of the request headers.
    const REQUEST_HEADERS: u32 = 0;
    /// `proxy_action` Continue; `proxy_result` Ok.
    const CONTINUE: u32 = 0;
    const OK: u32 = 0;

    #[link(wasm_import_module = "env")]
    extern "C" {
        fn proxy_get_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *mut *mut u8,
            value_len: *mut usize,
        ) -> u32;
        fn proxy_replace_header_map_value(
            map: u32,
            key: *const u8,
            key_len: usize,
            value: *const u8,
            value_len: usize,
        ) -> u32;
    }

    fn replace(key: &[u8], value: &[u8]) {
        // SAFETY: both slices outlive the call; the host copies them.
        unsafe {
            proxy_replace_header_map_value(
                REQUEST_HEADERS,
                key.as_ptr(),
                key.len(),
                value.as_ptr(),
                value.len(),
            );
        }
    }

    #[no_mangle]
    pub extern "C" fn proxy_abi_version_0_2_1() {}

    /// The host allocates here the values it returns (a header's value); the filter frees them.
    #[no_mangle]
    pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
        let mut buf = std::mem::ManuallyDrop::new(Vec::<u8>::with_capacity(size));
        buf.as_mut_ptr()
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
        1
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_configure(_root: u32, _size: usize) -> u32 {
        1
    }

    #[no_mangle]
    pub extern "C" fn proxy_on_request_headers(_context: u32, _headers: usize, _end: u32) -> u32 {
        let key = b"x-tenant-id";
        let mut ptr: *mut u8 = std::ptr::null_mut();
        let mut len: usize = 0;
        // SAFETY: the host writes a pointer it got from proxy_on_memory_allocate and its length.
        let status = unsafe {
            proxy_get_header_map_value(REQUEST_HEADERS, key.as_ptr(), key.len(), &mut ptr, &mut len)
        };
        let mut to_a = false;
        if status == OK && !ptr.is_null() {
            // SAFETY: `len` bytes at `ptr` were allocated by proxy_on_memory_allocate with
            // capacity `len`; the Vec takes them back and frees them.
            let value = unsafe { Vec::from_raw_parts(ptr, len, len) };
            to_a = value.last() == Some(&b'0');
        }
        let (cluster, lane): (&[u8], &[u8]) = if to_a {
            (b"A", b"gray")
        } else {
            (b"B", b"prod")
        };
        replace(b"x-graylane-cluster", cluster);
        replace(b"x-graylane-lane", lane);
        CONTINUE
    }

    #[cfg(feature = "graylane-callbacks")]
    mod graylane_callbacks {
        #[no_mangle]
        pub extern "C" fn proxy_on_context_create(_context: u32, _root: u32) {}

        #[no_mangle]
        pub extern "C" fn proxy_on_response_headers(
            _context: u32,
            _headers: usize,
            _end: u32,
        ) -> u32 {
            super::CONTINUE
        }

        #[no_mangle]
        pub extern "C" fn proxy_on_log(_context: u32) {}
    }
}
