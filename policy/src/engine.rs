//! The engine: one per flash device, owning the device's log, superblock, clean cache and the
//! volumes that share it. It is the single owner the reactor (or the simulator) drives:
//! `submit` host operations with a token, `poll(now)` to make progress (returns the work done,
//! so an idle reactor may sleep), `drain_completions` to collect finished host operations.
//!
//! Write-back path: reserve log space, assign the volume's next sequence number, write
//! [header + data] (FUA when the device has a volatile cache), and acknowledge **in log order**:
//! an entry is acknowledged only once it and every entry before it are durable. Recovery stops
//! at the first hole, so acknowledging out of order could lose an acknowledged write behind a
//! hole. Replication will add "and every replica reports durable up to here" to the same rule.
//!
//! Write-through path: the write waits while any of its blocks is dirty (until the *persisted*
//! watermark covers them), then goes to the SAN. That is invariant 2: the destager can never
//! later put older data over it, not even by replaying the log after a crash.
//!
//! Failures: a flash write error degrades the device (every volume effective write-through);
//! entries not yet acknowledged are kept in memory and destaged from there, their writes
//! acknowledged once on the SAN. A SAN error marks the SAN unreachable with exponential back-off;
//! dirty data waits in flash, host I/O that needs the SAN waits up to a deadline and then gets
//! `Status::Busy` (retryable), never a silent loss.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use crate::cache::{CacheKey, CleanCache};
use crate::constants::*;
use crate::index::DirtyLoc;
use crate::io::{Flash, FlashInfo, IoDone};
use crate::log::entry::{encode_pad_entry, encode_write_entry};
use crate::log::{EntryHeader, EntryKind, Layout, Ring, Superblock, SuperblockVolume};
use crate::policy::{EffectiveReason, WritePolicy};
use crate::recovery::Recovery;
use crate::types::{Epoch, Lba, LogSeq, VolumeId};
use crate::volume::{DirtyRecord, FlushOp, PendingOp, ReadOp, Volume, VolumeMetrics, VolumeSpec, WriteOp, WriteState};

/// A host command for one volume.
#[derive(Debug)]
pub enum HostOp {
    Read { lba: Lba, blocks: u32 },
    Write { lba: Lba, data: Vec<u8>, fua: bool },
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
    /// Read data.
    pub data: Vec<u8>,
    /// For writes acknowledged through the log: the entry's sequence number.
    pub seq: Option<LogSeq>,
}

/// What a full log does to a write-back write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFullPolicy {
    /// Wait up to this long for space, then go write-through.
    Wait { timeout_ns: u64 },
    /// Go write-through at once.
    WriteThrough,
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
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub device_id: u64,
    /// Share of the device for clean cache slots.
    pub cache_percent: u32,
    pub log_full: LogFullPolicy,
    /// How long a write-through write may wait for its blocks to be destaged.
    pub gate_timeout_ns: u64,
    /// How long host I/O waits on an unreachable SAN before `Busy`.
    pub san_timeout_ns: u64,
    #[doc(hidden)]
    pub bugs: Bugs,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device_id: 1,
            cache_percent: 25,
            log_full: LogFullPolicy::Wait { timeout_ns: 5_000_000_000 },
            gate_timeout_ns: 30_000_000_000,
            san_timeout_ns: 30_000_000_000,
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
    /// A destage batch is on the SAN and flushed: the SAN now holds the volume as of `watermark`.
    BatchDestaged {
        volume: VolumeId,
        watermark: LogSeq,
    },
    FlashDegraded,
    FlashHealthy,
    SanUnreachable {
        volume: VolumeId,
    },
    SanReachable {
        volume: VolumeId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("flash device of {0} bytes is too small for a log")]
    DeviceTooSmall(u64),
    #[error("{0} volumes on one device, at most {VOLUMES_PER_DEVICE_MAX}")]
    TooManyVolumes(usize),
    #[error("{0}: {1} blocks do not fit its SAN LUN of {2} bytes")]
    VolumeTooLarge(VolumeId, u64, u64),
    #[error("{0} configured twice")]
    DuplicateVolume(VolumeId),
}

/// Where a block's newest data is, for white-box checks by the simulator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Located {
    Memory(Vec<u8>),
    Flash(u64),
    San,
}

pub(crate) enum Pin {
    Log(u64),
    Slot(u32),
}

pub(crate) enum FlashOp {
    Format,
    Recovery(crate::recovery::RecoveryRead),
    LogWrite { pos: u64 },
    Superblock { generation: u64, snapshot: SbSnapshot },
    HostRead { vi: usize, op: u64, off: u32, n: u32, pin: Pin },
    CacheFill { key: CacheKey, slot: u32 },
    DestageRead { vi: usize, idx: usize, pos: u64 },
}

pub(crate) enum SanOp {
    HostWrite { op: u64 },
    HostRead { op: u64, off: u32, n: u32, sent_at: u64 },
    HostFlush { covers: u64 },
    DestageWrite { run: usize, sent_at: u64 },
    DestageFlush { covers: u64 },
}

