//! An authenticated connection to one peer: what a reactor polls. Set up on a control thread
//! (`Fabric::connect`, or the accept thread behind `Fabric::incoming`), then moved to the
//! reactor that owns it; one thread uses it at a time and nothing in it blocks.
//!
//! The backends differ only inside; both honour the same rules (see the crate docs): writes
//! placed in order, `Imm` after everything before it, a peer writes only regions exposed on its
//! own endpoint and only within them, and a dead or misbehaving peer fails this endpoint alone.

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::region::{Region, RemoteKey};
use crate::tcp::TcpEndpoint;
use crate::FabricError;

/// What `Endpoint::poll` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Our write `wr_id` is placed in the peer's region (RC: the peer acknowledged it).
    WriteDone { wr_id: u64 },
    /// Our write `wr_id` will never complete (the endpoint failed; `Failed` follows).
    WriteFailed { wr_id: u64, error: FabricError },
    /// The peer's WRITE WITH IMMEDIATE of `len` bytes arrived: its data, and every write the peer
    /// made before it on this endpoint, is visible in our region.
    Imm { imm: u32, len: u32 },
    /// A control message from the peer, in the order it was sent (ordered against other
    /// messages; on verbs, not against writes: they travel on another path).
    Message(Vec<u8>),
    /// The endpoint is dead (peer gone, silent past `peer_timeout`, protocol violation, fabric
    /// stopped). Every outstanding write got `WriteFailed` before it; nothing follows it.
    Failed(FabricError),
}

/// Counters of one endpoint since it was set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Writes posted by us, and their bytes.
    pub writes: u64,
    pub write_bytes: u64,
    /// Writes whose bytes had to be copied before leaving (tcp: the kernel did not take them at
    /// once; verbs: always, into the registered staging area).
    pub staged_copies: u64,
    /// Of our writes, those with an immediate.
    pub imms_sent: u64,
    /// Writes placed into our regions by the peer, their bytes, and those with an immediate.
    /// (verbs: the NIC places plain writes unseen, so only writes with an immediate count.)
    pub writes_received: u64,
    pub bytes_received: u64,
    pub imms_received: u64,
    pub msgs_sent: u64,
    pub msgs_received: u64,
    /// Frames of the peer refused as protocol violations (each one fails the endpoint).
    pub refusals: u64,
}

#[allow(clippy::large_enum_variant)] // one per peer, moved once to its reactor
enum Backend {
    Tcp(TcpEndpoint),
    #[cfg(feature = "verbs")]
    Verbs(crate::verbs::VerbsEndpoint),
}

/// One peer. `Send`; used by one thread at a time.
pub struct Endpoint {
    backend: Backend,
}

macro_rules! each {
    ($self:expr, $ep:ident => $body:expr) => {
        match $self {
            Backend::Tcp($ep) => $body,
            #[cfg(feature = "verbs")]
            Backend::Verbs($ep) => $body,
        }
    };
}

impl Endpoint {
    pub(crate) fn tcp(ep: TcpEndpoint) -> Endpoint {
        Endpoint { backend: Backend::Tcp(ep) }
    }

    #[cfg(feature = "verbs")]
    pub(crate) fn verbs(ep: crate::verbs::VerbsEndpoint) -> Endpoint {
        Endpoint { backend: Backend::Verbs(ep) }
    }

    /// The peer's node id (authenticated).
    pub fn peer(&self) -> &str {
        each!(&self.backend, ep => ep.peer())
    }

    /// Lets this endpoint's peer, and no other, write into `region` (all of it). The endpoint
    /// keeps the `Arc` until it is dropped, so the memory outlives its exposure; the caller keeps
    /// its own `Arc` to read what arrives (also after the endpoint is gone). Exposing one region
    /// on several endpoints lets several peers write it.
    pub fn expose(&mut self, region: Arc<Region>) -> Result<RemoteKey, FabricError> {
        each!(&mut self.backend, ep => ep.expose(region))
    }

    /// One-sided RDMA WRITE (`imm` None) or WRITE WITH IMMEDIATE of the concatenated `src` slices
    /// to `dst` at `offset`. The bytes are taken before it returns. `Err(Busy)` when the send
    /// queue is full (never blocks); a range outside `dst` or over `WRITE_BYTES_MAX` is an error
    /// here, before anything is sent. Completes with `WriteDone { wr_id }` (or `WriteFailed`).
    pub fn write(
        &mut self,
        wr_id: u64,
        src: &[&[u8]],
        dst: RemoteKey,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<(), FabricError> {
        each!(&mut self.backend, ep => ep.write(wr_id, src, dst, offset, imm))
    }

    /// A reliable, ordered control message (at most `MSG_BYTES_MAX`) on the set-up connection.
    pub fn send_msg(&mut self, msg: &[u8]) -> Result<(), FabricError> {
        each!(&mut self.backend, ep => ep.send_msg(msg))
    }

    /// Makes progress (socket, completion queue, heartbeats, timeout), appends events, returns
    /// how many. Never blocks.
    pub fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        each!(&mut self.backend, ep => ep.poll(events))
    }

    /// A descriptor that becomes readable when `poll()` has work (an epoll fd: socket, completion
    /// channel, heartbeat timer). Wait on it only after `arm()` returned true.
    pub fn wait_fd(&self) -> RawFd {
        each!(&self.backend, ep => ep.wait_fd())
    }

    /// Prepares to sleep on `wait_fd()`: false if work is already pending (poll again instead).
    pub fn arm(&mut self) -> bool {
        each!(&mut self.backend, ep => ep.arm())
    }

    pub fn stats(&self) -> EndpointStats {
        each!(&self.backend, ep => ep.stats())
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.backend {
            Backend::Tcp(_) => "tcp",
            #[cfg(feature = "verbs")]
            Backend::Verbs(_) => "verbs",
        };
        f.debug_struct("Endpoint").field("kind", &kind).field("peer", &self.peer()).finish()
    }
}
