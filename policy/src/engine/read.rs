//! Reads: the dirty index first (log, zeroes, or memory after a failed log write), then the
//! clean cache, then the SAN — and clean copies of what the SAN returned go into the cache.
//!
//! A read served by one device operation reads straight into the host's buffer; one made of
//! several parts reads each into a buffer of its own and copies it into place.

use super::volume::{PendingOp, ReadOp, SanOp};
use super::{Engine, FlashOp, Pin, Status};
use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64, FLASH_READ_FAIL_LOG_NS, FLASH_READ_RETRY_NS};
use crate::index::DirtyLoc;
use crate::io::{AlignedBuf, IoDone, IoError};
use crate::link::SanRequest;
use crate::types::{Lba, LogPos, OpId};
use std::rc::Rc;

/// Where one part of a read comes from.
enum Source {
    Log(LogPos),
    Slot(u32),
    San,
    Zero,
    Memory(Rc<AlignedBuf>, u64),
}

struct Part {
    off: u32,
    n: u32,
    src: Source,
}

impl Engine {
    fn read_op(&mut self, vi: usize, op: OpId) -> &mut ReadOp {
        match self.volumes[vi].ops.get_mut(&op) {
            Some(PendingOp::Read(r)) => r,
            _ => panic!("engine: op {op:?} is not a pending read"),
        }
    }

    /// Cuts a read into parts by where each block's newest data is.
    fn plan_read(&mut self, vi: usize, lba: Lba, blocks: u32) -> Vec<Part> {
        let id = self.volumes[vi].id;
        let mut parts: Vec<Part> = Vec::new();
        for piece in self.volumes[vi].index.lookup(lba, blocks as u64) {
            let off = (piece.lba.0 - lba.0) as u32;
            let n = piece.blocks as u32;
            match piece.dirty {
                Some((_, loc)) => {
                    self.volumes[vi].metrics.read_hits_dirty += n as u64;
                    let src = match loc {
                        DirtyLoc::Log { data_pos } => Source::Log(data_pos),
                        DirtyLoc::Zero { .. } => Source::Zero,
                        DirtyLoc::Memory { buf, first_block } => Source::Memory(buf, first_block),
                    };
                    parts.push(Part { off, n, src });
                }
                None => {
                    for b in 0..n {
                        let key = (id, piece.lba.offset(b as u64));
                        match self.cache.lookup(key) {
                            Some(slot) => {
                                self.volumes[vi].metrics.read_hits_clean += 1;
                                parts.push(Part { off: off + b, n: 1, src: Source::Slot(slot) });
                            }
                            None => {
                                self.volumes[vi].metrics.read_misses += 1;
                                match parts.last_mut() {
                                    Some(p) if matches!(p.src, Source::San) && p.off + p.n == off + b => p.n += 1,
                                    _ => parts.push(Part { off: off + b, n: 1, src: Source::San }),
                                }
                            }
                        }
                    }
                }
            }
        }
        parts
    }

