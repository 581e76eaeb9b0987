//! This node in the cluster (the `cluster:` section; the `cluster` feature): one thread that
//! owns the etcd client (so the reactors never wait for etcd) and, every `CLUSTER_TICK`:
//!
//! - **membership**: keeps the node registered under its lease with what placement reads
//!   (free flash on the device that keeps copies for peers; the volumes whose SAN answers —
//!   its own, and those of other nodes' volumes it probes through the SAN their records name);
//! - **owner**: for each volume it serves, creates the volume's record if there is none,
//!   follows the replica set and epoch the record names (`Replication::set_replicas`), and
//!   writes what only it knows: requested and effective policy and why, the replicas it cannot
//!   reach (`UNREACHABLE_AFTER`), time spent unprotected (`stager_cluster::manager::owner_report`);
//! - **resource manager**, while elected: reviews every record against the live nodes and
//!   replaces lost replicas with an epoch bump (`stager_cluster::manager::review`);
//! - **replica**: when the record makes this node the *rescuer* of a volume whose owner was
//!   lost, destages its copy to the volume's SAN (`VolumeService::rescue_copy`) and records when
//!   it is all there; lets go of copies it keeps for volumes whose record has moved the role to
//!   other nodes once the owner reports them protected again (`may_discard_copy`).
//!
//! **Fencing.** Each SAN this node writes in a cluster sits behind a gate (`volume::san_gate`)
//! that this thread opens, each tick the record allows it, only up to the lease's local
//! deadline: a node cut off from etcd stops writing its volumes' SANs before another node may be
//! chosen to rescue them (a volume with no copy anywhere, which nobody can take over, stays
//! open). Its write acknowledgements stop too, as soon as the rescuer drops its link.
//! A node that cannot reach etcd keeps serving under the replica set it has, and retries.
//!
//! **Serving in the owner's place.** A rescuer with a `kind: standby` namespace for the volume
//! serves it once its rescue is done and the owner is still gone (`VolumeRecord::server`):
//! write-through from its rescued copy to the SAN, its path made `optimized` for hosts with ANA
//! multipath. When the owner is back it asks for the volume (`handback`); the server closes
//! its path, lets its last commands finish and clears `server`; the owner then drops its whole
//! log of the volume (the SAN holds newer writes) and serves again. Only groups the file writes
//! out are steered (`config::steered_ana_groups`): each `optimized` while this node serves its
//! volume, `inaccessible` otherwise (and every one while the lease is lost).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use stager_cluster::constants::UNREACHABLE_AFTER;
use stager_cluster::manager::{
    ask_handback, copies_of, end_rescue, may_discard_copy, owner_report, rescue_for_failed_flash, review,
    start_serving, stop_serving, OwnerView, Review,
};
use stager_cluster::{unix_ms_now, Cluster, LeaseState, NodeInfo, Revision, VolumeRecord};
use stager_nvme::log_page::AnaState;
use stager_policy::{Epoch, VolumeId};

use crate::ana::AnaScope;
use crate::config::{BackendConfig, Config, SanConfig};
use crate::constants::{CLUSTER_HOLD_POLL, CLUSTER_REFRESH, CLUSTER_SAN_PROBE, CLUSTER_TICK, FLASH_HANDOVER_AFTER};
use crate::subsystem::TargetShared;
use crate::volume::replication::Replication;
use crate::volume::status::{ClusterView, NodeStatus, VolumeStatus};
use crate::volume::VolumeService;

/// How long a rescuer waits before it asks its destage core again to rescue a copy whose
/// rescue has not started (the SAN did not open, the engine refused: both logged).
const RESCUE_ASK_AGAIN: Duration = Duration::from_secs(5);

/// The cluster thread; `stop` deregisters the node (a graceful leave).
pub struct Membership {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the thread knows and remembers between ticks.
struct Agent {
    me: String,
    base: NodeInfo,
    /// The flash device that keeps copies for peers (`node.replica_flash`, else the first).
    replica_flash: Option<String>,
    volumes: Option<Arc<VolumeService>>,
    replication: Option<Arc<Replication>>,
    /// This node's volumes' SANs as records name them.
    own_sans: HashMap<u32, String>,
    /// Since when each (volume, replica) link has been down.
    down_since: HashMap<(u32, String), Instant>,
    /// Other nodes' volumes' SANs: when each was probed, and whether it answered.
    probes: HashMap<u32, (Instant, bool)>,
    /// What was said last, per topic, so a lasting condition is logged once.
    said: HashMap<String, String>,
    /// The record epoch this node last applied to each of its volumes.
    applied: HashMap<u32, u64>,
    /// Where `stagerctl cluster` reads what this thread last saw.
    shared: Option<Arc<TargetShared>>,
    /// A volume of this node holds write acknowledgements the record has not confirmed yet:
    /// the next tick comes after `CLUSTER_HOLD_POLL` instead of `CLUSTER_TICK`.
    holding: bool,
    /// This node owns volumes with replicas (only then can a lost link hold acknowledgements).
    replicated: bool,
    /// Each volume's copies generation as the last tick saw it.
    generations: HashMap<u32, u64>,
    /// When this node last asked its destage core to rescue each copy (it does not wait).
    rescue_asked: HashMap<u32, Instant>,
    /// Volumes of other nodes this node has a `kind: standby` namespace for, with its size in
    /// blocks.
    standbys: HashMap<u32, u64>,
    /// The IQN it probes other nodes' volumes' SANs with (`node.san_initiator`).
    san_initiator: String,
    /// Since when each of its flash devices has been degraded, and the volumes whose dirty data
    /// it handed to a replica during that stretch (once per stretch: its log cannot be read).
    degraded_since: HashMap<String, Instant>,
    handed_over: Vec<u32>,
    /// The ANA groups this thread steers: (subsystem NQN, group, volume) (`steered_ana_groups`).
    steered: Vec<(String, u32, u32)>,
    /// The groups of this node's volumes it does not steer (`unsteered_ana_groups`), and those
    /// of them it closed because another node serves their volume.
    unsteered: Vec<(String, u32, u32)>,
    closed_unsteered: Vec<(String, u32)>,
}

/// What one tick read from etcd and the node, and until when the node may act on it (its
/// lease's local deadline).
#[derive(Clone, Copy)]
struct Tick<'a> {
    c: &'a Cluster,
    status: &'a NodeStatus,
    records: &'a [(VolumeRecord, Revision)],
    nodes: &'a [NodeInfo],
    until: Instant,
}

