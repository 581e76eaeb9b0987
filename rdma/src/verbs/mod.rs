//! The verbs backend: RC queue pairs on real RDMA verbs through `rdma-sys` (bindgen over the
//! system's rdma-core). All of the crate's FFI lives here, each `unsafe` block with its SAFETY
//! line; the rest of the crate sees [`Device`] and [`VerbsEndpoint`] only.
//!
//! Isolation between peers: every endpoint has its own protection domain. A region exposed on an
//! endpoint is registered (remote-write) in that endpoint's PD only, and only that endpoint's
//! queue pair lives in it, so an rkey leaked to another peer is refused by the NIC (a remote
//! access error that kills the offending peer's queue pair, not ours). Memory windows would give
//! the same with one registration per region, but need type-2 MW support that Soft-RoCE and many
//! NICs handle unevenly; a PD per endpoint needs nothing beyond base verbs.

mod device;
mod endpoint;

pub(crate) use device::Device;
pub(crate) use endpoint::VerbsEndpoint;

use std::ffi::CStr;

/// The text of an errno value.
fn errno_text(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// The text of the last errno.
fn last_errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// A C string from the library (static strings: device names, status texts).
fn c_text(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return "?".into();
    }
    // SAFETY: libibverbs returns NUL-terminated static (or device-lifetime) strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}
