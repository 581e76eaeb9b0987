//! Writes: the write-back path (queue → frame → log → acknowledgement in log order), the
//! write-through path and its gate (invariant 2), the full log, and what a failed log write
//! turns into.
//!
//! Write-through: a write waits while any of its blocks is dirty (until the *persisted*
//! watermark covers them), then goes to the SAN through the destager. The destager can then
//! never put older data over it, not even by replaying the log after a crash.
//!
//! Full log: a write whose blocks are clean goes write-through at once (so a full log costs
//! write-through speed, never less). One over dirty blocks *supersedes* them: it goes to the
//! SAN at once, with FUA, and once it is there a data-less `SanWritten` entry in the log says
//! that its blocks' older entries are void; it is acknowledged with that entry. The log keeps
//! a reserve (`LOG_RECORD_RESERVE_BYTES`) that only frames of such entries may use, so such an
//! entry does not wait for destage to free space. The destager writes no older data of its
//! blocks over it (`destage/supersede.rs`). A write may supersede only when nothing older of
//! its blocks is still on its way into the log (earlier queued writes, unacknowledged
//! frames), no other superseding write of its blocks is under way, the flash device is not
//! degraded, and the volume has no replicas, no dirty Write Zeroes or Deallocate of its blocks
//! and a reachable SAN; otherwise it waits for log space up to `log_full_wait_ns`, then goes
//! write-through behind the gate. Writes of its blocks queued after it, or arriving while it
//! is at the SAN, wait until its entry is queued (so they are logged after it). Its entry
//! waits at most `san_timeout_ns` for room in the reserve; past it the write ends Busy.

use std::rc::Rc;

use super::appender::{FrameState, Queued};
use super::volume::{DirtyMeta, PendingOp, SanOp, WriteOp, WriteState};
use super::{Engine, EngineEvent, FlashOp, Status};
use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::index::DirtyLoc;
use crate::io::{AlignedBuf, IoDone, IoError};
use crate::link::{DirtyRecord, SanRequest, ToDestage};
use crate::log::{EntryKind, FrameHeader, FrameStamp};
use crate::policy::WritePolicy;
use crate::types::{IoToken, Lba, LogPos, LogSeq, OpId};

impl Engine {
    pub(super) fn write_op(&mut self, vi: usize, op: OpId) -> &mut WriteOp {
        match self.volumes[vi].ops.get_mut(&op) {
            Some(PendingOp::Write(w)) => w,
            _ => panic!("engine: op {op:?} is not a pending write"),
        }
    }

    pub(super) fn set_write_state(&mut self, vi: usize, op: OpId, to: WriteState) {
        let w = self.write_op(vi, op);
        let from = w.state;
        w.state = to;
        self.volumes[vi].enter(op, from, to);
    }

