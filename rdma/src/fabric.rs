//! A node's fabric: its configuration, the set-up listener and its accept thread, outbound
//! connects, and region allocation. Everything here is control plane and may block on its own
//! thread; endpoints it hands out are polled by reactors.
//!
//! The accept thread waits on the listener and a stop eventfd; each new connection gets a short
//! handshake thread of its own (at most `HANDSHAKES_MAX` at once, each bounded by
//! `HANDSHAKE_TIMEOUT`), so a silent or hostile client delays no one. Authenticated endpoints go
//! out through a bounded channel (`incoming()`).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use rand::RngCore;
use tracing::{info, warn};

use crate::constants::{HANDSHAKES_MAX, HANDSHAKE_TIMEOUT, INCOMING_MAX};
use crate::handshake::{self, SetupConn};
use crate::region::Region;
use crate::tcp::TcpEndpoint;
use crate::wire::setup::{self, valid_node_id};
use crate::{Endpoint, FabricError};

/// Which backend moves the bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FabricKind {
    /// One-sided semantics in software over TCP (any machine).
    #[default]
    Tcp,
    /// RDMA verbs, RC queue pairs (needs the `verbs` cargo feature and an RDMA device).
    Verbs,
}

#[derive(Clone, Debug)]
pub struct FabricConfig {
    pub kind: FabricKind,
    /// This node's id (1..=64 of `[A-Za-z0-9._:-]`).
    pub node: String,
    /// The set-up listener (TCP, both backends); port 0 picks one (see `Fabric::local_addr`).
    pub listen: SocketAddr,
    /// The cluster secret: nodes prove they hold it to each other (HMAC-SHA256 challenges).
    pub secret: Vec<u8>,
    /// Node ids allowed to connect; anyone else is refused with a log line.
    pub peers: Vec<String>,
    /// Verbs: the device (e.g. "rxe0"); None = the first one.
    pub verbs_device: Option<String>,
    /// Verbs: the GID index on port 1; None = an IPv4-mapped RoCE GID if the port has one, else 0.
    pub verbs_gid_index: Option<u8>,
    /// A peer silent for longer than this (heartbeats every quarter of it) fails its endpoint.
    pub peer_timeout: Duration,
}

impl Default for FabricConfig {
    fn default() -> FabricConfig {
        FabricConfig {
            kind: FabricKind::Tcp,
            node: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            secret: Vec::new(),
            peers: Vec::new(),
            verbs_device: None,
            verbs_gid_index: None,
            peer_timeout: Duration::from_secs(5),
        }
    }
}

/// What the accept thread, the handshakes and the endpoints share.
pub(crate) struct Shared {
    pub node: String,
    pub secret: Vec<u8>,
    pub peers: Vec<String>,
    pub kind: FabricKind,
    pub peer_timeout: Duration,
    stopped: AtomicBool,
    /// Exposure keys of the tcp backend: unique in this fabric, so a key that reaches the wrong
    /// endpoint is unknown there rather than naming another region.
    next_key: AtomicU32,
    refusals: AtomicU64,
    #[cfg(feature = "verbs")]
    pub device: Option<Arc<crate::verbs::Device>>,
}

impl Shared {
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    pub fn next_key(&self) -> u32 {
        loop {
            let k = self.next_key.fetch_add(1, Ordering::Relaxed);
            if k != 0 {
                return k;
            }
        }
    }

    pub fn kind_byte(&self) -> u8 {
        match self.kind {
            FabricKind::Tcp => setup::KIND_TCP,
            FabricKind::Verbs => setup::KIND_VERBS,
        }
    }
}

/// A node's fabric. Cheap to clone (`Send + Sync`); the last clone dropped stops it.
#[derive(Clone)]
pub struct Fabric {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    incoming: Receiver<Endpoint>,
    stop_fd: OwnedFd,
    accept_thread: Mutex<Option<JoinHandle<()>>>,
}

