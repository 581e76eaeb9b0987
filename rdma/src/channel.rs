//! An endpoint's TCP connection after the handshake, shared by both backends: a nonblocking
//! socket with one preallocated receive buffer and one preallocated send buffer, the frame loop,
//! heartbeats and the peer timeout.
//!
//! On the tcp backend it carries the one-sided writes themselves; on verbs only control messages
//! and heartbeats (a write or ack frame there is a protocol violation). Sending tries `writev`
//! straight from the caller's slices first and copies only what the kernel did not take, so an
//! uncongested write costs one system call and no copy; under back-pressure frames queue in the
//! send buffer and leave together (batching), with `poll()` flushing. A write's data is stored
//! into its region from the receive buffer, or read straight into the region when it is larger
//! than what is buffered.

use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::constants::{
    HEARTBEATS_PER_TIMEOUT, HEARTBEAT_INTERVAL_MIN, POLL_READ_BYTES_MAX, RECV_BUF_BYTES, TCP_SEND_BUF_BYTES,
    WRITE_SLICES_DIRECT_MAX,
};
use crate::region::Region;
use crate::wire::frame::{self, Decoded, Frame, HEADER_BYTES_MAX};
use crate::{Event, FabricError};

/// Writes of at least this many bytes still to come are read straight into the region rather
/// than through the receive buffer (below it, one more buffered read is cheaper).
const DIRECT_READ_MIN: usize = 16 << 10;

/// What the frame loop needs from the backend that owns the channel.
pub(crate) trait Sink {
    /// A write frame's header: the region and start its data goes to, or why it is refused.
    fn resolve(&mut self, key: u32, offset: u64, len: u32) -> Result<(Arc<Region>, usize), String>;
    /// A write's data is all in its region.
    fn placed(&mut self, imm: Option<u32>, len: u32, events: &mut Vec<Event>);
    /// The peer placed `count` more of our writes, or why that is impossible.
    fn acked(&mut self, count: u32, events: &mut Vec<Event>) -> Result<(), String>;
    /// A control message arrived.
    fn message(&mut self, len: usize);
}

/// A write whose data is still arriving.
struct Placing {
    region: Arc<Region>,
    start: usize,
    remaining: usize,
    imm: Option<u32>,
    len: u32,
}

pub(crate) struct Channel {
    pub peer: String,
    sock: TcpStream,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    placing: Option<Placing>,
    /// Frames not yet taken by the kernel: `tx[tx_head..]`. Capacity fixed at
    /// `TCP_SEND_BUF_BYTES`, never grown.
    tx: Vec<u8>,
    tx_head: usize,
    last_rx: Instant,
    last_tx: Instant,
    timeout: Duration,
    heartbeat_every: Duration,
    /// Set once the connection broke while sending; reported by the next `poll()`.
    broken: Option<FabricError>,
}

/// The heartbeat period for a peer timeout.
pub(crate) fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / HEARTBEATS_PER_TIMEOUT).max(HEARTBEAT_INTERVAL_MIN)
}

