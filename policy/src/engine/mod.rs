//! The engine: the front half of a flash device, owned by the front-end reactor that appends to
//! its log. One engine per device, several volumes on it. It is the single owner the reactor
//! (or the simulator) drives: `submit` host operations with a token, `poll(now)` to make
//! progress (returns the work done, so an idle reactor may sleep), `on_message` for what the
//! destager says, and `drain_*` to collect finished host operations, messages for the destager
//! and events.
//!
//! Its parts are state machines that do no I/O; the engine alone carries out what they return:
//! - [`appender`]: group commit of writes into frames, ring space, acknowledgement order;
//! - [`superblock`]: one superblock write at a time, generations, retries;
//! - [`replay`]: log recovery, streaming the log in windows;
//! - and by concern, `impl Engine` in [`write`] (write-back, write-through and its gate, full
//!   log), [`read`] (index, log, cache, SAN) and [`flush`] (host flushes).
//!
//! The destager ([`crate::destage`]) is the back half, on another core: the engine tells it
//! which entries are dirty and sends it host SAN traffic; it answers with destaged watermarks,
//! intent requests and SAN completions ([`crate::link`]).
//!
//! Failures: a flash write error degrades the device (every volume effective write-through);
//! frames not yet acknowledged are abandoned and their entries destaged from memory, their
//! writes acknowledged once the persisted watermark covers them. A SAN error marks the SAN
//! unreachable with exponential back-off; host I/O that needs the SAN waits up to a deadline
//! and then gets `Status::Busy` (retryable), never a silent loss.

pub mod appender;
mod flush;
mod read;
pub mod replay;
pub mod replicate;
pub mod superblock;
pub mod volume;
mod write;

use std::collections::{BTreeMap, HashMap};

use crate::cache::{CacheKey, CleanCache};
use crate::constants::*;
use crate::index::DirtyLoc;
use crate::io::{AlignedBuf, BufPool, Flash, FlashInfo, IoDone};
use crate::link::{DirtyRecord, FromDestage, Pressure, ToDestage};
use crate::log::{FrameHeader, Layout, Ring, Superblock, SuperblockVolume};
use crate::policy::{EffectiveReason, WritePolicy};
use crate::types::{Epoch, Incarnation, IoToken, Lba, LinkId, LogPos, LogSeq, OpId, VolumeId};
use appender::{Appender, Frame, FrameEntry, FrameState};
use replay::{Replay, ReplayRead};
use replicate::Link;
pub use replicate::{CopyState, LinkStatus, RescueState, RING_BYTES_MIN};
use superblock::{SbSnapshot, SuperblockWriter};
use volume::{DirtyMeta, PendingOp, Volume};
pub use volume::{VolumeMetrics, VolumeSpec, WriteState, WRITE_STATES};

/// A host command for one volume. Buffers are the host's own (the transport received the data
/// into them); they come back in the [`HostDone`].
#[derive(Debug)]
pub enum HostOp {
    /// Fills `buf` (`blocks` blocks).
    Read {
        lba: Lba,
        blocks: u32,
        buf: AlignedBuf,
    },
    Write {
        lba: Lba,
        buf: AlignedBuf,
        fua: bool,
    },
    WriteZeroes {
        lba: Lba,
        blocks: u32,
    },
    /// Advisory unless the volume's SAN unmaps and reads zeroes (then logged like zeroes).
    Deallocate {
        lba: Lba,
        blocks: u32,
    },
    Flush,
}

/// How a host command ended; the target maps these to NVMe statuses in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Could not be done in time (log full and SAN unreachable, SAN down, invariant-2 wait);
    /// nothing was acknowledged, the host may retry (NVMe: a retryable status, DNR clear).
    Busy,
    InvalidRange,
    NotReady,
    UnknownVolume,
    MediumError,
}

#[derive(Debug)]
pub struct HostDone {
    pub volume: VolumeId,
    pub token: u64,
    pub status: Status,
    /// The host's buffer back (read data, or a written buffer to reuse).
    pub buf: Option<AlignedBuf>,
    /// For writes acknowledged through the log: the entry's sequence number.
    pub seq: Option<LogSeq>,
}

/// Deliberate bugs for mutation testing of the simulator's checkers. Never set outside tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Bugs {
    /// Write-through writes ignore dirty data of their blocks and, once acknowledged, drop it
    /// from the index, as a naive "the new write supersedes it" would (breaks invariant 2).
    pub skip_write_through_gate: bool,
    /// Log writes without FUA on a volatile-cache device (breaks invariants 1/6).
    pub no_fua_on_volatile_flash: bool,
    /// Host flushes complete without flushing the SAN (breaks invariant 6).
    pub host_flush_skips_san: bool,
    /// Writes of a replicated volume are acknowledged once the local log has them, without
    /// waiting for the replicas (a replica's copy then misses acknowledged writes).
    pub ack_before_replicas: bool,
    /// Write-through writes ignore blocks a replica may not know are destaged (its copy
    /// destaged later puts older data over them).
    pub skip_replica_gate: bool,
    /// Write acknowledgements are never held for the cluster (`confirm_copies`): a copy the
    /// record still names in sync then misses writes acknowledged after its link was lost.
    pub skip_ack_hold: bool,
    /// A copy's rescue (`rescue_copy`) destages every entry the log still holds, also those
    /// its source had destaged (which write-through writes may have overwritten since).
    pub rescue_ignores_watermark: bool,
    /// Replay takes the first damaged frame for the end of the log (as before damage was told
    /// from a torn tail): every intact entry after it is dropped, older data served.
    pub replay_stops_at_damage: bool,
    /// A full log's write over dirty blocks goes to the SAN as a plain write: the destager
    /// neither waits for its blocks' destage writes nor keeps older data of them off the SAN
    /// afterwards (only its logged entry does, for batches planned later).
    pub supersede_unfenced: bool,
    /// Blocks of an acknowledged superseding write count as clean at once, though batches
    /// planned before it may still write older data of them (write-through writes of them
    /// then go out without waiting).
    pub superseded_not_gated: bool,
    /// The destager neither holds a superseding write behind destage writes of its blocks in
    /// flight nor fences those not sent (`destage/supersede.rs`, steps 1 and 2).
    pub supersede_no_fence: bool,
    /// The destager lays no superseding write's data over the runs of batches planned before it
    /// succeeded (`destage/supersede.rs`, step 3).
    pub supersede_no_overlay: bool,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device_id: u64,
    /// Share of the device for clean cache slots.
    pub cache_percent: u32,
    /// With the log full, a write whose blocks are clean goes write-through at once; one over
    /// dirty blocks waits this long for log space, then goes write-through (gated).
    pub log_full_wait_ns: u64,
    /// How long a write-through write may wait for its blocks to be destaged.
    pub gate_timeout_ns: u64,
    /// How long host I/O waits on an unreachable SAN before `Busy`.
    pub san_timeout_ns: u64,
    /// Replica copies on the device are destaged like the node's own volumes (the offline
    /// `stagerctl flash destage` of a replica's flash); online they only wait for their source.
    pub destage_replica_copies: bool,
    /// The cluster keeps each volume's record, which names the replicas whose copies are in
    /// sync (`in_sync`): acknowledgements of writes wait whenever the volume's copies changed
    /// (at start, and when a link to a replica is lost) until the cluster has recorded them
    /// again ([`Engine::confirm_copies`]). So a copy the record names is never behind an
    /// acknowledged write, and a replica may destage it when the owner is lost.
    pub confirm_copies: bool,
    #[doc(hidden)]
    pub bugs: Bugs,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device_id: 1,
            cache_percent: 25,
            log_full_wait_ns: 5_000_000_000,
            gate_timeout_ns: 30_000_000_000,
            san_timeout_ns: 30_000_000_000,
            destage_replica_copies: false,
            confirm_copies: false,
            bugs: Bugs::default(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineState {
    Formatting,
    Recovering,
    Ready,
    /// Recovery or format could not complete; the reason says why.
    Failed(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    FlashDegraded,
    FlashHealthy,
    SanUnreachable {
        volume: VolumeId,
    },
    SanReachable {
        volume: VolumeId,
    },
    /// A replication link failed or was refused; the target closes its connection.
    LinkDown {
        link: LinkId,
        volume: VolumeId,
        why: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("flash device of {0} bytes is too small for a log")]
    DeviceTooSmall(u64),
    #[error("{0} volumes on one device, at most {VOLUMES_PER_DEVICE_MAX}")]
    TooManyVolumes(usize),
    #[error("{0} configured twice")]
    DuplicateVolume(VolumeId),
}

/// Where a block's newest data is, for white-box checks by the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    Memory(Vec<u8>),
    Flash(u64),
    Zero,
    San,
}

/// What log replay found, for `stagerctl flash inspect`.
#[derive(Clone, Debug, Default)]
pub struct ReplayReport {
    pub frames: u64,
    pub entries: u64,
    pub stop_reason: String,
    /// Acknowledged frames found damaged (later frames prove they were acknowledged).
    pub damaged_frames: u64,
    /// Entries lost to that damage (their blocks are marked lost), and damaged regions whose
    /// entries could not be read at all (every block of every volume above its watermark is
    /// then marked lost).
    pub lost_entries: u64,
    pub unknown_regions: u64,
    /// Blocks newly marked lost, over all volumes.
    pub lost_blocks: u64,
    /// Frame headers read from their mirror.
    pub repaired_headers: u64,
    /// What each damage was, for operators.
    pub damage: Vec<String>,
}

/// A read that keeps a flash location from being reused until it completes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Pin {
    Log(LogPos),
    Slot(u32),
}

