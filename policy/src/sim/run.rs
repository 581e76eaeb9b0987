//! The simulator's driver: builds devices, an engine and its destager from a seed, links them
//! with a delay line (their messages arrive late but in order, as over a channel between two
//! cores), runs random steps, checks the invariants after each, crashes and restarts, and
//! drains at the end.

use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::rc::Rc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::devices::{DiskHandle, SimDisk};
use super::fabric::{FabricPort, Net, NetHandle};
use super::model::{decode_block, encode_block, Model, Violation};
use crate::constants::{
    BLOCK_SIZE, BLOCK_SIZE_U64, DESTAGE_EARLY_FLUSH_BYTES, DESTAGE_GATHER_NS, LOG_BYTES_MIN, LOG_START,
};
use crate::destage::{DestageEvent, Destager};
use crate::engine::{Bugs, Engine, EngineConfig, EngineEvent, EngineState, HostDone, HostOp, Located, Status};
use crate::io::{AlignedBuf, Flash, San};
use crate::link::{FromDestage, ToDestage};
use crate::log::Layout;
use crate::node::Node;
use crate::policy::WritePolicy;
use crate::types::{Epoch, Lba, LinkId, VolumeId};
use crate::VolumeSpec;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub volumes: usize,
    pub blocks: u64,
    pub steps: usize,
    pub max_write_blocks: u32,
    /// Log bytes; the clean cache gets 5% of the device on top.
    pub log_bytes: u64,
    pub faults: bool,
    pub crashes: bool,
    pub bugs: Bugs,
    /// Mutation of the SAN model: writes are acknowledged and silently dropped.
    pub san_drops_writes: bool,
    /// Prints what happens to this (volume index, block): for debugging a failing seed.
    pub trace_block: Option<(usize, u64)>,
    /// Fixes how long a write over dirty blocks waits for log space (random per run when None;
    /// 0 = write-through at once).
    pub log_full_wait_ns: Option<u64>,
    /// Fixes whether the flash has a volatile cache (random per seed when None).
    pub flash_volatile: Option<bool>,
    /// Replica nodes (0, 1 or 2): the write-back volumes become write-back+N, linked to them
    /// through the simulated fabric.
    pub replicas: usize,
    /// With replicas: whether the run may end by losing the source and destaging a replica's
    /// copy to the SANs (random per seed when None).
    pub failover: Option<bool>,
    /// With replicas: whether the engine holds write acknowledgements until a modelled cluster
    /// records which copies are in sync (`EngineConfig::confirm_copies`; random per seed when
    /// None). A failover then destages a copy the *record* names in sync, as the cluster would.
    pub confirm_copies: Option<bool>,
    /// How long destagers gather a trickle of dirty data before a batch (random per seed
    /// when None: none, a tenth of `DESTAGE_GATHER_NS`, or all of it).
    pub destage_gather_ns: Option<u64>,
    /// How much completed SAN writing an urgent destager lets pass between early flushes
    /// (random per seed when None: `DESTAGE_EARLY_FLUSH_BYTES`, which these small volumes
    /// never reach, one block, or four).
    pub destage_early_flush_bytes: Option<u64>,
    /// The SAN's slow phases are long and deep (up to 1 s, 50-500 times slower) instead of
    /// short and mild: the log fills while the SAN stays reachable, so writes supersede
    /// dirty blocks (`engine/write.rs`, "Full log").
    pub san_stalls: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            volumes: 2,
            blocks: 48,
            steps: 300,
            max_write_blocks: 8,
            log_bytes: LOG_BYTES_MIN,
            faults: true,
            crashes: true,
            bugs: Bugs::default(),
            san_drops_writes: false,
            log_full_wait_ns: None,
            flash_volatile: None,
            replicas: 0,
            failover: None,
            confirm_copies: None,
            destage_gather_ns: None,
            destage_early_flush_bytes: None,
            san_stalls: false,
            trace_block: std::env::var("STAGER_SIM_TRACE")
                .ok()
                .and_then(|v| v.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))),
        }
    }
}

impl SimConfig {
    /// A destager (the owner's, or a replica's for its rescues) with this run's gather time
    /// (`destage_gather_ns`, drawn in `Simulator::new`).
    fn destager(&self, layout: Layout, flash: Box<dyn Flash>, sans: Vec<(VolumeId, Box<dyn San>)>) -> Destager {
        let mut d = Destager::new(layout, flash, sans);
        d.set_gather_ns(self.destage_gather_ns.unwrap_or(DESTAGE_GATHER_NS));
        d.set_early_flush_bytes(self.destage_early_flush_bytes.unwrap_or(DESTAGE_EARLY_FLUSH_BYTES));
        d.set_bugs(self.bugs);
        d
    }

    /// The configuration for one seed of the main run: the seed also varies the shape (one to
    /// three volumes, the third write-through; small or large writes; volume size), so the
    /// same run covers log wrap-around, a full log and mixed policies.
    pub fn varied(seed: u64) -> SimConfig {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5eed_5eed_5eed);
        SimConfig {
            volumes: rng.gen_range(1..=3),
            blocks: if rng.gen_bool(0.5) { 48 } else { 128 },
            max_write_blocks: if rng.gen_bool(0.75) { 8 } else { 48 },
            // Now and then a long run: many laps of the log, many crashes in one history.
            steps: if rng.gen_bool(0.05) { 2_000 } else { 300 },
            replicas: [0, 0, 0, 0, 0, 1, 1, 1, 2, 2][rng.gen_range(0..10)],
            san_stalls: rng.gen_bool(0.3),
            ..SimConfig::default()
        }
    }
}

#[derive(Clone, Debug)]
pub struct Failure {
    pub seed: u64,
    pub step: usize,
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} step {}: {} violated: {} (rerun with STAGER_SIM_SEED={})",
            self.seed, self.step, self.invariant, self.detail, self.seed
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub writes_acked: u64,
    pub zero_writes_acked: u64,
    pub reads_checked: u64,
    pub flushes: u64,
    pub crashes: u64,
    pub batches_checked: u64,
    pub busy: u64,
    pub flash_errors: u64,
    pub san_outages: u64,
    pub link_failures: u64,
    pub replica_crashes: u64,
    pub failovers: u64,
    /// Failovers where a running replica destaged its copies itself (`Engine::rescue_copy`).
    pub live_rescues: u64,
    /// Live rescues after which the rescuer served the volume (writes and reads checked).
    pub served_rescues: u64,
    /// A volume's replica replaced by the spare node, with an epoch bump (the resource
    /// manager's move).
    pub replacements: u64,
    pub failover_blocks_checked: u64,
    /// Writes of a full log that superseded dirty blocks on the SAN (engine metrics, summed
    /// over the engine's restarts).
    pub supersedes: u64,
}

enum InFlight {
    /// `id` 0 is a Write Zeroes (or a logged Deallocate): the blocks read as zeroes.
    Write {
        vol: usize,
        lba: u64,
        blocks: u32,
        id: u64,
        fua: bool,
    },
    Read {
        vol: usize,
        lba: u64,
        blocks: u32,
    },
    Flush {
        vol: usize,
        snapshot: u64,
    },
    /// A Deallocate the volume treats as advisory: it must complete and change nothing.
    Advisory,
}

/// A one-way message channel with a delay: messages arrive in order, each no earlier than the
/// one before it.
struct DelayLine<T> {
    queue: VecDeque<(u64, T)>,
    last: u64,
}

impl<T> DelayLine<T> {
    fn new() -> Self {
        DelayLine { queue: VecDeque::new(), last: 0 }
    }

    fn send(&mut self, msg: T, at: u64) {
        let at = at.max(self.last);
        self.last = at;
        self.queue.push_back((at, msg));
    }

