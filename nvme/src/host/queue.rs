//! One NVMe/TCP queue pair on the host side: a TCP connection, the ICReq/ICResp exchange,
//! and a pipelined command engine (in-capsule writes, R2T → H2CData, C2HData reassembly).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{HostError, HostOptions, Result};
use crate::command::{sgl, Command, DataDirection};
use crate::completion::Completion;
use crate::status::Status;
use crate::tcp::pdu::{self, DataHeader, Decoded, Digests, Pdu};

/// A finished command.
#[derive(Debug)]
pub struct Response {
    pub tag: u64,
    pub completion: Completion,
    /// The data buffer given at submission (filled for reads), handed back for reuse.
    pub data: Vec<u8>,
}

impl Response {
    pub fn status(&self) -> Status {
        self.completion.status
    }
    pub fn ok(&self) -> Result<()> {
        if self.completion.status.is_success() {
            Ok(())
        } else {
            Err(HostError::Nvme(self.completion.status))
        }
    }
}

struct Slot {
    tag: u64,
    dir: DataDirection,
    data: Vec<u8>,
    /// C2HData bytes received so far.
    received: usize,
}

pub struct QueuePair {
    stream: TcpStream,
    pub qid: u16,
    digests: Digests,
    maxh2cdata: usize,
    /// In-capsule data limit for this queue (0 on the admin queue except for Connect).
    pub(crate) in_capsule_max: usize,
    /// Receive buffer; bytes live in `rx[rx_start..rx_end]`. It grows only when one PDU is
    /// larger than it (a big C2HData), never per read.
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: Vec<u8>,
    slots: Vec<Option<Slot>>,
    free_cids: Vec<u16>,
    busy_poll: bool,
    timeout: Duration,
    /// Completions of other commands that arrived while `execute` waited for its own (an
    /// Asynchronous Event Request answered meanwhile): kept for `take_finished`.
    stash: Vec<Response>,
}

/// Initial receive buffer: several PDUs per read; grows to fit one larger PDU when needed.
const RX_BYTES: usize = 1 << 20;

impl QueuePair {
    /// Opens the TCP connection and does the ICReq/ICResp exchange. `depth` bounds
    /// outstanding commands.
    pub fn open(addr: SocketAddr, qid: u16, depth: usize, opts: &HostOptions) -> Result<QueuePair> {
        let timeout = Duration::from_millis(opts.timeout_ms);
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        let mut q = QueuePair {
            stream,
            qid,
            digests: Digests::default(),
            maxh2cdata: 0,
            in_capsule_max: 0,
            rx: vec![0; RX_BYTES],
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(64 * 1024),
            slots: (0..depth).map(|_| None).collect(),
            free_cids: (0..depth as u16).rev().collect(),
            busy_poll: opts.busy_poll,
            timeout,
            stash: Vec::new(),
        };
        let icreq = Pdu::IcReq { pfv: 0, hpda: 0, digests: opts.digests, maxr2t: opts.maxr2t };
        pdu::encode(&icreq, &[], Digests::default(), &mut q.tx);
        q.flush()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = q.next_frame(Digests::default())? {
                q.rx_start += frame.len;
                match frame.pdu {
                    Pdu::IcResp { pfv, cpda, digests, maxh2cdata } => {
                        if pfv != 0 || cpda != 0 {
                            return Err(HostError::Protocol(format!("ICResp with PFV {pfv} CPDA {cpda}")));
                        }
                        if maxh2cdata < 4096 {
                            return Err(HostError::Protocol(format!("ICResp MAXH2CDATA {maxh2cdata} < 4096")));
                        }
                        q.digests = digests;
                        q.maxh2cdata = maxh2cdata as usize;
                        return Ok(q);
                    }
                    Pdu::C2HTermReq(t) => return Err(HostError::Terminated { fes: t.fes, fei: t.fei }),
                    other => return Err(HostError::Protocol(format!("expected ICResp, got {}", other.name()))),
                }
            }
            q.wait_readable(deadline)?;
        }
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    /// The connection itself, for tools and tests that go on misbehaving on an established
    /// queue (writing raw PDUs, not reading responses). Anything buffered is dropped.
    pub fn into_raw(self) -> (TcpStream, Digests) {
        (self.stream, self.digests)
    }
    pub fn depth(&self) -> usize {
        self.slots.len()
    }
    pub fn outstanding(&self) -> usize {
        self.slots.len() - self.free_cids.len()
    }

    /// Submits a command. For writes `data` is the payload; for reads a buffer of the
    /// transfer length. The CID and SGL are set here.
    pub fn submit(&mut self, cmd: Command, data: Vec<u8>, dir: DataDirection, tag: u64) -> Result<()> {
        self.submit_inner(cmd, data, dir, tag, true)
    }

    /// Submits with the SGL exactly as the caller set it (tests send descriptors a correct
    /// host never would); data is never put in the capsule.
    pub fn submit_with_sgl(&mut self, cmd: Command, data: Vec<u8>, dir: DataDirection, tag: u64) -> Result<()> {
        self.submit_inner(cmd, data, dir, tag, false)
    }