pub(crate) enum FlashOp {
    Format,
    Replay(ReplayRead),
    Frame {
        pos: LogPos,
        submitted_ns: u64,
    },
    Superblock,
    /// Part `off..off+n` of a host read; `whole`: the read's own buffer is the target.
    HostRead {
        vi: usize,
        op: OpId,
        off: u32,
        n: u32,
        pin: Pin,
        whole: bool,
    },
    CacheFill {
        key: CacheKey,
        slot: u32,
    },
}

/// Recent host-visible flash latency against its best, for the destager's rate controller.
struct LatencyTracker {
    ewma_ns: f64,
    best_ns: f64,
}

impl LatencyTracker {
    fn observe(&mut self, ns: u64) {
        let l = ns as f64;
        self.ewma_ns = if self.ewma_ns == 0.0 { l } else { self.ewma_ns * 0.9 + l * 0.1 };
        // The best drifts up slowly, so a device that got slower for good resets it.
        self.best_ns = if l < self.best_ns { l } else { self.best_ns + (l - self.best_ns) / 4096.0 };
    }

    fn slowdown(&self) -> f32 {
        if self.ewma_ns == 0.0 || self.best_ns == f64::MAX {
            1.0
        } else {
            (self.ewma_ns / self.best_ns.max(1.0)) as f32
        }
    }
}

pub struct Engine {
    pub(crate) cfg: EngineConfig,
    pub(crate) info: FlashInfo,
    pub(crate) layout: Layout,
    pub(crate) state: EngineState,
    pub(crate) flash: Box<dyn Flash>,
    pub(crate) pool: BufPool,
    replay: Option<Replay>,
    replay_report: Option<ReplayReport>,
    /// Inspection only: replay, never write.
    read_only: bool,
    format_pending: u32,
    pub(crate) log: Appender,
    /// Log position where this incarnation's frames start (see the superblock).
    incarnation_start: LogPos,
    /// Tail recorded in the last durable superblock: space below it is reusable.
    pub(crate) persisted_tail: LogPos,
    pub(crate) pins: BTreeMap<LogPos, u32>,
    sb: SuperblockWriter,
    /// Time of the last flash write error while the device is degraded.
    pub(crate) degraded: Option<u64>,
    pub(crate) cache: CleanCache,
    pub(crate) volumes: Vec<Volume>,
    pub(crate) flash_ops: HashMap<IoToken, FlashOp>,
    next_id: u64,
    pub(crate) done: Vec<HostDone>,
    pub(crate) outbox: Vec<ToDestage>,
    /// Dirty records gathered during one poll, sent as one message per volume.
    dirty_out: Vec<Vec<DirtyRecord>>,
    pub(crate) events: Vec<EngineEvent>,
    scratch: Vec<IoDone>,
    /// Start messages are sent (the destager knows the volumes).
    started: bool,
    latency: LatencyTracker,
    commands_since_report: u64,
    pressure_at_ns: u64,
    /// `now` of the last poll.
    polled_ns: u64,
    pressure_sent: Pressure,
    pub(crate) fabric: Option<Box<dyn crate::io::Fabric>>,
    pub(crate) links: BTreeMap<LinkId, Link>,
    pub(crate) fabric_events: Vec<crate::io::FabricEvent>,
    /// Host reads of dirty data whose flash read failed, tried again when due
    /// (`FLASH_READ_RETRY_NS`).
    pub(crate) read_retries: Vec<read::ReadRetry>,
    /// When a failed flash read of dirty data, and a failed superblock write, were last logged.
    pub(crate) read_fail_logged_ns: Option<u64>,
    sb_fail_logged_ns: Option<u64>,
}

impl Engine {
    fn build(
        cfg: EngineConfig,
        flash: Box<dyn Flash>,
        specs: Vec<VolumeSpec>,
        layout: Layout,
    ) -> Result<Engine, EngineError> {
        if specs.len() > VOLUMES_PER_DEVICE_MAX {
            return Err(EngineError::TooManyVolumes(specs.len()));
        }
        for (i, s) in specs.iter().enumerate() {
            if specs[..i].iter().any(|o| o.id == s.id) {
                return Err(EngineError::DuplicateVolume(s.id));
            }
        }
        let info = flash.info();
        let n = specs.len();
        let mut volumes: Vec<Volume> = specs.into_iter().map(Volume::new).collect();
        if cfg.confirm_copies {
            // Nothing is acknowledged before the cluster has heard of this start.
            for v in volumes.iter_mut().filter(|v| !v.is_copy()) {
                v.copies_changed = 1;
            }
        }
        Ok(Engine {
            cfg,
            info,
            flash,
            layout,
            state: EngineState::Recovering,
            pool: BufPool::new(256),
            replay: None,
            replay_report: None,
            read_only: false,
            format_pending: 0,
            log: Appender::new(Ring::new(layout.log_bytes, LogPos(0)), Incarnation(1)),
            incarnation_start: LogPos(0),
            persisted_tail: LogPos(0),
            pins: BTreeMap::new(),
            sb: SuperblockWriter::new(0),
            degraded: None,
            cache: CleanCache::new(layout.cache_slots as u32),
            volumes,
            flash_ops: HashMap::new(),
            next_id: 1,
            done: Vec::new(),
            outbox: Vec::new(),
            dirty_out: (0..n).map(|_| Vec::new()).collect(),
            events: Vec::new(),
            scratch: Vec::new(),
            started: false,
            latency: LatencyTracker { ewma_ns: 0.0, best_ns: f64::MAX },
            commands_since_report: 0,
            pressure_at_ns: 0,
            polled_ns: 0,
            pressure_sent: Pressure::default(),
            fabric: None,
            links: BTreeMap::new(),
            fabric_events: Vec::new(),
            read_retries: Vec::new(),
            read_fail_logged_ns: None,
            sb_fail_logged_ns: None,
        })
    }

