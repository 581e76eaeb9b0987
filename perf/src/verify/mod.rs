//! `--verify`: the data-integrity checker. It decides, for every block read back, whether the
//! target returned the newest acknowledged write of that block — and if not, how it failed.
//!
//! The harness keeps, per block, two stamps (generation + run seed, see [`block`]):
//! * **acked** — the newest write the target acknowledged;
//! * **pending** — a write that was submitted but not acknowledged. While a run is healthy a
//!   block is pending only while its write is in flight, and the engine never reads a block
//!   with a write in flight (nor issues two overlapping writes), so "newest acknowledged" is
//!   always well-defined. When the target dies mid-run, the writes in flight stay pending in
//!   the saved state: they may or may not have landed, so a later read accepts either stamp,
//!   and the first read *resolves* the block to whichever it found.
//!
//! A read is then classified ([`check_block`]):
//! | found | verdict |
//! |---|---|
//! | acked or pending stamp, right LBA, good CRC | ok |
//! | all zeroes where a write was acknowledged | **lost** |
//! | no header where a write was acknowledged | **foreign** (overwritten by something else) |
//! | our magic, bad CRC | **torn** / corrupt |
//! | good block, other LBA in its header | **misplaced** |
//! | older generation than acknowledged | **stale** |
//! | newer generation than ever written | **unexpected** |
//! | same generation, other run's seed | **foreign** |
//!
//! Blocks the state knows nothing about are not checked. A block with only a pending stamp
//! (its first write was in flight at a crash) accepts zeroes or foreign data as well, since
//! nothing was promised about it — but a torn or misplaced block still fails.
//!
//! The per-worker [`VerifyShard`] holds the states of the worker's own slice of the LBA range
//! densely (12 bytes a block, bounded by `VERIFY_BLOCKS_MAX`); [`VerifyState`] is the whole map
//! as saved in a state file ([`state_file`]).

pub mod block;
pub mod state_file;

use std::fmt;

pub use block::{Contents, Stamp};

use crate::constants::{VERIFY_FAILURES_KEPT_MAX, VERIFY_SEEDS_MAX};
use crate::PerfError;

/// What the harness knows about one block. Generation 0 means "none"; seeds are indices into
/// the state's seed table (so a block costs 12 bytes, not 28).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockState {
    pub acked_generation: u32,
    pub pending_generation: u32,
    pub acked_seed: u16,
    pub pending_seed: u16,
}

impl BlockState {
    pub fn is_empty(&self) -> bool {
        self.acked_generation == 0 && self.pending_generation == 0
    }
}

/// The stamps a read of one block may legitimately find.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expectation {
    pub acked: Option<Stamp>,
    pub pending: Option<Stamp>,
}

impl Expectation {
    pub fn from_state(st: &BlockState, seeds: &[u64]) -> Expectation {
        let stamp = |generation: u32, idx: u16| {
            (generation != 0).then(|| Stamp { generation, seed: seeds.get(idx as usize).copied().unwrap_or(0) })
        };
        Expectation {
            acked: stamp(st.acked_generation, st.acked_seed),
            pending: stamp(st.pending_generation, st.pending_seed),
        }
    }
    fn newest_generation(&self) -> u32 {
        self.acked.map_or(0, |s| s.generation).max(self.pending.map_or(0, |s| s.generation))
    }
}

/// Why a block failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// An acknowledged write reads back as all zeroes (never written).
    Lost,
    /// An acknowledged write reads back as data without our header, or with another run's seed.
    Foreign,
    /// Our header, but the checksum does not match the block.
    Torn,
    /// A whole block of ours, written to another LBA.
    Misplaced,
    /// An older generation than the newest acknowledged.
    Stale,
    /// A newer generation than any write issued.
    Unexpected,
}

impl FailureKind {
    pub fn name(&self) -> &'static str {
        match self {
            FailureKind::Lost => "lost write",
            FailureKind::Foreign => "foreign data",
            FailureKind::Torn => "torn or corrupt block",
            FailureKind::Misplaced => "misplaced block",
            FailureKind::Stale => "stale data",
            FailureKind::Unexpected => "unexpected generation",
        }
    }
}

/// One failed block, with everything needed to debug it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub lba: u64,
    pub kind: FailureKind,
    pub expected: Expectation,
    pub found: Contents,
}

