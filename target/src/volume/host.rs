//! The engine host: a flash device's [`Engine`] living on the front-end reactor that owns the
//! device, as one of that reactor's pollers.
//!
//! It appends to the log on the reactor's own io_uring (the device's `BdevChannel`, so a log
//! frame is one gathered write of the header block and the hosts' buffers), acknowledges in log
//! order and serves reads — all on the thread that received the commands. Commands from this
//! reactor's namespaces arrive through a local queue (no message, no wake-up); commands from
//! other reactors, the destager's messages and the management requests arrive on one bounded
//! channel with an eventfd armed in this reactor's ring. Messages for the destage core leave
//! on its bounded channel; a full channel keeps them here until there is room.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use io_uring::{opcode, types};
use stager_nvme::bdev::{AlignedBuf, BdevChannel, BdevDone, BdevIo, BdevOp, BlockDevice};
use stager_nvme::uring::{kind, user_data, Ring};
use stager_policy::io::MonotonicClock;
use stager_policy::{
    Clock, CopyState, Engine, EngineConfig, EngineEvent, EngineState, Epoch, Flash, FlashInfo, FromDestage, HostDone,
    HostOp, IoDone, IoError, IoToken, LinkId, Status, ToDestage, VolumeId, VolumeSpec, WritePolicy,
};
use stager_rdma::{Endpoint, Region, RemoteKey};
use tracing::{error, info, warn};

use super::fabric_hub::FabricHub;
use super::service::{ReplyPort, Waker};
use super::status::DeviceStatus;

/// `user_data` slot of the host's eventfd read: the host owns its device channel's id, and a
/// channel never uses this slot (`uring::slot`).
const WAKE_SLOT: u32 = stager_nvme::uring::slot::OWNER;
/// Slots of the io_uring polls on replication endpoints: `FABRIC_SLOT_TOP - link` (below the
/// reserved slots, far above any channel's I/O slots).
const FABRIC_SLOT_TOP: u32 = stager_nvme::uring::slot::CHANNEL_WAKE - 1;
const FABRIC_SLOTS: u32 = 1 << 20;
/// How long a replica copy may take to become durable when a source opens it.
const COPY_OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A copy being opened for a source: (volume, epoch, reply, deadline).
type OpeningCopy = (VolumeId, Epoch, Sender<Result<CopyState, String>>, Instant);

/// A replication link a control thread set up, handed to the host that will poll it.
pub(crate) struct LinkHandoff {
    pub link: LinkId,
    pub volume: VolumeId,
    pub peer: String,
    pub ring_bytes: u64,
    pub ep: Endpoint,
    pub local: Arc<Region>,
    pub remote: RemoteKey,
}

