//! The destager: copies dirty log entries to the SAN in log order and moves the watermark.
//!
//! One batch at a time per volume, each an explicit [`DestageState`]:
//! `Idle → AwaitIntent → Reading → Writing → Flushing → Idle`.
//! - *AwaitIntent*: the batch's last sequence number is persisted in the superblock as the
//!   destage intent before any of it reaches the SAN (see `log/superblock.rs` for why).
//! - *Reading*: entries are read back from the log (header and data, checksums verified: the
//!   pair check of what was written) or taken from memory for entries whose log write failed.
//! - *Writing*: overwrites inside the batch are collapsed (last writer wins, by sequence
//!   number) and the result goes to the SAN as runs of adjacent blocks, with an in-flight depth
//!   set by an AIMD controller on SAN latency.
//! - *Flushing*: SYNCHRONIZE CACHE, and only then does the watermark move. The superblock that
//!   persists it also lets the log tail move, so no entry's space is reused before the SAN holds
//!   its data durably.
//!
//! The batch boundary is what makes invariant 4 hold: the SAN is a torn mix only while a batch
//! is being written, and at every completed batch it holds the volume as of the watermark.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use crate::constants::*;
use crate::engine::{Engine, EngineEvent, FlashOp, Pin, SanOp};
use crate::io::IoError;
use crate::log::{EntryHeader, EntryKind};
use crate::types::{Lba, LogSeq};
use crate::volume::{PendingOp, WriteState};

/// Additive-increase / multiplicative-decrease of the destager's in-flight depth. The window
/// grows by one per window's worth of fast completions and halves (at most once per observed
/// latency) when a completion is slower than a multiple of the best latency seen, which is the
/// sign of a SAN queueing our writes. Urgency (dirty data past half the log, or an idle front
/// end) tolerates more latency, so the destager speeds up exactly when it should.
#[derive(Clone, Debug)]
pub struct DepthController {
    window: f64,
    /// Baseline latency; drifts up slowly so a permanently slower SAN resets it.
    min_latency_ns: f64,
    last_cut_ns: u64,
    pub latency_ewma_ns: f64,
}

impl Default for DepthController {
    fn default() -> Self {
        DepthController { window: 1.0, min_latency_ns: f64::MAX, last_cut_ns: 0, latency_ewma_ns: 0.0 }
    }
}

impl DepthController {
    pub fn limit(&self) -> usize {
        (self.window as usize).clamp(1, DESTAGE_DEPTH_MAX as usize)
    }

    pub fn observe(&mut self, latency_ns: u64) {
        let l = latency_ns as f64;
        self.latency_ewma_ns = if self.latency_ewma_ns == 0.0 { l } else { self.latency_ewma_ns * 0.9 + l * 0.1 };
        if l < self.min_latency_ns {
            self.min_latency_ns = l;
        } else {
            self.min_latency_ns += (l - self.min_latency_ns) / 1024.0;
        }
    }

    pub fn on_success(&mut self, latency_ns: u64, now: u64, urgent: bool) {
        self.observe(latency_ns);
        let factor = if urgent { 4.0 } else { 2.0 };
        let target = self.min_latency_ns * factor + 20_000.0;
        if (latency_ns as f64) <= target {
            self.window += 1.0 / self.window;
        } else if now.saturating_sub(self.last_cut_ns) >= latency_ns {
            self.window = (self.window / 2.0).max(1.0);
            self.last_cut_ns = now;
        }
        self.window = self.window.min(DESTAGE_DEPTH_MAX as f64);
    }

    pub fn on_error(&mut self, now: u64) {
        self.window = 1.0;
        self.last_cut_ns = now;
    }
}

pub(crate) struct BatchRecord {
    pub seq: LogSeq,
    pub lba: Lba,
    pub blocks: u32,
    pub pos: u64,
    pub data: Option<Rc<Vec<u8>>>,
    /// Host write to acknowledge when the batch is durable (entries whose log write failed).
    pub ack: Option<u64>,
}

pub(crate) struct Run {
    pub lba: Lba,
    pub data: Vec<u8>,
}

pub(crate) struct Batch {
    pub last: LogSeq,
    pub records: Vec<BatchRecord>,
    pub reads_pending: usize,
    pub runs: Vec<Run>,
    pub pending_runs: VecDeque<usize>,
    pub in_flight: usize,
    pub runs_done: usize,
    pub bytes: u64,
    pub started_at: u64,
}

