//! Access patterns: which I/O a worker issues next.
//!
//! The LBA range of a run is cut into one contiguous *slice* per connection, and each slice
//! into *units* of the I/O size (aligned to it). A worker only ever touches its own slice.
//! That costs nothing for throughput, and it keeps verification exact without any sharing
//! between threads: a block has one owner, which knows every write in flight to it.
//!
//! * `read` / `write`: sequential over the slice, wrapping around;
//! * `randread` / `randwrite`: uniformly random units;
//! * `rw`: uniformly random units, each a read with probability `--mix` percent (default 50),
//!   like fio's `randrw` — random because a mixed sequential stream mostly measures how the
//!   two directions interleave, and the verify workloads want reads of earlier random writes.
//!
//! The generator is seeded (`--seed`), so a run's sequence of I/Os is reproducible.

use std::fmt;
use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::stats::Direction;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
}

impl Workload {
    pub const ALL: [Workload; 5] =
        [Workload::Read, Workload::Write, Workload::RandRead, Workload::RandWrite, Workload::Rw];

    pub fn name(&self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
        }
    }
    pub fn is_random(&self) -> bool {
        matches!(self, Workload::RandRead | Workload::RandWrite | Workload::Rw)
    }
    /// Percent of I/Os that are reads (`mix` only matters for `rw`).
    pub fn read_pct(&self, mix: u8) -> u8 {
        match self {
            Workload::Read | Workload::RandRead => 100,
            Workload::Write | Workload::RandWrite => 0,
            Workload::Rw => mix.min(100),
        }
    }
    pub fn writes(&self, mix: u8) -> bool {
        self.read_pct(mix) < 100
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "read" => Ok(Workload::Read),
            "write" => Ok(Workload::Write),
            "randread" => Ok(Workload::RandRead),
            "randwrite" => Ok(Workload::RandWrite),
            "rw" | "randrw" => Ok(Workload::Rw),
            other => Err(format!("unknown workload {other:?} (read, write, randread, randwrite, rw)")),
        }
    }
}

/// One worker's slice of the range, in units of the I/O size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    /// First unit, counted from the start of the run's range (see `Layout`).
    pub first_unit: u64,
    pub units: u64,
}

/// How a run's byte range maps onto units and slices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub block_bytes: u32,
    pub io_bytes: usize,
    /// First LBA of the range.
    pub first_lba: u64,
    pub blocks_per_unit: u32,
    pub slices: Vec<Slice>,
}

impl Layout {
    /// Cuts `[offset, offset + len)` of a namespace into `connections` slices of whole units.
    pub fn new(
        block_bytes: u32,
        namespace_blocks: u64,
        io_bytes: usize,
        offset_bytes: u64,
        len_bytes: Option<u64>,
        connections: usize,
    ) -> Result<Layout, String> {
        let bb = block_bytes as u64;
        if io_bytes as u64 % bb != 0 {
            return Err(format!("I/O size {io_bytes} is not a multiple of the namespace's {block_bytes}-byte blocks"));
        }
        if offset_bytes % bb != 0 {
            return Err(format!("range offset {offset_bytes} is not a multiple of the {block_bytes}-byte blocks"));
        }
        let ns_bytes = namespace_blocks.saturating_mul(bb);
        if offset_bytes >= ns_bytes {
            return Err(format!("range offset {offset_bytes} is beyond the namespace's {ns_bytes} bytes"));
        }
        let len = len_bytes.unwrap_or(ns_bytes - offset_bytes);
        if offset_bytes.checked_add(len).is_none_or(|end| end > ns_bytes) {
            return Err(format!("range {offset_bytes}+{len} runs past the namespace's end at {ns_bytes} bytes"));
        }
        let units = len / io_bytes as u64;
        if units < connections as u64 {
            return Err(format!(
                "the range of {len} bytes holds {units} I/Os of {io_bytes} bytes, fewer than the {connections} connections"
            ));
        }
        let per = units / connections as u64;
        let extra = units % connections as u64;
        let mut slices = Vec::with_capacity(connections);
        let mut first_unit = 0;
        for i in 0..connections as u64 {
            let n = per + u64::from(i < extra);
            slices.push(Slice { first_unit, units: n });
            first_unit += n;
        }
        Ok(Layout {
            block_bytes,
            io_bytes,
            first_lba: offset_bytes / bb,
            blocks_per_unit: (io_bytes as u64 / bb) as u32,
            slices,
        })
    }

