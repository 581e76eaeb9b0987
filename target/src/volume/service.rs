//! The destage reactor: one thread per node (DESIGN.md, "Runtime model") that owns the
//! write-back engine of every flash device — log writes, the read cache, destage to the SANs,
//! recovery at start. The engine is single-owner and `!Send`, so everything it touches (flash
//! ports, SAN sessions, the engine itself) is built on this thread and never leaves it.
//!
//! Front-end reactors reach it only by messages: a [`VolumeChannel`](super::channel) sends each
//! host command as an [`EngineMsg::Io`] over a crossbeam channel (which also wakes this thread
//! when it sleeps); completions go back on the channel's own reply queue plus an eventfd that
//! the front-end reactor has armed in its io_uring, so a sleeping reactor wakes at once.
//!
//! Polling is adaptive like the front-end reactors': spin while there was work within
//! `destage.idle_poll_us`, then sleep in `io_uring_enter` on the reactor's one ring
//! ([`SharedRing`]), which every flash and SAN file I/O, every iSCSI socket poll and the
//! message eventfd complete into — so whichever comes first wakes it. Senders write that eventfd
//! only while the reactor says it sleeps (an atomic flag checked after queueing), so a busy
//! reactor costs them no system call. The sleep is capped at `IDLE_SLEEP` for the engine's
//! timers (back-off retries, the degraded cool-down).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use stager_nvme::bdev::DeviceSpec;
use stager_policy::io::MonotonicClock;
use stager_policy::{
    Clock, Engine, EngineConfig, EngineEvent, EngineState, HostDone, HostOp, LogFullPolicy, San, Status, VolumeId,
    VolumeSpec, WritePolicy,
};
use tracing::{error, info, warn};

use super::devices::{open_flash_device, probe_superblock, BdevPort, OwnerLock, Probe, SharedRing};
use super::status::{human_bytes, DeviceStatus, NodeStatus};
use crate::config::{BackendConfig, Config, SanConfig};
use crate::reactor::{new_eventfd, wake};

/// Longest sleep of an idle destage reactor.
const IDLE_SLEEP: Duration = Duration::from_millis(5);
/// How often the reactor logs destage progress while a volume has dirty data.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// How long stop waits for in-flight host commands and device I/O.
const STOP_DRAIN: Duration = Duration::from_secs(10);

/// One reply to a front-end channel.
pub(crate) struct Reply {
    pub token: u32,
    pub status: Status,
    pub data: Vec<u8>,
}

/// Where a front-end channel's replies go, and the eventfd that wakes its reactor.
pub(crate) struct ReplyPort {
    pub tx: Sender<Reply>,
    pub efd: OwnedFd,
}

pub(crate) enum EngineMsg {
    Register { port: u32, reply: Arc<ReplyPort> },
    Unregister { port: u32 },
    Io { dev: u16, volume: VolumeId, port: u32, token: u32, op: HostOp },
    SetPolicy { volume: u32, policy: WritePolicy, reply: Sender<Result<String, String>> },
    Status { reply: Sender<NodeStatus> },
    Stop,
}

/// A volume as the front end sees it.
#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub dev: u16,
    pub blocks: u64,
    pub export: String,
}

/// How the destage reactor is woken from its sleep in `io_uring_enter`.
pub(crate) struct Waker {
    efd: OwnedFd,
    /// Set by the reactor just before it sleeps; senders write the eventfd only then.
    sleeping: AtomicBool,
}

/// The handle the rest of stagerd keeps: send messages, ask for status, stop.
pub struct VolumeService {
    tx: Sender<EngineMsg>,
    waker: Arc<Waker>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    pub volumes: Vec<VolumeInfo>,
    pub(crate) next_port: std::sync::atomic::AtomicU32,
}

/// What the reactor builds, gathered from the configuration on the caller's thread.
struct FlashPlan {
    name: String,
    /// How logs and status name the device (its path, or `vfio:ADDRESS`).
    path: PathBuf,
    device: DeviceSpec,
    cache_percent: u32,
    volumes: Vec<VolumePlan>,
}

struct VolumePlan {
    id: u32,
    export: String,
    policy: WritePolicy,
    read_cache: bool,
    san: SanConfig,
    size_bytes: Option<u64>,
}

