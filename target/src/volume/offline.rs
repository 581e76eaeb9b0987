//! A flash device without a daemon (DESIGN.md, "Flash device moved to another node"):
//! [`inspect`] replays its log read-only and reports the volumes and dirty bytes it holds;
//! [`destage`] recovers it and destages every dirty block to the volumes' SANs named in a
//! configuration file. Both run the same engine, recovery and destager as stagerd, on the
//! caller's thread.

use std::time::{Duration, Instant};

use stager_nvme::bdev::{BlockDevice, DeviceSpec};
use stager_policy::constants::BLOCK_SIZE_U64;
use stager_policy::io::MonotonicClock;
use stager_policy::log::{Layout, Superblock};
use stager_policy::node::Node;
use stager_policy::{Clock, Destager, Engine, EngineConfig, EngineState, San, VolumeId, VolumeSpec, WritePolicy};

use super::devices::{
    open_flash_device, probe_superblock, scan_for_frames, BdevPort, LockError, OwnerLock, Probe, ReadOnlyFlash,
    SharedRing, FRAME_SCAN_BYTES,
};
use super::service::{open_san, san_label};
use super::status::DeviceStatus;
use crate::config::{BackendConfig, Config};

/// What `stagerctl flash inspect` found.
#[derive(Debug, serde::Serialize)]
pub struct Inspection {
    pub path: String,
    /// A running stagerd (or stagerctl) holds the device: the numbers are a snapshot of a live
    /// log and may already be out of date.
    pub owned_by_running_process: bool,
    pub superblock_generation: u64,
    pub incarnation: u64,
    pub device: DeviceStatus,
}

fn read_superblock(dev: &dyn BlockDevice, path: &str) -> Result<Superblock, String> {
    match probe_superblock(dev).map_err(|e| format!("{path}: cannot read: {e}"))? {
        Probe::Formatted(sb) => Ok(sb),
        Probe::Blank => Err(format!("{path}: no Stager superblock (a blank or foreign device)")),
        Probe::Damaged(why) => Err(format!("{path}: Stager superblock is damaged: {why}")),
    }
}

/// Something an offline tool drives on its own thread: an engine alone, or a node.
trait Drivable {
    fn state(&self) -> &EngineState;
    fn poll(&mut self, now: u64) -> usize;
}

impl Drivable for Engine {
    fn state(&self) -> &EngineState {
        Engine::state(self)
    }
    fn poll(&mut self, now: u64) -> usize {
        Engine::poll(self, now)
    }
}

impl Drivable for Node {
    fn state(&self) -> &EngineState {
        self.engine.state()
    }
    fn poll(&mut self, now: u64) -> usize {
        Node::poll(self, now)
    }
}

/// Drives `e` until `done` says so; `what` names the wait in the timeout error.
fn drive<D: Drivable>(
    e: &mut D,
    clock: &MonotonicClock,
    timeout: Duration,
    what: &str,
    done: impl Fn(&D) -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    while !done(e) {
        if let EngineState::Failed(why) = e.state() {
            return Err(format!("{what}: {why}"));
        }
        if e.poll(clock.now_ns()) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        if start.elapsed() > timeout {
            return Err(format!("{what}: no progress within {} s", timeout.as_secs()));
        }
    }
    Ok(())
}

/// Replays the device's log without writing anything and reports what it holds.
pub fn inspect(device: &DeviceSpec) -> Result<Inspection, String> {
    let path = &device.label();
    let owned = match OwnerLock::take_device(device, false) {
        Ok(_) => false,
        Err(LockError::Busy(_)) => true,
        Err(e) => return Err(e.to_string()),
    };
    let dev = open_flash_device(device).map_err(|e| format!("{path}: cannot open: {e}"))?;
    let sb = read_superblock(&*dev, path)?;
    super::devices::check_fits_superblock(&sb, dev.info().size_bytes()).map_err(|e| format!("{path}: {e}"))?;
    let ring = SharedRing::new().map_err(|e| format!("io_uring: {e}"))?;
    let port = BdevPort::new(dev, ring).map_err(|e| format!("io_uring: {e}"))?;
    let mut e = Engine::open_for_inspection(Box::new(ReadOnlyFlash(port)), &sb).map_err(|e| e.to_string())?;
    let clock = MonotonicClock::new();
    drive(&mut e, &clock, Duration::from_secs(3600), "log replay", |e| e.replay_done())?;
    // Replay reads ahead: let those reads land before the buffers go.
    drive(&mut e, &clock, Duration::from_secs(60), "finishing reads", |e| !e.io_in_flight())?;
    let mut device = DeviceStatus::of_engine("-", path, &e, |_| (String::new(), String::new()));
    device.state = "replayed read-only".into();
    Ok(Inspection {
        path: path.clone(),
        owned_by_running_process: owned,
        superblock_generation: sb.generation,
        incarnation: sb.incarnation.0,
        device,
    })
}

