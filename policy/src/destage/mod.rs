//! The destager: the back half of a flash device, on the node's destage core. It owns the
//! volumes' SANs and reads the device's log (through a read-only port of its own), and talks
//! to the engine only in messages ([`crate::link`]): the engine tells it which entries are
//! dirty and sends host SAN traffic (read misses, write-through writes, flushes); it answers
//! with intent requests, destaged watermarks and SAN completions. Nothing it does is on a
//! host's critical path.
//!
//! Per volume, batches follow one another (`batch.rs` plans them):
//! 1. a batch takes the dirty entries up to a sequence number, bounded by
//!    `DESTAGE_BATCH_BYTES_MAX`, and always covering the persisted intent (after a crash, the
//!    interrupted batch is redone whole);
//! 2. before its first SAN write, the superblock must hold an intent covering it (invariant 4
//!    after a crash): the destager asks for the *next* batch's intent while the current one is
//!    still being written, so that superblock write overlaps SAN work;
//! 3. its log reads run ahead — also while the previous batch is still being written — and
//!    each run goes to the SAN once its data is in, up to an adaptive depth (`depth.rs`);
//! 4. when every run is written, SYNCHRONIZE CACHE; only then is the batch done and the
//!    watermark moves. The next batch's writes start only now, so at every completed batch the
//!    SAN holds the volume as of a log prefix (invariant 4).
//! 5. when destaging is urgent and the next batch is planned and its intent persisted, a batch
//!    whose writes have all completed is *chained* instead of flushed: the next batch's writes
//!    start at once and one flush ends both (up to `DESTAGE_CHAIN_BYTES_MAX`). The chain
//!    completes as one batch: the watermark jumps to its end, so invariant 4 holds at every
//!    completed batch; the persisted intent covers the batch being written, so after a crash
//!    the first batch redoes the whole chain (step 1).
//! 6. when destaging is urgent, a flush also goes out after every so much completed writing
//!    (`DESTAGE_EARLY_FLUSH_BYTES`), alongside the writes: it moves no watermark, it gets the
//!    SAN writing back early so that the flush of step 4 or 5 finds less to do.
//!
//! A full log's host writes over dirty blocks go to the SAN at once; `supersede.rs` keeps
//! older data of their blocks from landing over them.

mod batch;
pub mod depth;
mod supersede;

use std::collections::{HashMap, VecDeque};

use crate::constants::{
    BLOCK_SIZE_U64, DESTAGE_BATCH_BYTES_MAX, DESTAGE_BATCH_ENTRIES_MAX, DESTAGE_CHAIN_BYTES_MAX,
    DESTAGE_EARLY_FLUSH_BYTES, DESTAGE_GATHER_BYTES, DESTAGE_GATHER_NS, DESTAGE_GATHER_UNTIL_PERMILLE,
    FLASH_READ_FAIL_LOG_NS, FLASH_READ_RETRY_NS, LOG_READ_RETRY_MAX_NS, SAN_BACKOFF_MAX_NS, SAN_BACKOFF_MIN_NS,
};
use crate::io::{AlignedBuf, BufPool, Flash, IoDone, IoError, San};
use crate::link::{DirtyRecord, FromDestage, Pressure, SanReport, SanRequest, ToDestage};
use crate::log::Layout;
use crate::types::{IoToken, LogSeq, VolumeId};
use batch::{Batch, RunKind};
use depth::DepthController;

/// How often the destager reports a volume's SAN numbers to the engine.
const REPORT_EVERY_NS: u64 = 100_000_000;
/// After this long, a batch still under way caps the reported rate (see `maybe_report`).
const STALL_RATE_AFTER_NS: u64 = 1_000_000_000;

/// A batch's SAN flush completed: the SAN holds the volume as of `watermark` (the simulator
/// checks invariant 4 at exactly this moment; stagerd logs it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestageEvent {
    BatchDestaged {
        volume: VolumeId,
        watermark: LogSeq,
        bytes: u64,
    },
    SanUnreachable {
        volume: VolumeId,
    },
    SanReachable {
        volume: VolumeId,
    },
    /// Dirty data that cannot be read back from the log (retried, never skipped).
    LogReadFailed {
        volume: VolumeId,
        error: String,
    },
}

enum Op {
    LogRead {
        vi: usize,
        batch: u64,
        read: usize,
    },
    Run {
        vi: usize,
        run: usize,
        sent_ns: u64,
    },
    Flush {
        vi: usize,
    },
    /// A flush sent while an urgent batch is still writing (`Destager::early_flush`): it moves
    /// nothing, it only gets the SAN writing back early.
    EarlyFlush {
        vi: usize,
    },
    Host {
        vi: usize,
        token: IoToken,
        sent_ns: u64,
        read: bool,
        supersede: Option<supersede::Superseding>,
    },
}

