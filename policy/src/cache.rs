//! The clean read cache: copies of SAN blocks kept in flash slots, evicted with S3-FIFO.
//!
//! Why S3-FIFO (Yang et al., SOSP'23): it is scan resistant with only FIFO queues. New blocks
//! enter a small FIFO (10% of the slots); a block read again while there moves to the main
//! FIFO, one read once (a sequential scan) leaves through a ghost list without touching the
//! main queue. Main-queue blocks get up to three second chances. No per-hit list surgery, which
//! suits a polled core.
//!
//! The cache is one per device (slots are device space), keyed by volume and block. It is not
//! persistent: after a restart it starts empty, which keeps its consistency trivially right.
//! Slots read by an in-flight operation are pinned and freed only when the read completes, so a
//! slot is never rewritten under a reader. A fill (SAN read → slot write) is *pending* until its
//! flash write completes; a host write to that block cancels it, so a slow fill can never
//! install data older than the write.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::types::{Lba, VolumeId};

pub type CacheKey = (VolumeId, Lba);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Queue {
    Small,
    Main,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    slot: u32,
    freq: u8,
    queue: Queue,
    /// Matches the queue item that is live for this entry (queues use lazy deletion).
    stamp: u64,
}

pub struct CleanCache {
    slots: u32,
    entries: BTreeMap<CacheKey, Entry>,
    small: VecDeque<(CacheKey, u64)>,
    main: VecDeque<(CacheKey, u64)>,
    small_len: usize,
    main_len: usize,
    ghost: VecDeque<CacheKey>,
    ghost_set: BTreeSet<CacheKey>,
    free: Vec<u32>,
    pins: BTreeMap<u32, u32>,
    /// Slots evicted or invalidated while pinned; freed at the last unpin.
    deferred: BTreeSet<u32>,
    pending: BTreeMap<CacheKey, u32>,
    next_stamp: u64,
}

