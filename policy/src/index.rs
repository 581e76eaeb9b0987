//! The dirty index: which blocks of a volume have data newer than the SAN, and where it is.
//!
//! A block stays in the index from the moment its write is acknowledged until the *persisted*
//! watermark covers its newest entry, not merely until it is destaged: until the superblock
//! says so, a crash would replay the entry and destage it again, so the block must still count
//! as dirty for invariant 2 (a write-through write to it must wait).
//!
//! Kept as an extent map (start LBA → extent), split on overwrite: a 1 MiB write is one node,
//! and Write Zeroes over a whole volume is one node too, where a per-block map would hold a
//! node per block.

use std::collections::BTreeMap;
use std::rc::Rc;

use crate::constants::BLOCK_SIZE_U64;
use crate::io::AlignedBuf;
use crate::types::{Lba, LogPos, LogSeq};

/// Where the newest dirty copy of an extent is.
#[derive(Clone, Debug)]
pub enum DirtyLoc {
    /// In the log; `data_pos` is the position of the extent's first block.
    Log { data_pos: LogPos },
    /// Reads as zeroes (a Write Zeroes entry, or a Deallocate one: `unmap`, which the destager
    /// turns into an unmap instead of writing zeroes).
    Zero { unmap: bool },
    /// In memory only: its log write failed, so the destager writes it to the SAN from a copy
    /// and the host write is acknowledged once it is there; reads are served from `buf`.
    Memory { buf: Rc<AlignedBuf>, first_block: u64 },
}

