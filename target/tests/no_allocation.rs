//! A reactor serves steady I/O without allocating: once warm, request slots, I/O buffers,
//! send segments and receive buffers are all reused. Alone in its test binary, so only this
//! target's reactor is counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use stager_nvme::host::HostOptions;

/// Counts allocations made by reactor threads while `COUNTING` is set.
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static REACTOR_ALLOCS: AtomicU64 = AtomicU64::new(0);

fn on_reactor_thread() -> bool {
    let mut name = [0u8; 16];
    // SAFETY: pthread_self is always valid; the buffer is 16 bytes, the size Linux thread
    // names are limited to (including the NUL). No allocation happens here.
    let rc = unsafe { libc::pthread_getname_np(libc::pthread_self(), name.as_mut_ptr().cast(), name.len()) };
    rc == 0 && name.starts_with(b"reactor-")
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) && on_reactor_thread() {
            REACTOR_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) && on_reactor_thread() {
            REACTOR_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) && on_reactor_thread() {
            REACTOR_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn steady_io_does_not_allocate_on_the_reactor() {
    let t = TestTarget::default();
    let mut c = t.connect(&HostOptions { queue_depth: 32, ..opts() });
    let q = c.io_queue(0);
    // Warm up: pools, segment vectors and slot tables reach their working size.
    for seed in 0..10u64 {
        round(q, seed * 1000, 32);
    }
    REACTOR_ALLOCS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    for seed in 10..30u64 {
        round(q, seed * 1000, 32);
    }
    COUNTING.store(false, Ordering::Relaxed);
    let n = REACTOR_ALLOCS.load(Ordering::Relaxed);
    // 1280 commands (in-capsule and R2T writes, reads) after warm-up: none may allocate.
    assert_eq!(n, 0, "the reactor allocated {n} times for 1280 commands after warm-up");
    c.shutdown().unwrap();
}