fn fmt_stamp(s: &Stamp) -> String {
    format!("generation {} (run {:#018x})", s.generation, s.seed)
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LBA {}: {}: expected ", self.lba, self.kind.name())?;
        match (&self.expected.acked, &self.expected.pending) {
            (Some(a), Some(p)) => write!(f, "{} or in-flight {}", fmt_stamp(a), fmt_stamp(p))?,
            (Some(a), None) => write!(f, "{}", fmt_stamp(a))?,
            (None, Some(p)) => write!(f, "never written or in-flight {}", fmt_stamp(p))?,
            (None, None) => write!(f, "nothing")?,
        }
        write!(f, ", found ")?;
        match &self.found {
            Contents::Zero => write!(f, "all zeroes (never written)"),
            Contents::NoHeader => write!(f, "data without a stager-perf header"),
            Contents::Torn { stored_crc, computed_crc, claimed_lba, claimed } => write!(
                f,
                "checksum {stored_crc:#010x} but the block sums to {computed_crc:#010x} (header claims LBA {claimed_lba}, {})",
                fmt_stamp(claimed)
            ),
            Contents::Valid { lba, stamp } => write!(f, "LBA {lba}'s block, {}", fmt_stamp(stamp)),
        }
    }
}

/// A read that passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The newest acknowledged write.
    Acked,
    /// The write that was in flight (it landed).
    Pending,
    /// Nothing was promised and nothing of ours was found (zeroes or foreign data).
    Unwritten,
}

/// Checks one logical block read from `lba` against what may be there. Pure: the caller
/// updates its state from the verdict.
pub fn check_block(lba: u64, block: &[u8], expected: &Expectation) -> Result<Verdict, Failure> {
    let found = block::decode(block);
    let fail = |kind| Err(Failure { lba, kind, expected: *expected, found });
    match found {
        Contents::Zero if expected.acked.is_some() => fail(FailureKind::Lost),
        Contents::NoHeader if expected.acked.is_some() => fail(FailureKind::Foreign),
        Contents::Zero | Contents::NoHeader => Ok(Verdict::Unwritten),
        Contents::Torn { .. } => fail(FailureKind::Torn),
        Contents::Valid { lba: found_lba, .. } if found_lba != lba => fail(FailureKind::Misplaced),
        Contents::Valid { stamp, .. } => {
            if Some(stamp) == expected.acked {
                Ok(Verdict::Acked)
            } else if Some(stamp) == expected.pending {
                Ok(Verdict::Pending)
            } else if expected.acked.is_none() {
                // Ours, from a write this state never recorded; nothing was promised.
                Ok(Verdict::Unwritten)
            } else if stamp.generation < expected.newest_generation() {
                fail(FailureKind::Stale)
            } else if stamp.generation > expected.newest_generation() {
                fail(FailureKind::Unexpected)
            } else {
                fail(FailureKind::Foreign)
            }
        }
    }
}

/// Counters of a verifying worker (or scan).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyCounts {
    /// Blocks read back that the state had something to say about.
    pub blocks_checked: u64,
    /// Blocks written with a header.
    pub blocks_written: u64,
    /// Pending blocks resolved by a read (found the in-flight write, or not).
    pub pending_resolved: u64,
    pub failures: u64,
}

impl VerifyCounts {
    pub fn add(&mut self, o: &VerifyCounts) {
        self.blocks_checked += o.blocks_checked;
        self.blocks_written += o.blocks_written;
        self.pending_resolved += o.pending_resolved;
        self.failures += o.failures;
    }
}

/// Failures with detail (bounded) plus their total.
#[derive(Clone, Debug, Default)]
pub struct FailureLog {
    pub kept: Vec<Failure>,
    pub total: u64,
}

impl FailureLog {
    pub fn push(&mut self, f: Failure) {
        self.total += 1;
        if self.kept.len() < VERIFY_FAILURES_KEPT_MAX {
            self.kept.push(f);
        }
    }
    pub fn extend(&mut self, o: FailureLog) {
        self.total += o.total;
        for f in o.kept {
            if self.kept.len() < VERIFY_FAILURES_KEPT_MAX {
                self.kept.push(f);
            }
        }
    }
    /// Prints every kept failure and how many more there were.
    pub fn print(&self, out: &mut dyn std::io::Write) {
        for f in &self.kept {
            let _ = writeln!(out, "VERIFY FAILURE {f}");
        }
        if self.total > self.kept.len() as u64 {
            let _ = writeln!(out, "VERIFY FAILURE ... and {} more", self.total - self.kept.len() as u64);
        }
    }
}