impl Membership {
    /// Starts the thread when the configuration has a `cluster:` section (validated: it then
    /// has a `node:` section too). `nvme_addrs` are the listeners as bound.
    pub fn start(
        cfg: &Config,
        nvme_addrs: Vec<String>,
        fabric_addr: Option<std::net::SocketAddr>,
        volumes: Option<Arc<VolumeService>>,
        replication: Option<Arc<Replication>>,
        shared: Option<Arc<TargetShared>>,
    ) -> Option<Membership> {
        let (cl, node) = (cfg.cluster.as_ref()?, cfg.node.as_ref()?);
        let client_cfg = cl.client_config(&node.id);
        let mut own_sans = HashMap::new();
        let mut standbys = HashMap::new();
        for n in cfg.subsystems.iter().flat_map(|s| &s.namespaces) {
            match &n.backend {
                BackendConfig::Volume { id, san, .. } => {
                    own_sans.insert(*id, san_name(san));
                }
                BackendConfig::Standby { id, size_bytes } => {
                    standbys.insert(*id, size_bytes / u64::from(crate::config::VOLUME_BLOCK_SIZE));
                }
                _ => {}
            }
        }
        let agent = Agent {
            me: node.id.clone(),
            base: NodeInfo {
                id: node.id.clone(),
                fault_domain: node.fault_domain.clone(),
                fabric_addr: fabric_addr.unwrap_or(node.fabric.listen).to_string(),
                nvme_addrs,
                flash_free_bytes: 0,
                sans_reachable: Vec::new(),
                sans_unreachable: Vec::new(),
                started_unix_ms: unix_ms_now(),
            },
            replica_flash: node.replica_flash.clone().or_else(|| cfg.flash.first().map(|f| f.name.clone())),
            volumes,
            replication,
            own_sans,
            down_since: HashMap::new(),
            probes: HashMap::new(),
            said: HashMap::new(),
            applied: HashMap::new(),
            shared,
            holding: false,
            replicated: false,
            generations: HashMap::new(),
            rescue_asked: HashMap::new(),
            standbys,
            san_initiator: node.san_initiator().to_string(),
            degraded_since: HashMap::new(),
            handed_over: Vec::new(),
            steered: crate::config::steered_ana_groups(cfg),
            unsteered: crate::config::unsteered_ana_groups(cfg),
            closed_unsteered: Vec::new(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || run(client_cfg, agent, &flag))
            .map_err(|e| tracing::error!("cluster: cannot start the cluster thread: {e}"))
            .ok()?;
        Some(Membership { stop, thread: Some(thread) })
    }

    /// Deregisters the node (its record and any manager candidacy go at once) and ends the
    /// thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a volume's SAN is named in its record: what another node opens to probe it.
fn san_name(san: &SanConfig) -> String {
    match san {
        SanConfig::File { path, .. } => {
            let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
            format!("file:{}", abs.display())
        }
        SanConfig::Iscsi { url, .. } => url.clone(),
    }
}

/// Whether this node reaches the SAN a record names (a file it can open, an iSCSI LUN it can
/// log in to as the default initiator).
fn probe_san(name: &str, initiator: &str) -> bool {
    if let Some(path) = name.strip_prefix("file:") {
        return std::fs::OpenOptions::new().read(true).write(true).open(path).is_ok();
    }
    #[cfg(feature = "iscsi")]
    if name.starts_with("iscsi://") {
        return crate::san::iscsi::IscsiLun::connect(name, initiator, Duration::from_secs(2)).is_ok();
    }
    false
}

fn run(cfg: stager_cluster::ClusterConfig, mut agent: Agent, stop: &AtomicBool) {
    let endpoints = cfg.endpoints.join(",");
    let mut client: Option<Cluster> = None;
    // The registration etcd holds, when the lease is alive.
    let mut registered: Option<NodeInfo> = None;
    let mut next_connect = Instant::now();
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(CLUSTER_HOLD_POLL);
        let due = last_tick.elapsed() >= CLUSTER_TICK || agent.holding || (agent.replicated && agent.any_held());
        if !due {
            continue;
        }
        last_tick = Instant::now();
        agent.holding = false;
        let c = match &client {
            Some(c) => c,
            None if Instant::now() < next_connect => continue,
            None => match Cluster::connect(cfg.clone()) {
                Ok(c) => client.insert(c),
                Err(e) => {
                    next_connect = Instant::now() + CLUSTER_REFRESH;
                    agent.say("etcd", format!("cluster: cannot reach etcd at {endpoints}, retrying: {e}"));
                    continue;
                }
            },
        };
        let alive = matches!(c.lease_state(), LeaseState::Alive { .. });
        // (A steered path this node serves closes by itself at the lease's local deadline.)
        if !alive && registered.take().is_some() {
            tracing::error!(
                "cluster: node {}'s lease is lost (etcd unreachable or the lease expired); registering again. \
                 Until the cluster is heard again this node writes the SANs of volumes with copies no more \
                 (another node may destage a copy), and their writes are acknowledged only while their \
                 replicas take them",
                cfg.node
            );
        }
        let status = agent.volumes.as_ref().map(|v| v.status());
        let status = match status {
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                agent.say("status", format!("cluster: cannot read this node's volumes: {e}"));
                None
            }
            None => None,
        };
        let records = if alive { c.volumes().map_err(|e| e.to_string()) } else { Err("lease lost".to_string()) };
        let info = agent.facts(status.as_ref(), records.as_ref().ok());
        if registered.as_ref() != Some(&info) {
            match c.register(&info) {
                Ok(()) => {
                    if registered.is_none() {
                        tracing::info!(
                            "cluster: node {} registered in etcd at {endpoints} under {} ({} bytes of free flash, SANs of volumes {:?} reachable)",
                            cfg.node,
                            cfg.prefix,
                            info.flash_free_bytes,
                            info.sans_reachable
                        );
                    }
                    agent.said.remove("etcd");
                    registered = Some(info);
                }
                Err(e) => agent.say("etcd", format!("cluster: registering node {} failed, retrying: {e}", cfg.node)),
            }
        }
        if registered.is_none() {
            continue;
        }
        // A node without flash (no volumes, no copies) still registers and may manage.
        let status = match (&agent.volumes, status) {
            (None, _) => Some(NodeStatus { pid: std::process::id(), uptime_s: 0.0, devices: Vec::new() }),
            (Some(_), s) => s,
        };
        let (Ok(records), Some(status)) = (records, status) else { continue };
        let nodes = match c.nodes() {
            Ok(n) => n,
            Err(e) => {
                agent.say("etcd", format!("cluster: cannot list nodes: {e}"));
                continue;
            }
        };
        // Until when this node may act on what it read: the lease's local deadline.
        let until = match c.lease_state() {
            LeaseState::Alive { valid_for } => Instant::now() + valid_for,
            LeaseState::Lost => continue,
        };
        let tick = Tick { c, status: &status, records: &records, nodes: &nodes, until };
        // Paths first: a path that must close closes before the engine stops serving.
        agent.steer_ana(&records, &status, until);
        agent.own_volumes(&tick);
        agent.manage(c, &records, &nodes);
        agent.copies(&tick);
        agent.publish(c, &cfg.prefix, nodes, records);
    }
    if let Some(c) = client {
        if let Err(e) = c.deregister() {
            tracing::warn!("cluster: deregistering node {} failed (its lease will expire): {e}", cfg.node);
        }
        c.stop();
    }
}

