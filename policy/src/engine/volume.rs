//! Per-volume state owned by the engine: identity, policy, sequence numbers and watermarks, the
//! dirty index, host operations in flight, SAN health as the front end sees it, metrics.
//!
//! The write state machine lives here as [`WriteState`]; every transition goes through
//! [`Volume::enter`], which counts it and emits a trace point (STYLE.md, "How state moves").

use std::collections::{HashMap, VecDeque};

use super::appender::Queued;
use crate::constants::{SAN_BACKOFF_MAX_NS, SAN_BACKOFF_MIN_NS};
use crate::engine::Status;
use crate::index::DirtyIndex;
use crate::io::AlignedBuf;
use crate::link::SanReport;
use crate::log::EntryKind;
use crate::policy::{EffectiveReason, WritePolicy};
use crate::types::{Epoch, IoToken, Lba, LogPos, LogSeq, OpId, VolumeId};

/// What the target configures for a volume on the engine's side.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    pub id: VolumeId,
    pub epoch: Epoch,
    pub blocks: u64,
    pub policy: WritePolicy,
    /// Insert clean copies of SAN reads into flash (read acceleration).
    pub read_cache: bool,
    /// The SAN unmaps and then reads zeroes: host Deallocate is logged and destaged as an
    /// unmap. Without it Deallocate is advisory and changes nothing.
    pub unmap: bool,
    /// Write-back+N: the nodes that keep a copy of every dirty entry (0, 1 or 2). Writes are
    /// acknowledged once every one of them has the entry durable too.
    pub replicas: Vec<String>,
    /// Set for a *replica copy*: this device keeps `source`'s entries of the volume (no host
    /// I/O, no destage unless an operator destages the copy by hand).
    pub source: Option<String>,
}

/// The life of a host write, with the work it waits for inside each state.
///
/// Write-back: `Received → Queued → Logging → Logged → Acked` (the destager then takes the
/// entry: `Destaged → Clean` are counted per entry, not per host op). Write-through:
/// `Received → Gated → SanWriting → Acked`. A write-back write whose log write failed goes
/// `Logging → Abandoned → Acked`, acknowledged once the persisted watermark covers it.
/// A write of a replicated volume waits in `Replicating` after `Logged` until every replica has
/// it durable (or, if a replica is lost meanwhile, goes `Abandoned`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteState {
    Received,
    /// In the appender's queue, waiting for the next frame or for log space.
    Queued {
        since_ns: u64,
    },
    /// In the frame at `frame`, whose write is on its way to flash.
    Logging {
        frame: LogPos,
    },
    /// Durable in the log as `seq`; acknowledged once every earlier frame is too.
    Logged {
        seq: LogSeq,
    },
    /// Durable in the local log and acknowledged in log order there; waiting for the replicas
    /// to report it durable.
    Replicating {
        seq: LogSeq,
    },
    /// Its log write failed (or a replica was lost before it had it): destaged from memory or
    /// the log, acknowledged when the persisted watermark reaches `seq`.
    Abandoned {
        seq: LogSeq,
    },
    /// Write-through, waiting until none of its blocks is dirty (invariant 2).
    Gated {
        deadline_ns: u64,
    },
    /// Write-through, at the SAN (or waiting to retry there).
    SanWriting {
        deadline_ns: u64,
        retry: bool,
    },
    Acked,
    /// Per-entry states counted for the operator: on the SAN, then covered by a persisted
    /// watermark.
    Destaged,
    Clean,
}

pub const WRITE_STATES: usize = 11;

impl WriteState {
    pub fn index(self) -> usize {
        match self {
            WriteState::Received => 0,
            WriteState::Queued { .. } => 1,
            WriteState::Logging { .. } => 2,
            WriteState::Logged { .. } => 3,
            WriteState::Abandoned { .. } => 4,
            WriteState::Gated { .. } => 5,
            WriteState::SanWriting { .. } => 6,
            WriteState::Acked => 7,
            WriteState::Destaged => 8,
            WriteState::Clean => 9,
            WriteState::Replicating { .. } => 10,
        }
    }