    pub(super) fn start_read(&mut self, vi: usize, token: u64, lba: Lba, blocks: u32, mut buf: AlignedBuf, now: u64) {
        let v = &mut self.volumes[vi];
        if !v.lost.is_empty() && v.lost.overlaps(lba, blocks as u64) {
            // A damaged log lost the newest data of a block here: never older data instead.
            v.metrics.lost_reads += 1;
            return self.complete(vi, token, Status::MediumError, Some(buf), None);
        }
        let op = OpId(self.next_id());
        let parts = self.plan_read(vi, lba, blocks);
        let io_parts = parts.iter().filter(|p| matches!(p.src, Source::Log(_) | Source::Slot(_) | Source::San)).count();
        let whole = parts.len() == 1 && io_parts == 1;
        let flash_only = !parts.iter().any(|p| matches!(p.src, Source::San));
        for p in &parts {
            let range = p.off as usize * BLOCK_SIZE..(p.off + p.n) as usize * BLOCK_SIZE;
            match &p.src {
                Source::Zero => buf[range].fill(0),
                Source::Memory(mem, first) => {
                    let from = *first as usize * BLOCK_SIZE;
                    buf[range.clone()].copy_from_slice(&mem[from..from + range.len()]);
                }
                _ => {}
            }
        }
        let read = ReadOp {
            token,
            lba,
            buf: Some(buf),
            parts_pending: io_parts,
            san_retry: Vec::new(),
            deadline_ns: now + self.cfg.san_timeout_ns,
            failed: None,
            received_ns: now,
            flash_only,
        };
        self.volumes[vi].ops.insert(op, PendingOp::Read(read));
        for p in parts {
            if matches!(p.src, Source::Zero | Source::Memory(..)) {
                continue;
            }
            let target = if whole { self.read_op(vi, op).buf.take() } else { None };
            let target = target.unwrap_or_else(|| self.pool.get(p.n as usize * BLOCK_SIZE));
            match p.src {
                Source::Log(pos) => self.submit_flash_read(vi, op, p.off, p.n, Pin::Log(pos), whole, target),
                Source::Slot(slot) => self.submit_flash_read(vi, op, p.off, p.n, Pin::Slot(slot), whole, target),
                _ => self.submit_san_read(vi, op, p.off, p.n, whole, target),
            }
        }
        self.maybe_finish_read(vi, op, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_flash_read(&mut self, vi: usize, op: OpId, off: u32, n: u32, pin: Pin, whole: bool, target: AlignedBuf) {
        self.pin(pin);
        let offset = match pin {
            Pin::Log(pos) => self.layout.log_offset(pos),
            Pin::Slot(slot) => self.layout.slot_offset(slot),
        };
        let token = self.token(FlashOp::HostRead { vi, op, off, n, pin, whole });
        self.flash.submit_read(token, offset, target);
    }

    fn submit_san_read(&mut self, vi: usize, op: OpId, off: u32, n: u32, whole: bool, target: AlignedBuf) {
        let lba = self.read_op(vi, op).lba;
        let offset = (lba.0 + off as u64) * BLOCK_SIZE_U64;
        self.san_request(vi, SanOp::Read { op, off, n, whole }, SanRequest::Read { offset, buf: target });
    }

    /// Puts a part's data in place (or the whole buffer back).
    fn place_part(&mut self, vi: usize, op: OpId, off: u32, whole: bool, data: AlignedBuf) {
        if whole {
            self.read_op(vi, op).buf = Some(data);
            return;
        }
        let r = self.read_op(vi, op);
        if let Some(buf) = r.buf.as_mut() {
            let o = off as usize * BLOCK_SIZE;
            buf[o..o + data.len()].copy_from_slice(&data);
        }
        self.pool.put(data);
    }

    pub(super) fn maybe_finish_read(&mut self, vi: usize, op: OpId, now: u64) {
        let finished = match self.volumes[vi].ops.get(&op) {
            Some(PendingOp::Read(r)) => r.parts_pending == 0 && r.san_retry.is_empty(),
            _ => false,
        };
        if !finished {
            return;
        }
        let Some(PendingOp::Read(r)) = self.volumes[vi].ops.remove(&op) else { unreachable!() };
        if r.failed.is_none() && r.flash_only {
            self.observe_latency(now.saturating_sub(r.received_ns));
        }
        self.complete(vi, r.token, r.failed.unwrap_or(Status::Ok), r.buf, None);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn host_read_done(
        &mut self,
        vi: usize,
        op: OpId,
        off: u32,
        n: u32,
        pin: Pin,
        whole: bool,
        done: IoDone,
        now: u64,
    ) {
        self.unpin(pin);
        let data = done.buf.expect("engine: read completion without its buffer");
        match done.result {
            Ok(()) => {
                self.place_part(vi, op, off, whole, data);
                self.read_op(vi, op).parts_pending -= 1;
                self.maybe_finish_read(vi, op, now);
            }
            Err(_) if matches!(pin, Pin::Slot(_)) => {
                // A clean copy is only a copy: read the SAN instead.
                self.submit_san_read(vi, op, off, n, whole, data);
            }
            Err(e) if now < self.read_op(vi, op).deadline_ns => {
                // Dirty data exists only here: retry (at a pace) until the read's deadline, or
                // until the blocks are no longer dirty here (their data is on the SAN then:
                // another node destaged it, `absorb_rescue`).
                if self.read_fail_logged_ns.is_none_or(|t| now >= t + FLASH_READ_FAIL_LOG_NS) {
                    self.read_fail_logged_ns = Some(now);
                    tracing::warn!(volume = self.volumes[vi].id.0, error = %e, "flash read of dirty data failed; retrying");
                }
                self.pin(pin);
                self.read_retries.push(ReadRetry {
                    vi,
                    op,
                    off,
                    n,
                    pin,
                    whole,
                    buf: data,
                    due_ns: now + FLASH_READ_RETRY_NS,
                });
            }
            Err(e) => {
                tracing::error!(volume = self.volumes[vi].id.0, error = %e, "flash read of dirty data failed");
                if whole {
                    self.read_op(vi, op).buf = Some(data);
                } else {
                    self.pool.put(data);
                }
                let r = self.read_op(vi, op);
                r.failed = Some(Status::MediumError);
                r.parts_pending -= 1;
                self.maybe_finish_read(vi, op, now);
            }
        }
    }

    /// Host reads of dirty data whose flash read failed and whose retry is due: from flash
    /// again, or from the SAN if their blocks are no longer dirty here.
    pub(super) fn poll_flash_read_retries(&mut self, now: u64) -> usize {
        if self.read_retries.iter().all(|r| r.due_ns > now) {
            return 0;
        }
        let (due, wait): (Vec<ReadRetry>, Vec<ReadRetry>) =
            std::mem::take(&mut self.read_retries).into_iter().partition(|r| r.due_ns <= now);
        self.read_retries = wait;
        let n = due.len();
        for r in due {
            self.unpin(r.pin);
            let lba = self.read_op(r.vi, r.op).lba;
            if self.volumes[r.vi].index.overlaps(Lba(lba.0 + r.off as u64), r.n as u64) {
                self.submit_flash_read(r.vi, r.op, r.off, r.n, r.pin, r.whole, r.buf);
            } else {
                self.submit_san_read(r.vi, r.op, r.off, r.n, r.whole, r.buf);
            }
        }
        n
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn san_read_done(
        &mut self,
        vi: usize,
        op: OpId,
        off: u32,
        n: u32,
        whole: bool,
        result: Result<(), IoError>,
        buf: Option<AlignedBuf>,
        now: u64,
    ) {
        let data = buf.unwrap_or_else(|| self.pool.get(n as usize * BLOCK_SIZE));
        match result {
            Ok(()) => {
                let lba = self.read_op(vi, op).lba.offset(off as u64);
                self.fill_cache(vi, lba, &data);
                self.place_part(vi, op, off, whole, data);
                self.read_op(vi, op).parts_pending -= 1;
            }
            Err(_) => {
                if whole {
                    self.read_op(vi, op).buf = Some(data);
                } else {
                    self.pool.put(data);
                }
                let r = self.read_op(vi, op);
                r.parts_pending -= 1;
                if r.failed.is_none() {
                    r.san_retry.push((off, n, whole));
                    if !self.volumes[vi].read_retries.contains(&op) {
                        self.volumes[vi].read_retries.push(op);
                    }
                }
            }
        }
        self.maybe_finish_read(vi, op, now);
    }

    pub(super) fn poll_read_retries(&mut self, vi: usize, now: u64) -> usize {
        if self.volumes[vi].read_retries.is_empty() {
            return 0;
        }
        let mut work = 0;
        for op in std::mem::take(&mut self.volumes[vi].read_retries) {
            let may_try = self.volumes[vi].san_health.may_try(now);
            let r = self.read_op(vi, op);
            if now >= r.deadline_ns {
                // Parts still in flight finish normally; the read then reports Busy.
                r.failed = Some(Status::Busy);
                r.san_retry.clear();
                self.maybe_finish_read(vi, op, now);
                work += 1;
            } else if may_try {
                let parts = std::mem::take(&mut r.san_retry);
                r.parts_pending += parts.len();
                for (off, n, whole) in parts {
                    let target = if whole { self.read_op(vi, op).buf.take() } else { None };
                    let target = target.unwrap_or_else(|| self.pool.get(n as usize * BLOCK_SIZE));
                    self.submit_san_read(vi, op, off, n, whole, target);
                }
                work += 1;
            } else {
                self.volumes[vi].read_retries.push(op);
            }
        }
        work
    }

    /// Inserts clean copies of blocks just read from (or written to) the SAN.
    pub(super) fn fill_cache(&mut self, vi: usize, lba: Lba, data: &[u8]) {
        if self.degraded.is_some() || !self.volumes[vi].read_cache {
            return;
        }
        let id = self.volumes[vi].id;
        for (i, block) in data.chunks(BLOCK_SIZE).enumerate() {
            let key = (id, lba.offset(i as u64));
            if self.volumes[vi].index.get(key.1).is_some() {
                continue;
            }
            if let Some(slot) = self.cache.begin_fill(key) {
                let mut copy = self.pool.get(BLOCK_SIZE);
                copy.copy_from_slice(block);
                let token = self.token(FlashOp::CacheFill { key, slot });
                self.flash.submit_write(token, self.layout.slot_offset(slot), copy, Vec::new(), false);
            }
        }
    }
}

/// A host read's part whose flash read of dirty data failed, to try again at `due_ns`.
pub(crate) struct ReadRetry {
    vi: usize,
    op: OpId,
    off: u32,
    n: u32,
    pin: Pin,
    whole: bool,
    buf: AlignedBuf,
    due_ns: u64,
}