impl Agent {
    /// Logs `msg` at warn unless it is what was said last on `topic`.
    fn say(&mut self, topic: &str, msg: String) {
        if self.said.get(topic) != Some(&msg) {
            tracing::warn!("{msg}");
            self.said.insert(topic.to_string(), msg);
        }
    }

    /// What the node registers now.
    fn facts(&mut self, status: Option<&NodeStatus>, records: Option<&Vec<(VolumeRecord, Revision)>>) -> NodeInfo {
        let mut info = self.base.clone();
        if let Some(status) = status {
            for d in &status.devices {
                if Some(&d.name) == self.replica_flash.as_ref() && !d.degraded {
                    info.flash_free_bytes = d.log_capacity_bytes.saturating_sub(d.log_used_bytes);
                }
                info.sans_reachable.extend(d.volumes.iter().filter(|v| v.san_reachable).map(|v| v.id));
                info.sans_unreachable.extend(d.volumes.iter().filter(|v| !v.san_reachable).map(|v| v.id));
            }
        }
        // Other nodes' volumes: this node could keep a copy only if it could destage it.
        for (rec, _) in records.into_iter().flatten() {
            if self.own_sans.contains_key(&rec.id) || rec.san.is_empty() {
                continue;
            }
            let due = self.probes.get(&rec.id).is_none_or(|(at, _)| at.elapsed() >= CLUSTER_SAN_PROBE);
            if due {
                let ok = probe_san(&rec.san, &self.san_initiator);
                if ok && self.probes.get(&rec.id).is_some_and(|(_, was)| !*was) {
                    tracing::info!("cluster: volume {}'s SAN {} answers from this node again", rec.id, rec.san);
                    self.said.remove(&format!("probe-{}", rec.id));
                } else if !ok {
                    let msg = "does not answer";
                    self.say(
                        &format!("probe-{}", rec.id),
                        format!("cluster: volume {}'s SAN {} {msg} from this node", rec.id, rec.san),
                    );
                }
                self.probes.insert(rec.id, (Instant::now(), ok));
            }
            match self.probes.get(&rec.id) {
                Some((_, true)) => info.sans_reachable.push(rec.id),
                Some((_, false)) => info.sans_unreachable.push(rec.id),
                None => {}
            }
        }
        info.sans_reachable.sort_unstable();
        info.sans_reachable.dedup();
        info.sans_unreachable.sort_unstable();
        info.sans_unreachable.dedup();
        info
    }

    /// Whether a volume of this node holds write acknowledgements for the record.
    fn any_held(&self) -> bool {
        let Some(Ok(status)) = self.volumes.as_ref().map(|v| v.status()) else { return false };
        status.devices.iter().flat_map(|d| &d.volumes).any(|v| {
            v.copies_confirmed < v.copies_generation && self.generations.get(&v.id) != Some(&v.copies_generation)
        })
    }