    fn submit_inner(
        &mut self,
        mut cmd: Command,
        data: Vec<u8>,
        dir: DataDirection,
        tag: u64,
        set_sgl: bool,
    ) -> Result<()> {
        let Some(cid) = self.free_cids.pop() else {
            return Err(HostError::QueueFull(self.outstanding()));
        };
        cmd.set_cid(cid);
        let in_capsule =
            set_sgl && dir == DataDirection::HostToController && !data.is_empty() && data.len() <= self.in_capsule_max;
        if !set_sgl {
            // Keep the caller's descriptor.
        } else if data.is_empty() {
            cmd.set_sgl(sgl::TRANSPORT, 0, 0);
        } else if in_capsule {
            cmd.set_sgl(sgl::IN_CAPSULE, 0, data.len() as u32);
        } else {
            cmd.set_sgl(sgl::TRANSPORT, 0, data.len() as u32);
        }
        let payload: &[u8] = if in_capsule { &data } else { &[] };
        pdu::encode(&Pdu::CapsuleCmd(cmd), payload, self.digests, &mut self.tx);
        self.slots[cid as usize] = Some(Slot { tag, dir, data, received: 0 });
        // Sent with the next poll/wait, so a burst of submissions leaves in one write.
        if self.tx.len() >= 256 * 1024 {
            self.flush()?;
        }
        Ok(())
    }

    /// Runs a command whose data goes in the capsule regardless of the queue's in-capsule
    /// limit (Connect uses it; tests use it for raw fabrics commands).
    pub fn execute_in_capsule(&mut self, cmd: Command, data: Vec<u8>) -> Result<Response> {
        let saved = self.in_capsule_max;
        self.in_capsule_max = data.len().max(saved);
        let r = self.execute(cmd, data, DataDirection::HostToController);
        self.in_capsule_max = saved;
        r
    }

    /// Processes whatever has arrived without blocking; appends finished commands to `out`.
    pub fn poll(&mut self, out: &mut Vec<Response>) -> Result<usize> {
        self.flush()?;
        self.fill()?;
        let mut done = 0;
        while let Some(frame) = self.next_frame(self.digests)? {
            done += self.on_frame(frame, out)?;
        }
        self.flush()?;
        Ok(done)
    }