/// What a remote channel, the destage core or the management thread sends a host.
pub(crate) enum HostMsg {
    Io {
        route: u32,
        token: u32,
        volume: VolumeId,
        op: HostOp,
    },
    Register {
        route: u32,
        port: Arc<ReplyPort>,
    },
    Unregister {
        route: u32,
    },
    Destage(FromDestage),
    Status {
        reply: Sender<DeviceStatus>,
    },
    /// `copies`: the replica count the operator named (`write-back+N`), checked against the
    /// volume's configuration.
    SetPolicy {
        volume: VolumeId,
        policy: WritePolicy,
        copies: Option<usize>,
        reply: Sender<Result<String, String>>,
    },
    /// An operator accepts that a volume's lost blocks are gone.
    AcceptLoss {
        volume: VolumeId,
        reply: Sender<Result<String, String>>,
    },
    /// A volume's epoch (what a source presents to its replicas).
    Epoch {
        volume: VolumeId,
        reply: Sender<Option<Epoch>>,
    },
    /// Replica side: open the copy of `volume` kept for `source`; the reply comes once it is
    /// durable (or refused).
    OpenCopy {
        volume: VolumeId,
        blocks: u64,
        source: String,
        epoch: Epoch,
        reply: Sender<Result<CopyState, String>>,
    },
    /// Replica side: the source's link for a copy, to poll from now on.
    AttachInbound {
        link: LinkHandoff,
        reply: Sender<Result<(), String>>,
    },
    /// Source side: the cluster changed a volume's replica set (`Engine::set_replicas`).
    SetReplicas {
        volume: VolumeId,
        replicas: Vec<String>,
        copies: usize,
        epoch: Epoch,
        reply: Sender<Result<Epoch, String>>,
    },
    /// Source side: the cluster recorded the volume's copies as they were at `generation`
    /// (`Engine::confirm_copies`).
    ConfirmCopies {
        volume: VolumeId,
        generation: u64,
        reply: Sender<Result<usize, String>>,
    },
    /// Replica side: this node no longer keeps a copy of `volume` (`Engine::discard_copy`).
    DiscardCopy {
        volume: VolumeId,
        reply: Sender<Result<u64, String>>,
    },
    /// Replica side: destage the copy of `volume` kept here (its owner was lost;
    /// `Engine::rescue_copy`); the destage core has its SAN already.
    RescueCopy {
        volume: VolumeId,
        reply: Sender<Result<bool, String>>,
    },
    /// Owner side: a replica rescued `volume` up to `upto` while this node was taken for gone
    /// (`Engine::absorb_rescue`; the destager skipped first).
    AbsorbRescue {
        volume: VolumeId,
        upto: stager_policy::LogSeq,
        served: bool,
        reply: Sender<Result<usize, String>>,
    },
    /// The newest sequence number of `volume` (`Engine::last_seq`).
    LastSeq {
        volume: VolumeId,
        reply: Sender<Option<stager_policy::LogSeq>>,
    },
    /// Replica side: serve (or stop serving) the rescued copy of `volume` to hosts
    /// (`Engine::serve_copy`); the reply also says how many host commands it still holds.
    ServeCopy {
        volume: VolumeId,
        on: bool,
        blocks: Option<u64>,
        reply: Sender<Result<usize, String>>,
    },
    /// Replica side: the cluster no longer needs the copy's rescue (`Engine::end_rescue`).
    EndRescue {
        volume: VolumeId,
        abort: bool,
        reply: Sender<Result<(), String>>,
    },
    /// Source side: a link to one of a volume's replicas, which holds `copy`.
    AttachReplica {
        link: LinkHandoff,
        copy: CopyState,
        reply: Sender<Result<Epoch, String>>,
    },
}

/// One completion for a channel: its token, how it ended, the buffer back.
pub(crate) struct Completion {
    pub token: u32,
    pub status: Status,
    pub buf: Option<AlignedBuf>,
}

/// The queue between this reactor's volume channels and the host (same thread).
#[derive(Default)]
pub(crate) struct LocalQueue {
    pub commands: VecDeque<(u32, u32, VolumeId, HostOp)>,
    pub completions: HashMap<u32, Rc<RefCell<VecDeque<Completion>>>>,
}

/// Whether a device's engine is ready (Target::start waits for it before accepting hosts).
#[derive(Default)]
pub(crate) struct Ready {
    state: Mutex<Option<Result<String, String>>>,
    cv: Condvar,
}

impl Ready {
    pub fn set(&self, r: Result<String, String>) {
        if let Ok(mut s) = self.state.lock() {
            if s.is_none() {
                *s = Some(r);
                self.cv.notify_all();
            }
        }
    }

    /// Waits up to `timeout`; None while still recovering.
    pub fn wait(&self, timeout: std::time::Duration) -> Option<Result<String, String>> {
        let s = self.state.lock().ok()?;
        let (s, _) = self.cv.wait_timeout_while(s, timeout, |s| s.is_none()).ok()?;
        s.clone()
    }
}