    fn due(&mut self, now: u64) -> Option<T> {
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            self.queue.pop_front().map(|(_, m)| m)
        } else {
            None
        }
    }

    fn clear(&mut self) {
        self.queue.clear();
        self.last = 0;
    }
}

/// A replica node: its flash and its engine (no destager: copies wait for their source).
pub struct ReplicaNode {
    pub flash: DiskHandle,
    pub engine: Engine,
    device_id: u64,
}

/// The simulator's control plane for one (volume, replica) link, as the target runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkSlot {
    None,
    /// The replica was asked to open its copy at `epoch`; the link waits for it.
    Opening {
        link: LinkId,
        epoch: Epoch,
    },
    Up(LinkId),
}

/// Record ring of every simulated link.
const SIM_RING_BYTES: u64 = crate::engine::RING_BYTES_MIN;

pub struct Simulator {
    pub seed: u64,
    cfg: SimConfig,
    rng: StdRng,
    now: Rc<Cell<u64>>,
    pub flash: DiskHandle,
    pub sans: Vec<DiskHandle>,
    pub engine: Engine,
    pub destager: Destager,
    to_destage: DelayLine<ToDestage>,
    to_engine: DelayLine<FromDestage>,
    /// Longest message delay between the halves in this run.
    link_delay_max_ns: u64,
    pub model: Model,
    policies: Vec<WritePolicy>,
    /// Whether each volume's SAN unmaps (Deallocate is logged) or not (advisory).
    unmap: Vec<bool>,
    in_flight: BTreeMap<u64, InFlight>,
    busy: Vec<Vec<bool>>,
    next_token: u64,
    next_write_id: u64,
    check_cursor: u64,
    step: usize,
    outbox: Vec<ToDestage>,
    inbox: Vec<FromDestage>,
    destage_events: Vec<DestageEvent>,
    /// The flash device's id (changes when the simulator reformats it).
    device_id: u64,
    pub stats: SimStats,
    pub net: NetHandle,
    pub replica_nodes: Vec<ReplicaNode>,
    links: Vec<Vec<LinkSlot>>,
    engine_events: Vec<EngineEvent>,
    /// The cluster's record of each volume (`confirm_copies` runs): which replicas it names in
    /// sync. Kept across source crashes, like etcd.
    recorded: Vec<Vec<bool>>,
    /// The replica nodes each volume's record names (none for write-through volumes): the
    /// first `cfg.replicas` nodes at first; a replacement swaps one for the spare node. With
    /// its epoch: kept across source crashes, like etcd.
    assigned: Vec<Vec<usize>>,
    epochs: Vec<u64>,
    /// The owner's next record write: the copies generation and in-sync replicas it read from
    /// the engine, written (and confirmed) when due, as the cluster thread does a little later.
    record_pending: Option<(u64, Vec<RecordedCopies>)>,
}

/// One volume as the owner read it for the record: (volume index, copies generation, which
/// replicas are in sync, the record's epoch then).
type RecordedCopies = (usize, u64, Vec<bool>, u64);

const VOLUME_ID_BASE: u32 = 10;
/// Blocks per volume checked for invariant 1 after each step of a large volume.
const CHECK_WINDOW_BLOCKS: u64 = 64;
/// Write id standing for "zeroes" in the model (a zero block decodes as 0).
const ZEROES: u64 = 0;

impl Simulator {
    pub fn new(seed: u64, mut cfg: SimConfig) -> Simulator {
        let mut rng = StdRng::seed_from_u64(seed);
        // Decided once per run (every engine of the run is configured alike), from its own
        // stream so the rest of the run's draws do not move.
        let coin = StdRng::seed_from_u64(seed ^ 0xc0f1_c0f1).gen_bool(0.5);
        cfg.confirm_copies = Some(cfg.replicas > 0 && cfg.confirm_copies.unwrap_or(coin));
        let gather =
            [0, DESTAGE_GATHER_NS / 10, DESTAGE_GATHER_NS][StdRng::seed_from_u64(seed ^ 0x6a7e_6a7e).gen_range(0..3)];
        cfg.destage_gather_ns = Some(cfg.destage_gather_ns.unwrap_or(gather));
        let early = [DESTAGE_EARLY_FLUSH_BYTES, BLOCK_SIZE_U64, 4 * BLOCK_SIZE_U64]
            [StdRng::seed_from_u64(seed ^ 0xea51_ea51).gen_range(0..3)];
        cfg.destage_early_flush_bytes = Some(cfg.destage_early_flush_bytes.unwrap_or(early));
        let now = Rc::new(Cell::new(1_000_000));
        // 5% of the device for the clean cache, the rest (at least `log_bytes`) for the log.
        let log_blocks = cfg.log_bytes / BLOCK_SIZE_U64;
        let flash_bytes = LOG_START + ((log_blocks * 100).div_ceil(95) + 1) * BLOCK_SIZE_U64;
        let coin = rng.gen_bool(0.5);
        let volatile = cfg.flash_volatile.unwrap_or(coin);
        let flash = SimDisk::create(flash_bytes, volatile, false, StdRng::seed_from_u64(rng.gen()), now.clone());
        let sans: Vec<DiskHandle> = (0..cfg.volumes)
            .map(|_| {
                let s = SimDisk::create(
                    cfg.blocks * BLOCK_SIZE_U64,
                    true,
                    true,
                    StdRng::seed_from_u64(rng.gen()),
                    now.clone(),
                );
                s.0.borrow_mut().drop_writes = cfg.san_drops_writes;
                s
            })
            .collect();
        let policies: Vec<WritePolicy> = (0..cfg.volumes)
            .map(|i| if i % 3 == 2 { WritePolicy::WriteThrough } else { WritePolicy::WriteBack })
            .collect();
        let unmap: Vec<bool> = (0..cfg.volumes).map(|_| rng.gen_bool(0.5)).collect();
        let link_delay_max_ns = if rng.gen_bool(0.3) { 2_000_000 } else { 20_000 };
        let ecfg = Simulator::engine_config(&cfg, &mut rng);
        let assigned: Vec<Vec<usize>> =
            (0..cfg.volumes).map(|i| if i % 3 != 2 { (0..cfg.replicas).collect() } else { Vec::new() }).collect();
        let specs = Simulator::specs(&cfg, &policies, &unmap, &assigned);
        let net =
            Net::new(StdRng::seed_from_u64(rng.gen()), now.clone(), if rng.gen_bool(0.3) { 500_000 } else { 20_000 });
        let mut engine = Engine::format(ecfg, Box::new(flash.port(0)), specs).expect("sim: format");
        engine.set_fabric(Box::new(FabricPort { net: net.clone(), node: 0 }));
        let destager = Simulator::destager(&engine, &flash, &sans, &cfg);
        // The replicas, and one spare node (what a replacement moves a copy to), made from a
        // stream of their own so the run's other draws stay as they were.
        let mut spare_rng = StdRng::seed_from_u64(seed ^ 0x5ba7_e5ba);
        let nodes = if cfg.replicas > 0 { cfg.replicas + 1 } else { 0 };
        let mut replica_nodes: Vec<ReplicaNode> =
            (0..cfg.replicas).map(|r| Simulator::replica_node(r, flash_bytes, &cfg, &mut rng, &now, &net)).collect();
        for r in cfg.replicas..nodes {
            replica_nodes.push(Simulator::replica_node(r, flash_bytes, &cfg, &mut spare_rng, &now, &net));
        }
        let links = vec![vec![LinkSlot::None; nodes]; cfg.volumes];
        let busy = vec![vec![false; cfg.blocks as usize]; cfg.volumes];
        let model = Model::new(cfg.volumes, cfg.blocks);
        let recorded = vec![vec![false; nodes]; cfg.volumes];
        let epochs = vec![1; cfg.volumes];
        let mut sim = Simulator {
            seed,
            cfg,
            rng,
            now,
            flash,
            sans,
            engine,
            destager,
            to_destage: DelayLine::new(),
            to_engine: DelayLine::new(),
            link_delay_max_ns,
            model,
            policies,
            unmap,
            in_flight: BTreeMap::new(),
            busy,
            next_token: 1,
            next_write_id: 1,
            check_cursor: 0,
            step: 0,
            outbox: Vec::new(),
            inbox: Vec::new(),
            destage_events: Vec::new(),
            device_id: 7,
            stats: SimStats::default(),
            net,
            replica_nodes,
            links,
            engine_events: Vec::new(),
            recorded,
            assigned,
            epochs,
            record_pending: None,
        };
        if sim.cfg.trace_block.is_some() {
            eprintln!("[sim] {:?}", sim.cfg);
        }
        sim.settle_until_ready();
        for r in 0..sim.replica_nodes.len() {
            sim.settle_replica(r);
        }
        sim
    }

