//! The simulated replication fabric: links between nodes with a registered region at each end,
//! one-sided writes that land after a seeded delay (in order per direction, like an RC queue
//! pair), immediates, a send queue that is sometimes full, and link failures that lose the
//! writes still on the wire (RC semantics: what landed before the failure stays).

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::Rng;

use crate::io::{Fabric, FabricError, FabricEvent};
use crate::types::LinkId;

struct InFlight {
    at: u64,
    offset: u64,
    bytes: Vec<u8>,
    imm: Option<u32>,
}

struct SimLink {
    /// Node at each end: 0 the source, 1 the replica.
    ends: [usize; 2],
    regions: [Vec<u8>; 2],
    /// Writes from end `i` to the other, in order.
    wire: [VecDeque<InFlight>; 2],
    last_at: [u64; 2],
    up: bool,
}

pub struct Net {
    links: BTreeMap<LinkId, SimLink>,
    /// Events per node, waiting for its poll.
    events: BTreeMap<usize, Vec<FabricEvent>>,
    rng: StdRng,
    now: Rc<Cell<u64>>,
    pub delay_max_ns: u64,
    /// Share of writes refused with `Busy` (per million).
    pub busy_ppm: u32,
    next_link: u32,
    pub writes: u64,
    pub bytes: u64,
}

pub type NetHandle = Rc<RefCell<Net>>;

impl Net {
    pub fn new(rng: StdRng, now: Rc<Cell<u64>>, delay_max_ns: u64) -> NetHandle {
        Rc::new(RefCell::new(Net {
            links: BTreeMap::new(),
            events: BTreeMap::new(),
            rng,
            now,
            delay_max_ns,
            busy_ppm: 0,
            next_link: 1,
            writes: 0,
            bytes: 0,
        }))
    }

    /// A new link between `source` and `replica`, with regions of these sizes.
    pub fn connect(&mut self, source: usize, replica: usize, source_region: usize, replica_region: usize) -> LinkId {
        let id = LinkId(self.next_link);
        self.next_link += 1;
        self.links.insert(
            id,
            SimLink {
                ends: [source, replica],
                regions: [vec![0; source_region], vec![0; replica_region]],
                wire: [VecDeque::new(), VecDeque::new()],
                last_at: [0, 0],
                up: true,
            },
        );
        id
    }

    pub fn is_up(&self, link: LinkId) -> bool {
        self.links.get(&link).is_some_and(|l| l.up)
    }

    /// Fails a link: some of what is on the wire lands first, the rest is lost; both ends hear.
    pub fn fail(&mut self, link: LinkId, why: &str) {
        let Some(l) = self.links.get_mut(&link) else { return };
        if !l.up {
            return;
        }
        l.up = false;
        for dir in 0..2 {
            let keep = self.rng.gen_range(0..=l.wire[dir].len());
            let dest = 1 - dir;
            for w in l.wire[dir].drain(..).take(keep) {
                let end = (w.offset as usize + w.bytes.len()).min(l.regions[dest].len());
                let n = end - w.offset as usize;
                l.regions[dest][w.offset as usize..end].copy_from_slice(&w.bytes[..n]);
                // Immediates of writes that landed are not delivered: the link is gone.
            }
        }
        for end in l.ends {
            self.events.entry(end).or_default().push(FabricEvent::Down { link, why: why.to_string() });
        }
    }

    /// Fails every link of a node (it crashed); the node's own pending events are dropped.
    pub fn node_down(&mut self, node: usize) {
        let ids: Vec<LinkId> =
            self.links.iter().filter(|(_, l)| l.up && l.ends.contains(&node)).map(|(id, _)| *id).collect();
        for id in ids {
            self.fail(id, "peer node crashed");
        }
        self.events.remove(&node);
        self.links.retain(|_, l| l.up || !l.ends.contains(&node));
    }

    pub fn idle(&self) -> bool {
        self.links.values().all(|l| l.wire[0].is_empty() && l.wire[1].is_empty())
            && self.events.values().all(|v| v.is_empty())
    }

    fn deliver(&mut self, now: u64) {
        for (id, l) in self.links.iter_mut() {
            if !l.up {
                continue;
            }
            for dir in 0..2 {
                let dest = 1 - dir;
                while l.wire[dir].front().is_some_and(|w| w.at <= now) {
                    let Some(w) = l.wire[dir].pop_front() else { break };
                    let o = w.offset as usize;
                    l.regions[dest][o..o + w.bytes.len()].copy_from_slice(&w.bytes);
                    if let Some(imm) = w.imm {
                        self.events.entry(l.ends[dest]).or_default().push(FabricEvent::Imm {
                            link: *id,
                            imm,
                            len: w.bytes.len() as u32,
                        });
                    }
                }
            }
        }
    }
}

/// One node's view of the net.
pub struct FabricPort {
    pub net: NetHandle,
    pub node: usize,
}

impl Fabric for FabricPort {
    fn write(&mut self, link: LinkId, src: &[&[u8]], offset: u64, imm: Option<u32>) -> Result<(), FabricError> {
        let mut net = self.net.borrow_mut();
        let now = net.now.get();
        let busy = net.busy_ppm > 0 && net.rng.gen_range(0..1_000_000) < net.busy_ppm;
        let max = net.delay_max_ns;
        let delay = if net.rng.gen_bool(0.5) { 0 } else { net.rng.gen_range(0..=max) };
        let Some(l) = net.links.get_mut(&link) else { return Err(FabricError::Down("no such link".into())) };
        if !l.up {
            return Err(FabricError::Down("link failed".into()));
        }
        let Some(dir) = l.ends.iter().position(|&e| e == self.node) else {
            return Err(FabricError::Down("not this node's link".into()));
        };
        let len: usize = src.iter().map(|s| s.len()).sum();
        if offset as usize + len > l.regions[1 - dir].len() {
            return Err(FabricError::OutOfBounds);
        }
        if busy {
            return Err(FabricError::Busy);
        }
        let mut bytes = Vec::with_capacity(len);
        for s in src {
            bytes.extend_from_slice(s);
        }
        let at = (now + delay).max(l.last_at[dir]);
        l.last_at[dir] = at;
        l.wire[dir].push_back(InFlight { at, offset, bytes, imm });
        net.writes += 1;
        net.bytes += len as u64;
        Ok(())
    }

    fn read(&self, link: LinkId, offset: u64, out: &mut [u8]) -> Result<(), FabricError> {
        let net = self.net.borrow();
        let Some(l) = net.links.get(&link) else { return Err(FabricError::Down("no such link".into())) };
        let Some(end) = l.ends.iter().position(|&e| e == self.node) else {
            return Err(FabricError::Down("not this node's link".into()));
        };
        let o = offset as usize;
        let r = &l.regions[end];
        if o + out.len() > r.len() {
            return Err(FabricError::OutOfBounds);
        }
        out.copy_from_slice(&r[o..o + out.len()]);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<FabricEvent>) -> usize {
        let mut net = self.net.borrow_mut();
        let now = net.now.get();
        net.deliver(now);
        let Some(ev) = net.events.get_mut(&self.node) else { return 0 };
        let n = ev.len();
        out.append(ev);
        n
    }
}