impl VolumeService {
    /// Starts the destage reactor if the configuration has volumes: opens and locks the flash
    /// devices, connects the SANs, formats new devices or recovers existing logs, and returns
    /// once every engine is ready (or with the first reason one cannot be).
    pub fn start(config: &Config) -> Result<Option<Arc<VolumeService>>, String> {
        let mut plans: Vec<FlashPlan> = config
            .flash
            .iter()
            .map(|f| FlashPlan {
                name: f.name.clone(),
                path: PathBuf::from(f.device().label()),
                device: f.device(),
                cache_percent: f.cache_percent,
                volumes: Vec::new(),
            })
            .collect();
        for s in &config.subsystems {
            for n in &s.namespaces {
                if let BackendConfig::Volume { id, flash, policy, read_cache, san, size_bytes } = &n.backend {
                    let Some(p) = plans.iter_mut().find(|p| &p.name == flash) else {
                        return Err(format!("volume {id}: no flash device named {flash}"));
                    };
                    p.volumes.push(VolumePlan {
                        id: *id,
                        export: format!("{}/{}", s.nqn, n.nsid),
                        policy: *policy,
                        read_cache: *read_cache,
                        san: san.clone(),
                        size_bytes: *size_bytes,
                    });
                }
            }
        }
        plans.retain(|p| {
            if p.volumes.is_empty() {
                warn!("flash {} ({}) has no volumes; not opened", p.name, p.path.display());
            }
            !p.volumes.is_empty()
        });
        if plans.is_empty() {
            return Ok(None);
        }
        let core = config.destage.core;
        let idle_poll = Duration::from_micros(config.destage.idle_poll_us);
        let log_full = LogFullPolicy::Wait { timeout_ns: config.destage.log_full_wait_ms.saturating_mul(1_000_000) };
        let (tx, rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let efd = new_eventfd().map_err(|e| format!("destage reactor: eventfd: {e}"))?;
        let waker = Arc::new(Waker { efd, sleeping: AtomicBool::new(false) });
        let waker2 = waker.clone();
        let thread = std::thread::Builder::new()
            .name("destage".into())
            .spawn(move || {
                if let Some(c) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                        warn!("destage reactor: could not pin to core {c}; running unpinned");
                    }
                }
                match Reactor::build(plans, rx, waker2, idle_poll, log_full) {
                    Ok(mut r) => {
                        let _ = ready_tx.send(Ok(r.volume_infos()));
                        r.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the destage reactor: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(volumes)) => Ok(Some(Arc::new(VolumeService {
                tx,
                waker,
                thread: std::sync::Mutex::new(Some(thread)),
                volumes,
                next_port: std::sync::atomic::AtomicU32::new(1),
            }))),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err("the destage reactor died while starting".into())
            }
        }
    }

    /// Queues a message and wakes the reactor if it sleeps; false once it has stopped.
    pub(crate) fn send(&self, msg: EngineMsg) -> bool {
        if self.tx.send(msg).is_err() {
            return false;
        }
        // SeqCst pairs with the reactor's store-then-check: either it sees our message before
        // sleeping, or we see its flag and wake it.
        if self.waker.sleeping.load(Ordering::SeqCst) {
            wake(&self.waker.efd);
        }
        true
    }

    pub fn status(&self) -> Result<NodeStatus, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.send(EngineMsg::Status { reply: tx }) {
            return Err("the destage reactor is not running".to_string());
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the destage reactor did not answer".to_string())
    }

    /// Changes a volume's requested policy live; returns a line saying what happened.
    pub fn set_policy(&self, volume: u32, policy: WritePolicy) -> Result<String, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.send(EngineMsg::SetPolicy { volume, policy, reply: tx }) {
            return Err("the destage reactor is not running".to_string());
        }
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| "the destage reactor did not answer".to_string())?
    }

    /// Lets in-flight work finish (bounded), then stops the reactor. Dirty data stays in the
    /// flash logs; the next start replays and destages it.
    pub fn stop(&self) {
        self.send(EngineMsg::Stop);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = handle {
            let _ = t.join();
        }
    }
}

struct Device {
    name: String,
    path: PathBuf,
    engine: Engine,
    /// Held while the engine owns the device.
    _lock: OwnerLock,
    /// (export, SAN description) per volume id.
    names: HashMap<u32, (String, String)>,
    blocks: HashMap<u32, u64>,
}

