//! One NVMe/TCP connection on the target: ICReq/ICResp, capsules with in-capsule data or
//! R2T/H2CData, C2HData for reads, TermReq on fatal errors — and the queue it carries once a
//! Fabrics Connect binds it to a controller (admin queue or I/O queue).
//!
//! The connection is owned by one reactor and driven only by that reactor's events: a socket
//! receive or send completing, a bdev I/O completing, a timer tick. It never blocks. Each
//! command is a `Request` whose `ReqState` says what it waits for:
//! `AwaitH2C` (an R2T went out, data is arriving) → `Executing` (at the bdevs or held, like an
//! AER) → back to `Free` once its response is queued. Responses are encoded into `tx_next`;
//! read data is not copied there but queued as its own segment (the I/O buffer itself), and
//! everything queued leaves in one `sendmsg` gathering up to `TX_IOV_MAX` segments when the
//! previous send finished — many PDUs per system call, one copy fewer per read.
//!
//! Errors of the world are mapped here in one place: a malformed PDU terminates the connection
//! with the FES/FEI the codec found (and a log line); a bad command completes with the status
//! the spec prescribes; a device error becomes a media status.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types};
use stager_nvme::bdev::{AlignedBuf, BdevDone, BdevIo, BdevOp};
use stager_nvme::command::{fctype, io, sgl, Command, DataDirection, FABRICS_OPCODE};
use stager_nvme::completion::Completion;
use stager_nvme::constants::DIGEST_BYTES;
use stager_nvme::fabrics::{connect_field, invalid_param_dw0, Connect};
use stager_nvme::status::Status;
use stager_nvme::tcp::pdu::{self, fes, DataHeader, Decoded, Digests, Pdu, PduError, R2t, TermReq, TERM_DATA_MAX};
use stager_nvme::uring::{kind, user_data};
use stager_nvme::{Nsid, DISCOVERY_NQN};
use tracing::{debug, info, warn};

use super::ReactorCtx;
use crate::constants::{ADMIN_IN_CAPSULE_BYTES, RX_SLACK_BYTES};
use crate::controller::{AdminOutcome, AdminState, ControllerShared, QueueStats};
use crate::subsystem::{Namespace, SubsystemKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the host's ICReq; nothing else is legal.
    AwaitIcReq,
    Ready,
    /// A TermReq is queued: stop reading, send what is pending, then close.
    Terminating,
    /// Shut down; waiting for in-flight socket and device operations to finish.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReqState {
    Free,
    /// An R2T asked for the data; H2CData PDUs are filling the buffer.
    AwaitH2C,
    /// At the devices, or held (an AER).
    Executing,
}