    /// Replica node `r` (fabric node `r + 1`): a freshly formatted flash of its own, drawn
    /// from `rng`.
    fn replica_node(
        r: usize,
        flash_bytes: u64,
        cfg: &SimConfig,
        rng: &mut StdRng,
        now: &Rc<Cell<u64>>,
        net: &NetHandle,
    ) -> ReplicaNode {
        let f = SimDisk::create(flash_bytes, rng.gen_bool(0.5), false, StdRng::seed_from_u64(rng.gen()), now.clone());
        let device_id = 100 + r as u64;
        let rcfg = EngineConfig { device_id, ..Simulator::engine_config(cfg, rng) };
        let mut e = Engine::format(rcfg, Box::new(f.port(0)), Vec::new()).expect("sim: format replica");
        e.set_fabric(Box::new(FabricPort { net: net.clone(), node: r + 1 }));
        ReplicaNode { flash: f, engine: e, device_id }
    }

    fn engine_config(cfg: &SimConfig, rng: &mut StdRng) -> EngineConfig {
        EngineConfig {
            device_id: 7, // crash_and_restart and reformat put the current one in
            cache_percent: 5,
            log_full_wait_ns: cfg.log_full_wait_ns.unwrap_or(if rng.gen_bool(0.5) { 50_000_000 } else { 0 }),
            gate_timeout_ns: 2_000_000_000,
            san_timeout_ns: 2_000_000_000,
            destage_replica_copies: false,
            confirm_copies: cfg.confirm_copies.unwrap_or(false),
            bugs: cfg.bugs,
        }
    }

    fn specs(cfg: &SimConfig, policies: &[WritePolicy], unmap: &[bool], assigned: &[Vec<usize>]) -> Vec<VolumeSpec> {
        (0..cfg.volumes)
            .map(|i| VolumeSpec {
                id: VolumeId(VOLUME_ID_BASE + i as u32),
                epoch: Epoch(1),
                blocks: cfg.blocks,
                policy: policies[i],
                read_cache: true,
                unmap: unmap[i],
                replicas: assigned[i].iter().map(|&r| Simulator::replica_name(r)).collect(),
                source: None,
            })
            .collect()
    }

    fn destager(engine: &Engine, flash: &DiskHandle, sans: &[DiskHandle], cfg: &SimConfig) -> Destager {
        let sans: Vec<(VolumeId, Box<dyn San>)> = sans
            .iter()
            .enumerate()
            .map(|(i, s)| (VolumeId(VOLUME_ID_BASE + i as u32), Box::new(s.clone()) as Box<dyn San>))
            .collect();
        cfg.destager(engine.layout(), Box::new(flash.port(1)), sans)
    }

    fn fail(&self, invariant: &'static str, detail: String) -> Failure {
        Failure { seed: self.seed, step: self.step, invariant, detail }
    }

    fn violation(&self, v: Violation) -> Failure {
        self.fail(v.invariant, v.detail)
    }

    fn advance(&mut self, ns: u64) {
        self.now.set(self.now.get() + ns);
    }

    fn settle_until_ready(&mut self) {
        for _ in 0..100_000 {
            if *self.engine.state() != EngineState::Formatting && *self.engine.state() != EngineState::Recovering {
                return;
            }
            self.advance(50_000);
            self.engine.poll(self.now.get());
        }
    }

    pub fn replica_name(r: usize) -> String {
        format!("replica-{r}")
    }

    fn settle_replica(&mut self, r: usize) {
        for _ in 0..100_000 {
            if !matches!(self.replica_nodes[r].engine.state(), EngineState::Formatting | EngineState::Recovering) {
                return;
            }
            self.advance(50_000);
            let now = self.now.get();
            self.replica_nodes[r].engine.poll(now);
        }
    }

    /// The target's part of replication: opens each replicated volume's links to its replicas
    /// (the replica's copy first, then the source's side), and notices links that went down.
    fn connect_links(&mut self) {
        if self.replica_nodes.is_empty() || *self.engine.state() != EngineState::Ready {
            return;
        }
        for vol in 0..self.cfg.volumes {
            let id = Simulator::volume_id(vol);
            for r in 0..self.replica_nodes.len() {
                let slot = self.links[vol][r];
                let up = |l: LinkId| self.net.borrow().is_up(l);
                let next = match slot {
                    LinkSlot::Up(l) if up(l) => slot,
                    LinkSlot::Up(_) => LinkSlot::None,
                    LinkSlot::None => {
                        if !self.links[vol].is_empty() && !self.wants_replica(vol, r) {
                            continue;
                        }
                        let Some(epoch) = self.engine.volume_epoch(id) else { continue };
                        let rep = &mut self.replica_nodes[r].engine;
                        match rep.open_replica_copy(id, self.cfg.blocks, "source", epoch) {
                            Ok(()) => {
                                let link = self.net.borrow_mut().connect(
                                    0,
                                    r + 1,
                                    crate::replica::wire::BLOCK_LEN,
                                    (crate::replica::wire::RING_OFFSET + SIM_RING_BYTES) as usize,
                                );
                                LinkSlot::Opening { link, epoch }
                            }
                            Err(_) => LinkSlot::None,
                        }
                    }
                    LinkSlot::Opening { link, .. } if !up(link) => LinkSlot::None,
                    LinkSlot::Opening { link, epoch } => {
                        let rep = &mut self.replica_nodes[r].engine;
                        match rep.replica_copy_ready(id, epoch) {
                            None => slot,
                            Some(copy) => {
                                let ok = rep.attach_inbound(id, link, "source", SIM_RING_BYTES).is_ok()
                                    && self
                                        .engine
                                        .attach_replica(id, link, &Simulator::replica_name(r), SIM_RING_BYTES, copy)
                                        .is_ok();
                                if ok {
                                    LinkSlot::Up(link)
                                } else {
                                    self.net.borrow_mut().fail(link, "set-up refused");
                                    LinkSlot::None
                                }
                            }
                        }
                    }
                };
                self.links[vol][r] = next;
            }
        }
    }

    fn wants_replica(&self, vol: usize, r: usize) -> bool {
        self.assigned[vol].contains(&r)
    }

    fn link_delay(&mut self) -> u64 {
        if self.rng.gen_bool(0.5) {
            0
        } else {
            self.rng.gen_range(0..=self.link_delay_max_ns)
        }
    }