/// Applies a passing verdict to a block's state: a read that saw the pending write makes it
/// the acknowledged one; any other passing read shows the pending write did not land.
fn resolve(st: &mut BlockState, verdict: Verdict) -> bool {
    if st.pending_generation == 0 {
        return false;
    }
    match verdict {
        Verdict::Pending => {
            st.acked_generation = st.pending_generation;
            st.acked_seed = st.pending_seed;
        }
        Verdict::Acked | Verdict::Unwritten => {}
    }
    st.pending_generation = 0;
    st.pending_seed = 0;
    true
}

/// The verify state of one worker's slice of LBAs, dense.
#[derive(Clone, Debug)]
pub struct VerifyShard {
    first_lba: u64,
    states: Vec<BlockState>,
    seeds: Vec<u64>,
    /// Index of this run's seed in `seeds`.
    run_seed: u16,
    pub counts: VerifyCounts,
    pub failures: FailureLog,
}

impl VerifyShard {
    /// An empty shard for `blocks` blocks from `first_lba`, writing with seed index `run_seed`.
    pub fn new(first_lba: u64, blocks: usize, seeds: Vec<u64>, run_seed: u16) -> VerifyShard {
        VerifyShard {
            first_lba,
            states: vec![BlockState::default(); blocks],
            seeds,
            run_seed,
            counts: VerifyCounts::default(),
            failures: FailureLog::default(),
        }
    }

    pub fn first_lba(&self) -> u64 {
        self.first_lba
    }
    pub fn blocks(&self) -> u64 {
        self.states.len() as u64
    }

    fn slot(&mut self, lba: u64) -> Option<&mut BlockState> {
        let i = lba.checked_sub(self.first_lba)?;
        self.states.get_mut(usize::try_from(i).ok()?)
    }

    /// Sets the state of one block (loading).
    pub fn set(&mut self, lba: u64, st: BlockState) -> bool {
        match self.slot(lba) {
            Some(s) => {
                *s = st;
                true
            }
            None => false,
        }
    }

    /// Fills `block` for a write to `lba` with the next generation, and records it pending.
    pub fn prepare_write(&mut self, lba: u64, block: &mut [u8]) {
        let run_seed = self.run_seed;
        let seed = self.seeds.get(run_seed as usize).copied().unwrap_or(0);
        let Some(st) = self.slot(lba) else {
            debug_assert!(false, "write to LBA {lba} outside the shard");
            return;
        };
        debug_assert!(st.pending_generation == 0, "two writes in flight to LBA {lba}");
        // Per-block generations only grow; u32 is ~4 billion writes of one block.
        let generation = st.acked_generation.max(st.pending_generation).saturating_add(1);
        st.pending_generation = generation;
        st.pending_seed = run_seed;
        block::encode(block, lba, Stamp { generation, seed });
        self.counts.blocks_written += 1;
    }

    /// The write of `lba` was acknowledged.
    pub fn write_acked(&mut self, lba: u64) {
        if let Some(st) = self.slot(lba) {
            st.acked_generation = st.pending_generation;
            st.acked_seed = st.pending_seed;
            st.pending_generation = 0;
            st.pending_seed = 0;
        }
    }

    /// The write of `lba` completed with an error: the target may or may not have written it,
    /// and it is finished, so nothing can be promised about the block any more.
    pub fn write_failed(&mut self, lba: u64) {
        if let Some(st) = self.slot(lba) {
            *st = BlockState::default();
        }
    }

    /// Checks a block read from `lba`; returns false (and logs the failure) if it is bad.
    pub fn check_read(&mut self, lba: u64, data: &[u8]) -> bool {
        let seeds = &self.seeds;
        let Some(i) = lba.checked_sub(self.first_lba).and_then(|i| usize::try_from(i).ok()) else {
            return true;
        };
        let Some(st) = self.states.get_mut(i) else { return true };
        if st.is_empty() {
            return true;
        }
        let expected = Expectation::from_state(st, seeds);
        self.counts.blocks_checked += 1;
        match check_block(lba, data, &expected) {
            Ok(v) => {
                if resolve(st, v) {
                    self.counts.pending_resolved += 1;
                }
                true
            }
            Err(f) => {
                self.counts.failures += 1;
                self.failures.push(f);
                false
            }
        }
    }

