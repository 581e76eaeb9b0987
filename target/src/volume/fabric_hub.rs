//! The replication links of one engine host: each link's fabric endpoint (moved here from the
//! control thread that set it up), the region the peer writes into and the peer's region we
//! write into. It is the engine's [`stager_policy::Fabric`]: the engine writes, reads and polls
//! links by [`LinkId`] and never sees an endpoint.
//!
//! Everything here runs on the owner reactor's thread, polled with the engine; a sleeping
//! reactor is woken through each endpoint's `wait_fd` (an io_uring poll armed by the host).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;

use stager_policy::{Fabric, FabricError, FabricEvent, LinkId};
use stager_rdma::{Endpoint, Event, Region, RemoteKey};
use tracing::warn;

pub(crate) struct HubLink {
    pub ep: Endpoint,
    /// Where the peer's writes land.
    pub local: Arc<Region>,
    /// Where ours go.
    pub remote: RemoteKey,
    /// An io_uring poll of the endpoint's `wait_fd` is armed.
    pub armed: bool,
    /// The engine was told the link is down (its endpoint failed or it was dropped).
    pub down: bool,
}

#[derive(Default)]
pub(crate) struct Hub {
    pub links: BTreeMap<LinkId, HubLink>,
    events: Vec<Event>,
    next_wr: u64,
}

/// What the engine holds; the host keeps another handle to add and drop links.
#[derive(Clone, Default)]
pub(crate) struct FabricHub(pub Rc<RefCell<Hub>>);

impl FabricHub {
    pub fn add(&self, link: LinkId, ep: Endpoint, local: Arc<Region>, remote: RemoteKey) {
        self.0.borrow_mut().links.insert(link, HubLink { ep, local, remote, armed: false, down: false });
    }

    /// Forgets a link (its endpoint closes).
    pub fn remove(&self, link: LinkId) {
        self.0.borrow_mut().links.remove(&link);
    }

    /// Prepares every endpoint for a sleep: false if one has work pending.
    pub fn arm_all(&self) -> bool {
        self.0.borrow_mut().links.values_mut().filter(|l| !l.down).all(|l| l.ep.arm())
    }

    /// Endpoints whose `wait_fd` needs an io_uring poll armed: (link, fd). Marks them armed.
    pub fn to_arm(&self, out: &mut Vec<(LinkId, RawFd)>) {
        for (id, l) in self.0.borrow_mut().links.iter_mut() {
            if !l.armed && !l.down {
                l.armed = true;
                out.push((*id, l.ep.wait_fd()));
            }
        }
    }

    /// The armed poll of `link` completed.
    pub fn fired(&self, link: LinkId) {
        if let Some(l) = self.0.borrow_mut().links.get_mut(&link) {
            l.armed = false;
        }
    }

    /// Bytes written and copies staged over every link (for status).
    pub fn stats(&self) -> (u64, u64) {
        let h = self.0.borrow();
        h.links.values().map(|l| l.ep.stats()).fold((0, 0), |(b, c), s| (b + s.write_bytes, c + s.staged_copies))
    }
}

impl Fabric for FabricHub {
    fn write(&mut self, link: LinkId, src: &[&[u8]], offset: u64, imm: Option<u32>) -> Result<(), FabricError> {
        let mut h = self.0.borrow_mut();
        h.next_wr += 1;
        let wr = h.next_wr;
        let Some(l) = h.links.get_mut(&link) else { return Err(FabricError::Down("no such link".into())) };
        if l.down {
            return Err(FabricError::Down("link failed".into()));
        }
        let remote = l.remote;
        l.ep.write(wr, src, remote, offset, imm).map_err(|e| match e {
            stager_rdma::FabricError::Busy => FabricError::Busy,
            e => FabricError::Down(e.to_string()),
        })
    }

    fn read(&self, link: LinkId, offset: u64, out: &mut [u8]) -> Result<(), FabricError> {
        let h = self.0.borrow();
        let Some(l) = h.links.get(&link) else { return Err(FabricError::Down("no such link".into())) };
        l.local.copy_out(offset, out).map_err(|_| FabricError::OutOfBounds)
    }

    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        let mut h = self.0.borrow_mut();
        let Hub { links, events, .. } = &mut *h;
        let before = out.len();
        for (id, l) in links.iter_mut() {
            if l.down {
                continue;
            }
            events.clear();
            l.ep.poll(events);
            for e in events.drain(..) {
                match e {
                    Event::Imm { imm, len } => out.push(FabricEvent::Imm { link: *id, imm, len }),
                    Event::Failed(why) => {
                        l.down = true;
                        out.push(FabricEvent::Down { link: *id, why: why.to_string() });
                    }
                    Event::WriteDone { .. } | Event::WriteFailed { .. } => {}
                    Event::Message(m) => {
                        warn!(
                            link = id.0,
                            peer = l.ep.peer(),
                            bytes = m.len(),
                            "unexpected control message on a running link; ignored"
                        )
                    }
                }
            }
        }
        out.len() - before
    }
}