/// Everything a reactor needs to build a device's host (prepared by `VolumeService::start`).
pub(crate) struct HostPlan {
    pub dev: u16,
    pub name: String,
    pub path: PathBuf,
    pub owner: usize,
    pub bdev: Arc<dyn BlockDevice>,
    pub cfg: EngineConfig,
    pub specs: Vec<VolumeSpec>,
    /// A blank device is formatted; a formatted one replayed.
    pub format: bool,
    /// (export, SAN description) per volume id.
    pub names: HashMap<u32, (String, String)>,
    pub inbox: Receiver<HostMsg>,
    pub waker: Arc<Waker>,
    pub to_destage: Sender<(u16, ToDestage)>,
    pub destage_waker: Arc<Waker>,
    pub ready: Arc<Ready>,
    /// Where the host reports replication links that went down (the replication service
    /// reconnects them).
    pub link_down: Option<Sender<(LinkId, String)>>,
}

/// The engine's flash: I/O queued for the host to submit on the reactor's ring, completions
/// handed back when the engine polls.
#[derive(Default)]
struct FlashQueue {
    pending: VecDeque<BdevIo>,
    done: Vec<IoDone>,
}

struct UringFlash {
    info: FlashInfo,
    q: Rc<RefCell<FlashQueue>>,
}

impl Flash for UringFlash {
    fn info(&self) -> FlashInfo {
        self.info
    }
    fn submit_read(&mut self, token: IoToken, offset: u64, buf: AlignedBuf) {
        let len = buf.len() as u64;
        self.q.borrow_mut().pending.push_back(BdevIo::new(BdevOp::Read, offset, len, Some(buf), token.0));
    }
    fn submit_write(&mut self, token: IoToken, offset: u64, first: AlignedBuf, gather: Vec<AlignedBuf>, fua: bool) {
        let len = first.len() as u64 + gather.iter().map(|b| b.len() as u64).sum::<u64>();
        let mut io = BdevIo::new(BdevOp::Write { fua }, offset, len, Some(first), token.0);
        io.gather = gather;
        self.q.borrow_mut().pending.push_back(io);
    }
    fn submit_flush(&mut self, token: IoToken) {
        self.q.borrow_mut().pending.push_back(BdevIo::new(BdevOp::Flush, 0, 0, None, token.0));
    }
    fn poll_completions(&mut self, out: &mut Vec<IoDone>) -> usize {
        let mut q = self.q.borrow_mut();
        let n = q.done.len();
        out.append(&mut q.done);
        n
    }
}

thread_local! {
    /// The hosts living on this reactor, by device, for its volume channels to find.
    static LOCAL: RefCell<HashMap<u16, Rc<RefCell<LocalQueue>>>> = RefCell::new(HashMap::new());
}

/// The local queue of device `dev`'s host, if this thread owns it.
pub(crate) fn local_queue(dev: u16) -> Option<Rc<RefCell<LocalQueue>>> {
    LOCAL.with(|l| l.borrow().get(&dev).cloned())
}

pub(crate) struct EngineHost {
    dev: u16,
    name: String,
    path: PathBuf,
    engine: Engine,
    flash: Rc<RefCell<FlashQueue>>,
    channel: Box<dyn BdevChannel>,
    /// The `a` of this host's `user_data` (its device channel and its wake-up read).
    channel_id: u32,
    local: Rc<RefCell<LocalQueue>>,
    inbox: Receiver<HostMsg>,
    waker: Arc<Waker>,
    wake_buf: Box<[u8; 8]>,
    armed: bool,
    ports: HashMap<u32, Arc<ReplyPort>>,
    touched: Vec<u32>,
    to_destage: Sender<(u16, ToDestage)>,
    destage_waker: Arc<Waker>,
    /// Messages the destage core's channel had no room for yet.
    backlog: VecDeque<ToDestage>,
    /// Dirty records sent without waking the destage core (see [`DIRTY_WAKE_BLOCKS`]): blocks,
    /// and when the first of them went.
    unwoken_blocks: u64,
    unwoken_since_ns: Option<u64>,
    names: HashMap<u32, (String, String)>,
    ready: Arc<Ready>,
    reported_ready: bool,
    clock: MonotonicClock,
    started: Instant,
    done: Vec<HostDone>,
    outbox: Vec<ToDestage>,
    events: Vec<EngineEvent>,
    bdev_done: Vec<BdevDone>,
    hub: FabricHub,
    to_arm: Vec<(LinkId, std::os::fd::RawFd)>,
    /// Links removed while their poll was armed: cancel it.
    to_cancel: Vec<LinkId>,
    link_down: Option<Sender<(LinkId, String)>>,
    /// Copies being opened, answered once durable.
    opening: Vec<OpeningCopy>,
    /// Failed device commands since the last line that said so, and when that was.
    io_failures: u64,
    io_fail_logged: Option<Instant>,
}