    /// Formats a fresh device for these volumes (asynchronously: `Ready` once both superblock
    /// copies are durable).
    pub fn format(cfg: EngineConfig, flash: Box<dyn Flash>, specs: Vec<VolumeSpec>) -> Result<Engine, EngineError> {
        let size = flash.info().size_bytes;
        let layout = Layout::for_device(size, cfg.cache_percent).ok_or(EngineError::DeviceTooSmall(size))?;
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        e.bump_replicated_epochs();
        e.state = EngineState::Formatting;
        for generation in [1, 2] {
            let sb = e.superblock(generation, LogPos(0));
            let mut buf = e.pool.get(BLOCK_SIZE);
            sb.encode_into(&mut buf);
            let token = e.token(FlashOp::Format);
            e.flash.submit_write(token, Superblock::copy_offset(generation), buf, Vec::new(), true);
        }
        e.format_pending = 2;
        e.sb = SuperblockWriter::new(2);
        Ok(e)
    }

    /// Opens a formatted device: replays its log (asynchronously: `Ready` once replay is done
    /// and the new incarnation is durable).
    pub fn open(cfg: EngineConfig, flash: Box<dyn Flash>, specs: Vec<VolumeSpec>) -> Result<Engine, EngineError> {
        let size = flash.info().size_bytes;
        let layout = Layout::for_device(size, cfg.cache_percent).ok_or(EngineError::DeviceTooSmall(size))?;
        let device_id = cfg.device_id;
        let stops_at_damage = cfg.bugs.replay_stops_at_damage;
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        let ids = e.volume_ids();
        let mut replay = Replay::new(layout, Some((device_id, ids)));
        replay.stops_at_damage = stops_at_damage;
        e.replay = Some(replay);
        Ok(e)
    }

