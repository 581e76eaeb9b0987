//! A verbs endpoint: its own protection domain, completion channel, completion queue and RC
//! queue pair, a registered staging area its writes leave from, zero-length receive WRs for the
//! peer's WRITE WITH IMMEDIATE, and the authenticated TCP connection (the shared [`Channel`]) for
//! control messages and heartbeats.
//!
//! Set-up (blocking, both sides alike, after the handshake): create everything, move the QP to
//! INIT and post the receives, exchange `VERBS_INFO` (QP number, PSN, LID, MTU, GID) on the set-up
//! socket, move to RTR and RTS, then exchange `READY` so neither side writes before the other can
//! receive.
//!
//! Completions: every send WR is signalled; an RC queue pair completes them in posting order, so
//! the staging area is a ring freed from its tail. A failed completion (or a flushed receive)
//! means the queue pair is in error: the endpoint fails. `poll()` drains the completion channel,
//! polls the CQ, re-arms notification and polls once more (no lost wake-up), so `arm()` only has
//! to look at what is buffered.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use rdma_sys::*;
use tracing::{info, warn};

use super::device::{event_text, new_flag, AsyncFlag, Device, PORT};
use super::{c_text, errno_text, last_errno};
use crate::channel::{Channel, Sink};
use crate::constants::{
    MSG_BYTES_MAX, SEND_DEPTH, VERBS_CQ_ENTRIES, VERBS_RECV_DEPTH, VERBS_STAGING_BYTES, WRITE_BYTES_MAX,
};
use crate::fabric::Shared;
use crate::handshake::SetupConn;
use crate::region::{check_bounds, Region, RemoteKey};
use crate::waker::Waker;
use crate::wire::setup::{SetupMsg, VerbsInfo};
use crate::{EndpointStats, Event, FabricError};

/// Completions taken from the CQ per call.
const POLL_BATCH: usize = 32;

/// The verbs objects of one endpoint, destroyed in reverse order of creation.
struct Resources {
    device: Arc<Device>,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    qp: *mut ibv_qp,
    staging: Region,
    staging_mr: *mut ibv_mr,
    /// Regions exposed to the peer: their registration in our PD, and the region it keeps alive.
    exposed: Vec<(*mut ibv_mr, Arc<Region>)>,
    /// CQ events taken from the channel and not yet acknowledged (acked in batches).
    unacked_events: u32,
}

impl Drop for Resources {
    fn drop(&mut self) {
        // SAFETY: each object was created by us and is destroyed once, dependents first: the QP
        // (so nothing references the MRs or CQ), the MRs, the CQ (after acking its events), the
        // channel, the PD. Null pointers (a failed set-up) are skipped.
        unsafe {
            if !self.qp.is_null() {
                ibv_destroy_qp(self.qp);
            }
            for (mr, _) in self.exposed.drain(..) {
                ibv_dereg_mr(mr);
            }
            if !self.staging_mr.is_null() {
                ibv_dereg_mr(self.staging_mr);
            }
            if !self.cq.is_null() {
                ibv_ack_cq_events(self.cq, self.unacked_events);
                ibv_destroy_cq(self.cq);
            }
            if !self.channel.is_null() {
                ibv_destroy_comp_channel(self.channel);
            }
            if !self.pd.is_null() {
                ibv_dealloc_pd(self.pd);
            }
        }
    }
}

/// A write in flight: its id and the staging bytes it holds (its length plus any bytes skipped
/// at the ring's end to keep it contiguous).
struct Inflight {
    wr_id: u64,
    staged: usize,
}

pub(crate) struct VerbsEndpoint {
    res: Resources,
    ch: Channel,
    waker: Waker,
    flag: Arc<AsyncFlag>,
    shared: Arc<Shared>,
    inflight: VecDeque<Inflight>,
    /// Staging ring: next byte to hand out, and bytes held by writes in flight.
    staging_head: usize,
    staging_used: usize,
    wcs: Vec<ibv_wc>,
    stats: EndpointStats,
    dead: Option<FabricError>,
}

// SAFETY: the raw verbs pointers are owned by this endpoint alone and used by one thread at a time
// (the endpoint is `Send`, not `Sync`); libibverbs objects may move between threads.
unsafe impl Send for VerbsEndpoint {}

fn verr(what: impl std::fmt::Display) -> FabricError {
    FabricError::Verbs(what.to_string())
}