    /// Runs of consecutive blocks (first LBA, count) that hold a pending write.
    pub fn pending_extents(&self, max_blocks: u32) -> Vec<(u64, u32)> {
        extents(
            self.states
                .iter()
                .enumerate()
                .filter(|(_, s)| s.pending_generation != 0)
                .map(|(i, _)| self.first_lba + i as u64),
            max_blocks,
        )
    }

    /// Non-empty states, in LBA order.
    pub fn entries(&self) -> impl Iterator<Item = (u64, BlockState)> + '_ {
        self.states.iter().enumerate().filter(|(_, s)| !s.is_empty()).map(|(i, s)| (self.first_lba + i as u64, *s))
    }
}

/// Groups ascending LBAs into (first, count) runs of at most `max_blocks`.
pub fn extents(lbas: impl Iterator<Item = u64>, max_blocks: u32) -> Vec<(u64, u32)> {
    let mut out: Vec<(u64, u32)> = Vec::new();
    for lba in lbas {
        match out.last_mut() {
            Some((first, n)) if *first + *n as u64 == lba && *n < max_blocks => *n += 1,
            _ => out.push((lba, 1)),
        }
    }
    out
}

/// The whole verify map of a namespace, as a state file holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyState {
    pub block_bytes: u32,
    pub nsid: u32,
    /// The subsystem it was written through (informational; a mismatch is only warned about).
    pub subnqn: String,
    /// Run seed ids; `BlockState` seed fields index into it.
    pub seeds: Vec<u64>,
    /// Non-empty block states, ascending by LBA, no duplicates.
    pub entries: Vec<(u64, BlockState)>,
}

impl VerifyState {
    pub fn new(block_bytes: u32, nsid: u32, subnqn: &str) -> VerifyState {
        VerifyState { block_bytes, nsid, subnqn: subnqn.to_string(), seeds: Vec::new(), entries: Vec::new() }
    }

    /// The seed table index of `seed`, adding it if new.
    pub fn seed_index(&mut self, seed: u64) -> Result<u16, PerfError> {
        if let Some(i) = self.seeds.iter().position(|&s| s == seed) {
            return Ok(i as u16);
        }
        if self.seeds.len() >= VERIFY_SEEDS_MAX {
            return Err(PerfError::Usage(format!(
                "the verify state names {} runs already, the most it can; start a fresh state file",
                self.seeds.len()
            )));
        }
        self.seeds.push(seed);
        Ok((self.seeds.len() - 1) as u16)
    }

    /// The expectation of one block (for scans).
    pub fn expectation(&self, st: &BlockState) -> Expectation {
        Expectation::from_state(st, &self.seeds)
    }

    /// Moves the entries that fall into `slices` (first LBA, blocks) into one dense shard each;
    /// the rest stay here. `run_seed` is the writing run's seed.
    pub fn split(&mut self, slices: &[(u64, u64)], run_seed: u64) -> Result<Vec<VerifyShard>, PerfError> {
        let idx = self.seed_index(run_seed)?;
        let mut shards: Vec<VerifyShard> = slices
            .iter()
            .map(|&(first, blocks)| VerifyShard::new(first, blocks as usize, self.seeds.clone(), idx))
            .collect();
        let mut rest = Vec::new();
        for (lba, st) in self.entries.drain(..) {
            if !shards.iter_mut().any(|s| s.set(lba, st)) {
                rest.push((lba, st));
            }
        }
        self.entries = rest;
        Ok(shards)
    }

    /// Puts shards' states back (after a run) and compacts the seed table.
    pub fn merge(&mut self, shards: &[VerifyShard]) {
        for s in shards {
            self.entries.extend(s.entries());
        }
        self.entries.sort_unstable_by_key(|(lba, _)| *lba);
        self.entries.dedup_by_key(|(lba, _)| *lba);
        self.compact_seeds();
    }

