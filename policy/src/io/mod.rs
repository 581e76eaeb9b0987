//! The engine's only windows on the world: a flash device holding the log ([`Flash`]), a
//! volume's SAN LUN ([`San`]) and time ([`Clock`]). Each is a small trait in its own module, in
//! the shape of SPDK's ops tables, so the reactor wraps io_uring / libiscsi behind them and the
//! simulator wraps seeded models.
//!
//! Everything asynchronous follows one shape: *submit now with a caller token, poll completions
//! later*. Nothing here blocks, so the engine can live on a polled reactor core.
//!
//! Buffers are plain `Vec<u8>` whose lengths are multiples of the block size. A reactor
//! implementation that needs O_DIRECT alignment copies into its aligned pool (or, later, the
//! engine can be made generic over the buffer type); offsets are always 4 KiB aligned.

mod clock;
mod flash;
mod san;

pub use clock::{Clock, MonotonicClock};
pub use flash::{Flash, FlashInfo};
pub use san::{DetachedSan, San};

/// Why a device operation failed. "The world", never a bug of ours: the engine turns these
/// into policy changes, retries or host statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The device reported a media or transport error for this operation.
    #[error("device I/O error")]
    Failed,
    /// The device (SAN path) cannot be reached at the moment; retry later.
    #[error("device unreachable")]
    Unreachable,
}

/// One finished operation. Reads return their data in `data`; writes and flushes return an
/// empty vector.
#[derive(Debug)]
pub struct IoDone {
    pub token: u64,
    pub result: Result<Vec<u8>, IoError>,
}
