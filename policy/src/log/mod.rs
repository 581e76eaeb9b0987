//! The flash log: its on-media formats and the accounting of its circular space.
//!
//! Device layout (all offsets 4 KiB aligned):
//! ```text
//! | superblock copy 0 | superblock copy 1 | log area (circular) ........ | clean cache slots ... |
//! 0                   4K                  8K                             cache_start
//! ```
//! Positions in the log are *absolute* byte counts that only grow (`pos`); the physical offset
//! is `log_start + pos % log_bytes`. Every entry header records its absolute position, so an
//! entry left over from an earlier lap of the ring can never be mistaken for a current one.

pub mod entry;
pub mod ring;
pub mod superblock;

pub use entry::{EntryError, EntryHeader, EntryKind};
pub use ring::{Layout, Reservation, Ring};
pub use superblock::{Superblock, SuperblockError, SuperblockVolume};
