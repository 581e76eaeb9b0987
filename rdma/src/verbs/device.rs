//! One opened RDMA device, shared by every endpoint of a fabric: its context, the port and GID
//! endpoints use, and a thread that reads the device's asynchronous events (queue-pair and CQ
//! errors, device fatal) and marks the endpoints they concern failed.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rdma_sys::*;
use tracing::{info, warn};

use super::{c_text, errno_text, last_errno};
use crate::FabricError;

/// The port every endpoint uses (Soft-RoCE and most NICs have one per device).
pub(crate) const PORT: u8 = 1;

/// Set by the async-event thread for one endpoint: the `ibv_event_type` + 1 that killed it
/// (0 = none), and the eventfd in the endpoint's `wait_fd` to wake its reactor.
pub(crate) struct AsyncFlag {
    pub event: AtomicU32,
    pub wake: OwnedFd,
}

/// `ibv_async_event` with the event type read as a plain integer (the binding's Rust enum would
/// make an unknown value from a newer library undefined behaviour).
#[repr(C)]
struct RawAsyncEvent {
    element: *mut std::os::raw::c_void,
    event_type: u32,
}

pub(crate) struct Device {
    pub ctx: *mut ibv_context,
    pub name: String,
    pub gid_index: u8,
    pub gid: [u8; 16],
    pub lid: u16,
    pub mtu: u32,
    /// Endpoints by queue-pair number, for the async-event thread.
    pub flags: Arc<Mutex<HashMap<u32, Arc<AsyncFlag>>>>,
    stop: OwnedFd,
    events: Option<JoinHandle<()>>,
}

// SAFETY: an ibv_context may be used from any thread (libibverbs serialises what needs it); the
// other fields are plain data or thread-safe.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

/// A raw context pointer moved into the async-event thread.
struct Ctx(*mut ibv_context);
// SAFETY: see `Device`; the thread stops (and is joined) before the context is closed.
unsafe impl Send for Ctx {}