/// Makes a device blank so that stagerd formats it: zeroes both superblock copies and the part
/// of the log area start-up scans for frames. Refuses a device a running process owns, and,
/// without `force`, one that holds dirty data or copies, or whose contents cannot be read.
pub fn wipe(device: &DeviceSpec, force: bool) -> Result<String, String> {
    use stager_policy::constants::LOG_START;
    let path = &device.label();
    let _lock = OwnerLock::take_device(device, true).map_err(|e| e.to_string())?;
    let refuse = |why: String| -> Result<String, String> {
        Err(format!("{why}; nothing was changed (--force wipes it anyway, destroying that data)"))
    };
    if !force {
        let dev = open_flash_device(device).map_err(|e| format!("{path}: cannot open: {e}"))?;
        match probe_superblock(&*dev).map_err(|e| format!("{path}: cannot read: {e}"))? {
            Probe::Damaged(why) => return refuse(format!("{path}: its superblock is damaged ({why})")),
            Probe::Blank => {
                if let Some(f) = scan_for_frames(&*dev).map_err(|e| format!("{path}: cannot read: {e}"))? {
                    return refuse(format!(
                        "{path}: its superblock is blank but its log holds {} frame(s) of device {:#x}",
                        f.frames, f.device_id
                    ));
                }
            }
            Probe::Formatted(_) => {
                drop(dev);
                let i = inspect(device)?;
                let dirty: u64 = i.device.volumes.iter().map(|v| v.dirty_bytes).sum::<u64>()
                    + i.device.copies.iter().map(|c| c.bytes).sum::<u64>();
                let lost = i.device.replay.as_ref().is_some_and(|r| r.lost_data());
                if dirty > 0 {
                    return refuse(format!(
                        "{path} holds {dirty} bytes of data not yet on its SANs; destage it first \
                         (stagerctl flash destage {path} --config FILE)"
                    ));
                }
                if lost {
                    return refuse(format!("{path}: its log is damaged (see stagerctl flash inspect)"));
                }
            }
        }
    }
    let dev = open_flash_device(device).map_err(|e| format!("{path}: cannot open: {e}"))?;
    let end = dev.info().size_bytes().min(LOG_START + FRAME_SCAN_BYTES);
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at < end {
        let len = chunk.min(end - at) / BLOCK_SIZE_U64 * BLOCK_SIZE_U64;
        if len == 0 {
            break;
        }
        let buf = stager_nvme::bdev::AlignedBuf::new(len as usize);
        stager_nvme::bdev::write_blocking(&*dev, at, buf, Duration::from_secs(30))
            .map_err(|e| format!("{path}: cannot write: {e}"))?;
        at += len;
    }
    tracing::warn!("{path}: wiped by the operator{}", if force { " (forced)" } else { "" });
    Ok(format!("wiped ({} MiB zeroed): stagerd formats it at its next start", at >> 20))
}

/// The cache share that reproduces the superblock's layout on a device of `size` bytes.
fn cache_percent_for(sb: &Superblock, size: u64) -> Option<u32> {
    let want = Layout {
        log_start: sb.log_start,
        log_bytes: sb.log_bytes,
        cache_start: sb.cache_start,
        cache_slots: sb.cache_slots,
    };
    (0..100).find(|&cp| Layout::for_device(size, cp) == Some(want))
}

/// Progress of a destage run, reported to the caller's callback about ten times a second.
pub struct DestageProgress {
    pub dirty_at_start: u64,
    pub dirty_now: u64,
}