    /// Opens a formatted device only to read it: the superblock's own layout, device id and
    /// volumes, so replay rebuilds what the log holds without any configuration. Nothing is
    /// ever written. Poll until [`Engine::replay_done`], then read the metrics.
    pub fn open_for_inspection(flash: Box<dyn Flash>, sb: &Superblock) -> Result<Engine, EngineError> {
        let layout = Layout {
            log_start: sb.log_start,
            log_bytes: sb.log_bytes,
            cache_start: sb.cache_start,
            cache_slots: sb.cache_slots,
        };
        if layout.log_bytes < LOG_BYTES_MIN || !layout.log_bytes.is_multiple_of(BLOCK_SIZE_U64) {
            return Err(EngineError::DeviceTooSmall(flash.info().size_bytes));
        }
        let cfg = EngineConfig { device_id: sb.device_id, destage_replica_copies: true, ..EngineConfig::default() };
        let specs = sb
            .volumes
            .iter()
            .map(|v| VolumeSpec {
                id: v.id,
                epoch: v.epoch,
                blocks: v.blocks,
                policy: WritePolicy::WriteBack,
                read_cache: false,
                unmap: false,
                replicas: Vec::new(),
                source: v.source.clone(),
            })
            .collect();
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        e.read_only = true;
        e.replay = Some(Replay::new(layout, None));
        Ok(e)
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// A replicated volume starts every run at a new epoch (persisted before any replica
    /// attaches), so a stale copy of this node — an old device image, a second node configured
    /// with the same volume — is refused by replicas that saw a newer one (invariant 5).
    fn bump_replicated_epochs(&mut self) {
        for v in self.volumes.iter_mut().filter(|v| v.copies > 0) {
            v.epoch = v.epoch.next();
        }
    }

    /// True once log replay has finished (or failed): the index and dirty lists are rebuilt.
    pub fn replay_done(&self) -> bool {
        self.replay.is_none() || !matches!(self.state, EngineState::Recovering | EngineState::Formatting)
    }

    /// What replay found (after [`Engine::replay_done`] on an opened device).
    pub fn replay_report(&self) -> Option<&ReplayReport> {
        self.replay_report.as_ref()
    }

    pub fn device_id(&self) -> u64 {
        self.cfg.device_id
    }

    /// Whether any flash operation is outstanding (a driver keeps polling while so).
    pub fn io_in_flight(&self) -> bool {
        !self.flash_ops.is_empty() || self.volumes.iter().any(|v| !v.san_ops.is_empty())
    }

    /// Host operations accepted and not yet completed, over all volumes.
    pub fn host_ops_in_flight(&self) -> usize {
        self.volumes.iter().map(|v| v.ops.len()).sum()
    }

    /// Bytes of clean (already destaged or read-filled) copies of `id`'s blocks in the cache.
    pub fn clean_cached_bytes(&self, id: VolumeId) -> u64 {
        self.cache.resident_for(id) as u64 * BLOCK_SIZE_U64
    }

    /// Flash bytes set aside for clean cache slots.
    pub fn cache_capacity_bytes(&self) -> u64 {
        self.layout.cache_slots * BLOCK_SIZE_U64
    }

    pub(crate) fn next_id(&mut self) -> u64 {
        let t = self.next_id;
        self.next_id += 1;
        t
    }

    pub(crate) fn token(&mut self, op: FlashOp) -> IoToken {
        let t = IoToken(self.next_id());
        self.flash_ops.insert(t, op);
        t
    }

    pub(crate) fn superblock(&self, generation: u64, tail: LogPos) -> Superblock {
        Superblock {
            device_id: self.cfg.device_id,
            generation,
            incarnation: self.log.incarnation,
            log_tail: tail,
            incarnation_start: self.incarnation_start,
            log_start: self.layout.log_start,
            log_bytes: self.layout.log_bytes,
            cache_start: self.layout.cache_start,
            cache_slots: self.layout.cache_slots,
            volumes: self
                .volumes
                .iter()
                .map(|v| SuperblockVolume {
                    id: v.id,
                    epoch: v.epoch,
                    blocks: v.blocks,
                    watermark: v.watermark,
                    intent: v.intent,
                    source: v.source.clone(),
                })
                .collect(),
            lost: self.lost_ranges(),
        }
    }

    /// Every volume's lost blocks as superblock ranges. If they do not all fit, a volume's
    /// ranges give way to one range over the whole volume (reads of more blocks fail than need
    /// to, none that should not).
    fn lost_ranges(&self) -> Vec<crate::log::LostRange> {
        use crate::log::superblock::LOST_MAX;
        let mut out = Vec::new();
        for v in &self.volumes {
            let mut mine: Vec<crate::log::LostRange> = Vec::new();
            for (lba, e) in v.lost.iter() {
                let mut at = lba.0;
                let mut left = e.blocks;
                while left > 0 {
                    let n = left.min(u32::MAX as u64);
                    mine.push(crate::log::LostRange { volume: v.id, lba: Lba(at), blocks: n as u32 });
                    at += n;
                    left -= n;
                }
            }
            if out.len() + mine.len() > LOST_MAX {
                mine = vec![crate::log::LostRange {
                    volume: v.id,
                    lba: Lba(0),
                    blocks: v.blocks.min(u32::MAX as u64) as u32,
                }];
            }
            if out.len() + mine.len() <= LOST_MAX {
                out.extend(mine);
            }
        }
        out
    }

    /// An operator accepts that a volume's lost blocks are gone: reads of them return whatever
    /// the SAN holds again. Returns how many blocks were marked.
    pub fn accept_loss(&mut self, id: VolumeId) -> Option<u64> {
        let vi = self.volume_index(id)?;
        let n = self.volumes[vi].lost.len();
        if n > 0 {
            tracing::warn!(
                volume = id.0,
                blocks = n,
                "loss accepted by the operator: lost blocks read from the SAN again"
            );
            self.volumes[vi].lost = crate::index::DirtyIndex::default();
            self.sb.want();
        }
        Some(n)
    }

    pub(crate) fn volume_index(&self, id: VolumeId) -> Option<usize> {
        self.volumes.iter().position(|v| v.id == id)
    }

    pub fn volume_ids(&self) -> Vec<VolumeId> {
        self.volumes.iter().map(|v| v.id).collect()
    }

    /// Whether writes are acknowledged from the log right now.
    pub(crate) fn effective(&self, vi: usize) -> (WritePolicy, EffectiveReason) {
        if self.volumes[vi].serving {
            // A rescued copy served in its owner's place keeps no log of its own.
            return (WritePolicy::WriteThrough, EffectiveReason::ServingRescuedCopy);
        }
        let (p, why) = WritePolicy::effective(self.volumes[vi].requested, self.degraded.is_some());
        if p == WritePolicy::WriteBack {
            if let Some(why) = self.replication_effective(vi) {
                return (WritePolicy::WriteThrough, why);
            }
        }
        (p, why)
    }

    /// Changes a volume's requested policy (live). Switching to write-through makes the
    /// destager drain everything dirty; writes arriving meanwhile are gated (invariant 2).
    pub fn set_policy(&mut self, id: VolumeId, policy: WritePolicy) -> bool {
        let Some(vi) = self.volume_index(id) else { return false };
        tracing::info!(volume = id.0, %policy, "requested write policy");
        self.volumes[vi].requested = policy;
        true
    }

    pub fn drain_completions(&mut self, out: &mut Vec<HostDone>) {
        out.append(&mut self.done);
    }

    /// Messages for the destager, in order.
    pub fn drain_outbox(&mut self, out: &mut Vec<ToDestage>) {
        self.flush_dirty_out();
        out.append(&mut self.outbox);
    }

    pub fn drain_events(&mut self, out: &mut Vec<EngineEvent>) {
        out.append(&mut self.events);
    }

    pub fn flash_degraded(&self) -> bool {
        self.degraded.is_some()
    }

    /// Whether the flash keeps failing: degraded, with an error within the last second (as of
    /// the last poll). One error and a log slow to drain keep the device degraded for a while
    /// but do not count; a dead device fails every write and read it is given.
    pub fn flash_failing(&self) -> bool {
        self.degraded.is_some_and(|t| self.polled_ns < t + FLASH_FAILING_WINDOW_NS)
    }

    /// True when nothing is dirty, nothing is in flight and the superblock is current.
    pub fn is_quiescent(&self) -> bool {
        self.state == EngineState::Ready
            && self.volumes.iter().all(|v| {
                (v.dirty.is_empty() || !v.destaged_here(self.cfg.destage_replica_copies))
                    && v.ops.is_empty()
                    && v.index.is_empty()
                    && v.san_ops.is_empty()
                    && v.waiting.is_empty()
            })
            && self.flash_ops.is_empty()
            && self.log.is_idle()
            && self.sb.is_idle()
            && self.persisted_tail == self.log.tail()
    }

    pub fn volume_metrics(&self, id: VolumeId) -> Option<VolumeMetrics> {
        let vi = self.volume_index(id)?;
        let (effective, reason) = self.effective(vi);
        let v = &self.volumes[vi];
        let mut m = v.metrics.clone();
        m.requested = v.requested;
        m.effective = effective;
        m.reason = reason;
        m.dirty_bytes = v.dirty_bytes();
        m.dirty_entries = v.dirty.len() as u64;
        m.watermark = v.watermark;
        m.persisted_watermark = v.persisted_watermark;
        m.watermark_lag_entries = v.last_acked_seq().0 - v.persisted_watermark.0;
        m.lost_blocks = v.lost.len();
        Some(m)
    }

    /// Log bytes in use (from the reclaim floor to the head).
    pub fn log_used_bytes(&self) -> u64 {
        self.log.ring.used(self.reclaim_floor())
    }

    /// Absolute position of the log head (grows past the capacity once the log wraps).
    pub fn log_head(&self) -> LogPos {
        self.log.ring.head
    }

    /// The incarnation frames are written in now.
    pub fn incarnation(&self) -> Incarnation {
        self.log.incarnation
    }

    /// Device offset of an absolute log position.
    pub fn log_offset(&self, pos: LogPos) -> u64 {
        self.layout.log_offset(pos)
    }

    pub fn log_capacity_bytes(&self) -> u64 {
        self.log.ring.capacity()
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Where a block's newest data lives (simulator checks; not for the I/O path).
    pub fn locate(&self, id: VolumeId, lba: Lba) -> Option<Located> {
        let v = &self.volumes[self.volume_index(id)?];
        if let Some((_, loc)) = v.index.get(lba) {
            return Some(match loc {
                DirtyLoc::Log { data_pos } => Located::Flash(self.layout.log_offset(data_pos)),
                DirtyLoc::Zero { .. } => Located::Zero,
                DirtyLoc::Memory { buf, first_block } => {
                    let o = first_block as usize * BLOCK_SIZE;
                    Located::Memory(buf[o..o + BLOCK_SIZE].to_vec())
                }
            });
        }
        Some(match self.cache.peek((id, lba)) {
            Some(slot) => Located::Flash(self.layout.slot_offset(slot)),
            None => Located::San,
        })
    }

    pub(crate) fn complete(
        &mut self,
        vi: usize,
        token: u64,
        status: Status,
        buf: Option<AlignedBuf>,
        seq: Option<LogSeq>,
    ) {
        if status == Status::Busy {
            self.volumes[vi].metrics.busy_returns += 1;
        }
        self.done.push(HostDone { volume: self.volumes[vi].id, token, status, buf, seq });
    }

    /// A write's successful acknowledgement: out now, or held while the cluster has not
    /// confirmed the volume's copies since they changed (`EngineConfig::confirm_copies`).
    pub(crate) fn ack_write(&mut self, vi: usize, token: u64, buf: Option<AlignedBuf>, seq: Option<LogSeq>) {
        let v = &mut self.volumes[vi];
        let done = HostDone { volume: v.id, token, status: Status::Ok, buf, seq };
        if v.acks_held() && !self.cfg.bugs.skip_ack_hold {
            v.held.push(done);
        } else {
            self.done.push(done);
        }
    }

    /// The volume's copies changed in a way the cluster's record must hear of before another
    /// write is acknowledged (cluster mode only).
    pub(crate) fn copies_changed(&mut self, vi: usize) {
        if self.cfg.confirm_copies && !self.volumes[vi].is_copy() {
            let v = &mut self.volumes[vi];
            v.copies_changed += 1;
            tracing::info!(
                volume = v.id.0,
                generation = v.copies_changed,
                "write acknowledgements wait until the cluster records the volume's copies"
            );
        }
    }

    /// The cluster recorded the volume's copies as they were at `generation` (what
    /// [`Engine::copies_generation`] said when it read the replicas' states): the
    /// acknowledgements held since are let out, unless the copies changed again since.
    /// Returns how many were let out.
    pub fn confirm_copies(&mut self, volume: VolumeId, generation: u64) -> Result<usize, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no {volume} here"))?;
        let v = &mut self.volumes[vi];
        if v.is_copy() {
            return Err(format!("{volume} is a copy kept for another node here"));
        }
        if generation > v.copies_changed {
            return Err(format!("{volume}: generation {generation} is newer than {}", v.copies_changed));
        }
        v.copies_confirmed = v.copies_confirmed.max(generation);
        if v.acks_held() {
            return Ok(0);
        }
        let n = v.held.len();
        self.done.append(&mut v.held);
        Ok(n)
    }

    /// While this node was taken for gone, a replica destaged its copy of `volume` up to
    /// `upto` (the owner's own sequence numbers): the SAN now holds every write this node
    /// acknowledged, and the rescue's writes may have gone over data this node wrote to the
    /// SAN after its replica was lost. So: every acknowledgement still held is failed
    /// (retryable, never Ok: its data may have been overwritten); the watermark and the
    /// sequence numbers move past `upto` (the destager must have skipped to `upto` first,
    /// `Destager::skip_to`); the volume's clean cache is dropped (it may hold data the rescue
    /// overwrote). Entries above `upto` stay dirty and are destaged as usual: none of them was
    /// acknowledged. With `served` (another node served the volume meanwhile, so the SAN holds
    /// writes newer than any entry here) there must be none: `upto` must cover every entry
    /// ([`Engine::last_seq`]; the destager skipped that far), since destaging one would put old
    /// data over a newer write; and no host command may be in flight (one logged but not
    /// acknowledged yet could be acknowledged after its entry was dropped).
    /// Returns how many acknowledgements were failed.
    pub fn absorb_rescue(&mut self, volume: VolumeId, upto: LogSeq, served: bool) -> Result<usize, String> {
        let vi = self.volume_index(volume).ok_or_else(|| format!("no {volume} here"))?;
        if self.volumes[vi].is_copy() {
            return Err(format!("{volume} is a copy kept for another node here"));
        }
        // Writes whose log write failed wait for the SAN and a persisted watermark (and, on a
        // replicated volume, writes waiting for their replicas): on a flash that fails (the usual
        // reason for a rescue while this node runs) the persisted watermark never comes. They
        // are failed, retryably, like the held acknowledgements: the host writes them again.
        let persisting = std::mem::take(&mut self.volumes[vi].acks_on_persist);
        let waiting = std::mem::take(&mut self.volumes[vi].waiting);
        let unpersisted = persisting.len() + waiting.len();
        let ops = persisting.into_iter().map(|(_, op)| (op, None)).chain(waiting.into_iter().map(|w| (w.op, w.buf)));
        for (op, buf) in ops.collect::<Vec<_>>() {
            if let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) {
                self.complete(vi, w.token, Status::Busy, buf.or(w.buf), None);
            } else {
                self.pool.put_opt(buf);
            }
        }
        if unpersisted > 0 {
            tracing::warn!(
                volume = volume.0,
                failed = unpersisted,
                "writes waiting for a persisted watermark or their replicas are failed (retryable)"
            );
        }
        if served {
            let v = &self.volumes[vi];
            // Held acknowledgements are not in `ops`: they are failed below.
            if !v.ops.is_empty() {
                return Err(format!(
                    "{} host command(s) in flight: they must finish before entries newer than the rescue are dropped",
                    v.ops.len()
                ));
            }
            let last = LogSeq(v.next_seq.0.saturating_sub(1));
            if last > upto {
                return Err(format!("entries up to seq {} are newer than seq {}: skip past them too", last.0, upto.0));
            }
        }
        let v = &mut self.volumes[vi];
        let mut failed = std::mem::take(&mut v.held);
        for d in &mut failed {
            d.status = Status::Busy;
            d.seq = None;
        }
        let n = failed.len();
        self.done.append(&mut failed);
        let v = &mut self.volumes[vi];
        let blocks = v.blocks;
        if upto > v.watermark {
            let from = v.dirty.partition_point(|r| r.seq <= v.watermark);
            let to = v.dirty.partition_point(|r| r.seq <= upto);
            v.metrics.state_entries[WriteState::Destaged.index()] += (to - from) as u64;
            // Reads of those blocks go to the SAN from now on, not when the watermark is
            // persisted: after a node served the volume the log's data is older than the SAN's.
            for i in from..to {
                let r = v.dirty[i];
                v.index.remove_clean(r.lba, r.blocks, upto);
            }
            v.watermark = upto;
        }
        v.next_seq = v.next_seq.max(upto.next());
        if served {
            // Every entry is at or below `upto` (checked above), and the SAN may hold newer data
            // than any of them: none may be read from here, even before the watermark is
            // persisted. The other node's write-through writes may sit in the SAN's cache: the
            // next host flush goes to the SAN.
            v.index = crate::index::DirtyIndex::default();
            v.wt_acks += 1;
        }
        self.cache.invalidate_range(volume, Lba(0), blocks);
        tracing::warn!(
            volume = volume.0,
            upto = upto.0,
            failed = n,
            "a replica destaged this volume while this node was taken for gone: entries up to the rescue are \
             on the SAN; held acknowledgements failed, clean cache dropped"
        );
        self.reclaim();
        self.sb.want();
        Ok(n)
    }