    /// The owner's part for each volume this node serves.
    fn own_volumes(&mut self, tick: &Tick) {
        let Tick { c, status, records, nodes, until } = *tick;
        let now = Instant::now();
        let vols: Vec<&VolumeStatus> = status.devices.iter().flat_map(|d| d.volumes.iter()).collect();
        self.replicated = vols.iter().any(|v| !v.replicas.is_empty());
        // Volumes on a flash device that has stayed degraded long enough to count as failed.
        let mut failed_flash: Vec<u32> = Vec::new();
        for d in &status.devices {
            if !d.degraded {
                self.degraded_since.remove(&d.name);
                self.handed_over.retain(|id| !d.volumes.iter().any(|v| v.id == *id));
                continue;
            }
            if !d.failing {
                // Degraded by an error that did not recur (its log drains): not failed.
                self.degraded_since.remove(&d.name);
                continue;
            }
            let since = *self.degraded_since.entry(d.name.clone()).or_insert(now);
            if now.duration_since(since) >= FLASH_HANDOVER_AFTER {
                failed_flash.extend(d.volumes.iter().filter(|v| v.dirty_bytes > 0).map(|v| v.id));
            }
        }
        for v in vols {
            self.generations.insert(v.id, v.copies_generation);
            let requested = v.requested_policy.clone();
            let copies = copies_of(&requested);
            let named: Vec<String> = v.replicas.iter().map(|r| r.node.clone()).collect();
            for r in &v.replicas {
                let key = (v.id, r.node.clone());
                if r.state == "down" {
                    self.down_since.entry(key).or_insert(now);
                } else {
                    self.down_since.remove(&key);
                }
            }
            let effective = if v.reason == "as-requested" { requested.clone() } else { v.effective_policy.clone() };
            let reason = if v.reason == "as-requested" { String::new() } else { v.reason.clone() };
            let unreachable: Vec<String> = named
                .iter()
                .filter(|n| {
                    self.down_since
                        .get(&(v.id, (*n).clone()))
                        .is_some_and(|s| now.duration_since(*s) >= UNREACHABLE_AFTER)
                        && nodes.iter().any(|x| &x.id == *n)
                })
                .cloned()
                .collect();
            let in_sync: Vec<String> =
                v.replicas.iter().filter(|r| r.state == "in-sync").map(|r| r.node.clone()).collect();
            let view = OwnerView {
                requested: requested.clone(),
                effective,
                reason,
                unreachable,
                san: self.own_sans.get(&v.id).cloned().unwrap_or_default(),
                in_sync,
            };
            let Some((rec, rev)) = records.iter().find(|(r, _)| r.id == v.id) else {
                let mut rec = VolumeRecord {
                    id: v.id,
                    owner: self.me.clone(),
                    replicas: named.clone(),
                    epoch: 1,
                    ..Default::default()
                };
                rec.push_transition(unix_ms_now(), format!("created by its owner {}", self.me));
                let rec = owner_report(&rec, &view, unix_ms_now()).unwrap_or(rec);
                match c.put_volume_if(&rec, None) {
                    Ok(Ok(_)) => {
                        tracing::info!(
                            "cluster: volume {}: record created (owner {}, replicas {:?})",
                            v.id,
                            self.me,
                            named
                        );
                        self.holding = true; // the next tick confirms it
                    }
                    Ok(Err(_)) => {}
                    Err(e) => self.say("etcd", format!("cluster: cannot create volume {}'s record: {e}", v.id)),
                }
                continue;
            };
            let Some(volumes) = self.volumes.clone() else { continue };
            if rec.owner != self.me {
                volumes.close_san_gate(v.id);
                self.say(
                    &format!("owner-{}", v.id),
                    format!(
                        "cluster: volume {}'s record names node {:?} as its owner, not this node: not following its replica set, \
                         and its writes are not acknowledged here",
                        v.id, rec.owner
                    ),
                );
                continue;
            }
            if !rec.rescuer.is_empty() {
                // This node was taken for gone (its lease expired) and another node's copy goes
                // to the SAN: until this node has skipped past it, writing the SAN from here
                // could put this log's older data over it, and releasing a held acknowledgement
                // could confirm a write the rescue overwrote.
                volumes.close_san_gate(v.id);
                if rec.rescued_unix_ms == 0 {
                    self.say(
                        &format!("owner-{}", v.id),
                        format!(
                            "cluster: volume {}: this node was taken for gone and {} destages its copy to the SAN: \
                             this node writes nothing to the SAN and releases no held acknowledgement until that is done",
                            v.id, rec.rescuer
                        ),
                    );
                } else if !rec.server.is_empty() {
                    // Another node serves the volume: it must stop before this node may.
                    self.say(
                        &format!("owner-{}", v.id),
                        format!(
                            "cluster: volume {}: {} serves it in this node's place; asking for it back",
                            v.id, rec.server
                        ),
                    );
                    if let Some(ask) = ask_handback(rec, unix_ms_now()) {
                        if let Err(e) = c.put_volume_if(&ask, Some(*rev)) {
                            self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", v.id));
                        }
                    }
                } else {
                    self.absorb(c, &volumes, rec, *rev);
                }
                continue;
            }
            let handover = (failed_flash.contains(&v.id) && !self.handed_over.contains(&v.id))
                .then(|| rescue_for_failed_flash(rec, nodes, unix_ms_now()));
            if let Some(handover) = handover {
                // Its log cannot be read back: the replica whose copy is in sync destages it.
                // Fenced from the SAN first (the record's rescuer keeps it so until it is done);
                // without such a replica it stays on its failing flash and goes on as usual.
                match handover {
                    Some(new) => {
                        volumes.close_san_gate(v.id);
                        match c.put_volume_if(&new, Some(*rev)) {
                            Ok(Ok(_)) => {
                                self.handed_over.push(v.id);
                                tracing::error!(
                                    "cluster: volume {}: its flash has failed with {} dirty: {} destages its copy to the SAN; \
                                     this node serves the volume write-through and writes nothing to its SAN until that is done",
                                    v.id,
                                    crate::volume::status::human_bytes(v.dirty_bytes),
                                    new.rescuer
                                );
                            }
                            // Not written (changed meanwhile, or etcd): the gate opens again below
                            // and the next tick looks again.
                            Ok(Err(_)) => {}
                            Err(e) => self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", v.id)),
                        }
                    }
                    None => self.say(
                        &format!("flash-{}", v.id),
                        format!(
                            "cluster: volume {}: its flash has failed with {} dirty, and no replica in sync can destage \
                             it (in sync: {:?}): it stays on the failing flash",
                            v.id,
                            crate::volume::status::human_bytes(v.dirty_bytes),
                            rec.in_sync
                        ),
                    ),
                }
                if self.handed_over.contains(&v.id) {
                    continue;
                }
            }
            self.said.remove(&format!("owner-{}", v.id));
            // Nobody else can take a volume without copies over: its SAN stays open even while
            // etcd is out of reach. One with copies is written only while the lease holds.
            let copyless = rec.replicas.is_empty() && rec.in_sync.is_empty() && named.is_empty();
            volumes.open_san_gate(v.id, (!copyless).then_some(until));
            // Follow the record's replica set and epoch.
            if named != rec.replicas
                || copies != copies_of(&rec.requested)
                || self.applied.get(&v.id).copied().unwrap_or(0) < rec.epoch
            {
                if let Some(repl) = &self.replication {
                    let take = rec.replicas.iter().take(copies).cloned().collect::<Vec<_>>();
                    match repl.set_replicas(VolumeId(v.id), &take, copies, Epoch(rec.epoch)) {
                        Ok(e) => {
                            if named != take {
                                tracing::info!(
                                    "cluster: volume {}: replicas {:?} → {:?} (record epoch {}, volume epoch {})",
                                    v.id,
                                    named,
                                    take,
                                    rec.epoch,
                                    e.0
                                );
                            }
                            self.applied.insert(v.id, rec.epoch);
                        }
                        Err(e) => self.say(
                            &format!("follow-{}", v.id),
                            format!("cluster: volume {}: cannot take the replica set {:?}: {e}", v.id, rec.replicas),
                        ),
                    }
                } else if !rec.replicas.is_empty() {
                    self.say(
                        &format!("follow-{}", v.id),
                        format!(
                            "cluster: volume {} has replicas {:?} but this node has no node.peers to reach them",
                            v.id, rec.replicas
                        ),
                    );
                }
            }
            // Whether the record now says what `status` said (in particular no replica in sync
            // that was not in sync when the status was read).
            let report = owner_report(rec, &view, unix_ms_now());
            let in_sync_recorded = report.as_ref().map_or(&rec.in_sync, |r| &r.in_sync).clone();
            let recorded = match report {
                None => true,
                Some(new) => match c.put_volume_if(&new, Some(*rev)) {
                    Ok(Ok(_)) => {
                        if new.effective != rec.effective || new.reason != rec.reason {
                            tracing::info!("cluster: volume {}: effective {} {}", v.id, new.effective, new.reason);
                        }
                        if new.in_sync != rec.in_sync {
                            tracing::info!("cluster: volume {}: replicas in sync {:?}", v.id, new.in_sync);
                        }
                        true
                    }
                    Ok(Err(_)) => false, // changed meanwhile: the next tick reads it again
                    Err(e) => {
                        self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", v.id));
                        false
                    }
                },
            };
            if v.copies_confirmed < v.copies_generation {
                if recorded {
                    self.confirm(v, &in_sync_recorded);
                } else {
                    self.holding = true;
                }
            }
        }
    }

