//! Write-back volumes in stagerd (issue 4): a namespace whose backend is `kind: volume` is a
//! local flash log plus a SAN LUN, run by the `stager-policy` engine.
//!
//! - [`service`]: the destage reactor — the thread owning every flash device's engine — and
//!   [`VolumeService`], the handle the target, the management socket and shutdown use.
//! - [`channel`]: [`VolumeDevice`], the `BlockDevice` a namespace sees, and the per-reactor
//!   channel that carries host commands to the destage reactor and back.
//! - [`devices`]: the engine's `Flash`/`San` over real devices (io_uring files and block
//!   devices, iSCSI through libiscsi), the flash ownership lock and the superblock probe.
//! - [`status`]: the JSON/table of `stagerctl status`.
//! - [`offline`]: `stagerctl flash inspect|destage` — opening a device without a daemon.

pub mod channel;
pub mod devices;
pub mod offline;
pub mod service;
pub mod status;

pub use channel::VolumeDevice;
pub use service::{VolumeInfo, VolumeService};