/// What a request does once its data is in, decided when it arrives.
#[derive(Clone, Copy, Debug)]
enum Plan {
    /// Admin or fabrics command for the controller.
    Admin,
    /// Fabrics Connect on an unbound queue.
    Connect,
    /// NVM command on namespace channel `channel`, byte range on the device.
    Io { op: IoKind, channel: u32, offset: u64, len: u64, fua: bool },
    /// Flush every namespace (NSID FFFFFFFFh, and a controller shutdown).
    FlushAll { shutdown: bool },
    /// Dataset management with deallocate: ranges come in the data.
    Deallocate { channel: u32, ranges: u32, block_size: u32, blocks: u64 },
    /// Complete at once with this status (validation failed; data, if any, is drained first).
    Fail(Status),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IoKind {
    Read,
    Write,
    Compare,
    WriteZeroes,
    Flush,
}

struct Request {
    state: ReqState,
    cmd: Command,
    plan: Plan,
    /// Data from or for the host.
    buf: Option<AlignedBuf>,
    /// Compare: what the device holds.
    aux: Option<AlignedBuf>,
    /// Bytes the SGL describes.
    xfer_len: usize,
    received: usize,
    /// Device operations still in flight for this request (flush-all and DSM fan out).
    pending_ops: u32,
    status: Status,
    /// An H2CData PDU failed its data digest: complete with a transient error.
    data_error: bool,
}

impl Request {
    fn free() -> Request {
        Request {
            state: ReqState::Free,
            cmd: Command::default(),
            plan: Plan::Fail(Status::INTERNAL_ERROR),
            buf: None,
            aux: None,
            xfer_len: 0,
            received: 0,
            pending_ops: 0,
            status: Status::SUCCESS,
            data_error: false,
        }
    }
}

/// The NVMe queue a connection carries after Connect.
struct Queue {
    ctrl: Arc<ControllerShared>,
    qid: u16,
    /// Entries in the submission queue (SQSIZE + 1).
    size: u16,
    admin: Option<Box<AdminState>>,
    /// The host disabled SQ flow control (Connect CATTR bit 2): C2HData may carry SUCCESS
    /// instead of a response capsule, and SQHD is reported as FFFFh.
    sqflow_disabled: bool,
    stats: Arc<QueueStats>,
}

pub struct Connection {
    idx: u32,
    stream: TcpStream,
    pub peer: SocketAddr,
    phase: Phase,
    digests: Digests,
    /// MAXH2CDATA we announced.
    maxh2c: usize,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    recv_armed: bool,
    /// Segments queued for the socket, oldest first. Those in the send in flight must not
    /// move or change until it completes: segments are only appended, and retired in on_send.
    tx_queue: VecDeque<TxSeg>,
    /// Bytes of the front segment already sent.
    tx_head_off: usize,
    send_armed: bool,
    /// PDU bytes being encoded; becomes a segment when data or a send needs it.
    tx_next: Vec<u8>,
    /// Emptied byte segments, reused so queuing does not allocate.
    tx_spare: Vec<Vec<u8>>,
    /// I/O buffers of completed requests, returned to the reactor's pool in `arm`.
    recycle: Vec<AlignedBuf>,
    /// The iovec array and message header of the send in flight (stable addresses).
    tx_iov: Box<[libc::iovec; TX_IOV_MAX]>,
    tx_msg: Box<libc::msghdr>,
    queue: Option<Queue>,
    reqs: Vec<Request>,
    free: Vec<u16>,
    /// CID → request slot, for CID conflict detection.
    by_cid: HashMap<u16, u16>,
    sqhd: u16,
    bdev_in_flight: usize,
}

/// Requests a connection holds before Connect tells it the queue size.
const INITIAL_SLOTS: usize = 32;
/// Segments one sendmsg gathers (iovecs); more wait for the next send.
const TX_IOV_MAX: usize = 64;

/// A piece of the byte stream to the host.
enum TxSeg {
    /// Encoded PDU headers and small payloads.
    Bytes(Vec<u8>),
    /// A read's data, sent from its I/O buffer and returned to the pool once sent.
    Buf(AlignedBuf, usize),
}

impl TxSeg {
    fn bytes(&self) -> &[u8] {
        match self {
            TxSeg::Bytes(v) => v,
            TxSeg::Buf(b, n) => &b[..*n],
        }
    }
}

impl Connection {
    pub fn new(idx: u32, stream: TcpStream, peer: SocketAddr, cx: &ReactorCtx) -> Connection {
        let l = &cx.target.limits;
        let max_data = l.in_capsule_bytes.max(l.max_h2c_data_bytes).max(ADMIN_IN_CAPSULE_BYTES);
        let rx_len = max_data + 128 + 2 * DIGEST_BYTES + RX_SLACK_BYTES;
        Connection {
            idx,
            stream,
            peer,
            phase: Phase::AwaitIcReq,
            digests: Digests::default(),
            maxh2c: l.max_h2c_data_bytes,
            rx: vec![0; rx_len],
            rx_start: 0,
            rx_end: 0,
            recv_armed: false,
            tx_queue: VecDeque::new(),
            tx_head_off: 0,
            send_armed: false,
            tx_next: Vec::with_capacity(64 * 1024),
            tx_spare: Vec::new(),
            recycle: Vec::new(),
            tx_iov: Box::new([libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; TX_IOV_MAX]),
            // SAFETY: msghdr is a plain C struct for which all-zero is a valid (empty) value.
            tx_msg: Box::new(unsafe { std::mem::zeroed() }),
            queue: None,
            reqs: (0..INITIAL_SLOTS).map(|_| Request::free()).collect(),
            free: (0..INITIAL_SLOTS as u16).rev().collect(),
            by_cid: HashMap::new(),
            sqhd: 0,
            bdev_in_flight: 0,
        }
    }

    fn label(&self) -> String {
        match &self.queue {
            Some(q) => format!("{} (ctrl {} qid {} of {})", self.peer, q.ctrl.cntlid, q.qid, q.ctrl.subsystem.nqn),
            None => self.peer.to_string(),
        }
    }

    /// Data bytes one PDU may carry to us.
    fn max_pdu_data(&self, cx: &ReactorCtx) -> usize {
        let ics = if self.queue.as_ref().is_none_or(|q| q.qid == 0) {
            ADMIN_IN_CAPSULE_BYTES
        } else {
            cx.target.limits.in_capsule_bytes
        };
        ics.max(self.maxh2c)
    }

    /// True once nothing is in flight and the connection may be dropped.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Closing && !self.recv_armed && !self.send_armed && self.bdev_in_flight == 0
    }

    /// Starts closing: shutting the socket down makes armed receives and sends complete.
    pub fn close(&mut self, why: &str) {
        if self.phase == Phase::Closing {
            return;
        }
        debug!(conn = %self.label(), "closing connection: {why}");
        self.phase = Phase::Closing;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Called by the reactor when the connection is dropped.
    pub fn release(&mut self) {
        if let Some(q) = self.queue.take() {
            if q.qid == 0 {
                q.ctrl.failed.store(true, Ordering::Release);
                q.ctrl.subsystem.unregister(q.ctrl.cntlid);
                info!(
                    "controller {} of {} (host {}) is gone: admin queue from {} closed",
                    q.ctrl.cntlid, q.ctrl.subsystem.nqn, q.ctrl.hostnqn, self.peer
                );
            } else {
                q.ctrl.release_qid(q.qid);
            }
        }
    }

    // ---- socket events -------------------------------------------------------------------

    pub fn arm(&mut self, cx: &mut ReactorCtx) {
        for b in self.recycle.drain(..) {
            cx.pool.put(b);
        }
        let fd = types::Fd(self.stream.as_raw_fd());
        if !self.recv_armed && matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
            let need = self.max_pdu_data(cx) + 128 + 2 * DIGEST_BYTES;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            } else if self.rx.len() - self.rx_end < need.min(self.rx.len() / 2) {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            let free = &mut self.rx[self.rx_end..];
            let e = opcode::Recv::new(fd, free.as_mut_ptr(), free.len() as u32).build().user_data(user_data(
                kind::SOCKET_RECV,
                self.idx,
                0,
            ));
            cx.ring.push(e);
            self.recv_armed = true;
        }
        if !self.send_armed && self.phase != Phase::Closing {
            self.seal_tx_next();
            if !self.tx_queue.is_empty() {
                let n = self.tx_queue.len().min(TX_IOV_MAX);
                for (i, seg) in self.tx_queue.iter().take(n).enumerate() {
                    let b = if i == 0 { &seg.bytes()[self.tx_head_off..] } else { seg.bytes() };
                    self.tx_iov[i] = libc::iovec { iov_base: b.as_ptr() as *mut libc::c_void, iov_len: b.len() };
                }
                self.tx_msg.msg_iov = self.tx_iov.as_mut_ptr();
                self.tx_msg.msg_iovlen = n as _;
                let e = opcode::SendMsg::new(fd, &*self.tx_msg as *const libc::msghdr)
                    .flags(libc::MSG_NOSIGNAL as u32)
                    .build()
                    .user_data(user_data(kind::SOCKET_SEND, self.idx, 0));
                cx.ring.push(e);
                self.send_armed = true;
            } else if self.phase == Phase::Terminating {
                self.close("fatal transport error (TermReq sent)");
            }
        }
    }

