//! NVM subsystems and their namespaces, as built from the configuration, plus the registry of
//! live controllers. Subsystems are shared read-only by every reactor (`Arc`); the mutable
//! parts are the controller registry and controller ids (touched on Connect and disconnect,
//! never on the I/O path) and the ANA states (`ana.rs`: atomics the I/O path only reads).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use stager_nvme::bdev::BlockDevice;
use stager_nvme::identify::NamespaceIdentity;

use crate::ana::SubsystemAna;
use crate::constants::CNTLID_MAX;
use crate::controller::ControllerShared;

pub struct Namespace {
    pub nsid: u32,
    /// Index of this namespace's channel in every reactor's channel table.
    pub channel: u32,
    pub bdev: Arc<dyn BlockDevice>,
    pub uuid: [u8; 16],
    /// ANAGRPID, and the group's index in its subsystem's `ana.groups` (the I/O path looks
    /// the state up by index).
    pub ana_group: u32,
    pub ana_index: usize,
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
        NamespaceIdentity {
            blocks: info.blocks,
            block_size: info.block_size,
            nguid: self.uuid,
            uuid: self.uuid,
            ana_group: self.ana_group,
            // Every namespace may be reached through several controllers (other hosts, other
            // nodes): a multipath host merges its paths only when NMIC says so.
            shared: true,
        }
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
    /// ANA groups and their states on this node.
    pub ana: SubsystemAna,
    controllers: Mutex<HashMap<u16, Weak<ControllerShared>>>,
    /// The controller ids this node hands out (`ana.cntlid_min..=cntlid_max`): disjoint on
    /// the nodes that serve one NQN, so a host never sees one id twice in a subsystem.
    cntlids: RangeInclusive<u16>,
    next_cntlid: AtomicU32,
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
            ana: SubsystemAna::none(),
            controllers: Mutex::new(HashMap::new()),
            cntlids: 1..=CNTLID_MAX,
            next_cntlid: AtomicU32::new(0),
        }
    }

    /// The subsystem's ANA groups and this node's controller id range.
    pub fn with_ana(mut self, ana: SubsystemAna, cntlids: RangeInclusive<u16>) -> Subsystem {
        self.ana = ana;
        self.cntlids = cntlids;
        self
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.hosts.iter().any(|h| h == hostnqn)
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.namespaces.binary_search_by_key(&nsid, |n| n.nsid).ok().map(|i| &self.namespaces[i])
    }

    /// A fresh controller id from this node's range, not in use; handed out round-robin so a
    /// host that reconnects gets a new id.
    pub fn allocate_cntlid(&self) -> Option<u16> {
        let ctrls = self.controllers.lock().ok()?;
        let (first, last) = (*self.cntlids.start() as u32, *self.cntlids.end() as u32);
        let span = last.checked_sub(first)? + 1;
        for _ in 0..span {
            let n = self.next_cntlid.fetch_add(1, Ordering::Relaxed) % span;
            let id = (first + n) as u16;
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

    /// The live controllers (control plane: ANA changes, status).
    pub fn controllers(&self) -> Vec<Arc<ControllerShared>> {
        self.controllers.lock().map(|c| c.values().filter_map(Weak::upgrade).collect()).unwrap_or_default()
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
    /// Name and bound address of each listener, in configuration order: a controller's
    /// `listener` indexes it, and so do the ANA states.
    pub listeners: Vec<(String, SocketAddr)>,
    /// Bumped by every ANA state change: reactors compare it on their timer tick and then let
    /// controllers with a pending ANA change notice answer an Asynchronous Event Request.
    pub ana_changes: AtomicU64,
    /// What the cluster thread last read from etcd (`stagerctl cluster`); None without a
    /// `cluster:` section.
    pub cluster_view: std::sync::Mutex<Option<crate::volume::status::ClusterView>>,
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
    pub c2h_success: crate::config::C2hSuccess,
}

impl Limits {
    /// MDTS as a power of two of 4 KiB pages.
    pub fn mdts(&self) -> u8 {
        (self.max_io_bytes / 4096).max(1).trailing_zeros() as u8
    }
}