fn validate(cfg: &FabricConfig) -> Result<(), FabricError> {
    if !valid_node_id(cfg.node.as_bytes()) {
        return Err(FabricError::Config(format!(
            "node id {:?}: use 1 to 64 ASCII letters, digits, '-', '_', '.', ':'",
            cfg.node
        )));
    }
    if let Some(p) = cfg.peers.iter().find(|p| !valid_node_id(p.as_bytes())) {
        return Err(FabricError::Config(format!(
            "peer id {p:?}: use 1 to 64 ASCII letters, digits, '-', '_', '.', ':'"
        )));
    }
    if cfg.secret.len() < 16 {
        return Err(FabricError::Config(format!(
            "the cluster secret has {} bytes; use at least 16 (random)",
            cfg.secret.len()
        )));
    }
    if cfg.peer_timeout < Duration::from_millis(10) {
        return Err(FabricError::Config(format!(
            "peer_timeout of {:?} is too short (at least 10 ms)",
            cfg.peer_timeout
        )));
    }
    Ok(())
}

impl Fabric {
    /// Binds the set-up listener and starts accepting. For `Verbs`, opens the device first (an
    /// error if the build lacks the `verbs` feature or there is no such device).
    pub fn start(cfg: FabricConfig) -> Result<Fabric, FabricError> {
        validate(&cfg)?;
        #[cfg(feature = "verbs")]
        let device = match cfg.kind {
            FabricKind::Verbs => {
                Some(Arc::new(crate::verbs::Device::open(cfg.verbs_device.as_deref(), cfg.verbs_gid_index)?))
            }
            FabricKind::Tcp => None,
        };
        #[cfg(not(feature = "verbs"))]
        if cfg.kind == FabricKind::Verbs {
            return Err(FabricError::VerbsNotBuilt);
        }
        let listener =
            TcpListener::bind(cfg.listen).map_err(|e| FabricError::io(format!("fabric listener {}", cfg.listen), e))?;
        let local_addr = listener.local_addr().map_err(|e| FabricError::io("fabric listener address", e))?;
        listener.set_nonblocking(true).map_err(|e| FabricError::io("fabric listener", e))?;
        // SAFETY: eventfd returns a new descriptor (checked) that we own from here on.
        let stop_fd = unsafe {
            let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
            if fd < 0 {
                return Err(FabricError::io("eventfd", std::io::Error::last_os_error()));
            }
            OwnedFd::from_raw_fd(fd)
        };
        let shared = Arc::new(Shared {
            node: cfg.node,
            secret: cfg.secret,
            peers: cfg.peers,
            kind: cfg.kind,
            peer_timeout: cfg.peer_timeout,
            stopped: AtomicBool::new(false),
            next_key: AtomicU32::new(rand::rngs::OsRng.next_u32() | 1),
            refusals: AtomicU64::new(0),
            #[cfg(feature = "verbs")]
            device,
        });
        let (tx, rx) = crossbeam_channel::bounded(INCOMING_MAX);
        let thread_shared = shared.clone();
        let stop_raw = stop_fd.as_raw_fd();
        let accept_thread = std::thread::Builder::new()
            .name(format!("fabric-accept-{}", shared.node))
            .spawn(move || accept_loop(listener, stop_raw, thread_shared, tx))
            .map_err(|e| FabricError::io("spawning the fabric accept thread", e))?;
        info!(node = %shared.node, kind = ?shared.kind, %local_addr, "fabric: listening");
        Ok(Fabric {
            inner: Arc::new(Inner {
                shared,
                local_addr,
                incoming: rx,
                stop_fd,
                accept_thread: Mutex::new(Some(accept_thread)),
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.inner.shared.node
    }

    /// Authenticated inbound endpoints.
    pub fn incoming(&self) -> &Receiver<Endpoint> {
        &self.inner.incoming
    }

    /// Handshakes refused so far, either side (wrong secret, unknown node, wrong peer, ...).
    pub fn refusals(&self) -> u64 {
        self.inner.shared.refusals.load(Ordering::Relaxed)
    }

    /// Connects to `peer` at `addr`, authenticates both ways, and returns the endpoint. Blocks for
    /// at most `timeout` (connect + handshake + queue-pair set-up).
    pub fn connect(&self, addr: SocketAddr, peer: &str, timeout: Duration) -> Result<Endpoint, FabricError> {
        let shared = &self.inner.shared;
        if shared.stopped() {
            return Err(FabricError::Stopped);
        }
        if !valid_node_id(peer.as_bytes()) {
            return Err(FabricError::Config(format!("peer id {peer:?} is not a valid node id")));
        }
        let deadline = Instant::now() + timeout;
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                FabricError::Timeout(format!("connecting to {peer} at {addr}"))
            }
            _ => FabricError::io(format!("connecting to {peer} at {addr}"), e),
        })?;
        let mut conn = SetupConn::new(stream, addr, deadline);
        let r = handshake::connect(&mut conn, shared, peer).and_then(|()| establish(shared.clone(), conn, peer, false));
        if let Err(FabricError::Refused(_)) = &r {
            shared.refusals.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// `len` zeroed, page-aligned bytes to expose on endpoints.
    pub fn alloc_region(&self, len: usize) -> Result<Region, FabricError> {
        Region::alloc(len)
    }

    /// Stops accepting, and fails every endpoint of this fabric on its next `poll()`
    /// (`Failed(Stopped)`). Idempotent.
    pub fn stop(&self) {
        let inner = &self.inner;
        if !inner.shared.stopped.swap(true, Ordering::AcqRel) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from `one` to our eventfd.
            unsafe { libc::write(inner.stop_fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
        let handle = inner.accept_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from `one` to our eventfd.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(h) = self.accept_thread.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = h.join();
        }
    }
}

/// Turns an authenticated set-up connection into an endpoint of the fabric's kind.
fn establish(shared: Arc<Shared>, conn: SetupConn, peer: &str, accepting: bool) -> Result<Endpoint, FabricError> {
    match shared.kind {
        FabricKind::Tcp => {
            let _ = accepting;
            let (stream, leftover) = conn.into_parts();
            Ok(Endpoint::tcp(TcpEndpoint::new(shared, stream, peer.to_string(), &leftover)?))
        }
        #[cfg(feature = "verbs")]
        FabricKind::Verbs => crate::verbs::VerbsEndpoint::establish(shared, conn, peer, accepting).map(Endpoint::verbs),
        #[cfg(not(feature = "verbs"))]
        FabricKind::Verbs => Err(FabricError::VerbsNotBuilt),
    }
}

fn accept_loop(listener: TcpListener, stop_fd: i32, shared: Arc<Shared>, out: Sender<Endpoint>) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        // At the cap, leave new connections in the backlog (a readable listener would make
        // this loop spin) and look again every 50 ms.
        let at_cap = active.load(Ordering::Acquire) >= HANDSHAKES_MAX;
        let mut fds = [
            libc::pollfd { fd: listener.as_raw_fd(), events: if at_cap { 0 } else { libc::POLLIN }, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        let timeout_ms = if at_cap { 50 } else { -1 };
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if shared.stopped() {
            break;
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!("fabric: accept poll failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        }
        while active.load(Ordering::Acquire) < HANDSHAKES_MAX {
            let (stream, remote) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("fabric: accept failed: {e}");
                    break;
                }
            };
            let _ = stream.set_nonblocking(false);
            active.fetch_add(1, Ordering::AcqRel);
            let (shared, out, active2) = (shared.clone(), out.clone(), active.clone());
            let spawned = std::thread::Builder::new().name("fabric-handshake".into()).spawn(move || {
                handshake_one(stream, remote, &shared, &out);
                active2.fetch_sub(1, Ordering::AcqRel);
            });
            if let Err(e) = spawned {
                warn!(%remote, "fabric: cannot start a handshake thread: {e}");
                active.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

fn handshake_one(stream: TcpStream, remote: SocketAddr, shared: &Arc<Shared>, out: &Sender<Endpoint>) {
    let mut conn = SetupConn::new(stream, remote, Instant::now() + HANDSHAKE_TIMEOUT);
    let ep = handshake::accept(&mut conn, shared).and_then(|peer| establish(shared.clone(), conn, &peer, true));
    match ep {
        Ok(ep) => {
            if shared.stopped() {
                return;
            }
            match out.try_send(ep) {
                Ok(()) => {}
                Err(TrySendError::Full(ep)) => {
                    warn!(peer = ep.peer(), "fabric: {INCOMING_MAX} endpoints wait in incoming(); closing this one")
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        Err(e) => {
            if let FabricError::Refused(_) = e {
                shared.refusals.fetch_add(1, Ordering::Relaxed);
            } else {
                warn!(%remote, "fabric: set-up failed: {e}");
            }
        }
    }
}