    /// Moves encoded bytes into the queue (before a data segment, or before a send).
    fn seal_tx_next(&mut self) {
        if !self.tx_next.is_empty() {
            let next = self.tx_spare.pop().unwrap_or_else(|| Vec::with_capacity(64 * 1024));
            let full = std::mem::replace(&mut self.tx_next, next);
            self.tx_queue.push_back(TxSeg::Bytes(full));
        }
    }

    pub fn on_recv(&mut self, res: i32, cx: &mut ReactorCtx) {
        self.recv_armed = false;
        if res <= 0 {
            if self.phase != Phase::Closing {
                if res == 0 {
                    debug!(conn = %self.label(), "host closed the connection");
                } else {
                    debug!(conn = %self.label(), "receive failed: {}", std::io::Error::from_raw_os_error(-res));
                }
                self.close("socket closed");
            }
            return;
        }
        if self.phase == Phase::Closing {
            return;
        }
        self.rx_end += res as usize;
        let rx = std::mem::take(&mut self.rx);
        while matches!(self.phase, Phase::AwaitIcReq | Phase::Ready) {
            let digests = if self.phase == Phase::AwaitIcReq { Digests::default() } else { self.digests };
            let buf = &rx[self.rx_start..self.rx_end];
            match pdu::decode(buf, digests, self.max_pdu_data(cx)) {
                Ok(Decoded::Need(_)) => break,
                Ok(Decoded::Frame(f)) => {
                    let data = &buf[f.data.clone()];
                    self.on_pdu(f.pdu, data, f.data_digest_ok, buf, cx);
                    self.rx_start += f.len;
                }
                Err(e) => {
                    let hdr =
                        &buf[..buf.len().min(TERM_DATA_MAX).min(buf.get(2).copied().unwrap_or(8).max(8) as usize)];
                    self.terminate(e, hdr);
                    break;
                }
            }
        }
        self.rx = rx;
    }

    pub fn on_send(&mut self, res: i32, cx: &mut ReactorCtx) {
        self.send_armed = false;
        if res < 0 {
            if self.phase != Phase::Closing {
                debug!(conn = %self.label(), "send failed: {}", std::io::Error::from_raw_os_error(-res));
                self.close("send failed");
            }
            return;
        }
        // Retire what was sent; a partly sent segment stays at the front.
        let mut sent = res as usize;
        while sent > 0 {
            let Some(front) = self.tx_queue.front() else { break };
            let left = front.bytes().len() - self.tx_head_off;
            if sent < left {
                self.tx_head_off += sent;
                break;
            }
            sent -= left;
            self.tx_head_off = 0;
            match self.tx_queue.pop_front() {
                Some(TxSeg::Bytes(mut v)) => {
                    v.clear();
                    self.tx_spare.push(v);
                }
                Some(TxSeg::Buf(b, _)) => cx.pool.put(b),
                None => {}
            }
        }
    }

    /// Fatal transport error: C2HTermReq with the offending header, then close.
    fn terminate(&mut self, e: PduError, header: &[u8]) {
        warn!(conn = %self.label(), "terminating connection: {}", e);
        // Complete PDUs already queued still go out; the TermReq follows them.
        self.tx_next.clear();
        let data = &header[..header.len().min(TERM_DATA_MAX)];
        pdu::encode(&Pdu::C2HTermReq(TermReq { fes: e.fes, fei: e.fei }), data, Digests::default(), &mut self.tx_next);
        self.phase = Phase::Terminating;
    }

    fn send_pdu(&mut self, p: &Pdu, data: &[u8]) {
        pdu::encode(p, data, self.digests, &mut self.tx_next);
    }

    // ---- PDUs ----------------------------------------------------------------------------