struct Reactor {
    devices: Vec<Device>,
    ring: Rc<SharedRing>,
    rx: Receiver<EngineMsg>,
    waker: Arc<Waker>,
    /// The eventfd read lands here; boxed so its address is stable while the read is armed.
    wake_buf: Box<[u8; 8]>,
    foreign: Vec<(u64, i32)>,
    ports: HashMap<u32, Arc<ReplyPort>>,
    idle_poll: Duration,
    clock: MonotonicClock,
    started: Instant,
    done: Vec<HostDone>,
    events: Vec<EngineEvent>,
    touched: Vec<u32>,
}

pub(crate) fn san_label(san: &SanConfig) -> String {
    match san {
        SanConfig::File { path, .. } => format!("file {}", path.display()),
        SanConfig::Iscsi { url, .. } => url.clone(),
    }
}

/// Opens (connects to) volume `id`'s SAN.
pub(crate) fn open_san(id: u32, san: &SanConfig, ring: &Rc<SharedRing>) -> Result<Box<dyn San>, String> {
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
            let port = BdevPort::new(dev, ring.clone()).map_err(|e| format!("volume {id}: SAN file: {e}"))?;
            Ok(Box::new(port))
        }
        #[cfg(feature = "iscsi")]
        SanConfig::Iscsi { url, initiator } => {
            let san = super::devices::IscsiSan::connect(url, initiator, ring.clone())
                .map_err(|e| format!("volume {id}: cannot reach its SAN: {e}"))?;
            info!(volume = id, "logged in to SAN {url} as {initiator}");
            Ok(Box::new(san))
        }
        #[cfg(not(feature = "iscsi"))]
        SanConfig::Iscsi { .. } => {
            let _ = ring;
            Err(format!(
                "volume {id}: its SAN is iSCSI, but this build has no `iscsi` feature \
                 (rebuild with --features stager-target/iscsi)"
            ))
        }
    }
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

impl Reactor {
    fn build(
        plans: Vec<FlashPlan>,
        rx: Receiver<EngineMsg>,
        waker: Arc<Waker>,
        idle_poll: Duration,
        log_full: LogFullPolicy,
    ) -> Result<Reactor, String> {
        let clock = MonotonicClock::new();
        let ring = SharedRing::new().map_err(|e| format!("destage reactor: io_uring: {e}"))?;
        let mut devices = Vec::new();
        for p in plans {
            let what = format!("flash {} ({})", p.name, p.path.display());
            let dev = open_flash_device(&p.device).map_err(|e| format!("{what}: cannot open: {e}"))?;
            let lock = OwnerLock::take_device(&p.device, true).map_err(|e| format!("{what}: {e}"))?;
            let probe = probe_superblock(&*dev).map_err(|e| format!("{what}: cannot read its superblock: {e}"))?;
            let mut specs = Vec::new();
            let mut names = HashMap::new();
            let mut blocks_of = HashMap::new();
            for v in &p.volumes {
                let san = open_san(v.id, &v.san, &ring)?;
                let san_bytes = san.size_bytes();
                let bytes = v.size_bytes.unwrap_or(san_bytes);
                if bytes > san_bytes {
                    return Err(format!(
                        "volume {}: size {} is larger than its SAN ({})",
                        v.id,
                        human_bytes(bytes),
                        human_bytes(san_bytes)
                    ));
                }
                let blocks = bytes / stager_policy::constants::BLOCK_SIZE_U64;
                if blocks == 0 {
                    return Err(format!("volume {}: its SAN holds less than one 4 KiB block", v.id));
                }
                names.insert(v.id, (v.export.clone(), san_label(&v.san)));
                blocks_of.insert(v.id, blocks);
                specs.push(VolumeSpec {
                    id: VolumeId(v.id),
                    epoch: stager_policy::Epoch(1),
                    blocks,
                    policy: v.policy,
                    read_cache: v.read_cache,
                    san,
                });
            }
            let port = BdevPort::new(dev, ring.clone()).map_err(|e| format!("{what}: {e}"))?;
            let mut cfg = EngineConfig { cache_percent: p.cache_percent, log_full, ..EngineConfig::default() };
            let engine = match probe {
                Probe::Blank => {
                    cfg.device_id = new_device_id(&p.path);
                    info!("{what}: no superblock; formatting as device {:#x}", cfg.device_id);
                    Engine::format(cfg, Box::new(port), specs)
                }
                Probe::Formatted(sb) => {
                    cfg.device_id = sb.device_id;
                    info!(
                        "{what}: device {:#x}, superblock generation {}; replaying its log",
                        sb.device_id, sb.generation
                    );
                    Engine::open(cfg, Box::new(port), specs)
                }
                Probe::Damaged(why) => {
                    return Err(format!(
                        "{what}: its superblock is damaged ({why}); refusing to format over it. \
                         `stagerctl flash inspect` shows what is there"
                    ))
                }
            }
            .map_err(|e| format!("{what}: {e}"))?;
            devices.push(Device { name: p.name, path: p.path, engine, _lock: lock, names, blocks: blocks_of });
        }
        let mut r = Reactor {
            devices,
            ring,
            rx,
            waker,
            wake_buf: Box::new([0; 8]),
            foreign: Vec::new(),
            ports: HashMap::new(),
            idle_poll,
            clock,
            started: Instant::now(),
            done: Vec::new(),
            events: Vec::new(),
            touched: Vec::new(),
        };
        r.wait_ready()?;
        r.arm_wake();
        Ok(r)
    }

