//! Write-back volumes in stagerd: a namespace whose backend is `kind: volume` is a local flash
//! log plus a SAN LUN, run by the `stager-policy` engine (front half, on the reactor that owns
//! the flash device) and destager (back half, on the node's destage core).
//!
//! - [`service`]: [`VolumeService`], the handle the target, the management socket and shutdown
//!   use, and the destage core (SANs, destagers, log reads).
//! - [`host`]: the engine host, a poller of the owner reactor: log appends, acknowledgements,
//!   reads, on the thread that received the commands.
//! - [`channel`]: [`VolumeDevice`], the `BlockDevice` a namespace sees, and its per-reactor
//!   channel (local queue on the owner reactor, one message hop from any other).
//! - [`devices`]: the `Flash`/`San` over real devices (io_uring files and block devices, iSCSI
//!   through libiscsi), the flash ownership lock and the superblock probe.
//! - [`fabric_hub`]: a host's replication links (endpoints and regions), the engine's `Fabric`.
//! - [`replication`]: setting links up — the fabric, connecting to replicas, accepting sources,
//!   the control messages, reconnecting links that went down.
//! - [`status`]: the JSON/table of `stagerctl status`.
//! - [`offline`]: `stagerctl flash inspect|destage` — opening a device without a daemon.

pub mod channel;
pub mod devices;
pub(crate) mod fabric_hub;
pub(crate) mod host;
pub mod offline;
pub mod replication;
pub(crate) mod san_gate;
pub mod service;
pub mod status;

pub use channel::VolumeDevice;
pub use service::{VolumeInfo, VolumeService};
