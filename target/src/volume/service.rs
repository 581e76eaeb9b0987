//! The volume service: what `Target` holds of the write-back volumes, and the destage core.
//!
//! [`VolumeService::start`] opens and locks every flash device, reads its superblock (a damaged
//! one refuses the start), and starts the **destage core** — one thread per node (DESIGN.md,
//! "Runtime model"), pinned to `destage.core` if given — which connects every volume's SAN and
//! builds each device's [`Destager`] there (SAN sessions and the destager are single-owner and
//! never leave that thread). It then prepares a [`HostPlan`] per device: the owner reactor
//! (device `i` → reactor `i % reactors`) builds the device's engine from it when it starts,
//! so the log is appended on the core that receives the commands.
//!
//! The destage core talks to each engine host only in messages ([`stager_policy::link`]) over
//! bounded crossbeam channels, with an eventfd that wakes a sleeping thread; a full channel
//! keeps messages on the sender's side until there is room. Like the reactors it spins while
//! there was work within `destage.idle_poll_us` — but only while its own I/O is in flight and
//! something waits on it (`Destager::hurried`) — then sleeps in `io_uring_enter` on its one
//! ring ([`SharedRing`]), which every flash read, SAN file I/O, iSCSI socket poll and its
//! message eventfd complete into; senders write the eventfd only while it says it sleeps.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use stager_nvme::bdev::{BlockDevice, DeviceSpec};
use stager_policy::io::MonotonicClock;
use stager_policy::log::Layout;
use stager_policy::{
    Clock, DestageEvent, Destager, EngineConfig, Epoch, FromDestage, San, ToDestage, VolumeId, VolumeSpec, WritePolicy,
};
use tracing::{error, info, warn};

use super::devices::{
    check_fits_superblock, open_flash_device, prepare_flash_file, probe_superblock, scan_for_frames, BdevPort,
    FailableDevice, OwnerLock, Probe, SharedRing,
};
use super::host::{host_waker, Completion, HostMsg, HostPlan, Ready};
use super::san_gate::{GatedSan, SanGate};
use super::status::{human_bytes, NodeStatus};
use crate::config::{BackendConfig, Config, SanConfig};
use crate::reactor::{new_eventfd, wake};

/// Longest sleep of an idle destage core.
const IDLE_SLEEP: Duration = Duration::from_millis(5);
/// How often the destage core logs destage progress while a volume has dirty data.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How often the reasons of ongoing SAN outages are refreshed for status.
const OUTAGE_REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How long stop waits for in-flight device I/O.
const STOP_DRAIN: Duration = Duration::from_secs(10);
/// Messages a host's inbox holds (commands from other reactors, the destager's messages); a
/// full one keeps the sender's messages on its side. Each may carry a buffer of up to 1 MiB.
const HOST_INBOX: usize = 8192;
/// Messages the destage core's inbox holds (dirty records, host SAN traffic, pressure).
const DESTAGE_INBOX: usize = 16384;
/// Requests the destage core's control inbox holds (rare: a rescue's SAN).
const CONTROL_INBOX: usize = 16;

/// How a thread that may sleep is woken: an eventfd, written only while it says it sleeps.
pub(crate) struct Waker {
    pub efd: OwnedFd,
    /// Set by the owner just before it sleeps; senders write the eventfd only then.
    pub sleeping: AtomicBool,
}

impl Waker {
    /// After queueing a message: SeqCst pairs with the owner's store-then-check, so either it
    /// sees the message before sleeping or we see its flag and wake it.
    pub fn wake_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            wake(&self.efd);
        }
    }
}

/// Where a remote channel's completions go, and the eventfd that wakes its reactor.
pub(crate) struct ReplyPort {
    pub tx: Sender<Completion>,
    pub efd: OwnedFd,
}

/// A volume as the front end sees it.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub dev: u16,
    pub blocks: u64,
    pub export: String,
    /// A `kind: standby` namespace: another node's volume, served from its copy here only
    /// while the cluster says so.
    pub standby: bool,
}

/// What other threads keep of a device: its host's inbox.
pub(crate) struct DeviceHandle {
    pub name: String,
    pub path: PathBuf,
    pub tx: Sender<HostMsg>,
    pub waker: Arc<Waker>,
    pub ready: Arc<Ready>,
    pub volumes: Vec<VolumeId>,
    /// Fault injection (`VolumeService::fail_flash`).
    pub failed: Arc<AtomicBool>,
}

impl DeviceHandle {
    /// Queues a message for the host and wakes its reactor if it sleeps.
    pub fn send(&self, msg: HostMsg) -> bool {
        if self.tx.try_send(msg).is_err() {
            return false;
        }
        self.waker.wake_if_sleeping();
        true
    }
}

/// The handle the rest of stagerd keeps: the devices' hosts, the destage core, status, stop.
pub struct VolumeService {
    pub volumes: Vec<VolumeInfo>,
    pub(crate) devices: Vec<DeviceHandle>,
    plans: Mutex<Vec<Option<HostPlan>>>,
    /// Held while stagerd owns the flash devices (released when it exits, even by kill -9).
    _locks: Vec<OwnerLock>,
    destage_waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    started: Instant,
    /// Routes of remote channels (the `route` half of a host token).
    pub(crate) next_route: AtomicU32,
    /// The device that keeps replica copies for peers.
    pub(crate) replica_dev: Option<u16>,
    /// Hosts report replication links that went down here (taken by the replication service).
    link_down: Mutex<Option<Receiver<(stager_policy::LinkId, String)>>>,
    /// Volumes whose SAN is unreachable now (status).
    outages: SanOutages,
    /// Requests to the destage core other than the engines' messages.
    control: Sender<CoreControl>,
    /// In a cluster: the SAN gate of each of this node's volumes (see `san_gate`).
    gates: HashMap<u32, Arc<SanGate>>,
    /// The SAN gates of copies this node destages because their owner was lost.
    rescue_gates: Mutex<HashMap<u32, Arc<SanGate>>>,
    /// The initiator IQN a rescue logs in to another node's volume's SAN with
    /// (`node.san_initiator`).
    san_initiator: String,
}