    /// Runs both halves and the link until nothing moves, then applies host completions to the
    /// model and checks invariant 4 at every completed destage batch.
    fn pump(&mut self) -> Result<(), Failure> {
        let now = self.now.get();
        self.connect_links();
        for _ in 0..32 {
            let mut work = self.engine.poll(now);
            for rn in &mut self.replica_nodes {
                work += rn.engine.poll(now);
                // Copies are not destaged online: the replica's destager messages go nowhere.
                rn.engine.drain_outbox(&mut self.outbox);
                self.outbox.clear();
                rn.engine.drain_events(&mut self.engine_events);
            }
            self.engine.drain_events(&mut self.engine_events);
            for e in self.engine_events.drain(..) {
                if let EngineEvent::LinkDown { link, .. } = e {
                    self.net.borrow_mut().fail(link, "dropped by an end");
                }
            }
            self.engine.drain_outbox(&mut self.outbox);
            for m in std::mem::take(&mut self.outbox) {
                let at = now + self.link_delay();
                self.to_destage.send(m, at);
            }
            while let Some(m) = self.to_destage.due(now) {
                self.destager.on_message(m, now);
                work += 1;
            }
            work += self.destager.poll(now);
            self.check_batches()?;
            self.destager.drain_outbox(&mut self.inbox);
            for m in std::mem::take(&mut self.inbox) {
                let at = now + self.link_delay();
                self.to_engine.send(m, at);
            }
            while let Some(m) = self.to_engine.due(now) {
                self.engine.on_message(m, now);
                work += 1;
            }
            if work == 0 {
                break;
            }
        }
        self.cluster_record();
        let mut done: Vec<HostDone> = Vec::new();
        self.engine.drain_completions(&mut done);
        for d in done {
            self.on_done(d)?;
        }
        Ok(())
    }

    /// The owner's cluster thread (`confirm_copies` runs): now and then it reads each volume's
    /// copies generation and in-sync replicas, and a little later writes them to the record and
    /// confirms that generation to the engine.
    fn cluster_record(&mut self) {
        if self.cfg.confirm_copies != Some(true) {
            return;
        }
        let now = self.now.get();
        match self.record_pending.take() {
            Some((due, snap)) if now >= due => {
                for (vol, generation, in_sync, epoch) in snap {
                    if epoch != self.epochs[vol] {
                        // The manager changed the record since the owner read it: the owner's
                        // compare-and-put fails, and it reads the record again.
                        continue;
                    }
                    self.recorded[vol] = in_sync;
                    let id = Simulator::volume_id(vol);
                    if let Err(e) = self.engine.confirm_copies(id, generation) {
                        panic!("sim: confirm_copies({id}, {generation}): {e}");
                    }
                }
            }
            Some(p) => self.record_pending = Some(p),
            None if self.rng.gen_bool(0.3) => {
                let status = self.engine.link_status();
                let snap = (0..self.cfg.volumes)
                    .filter_map(|vol| {
                        let (generation, _) = self.engine.copies_generation(Simulator::volume_id(vol))?;
                        let in_sync = (0..self.replica_nodes.len())
                            .map(|r| match self.links[vol][r] {
                                LinkSlot::Up(l) => status.iter().any(|s| s.link == l && s.state == "in-sync"),
                                _ => false,
                            })
                            .collect();
                        Some((vol, generation, in_sync, self.epochs[vol]))
                    })
                    .collect();
                let due = now + self.rng.gen_range(0..3_000_000);
                self.record_pending = Some((due, snap));
            }
            None => {}
        }
    }

    fn check_batches(&mut self) -> Result<(), Failure> {
        self.destager.drain_events(&mut self.destage_events);
        for e in std::mem::take(&mut self.destage_events) {
            if let Some((v, b)) = self.cfg.trace_block {
                eprintln!("[{} t={}] event {e:?}; SAN block holds {}", self.step, self.now.get(), self.san_block(v, b));
            }
            if let DestageEvent::BatchDestaged { volume, watermark, .. } = e {
                self.stats.batches_checked += 1;
                let vol = (volume.0 - VOLUME_ID_BASE) as usize;
                for lba in 0..self.cfg.blocks {
                    let found = self.san_block(vol, lba);
                    self.model.check_san_at(vol, lba, found, watermark.0).map_err(|v| self.violation(v))?;
                }
            }
        }
        Ok(())
    }

    fn traced(&self, vol: usize, lba: u64, blocks: u32) -> bool {
        self.cfg.trace_block.is_some_and(|(v, b)| v == vol && (lba..lba + blocks as u64).contains(&b))
    }

    fn on_done(&mut self, d: HostDone) -> Result<(), Failure> {
        let op = self.in_flight.remove(&d.token).expect("sim: completion for unknown token");
        match &op {
            InFlight::Write { vol, lba, blocks, id, fua } if self.traced(*vol, *lba, *blocks) => {
                eprintln!(
                    "[{} t={}] write {id} (fua {fua}) done {:?} seq {:?}",
                    self.step,
                    self.now.get(),
                    d.status,
                    d.seq
                )
            }
            InFlight::Flush { vol, .. } if self.cfg.trace_block.is_some_and(|(v, _)| v == *vol) => {
                eprintln!("[{} t={}] flush done {:?}", self.step, self.now.get(), d.status)
            }
            _ => {}
        }
        match op {
            InFlight::Write { vol, lba, blocks, id, fua } => {
                self.set_busy(vol, lba, blocks, false);
                match d.status {
                    Status::Ok => {
                        self.stats.writes_acked += 1;
                        if id == ZEROES {
                            self.stats.zero_writes_acked += 1;
                        }
                        self.model.write_acked(vol, lba, blocks, id, d.seq.map(|s| s.0), fua);
                    }
                    Status::Busy => self.stats.busy += 1, // stays uncertain
                    s => return Err(self.fail("invariant 1", format!("write {id} ended {s:?}"))),
                }
            }
            InFlight::Read { vol, lba, blocks } => {
                self.set_busy(vol, lba, blocks, false);
                match d.status {
                    Status::Ok => {
                        self.stats.reads_checked += 1;
                        let Some(data) = d.buf.as_ref() else {
                            return Err(self.fail("invariant 3", "read completed without its buffer".into()));
                        };
                        for i in 0..blocks as u64 {
                            let b = &data[i as usize * BLOCK_SIZE..(i as usize + 1) * BLOCK_SIZE];
                            let found = decode_block(b, vol as u32, lba + i);
                            self.model
                                .check(vol, lba + i, found, true, "invariant 3")
                                .map_err(|v| self.violation(v))?;
                        }
                    }
                    Status::Busy => self.stats.busy += 1,
                    s => return Err(self.fail("invariant 3", format!("read ended {s:?}"))),
                }
            }
            InFlight::Flush { vol, snapshot } => match d.status {
                Status::Ok => {
                    self.stats.flushes += 1;
                    self.model.flush_done(vol, snapshot);
                }
                Status::Busy => self.stats.busy += 1,
                s => return Err(self.fail("invariant 6", format!("flush ended {s:?}"))),
            },
            InFlight::Advisory => {
                if d.status != Status::Ok {
                    return Err(self.fail("invariant 1", format!("advisory deallocate ended {:?}", d.status)));
                }
            }
        }
        Ok(())
    }

    fn set_busy(&mut self, vol: usize, lba: u64, blocks: u32, busy: bool) {
        for b in lba..lba + blocks as u64 {
            self.busy[vol][b as usize] = busy;
        }
    }

    fn san_block(&self, vol: usize, lba: u64) -> u64 {
        let s = self.sans[vol].0.borrow();
        let o = (lba * BLOCK_SIZE_U64) as usize;
        decode_block(&s.image[o..o + BLOCK_SIZE], vol as u32, lba)
    }

    /// Invariant 1: every block's newest data, where the engine says it is. Large volumes are
    /// checked in a rotating window of blocks per step (and whole after restarts and drains).
    fn check_locations(&mut self) -> Result<(), Failure> {
        let window = if self.cfg.blocks <= CHECK_WINDOW_BLOCKS { self.cfg.blocks } else { CHECK_WINDOW_BLOCKS };
        let start = self.check_cursor;
        self.check_cursor = (self.check_cursor + window) % self.cfg.blocks;
        self.check_blocks(start, window)
    }

    fn check_all_locations(&mut self) -> Result<(), Failure> {
        self.check_blocks(0, self.cfg.blocks)
    }