    fn on_pdu(&mut self, p: Pdu, data: &[u8], data_ok: bool, raw: &[u8], cx: &mut ReactorCtx) {
        let hdr = &raw[..raw.len().min(raw[2] as usize).min(TERM_DATA_MAX)];
        if self.phase == Phase::AwaitIcReq {
            let Pdu::IcReq { pfv, hpda, digests, maxr2t: _ } = p else {
                let why = format!("{} before ICReq", p.name());
                return self.terminate(PduError::new(fes::PDU_SEQUENCE_ERROR, 0, why), hdr);
            };
            if pfv != 0 {
                return self.terminate(PduError::new(fes::UNSUPPORTED_PARAMETER, 8, format!("ICReq PFV {pfv}")), hdr);
            }
            if hpda > 31 {
                return self.terminate(PduError::new(fes::INVALID_HEADER_FIELD, 10, format!("ICReq HPDA {hpda}")), hdr);
            }
            self.digests = digests;
            let resp = Pdu::IcResp { pfv: 0, cpda: 0, digests, maxh2cdata: self.maxh2c as u32 };
            pdu::encode(&resp, &[], Digests::default(), &mut self.tx_next);
            self.phase = Phase::Ready;
            debug!(conn = %self.label(), header_digest = digests.header, data_digest = digests.data, "ICReq accepted");
            return;
        }
        match p {
            Pdu::CapsuleCmd(cmd) => self.on_capsule(cmd, data, data_ok, cx),
            Pdu::H2CData(h) => self.on_h2c(h, data, data_ok, hdr, cx),
            Pdu::H2CTermReq(t) => {
                warn!(conn = %self.label(), "host terminated the connection: FES {:#x} FEI {}", t.fes, t.fei);
                self.close("H2CTermReq");
            }
            Pdu::IcReq { .. } => {
                self.terminate(PduError::new(fes::PDU_SEQUENCE_ERROR, 0, "second ICReq"), hdr);
            }
            other => {
                let why = format!("{} is not a PDU a host may send", other.name());
                self.terminate(PduError::new(fes::INVALID_HEADER_FIELD, 0, why), hdr);
            }
        }
    }

    fn on_capsule(&mut self, cmd: Command, data: &[u8], data_ok: bool, cx: &mut ReactorCtx) {
        let cid = cmd.cid();
        let qsize = self.queue.as_ref().map_or(INITIAL_SLOTS as u16, |q| q.size);
        self.sqhd = (self.sqhd + 1) % qsize.max(1);
        if self.by_cid.contains_key(&cid) {
            return self.respond_now(cid, Status::CID_CONFLICT);
        }
        let Some(slot) = self.free.pop() else {
            // The host overran the queue size it asked for.
            return self.respond_now(cid, Status::COMMAND_SEQUENCE_ERROR);
        };
        self.by_cid.insert(cid, slot);
        let admin_queue = self.queue.as_ref().is_none_or(|q| q.qid == 0);
        let dir = cmd.direction(admin_queue);
        let sgl_len = cmd.sgl_length() as usize;
        let mut plan = self.plan(&cmd, cx);
        let ics = if admin_queue { ADMIN_IN_CAPSULE_BYTES } else { cx.target.limits.in_capsule_bytes };
        let max_io = cx.target.limits.max_io_bytes.max(ADMIN_IN_CAPSULE_BYTES);
        // The SGL must describe the data the way NVMe/TCP allows.
        let sgl_status = if !data.is_empty() {
            if dir != DataDirection::HostToController {
                Some(Status::INVALID_FIELD)
            } else if cmd.sgl_id() != sgl::IN_CAPSULE {
                Some(Status::SGL_DESCRIPTOR_TYPE_INVALID)
            } else if cmd.sgl_address() != 0 {
                Some(Status::INVALID_SGL_DESCRIPTOR)
            } else if sgl_len != data.len() || data.len() > ics {
                Some(Status::DATA_SGL_LENGTH_INVALID)
            } else {
                None
            }
        } else if dir != DataDirection::None && sgl_len > 0 {
            if cmd.sgl_id() != sgl::TRANSPORT {
                Some(if cmd.sgl_id() == sgl::IN_CAPSULE {
                    Status::DATA_SGL_LENGTH_INVALID
                } else {
                    Status::SGL_DESCRIPTOR_TYPE_INVALID
                })
            } else if sgl_len > max_io {
                Some(Status::INVALID_FIELD)
            } else {
                None
            }
        } else {
            None
        };
        if let (Some(s), false) = (sgl_status, matches!(plan, Plan::Fail(_))) {
            plan = Plan::Fail(s);
        }
        if !data_ok {
            plan = Plan::Fail(Status::TRANSIENT_TRANSPORT_ERROR);
        }
        let mut req = Request { cmd, plan, xfer_len: sgl_len, ..Request::free() };
        if let Plan::Fail(s) = plan {
            // Refused before any data moves: the host sends no data without an R2T.
            self.reqs[slot as usize] = req;
            return self.complete(slot, s, 0, 0);
        }
        if !data.is_empty() {
            let mut b = cx.pool.get(data.len());
            b.copy_from_slice(data);
            req.buf = Some(b);
            req.received = data.len();
        } else if dir == DataDirection::HostToController && sgl_len > 0 {
            req.buf = Some(cx.pool.get(sgl_len));
            req.state = ReqState::AwaitH2C;
            self.reqs[slot as usize] = req;
            let r2t = R2t { cccid: cid, ttag: slot, offset: 0, length: sgl_len as u32 };
            return self.send_pdu(&Pdu::R2T(r2t), &[]);
        }
        req.state = ReqState::Executing;
        self.reqs[slot as usize] = req;
        self.execute(slot, cx);
    }