    /// Back after a rescue that is done: skip past what it destaged (held acknowledgements
    /// failed), then end it in the record; the next tick opens the SAN gate. Both steps may
    /// be repeated (a failed write of the record leaves the rescue for the next tick).
    fn absorb(&mut self, c: &Cluster, volumes: &VolumeService, rec: &VolumeRecord, rev: Revision) {
        let topic = format!("owner-{}", rec.id);
        let failed = match volumes.absorb_rescue(rec.id, rec.rescued_upto, rec.served) {
            Ok(n) => n,
            Err(e) => return self.say(&topic, format!("cluster: volume {}: cannot skip past the rescue: {e}", rec.id)),
        };
        match c.put_volume_if(&end_rescue(rec, failed, unix_ms_now()), Some(rev)) {
            Ok(Ok(_)) => {
                self.said.remove(&topic);
                tracing::warn!(
                    "cluster: volume {}: back after {}'s rescue of its copy (the SAN holds every entry up to seq {}): \
                     skipped past it, {failed} held write acknowledgement(s) failed (hosts retry them); writing the SAN again",
                    rec.id,
                    rec.rescuer,
                    rec.rescued_upto
                )
            }
            Ok(Err(_)) => {} // changed meanwhile: the next tick looks again
            Err(e) => self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", rec.id)),
        }
    }

    /// The record names no replica in sync that was not in sync at `v`'s copies generation:
    /// the write acknowledgements held since go out.
    fn confirm(&mut self, v: &VolumeStatus, in_sync: &[String]) {
        let Some(volumes) = &self.volumes else { return };
        match volumes.confirm_copies(v.id, v.copies_generation) {
            // Rare (a start, a lost in-sync replica): always worth a line.
            Ok(n) => tracing::info!(
                "cluster: volume {}: the record says replicas {in_sync:?} are in sync (copies generation {}); \
                 {n} held write acknowledgement(s) let out",
                v.id,
                v.copies_generation
            ),
            Err(e) => self.say(&format!("confirm-{}", v.id), format!("cluster: volume {}: {e}", v.id)),
        }
    }