    /// Drives format/recovery until every engine is ready, logging progress.
    fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        let mut last_log = Instant::now();
        loop {
            let now = self.clock.now_ns();
            let mut all_ready = true;
            let mut work = 0;
            for d in &mut self.devices {
                work += d.engine.poll(now);
                match d.engine.state() {
                    EngineState::Ready => {}
                    EngineState::Failed(why) => {
                        return Err(format!("flash {} ({}): cannot open its log: {why}", d.name, d.path.display()))
                    }
                    _ => all_ready = false,
                }
            }
            if all_ready {
                break;
            }
            if work == 0 {
                // Recovery reads one entry at a time: sleep until the flash answers.
                self.ring.wait(Duration::from_millis(1));
            }
            if last_log.elapsed() > Duration::from_secs(2) {
                info!("flash logs: still recovering after {:.0} s", start.elapsed().as_secs_f64());
                last_log = Instant::now();
            }
        }
        for d in &self.devices {
            let dirty: u64 =
                d.engine.volume_ids().iter().filter_map(|id| d.engine.volume_metrics(*id)).map(|m| m.dirty_bytes).sum();
            info!(
                "flash {} ready in {:.3} s: {} volume(s), {} dirty to destage, log {} of {} used",
                d.name,
                start.elapsed().as_secs_f64(),
                d.engine.volume_ids().len(),
                human_bytes(dirty),
                human_bytes(d.engine.log_used_bytes()),
                human_bytes(d.engine.log_capacity_bytes()),
            );
        }
        Ok(())
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