    fn on_h2c(&mut self, h: DataHeader, data: &[u8], data_ok: bool, hdr: &[u8], cx: &mut ReactorCtx) {
        let slot = h.ttag;
        let valid =
            self.reqs.get(slot as usize).is_some_and(|r| r.state == ReqState::AwaitH2C && r.cmd.cid() == h.cccid);
        if !valid {
            let why = format!("H2CData for CID {} with unknown transfer tag {}", h.cccid, h.ttag);
            return self.terminate(PduError::new(fes::INVALID_HEADER_FIELD, 10, why), hdr);
        }
        let r = &mut self.reqs[slot as usize];
        let (off, len) = (h.offset as usize, data.len());
        if off != r.received || off + len > r.xfer_len {
            let why = format!(
                "H2CData offset {off} length {len} outside the R2T (received {}, total {})",
                r.received, r.xfer_len
            );
            return self.terminate(PduError::new(fes::DATA_OUT_OF_RANGE, 12, why), hdr);
        }
        if h.last != (off + len == r.xfer_len) {
            let why = format!("H2CData LAST_PDU {} at offset {off} length {len} of {}", h.last, r.xfer_len);
            return self.terminate(PduError::new(fes::INVALID_HEADER_FIELD, 1, why), hdr);
        }
        if let Some(b) = r.buf.as_mut() {
            b[off..off + len].copy_from_slice(data);
        }
        r.received += len;
        r.data_error |= !data_ok;
        if r.received == r.xfer_len {
            r.state = ReqState::Executing;
            if r.data_error {
                return self.complete(slot, Status::TRANSIENT_TRANSPORT_ERROR, 0, 0);
            }
            self.execute(slot, cx);
        }
    }

    // ---- commands ------------------------------------------------------------------------

    /// Decides what a command will do, validating everything that can be checked before its
    /// data arrives (so a bad write is refused before an R2T asks for its data).
    fn plan(&self, cmd: &Command, cx: &ReactorCtx) -> Plan {
        let Some(q) = &self.queue else {
            return if cmd.opcode() == FABRICS_OPCODE && cmd.fctype() == fctype::CONNECT {
                Plan::Connect
            } else {
                Plan::Fail(Status::COMMAND_SEQUENCE_ERROR)
            };
        };
        if cmd.opcode() == FABRICS_OPCODE && cmd.fctype() == fctype::CONNECT {
            return Plan::Fail(Status::COMMAND_SEQUENCE_ERROR);
        }
        if q.qid == 0 {
            return Plan::Admin;
        }
        if cmd.opcode() == FABRICS_OPCODE {
            return Plan::Fail(Status::INVALID_OPCODE);
        }
        if !q.ctrl.enabled() {
            return Plan::Fail(Status::COMMAND_SEQUENCE_ERROR);
        }
        let sub = &q.ctrl.subsystem;
        let nsid = cmd.nsid();
        if cmd.opcode() == io::FLUSH && nsid == Nsid::BROADCAST.0 {
            return Plan::FlushAll { shutdown: false };
        }
        let known = matches!(
            cmd.opcode(),
            io::FLUSH | io::WRITE | io::READ | io::COMPARE | io::WRITE_ZEROES | io::DATASET_MANAGEMENT
        );
        if !known {
            return Plan::Fail(Status::INVALID_OPCODE);
        }
        let Some(ns) = sub.namespace(nsid) else {
            return Plan::Fail(Status::INVALID_NAMESPACE);
        };
        let bs = ns.block_size() as u64;
        let kind = match cmd.opcode() {
            io::FLUSH => {
                return Plan::Io { op: IoKind::Flush, channel: ns.channel, offset: 0, len: 0, fua: false };
            }
            io::DATASET_MANAGEMENT => {
                let ranges = (cmd.cdw(10) & 0xFF) + 1;
                if cmd.sgl_length() < ranges * 16 {
                    return Plan::Fail(Status::DATA_SGL_LENGTH_INVALID);
                }
                return Plan::Deallocate { channel: ns.channel, ranges, block_size: bs as u32, blocks: ns.blocks() };
            }
            io::WRITE => IoKind::Write,
            io::READ => IoKind::Read,
            io::COMPARE => IoKind::Compare,
            _ => IoKind::WriteZeroes,
        };
        let (slba, nlb) = (cmd.slba(), cmd.nlb() as u64);
        if slba.checked_add(nlb).is_none_or(|end| end > ns.blocks()) {
            return Plan::Fail(Status::LBA_OUT_OF_RANGE);
        }
        let len = nlb * bs;
        if kind != IoKind::WriteZeroes {
            if len > cx.target.limits.max_io_bytes as u64 {
                return Plan::Fail(Status::INVALID_FIELD);
            }
            if cmd.sgl_length() as u64 != len {
                return Plan::Fail(Status::DATA_SGL_LENGTH_INVALID);
            }
        }
        Plan::Io { op: kind, channel: ns.channel, offset: slba * bs, len, fua: cmd.fua() }
    }

