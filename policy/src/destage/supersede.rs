//! Superseding writes: with the log full, a host write over dirty blocks goes to the SAN at
//! once, with FUA, instead of waiting for log space (`engine/write.rs`, "Full log"). Once it
//! succeeds, the engine logs a data-less `SanWritten` entry for its blocks and acknowledges it;
//! every older entry of those blocks is void. Here, the destager makes sure that no older data
//! of those blocks lands on the SAN after it:
//! 1. it is *held* while a destage write over its blocks is in flight (the SAN may complete two
//!    overlapping writes in either order); destage writes over its blocks wait meanwhile, so it
//!    is not held for ever;
//! 2. while it is at the SAN, destage writes over its blocks are *fenced*: they wait;
//! 3. when it succeeds, batches planned from then on leave out its blocks' entries below its
//!    `before` (an *exclusion*), and the runs of batches already planned that write over its
//!    blocks get its data laid over theirs when they are sent (an *overlay*), so they write it
//!    again instead of older data. When it fails, the fenced runs go out unchanged: the older
//!    entries are still the blocks' newest acknowledged data.
//!
//! Every entry of its blocks below `before` is older than it, and every entry of them at or
//! above `before` newer: the engine lets it start only once every older write of its blocks
//! was acknowledged (so their dirty records reached the destager first), and keeps the writes
//! of its blocks queued after it, or arriving while it is at the SAN, out of the log until its
//! entry is queued. The engine also starts none while a Write Zeroes or Deallocate entry of its
//! blocks is dirty: their runs carry no data to lay it over.
//!
//! After a crash, the `SanWritten` entries found by replay do the exclusions' work: each one
//! excludes its blocks' older entries when its dirty record arrives, and replay sends every
//! dirty record before the first batch is planned.

use std::collections::VecDeque;

use crate::constants::{BLOCK_SIZE, BLOCK_SIZE_U64};
use crate::io::AlignedBuf;
use crate::types::{IoToken, Lba, LogSeq};

use super::batch::{Run, RunKind};
use super::{Destager, Op, VolumeDestager};

/// Blocks no batch planned from now on writes from entries below `before`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Exclusion {
    pub lba: Lba,
    pub blocks: u64,
    pub before: LogSeq,
}

/// A superseding write waiting for destage writes over its blocks to complete.
pub(super) struct Held {
    token: IoToken,
    lba: Lba,
    blocks: u64,
    buf: AlignedBuf,
    fua: bool,
    before: LogSeq,
}

/// A superseding write at the SAN (carried by its `Op::Host`).
#[derive(Clone, Copy, Debug)]
pub(super) struct Superseding {
    pub lba: Lba,
    pub blocks: u64,
    pub before: LogSeq,
}

/// A succeeded superseding write's data, laid over the runs of batches up to `batch_max`.
struct Overlay {
    lba: Lba,
    blocks: u64,
    data: AlignedBuf,
    batch_max: u64,
}

#[derive(Default)]
pub(super) struct Supersedes {
    held: VecDeque<Held>,
    in_flight: Vec<Superseding>,
    overlays: Vec<Overlay>,
    pub exclusions: Vec<Exclusion>,
}

impl Supersedes {
    /// Whether a destage run must wait: a superseding write over its blocks is held or at the
    /// SAN.
    pub fn fences(&self, run: &Run) -> bool {
        self.in_flight.iter().any(|s| run.overlaps(s.lba, s.blocks))
            || self.held.iter().any(|h| run.overlaps(h.lba, h.blocks))
    }

    pub fn is_idle(&self) -> bool {
        self.held.is_empty() && self.in_flight.is_empty()
    }

    /// Lays the data of succeeded superseding writes over a run of batch `batch` about to be
    /// sent, oldest first.
    pub fn lay_over(&self, batch: u64, run: &Run, buf: &mut [u8]) {
        for o in self.overlays.iter().filter(|o| o.batch_max >= batch && run.overlaps(o.lba, o.blocks)) {
            let from = o.lba.0.max(run.lba.0);
            let to = (o.lba.0 + o.blocks).min(run.lba.0 + run.blocks);
            let src = ((from - o.lba.0) as usize * BLOCK_SIZE, (to - o.lba.0) as usize * BLOCK_SIZE);
            let dst = (from - run.lba.0) as usize * BLOCK_SIZE;
            buf[dst..dst + src.1 - src.0].copy_from_slice(&o.data[src.0..src.1]);
        }
    }