/// SAN reachability as the destager sees it, with retry back-off.
struct Health {
    reachable: bool,
    backoff_ns: u64,
    retry_at: u64,
    errors: u64,
}

impl Health {
    fn failed(&mut self, now: u64) {
        self.errors += 1;
        self.backoff_ns =
            if self.reachable { SAN_BACKOFF_MIN_NS } else { (self.backoff_ns * 2).min(SAN_BACKOFF_MAX_NS) };
        self.reachable = false;
        self.retry_at = now + self.backoff_ns;
    }

    fn may_try(&self, now: u64) -> bool {
        self.reachable || now >= self.retry_at
    }
}

struct VolumeDestager {
    id: VolumeId,
    san: Box<dyn San>,
    /// The engine's Start arrived: the state below is valid.
    started: bool,
    watermark: LogSeq,
    persisted_intent: LogSeq,
    requested_intent: LogSeq,
    /// Dirty entries not in a batch yet, in sequence order.
    dirty: VecDeque<DirtyRecord>,
    dirty_bytes: u64,
    /// When the oldest of `dirty` arrived (about: the rest of a planned batch restarts it).
    dirty_since_ns: Option<u64>,
    /// The batch being written (or read, if nothing is being written).
    current: Option<Batch>,
    /// The following batch, planned early so its reads overlap the current one's writes.
    next: Option<Batch>,
    /// Batches before `current` whose writes completed and whose flush is `current`'s (step 5).
    chain: Option<Chain>,
    /// An `Op::EarlyFlush` is in flight.
    early_flush: bool,
    /// Bytes of data runs written to the SAN since a flush was last sent.
    unflushed_bytes: u64,
    health: Health,
    depth: DepthController,
    rate_bytes_per_s: f64,
    destaged_bytes_total: u64,
    reported: SanReport,
    report_at_ns: u64,
    host_ops: usize,
    /// Superseding host writes, their fences, overlays and exclusions.
    sup: supersede::Supersedes,
}

impl VolumeDestager {
    fn new(id: VolumeId, san: Box<dyn San>) -> VolumeDestager {
        VolumeDestager {
            id,
            san,
            started: false,
            watermark: LogSeq(0),
            persisted_intent: LogSeq(0),
            requested_intent: LogSeq(0),
            dirty: VecDeque::new(),
            dirty_bytes: 0,
            dirty_since_ns: None,
            current: None,
            next: None,
            chain: None,
            early_flush: false,
            unflushed_bytes: 0,
            health: Health { reachable: true, backoff_ns: SAN_BACKOFF_MIN_NS, retry_at: 0, errors: 0 },
            depth: DepthController::default(),
            rate_bytes_per_s: 0.0,
            destaged_bytes_total: 0,
            reported: SanReport { reachable: true, ..SanReport::default() },
            report_at_ns: 0,
            host_ops: 0,
            sup: supersede::Supersedes::default(),
        }
    }
}

/// Written batches waiting for the flush of the batch that followed them (step 5).
struct Chain {
    /// The last chained batch's end.
    upto: LogSeq,
    bytes: u64,
    batches: u32,
    runs: usize,
    /// When the first chained batch started.
    started_ns: u64,
}

pub struct Destager {
    layout: Layout,
    flash: Box<dyn Flash>,
    pool: BufPool,
    volumes: Vec<VolumeDestager>,
    ops: HashMap<IoToken, Op>,
    next_id: u64,
    outbox: Vec<FromDestage>,
    events: Vec<DestageEvent>,
    pressure: Pressure,
    scratch: Vec<IoDone>,
    /// Log reads that failed, read again when due; the pause doubles while they keep failing
    /// (up to `LOG_READ_RETRY_MAX_NS`) and resets on a read that succeeds.
    read_retries: Vec<(usize, u64, usize, AlignedBuf, u64)>,
    read_backoff_ns: u64,
    /// When a failed log read was last reported (`FLASH_READ_FAIL_LOG_NS` apart), and how many
    /// failed since.
    read_fail_reported_ns: Option<u64>,
    read_fails: u64,
    /// How long a small amount of dirty data is gathered before a batch starts
    /// (`DESTAGE_GATHER_NS`; the simulator varies it).
    gather_ns: u64,
    /// Completed SAN writes between early flushes (`DESTAGE_EARLY_FLUSH_BYTES`; the simulator
    /// varies it).
    early_flush_bytes: u64,
    /// Mutations the simulator's checker tests switch on (never in stagerd).
    bugs: crate::Bugs,
}