    fn check_blocks(&mut self, start: u64, count: u64) -> Result<(), Failure> {
        if *self.engine.state() != EngineState::Ready {
            return Ok(());
        }
        for vol in 0..self.cfg.volumes {
            for i in 0..count {
                let lba = (start + i) % self.cfg.blocks;
                let id = VolumeId(VOLUME_ID_BASE + vol as u32);
                let found = match self.engine.locate(id, Lba(lba)).expect("sim: volume") {
                    Located::Memory(b) => decode_block(&b, vol as u32, lba),
                    Located::Flash(off) => {
                        let f = self.flash.0.borrow();
                        decode_block(&f.image[off as usize..off as usize + BLOCK_SIZE], vol as u32, lba)
                    }
                    Located::Zero => ZEROES,
                    Located::San => self.san_block(vol, lba),
                };
                self.model.check(vol, lba, found, false, "invariant 1").map_err(|v| self.violation(v))?;
            }
        }
        Ok(())
    }

    fn free_range(&mut self, vol: usize, max: u32) -> Option<(u64, u32)> {
        let blocks = self.rng.gen_range(1..=max.min(self.cfg.blocks as u32));
        let lba = self.rng.gen_range(0..=self.cfg.blocks - blocks as u64);
        let free = (lba..lba + blocks as u64).all(|b| !self.busy[vol][b as usize]);
        free.then_some((lba, blocks))
    }

    fn host_action(&mut self) {
        let vol = self.rng.gen_range(0..self.cfg.volumes);
        let r = self.rng.gen_range(0..100);
        if r < 50 {
            let Some((lba, blocks)) = self.free_range(vol, self.cfg.max_write_blocks) else { return };
            let fua = self.rng.gen_bool(0.1);
            self.submit_write(vol, lba, blocks, fua);
        } else if r < 55 {
            // Write Zeroes over a range that may be long (a data-less entry).
            let Some((lba, blocks)) = self.free_range(vol, 4 * self.cfg.max_write_blocks) else { return };
            self.submit_zeroes(vol, lba, blocks, false);
        } else if r < 58 {
            let Some((lba, blocks)) = self.free_range(vol, 4 * self.cfg.max_write_blocks) else { return };
            self.submit_zeroes(vol, lba, blocks, true);
        } else if r < 90 {
            let Some((lba, blocks)) = self.free_range(vol, self.cfg.max_write_blocks) else { return };
            self.read(vol, lba, blocks);
        } else if r < 97 {
            self.flush(vol);
        } else {
            let p = if self.rng.gen_bool(0.5) { WritePolicy::WriteBack } else { WritePolicy::WriteThrough };
            if self.cfg.trace_block.is_some_and(|(v, _)| v == vol) {
                eprintln!("[{} t={}] policy {p:?}", self.step, self.now.get());
            }
            self.set_policy(vol, p);
        }
    }

    fn submit_write(&mut self, vol: usize, lba: u64, blocks: u32, fua: bool) -> u64 {
        assert!((lba..lba + blocks as u64).all(|b| !self.busy[vol][b as usize]), "sim: overlapping I/O");
        let wid = self.next_write_id;
        self.next_write_id += 1;
        let token = self.next_token;
        self.next_token += 1;
        let mut data = AlignedBuf::new(blocks as usize * BLOCK_SIZE);
        for i in 0..blocks as usize {
            encode_block(&mut data[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE], wid, vol as u32, lba + i as u64);
        }
        self.set_busy(vol, lba, blocks, true);
        self.model.write_submitted(vol, lba, blocks, wid);
        if self.traced(vol, lba, blocks) {
            eprintln!(
                "[{} t={}] write {wid} submitted (fua {fua}) policy {:?}",
                self.step,
                self.now.get(),
                self.policies[vol]
            );
        }
        self.in_flight.insert(token, InFlight::Write { vol, lba, blocks, id: wid, fua });
        let op = HostOp::Write { lba: Lba(lba), buf: data, fua };
        self.engine.submit(Simulator::volume_id(vol), token, op, self.now.get());
        wid
    }

    /// Write Zeroes, or (`dealloc`) a Deallocate — which changes the blocks only when the
    /// volume's SAN unmaps; otherwise it is advisory and the model records nothing.
    fn submit_zeroes(&mut self, vol: usize, lba: u64, blocks: u32, dealloc: bool) {
        let token = self.next_token;
        self.next_token += 1;
        let op = if dealloc {
            HostOp::Deallocate { lba: Lba(lba), blocks }
        } else {
            HostOp::WriteZeroes { lba: Lba(lba), blocks }
        };
        if self.traced(vol, lba, blocks) {
            eprintln!("[{} t={}] zeroes submitted (dealloc {dealloc})", self.step, self.now.get());
        }
        if dealloc && !self.unmap[vol] {
            self.in_flight.insert(token, InFlight::Advisory);
            self.engine.submit(Simulator::volume_id(vol), token, op, self.now.get());
            return;
        }
        self.set_busy(vol, lba, blocks, true);
        self.model.write_submitted(vol, lba, blocks, ZEROES);
        self.in_flight.insert(token, InFlight::Write { vol, lba, blocks, id: ZEROES, fua: false });
        self.engine.submit(Simulator::volume_id(vol), token, op, self.now.get());
    }

    fn fault_action(&mut self) -> Result<(), Failure> {
        let now = self.now.get();
        let r = self.rng.gen_range(0..1000);
        if r < 15 {
            let s = self.rng.gen_range(0..self.cfg.volumes);
            let mut d = self.sans[s].0.borrow_mut();
            if self.cfg.san_stalls {
                d.slow_factor = self.rng.gen_range(50..500);
                d.slow_until = now + self.rng.gen_range(1_000_000..1_000_000_000);
            } else {
                d.slow_factor = self.rng.gen_range(2..20);
                d.slow_until = now + self.rng.gen_range(1_000_000..100_000_000);
            }
        } else if r < 22 {
            self.stats.san_outages += 1;
            let s = self.rng.gen_range(0..self.cfg.volumes);
            self.sans[s].0.borrow_mut().down_until = now + self.rng.gen_range(1_000_000..500_000_000);
        } else if r < 27 {
            let s = self.rng.gen_range(0..self.cfg.volumes);
            let ppm = if self.rng.gen_bool(0.5) { 0 } else { self.rng.gen_range(1_000..100_000) };
            self.sans[s].0.borrow_mut().error_ppm = ppm;
        } else if r < 31 {
            self.stats.flash_errors += 1;
            self.flash.0.borrow_mut().fail_writes_until = now + self.rng.gen_range(100_000..5_000_000);
        } else if r < 34 {
            self.stats.flash_errors += 1;
            self.flash.0.borrow_mut().fail_reads_until = now + self.rng.gen_range(100_000..2_000_000);
        } else if r < 44 && self.cfg.crashes {
            self.crash_and_restart()?;
        } else if r < 54 && !self.replica_nodes.is_empty() {
            let vol = self.rng.gen_range(0..self.cfg.volumes);
            let rep = self.rng.gen_range(0..self.replica_nodes.len());
            if let LinkSlot::Up(l) = self.links[vol][rep] {
                self.stats.link_failures += 1;
                self.net.borrow_mut().fail(l, "simulated link failure");
            }
        } else if r < 58 && !self.replica_nodes.is_empty() && self.cfg.crashes {
            let rep = self.rng.gen_range(0..self.replica_nodes.len());
            self.crash_replica(rep);
        } else if r < 64 && !self.replica_nodes.is_empty() {
            self.net.borrow_mut().busy_ppm = if self.rng.gen_bool(0.5) { 0 } else { 200_000 };
        } else if r < 67 && !self.replica_nodes.is_empty() {
            // A replica's flash fails writes for a while: it drops its sources' links.
            self.stats.flash_errors += 1;
            let rep = self.rng.gen_range(0..self.replica_nodes.len());
            self.replica_nodes[rep].flash.0.borrow_mut().fail_writes_until =
                now + self.rng.gen_range(100_000..5_000_000);
        } else if r < 71 && !self.replica_nodes.is_empty() && *self.engine.state() == EngineState::Ready {
            self.replace_replica();
        }
        Ok(())
    }