    pub fn unit_lba(&self, unit: u64) -> u64 {
        self.first_lba + unit * self.blocks_per_unit as u64
    }

    /// (first LBA, blocks) of a slice.
    pub fn slice_blocks(&self, i: usize) -> (u64, u64) {
        let s = self.slices[i];
        (self.unit_lba(s.first_unit), s.units * self.blocks_per_unit as u64)
    }

    pub fn total_blocks(&self) -> u64 {
        self.slices.iter().map(|s| s.units).sum::<u64>() * self.blocks_per_unit as u64
    }
}

/// Picks a worker's next I/O.
pub struct Picker {
    workload: Workload,
    read_pct: u8,
    slice: Slice,
    /// Next unit for sequential workloads, relative to the slice.
    cursor: u64,
    rng: StdRng,
}

impl Picker {
    pub fn new(workload: Workload, mix: u8, slice: Slice, seed: u64) -> Picker {
        Picker { workload, read_pct: workload.read_pct(mix), slice, cursor: 0, rng: StdRng::seed_from_u64(seed) }
    }

    /// The next I/O: direction and absolute unit. `busy(unit)` says a unit may not be used now
    /// (verify: an I/O to it is in flight); then another is tried, or `None` if none is found
    /// quickly — the caller waits for a completion and asks again.
    pub fn next(&mut self, mut busy: impl FnMut(u64) -> bool) -> Option<(Direction, u64)> {
        let dir = match self.read_pct {
            100 => Direction::Read,
            0 => Direction::Write,
            p => {
                if self.rng.gen_range(0..100u8) < p {
                    Direction::Read
                } else {
                    Direction::Write
                }
            }
        };
        if self.workload.is_random() {
            for _ in 0..8 {
                let unit = self.slice.first_unit + self.rng.gen_range(0..self.slice.units);
                if !busy(unit) {
                    return Some((dir, unit));
                }
            }
            None
        } else {
            let unit = self.slice.first_unit + self.cursor;
            if busy(unit) {
                return None;
            }
            self.cursor = (self.cursor + 1) % self.slice.units;
            Some((dir, unit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
        }
        assert!("readwrite".parse::<Workload>().is_err());
    }

    #[test]
    fn layout_splits_evenly_and_checks_bounds() {
        let l = Layout::new(512, 1000, 4096, 0, None, 3).unwrap();
        assert_eq!(l.blocks_per_unit, 8);
        // 1000 blocks = 125 units of 8: 42 + 42 + 41.
        assert_eq!(l.slices.iter().map(|s| s.units).collect::<Vec<_>>(), vec![42, 42, 41]);
        assert_eq!(l.slice_blocks(1), (42 * 8, 42 * 8));
        let l = Layout::new(4096, 1000, 4096, 8192, Some(4096 * 10), 1).unwrap();
        assert_eq!((l.first_lba, l.slices[0].units), (2, 10));
        assert!(Layout::new(4096, 1000, 512, 0, None, 1).unwrap_err().contains("multiple"));
        assert!(Layout::new(4096, 1000, 4096, 100, None, 1).unwrap_err().contains("offset"));
        assert!(Layout::new(4096, 10, 4096, 0, Some(4096 * 11), 1).unwrap_err().contains("past"));
        assert!(Layout::new(4096, 10, 4096, 4096 * 10, None, 1).unwrap_err().contains("beyond"));
        assert!(Layout::new(4096, 10, 4096, 0, None, 11).unwrap_err().contains("fewer"));
    }

    #[test]
    fn sequential_wraps_and_random_stays_in_slice() {
        let s = Slice { first_unit: 10, units: 3 };
        let mut p = Picker::new(Workload::Write, 50, s, 1);
        let units: Vec<u64> = (0..5).map(|_| p.next(|_| false).unwrap().1).collect();
        assert_eq!(units, vec![10, 11, 12, 10, 11]);
        let mut p = Picker::new(Workload::Rw, 30, s, 1);
        let mut reads = 0;
        for _ in 0..10_000 {
            let (d, u) = p.next(|_| false).unwrap();
            assert!((10..13).contains(&u));
            reads += (d == Direction::Read) as u32;
        }
        assert!((2500..3500).contains(&reads), "{reads} reads of 10000 at mix 30");
        // Everything busy: no pick, no spin.
        assert_eq!(p.next(|_| true), None);
    }
}
