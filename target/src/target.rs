//! `Target`: builds everything a configuration describes — listeners, block devices,
//! namespaces, subsystems (plus the discovery subsystem), reactors, acceptors — and tears it
//! down in order: stop accepting, let reactors finish in-flight I/O and close connections,
//! then sync the devices.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use stager_nvme::bdev::{open_device, BlockDevice, MemoryDevice};
use stager_nvme::log_page::AnaState;
use stager_nvme::DISCOVERY_NQN;
use tracing::info;

use crate::ana::{AnaChange, AnaError, AnaPathStatus, AnaScope, SubsystemAna};
use crate::config::{BackendConfig, Config};
use crate::reactor::{self, ReactorHandle};
use crate::subsystem::{Limits, Namespace, Subsystem, SubsystemKind, TargetShared};
use crate::volume::{VolumeDevice, VolumeInfo, VolumeService};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {name}: cannot listen on {addr}: {source}")]
    Listen { name: String, addr: SocketAddr, source: std::io::Error },
    #[error("subsystem {nqn} namespace {nsid}: cannot open {backend} backend: {source}")]
    Backend { nqn: String, nsid: u32, backend: String, source: std::io::Error },
    #[error("cannot start reactor {id}: {source}")]
    Reactor { id: usize, source: std::io::Error },
    #[error("write-back volumes: {0}")]
    Volumes(String),
    #[error("management socket: {0}")]
    Management(String),
    #[error("replication: {0}")]
    Replication(String),
}

pub struct Target {
    shared: Arc<TargetShared>,
    reactors: Arc<Vec<ReactorHandle>>,
    acceptors: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    listen_addrs: Vec<SocketAddr>,
    volumes: Option<Arc<VolumeService>>,
    management: Option<crate::management::Management>,
    replication: Option<Arc<crate::volume::replication::Replication>>,
}

impl Target {
    /// Starts a target; `config` must have been validated (`config::load`/`parse` do that).
    pub fn start(config: Config) -> Result<Target, StartError> {
        Self::start_with_devices(config, HashMap::new())
    }

