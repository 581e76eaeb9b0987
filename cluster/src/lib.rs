//! Stager's cluster state in etcd: which nodes are alive, which node is the resource manager,
//! and each volume's owner, replicas, epoch and policies.
//!
//! - **Liveness**: a node registers its [`NodeInfo`] under an etcd lease and keeps the lease
//!   alive from the background; its record disappears when it stops. The node itself learns
//!   that it may have lost the lease *before* etcd can expire it (see `lease.rs` and
//!   docs/architecture.md, "Cluster state in etcd"): [`Cluster::lease_state`] says `Lost` once
//!   a local deadline passes, even with etcd unreachable, and a node that is `Lost` must stop
//!   acting as an owner (stagerd does not yet: it only logs it).
//! - **Election**: one resource manager at a time ([`Cluster::campaign`]); its writes
//!   ([`Cluster::put_volume_as_leader`]) are transactions that also check it still leads.
//! - **Volume records**: JSON under `{prefix}/volumes/{id}`, changed only by compare-and-put on
//!   the record's revision ([`Cluster::put_volume_if`]); [`Cluster::watch_volumes`] streams every
//!   change in order.
//! - **Placement**: [`placement::choose_replicas`], a pure function.
//!
//! The API is blocking with timeouts, for stagerd's control threads (never its reactors): the
//! async etcd client runs on a private tokio runtime on one background thread. The client is
//! the cargo feature `etcd` (its build needs `protoc`); without it the crate has the record
//! types, placement and the [`testing`] helpers only.

pub mod constants;
mod error;
pub mod manager;
pub mod placement;
mod record;
pub mod testing;

#[cfg(feature = "etcd")]
mod client;
#[cfg(feature = "etcd")]
mod election;
#[cfg(feature = "etcd")]
mod keeper;
mod lease;
#[cfg(feature = "etcd")]
mod runtime;
#[cfg(all(test, feature = "etcd"))]
mod tests;
#[cfg(feature = "etcd")]
mod watch;

use std::time::Duration;

#[cfg(feature = "etcd")]
pub use client::{unix_ms_now, Cluster};
pub use error::ClusterError;
pub use lease::LeaseState;
pub use record::{check_endpoint, check_node_id, check_prefix, NodeInfo, Transition, VolumeRecord};

/// An etcd revision: a record's mod revision, what compare-and-put compares.
pub type Revision = i64;

/// How to reach etcd, where our keys live, and who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd client endpoints, `host:port` (plain HTTP/2, no TLS yet).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster, e.g. `/stager/demo`: several clusters can share one etcd.
    pub prefix: String,
    /// This node's id (stagerd's `node.id`).
    pub node: String,
    /// The lease TTL: a dead node's volumes and manager role can be taken over this long after
    /// its last keep-alive. 2 s to 300 s, rounded up to whole seconds (etcd's unit).
    pub lease_ttl: Duration,
    /// How long each blocking call waits for etcd. 100 ms to 60 s.
    pub op_timeout: Duration,
}

/// A change to a volume record, from [`Cluster::watch_volumes`]. Records are a few hundred
/// bytes and changes rare: not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeEvent {
    Changed { id: u32, record: VolumeRecord, revision: Revision },
    Deleted { id: u32 },
}