    /// The newest sequence number `volume` handed out (its newest entry, acknowledged or not).
    pub fn last_seq(&self, volume: VolumeId) -> Option<LogSeq> {
        self.volume_index(volume).map(|vi| LogSeq(self.volumes[vi].next_seq.0.saturating_sub(1)))
    }

    /// The volume's copies generation and the generation the cluster confirmed last.
    pub fn copies_generation(&self, volume: VolumeId) -> Option<(u64, u64)> {
        let v = &self.volumes[self.volume_index(volume)?];
        Some((v.copies_changed, v.copies_confirmed))
    }

    /// How many write acknowledgements wait for the cluster (see `confirm_copies`).
    pub fn held_acks(&self, volume: VolumeId) -> usize {
        self.volume_index(volume).map_or(0, |vi| self.volumes[vi].held.len())
    }

    fn reject(&mut self, id: VolumeId, token: u64, status: Status, buf: Option<AlignedBuf>) {
        self.done.push(HostDone { volume: id, token, status, buf, seq: None });
    }

    /// Submits a host command; its completion comes out of `drain_completions`.
    pub fn submit(&mut self, id: VolumeId, token: u64, op: HostOp, now: u64) {
        let Some(vi) = self.volume_index(id).filter(|&vi| !self.volumes[vi].is_copy() || self.volumes[vi].serving)
        else {
            return self.reject(id, token, Status::UnknownVolume, op.into_buf());
        };
        if self.state != EngineState::Ready || self.read_only {
            return self.reject(id, token, Status::NotReady, op.into_buf());
        }
        if self.volumes[vi].ops.len() >= HOST_OPS_PER_VOLUME_MAX {
            return self.reject(id, token, Status::Busy, op.into_buf());
        }
        self.commands_since_report += 1;
        let vblocks = self.volumes[vi].blocks;
        let in_range = |lba: Lba, n: u64| n > 0 && lba.0.checked_add(n).is_some_and(|e| e <= vblocks);
        match op {
            HostOp::Write { lba, buf, fua } => {
                let blocks = (buf.len() / BLOCK_SIZE) as u64;
                if buf.len() % BLOCK_SIZE != 0 || blocks > WRITE_BLOCKS_MAX as u64 || !in_range(lba, blocks) {
                    return self.reject(id, token, Status::InvalidRange, Some(buf));
                }
                self.start_write(vi, token, crate::log::EntryKind::Write, lba, blocks, Some(buf), fua, now);
            }
            HostOp::WriteZeroes { lba, blocks } => {
                if !in_range(lba, blocks as u64) {
                    return self.reject(id, token, Status::InvalidRange, None);
                }
                self.start_write(vi, token, crate::log::EntryKind::Zeroes, lba, blocks as u64, None, false, now);
            }
            HostOp::Deallocate { lba, blocks } => {
                if !in_range(lba, blocks as u64) {
                    return self.reject(id, token, Status::InvalidRange, None);
                }
                if !self.volumes[vi].unmap {
                    // Advisory: the namespace does not promise zeroes after a deallocation.
                    return self.complete(vi, token, Status::Ok, None, None);
                }
                self.start_write(vi, token, crate::log::EntryKind::Unmap, lba, blocks as u64, None, false, now);
            }
            HostOp::Read { lba, blocks, buf } => {
                if !in_range(lba, blocks as u64)
                    || buf.len() != blocks as usize * BLOCK_SIZE
                    || blocks > WRITE_BLOCKS_MAX
                {
                    return self.reject(id, token, Status::InvalidRange, Some(buf));
                }
                self.start_read(vi, token, lba, blocks, buf, now);
            }
            HostOp::Flush => self.start_flush(vi, token, now),
        }
    }