    /// A host request for the SAN, sent through the destager.
    pub(super) fn san_request(&mut self, vi: usize, op: SanOp, req: SanRequest) -> IoToken {
        // Dirty records gathered so far go first: the destager sees the log in order.
        self.flush_dirty_out();
        let token = IoToken(self.next_id());
        self.volumes[vi].san_ops.insert(token, op);
        self.outbox.push(ToDestage::San { volume: self.volumes[vi].id, token, op: req });
        token
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_write(
        &mut self,
        vi: usize,
        token: u64,
        kind: EntryKind,
        lba: Lba,
        blocks: u64,
        buf: Option<AlignedBuf>,
        fua: bool,
        now: u64,
    ) {
        let id = self.volumes[vi].id;
        self.cache.invalidate_range(id, lba, blocks);
        let op = OpId(self.next_id());
        let w = WriteOp { token, kind, lba, blocks, buf, fua, state: WriteState::Received, supersede: None };
        self.volumes[vi].ops.insert(op, PendingOp::Write(w));
        self.volumes[vi].enter(op, WriteState::Received, WriteState::Received);
        if self.effective(vi).0 == WritePolicy::WriteThrough {
            return self.start_write_through(vi, op, now);
        }
        let buf = self.write_op(vi, op).buf.take();
        self.set_write_state(vi, op, WriteState::Queued { since_ns: now });
        let q = Queued { vi, op: Some(op), kind, lba, blocks, buf, since_ns: now, waited: false, preset: None };
        if self.superseding_at_san(vi, lba, blocks) {
            self.volumes[vi].held_writes.push_back(q);
        } else {
            self.log.queue.push_back(q);
        }
    }

    /// Whether a superseding write of any of these blocks is at the SAN.
    fn superseding_at_san(&self, vi: usize, lba: Lba, blocks: u64) -> bool {
        let v = &self.volumes[vi];
        v.supersedes.iter().any(|op| {
            matches!(v.ops.get(op), Some(PendingOp::Write(w))
                if matches!(w.state, WriteState::SanWriting { .. }) && w.lba.overlaps(w.blocks, lba, blocks))
        })
    }

    /// Whether a full log's write over dirty blocks may supersede them now (see "Full log"),
    /// given that no write of its blocks is queued before it (those are older). `i`: its place
    /// in the log queue.
    fn may_supersede(&self, i: usize) -> bool {
        let q = &self.log.queue[i];
        let (vi, lba, blocks) = (q.vi, q.lba, q.blocks);
        let v = &self.volumes[vi];
        if q.kind != EntryKind::Write
            || self.degraded.is_some()
            || v.copies > 0
            || !v.links.is_empty()
            || v.is_copy()
            || v.zeroes_dirty(lba, blocks)
            || !v.san_health.reachable
        {
            return false;
        }
        let unsettled = v.ops.values().any(|op| match op {
            PendingOp::Write(w) if w.lba.overlaps(w.blocks, lba, blocks) => {
                w.supersede.is_some()
                    || matches!(
                        w.state,
                        WriteState::Logging { .. }
                            | WriteState::Logged { .. }
                            | WriteState::Replicating { .. }
                            | WriteState::Abandoned { .. }
                    )
            }
            _ => false,
        });
        !unsettled
    }

    /// Sends a full log's write over dirty blocks to the SAN at once (see "Full log").
    fn start_supersede(&mut self, vi: usize, op: OpId, now: u64) {
        self.volumes[vi].metrics.log_full_supersedes += 1;
        let before = self.volumes[vi].next_seq;
        self.write_op(vi, op).supersede = Some(before);
        self.volumes[vi].supersedes.push(op);
        let deadline_ns = now + self.cfg.san_timeout_ns;
        self.set_write_state(vi, op, WriteState::SanWriting { deadline_ns, retry: false });
        self.submit_san_write(vi, op);
    }

    /// A superseding write's SAN write succeeded: its `SanWritten` entry goes into the log
    /// (acknowledged with it, `advance_acks`), and the writes held behind it follow it.
    fn supersede_on_san(&mut self, vi: usize, op: OpId, buf: Option<AlignedBuf>, now: u64) {
        let w = self.write_op(vi, op);
        w.buf = buf;
        let (lba, blocks) = (w.lba, w.blocks);
        self.set_write_state(vi, op, WriteState::Queued { since_ns: now });
        let kind = EntryKind::SanWritten;
        let q = Queued { vi, op: Some(op), kind, lba, blocks, buf: None, since_ns: now, waited: false, preset: None };
        self.log.queue.push_back(q);
        self.release_held_writes(vi);
    }

    /// Writes held behind a superseding write at the SAN go into the log queue, in order,
    /// unless another one still holds them.
    pub(super) fn release_held_writes(&mut self, vi: usize) {
        for q in std::mem::take(&mut self.volumes[vi].held_writes) {
            if self.superseding_at_san(vi, q.lba, q.blocks) {
                self.volumes[vi].held_writes.push_back(q);
            } else {
                self.log.queue.push_back(q);
            }
        }
    }

    /// Moves the volume's writes of these blocks queued from `from` on into `held_writes`, in
    /// order (they came after a write that now supersedes the blocks).
    fn hold_behind(&mut self, vi: usize, from: usize, lba: Lba, blocks: u64) {
        let mut i = from;
        while i < self.log.queue.len() {
            let q = &self.log.queue[i];
            let held = q.vi == vi
                && q.op.is_some()
                && q.kind != EntryKind::SanWritten
                && q.lba.overlaps(q.blocks, lba, blocks);
            match held.then(|| self.log.queue.remove(i)).flatten() {
                Some(q) => self.volumes[vi].held_writes.push_back(q),
                None => i += 1,
            }
        }
    }

    /// A superseding write whose entry found no room in the log's reserve for
    /// `san_timeout_ns` (destage freed nothing meanwhile): it ends Busy, so the host's
    /// command is answered in bounded time. Its data may stay on the SAN: older entries of its
    /// blocks are excluded from destage already, and it counts as a write that may or may not
    /// have landed.
    fn supersede_gives_up(&mut self, i: usize) -> usize {
        let Some(q) = self.log.queue.remove(i) else { return 0 };
        let Some(op) = q.op else { return 0 };
        self.supersede_ended(q.vi, op);
        let Some(PendingOp::Write(w)) = self.volumes[q.vi].ops.remove(&op) else {
            panic!("engine: a SanWritten entry without its write")
        };
        self.complete(q.vi, w.token, Status::Busy, w.buf, None);
        1
    }

    /// A superseding write is acknowledged or given up: it no longer holds its blocks.
    fn supersede_ended(&mut self, vi: usize, op: OpId) {
        self.volumes[vi].supersedes.retain(|&o| o != op);
        self.release_held_writes(vi);
    }

    /// Queued writes that may not wait for the log: the volume went write-through, or the log
    /// is full and they are clean (or waited long enough).
    pub(super) fn poll_queue(&mut self, now: u64) -> usize {
        let mut work = 0;
        let full = self.log.log_full;
        let mut i = 0;
        while i < self.log.queue.len() {
            let q = &self.log.queue[i];
            let vi = q.vi;
            if q.op.is_none() {
                // A replica copy's entry has no SAN to go to: it waits for log space.
                i += 1;
                continue;
            }
            if q.kind == EntryKind::SanWritten {
                // A superseding write's entry: its data is on the SAN already.
                if self.degraded.is_some() {
                    work += self.supersede_without_log(i);
                } else if now >= q.since_ns + self.cfg.san_timeout_ns {
                    work += self.supersede_gives_up(i);
                } else {
                    i += 1;
                }
                continue;
            }
            let write_through = self.effective(vi).0 == WritePolicy::WriteThrough;
            let reroute = if write_through {
                true
            } else if !full {
                false
            } else if now >= q.since_ns + self.cfg.log_full_wait_ns {
                self.volumes[vi].metrics.log_full_fallthroughs += 1;
                true
            } else {
                let (lba, blocks) = (q.lba, q.blocks);
                let v = &self.volumes[vi];
                let superseded = v.superseded.overlaps(lba, blocks) && !self.cfg.bugs.superseded_not_gated;
                let earlier =
                    self.log.queue.iter().take(i).any(|e| e.vi == vi && e.lba.overlaps(e.blocks, lba, blocks));
                let clean = !v.index.overlaps(lba, blocks) && !superseded && !earlier;
                if clean {
                    self.volumes[vi].metrics.log_full_fallthroughs += 1;
                } else if !earlier && self.may_supersede(i) {
                    let Some(q) = self.log.queue.remove(i) else { break };
                    let Some(op) = q.op else { unreachable!("engine: a copy's entry superseding") };
                    self.write_op(vi, op).buf = q.buf;
                    self.start_supersede(vi, op, now);
                    // Writes of its blocks queued after it are newer: they wait until its entry
                    // is queued, so that they are logged after it (found by review).
                    self.hold_behind(vi, i, lba, blocks);
                    work += 1;
                    continue;
                } else if !self.log.queue[i].waited {
                    self.log.queue[i].waited = true;
                    self.volumes[vi].metrics.log_full_waits += 1;
                }
                clean
            };
            if !reroute {
                i += 1;
                continue;
            }
            let Some(q) = self.log.queue.remove(i) else { break };
            let Some(op) = q.op else { unreachable!("engine: a copy's entry rerouted") };
            self.write_op(vi, op).buf = q.buf;
            self.start_write_through(vi, op, now);
            work += 1;
        }
        work
    }

    /// A superseding write whose entry cannot be logged (the flash log is degraded): it is
    /// acknowledged once the persisted watermark covers every older entry of its blocks. The
    /// destager never writes those over it (it excluded them when the SAN write succeeded),
    /// and until then a crash may replay them over it, which is allowed: it was not
    /// acknowledged.
    fn supersede_without_log(&mut self, i: usize) -> usize {
        let Some(q) = self.log.queue.remove(i) else { return 0 };
        let Some(op) = q.op else { return 0 };
        let vi = q.vi;
        let Some(before) = self.write_op(vi, op).supersede else {
            panic!("engine: a SanWritten entry of a write that did not supersede")
        };
        let seq = LogSeq(before.0.saturating_sub(1));
        self.set_write_state(vi, op, WriteState::Abandoned { seq });
        self.supersede_ended(vi, op);
        self.ack_on_persist(vi, seq, op);
        1
    }

    fn log_fua(&self) -> bool {
        self.info.volatile_cache && !self.cfg.bugs.no_fua_on_volatile_flash
    }

    /// Cuts as many frames as may be in flight and writes them: header block + host buffers.
    pub(super) fn cut_frames(&mut self, now: u64) -> usize {
        if self.degraded.is_some() {
            return 0;
        }
        let mut work = 0;
        loop {
            let floor = self.reclaim_floor();
            let volumes = &mut self.volumes;
            let writes = self.log.cut(floor, |vi| {
                let v = &mut volumes[vi];
                let seq = v.next_seq;
                v.next_seq = seq.next();
                (v.id, v.epoch, seq)
            });
            if writes.is_empty() {
                return work;
            }
            let fua = self.log_fua();
            for w in writes {
                let mut header = self.pool.get(BLOCK_SIZE);
                let stamp = FrameStamp::new(self.cfg.device_id, self.log.incarnation, w.acked_upto);
                FrameHeader::encode(w.kind, stamp, w.pos, &w.entries, &mut header);
                // Replicas get the frame's entries from the same buffers, at the same moment.
                self.replicate_frame(&w.entries, &w.bufs);
                let token = self.token(FlashOp::Frame { pos: w.pos, submitted_ns: now });
                let offset = self.layout.log_offset(w.pos);
                self.flash.submit_write(token, offset, header, w.bufs, fua);
                work += 1;
            }
            let Some(frame) = self.log.frames.back() else { return work };
            let pos = frame.pos;
            let ops: Vec<(usize, OpId)> = frame.entries.iter().filter_map(|e| Some((e.vi, e.op?))).collect();
            for (vi, op) in ops {
                self.set_write_state(vi, op, WriteState::Logging { frame: pos });
            }
        }
    }

    /// A frame's write came back.
    pub(super) fn frame_written(&mut self, pos: LogPos, submitted_ns: u64, done: IoDone, now: u64) {
        self.pool.put_opt(done.buf);
        let ok = done.result.is_ok();
        let failed_first = self.log.written(pos, ok, done.gather);
        if ok {
            self.observe_latency(now.saturating_sub(submitted_ns));
            let i = self.log.frames.partition_point(|f| f.pos < pos);
            if self.log.frames[i].state == FrameState::Written {
                let logged: Vec<(usize, OpId, crate::types::LogSeq)> =
                    self.log.frames[i].entries.iter().filter_map(|e| Some((e.vi, e.op?, e.header.seq))).collect();
                for (vi, op, seq) in logged {
                    self.set_write_state(vi, op, WriteState::Logged { seq });
                }
            }
        } else {
            tracing::warn!(pos = pos.0, "flash log write failed; device degraded to write-through");
            self.enter_degraded(now);
            if failed_first {
                self.log.abandon_unacked();
            }
        }
    }

    /// Acknowledges written frames in log order and hands abandoned ones to the destager.
    pub(super) fn advance_acks(&mut self, now: u64) -> usize {
        let _ = now;
        let mut work = 0;
        while let Some(f) = self.log.ackable() {
            let state = f.state;
            let mut bufs = std::mem::take(&mut f.bufs).into_iter();
            let entries: Vec<_> = f.entries.iter_mut().map(|e| (e.vi, e.op.take(), e.header, e.data_pos)).collect();
            self.log.advance();
            for (vi, op, h, data_pos) in entries {
                let buf = if h.kind.has_data() { bufs.next() } else { None };
                let abandoned = state == FrameState::Abandoned;
                let (loc, memory, buf) = match h.kind {
                    EntryKind::Write if abandoned => {
                        let Some(data) = buf else { panic!("engine: abandoned write without its data") };
                        // The destager gets a copy; the index keeps the original for reads.
                        let mut copy = self.pool.get(data.len());
                        copy.copy_from_slice(&data);
                        (DirtyLoc::Memory { buf: Rc::new(data), first_block: 0 }, Some(copy), None)
                    }
                    EntryKind::Write => (DirtyLoc::Log { data_pos }, None, buf),
                    k => (DirtyLoc::Zero { unmap: k == EntryKind::Unmap }, None, None),
                };
                let v = &mut self.volumes[vi];
                v.push_dirty(DirtyMeta::of(&h));
                if v.is_copy() {
                    // A replica copy's entry: durable here; its buffer goes back to the pool.
                    // (One of a copy being rescued arrived before its source's link was dropped
                    // and was never acknowledged: it is not destaged, see `rescue_copy`.)
                    if !abandoned {
                        self.copy_durable(vi, h.seq);
                    }
                    self.pool.put_opt(buf);
                    self.pool.put_opt(memory);
                    continue;
                }
                if h.kind == EntryKind::SanWritten {
                    // Older entries of its blocks are void; abandoned, the watermark voids them.
                    if !abandoned {
                        v.supersede(h.lba, h.blocks as u64, h.seq);
                    }
                } else {
                    v.index.insert(h.lba, h.blocks as u64, h.seq, loc);
                }
                if v.unlose(h.lba, h.blocks as u64) {
                    self.sb.want();
                }
                self.dirty_out[vi].push(DirtyRecord {
                    seq: h.seq,
                    kind: h.kind,
                    lba: h.lba,
                    blocks: h.blocks as u64,
                    data_pos,
                    data_crc: h.data_crc,
                    memory,
                });
                let Some(op) = op else { continue };
                if h.kind == EntryKind::SanWritten {
                    self.supersede_ended(vi, op);
                    // A volume that gained replicas since it started superseding: they may
                    // lack its entry, so it waits until the SAN holds its blocks for good.
                    if abandoned || self.volumes[vi].copies > 0 {
                        self.set_write_state(vi, op, WriteState::Abandoned { seq: h.seq });
                        self.ack_on_persist(vi, h.seq, op);
                        continue;
                    }
                    let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                        panic!("engine: superseding write without its op")
                    };
                    self.volumes[vi].enter(op, w.state, WriteState::Acked);
                    if let Some(data) = w.buf.as_ref() {
                        self.fill_cache(vi, w.lba, data);
                    }
                    // Acknowledged as a write-through write: the SAN holds it (with FUA).
                    self.ack_write(vi, w.token, w.buf, None);
                    continue;
                }
                if abandoned {
                    // Acknowledged once the persisted watermark covers it: until then a crash
                    // would replay older entries of its blocks and nothing would put it back.
                    self.set_write_state(vi, op, WriteState::Abandoned { seq: h.seq });
                    self.ack_on_persist(vi, h.seq, op);
                } else {
                    let Some(buf) = self.replicated_ack(vi, op, h.seq, buf) else { continue };
                    let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                        panic!("engine: logged write without its op")
                    };
                    self.volumes[vi].enter(op, w.state, WriteState::Acked);
                    self.ack_write(vi, w.token, buf, Some(h.seq));
                }
            }
            work += 1;
        }
        work
    }

    pub(super) fn start_write_through(&mut self, vi: usize, op: OpId, now: u64) {
        let deadline_ns = now + self.cfg.gate_timeout_ns;
        self.set_write_state(vi, op, WriteState::Gated { deadline_ns });
        let (lba, blocks) = {
            let w = self.write_op(vi, op);
            (w.lba, w.blocks)
        };
        if self.volumes[vi].index.overlaps(lba, blocks) {
            self.volumes[vi].metrics.gated_writes += 1;
        }
        self.volumes[vi].gated.push_back(op);
        self.poll_gated(vi, now);
    }

    /// Releases write-through writes whose blocks are clean (invariant 2).
    pub(super) fn poll_gated(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.volumes[vi].gated.len() {
            let op = self.volumes[vi].gated[i];
            let (lba, blocks, state) = {
                let w = self.write_op(vi, op);
                (w.lba, w.blocks, w.state)
            };
            let WriteState::Gated { deadline_ns } = state else { panic!("engine: gated write in state {state:?}") };
            // Destaged blocks a replica may not know are destaged count as dirty too: its copy
            // destaged later must not put older data over this write.
            // So do all blocks while an attached replica may still hold entries this node never
            // logged (numbers its watermark jumped over): their blocks are unknown.
            let voided = self.volumes[vi].void_upto > self.replicas_watermark(vi);
            let v = &self.volumes[vi];
            let unpublished = (v.unpublished.overlaps(lba, blocks) || voided) && !self.cfg.bugs.skip_replica_gate;
            let superseded = v.superseded.overlaps(lba, blocks) && !self.cfg.bugs.superseded_not_gated;
            let dirty =
                (v.index.overlaps(lba, blocks) || superseded || unpublished) && !self.cfg.bugs.skip_write_through_gate;
            if !dirty {
                self.volumes[vi].gated.remove(i);
                let deadline_ns = now + self.cfg.san_timeout_ns;
                self.set_write_state(vi, op, WriteState::SanWriting { deadline_ns, retry: false });
                self.submit_san_write(vi, op);
                work += 1;
            } else if now >= deadline_ns {
                self.volumes[vi].gated.remove(i);
                let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else { unreachable!() };
                self.complete(vi, w.token, Status::Busy, w.buf, None);
                work += 1;
            } else {
                i += 1;
            }
        }
        work
    }

    fn submit_san_write(&mut self, vi: usize, op: OpId) {
        let (kind, lba, blocks, buf, fua, supersede) = {
            let w = self.write_op(vi, op);
            (w.kind, w.lba, w.blocks, w.buf.take(), w.fua, w.supersede)
        };
        // A superseding write voids older entries: the SAN must not lose it.
        let fua = fua || supersede.is_some();
        let supersede = supersede.filter(|_| !self.cfg.bugs.supersede_unfenced);
        let offset = lba.0 * BLOCK_SIZE_U64;
        let len = blocks * BLOCK_SIZE_U64;
        let req = match (kind, buf) {
            (EntryKind::Write, Some(buf)) => SanRequest::Write { offset, buf, fua, supersede },
            (EntryKind::Write, None) => panic!("engine: write-through write without its data"),
            (EntryKind::Zeroes, _) => SanRequest::WriteZeroes { offset, len },
            (EntryKind::Unmap, _) => SanRequest::Unmap { offset, len },
            (EntryKind::SanWritten, _) => panic!("engine: a SanWritten entry sent to the SAN"),
        };
        self.san_request(vi, SanOp::Write { op }, req);
    }

    /// A host SAN request came back from the destager.
    pub(super) fn on_san_done(
        &mut self,
        vi: usize,
        token: IoToken,
        result: Result<(), IoError>,
        buf: Option<AlignedBuf>,
        now: u64,
    ) {
        let Some(op) = self.volumes[vi].san_ops.remove(&token) else {
            tracing::warn!(volume = self.volumes[vi].id.0, "SAN completion for an unknown request");
            self.pool.put_opt(buf);
            return;
        };
        let id = self.volumes[vi].id;
        match &result {
            Ok(()) => {
                if !self.volumes[vi].san_health.reachable {
                    self.events.push(EngineEvent::SanReachable { volume: id });
                    tracing::info!(volume = id.0, "SAN reachable again");
                }
                self.volumes[vi].san_health.succeeded();
            }
            Err(e) => {
                if self.volumes[vi].san_health.reachable {
                    self.events.push(EngineEvent::SanUnreachable { volume: id });
                    tracing::warn!(volume = id.0, error = %e, "SAN error; retrying with back-off");
                }
                self.volumes[vi].san_health.failed(now);
            }
        }
        match op {
            SanOp::Write { op } => match result {
                Ok(()) if self.write_op(vi, op).supersede.is_some() => self.supersede_on_san(vi, op, buf, now),
                Ok(()) => {
                    let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                        panic!("engine: SAN write without its op")
                    };
                    self.volumes[vi].enter(op, w.state, WriteState::Acked);
                    if self.volumes[vi].unlose(w.lba, w.blocks) {
                        self.sb.want();
                    }
                    if self.cfg.bugs.skip_write_through_gate {
                        self.volumes[vi].index.remove_range(w.lba, w.blocks);
                    }
                    if !w.fua {
                        self.volumes[vi].wt_acks += 1;
                    }
                    if let Some(data) = buf.as_ref() {
                        self.fill_cache(vi, w.lba, data);
                    }
                    self.ack_write(vi, w.token, buf, None);
                }
                Err(_) => {
                    let w = self.write_op(vi, op);
                    w.buf = buf;
                    let WriteState::SanWriting { deadline_ns, .. } = w.state else {
                        panic!("engine: SAN write in {:?}", w.state)
                    };
                    w.state = WriteState::SanWriting { deadline_ns, retry: true };
                    self.volumes[vi].san_retries.push(op);
                }
            },
            SanOp::Read { op, off, n, whole } => self.san_read_done(vi, op, off, n, whole, result, buf, now),
            SanOp::Flush { covers } => {
                self.pool.put_opt(buf);
                let v = &mut self.volumes[vi];
                v.host_san_flush_in_flight = false;
                if result.is_ok() {
                    v.san_flushed_upto = v.san_flushed_upto.max(covers);
                }
            }
        }
    }

    pub(super) fn poll_retries(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        if !self.volumes[vi].san_retries.is_empty() {
            for op in std::mem::take(&mut self.volumes[vi].san_retries) {
                let WriteState::SanWriting { deadline_ns, .. } = self.write_op(vi, op).state else {
                    panic!("engine: SAN retry of a write not at the SAN")
                };
                if now >= deadline_ns {
                    // The SAN may or may not hold the data: not acknowledged, host retries.
                    if self.write_op(vi, op).supersede.is_some() {
                        self.supersede_ended(vi, op);
                    }
                    let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else { unreachable!() };
                    self.complete(vi, w.token, Status::Busy, w.buf, None);
                    work += 1;
                } else if self.volumes[vi].san_health.may_try(now) {
                    self.write_op(vi, op).state = WriteState::SanWriting { deadline_ns, retry: false };
                    self.submit_san_write(vi, op);
                    work += 1;
                } else {
                    self.volumes[vi].san_retries.push(op);
                }
            }
        }
        work += self.poll_read_retries(vi, now);
        work
    }
}
