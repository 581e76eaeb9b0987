//! The fabric's one error type. It is `Clone` because one cause (a dead peer) is reported to
//! every outstanding write of the endpoint as well as in `Event::Failed`.

use std::io;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FabricError {
    /// A `FabricConfig` that cannot work (bad node id, empty secret, ...).
    #[error("fabric config: {0}")]
    Config(String),
    /// `FabricKind::Verbs` asked of a build without the `verbs` cargo feature.
    #[error(
        "this build of stager lacks the `verbs` fabric: rebuild with `--features stager-rdma/verbs` \
         (needs libibverbs-dev, librdmacm-dev, libclang-dev), or use the tcp fabric"
    )]
    VerbsNotBuilt,
    /// A system call or the network failed (context, then the OS error).
    #[error("{0}")]
    Io(String),
    /// The set-up handshake did not end in an authenticated endpoint: wrong secret, a node not in
    /// `peers`, the wrong peer id, another fabric kind or protocol version. Says which.
    #[error("refused: {0}")]
    Refused(String),
    /// Connecting or the handshake took longer than allowed, or the peer fell silent for longer
    /// than `peer_timeout`.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The send queue (or the send buffer) is full: poll and retry. Never blocks.
    #[error("send queue full")]
    Busy,
    /// A write or copy outside the region (checked locally, before anything is sent).
    #[error("out of bounds: offset {offset} + {len} bytes > region of {region_len} bytes")]
    OutOfBounds { offset: u64, len: u64, region_len: u64 },
    /// A write or message larger than the fabric carries.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    /// The peer broke the protocol (a malformed frame, an unknown key, a write out of bounds);
    /// the endpoint is failed, nothing of the frame was applied.
    #[error("protocol violation by peer {peer}: {what}")]
    Protocol { peer: String, what: String },
    /// The peer closed the connection (or it broke).
    #[error("peer {0} is gone")]
    PeerGone(String),
    /// The endpoint failed earlier (see the `Failed` event); it takes no more work.
    #[error("endpoint is closed: {0}")]
    Closed(String),
    /// `Fabric::stop()` was called.
    #[error("fabric stopped")]
    Stopped,
    /// An RDMA verbs call or completion failed.
    #[error("verbs: {0}")]
    Verbs(String),
    /// Bytes that do not decode (a `RemoteKey`).
    #[error("decode: {0}")]
    Decode(String),
}

impl FabricError {
    /// An I/O error with what we were doing.
    pub(crate) fn io(context: impl std::fmt::Display, e: io::Error) -> FabricError {
        FabricError::Io(format!("{context}: {e}"))
    }
}
