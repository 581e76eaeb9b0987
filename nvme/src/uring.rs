//! The one io_uring each reactor owns, shared by its sockets and its flash I/O.
//!
//! Completions are routed by their `user_data`: the top byte says which kind of owner issued
//! the operation (socket receive, socket send, block device, wake-up eventfd), the rest says
//! which one. Submissions that do not fit in the submission queue wait in a backlog instead of
//! failing, so a burst can never lose an operation.

use std::collections::VecDeque;
use std::io;

use io_uring::{squeue, IoUring};

/// Owner kinds in the top byte of `user_data`.
pub mod kind {
    pub const SOCKET_RECV: u8 = 1;
    pub const SOCKET_SEND: u8 = 2;
    pub const BDEV: u8 = 3;
    pub const WAKE: u8 = 4;
}

/// Slots (the `b` of a `kind::BDEV` `user_data`) a block device channel does not use for its
/// I/O: a channel's operations are numbered from 0, and the top of the range is reserved.
pub mod slot {
    /// A channel's own wake-up operation in its reactor's ring: a passthrough channel's read of
    /// its ring's eventfd, a VFIO channel's poll timer. Routed to the channel's `on_cqe`.
    pub const CHANNEL_WAKE: u32 = u32::MAX - 1;
    /// Left to whoever owns a channel's id (an engine host's own wake-up read); never a
    /// channel's.
    pub const OWNER: u32 = u32::MAX;
}

/// Packs (kind, a: 24 bits, b: 32 bits) into `user_data`.
pub fn user_data(kind: u8, a: u32, b: u32) -> u64 {
    debug_assert!(a < 1 << 24);
    ((kind as u64) << 56) | ((a as u64 & 0xFF_FFFF) << 32) | b as u64
}

pub fn split(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ((ud >> 32) & 0xFF_FFFF) as u32, ud as u32)
}

pub struct Ring {
    pub ring: IoUring,
    backlog: VecDeque<squeue::Entry>,
    /// The kernel flags pending task work in the SQ ring (IORING_SETUP_TASKRUN_FLAG), so a
    /// spinning reactor can skip `io_uring_enter` when there is nothing to submit or run.
    taskrun_flag: bool,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Ring> {
        // COOP_TASKRUN: completions of socket operations run as task work on our next kernel
        // entry instead of interrupting us; TASKRUN_FLAG tells us when such work is waiting.
        let tuned = IoUring::builder().setup_single_issuer().setup_coop_taskrun().setup_taskrun_flag().build(entries);
        match tuned {
            Ok(ring) => Ok(Ring { ring, backlog: VecDeque::new(), taskrun_flag: true }),
            Err(_) => Ok(Ring { ring: IoUring::new(entries)?, backlog: VecDeque::new(), taskrun_flag: false }),
        }
    }

    /// Queues one operation.
    ///
    /// # Safety contract
    /// The entry's buffers must stay valid until its completion arrives; every caller in this
    /// crate and in the reactor keeps them in a slot that is only released on completion.
    pub fn push(&mut self, e: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(e);
            return;
        }
        // SAFETY: see the contract above — buffers outlive the operation.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.backlog.push_back(e);
        }
    }

    fn drain_backlog(&mut self) {
        while let Some(e) = self.backlog.pop_front() {
            // SAFETY: as in `push`.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                self.backlog.push_front(e);
                break;
            }
        }
    }

    /// Submits queued work and reaps what completed without sleeping. Enters the kernel only
    /// when there is something to submit or task work to run (when the kernel tells us).
    pub fn submit_and_reap(&mut self, out: &mut Vec<(u64, i32)>) -> io::Result<usize> {
        self.drain_backlog();
        let needed = {
            let sq = self.ring.submission();
            !self.taskrun_flag || !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        if needed {
            self.ring.submit()?;
        }
        Ok(self.reap(out))
    }

    /// Submits and sleeps until at least one completion (or `timeout`).
    pub fn submit_and_wait(&mut self, timeout: std::time::Duration, out: &mut Vec<(u64, i32)>) -> io::Result<usize> {
        self.drain_backlog();
        let ts = io_uring::types::Timespec::from(timeout);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) || e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
        Ok(self.reap(out))
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) -> usize {
        let start = out.len();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        out.len() - start
    }
}