impl Destager {
    /// The destager of a device laid out as `layout`, reading its log through `flash`, with
    /// each volume's SAN.
    pub fn new(layout: Layout, flash: Box<dyn Flash>, sans: Vec<(VolumeId, Box<dyn San>)>) -> Destager {
        let volumes = sans.into_iter().map(|(id, san)| VolumeDestager::new(id, san)).collect();
        Destager {
            layout,
            flash,
            pool: BufPool::new(64),
            volumes,
            ops: HashMap::new(),
            next_id: 1,
            outbox: Vec::new(),
            events: Vec::new(),
            pressure: Pressure { log_used_permille: 0, frontend_idle: true, frontend_slowdown: 1.0 },
            scratch: Vec::new(),
            read_retries: Vec::new(),
            read_backoff_ns: FLASH_READ_RETRY_NS,
            read_fail_reported_ns: None,
            read_fails: 0,
            gather_ns: DESTAGE_GATHER_NS,
            early_flush_bytes: DESTAGE_EARLY_FLUSH_BYTES,
            bugs: crate::Bugs::default(),
        }
    }

    /// Switches on mutations (the simulator's checker tests).
    pub fn set_bugs(&mut self, bugs: crate::Bugs) {
        self.bugs = bugs;
    }

    /// Sets how long a small amount of dirty data is gathered before a batch starts.
    pub fn set_gather_ns(&mut self, ns: u64) {
        self.gather_ns = ns;
    }

    /// Sets how much completed SAN writing an urgent destager lets pass between early flushes.
    pub fn set_early_flush_bytes(&mut self, bytes: u64) {
        self.early_flush_bytes = bytes;
    }

    /// Adds a volume whose SAN this destager did not have (a replica copy this node now
    /// destages itself, `Engine::rescue_copy`). Its `ToDestage::Start` must come after this.
    /// A volume it already has keeps its SAN: returns false.
    pub fn add_volume(&mut self, id: VolumeId, san: Box<dyn San>) -> bool {
        if self.volume_index(id).is_some() {
            return false;
        }
        self.volumes.push(VolumeDestager::new(id, san));
        true
    }

    /// Another node destaged this volume's entries up to `upto` (a replica's rescue of its
    /// copy while this node was taken for gone): nothing up to there may be written from here
    /// any more, or it could put older data over the rescue's newer. Commands the SAN holds
    /// back are failed; batches and dirty entries wholly at or below `upto` are dropped. A
    /// batch that reaches beyond `upto` is kept: it writes each block's newest entry up to its
    /// end, which is newer than anything the rescue wrote. Returns the bytes dropped.
    pub fn skip_to(&mut self, id: VolumeId, upto: LogSeq) -> u64 {
        let Some(vi) = self.volume_index(id) else { return 0 };
        let v = &mut self.volumes[vi];
        v.san.fail_held();
        let mut dropped = 0;
        if v.next.as_ref().is_some_and(|b| b.upto <= upto) {
            dropped += v.next.take().map_or(0, |b| b.bytes);
        }
        if v.current.as_ref().is_some_and(|b| b.upto <= upto) {
            dropped += v.current.take().map_or(0, |b| b.bytes);
        }
        if v.chain.as_ref().is_some_and(|c| c.upto <= upto) {
            dropped += v.chain.take().map_or(0, |c| c.bytes);
        }
        while v.dirty.front().is_some_and(|r| r.seq <= upto) {
            let Some(r) = v.dirty.pop_front() else { break };
            let bytes = r.blocks * BLOCK_SIZE_U64 * u64::from(r.kind.has_data());
            v.dirty_bytes -= bytes;
            dropped += bytes;
            self.pool.put_opt(r.memory);
        }
        if v.dirty.is_empty() {
            v.dirty_since_ns = None;
        }
        v.watermark = v.watermark.max(upto);
        v.requested_intent = v.requested_intent.max(upto);
        dropped
    }

    fn token(&mut self, op: Op) -> IoToken {
        let t = IoToken(self.next_id);
        self.next_id += 1;
        self.ops.insert(t, op);
        t
    }

    fn volume_index(&self, id: VolumeId) -> Option<usize> {
        self.volumes.iter().position(|v| v.id == id)
    }

    pub fn drain_outbox(&mut self, out: &mut Vec<FromDestage>) {
        out.append(&mut self.outbox);
    }

    pub fn drain_events(&mut self, out: &mut Vec<DestageEvent>) {
        out.append(&mut self.events);
    }