impl DirtyLoc {
    /// The location of the block `blocks` further on.
    pub(crate) fn advanced(&self, blocks: u64) -> DirtyLoc {
        match self {
            DirtyLoc::Log { data_pos } => DirtyLoc::Log { data_pos: data_pos.plus(blocks * BLOCK_SIZE_U64) },
            DirtyLoc::Zero { unmap } => DirtyLoc::Zero { unmap: *unmap },
            DirtyLoc::Memory { buf, first_block } => {
                DirtyLoc::Memory { buf: buf.clone(), first_block: first_block + blocks }
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct Extent {
    pub blocks: u64,
    pub seq: LogSeq,
    pub loc: DirtyLoc,
}

/// A piece of a looked-up range: `blocks` blocks from `lba`, dirty (with where) or not.
#[derive(Clone, Debug)]
pub struct Piece {
    pub lba: Lba,
    pub blocks: u64,
    pub dirty: Option<(LogSeq, DirtyLoc)>,
}

#[derive(Default)]
pub struct DirtyIndex {
    map: BTreeMap<u64, Extent>,
    blocks: u64,
}

impl DirtyIndex {
    /// Splits the extent covering `at` (if one starts before it) so an extent starts at `at`.
    fn split(&mut self, at: u64) {
        let Some((&start, e)) = self.map.range(..at).next_back() else { return };
        if start + e.blocks <= at {
            return;
        }
        let right = Extent { blocks: start + e.blocks - at, seq: e.seq, loc: e.loc.advanced(at - start) };
        if let Some(left) = self.map.get_mut(&start) {
            left.blocks = at - start;
        }
        self.map.insert(at, right);
    }

    /// Maps `blocks` blocks from `lba` to `seq` at `loc` (the location of the first block).
    pub fn insert(&mut self, lba: Lba, blocks: u64, seq: LogSeq, loc: DirtyLoc) {
        let end = lba.0 + blocks;
        self.split(lba.0);
        self.split(end);
        let covered: Vec<u64> = self.map.range(lba.0..end).map(|(&s, _)| s).collect();
        for s in covered {
            if let Some(old) = self.map.remove(&s) {
                assert!(old.seq < seq, "index: {} overwritten by older {seq}", old.seq);
                self.blocks -= old.blocks;
            }
        }
        self.map.insert(lba.0, Extent { blocks, seq, loc });
        self.blocks += blocks;
    }

    /// The range from `lba`, cut into dirty and clean pieces in LBA order.
    pub fn lookup(&self, lba: Lba, blocks: u64) -> Vec<Piece> {
        let end = lba.0 + blocks;
        let mut out = Vec::new();
        let mut at = lba.0;
        let first = self.map.range(..=lba.0).next_back().filter(|(&s, e)| s + e.blocks > lba.0);
        let rest = self.map.range(lba.0 + 1..end);
        for (&s, e) in first.into_iter().chain(rest) {
            if s > at {
                out.push(Piece { lba: Lba(at), blocks: s - at, dirty: None });
                at = s;
            }
            let piece_end = (s + e.blocks).min(end);
            out.push(Piece { lba: Lba(at), blocks: piece_end - at, dirty: Some((e.seq, e.loc.advanced(at - s))) });
            at = piece_end;
        }
        if at < end {
            out.push(Piece { lba: Lba(at), blocks: end - at, dirty: None });
        }
        out
    }

    /// The newest dirty copy of one block.
    pub fn get(&self, lba: Lba) -> Option<(LogSeq, DirtyLoc)> {
        let (&s, e) = self.map.range(..=lba.0).next_back()?;
        (s + e.blocks > lba.0).then(|| (e.seq, e.loc.advanced(lba.0 - s)))
    }

    pub fn overlaps(&self, lba: Lba, blocks: u64) -> bool {
        let end = lba.0 + blocks;
        let before = self.map.range(..=lba.0).next_back().is_some_and(|(&s, e)| s + e.blocks > lba.0);
        before || self.map.range(lba.0..end).next().is_some()
    }

    /// Drops the blocks of `lba..lba+blocks` whose newest copy is at most `watermark`
    /// (persisted clean); newer copies stay.
    pub fn remove_clean(&mut self, lba: Lba, blocks: u64, watermark: LogSeq) {
        let end = lba.0 + blocks;
        if !self.overlaps(lba, blocks) {
            return;
        }
        self.split(lba.0);
        self.split(end);
        let clean: Vec<u64> = self.map.range(lba.0..end).filter(|(_, e)| e.seq <= watermark).map(|(&s, _)| s).collect();
        for s in clean {
            if let Some(e) = self.map.remove(&s) {
                self.blocks -= e.blocks;
            }
        }
    }

    /// Forgets blocks regardless of sequence (only the mutation-testing bug uses this).
    pub fn remove_range(&mut self, lba: Lba, blocks: u64) {
        let end = lba.0 + blocks;
        self.split(lba.0);
        self.split(end);
        let covered: Vec<u64> = self.map.range(lba.0..end).map(|(&s, _)| s).collect();
        for s in covered {
            if let Some(e) = self.map.remove(&s) {
                self.blocks -= e.blocks;
            }
        }
    }

    /// Every extent in LBA order.
    pub fn iter(&self) -> impl Iterator<Item = (Lba, &Extent)> {
        self.map.iter().map(|(&s, e)| (Lba(s), e))
    }

    /// Dirty blocks.
    pub fn len(&self) -> u64 {
        self.blocks
    }

    pub fn is_empty(&self) -> bool {
        self.blocks == 0
    }

    /// Extents (index nodes), for memory accounting.
    pub fn extents(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(pos: u64) -> DirtyLoc {
        DirtyLoc::Log { data_pos: LogPos(pos) }
    }

    fn data_pos(p: &Piece) -> Option<u64> {
        match &p.dirty {
            Some((_, DirtyLoc::Log { data_pos })) => Some(data_pos.0),
            _ => None,
        }
    }

    #[test]
    fn newest_wins_and_clean_removal_keeps_newer() {
        let mut ix = DirtyIndex::default();
        ix.insert(Lba(10), 4, LogSeq(1), log(100 * 4096));
        ix.insert(Lba(12), 1, LogSeq(2), log(900 * 4096));
        assert!(ix.overlaps(Lba(13), 1) && !ix.overlaps(Lba(14), 5) && ix.overlaps(Lba(0), 11));
        assert_eq!(ix.len(), 4);
        let pieces = ix.lookup(Lba(8), 8);
        let shape: Vec<(u64, u64, Option<u64>)> = pieces.iter().map(|p| (p.lba.0, p.blocks, data_pos(p))).collect();
        assert_eq!(
            shape,
            vec![
                (8, 2, None),
                (10, 2, Some(100 * 4096)),
                (12, 1, Some(900 * 4096)),
                (13, 1, Some(103 * 4096)),
                (14, 2, None)
            ]
        );
        ix.remove_clean(Lba(10), 4, LogSeq(1));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.get(Lba(12)).unwrap().0, LogSeq(2));
        ix.remove_clean(Lba(12), 1, LogSeq(2));
        assert!(ix.is_empty() && ix.extents() == 0);
    }

    #[test]
    fn a_large_zero_range_is_one_extent_and_splits_on_overwrite() {
        let mut ix = DirtyIndex::default();
        ix.insert(Lba(0), 1 << 30, LogSeq(5), DirtyLoc::Zero { unmap: false });
        assert_eq!((ix.len(), ix.extents()), (1 << 30, 1));
        ix.insert(Lba(1000), 2, LogSeq(6), log(4096));
        assert_eq!((ix.len(), ix.extents()), (1 << 30, 3));
        assert!(matches!(ix.get(Lba(999)), Some((LogSeq(5), DirtyLoc::Zero { unmap: false }))));
        assert!(matches!(ix.get(Lba(1001)), Some((LogSeq(6), DirtyLoc::Log { data_pos: LogPos(8192) }))));
        // Only the part the watermark covers goes; the newer write stays.
        ix.remove_clean(Lba(0), 1 << 30, LogSeq(5));
        assert_eq!((ix.len(), ix.extents()), (2, 1));
    }

    #[test]
    #[should_panic(expected = "overwritten by older")]
    fn an_older_entry_never_replaces_a_newer_one() {
        let mut ix = DirtyIndex::default();
        ix.insert(Lba(0), 4, LogSeq(9), DirtyLoc::Zero { unmap: false });
        ix.insert(Lba(2), 4, LogSeq(3), DirtyLoc::Zero { unmap: false });
    }
}
