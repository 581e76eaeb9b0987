//! SAN backends: where a volume's data finally lives. Today: an iSCSI LUN through the system's
//! libiscsi (feature `iscsi`, which needs `libiscsi-dev`). The write-back engine's destager
//! will drive them through the `policy` crate's SAN trait; this module is the real-world end.

#[cfg(feature = "iscsi")]
pub mod iscsi;
