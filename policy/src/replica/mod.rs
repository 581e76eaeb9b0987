//! Replication of log entries to peer flash (write-back+1 and +2): the wire formats and the two
//! ends of a link, as state machines that do no I/O of their own.
//!
//! A link carries one volume from its *source* (the node that owns the volume and its log) to
//! one *replica* (a node that keeps a copy of the volume's dirty entries in its own log):
//! - [`outbound`] (source end): places records in the replica's ring with one-sided writes, each
//!   record the entries of one log frame of that volume, sent from the hosts' buffers at the
//!   moment the local frame write is submitted; tracks what the replica acknowledged as durable,
//!   how far it consumed the ring, which destaged watermark it persisted; keeps a copy of a
//!   record only when the ring or the fabric has no room yet.
//! - [`inbound`] (replica end): checks every record a source wrote (position, record number,
//!   volume, epoch, sequence numbers, checksums) before any byte of it is used, hands its
//!   entries to the local log, and says when they are durable.
//!
//! The engine ([`crate::engine`], `replicate.rs`) ties them to volumes: it acknowledges a write
//! of a replicated volume only once its own log *and* every replica are durable up to it, per
//! volume, so a slow replica of one volume never holds back another.

pub mod inbound;
pub mod outbound;
pub mod wire;

pub(crate) use inbound::Inbound;
pub(crate) use outbound::{Outbound, SyncState};
