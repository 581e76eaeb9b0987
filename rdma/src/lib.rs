//! Stager's replication fabric: how a source node puts log entries straight into its replicas'
//! memory. Registered memory [`Region`]s, one-sided RDMA WRITE and WRITE WITH IMMEDIATE,
//! completions polled by a reactor, and an authenticated set-up connection per peer.
//!
//! Two backends behind one API (docs/fabric.md has the wire formats and the security model):
//! - **tcp** (default): the same one-sided semantics in software over TCP, for machines without
//!   an RDMA NIC; the receiver's `poll()` places the data.
//! - **verbs** (cargo feature `verbs`): RC queue pairs on real RDMA verbs through `rdma-sys`;
//!   the NIC places the data. One protection domain per endpoint keeps peers apart.
//!
//! The rules both keep, which the replica protocol relies on:
//! 1. Writes on one endpoint are placed in the order they were posted (RC).
//! 2. An `Event::Imm` means its data and every earlier write from that peer are visible.
//! 3. A peer writes only into regions exposed on *its* endpoint, and only within them; anything
//!    else fails that endpoint (never the node), is never applied, and is logged with the peer.
//! 4. Nodes authenticate each other with the cluster secret before an endpoint exists, and only
//!    nodes named in `peers` may connect.
//! 5. Nothing on the data path blocks or allocates per write; `poll()` returns events, and an
//!    endpoint can be slept on (`arm()` + `wait_fd()`).
//!
//! Set-up (`Fabric::start`, `connect`, the accept thread) blocks on control threads; an
//! [`Endpoint`] then moves to the reactor that polls it.

mod channel;
pub mod constants;
mod endpoint;
mod error;
mod fabric;
mod handshake;
mod region;
mod tcp;
#[cfg(feature = "verbs")]
mod verbs;
mod waker;
pub mod wire;

pub use endpoint::{Endpoint, EndpointStats, Event};
pub use error::FabricError;
pub use fabric::{Fabric, FabricConfig, FabricKind};
pub use region::{Region, RemoteKey};

/// Whether this build has the verbs backend.
pub const VERBS_BUILT: bool = cfg!(feature = "verbs");