/// A flash device as the configuration describes it, with what was found on it.
struct FlashPlan {
    name: String,
    path: PathBuf,
    bdev: Arc<dyn BlockDevice>,
    /// Set by `VolumeService::fail_flash`: every later command to the device fails.
    failed: Arc<AtomicBool>,
    lock: OwnerLock,
    cache_percent: u32,
    probe: Probe,
    volumes: Vec<VolumePlan>,
}

struct VolumePlan {
    id: u32,
    export: String,
    policy: WritePolicy,
    read_cache: bool,
    san: SanConfig,
    size_bytes: Option<u64>,
    replicas: Vec<String>,
}

/// What the destage core found of a volume's SAN.
struct SanFound {
    id: u32,
    blocks: u64,
    unmap: bool,
}

pub(crate) fn san_label(san: &SanConfig) -> String {
    match san {
        SanConfig::File { path, .. } => format!("file {}", path.display()),
        SanConfig::Iscsi { url, .. } => url.clone(),
    }
}

/// Opens (connects to) volume `id`'s SAN; an iSCSI login that takes longer than `timeout`
/// (`destage.san_timeout_ms`) fails.
pub(crate) fn open_san(
    id: u32,
    san: &SanConfig,
    timeout: Duration,
    ring: &Rc<SharedRing>,
) -> Result<Box<dyn San>, String> {
    match san {
        SanConfig::File { path, size_bytes, direct } => {
            let spec = DeviceSpec::File {
                path: path.clone(),
                size_bytes: *size_bytes,
                block_size: stager_policy::constants::BLOCK_SIZE_U64 as u32,
                direct: *direct,
            };
            let dev = open_flash_device(&spec)
                .map_err(|e| format!("volume {id}: cannot open SAN file {}: {e}", path.display()))?;
            let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
            let port = BdevPort::new(dev, ring.clone()).map_err(|e| format!("volume {id}: SAN file: {e}"))?;
            // A file's punched holes read as zeroes; a block device's discards may not.
            Ok(Box::new(port.with_unmap_zeroes(is_file)))
        }
        #[cfg(feature = "iscsi")]
        SanConfig::Iscsi { url, initiator } => {
            let san = super::devices::IscsiSan::connect(url, initiator, timeout, ring.clone()).map_err(|e| {
                format!(
                    "volume {id}: cannot reach its SAN: {e} (destage.san_timeout_ms is {} ms); \
                     stagerd does not start without every volume's SAN",
                    timeout.as_millis()
                )
            })?;
            info!(volume = id, "logged in to SAN {url} as {initiator}");
            Ok(Box::new(san))
        }
        #[cfg(not(feature = "iscsi"))]
        SanConfig::Iscsi { .. } => {
            let _ = (ring, timeout);
            Err(format!(
                "volume {id}: its SAN is iSCSI, but this build has no `iscsi` feature \
                 (rebuild with --features stager-target/iscsi)"
            ))
        }
    }
}

/// The SAN a cluster record names (`file:PATH`, or an `iscsi://` URL logged in to as the
/// default initiator), as a configuration would.
fn san_config_of(name: &str, initiator: &str) -> Result<SanConfig, String> {
    if let Some(path) = name.strip_prefix("file:") {
        return Ok(SanConfig::File { path: PathBuf::from(path), size_bytes: None, direct: true });
    }
    if name.starts_with("iscsi://") {
        return Ok(SanConfig::Iscsi { url: name.to_string(), initiator: initiator.to_string() });
    }
    Err(format!("the record names SAN {name:?}, neither file:PATH nor an iscsi:// URL"))
}

/// A device id for a new device: unique enough across a fleet (time, pid, path), never 0.
fn new_device_id(path: &std::path::Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::time::SystemTime::now().hash(&mut h);
    std::process::id().hash(&mut h);
    path.hash(&mut h);
    h.finish().max(1)
}