    /// What the destager says.
    pub fn on_message(&mut self, msg: FromDestage, now: u64) {
        match msg {
            FromDestage::NeedIntent { volume, upto } => {
                let Some(vi) = self.volume_index(volume) else { return };
                let v = &mut self.volumes[vi];
                if upto > v.intent {
                    v.intent = upto;
                    self.sb.want();
                } else if upto <= v.persisted_intent {
                    self.outbox.push(ToDestage::IntentPersisted { volume, intent: v.persisted_intent });
                }
            }
            FromDestage::Destaged { volume, watermark } => {
                let Some(vi) = self.volume_index(volume) else { return };
                let v = &mut self.volumes[vi];
                if v.rescuing {
                    v.rescue_destaged = v.rescue_destaged.max(watermark);
                }
                if watermark <= v.watermark {
                    return;
                }
                let from = v.dirty.partition_point(|r| r.seq <= v.watermark);
                let to = v.dirty.partition_point(|r| r.seq <= watermark);
                v.metrics.state_entries[WriteState::Destaged.index()] += (to - from) as u64;
                v.watermark = watermark;
                self.reclaim();
                self.sb.want();
            }
            FromDestage::SanDone { volume, token, result, buf } => {
                let Some(vi) = self.volume_index(volume) else { return };
                self.on_san_done(vi, token, result, buf, now);
            }
            FromDestage::Report { volume, report } => {
                let Some(vi) = self.volume_index(volume) else { return };
                self.volumes[vi].apply_report(&report);
            }
        }
    }

    /// Makes progress on everything: device completions, acknowledgements, frames, superblock,
    /// waiting writes, retries. Returns how much work was done (0 = idle).
    pub fn poll(&mut self, now: u64) -> usize {
        self.polled_ns = now;
        let mut work = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.flash.poll_completions(&mut scratch);
        for done in scratch.drain(..) {
            work += 1;
            self.on_flash_done(done, now);
        }
        self.scratch = scratch;
        match self.state {
            EngineState::Recovering => {
                work += self.poll_replay();
                work += self.poll_superblock(now);
                return work;
            }
            EngineState::Ready => {}
            _ => return work,
        }
        if self.read_only {
            return work;
        }
        if !self.started {
            self.started = true;
            self.send_start();
        }
        work += self.poll_fabric(now);
        work += self.advance_acks(now);
        self.reclaim();
        work += self.poll_replication(now);
        work += self.cut_frames(now);
        work += self.poll_queue(now);
        for vi in 0..self.volumes.len() {
            work += self.poll_gated(vi, now);
            work += self.poll_retries(vi, now);
            work += self.poll_flushes(vi, now);
        }
        work += self.poll_superblock(now);
        work += self.poll_degraded(now);
        work += self.poll_flash_read_retries(now);
        self.report_pressure(now);
        self.flush_dirty_out();
        work
    }

    fn send_start(&mut self) {
        for vi in 0..self.volumes.len() {
            let v = &self.volumes[vi];
            if !v.destaged_here(self.cfg.destage_replica_copies) {
                continue;
            }
            self.outbox.push(ToDestage::Start {
                volume: v.id,
                watermark: v.persisted_watermark,
                intent: v.persisted_intent,
            });
        }
        // Dirty records found by replay follow their volume's Start.
        for vi in 0..self.volumes.len() {
            let records = std::mem::take(&mut self.dirty_out[vi]);
            if !records.is_empty() {
                self.outbox.push(ToDestage::Dirty { volume: self.volumes[vi].id, records });
            }
        }
    }

    /// Sends the dirty records gathered so far, one message per volume (before anything that
    /// must follow them: the destager sees each volume's log in order).
    pub(crate) fn flush_dirty_out(&mut self) {
        if !self.started {
            return;
        }
        for vi in 0..self.volumes.len() {
            if !self.dirty_out[vi].is_empty() {
                let records = std::mem::take(&mut self.dirty_out[vi]);
                self.outbox.push(ToDestage::Dirty { volume: self.volumes[vi].id, records });
            }
        }
    }

    /// Tells the destager how the front end is doing: every `PRESSURE_EVERY_NS` while it
    /// changes, at least once a second otherwise (an idle node sends next to nothing).
    fn report_pressure(&mut self, now: u64) {
        if now < self.pressure_at_ns + PRESSURE_EVERY_NS {
            return;
        }
        let used = self.log_used_bytes();
        let p = Pressure {
            log_used_permille: (used * 1000 / self.log.ring.capacity().max(1)) as u32,
            frontend_idle: self.commands_since_report == 0,
            frontend_slowdown: (self.latency.slowdown() * 4.0).round() / 4.0,
        };
        if p == self.pressure_sent && now < self.pressure_at_ns + 1_000_000_000 {
            return;
        }
        self.pressure_at_ns = now;
        self.pressure_sent = p;
        self.commands_since_report = 0;
        self.outbox.push(ToDestage::Pressure(p));
    }

    pub(crate) fn observe_latency(&mut self, ns: u64) {
        self.latency.observe(ns);
    }

    fn poll_replay(&mut self) -> usize {
        let Some(mut r) = self.replay.take() else { return 0 };
        let mut work = 0;
        for read in r.poll() {
            work += 1;
            let (offset, len) = r.extent(read);
            let buf = self.pool.get(len as usize);
            let token = self.token(FlashOp::Replay(read));
            self.flash.submit_read(token, offset, buf);
        }
        if r.finished() {
            match r.take_outcome() {
                Some(Ok(outcome)) => {
                    let frames = outcome.frames.len() as u64;
                    let lost_entries: u64 =
                        outcome.damage.iter().filter_map(|d| d.lost.as_ref()).map(|l| l.len() as u64).sum();
                    let entries =
                        outcome.frames.iter().map(|(_, f)| f.entries.len() as u64).sum::<u64>() - lost_entries;
                    let mut report = ReplayReport {
                        frames,
                        entries,
                        stop_reason: outcome.stop_reason.clone(),
                        damaged_frames: outcome.damage.iter().filter(|d| d.lost.is_some()).count() as u64,
                        lost_entries,
                        unknown_regions: outcome.damage.iter().filter(|d| d.lost.is_none()).count() as u64,
                        lost_blocks: 0,
                        repaired_headers: outcome.repaired,
                        damage: outcome
                            .damage
                            .iter()
                            .map(|d| format!("log {}..{}: {}", d.pos.0, d.end.0, d.why))
                            .collect(),
                    };
                    let before: u64 = self.volumes.iter().map(|v| v.lost.len()).sum();
                    self.install_recovered(&outcome.sb, outcome.head, outcome.frames, &outcome.damage);
                    report.lost_blocks = self.volumes.iter().map(|v| v.lost.len()).sum::<u64>().saturating_sub(before);
                    self.replay_report = Some(report);
                }
                Some(Err(why)) => {
                    tracing::error!(device = self.cfg.device_id, "recovery failed: {why}");
                    self.state = EngineState::Failed(why);
                }
                None => {}
            }
            work += 1;
        }
        self.replay = Some(r);
        work
    }

