//! The messages between a flash device's two halves: the [`Engine`](crate::engine::Engine) on
//! the front-end reactor that owns the device (log appends, reads, acknowledgements) and the
//! [`Destager`](crate::destage::Destager) on the node's destage core (SAN traffic).
//!
//! They share no memory; everything crosses as one of these messages, in order, over a
//! bounded queue the driver provides (crossbeam channels between threads in stagerd, a seeded
//! delay line in the simulator, a plain queue in the offline tools). Buffers move with the
//! message that needs them, never copied on the way: a write-through write's host buffer goes
//! to the destage core and comes back in its `SanDone`.

use crate::io::{AlignedBuf, IoError};
use crate::log::EntryKind;
use crate::types::{IoToken, Lba, LogPos, LogSeq, VolumeId};

/// An acknowledged entry the destager must bring to the SAN.
#[derive(Debug)]
pub struct DirtyRecord {
    pub seq: LogSeq,
    pub kind: EntryKind,
    pub lba: Lba,
    pub blocks: u64,
    /// Where the data is in the log (`Write` entries), and its checksum: the destager verifies
    /// what it reads back against what was written.
    pub data_pos: LogPos,
    pub data_crc: u32,
    /// Set when the entry's log write failed: a copy of the data, destaged from memory (the
    /// host write is acknowledged once the persisted watermark covers it).
    pub memory: Option<AlignedBuf>,
}

/// A host command that needs the SAN: read misses, write-through writes, flushes.
#[derive(Debug)]
pub enum SanRequest {
    Read {
        offset: u64,
        buf: AlignedBuf,
    },
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
        /// A write of a full log over dirty blocks (`engine/write.rs`, "Full log"): every
        /// entry of its blocks below this sequence number is void once it succeeds. The
        /// destager writes no older data of them over it (see `destage/supersede.rs`).
        supersede: Option<LogSeq>,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Unmap {
        offset: u64,
        len: u64,
    },
    Flush,
}

/// How the front end is doing, for the destager's rate controller (DESIGN.md: speed up when the
/// cache fills or is idle, slow down when front-end latency suffers).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Pressure {
    /// Log space in use, per mille of the log.
    pub log_used_permille: u32,
    /// No host command arrived since the last report.
    pub frontend_idle: bool,
    /// Recent host-visible flash latency over its running best (1.0 = as good as it gets).
    pub frontend_slowdown: f32,
}

/// Engine → destager.
#[derive(Debug)]
pub enum ToDestage {
    /// Sent once when the engine is ready (after format or replay): where the volume's destage
    /// stands durably. Dirty records follow.
    Start {
        volume: VolumeId,
        watermark: LogSeq,
        intent: LogSeq,
    },
    /// Newly acknowledged entries (or abandoned ones with their data), in sequence order.
    Dirty {
        volume: VolumeId,
        records: Vec<DirtyRecord>,
    },
    /// The superblock now holds a destage intent of at least `intent`.
    IntentPersisted {
        volume: VolumeId,
        intent: LogSeq,
    },
    San {
        volume: VolumeId,
        token: IoToken,
        op: SanRequest,
    },
    Pressure(Pressure),
}

/// What the destager tells the engine about one volume's SAN.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SanReport {
    pub reachable: bool,
    pub errors: u64,
    pub latency_ns_ewma: f64,
    pub destage_rate_bytes_per_s: f64,
    pub destage_depth: usize,
    pub destaged_bytes_total: u64,
}

/// Destager → engine.
#[derive(Debug)]
pub enum FromDestage {
    /// Persist a destage intent of at least `upto` before the batch that needs it may start.
    NeedIntent {
        volume: VolumeId,
        upto: LogSeq,
    },
    /// A batch is on the SAN and flushed: the SAN holds the volume as of `watermark`.
    Destaged {
        volume: VolumeId,
        watermark: LogSeq,
    },
    SanDone {
        volume: VolumeId,
        token: IoToken,
        result: Result<(), IoError>,
        buf: Option<AlignedBuf>,
    },
    Report {
        volume: VolumeId,
        report: SanReport,
    },
}