    fn volume_infos(&self) -> Vec<VolumeInfo> {
        let mut out = Vec::new();
        for (di, d) in self.devices.iter().enumerate() {
            for id in d.engine.volume_ids() {
                out.push(VolumeInfo {
                    id,
                    dev: di as u16,
                    blocks: d.blocks.get(&id.0).copied().unwrap_or(0),
                    export: d.names.get(&id.0).map(|n| n.0.clone()).unwrap_or_default(),
                });
            }
        }
        out
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            devices: self
                .devices
                .iter()
                .map(|d| {
                    DeviceStatus::of_engine(&d.name, &d.path.display().to_string(), &d.engine, |id| {
                        d.names.get(&id.0).cloned().unwrap_or_default()
                    })
                })
                .collect(),
        }
    }

    fn set_policy(&mut self, volume: u32, policy: WritePolicy) -> Result<String, String> {
        for d in &mut self.devices {
            if d.engine.set_policy(VolumeId(volume), policy) {
                let m = d.engine.volume_metrics(VolumeId(volume));
                let dirty = m.as_ref().map_or(0, |m| m.dirty_bytes);
                let eff = m.map_or(policy, |m| m.effective);
                let mut line = format!("volume {volume}: requested {policy}, effective {eff}");
                if policy == WritePolicy::WriteThrough && dirty > 0 {
                    line.push_str(&format!("; destaging {} of dirty data", human_bytes(dirty)));
                }
                return Ok(line);
            }
        }
        Err(format!("no volume {volume} on this node"))
    }

    /// Handles queued messages; returns (work done, stop requested).
    fn handle_messages(&mut self, now: u64) -> (usize, bool) {
        let mut work = 0;
        let mut stop = false;
        while let Ok(msg) = self.rx.try_recv() {
            work += 1;
            stop |= self.handle(msg, now);
        }
        (work, stop)
    }

    fn handle(&mut self, msg: EngineMsg, now: u64) -> bool {
        match msg {
            EngineMsg::Io { dev, volume, port, token, op } => {
                let t = (u64::from(port) << 32) | u64::from(token);
                match self.devices.get_mut(dev as usize) {
                    Some(d) => d.engine.submit(volume, t, op, now),
                    None => self.reply(t, Status::UnknownVolume, Vec::new()),
                }
            }
            EngineMsg::Register { port, reply } => {
                self.ports.insert(port, reply);
            }
            EngineMsg::Unregister { port } => {
                self.ports.remove(&port);
            }
            EngineMsg::SetPolicy { volume, policy, reply } => {
                let r = self.set_policy(volume, policy);
                let _ = reply.send(r);
            }
            EngineMsg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            EngineMsg::Stop => return true,
        }
        false
    }

    fn reply(&mut self, token: u64, status: Status, data: Vec<u8>) {
        let port = (token >> 32) as u32;
        if let Some(p) = self.ports.get(&port) {
            let _ = p.tx.send(Reply { token: token as u32, status, data });
            if !self.touched.contains(&port) {
                self.touched.push(port);
            }
        }
    }

    /// Polls every engine once and routes what completed; returns the work done.
    fn poll_engines(&mut self, now: u64) -> usize {
        let mut work = 0;
        let mut done = std::mem::take(&mut self.done);
        for d in &mut self.devices {
            work += d.engine.poll(now);
            d.engine.drain_completions(&mut done);
            d.engine.drain_events(&mut self.events);
        }
        work += done.len();
        for h in done.drain(..) {
            self.reply(h.token, h.status, h.data);
        }
        self.done = done;
        for e in self.events.drain(..) {
            match e {
                EngineEvent::BatchDestaged { .. } => {}
                EngineEvent::FlashDegraded => {
                    error!("flash write error: volumes on this device run write-through until its log drains")
                }
                EngineEvent::FlashHealthy => info!("flash device healthy again: volumes back to their policies"),
                EngineEvent::SanUnreachable { volume } => {
                    warn!("{volume}: SAN unreachable; dirty data stays in flash, retrying with back-off")
                }
                EngineEvent::SanReachable { volume } => info!("{volume}: SAN reachable again; destage resumes"),
            }
        }
        for port in self.touched.drain(..) {
            if let Some(p) = self.ports.get(&port) {
                wake(&p.efd);
            }
        }
        work
    }

    fn log_progress(&self) {
        for d in &self.devices {
            for id in d.engine.volume_ids() {
                let Some(m) = d.engine.volume_metrics(id) else { continue };
                if m.dirty_bytes > 0 || !m.san_reachable {
                    info!(
                        "{id}: {} dirty, destaging {}/s (depth {}), SAN latency {:.0} µs{}",
                        human_bytes(m.dirty_bytes),
                        human_bytes(m.destage_rate_bytes_per_s as u64),
                        m.destage_depth,
                        m.san_latency_ns_ewma / 1000.0,
                        if m.san_reachable { "" } else { ", SAN UNREACHABLE" }
                    );
                }
            }
        }
    }

    fn run(&mut self) {
        info!("destage reactor running ({} flash device(s))", self.devices.len());
        let mut last_work = Instant::now();
        let mut last_progress = Instant::now();
        let mut stopping: Option<Instant> = None;
        loop {
            let now_ns = self.clock.now_ns();
            let (mut work, stop) = self.handle_messages(now_ns);
            if stop && stopping.is_none() {
                stopping = Some(Instant::now());
            }
            work += self.poll_engines(now_ns);
            self.reap_foreign();
            let now = Instant::now();
            if work > 0 {
                last_work = now;
            }
            if let Some(since) = stopping {
                let busy = self.devices.iter().any(|d| d.engine.host_ops_in_flight() > 0 || d.engine.io_in_flight());
                if !busy || since.elapsed() > STOP_DRAIN {
                    if busy {
                        warn!("destage reactor: stopping with device I/O still in flight");
                    }
                    info!("destage reactor stopped");
                    return;
                }
            }
            if now.duration_since(last_progress) > PROGRESS_EVERY {
                last_progress = now;
                self.log_progress();
            }
            if now.duration_since(last_work) < self.idle_poll {
                continue;
            }
            // Sleep until a device, a SAN socket or a message completes into the ring.
            self.waker.sleeping.store(true, Ordering::SeqCst);
            if self.rx.is_empty() {
                self.ring.wait(IDLE_SLEEP);
            }
            self.waker.sleeping.store(false, Ordering::SeqCst);
        }
    }
}