    fn execute(&mut self, slot: u16, cx: &mut ReactorCtx) {
        let plan = self.reqs[slot as usize].plan;
        match plan {
            Plan::Fail(s) => self.complete(slot, s, 0, 0),
            Plan::Connect => self.connect(slot, cx),
            Plan::Admin => self.admin(slot, cx),
            Plan::FlushAll { .. } => {
                let chans: Vec<u32> = self.namespaces().iter().map(|n| n.channel).collect();
                if chans.is_empty() {
                    return self.finish(slot, cx);
                }
                for ch in chans {
                    self.submit(slot, ch, BdevOp::Flush, 0, 0, None, cx);
                }
            }
            Plan::Io { op, channel, offset, len, fua } => {
                let r = &mut self.reqs[slot as usize];
                match op {
                    IoKind::Read => {
                        let b = cx.pool.get(len as usize);
                        self.submit(slot, channel, BdevOp::Read, offset, len, Some(b), cx)
                    }
                    IoKind::Write => {
                        let b = r.buf.take();
                        self.submit(slot, channel, BdevOp::Write { fua }, offset, len, b, cx)
                    }
                    IoKind::Compare => {
                        let b = cx.pool.get(len as usize);
                        self.submit(slot, channel, BdevOp::Read, offset, len, Some(b), cx)
                    }
                    IoKind::WriteZeroes => self.submit(slot, channel, BdevOp::WriteZeroes, offset, len, None, cx),
                    IoKind::Flush => self.submit(slot, channel, BdevOp::Flush, 0, 0, None, cx),
                }
            }
            Plan::Deallocate { channel, ranges, block_size, blocks } => {
                let r = &self.reqs[slot as usize];
                let Some(b) = r.buf.as_ref() else { return self.complete(slot, Status::DATA_SGL_LENGTH_INVALID, 0, 0) };
                let mut list = Vec::with_capacity(ranges as usize);
                for i in 0..ranges as usize {
                    let e = &b[i * 16..i * 16 + 16];
                    let nlb = u32::from_le_bytes([e[4], e[5], e[6], e[7]]) as u64;
                    let slba = u64::from_le_bytes(e[8..16].try_into().unwrap_or([0; 8]));
                    if slba.checked_add(nlb).is_none_or(|end| end > blocks) {
                        return self.complete(slot, Status::LBA_OUT_OF_RANGE, 0, 0);
                    }
                    if nlb > 0 {
                        list.push((slba * block_size as u64, nlb * block_size as u64));
                    }
                }
                // Without the deallocate attribute the ranges are hints: nothing to do.
                let ad = r.cmd.cdw(11) & (1 << 2) != 0;
                if !ad || list.is_empty() {
                    return self.finish(slot, cx);
                }
                for (off, len) in list {
                    self.submit(slot, channel, BdevOp::Deallocate, off, len, None, cx);
                }
            }
        }
    }

    fn namespaces(&self) -> Vec<Arc<Namespace>> {
        self.queue.as_ref().map(|q| q.ctrl.subsystem.namespaces.clone()).unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        slot: u16,
        channel: u32,
        op: BdevOp,
        offset: u64,
        len: u64,
        buf: Option<AlignedBuf>,
        cx: &mut ReactorCtx,
    ) {
        let token = ((self.idx as u64) << 32) | slot as u64;
        self.reqs[slot as usize].pending_ops += 1;
        self.bdev_in_flight += 1;
        match cx.channels.get_mut(channel as usize) {
            Some(ch) => ch.submit(BdevIo::new(op, offset, len, buf, token), cx.ring),
            None => {
                // Our bug: a namespace without a channel. Fail the command, keep serving.
                warn!("namespace channel {channel} missing on reactor {}", cx.reactor);
                self.bdev_in_flight -= 1;
                self.reqs[slot as usize].pending_ops -= 1;
                self.complete(slot, Status::INTERNAL_ERROR, 0, 0);
            }
        }
    }

    /// A device operation of request `slot` finished.
    pub fn on_bdev_done(&mut self, slot: u16, done: BdevDone, cx: &mut ReactorCtx) {
        self.bdev_in_flight -= 1;
        let label = if done.result.is_err() { self.label() } else { String::new() };
        let Some(r) = self.reqs.get_mut(slot as usize) else { return };
        if r.state != ReqState::Executing || r.pending_ops == 0 {
            return;
        }
        r.pending_ops -= 1;
        if let Err(e) = &done.result {
            let s = e.status(matches!(r.plan, Plan::Io { op: IoKind::Read | IoKind::Compare, .. }));
            warn!(conn = %label, cid = r.cmd.cid(), "device error: {e}; completing with {s}");
            r.status = s;
        }
        if let Some(b) = done.buf {
            match r.plan {
                Plan::Io { op: IoKind::Compare, .. } => r.aux = Some(b),
                _ => r.buf = Some(b),
            }
        }
        if r.pending_ops == 0 {
            if self.phase == Phase::Closing {
                return self.free_slot(slot, cx);
            }
            self.finish(slot, cx);
        }
    }

    /// All device work of a request is done: send its data and response.
    fn finish(&mut self, slot: u16, cx: &mut ReactorCtx) {
        let r = &mut self.reqs[slot as usize];
        let status = r.status;
        if !status.is_success() {
            return self.complete(slot, status, 0, 0);
        }
        match r.plan {
            Plan::Io { op: IoKind::Read, len, .. } => {
                if let Some(q) = &self.queue {
                    q.stats.reads.fetch_add(1, Ordering::Relaxed);
                    q.stats.bytes_read.fetch_add(len, Ordering::Relaxed);
                }
                if let Some(b) = self.reqs[slot as usize].buf.take() {
                    self.send_c2h(slot, b, len as usize);
                }
                if !self.queue.as_ref().is_some_and(|q| q.sqflow_disabled) {
                    self.complete(slot, Status::SUCCESS, 0, 0);
                } else {
                    self.free_slot(slot, cx);
                }
            }
            Plan::Io { op: IoKind::Compare, .. } => {
                let same = match (&r.buf, &r.aux) {
                    (Some(a), Some(b)) => a[..] == b[..],
                    _ => false,
                };
                self.complete(slot, if same { Status::SUCCESS } else { Status::COMPARE_FAILURE }, 0, 0)
            }
            Plan::Io { op: IoKind::Write, len, .. } => {
                if let Some(q) = &self.queue {
                    q.stats.writes.fetch_add(1, Ordering::Relaxed);
                    q.stats.bytes_written.fetch_add(len, Ordering::Relaxed);
                }
                self.complete(slot, Status::SUCCESS, 0, 0)
            }
            Plan::FlushAll { shutdown: true } => {
                if let Some(a) = self.queue.as_mut().and_then(|q| q.admin.as_mut()) {
                    a.finish_shutdown();
                    info!("controller {} shut down by the host (caches flushed)", a.shared.cntlid);
                }
                self.complete(slot, Status::SUCCESS, 0, 0)
            }
            _ => self.complete(slot, Status::SUCCESS, 0, 0),
        }
    }