impl Channel {
    /// Takes an authenticated socket and the bytes that arrived after the handshake.
    pub fn new(sock: TcpStream, peer: String, leftover: &[u8], timeout: Duration) -> Result<Channel, FabricError> {
        sock.set_nonblocking(true).map_err(|e| FabricError::io("fabric socket: nonblocking", e))?;
        sock.set_nodelay(true).map_err(|e| FabricError::io("fabric socket: TCP_NODELAY", e))?;
        sock.set_read_timeout(None).map_err(|e| FabricError::io("fabric socket", e))?;
        sock.set_write_timeout(None).map_err(|e| FabricError::io("fabric socket", e))?;
        let mut rx = vec![0u8; RECV_BUF_BYTES].into_boxed_slice();
        if leftover.len() > rx.len() {
            return Err(FabricError::Protocol { peer, what: "flood of bytes during set-up".into() });
        }
        rx[..leftover.len()].copy_from_slice(leftover);
        let now = Instant::now();
        Ok(Channel {
            peer,
            sock,
            rx,
            rx_start: 0,
            rx_end: leftover.len(),
            placing: None,
            tx: Vec::with_capacity(TCP_SEND_BUF_BYTES),
            tx_head: 0,
            last_rx: now,
            last_tx: now,
            timeout,
            heartbeat_every: heartbeat_interval(timeout),
            broken: None,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    pub fn heartbeat_every(&self) -> Duration {
        self.heartbeat_every
    }

    /// Frames wait in the send buffer.
    pub fn sending(&self) -> bool {
        self.tx_head < self.tx.len()
    }

    /// Whether `poll()` has work without new bytes from the socket: a complete frame (header and,
    /// for a message, its body) or the next bytes of a write's data sit in the receive buffer.
    pub fn has_buffered_work(&self) -> bool {
        let buffered = &self.rx[self.rx_start..self.rx_end];
        if self.placing.is_some() {
            return !buffered.is_empty();
        }
        match frame::decode(buffered) {
            Ok(Decoded::Need(_)) => false,
            Ok(Decoded::Header { frame: Frame::Msg { len }, header_len }) => {
                buffered.len() >= header_len + len as usize
            }
            Ok(Decoded::Header { .. }) | Err(_) => true,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> FabricError {
        FabricError::Protocol { peer: self.peer.clone(), what: what.into() }
    }

    /// Queues one frame made of `header` and `body` slices (`body_len` bytes in all), keeping
    /// `reserve` bytes of the send buffer free afterwards. Returns whether any byte was copied
    /// (false: the kernel took the frame whole, straight from the caller's slices).
    pub fn send(
        &mut self,
        header: &[u8],
        body: &[&[u8]],
        body_len: usize,
        reserve: usize,
    ) -> Result<bool, FabricError> {
        if let Some(e) = &self.broken {
            return Err(FabricError::Closed(e.to_string()));
        }
        let total = header.len() + body_len;
        let queued = self.tx.len() - self.tx_head;
        if queued + total + reserve > self.tx.capacity() {
            return Err(FabricError::Busy);
        }
        let mut sent = 0;
        if queued == 0 && body.len() <= WRITE_SLICES_DIRECT_MAX {
            let mut slices = [IoSlice::new(&[]); 1 + WRITE_SLICES_DIRECT_MAX];
            slices[0] = IoSlice::new(header);
            for (s, b) in slices[1..].iter_mut().zip(body) {
                *s = IoSlice::new(b);
            }
            match self.sock.write_vectored(&slices[..1 + body.len()]) {
                Ok(n) => {
                    sent = n;
                    if n > 0 {
                        self.last_tx = Instant::now();
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let err = FabricError::PeerGone(format!("{} (send: {e})", self.peer));
                    self.broken = Some(err.clone());
                    return Err(FabricError::Closed(err.to_string()));
                }
            }
            if sent == total {
                return Ok(false);
            }
        }
        if self.tx.len() + (total - sent) > self.tx.capacity() {
            // Room exists (checked above) but not at the end: move the queued bytes to the front.
            self.tx.drain(..self.tx_head);
            self.tx_head = 0;
        }
        let mut skip = sent;
        for part in std::iter::once(header).chain(body.iter().copied()) {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            self.tx.extend_from_slice(&part[skip..]);
            skip = 0;
        }
        Ok(true)
    }

    /// Queues a frame without body (heartbeat, ack) or a message.
    pub fn send_frame(&mut self, f: &Frame, body: &[u8]) -> Result<(), FabricError> {
        let mut h = [0u8; HEADER_BYTES_MAX];
        let n = frame::encode(f, &mut h);
        self.send(&h[..n], &[body], body.len(), 0).map(|_| ())
    }

    /// Hands queued bytes to the kernel until it takes no more. Returns bytes sent.
    pub fn flush(&mut self) -> Result<usize, FabricError> {
        if let Some(e) = &self.broken {
            return Err(e.clone());
        }
        let mut sent = 0;
        while self.tx_head < self.tx.len() {
            match self.sock.write(&self.tx[self.tx_head..]) {
                Ok(0) => return Err(FabricError::PeerGone(format!("{} (send returned 0)", self.peer))),
                Ok(n) => {
                    self.tx_head += n;
                    sent += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(FabricError::PeerGone(format!("{} (send: {e})", self.peer))),
            }
        }
        if self.tx_head == self.tx.len() {
            self.tx.clear();
            self.tx_head = 0;
        }
        if sent > 0 {
            self.last_tx = Instant::now();
        }
        Ok(sent)
    }

    /// Sends a heartbeat if nothing left for a while; fails if the peer was silent too long.
    pub fn tick(&mut self, now: Instant) -> Result<(), FabricError> {
        let silent = now.saturating_duration_since(self.last_rx);
        if silent > self.timeout {
            return Err(FabricError::Timeout(format!(
                "peer {} silent for {} ms (peer_timeout {} ms)",
                self.peer,
                silent.as_millis(),
                self.timeout.as_millis()
            )));
        }
        if !self.sending() && now.saturating_duration_since(self.last_tx) >= self.heartbeat_every {
            self.send_frame(&Frame::Heartbeat, &[])?;
            self.flush()?;
        }
        Ok(())
    }

    /// Reads more bytes into the receive buffer. `Ok(false)`: nothing to read now.
    fn fill(&mut self, budget: &mut usize) -> Result<bool, FabricError> {
        if *budget == 0 {
            return Ok(false);
        }
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let room = (self.rx.len() - self.rx_end).min(*budget);
        // A frame header or a whole message always fits (constants.rs), so no room means a bug.
        assert!(room > 0, "receive buffer full of an incomplete frame");
        loop {
            match self.sock.read(&mut self.rx[self.rx_end..self.rx_end + room]) {
                Ok(0) => return Err(FabricError::PeerGone(format!("{} (connection closed)", self.peer))),
                Ok(n) => {
                    self.rx_end += n;
                    *budget -= n;
                    self.last_rx = Instant::now();
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(FabricError::PeerGone(format!("{} (receive: {e})", self.peer))),
            }
        }
    }

    /// Processes arriving frames until the socket has nothing more (or this poll's read budget is
    /// spent). Returns how many frames were completed.
    pub fn receive(&mut self, sink: &mut dyn Sink, events: &mut Vec<Event>) -> Result<usize, FabricError> {
        let mut budget = POLL_READ_BYTES_MAX;
        let mut work = 0;
        loop {
            if let Some(p) = &mut self.placing {
                let buffered = self.rx_end - self.rx_start;
                if buffered > 0 {
                    let n = buffered.min(p.remaining);
                    p.region.store(p.start, &self.rx[self.rx_start..self.rx_start + n]);
                    self.rx_start += n;
                    p.start += n;
                    p.remaining -= n;
                } else if p.remaining >= DIRECT_READ_MIN {
                    if budget == 0 {
                        break;
                    }
                    match p.region.read_from(self.sock.as_raw_fd(), p.start, p.remaining.min(budget)) {
                        Ok(0) => return Err(FabricError::PeerGone(format!("{} (connection closed)", self.peer))),
                        Ok(n) => {
                            p.start += n;
                            p.remaining -= n;
                            budget -= n;
                            self.last_rx = Instant::now();
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(FabricError::PeerGone(format!("{} (receive: {e})", self.peer))),
                    }
                } else if !self.fill(&mut budget)? {
                    break;
                }
                if let Some(p) = self.placing.take_if(|p| p.remaining == 0) {
                    sink.placed(p.imm, p.len, events);
                    work += 1;
                }
                continue;
            }
            let buffered = &self.rx[self.rx_start..self.rx_end];
            match frame::decode(buffered) {
                Err(e) => return Err(self.protocol(e.to_string())),
                Ok(Decoded::Need(_)) => {
                    if !self.fill(&mut budget)? {
                        break;
                    }
                }
                Ok(Decoded::Header { frame, header_len }) => match frame {
                    Frame::Write { key, offset, imm, len } => {
                        let (region, start) = sink.resolve(key, offset, len).map_err(|what| self.protocol(what))?;
                        self.rx_start += header_len;
                        self.placing = Some(Placing { region, start, remaining: len as usize, imm, len });
                        if len == 0 {
                            self.placing = None;
                            sink.placed(imm, 0, events);
                            work += 1;
                        }
                    }
                    Frame::Msg { len } => {
                        let end = header_len + len as usize;
                        if buffered.len() < end {
                            if !self.fill(&mut budget)? {
                                break;
                            }
                            continue;
                        }
                        events.push(Event::Message(buffered[header_len..end].to_vec()));
                        sink.message(len as usize);
                        self.rx_start += end;
                        work += 1;
                    }
                    Frame::Heartbeat => self.rx_start += header_len,
                    Frame::Ack { count } => {
                        sink.acked(count, events).map_err(|what| self.protocol(what))?;
                        self.rx_start += header_len;
                        work += 1;
                    }
                },
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        Ok(work)
    }

    /// Closes the connection both ways (the peer sees it at once).
    pub fn shutdown(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