/// What we use of a work completion.
#[derive(Clone, Copy)]
struct Wc {
    wr_id: u64,
    status: u32,
    opcode: u32,
    vendor_err: u32,
    byte_len: u32,
    /// The immediate (host order) of a RECV_RDMA_WITH_IMM.
    imm: u32,
}

impl Wc {
    fn of(wc: &ibv_wc) -> Wc {
        // SAFETY: the union holds the immediate (network byte order) for RECV_RDMA_WITH_IMM; for
        // other opcodes it is an unused integer either way.
        let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
        Wc {
            wr_id: wc.wr_id,
            status: wc.status,
            opcode: wc.opcode,
            vendor_err: wc.vendor_err,
            byte_len: wc.byte_len,
            imm,
        }
    }
}

/// Refuses the write frames and acks of the tcp backend: on verbs the peer's writes come by RDMA.
struct ControlOnly<'a> {
    stats: &'a mut EndpointStats,
}

impl Sink for ControlOnly<'_> {
    fn resolve(&mut self, key: u32, _offset: u64, _len: u32) -> Result<(Arc<Region>, usize), String> {
        Err(format!("a tcp write frame (key {key:#x}) on a verbs endpoint"))
    }
    fn placed(&mut self, _imm: Option<u32>, _len: u32, _events: &mut Vec<Event>) {}
    fn acked(&mut self, _count: u32, _events: &mut Vec<Event>) -> Result<(), String> {
        Err("a tcp ack frame on a verbs endpoint".into())
    }
    fn message(&mut self, _len: usize) {
        self.stats.msgs_received += 1;
    }
}

