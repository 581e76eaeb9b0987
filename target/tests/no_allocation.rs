//! A reactor serves steady I/O without allocating: once warm, request slots, I/O buffers,
//! send segments and receive buffers are all reused. Alone in its test binary, so only this
//! target's reactor is counted.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, HostOptions, Response};
use stager_nvme::status::Status;

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

/// One round of pipelined I/O on `q`: `n` writes (in-capsule 4 KiB and 64 KiB through R2T)
/// then reads of the same blocks, checking every byte.
fn round(q: &mut stager_nvme::host::QueuePair, seed: u64, n: u64) {
    let len = |i: u64| if i.is_multiple_of(2) { 4096 } else { 65536 };
    let mut out: Vec<Response> = Vec::new();
    for i in 0..n {
        let l = len(i);
        let lba = i * 16;
        q.submit(io_cmd::write(1, lba, (l / 4096) as u32), pattern(seed + i, l), DataDirection::HostToController, i)
            .unwrap();
    }
    while out.len() < n as usize {
        q.wait(&mut out).unwrap();
    }
    assert!(out.iter().all(|r| r.status() == Status::SUCCESS));
    out.clear();
    for i in 0..n {
        let l = len(i);
        q.submit(io_cmd::read(1, i * 16, (l / 4096) as u32), vec![0; l], DataDirection::ControllerToHost, i).unwrap();
    }
    while out.len() < n as usize {
        q.wait(&mut out).unwrap();
    }
    for r in &out {
        assert_eq!(r.status(), Status::SUCCESS);
        assert!(r.data == pattern(seed + r.tag, len(r.tag)), "read of block {} returned other bytes", r.tag * 16);
    }
}

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