/// Recovers the device's log and destages every volume on it to the SAN `config` gives it,
/// then leaves the device clean (watermarks persisted). Refuses a device another process owns.
/// The engine and its destager run on this thread, linked by a plain queue ([`Node`]).
pub fn destage(
    device: &DeviceSpec,
    config: &Config,
    mut progress: impl FnMut(&DestageProgress),
) -> Result<String, String> {
    let path = &device.label();
    let _lock = OwnerLock::take_device(device, true).map_err(|e| e.to_string())?;
    let dev = open_flash_device(device).map_err(|e| format!("{path}: cannot open: {e}"))?;
    let sb = read_superblock(&*dev, path)?;
    let size = dev.info().size_bytes();
    let cache_percent = cache_percent_for(&sb, size)
        .ok_or_else(|| format!("{path}: its superblock's layout does not fit a {size}-byte device"))?;
    let ring = SharedRing::new().map_err(|e| format!("io_uring: {e}"))?;
    let mut specs = Vec::new();
    let mut sans: Vec<(VolumeId, Box<dyn San>)> = Vec::new();
    let mut labels = Vec::new();
    for v in &sb.volumes {
        let san = config.subsystems.iter().flat_map(|s| &s.namespaces).find_map(|n| match &n.backend {
            BackendConfig::Volume { id, san, .. } if *id == v.id.0 => Some(san.clone()),
            _ => None,
        });
        let san = san.ok_or_else(|| {
            format!("{path} has data of volume {} but the configuration does not name its SAN", v.id.0)
        })?;
        let timeout = Duration::from_millis(config.destage.san_timeout_ms);
        let port = open_san(v.id.0, &san, timeout, &ring)?;
        if port.size_bytes() < v.blocks * BLOCK_SIZE_U64 {
            return Err(format!("volume {}: its SAN is smaller than the volume ({} blocks)", v.id.0, v.blocks));
        }
        labels.push(format!("volume {} -> {}", v.id.0, san_label(&san)));
        specs.push(VolumeSpec {
            id: v.id,
            epoch: v.epoch,
            blocks: v.blocks,
            policy: WritePolicy::WriteThrough,
            read_cache: false,
            unmap: port.unmap_reads_zeroes(),
            replicas: Vec::new(),
            source: v.source.clone(),
        });
        sans.push((v.id, port));
    }
    let io = |e: std::io::Error| format!("io_uring: {e}");
    // A replica's copies are destaged like the node's own volumes (the source is lost).
    let cfg = EngineConfig {
        device_id: sb.device_id,
        cache_percent,
        destage_replica_copies: true,
        ..EngineConfig::default()
    };
    let engine = Engine::open(cfg, Box::new(BdevPort::new(dev.clone(), ring.clone()).map_err(io)?), specs)
        .map_err(|e| e.to_string())?;
    let destager = Destager::new(engine.layout(), Box::new(BdevPort::new(dev, ring).map_err(io)?), sans);
    let mut node = Node::new(engine, destager);
    let clock = MonotonicClock::new();
    drive(&mut node, &clock, Duration::from_secs(3600), "recovery", |n| *n.engine.state() == EngineState::Ready)?;
    let ids: Vec<VolumeId> = node.engine.volume_ids();
    let dirty = |n: &Node| ids.iter().filter_map(|id| n.engine.volume_metrics(*id)).map(|m| m.dirty_bytes).sum::<u64>();
    let dirty_at_start = dirty(&node);
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut last_progress = (Instant::now(), dirty_at_start);
    while !node.is_quiescent() {
        let now_dirty = dirty(&node);
        if last_report.elapsed() > Duration::from_millis(100) {
            progress(&DestageProgress { dirty_at_start, dirty_now: now_dirty });
            last_report = Instant::now();
        }
        if now_dirty < last_progress.1 {
            last_progress = (Instant::now(), now_dirty);
        } else if last_progress.0.elapsed() > Duration::from_secs(300) {
            let unreachable: Vec<String> = ids
                .iter()
                .filter_map(|id| node.engine.volume_metrics(*id))
                .filter(|m| !m.san_reachable)
                .map(|m| format!("volume {}", m.id.0))
                .collect();
            return Err(format!(
                "no destage progress for 5 minutes with {now_dirty} bytes dirty (SAN unreachable: {}); \
                 nothing was lost, run it again once the SAN is back",
                if unreachable.is_empty() { "none".into() } else { unreachable.join(", ") }
            ));
        }
        if node.poll(clock.now_ns()) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    progress(&DestageProgress { dirty_at_start, dirty_now: 0 });
    Ok(format!(
        "destaged {} bytes in {:.1} s ({}); the device holds no dirty data",
        dirty_at_start,
        started.elapsed().as_secs_f64(),
        labels.join(", ")
    ))
}