    /// What a restarted owner's cluster thread does first: take each volume's replica set and
    /// epoch from the record (`ready`: the device is, and the engine must take them).
    fn follow_record(&mut self, ready: bool) {
        for vol in 0..self.cfg.volumes {
            if self.assigned[vol].is_empty() {
                continue;
            }
            let names = self.assigned[vol].iter().map(|&r| Simulator::replica_name(r)).collect();
            let id = Simulator::volume_id(vol);
            match self.engine.set_replicas(id, names, self.cfg.replicas, Epoch(self.epochs[vol])) {
                Err(e) if ready => panic!("sim: set_replicas({id}) from the record: {e}"),
                _ => {}
            }
        }
    }

    /// The resource manager's move: one replica of a volume is replaced by the node that keeps
    /// no copy of it, with an epoch bump. The record changes first (the old replica leaves
    /// `in_sync` with it); the owner follows (`Engine::set_replicas` drops its link, and the new
    /// node's copy is opened at the new epoch by `connect_links`); the old node lets its copy
    /// go (`Engine::discard_copy`), as it does once the record no longer names it.
    fn replace_replica(&mut self) {
        let vols: Vec<usize> = (0..self.cfg.volumes).filter(|&v| !self.assigned[v].is_empty()).collect();
        if vols.is_empty() {
            return;
        }
        let vol = vols[self.rng.gen_range(0..vols.len())];
        let Some(spare) = (0..self.replica_nodes.len()).find(|r| !self.assigned[vol].contains(r)) else { return };
        let slot = self.rng.gen_range(0..self.assigned[vol].len());
        let old = self.assigned[vol][slot];
        self.stats.replacements += 1;
        self.assigned[vol][slot] = spare;
        self.epochs[vol] += 1;
        self.recorded[vol][old] = false;
        let id = Simulator::volume_id(vol);
        let names = self.assigned[vol].iter().map(|&r| Simulator::replica_name(r)).collect();
        if let Err(e) = self.engine.set_replicas(id, names, self.cfg.replicas, Epoch(self.epochs[vol])) {
            panic!("sim: set_replicas({id}): {e}");
        }
        if let LinkSlot::Up(l) | LinkSlot::Opening { link: l, .. } = self.links[vol][old] {
            self.net.borrow_mut().fail(l, "no longer one of the volume's replicas");
        }
        self.links[vol][old] = LinkSlot::None;
        let _ = self.replica_nodes[old].engine.discard_copy(id);
    }

    /// A replica node crashes (its flash loses what was in flight and unflushed) and restarts.
    pub fn crash_replica(&mut self, r: usize) {
        self.stats.replica_crashes += 1;
        self.net.borrow_mut().node_down(r + 1);
        {
            let mut f = self.replica_nodes[r].flash.0.borrow_mut();
            f.crash_in_flight();
            f.power_loss();
        }
        for vol in 0..self.cfg.volumes {
            self.links[vol][r] = LinkSlot::None;
        }
        let device_id = self.replica_nodes[r].device_id;
        let rcfg = EngineConfig { device_id, ..Simulator::engine_config(&self.cfg, &mut self.rng) };
        let port = self.replica_nodes[r].flash.port(0);
        let mut e = Engine::open(rcfg, Box::new(port), Vec::new()).expect("sim: open replica");
        e.set_fabric(Box::new(FabricPort { net: self.net.clone(), node: r + 1 }));
        self.replica_nodes[r].engine = e;
        self.settle_replica(r);
    }

    /// Kills both halves mid-flight, tears device state, restarts and recovers.
    pub fn crash_and_restart(&mut self) -> Result<(), Failure> {
        self.stats.crashes += 1;
        self.count_supersedes();
        let san_power_loss = self.rng.gen_bool(0.25);
        if let Some((v, b)) = self.cfg.trace_block {
            eprintln!(
                "[{} t={}] crash (SAN power loss {san_power_loss}); SAN block holds {}",
                self.step,
                self.now.get(),
                self.san_block(v, b)
            );
        }
        {
            let mut f = self.flash.0.borrow_mut();
            f.crash_in_flight();
            f.power_loss();
        }
        for (i, s) in self.sans.iter().enumerate() {
            let mut d = s.0.borrow_mut();
            d.crash_in_flight();
            if san_power_loss {
                d.power_loss();
                self.model.san_power_loss(i);
            }
        }
        // In-flight host commands and messages between the halves are lost: writes stay
        // uncertain in the model. Every replication link of this node goes down.
        self.net.borrow_mut().node_down(0);
        for l in &mut self.links {
            l.fill(LinkSlot::None);
        }
        // The cluster thread dies with the node: a record write it had not made is never made.
        self.record_pending = None;
        self.in_flight.clear();
        self.to_destage.clear();
        self.to_engine.clear();
        for b in &mut self.busy {
            b.fill(false);
        }
        let mut ecfg = Simulator::engine_config(&self.cfg, &mut self.rng);
        ecfg.device_id = self.device_id;
        let specs = Simulator::specs(&self.cfg, &self.policies, &self.unmap, &self.assigned);
        self.engine = Engine::open(ecfg, Box::new(self.flash.port(0)), specs).expect("sim: open");
        self.engine.set_fabric(Box::new(FabricPort { net: self.net.clone(), node: 0 }));
        self.destager = Simulator::destager(&self.engine, &self.flash, &self.sans, &self.cfg);
        // The cluster thread may try before replay is done: refused then (a new epoch must not
        // be persisted mid-replay), and taken once the device is ready.
        self.follow_record(false);
        self.settle_until_ready();
        if *self.engine.state() == EngineState::Ready {
            self.follow_record(true);
        }
        if self.cfg.trace_block.is_some() {
            eprintln!("[{} t={}] recovered: {:?}", self.step, self.now.get(), self.engine.replay_report());
        }
        match self.engine.state() {
            EngineState::Ready => {}
            s => return Err(self.fail("invariant 1", format!("recovery did not complete: {s:?}"))),
        }
        self.pump()?;
        self.check_all_locations()
    }

    /// One step: maybe a host command, maybe a fault, time passes, both halves run, checks.
    pub fn step(&mut self) -> Result<(), Failure> {
        self.step += 1;
        let actions = self.rng.gen_range(0..3);
        for _ in 0..actions {
            self.host_action();
        }
        if self.cfg.faults {
            self.fault_action()?;
        }
        let dt = if self.rng.gen_bool(0.9) {
            self.rng.gen_range(1_000..300_000)
        } else {
            self.rng.gen_range(1_000_000..30_000_000)
        };
        self.advance(dt);
        self.pump()?;
        self.check_locations()
    }

    fn quiet(&self) -> bool {
        self.in_flight.is_empty()
            && self.net.borrow().idle()
            && self.engine.is_quiescent()
            && self.destager.is_idle()
            && self.to_destage.queue.is_empty()
            && self.to_engine.queue.is_empty()
    }