    /// The resource manager's part: stand for election, and while elected review every record.
    fn manage(&mut self, c: &Cluster, records: &[(VolumeRecord, Revision)], nodes: &[NodeInfo]) {
        if !c.is_leader() {
            match c.campaign(Duration::from_millis(50)) {
                Ok(true) => tracing::info!("cluster: node {} is the resource manager", self.me),
                Ok(false) => return,
                Err(e) => {
                    self.say("campaign", format!("cluster: cannot stand for resource manager: {e}"));
                    return;
                }
            }
        }
        for (rec, rev) in records {
            match review(rec, nodes, unix_ms_now()) {
                Review::Keep => {
                    self.said.remove(&format!("lost-{}", rec.id));
                }
                Review::OwnerLost if !rec.rescuer.is_empty() && rec.rescued_unix_ms == 0 => self.say(
                    &format!("lost-{}", rec.id),
                    format!(
                        "cluster: volume {}: its owner {} is gone; {} destages its copy to the SAN",
                        rec.id, rec.owner, rec.rescuer
                    ),
                ),
                Review::OwnerLost if !rec.server.is_empty() => self.say(
                    &format!("lost-{}", rec.id),
                    format!(
                        "cluster: volume {}: its owner {} is gone; {} destaged its copy and serves the volume",
                        rec.id, rec.owner, rec.server
                    ),
                ),
                Review::OwnerLost if !rec.rescuer.is_empty() => self.say(
                    &format!("lost-{}", rec.id),
                    format!(
                        "cluster: volume {}: its owner {} is gone; {}'s copy is destaged: the SAN holds every write \
                         it acknowledged. Nobody serves the volume: {} has no standby namespace for it, or has not \
                         taken it yet (docs/operations.md)",
                        rec.id, rec.owner, rec.rescuer, rec.rescuer
                    ),
                ),
                Review::OwnerLost => {
                    let copies = if !rec.in_sync.is_empty() {
                        format!(
                            "the copy on {} is in sync (holds every acknowledged write not on the SAN) but no such node \
                             reaches the SAN now: it is destaged once one does",
                            rec.in_sync.join(" or ")
                        )
                    } else if rec.replicas.is_empty() {
                        "its dirty data is only on its owner's flash".to_string()
                    } else {
                        format!(
                            "no copy is recorded in sync (replicas {:?}): destaging one could put old data over newer",
                            rec.replicas
                        )
                    };
                    self.say(
                        &format!("lost-{}", rec.id),
                        format!(
                            "cluster: volume {}: its owner {} is gone; {copies} (docs/operations.md)",
                            rec.id, rec.owner
                        ),
                    )
                }
                // A rescue is started only while the owner is still gone in etcd, and moved only
                // while the rescuer is: a decision taken on a node list read before that node
                // registered again must not act against it.
                Review::Change { record, why } => match c.put_volume_as_leader_while_gone(
                    record.as_ref(),
                    Some(*rev),
                    match (rec.rescuer.as_str(), record.rescuer.as_str()) {
                        ("", new) if !new.is_empty() => Some(rec.owner.as_str()),
                        (old, new) if !old.is_empty() && !new.is_empty() && old != new => Some(old),
                        // A server is cleared only while it is still gone.
                        _ if !rec.server.is_empty() && record.server.is_empty() => Some(rec.server.as_str()),
                        _ => None,
                    },
                ) {
                    Ok(Ok(_)) => tracing::warn!("cluster: resource manager: volume {}: {why}", rec.id),
                    Ok(Err(_)) => {}
                    Err(e) => self.say("manage", format!("cluster: resource manager: volume {}: {e}", rec.id)),
                },
            }
        }
    }

    /// Publishes what this tick saw for `stagerctl cluster`.
    fn publish(&self, c: &Cluster, prefix: &str, nodes: Vec<NodeInfo>, records: Vec<(VolumeRecord, Revision)>) {
        let Some(shared) = &self.shared else { return };
        let manager = if c.is_leader() { Some(self.me.clone()) } else { c.leader().ok().flatten() };
        let lease = match c.lease_state() {
            LeaseState::Alive { .. } => "alive".to_string(),
            other => format!("{other:?}"),
        };
        let view = ClusterView {
            node: self.me.clone(),
            prefix: prefix.to_string(),
            lease,
            manager,
            nodes,
            volumes: records.into_iter().map(|(r, _)| r).collect(),
            at_unix_ms: unix_ms_now(),
        };
        if let Ok(mut v) = shared.cluster_view.lock() {
            *v = Some(view);
        }
    }

    /// The replica's part: a copy whose owner was lost is destaged when the record makes this
    /// node its rescuer; copies of volumes whose role moved on are let go once safe.
    fn copies(&mut self, tick: &Tick) {
        let Tick { c, status, records, nodes, until } = *tick;
        let Some(volumes) = self.volumes.clone() else { return };
        self.unserve_lost(c, status, records);
        for copy in status.devices.iter().flat_map(|d| d.copies.iter()) {
            let Some((rec, rev)) = records.iter().find(|(r, _)| r.id == copy.volume) else { continue };
            if rec.rescuer == self.me && rec.rescued_unix_ms == 0 {
                self.rescue(c, &volumes, copy, rec, *rev, until);
                continue;
            }
            if rec.rescuer == self.me && self.standbys.contains_key(&copy.volume) {
                self.serve(c, &volumes, copy, rec, *rev, nodes, until);
                continue;
            }
            if copy.serving {
                // The record no longer makes this node the server (the manager took it for
                // gone): its path is inaccessible already; the engine stops too.
                if let Err(e) = volumes.serve_copy(copy.volume, false, None) {
                    self.say(&format!("serve-{}", copy.volume), format!("cluster: volume {}: {e}", copy.volume));
                }
                continue;
            }
            if !copy.rescue.is_empty() && rec.rescuer != self.me {
                // The owner is back and the rescue is over, or it moved to another node (this
                // node was taken for gone before it was done: what it still held back goes).
                self.said.remove(&format!("rescue-{}", copy.volume));
                self.rescue_asked.remove(&copy.volume);
                match volumes.end_rescue(copy.volume, copy.rescue != "done") {
                    Ok(()) => tracing::info!(
                        "cluster: volume {}: the rescue of this node's copy is over (record epoch {})",
                        copy.volume,
                        rec.epoch
                    ),
                    Err(e) => self.say(
                        &format!("rescue-{}", copy.volume),
                        format!("cluster: volume {}: cannot end this copy's rescue: {e}", copy.volume),
                    ),
                }
                continue;
            }
            if copy.bytes == 0 || !copy.rescue.is_empty() || !may_discard_copy(rec, &self.me, nodes) {
                continue;
            }
            match volumes.discard_copy(copy.volume) {
                Ok(bytes) => tracing::info!(
                    "cluster: volume {}: this node is no longer its replica (now {:?}, epoch {}): its copy of {} let go",
                    copy.volume,
                    rec.replicas,
                    rec.epoch,
                    crate::volume::status::human_bytes(bytes)
                ),
                Err(e) => tracing::warn!("cluster: volume {}: cannot let its copy go: {e}", copy.volume),
            }
        }
    }

