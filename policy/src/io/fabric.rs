//! The replication fabric as the engine sees it: links to peer nodes, each with a registered
//! region at the far end (one-sided writes into it) and one here (the peer's writes land in it).
//!
//! A *link* carries one volume between its source and one replica. On the source the far
//! region is the replica's record ring and publication block and the near one holds the
//! replica's acknowledgements; on the replica it is the other way round. The target sets links
//! up (connection, authentication, region keys, over `stager-rdma`) and hands the engine a
//! [`LinkId`]; the simulator implements this trait with seeded delays, failures and crashes.

use crate::types::LinkId;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FabricError {
    /// The send queue is full: try again after a completion.
    #[error("fabric send queue full")]
    Busy,
    /// The link is gone (peer down, timeout, protocol violation); its writes fail.
    #[error("link down: {0}")]
    Down(String),
    /// A read or write outside the link's region.
    #[error("outside the link's region")]
    OutOfBounds,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FabricEvent {
    /// A WRITE WITH IMMEDIATE from the peer has landed in this node's region of `link` (and
    /// every write before it on the link).
    Imm { link: LinkId, imm: u32, len: u32 },
    /// The link failed; no more events come from it.
    Down { link: LinkId, why: String },
}

pub trait Fabric {
    /// One-sided write of the concatenated `src` into the peer's region of `link` at `offset`,
    /// with an immediate if `imm` is set. The bytes are taken before it returns.
    fn write(&mut self, link: LinkId, src: &[&[u8]], offset: u64, imm: Option<u32>) -> Result<(), FabricError>;
    /// Copies `out.len()` bytes at `offset` of this node's region of `link`.
    fn read(&self, link: LinkId, offset: u64, out: &mut [u8]) -> Result<(), FabricError>;
    /// Moves what happened on the links to `out`; returns how many.
    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize;
}