    /// Starts a target whose namespaces (subsystem NQN, NSID) listed in `devices` use the
    /// given block devices instead of their configured backends. Tests use it to put a
    /// fault-injecting device under a namespace.
    pub fn start_with_devices(
        config: Config,
        mut devices: HashMap<(String, u32), Arc<dyn BlockDevice>>,
    ) -> Result<Target, StartError> {
        let mut listeners = Vec::new();
        let mut by_name: HashMap<String, SocketAddr> = HashMap::new();
        for l in &config.listeners {
            let sock = TcpListener::bind(l.address).map_err(|source| StartError::Listen {
                name: l.name.clone(),
                addr: l.address,
                source,
            })?;
            let addr = sock.local_addr().map_err(|source| StartError::Listen {
                name: l.name.clone(),
                addr: l.address,
                source,
            })?;
            by_name.insert(l.name.clone(), addr);
            listeners.push((l.name.clone(), sock, addr));
        }
        let all_addrs: Vec<SocketAddr> = listeners.iter().map(|(_, _, a)| *a).collect();
        // The volumes first: their sizes come from their SANs (the destage core connects
        // them); their engines start with the reactors that own them, and their logs are
        // recovered before any host can connect.
        let volumes = VolumeService::start(&config).map_err(StartError::Volumes)?;
        let stop_volumes = |v: &Option<Arc<VolumeService>>| {
            if let Some(v) = v {
                v.stop();
            }
        };
        let mut namespaces: Vec<Arc<Namespace>> = Vec::new();
        let mut subsystems = HashMap::new();
        for s in &config.subsystems {
            let ana_groups = s.effective_ana_groups();
            let mut nss = Vec::new();
            for n in &s.namespaces {
                let bdev: Arc<dyn BlockDevice> = match (devices.remove(&(s.nqn.clone(), n.nsid)), &n.backend) {
                    (Some(dev), _) => dev,
                    (None, BackendConfig::Memory { size_bytes, block_size }) => {
                        match MemoryDevice::new(&format!("{}/ns{}", s.nqn, n.nsid), *size_bytes, *block_size) {
                            Ok(d) => Arc::new(d),
                            Err(source) => {
                                stop_volumes(&volumes);
                                return Err(StartError::Backend {
                                    nqn: s.nqn.clone(),
                                    nsid: n.nsid,
                                    backend: format!("memory ({size_bytes} bytes)"),
                                    source,
                                });
                            }
                        }
                    }
                    (
                        None,
                        BackendConfig::File { .. } | BackendConfig::NvmePassthru { .. } | BackendConfig::Vfio { .. },
                    ) => {
                        let spec = n.backend.device().expect("file, nvme-passthru and vfio backends name a device");
                        match open_device(&spec) {
                            Ok(d) => d,
                            Err(source) => {
                                stop_volumes(&volumes);
                                return Err(StartError::Backend {
                                    nqn: s.nqn.clone(),
                                    nsid: n.nsid,
                                    backend: format!("{} {}", spec.kind(), spec.label()),
                                    source,
                                });
                            }
                        }
                    }
                    (None, BackendConfig::Volume { id, .. }) => {
                        let found = volumes
                            .as_ref()
                            .and_then(|v| v.volumes.iter().find(|i| i.id.0 == *id).map(|i| (v.clone(), i.clone())));
                        let Some((service, info)) = found else {
                            stop_volumes(&volumes);
                            return Err(StartError::Volumes(format!("volume {id} was not started")));
                        };
                        Arc::new(VolumeDevice::new(service, info))
                    }
                    (None, BackendConfig::Standby { id, size_bytes }) => {
                        // The copy of volume `id` lives on the device that keeps copies; its
                        // engine takes the namespace's commands only while it serves the copy.
                        let found = volumes.as_ref().and_then(|v| v.replica_dev.map(|dev| (v.clone(), dev)));
                        let Some((service, dev)) = found else {
                            stop_volumes(&volumes);
                            return Err(StartError::Volumes(format!(
                                "standby of volume {id}: no flash device keeps copies on this node"
                            )));
                        };
                        let info = VolumeInfo {
                            id: stager_policy::VolumeId(*id),
                            dev,
                            blocks: size_bytes / u64::from(crate::config::VOLUME_BLOCK_SIZE),
                            export: "standby".into(),
                            standby: true,
                        };
                        Arc::new(VolumeDevice::new(service, info))
                    }
                };
                let ana_group = s.ana_group_of(n.nsid);
                let ns = Arc::new(Namespace {
                    nsid: n.nsid,
                    channel: namespaces.len() as u32,
                    bdev,
                    uuid: n.effective_uuid(&s.nqn),
                    ana_group,
                    ana_index: ana_groups.iter().position(|g| g.id == ana_group).unwrap_or(0),
                });
                namespaces.push(ns.clone());
                nss.push(ns);
            }
            let addrs = if s.listeners.is_empty() {
                all_addrs.clone()
            } else {
                s.listeners.iter().filter_map(|l| by_name.get(l).copied()).collect()
            };
            let sub = Subsystem::new(
                SubsystemKind::Nvm,
                s.nqn.clone(),
                s.serial.clone(),
                s.model.clone(),
                s.allow_any_host,
                s.hosts.clone(),
                addrs,
                nss,
            );
            // Each group's state through every listener of the target, and its namespaces.
            let groups = ana_groups
                .iter()
                .map(|g| {
                    let members = s.namespaces.iter().map(|n| n.nsid).filter(|&n| s.ana_group_of(n) == g.id).collect();
                    (g.id, members, config.listeners.iter().map(|l| g.state_on(&l.name)).collect())
                })
                .collect();
            let ana = SubsystemAna::new(groups, config.ana.transition_time_s);
            let sub = sub.with_ana(ana, config.ana.cntlid_min..=config.ana.cntlid_max);
            subsystems.insert(s.nqn.clone(), Arc::new(sub));
        }
        let discovery = Subsystem::new(
            SubsystemKind::Discovery,
            DISCOVERY_NQN.into(),
            "STAGER-DISCOVERY".into(),
            "Stager discovery".into(),
            true,
            Vec::new(),
            all_addrs.clone(),
            Vec::new(),
        );
        subsystems.insert(DISCOVERY_NQN.into(), Arc::new(discovery));
        let t = &config.transport;
        let limits = Limits {
            max_queue_depth: t.max_queue_depth,
            max_io_queues: t.max_io_queues,
            in_capsule_bytes: t.in_capsule_data_bytes as usize,
            max_h2c_data_bytes: t.max_h2c_data_bytes as usize,
            max_io_bytes: t.max_io_bytes as usize,
            idle_poll: std::time::Duration::from_micros(config.reactors.idle_poll_us),
            handshake_timeout: std::time::Duration::from_millis(t.handshake_timeout_ms as u64),
            pdu_timeout: std::time::Duration::from_millis(t.pdu_timeout_ms as u64),
            zero_copy_send: t.zero_copy_send,
            c2h_success: t.c2h_success,
        };
        let shared = Arc::new(TargetShared {
            subsystems,
            limits,
            namespaces,
            volumes: volumes.clone(),
            stats: Default::default(),
            listeners: listeners.iter().map(|(name, _, addr)| (name.clone(), *addr)).collect(),
            ana_changes: Default::default(),
            cluster_view: Default::default(),
        });
        let mut reactors = Vec::new();
        for (id, core) in config.reactors.cores.iter().enumerate() {
            match reactor::spawn(id, Some(*core), shared.clone()) {
                Ok(r) => reactors.push(r),
                Err(source) => {
                    for mut r in reactors {
                        r.stop_and_join();
                    }
                    stop_volumes(&volumes);
                    return Err(StartError::Reactor { id, source });
                }
            }
        }
        if let Some(v) = &volumes {
            if let Err(e) = v.wait_ready() {
                for mut r in reactors {
                    r.stop_and_join();
                }
                stop_volumes(&volumes);
                return Err(StartError::Volumes(e));
            }
        }
        // Replication links once the engines are ready (a source presents its new epoch).
        let replication = match crate::volume::replication::Replication::start(&config, volumes.as_ref()) {
            Ok(r) => r.map(Arc::new),
            Err(e) => {
                for mut r in reactors {
                    r.stop_and_join();
                }
                stop_volumes(&volumes);
                return Err(StartError::Replication(e));
            }
        };
        let management = match &config.management.socket {
            Some(path) => match crate::management::Management::start(path, volumes.clone(), Some(shared.clone())) {
                Ok(m) => Some(m),
                Err(e) => {
                    for mut r in reactors {
                        r.stop_and_join();
                    }
                    stop_volumes(&volumes);
                    return Err(StartError::Management(e));
                }
            },
            None => None,
        };
        let reactors = Arc::new(reactors);
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let mut acceptors = Vec::new();
        for (index, (name, sock, addr)) in listeners.into_iter().enumerate() {
            let h = crate::acceptor::spawn(sock, index, name.clone(), reactors.clone(), next.clone(), stop.clone())
                .map_err(|source| StartError::Listen { name: name.clone(), addr, source })?;
            info!("listening on {addr} (listener {name}, NVMe/TCP)");
            acceptors.push(h);
        }
        Ok(Target { shared, reactors, acceptors, stop, listen_addrs: all_addrs, volumes, management, replication })
    }