/// A failing flash device's errors are logged at most this often.
const FLASH_FAIL_LOG_EVERY: Duration = Duration::from_secs(5);

/// Dirty records wake a sleeping destage core only once this many blocks wait for it or once
/// the oldest has waited [`DIRTY_WAKE_AFTER_NS`] (it also wakes by itself every 5 ms); any
/// other message wakes it at once. Not when this reactor goes to sleep: at QD1 it may sleep
/// during every log frame's `fdatasync`. A wake-up per acknowledged write cost that write
/// ~15 µs at QD1 (an `eventfd` write and a cross-CPU wake-up, before its response went out)
/// and made the destager run one batch — superblock writes, a SAN write and a SAN flush — per
/// host write.
const DIRTY_WAKE_BLOCKS: u64 = 256;
const DIRTY_WAKE_AFTER_NS: u64 = 1_000_000;

impl EngineHost {
    /// Builds the engine of `plan` on this reactor; `channel_id` routes its device completions.
    pub fn new(plan: HostPlan, channel_id: u32) -> Result<EngineHost, String> {
        let what = format!("flash {} ({})", plan.name, plan.path.display());
        let channel = plan.bdev.channel(channel_id).map_err(|e| format!("{what}: cannot open a channel: {e}"))?;
        let flash = Rc::new(RefCell::new(FlashQueue::default()));
        let info = plan.bdev.info();
        let port = UringFlash {
            info: FlashInfo { size_bytes: info.size_bytes(), volatile_cache: info.volatile_cache },
            q: flash.clone(),
        };
        let engine = if plan.format {
            info!("{what}: no superblock; formatting as device {:#x}", plan.cfg.device_id);
            Engine::format(plan.cfg, Box::new(port), plan.specs)
        } else {
            info!("{what}: device {:#x}; replaying its log", plan.cfg.device_id);
            Engine::open(plan.cfg, Box::new(port), plan.specs)
        }
        .map_err(|e| format!("{what}: {e}"))?;
        let mut engine = engine;
        let hub = FabricHub::default();
        engine.set_fabric(Box::new(hub.clone()));
        let local = Rc::new(RefCell::new(LocalQueue::default()));
        LOCAL.with(|l| l.borrow_mut().insert(plan.dev, local.clone()));
        Ok(EngineHost {
            dev: plan.dev,
            name: plan.name,
            path: plan.path,
            engine,
            flash,
            channel,
            channel_id,
            local,
            inbox: plan.inbox,
            waker: plan.waker,
            wake_buf: Box::new([0; 8]),
            armed: false,
            ports: HashMap::new(),
            touched: Vec::new(),
            to_destage: plan.to_destage,
            destage_waker: plan.destage_waker,
            backlog: VecDeque::new(),
            unwoken_blocks: 0,
            unwoken_since_ns: None,
            names: plan.names,
            ready: plan.ready,
            reported_ready: false,
            clock: MonotonicClock::new(),
            started: Instant::now(),
            done: Vec::new(),
            outbox: Vec::new(),
            events: Vec::new(),
            bdev_done: Vec::new(),
            hub,
            to_arm: Vec::new(),
            to_cancel: Vec::new(),
            link_down: plan.link_down,
            opening: Vec::new(),
            io_failures: 0,
            io_fail_logged: None,
        })
    }