impl VolumeService {
    /// Opens the flash devices, starts the destage core (which connects the SANs) and prepares
    /// each device's engine for its owner reactor. None when the configuration has no volumes.
    pub fn start(config: &Config) -> Result<Option<Arc<VolumeService>>, String> {
        let mut plans = Vec::new();
        // The device that keeps replica copies for peers (a node with peers keeps them).
        let replica_flash = config
            .node
            .as_ref()
            .filter(|n| !n.peers.is_empty())
            .and_then(|n| n.replica_flash.clone().or_else(|| config.flash.first().map(|f| f.name.clone())));
        let mut replica_dev = None;
        for f in &config.flash {
            let mut volumes = Vec::new();
            for s in &config.subsystems {
                for n in &s.namespaces {
                    if let BackendConfig::Volume { id, flash, policy, read_cache, san, size_bytes, replicas } =
                        &n.backend
                    {
                        if flash == &f.name {
                            volumes.push(VolumePlan {
                                id: *id,
                                export: format!("{}/{}", s.nqn, n.nsid),
                                policy: *policy,
                                read_cache: *read_cache,
                                san: san.clone(),
                                size_bytes: *size_bytes,
                                replicas: replicas.clone(),
                            });
                        }
                    }
                }
            }
            let device = f.device();
            let keeps_copies = replica_flash.as_deref() == Some(f.name.as_str());
            if volumes.is_empty() && !keeps_copies {
                warn!("flash {} ({}) has no volumes; not opened", f.name, device.label());
                continue;
            }
            if keeps_copies {
                replica_dev = Some(plans.len() as u16);
            }
            let what = format!("flash {} ({})", f.name, device.label());
            // Ownership first: nothing is extended or written under another process's feet.
            if f.size.is_some() && !f.path.exists() {
                if let Some(dir) = f.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{what}: cannot create its folder: {e}"))?;
                }
                std::fs::File::create(&f.path).map_err(|e| format!("{what}: cannot create: {e}"))?;
            }
            let lock = OwnerLock::take_device(&device, true).map_err(|e| format!("{what}: {e}"))?;
            // What the device holds decides whether it may be extended or formatted at all.
            check_before_start(f, &device).map_err(|e| format!("{what}: {e}"))?;
            prepare_flash_file(&f.path, f.size).map_err(|e| format!("{what}: cannot prepare the file: {e}"))?;
            let bdev = open_flash_device(&device).map_err(|e| format!("{what}: cannot open: {e}"))?;
            let probe = probe_superblock(&*bdev).map_err(|e| format!("{what}: cannot read its superblock: {e}"))?;
            if let Probe::Damaged(why) = &probe {
                return Err(format!(
                    "{what}: its superblock is damaged ({why}); refusing to format over it. \
                     `stagerctl flash inspect` shows what is there"
                ));
            }
            let failed = Arc::new(AtomicBool::new(false));
            let bdev: Arc<dyn BlockDevice> = Arc::new(FailableDevice::new(bdev, failed.clone()));
            plans.push(FlashPlan {
                name: f.name.clone(),
                path: PathBuf::from(device.label()),
                bdev,
                failed,
                lock,
                cache_percent: f.cache_percent,
                probe,
                volumes,
            });
        }
        if plans.is_empty() {
            return Ok(None);
        }
        let reactors = config.reactors.cores.len().max(1);
        let destage_waker = Arc::new(Waker {
            efd: new_eventfd().map_err(|e| format!("destage core: eventfd: {e}"))?,
            sleeping: AtomicBool::new(false),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (to_destage, destage_rx) = crossbeam_channel::bounded::<(u16, ToDestage)>(DESTAGE_INBOX);
        let (control, control_rx) = crossbeam_channel::bounded::<CoreControl>(CONTROL_INBOX);
        // In a cluster another node may destage a volume's data (a rescued copy): this node
        // writes each of its volumes' SANs only while the cluster thread holds the gate open.
        let fenced = config.cluster.is_some() && crate::config::CLUSTER_BUILT;
        let gates: HashMap<u32, Arc<SanGate>> = match fenced {
            true => plans.iter().flat_map(|p| &p.volumes).map(|v| (v.id, SanGate::closed())).collect(),
            false => HashMap::new(),
        };
        // Each device's host inbox, made here so the destage core and the other reactors can
        // reach it before the owner reactor starts.
        let mut inboxes = Vec::new();
        for _ in &plans {
            let (tx, rx) = crossbeam_channel::bounded::<HostMsg>(HOST_INBOX);
            let waker = host_waker().map_err(|e| format!("eventfd: {e}"))?;
            inboxes.push((tx, rx, waker));
        }
        let core_devices: Vec<CoreDevicePlan> = plans
            .iter()
            .enumerate()
            .map(|(i, p)| CoreDevicePlan {
                dev: i as u16,
                name: p.name.clone(),
                bdev: p.bdev.clone(),
                cache_percent: p.cache_percent,
                volumes: p
                    .volumes
                    .iter()
                    .map(|v| (v.id, v.san.clone(), v.size_bytes, gates.get(&v.id).cloned()))
                    .collect(),
                to_host: inboxes[i].0.clone(),
                host_waker: inboxes[i].2.clone(),
            })
            .collect();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let core = config.destage.core;
        let idle_poll = Duration::from_micros(config.destage.idle_poll_us);
        let (waker2, stop2) = (destage_waker.clone(), stop.clone());
        let san_timeout = Duration::from_millis(config.destage.san_timeout_ms);
        let outages: SanOutages = Arc::new(Mutex::new(HashMap::new()));
        let outages2 = outages.clone();
        let thread = std::thread::Builder::new()
            .name("destage".into())
            .spawn(move || {
                if let Some(c) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                        warn!("destage core: could not pin to core {c}; running unpinned");
                    }
                }
                let inbox = CoreInbox { data: destage_rx, control: control_rx };
                match DestageCore::build(core_devices, inbox, waker2, stop2, idle_poll, san_timeout, outages2) {
                    Ok((mut core, found)) => {
                        let _ = ready_tx.send(Ok(found));
                        core.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the destage core: {e}"))?;
        let found: Vec<Vec<SanFound>> = match ready_rx.recv() {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err("the destage core died while starting".into());
            }
        };
        let log_full_wait_ns = config.destage.log_full_wait_ms.saturating_mul(1_000_000);
        // Host commands that need the SAN wait at most twice its command deadline (plus one
        // deadline for a command in flight then): answered well within a host's own timeout.
        let host_san_wait_ns = 2 * config.destage.san_timeout_ms.saturating_mul(1_000_000);
        let (link_down_tx, link_down_rx) = crossbeam_channel::unbounded();
        let mut volumes = Vec::new();
        let mut devices = Vec::new();
        let mut host_plans = Vec::new();
        let mut locks = Vec::new();
        for (i, (p, (tx, rx, waker))) in plans.into_iter().zip(inboxes).enumerate() {
            let mut specs = Vec::new();
            let mut names = HashMap::new();
            for (v, f) in p.volumes.iter().zip(&found[i]) {
                debug_assert_eq!(v.id, f.id);
                names.insert(v.id, (v.export.clone(), san_label(&v.san)));
                volumes.push(VolumeInfo {
                    id: VolumeId(v.id),
                    dev: i as u16,
                    blocks: f.blocks,
                    export: v.export.clone(),
                    standby: false,
                });
                specs.push(VolumeSpec {
                    id: VolumeId(v.id),
                    epoch: Epoch(1),
                    blocks: f.blocks,
                    policy: v.policy,
                    read_cache: v.read_cache,
                    unmap: f.unmap,
                    replicas: v.replicas.clone(),
                    source: None,
                });
            }
            let (format, device_id) = match &p.probe {
                Probe::Formatted(sb) => (false, sb.device_id),
                _ => (true, new_device_id(&p.path)),
            };
            let cfg = EngineConfig {
                device_id,
                cache_percent: p.cache_percent,
                log_full_wait_ns,
                san_timeout_ns: host_san_wait_ns,
                gate_timeout_ns: host_san_wait_ns,
                // In a cluster the record says which copies are in sync (`cluster.rs` confirms).
                confirm_copies: config.cluster.is_some() && crate::config::CLUSTER_BUILT,
                ..EngineConfig::default()
            };
            let ready = Arc::new(Ready::default());
            devices.push(DeviceHandle {
                name: p.name.clone(),
                path: p.path.clone(),
                tx,
                waker: waker.clone(),
                ready: ready.clone(),
                volumes: specs.iter().map(|s| s.id).collect(),
                failed: p.failed.clone(),
            });
            host_plans.push(Some(HostPlan {
                dev: i as u16,
                name: p.name,
                path: p.path,
                owner: i % reactors,
                bdev: p.bdev,
                cfg,
                specs,
                format,
                names,
                inbox: rx,
                waker,
                to_destage: to_destage.clone(),
                destage_waker: destage_waker.clone(),
                ready,
                link_down: Some(link_down_tx.clone()),
            }));
            locks.push(p.lock);
        }
        Ok(Some(Arc::new(VolumeService {
            volumes,
            devices,
            plans: Mutex::new(host_plans),
            _locks: locks,
            destage_waker,
            stop,
            thread: Mutex::new(Some(thread)),
            started: Instant::now(),
            next_route: AtomicU32::new(1),
            replica_dev,
            link_down: Mutex::new(Some(link_down_rx)),
            outages,
            control,
            gates,
            rescue_gates: Mutex::new(HashMap::new()),
            san_initiator: config
                .node
                .as_ref()
                .map_or(crate::config::DEFAULT_INITIATOR_IQN, |n| n.san_initiator())
                .to_string(),
        })))
    }

    /// The devices reactor `reactor` owns, for it to build their engines (taken once).
    pub(crate) fn take_plans(&self, reactor: usize) -> Vec<HostPlan> {
        let Ok(mut plans) = self.plans.lock() else { return Vec::new() };
        plans.iter_mut().filter(|p| p.as_ref().is_some_and(|p| p.owner == reactor)).filter_map(|p| p.take()).collect()
    }

    /// Waits until every device's engine is ready (formatted, or its log replayed), logging
    /// progress; the first failure ends the wait.
    pub fn wait_ready(&self) -> Result<(), String> {
        let start = Instant::now();
        for d in &self.devices {
            loop {
                match d.ready.wait(Duration::from_secs(2)) {
                    Some(Ok(line)) => {
                        info!("{line}");
                        break;
                    }
                    Some(Err(e)) => return Err(e),
                    None => info!(
                        "flash {} ({}): still recovering after {:.0} s",
                        d.name,
                        d.path.display(),
                        start.elapsed().as_secs_f64()
                    ),
                }
            }
        }
        Ok(())
    }

    /// The channel of "link down" reports (once).
    pub(crate) fn take_link_down(&self) -> Option<Receiver<(stager_policy::LinkId, String)>> {
        self.link_down.lock().ok().and_then(|mut l| l.take())
    }

    pub(crate) fn device(&self, dev: u16) -> Option<&DeviceHandle> {
        self.devices.get(dev as usize)
    }

    pub fn status(&self) -> Result<NodeStatus, String> {
        let mut devices = Vec::new();
        for d in &self.devices {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !d.send(HostMsg::Status { reply: tx }) {
                return Err(format!("flash {}: its reactor is not running", d.name));
            }
            let s = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?;
            devices.push(s);
        }
        if let Ok(outages) = self.outages.lock() {
            for v in devices.iter_mut().flat_map(|d| d.volumes.iter_mut()) {
                if let Some(o) = outages.get(&v.id) {
                    v.san_reachable = false;
                    v.san_unreachable_since_unix_s =
                        o.since.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs_f64());
                    v.san_unreachable_for_s = Some(o.started.elapsed().as_secs_f64());
                    v.san_last_error = Some(o.why.clone());
                }
            }
        }
        Ok(NodeStatus { pid: std::process::id(), uptime_s: self.started.elapsed().as_secs_f64(), devices })
    }

    /// An operator accepts that a volume's lost blocks (log damage) are gone: reads of them
    /// return the SAN's data again. Returns a line saying what happened.
    pub fn accept_loss(&self, volume: u32) -> Result<String, String> {
        let Some(d) = self.devices.iter().find(|d| d.volumes.contains(&VolumeId(volume))) else {
            return Err(format!("no volume {volume} on this node"));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::AcceptLoss { volume: VolumeId(volume), reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// The cluster's record names the replicas of `volume` that were in sync at copies
    /// `generation` (read from `status`): held write acknowledgements go out unless the copies
    /// changed again since. Returns how many went out.
    pub fn confirm_copies(&self, volume: u32, generation: u64) -> Result<usize, String> {
        let Some(d) = self.devices.iter().find(|d| d.volumes.contains(&VolumeId(volume))) else {
            return Err(format!("no volume {volume} on this node"));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::ConfirmCopies { volume: VolumeId(volume), generation, reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// Lets go of the copy of `volume` this node keeps for another node (the cluster gave the
    /// role away, see `Engine::discard_copy`); returns the bytes let go.
    pub fn discard_copy(&self, volume: u32) -> Result<u64, String> {
        let d = self.replica_dev.and_then(|dev| self.devices.get(dev as usize)).ok_or("no flash device for copies")?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::DiscardCopy { volume: VolumeId(volume), reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// Starts destaging the copy of `volume` this node keeps, to the SAN its record names
    /// (`san`, as `file:PATH` or an iSCSI URL): the volume's owner was lost and the cluster
    /// chose this copy. Does not wait: the destage core opens the SAN (a login) behind a gate
    /// open until `until` (this node's lease deadline; [`VolumeService::open_san_gate`] keeps
    /// it open), then tells the device's engine to rescue the copy (`Engine::rescue_copy`).
    /// Status shows the copy's rescue once it runs; a SAN that does not open is logged there.
    pub fn rescue_copy(&self, volume: u32, san: &str, until: Instant) -> Result<(), String> {
        let dev = self.replica_dev.ok_or("no flash device keeps copies here")?;
        let cfg = san_config_of(san, &self.san_initiator)?;
        let gate = {
            let mut gates = self.rescue_gates.lock().map_err(|_| "rescue gates poisoned")?;
            gates.entry(volume).or_insert_with(SanGate::closed).clone()
        };
        gate.open_until(Some(until));
        if self.control.try_send(CoreControl::RescueCopy { dev, volume, san: cfg, gate }).is_err() {
            return Err("the destage core is busy or gone".into());
        }
        wake(&self.destage_waker.efd);
        Ok(())
    }

    /// While this node was taken for gone, a replica destaged `volume` up to `upto` (the
    /// record's `rescued_upto`): the destager skips past it (its held SAN commands failed, its
    /// batches up to there dropped), then the engine absorbs it (`Engine::absorb_rescue`).
    /// Call it with the volume's SAN gate closed. Returns the write acknowledgements failed.
    /// `served`: another node served the volume meanwhile, so every entry of this node's log
    /// is skipped, not only those up to `upto` (`Engine::absorb_rescue`).
    pub fn absorb_rescue(&self, volume: u32, upto: u64, served: bool) -> Result<usize, String> {
        let Some(dev) = self.devices.iter().position(|d| d.volumes.contains(&VolumeId(volume))) else {
            return Err(format!("no volume {volume} on this node"));
        };
        let upto = if served {
            let d = &self.devices[dev];
            let (tx, rx) = crossbeam_channel::bounded(1);
            if !d.send(HostMsg::LastSeq { volume: VolumeId(volume), reply: tx }) {
                return Err(format!("flash {}: its reactor is not running", d.name));
            }
            let last = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?;
            upto.max(last.map_or(0, |s| s.0))
        } else {
            upto
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.control.try_send(CoreControl::Skip { dev: dev as u16, volume, upto, reply: tx }).is_err() {
            return Err("the destage core is busy or gone".into());
        }
        wake(&self.destage_waker.efd);
        let dropped = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the destage core did not answer")?;
        let d = &self.devices[dev];
        let (tx, rx) = crossbeam_channel::bounded(1);
        let msg =
            HostMsg::AbsorbRescue { volume: VolumeId(volume), upto: stager_policy::LogSeq(upto), served, reply: tx };
        if !d.send(msg) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        let failed = rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))??;
        info!(volume, upto, "rescue absorbed: {} of batches dropped at the destager", human_bytes(dropped));
        Ok(failed)
    }

    /// Ends the rescue of a copy (the cluster no longer needs it): its gate closes, and the
    /// copy takes its source's links again. `abort`: the rescue moved to another node before
    /// this one was done — whatever this node's destager still had of it is dropped and its
    /// held SAN commands failed, so nothing of it reaches the SAN any more; the copy keeps
    /// what was not destaged.
    pub fn end_rescue(&self, volume: u32, abort: bool) -> Result<(), String> {
        let dev = self.replica_dev.ok_or("no flash device for copies")?;
        let d = self.devices.get(dev as usize).ok_or("no flash device for copies")?;
        if let Some(g) = self.rescue_gates.lock().ok().and_then(|g| g.get(&volume).cloned()) {
            g.close();
        }
        if abort {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if self.control.try_send(CoreControl::Skip { dev, volume, upto: u64::MAX, reply: tx }).is_err() {
                return Err("the destage core is busy or gone".into());
            }
            wake(&self.destage_waker.efd);
            rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the destage core did not answer")?;
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::EndRescue { volume: VolumeId(volume), abort, reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// Fault injection for failure drills and tests: flash device `name` fails every command
    /// from now on, as if it died (`FailableDevice`); only a restart undoes it.
    pub fn fail_flash(&self, name: &str) -> Result<String, String> {
        let d = self.devices.iter().find(|d| d.name == name).ok_or_else(|| format!("no flash device {name} here"))?;
        if d.failed.swap(true, Ordering::Relaxed) {
            return Ok(format!("flash {name} has failed already"));
        }
        tracing::error!(
            "flash {name} ({}): failed by request (fault injection): every command to it fails from now on, until \
             stagerd restarts",
            d.path.display()
        );
        Ok(format!("flash {name}: every command to it fails from now on (until stagerd restarts)"))
    }

    /// Serves (`on`) or stops serving the rescued copy of `volume` kept here to hosts, through
    /// a `kind: standby` namespace (`Engine::serve_copy`). Returns the host commands the copy
    /// still holds (once stopped, 0 means none will reach the SAN from here any more).
    /// `blocks`: the standby namespace's size, which must be the volume's.
    pub fn serve_copy(&self, volume: u32, on: bool, blocks: Option<u64>) -> Result<usize, String> {
        let dev = self.replica_dev.ok_or("no flash device keeps copies here")?;
        let d = self.devices.get(dev as usize).ok_or("no flash device for copies")?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::ServeCopy { volume: VolumeId(volume), on, blocks, reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// In a cluster: lets this node write `volume`'s SAN (its own volume, or a copy it
    /// rescues) until `until` (`None`: for good), or closes it (`Some` deadline in the past).
    /// Outside a cluster volumes have no gate and this does nothing.
    pub fn open_san_gate(&self, volume: u32, until: Option<Instant>) {
        if let Some(g) = self.gates.get(&volume) {
            g.open_until(until);
        } else if let Some(g) = self.rescue_gates.lock().ok().and_then(|g| g.get(&volume).cloned()) {
            g.open_until(until);
        }
    }

    /// In a cluster: this node may not write `volume`'s SAN (see [`VolumeService::open_san_gate`]).
    pub fn close_san_gate(&self, volume: u32) {
        if let Some(g) = self.gates.get(&volume) {
            g.close();
        }
    }

    /// Changes a volume's requested policy live; returns a line saying what happened.
    pub fn set_policy(&self, volume: u32, policy: WritePolicy, copies: Option<usize>) -> Result<String, String> {
        let Some(d) = self.devices.iter().find(|d| d.volumes.contains(&VolumeId(volume))) else {
            return Err(format!("no volume {volume} on this node"));
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !d.send(HostMsg::SetPolicy { volume: VolumeId(volume), policy, copies, reply: tx }) {
            return Err(format!("flash {}: its reactor is not running", d.name));
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| format!("flash {}: no answer", d.name))?
    }

    /// Stops the destage core (after the reactors: the engines are gone). Dirty data stays in
    /// the flash logs; the next start replays and destages it.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        wake(&self.destage_waker.efd);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = handle {
            let _ = t.join();
        }
    }
}

/// A volume's SAN outage as the destage core saw it (status shows it): since when, and the
/// latest reason its client gives. Written by the destage core on reachability changes and
/// once a second during an outage, read by the management thread: never on the I/O path.
#[derive(Clone, Debug)]
pub(crate) struct SanOutage {
    pub since: std::time::SystemTime,
    pub started: Instant,
    pub why: String,
}

pub(crate) type SanOutages = Arc<Mutex<HashMap<u32, SanOutage>>>;

/// A volume's SAN as the destage core opens it: id, SAN, configured size, the cluster's gate.
type CoreVolumePlan = (u32, SanConfig, Option<u64>, Option<Arc<SanGate>>);

/// What the destage core needs of a device.
struct CoreDevicePlan {
    dev: u16,
    name: String,
    bdev: Arc<dyn BlockDevice>,
    cache_percent: u32,
    volumes: Vec<CoreVolumePlan>,
    to_host: Sender<HostMsg>,
    host_waker: Arc<Waker>,
}

struct CoreDevice {
    name: String,
    destager: Destager,
    volumes: Vec<VolumeId>,
    to_host: Sender<HostMsg>,
    host_waker: Arc<Waker>,
    /// Messages the host's inbox had no room for yet.
    backlog: VecDeque<FromDestage>,
    out: Vec<FromDestage>,
    events: Vec<DestageEvent>,
}

/// A request to the destage core from another thread.
pub(crate) enum CoreControl {
    /// Open `san` for `volume` (a copy on device `dev` this node now destages itself) behind
    /// `gate`, give it to that device's destager,
    /// and then have the device's engine rescue the copy (`HostMsg::RescueCopy`).
    RescueCopy { dev: u16, volume: u32, san: SanConfig, gate: Arc<SanGate> },
    /// Another node destaged `volume` (on device `dev`) up to `upto`: `Destager::skip_to`.
    Skip { dev: u16, volume: u32, upto: u64, reply: Sender<u64> },
}

/// What the destage core receives: the engines' messages, and control requests.
struct CoreInbox {
    data: Receiver<(u16, ToDestage)>,
    control: Receiver<CoreControl>,
}

struct DestageCore {
    devices: Vec<CoreDevice>,
    ring: Rc<SharedRing>,
    inbox: Receiver<(u16, ToDestage)>,
    control: Receiver<CoreControl>,
    san_timeout: Duration,
    waker: Arc<Waker>,
    /// The eventfd read lands here; boxed so its address is stable while the read is armed.
    wake_buf: Box<[u8; 8]>,
    foreign: Vec<(u64, i32)>,
    stop: Arc<AtomicBool>,
    idle_poll: Duration,
    clock: MonotonicClock,
    outages: SanOutages,
}

impl DestageCore {
    fn build(
        plans: Vec<CoreDevicePlan>,
        inbox: CoreInbox,
        waker: Arc<Waker>,
        stop: Arc<AtomicBool>,
        idle_poll: Duration,
        san_timeout: Duration,
        outages: SanOutages,
    ) -> Result<(DestageCore, Vec<Vec<SanFound>>), String> {
        let ring = SharedRing::new().map_err(|e| format!("destage core: io_uring: {e}"))?;
        let mut devices = Vec::new();
        let mut found_all = Vec::new();
        for p in plans {
            let size = p.bdev.info().size_bytes();
            let layout = Layout::for_device(size, p.cache_percent)
                .ok_or_else(|| format!("flash {}: {size} bytes is too small for a log", p.name))?;
            let mut sans: Vec<(VolumeId, Box<dyn San>)> = Vec::new();
            let mut found = Vec::new();
            for (id, san_cfg, size_bytes, gate) in &p.volumes {
                let mut san = open_san(*id, san_cfg, san_timeout, &ring)?;
                if let Some(gate) = gate {
                    san = Box::new(GatedSan::new(san, gate.clone(), san_timeout));
                }
                let san_bytes = san.size_bytes();
                let bytes = size_bytes.unwrap_or(san_bytes);
                if bytes > san_bytes {
                    return Err(format!(
                        "volume {id}: size {} is larger than its SAN ({})",
                        human_bytes(bytes),
                        human_bytes(san_bytes)
                    ));
                }
                let blocks = bytes / stager_policy::constants::BLOCK_SIZE_U64;
                if blocks == 0 {
                    return Err(format!("volume {id}: its SAN holds less than one 4 KiB block"));
                }
                found.push(SanFound { id: *id, blocks, unmap: san.unmap_reads_zeroes() });
                sans.push((VolumeId(*id), san));
            }
            let reader = BdevPort::new(p.bdev.clone(), ring.clone()).map_err(|e| format!("flash {}: {e}", p.name))?;
            let volumes = sans.iter().map(|(id, _)| *id).collect();
            devices.push(CoreDevice {
                name: p.name,
                destager: Destager::new(layout, Box::new(reader), sans),
                volumes,
                to_host: p.to_host,
                host_waker: p.host_waker,
                backlog: VecDeque::new(),
                out: Vec::new(),
                events: Vec::new(),
            });
            let _ = p.dev;
            found_all.push(found);
        }
        let mut core = DestageCore {
            devices,
            ring,
            inbox: inbox.data,
            control: inbox.control,
            san_timeout,
            waker,
            wake_buf: Box::new([0; 8]),
            foreign: Vec::new(),
            stop,
            idle_poll,
            clock: MonotonicClock::new(),
            outages,
        };
        core.arm_wake();
        Ok((core, found_all))
    }

    fn arm_wake(&mut self) {
        let e =
            io_uring::opcode::Read::new(io_uring::types::Fd(self.waker.efd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(stager_nvme::uring::user_data(stager_nvme::uring::kind::WAKE, 0, 0));
        self.ring.ring.borrow_mut().push(e);
    }

    /// Re-arms the wake-up read if its completion came in.
    fn reap_foreign(&mut self) {
        self.ring.take_foreign(&mut self.foreign);
        let woke =
            self.foreign.drain(..).any(|(ud, _)| stager_nvme::uring::split(ud).0 == stager_nvme::uring::kind::WAKE);
        if woke {
            self.arm_wake();
        }
    }

    /// Carries out a control request (blocking: opening a SAN logs in to it).
    fn on_control(&mut self, c: CoreControl) {
        match c {
            CoreControl::RescueCopy { dev, volume, san, gate } => {
                let Some(d) = self.devices.get_mut(dev as usize) else { return };
                if !d.volumes.contains(&VolumeId(volume)) {
                    match open_san(volume, &san, self.san_timeout, &self.ring) {
                        Ok(s) => {
                            info!(volume, "SAN {} opened to destage a copy kept here", san_label(&san));
                            d.destager.add_volume(VolumeId(volume), Box::new(GatedSan::new(s, gate, self.san_timeout)));
                            d.volumes.push(VolumeId(volume));
                        }
                        Err(e) => {
                            return error!(
                                "volume {volume}: cannot open its SAN to destage the copy kept here \
                                 (the cluster thread asks again): {e}"
                            )
                        }
                    }
                }
                // The engine answers nobody: status shows the copy's rescue once it runs.
                let (reply, _) = crossbeam_channel::bounded(1);
                match d.to_host.try_send(HostMsg::RescueCopy { volume: VolumeId(volume), reply }) {
                    Ok(()) => d.host_waker.wake_if_sleeping(),
                    Err(_) => warn!("volume {volume}: flash {}'s inbox is full; the cluster thread asks again", d.name),
                }
            }
            CoreControl::Skip { dev, volume, upto, reply } => {
                let dropped = match self.devices.get_mut(dev as usize) {
                    Some(d) => d.destager.skip_to(VolumeId(volume), stager_policy::LogSeq(upto)),
                    None => 0,
                };
                let _ = reply.send(dropped);
            }
        }
    }

    fn poll(&mut self, now: u64) -> usize {
        let mut work = 0;
        while let Ok(c) = self.control.try_recv() {
            work += 1;
            self.on_control(c);
        }
        while let Ok((dev, msg)) = self.inbox.try_recv() {
            work += 1;
            match self.devices.get_mut(dev as usize) {
                Some(d) => d.destager.on_message(msg, now),
                None => error!("destage core: message for unknown device {dev}"),
            }
        }
        for d in &mut self.devices {
            work += d.destager.poll(now);
            d.destager.drain_outbox(&mut d.out);
            d.backlog.extend(d.out.drain(..));
            let mut sent = false;
            while let Some(m) = d.backlog.pop_front() {
                match d.to_host.try_send(HostMsg::Destage(m)) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(HostMsg::Destage(m))) => {
                        d.backlog.push_front(m);
                        break;
                    }
                    Err(_) => {
                        d.backlog.clear();
                        break;
                    }
                }
            }
            if sent {
                d.host_waker.wake_if_sleeping();
            }
            d.destager.drain_events(&mut d.events);
            for e in d.events.drain(..) {
                match e {
                    DestageEvent::BatchDestaged { .. } => {}
                    DestageEvent::SanUnreachable { volume } => {
                        let why = d.destager.san_outage(volume).unwrap_or_else(|| "a SAN command failed".into());
                        warn!("{volume}: SAN unreachable ({why}); dirty data stays in flash, retrying with back-off");
                        if let Ok(mut o) = self.outages.lock() {
                            o.entry(volume.0).or_insert(SanOutage {
                                since: std::time::SystemTime::now(),
                                started: Instant::now(),
                                why,
                            });
                        }
                    }
                    DestageEvent::SanReachable { volume } => {
                        let gone = self.outages.lock().ok().and_then(|mut o| o.remove(&volume.0));
                        let after = gone.map(|o| format!(" after {:.1} s", o.started.elapsed().as_secs_f64()));
                        info!("{volume}: SAN reachable again{}; destage resumes", after.unwrap_or_default())
                    }
                    DestageEvent::LogReadFailed { volume, error } => {
                        error!("{volume}: cannot read dirty data back from flash {}: {error}; retrying", d.name)
                    }
                }
            }
        }
        work
    }

    /// Keeps each outage's reason current for status (a dead SAN's "no answer within 5000 ms"
    /// becomes "connection refused" once it is known to be gone).
    fn refresh_outages(&self) {
        let Ok(mut o) = self.outages.lock() else { return };
        if o.is_empty() {
            return;
        }
        for d in &self.devices {
            for id in &d.volumes {
                if let (Some(entry), Some(why)) = (o.get_mut(&id.0), d.destager.san_outage(*id)) {
                    entry.why = why;
                }
            }
        }
    }

    fn log_progress(&self) {
        for d in &self.devices {
            for id in &d.volumes {
                let (Some(r), Some(pending)) = (d.destager.report(*id), d.destager.pending_bytes(*id)) else {
                    continue;
                };
                if pending > 0 || !r.reachable {
                    info!(
                        "{id}: {} to destage, destaging {}/s (depth {}), SAN latency {:.0} µs{}",
                        human_bytes(pending),
                        human_bytes(r.destage_rate_bytes_per_s as u64),
                        r.destage_depth,
                        r.latency_ns_ewma / 1000.0,
                        if r.reachable { "" } else { ", SAN UNREACHABLE" }
                    );
                }
            }
        }
    }

    fn run(&mut self) {
        info!("destage core running ({} flash device(s))", self.devices.len());
        let mut last_work = Instant::now();
        let mut last_progress = Instant::now();
        let mut last_outage_refresh = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            let now_ns = self.clock.now_ns();
            let work = self.poll(now_ns);
            self.reap_foreign();
            let now = Instant::now();
            if work > 0 {
                last_work = now;
            }
            if self.stop.load(Ordering::SeqCst) && stopping.is_none() {
                stopping = Some(now);
            }
            if let Some(since) = stopping {
                let busy = self.devices.iter().any(|d| d.destager.io_in_flight());
                if !busy || since.elapsed() > STOP_DRAIN {
                    if busy {
                        warn!("destage core: stopping with device I/O still in flight");
                    }
                    info!("destage core stopped");
                    return;
                }
            }
            if now.duration_since(last_progress) > PROGRESS_EVERY {
                last_progress = now;
                self.log_progress();
            }
            if now.duration_since(last_outage_refresh) > OUTAGE_REFRESH_EVERY {
                last_outage_refresh = now;
                self.refresh_outages();
            }
            // Spin only while its own I/O is out and something waits on it (`Destager::hurried`:
            // host SAN commands, urgent destaging). Otherwise spinning takes a shared core from
            // the hosts' reactors (or local hosts) for a wake-up saved where nobody waits.
            let waiting = self.devices.iter().any(|d| d.destager.io_in_flight() && d.destager.hurried());
            if waiting && now.duration_since(last_work) < self.idle_poll {
                continue;
            }
            // Sleep until a device, a SAN socket or a message completes into the ring.
            self.waker.sleeping.store(true, Ordering::SeqCst);
            if self.inbox.is_empty() && self.control.is_empty() && !self.stop.load(Ordering::SeqCst) {
                self.ring.wait(IDLE_SLEEP);
            }
            self.waker.sleeping.store(false, Ordering::SeqCst);
        }
    }
}

/// Reads a flash device as it is, before start-up extends or formats anything, and refuses a
/// start that would destroy or misread what it holds: a device smaller than its superblock's
/// layout (a truncated file), a configuration that lays it out differently from its format, a
/// blank superblock over a log area that holds frames. A refused start changes nothing.
fn check_before_start(f: &crate::config::FlashConfig, device: &DeviceSpec) -> Result<(), String> {
    let label = device.label();
    let as_is = match device {
        DeviceSpec::File { path, block_size, direct, .. } => {
            match std::fs::metadata(path) {
                // An empty or new file holds nothing; it is created and formatted.
                Ok(m) if m.is_file() && m.len() < 2 * stager_policy::constants::BLOCK_SIZE_U64 => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(format!("cannot read its size: {e}")),
            }
            DeviceSpec::File { path: path.clone(), size_bytes: None, block_size: *block_size, direct: *direct }
        }
        other => other.clone(),
    };
    let dev = open_flash_device(&as_is).map_err(|e| format!("cannot open: {e}"))?;
    let size = dev.info().size_bytes();
    match probe_superblock(&*dev).map_err(|e| format!("cannot read its superblock: {e}"))? {
        Probe::Damaged(_) => Ok(()), // refused below with the superblock's own error
        Probe::Formatted(sb) => {
            check_fits_superblock(&sb, size)?;
            let target = f.size.unwrap_or(size);
            let have = Layout {
                log_start: sb.log_start,
                log_bytes: sb.log_bytes,
                cache_start: sb.cache_start,
                cache_slots: sb.cache_slots,
            };
            if Layout::for_device(target, f.cache_percent) != Some(have) {
                return Err(format!(
                    "it was formatted (device {:#x}) with a {} MiB log and {} cache slots, but `size: {}` and \
                     `cache_percent: {}` lay it out differently; a layout is fixed when a device is formatted. \
                     Put the keys back as they were (the file is {size} bytes), or destage it (`stagerctl flash \
                     destage {label} --config FILE`) and wipe it (`stagerctl flash wipe {label}`). Nothing was changed",
                    sb.device_id,
                    sb.log_bytes >> 20,
                    sb.cache_slots,
                    f.size.map_or_else(|| "(the device's)".to_string(), |s| s.to_string()),
                    f.cache_percent,
                ));
            }
            Ok(())
        }
        Probe::Blank => match scan_for_frames(&*dev).map_err(|e| format!("cannot read its log area: {e}"))? {
            None => Ok(()),
            Some(found) => Err(format!(
                "its superblock is blank but its log area holds {} log frame(s) of device {:#x}: the superblock \
                 was overwritten and formatting would destroy acknowledged writes that may not be on the SAN. \
                 Nothing was changed. Keep the device aside; if its data is not needed, `stagerctl flash wipe \
                 {label} --force` makes it blank",
                found.frames, found.device_id
            )),
        },
    }
}