fn eventfd() -> Result<OwnedFd, FabricError> {
    // SAFETY: eventfd returns a new descriptor (checked) that we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(FabricError::Verbs(format!("eventfd: {}", last_errno())));
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn new_flag() -> Result<Arc<AsyncFlag>, FabricError> {
    Ok(Arc::new(AsyncFlag { event: AtomicU32::new(0), wake: eventfd()? }))
}

fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from `one` to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn is_v4_mapped(gid: &[u8; 16]) -> bool {
    gid[..10].iter().all(|&b| b == 0) && gid[10] == 0xff && gid[11] == 0xff
}

impl Device {
    /// Opens `name` (or the first device), checks port 1 is active and picks the GID.
    pub fn open(name: Option<&str>, gid_index: Option<u8>) -> Result<Device, FabricError> {
        let mut n = 0;
        // SAFETY: `n` receives the count; the list is freed below on every path.
        let list = unsafe { ibv_get_device_list(&mut n) };
        if list.is_null() {
            return Err(FabricError::Verbs(format!(
                "no RDMA device {} on this machine (ibv_get_device_list: {})",
                name.unwrap_or("at all"),
                last_errno()
            )));
        }
        let mut names = Vec::new();
        let mut chosen: *mut ibv_device = std::ptr::null_mut();
        for i in 0..n.max(0) as usize {
            // SAFETY: the list holds `n` valid device pointers.
            let dev = unsafe { *list.add(i) };
            // SAFETY: `dev` is a valid device from the list.
            let dev_name = c_text(unsafe { ibv_get_device_name(dev) });
            if chosen.is_null() && name.is_none_or(|want| want == dev_name) {
                chosen = dev;
            }
            names.push(dev_name);
        }
        let ctx = if chosen.is_null() {
            std::ptr::null_mut()
        } else {
            // SAFETY: `chosen` is a valid device of the (not yet freed) list.
            unsafe { ibv_open_device(chosen) }
        };
        let open_err = last_errno();
        // SAFETY: frees the list we got; an opened context stays valid after it.
        unsafe { ibv_free_device_list(list) };
        let want = name.unwrap_or("(any)");
        if chosen.is_null() {
            return Err(FabricError::Verbs(format!("no RDMA device {want} (devices: {})", names.join(", "))));
        }
        if ctx.is_null() {
            return Err(FabricError::Verbs(format!("opening RDMA device {want}: {open_err}")));
        }
        let name = names.into_iter().find(|d| name.is_none_or(|w| w == d)).unwrap_or_default();
        let close = |e: String| {
            // SAFETY: `ctx` was opened above and nothing else uses it yet.
            unsafe { ibv_close_device(ctx) };
            FabricError::Verbs(e)
        };
        // SAFETY: ibv_port_attr is plain data; all-zero is a valid value.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open, `port` is writable.
        let rc = unsafe { ___ibv_query_port(ctx, PORT, &mut port) };
        if rc != 0 {
            return Err(close(format!("querying port {PORT} of {name}: {}", errno_text(rc))));
        }
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(close(format!("port {PORT} of {name} is not active (state {})", port.state)));
        }
        let query_gid = |i: u8| -> Option<[u8; 16]> {
            // SAFETY: ibv_gid is a union of byte arrays; all-zero is valid.
            let mut g: ibv_gid = unsafe { std::mem::zeroed() };
            // SAFETY: `ctx` is open, `g` writable.
            let rc = unsafe { ibv_query_gid(ctx, PORT, i as i32, &mut g) };
            // SAFETY: every bit pattern is a valid [u8; 16].
            let raw = unsafe { g.raw };
            (rc == 0).then_some(raw)
        };
        let table = port.gid_tbl_len.clamp(0, 256) as usize;
        let (gid_index, gid) = match gid_index {
            Some(i) => match query_gid(i) {
                Some(g) if g != [0; 16] => (i, g),
                _ => return Err(close(format!("GID index {i} of {name} port {PORT} is empty"))),
            },
            None => {
                let gids: Vec<(u8, [u8; 16])> =
                    (0..table.min(256)).filter_map(|i| query_gid(i as u8).map(|g| (i as u8, g))).collect();
                match gids.iter().find(|(_, g)| is_v4_mapped(g)).or_else(|| gids.iter().find(|(_, g)| *g != [0; 16])) {
                    Some(&(i, g)) => (i, g),
                    None => return Err(close(format!("{name} port {PORT} has no GID (is the netdev up?)"))),
                }
            }
        };
        let stop = eventfd().map_err(|e| close(e.to_string()))?;
        let flags: Arc<Mutex<HashMap<u32, Arc<AsyncFlag>>>> = Arc::default();
        // SAFETY: `ctx` is open; the async fd belongs to it.
        let async_fd = unsafe { (*ctx).async_fd };
        // SAFETY: fcntl on a valid descriptor: the thread polls it, reads must not block.
        unsafe { libc::fcntl(async_fd, libc::F_SETFL, libc::fcntl(async_fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        let (thread_flags, stop_fd, thread_ctx) = (flags.clone(), stop.as_raw_fd(), Ctx(ctx));
        let events = std::thread::Builder::new()
            .name(format!("verbs-events-{name}"))
            .spawn(move || async_events(thread_ctx, async_fd, stop_fd, thread_flags))
            .map_err(|e| close(format!("spawning the async-event thread: {e}")))?;
        info!(device = %name, gid_index, lid = port.lid, mtu = 128u32 << port.active_mtu, "fabric: verbs device open");
        Ok(Device { ctx, name, gid_index, gid, lid: port.lid, mtu: port.active_mtu, flags, stop, events: Some(events) })
    }
}

fn async_events(ctx: Ctx, async_fd: i32, stop_fd: i32, flags: Arc<Mutex<HashMap<u32, Arc<AsyncFlag>>>>) {
    loop {
        let mut fds = [
            libc::pollfd { fd: async_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: two valid pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if fds[1].revents != 0 {
            return;
        }
        if r <= 0 {
            continue;
        }
        let mut ev = RawAsyncEvent { element: std::ptr::null_mut(), event_type: 0 };
        // SAFETY: `RawAsyncEvent` has the layout of ibv_async_event (a pointer-sized union, then a
        // C enum); the context is open until this thread is joined.
        let rc = unsafe { ibv_get_async_event(ctx.0, (&mut ev as *mut RawAsyncEvent).cast()) };
        if rc != 0 {
            continue;
        }
        let t = ev.event_type;
        use ibv_event_type::*;
        let qp_event = [IBV_EVENT_QP_FATAL, IBV_EVENT_QP_REQ_ERR, IBV_EVENT_QP_ACCESS_ERR, IBV_EVENT_PATH_MIG_ERR];
        let fatal = t == IBV_EVENT_DEVICE_FATAL as u32;
        let guard = flags.lock().unwrap_or_else(|e| e.into_inner());
        if qp_event.iter().any(|&e| e as u32 == t) && !ev.element.is_null() {
            // SAFETY: for QP events the element is the affected `ibv_qp`, valid until acked.
            let qpn = unsafe { (*(ev.element as *mut ibv_qp)).qp_num };
            warn!(qpn, event = t, "fabric: verbs async event on a queue pair");
            if let Some(f) = guard.get(&qpn) {
                f.event.store(t + 1, Ordering::Release);
                signal(&f.wake);
            }
        } else if fatal || t == IBV_EVENT_CQ_ERR as u32 || t == IBV_EVENT_PORT_ERR as u32 {
            // A CQ error names a CQ, not a queue pair; each endpoint has one of each, and a CQ
            // overrun cannot happen (it is sized for every WR): treat it like the others, as fatal
            // to every endpoint. A port error fails them too: their peers are unreachable.
            warn!(event = t, "fabric: verbs async event on the device");
            for f in guard.values() {
                f.event.store(t + 1, Ordering::Release);
                signal(&f.wake);
            }
        }
        drop(guard);
        // SAFETY: acknowledges the event we got (required before destroying its object).
        unsafe { ibv_ack_async_event((&mut ev as *mut RawAsyncEvent).cast()) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        signal(&self.stop);
        if let Some(h) = self.events.take() {
            let _ = h.join();
        }
        // SAFETY: every endpoint holds an `Arc<Device>`, so none is left; the event thread is gone.
        unsafe { ibv_close_device(self.ctx) };
    }
}

/// The text of an `ibv_event_type` value.
pub(crate) fn event_text(t: u32) -> String {
    use ibv_event_type::*;
    let all = [
        IBV_EVENT_CQ_ERR,
        IBV_EVENT_QP_FATAL,
        IBV_EVENT_QP_REQ_ERR,
        IBV_EVENT_QP_ACCESS_ERR,
        IBV_EVENT_PATH_MIG_ERR,
        IBV_EVENT_DEVICE_FATAL,
        IBV_EVENT_PORT_ERR,
    ];
    match all.iter().find(|&&e| e as u32 == t) {
        // SAFETY: `e` is a valid enum value; the library returns a static string.
        Some(&e) => c_text(unsafe { ibv_event_type_str(e) }),
        None => format!("async event {t}"),
    }
}
