//! Per-volume state owned by the engine: identity, policy, sequence numbers and watermarks, the
//! dirty index and queues, host operations in flight, SAN health, destager, metrics.
//!
//! The write state machine lives here as [`WriteState`]; every transition goes through
//! [`Volume::enter`], which counts it and emits a trace point (STYLE.md, "How state moves").

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use crate::constants::{BLOCK_SIZE_U64, SAN_BACKOFF_MAX_NS, SAN_BACKOFF_MIN_NS};
use crate::destage::Destager;
use crate::index::DirtyIndex;
use crate::io::San;
use crate::policy::{EffectiveReason, WritePolicy};
use crate::types::{Epoch, Lba, LogSeq, VolumeId};

/// What the target configures for a volume.
pub struct VolumeSpec {
    pub id: VolumeId,
    pub epoch: Epoch,
    pub blocks: u64,
    pub policy: WritePolicy,
    /// Insert clean copies of SAN reads into flash (read acceleration).
    pub read_cache: bool,
    pub san: Box<dyn San>,
}

/// The life of a host write. Write-back: `Received → Logging → Logged → Acked → Destaging →
/// Destaged → Clean`; write-through: `Received → Gated → SanWriting → Acked`. A write-back write
/// whose log write failed goes `Logging → Abandoned → Destaging → Acked` (acknowledged once the
/// destager has it on the SAN). `WaitingForLogSpace` is the bounded wait of a full log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum WriteState {
    Received,
    WaitingForLogSpace,
    Logging,
    Logged,
    Abandoned,
    Gated,
    SanWriting,
    Acked,
    Destaging,
    Destaged,
    Clean,
}

pub const WRITE_STATES: usize = 11;

impl WriteState {
    fn index(self) -> usize {
        self as usize
    }
}

/// A host operation in flight.
pub(crate) enum PendingOp {
    Write(WriteOp),
    Read(ReadOp),
    Flush(FlushOp),
}

pub(crate) struct WriteOp {
    pub token: u64,
    pub lba: Lba,
    pub blocks: u32,
    pub data: Rc<Vec<u8>>,
    pub fua: bool,
    pub state: WriteState,
    /// When a bounded wait (log space, invariant-2 gate, SAN retries) gives up.
    pub deadline: u64,
    /// Set while a write-through SAN write waits for its retry time.
    pub retry: bool,
}

pub(crate) struct ReadOp {
    pub token: u64,
    pub lba: Lba,
    pub buf: Vec<u8>,
    pub parts_pending: usize,
    /// SAN parts (block offset, blocks) waiting for a retry.
    pub san_retry: Vec<(u32, u32)>,
    pub deadline: u64,
    /// Set when the read cannot succeed; reported once every part in flight is back.
    pub failed: Option<crate::engine::Status>,
}

pub(crate) struct FlushOp {
    pub token: u64,
    /// Write-through acknowledgements the flush must cover (`Volume::wt_acks` at submission).
    pub need: u64,
    pub deadline: u64,
}

/// An acknowledged (or abandoned) log entry not yet destaged, in sequence order.
#[derive(Clone, Debug)]
pub(crate) struct DirtyRecord {
    pub seq: LogSeq,
    pub lba: Lba,
    pub blocks: u32,
    /// Absolute log position of the entry header.
    pub pos: u64,
    /// Set when the log write failed: the data to destage, and the host op to acknowledge.
    pub memory: Option<(Rc<Vec<u8>>, u64)>,
}

/// SAN reachability and retry back-off (DESIGN.md: SAN down → retry with back-off, dirty data
/// stays in flash, the volume reports it).
pub(crate) struct SanHealth {
    pub reachable: bool,
    pub backoff_ns: u64,
    pub retry_at: u64,
    pub errors: u64,
}

impl SanHealth {
    pub fn failed(&mut self, now: u64) {
        self.errors += 1;
        if self.reachable {
            self.backoff_ns = SAN_BACKOFF_MIN_NS;
        } else {
            self.backoff_ns = (self.backoff_ns * 2).min(SAN_BACKOFF_MAX_NS);
        }
        self.reachable = false;
        self.retry_at = now + self.backoff_ns;
    }

    pub fn succeeded(&mut self) {
        self.reachable = true;
        self.backoff_ns = SAN_BACKOFF_MIN_NS;
    }

    pub fn may_try(&self, now: u64) -> bool {
        self.reachable || now >= self.retry_at
    }
}

/// Operator-visible numbers for one volume.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumeMetrics {
    pub id: VolumeId,
    pub requested: WritePolicy,
    pub effective: WritePolicy,
    pub reason: EffectiveReason,
    pub dirty_bytes: u64,
    pub dirty_entries: u64,
    pub destaged_bytes_total: u64,
    /// Exponentially weighted destage rate.
    pub destage_rate_bytes_per_s: f64,
    pub san_latency_ns_ewma: f64,
    pub san_reachable: bool,
    pub san_errors: u64,
    pub destage_depth: usize,
    /// Newest acknowledged sequence number minus the persisted watermark.
    pub watermark_lag_entries: u64,
    pub watermark: LogSeq,
    pub persisted_watermark: LogSeq,
    pub read_hits_dirty: u64,
    pub read_hits_clean: u64,
    pub read_misses: u64,
    pub log_full_waits: u64,
    pub log_full_fallthroughs: u64,
    pub gated_writes: u64,
    pub busy_returns: u64,
    /// How many times each [`WriteState`] was entered.
    pub state_entries: [u64; WRITE_STATES],
}