    /// This node is the rescuer of `copy`: start destaging it, keep its SAN open while the
    /// lease holds, and record when every entry is on the SAN.
    fn rescue(
        &mut self,
        c: &Cluster,
        volumes: &VolumeService,
        copy: &crate::volume::status::CopyStatus,
        rec: &VolumeRecord,
        rev: Revision,
        until: Instant,
    ) {
        let topic = format!("rescue-{}", copy.volume);
        if copy.rescue.is_empty() {
            // Asked again only after a while: opening the SAN may take a login's time, and a
            // failure is logged by the destage core or the engine.
            if self.rescue_asked.get(&copy.volume).is_some_and(|t| t.elapsed() < RESCUE_ASK_AGAIN) {
                return;
            }
            self.rescue_asked.insert(copy.volume, Instant::now());
            let msg = match volumes.rescue_copy(copy.volume, &rec.san, until) {
                Ok(()) => format!(
                    "cluster: volume {}: its owner {} is gone; destaging this node's copy ({}) to its SAN {}",
                    copy.volume,
                    rec.owner,
                    crate::volume::status::human_bytes(copy.bytes),
                    rec.san
                ),
                Err(e) => format!("cluster: volume {}: cannot destage this node's copy: {e}", copy.volume),
            };
            self.say(&topic, msg);
            return;
        }
        volumes.open_san_gate(copy.volume, Some(until));
        if copy.rescue != "done" {
            return;
        }
        let mut done = rec.clone();
        done.rescued_unix_ms = unix_ms_now().max(1);
        done.rescued_upto = copy.rescue_upto;
        done.push_transition(
            done.rescued_unix_ms,
            format!("{}'s copy is on the SAN: it holds every write the owner acknowledged", self.me),
        );
        match c.put_volume_if(&done, Some(rev)) {
            Ok(Ok(_)) => tracing::warn!(
                "cluster: volume {}: this node's copy is destaged: the SAN holds every write its owner {} acknowledged",
                copy.volume,
                rec.owner
            ),
            Ok(Err(_)) => {} // changed meanwhile: the next tick looks again
            Err(e) => self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", copy.volume)),
        }
    }

    /// Records that name this node the server of a volume it cannot serve (it restarted
    /// without the copy, or without a standby namespace for it): cleared, so that the owner is
    /// not kept waiting for a handback that never comes.
    fn unserve_lost(&mut self, c: &Cluster, status: &NodeStatus, records: &[(VolumeRecord, Revision)]) {
        let me = self.me.clone();
        for (rec, rev) in records.iter().filter(|(r, _)| r.server == me) {
            let copy = status.devices.iter().flat_map(|d| &d.copies).any(|c| c.volume == rec.id);
            if copy && self.standbys.contains_key(&rec.id) {
                continue;
            }
            let why = if copy { "it has no standby namespace for it any more" } else { "it no longer has the copy" };
            match c.put_volume_if(&stop_serving(rec, why, unix_ms_now()), Some(*rev)) {
                Ok(Ok(_)) => tracing::warn!("cluster: volume {}: no longer served from here: {why}", rec.id),
                Ok(Err(_)) => {}
                Err(e) => self.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", rec.id)),
            }
        }
    }