pub(crate) enum DestageState {
    Idle,
    AwaitIntent { upto: LogSeq },
    Reading { batch: Batch },
    Writing { batch: Batch },
    Flushing { batch: Batch, in_flight: bool },
}

pub(crate) struct Destager {
    pub state: DestageState,
    pub depth: DepthController,
    pub batches_done: u64,
}

impl Destager {
    pub fn new() -> Destager {
        Destager { state: DestageState::Idle, depth: DepthController::default(), batches_done: 0 }
    }

    pub fn observe_san_latency(&mut self, latency_ns: u64) {
        self.depth.observe(latency_ns);
    }

    pub fn is_idle(&self) -> bool {
        matches!(self.state, DestageState::Idle)
    }
}

impl Engine {
    /// Chooses the next batch's last sequence number: bounded by bytes and entries, but always
    /// covering the persisted intent (after a crash, the interrupted batch is redone whole).
    fn next_batch_upto(&self, vi: usize) -> Option<LogSeq> {
        let v = &self.volumes[vi];
        let mut upto = None;
        let mut bytes = 0u64;
        for (n, r) in v.dirty.iter().enumerate() {
            let within = n < DESTAGE_BATCH_ENTRIES_MAX && bytes < DESTAGE_BATCH_BYTES_MAX;
            if !within && r.seq > v.persisted_intent {
                break;
            }
            bytes += r.blocks as u64 * BLOCK_SIZE_U64;
            upto = Some(r.seq);
        }
        upto
    }

    fn start_batch(&mut self, vi: usize, upto: LogSeq, now: u64) {
        let mut records = Vec::new();
        for r in self.volumes[vi].dirty.iter().take_while(|r| r.seq <= upto) {
            records.push(BatchRecord {
                seq: r.seq,
                lba: r.lba,
                blocks: r.blocks,
                pos: r.pos,
                data: r.memory.as_ref().map(|(d, _)| d.clone()),
                ack: r.memory.as_ref().map(|(_, op)| *op),
            });
        }
        assert!(!records.is_empty() && records.last().unwrap().seq == upto);
        for r in &records {
            if let Some(op) = r.ack {
                let from = match self.volumes[vi].ops.get_mut(&op) {
                    Some(PendingOp::Write(w)) => std::mem::replace(&mut w.state, WriteState::Destaging),
                    _ => panic!("destage: abandoned write without its op"),
                };
                self.volumes[vi].enter(op, from, WriteState::Destaging);
            }
        }
        let mut batch = Batch {
            last: upto,
            records,
            reads_pending: 0,
            runs: Vec::new(),
            pending_runs: VecDeque::new(),
            in_flight: 0,
            runs_done: 0,
            bytes: 0,
            started_at: now,
        };
        for idx in 0..batch.records.len() {
            if batch.records[idx].data.is_none() {
                let r = &batch.records[idx];
                let pos = r.pos;
                let len = (1 + r.blocks as u64) * BLOCK_SIZE_U64;
                self.pin(&Pin::Log(pos));
                let token = self.token(FlashOp::DestageRead { vi, idx, pos });
                self.flash.submit_read(token, self.layout.log_offset(pos), len);
                batch.reads_pending += 1;
            }
        }
        self.volumes[vi].destager.state = DestageState::Reading { batch };
        self.maybe_collapse(vi);
    }

    pub(crate) fn destage_read_done(&mut self, vi: usize, idx: usize, result: Result<Vec<u8>, IoError>, now: u64) {
        let vol_id = self.volumes[vi].id;
        let DestageState::Reading { batch } = &mut self.volumes[vi].destager.state else {
            panic!("destage: read completion outside Reading")
        };
        let r = &mut batch.records[idx];
        let checked = result.map_err(|e| e.to_string()).and_then(|bytes| {
            let h = EntryHeader::decode(&bytes).map_err(|e| e.to_string())?;
            h.verify_data(&bytes[BLOCK_SIZE..]).map_err(|e| e.to_string())?;
            if h.kind != EntryKind::Write
                || h.seq != r.seq
                || h.lba != r.lba
                || h.blocks != r.blocks
                || h.log_pos != r.pos
            {
                return Err(format!("entry at {} is not {} any more", r.pos, r.seq));
            }
            Ok(bytes[BLOCK_SIZE..].to_vec())
        });
        match checked {
            Ok(data) => {
                r.data = Some(Rc::new(data));
                batch.reads_pending -= 1;
                self.maybe_collapse(vi);
            }
            Err(e) => {
                // Dirty data that cannot be read back: retry; it is never skipped.
                tracing::error!(volume = vol_id.0, seq = r.seq.0, error = %e, "destage read failed; retrying");
                let (pos, len) = (r.pos, (1 + r.blocks as u64) * BLOCK_SIZE_U64);
                let _ = now;
                self.pin(&Pin::Log(pos));
                let token = self.token(FlashOp::DestageRead { vi, idx, pos });
                self.flash.submit_read(token, self.layout.log_offset(pos), len);
            }
        }
    }