    /// Drops seeds no block refers to, renumbering the rest.
    pub fn compact_seeds(&mut self) {
        let mut used = vec![false; self.seeds.len()];
        for (_, st) in &self.entries {
            for (g, i) in [(st.acked_generation, st.acked_seed), (st.pending_generation, st.pending_seed)] {
                if g != 0 {
                    if let Some(u) = used.get_mut(i as usize) {
                        *u = true;
                    }
                }
            }
        }
        let mut map = vec![0u16; self.seeds.len()];
        let mut seeds = Vec::new();
        for (i, &s) in self.seeds.iter().enumerate() {
            if used[i] {
                map[i] = seeds.len() as u16;
                seeds.push(s);
            }
        }
        for (_, st) in &mut self.entries {
            st.acked_seed =
                if st.acked_generation != 0 { map.get(st.acked_seed as usize).copied().unwrap_or(0) } else { 0 };
            st.pending_seed =
                if st.pending_generation != 0 { map.get(st.pending_seed as usize).copied().unwrap_or(0) } else { 0 };
        }
        self.seeds = seeds;
    }

    pub fn pending_blocks(&self) -> usize {
        self.entries.iter().filter(|(_, s)| s.pending_generation != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: u64 = 0x5EED_0000_0000_0001;
    const OTHER: u64 = 0x5EED_0000_0000_0002;

    fn blk(lba: u64, generation: u32, seed: u64) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        block::encode(&mut b, lba, Stamp { generation, seed });
        b
    }
    fn acked(generation: u32) -> Expectation {
        Expectation { acked: Some(Stamp { generation, seed: SEED }), pending: None }
    }
    fn kind(r: Result<Verdict, Failure>) -> FailureKind {
        match r {
            Ok(v) => panic!("passed as {v:?}"),
            Err(f) => {
                // Every failure prints its LBA, what was expected and what was found.
                let s = f.to_string();
                assert!(
                    s.starts_with(&format!("LBA {}: ", f.lba)) && s.contains("expected") && s.contains("found"),
                    "{s}"
                );
                f.kind
            }
        }
    }

    #[test]
    fn newest_acked_passes() {
        assert_eq!(check_block(10, &blk(10, 3, SEED), &acked(3)), Ok(Verdict::Acked));
    }

    #[test]
    fn lost_write_is_detected() {
        assert_eq!(kind(check_block(10, &[0u8; 4096], &acked(1))), FailureKind::Lost);
    }

    #[test]
    fn stale_data_is_detected() {
        assert_eq!(kind(check_block(10, &blk(10, 2, SEED), &acked(3))), FailureKind::Stale);
        // Stale even when an older run wrote it.
        assert_eq!(kind(check_block(10, &blk(10, 1, OTHER), &acked(3))), FailureKind::Stale);
    }

    #[test]
    fn torn_block_is_detected() {
        let mut b = blk(10, 3, SEED);
        // The second half of the block comes from another write of it: a torn write.
        let other = blk(10, 2, SEED);
        b[2048..].copy_from_slice(&other[2048..]);
        assert_eq!(kind(check_block(10, &b, &acked(3))), FailureKind::Torn);
        // A single flipped bit is corruption, even where nothing was acknowledged yet.
        let mut c = blk(10, 3, SEED);
        c[4000] ^= 1;
        let pending_only = Expectation { acked: None, pending: Some(Stamp { generation: 3, seed: SEED }) };
        assert_eq!(kind(check_block(10, &c, &pending_only)), FailureKind::Torn);
    }

    #[test]
    fn misplaced_block_is_detected() {
        assert_eq!(kind(check_block(10, &blk(11, 3, SEED), &acked(3))), FailureKind::Misplaced);
    }

    #[test]
    fn foreign_and_unexpected_are_detected() {
        let mut junk = vec![0xAAu8; 4096];
        junk[0] = 1;
        assert_eq!(kind(check_block(10, &junk, &acked(3))), FailureKind::Foreign);
        assert_eq!(kind(check_block(10, &blk(10, 3, OTHER), &acked(3))), FailureKind::Foreign);
        assert_eq!(kind(check_block(10, &blk(10, 9, SEED), &acked(3))), FailureKind::Unexpected);
    }

    #[test]
    fn in_flight_write_may_or_may_not_have_landed() {
        let e = Expectation {
            acked: Some(Stamp { generation: 3, seed: SEED }),
            pending: Some(Stamp { generation: 4, seed: SEED }),
        };
        assert_eq!(check_block(10, &blk(10, 3, SEED), &e), Ok(Verdict::Acked));
        assert_eq!(check_block(10, &blk(10, 4, SEED), &e), Ok(Verdict::Pending));
        assert_eq!(kind(check_block(10, &blk(10, 2, SEED), &e)), FailureKind::Stale);
        assert_eq!(kind(check_block(10, &[0u8; 4096], &e)), FailureKind::Lost);
        // A first write in flight: never-written is fine too.
        let first = Expectation { acked: None, pending: Some(Stamp { generation: 1, seed: SEED }) };
        assert_eq!(check_block(10, &[0u8; 4096], &first), Ok(Verdict::Unwritten));
        assert_eq!(check_block(10, &blk(10, 1, SEED), &first), Ok(Verdict::Pending));
        assert_eq!(kind(check_block(10, &blk(12, 1, SEED), &first)), FailureKind::Misplaced);
    }

    #[test]
    fn shard_tracks_generations_and_resolves_pending() {
        let mut st = VerifyState::new(4096, 1, "nqn.x");
        let mut shards = st.split(&[(100, 10)], SEED).unwrap();
        let s = &mut shards[0];
        let mut b = vec![0u8; 4096];
        // Unwritten blocks are not checked.
        assert!(s.check_read(105, &[7u8; 4096]));
        assert_eq!(s.counts.blocks_checked, 0);
        s.prepare_write(105, &mut b);
        s.write_acked(105);
        assert!(s.check_read(105, &b));
        let gen1 = b.clone();
        s.prepare_write(105, &mut b);
        s.write_acked(105);
        // The first generation is now stale; the second passes.
        assert!(!s.check_read(105, &gen1));
        assert_eq!(s.failures.kept[0].kind, FailureKind::Stale);
        assert!(s.check_read(105, &b));
        // A write in flight at a "crash": save, reload, and both stamps are acceptable.
        let gen2 = b.clone();
        s.prepare_write(105, &mut b);
        st.merge(&shards);
        assert_eq!(st.pending_blocks(), 1);
        let mut again = st.clone().split(&[(100, 10)], OTHER).unwrap();
        assert!(again[0].check_read(105, &gen2));
        assert_eq!(again[0].counts.pending_resolved, 1);
        // Resolved to "did not land": the in-flight generation is no longer acceptable.
        assert!(!again[0].check_read(105, &b));
        let mut again = st.split(&[(100, 10)], OTHER).unwrap();
        assert!(again[0].check_read(105, &b));
        assert!(!again[0].check_read(105, &gen2), "after seeing the landed write, the old one is stale");
    }

    #[test]
    fn failed_write_forgets_the_block() {
        let mut st = VerifyState::new(4096, 1, "nqn.x");
        let mut shards = st.split(&[(0, 4)], SEED).unwrap();
        let mut b = vec![0u8; 4096];
        shards[0].prepare_write(1, &mut b);
        shards[0].write_failed(1);
        assert!(shards[0].check_read(1, &[0u8; 4096]));
        assert_eq!(shards[0].entries().count(), 0);
    }

    #[test]
    fn split_and_merge_keep_outside_entries_and_compact_seeds() {
        let mut st = VerifyState::new(512, 1, "nqn.x");
        st.seeds = vec![1, 2, 3];
        let e = |g, s| BlockState { acked_generation: g, acked_seed: s, ..Default::default() };
        st.entries = vec![(5, e(1, 2)), (50, e(2, 0)), (500, e(3, 2))];
        let shards = st.split(&[(40, 20)], 4).unwrap();
        assert_eq!(st.entries.len(), 2);
        assert_eq!(shards[0].entries().collect::<Vec<_>>(), vec![(50, e(2, 0))]);
        st.merge(&shards);
        assert_eq!(st.seeds, vec![1, 3]);
        assert_eq!(st.entries, vec![(5, e(1, 1)), (50, e(2, 0)), (500, e(3, 1))]);
    }

    #[test]
    fn extents_group_runs() {
        assert_eq!(extents([1, 2, 3, 7, 8, 10].into_iter(), 2), vec![(1, 2), (3, 1), (7, 2), (10, 1)]);
    }
}