    /// Waits until at least one command finishes (spinning or sleeping per options).
    pub fn wait(&mut self, out: &mut Vec<Response>) -> Result<usize> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let n = self.poll(out)?;
            if n > 0 {
                return Ok(n);
            }
            if self.outstanding() == 0 {
                return Ok(0);
            }
            if !self.busy_poll {
                self.wait_readable(deadline)?;
            } else if Instant::now() > deadline {
                return Err(HostError::Timeout(self.timeout.as_millis() as u64));
            }
        }
    }

    /// A command submitted with `tag` that finished while `execute` waited for another one.
    pub fn take_finished(&mut self, tag: u64) -> Option<Response> {
        let i = self.stash.iter().position(|r| r.tag == tag)?;
        Some(self.stash.swap_remove(i))
    }

    /// Submits one command and waits for it.
    pub fn execute(&mut self, cmd: Command, data: Vec<u8>, dir: DataDirection) -> Result<Response> {
        const TAG: u64 = u64::MAX;
        self.submit(cmd, data, dir, TAG)?;
        let mut out = Vec::new();
        loop {
            self.wait(&mut out)?;
            if let Some(i) = out.iter().position(|r| r.tag == TAG) {
                let mine = out.swap_remove(i);
                self.stash.append(&mut out);
                return Ok(mine);
            }
            if self.outstanding() == 0 {
                return Err(HostError::Protocol("command vanished".into()));
            }
        }
    }

    fn on_frame(&mut self, frame: pdu::Frame, out: &mut Vec<Response>) -> Result<usize> {
        let data_range = frame.data.clone();
        let start = self.rx_start;
        self.rx_start += frame.len;
        match frame.pdu {
            Pdu::CapsuleResp(cqe) => {
                let slot = self.take_slot(cqe.cid)?;
                out.push(Response { tag: slot.tag, completion: cqe, data: slot.data });
                Ok(1)
            }
            Pdu::C2HData(d) => {
                if !frame.data_digest_ok {
                    return Err(HostError::Protocol(format!("C2HData for CID {} failed its data digest", d.cccid)));
                }
                let slot = self.slot_mut(d.cccid)?;
                let (off, len) = (d.offset as usize, d.length as usize);
                if slot.dir != DataDirection::ControllerToHost || off != slot.received || off + len > slot.data.len() {
                    return Err(HostError::Protocol(format!(
                        "C2HData CID {} offset {off} len {len} does not fit (received {}, buffer {})",
                        d.cccid,
                        slot.received,
                        slot.data.len()
                    )));
                }
                slot.received += len;
                let src = start + data_range.start..start + data_range.end;
                // Split borrow: copy from rx into the slot's buffer.
                let QueuePair { rx, slots, .. } = self;
                if let Some(Some(s)) = slots.get_mut(d.cccid as usize) {
                    s.data[off..off + len].copy_from_slice(&rx[src]);
                }
                if d.last && d.success {
                    let slot = self.take_slot(d.cccid)?;
                    if slot.received != slot.data.len() {
                        return Err(HostError::Protocol("C2HData SUCCESS before all data arrived".into()));
                    }
                    let mut c = Completion::new(d.cccid, Status::SUCCESS);
                    c.sqid = self.qid;
                    out.push(Response { tag: slot.tag, completion: c, data: slot.data });
                    return Ok(1);
                }
                if d.success {
                    return Err(HostError::Protocol("C2HData SUCCESS without LAST_PDU".into()));
                }
                Ok(0)
            }
            Pdu::R2T(r) => {
                let (maxh2c, digests) = (self.maxh2cdata, self.digests);
                let slot = self.slot_mut(r.cccid)?;
                let (off, len) = (r.offset as usize, r.length as usize);
                if slot.dir != DataDirection::HostToController || len == 0 || off + len > slot.data.len() {
                    return Err(HostError::Protocol(format!(
                        "R2T CID {} offset {off} len {len} out of range",
                        r.cccid
                    )));
                }
                let data = std::mem::take(&mut slot.data);
                let mut sent = 0;
                while sent < len {
                    let n = (len - sent).min(maxh2c);
                    let h = DataHeader {
                        cccid: r.cccid,
                        ttag: r.ttag,
                        offset: (off + sent) as u32,
                        length: n as u32,
                        last: sent + n == len,
                        success: false,
                    };
                    pdu::encode(&Pdu::H2CData(h), &data[off + sent..off + sent + n], digests, &mut self.tx);
                    sent += n;
                }
                if let Ok(s) = self.slot_mut(r.cccid) {
                    s.data = data;
                }
                Ok(0)
            }
            Pdu::C2HTermReq(t) => Err(HostError::Terminated { fes: t.fes, fei: t.fei }),
            other => Err(HostError::Protocol(format!("unexpected {} from the target", other.name()))),
        }
    }

    fn slot_mut(&mut self, cid: u16) -> Result<&mut Slot> {
        self.slots
            .get_mut(cid as usize)
            .and_then(|s| s.as_mut())
            .ok_or_else(|| HostError::Protocol(format!("PDU for CID {cid}, which is not outstanding")))
    }

    fn take_slot(&mut self, cid: u16) -> Result<Slot> {
        let slot = self
            .slots
            .get_mut(cid as usize)
            .and_then(|s| s.take())
            .ok_or_else(|| HostError::Protocol(format!("completion for CID {cid}, which is not outstanding")))?;
        self.free_cids.push(cid);
        Ok(slot)
    }

    /// Decodes the next whole PDU in the receive buffer, if any. Does not consume it:
    /// `on_frame` advances `rx_start` (so C2HData can copy out of the buffer first).
    fn next_frame(&mut self, digests: Digests) -> Result<Option<pdu::Frame>> {
        let buf = &self.rx[self.rx_start..self.rx_end];
        match pdu::decode(buf, digests, crate::constants::PDU_LEN_MAX) {
            Ok(Decoded::Need(n)) => {
                if n > self.rx.len() {
                    // One PDU larger than the buffer: make room for it (bounded by PDU_LEN_MAX).
                    self.rx.resize(n + 64 * 1024, 0);
                }
                Ok(None)
            }
            Ok(Decoded::Frame(f)) => Ok(Some(f)),
            Err(e) => Err(HostError::Protocol(format!("malformed PDU from the target: {e}"))),
        }
    }

    /// Reads what is available now (non-blocking) into the free end of the buffer.
    fn fill(&mut self) -> Result<()> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && self.rx.len() - self.rx_end < self.rx.len() / 4 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        loop {
            if self.rx_end == self.rx.len() {
                return Ok(());
            }
            match self.stream.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => {
                    self.rx_end += n;
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes all pending bytes; while the socket is full, keeps draining the receive side so
    /// neither end can deadlock on full buffers.
    fn flush(&mut self) -> Result<()> {
        let mut sent = 0;
        let deadline = Instant::now() + self.timeout;
        while sent < self.tx.len() {
            match self.stream.write(&self.tx[sent..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    match self.fill() {
                        Ok(()) | Err(HostError::Closed) => {}
                        Err(e) => return Err(e),
                    }
                    wait_fd(self.stream.as_raw_fd(), libc::POLLOUT, 10);
                    if Instant::now() > deadline {
                        return Err(HostError::Timeout(self.timeout.as_millis() as u64));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.tx.clear();
        Ok(())
    }

    fn wait_readable(&mut self, deadline: Instant) -> Result<()> {
        let now = Instant::now();
        if now >= deadline {
            return Err(HostError::Timeout(self.timeout.as_millis() as u64));
        }
        let ms = (deadline - now).as_millis().min(100) as i32;
        wait_fd(self.stream.as_raw_fd(), libc::POLLIN, ms);
        self.fill()
    }
}

fn wait_fd(fd: i32, events: i16, timeout_ms: i32) {
    let mut p = libc::pollfd { fd, events, revents: 0 };
    // SAFETY: `p` is a valid pollfd for the duration of the call and we pass a count of 1.
    unsafe {
        libc::poll(&mut p, 1, timeout_ms);
    }
}
