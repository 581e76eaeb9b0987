//! The flash log: its on-media formats and the accounting of its circular space.
//!
//! Device layout (all offsets 4 KiB aligned):
//! ```text
//! | superblock copy 0 | superblock copy 1 | log area (circular) ........ | clean cache slots ... |
//! 0                   4K                  8K                             cache_start
//! ```
//! The log is a sequence of frames (`frame.rs`): a header block packing the headers of the
//! entries written together, then their data. Entry headers (`entry.rs`) are the bytes a
//! replica receives too; what is specific to this device's ring (position, incarnation) is in
//! the frame. Positions in the log are *absolute* byte counts that only grow ([`LogPos`]); the
//! physical offset is `log_start + pos % log_bytes`.
//!
//! [`LogPos`]: crate::types::LogPos

pub mod entry;
pub mod frame;
pub mod ring;
pub mod superblock;

pub use entry::{EntryError, EntryHeader, EntryKind};
pub use frame::{FrameError, FrameHeader, FrameKind, FrameStamp};
pub use ring::{Layout, Reservation, Ring};
pub use superblock::{LostRange, Superblock, SuperblockError, SuperblockVolume};