#[derive(Clone, Debug)]
pub(crate) struct SbSnapshot {
    tail: u64,
    volumes: Vec<(LogSeq, LogSeq)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordKind {
    Pad,
    Write { vi: usize, seq: LogSeq, lba: Lba, blocks: u32 },
}

/// One entry in the log ring, from reservation until its space is reclaimed.
pub(crate) struct LogRecord {
    pub pos: u64,
    pub bytes: u64,
    pub kind: RecordKind,
    pub state: WriteState,
    pub write_in_flight: bool,
    pub op: Option<u64>,
    /// The host data until the entry is acknowledged (kept for the memory fallback).
    pub data: Option<Rc<Vec<u8>>>,
}

pub(crate) struct SbWriter {
    /// Generation of the last durable superblock.
    pub durable_generation: u64,
    pub in_flight: bool,
    pub wanted: bool,
    pub retry_at: u64,
}

pub struct Engine {
    pub(crate) cfg: EngineConfig,
    pub(crate) flash: Box<dyn Flash>,
    pub(crate) info: FlashInfo,
    pub(crate) layout: Layout,
    pub(crate) state: EngineState,
    pub(crate) recovery: Option<Recovery>,
    pub(crate) format_pending: u32,
    pub(crate) ring: Ring,
    pub(crate) records: VecDeque<LogRecord>,
    /// Everything below this position is acknowledged (or abandoned).
    pub(crate) acked_pos: u64,
    pub(crate) log_writes_in_flight: usize,
    pub(crate) pins: BTreeMap<u64, u32>,
    pub(crate) persisted_tail: u64,
    pub(crate) incarnation: u64,
    /// Log position where this incarnation's entries start (see the superblock).
    pub(crate) incarnation_start: u64,
    pub(crate) sb: SbWriter,
    /// Time of the last flash write error while the device is degraded.
    pub(crate) degraded: Option<u64>,
    pub(crate) cache: CleanCache,
    pub(crate) volumes: Vec<Volume>,
    pub(crate) flash_ops: BTreeMap<u64, FlashOp>,
    pub(crate) san_ops: Vec<BTreeMap<u64, SanOp>>,
    next_token: u64,
    pub(crate) done: Vec<HostDone>,
    pub(crate) events: Vec<EngineEvent>,
    scratch: Vec<IoDone>,
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
            if s.blocks.checked_mul(BLOCK_SIZE_U64).is_none_or(|b| b > s.san.size_bytes()) {
                return Err(EngineError::VolumeTooLarge(s.id, s.blocks, s.san.size_bytes()));
            }
        }
        let info = flash.info();
        let n = specs.len();
        Ok(Engine {
            cfg,
            info,
            flash,
            layout,
            state: EngineState::Recovering,
            recovery: None,
            format_pending: 0,
            ring: Ring::new(layout.log_bytes, 0),
            records: VecDeque::new(),
            acked_pos: 0,
            log_writes_in_flight: 0,
            pins: BTreeMap::new(),
            persisted_tail: 0,
            incarnation: 1,
            incarnation_start: 0,
            sb: SbWriter { durable_generation: 0, in_flight: false, wanted: false, retry_at: 0 },
            degraded: None,
            cache: CleanCache::new(layout.cache_slots as u32),
            volumes: specs.into_iter().map(Volume::new).collect(),
            flash_ops: BTreeMap::new(),
            san_ops: (0..n).map(|_| BTreeMap::new()).collect(),
            next_token: 1,
            done: Vec::new(),
            events: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// Formats a fresh device for these volumes (asynchronously: `Ready` once both superblock
    /// copies are durable).
    pub fn format(cfg: EngineConfig, flash: Box<dyn Flash>, specs: Vec<VolumeSpec>) -> Result<Engine, EngineError> {
        let size = flash.info().size_bytes;
        let layout = Layout::for_device(size, cfg.cache_percent).ok_or(EngineError::DeviceTooSmall(size))?;
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        e.state = EngineState::Formatting;
        for generation in [1, 2] {
            let sb = e.superblock(generation, 0);
            let token = e.token(FlashOp::Format);
            e.flash.submit_write(token, Superblock::copy_offset(generation), sb.encode(), true);
        }
        e.format_pending = 2;
        e.sb.durable_generation = 2;
        Ok(e)
    }

    /// Opens a formatted device: recovers its log (asynchronously: `Ready` once replay is done
    /// and the new incarnation is durable).
    pub fn open(cfg: EngineConfig, flash: Box<dyn Flash>, specs: Vec<VolumeSpec>) -> Result<Engine, EngineError> {
        let size = flash.info().size_bytes;
        let layout = Layout::for_device(size, cfg.cache_percent).ok_or(EngineError::DeviceTooSmall(size))?;
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        e.state = EngineState::Recovering;
        let mut rec = Recovery::new();
        rec.start(&mut e);
        e.recovery = Some(rec);
        Ok(e)
    }

    pub fn state(&self) -> &EngineState {
        &self.state
    }

    /// Opens a formatted device only to read it: the superblock's own layout, device id and
    /// volumes (each with a SAN that never completes), so the log replay rebuilds what it holds
    /// without any configuration. Replay never writes; the superblock write that would follow it
    /// is the caller's to refuse (give a flash whose writes never complete) — see
    /// `stagerctl flash inspect`. Poll until [`Engine::replay_done`], then read the metrics.
    pub fn open_for_inspection(flash: Box<dyn Flash>, sb: &Superblock) -> Result<Engine, EngineError> {
        let layout = Layout {
            log_start: sb.log_start,
            log_bytes: sb.log_bytes,
            cache_start: sb.cache_start,
            cache_slots: sb.cache_slots,
        };
        let cfg = EngineConfig { device_id: sb.device_id, ..EngineConfig::default() };
        let specs = sb
            .volumes
            .iter()
            .map(|v| VolumeSpec {
                id: v.id,
                epoch: v.epoch,
                blocks: v.blocks,
                policy: WritePolicy::WriteBack,
                read_cache: false,
                san: Box::new(crate::io::DetachedSan { size_bytes: v.blocks * BLOCK_SIZE_U64 }),
            })
            .collect();
        let mut e = Engine::build(cfg, flash, specs, layout)?;
        let mut rec = Recovery::new();
        rec.start(&mut e);
        e.recovery = Some(rec);
        Ok(e)
    }

    /// True once log replay has finished (or failed): the index and dirty lists are rebuilt.
    pub fn replay_done(&self) -> bool {
        self.recovery.as_ref().is_none_or(|r| r.finished()) || !matches!(self.state, EngineState::Recovering)
    }

    pub fn device_id(&self) -> u64 {
        self.cfg.device_id
    }

    /// Whether any flash or SAN operation is outstanding (a driver keeps polling while so).
    pub fn io_in_flight(&self) -> bool {
        !self.flash_ops.is_empty() || self.san_ops.iter().any(|m| !m.is_empty())
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

    pub(crate) fn token(&mut self, op: FlashOp) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.flash_ops.insert(t, op);
        t
    }

    pub(crate) fn san_token(&mut self, vi: usize, op: SanOp) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        self.san_ops[vi].insert(t, op);
        t
    }

    pub(crate) fn superblock(&self, generation: u64, tail: u64) -> Superblock {
        Superblock {
            device_id: self.cfg.device_id,
            generation,
            incarnation: self.incarnation,
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
                })
                .collect(),
        }
    }

    fn volume_index(&self, id: VolumeId) -> Option<usize> {
        self.volumes.iter().position(|v| v.id == id)
    }

    pub fn volume_ids(&self) -> Vec<VolumeId> {
        self.volumes.iter().map(|v| v.id).collect()
    }

    /// Whether writes are acknowledged from the log right now.
    pub(crate) fn effective(&self, vi: usize) -> (WritePolicy, EffectiveReason) {
        WritePolicy::effective(self.volumes[vi].requested, self.degraded.is_some())
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

    pub fn drain_events(&mut self, out: &mut Vec<EngineEvent>) {
        out.append(&mut self.events);
    }

    pub fn flash_degraded(&self) -> bool {
        self.degraded.is_some()
    }

    /// True when nothing is dirty, nothing is in flight and the superblock is current.
    pub fn is_quiescent(&self) -> bool {
        self.state == EngineState::Ready
            && self
                .volumes
                .iter()
                .all(|v| v.dirty.is_empty() && v.ops.is_empty() && v.index.is_empty() && v.destager.is_idle())
            && self.flash_ops.is_empty()
            && self.san_ops.iter().all(|m| m.is_empty())
            && !self.sb.in_flight
            && self.persisted_tail == self.tail()
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
        m.san_reachable = v.san_health.reachable;
        m.san_errors = v.san_health.errors;
        m.watermark = v.watermark;
        m.persisted_watermark = v.persisted_watermark;
        m.watermark_lag_entries = v.last_acked_seq().0 - v.persisted_watermark.0;
        m.destage_depth = v.destager.depth.limit();
        Some(m)
    }

    /// Log bytes in use (from the reclaim floor to the head).
    pub fn log_used_bytes(&self) -> u64 {
        self.ring.used(self.reclaim_floor())
    }

    /// Absolute position of the log head (grows past the capacity once the log wraps).
    pub fn log_head(&self) -> u64 {
        self.ring.head
    }

    /// Device offset of an absolute log position.
    pub fn log_offset(&self, pos: u64) -> u64 {
        self.layout.log_offset(pos)
    }

    pub fn log_capacity_bytes(&self) -> u64 {
        self.ring.capacity()
    }

    /// Where a block's newest data lives (simulator checks; not for the I/O path).
    pub fn locate(&self, id: VolumeId, lba: Lba) -> Option<Located> {
        let v = &self.volumes[self.volume_index(id)?];
        if let Some(d) = v.index.get(lba) {
            return Some(match &d.loc {
                DirtyLoc::Log { data_pos } => Located::Flash(self.layout.log_offset(*data_pos)),
                DirtyLoc::Memory { buf, offset } => Located::Memory(buf[*offset..*offset + BLOCK_SIZE].to_vec()),
            });
        }
        Some(match self.cache.peek((id, lba)) {
            Some(slot) => Located::Flash(self.layout.slot_offset(slot)),
            None => Located::San,
        })
    }

    fn complete(&mut self, vi: usize, token: u64, status: Status, data: Vec<u8>, seq: Option<LogSeq>) {
        if status == Status::Busy {
            self.volumes[vi].metrics.busy_returns += 1;
        }
        self.done.push(HostDone { volume: self.volumes[vi].id, token, status, data, seq });
    }

    fn reject(&mut self, id: VolumeId, token: u64, status: Status) {
        self.done.push(HostDone { volume: id, token, status, data: Vec::new(), seq: None });
    }

    /// Submits a host command; its completion comes out of `drain_completions`.
    pub fn submit(&mut self, id: VolumeId, token: u64, op: HostOp, now: u64) {
        let Some(vi) = self.volume_index(id) else { return self.reject(id, token, Status::UnknownVolume) };
        if self.state != EngineState::Ready {
            return self.reject(id, token, Status::NotReady);
        }
        if self.volumes[vi].ops.len() >= HOST_OPS_PER_VOLUME_MAX {
            return self.reject(id, token, Status::Busy);
        }
        let op_id = self.next_token;
        self.next_token += 1;
        let vblocks = self.volumes[vi].blocks;
        let in_range = |lba: Lba, n: u32| {
            n > 0 && n <= WRITE_BLOCKS_MAX && lba.0.checked_add(n as u64).is_some_and(|e| e <= vblocks)
        };
        match op {
            HostOp::Write { lba, data, fua } => {
                if data.len() % BLOCK_SIZE != 0 || !in_range(lba, (data.len() / BLOCK_SIZE) as u32) {
                    return self.reject(id, token, Status::InvalidRange);
                }
                let blocks = (data.len() / BLOCK_SIZE) as u32;
                for b in 0..blocks as u64 {
                    self.cache.invalidate((id, lba.offset(b)));
                }
                let w = WriteOp {
                    token,
                    lba,
                    blocks,
                    data: Rc::new(data),
                    fua,
                    state: WriteState::Received,
                    deadline: 0,
                    retry: false,
                };
                self.volumes[vi].ops.insert(op_id, PendingOp::Write(w));
                self.volumes[vi].enter(op_id, WriteState::Received, WriteState::Received);
                self.route_write(vi, op_id, now);
            }
            HostOp::Read { lba, blocks } => {
                if !in_range(lba, blocks) {
                    return self.reject(id, token, Status::InvalidRange);
                }
                let r = ReadOp {
                    token,
                    lba,
                    buf: vec![0u8; blocks as usize * BLOCK_SIZE],
                    parts_pending: 0,
                    san_retry: Vec::new(),
                    deadline: now + self.cfg.san_timeout_ns,
                    failed: None,
                };
                self.volumes[vi].ops.insert(op_id, PendingOp::Read(r));
                self.start_read(vi, op_id, now);
            }
            HostOp::Flush => {
                let v = &mut self.volumes[vi];
                let need = v.wt_acks;
                let f = FlushOp { token, need, deadline: now + self.cfg.san_timeout_ns };
                v.ops.insert(op_id, PendingOp::Flush(f));
                v.flushes.push(op_id);
                self.poll_flushes(vi, now);
            }
        }
    }

    fn write_op(&mut self, vi: usize, op_id: u64) -> &mut WriteOp {
        match self.volumes[vi].ops.get_mut(&op_id) {
            Some(PendingOp::Write(w)) => w,
            _ => panic!("engine: op {op_id} is not a pending write"),
        }
    }

    fn set_write_state(&mut self, vi: usize, op_id: u64, to: WriteState) {
        let w = self.write_op(vi, op_id);
        let from = w.state;
        w.state = to;
        self.volumes[vi].enter(op_id, from, to);
    }

    /// Sends a received write down the write-back or write-through path.
    fn route_write(&mut self, vi: usize, op_id: u64, now: u64) {
        if self.effective(vi).0 == WritePolicy::WriteThrough {
            return self.start_write_through(vi, op_id, now);
        }
        if self.volumes[vi].space_waiters.is_empty() && self.try_log_write(vi, op_id) {
            return;
        }
        match self.cfg.log_full {
            LogFullPolicy::Wait { timeout_ns } => {
                self.volumes[vi].metrics.log_full_waits += 1;
                self.write_op(vi, op_id).deadline = now + timeout_ns;
                self.set_write_state(vi, op_id, WriteState::WaitingForLogSpace);
                self.volumes[vi].space_waiters.push_back(op_id);
            }
            LogFullPolicy::WriteThrough => {
                self.volumes[vi].metrics.log_full_fallthroughs += 1;
                self.start_write_through(vi, op_id, now);
            }
        }
    }

    /// The lowest log position still needed: the durable superblock's tail, or an in-flight read.
    pub(crate) fn reclaim_floor(&self) -> u64 {
        let pinned = self.pins.keys().next().copied().unwrap_or(u64::MAX);
        self.persisted_tail.min(pinned)
    }

    /// The oldest position holding an entry that is not yet clean (or the head).
    pub(crate) fn tail(&self) -> u64 {
        self.records.front().map(|r| r.pos).unwrap_or(self.ring.head)
    }

    pub(crate) fn pin(&mut self, pin: &Pin) {
        match pin {
            Pin::Log(pos) => *self.pins.entry(*pos).or_insert(0) += 1,
            Pin::Slot(slot) => self.cache.pin(*slot),
        }
    }

    pub(crate) fn unpin(&mut self, pin: &Pin) {
        match pin {
            Pin::Log(pos) => {
                let n = self.pins.get_mut(pos).expect("engine: unpin of an unpinned log position");
                *n -= 1;
                if *n == 0 {
                    self.pins.remove(pos);
                }
            }
            Pin::Slot(slot) => self.cache.unpin(*slot),
        }
    }

    fn log_fua(&self) -> bool {
        self.info.volatile_cache && !self.cfg.bugs.no_fua_on_volatile_flash
    }

    /// Appends a write-back entry if there is room; false when the log is full.
    fn try_log_write(&mut self, vi: usize, op_id: u64) -> bool {
        if self.log_writes_in_flight + 2 > LOG_WRITES_IN_FLIGHT_MAX {
            return false;
        }
        let (lba, blocks, data) = {
            let w = self.write_op(vi, op_id);
            (w.lba, w.blocks, w.data.clone())
        };
        let bytes = (1 + blocks as u64) * BLOCK_SIZE_U64;
        let floor = self.reclaim_floor();
        let Some(res) = self.ring.reserve(bytes, floor) else { return false };
        let fua = self.log_fua();
        if let Some(pad_at) = res.pad_at {
            let buf = encode_pad_entry(self.volumes[vi].id, self.incarnation, pad_at);
            self.records.push_back(LogRecord {
                pos: pad_at,
                bytes: res.pos - pad_at,
                kind: RecordKind::Pad,
                state: WriteState::Logging,
                write_in_flight: true,
                op: None,
                data: None,
            });
            let token = self.token(FlashOp::LogWrite { pos: pad_at });
            self.log_writes_in_flight += 1;
            let off = self.layout.log_offset(pad_at);
            self.flash.submit_write(token, off, buf, fua);
        }
        let v = &mut self.volumes[vi];
        let seq = v.next_seq;
        v.next_seq = seq.next();
        let header = EntryHeader {
            kind: EntryKind::Write,
            volume: v.id,
            epoch: v.epoch,
            seq,
            lba,
            blocks,
            incarnation: self.incarnation,
            log_pos: res.pos,
            data_crc: 0,
        };
        let buf = encode_write_entry(header, &data);
        self.records.push_back(LogRecord {
            pos: res.pos,
            bytes,
            kind: RecordKind::Write { vi, seq, lba, blocks },
            state: WriteState::Logging,
            write_in_flight: true,
            op: Some(op_id),
            data: Some(data),
        });
        let token = self.token(FlashOp::LogWrite { pos: res.pos });
        self.log_writes_in_flight += 1;
        let off = self.layout.log_offset(res.pos);
        self.flash.submit_write(token, off, buf, fua);
        self.set_write_state(vi, op_id, WriteState::Logging);
        true
    }

    fn start_write_through(&mut self, vi: usize, op_id: u64, now: u64) {
        self.write_op(vi, op_id).deadline = now + self.cfg.gate_timeout_ns;
        self.set_write_state(vi, op_id, WriteState::Gated);
        let (lba, blocks) = {
            let w = self.write_op(vi, op_id);
            (w.lba, w.blocks)
        };
        if self.volumes[vi].index.overlaps(lba, blocks) {
            self.volumes[vi].metrics.gated_writes += 1;
        }
        self.volumes[vi].gated.push_back(op_id);
        self.poll_gated(vi, now);
    }

    /// Releases write-through writes whose blocks are clean (invariant 2).
    fn poll_gated(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        let mut i = 0;
        while i < self.volumes[vi].gated.len() {
            let op_id = self.volumes[vi].gated[i];
            let (lba, blocks, deadline) = {
                let w = self.write_op(vi, op_id);
                (w.lba, w.blocks, w.deadline)
            };
            let dirty = self.volumes[vi].index.overlaps(lba, blocks) && !self.cfg.bugs.skip_write_through_gate;
            if !dirty {
                self.volumes[vi].gated.remove(i);
                let deadline = now + self.cfg.san_timeout_ns;
                self.write_op(vi, op_id).deadline = deadline;
                self.submit_san_write(vi, op_id, now);
                work += 1;
            } else if now >= deadline {
                self.volumes[vi].gated.remove(i);
                let token = self.write_op(vi, op_id).token;
                self.volumes[vi].ops.remove(&op_id);
                self.complete(vi, token, Status::Busy, Vec::new(), None);
                work += 1;
            } else {
                i += 1;
            }
        }
        work
    }

    fn submit_san_write(&mut self, vi: usize, op_id: u64, now: u64) {
        let (lba, data, fua) = {
            let w = self.write_op(vi, op_id);
            w.retry = false;
            (w.lba, w.data.clone(), w.fua)
        };
        if self.write_op(vi, op_id).state != WriteState::SanWriting {
            self.set_write_state(vi, op_id, WriteState::SanWriting);
        }
        let _ = now;
        let token = self.san_token(vi, SanOp::HostWrite { op: op_id });
        self.volumes[vi].san.submit_write(token, lba.0 * BLOCK_SIZE_U64, (*data).clone(), fua);
    }

    fn start_read(&mut self, vi: usize, op_id: u64, now: u64) {
        let (lba, blocks) = match &self.volumes[vi].ops[&op_id] {
            PendingOp::Read(r) => (r.lba, (r.buf.len() / BLOCK_SIZE) as u32),
            _ => unreachable!(),
        };
        let id = self.volumes[vi].id;
        let mut i = 0u32;
        let mut parts = 0usize;
        while i < blocks {
            let b = lba.offset(i as u64);
            if let Some(d) = self.volumes[vi].index.get(b).cloned() {
                self.volumes[vi].metrics.read_hits_dirty += 1;
                match d.loc {
                    DirtyLoc::Memory { buf, offset } => {
                        if let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op_id) {
                            let o = i as usize * BLOCK_SIZE;
                            r.buf[o..o + BLOCK_SIZE].copy_from_slice(&buf[offset..offset + BLOCK_SIZE]);
                        }
                        i += 1;
                    }
                    DirtyLoc::Log { data_pos } => {
                        let mut n = 1u32;
                        while i + n < blocks {
                            match self.volumes[vi].index.get(lba.offset((i + n) as u64)) {
                                Some(nd) if matches!(nd.loc, DirtyLoc::Log { data_pos: p } if p == data_pos + n as u64 * BLOCK_SIZE_U64) => {
                                    n += 1
                                }
                                _ => break,
                            }
                        }
                        self.volumes[vi].metrics.read_hits_dirty += n as u64 - 1;
                        let pin = Pin::Log(data_pos);
                        self.pin(&pin);
                        let token = self.token(FlashOp::HostRead { vi, op: op_id, off: i, n, pin });
                        self.flash.submit_read(token, self.layout.log_offset(data_pos), n as u64 * BLOCK_SIZE_U64);
                        parts += 1;
                        i += n;
                    }
                }
            } else if let Some(slot) = self.cache.lookup((id, b)) {
                self.volumes[vi].metrics.read_hits_clean += 1;
                let pin = Pin::Slot(slot);
                self.pin(&pin);
                let token = self.token(FlashOp::HostRead { vi, op: op_id, off: i, n: 1, pin });
                self.flash.submit_read(token, self.layout.slot_offset(slot), BLOCK_SIZE_U64);
                parts += 1;
                i += 1;
            } else {
                let mut n = 1u32;
                while i + n < blocks {
                    let nb = lba.offset((i + n) as u64);
                    if self.volumes[vi].index.get(nb).is_some() || self.cache.contains((id, nb)) {
                        break;
                    }
                    n += 1;
                }
                self.volumes[vi].metrics.read_misses += n as u64;
                self.submit_san_read(vi, op_id, i, n, now);
                parts += 1;
                i += n;
            }
        }
        if let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op_id) {
            r.parts_pending += parts;
        }
        self.maybe_finish_read(vi, op_id);
    }

    fn submit_san_read(&mut self, vi: usize, op_id: u64, off: u32, n: u32, now: u64) {
        let lba = match &self.volumes[vi].ops[&op_id] {
            PendingOp::Read(r) => r.lba,
            _ => unreachable!(),
        };
        let token = self.san_token(vi, SanOp::HostRead { op: op_id, off, n, sent_at: now });
        self.volumes[vi].san.submit_read(token, (lba.0 + off as u64) * BLOCK_SIZE_U64, n as u64 * BLOCK_SIZE_U64);
    }

    fn maybe_finish_read(&mut self, vi: usize, op_id: u64) {
        let finished = match &self.volumes[vi].ops[&op_id] {
            PendingOp::Read(r) => r.parts_pending == 0 && r.san_retry.is_empty(),
            _ => unreachable!(),
        };
        if finished {
            let Some(PendingOp::Read(r)) = self.volumes[vi].ops.remove(&op_id) else { unreachable!() };
            let status = r.failed.unwrap_or(Status::Ok);
            self.complete(vi, r.token, status, r.buf, None);
        }
    }

    fn read_part_done(&mut self, vi: usize, op_id: u64, off: u32, data: &[u8]) {
        if let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op_id) {
            let o = off as usize * BLOCK_SIZE;
            r.buf[o..o + data.len()].copy_from_slice(data);
            r.parts_pending -= 1;
        }
        self.maybe_finish_read(vi, op_id);
    }

    /// Inserts clean copies of blocks just read from (or written to) the SAN.
    fn fill_cache(&mut self, vi: usize, lba: Lba, data: &[u8]) {
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
                let token = self.token(FlashOp::CacheFill { key, slot });
                self.flash.submit_write(token, self.layout.slot_offset(slot), block.to_vec(), false);
            }
        }
    }

    fn poll_flushes(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        let skip_san = self.cfg.bugs.host_flush_skips_san;
        let v = &mut self.volumes[vi];
        let mut finished = Vec::new();
        let mut need_max = 0u64;
        let (ops, upto) = (&v.ops, v.san_flushed_upto);
        v.flushes.retain(|&op_id| {
            let Some(PendingOp::Flush(f)) = ops.get(&op_id) else { unreachable!() };
            if f.need <= upto || skip_san {
                finished.push((op_id, Status::Ok));
                false
            } else if now >= f.deadline {
                finished.push((op_id, Status::Busy));
                false
            } else {
                need_max = need_max.max(f.need);
                true
            }
        });
        for (op_id, status) in finished {
            let Some(PendingOp::Flush(f)) = self.volumes[vi].ops.remove(&op_id) else { unreachable!() };
            self.complete(vi, f.token, status, Vec::new(), None);
            work += 1;
        }
        let v = &self.volumes[vi];
        if need_max > 0 && !v.host_san_flush_in_flight && v.san_health.may_try(now) {
            let covers = v.wt_acks;
            self.volumes[vi].host_san_flush_in_flight = true;
            let token = self.san_token(vi, SanOp::HostFlush { covers });
            self.volumes[vi].san.submit_flush(token);
            work += 1;
        }
        work
    }

    /// Makes progress on everything: device completions, acknowledgements, superblock,
    /// waiting writes, retries, destage. Returns how much work was done (0 = idle).
    pub fn poll(&mut self, now: u64) -> usize {
        let mut work = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        self.flash.poll_completions(&mut scratch);
        for done in scratch.drain(..) {
            work += 1;
            self.on_flash_done(done, now);
        }
        for vi in 0..self.volumes.len() {
            self.volumes[vi].san.poll_completions(&mut scratch);
            for done in scratch.drain(..) {
                work += 1;
                self.on_san_done(vi, done, now);
            }
        }
        self.scratch = scratch;
        match self.state {
            EngineState::Recovering => {
                if let Some(mut rec) = self.recovery.take() {
                    work += rec.poll(self, now);
                    if self.state == EngineState::Recovering {
                        self.recovery = Some(rec);
                    }
                }
                // The new incarnation's superblock (retried if the flash fails it).
                work += self.poll_superblock(now);
                return work;
            }
            EngineState::Ready => {}
            _ => return work,
        }
        work += self.advance_acks();
        self.advance_tail();
        work += self.poll_superblock(now);
        for vi in 0..self.volumes.len() {
            work += self.poll_waiters(vi, now);
            work += self.poll_gated(vi, now);
            work += self.poll_retries(vi, now);
            work += self.poll_flushes(vi, now);
            work += self.poll_destage(vi, now);
        }
        work += self.poll_degraded(now);
        work
    }

    fn poll_waiters(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        while let Some(&op_id) = self.volumes[vi].space_waiters.front() {
            if self.effective(vi).0 == WritePolicy::WriteThrough {
                self.volumes[vi].space_waiters.pop_front();
                self.start_write_through(vi, op_id, now);
            } else if self.try_log_write(vi, op_id) {
                self.volumes[vi].space_waiters.pop_front();
            } else if now >= self.write_op(vi, op_id).deadline {
                self.volumes[vi].space_waiters.pop_front();
                self.volumes[vi].metrics.log_full_fallthroughs += 1;
                self.start_write_through(vi, op_id, now);
            } else {
                break;
            }
            work += 1;
        }
        work
    }

    fn poll_retries(&mut self, vi: usize, now: u64) -> usize {
        let mut work = 0;
        if !self.volumes[vi].san_retries.is_empty() {
            for op_id in std::mem::take(&mut self.volumes[vi].san_retries) {
                let deadline = self.write_op(vi, op_id).deadline;
                if now >= deadline {
                    // The SAN may or may not hold the data: not acknowledged, host retries.
                    let token = self.write_op(vi, op_id).token;
                    self.volumes[vi].ops.remove(&op_id);
                    self.complete(vi, token, Status::Busy, Vec::new(), None);
                    work += 1;
                } else if self.volumes[vi].san_health.may_try(now) {
                    self.submit_san_write(vi, op_id, now);
                    work += 1;
                } else {
                    self.volumes[vi].san_retries.push(op_id);
                }
            }
        }
        if !self.volumes[vi].read_retries.is_empty() {
            for op_id in std::mem::take(&mut self.volumes[vi].read_retries) {
                let may_try = self.volumes[vi].san_health.may_try(now);
                let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op_id) else { unreachable!() };
                if now >= r.deadline {
                    // Parts still in flight finish normally; the read then reports Busy.
                    r.failed = Some(Status::Busy);
                    r.san_retry.clear();
                    self.maybe_finish_read(vi, op_id);
                    work += 1;
                } else if may_try {
                    let parts = std::mem::take(&mut r.san_retry);
                    r.parts_pending += parts.len();
                    for (off, n) in parts {
                        self.submit_san_read(vi, op_id, off, n, now);
                    }
                    work += 1;
                } else {
                    self.volumes[vi].read_retries.push(op_id);
                }
            }
        }
        work
    }

    fn on_flash_done(&mut self, done: IoDone, now: u64) {
        let Some(op) = self.flash_ops.remove(&done.token) else {
            panic!("engine: flash completion for unknown token {}", done.token)
        };
        match op {
            FlashOp::Format => {
                if let Err(e) = done.result {
                    self.state = EngineState::Failed(format!("format: superblock write failed: {e}"));
                    return;
                }
                self.format_pending -= 1;
                if self.format_pending == 0 && self.state == EngineState::Formatting {
                    self.state = EngineState::Ready;
                    self.persisted_tail = 0;
                }
            }
            FlashOp::Recovery(what) => {
                if let Some(mut rec) = self.recovery.take() {
                    rec.on_read(self, done, what);
                    if self.state == EngineState::Recovering {
                        self.recovery = Some(rec);
                    }
                }
            }
            FlashOp::LogWrite { pos } => {
                self.log_writes_in_flight -= 1;
                let i = self.records.partition_point(|r| r.pos < pos);
                assert!(i < self.records.len() && self.records[i].pos == pos, "engine: log completion for unknown pos");
                self.records[i].write_in_flight = false;
                match done.result {
                    Ok(_) => {
                        if self.records[i].state == WriteState::Logging {
                            self.records[i].state = WriteState::Logged;
                            if let (Some(op_id), RecordKind::Write { vi, .. }) =
                                (self.records[i].op, self.records[i].kind)
                            {
                                self.set_write_state(vi, op_id, WriteState::Logged);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(pos, error = %e, "flash log write failed; device degraded to write-through");
                        self.enter_degraded(now);
                        if self.records[i].state == WriteState::Logging {
                            self.abandon_unacked();
                        }
                    }
                }
            }
            FlashOp::Superblock { generation, snapshot } => {
                self.sb.in_flight = false;
                match done.result {
                    Ok(_) => self.superblock_durable(generation, snapshot),
                    Err(e) => {
                        tracing::warn!(generation, error = %e, "superblock write failed; retrying");
                        self.enter_degraded(now);
                        self.sb.wanted = true;
                        self.sb.retry_at = now + SUPERBLOCK_RETRY_NS;
                    }
                }
            }
            FlashOp::HostRead { vi, op, off, n, pin } => {
                self.unpin(&pin);
                match done.result {
                    Ok(data) => self.read_part_done(vi, op, off, &data),
                    Err(_) if matches!(pin, Pin::Slot(_)) => {
                        // A clean copy is only a copy: read the SAN instead.
                        self.submit_san_read(vi, op, off, n, now);
                    }
                    Err(e) if matches!(&self.volumes[vi].ops[&op], PendingOp::Read(r) if now < r.deadline) => {
                        // Dirty data exists only here: retry until the read's deadline.
                        tracing::warn!(volume = self.volumes[vi].id.0, error = %e, "flash read of dirty data failed; retrying");
                        let Pin::Log(data_pos) = pin else { unreachable!() };
                        let pin = Pin::Log(data_pos);
                        self.pin(&pin);
                        let token = self.token(FlashOp::HostRead { vi, op, off, n, pin });
                        self.flash.submit_read(token, self.layout.log_offset(data_pos), n as u64 * BLOCK_SIZE_U64);
                    }
                    Err(e) => {
                        tracing::error!(volume = self.volumes[vi].id.0, error = %e, "flash read of dirty data failed");
                        if let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op) {
                            r.failed = Some(Status::MediumError);
                            r.parts_pending -= 1;
                        }
                        self.maybe_finish_read(vi, op);
                    }
                }
            }
            FlashOp::CacheFill { key, slot } => {
                let ok = done.result.is_ok();
                if !ok {
                    self.enter_degraded(now);
                }
                self.cache.finish_fill(key, slot, ok);
            }
            FlashOp::DestageRead { vi, idx, pos } => {
                self.unpin(&Pin::Log(pos));
                self.destage_read_done(vi, idx, done.result, now);
            }
        }
    }

    fn on_san_done(&mut self, vi: usize, done: IoDone, now: u64) {
        let Some(op) = self.san_ops[vi].remove(&done.token) else {
            panic!("engine: SAN completion for unknown token {}", done.token)
        };
        let id = self.volumes[vi].id;
        match &done.result {
            Ok(_) => {
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
            SanOp::HostWrite { op } => match done.result {
                Ok(_) => {
                    let (token, lba, data, fua) = {
                        let w = self.write_op(vi, op);
                        (w.token, w.lba, w.data.clone(), w.fua)
                    };
                    self.set_write_state(vi, op, WriteState::Acked);
                    self.volumes[vi].ops.remove(&op);
                    if self.cfg.bugs.skip_write_through_gate {
                        let blocks = (data.len() / BLOCK_SIZE) as u32;
                        self.volumes[vi].index.remove_range(lba, blocks);
                    }
                    if !fua {
                        self.volumes[vi].wt_acks += 1;
                    }
                    self.complete(vi, token, Status::Ok, Vec::new(), None);
                    self.fill_cache(vi, lba, &data);
                }
                Err(_) => {
                    self.write_op(vi, op).retry = true;
                    self.volumes[vi].san_retries.push(op);
                }
            },
            SanOp::HostRead { op, off, n, sent_at } => {
                self.volumes[vi].destager.observe_san_latency(now.saturating_sub(sent_at));
                match done.result {
                    Ok(data) => {
                        let lba = match &self.volumes[vi].ops[&op] {
                            PendingOp::Read(r) => r.lba.offset(off as u64),
                            _ => unreachable!(),
                        };
                        self.fill_cache(vi, lba, &data);
                        self.read_part_done(vi, op, off, &data);
                    }
                    Err(_) => {
                        let Some(PendingOp::Read(r)) = self.volumes[vi].ops.get_mut(&op) else { unreachable!() };
                        r.parts_pending -= 1;
                        if r.failed.is_some() {
                            self.maybe_finish_read(vi, op);
                        } else {
                            r.san_retry.push((off, n));
                            if !self.volumes[vi].read_retries.contains(&op) {
                                self.volumes[vi].read_retries.push(op);
                            }
                        }
                    }
                }
            }
            SanOp::HostFlush { covers } => {
                self.volumes[vi].host_san_flush_in_flight = false;
                if done.result.is_ok() {
                    let v = &mut self.volumes[vi];
                    v.san_flushed_upto = v.san_flushed_upto.max(covers);
                }
            }
            SanOp::DestageWrite { run, sent_at } => self.destage_write_done(vi, run, sent_at, done.result, now),
            SanOp::DestageFlush { covers } => self.destage_flush_done(vi, covers, done.result, now),
        }
    }

    pub(crate) fn enter_degraded(&mut self, now: u64) {
        if self.degraded.is_none() {
            self.events.push(EngineEvent::FlashDegraded);
            tracing::warn!(device = self.cfg.device_id, "flash degraded: volumes run write-through");
        }
        self.degraded = Some(now);
    }

    fn poll_degraded(&mut self, now: u64) -> usize {
        let Some(since) = self.degraded else { return 0 };
        if self.records.is_empty()
            && self.persisted_tail == self.ring.head
            && !self.sb.in_flight
            && self.log_writes_in_flight == 0
            && now >= since + FLASH_DEGRADED_COOLDOWN_NS
        {
            self.degraded = None;
            self.events.push(EngineEvent::FlashHealthy);
            tracing::info!(device = self.cfg.device_id, "flash healthy again: write-back resumes");
            return 1;
        }
        0
    }

    /// A log write failed: every entry not yet acknowledged is kept in memory instead, to be
    /// destaged in sequence order and acknowledged once on the SAN. Recovery would stop at the
    /// failed entry, so nothing after it may count as durable.
    fn abandon_unacked(&mut self) {
        let first = self.records.partition_point(|r| r.pos < self.acked_pos);
        for i in first..self.records.len() {
            let r = &mut self.records[i];
            if !matches!(r.state, WriteState::Logging | WriteState::Logged) {
                continue;
            }
            r.state = WriteState::Abandoned;
            let RecordKind::Write { vi, seq, lba, blocks } = r.kind else { continue };
            let data = r.data.take().expect("engine: unacknowledged record without data");
            let op_id = r.op.expect("engine: write record without op");
            let pos = r.pos;
            let v = &mut self.volumes[vi];
            let buf = data.clone();
            v.index
                .insert(lba, blocks, seq, |b| DirtyLoc::Memory { buf: buf.clone(), offset: b as usize * BLOCK_SIZE });
            assert!(v.dirty.back().is_none_or(|d| d.seq < seq), "engine: abandoned entries out of order");
            v.push_dirty(DirtyRecord { seq, lba, blocks, pos, memory: Some((data, op_id)) });
            self.set_write_state(vi, op_id, WriteState::Abandoned);
        }
        // Waiting writes go write-through now.
        for vi in 0..self.volumes.len() {
            let waiters: Vec<u64> = self.volumes[vi].space_waiters.drain(..).collect();
            for op_id in waiters {
                let deadline = self.write_op(vi, op_id).deadline;
                self.start_write_through(vi, op_id, deadline);
            }
        }
    }

    /// Acknowledges durable entries in log order.
    fn advance_acks(&mut self) -> usize {
        let mut work = 0;
        let mut i = self.records.partition_point(|r| r.pos < self.acked_pos);
        while i < self.records.len() {
            let r = &mut self.records[i];
            match r.state {
                WriteState::Logged => {}
                WriteState::Abandoned => {
                    self.acked_pos = r.pos + r.bytes;
                    i += 1;
                    continue;
                }
                _ => break,
            }
            r.state = WriteState::Acked;
            r.data = None;
            self.acked_pos = r.pos + r.bytes;
            let (kind, op, pos) = (r.kind, r.op, r.pos);
            if let RecordKind::Write { vi, seq, lba, blocks } = kind {
                let v = &mut self.volumes[vi];
                v.index.insert(lba, blocks, seq, |b| DirtyLoc::Log { data_pos: pos + (1 + b as u64) * BLOCK_SIZE_U64 });
                v.push_dirty(DirtyRecord { seq, lba, blocks, pos, memory: None });
                let op_id = op.expect("engine: write record without op");
                self.set_write_state(vi, op_id, WriteState::Acked);
                let token = self.write_op(vi, op_id).token;
                self.volumes[vi].ops.remove(&op_id);
                self.complete(vi, token, Status::Ok, Vec::new(), Some(seq));
            }
            work += 1;
            i += 1;
        }
        work
    }

    /// Pops clean entries off the front of the ring.
    pub(crate) fn advance_tail(&mut self) {
        while let Some(r) = self.records.front() {
            if r.write_in_flight {
                break;
            }
            let clean = match r.kind {
                RecordKind::Pad => matches!(r.state, WriteState::Acked | WriteState::Abandoned),
                RecordKind::Write { vi, seq, .. } => {
                    matches!(r.state, WriteState::Acked | WriteState::Abandoned) && self.volumes[vi].watermark >= seq
                }
            };
            if !clean {
                break;
            }
            self.records.pop_front();
        }
        if self.tail() > self.persisted_tail {
            self.sb.wanted = true;
        }
    }

    pub(crate) fn request_superblock(&mut self) {
        self.sb.wanted = true;
    }

    fn poll_superblock(&mut self, now: u64) -> usize {
        if self.sb.in_flight || !self.sb.wanted || now < self.sb.retry_at {
            return 0;
        }
        self.sb.wanted = false;
        self.write_superblock();
        1
    }

    /// Writes the next superblock generation (one at a time; a failed one is retried with the
    /// same generation, so the other copy always keeps the last durable state).
    pub(crate) fn write_superblock(&mut self) {
        assert!(!self.sb.in_flight);
        let generation = self.sb.durable_generation + 1;
        let tail = self.tail();
        let sb = self.superblock(generation, tail);
        let snapshot = SbSnapshot { tail, volumes: self.volumes.iter().map(|v| (v.watermark, v.intent)).collect() };
        self.sb.in_flight = true;
        let token = self.token(FlashOp::Superblock { generation, snapshot });
        let fua = self.info.volatile_cache;
        self.flash.submit_write(token, Superblock::copy_offset(generation), sb.encode(), fua);
    }

    fn superblock_durable(&mut self, generation: u64, snapshot: SbSnapshot) {
        assert_eq!(generation, self.sb.durable_generation + 1);
        self.sb.durable_generation = generation;
        assert!(snapshot.tail >= self.persisted_tail, "engine: persisted tail moved back");
        self.persisted_tail = snapshot.tail;
        for (vi, (wm, intent)) in snapshot.volumes.into_iter().enumerate() {
            let v = &mut self.volumes[vi];
            v.persisted_watermark = v.persisted_watermark.max(wm);
            v.persisted_intent = v.persisted_intent.max(intent);
            while v.unpersisted.front().is_some_and(|r| r.seq <= v.persisted_watermark) {
                let r = v.unpersisted.pop_front().unwrap();
                v.index.remove_clean(r.lba, r.blocks, v.persisted_watermark);
                v.metrics.state_entries[WriteState::Clean as usize] += 1;
            }
        }
        for vi in 0..self.volumes.len() {
            let wm = self.volumes[vi].persisted_watermark;
            let ready: Vec<(LogSeq, u64)> = {
                let v = &mut self.volumes[vi];
                let (ready, waiting) = v.acks_on_persist.drain(..).partition(|(seq, _)| *seq <= wm);
                v.acks_on_persist = waiting;
                ready
            };
            for (seq, op) in ready {
                let Some(PendingOp::Write(w)) = self.volumes[vi].ops.remove(&op) else {
                    panic!("engine: abandoned write without its op")
                };
                self.volumes[vi].enter(op, w.state, WriteState::Acked);
                self.complete(vi, w.token, Status::Ok, Vec::new(), Some(seq));
            }
        }
        if self.state == EngineState::Recovering {
            self.state = EngineState::Ready;
            tracing::info!(device = self.cfg.device_id, incarnation = self.incarnation, "recovered");
        }
    }

    /// Installs the result of log replay (called by recovery).
    pub(crate) fn install_recovered(&mut self, sb: &Superblock, head: u64, entries: Vec<(u64, EntryHeader)>) {
        self.incarnation = sb.incarnation + 1;
        self.incarnation_start = head;
        self.sb.durable_generation = sb.generation;
        self.persisted_tail = sb.log_tail;
        self.ring = Ring::new(self.layout.log_bytes, head);
        self.acked_pos = head;
        for v in &mut self.volumes {
            if let Some(s) = sb.volume(v.id) {
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
        for (pos, h) in entries {
            let kind = match h.kind {
                EntryKind::Pad => RecordKind::Pad,
                EntryKind::Write => {
                    let vi = self.volume_index(h.volume).expect("recovery: entry of an unknown volume");
                    let v = &mut self.volumes[vi];
                    if h.seq > v.watermark {
                        v.index.insert(h.lba, h.blocks, h.seq, |b| DirtyLoc::Log {
                            data_pos: pos + (1 + b as u64) * BLOCK_SIZE_U64,
                        });
                        v.push_dirty(DirtyRecord { seq: h.seq, lba: h.lba, blocks: h.blocks, pos, memory: None });
                    }
                    v.next_seq = v.next_seq.max(h.seq.next());
                    RecordKind::Write { vi, seq: h.seq, lba: h.lba, blocks: h.blocks }
                }
            };
            let bytes = match h.kind {
                EntryKind::Pad => self.ring.next_lap(pos) - pos,
                EntryKind::Write => h.entry_bytes(),
            };
            self.records.push_back(LogRecord {
                pos,
                bytes,
                kind,
                state: WriteState::Acked,
                write_in_flight: false,
                op: None,
                data: None,
            });
        }
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
        self.advance_tail();
        // The new incarnation must be durable before any entry is written with it.
        self.write_superblock();
    }

    /// Used by the destager to get an epoch for entries (replication will fence on it).
    pub fn volume_epoch(&self, id: VolumeId) -> Option<Epoch> {
        self.volume_index(id).map(|vi| self.volumes[vi].epoch)
    }
}