    /// Exclusions every entry below whose `before` is now in a planned batch (`upto` and
    /// earlier) are no longer needed.
    pub fn planned(&mut self, upto: LogSeq) {
        self.exclusions.retain(|e| e.before.0 > upto.0 + 1);
    }
}

impl Destager {
    /// A superseding host write arrived: held until no destage write over its blocks is in
    /// flight, then sent.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn supersede(
        &mut self,
        vi: usize,
        token: IoToken,
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
        before: LogSeq,
        now: u64,
    ) {
        let lba = Lba(offset / BLOCK_SIZE_U64);
        let blocks = buf.len() as u64 / BLOCK_SIZE_U64;
        self.volumes[vi].sup.held.push_back(Held { token, lba, blocks, buf, fua, before });
        self.send_supersedes(vi, now);
    }

    /// Sends the held superseding writes no destage write in flight overlaps.
    pub(super) fn send_supersedes(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.volumes[vi].sup.held.len() {
            let v = &self.volumes[vi];
            let h = &v.sup.held[i];
            let busy = !self.bugs.supersede_no_fence
                && v.current.iter().flat_map(|b| &b.runs).any(|r| r.sent && !r.done && r.overlaps(h.lba, h.blocks));
            if busy {
                i += 1;
                continue;
            }
            let Some(h) = self.volumes[vi].sup.held.remove(i) else { break };
            let s = Superseding { lba: h.lba, blocks: h.blocks, before: h.before };
            self.volumes[vi].sup.in_flight.push(s);
            let t = self.token(Op::Host { vi, token: h.token, sent_ns: now, read: false, supersede: Some(s) });
            self.volumes[vi].host_ops += 1;
            self.volumes[vi].san.submit_write(t, h.lba.0 * BLOCK_SIZE_U64, h.buf, h.fua);
            work += 1;
        }
        work
    }

    /// A superseding write came back. On success, older entries of its blocks are excluded
    /// from later batches and its data is laid over the planned runs that would write them.
    pub(super) fn superseded(&mut self, vi: usize, s: Superseding, ok: bool, data: Option<&AlignedBuf>) {
        let v = &mut self.volumes[vi];
        if let Some(i) = v.sup.in_flight.iter().position(|f| f.lba == s.lba && f.blocks == s.blocks) {
            v.sup.in_flight.swap_remove(i);
        }
        if !ok {
            return;
        }
        v.sup.exclusions.push(Exclusion { lba: s.lba, blocks: s.blocks, before: s.before });
        let planned = [v.current.as_ref(), v.next.as_ref()];
        let covered = planned
            .iter()
            .flatten()
            .flat_map(|b| &b.runs)
            .any(|r| !r.sent && r.kind == RunKind::Data && r.overlaps(s.lba, s.blocks));
        let batch_max = planned.iter().flatten().map(|b| b.id).max();
        if let (true, Some(batch_max), false) = (covered, batch_max, self.bugs.supersede_no_overlay) {
            // Every `San` hands a write's buffer back with its completion.
            let data = data.expect("destager: a superseding write came back without its data");
            let mut copy = self.pool.get(data.len());
            copy.copy_from_slice(data);
            let o = Overlay { lba: s.lba, blocks: s.blocks, data: copy, batch_max };
            self.volumes[vi].sup.overlays.push(o);
        }
    }

    /// Overlays no planned batch can use any more go back to the pool.
    pub(super) fn prune_overlays(&mut self, vi: usize) {
        let v: &mut VolumeDestager = &mut self.volumes[vi];
        if v.sup.overlays.is_empty() {
            return;
        }
        let oldest = [v.current.as_ref(), v.next.as_ref()].into_iter().flatten().map(|b| b.id).min();
        let (keep, drop): (Vec<_>, Vec<_>) =
            std::mem::take(&mut v.sup.overlays).into_iter().partition(|o| oldest.is_some_and(|id| id <= o.batch_max));
        v.sup.overlays = keep;
        for o in drop {
            self.pool.put(o.data);
        }
    }
}
