//! The circular log space: where the next frame goes, when to pad to the end of a lap, and
//! whether there is room.
//!
//! Positions are absolute and only grow. Space is reusable below a *floor* the engine computes:
//! the tail recorded in the last durable superblock (so a crash never finds the start of its
//! replay overwritten) and any position an in-flight read still pins. Entries never wrap: one
//! that does not fit before the end of the lap is preceded by a pad frame and starts at the next
//! lap.

use crate::constants::{BLOCK_SIZE_U64, LOG_BYTES_MIN, LOG_START};
use crate::types::LogPos;

/// Where the log and the clean cache live on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub log_start: u64,
    pub log_bytes: u64,
    pub cache_start: u64,
    pub cache_slots: u64,
}

impl Layout {
    /// Splits a device: `cache_percent` of the space after the superblocks for clean cache
    /// slots, the rest for the log. None if the log would be smaller than `LOG_BYTES_MIN`.
    pub fn for_device(size_bytes: u64, cache_percent: u32) -> Option<Layout> {
        assert!(cache_percent < 100);
        let usable = size_bytes.checked_sub(LOG_START)? / BLOCK_SIZE_U64;
        let cache_slots = usable * cache_percent as u64 / 100;
        let log_bytes = (usable - cache_slots) * BLOCK_SIZE_U64;
        if log_bytes < LOG_BYTES_MIN {
            return None;
        }
        Some(Layout { log_start: LOG_START, log_bytes, cache_start: LOG_START + log_bytes, cache_slots })
    }

    /// Device offset of an absolute log position.
    pub fn log_offset(&self, pos: LogPos) -> u64 {
        self.log_start + pos.0 % self.log_bytes
    }

    /// Device offset of a clean cache slot.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        assert!((slot as u64) < self.cache_slots);
        self.cache_start + slot as u64 * BLOCK_SIZE_U64
    }
}

/// Where a reserved frame goes; `pad_at` is set when the rest of the lap must be padded first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub pad_at: Option<LogPos>,
    pub pos: LogPos,
}

#[derive(Clone, Debug)]
pub struct Ring {
    capacity: u64,
    /// Next free absolute position.
    pub head: LogPos,
}

impl Ring {
    pub fn new(capacity: u64, head: LogPos) -> Ring {
        assert!(capacity >= LOG_BYTES_MIN && capacity.is_multiple_of(BLOCK_SIZE_U64));
        assert!(head.0.is_multiple_of(BLOCK_SIZE_U64));
        Ring { capacity, head }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Where `bytes` would go (padding first if they do not fit the lap), if they fit above
    /// `floor` (the oldest position still needed). Changes nothing.
    pub fn place(&self, bytes: u64, floor: LogPos) -> Option<Reservation> {
        assert!(bytes > 0 && bytes.is_multiple_of(BLOCK_SIZE_U64) && bytes <= self.capacity);
        assert!(floor <= self.head, "floor {floor} above head {}", self.head);
        let to_end = self.capacity - self.head.0 % self.capacity;
        let (pad_at, pos) = if bytes > to_end { (Some(self.head), self.head.plus(to_end)) } else { (None, self.head) };
        if pos.plus(bytes).since(floor) > self.capacity {
            return None;
        }
        Some(Reservation { pad_at, pos })
    }

    /// Reserves `bytes` if they fit above `floor`.
    pub fn reserve(&mut self, bytes: u64, floor: LogPos) -> Option<Reservation> {
        let r = self.place(bytes, floor)?;
        self.head = r.pos.plus(bytes);
        Some(r)
    }

    /// Bytes in use above `floor`.
    pub fn used(&self, floor: LogPos) -> u64 {
        self.head.since(floor)
    }

    /// Start of the lap after `pos` (where replay continues after a pad).
    pub fn next_lap(&self, pos: LogPos) -> LogPos {
        LogPos((pos.0 / self.capacity + 1) * self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_the_device() {
        let l = Layout::for_device(LOG_START + 2 * LOG_BYTES_MIN, 50).unwrap();
        assert_eq!(l.log_bytes, LOG_BYTES_MIN);
        assert_eq!(l.cache_slots * BLOCK_SIZE_U64, LOG_BYTES_MIN);
        assert_eq!(l.slot_offset(0), LOG_START + LOG_BYTES_MIN);
        assert!(Layout::for_device(LOG_BYTES_MIN, 0).is_none());
    }

    #[test]
    fn wraps_with_a_pad_and_respects_the_floor() {
        let cap = LOG_BYTES_MIN;
        let mut r = Ring::new(cap, LogPos(0));
        let big = cap / 4 + BLOCK_SIZE_U64; // three fit, the fourth does not fit the lap
        for i in 0..3 {
            assert_eq!(r.reserve(big, LogPos(0)), Some(Reservation { pad_at: None, pos: LogPos(i * big) }));
        }
        assert_eq!(r.reserve(big, LogPos(0)), None, "log full while the floor is 0");
        assert_eq!(
            r.place(big, LogPos(2 * big)),
            Some(Reservation { pad_at: Some(LogPos(3 * big)), pos: LogPos(cap) })
        );
        let res = r.reserve(big, LogPos(2 * big)).unwrap();
        assert_eq!(res, Reservation { pad_at: Some(LogPos(3 * big)), pos: LogPos(cap) });
        assert_eq!(r.head, LogPos(cap + big));
        assert_eq!(r.next_lap(LogPos(3 * big)), LogPos(cap));
        assert_eq!(
            r.reserve(BLOCK_SIZE_U64, LogPos(2 * big)),
            Some(Reservation { pad_at: None, pos: LogPos(cap + big) })
        );
    }
}
