//! The dirty index: which blocks of a volume have data newer than the SAN, and where it is.
//!
//! A block stays in the index from the moment its write is acknowledged until the *persisted*
//! watermark covers its newest entry, not merely until it is destaged: until the superblock
//! says so, a crash would replay the entry and destage it again, so the block must still count
//! as dirty for invariant 2 (a write-through write to it must wait).
//!
//! Kept per block in a `BTreeMap` (about 60 bytes per dirty block, bounded by the log size). A
//! range-splitting extent tree would be smaller for large writes; per-block keeps overwrite
//! handling trivially right, and reads coalesce adjacent blocks into runs anyway.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::types::{Lba, LogSeq};

/// Where the newest dirty copy of a block is.
#[derive(Clone, Debug)]
pub enum DirtyLoc {
    /// In the log; `data_pos` is the absolute log position of this block's data.
    Log { data_pos: u64 },
    /// In memory only: its log write failed, so it is destaged from this buffer (and the host
    /// write is acknowledged once it is on the SAN).
    Memory { buf: Rc<Vec<u8>>, offset: usize },
}

#[derive(Clone, Debug)]
pub struct DirtyBlock {
    pub seq: LogSeq,
    pub loc: DirtyLoc,
}

#[derive(Default)]
pub struct DirtyIndex {
    blocks: BTreeMap<u64, DirtyBlock>,
}

impl DirtyIndex {
    /// Maps `blocks` blocks from `lba` to `seq`; `loc(i)` gives the location of block `i`.
    pub fn insert(&mut self, lba: Lba, blocks: u32, seq: LogSeq, loc: impl Fn(u32) -> DirtyLoc) {
        for i in 0..blocks {
            let prev = self.blocks.insert(lba.0 + i as u64, DirtyBlock { seq, loc: loc(i) });
            if let Some(prev) = prev {
                assert!(prev.seq < seq, "index: {} overwritten by older {seq}", prev.seq);
            }
        }
    }

    pub fn get(&self, lba: Lba) -> Option<&DirtyBlock> {
        self.blocks.get(&lba.0)
    }

    pub fn overlaps(&self, lba: Lba, blocks: u32) -> bool {
        self.blocks.range(lba.0..lba.0 + blocks as u64).next().is_some()
    }

    /// Drops the blocks of an entry whose newest copy is at most `watermark` (persisted clean).
    pub fn remove_clean(&mut self, lba: Lba, blocks: u32, watermark: LogSeq) {
        for b in lba.0..lba.0 + blocks as u64 {
            if self.blocks.get(&b).is_some_and(|d| d.seq <= watermark) {
                self.blocks.remove(&b);
            }
        }
    }

    /// Forgets blocks regardless of sequence (only the mutation-testing bug uses this).
    pub fn remove_range(&mut self, lba: Lba, blocks: u32) {
        for b in lba.0..lba.0 + blocks as u64 {
            self.blocks.remove(&b);
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    pub fn clear(&mut self) {
        self.blocks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_wins_and_clean_removal_keeps_newer() {
        let mut ix = DirtyIndex::default();
        ix.insert(Lba(10), 4, LogSeq(1), |i| DirtyLoc::Log { data_pos: 100 + i as u64 });
        ix.insert(Lba(12), 1, LogSeq(2), |_| DirtyLoc::Log { data_pos: 900 });
        assert!(ix.overlaps(Lba(13), 1) && !ix.overlaps(Lba(14), 5) && ix.overlaps(Lba(0), 11));
        ix.remove_clean(Lba(10), 4, LogSeq(1));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.get(Lba(12)).unwrap().seq, LogSeq(2));
        ix.remove_clean(Lba(12), 1, LogSeq(2));
        assert!(ix.is_empty());
    }
}