    fn arm(&mut self, ring: &mut Ring) {
        if self.armed {
            return;
        }
        let e = opcode::Read::new(types::Fd(self.waker.efd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(kind::BDEV, self.channel_id(), WAKE_SLOT));
        ring.push(e);
        self.armed = true;
    }

    fn channel_id(&self) -> u32 {
        self.channel_id
    }

    /// A completion of this host's ring operations (its device's, or its wake-up read).
    pub fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring) {
        if slot == WAKE_SLOT {
            self.armed = false;
            return;
        }
        if slot <= FABRIC_SLOT_TOP && slot > FABRIC_SLOT_TOP - FABRIC_SLOTS {
            self.hub.fired(LinkId(FABRIC_SLOT_TOP - slot));
            return;
        }
        self.channel.on_cqe(slot, res, ring);
    }

    /// Whether this host may let its reactor sleep: it says so (and must be woken by senders)
    /// only when nothing is waiting for it.
    pub fn prepare_sleep(&mut self) -> bool {
        self.waker.sleeping.store(true, Ordering::SeqCst);
        if !self.inbox.is_empty()
            || !self.local.borrow().commands.is_empty()
            || !self.backlog.is_empty()
            || !self.hub.arm_all()
            || !self.opening.is_empty()
        {
            self.waker.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub fn woke(&mut self) {
        self.waker.sleeping.store(false, Ordering::SeqCst);
    }

    /// Device I/O still in flight (a stopping reactor waits for it).
    pub fn busy(&self) -> bool {
        self.channel.in_flight() > 0 || !self.flash.borrow().pending.is_empty()
    }

    /// Flash I/O in flight is waiting for the kernel's threads (a log frame's `fdatasync` on a
    /// flash file): the reactor sleeps instead of spinning when it has nothing else to do.
    pub fn waits_on_kernel(&self) -> bool {
        self.channel.waits_on_kernel()
    }

    /// One turn: take commands and messages, run the engine, route what finished, submit its
    /// device I/O. Returns the work done.
    pub fn poll(&mut self, ring: &mut Ring) -> usize {
        let now = self.clock.now_ns();
        let mut work = 0;
        // Device completions first: acknowledgements cut the latency of everything after.
        self.bdev_done.clear();
        self.channel.poll(&mut self.bdev_done);
        if !self.bdev_done.is_empty() {
            let mut q = self.flash.borrow_mut();
            for d in self.bdev_done.drain(..) {
                let result = d.result.map_err(|e| {
                    // A dead device fails everything: said once every few seconds, with a count.
                    self.io_failures += 1;
                    if self.io_fail_logged.is_none_or(|t| t.elapsed() >= FLASH_FAIL_LOG_EVERY) {
                        warn!(device = %self.name, failed = self.io_failures, "flash I/O failed: {e}");
                        self.io_fail_logged = Some(Instant::now());
                        self.io_failures = 0;
                    }
                    IoError::Failed
                });
                q.done.push(IoDone { token: IoToken(d.token), result, buf: d.buf, gather: d.gather });
                work += 1;
            }
        }
        loop {
            let cmd = self.local.borrow_mut().commands.pop_front();
            let Some((route, token, volume, op)) = cmd else { break };
            self.engine.submit(volume, (u64::from(route) << 32) | u64::from(token), op, now);
            work += 1;
        }
        while let Ok(msg) = self.inbox.try_recv() {
            work += 1;
            self.handle(msg, now);
        }
        work += self.engine.poll(now);
        self.route_completions();
        self.engine.drain_outbox(&mut self.outbox);
        self.send_to_destage(now);
        self.log_events();
        if !self.reported_ready {
            match self.engine.state() {
                EngineState::Ready => {
                    self.reported_ready = true;
                    self.report_damage();
                    self.ready.set(Ok(self.ready_line()));
                }
                EngineState::Failed(why) => {
                    self.reported_ready = true;
                    let why = format!("flash {} ({}): cannot open its log: {why}", self.name, self.path.display());
                    error!("{why}");
                    self.ready.set(Err(why));
                }
                _ => {}
            }
        }
        let pending: Vec<BdevIo> = self.flash.borrow_mut().pending.drain(..).collect();
        for io in pending {
            self.channel.submit(io, ring);
            work += 1;
        }
        work += self.poll_opening();
        self.arm_links(ring);
        self.arm(ring);
        work
    }

    /// Arms an io_uring poll on each link endpoint's wait fd (so a sleeping reactor wakes for
    /// the fabric) and cancels those of links that are gone.
    fn arm_links(&mut self, ring: &mut Ring) {
        for link in self.to_cancel.drain(..) {
            let ud = user_data(kind::BDEV, self.channel_id, FABRIC_SLOT_TOP - link.0);
            ring.push(opcode::AsyncCancel::new(ud).build().user_data(user_data(
                kind::BDEV,
                self.channel_id,
                FABRIC_SLOT_TOP,
            )));
        }
        self.hub.to_arm(&mut self.to_arm);
        for (link, fd) in self.to_arm.drain(..) {
            let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build().user_data(user_data(
                kind::BDEV,
                self.channel_id,
                FABRIC_SLOT_TOP - link.0,
            ));
            ring.push(e);
        }
    }

    /// Replies to sources whose copies became durable (or could not in time).
    fn poll_opening(&mut self) -> usize {
        if self.opening.is_empty() {
            return 0;
        }
        let now = Instant::now();
        let before = self.opening.len();
        let engine = &self.engine;
        self.opening.retain(|(volume, epoch, reply, deadline)| {
            if let Some(copy) = engine.replica_copy_ready(*volume, *epoch) {
                let _ = reply.send(Ok(copy));
                false
            } else if now > *deadline {
                let _ = reply.send(Err(format!("the copy of {volume} did not become durable in time")));
                false
            } else {
                true
            }
        });
        before - self.opening.len()
    }

    /// Logs what replay found damaged, as an ERROR an operator cannot miss.
    fn report_damage(&self) {
        let Some(r) = self.engine.replay_report() else { return };
        let r = super::status::ReplaySummary::of(r);
        if r.repaired_headers > 0 {
            warn!(
                "flash {} ({}): {} frame header(s) were damaged and read from their mirror half",
                self.name,
                self.path.display(),
                r.repaired_headers
            );
        }
        if !r.lost_data() {
            return;
        }
        for d in &r.damage {
            error!("flash {} ({}): damaged log: {d}", self.name, self.path.display());
        }
        for id in self.engine.volume_ids() {
            let Some(m) = self.engine.volume_metrics(id) else { continue };
            if m.lost_blocks > 0 {
                error!(
                    "volume {}: {} block(s) of acknowledged data lost to log damage; reads of them answer \
                     Unrecovered Read Error until written again or `stagerctl volume accept-loss {}`",
                    id.0, m.lost_blocks, id.0
                );
            }
        }
    }

    fn ready_line(&self) -> String {
        let e = &self.engine;
        let dirty: u64 = e.volume_ids().iter().filter_map(|id| e.volume_metrics(*id)).map(|m| m.dirty_bytes).sum();
        format!(
            "flash {} ready in {:.3} s: {} volume(s), {} dirty to destage, log {} of {} used",
            self.name,
            self.started.elapsed().as_secs_f64(),
            e.volume_ids().len(),
            super::status::human_bytes(dirty),
            super::status::human_bytes(e.log_used_bytes()),
            super::status::human_bytes(e.log_capacity_bytes()),
        )
    }

    fn handle(&mut self, msg: HostMsg, now: u64) {
        match msg {
            HostMsg::Io { route, token, volume, op } => {
                self.engine.submit(volume, (u64::from(route) << 32) | u64::from(token), op, now)
            }
            HostMsg::Register { route, port } => {
                self.ports.insert(route, port);
            }
            HostMsg::Unregister { route } => {
                self.ports.remove(&route);
            }
            HostMsg::Destage(m) => self.engine.on_message(m, now),
            HostMsg::Status { reply } => {
                let _ = reply.send(self.status());
            }
            HostMsg::Epoch { volume, reply } => {
                let _ = reply.send(self.engine.volume_epoch(volume));
            }
            HostMsg::OpenCopy { volume, blocks, source, epoch, reply } => {
                match self.engine.open_replica_copy(volume, blocks, &source, epoch) {
                    Ok(()) => self.opening.push((volume, epoch, reply, Instant::now() + COPY_OPEN_TIMEOUT)),
                    Err(why) => {
                        let _ = reply.send(Err(why));
                    }
                }
            }
            HostMsg::AttachInbound { link: h, reply } => {
                let r = self.engine.attach_inbound(h.volume, h.link, &h.peer, h.ring_bytes);
                if r.is_ok() {
                    info!("{}: keeping the copy for node {} over {}", h.volume, h.peer, h.link);
                    self.hub.add(h.link, h.ep, h.local, h.remote);
                }
                let _ = reply.send(r);
            }
            HostMsg::AttachReplica { link: h, copy, reply } => {
                let r = self.engine.attach_replica(h.volume, h.link, &h.peer, h.ring_bytes, copy);
                if r.is_ok() {
                    self.hub.add(h.link, h.ep, h.local, h.remote);
                }
                let _ = reply.send(r);
            }
            HostMsg::AcceptLoss { volume, reply } => {
                let r = match self.engine.accept_loss(volume) {
                    None => Err(format!("no volume {} on this device", volume.0)),
                    Some(0) => Ok(format!("volume {}: no lost blocks; nothing to accept", volume.0)),
                    Some(n) => Ok(format!(
                        "volume {}: loss of {n} block(s) accepted; reads of them return what the SAN holds",
                        volume.0
                    )),
                };
                let _ = reply.send(r);
            }
            HostMsg::SetReplicas { volume, replicas, copies, epoch, reply } => {
                let _ = reply.send(self.engine.set_replicas(volume, replicas, copies, epoch));
            }
            HostMsg::ConfirmCopies { volume, generation, reply } => {
                let _ = reply.send(self.engine.confirm_copies(volume, generation));
            }
            HostMsg::DiscardCopy { volume, reply } => {
                let _ = reply.send(self.engine.discard_copy(volume));
            }
            HostMsg::RescueCopy { volume, reply } => {
                let r = self.engine.rescue_copy(volume);
                if let Err(e) = &r {
                    tracing::error!("{volume}: cannot destage the copy kept here: {e}");
                }
                let _ = reply.send(r);
            }
            HostMsg::AbsorbRescue { volume, upto, served, reply } => {
                let _ = reply.send(self.engine.absorb_rescue(volume, upto, served));
            }
            HostMsg::LastSeq { volume, reply } => {
                let _ = reply.send(self.engine.last_seq(volume));
            }
            HostMsg::ServeCopy { volume, on, blocks, reply } => {
                let r = self.engine.serve_copy(volume, on, blocks).map(|()| self.engine.served_ops(volume));
                let _ = reply.send(r);
            }
            HostMsg::EndRescue { volume, abort, reply } => {
                let _ = reply.send(self.engine.end_rescue(volume, abort));
            }
            HostMsg::SetPolicy { volume, policy, copies, reply } => {
                let have = self.engine.volume_copies(volume);
                let r = if copies.is_some_and(|n| n != have) {
                    Err(format!(
                        "volume {} keeps {have} replica(s) as configured; changing how many needs a configuration \
                         change and a restart",
                        volume.0
                    ))
                } else if self.engine.set_policy(volume, policy) {
                    let m = self.engine.volume_metrics(volume);
                    let dirty = m.as_ref().map_or(0, |m| m.dirty_bytes);
                    let eff = m.map_or(policy, |m| m.effective);
                    let shown = if policy == WritePolicy::WriteBack && have > 0 {
                        format!("write-back+{have}")
                    } else {
                        policy.to_string()
                    };
                    let mut line = format!("volume {}: requested {shown}, effective {eff}", volume.0);
                    if policy == WritePolicy::WriteThrough && dirty > 0 {
                        line.push_str(&format!("; destaging {} of dirty data", super::status::human_bytes(dirty)));
                    }
                    Ok(line)
                } else {
                    Err(format!("no volume {} on this device", volume.0))
                };
                let _ = reply.send(r);
            }
        }
    }

    pub fn status(&self) -> DeviceStatus {
        let mut s = DeviceStatus::of_engine(&self.name, &self.path.display().to_string(), &self.engine, |id| {
            self.names.get(&id.0).cloned().unwrap_or_default()
        });
        (s.fabric_write_bytes, s.fabric_staged_copies) = self.hub.stats();
        s
    }

    fn route_completions(&mut self) {
        self.engine.drain_completions(&mut self.done);
        if self.done.is_empty() {
            return;
        }
        let local = self.local.borrow();
        for d in self.done.drain(..) {
            let route = (d.token >> 32) as u32;
            let c = Completion { token: d.token as u32, status: d.status, buf: d.buf };
            if let Some(q) = local.completions.get(&route) {
                q.borrow_mut().push_back(c);
            } else if let Some(p) = self.ports.get(&route) {
                if p.tx.try_send(c).is_err() {
                    // Sized for every command a channel may have in flight: our bug if full.
                    error!(route, "a volume channel's reply queue is full; a completion is lost");
                }
                if !self.touched.contains(&route) {
                    self.touched.push(route);
                }
            }
        }
        drop(local);
        for route in self.touched.drain(..) {
            if let Some(p) = self.ports.get(&route) {
                crate::reactor::wake(&p.efd);
            }
        }
    }

    fn send_to_destage(&mut self, now: u64) {
        self.backlog.extend(self.outbox.drain(..));
        let mut urgent = false;
        while let Some(m) = self.backlog.pop_front() {
            let dirty_blocks = match &m {
                ToDestage::Dirty { records, .. } => Some(records.iter().map(|r| r.blocks).sum::<u64>()),
                ToDestage::Pressure(_) => Some(0),
                _ => None,
            };
            match self.to_destage.try_send((self.dev, m)) {
                Ok(()) => match dirty_blocks {
                    Some(blocks) => {
                        self.unwoken_blocks += blocks;
                        self.unwoken_since_ns.get_or_insert(now);
                    }
                    None => urgent = true,
                },
                Err(TrySendError::Full((_, m))) => {
                    self.backlog.push_front(m);
                    // The destage core is behind: make sure it is not asleep.
                    urgent = true;
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.backlog.clear();
                    break;
                }
            }
        }
        let due = self.unwoken_blocks >= DIRTY_WAKE_BLOCKS
            || self.unwoken_since_ns.is_some_and(|t| now.saturating_sub(t) >= DIRTY_WAKE_AFTER_NS);
        if urgent || due {
            self.wake_destage();
        }
    }

    /// Wakes the destage core if it sleeps; everything sent so far counts as seen.
    fn wake_destage(&mut self) {
        self.unwoken_blocks = 0;
        self.unwoken_since_ns = None;
        self.destage_waker.wake_if_sleeping();
    }

    fn log_events(&mut self) {
        self.engine.drain_events(&mut self.events);
        for e in self.events.drain(..) {
            match e {
                EngineEvent::FlashDegraded => {
                    error!("flash {}: write error: its volumes run write-through until its log drains", self.name)
                }
                EngineEvent::FlashHealthy => info!("flash {} healthy again: volumes back to their policies", self.name),
                EngineEvent::SanUnreachable { volume } => {
                    warn!("{volume}: SAN unreachable for host I/O; retrying with back-off")
                }
                EngineEvent::SanReachable { volume } => info!("{volume}: SAN reachable again for host I/O"),
                EngineEvent::LinkDown { link, volume, why } => {
                    warn!("{volume}: replication {link} down: {why}");
                    let armed = self.hub.0.borrow().links.get(&link).is_some_and(|l| l.armed);
                    self.hub.remove(link);
                    if armed {
                        self.to_cancel.push(link);
                    }
                    if let Some(tx) = &self.link_down {
                        let _ = tx.send((link, why));
                    }
                }
            }
        }
    }
}

/// The eventfd a host's senders write (shared with them).
pub(crate) fn host_waker() -> std::io::Result<Arc<Waker>> {
    Ok(Arc::new(Waker { efd: crate::reactor::new_eventfd()?, sleeping: AtomicBool::new(false) }))
}