impl CleanCache {
    pub fn new(slots: u32) -> CleanCache {
        CleanCache {
            slots,
            entries: BTreeMap::new(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_len: 0,
            main_len: 0,
            ghost: VecDeque::new(),
            ghost_set: BTreeSet::new(),
            free: (0..slots).rev().collect(),
            pins: BTreeMap::new(),
            deferred: BTreeSet::new(),
            pending: BTreeMap::new(),
            next_stamp: 0,
        }
    }

    /// The slot holding `key`, counting the hit for eviction.
    pub fn lookup(&mut self, key: CacheKey) -> Option<u32> {
        let e = self.entries.get_mut(&key)?;
        e.freq = (e.freq + 1).min(3);
        Some(e.slot)
    }

    /// The slot holding `key`, without counting a hit (for checks).
    pub fn peek(&self, key: CacheKey) -> Option<u32> {
        self.entries.get(&key).map(|e| e.slot)
    }

    pub fn contains(&self, key: CacheKey) -> bool {
        self.entries.contains_key(&key)
    }

    pub fn resident(&self) -> usize {
        self.entries.len()
    }

    /// Blocks of one volume resident in the cache (a range scan: for status, not the I/O path).
    pub fn resident_for(&self, id: VolumeId) -> usize {
        self.entries.range((id, Lba(0))..=(id, Lba(u64::MAX))).count()
    }

    pub fn pin(&mut self, slot: u32) {
        *self.pins.entry(slot).or_insert(0) += 1;
    }

    pub fn unpin(&mut self, slot: u32) {
        let n = self.pins.get_mut(&slot).expect("cache: unpin of an unpinned slot");
        *n -= 1;
        if *n == 0 {
            self.pins.remove(&slot);
            if self.deferred.remove(&slot) {
                self.free.push(slot);
            }
        }
    }

    fn release(&mut self, slot: u32) {
        if self.pins.contains_key(&slot) {
            self.deferred.insert(slot);
        } else {
            self.free.push(slot);
        }
    }

    /// A write to `key`: forget the clean copy and cancel a pending fill.
    pub fn invalidate(&mut self, key: CacheKey) {
        if let Some(e) = self.entries.remove(&key) {
            match e.queue {
                Queue::Small => self.small_len -= 1,
                Queue::Main => self.main_len -= 1,
            }
            self.release(e.slot);
        }
        self.pending.remove(&key);
    }

    /// A write to `blocks` blocks from `lba`: [`CleanCache::invalidate`] for each that is
    /// cached or being filled. Visits only those (a Write Zeroes over a whole volume costs
    /// what the cache holds of it, not a step per block).
    pub fn invalidate_range(&mut self, id: VolumeId, lba: Lba, blocks: u64) {
        let range = (id, lba)..(id, Lba(lba.0.saturating_add(blocks)));
        let keys: Vec<CacheKey> = self
            .entries
            .range(range.clone())
            .map(|(k, _)| *k)
            .chain(self.pending.range(range).map(|(k, _)| *k))
            .collect();
        for k in keys {
            self.invalidate(k);
        }
    }

    /// Starts a fill: returns the slot to write, or None (already cached, already being filled,
    /// or no slot can be freed right now).
    pub fn begin_fill(&mut self, key: CacheKey) -> Option<u32> {
        if self.slots == 0 || self.entries.contains_key(&key) || self.pending.contains_key(&key) {
            return None;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => self.evict()?,
        };
        self.pending.insert(key, slot);
        Some(slot)
    }

    /// The fill's flash write finished. Installs the block unless a write cancelled the fill.
    pub fn finish_fill(&mut self, key: CacheKey, slot: u32, ok: bool) {
        let live = self.pending.get(&key) == Some(&slot);
        if live {
            self.pending.remove(&key);
        }
        if !(live && ok) {
            self.release(slot);
            return;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let queue = if self.ghost_set.remove(&key) { Queue::Main } else { Queue::Small };
        match queue {
            Queue::Small => {
                self.small.push_back((key, stamp));
                self.small_len += 1;
            }
            Queue::Main => {
                self.main.push_back((key, stamp));
                self.main_len += 1;
            }
        }
        self.entries.insert(key, Entry { slot, freq: 0, queue, stamp });
    }

    /// Frees one slot by S3-FIFO; None if every slot is pinned or pending.
    fn evict(&mut self) -> Option<u32> {
        // Each pass either frees a slot, moves an entry, or drops a stale item; bounded so a
        // cache full of pinned slots cannot spin.
        for _ in 0..4 * (self.small.len() + self.main.len() + 1) {
            let from_small = self.small_len * 10 >= self.slots as usize || self.main_len == 0;
            let item = if from_small { self.small.pop_front() } else { self.main.pop_front() };
            let Some((key, stamp)) = item else { continue };
            let Some(e) = self.entries.get_mut(&key) else { continue };
            if e.stamp != stamp {
                continue;
            }
            if e.queue == Queue::Small {
                if e.freq > 0 {
                    e.freq = 0;
                    e.queue = Queue::Main;
                    self.small_len -= 1;
                    self.main_len += 1;
                    self.main.push_back((key, stamp));
                    continue;
                }
                self.small_len -= 1;
                if self.ghost_set.insert(key) {
                    self.ghost.push_back(key);
                }
                while self.ghost.len() > self.slots as usize {
                    if let Some(old) = self.ghost.pop_front() {
                        self.ghost_set.remove(&old);
                    }
                }
            } else {
                if e.freq > 0 {
                    e.freq -= 1;
                    self.main.push_back((key, stamp));
                    continue;
                }
                self.main_len -= 1;
            }
            let slot = self.entries.remove(&key).unwrap().slot;
            if self.pins.contains_key(&slot) {
                self.deferred.insert(slot);
                continue;
            }
            return Some(slot);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &mut CleanCache, b: u64) -> bool {
        let key = (VolumeId(1), Lba(b));
        match c.begin_fill(key) {
            Some(slot) => {
                c.finish_fill(key, slot, true);
                true
            }
            None => false,
        }
    }

    #[test]
    fn sequential_scan_does_not_flush_the_hot_set() {
        let mut c = CleanCache::new(100);
        for b in 0..50 {
            assert!(fill(&mut c, b));
        }
        for _ in 0..2 {
            for b in 0..50 {
                assert!(c.lookup((VolumeId(1), Lba(b))).is_some());
            }
        }
        for b in 1000..11_000 {
            fill(&mut c, b);
        }
        let hot = (0..50).filter(|&b| c.contains((VolumeId(1), Lba(b)))).count();
        assert_eq!(hot, 50, "scan evicted {} hot blocks", 50 - hot);
        assert!(c.resident() <= 100);
    }

    #[test]
    fn range_invalidation_drops_cached_and_pending_blocks_only_in_range() {
        let mut c = CleanCache::new(10);
        for b in [3, 4, 9] {
            assert!(fill(&mut c, b));
        }
        let pending = c.begin_fill((VolumeId(1), Lba(5))).unwrap();
        assert!(fill(&mut c, 4 + (1 << 40)));
        c.invalidate_range(VolumeId(1), Lba(4), 1 << 40);
        assert!(c.contains((VolumeId(1), Lba(3))) && c.contains((VolumeId(1), Lba(4 + (1 << 40)))));
        assert!(!c.contains((VolumeId(1), Lba(4))) && !c.contains((VolumeId(1), Lba(9))));
        c.finish_fill((VolumeId(1), Lba(5)), pending, true);
        assert!(!c.contains((VolumeId(1), Lba(5))), "a cancelled fill must not install");
    }

    #[test]
    fn invalidation_cancels_a_pending_fill_and_pins_defer_reuse() {
        let mut c = CleanCache::new(2);
        let k = (VolumeId(1), Lba(5));
        let slot = c.begin_fill(k).unwrap();
        c.invalidate(k);
        c.finish_fill(k, slot, true);
        assert!(!c.contains(k), "a cancelled fill must not install stale data");
        assert!(fill(&mut c, 1) && fill(&mut c, 2));
        let s1 = c.lookup((VolumeId(1), Lba(1))).unwrap();
        c.pin(s1);
        c.invalidate((VolumeId(1), Lba(1)));
        let s3 = c.begin_fill((VolumeId(1), Lba(3))).unwrap();
        assert_ne!(s3, s1, "pinned slot reused");
        c.finish_fill((VolumeId(1), Lba(3)), s3, true);
        c.unpin(s1);
        assert_eq!(c.begin_fill((VolumeId(1), Lba(4))), Some(s1));
    }
}
