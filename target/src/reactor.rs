//! A reactor: one thread pinned to one core that owns its connections, its bdev channels and
//! its io_uring, and polls them all in one loop (SPDK's reactor, in Rust). Other threads reach
//! it only through its message channel plus an eventfd that wakes it.
//!
//! **Adaptive polling.** While there was work within the last `idle_poll` (a configured few
//! hundred µs), the loop spins: submit, reap, repeat — waking a sleeping thread costs ~45 µs on
//! these machines (shared/PERF.md), more than a whole polled round trip. Once idle for longer,
//! it sleeps in `io_uring_enter` until a completion arrives: a socket receive, a device
//! completion, or the eventfd. An idle target therefore uses ~0% CPU.
//!
//! **Waiting on the kernel.** Some device I/O is finished by the kernel's own threads, which
//! need a core: a flash file's `fdatasync` (the second half of every log frame on a file, see
//! `stager_nvme::bdev::file`) runs in an io-wq worker. A reactor that spins while such I/O is
//! all it waits for competes with that worker — and on a machine whose other cores spin too
//! (a busy-polling host, other reactors) the worker waits for a scheduler tick. So a turn that
//! found nothing to do, while a channel or poller says it [waits on the
//! kernel](stager_nvme::bdev::BdevChannel::waits_on_kernel), yields the core (`sched_yield`)
//! instead of spinning, for up to [`KERNEL_YIELD_FOR`]: a worker queued here runs at once, and
//! the core stays awake (a core that sleeps and is woken again cost each QD1 write ~40 µs on a
//! virtual machine). Past that window it sleeps in `io_uring_enter` (woken by that completion,
//! socket data or the eventfd), so a worker queued behind a spinning thread elsewhere moves
//! here. Memory namespaces and polled devices never say so: their reactors spin as before.
//!
//! **Pollers.** Besides connections and namespace channels, a reactor runs [`Poller`]s: the
//! engine hosts of the flash devices it owns (`volume/host.rs`), polled every turn right after
//! the completions are dispatched, so a command received in a turn reaches its engine — and
//! its log write the ring — in that same turn. A poller's ring operations come back under
//! `kind::BDEV` with an `a` past the namespace channels.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, types};
use stager_nvme::bdev::{BdevChannel, BdevDone, BufPool};
use stager_nvme::uring::{kind, split, user_data, Ring, ZC_MORE};
use tracing::{debug, error, info, warn};

use crate::constants::{
    CLOCK_READ_EVERY, CONNECTION_TIMER, KERNEL_YIELD_FOR, MSG_CHECK_EVERY, POOL_KEEP_BYTES, POOL_KEEP_PER_CLASS,
    RING_ENTRIES, SLEEP_MAX, TIMER_TICK, TRIM_INTERVAL,
};
use crate::subsystem::TargetShared;
use crate::transport::tcp::Connection;
use crate::transport::ReactorCtx;

/// Something a reactor polls every turn besides its connections: a flash device's engine host.
pub trait Poller {
    /// One turn of work; returns how much was done (0 = idle).
    fn poll(&mut self, ring: &mut Ring) -> usize;
    /// A completion of one of its ring operations (`slot` from its `user_data`).
    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring);
    /// Asked before the reactor sleeps: false if something is already waiting for it. Saying
    /// true means senders must wake the reactor from now on.
    fn prepare_sleep(&mut self) -> bool;
    /// The reactor is awake again.
    fn woke(&mut self);
    /// Device I/O in flight (a stopping reactor lets it finish).
    fn busy(&self) -> bool;
    /// Device I/O in flight waits for kernel threads (see "Waiting on the kernel" above).
    fn waits_on_kernel(&self) -> bool;
}

impl Poller for crate::volume::host::EngineHost {
    fn poll(&mut self, ring: &mut Ring) -> usize {
        crate::volume::host::EngineHost::poll(self, ring)
    }
    fn on_cqe(&mut self, slot: u32, res: i32, ring: &mut Ring) {
        crate::volume::host::EngineHost::on_cqe(self, slot, res, ring)
    }
    fn prepare_sleep(&mut self) -> bool {
        crate::volume::host::EngineHost::prepare_sleep(self)
    }
    fn woke(&mut self) {
        crate::volume::host::EngineHost::woke(self)
    }
    fn busy(&self) -> bool {
        crate::volume::host::EngineHost::busy(self)
    }
    fn waits_on_kernel(&self) -> bool {
        crate::volume::host::EngineHost::waits_on_kernel(self)
    }
}

