//! stagerd as a library: the configuration, reactors, the NVMe-oF front end (transport,
//! discovery, subsystems, controllers) and `Target`, which starts all of it from a `Config`.
//! The `stagerd` binary is a thin CLI over `Target`; tests start targets in-process the same way.

pub mod acceptor;
pub mod ana;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod config;
pub mod constants;
pub mod controller;
pub mod management;
pub mod reactor;
pub mod san;
pub mod subsystem;
pub mod target;
pub mod transport;
pub mod volume;

pub use target::{StartError, Target};
