//! Identifier newtypes. Mixing up an LBA with a sequence number, a log position with a device
//! offset, or a host operation with an I/O token is the kind of bug that type-checks silently
//! with bare integers, so each gets its own type (STYLE.md: Crucible's `JobId`/`ClientId`).

use std::fmt;

/// A logical block address on a volume, in units of [`crate::constants::BLOCK_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lba(pub u64);

impl Lba {
    /// Whether `blocks` blocks from here and `other_blocks` from `other` share a block.
    pub fn overlaps(self, blocks: u64, other: Lba, other_blocks: u64) -> bool {
        self.0 < other.0 + other_blocks && other.0 < self.0 + blocks
    }
}

/// A per-volume log sequence number. Assigned in log order; 0 means "nothing", so the first
/// entry of a volume is 1 and a watermark of 0 means nothing is destaged yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogSeq(pub u64);

/// Bumped on every change of a volume's owner or replica set; entries carry it so a stale
/// owner's writes can be fenced (replication, later).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// A volume (exported namespace) identity, stable across restarts and nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VolumeId(pub u32);

/// An absolute position in a device's log ring, in bytes. Positions only grow; the device
/// offset is `log_start + pos % log_bytes` ([`crate::log::Layout::log_offset`]). Every frame
/// records its position, so a leftover of an earlier lap is never taken for a current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LogPos(pub u64);

/// Bumped in the superblock at every recovery; frames carry the incarnation they were written
/// in, so replay can tell survivors of a dropped torn tail from current frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Incarnation(pub u64);

/// One replication link of an engine: a volume between its source and one replica (the
/// target numbers them; the engine only matches events to links).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct LinkId(pub u32);

/// A host operation inside the engine (the driver's own token travels beside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct OpId(pub u64);

/// Identifies one device I/O (flash or SAN) from submission to completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IoToken(pub u64);

impl Lba {
    pub fn offset(self, blocks: u64) -> Lba {
        Lba(self.0 + blocks)
    }
}

impl LogSeq {
    pub fn next(self) -> LogSeq {
        LogSeq(self.0 + 1)
    }
}

impl LogPos {
    pub fn plus(self, bytes: u64) -> LogPos {
        LogPos(self.0 + bytes)
    }
    /// Bytes from `earlier` to here.
    pub fn since(self, earlier: LogPos) -> u64 {
        self.0 - earlier.0
    }
}

impl Epoch {
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}

impl Incarnation {
    pub fn next(self) -> Incarnation {
        Incarnation(self.0 + 1)
    }
}

impl fmt::Display for Lba {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lba {}", self.0)
    }
}

impl fmt::Display for LogSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq {}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {}", self.0)
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "volume {}", self.0)
    }
}

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link {}", self.0)
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "log pos {}", self.0)
    }
}

impl fmt::Display for Incarnation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "incarnation {}", self.0)
    }
}