impl VolumeMetrics {
    /// Fraction of read blocks served from flash (dirty or clean).
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.read_hits_dirty + self.read_hits_clean;
        let total = hits + self.read_misses;
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }
}

pub(crate) struct Volume {
    pub id: VolumeId,
    pub epoch: Epoch,
    pub blocks: u64,
    pub requested: WritePolicy,
    pub read_cache: bool,
    pub san: Box<dyn San>,
    pub san_health: SanHealth,
    pub next_seq: LogSeq,
    /// Highest seq destaged and SAN-flushed (in memory).
    pub watermark: LogSeq,
    /// Watermark in the last durable superblock.
    pub persisted_watermark: LogSeq,
    pub intent: LogSeq,
    pub persisted_intent: LogSeq,
    pub index: DirtyIndex,
    /// Acknowledged entries with seq above `watermark`, in seq order (change it only through
    /// `push_dirty` / `pop_dirty`, which keep `dirty_bytes`).
    pub dirty: VecDeque<DirtyRecord>,
    dirty_bytes: u64,
    /// Destaged entries waiting for the persisted watermark to cover them.
    pub unpersisted: VecDeque<DirtyRecord>,
    pub ops: BTreeMap<u64, PendingOp>,
    /// Writes waiting for log space, in arrival order.
    pub space_waiters: VecDeque<u64>,
    /// Write-through writes waiting for their blocks to become clean (invariant 2).
    pub gated: VecDeque<u64>,
    /// Write-through writes waiting to retry on the SAN.
    pub san_retries: Vec<u64>,
    /// Reads waiting to retry SAN parts.
    pub read_retries: Vec<u64>,
    /// Host flushes waiting for a SAN flush.
    pub flushes: Vec<u64>,
    /// Counts write-through acknowledgements; a SAN flush submitted at count `c` makes the
    /// first `c` durable (invariant 6).
    pub wt_acks: u64,
    pub san_flushed_upto: u64,
    pub host_san_flush_in_flight: bool,
    pub destager: Destager,
    /// Destaged writes whose log write failed, acknowledged once the persisted watermark
    /// reaches their sequence number.
    pub acks_on_persist: Vec<(LogSeq, u64)>,
    pub metrics: VolumeMetrics,
}

impl Volume {
    pub fn new(spec: VolumeSpec) -> Volume {
        Volume {
            id: spec.id,
            epoch: spec.epoch,
            blocks: spec.blocks,
            requested: spec.policy,
            read_cache: spec.read_cache,
            san: spec.san,
            san_health: SanHealth { reachable: true, backoff_ns: SAN_BACKOFF_MIN_NS, retry_at: 0, errors: 0 },
            next_seq: LogSeq(1),
            watermark: LogSeq(0),
            persisted_watermark: LogSeq(0),
            intent: LogSeq(0),
            persisted_intent: LogSeq(0),
            index: DirtyIndex::default(),
            dirty: VecDeque::new(),
            dirty_bytes: 0,
            unpersisted: VecDeque::new(),
            ops: BTreeMap::new(),
            space_waiters: VecDeque::new(),
            gated: VecDeque::new(),
            san_retries: Vec::new(),
            read_retries: Vec::new(),
            flushes: Vec::new(),
            // A previous run may have left acknowledged write-through data in the SAN's cache:
            // the first host flush after start must flush the SAN (found by the simulator).
            wt_acks: 1,
            san_flushed_upto: 0,
            host_san_flush_in_flight: false,
            destager: Destager::new(),
            acks_on_persist: Vec::new(),
            metrics: VolumeMetrics {
                id: spec.id,
                requested: spec.policy,
                effective: spec.policy,
                reason: EffectiveReason::AsRequested,
                dirty_bytes: 0,
                dirty_entries: 0,
                destaged_bytes_total: 0,
                destage_rate_bytes_per_s: 0.0,
                san_latency_ns_ewma: 0.0,
                san_reachable: true,
                san_errors: 0,
                destage_depth: 1,
                watermark_lag_entries: 0,
                watermark: LogSeq(0),
                persisted_watermark: LogSeq(0),
                read_hits_dirty: 0,
                read_hits_clean: 0,
                read_misses: 0,
                log_full_waits: 0,
                log_full_fallthroughs: 0,
                gated_writes: 0,
                busy_returns: 0,
                state_entries: [0; WRITE_STATES],
            },
        }
    }

    /// Records a write state transition (counter + trace point).
    pub fn enter(&mut self, op_id: u64, from: WriteState, to: WriteState) {
        self.metrics.state_entries[to.index()] += 1;
        tracing::trace!(volume = self.id.0, op = op_id, ?from, ?to, "write state");
    }

    /// The newest acknowledged sequence number.
    pub fn last_acked_seq(&self) -> LogSeq {
        self.dirty.back().map(|r| r.seq).unwrap_or(self.watermark).max(self.watermark)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    pub fn push_dirty(&mut self, r: DirtyRecord) {
        assert!(self.dirty.back().is_none_or(|d| d.seq < r.seq), "volume: dirty entries out of order");
        self.dirty_bytes += r.blocks as u64 * BLOCK_SIZE_U64;
        self.dirty.push_back(r);
    }

    pub fn pop_dirty(&mut self) -> DirtyRecord {
        let r = self.dirty.pop_front().expect("volume: pop from an empty dirty queue");
        self.dirty_bytes -= r.blocks as u64 * BLOCK_SIZE_U64;
        r
    }
}
