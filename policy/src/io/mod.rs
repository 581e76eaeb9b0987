//! The engine's only windows on the world: a flash device holding the log ([`Flash`]), a
//! volume's SAN LUN ([`San`]) and time ([`Clock`]). Each is a small trait in its own module, in
//! the shape of SPDK's ops tables, so the reactors wrap io_uring / libiscsi behind them and the
//! simulator wraps seeded models.
//!
//! Everything asynchronous follows one shape: *submit now with a token, poll completions
//! later*. Nothing here blocks, so the engine can live on a polled reactor core.
//!
//! Buffers are the I/O path's one vocabulary, `AlignedBuf` (4 KiB aligned, O_DIRECT-ready):
//! ownership moves into an operation at submission and comes back in its completion. A host
//! write's buffer — the one the transport received the data into — is what the log write
//! sends, so nothing is copied between the socket and the flash.

mod clock;
mod fabric;
mod flash;
mod san;

pub use clock::{Clock, MonotonicClock};
pub use fabric::{Fabric, FabricError, FabricEvent};
pub use flash::{Flash, FlashInfo};
pub use san::{DetachedSan, San};
pub use stager_nvme::bdev::{AlignedBuf, BufPool};

use crate::types::IoToken;

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

/// One finished operation, with the buffers it was given back (a read's holds the data).
#[derive(Debug)]
pub struct IoDone {
    pub token: IoToken,
    pub result: Result<(), IoError>,
    pub buf: Option<AlignedBuf>,
    /// A gathered write's further buffers.
    pub gather: Vec<AlignedBuf>,
}

impl IoDone {
    pub fn new(token: IoToken, result: Result<(), IoError>, buf: Option<AlignedBuf>) -> IoDone {
        IoDone { token, result, buf, gather: Vec::new() }
    }
}