    /// This node rescued `copy` and has a standby namespace for it: serve the volume while the
    /// owner is gone (record first, then the engine; the path opens at the next tick, once
    /// status shows the copy served), and stop when the owner asks for it back (the path
    /// closed first, `steer_ana`; the record says so once no host command is left).
    #[allow(clippy::too_many_arguments)]
    fn serve(
        &mut self,
        c: &Cluster,
        volumes: &VolumeService,
        copy: &crate::volume::status::CopyStatus,
        rec: &VolumeRecord,
        rev: Revision,
        nodes: &[NodeInfo],
        until: Instant,
    ) {
        let topic = format!("serve-{}", copy.volume);
        let put = |this: &mut Agent, new: &VolumeRecord| match c.put_volume_if(new, Some(rev)) {
            Ok(Ok(_)) => true,
            Ok(Err(_)) => false, // changed meanwhile: the next tick looks again
            Err(e) => {
                this.say("etcd", format!("cluster: cannot update volume {}'s record: {e}", copy.volume));
                false
            }
        };
        if rec.server != self.me {
            if copy.serving {
                // The record no longer names this node (the manager took it for gone).
                if let Err(e) = volumes.serve_copy(copy.volume, false, None) {
                    self.say(&topic, format!("cluster: volume {}: {e}", copy.volume));
                }
                return;
            }
            if copy.rescue != "done" {
                return;
            }
            if let Some(new) = start_serving(rec, &self.me, nodes, unix_ms_now()) {
                if put(self, &new) {
                    tracing::warn!(
                        "cluster: volume {}: serving it in place of its owner {} (write-through to its SAN {}); \
                         its path here becomes optimized",
                        copy.volume,
                        rec.owner,
                        rec.san
                    );
                }
            }
            return;
        }
        if copy.rescue != "done" {
            // This node restarted since: its rescue (and the SAN it had open) is gone.
            let new = stop_serving(rec, "it restarted and no longer has the rescued copy open", unix_ms_now());
            if put(self, &new) {
                tracing::warn!("cluster: volume {}: no longer served from here (restarted)", copy.volume);
            }
            return;
        }
        if !rec.handback {
            volumes.open_san_gate(copy.volume, Some(until));
            if !copy.serving {
                if let Err(e) = volumes.serve_copy(copy.volume, true, self.standbys.get(&copy.volume).copied()) {
                    self.say(&topic, format!("cluster: volume {}: cannot serve it: {e}", copy.volume));
                }
            }
            return;
        }
        // Handing back: the path is inaccessible (steer_ana ran first); the engine takes no
        // more commands; once none is left, nothing more reaches the SAN from here.
        match volumes.serve_copy(copy.volume, false, None) {
            Ok(0) => {
                let new = stop_serving(rec, &format!("handed back to its owner {}", rec.owner), unix_ms_now());
                if put(self, &new) {
                    self.said.remove(&topic);
                    tracing::warn!(
                        "cluster: volume {}: handed back to its owner {}: no longer served from here",
                        copy.volume,
                        rec.owner
                    );
                }
            }
            Ok(n) => {
                // Commands taken before the path closed still finish (on the SAN, while the
                // lease holds).
                volumes.open_san_gate(copy.volume, Some(until));
                self.say(
                    &topic,
                    format!("cluster: volume {}: handing back, {n} host command(s) to finish", copy.volume),
                );
            }
            Err(e) => self.say(&topic, format!("cluster: volume {}: cannot stop serving it: {e}", copy.volume)),
        }
    }

    /// Sets each steered ANA group (`steered_ana_groups`) `optimized` while this node serves
    /// its volume and `inaccessible` otherwise. The owner serves while the record names it and
    /// no rescue; a standby while the record makes it the server, not handing back, and its
    /// engine serves the copy. An optimized path holds until the lease's local deadline
    /// (`until`), so it closes by itself if this thread stops hearing the cluster — except for
    /// a volume without copies, which no other node could take over.
    /// A group of this node's volume that the file does not steer is closed only while another
    /// node serves that volume (and said loudly: that node's standby shares the NQN).
    fn steer_ana(&mut self, records: &[(VolumeRecord, Revision)], status: &NodeStatus, until: Instant) {
        let Some(shared) = self.shared.clone() else { return };
        let set = |this: &mut Agent, nqn: &str, group: u32, volume: u32, state: AnaState, until: Option<Instant>| {
            let scope = AnaScope { subsystem: Some(nqn.to_string()), listener: None };
            match shared.set_ana_state_until(group, state, &scope, until) {
                Ok(ch) if !ch.changed.is_empty() => tracing::warn!(
                    "cluster: volume {volume}: ANA group {group} of {nqn} is now {} on this node ({} controller(s) notified)",
                    state.name(),
                    ch.controllers_notified
                ),
                Ok(_) => {}
                Err(e) => this.say(&format!("ana-{nqn}-{group}"), format!("cluster: cannot steer ANA group {group}: {e}")),
            }
        };
        let record = |volume: u32| records.iter().map(|(r, _)| r).find(|r| r.id == volume);
        for (nqn, group, volume) in self.steered.clone() {
            let (serves, deadline) = match record(volume) {
                Some(rec) if self.own_sans.contains_key(&volume) => {
                    let v = status.devices.iter().flat_map(|d| &d.volumes).find(|v| v.id == volume);
                    let copyless =
                        rec.replicas.is_empty() && rec.in_sync.is_empty() && v.is_some_and(|v| v.replicas.is_empty());
                    (rec.owner == self.me && rec.rescuer.is_empty() && v.is_some(), (!copyless).then_some(until))
                }
                Some(rec) => {
                    let serving =
                        status.devices.iter().flat_map(|d| &d.copies).any(|c| c.volume == volume && c.serving);
                    (rec.server == self.me && !rec.handback && serving, Some(until))
                }
                None => (false, None),
            };
            let state = if serves { AnaState::Optimized } else { AnaState::Inaccessible };
            set(self, &nqn, group, volume, state, deadline.filter(|_| serves));
        }
        for (nqn, group, volume) in self.unsteered.clone() {
            let Some(rec) = record(volume) else { continue };
            let key = (nqn.clone(), group);
            let elsewhere = !rec.server.is_empty() && rec.server != self.me;
            let closed = self.closed_unsteered.contains(&key);
            if elsewhere && !closed {
                tracing::error!(
                    "cluster: volume {volume}: {} serves it in this node's place, but subsystem {nqn} has no `ana_groups` here \
                     (its path would stay optimized): closing ANA group {group} until the volume is back; give the \
                     subsystem `ana_groups: [{{ id: {group}, state: inaccessible }}]` (docs/configuration.md)",
                    rec.server
                );
                set(self, &nqn, group, volume, AnaState::Inaccessible, None);
                self.closed_unsteered.push(key);
            } else if !elsewhere && closed && rec.owner == self.me && rec.rescuer.is_empty() {
                set(self, &nqn, group, volume, AnaState::Optimized, None);
                self.closed_unsteered.retain(|k| *k != key);
            }
        }
    }
}
