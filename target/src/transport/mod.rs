//! Transports carry NVMe capsules between hosts and controllers. Only TCP exists today; RDMA
//! would sit beside it with the same shape: a connection owned by one reactor, fed by that
//! reactor's completions, driving the controller and namespaces through `ReactorCtx`.

pub mod rx;
pub mod tcp;
mod tx;

use std::sync::Arc;
use std::time::Instant;

use stager_nvme::bdev::{BdevChannel, BufPool};
use stager_nvme::uring::Ring;

use crate::subsystem::TargetShared;

/// What a connection may use of its reactor while it handles an event.
pub struct ReactorCtx<'a> {
    pub ring: &'a mut Ring,
    /// One channel per namespace of the target, indexed by `Namespace::channel`.
    pub channels: &'a mut [Box<dyn BdevChannel>],
    pub pool: &'a mut BufPool,
    pub target: &'a Arc<TargetShared>,
    pub reactor: usize,
    /// The reactor's clock, read once per loop iteration.
    pub now: Instant,
}