    /// Ends the run: faults off, everything write-back drains; then the SAN alone must hold
    /// the newest data of every block (invariant 2).
    pub fn drain(&mut self) -> Result<(), Failure> {
        for s in &self.sans {
            let mut d = s.0.borrow_mut();
            d.down_until = 0;
            d.error_ppm = 0;
            d.slow_until = 0;
        }
        self.flash.0.borrow_mut().fail_writes_until = 0;
        self.flash.0.borrow_mut().fail_reads_until = 0;
        for rn in &self.replica_nodes {
            rn.flash.0.borrow_mut().fail_writes_until = 0;
        }
        for _ in 0..200_000 {
            if self.quiet() {
                break;
            }
            self.advance(200_000);
            self.pump()?;
        }
        if !self.quiet() {
            return Err(self.fail("invariant 2", "engine did not drain to quiescence".into()));
        }
        self.check_all_locations()?;
        for vol in 0..self.cfg.volumes {
            for lba in 0..self.cfg.blocks {
                let found = self.san_block(vol, lba);
                self.model.check(vol, lba, found, false, "invariant 2").map_err(|v| self.violation(v))?;
            }
        }
        Ok(())
    }

    pub fn run(&mut self) -> Result<(), Failure> {
        for _ in 0..self.cfg.steps {
            self.step()?;
        }
        let coin = self.rng.gen_bool(0.5);
        if !self.replica_nodes.is_empty() && self.cfg.failover.unwrap_or(coin) {
            return self.failover();
        }
        self.drain()
    }

    /// Ends the run by losing the source for good: its node is gone with whatever was in
    /// flight; one replica also crashes, restarts its flash offline and destages its copies to
    /// the SANs (what `stagerctl flash destage` does on a replica). Every volume whose link to
    /// that replica was in sync must then read, from its SAN alone, as the host was promised.
    pub fn failover(&mut self) -> Result<(), Failure> {
        self.stats.failovers += 1;
        // A node that is some volume's replica now (the spare may hold only stale copies).
        let replicas: Vec<usize> =
            (0..self.replica_nodes.len()).filter(|r| self.assigned.iter().any(|a| a.contains(r))).collect();
        let r = replicas[self.rng.gen_range(0..replicas.len())];
        let status = self.engine.link_status();
        // With a cluster, the record says which copies may be destaged (it may still name a copy
        // whose link was just lost: acknowledgements wait until it no longer does); without,
        // the links in sync at the moment of the loss.
        let in_sync: Vec<usize> = (0..self.cfg.volumes)
            .filter(|&vol| match self.links[vol][r] {
                _ if self.cfg.confirm_copies == Some(true) => self.recorded[vol][r],
                LinkSlot::Up(l) => status.iter().any(|s| s.link == l && s.state == "in-sync"),
                _ => false,
            })
            .collect();
        // The source vanishes: nothing more of it reaches a SAN or a replica.
        self.net.borrow_mut().node_down(0);
        for s in &self.sans {
            s.0.borrow_mut().crash_in_flight();
        }
        self.flash.0.borrow_mut().crash_in_flight();
        self.in_flight.clear();
        self.to_destage.clear();
        self.to_engine.clear();
        if self.rng.gen_bool(0.5) {
            return self.rescue_live(r, &in_sync);
        }
        // Drop the source's ports' pending completions: a fresh engine on the replica only.
        for rn in &self.replica_nodes {
            let mut f = rn.flash.0.borrow_mut();
            f.crash_in_flight();
            f.power_loss();
        }
        let rn = &self.replica_nodes[r];
        let cfg = EngineConfig {
            device_id: rn.device_id,
            destage_replica_copies: true,
            ..Simulator::engine_config(&self.cfg, &mut self.rng)
        };
        let engine = Engine::open(cfg, Box::new(rn.flash.port(0)), Vec::new()).expect("sim: open copy");
        // The SANs of the volumes this node is a replica of. It may also hold a stale copy of a
        // volume whose replica it no longer is (replaced, its discard not persisted before the
        // crash): that one is let go, never destaged (it could put old data over newer).
        let sans: Vec<(VolumeId, Box<dyn San>)> = (0..self.cfg.volumes)
            .filter(|&vol| self.wants_replica(vol, r))
            .map(|vol| (Simulator::volume_id(vol), Box::new(self.sans[vol].clone()) as Box<dyn San>))
            .collect();
        let stale: Vec<VolumeId> = (0..self.cfg.volumes)
            .filter(|&vol| vol % 3 != 2 && !self.wants_replica(vol, r))
            .map(Simulator::volume_id)
            .collect();
        let destager = self.cfg.destager(engine.layout(), Box::new(rn.flash.port(1)), sans);
        let mut node = Node::new(engine, destager);
        let mut quiet = false;
        let mut let_go = false;
        for _ in 0..400_000 {
            self.advance(100_000);
            node.poll(self.now.get());
            if !let_go && *node.engine.state() == EngineState::Ready {
                let_go = true;
                for &id in &stale {
                    let _ = node.engine.discard_copy(id);
                }
            }
            if *node.engine.state() == EngineState::Ready && node.is_quiescent() {
                quiet = true;
                break;
            }
            if let EngineState::Failed(why) = node.engine.state() {
                return Err(self.fail("replica failover", format!("the copy does not recover: {why}")));
            }
        }
        if !quiet {
            return Err(self.fail("replica failover", "destaging the copy did not finish".into()));
        }
        self.check_sans_after_failover(&in_sync, "replica failover (invariant 1 with replicas)")
    }

    /// After a failover: every block of each volume in `in_sync` reads from its SAN alone as
    /// the host was promised.
    fn check_sans_after_failover(&mut self, in_sync: &[usize], what: &'static str) -> Result<(), Failure> {
        for &vol in in_sync {
            for lba in 0..self.cfg.blocks {
                let found = self.san_block(vol, lba);
                self.stats.failover_blocks_checked += 1;
                self.model.check(vol, lba, found, false, what).map_err(|v| self.violation(v))?;
            }
        }
        Ok(())
    }
}

impl Simulator {
    /// The cluster's way of losing the source: replica `r`, running, destages its in-sync
    /// copies itself (`Engine::rescue_copy`) while it keeps running, with a destager given the
    /// volumes' SANs only now. Each must then read from its SAN alone as the host was promised.
    fn rescue_live(&mut self, r: usize, in_sync: &[usize]) -> Result<(), Failure> {
        self.stats.live_rescues += 1;
        self.settle_replica(r);
        let rn = self.replica_nodes.swap_remove(r);
        let mut destager = self.cfg.destager(rn.engine.layout(), Box::new(rn.flash.port(1)), Vec::new());
        for &vol in in_sync {
            destager.add_volume(Simulator::volume_id(vol), Box::new(self.sans[vol].clone()));
        }
        let mut node = Node::new(rn.engine, destager);
        for &vol in in_sync {
            if let Err(why) = node.engine.rescue_copy(Simulator::volume_id(vol)) {
                return Err(self.fail("replica failover, live rescue", format!("volume {vol}: {why}")));
            }
        }
        let done = |node: &Node| {
            in_sync.iter().all(|&vol| node.engine.rescue_state(Simulator::volume_id(vol)).is_some_and(|r| r.done))
        };
        let mut finished = false;
        for _ in 0..400_000 {
            self.advance(100_000);
            node.poll(self.now.get());
            if done(&node) {
                finished = true;
                break;
            }
            if let EngineState::Failed(why) = node.engine.state() {
                return Err(self.fail("replica failover, live rescue", format!("the replica's engine failed: {why}")));
            }
        }
        if !finished {
            let states: Vec<String> = in_sync
                .iter()
                .map(|&vol| {
                    let id = Simulator::volume_id(vol);
                    format!("{id}: {:?} {:?}", node.engine.rescue_state(id), node.engine.volume_metrics(id))
                })
                .collect();
            return Err(self.fail(
                "replica failover, live rescue",
                format!("destaging the copies did not finish: {}", states.join("; ")),
            ));
        }
        self.check_sans_after_failover(in_sync, "replica failover, live rescue (invariant 1 with replicas)")?;
        match in_sync.first() {
            Some(&vol) => self.serve_rescued(&mut node, vol),
            None => Ok(()),
        }
    }