    /// All data of the batch is in memory: collapse overwrites and cut SAN runs.
    fn maybe_collapse(&mut self, vi: usize) {
        let state = std::mem::replace(&mut self.volumes[vi].destager.state, DestageState::Idle);
        let DestageState::Reading { mut batch } = state else { unreachable!() };
        if batch.reads_pending > 0 {
            self.volumes[vi].destager.state = DestageState::Reading { batch };
            return;
        }
        // Last writer wins: records are in sequence order, later ones overwrite the map.
        let mut newest: BTreeMap<u64, (usize, usize)> = BTreeMap::new();
        for (ri, r) in batch.records.iter().enumerate() {
            for b in 0..r.blocks as usize {
                newest.insert(r.lba.0 + b as u64, (ri, b));
            }
        }
        let mut runs: Vec<Run> = Vec::new();
        for (lba, (ri, b)) in newest {
            let src = &batch.records[ri].data.as_ref().unwrap()[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            match runs.last_mut() {
                Some(run)
                    if run.lba.0 + (run.data.len() / BLOCK_SIZE) as u64 == lba
                        && (run.data.len() / BLOCK_SIZE) < DESTAGE_RUN_BLOCKS_MAX as usize =>
                {
                    run.data.extend_from_slice(src)
                }
                _ => runs.push(Run { lba: Lba(lba), data: src.to_vec() }),
            }
        }
        batch.bytes = runs.iter().map(|r| r.data.len() as u64).sum();
        batch.pending_runs = (0..runs.len()).collect();
        batch.runs = runs;
        for r in &mut batch.records {
            r.data = None;
        }
        self.volumes[vi].destager.state = DestageState::Writing { batch };
    }

    pub(crate) fn poll_destage(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        let state = std::mem::replace(&mut self.volumes[vi].destager.state, DestageState::Idle);
        match state {
            DestageState::Idle => {
                let Some(upto) = self.next_batch_upto(vi) else { return 0 };
                if !self.volumes[vi].san_health.may_try(now) {
                    return 0;
                }
                if self.volumes[vi].persisted_intent >= upto {
                    self.start_batch(vi, upto, now);
                } else {
                    let v = &mut self.volumes[vi];
                    v.intent = v.intent.max(upto);
                    v.destager.state = DestageState::AwaitIntent { upto };
                    self.request_superblock();
                }
                work += 1;
            }
            DestageState::AwaitIntent { upto } => {
                if self.volumes[vi].persisted_intent >= upto {
                    self.start_batch(vi, upto, now);
                    work += 1;
                } else {
                    self.volumes[vi].destager.state = DestageState::AwaitIntent { upto };
                }
            }
            DestageState::Reading { batch } => self.volumes[vi].destager.state = DestageState::Reading { batch },
            DestageState::Writing { mut batch } => {
                let limit = self.volumes[vi].destager.depth.limit();
                while batch.in_flight < limit && self.volumes[vi].san_health.may_try(now) {
                    let Some(run) = batch.pending_runs.pop_front() else { break };
                    let token = self.san_token(vi, SanOp::DestageWrite { run, sent_at: now });
                    let r = &batch.runs[run];
                    self.volumes[vi].san.submit_write(token, r.lba.0 * BLOCK_SIZE_U64, r.data.clone(), false);
                    batch.in_flight += 1;
                    work += 1;
                    if !self.volumes[vi].san_health.reachable {
                        break; // one probe at a time while the SAN is down
                    }
                }
                self.volumes[vi].destager.state = DestageState::Writing { batch };
            }
            DestageState::Flushing { batch, in_flight } => {
                let mut in_flight = in_flight;
                if !in_flight && self.volumes[vi].san_health.may_try(now) {
                    let covers = self.volumes[vi].wt_acks;
                    let token = self.san_token(vi, SanOp::DestageFlush { covers });
                    self.volumes[vi].san.submit_flush(token);
                    in_flight = true;
                    work += 1;
                }
                self.volumes[vi].destager.state = DestageState::Flushing { batch, in_flight };
            }
        }
        work
    }

    pub(crate) fn destage_write_done(
        &mut self,
        vi: usize,
        run: usize,
        sent_at: u64,
        result: Result<Vec<u8>, IoError>,
        now: u64,
    ) {
        let urgent = self.volumes[vi].dirty_bytes() * 2 > self.ring.capacity() || self.volumes[vi].ops.is_empty();
        let v = &mut self.volumes[vi];
        let DestageState::Writing { batch } = &mut v.destager.state else {
            panic!("destage: write completion outside Writing")
        };
        batch.in_flight -= 1;
        match result {
            Ok(_) => {
                v.destager.depth.on_success(now.saturating_sub(sent_at), now, urgent);
                batch.runs_done += 1;
                v.metrics.destaged_bytes_total += batch.runs[run].data.len() as u64;
                if batch.runs_done == batch.runs.len() {
                    let DestageState::Writing { batch } = std::mem::replace(&mut v.destager.state, DestageState::Idle)
                    else {
                        unreachable!()
                    };
                    v.destager.state = DestageState::Flushing { batch, in_flight: false };
                }
            }
            Err(_) => {
                v.destager.depth.on_error(now);
                batch.pending_runs.push_back(run);
            }
        }
        v.metrics.san_latency_ns_ewma = v.destager.depth.latency_ewma_ns;
    }

    pub(crate) fn destage_flush_done(&mut self, vi: usize, covers: u64, result: Result<Vec<u8>, IoError>, now: u64) {
        let state = std::mem::replace(&mut self.volumes[vi].destager.state, DestageState::Idle);
        let DestageState::Flushing { batch, .. } = state else { panic!("destage: flush completion outside Flushing") };
        if result.is_err() {
            self.volumes[vi].destager.state = DestageState::Flushing { batch, in_flight: false };
            return;
        }
        let v = &mut self.volumes[vi];
        v.san_flushed_upto = v.san_flushed_upto.max(covers);
        assert!(batch.last > v.watermark, "destage: watermark would move back");
        v.watermark = batch.last;
        while v.dirty.front().is_some_and(|r| r.seq <= batch.last) {
            let mut r = v.pop_dirty();
            r.memory = None;
            v.metrics.state_entries[WriteState::Destaged as usize] += 1;
            v.unpersisted.push_back(r);
        }
        let elapsed = now.saturating_sub(batch.started_at).max(1) as f64 / 1e9;
        let rate = batch.bytes as f64 / elapsed;
        v.metrics.destage_rate_bytes_per_s = if v.metrics.destage_rate_bytes_per_s == 0.0 {
            rate
        } else {
            v.metrics.destage_rate_bytes_per_s * 0.8 + rate * 0.2
        };
        v.destager.batches_done += 1;
        let id = v.id;
        tracing::debug!(volume = id.0, watermark = batch.last.0, bytes = batch.bytes, "destage batch durable");
        // Writes whose log write failed are acknowledged only when the persisted watermark
        // covers them: until then a crash would replay older log entries of their blocks, and
        // nothing in the log would put the newer data back (found by the simulator).
        for r in &batch.records {
            if let Some(op) = r.ack {
                self.volumes[vi].acks_on_persist.push((r.seq, op));
            }
        }
        self.events.push(EngineEvent::BatchDestaged { volume: id, watermark: batch.last });
        self.advance_tail();
        self.request_superblock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aimd_grows_on_fast_completions_and_halves_on_slow_ones() {
        let mut d = DepthController::default();
        let mut now = 0;
        for _ in 0..200 {
            now += 100_000;
            d.on_success(100_000, now, false);
        }
        let grown = d.limit();
        assert!(grown >= 10, "window only {grown}");
        now += 10_000_000;
        d.on_success(5_000_000, now, false);
        assert!(d.limit() <= grown / 2 + 1);
        d.on_error(now);
        assert_eq!(d.limit(), 1);
    }

    #[test]
    fn urgency_tolerates_more_latency() {
        let mut calm = DepthController::default();
        let mut urgent = DepthController::default();
        let mut now = 0;
        for i in 0..400 {
            now += 1_000_000;
            let lat = if i < 10 { 100_000 } else { 300_000 };
            calm.on_success(lat, now, false);
            urgent.on_success(lat, now, true);
        }
        assert!(urgent.limit() > calm.limit(), "urgent {} calm {}", urgent.limit(), calm.limit());
    }
}