impl Resources {
    fn new(device: Arc<Device>) -> Result<Resources, FabricError> {
        let staging = Region::alloc(VERBS_STAGING_BYTES)?;
        let mut r = Resources {
            device,
            pd: std::ptr::null_mut(),
            channel: std::ptr::null_mut(),
            cq: std::ptr::null_mut(),
            qp: std::ptr::null_mut(),
            staging,
            staging_mr: std::ptr::null_mut(),
            exposed: Vec::new(),
            unacked_events: 0,
        };
        let ctx = r.device.ctx;
        // SAFETY: `ctx` is an open device context (kept open by the `Arc<Device>`).
        r.pd = unsafe { ibv_alloc_pd(ctx) };
        if r.pd.is_null() {
            return Err(verr(format!("ibv_alloc_pd: {}", last_errno())));
        }
        // SAFETY: as above.
        r.channel = unsafe { ibv_create_comp_channel(ctx) };
        if r.channel.is_null() {
            return Err(verr(format!("ibv_create_comp_channel: {}", last_errno())));
        }
        // SAFETY: the channel is valid; nonblocking so `poll()` never waits in ibv_get_cq_event.
        unsafe {
            let fd = (*r.channel).fd;
            libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK);
        }
        // SAFETY: `ctx` and the channel are valid; no CQ context pointer is used.
        r.cq = unsafe { ibv_create_cq(ctx, VERBS_CQ_ENTRIES as i32, std::ptr::null_mut(), r.channel, 0) };
        if r.cq.is_null() {
            return Err(verr(format!("ibv_create_cq: {}", last_errno())));
        }
        let mut init = ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: r.cq,
            recv_cq: r.cq,
            srq: std::ptr::null_mut(),
            cap: ibv_qp_cap {
                max_send_wr: SEND_DEPTH as u32,
                max_recv_wr: VERBS_RECV_DEPTH as u32,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the PD and CQ are valid; `init` is fully initialised.
        r.qp = unsafe { ibv_create_qp(r.pd, &mut init) };
        if r.qp.is_null() {
            return Err(verr(format!("ibv_create_qp: {}", last_errno())));
        }
        // SAFETY: the staging region is valid for its length and outlives the registration
        // (both are dropped by `Resources`, the MR first).
        r.staging_mr = unsafe {
            ibv_reg_mr(
                r.pd,
                r.staging.as_mut_ptr().cast(),
                r.staging.len(),
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        if r.staging_mr.is_null() {
            return Err(verr(format!("registering the staging area: {}", last_errno())));
        }
        Ok(r)
    }

    fn modify(&self, attr: &mut ibv_qp_attr, mask: ibv_qp_attr_mask, what: &str) -> Result<(), FabricError> {
        // SAFETY: the QP is valid; `attr` is initialised for every field `mask` names.
        let rc = unsafe { ibv_modify_qp(self.qp, attr, mask.0 as i32) };
        if rc != 0 {
            return Err(verr(format!("moving the queue pair to {what}: {}", errno_text(rc))));
        }
        Ok(())
    }

    fn to_init(&self) -> Result<(), FabricError> {
        // SAFETY: ibv_qp_attr is plain data; zero is valid for every field.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = PORT;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
        use ibv_qp_attr_mask as m;
        self.modify(&mut a, m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS, "INIT")
    }

    fn to_rtr(&self, peer: &VerbsInfo) -> Result<(), FabricError> {
        // SAFETY: as in `to_init`.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = self.device.mtu.min(peer.mtu as u32).max(ibv_mtu::IBV_MTU_256);
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.max_dest_rd_atomic = 1;
        a.min_rnr_timer = 12;
        a.ah_attr.is_global = 1;
        a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
        a.ah_attr.grh.sgid_index = self.device.gid_index;
        a.ah_attr.grh.hop_limit = 64;
        a.ah_attr.dlid = peer.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.port_num = PORT;
        use ibv_qp_attr_mask as m;
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_AV
                | m::IBV_QP_PATH_MTU
                | m::IBV_QP_DEST_QPN
                | m::IBV_QP_RQ_PSN
                | m::IBV_QP_MAX_DEST_RD_ATOMIC
                | m::IBV_QP_MIN_RNR_TIMER,
            "RTR",
        )
    }

    fn to_rts(&self, psn: u32) -> Result<(), FabricError> {
        // SAFETY: as in `to_init`.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        // 4.096 us * 2^18 ~ 1 s before a retry: Soft-RoCE under emulation is slow.
        a.timeout = 18;
        a.retry_cnt = 7;
        a.rnr_retry = 7; // 7 = retry forever while the peer has no receive posted
        a.sq_psn = psn;
        a.max_rd_atomic = 1;
        use ibv_qp_attr_mask as m;
        self.modify(
            &mut a,
            m::IBV_QP_STATE
                | m::IBV_QP_TIMEOUT
                | m::IBV_QP_RETRY_CNT
                | m::IBV_QP_RNR_RETRY
                | m::IBV_QP_SQ_PSN
                | m::IBV_QP_MAX_QP_RD_ATOMIC,
            "RTS",
        )
    }

    /// Posts one zero-length receive WR (consumed by an incoming WRITE WITH IMMEDIATE).
    fn post_recv(&self, wr_id: u64) -> Result<(), FabricError> {
        let mut wr = ibv_recv_wr { wr_id, next: std::ptr::null_mut(), sg_list: std::ptr::null_mut(), num_sge: 0 };
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid; `wr` has no scatter entries and lives through the call.
        let rc = unsafe { ibv_post_recv(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(verr(format!("ibv_post_recv: {}", errno_text(rc))));
        }
        Ok(())
    }

    fn qpn(&self) -> u32 {
        // SAFETY: the QP is valid.
        unsafe { (*self.qp).qp_num }
    }

    fn channel_fd(&self) -> RawFd {
        // SAFETY: the channel is valid.
        unsafe { (*self.channel).fd }
    }

    /// Takes (and acknowledges) the completion channel's events. Returns how many.
    fn drain_channel(&mut self) -> u32 {
        let mut n = 0;
        loop {
            let mut cq = std::ptr::null_mut();
            let mut cq_ctx = std::ptr::null_mut();
            // SAFETY: the channel is valid and nonblocking; outputs are writable.
            if unsafe { ibv_get_cq_event(self.channel, &mut cq, &mut cq_ctx) } != 0 {
                break;
            }
            n += 1;
        }
        self.unacked_events += n;
        if self.unacked_events >= 64 {
            // SAFETY: acknowledges events taken from this CQ's channel.
            unsafe { ibv_ack_cq_events(self.cq, self.unacked_events) };
            self.unacked_events = 0;
        }
        n
    }

    fn req_notify(&self) -> Result<(), FabricError> {
        // SAFETY: the CQ is valid.
        let rc = unsafe { ibv_req_notify_cq(self.cq, 0) };
        if rc != 0 {
            return Err(verr(format!("ibv_req_notify_cq: {}", errno_text(rc))));
        }
        Ok(())
    }
}

impl VerbsEndpoint {
    /// Builds the endpoint on an authenticated set-up connection (both sides run the same steps).
    pub fn establish(
        shared: Arc<Shared>,
        mut conn: SetupConn,
        peer: &str,
        _accepting: bool,
    ) -> Result<VerbsEndpoint, FabricError> {
        let device = shared.device.clone().ok_or_else(|| verr("the fabric has no verbs device"))?;
        let res = Resources::new(device)?;
        res.to_init()?;
        for i in 0..VERBS_RECV_DEPTH as u64 {
            res.post_recv(i)?;
        }
        let psn = rand::rngs::OsRng.next_u32() & 0x00ff_ffff;
        let dev = &res.device;
        let mine = VerbsInfo { qpn: res.qpn(), psn, lid: dev.lid, mtu: dev.mtu as u8, gid: dev.gid };
        conn.send(&SetupMsg::VerbsInfo(mine))?;
        let theirs = match conn.recv()? {
            SetupMsg::VerbsInfo(v) => v,
            SetupMsg::Refused { reason } => return Err(FabricError::Refused(format!("peer {peer}: {reason}"))),
            other => return Err(FabricError::Refused(format!("peer {peer} sent {other:?} instead of VERBS_INFO"))),
        };
        res.to_rtr(&theirs)?;
        res.to_rts(psn)?;
        conn.send(&SetupMsg::Ready)?;
        match conn.recv()? {
            SetupMsg::Ready => {}
            other => return Err(FabricError::Refused(format!("peer {peer} sent {other:?} instead of READY"))),
        }
        let (stream, leftover) = conn.into_parts();
        let ch = Channel::new(stream, peer.to_string(), &leftover, shared.peer_timeout)?;
        let flag = new_flag()?;
        let waker = Waker::new(ch.fd(), &[res.channel_fd(), flag.wake.as_raw_fd()], ch.heartbeat_every())?;
        res.req_notify()?;
        res.device.flags.lock().unwrap_or_else(|e| e.into_inner()).insert(res.qpn(), flag.clone());
        info!(
            peer,
            device = %res.device.name,
            qpn = res.qpn(),
            peer_qpn = theirs.qpn,
            mtu = 128u32 << res.device.mtu.min(theirs.mtu as u32),
            "fabric: verbs queue pair ready"
        );
        // SAFETY: ibv_wc is plain data; zero is valid.
        let wcs = (0..POLL_BATCH).map(|_| unsafe { std::mem::zeroed::<ibv_wc>() }).collect();
        Ok(VerbsEndpoint {
            res,
            ch,
            waker,
            flag,
            shared,
            inflight: VecDeque::with_capacity(SEND_DEPTH),
            staging_head: 0,
            staging_used: 0,
            wcs,
            stats: EndpointStats::default(),
            dead: None,
        })
    }

    pub fn peer(&self) -> &str {
        &self.ch.peer
    }

    fn closed(&self) -> Result<(), FabricError> {
        match &self.dead {
            Some(e) => Err(FabricError::Closed(e.to_string())),
            None => Ok(()),
        }
    }

    pub fn expose(&mut self, region: Arc<Region>) -> Result<RemoteKey, FabricError> {
        self.closed()?;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the region's memory is valid for its length and outlives the registration: the
        // `Arc` is kept next to the MR and dropped only after `ibv_dereg_mr`.
        let mr = unsafe { ibv_reg_mr(self.res.pd, region.as_mut_ptr().cast(), region.len(), access.0 as i32) };
        if mr.is_null() {
            return Err(verr(format!("registering a region of {} bytes: {}", region.len(), last_errno())));
        }
        // SAFETY: `mr` was just returned valid.
        let rkey = unsafe { (*mr).rkey };
        let key = RemoteKey { key: rkey, addr: region.as_mut_ptr() as u64, len: region.len() as u64 };
        self.res.exposed.push((mr, region));
        Ok(key)
    }

    /// Reserves `len` contiguous staging bytes: (start, bytes held including any skipped tail).
    fn reserve(&mut self, len: usize) -> Option<(usize, usize)> {
        let cap = self.res.staging.len();
        let (start, held) =
            if self.staging_head + len <= cap { (self.staging_head, len) } else { (0, cap - self.staging_head + len) };
        if self.staging_used + held > cap {
            return None;
        }
        self.staging_head = start + len;
        self.staging_used += held;
        Some((start, held))
    }

    pub fn write(
        &mut self,
        wr_id: u64,
        src: &[&[u8]],
        dst: RemoteKey,
        offset: u64,
        imm: Option<u32>,
    ) -> Result<(), FabricError> {
        self.closed()?;
        let len: usize = src.iter().map(|s| s.len()).sum();
        if len > WRITE_BYTES_MAX {
            return Err(FabricError::TooLarge { what: "write", len, max: WRITE_BYTES_MAX });
        }
        check_bounds(offset, len as u64, dst.len)?;
        if self.inflight.len() >= SEND_DEPTH {
            return Err(FabricError::Busy);
        }
        let (start, held) = self.reserve(len).ok_or(FabricError::Busy)?;
        let mut at = start;
        for s in src {
            self.res.staging.store(at, s);
            at += s.len();
        }
        // SAFETY: the MR is valid.
        let lkey = unsafe { (*self.res.staging_mr).lkey };
        let mut sge = ibv_sge { addr: self.res.staging.as_mut_ptr() as u64 + start as u64, length: len as u32, lkey };
        // SAFETY: ibv_send_wr is plain data (pointers, integers, unions); zero is valid.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = &mut sge;
        wr.num_sge = if len == 0 { 0 } else { 1 };
        wr.opcode =
            if imm.is_some() { ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM } else { ibv_wr_opcode::IBV_WR_RDMA_WRITE };
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.imm_data_invalidated_rkey_union.imm_data = imm.unwrap_or(0).to_be();
        wr.wr.rdma.remote_addr = dst.addr + offset;
        wr.wr.rdma.rkey = dst.key;
        let mut bad = std::ptr::null_mut();
        // SAFETY: the QP is valid; `wr` and `sge` live through the call and point into the
        // registered staging area, which holds the bytes until the completion frees them.
        let rc = unsafe { ibv_post_send(self.res.qp, &mut wr, &mut bad) };
        if rc != 0 {
            // Give the staging bytes back (they were the last handed out).
            self.staging_used -= held;
            self.staging_head = if held > len { self.res.staging.len() - (held - len) } else { start };
            if self.staging_used == 0 {
                self.staging_head = 0;
            }
            return Err(if rc == libc::ENOMEM {
                FabricError::Busy
            } else {
                verr(format!("ibv_post_send: {}", errno_text(rc)))
            });
        }
        self.inflight.push_back(Inflight { wr_id, staged: held });
        self.stats.writes += 1;
        self.stats.write_bytes += len as u64;
        self.stats.staged_copies += (len > 0) as u64;
        self.stats.imms_sent += imm.is_some() as u64;
        Ok(())
    }

    pub fn send_msg(&mut self, msg: &[u8]) -> Result<(), FabricError> {
        self.closed()?;
        if msg.len() > MSG_BYTES_MAX {
            return Err(FabricError::TooLarge { what: "message", len: msg.len(), max: MSG_BYTES_MAX });
        }
        self.ch.send_frame(&crate::wire::frame::Frame::Msg { len: msg.len() as u32 }, msg)?;
        self.stats.msgs_sent += 1;
        self.waker.want_write(self.ch.sending());
        Ok(())
    }

    /// Takes completions off the CQ. Returns how many, or the error that kills the endpoint.
    fn poll_cq(&mut self, events: &mut Vec<Event>) -> Result<usize, FabricError> {
        let mut total = 0;
        loop {
            // SAFETY: the CQ is valid; `wcs` has room for POLL_BATCH entries.
            let n = unsafe { ibv_poll_cq(self.res.cq, POLL_BATCH as i32, self.wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(verr(format!("ibv_poll_cq: {}", last_errno())));
            }
            for i in 0..n as usize {
                let wc = Wc::of(&self.wcs[i]);
                self.completion(&wc, events)?;
            }
            total += n as usize;
            if (n as usize) < POLL_BATCH {
                return Ok(total);
            }
        }
    }

    fn completion(&mut self, wc: &Wc, events: &mut Vec<Event>) -> Result<(), FabricError> {
        let is_recv = wc.opcode & ibv_wc_opcode::IBV_WC_RECV != 0;
        if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
            // SAFETY: the library returns a static string for any status value.
            let status = c_text(unsafe { ibv_wc_status_str(wc.status) });
            let e = verr(format!(
                "{} completion failed: {status} (vendor error {:#x})",
                if is_recv { "receive" } else { "write" },
                wc.vendor_err
            ));
            if !is_recv {
                if let Some(pos) = self.inflight.iter().position(|f| f.wr_id == wc.wr_id) {
                    if let Some(f) = self.inflight.remove(pos) {
                        events.push(Event::WriteFailed { wr_id: f.wr_id, error: e.clone() });
                    }
                }
            }
            return Err(e);
        }
        if is_recv {
            if wc.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                let imm = wc.imm;
                self.stats.imms_received += 1;
                self.stats.writes_received += 1;
                self.stats.bytes_received += wc.byte_len as u64;
                events.push(Event::Imm { imm, len: wc.byte_len });
            } else {
                // A SEND: the protocol never uses them; a peer that does is misbehaving.
                self.res.post_recv(wc.wr_id)?;
                self.stats.refusals += 1;
                return Err(FabricError::Protocol { peer: self.ch.peer.clone(), what: "an RDMA SEND".into() });
            }
            return self.res.post_recv(wc.wr_id);
        }
        // Send completions arrive in posting order on an RC queue pair.
        match self.inflight.pop_front() {
            Some(f) if f.wr_id == wc.wr_id => {
                self.staging_used -= f.staged;
                if self.staging_used == 0 {
                    self.staging_head = 0;
                }
                events.push(Event::WriteDone { wr_id: f.wr_id });
                Ok(())
            }
            other => Err(verr(format!(
                "send completion for wr {} out of order (expected {:?})",
                wc.wr_id,
                other.map(|f| f.wr_id)
            ))),
        }
    }

    pub fn poll(&mut self, events: &mut Vec<Event>) -> usize {
        if self.dead.is_some() {
            return 0;
        }
        let before = events.len();
        self.waker.drain_timer();
        if let Err(e) = self.progress(events) {
            self.fail(e, events);
        }
        events.len() - before
    }

    fn progress(&mut self, events: &mut Vec<Event>) -> Result<(), FabricError> {
        if self.shared.stopped() {
            return Err(FabricError::Stopped);
        }
        let ev = self.flag.event.load(Ordering::Acquire);
        if ev != 0 {
            return Err(verr(format!("{} (device {})", event_text(ev - 1), self.res.device.name)));
        }
        self.res.drain_channel();
        loop {
            self.poll_cq(events)?;
            self.res.req_notify()?;
            // A completion that arrived between the poll and the re-arm raised no event: look again.
            if self.poll_cq(events)? == 0 {
                break;
            }
        }
        let mut sink = ControlOnly { stats: &mut self.stats };
        self.ch.receive(&mut sink, events)?;
        self.ch.flush()?;
        self.ch.tick(Instant::now())?;
        self.waker.want_write(self.ch.sending());
        Ok(())
    }

    fn fail(&mut self, e: FabricError, events: &mut Vec<Event>) {
        warn!(peer = %self.ch.peer, "fabric: endpoint failed: {e}");
        events.extend(self.inflight.drain(..).map(|f| Event::WriteFailed { wr_id: f.wr_id, error: e.clone() }));
        events.push(Event::Failed(e.clone()));
        self.ch.shutdown();
        // SAFETY: ibv_qp_attr is plain data; moving the QP to ERR flushes it and tells the peer's
        // NIC nothing more will come. The QP is valid.
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_ERR;
            ibv_modify_qp(self.res.qp, &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32);
        }
        self.dead = Some(e);
    }

    pub fn wait_fd(&self) -> RawFd {
        self.waker.fd()
    }

    pub fn arm(&mut self) -> bool {
        if self.dead.is_some() {
            return true;
        }
        if self.ch.has_buffered_work() || self.shared.stopped() || self.flag.event.load(Ordering::Acquire) != 0 {
            return false;
        }
        self.waker.want_write(self.ch.sending());
        true
    }

    pub fn stats(&self) -> EndpointStats {
        self.stats
    }
}

impl Drop for VerbsEndpoint {
    fn drop(&mut self) {
        let qpn = self.res.qpn();
        self.res.device.flags.lock().unwrap_or_else(|e| e.into_inner()).remove(&qpn);
    }
}
