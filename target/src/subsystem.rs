//! NVM subsystems and their namespaces, as built from the configuration, plus the registry of
//! live controllers. Subsystems are shared read-only by every reactor (`Arc`); the only
//! mutable parts (the controller registry, controller ids) are touched on Connect and
//! disconnect, never on the I/O path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, Weak};

use stager_nvme::bdev::BlockDevice;
use stager_nvme::identify::NamespaceIdentity;

use crate::controller::ControllerShared;

pub struct Namespace {
    pub nsid: u32,
    /// Index of this namespace's channel in every reactor's channel table.
    pub channel: u32,
    pub bdev: Arc<dyn BlockDevice>,
    pub uuid: [u8; 16],
}

impl Namespace {
    pub fn block_size(&self) -> u32 {
        self.bdev.info().block_size
    }
    pub fn blocks(&self) -> u64 {
        self.bdev.info().blocks
    }
    pub fn identity(&self) -> NamespaceIdentity {
        let info = self.bdev.info();
        NamespaceIdentity { blocks: info.blocks, block_size: info.block_size, nguid: self.uuid, uuid: self.uuid }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubsystemKind {
    Discovery,
    Nvm,
}

pub struct Subsystem {
    pub kind: SubsystemKind,
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub allow_any_host: bool,
    pub hosts: Vec<String>,
    /// Addresses this subsystem is reachable on (its listeners).
    pub listeners: Vec<SocketAddr>,
    /// Sorted by NSID.
    pub namespaces: Vec<Arc<Namespace>>,
    controllers: Mutex<HashMap<u16, Weak<ControllerShared>>>,
    next_cntlid: AtomicU16,
}

impl Subsystem {
    // One argument per configured property; a builder would only add ceremony.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: SubsystemKind,
        nqn: String,
        serial: String,
        model: String,
        allow_any_host: bool,
        hosts: Vec<String>,
        listeners: Vec<SocketAddr>,
        mut namespaces: Vec<Arc<Namespace>>,
    ) -> Subsystem {
        namespaces.sort_by_key(|n| n.nsid);
        Subsystem {
            kind,
            nqn,
            serial,
            model,
            allow_any_host,
            hosts,
            listeners,
            namespaces,
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
        }
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.namespaces.binary_search_by_key(&nsid, |n| n.nsid).ok().map(|i| &self.namespaces[i])
    }

    /// A fresh controller id in 1..=0xFFEF (0xFFF0.. are reserved), not in use.
    pub fn allocate_cntlid(&self) -> Option<u16> {
        let ctrls = self.controllers.lock().ok()?;
        for _ in 0..0xFFEF {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            let id = (id % 0xFFEF).max(1);
            if ctrls.get(&id).is_none_or(|w| w.strong_count() == 0) {
                return Some(id);
            }
        }
        None
    }

    pub fn register(&self, ctrl: &Arc<ControllerShared>) {
        if let Ok(mut c) = self.controllers.lock() {
            c.retain(|_, w| w.strong_count() > 0);
            c.insert(ctrl.cntlid, Arc::downgrade(ctrl));
        }
    }

    pub fn unregister(&self, cntlid: u16) {
        if let Ok(mut c) = self.controllers.lock() {
            c.remove(&cntlid);
        }
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<ControllerShared>> {
        self.controllers.lock().ok()?.get(&cntlid)?.upgrade()
    }
}

/// Everything reactors share about the target: subsystems by NQN and the transport limits.
pub struct TargetShared {
    pub subsystems: HashMap<String, Arc<Subsystem>>,
    pub limits: Limits,
    /// Total namespaces (the length of each reactor's channel table).
    pub namespaces: Vec<Arc<Namespace>>,
    /// The write-back volumes: each reactor builds the engines of the flash devices it owns.
    pub volumes: Option<Arc<crate::volume::VolumeService>>,
    /// Counters of the NVMe/TCP transport, summed over connections.
    pub stats: crate::transport::tcp::TransportStats,
}

/// Transport and controller limits from the configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_queue_depth: u16,
    pub max_io_queues: u16,
    pub in_capsule_bytes: usize,
    pub max_h2c_data_bytes: usize,
    pub max_io_bytes: usize,
    pub idle_poll: std::time::Duration,
    /// Close connections that have not finished ICReq and Connect by then.
    pub handshake_timeout: std::time::Duration,
    /// Close connections stalled in the middle of a PDU or an R2T transfer for this long.
    pub pdu_timeout: std::time::Duration,
    pub zero_copy_send: crate::config::ZeroCopySend,
}

impl Limits {
    /// MDTS as a power of two of 4 KiB pages.
    pub fn mdts(&self) -> u8 {
        (self.max_io_bytes / 4096).max(1).trailing_zeros() as u8
    }
}