    /// Installs the result of log replay.
    fn install_recovered(
        &mut self,
        sb: &Superblock,
        head: LogPos,
        frames: Vec<(LogPos, FrameHeader)>,
        damage: &[replay::Damage],
    ) {
        let incarnation = sb.incarnation.next();
        self.incarnation_start = head;
        self.sb = SuperblockWriter::new(sb.generation);
        self.persisted_tail = sb.log_tail;
        self.log = Appender::new(Ring::new(self.layout.log_bytes, head), incarnation);
        // Replica copies kept for other nodes are not configured: the superblock names them.
        for s in &sb.volumes {
            if s.source.is_some() && self.volume_index(s.id).is_none() {
                self.volumes.push(Volume::new(VolumeSpec {
                    id: s.id,
                    epoch: s.epoch,
                    blocks: s.blocks,
                    policy: WritePolicy::WriteBack,
                    read_cache: false,
                    unmap: false,
                    replicas: Vec::new(),
                    source: s.source.clone(),
                }));
                self.dirty_out.push(Vec::new());
            }
        }
        for v in &mut self.volumes {
            if let Some(s) = sb.volume(v.id) {
                v.persisted_epoch = s.epoch;
                v.epoch = v.epoch.max(s.epoch);
                v.watermark = s.watermark;
                v.persisted_watermark = s.watermark;
                v.intent = s.intent;
                v.persisted_intent = s.intent;
                // Not past the intent: an intent beyond the replayed entries names entries that
                // were never acknowledged (their log writes failed); their numbers are reused.
                v.next_seq = s.watermark.next();
            }
        }
        for l in &sb.lost {
            if let Some(vi) = self.volume_index(l.volume) {
                self.volumes[vi].mark_lost(l.lba, l.blocks as u64);
            }
        }
        // Damage (replay.rs): entries whose data failed, and regions whose entries are unknown.
        let lost_known: std::collections::HashSet<(VolumeId, LogSeq)> =
            damage.iter().filter_map(|d| d.lost.as_ref()).flatten().map(|e| (e.volume, e.seq)).collect();
        let mut unknown = self.unknown_damage(&frames, damage).into_iter().peekable();
        for (pos, h) in frames {
            // Crossing a region of unknown entries: every block of each volume that may have
            // had entries there is lost, until an entry after it says otherwise.
            while unknown.peek().is_some_and(|(at, _)| *at < pos) {
                let Some((_, affected)) = unknown.next() else { break };
                self.lose_whole(&affected);
            }
            let mut entries = Vec::with_capacity(h.entries.len());
            for (i, e) in h.entries.iter().enumerate() {
                let vi = self.volume_index(e.volume).expect("replay: entry of an unknown volume");
                let data_pos = pos.plus(h.data_offset(i));
                let v = &mut self.volumes[vi];
                if lost_known.contains(&(e.volume, e.seq)) {
                    // Its data failed its checksum: above the watermark, its blocks are lost.
                    if e.seq > v.watermark {
                        if v.is_copy() {
                            v.copy_damaged = Some(v.copy_damaged.map_or(e.seq, |d| d.max(e.seq)));
                        } else {
                            v.mark_lost(e.lba, e.blocks as u64);
                        }
                    }
                    v.next_seq = v.next_seq.max(e.seq.next());
                    continue;
                }
                if e.seq > v.watermark {
                    v.unlose(e.lba, e.blocks as u64);
                }
                // A copy's entries wait for its source (no index, no destage), unless an
                // operator destages the copy.
                let own = !v.is_copy() || self.cfg.destage_replica_copies;
                if e.seq > v.watermark {
                    v.push_dirty(DirtyMeta::of(e));
                }
                if e.seq > v.watermark && own {
                    match e.kind {
                        crate::log::EntryKind::Write => {
                            v.index.insert(e.lba, e.blocks as u64, e.seq, DirtyLoc::Log { data_pos })
                        }
                        // Its blocks' older entries are void: the SAN holds their newest data.
                        // (`Volume::superseded` stays empty: the destager starts afresh with
                        // the engine, so no batch planned before can write them again.)
                        crate::log::EntryKind::SanWritten => {
                            v.index.remove_clean(e.lba, e.blocks as u64, LogSeq(e.seq.0 - 1))
                        }
                        k => v.index.insert(
                            e.lba,
                            e.blocks as u64,
                            e.seq,
                            DirtyLoc::Zero { unmap: k == crate::log::EntryKind::Unmap },
                        ),
                    }
                    self.dirty_out[vi].push(DirtyRecord {
                        seq: e.seq,
                        kind: e.kind,
                        lba: e.lba,
                        blocks: e.blocks as u64,
                        data_pos,
                        data_crc: e.data_crc,
                        memory: None,
                    });
                }
                v.next_seq = v.next_seq.max(e.seq.next());
                entries.push(FrameEntry { vi, op: None, header: *e, data_pos });
            }
            let end = match h.kind {
                crate::log::FrameKind::Pad => self.log.ring.next_lap(pos),
                crate::log::FrameKind::Data => pos.plus(h.bytes()),
            };
            self.log.frames.push_back(Frame {
                pos,
                end,
                entries,
                state: FrameState::Acked,
                in_flight: false,
                bufs: Vec::new(),
                handed_over: false,
            });
        }
        for (_, affected) in unknown {
            self.lose_whole(&affected);
        }
        for v in &mut self.volumes {
            if v.copy_damaged == Some(LogSeq(u64::MAX)) {
                v.copy_damaged = Some(LogSeq(v.next_seq.0.saturating_sub(1)));
            }
        }
        self.log.acked = self.log.frames.len();
        for v in &mut self.volumes {
            let last = v.dirty.back().map(|r| r.seq).unwrap_or(v.watermark);
            if v.intent > last {
                // Only entries whose log write failed (never acknowledged from the log) can be
                // missing here; the batch that would redo them has nothing to redo.
                tracing::info!(volume = v.id.0, intent = v.intent.0, last = last.0, "destage intent beyond the log");
                v.intent = last;
                v.persisted_intent = last;
            }
        }
        self.reclaim();
        if self.read_only {
            self.state = EngineState::Ready;
            return;
        }
        self.bump_replicated_epochs();
        // The new incarnation must be durable before any frame is written with it.
        self.sb.want();
    }

    /// For each damaged region of unknown entries (in log order): the volumes that may have had
    /// acknowledged entries there — a jump in the volume's sequence numbers across it, above
    /// its watermark, or no entry of the volume after it to tell.
    fn unknown_damage(&self, frames: &[(LogPos, FrameHeader)], damage: &[replay::Damage]) -> Vec<(LogPos, Vec<usize>)> {
        let mut out = Vec::new();
        for d in damage.iter().filter(|d| d.lost.is_none()) {
            let mut affected = Vec::new();
            for (vi, v) in self.volumes.iter().enumerate() {
                let seqs = frames.iter().flat_map(|(p, h)| h.entries.iter().map(move |e| (*p, e)));
                let before = seqs
                    .clone()
                    .filter(|(p, e)| *p < d.pos && e.volume == v.id)
                    .map(|(_, e)| e.seq)
                    .max()
                    .unwrap_or(LogSeq(0))
                    .max(v.watermark);
                let after = seqs.filter(|(p, e)| *p >= d.end && e.volume == v.id).map(|(_, e)| e.seq).min();
                let may_have = match after {
                    Some(after) => after.0 > before.0 + 1,
                    None => true,
                };
                if may_have {
                    affected.push(vi);
                }
            }
            out.push((d.pos, affected));
        }
        out
    }

    /// Every block of these volumes is lost (copies: the copy is damaged).
    fn lose_whole(&mut self, volumes: &[usize]) {
        for &vi in volumes {
            let v = &mut self.volumes[vi];
            tracing::error!(
                volume = v.id.0,
                "damaged log region of unknown entries: every block of the volume is marked lost"
            );
            if v.is_copy() {
                // Which entries are unknown: every one up to the newest found (set below).
                v.copy_damaged = Some(LogSeq(u64::MAX));
            } else {
                let blocks = v.blocks;
                v.mark_lost(Lba(0), blocks);
            }
        }
    }

