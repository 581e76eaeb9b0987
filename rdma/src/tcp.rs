//! The tcp backend: RDMA's one-sided semantics in software over the endpoint's TCP connection.
//!
//! A write is a WRITE frame (header + data, `wire::frame`) on the connection; the receiving
//! endpoint's `poll()` checks the frame's key and range against the regions exposed on *that*
//! endpoint, places the data, and returns cumulative ACK frames; the writer reports `WriteDone`
//! when the ack arrives, so, as with an RC queue pair, a completion means "placed at the peer"
//! and `SEND_DEPTH` bounds the writes in flight. TCP's ordering gives RC's: writes are placed in
//! the order they were posted, and an `Imm` event is raised after its data (and all before it)
//! is in the region. Only `poll()` on the receiving side writes region memory.
//!
//! A frame that breaks the rules — unknown key, a range outside the region, a malformed header, an
//! ack for writes never sent — fails this endpoint alone, before any of its bytes is placed, with
//! a log line naming the peer and the fault.

use std::collections::{HashMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use crate::channel::{Channel, Sink};
use crate::constants::{MSG_BYTES_MAX, SEND_DEPTH, TCP_SEND_RESERVE_BYTES, WRITE_BYTES_MAX};
use crate::fabric::Shared;
use crate::region::{check_bounds, Region, RemoteKey};
use crate::waker::Waker;
use crate::wire::frame::{self, Frame, HEADER_BYTES_MAX};
use crate::{EndpointStats, Event, FabricError};

pub(crate) struct TcpEndpoint {
    ch: Channel,
    waker: Waker,
    state: State,
    shared: Arc<Shared>,
    /// Set once the endpoint failed (and `Failed` was reported).
    dead: Option<FabricError>,
}

/// The part of the endpoint the frame loop calls back into.
struct State {
    /// Regions this endpoint's peer may write, by key.
    exposures: HashMap<u32, Arc<Region>>,
    /// Our writes not yet acknowledged, oldest first.
    inflight: VecDeque<u64>,
    /// Writes the peer sent that we placed and have not acknowledged yet.
    acks_owed: u32,
    stats: EndpointStats,
}

impl Sink for State {
    fn resolve(&mut self, key: u32, offset: u64, len: u32) -> Result<(Arc<Region>, usize), String> {
        let region = self.exposures.get(&key).ok_or_else(|| format!("write to key {key:#x}, not exposed to it"))?;
        check_bounds(offset, len as u64, region.len() as u64).map_err(|_| {
            format!("write of {len} bytes at offset {offset} outside the {} bytes of key {key:#x}", region.len())
        })?;
        Ok((region.clone(), offset as usize))
    }

    fn placed(&mut self, imm: Option<u32>, len: u32, events: &mut Vec<Event>) {
        self.acks_owed += 1;
        self.stats.writes_received += 1;
        self.stats.bytes_received += len as u64;
        if let Some(imm) = imm {
            self.stats.imms_received += 1;
            events.push(Event::Imm { imm, len });
        }
    }

    fn acked(&mut self, count: u32, events: &mut Vec<Event>) -> Result<(), String> {
        if count as usize > self.inflight.len() {
            return Err(format!("acknowledged {count} writes, {} in flight", self.inflight.len()));
        }
        events.extend(self.inflight.drain(..count as usize).map(|wr_id| Event::WriteDone { wr_id }));
        Ok(())
    }

    fn message(&mut self, _len: usize) {
        self.stats.msgs_received += 1;
    }
}

impl TcpEndpoint {
    pub fn new(
        shared: Arc<Shared>,
        sock: TcpStream,
        peer: String,
        leftover: &[u8],
    ) -> Result<TcpEndpoint, FabricError> {
        let ch = Channel::new(sock, peer, leftover, shared.peer_timeout)?;
        let waker = Waker::new(ch.fd(), &[], ch.heartbeat_every())?;
        Ok(TcpEndpoint {
            ch,
            waker,
            state: State {
                exposures: HashMap::new(),
                inflight: VecDeque::with_capacity(SEND_DEPTH),
                acks_owed: 0,
                stats: EndpointStats::default(),
            },
            shared,
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
        let key = self.shared.next_key();
        let len = region.len() as u64;
        self.state.exposures.insert(key, region);
        Ok(RemoteKey { key, addr: 0, len })
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
        if self.state.inflight.len() >= SEND_DEPTH {
            return Err(FabricError::Busy);
        }
        let mut h = [0u8; HEADER_BYTES_MAX];
        let n = frame::encode(&Frame::Write { key: dst.key, offset, imm, len: len as u32 }, &mut h);
        let staged = self.ch.send(&h[..n], src, len, TCP_SEND_RESERVE_BYTES)?;
        self.state.inflight.push_back(wr_id);
        let s = &mut self.state.stats;
        s.writes += 1;
        s.write_bytes += len as u64;
        s.imms_sent += imm.is_some() as u64;
        if staged {
            s.staged_copies += 1;
            self.waker.want_write(true);
        }
        Ok(())
    }

    pub fn send_msg(&mut self, msg: &[u8]) -> Result<(), FabricError> {
        self.closed()?;
        if msg.len() > MSG_BYTES_MAX {
            return Err(FabricError::TooLarge { what: "message", len: msg.len(), max: MSG_BYTES_MAX });
        }
        self.ch.send_frame(&Frame::Msg { len: msg.len() as u32 }, msg)?;
        self.state.stats.msgs_sent += 1;
        self.waker.want_write(self.ch.sending());
        Ok(())
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
        self.ch.receive(&mut self.state, events)?;
        if self.state.acks_owed > 0 {
            // The send buffer keeps room for acks (TCP_SEND_RESERVE_BYTES); if even that is
            // full, the ack goes with the next poll.
            match self.ch.send_frame(&Frame::Ack { count: self.state.acks_owed }, &[]) {
                Ok(()) => self.state.acks_owed = 0,
                Err(FabricError::Busy) => {}
                Err(e) => return Err(e),
            }
        }
        self.ch.flush()?;
        self.ch.tick(Instant::now())?;
        self.waker.want_write(self.ch.sending());
        Ok(())
    }

    fn fail(&mut self, e: FabricError, events: &mut Vec<Event>) {
        if let FabricError::Protocol { .. } = e {
            self.state.stats.refusals += 1;
        }
        warn!(peer = %self.ch.peer, "fabric: endpoint failed: {e}");
        events.extend(self.state.inflight.drain(..).map(|wr_id| Event::WriteFailed { wr_id, error: e.clone() }));
        events.push(Event::Failed(e.clone()));
        self.ch.shutdown();
        self.dead = Some(e);
    }

    pub fn wait_fd(&self) -> RawFd {
        self.waker.fd()
    }

    pub fn arm(&mut self) -> bool {
        if self.dead.is_some() {
            return true;
        }
        if self.ch.has_buffered_work() || self.state.acks_owed > 0 || self.shared.stopped() {
            return false;
        }
        self.waker.want_write(self.ch.sending());
        true
    }

    pub fn stats(&self) -> EndpointStats {
        self.state.stats
    }
}
