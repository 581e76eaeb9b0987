//! Identifier newtypes. Mixing up an LBA with a sequence number or a volume with an epoch is
//! the kind of bug that type-checks silently with bare integers, so each gets its own type.

use std::fmt;

/// A logical block address on a volume, in units of [`crate::constants::BLOCK_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lba(pub u64);

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