    pub fn name(index: usize) -> &'static str {
        [
            "received",
            "queued",
            "logging",
            "logged",
            "abandoned",
            "gated",
            "san_writing",
            "acked",
            "destaged",
            "clean",
            "replicating",
        ]
        .get(index)
        .copied()
        .unwrap_or("?")
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
    pub kind: EntryKind,
    pub lba: Lba,
    pub blocks: u64,
    /// The host's buffer while the engine holds it (not while a log or SAN write has it).
    pub buf: Option<AlignedBuf>,
    pub fua: bool,
    pub state: WriteState,
    /// A full log's write over dirty blocks, sent to the SAN at once (`write.rs`, "Full log"):
    /// every entry of its blocks below this sequence number is older than it.
    pub supersede: Option<LogSeq>,
}

pub(crate) struct ReadOp {
    pub token: u64,
    pub lba: Lba,
    /// The host's buffer; lent to the device while a read that covers all of it is in flight.
    pub buf: Option<AlignedBuf>,
    pub parts_pending: usize,
    /// SAN parts (block offset, blocks, into the read's own buffer) waiting for a retry.
    pub san_retry: Vec<(u32, u32, bool)>,
    pub deadline_ns: u64,
    /// Set when the read cannot succeed; reported once every part in flight is back.
    pub failed: Option<Status>,
    pub received_ns: u64,
    /// Served from flash only (for the front-end latency the destager watches).
    pub flash_only: bool,
}

pub(crate) struct FlushOp {
    pub token: u64,
    /// Write-through acknowledgements the flush must cover (`Volume::wt_acks` at submission).
    pub need: u64,
    pub deadline_ns: u64,
}

/// What a host SAN request (through the destager) is for.
pub(crate) enum SanOp {
    Write {
        op: OpId,
    },
    /// Part `off..off+n` of a read; `whole`: into the read's own buffer.
    Read {
        op: OpId,
        off: u32,
        n: u32,
        whole: bool,
    },
    Flush {
        covers: u64,
    },
}

/// A write of a replicated volume, durable in the local log (or handed to the destager),
/// waiting before it may be acknowledged (see `Engine::release_waiting`).
pub(crate) struct Waiting {
    pub seq: LogSeq,
    pub op: OpId,
    pub buf: Option<AlignedBuf>,
    /// The replicas cannot hold the promise for it (one was lost, one never got it, or the
    /// local log write failed): it is acknowledged only once it is on the SAN.
    pub needs_san: bool,
}

/// An acknowledged entry not yet covered by the persisted watermark, in sequence order.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DirtyMeta {
    pub seq: LogSeq,
    pub lba: Lba,
    pub blocks: u64,
    /// Log bytes of its data (0 for zeroes/unmap): what `dirty_bytes` reports.
    pub bytes: u64,
    /// A Write Zeroes or Deallocate entry (no write of its blocks supersedes while it is dirty).
    pub zeroes: bool,
}

impl DirtyMeta {
    pub fn of(h: &crate::log::EntryHeader) -> DirtyMeta {
        let zeroes = matches!(h.kind, EntryKind::Zeroes | EntryKind::Unmap);
        DirtyMeta { seq: h.seq, lba: h.lba, blocks: h.blocks as u64, bytes: h.data_bytes(), zeroes }
    }
}

/// SAN reachability and retry back-off for host commands (DESIGN.md: SAN down → retry with
/// back-off, dirty data stays in flash, the volume reports it).
pub(crate) struct SanHealth {
    pub reachable: bool,
    pub backoff_ns: u64,
    pub retry_at: u64,
    pub errors: u64,
    /// What the destager's last report said: when it comes back to reachable (a destage write
    /// or another host's command succeeded), so does this volume, without waiting for a host
    /// command of its own to succeed first.
    pub reported_reachable: bool,
}