    /// A write whose entry reaches the SAN by destage rather than through the log's guarantee
    /// (its log write failed, or a replica was lost before it had it): acknowledged once the
    /// persisted watermark covers it — at once if it already does.
    pub(crate) fn ack_on_persist(&mut self, vi: usize, seq: LogSeq, op: OpId) {
        if self.volumes[vi].copies > 0 {
            // A replicated volume's replicas must not hold an older entry of its blocks either.
            let buf = match self.volumes[vi].ops.get_mut(&op) {
                Some(PendingOp::Write(w)) => w.buf.take(),
                _ => None,
            };
            self.volumes[vi].waiting.push_back(volume::Waiting { seq, op, buf, needs_san: true });
            self.release_waiting(vi);
            return;
        }
        if seq > self.volumes[vi].persisted_watermark {
            self.volumes[vi].acks_on_persist.push((seq, op));
            return;
        }
        let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
            panic!("engine: write acknowledged on persist without its op")
        };
        self.volumes[vi].enter(op, w.state, WriteState::Acked);
        self.ack_write(vi, w.token, w.buf, Some(seq));
    }

    pub(crate) fn pin(&mut self, pin: Pin) {
        match pin {
            Pin::Log(pos) => *self.pins.entry(pos).or_insert(0) += 1,
            Pin::Slot(slot) => self.cache.pin(slot),
        }
    }

    pub(crate) fn unpin(&mut self, pin: Pin) {
        match pin {
            Pin::Log(pos) => {
                let n = self.pins.get_mut(&pos).expect("engine: unpin of an unpinned log position");
                *n -= 1;
                if *n == 0 {
                    self.pins.remove(&pos);
                }
            }
            Pin::Slot(slot) => self.cache.unpin(slot),
        }
    }

    /// The lowest log position still needed: the durable superblock's tail, or an in-flight read.
    pub(crate) fn reclaim_floor(&self) -> LogPos {
        let pinned = self.pins.keys().next().copied().unwrap_or(LogPos(u64::MAX));
        self.persisted_tail.min(pinned)
    }

    /// Pops frames whose every entry the destager has on the SAN; the superblock then records
    /// the new tail (together with the watermarks that allowed it).
    pub(crate) fn reclaim(&mut self) {
        let volumes = &self.volumes;
        self.log.reclaim(|f| f.entries.iter().all(|e| volumes[e.vi].watermark >= e.header.seq));
        if self.log.tail() > self.persisted_tail {
            self.sb.want();
        }
    }

    fn poll_superblock(&mut self, now: u64) -> usize {
        if self.read_only || !self.sb.due(now) {
            return 0;
        }
        let tail = self.log.tail();
        let snapshot =
            SbSnapshot { tail, volumes: self.volumes.iter().map(|v| (v.watermark, v.intent, v.epoch)).collect() };
        let generation = self.sb.start(snapshot);
        let sb = self.superblock(generation, tail);
        let mut buf = self.pool.get(BLOCK_SIZE);
        sb.encode_into(&mut buf);
        let token = self.token(FlashOp::Superblock);
        let fua = self.info.volatile_cache;
        self.flash.submit_write(token, Superblock::copy_offset(generation), buf, Vec::new(), fua);
        1
    }

    fn superblock_durable(&mut self, snapshot: SbSnapshot) {
        assert!(snapshot.tail >= self.persisted_tail, "engine: persisted tail moved back");
        self.persisted_tail = snapshot.tail;
        for (vi, (wm, intent, epoch)) in snapshot.volumes.into_iter().enumerate() {
            let v = &mut self.volumes[vi];
            v.persisted_epoch = v.persisted_epoch.max(epoch);
            v.persisted_watermark = v.persisted_watermark.max(wm);
            if intent > v.persisted_intent {
                v.persisted_intent = intent;
                if self.started && v.destaged_here(self.cfg.destage_replica_copies) {
                    self.outbox.push(ToDestage::IntentPersisted { volume: v.id, intent });
                }
            }
            v.persist_clean();
            let pw = v.persisted_watermark;
            let (ready, waiting): (Vec<_>, Vec<_>) = v.acks_on_persist.drain(..).partition(|(seq, _)| *seq <= pw);
            v.acks_on_persist = waiting;
            for (seq, op) in ready {
                let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                    panic!("engine: abandoned write without its op")
                };
                self.volumes[vi].enter(op, w.state, WriteState::Acked);
                self.ack_write(vi, w.token, w.buf, Some(seq));
            }
        }
        for vi in 0..self.volumes.len() {
            if !self.volumes[vi].waiting.is_empty() {
                self.release_waiting(vi);
            }
        }
        if self.state == EngineState::Recovering {
            self.state = EngineState::Ready;
            tracing::info!(device = self.cfg.device_id, incarnation = self.log.incarnation.0, "recovered");
        }
    }

    pub(crate) fn enter_degraded(&mut self, now: u64) {
        if self.degraded.is_none() {
            self.events.push(EngineEvent::FlashDegraded);
            tracing::warn!(device = self.cfg.device_id, "flash degraded: volumes run write-through");
        }
        self.degraded = Some(now);
        self.drop_copies_in_flight();
    }

    fn poll_degraded(&mut self, now: u64) -> usize {
        let Some(since) = self.degraded else { return 0 };
        if self.log.frames.is_empty()
            && self.log.is_idle()
            && self.persisted_tail == self.log.ring.head
            && self.sb.is_idle()
            && now >= since + FLASH_DEGRADED_COOLDOWN_NS
        {
            self.degraded = None;
            self.events.push(EngineEvent::FlashHealthy);
            tracing::info!(device = self.cfg.device_id, "flash healthy again: write-back resumes");
            return 1;
        }
        0
    }

    fn on_flash_done(&mut self, done: IoDone, now: u64) {
        let Some(op) = self.flash_ops.remove(&done.token) else {
            panic!("engine: flash completion for unknown token {:?}", done.token)
        };
        match op {
            FlashOp::Format => {
                self.pool.put_opt(done.buf);
                if let Err(e) = done.result {
                    self.state = EngineState::Failed(format!("format: superblock write failed: {e}"));
                    return;
                }
                self.format_pending -= 1;
                if self.format_pending == 0 && self.state == EngineState::Formatting {
                    self.state = EngineState::Ready;
                }
            }
            FlashOp::Replay(what) => {
                let buf = done.buf.expect("engine: replay read without its buffer");
                if let Some(r) = self.replay.as_mut() {
                    r.on_read(what, done.result, buf, &mut self.pool);
                }
            }
            FlashOp::Frame { pos, submitted_ns } => self.frame_written(pos, submitted_ns, done, now),
            FlashOp::Superblock => {
                self.pool.put_opt(done.buf);
                match done.result {
                    Ok(()) => {
                        if let Some(snapshot) = self.sb.done(true, now) {
                            self.superblock_durable(snapshot);
                        }
                    }
                    Err(e) => {
                        if self.sb_fail_logged_ns.is_none_or(|t| now >= t + FLASH_READ_FAIL_LOG_NS) {
                            self.sb_fail_logged_ns = Some(now);
                            tracing::warn!(error = %e, "superblock write failed; retrying");
                        }
                        self.sb.done(false, now);
                        if !self.read_only {
                            self.enter_degraded(now);
                        }
                    }
                }
            }
            FlashOp::HostRead { vi, op, off, n, pin, whole } => {
                self.host_read_done(vi, op, off, n, pin, whole, done, now)
            }
            FlashOp::CacheFill { key, slot } => {
                self.pool.put_opt(done.buf);
                let ok = done.result.is_ok();
                if !ok {
                    self.enter_degraded(now);
                }
                self.cache.finish_fill(key, slot, ok);
            }
        }
    }

    /// Used by tests and the destager: a volume's epoch (replication will fence on it).
    pub fn volume_epoch(&self, id: VolumeId) -> Option<Epoch> {
        self.volume_index(id).map(|vi| self.volumes[vi].epoch)
    }
}

impl HostOp {
    /// The buffer a refused command gives back.
    fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            HostOp::Read { buf, .. } | HostOp::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}