    /// Queues the first `len` bytes of `buf` for request `slot` as one C2HData (SUCCESS when no
    /// response capsule follows). The data is sent from `buf` itself, not copied.
    fn send_c2h(&mut self, slot: u16, buf: AlignedBuf, len: usize) {
        let cid = self.reqs[slot as usize].cmd.cid();
        let success = self.queue.as_ref().is_some_and(|q| q.sqflow_disabled);
        let h = DataHeader { cccid: cid, ttag: 0, offset: 0, length: len as u32, last: true, success };
        let ddgst = pdu::encode_head(&Pdu::C2HData(h), len, self.digests, &mut self.tx_next);
        let crc = ddgst.then(|| crc32c::crc32c(&buf[..len]));
        self.seal_tx_next();
        self.tx_queue.push_back(TxSeg::Buf(buf, len));
        if let Some(c) = crc {
            self.tx_next.extend_from_slice(&c.to_le_bytes());
        }
    }

    /// Queues the response capsule of request `slot` and frees it.
    fn complete(&mut self, slot: u16, status: Status, dw0: u32, dw1: u32) {
        let cid = self.reqs[slot as usize].cmd.cid();
        if !status.is_success() {
            let cmd = self.reqs[slot as usize].cmd;
            debug!(conn = %self.label(), cid, opcode = cmd.opcode(), "command failed: {status}");
            if let Some(q) = &self.queue {
                q.ctrl.record_error(q.qid, cid, status, cmd.nsid(), cmd.slba());
                q.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.respond(cid, status, dw0, dw1);
        let r = &mut self.reqs[slot as usize];
        r.state = ReqState::Free;
        // Buffers go back to the reactor's pool at the next `arm` (no context here): dropping
        // them made every write allocate and zero a fresh buffer.
        self.recycle.extend(r.buf.take());
        self.recycle.extend(r.aux.take());
        self.by_cid.remove(&cid);
        self.free.push(slot);
    }

    fn free_slot(&mut self, slot: u16, cx: &mut ReactorCtx) {
        let r = &mut self.reqs[slot as usize];
        if let Some(b) = r.buf.take() {
            cx.pool.put(b);
        }
        if let Some(b) = r.aux.take() {
            cx.pool.put(b);
        }
        r.state = ReqState::Free;
        let cid = r.cmd.cid();
        self.by_cid.remove(&cid);
        self.free.push(slot);
    }

    /// A response for a command that never got a slot (CID conflict, queue overrun).
    fn respond_now(&mut self, cid: u16, status: Status) {
        debug!(conn = %self.label(), cid, "command refused: {status}");
        self.respond(cid, status, 0, 0);
    }

    fn respond(&mut self, cid: u16, status: Status, dw0: u32, dw1: u32) {
        let (sqid, sqhd) = match &self.queue {
            Some(q) if q.sqflow_disabled => (q.qid, 0xFFFF),
            Some(q) => (q.qid, self.sqhd),
            None => (0, self.sqhd),
        };
        let c = Completion { dw0, dw1, sqhd, sqid, cid, status };
        self.send_pdu(&Pdu::CapsuleResp(c), &[]);
    }

    fn admin(&mut self, slot: u16, cx: &mut ReactorCtx) {
        let Some(a) = self.queue.as_mut().and_then(|q| q.admin.as_mut()) else {
            return self.complete(slot, Status::INTERNAL_ERROR, 0, 0);
        };
        let r = &self.reqs[slot as usize];
        match a.execute(&r.cmd) {
            AdminOutcome::Done { status, dw0, dw1, data } => {
                if status.is_success() && !data.is_empty() {
                    // Send what the host's SGL asked for, zero-padded, never more.
                    let want = self.reqs[slot as usize].xfer_len;
                    let mut d = data;
                    d.resize(want, 0);
                    if !d.is_empty() {
                        let cid = self.reqs[slot as usize].cmd.cid();
                        let h = DataHeader {
                            cccid: cid,
                            ttag: 0,
                            offset: 0,
                            length: d.len() as u32,
                            last: true,
                            success: false,
                        };
                        self.send_pdu(&Pdu::C2HData(h), &d);
                    }
                }
                self.complete(slot, status, dw0, dw1);
            }
            AdminOutcome::Held => {}
            AdminOutcome::Shutdown => {
                self.reqs[slot as usize].plan = Plan::FlushAll { shutdown: true };
                self.execute(slot, cx);
            }
        }
    }

    fn connect(&mut self, slot: u16, cx: &mut ReactorCtx) {
        let r = &self.reqs[slot as usize];
        let fail = |s: Status, in_data: bool, off: u16| (s, invalid_param_dw0(in_data, off));
        let outcome: Result<(u16, Queue), (Status, u32)> = (|| {
            let cmd = r.cmd;
            if Connect::recfmt(&cmd) != 0 {
                return Err((Status::CONNECT_INCOMPATIBLE_FORMAT, 0));
            }
            let data: &[u8] = r.buf.as_deref().unwrap_or(&[]);
            let c = Connect::decode(&cmd, data).ok_or((Status::DATA_SGL_LENGTH_INVALID, 0))?;
            let Some(sub) = cx.target.subsystems.get(&c.subnqn) else {
                info!(peer = %self.peer, "Connect to unknown subsystem {:?} from host {}", c.subnqn, c.hostnqn);
                return Err(fail(Status::CONNECT_INVALID_PARAMETERS, true, connect_field::SUBNQN));
            };
            if !sub.host_allowed(&c.hostnqn) {
                warn!(peer = %self.peer, "refused host {} on subsystem {}: not in its hosts list", c.hostnqn, sub.nqn);
                return Err((Status::CONNECT_INVALID_HOST, 0));
            }
            let limits = &cx.target.limits;
            let size = c.sqsize as u32 + 1;
            // A queue of N entries holds N - 1 commands; max_queue_depth counts commands.
            if c.sqsize == 0 || size > limits.max_queue_depth as u32 + 1 {
                return Err(fail(Status::CONNECT_INVALID_PARAMETERS, false, connect_field::SQSIZE));
            }
            let sqflow_disabled = c.cattr & (1 << 2) != 0;
            if c.qid == 0 {
                if c.cntlid != 0xFFFF {
                    return Err(fail(Status::CONNECT_INVALID_PARAMETERS, true, connect_field::CNTLID));
                }
                let cntlid = sub.allocate_cntlid().ok_or((Status::CONNECT_CONTROLLER_BUSY, 0))?;
                let ctrl = Arc::new(ControllerShared::new(cntlid, sub.clone(), c.hostnqn.clone(), c.host_id));
                sub.register(&ctrl);
                let stats = Arc::new(QueueStats::default());
                if let Ok(mut s) = ctrl.queue_stats.lock() {
                    s.push(stats.clone());
                }
                let admin = Box::new(AdminState::new(ctrl.clone(), cx.target, c.kato_ms));
                let kind = if sub.kind == SubsystemKind::Discovery { "discovery" } else { "NVM" };
                info!(
                    "host {} connected from {} to {kind} subsystem {} as controller {cntlid} (kato {} ms)",
                    c.hostnqn, self.peer, sub.nqn, c.kato_ms
                );
                Ok((cntlid, Queue { ctrl, qid: 0, size: size as u16, admin: Some(admin), sqflow_disabled, stats }))
            } else {
                if sub.nqn == DISCOVERY_NQN {
                    return Err(fail(Status::CONNECT_INVALID_PARAMETERS, false, connect_field::QID));
                }
                let Some(ctrl) = sub.controller(c.cntlid) else {
                    return Err(fail(Status::CONNECT_INVALID_PARAMETERS, true, connect_field::CNTLID));
                };
                if ctrl.hostnqn != c.hostnqn || ctrl.host_id != c.host_id {
                    return Err(fail(Status::CONNECT_INVALID_PARAMETERS, true, connect_field::HOSTNQN));
                }
                if !ctrl.enabled() {
                    return Err((Status::COMMAND_SEQUENCE_ERROR, 0));
                }
                if !ctrl.claim_qid(c.qid) {
                    return Err(fail(Status::CONNECT_INVALID_PARAMETERS, false, connect_field::QID));
                }
                let stats = Arc::new(QueueStats::default());
                if let Ok(mut s) = ctrl.queue_stats.lock() {
                    s.push(stats.clone());
                }
                debug!("I/O queue {} of controller {} connected from {}", c.qid, ctrl.cntlid, self.peer);
                Ok((ctrl.cntlid, Queue { ctrl, qid: c.qid, size: size as u16, admin: None, sqflow_disabled, stats }))
            }
        })();
        match outcome {
            Ok((cntlid, queue)) => {
                let size = queue.size as usize;
                self.queue = Some(queue);
                self.sqhd %= size as u16;
                if self.reqs.len() < size {
                    let old = self.reqs.len();
                    self.reqs.resize_with(size, Request::free);
                    self.free.extend((old as u16..size as u16).rev());
                }
                self.complete(slot, Status::SUCCESS, cntlid as u32, 0);
            }
            Err((s, dw0)) => self.complete(slot, s, dw0, 0),
        }
    }

    /// Timer: keep-alive expiry on the admin queue; a dead or reset controller closes its
    /// I/O queues.
    pub fn tick(&mut self, now: Instant) {
        let Some(q) = &mut self.queue else { return };
        if self.phase == Phase::Closing {
            return;
        }
        if let Some(a) = &q.admin {
            if a.kato_ms > 0 {
                let limit = std::time::Duration::from_millis(a.kato_ms as u64) + crate::constants::KEEP_ALIVE_GRACE;
                if now.duration_since(a.last_keep_alive) > limit {
                    warn!(
                        "keep-alive timeout ({} ms) expired for controller {} of {} (host {} at {}); tearing it down",
                        a.kato_ms, q.ctrl.cntlid, q.ctrl.subsystem.nqn, q.ctrl.hostnqn, self.peer
                    );
                    q.ctrl.failed.store(true, Ordering::Release);
                    q.ctrl.csts.fetch_or(stager_nvme::fabrics::csts::CFS, Ordering::AcqRel);
                    self.close("keep-alive timeout");
                }
            }
        } else if q.ctrl.failed.load(Ordering::Acquire) || !q.ctrl.enabled() {
            self.close("controller gone or reset");
        }
    }
}