impl SanHealth {
    pub fn new() -> SanHealth {
        SanHealth { reachable: true, backoff_ns: SAN_BACKOFF_MIN_NS, retry_at: 0, errors: 0, reported_reachable: true }
    }

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
    /// Log bytes of acknowledged data not yet covered by the persisted watermark.
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
    /// Writes of a full log over dirty blocks that went to the SAN at once.
    pub log_full_supersedes: u64,
    pub gated_writes: u64,
    pub busy_returns: u64,
    /// Blocks lost to a damaged log (reads of them fail), and reads refused for it.
    pub lost_blocks: u64,
    pub lost_reads: u64,
    /// How many times each [`WriteState`] was entered (index: [`WriteState::index`]).
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
    pub unmap: bool,
    pub next_seq: LogSeq,
    /// Highest seq destaged and SAN-flushed (what the destager reported).
    pub watermark: LogSeq,
    /// Watermark in the last durable superblock.
    pub persisted_watermark: LogSeq,
    /// Destage intent the destager asked for, and the one in the last durable superblock.
    pub intent: LogSeq,
    pub persisted_intent: LogSeq,
    pub index: DirtyIndex,
    /// Acknowledged entries above the persisted watermark, in seq order.
    pub dirty: VecDeque<DirtyMeta>,
    dirty_bytes: u64,
    /// Blocks of the Write Zeroes and Deallocate entries in `dirty`.
    dirty_zeroes: DirtyIndex,
    /// Superseding writes, from their SAN write until their `SanWritten` entry is acknowledged
    /// (`write.rs`, "Full log"), and the writes of their blocks that arrived while they were at
    /// the SAN, held out of the log until their entry is queued.
    pub supersedes: Vec<OpId>,
    pub held_writes: VecDeque<Queued>,
    /// Blocks of acknowledged superseding writes (keyed by their entries' sequence numbers)
    /// until the persisted watermark covers those entries: batches planned before the SAN
    /// write succeeded may still write them again (`destage/supersede.rs`), so a
    /// write-through write of them waits (invariant 2) and a full log's write supersedes them
    /// again.
    pub superseded: DirtyIndex,
    superseded_list: VecDeque<(LogSeq, Lba, u64)>,
    pub ops: HashMap<OpId, PendingOp>,
    /// Write-through writes waiting for their blocks to become clean (invariant 2).
    pub gated: VecDeque<OpId>,
    /// Write-through writes waiting to retry on the SAN.
    pub san_retries: Vec<OpId>,
    /// Reads waiting to retry SAN parts.
    pub read_retries: Vec<OpId>,
    /// Host flushes waiting for a SAN flush.
    pub flushes: Vec<OpId>,
    /// Counts write-through acknowledgements; a SAN flush submitted at count `c` makes the
    /// first `c` durable (invariant 6).
    pub wt_acks: u64,
    pub san_flushed_upto: u64,
    pub host_san_flush_in_flight: bool,
    /// Host SAN requests in flight through the destager.
    pub san_ops: HashMap<IoToken, SanOp>,
    pub san_health: SanHealth,
    /// Abandoned writes acknowledged once the persisted watermark reaches their seq.
    pub acks_on_persist: Vec<(LogSeq, OpId)>,
    /// Replication (source side): the replica nodes wanted, the links attached to them,
    /// writes durable here waiting for the replicas, and entries destaged but not yet known
    /// to every replica (invariant 2 with replicas, see `replicate.rs`).
    pub replicas: Vec<String>,
    /// How many copies the policy promises (write-back+N: N). The cluster may name fewer
    /// replicas than this while it has no eligible node; the volume is write-through then.
    pub copies: usize,
    pub links: Vec<crate::types::LinkId>,
    pub waiting: VecDeque<Waiting>,
    pub unpublished: DirtyIndex,
    pub unpublished_list: VecDeque<DirtyMeta>,
    /// Sequence numbers up to here belong to entries only a replica holds (see `poll_void`).
    pub void_upto: LogSeq,
    /// Replica copy side: the source node, the newest watermark it published (applied lazily
    /// to `watermark`), whether it asked to persist at once, when its last record came.
    pub source: Option<String>,
    pub published: LogSeq,
    pub publish_urgent: bool,
    pub last_record_ns: u64,
    /// Epoch in the last durable superblock.
    pub persisted_epoch: Epoch,
    /// Blocks whose newest acknowledged data a damaged log lost: reads fail until they are
    /// written again or an operator accepts the loss (kept in the superblock).
    pub lost: DirtyIndex,
    /// A replica copy that lost entries to damage, up to this sequence number: it reports
    /// holding nothing, so its source resyncs it, and it is whole again once the source's
    /// published watermark covers every entry it may have lost.
    pub copy_damaged: Option<LogSeq>,
    /// A replica copy this node destages to the volume's SAN itself, because the volume's owner
    /// was lost ([`crate::Engine::rescue_copy`]): its entries are indexed and handed to the
    /// destager like the node's own, and its source's links are refused.
    pub rescuing: bool,
    /// A rescue hands the destager the copy's entries up to `rescue_upto`; the destager has
    /// confirmed them up to `rescue_destaged`.
    pub rescue_upto: LogSeq,
    pub rescue_destaged: LogSeq,
    /// A rescued copy this node serves to hosts in its owner's place
    /// ([`crate::Engine::serve_copy`]): host commands are taken, write-through, reads from the
    /// SAN (the rescue put every acknowledged write there).
    pub serving: bool,
    /// Cluster mode (`EngineConfig::confirm_copies`): bumped whenever the volume's copies
    /// changed in a way the cluster's record must hear of (this start, a lost replica link);
    /// acknowledgements of writes wait in `held` while the cluster confirmed less.
    pub copies_changed: u64,
    pub copies_confirmed: u64,
    pub held: Vec<super::HostDone>,
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
            unmap: spec.unmap,
            next_seq: LogSeq(1),
            watermark: LogSeq(0),
            persisted_watermark: LogSeq(0),
            intent: LogSeq(0),
            persisted_intent: LogSeq(0),
            index: DirtyIndex::default(),
            dirty: VecDeque::new(),
            dirty_bytes: 0,
            dirty_zeroes: DirtyIndex::default(),
            supersedes: Vec::new(),
            held_writes: VecDeque::new(),
            superseded: DirtyIndex::default(),
            superseded_list: VecDeque::new(),
            ops: HashMap::new(),
            gated: VecDeque::new(),
            san_retries: Vec::new(),
            read_retries: Vec::new(),
            flushes: Vec::new(),
            // A previous run may have left acknowledged write-through data in the SAN's cache:
            // the first host flush after start must flush the SAN (found by the simulator).
            wt_acks: 1,
            san_flushed_upto: 0,
            host_san_flush_in_flight: false,
            san_ops: HashMap::new(),
            san_health: SanHealth::new(),
            acks_on_persist: Vec::new(),
            copies: spec.replicas.len(),
            replicas: spec.replicas,
            links: Vec::new(),
            waiting: VecDeque::new(),
            unpublished: DirtyIndex::default(),
            unpublished_list: VecDeque::new(),
            void_upto: LogSeq(0),
            source: spec.source,
            published: LogSeq(0),
            publish_urgent: false,
            last_record_ns: 0,
            persisted_epoch: Epoch(0),
            lost: DirtyIndex::default(),
            copy_damaged: None,
            rescuing: false,
            serving: false,
            rescue_upto: LogSeq(0),
            rescue_destaged: LogSeq(0),
            copies_changed: 0,
            copies_confirmed: 0,
            held: Vec::new(),
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
                log_full_supersedes: 0,
                gated_writes: 0,
                busy_returns: 0,
                lost_blocks: 0,
                lost_reads: 0,
                state_entries: [0; WRITE_STATES],
            },
        }
    }

    /// Records a write state transition (counter + trace point).
    pub fn enter(&mut self, op: OpId, from: WriteState, to: WriteState) {
        self.metrics.state_entries[to.index()] += 1;
        tracing::trace!(volume = self.id.0, op = op.0, ?from, ?to, "write state");
    }

    /// The newest acknowledged sequence number.
    pub fn last_acked_seq(&self) -> LogSeq {
        self.dirty.back().map(|r| r.seq).unwrap_or(self.persisted_watermark).max(self.persisted_watermark)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }

    /// Whether Write Zeroes or Deallocate entries of these blocks are dirty.
    pub fn zeroes_dirty(&self, lba: Lba, blocks: u64) -> bool {
        self.dirty_zeroes.overlaps(lba, blocks)
    }

    pub fn push_dirty(&mut self, r: DirtyMeta) {
        assert!(self.dirty.back().is_none_or(|d| d.seq < r.seq), "volume: dirty entries out of order");
        self.dirty_bytes += r.bytes;
        if r.zeroes {
            self.dirty_zeroes.insert(r.lba, r.blocks, r.seq, crate::index::DirtyLoc::Zero { unmap: false });
        }
        self.dirty.push_back(r);
    }

    /// A superseding write's entry `seq` was acknowledged: its blocks leave the index.
    pub fn supersede(&mut self, lba: Lba, blocks: u64, seq: LogSeq) {
        self.index.remove_clean(lba, blocks, LogSeq(seq.0 - 1));
        self.superseded.insert(lba, blocks, seq, crate::index::DirtyLoc::Zero { unmap: false });
        self.superseded_list.push_back((seq, lba, blocks));
    }

    /// Forgets the entries the persisted watermark now covers: their blocks leave the index
    /// (unless a newer entry holds them). With replicas attached, they stay in `unpublished`
    /// until every replica has persisted that watermark. Returns how many.
    pub fn persist_clean(&mut self) -> u64 {
        let mut n = 0;
        let track = !self.links.is_empty() && self.source.is_none();
        while self.superseded_list.front().is_some_and(|s| s.0 <= self.persisted_watermark) {
            let Some((_, lba, blocks)) = self.superseded_list.pop_front() else { break };
            self.superseded.remove_clean(lba, blocks, self.persisted_watermark);
        }
        while self.dirty.front().is_some_and(|r| r.seq <= self.persisted_watermark) {
            let Some(r) = self.dirty.pop_front() else { break };
            self.dirty_bytes -= r.bytes;
            if r.zeroes {
                self.dirty_zeroes.remove_clean(r.lba, r.blocks, self.persisted_watermark);
            }
            self.index.remove_clean(r.lba, r.blocks, self.persisted_watermark);
            if track {
                self.unpublished.insert(r.lba, r.blocks, r.seq, crate::index::DirtyLoc::Zero { unmap: false });
                self.unpublished_list.push_back(r);
            }
            self.metrics.state_entries[WriteState::Clean.index()] += 1;
            n += 1;
        }
        n
    }

    /// Entries every attached replica now knows are destaged leave `unpublished`.
    pub fn prune_unpublished(&mut self, replicas_watermark: LogSeq) {
        while self.unpublished_list.front().is_some_and(|r| r.seq <= replicas_watermark) {
            let Some(r) = self.unpublished_list.pop_front() else { break };
            self.unpublished.remove_clean(r.lba, r.blocks, replicas_watermark);
        }
    }

    /// Marks blocks lost (a damaged log entry held their newest data).
    pub fn mark_lost(&mut self, lba: Lba, blocks: u64) {
        self.lost.remove_range(lba, blocks);
        self.lost.insert(lba, blocks, LogSeq(u64::MAX), crate::index::DirtyLoc::Zero { unmap: false });
    }

    /// Blocks written again are no longer lost; returns whether anything changed.
    pub fn unlose(&mut self, lba: Lba, blocks: u64) -> bool {
        if self.lost.is_empty() || !self.lost.overlaps(lba, blocks) {
            return false;
        }
        self.lost.remove_range(lba, blocks);
        true
    }

    /// Whether this volume is a replica copy kept for another node.
    pub fn is_copy(&self) -> bool {
        self.source.is_some()
    }

    /// Whether this node destages the volume: its own, or a copy being rescued (or any copy,
    /// when `destage_copies`: an operator destages a replica's flash offline).
    pub fn destaged_here(&self, destage_copies: bool) -> bool {
        !self.is_copy() || destage_copies || self.rescuing
    }

    /// Whether write acknowledgements wait for the cluster to confirm the volume's copies.
    pub fn acks_held(&self) -> bool {
        self.copies_confirmed < self.copies_changed
    }

    pub fn apply_report(&mut self, r: &SanReport) {
        if r.reachable && !self.san_health.reported_reachable {
            self.san_health.succeeded();
        }
        self.san_health.reported_reachable = r.reachable;
        let m = &mut self.metrics;
        m.san_latency_ns_ewma = r.latency_ns_ewma;
        m.destage_rate_bytes_per_s = r.destage_rate_bytes_per_s;
        m.destage_depth = r.destage_depth;
        m.destaged_bytes_total = r.destaged_bytes_total;
        m.san_reachable = r.reachable && self.san_health.reachable;
        m.san_errors = r.errors + self.san_health.errors;
    }
}