    /// Nothing dirty, no batch, nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.ops.is_empty()
            && self.volumes.iter().all(|v| {
                v.dirty.is_empty() && v.current.is_none() && v.next.is_none() && v.chain.is_none() && v.sup.is_idle()
            })
    }

    pub fn io_in_flight(&self) -> bool {
        !self.ops.is_empty()
    }

    /// Whether something waits on this destager's I/O in flight: a host's SAN command (or a
    /// superseding write held behind a batch), or urgent destaging (`depth::urgent`: the log
    /// three quarters full, or the front end idle). The destage core spins for completions
    /// (`destage.idle_poll_us`) only then. Otherwise the destager shares the SAN gently anyway
    /// and can wait for wake-ups: when the core also spun for a busy front end's batches, a
    /// busy-polling host's QD1 4 KiB writes ran at about half the rate (`bench-writeback` part
    /// 1's IOPS: 2 820-3 072 in the run before this rule, 5 711 in the one after), the spinning
    /// taking the CPU the unpinned destage core shared with the owner reactor.
    pub fn hurried(&self) -> bool {
        depth::urgent(&self.pressure) || self.volumes.iter().any(|v| v.host_ops > 0 || !v.sup.is_idle())
    }

    /// Bytes of dirty data the destager knows of and has not destaged (status).
    pub fn pending_bytes(&self, id: VolumeId) -> Option<u64> {
        let v = &self.volumes[self.volume_index(id)?];
        let batches = [v.current.as_ref(), v.next.as_ref()].into_iter().flatten().map(|b| b.bytes).sum::<u64>();
        Some(v.dirty_bytes + batches + v.chain.as_ref().map_or(0, |c| c.bytes))
    }

    pub fn report(&self, id: VolumeId) -> Option<SanReport> {
        let v = &self.volumes[self.volume_index(id)?];
        Some(self.report_of(v))
    }

    fn report_of(&self, v: &VolumeDestager) -> SanReport {
        SanReport {
            reachable: v.health.reachable,
            errors: v.health.errors,
            latency_ns_ewma: v.depth.latency_ewma_ns,
            destage_rate_bytes_per_s: v.rate_bytes_per_s,
            destage_depth: depth::write_limit(&v.depth, &self.pressure),
            destaged_bytes_total: v.destaged_bytes_total,
        }
    }

    pub fn on_message(&mut self, msg: ToDestage, now: u64) {
        match msg {
            ToDestage::Start { volume, watermark, intent } => {
                let Some(vi) = self.volume_index(volume) else { return };
                let v = &mut self.volumes[vi];
                v.started = true;
                v.watermark = watermark;
                v.persisted_intent = intent;
                v.requested_intent = intent;
            }
            ToDestage::Dirty { volume, records } => {
                let Some(vi) = self.volume_index(volume) else { return };
                let v = &mut self.volumes[vi];
                if !records.is_empty() {
                    v.dirty_since_ns.get_or_insert(now);
                }
                for r in records {
                    if r.kind == crate::log::EntryKind::SanWritten {
                        // Older entries of its blocks not planned yet are void (a replayed
                        // one: nothing else excluded them).
                        v.sup.exclusions.push(supersede::Exclusion { lba: r.lba, blocks: r.blocks, before: r.seq });
                    }
                    assert!(
                        r.seq > v.watermark && v.dirty.back().is_none_or(|d| d.seq < r.seq),
                        "destager: {volume} dirty {} out of order",
                        r.seq
                    );
                    v.dirty_bytes += r.blocks * BLOCK_SIZE_U64 * u64::from(r.kind.has_data());
                    v.dirty.push_back(r);
                }
            }
            ToDestage::IntentPersisted { volume, intent } => {
                let Some(vi) = self.volume_index(volume) else { return };
                let v = &mut self.volumes[vi];
                v.persisted_intent = v.persisted_intent.max(intent);
            }
            ToDestage::San { volume, token, op } => {
                let Some(vi) = self.volume_index(volume) else { return };
                self.host_request(vi, token, op, now);
            }
            ToDestage::Pressure(p) => self.pressure = p,
        }
    }

    fn host_request(&mut self, vi: usize, token: IoToken, op: SanRequest, now: u64) {
        if let SanRequest::Write { offset, buf, fua, supersede: Some(before) } = op {
            return self.supersede(vi, token, offset, buf, fua, before, now);
        }
        let read = matches!(op, SanRequest::Read { .. });
        let t = self.token(Op::Host { vi, token, sent_ns: now, read, supersede: None });
        self.volumes[vi].host_ops += 1;
        let san = &mut self.volumes[vi].san;
        match op {
            SanRequest::Read { offset, buf } => san.submit_read(t, offset, buf),
            SanRequest::Write { offset, buf, fua, .. } => san.submit_write(t, offset, buf, fua),
            SanRequest::WriteZeroes { offset, len } => san.submit_write_zeroes(t, offset, len),
            SanRequest::Unmap { offset, len } => san.submit_unmap(t, offset, len),
            SanRequest::Flush => san.submit_flush(t),
        }
    }

    /// Makes progress: completions, batches, reads, SAN writes, flushes. Returns the work done.
    pub fn poll(&mut self, now: u64) -> usize {
        let mut work = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.flash.poll_completions(&mut scratch);
        for vi in 0..self.volumes.len() {
            self.volumes[vi].san.poll_completions(&mut scratch);
        }
        for done in scratch.drain(..) {
            work += 1;
            self.on_done(done, now);
        }
        self.scratch = scratch;
        work += self.poll_read_retries(now);
        for vi in 0..self.volumes.len() {
            // The SAN's client may know it is unreachable before a command of ours fails (a
            // lost session, a missed deadline of a host's command, a failed heartbeat).
            if self.volumes[vi].health.reachable && self.volumes[vi].san.outage().is_some() {
                self.san_result(vi, false, now);
            }
            work += self.poll_volume(vi, now);
            self.maybe_report(vi, now);
        }
        work
    }

    /// Log reads whose retry is due, read again (those of a batch dropped meanwhile are not).
    fn poll_read_retries(&mut self, now: u64) -> usize {
        if self.read_retries.iter().all(|r| r.4 > now) {
            return 0;
        }
        let (due, wait): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.read_retries).into_iter().partition(|r| r.4 <= now);
        self.read_retries = wait;
        let n = due.len();
        for (vi, batch, read, data, _) in due {
            let v = &mut self.volumes[vi];
            let found = [v.current.as_mut(), v.next.as_mut()].into_iter().flatten().find(|b| b.id == batch);
            let Some(b) = found else {
                self.pool.put(data);
                continue;
            };
            let pos = b.reads[read].pos;
            let token = self.token(Op::LogRead { vi, batch, read });
            self.flash.submit_read(token, self.layout.log_offset(pos), data);
        }
        n
    }

    /// Why a volume's SAN is unreachable, as its client says (None if it does not know).
    pub fn san_outage(&self, id: VolumeId) -> Option<String> {
        self.volumes[self.volume_index(id)?].san.outage()
    }

    /// The next batch's last sequence number: bounded by bytes and entries, but always covering
    /// the persisted intent.
    fn next_upto(v: &VolumeDestager) -> Option<LogSeq> {
        let mut upto = None;
        let mut bytes = 0u64;
        for (n, r) in v.dirty.iter().enumerate() {
            let within = n < DESTAGE_BATCH_ENTRIES_MAX && bytes < DESTAGE_BATCH_BYTES_MAX;
            if !within && r.seq > v.persisted_intent {
                break;
            }
            bytes += r.blocks * BLOCK_SIZE_U64 * u64::from(r.kind.has_data());
            upto = Some(r.seq);
        }
        upto
    }

    /// Whether a batch may start now (see `DESTAGE_GATHER_BYTES`): enough gathered, waited
    /// long enough, the front end idle, the log filling, or a persisted intent to honour.
    fn gathered(v: &VolumeDestager, pressure: &Pressure, gather_ns: u64, now: u64) -> bool {
        let Some(first) = v.dirty.front() else { return false };
        v.dirty_bytes >= DESTAGE_GATHER_BYTES
            || v.dirty.len() >= DESTAGE_BATCH_ENTRIES_MAX
            || v.dirty_since_ns.is_none_or(|t| now.saturating_sub(t) >= gather_ns)
            || pressure.frontend_idle
            || pressure.log_used_permille >= DESTAGE_GATHER_UNTIL_PERMILLE
            || first.seq <= v.persisted_intent
    }

    fn plan(&mut self, vi: usize, now: u64) -> Option<Batch> {
        if !Self::gathered(&self.volumes[vi], &self.pressure, self.gather_ns, now) {
            return None;
        }
        let v = &mut self.volumes[vi];
        let upto = Self::next_upto(v)?;
        let n = v.dirty.partition_point(|r| r.seq <= upto);
        let records: Vec<DirtyRecord> = v.dirty.drain(..n).collect();
        v.dirty_since_ns = (!v.dirty.is_empty()).then_some(now);
        v.dirty_bytes -= records.iter().map(|r| r.blocks * BLOCK_SIZE_U64 * u64::from(r.kind.has_data())).sum::<u64>();
        let id = self.next_id;
        self.next_id += 1;
        let b = Batch::plan(id, upto, records, &v.sup.exclusions, self.layout.log_bytes, &mut self.pool, now);
        v.sup.planned(upto);
        Some(b)
    }

    fn poll_volume(&mut self, vi: usize, now: u64) -> usize {
        if !self.volumes[vi].started {
            return 0;
        }
        let mut work = 0;
        if self.volumes[vi].current.is_none() {
            let promoted = self.volumes[vi].next.take();
            let batch = match promoted {
                Some(b) => Some(b),
                None => self.plan(vi, now),
            };
            if let Some(mut b) = batch {
                b.started_ns = now;
                self.volumes[vi].current = Some(b);
                work += 1;
            }
        }
        if self.volumes[vi].next.is_none() && self.volumes[vi].current.is_some() && !self.volumes[vi].dirty.is_empty() {
            // Work only if a batch was planned: gathering is waiting, and the destage core
            // spins while its pollers report work.
            if let Some(b) = self.plan(vi, now) {
                self.volumes[vi].next = Some(b);
                work += 1;
            }
        }
        // Intent: the batch that writes next, and the one after it, ahead of time.
        let want = self.volumes[vi].next.as_ref().or(self.volumes[vi].current.as_ref()).map(|b| b.upto);
        if let Some(upto) = want {
            let v = &mut self.volumes[vi];
            if upto > v.requested_intent {
                v.requested_intent = upto;
                self.outbox.push(FromDestage::NeedIntent { volume: v.id, upto });
                work += 1;
            }
        }
        work += self.issue_reads(vi);
        work += self.send_supersedes(vi, now);
        work += self.issue_writes(vi, now);
        self.prune_overlays(vi);
        work
    }

    fn issue_reads(&mut self, vi: usize) -> usize {
        let limit = depth::read_limit(&self.pressure);
        let mut work = 0;
        for next in [false, true] {
            loop {
                let v = &mut self.volumes[vi];
                let in_flight = v.current.as_ref().map_or(0, |b| b.reads_in_flight)
                    + v.next.as_ref().map_or(0, |b| b.reads_in_flight);
                let batch = if next { v.next.as_mut() } else { v.current.as_mut() };
                let Some(b) = batch else { break };
                if in_flight >= limit || b.next_read == b.reads.len() {
                    break;
                }
                let read = b.next_read;
                b.next_read += 1;
                b.reads_in_flight += 1;
                let (pos, len, batch) = (b.reads[read].pos, b.reads[read].len, b.id);
                let buf = self.pool.get(len as usize);
                let token = self.token(Op::LogRead { vi, batch, read });
                self.flash.submit_read(token, self.layout.log_offset(pos), buf);
                work += 1;
            }
        }
        work
    }

    /// Step 5: chains the current batch, written but not flushed, to the next one, which
    /// becomes current and starts writing at once.
    fn chain_batch(&mut self, vi: usize, now: u64) -> usize {
        if !depth::urgent(&self.pressure) {
            return 0;
        }
        let v = &mut self.volumes[vi];
        let (Some(b), Some(n)) = (v.current.as_ref(), v.next.as_ref()) else { return 0 };
        let chained = v.chain.as_ref().map_or(0, |c| c.bytes);
        let chains = b.all_written()
            && b.in_flight == 0
            && !b.flush_in_flight
            && v.health.reachable
            && n.upto <= v.persisted_intent
            && chained + b.bytes + n.bytes <= DESTAGE_CHAIN_BYTES_MAX;
        if !chains {
            return 0;
        }
        let (Some(b), Some(mut n)) = (v.current.take(), v.next.take()) else { unreachable!() };
        let c = v.chain.get_or_insert(Chain { upto: b.upto, bytes: 0, batches: 0, runs: 0, started_ns: b.started_ns });
        c.upto = b.upto;
        c.bytes += b.bytes;
        c.batches += 1;
        c.runs += b.runs.len();
        n.started_ns = now;
        v.current = Some(n);
        1
    }

    /// When destaging is urgent, a flush every `early_flush_bytes` of completed SAN
    /// writes makes the SAN start writing them back while the batch's other writes go out, so
    /// that the flush which ends the batch (or chain) finds less to do. It moves no watermark:
    /// the SAN may hold a torn mix of batches until that batch's own flush.
    fn early_flush(&mut self, vi: usize) -> usize {
        let v = &mut self.volumes[vi];
        if v.early_flush || v.unflushed_bytes < self.early_flush_bytes || !depth::urgent(&self.pressure) {
            return 0;
        }
        // Only while the batch still has writes to do: once they are all done, its own flush
        // (or the chain) follows at once.
        if !v.health.reachable || v.current.as_ref().is_none_or(|b| b.flush_in_flight || b.all_written()) {
            return 0;
        }
        v.early_flush = true;
        v.unflushed_bytes = 0;
        let token = self.token(Op::EarlyFlush { vi });
        self.volumes[vi].san.submit_flush(token);
        1
    }

    fn issue_writes(&mut self, vi: usize, now: u64) -> usize {
        let mut work = self.chain_batch(vi, now) + self.early_flush(vi);
        let limit = depth::write_limit(&self.volumes[vi].depth, &self.pressure);
        let fence = !self.bugs.supersede_no_fence;
        let v = &mut self.volumes[vi];
        let Some(b) = v.current.as_mut() else { return 0 };
        if v.persisted_intent < b.upto {
            return 0;
        }
        let mut submits = Vec::new();
        if b.writes_started_ns == 0 {
            b.writes_started_ns = now;
        }
        let mut fenced = Vec::new();
        while b.in_flight < limit && v.health.may_try(now) {
            let Some(run) = b.ready.pop_front() else { break };
            if fence && v.sup.fences(&b.runs[run]) {
                fenced.push(run);
                continue;
            }
            b.in_flight += 1;
            submits.push(run);
            if !v.health.reachable {
                break; // one probe at a time while the SAN is down
            }
        }
        for run in fenced.into_iter().rev() {
            b.ready.push_front(run);
        }
        let flush = b.all_written() && b.in_flight == 0 && !b.flush_in_flight && v.health.may_try(now);
        if flush {
            b.flush_in_flight = true;
        }
        for run in submits {
            let token = self.token(Op::Run { vi, run, sent_ns: now });
            let v = &mut self.volumes[vi];
            let Some(b) = v.current.as_mut() else { unreachable!() };
            let batch = b.id;
            let r = &mut b.runs[run];
            r.sent = true;
            let offset = r.lba.0 * BLOCK_SIZE_U64;
            let len = r.blocks * BLOCK_SIZE_U64;
            match r.kind {
                RunKind::Data => {
                    let mut buf = r.buf.take().expect("destager: data run without its data");
                    v.sup.lay_over(batch, r, &mut buf);
                    v.san.submit_write(token, offset, buf, false);
                }
                RunKind::Zero => v.san.submit_write_zeroes(token, offset, len),
                RunKind::Unmap => v.san.submit_unmap(token, offset, len),
            }
            work += 1;
        }
        if flush {
            self.volumes[vi].unflushed_bytes = 0;
            if let Some(b) = self.volumes[vi].current.as_mut() {
                b.flush_sent_ns = now;
            }
            let token = self.token(Op::Flush { vi });
            self.volumes[vi].san.submit_flush(token);
            work += 1;
        }
        work
    }

    fn san_result(&mut self, vi: usize, ok: bool, now: u64) {
        let v = &mut self.volumes[vi];
        if ok {
            if !v.health.reachable {
                v.health.reachable = true;
                v.health.backoff_ns = SAN_BACKOFF_MIN_NS;
                self.events.push(DestageEvent::SanReachable { volume: v.id });
            }
        } else {
            if v.health.reachable {
                self.events.push(DestageEvent::SanUnreachable { volume: v.id });
            }
            v.health.failed(now);
            // Nothing moves while the SAN is away: no old rate is reported meanwhile.
            v.rate_bytes_per_s = 0.0;
        }
    }

    fn on_done(&mut self, done: IoDone, now: u64) {
        let Some(op) = self.ops.remove(&done.token) else {
            panic!("destager: completion for unknown token {:?}", done.token)
        };
        match op {
            Op::LogRead { vi, batch, read } => {
                let data = done.buf.expect("destager: log read without its buffer");
                let v = &mut self.volumes[vi];
                let found = [v.current.as_mut(), v.next.as_mut()].into_iter().flatten().find(|b| b.id == batch);
                let Some(b) = found else { return self.pool.put(data) };
                b.reads_in_flight -= 1;
                let checked = done.result.map_err(|e| e.to_string()).and_then(|()| b.read_done(read, &data));
                if let Err(error) = checked {
                    // Dirty data that cannot be read back: read it again (after a pause that
                    // grows while reads keep failing); it is never skipped.
                    b.reads_in_flight += 1;
                    self.read_fails += 1;
                    if self.read_fail_reported_ns.is_none_or(|t| now >= t + FLASH_READ_FAIL_LOG_NS) {
                        tracing::error!(
                            volume = v.id.0,
                            failed = self.read_fails,
                            "destage read failed ({error}); retrying every {} ms at most",
                            self.read_backoff_ns / 1_000_000
                        );
                        self.events.push(DestageEvent::LogReadFailed { volume: v.id, error });
                        self.read_fail_reported_ns = Some(now);
                        self.read_fails = 0;
                    }
                    self.read_retries.push((vi, batch, read, data, now + self.read_backoff_ns));
                    self.read_backoff_ns = (self.read_backoff_ns * 2).min(LOG_READ_RETRY_MAX_NS);
                    return;
                }
                self.read_backoff_ns = FLASH_READ_RETRY_NS;
                self.pool.put(data);
            }
            Op::Run { vi, run, sent_ns } => {
                let ok = done.result.is_ok();
                self.san_result(vi, ok, now);
                let urgent = depth::urgent(&self.pressure);
                let v = &mut self.volumes[vi];
                let Some(b) = v.current.as_mut() else { return self.pool.put_opt(done.buf) };
                b.in_flight -= 1;
                if ok {
                    v.depth.on_success(now.saturating_sub(sent_ns), now, urgent);
                    b.runs_done += 1;
                    b.runs[run].done = true;
                    if b.runs[run].kind == RunKind::Data {
                        v.unflushed_bytes += b.runs[run].blocks * BLOCK_SIZE_U64;
                    }
                    self.pool.put_opt(done.buf);
                } else {
                    v.depth.on_error(now);
                    b.runs[run].sent = false;
                    b.runs[run].buf = done.buf;
                    b.ready.push_back(run);
                }
            }
            Op::Flush { vi } => {
                let ok = done.result.is_ok();
                self.san_result(vi, ok, now);
                let v = &mut self.volumes[vi];
                let Some(b) = v.current.as_mut() else { return };
                b.flush_in_flight = false;
                if ok {
                    let Some(b) = v.current.take() else { return };
                    assert!(b.upto > v.watermark, "destager: watermark would move back");
                    // The batches chained before this one are durable with it.
                    let (bytes, batches, runs, started_ns) = match v.chain.take() {
                        Some(c) => (c.bytes + b.bytes, c.batches + 1, c.runs + b.runs.len(), c.started_ns),
                        None => (b.bytes, 1, b.runs.len(), b.started_ns),
                    };
                    v.watermark = b.upto;
                    v.destaged_bytes_total += bytes;
                    let elapsed = now.saturating_sub(started_ns).max(1) as f64 / 1e9;
                    let rate = bytes as f64 / elapsed;
                    v.rate_bytes_per_s =
                        if v.rate_bytes_per_s == 0.0 { rate } else { v.rate_bytes_per_s * 0.7 + rate * 0.3 };
                    tracing::debug!(
                        volume = v.id.0,
                        watermark = b.upto.0,
                        bytes,
                        batches,
                        runs,
                        ms = elapsed * 1e3,
                        writes_ms = b.writes_started_ns.saturating_sub(b.started_ns) as f64 / 1e6,
                        flush_ms = now.saturating_sub(b.flush_sent_ns) as f64 / 1e6,
                        "destage batch durable"
                    );
                    self.events.push(DestageEvent::BatchDestaged { volume: v.id, watermark: b.upto, bytes });
                    self.outbox.push(FromDestage::Destaged { volume: v.id, watermark: b.upto });
                    for r in b.runs {
                        self.pool.put_opt(r.buf);
                    }
                }
            }
            Op::EarlyFlush { vi } => {
                self.san_result(vi, done.result.is_ok(), now);
                self.volumes[vi].early_flush = false;
            }
            Op::Host { vi, token, sent_ns, read, supersede } => {
                let ok = done.result.is_ok();
                // Host commands do not move the destager's SAN health (the engine keeps its own
                // for them; an outage its client knows of comes through `San::outage`). (Letting
                // them back off destage writes changed the simulator's trajectories and exposed
                // a replica counted in sync while its copy still held entries the source's
                // watermark had jumped over — fixed in `attach_replica` and the write-through
                // gate.)
                let v = &mut self.volumes[vi];
                v.host_ops -= 1;
                if ok && read {
                    v.depth.observe(now.saturating_sub(sent_ns));
                }
                let result: Result<(), IoError> = done.result;
                if let Some(s) = supersede {
                    self.superseded(vi, s, result.is_ok(), done.buf.as_ref());
                }
                let v = &mut self.volumes[vi];
                self.outbox.push(FromDestage::SanDone { volume: v.id, token, result, buf: done.buf });
            }
        }
    }

    /// Reports a volume's SAN numbers to the engine: at once when reachability or errors
    /// change, every `REPORT_EVERY_NS` while destage moves, every 5 s otherwise.
    fn maybe_report(&mut self, vi: usize, now: u64) {
        // A batch that has been under way for a while bounds the rate from above: a SAN that
        // slows down or stalls shows in the rate at once, not after the batch ends.
        let v = &mut self.volumes[vi];
        if let Some(b) = &v.current {
            let (bytes, started_ns) = match &v.chain {
                Some(c) => (c.bytes + b.bytes, c.started_ns),
                None => (b.bytes, b.started_ns),
            };
            let elapsed_ns = now.saturating_sub(started_ns);
            if elapsed_ns > STALL_RATE_AFTER_NS {
                v.rate_bytes_per_s = v.rate_bytes_per_s.min(bytes as f64 / (elapsed_ns as f64 / 1e9));
            }
        } else if v.next.is_none() && v.dirty.is_empty() {
            v.rate_bytes_per_s = 0.0; // nothing to destage: nothing moves
        }
        let report = self.report_of(&self.volumes[vi]);
        let v = &mut self.volumes[vi];
        let urgent = report.reachable != v.reported.reachable || report.errors != v.reported.errors;
        let moved = report != v.reported;
        let every = if moved { REPORT_EVERY_NS } else { 5_000_000_000 };
        if urgent || now >= v.report_at_ns + every {
            v.report_at_ns = now;
            v.reported = report;
            self.outbox.push(FromDestage::Report { volume: v.id, report });
        }
    }

    /// Returns buffers to this destager's pool (a driver handing back what it does not need).
    pub fn recycle(&mut self, buf: AlignedBuf) {
        self.pool.put(buf);
    }
}