/// How the loop waits for its next events, decided at the top of every turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Submit and reap without sleeping.
    Spin,
    /// The same, after yielding the core to any runnable thread (kernel workers).
    Yield,
    /// Sleep in `io_uring_enter` until a completion or the timer (if every poller agrees).
    Sleep,
}

/// `since_work`: time since the last turn that did work; `idle_turn`: the last turn did none;
/// `kernel_io`: how long device I/O in flight has waited for kernel threads through idle turns
/// (see "Waiting on the kernel"), if it does.
fn wait_for(
    since_work: std::time::Duration,
    idle_poll: std::time::Duration,
    idle_turn: bool,
    kernel_io: Option<std::time::Duration>,
) -> Wait {
    match kernel_io.filter(|_| idle_turn) {
        _ if since_work >= idle_poll => Wait::Sleep,
        Some(waited) if waited < KERNEL_YIELD_FOR => Wait::Yield,
        Some(_) => Wait::Sleep,
        None => Wait::Spin,
    }
}

/// How long a stopping reactor waits for its pollers' device I/O.
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

pub enum ReactorMsg {
    /// A new connection, its peer, and the listener (index) it came through.
    Connection(TcpStream, SocketAddr, usize),
    /// Finish in-flight I/O, close every connection, exit.
    Stop,
}