    /// The address listener `i` actually bound (useful with port 0).
    pub fn listen_addr(&self, i: usize) -> SocketAddr {
        self.listen_addrs[i]
    }

    /// The NVMe/TCP transport's counters (copies on the receive path, back-pressure, timeouts).
    pub fn transport_stats(&self) -> &crate::transport::tcp::TransportStats {
        &self.shared.stats
    }

    /// Sets ANA group `group` to `state` on this node (within `scope`: one subsystem, one
    /// listener, or all of them) and sends the ANA change notice to every controller whose
    /// path changed. What failover calls: e.g. the node taking a volume over sets its group
    /// optimized. Thread-safe; returns once the states are set (hosts hear within a reactor
    /// tick, ~50 ms).
    pub fn set_ana_state(&self, group: u32, state: AnaState, scope: &AnaScope) -> Result<AnaChange, AnaError> {
        self.shared.set_ana_state(group, state, scope)
    }

    /// Every (subsystem, ANA group, listener) path of this node with its state.
    pub fn ana_status(&self) -> Vec<AnaPathStatus> {
        self.shared.ana_status()
    }

    /// The destage reactor's handle, when the configuration has write-back volumes.
    /// What the target's threads share (the cluster thread publishes its view there).
    pub fn shared(&self) -> Arc<TargetShared> {
        self.shared.clone()
    }

    pub fn volumes(&self) -> Option<&Arc<VolumeService>> {
        self.volumes.as_ref()
    }

    /// The replication links (what the cluster agent changes replica sets through), when the
    /// node has peers.
    pub fn replication(&self) -> Option<Arc<crate::volume::replication::Replication>> {
        self.replication.clone()
    }

    /// The replication fabric's set-up listener, when the node has peers.
    pub fn fabric_addr(&self) -> Option<SocketAddr> {
        self.replication.as_ref().map(|r| r.local_addr())
    }

    /// Stops accepting, finishes in-flight I/O, closes connections, syncs devices.
    pub fn shutdown(mut self) {
        if let Some(m) = self.management.take() {
            m.stop();
        }
        if let Some(r) = self.replication.take() {
            r.stop();
        }
        self.stop.store(true, Ordering::Relaxed);
        for a in self.acceptors.drain(..) {
            let _ = a.join();
        }
        // The acceptors held the only other references and are joined above.
        match Arc::get_mut(&mut self.reactors) {
            Some(rs) => rs.iter_mut().for_each(|r| r.stop_and_join()),
            None => tracing::error!("reactors still shared at shutdown; they were not stopped"),
        }
        for ns in &self.shared.namespaces {
            if let Err(e) = ns.bdev.sync() {
                tracing::warn!("syncing {} failed: {e}", ns.bdev.info().name);
            }
        }
        if let Some(v) = self.volumes.take() {
            v.stop();
        }
        let st = &self.shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        info!(
            "transport: write data copied from receive buffers {} bytes, received straight into I/O buffers {} \
             bytes; read data sent zero-copy {} bytes; {} back-pressure episodes, {} queue overruns, {} handshake \
             and {} PDU timeouts",
            load(&st.rx_data_copied_bytes),
            load(&st.rx_data_direct_bytes),
            load(&st.tx_zero_copy_bytes),
            load(&st.backpressure_episodes),
            load(&st.queue_overruns),
            load(&st.handshake_timeouts),
            load(&st.pdu_timeouts)
        );
        info!("target stopped");
    }
}