    /// The rescuer then serves the volume in its owner's place (`Engine::serve_copy`): writes
    /// go to the SAN before they are acknowledged, reads return them, and the rescue ends only
    /// once the copy is no longer served.
    fn serve_rescued(&mut self, node: &mut Node, vol: usize) -> Result<(), Failure> {
        const WHAT: &str = "serving a rescued copy";
        const SERVE_WRITE_ATTEMPTS: u32 = 10;
        self.stats.served_rescues += 1;
        let id = Simulator::volume_id(vol);
        if let Err(why) = node.engine.serve_copy(id, true, None) {
            return Err(self.fail(WHAT, format!("{id}: {why}")));
        }
        if node.engine.end_rescue(id, false).is_ok() {
            return Err(self.fail(WHAT, "the rescue ended while the copy was served".into()));
        }
        let run = |this: &mut Simulator, node: &mut Node, token: u64, op: HostOp| -> Result<HostDone, Failure> {
            node.engine.submit(id, token, op, this.now.get());
            let mut out = Vec::new();
            for _ in 0..100_000 {
                this.advance(100_000);
                node.poll(this.now.get());
                node.engine.drain_completions(&mut out);
                if let Some(i) = out.iter().position(|d| d.token == token) {
                    return Ok(out.swap_remove(i));
                }
            }
            Err(this.fail(WHAT, format!("command {token} never completed")))
        };
        for k in 0..4u64 {
            let lba = self.rng.gen_range(0..self.cfg.blocks);
            let wid = 1_000_000_000 + k;
            // The SAN may be down or failing meanwhile (faults): a write then ends Busy, and a
            // host writes it again.
            let mut attempts = 0;
            let done = loop {
                let mut buf = AlignedBuf::new(BLOCK_SIZE);
                encode_block(&mut buf, wid, vol as u32, lba);
                let done = run(self, node, 2 * k + 1, HostOp::Write { lba: Lba(lba), buf, fua: false })?;
                attempts += 1;
                if done.status != Status::Busy || attempts == SERVE_WRITE_ATTEMPTS {
                    break done;
                }
            };
            if done.status != Status::Ok {
                return Err(
                    self.fail(WHAT, format!("a write to lba {lba} ended {:?} ({attempts} attempts)", done.status))
                );
            }
            if self.san_block(vol, lba) != wid {
                return Err(self.fail(WHAT, format!("an acknowledged write to lba {lba} is not on the SAN")));
            }
            let buf = AlignedBuf::new(BLOCK_SIZE);
            let done = run(self, node, 2 * k + 2, HostOp::Read { lba: Lba(lba), blocks: 1, buf })?;
            let got = done.buf.as_ref().map(|b| decode_block(b, vol as u32, lba));
            if done.status != Status::Ok || got != Some(wid) {
                return Err(self.fail(WHAT, format!("lba {lba} read back {:?} {got:?}, not write {wid}", done.status)));
            }
        }
        if let Err(why) = node.engine.serve_copy(id, false, None) {
            return Err(self.fail(WHAT, why));
        }
        if node.engine.served_ops(id) != 0 {
            return Err(self.fail(WHAT, "commands left after the last completed".into()));
        }
        node.engine.end_rescue(id, false).map_err(|why| self.fail(WHAT, format!("cannot end the rescue: {why}")))
    }
}

/// Direct control for targeted scenario tests.
impl Simulator {
    /// Adds the engine's superseding writes so far to the stats (before it is replaced).
    fn count_supersedes(&mut self) {
        for vol in 0..self.cfg.volumes {
            if let Some(m) = self.engine.volume_metrics(Simulator::volume_id(vol)) {
                self.stats.supersedes += m.log_full_supersedes;
            }
        }
    }

    pub fn now(&self) -> u64 {
        self.now.get()
    }

    pub fn volume_id(vol: usize) -> VolumeId {
        VolumeId(VOLUME_ID_BASE + vol as u32)
    }

    /// Submits a write of fresh data; returns its write id.
    pub fn write(&mut self, vol: usize, lba: u64, blocks: u32) -> u64 {
        self.submit_write(vol, lba, blocks, false)
    }

    /// Submits a Write Zeroes.
    pub fn write_zeroes(&mut self, vol: usize, lba: u64, blocks: u32) {
        self.submit_zeroes(vol, lba, blocks, false);
    }

    pub fn read(&mut self, vol: usize, lba: u64, blocks: u32) {
        let token = self.next_token;
        self.next_token += 1;
        self.set_busy(vol, lba, blocks, true);
        self.in_flight.insert(token, InFlight::Read { vol, lba, blocks });
        let buf = AlignedBuf::new(blocks as usize * BLOCK_SIZE);
        self.engine.submit(
            Simulator::volume_id(vol),
            token,
            HostOp::Read { lba: Lba(lba), blocks, buf },
            self.now.get(),
        );
    }

    pub fn flush(&mut self, vol: usize) {
        let token = self.next_token;
        self.next_token += 1;
        let snapshot = self.model.flush_submitted(vol);
        self.in_flight.insert(token, InFlight::Flush { vol, snapshot });
        self.engine.submit(Simulator::volume_id(vol), token, HostOp::Flush, self.now.get());
    }

    pub fn set_policy(&mut self, vol: usize, p: WritePolicy) {
        self.policies[vol] = p;
        self.engine.set_policy(Simulator::volume_id(vol), p);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Lets time pass in small steps, running both halves and every checker.
    pub fn run_for(&mut self, ns: u64) -> Result<(), Failure> {
        let end = self.now.get() + ns;
        while self.now.get() < end {
            self.step += 1;
            self.advance(50_000);
            self.pump()?;
            self.check_locations()?;
        }
        Ok(())
    }

    /// Runs until every host command has completed (or `max_ns` passes).
    pub fn settle(&mut self, max_ns: u64) -> Result<(), Failure> {
        let end = self.now.get() + max_ns;
        while !self.in_flight.is_empty() && self.now.get() < end {
            self.run_for(50_000)?;
        }
        Ok(())
    }

    /// The write ids the model allows for a block (the newest acknowledged first).
    pub fn expected(&self, vol: usize, lba: u64) -> Vec<u64> {
        self.model.allowed(vol, lba)
    }

    pub fn san_value(&self, vol: usize, lba: u64) -> u64 {
        self.san_block(vol, lba)
    }

    pub fn busy_returns(&self) -> u64 {
        self.stats.busy
    }

    /// What an operator does to reuse a device: drain it to the SAN, stop, zero both superblock
    /// copies, start again — the engine formats it as a new device (`device_id`). The previous
    /// format's frames are still in the log area.
    pub fn reformat(&mut self, device_id: u64) -> Result<(), Failure> {
        self.drain()?;
        for vol in 0..self.cfg.volumes {
            self.model.reformatted(vol);
        }
        {
            let mut f = self.flash.0.borrow_mut();
            f.image[..2 * BLOCK_SIZE].fill(0);
            if let Some(d) = f.durable.as_mut() {
                d[..2 * BLOCK_SIZE].fill(0);
            }
        }
        self.to_destage.clear();
        self.to_engine.clear();
        let mut ecfg = Simulator::engine_config(&self.cfg, &mut self.rng);
        ecfg.device_id = device_id;
        self.device_id = device_id;
        let specs = Simulator::specs(&self.cfg, &self.policies, &self.unmap, &self.assigned);
        self.engine = Engine::format(ecfg, Box::new(self.flash.port(0)), specs).expect("sim: format");
        self.destager = Simulator::destager(&self.engine, &self.flash, &self.sans, &self.cfg);
        self.settle_until_ready();
        self.follow_record(true);
        self.pump()
    }
}

/// Runs one seed to the end; returns its statistics or the first failure.
pub fn run_seed(seed: u64, cfg: SimConfig) -> Result<SimStats, Failure> {
    let mut sim = Simulator::new(seed, cfg);
    sim.run()?;
    sim.count_supersedes();
    Ok(sim.stats)
}