/// The handle other threads keep to talk to a reactor.
pub struct ReactorHandle {
    pub id: usize,
    tx: Sender<ReactorMsg>,
    wake: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl ReactorHandle {
    pub fn send(&self, msg: ReactorMsg) {
        if self.tx.send(msg).is_ok() {
            wake(&self.wake);
        }
    }

    pub fn stop_and_join(&mut self) {
        self.send(ReactorMsg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new non-blocking eventfd: the wake-up of a reactor or of a channel's reply queue.
pub(crate) fn new_eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor or -1; we check before taking ownership.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: raw is a valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Signals an eventfd made by [`new_eventfd`].
pub(crate) fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    unsafe {
        libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8);
    }
}

/// Returns free heap pages to the system (glibc keeps them in its arenas otherwise).
fn trim_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases memory malloc itself considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Starts reactor `id` pinned to `core`. Returns once its ring and channels are open.
pub fn spawn(id: usize, core: Option<usize>, target: Arc<TargetShared>) -> std::io::Result<ReactorHandle> {
    let wake_fd = Arc::new(new_eventfd()?);
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let wake2 = wake_fd.clone();
    let thread = std::thread::Builder::new().name(format!("reactor-{id}")).spawn(move || {
        if let Some(c) = core {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
                warn!("reactor {id}: could not pin to core {c}; running unpinned");
            }
        }
        match Reactor::new(id, target, rx, wake2) {
            Ok(mut r) => {
                let _ = ready_tx.send(Ok(()));
                r.run();
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(ReactorHandle { id, tx, wake: wake_fd, thread: Some(thread) }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(std::io::Error::other(format!("reactor {id} died while starting"))),
    }
}

struct Reactor {
    id: usize,
    target: Arc<TargetShared>,
    ring: Ring,
    channels: Vec<Box<dyn BdevChannel>>,
    pool: BufPool,
    rx: Receiver<ReactorMsg>,
    wake_fd: Arc<OwnedFd>,
    /// The eventfd read lands here; boxed so its address is stable while the read is armed.
    wake_buf: Box<[u8; 8]>,
    conns: Vec<Option<Connection>>,
    free_conns: Vec<u32>,
    stopping: bool,
    /// Engine hosts of the flash devices this reactor owns.
    pollers: Vec<Box<dyn Poller>>,
    /// Connections were released since the allocator last gave free memory back to the system.
    trim_due: bool,
    /// Connections that had an event this iteration: only they are re-armed, so a thousand
    /// idle connections cost a busy reactor nothing per iteration.
    dirty: Vec<u32>,
}

impl Reactor {
    fn new(
        id: usize,
        target: Arc<TargetShared>,
        rx: Receiver<ReactorMsg>,
        wake_fd: Arc<OwnedFd>,
    ) -> std::io::Result<Reactor> {
        let ring = Ring::new(RING_ENTRIES)?;
        // Engines first: this reactor's volume channels find their device's host when they open.
        let mut pollers: Vec<Box<dyn Poller>> = Vec::new();
        if let Some(v) = &target.volumes {
            for plan in v.take_plans(id) {
                let channel_id = (target.namespaces.len() + pollers.len()) as u32;
                let host = crate::volume::host::EngineHost::new(plan, channel_id)
                    .map_err(|e| std::io::Error::other(format!("reactor {id}: {e}")))?;
                pollers.push(Box::new(host));
            }
        }
        let mut channels = Vec::with_capacity(target.namespaces.len());
        for ns in &target.namespaces {
            channels.push(ns.bdev.channel(ns.channel).map_err(|e| {
                std::io::Error::other(format!("reactor {id}: cannot open a channel on {}: {e}", ns.bdev.info().name))
            })?);
        }
        let mut r = Reactor {
            id,
            target,
            ring,
            channels,
            pool: BufPool::new(POOL_KEEP_PER_CLASS).with_byte_limit(POOL_KEEP_BYTES),
            rx,
            wake_fd,
            wake_buf: Box::new([0; 8]),
            conns: Vec::new(),
            free_conns: Vec::new(),
            stopping: false,
            pollers,
            trim_due: false,
            dirty: Vec::with_capacity(1024),
        };
        r.arm_wake();
        Ok(r)
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(kind::WAKE, 0, 0));
        self.ring.push(e);
    }

    fn run(&mut self) {
        debug!("reactor {} running", self.id);
        let idle_poll = self.target.limits.idle_poll;
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(1024);
        let mut done: Vec<BdevDone> = Vec::with_capacity(1024);
        let mut last_work = Instant::now();
        let mut next_tick = Instant::now() + TIMER_TICK;
        let mut last_trim = Instant::now();
        let mut next_conn_tick = Instant::now() + CONNECTION_TIMER;
        let mut now = Instant::now();
        let mut stop_since: Option<Instant> = None;
        let mut iteration = 0u32;
        // The target's ANA change count last acted on (see `ana.rs`).
        let mut ana_seen = self.target.ana_changes.load(std::sync::atomic::Ordering::Acquire);
        // Messages come with a write to the wake eventfd, whose read completes in the ring:
        // the channel is looked at after that (and every MSG_CHECK_EVERY iterations, to be safe)
        // rather than on every turn of a spinning loop.
        let mut msgs_due = true;
        // The last turn did nothing (see `wait_for`).
        let mut idle_turn = false;
        // Since when idle turns have waited on kernel threads (see "Waiting on the kernel").
        let mut kernel_since: Option<Instant> = None;
        loop {
            iteration = iteration.wrapping_add(1);
            let mut work = 0usize;
            if msgs_due || iteration.is_multiple_of(MSG_CHECK_EVERY) {
                msgs_due = false;
                self.drain_messages(&mut work);
            }
            if self.stopping && self.conns.iter().all(|c| c.is_none()) {
                let since = *stop_since.get_or_insert_with(Instant::now);
                let busy = self.pollers.iter().any(|p| p.busy());
                if !busy || since.elapsed() > STOP_DRAIN {
                    if busy {
                        warn!("reactor {}: stopping with flash I/O still in flight", self.id);
                    }
                    info!("reactor {} stopped", self.id);
                    return;
                }
            }
            cqes.clear();
            // `now` is an earlier reading here. A spinning reactor spent ~15% of its time in
            // clock_gettime when it read it twice per iteration, and 5% with once: it is read
            // after a sleep and every CLOCK_READ_EVERY iterations (a few µs of spinning, or a
            // few batches of work: timers, timeouts and the spin window need far less).
            let kernel_io = idle_turn
                && (self.pollers.iter().any(|p| p.waits_on_kernel())
                    || self.channels.iter().any(|c| c.waits_on_kernel()));
            if !kernel_io {
                kernel_since = None;
            }
            let kernel_waited = kernel_io.then(|| now.duration_since(*kernel_since.get_or_insert(now)));
            let wait = wait_for(now.duration_since(last_work), idle_poll, idle_turn, kernel_waited);
            if wait == Wait::Yield {
                // SAFETY: sched_yield takes no arguments and touches no memory of ours.
                unsafe { libc::sched_yield() };
            }
            let mut spin = wait != Wait::Sleep;
            if !spin {
                // Every poller must agree (and from then on be woken by its senders).
                let mut all = true;
                for p in self.pollers.iter_mut() {
                    all &= p.prepare_sleep();
                }
                spin = !all;
            }
            let reaped = if spin {
                self.ring.submit_and_reap(&mut cqes)
            } else {
                let until_tick = next_tick.saturating_duration_since(now).max(std::time::Duration::from_micros(100));
                let r = self.ring.submit_and_wait(until_tick.min(SLEEP_MAX), &mut cqes);
                for p in self.pollers.iter_mut() {
                    p.woke();
                }
                r
            };
            if let Err(e) = reaped {
                error!("reactor {}: io_uring_enter failed: {e}", self.id);
            }
            if !spin || wait == Wait::Yield || iteration.is_multiple_of(CLOCK_READ_EVERY) {
                now = Instant::now();
            }
            work += cqes.len();
            let Reactor { ring, channels, pool, target, conns, pollers, dirty, .. } = self;
            let mut cx = ReactorCtx { ring, channels, pool, target, reactor: self.id, now };
            let mut rearm_wake = false;
            for &(ud, res) in &cqes {
                let (k, a, b) = split(ud);
                match k {
                    kind::SOCKET_RECV => {
                        if let Some(Some(c)) = conns.get_mut(a as usize) {
                            c.on_recv(res, &mut cx);
                            dirty.push(a);
                        }
                    }
                    kind::SOCKET_SEND | kind::SOCKET_SEND_ZC => {
                        if let Some(Some(c)) = conns.get_mut(a as usize) {
                            c.on_send(res, k == kind::SOCKET_SEND_ZC && b & ZC_MORE != 0, &mut cx);
                            dirty.push(a);
                        }
                    }
                    kind::SOCKET_SEND_NOTIF => {
                        if let Some(Some(c)) = conns.get_mut(a as usize) {
                            c.on_send_notif(b, &mut cx);
                            dirty.push(a);
                        }
                    }
                    kind::BDEV => {
                        let n = cx.channels.len();
                        if let Some(ch) = cx.channels.get_mut(a as usize) {
                            ch.on_cqe(b, res, cx.ring);
                        } else if let Some(p) = pollers.get_mut((a as usize).wrapping_sub(n)) {
                            p.on_cqe(b, res, cx.ring);
                        }
                    }
                    kind::WAKE => {
                        rearm_wake = true;
                        msgs_due = true;
                    }
                    _ => warn!("reactor {}: completion with unknown owner {ud:#x}", self.id),
                }
            }
            // Engines run before the channels are polled: what they finish this turn is
            // answered this turn.
            for p in pollers.iter_mut() {
                work += p.poll(cx.ring);
            }
            done.clear();
            for ch in cx.channels.iter_mut() {
                ch.poll(&mut done);
            }
            work += done.len();
            for d in done.drain(..) {
                let (ci, slot) = ((d.token >> 32) as usize, d.token as u16);
                if let Some(Some(c)) = conns.get_mut(ci) {
                    c.on_bdev_done(slot, d, &mut cx);
                    dirty.push(ci as u32);
                }
            }
            let tick = now >= next_tick;
            if tick {
                next_tick = now + TIMER_TICK;
                // ANA states changed: controllers with a pending notice answer a held AER.
                let ana_now = cx.target.ana_changes.load(std::sync::atomic::Ordering::Acquire);
                if ana_now != ana_seen {
                    ana_seen = ana_now;
                    for (i, slot) in conns.iter_mut().enumerate() {
                        if let Some(c) = slot.as_mut() {
                            c.post_async_events();
                            dirty.push(i as u32);
                        }
                    }
                }
            }
            if tick && now >= next_conn_tick {
                next_conn_tick = now + CONNECTION_TIMER;
                for (i, slot) in conns.iter_mut().enumerate() {
                    if let Some(c) = slot.as_mut() {
                        c.tick(now, &mut cx);
                        dirty.push(i as u32);
                    }
                }
            }
            dirty.sort_unstable();
            dirty.dedup();
            for i in dirty.drain(..) {
                let Some(slot) = conns.get_mut(i as usize) else { continue };
                let Some(c) = slot.as_mut() else { continue };
                c.arm(&mut cx);
                if c.finished() {
                    if let Some(mut c) = slot.take() {
                        c.release(&mut cx);
                        debug!("reactor {}: connection from {} released", self.id, c.peer);
                    }
                    self.free_conns.push(i);
                    self.trim_due = true;
                }
            }
            if rearm_wake {
                self.arm_wake();
            }
            if tick && self.trim_due && now.duration_since(last_trim) >= TRIM_INTERVAL {
                // Closed connections' memory went back to malloc, which keeps it in its arenas;
                // hand the free pages back so stagerd's RSS falls back when hosts leave.
                self.trim_due = false;
                last_trim = now;
                trim_allocator();
            }
            if work > 0 {
                last_work = now;
            }
            idle_turn = work == 0;
        }
    }

    /// Takes every message waiting on the reactor's channel.
    fn drain_messages(&mut self, work: &mut usize) {
        while let Ok(msg) = self.rx.try_recv() {
            *work += 1;
            match msg {
                ReactorMsg::Connection(s, peer, listener) => self.add(s, peer, listener),
                ReactorMsg::Stop => {
                    self.stopping = true;
                    for (i, c) in self.conns.iter_mut().enumerate() {
                        if let Some(c) = c {
                            c.close("target shutting down");
                            self.dirty.push(i as u32);
                        }
                    }
                }
            }
        }
    }

    fn add(&mut self, stream: TcpStream, peer: SocketAddr, listener: usize) {
        let _ = stream.set_nodelay(true);
        let idx = self.free_conns.pop().unwrap_or_else(|| {
            self.conns.push(None);
            (self.conns.len() - 1) as u32
        });
        let Reactor { ring, channels, pool, target, .. } = self;
        let cx = ReactorCtx { ring, channels, pool, target, reactor: self.id, now: Instant::now() };
        let conn = Connection::new(idx, stream, peer, listener, &cx);
        debug!("reactor {}: new connection from {peer}", self.id);
        self.conns[idx as usize] = Some(conn);
        self.dirty.push(idx);
    }
}

#[cfg(test)]
mod tests {
    use super::{wait_for, Wait, KERNEL_YIELD_FOR};
    use std::time::Duration;

    const IDLE_POLL: Duration = Duration::from_micros(1000);

    #[test]
    fn spins_while_recent_work_and_sleeps_once_idle_poll_has_passed() {
        let recent = Duration::from_micros(10);
        assert_eq!(wait_for(recent, IDLE_POLL, false, None), Wait::Spin);
        // An idle turn alone is no reason to sleep: the next command may be on the wire.
        assert_eq!(wait_for(recent, IDLE_POLL, true, None), Wait::Spin);
        assert_eq!(wait_for(IDLE_POLL, IDLE_POLL, true, None), Wait::Sleep);
        assert_eq!(wait_for(IDLE_POLL, IDLE_POLL, false, Some(Duration::ZERO)), Wait::Sleep);
        // idle_poll_us: 0 sleeps as soon as there is no work.
        assert_eq!(wait_for(Duration::ZERO, Duration::ZERO, false, None), Wait::Sleep);
    }

    /// Issue 8: a log frame's fdatasync waited ~1.3 ms for an io-wq worker while the reactor
    /// spun next to a busy-polling host; sleeping through it instead cost every QD1 write
    /// ~40 µs of waking the core again.
    #[test]
    fn an_idle_turn_with_io_waiting_on_kernel_threads_yields_then_sleeps() {
        let recent = Duration::from_micros(10);
        assert_eq!(wait_for(recent, IDLE_POLL, true, Some(Duration::ZERO)), Wait::Yield);
        assert_eq!(wait_for(recent, IDLE_POLL, true, Some(KERNEL_YIELD_FOR / 2)), Wait::Yield);
        assert_eq!(wait_for(recent, IDLE_POLL, true, Some(KERNEL_YIELD_FOR)), Wait::Sleep);
        // A turn that did work spins once more: what it queued may complete at once.
        assert_eq!(wait_for(recent, IDLE_POLL, false, Some(KERNEL_YIELD_FOR)), Wait::Spin);
    }
}
