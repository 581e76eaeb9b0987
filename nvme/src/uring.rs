//! The one io_uring each reactor owns, shared by its sockets and its flash I/O.
//!
//! Completions are routed by their `user_data`: the top byte says which kind of owner issued
//! the operation (socket receive, socket send, block device, wake-up eventfd), the rest says
//! which one. Submissions that do not fit in the submission queue wait in a backlog instead of
//! failing, so a burst can never lose an operation.
//!
//! A zero-copy send (`kind::SOCKET_SEND_ZC`) completes twice: once with its result and, if the
//! kernel set `IORING_CQE_F_MORE` on that, later with a notification that it no longer uses the
//! buffers. Completions carry only `(user_data, result)`, so `reap` folds those flags into
//! `user_data`: the first completion gets `ZC_MORE` in `b` when a notification will follow, and
//! the notification arrives as `kind::SOCKET_SEND_NOTIF` with the send's `a` and `b`.

use std::collections::VecDeque;
use std::io;

use io_uring::{squeue, IoUring};

/// Owner kinds in the top byte of `user_data`.
pub mod kind {
    pub const SOCKET_RECV: u8 = 1;
    pub const SOCKET_SEND: u8 = 2;
    pub const BDEV: u8 = 3;
    pub const WAKE: u8 = 4;
    /// A zero-copy socket send (see the module doc).
    pub const SOCKET_SEND_ZC: u8 = 5;
    /// The buffer notification of a `SOCKET_SEND_ZC`.
    pub const SOCKET_SEND_NOTIF: u8 = 6;
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

/// In `b` of a `SOCKET_SEND_ZC` completion: a `SOCKET_SEND_NOTIF` will follow. Zero-copy senders
/// keep `b` below this bit.
pub const ZC_MORE: u32 = 1 << 31;

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
        out.extend(self.ring.completion().map(|c| {
            let ud = c.user_data();
            if (ud >> 56) as u8 != kind::SOCKET_SEND_ZC {
                (ud, c.result())
            } else if io_uring::cqueue::notif(c.flags()) {
                ((ud & !(0xFF << 56)) | ((kind::SOCKET_SEND_NOTIF as u64) << 56), c.result())
            } else if io_uring::cqueue::more(c.flags()) {
                (ud | ZC_MORE as u64, c.result())
            } else {
                (ud, c.result())
            }
        }));
        out.len() - start
    }
}
