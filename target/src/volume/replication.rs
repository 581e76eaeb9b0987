//! Replication links, set up and kept up: the node's fabric ([`stager_rdma`]), a connector
//! per (replicated volume, replica) on the source, an acceptor for sources on the replica, and
//! the control messages they exchange on each link's authenticated set-up connection.
//!
//! Source side, per link: connect to the replica's fabric listener (both nodes prove they know
//! the cluster secret, and each only accepts the other's configured id), expose a small region
//! for the replica's acknowledgements, send `Open` (volume, size, epoch, ring size), receive
//! `Opened` (what the replica's copy holds, and the key of the ring it registered) or `Refused`,
//! then hand the endpoint to the engine host of the volume's flash device, which attaches the
//! link to the engine. When the link goes down the connector sets it up again, with back-off.
//!
//! Replica side, per incoming link: read `Open`, check it (not one of this node's own volumes,
//! a ring size in range, a flash device for copies), have the host open the copy (durable in
//! its superblock at the source's epoch or refused as stale), register and expose the ring,
//! answer `Opened`, hand the endpoint to the host. The source's name is the authenticated peer
//! id, never a field of the message.
//!
//! Control messages are JSON (small, rare, set-up only); a peer's are input like any other:
//! a malformed or unexpected one refuses that link with a log line and nothing else changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use stager_policy::replica::wire::{BLOCK_LEN, RING_OFFSET};
use stager_policy::{CopyState, Epoch, LinkId, LogSeq, VolumeId, RING_BYTES_MIN};
use stager_rdma::{Endpoint, Event, Fabric, FabricConfig, FabricKind, RemoteKey};
use tracing::{error, info, warn};

use super::host::{HostMsg, LinkHandoff};
use super::service::VolumeService;
use crate::config::{BackendConfig, Config, FabricKindYaml, NodeConfig};

/// How long a control message may take to arrive.
const CTL_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Incoming links being set up at once (each holds a thread for a few milliseconds).
const SETUPS_MAX: usize = 16;
/// A source may ask for a ring up to this many times this node's own `ring_size`.
const RING_GRANT_FACTOR: u64 = 4;

/// A control message on a link's set-up connection.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ctl {
    /// Source → replica: keep a copy of `volume` for me.
    Open { volume: u32, blocks: u64, epoch: u64, ring_bytes: u64, ack_key: String },
    /// Replica → source: the copy holds entries up to `durable`, has persisted your
    /// watermark `watermark`, and was last written at `epoch`; write records into `ring_key`.
    Opened { durable: u64, watermark: u64, epoch: u64, ring_key: String },
    /// Replica → source: no, and why.
    Refused { why: String },
}

impl Ctl {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a peer's message; never panics.
    pub fn decode(b: &[u8]) -> Result<Ctl, String> {
        serde_json::from_slice(b).map_err(|e| format!("malformed control message: {e}"))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if !s.len().is_multiple_of(2) || s.len() > 256 {
        return Err("bad key encoding".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2).unwrap_or("zz"), 16).map_err(|_| "bad key encoding".to_string()))
        .collect()
}

fn key_text(k: &RemoteKey) -> String {
    hex(&k.encode())
}

fn key_of(s: &str) -> Result<RemoteKey, String> {
    RemoteKey::decode(&unhex(s)?).map_err(|e| format!("bad region key: {e}"))
}

/// Waits for the next control message on a link still being set up.
fn next_msg(ep: &mut Endpoint, timeout: Duration) -> Result<Ctl, String> {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    loop {
        events.clear();
        ep.poll(&mut events);
        for e in events.drain(..) {
            match e {
                Event::Message(m) => return Ctl::decode(&m),
                Event::Failed(e) => return Err(format!("the connection failed: {e}")),
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no answer within {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One replicated volume's link to one replica, as the source keeps it up.
struct Wanted {
    volume: VolumeId,
    dev: u16,
    blocks: u64,
    peer: String,
    addr: SocketAddr,
}

pub struct Replication {
    shared: Arc<Shared>,
}

struct Shared {
    fabric: Fabric,
    volumes: Arc<VolumeService>,
    stop: Arc<AtomicBool>,
    next_link: AtomicU32,
    /// Connectors waiting for their link to go down.
    watching: Mutex<HashMap<LinkId, Sender<String>>>,
    ring_bytes: u64,
    /// The configured peers' fabric listeners (`node.peers`): the nodes links may go to.
    peers: HashMap<String, SocketAddr>,
    /// The running connectors, each with the flag that ends it (a replica set changed).
    connectors: Mutex<HashMap<(VolumeId, String), Arc<AtomicBool>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn spawn(&self, name: String, f: impl FnOnce() + Send + 'static) -> Result<(), String> {
        let t = std::thread::Builder::new().name(name).spawn(f).map_err(|e| format!("cannot start a thread: {e}"))?;
        if let Ok(mut threads) = self.threads.lock() {
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
        Ok(())
    }

    /// Starts the connector of (volume, replica) unless it runs.
    fn want(self: &Arc<Self>, w: Wanted) -> Result<(), String> {
        let key = (w.volume, w.peer.clone());
        let flag = Arc::new(AtomicBool::new(false));
        {
            let Ok(mut c) = self.connectors.lock() else { return Err("connector registry poisoned".into()) };
            if c.contains_key(&key) {
                return Ok(());
            }
            c.insert(key, flag.clone());
        }
        let s = self.clone();
        self.spawn(format!("stager-repl-{}-{}", w.volume.0, w.peer), move || connector(s, w, flag))
    }
}

impl Replication {
    /// Starts the fabric and the links of `config`'s replicated volumes. None when the node
    /// has no peers (nothing to replicate to or for).
    pub fn start(config: &Config, volumes: Option<&Arc<VolumeService>>) -> Result<Option<Replication>, String> {
        let Some(node) = config.node.as_ref().filter(|n| !n.peers.is_empty()) else { return Ok(None) };
        let Some(volumes) = volumes else {
            return Err("node has peers but no flash device to keep copies or volumes on".into());
        };
        let fabric = start_fabric(node)?;
        info!(
            "replication fabric {} listening on {} as node {:?} ({} peer(s))",
            match node.fabric.kind {
                FabricKindYaml::Tcp => "tcp",
                FabricKindYaml::Verbs => "verbs",
            },
            fabric.local_addr(),
            node.id,
            node.peers.len()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            fabric: fabric.clone(),
            volumes: volumes.clone(),
            stop: stop.clone(),
            next_link: AtomicU32::new(1),
            watching: Mutex::new(HashMap::new()),
            ring_bytes: node.fabric.ring_size,
            peers: node.peers.iter().map(|p| (p.id.clone(), p.address)).collect(),
            connectors: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        shared.spawn("stager-repl-accept".into(), move || accept_loop(s))?;
        if let Some(rx) = volumes.take_link_down() {
            let s = shared.clone();
            shared.spawn("stager-repl-down".into(), move || down_loop(s, rx))?;
        }
        for w in wanted_links(config, node, volumes) {
            shared.want(w)?;
        }
        Ok(Some(Replication { shared }))
    }

    /// The cluster changed `volume`'s replica set (see `Engine::set_replicas`): the engine
    /// takes the new set and `epoch`, links to nodes no longer named go, connectors to new
    /// ones start. Every named node must be one of `node.peers` (the nodes this one may set
    /// links up with). Returns the volume's epoch in force.
    pub fn set_replicas(
        &self,
        volume: VolumeId,
        replicas: &[String],
        copies: usize,
        epoch: Epoch,
    ) -> Result<Epoch, String> {
        let s = &self.shared;
        let info = s.volumes.volumes.iter().find(|v| v.id == volume).ok_or_else(|| format!("no {volume} here"))?;
        let mut wanted = Vec::new();
        for r in replicas {
            let addr = s.peers.get(r).ok_or_else(|| {
                format!("node {r:?} is not among this node's node.peers, so no link can be set up to it")
            })?;
            wanted.push(Wanted { volume, dev: info.dev, blocks: info.blocks, peer: r.clone(), addr: *addr });
        }
        // Connectors of nodes no longer named stop first, so none sets a link up again.
        if let Ok(mut c) = s.connectors.lock() {
            c.retain(|(v, peer), flag| {
                let keep = *v != volume || replicas.contains(peer);
                if !keep {
                    flag.store(true, Ordering::SeqCst);
                }
                keep
            });
        }
        let (dev, list) = (info.dev, replicas.to_vec());
        let epoch = ask(
            &s.volumes,
            dev,
            |reply| HostMsg::SetReplicas { volume, replicas: list, copies, epoch, reply },
            CTL_TIMEOUT,
        )
        .and_then(|r| r)?;
        for w in wanted {
            s.want(w)?;
        }
        Ok(epoch)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.fabric.local_addr()
    }

    /// Stops setting links up and closes the fabric (running links fail; their writes wait
    /// for destage instead).
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.fabric.stop();
        let threads: Vec<JoinHandle<()>> =
            self.shared.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn start_fabric(node: &NodeConfig) -> Result<Fabric, String> {
    let secret = node.fabric.secret_bytes().map_err(|e| format!("node.fabric: {e}"))?;
    let kind = match node.fabric.kind {
        FabricKindYaml::Tcp => FabricKind::Tcp,
        FabricKindYaml::Verbs => FabricKind::Verbs,
    };
    Fabric::start(FabricConfig {
        kind,
        node: node.id.clone(),
        listen: node.fabric.listen,
        secret,
        peers: node.peers.iter().map(|p| p.id.clone()).collect(),
        verbs_device: node.fabric.device.clone(),
        peer_timeout: Duration::from_millis(node.fabric.peer_timeout_ms),
        ..FabricConfig::default()
    })
    .map_err(|e| format!("replication fabric on {}: {e}", node.fabric.listen))
}

fn wanted_links(config: &Config, node: &NodeConfig, volumes: &VolumeService) -> Vec<Wanted> {
    let mut out = Vec::new();
    for s in &config.subsystems {
        for n in &s.namespaces {
            let BackendConfig::Volume { id, replicas, .. } = &n.backend else { continue };
            let Some(info) = volumes.volumes.iter().find(|v| v.id.0 == *id) else { continue };
            for r in replicas {
                let Some(p) = node.peers.iter().find(|p| &p.id == r) else { continue };
                out.push(Wanted {
                    volume: info.id,
                    dev: info.dev,
                    blocks: info.blocks,
                    peer: r.clone(),
                    addr: p.address,
                });
            }
        }
    }
    out
}

/// Sleeps `d` unless stopping; returns false when stopping.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    !stop.load(Ordering::SeqCst)
}

/// Asks a host something and waits for the answer.
fn ask<T>(
    volumes: &VolumeService,
    dev: u16,
    msg: impl FnOnce(Sender<T>) -> HostMsg,
    timeout: Duration,
) -> Result<T, String> {
    let d = volumes.device(dev).ok_or("no such flash device")?;
    let (tx, rx) = crossbeam_channel::bounded(1);
    if !d.send(msg(tx)) {
        return Err(format!("flash {}: its reactor is not running", d.name));
    }
    rx.recv_timeout(timeout).map_err(|_| format!("flash {}: no answer", d.name))
}

/// Keeps one (volume, replica) link up for as long as the node runs and the replica is wanted
/// (`done` ends it).
fn connector(s: Arc<Shared>, w: Wanted, done: Arc<AtomicBool>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    let stopping = || s.stop.load(Ordering::SeqCst) || done.load(Ordering::SeqCst);
    while !stopping() {
        match connect_once(&s, &w) {
            Ok((link, down)) => {
                info!("{}: replicating to node {} over {link}", w.volume, w.peer);
                last_error.clear();
                backoff = BACKOFF_MIN;
                // Wait for the link to go down (or the node to stop).
                loop {
                    match down.recv_timeout(Duration::from_millis(200)) {
                        Ok(why) => {
                            warn!("{}: link to node {} down ({why}); setting it up again", w.volume, w.peer);
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) if !stopping() => {}
                        Err(_) => break,
                    }
                }
                if let Ok(mut m) = s.watching.lock() {
                    m.remove(&link);
                }
            }
            Err(why) => {
                if why != last_error {
                    warn!(
                        "{}: cannot replicate to node {} at {}: {why} (writes go write-through until it can; retrying)",
                        w.volume, w.peer, w.addr
                    );
                    last_error = why;
                }
                if !nap(&s.stop, backoff) || done.load(Ordering::SeqCst) {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

fn connect_once(s: &Shared, w: &Wanted) -> Result<(LinkId, Receiver<String>), String> {
    let mut ep = s.fabric.connect(w.addr, &w.peer, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
    let ack = Arc::new(s.fabric.alloc_region(4096).map_err(|e| e.to_string())?);
    let ack_key = ep.expose(ack.clone()).map_err(|e| e.to_string())?;
    let epoch = ask(&s.volumes, w.dev, |reply| HostMsg::Epoch { volume: w.volume, reply }, CTL_TIMEOUT)?
        .ok_or("the volume is not on its flash device")?;
    let open = Ctl::Open {
        volume: w.volume.0,
        blocks: w.blocks,
        epoch: epoch.0,
        ring_bytes: s.ring_bytes,
        ack_key: key_text(&ack_key),
    };
    ep.send_msg(&open.encode()).map_err(|e| e.to_string())?;
    let (copy, ring_key) = match next_msg(&mut ep, CTL_TIMEOUT)? {
        Ctl::Opened { durable, watermark, epoch, ring_key } => (
            CopyState { durable: LogSeq(durable), watermark: LogSeq(watermark), epoch: Epoch(epoch) },
            key_of(&ring_key)?,
        ),
        Ctl::Refused { why } => return Err(format!("refused: {why}")),
        other => return Err(format!("unexpected answer {other:?}")),
    };
    if ring_key.len() < RING_OFFSET + s.ring_bytes {
        return Err(format!("the replica registered a ring of {} bytes, smaller than asked", ring_key.len()));
    }
    let link = LinkId(s.next_link.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = crossbeam_channel::bounded(1);
    if let Ok(mut m) = s.watching.lock() {
        m.insert(link, tx);
    }
    let handoff = LinkHandoff {
        link,
        volume: w.volume,
        peer: w.peer.clone(),
        ring_bytes: s.ring_bytes,
        ep,
        local: ack,
        remote: ring_key,
    };
    let r = ask(&s.volumes, w.dev, |reply| HostMsg::AttachReplica { link: handoff, copy, reply }, CTL_TIMEOUT)
        .and_then(|r| r);
    match r {
        Ok(_) => Ok((link, rx)),
        Err(e) => {
            if let Ok(mut m) = s.watching.lock() {
                m.remove(&link);
            }
            Err(e)
        }
    }
}

/// Routes the hosts' "link down" reports to the connectors that wait for them.
fn down_loop(s: Arc<Shared>, rx: Receiver<(LinkId, String)>) {
    while !s.stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok((link, why)) => {
                let tx = s.watching.lock().ok().and_then(|m| m.get(&link).cloned());
                if let Some(tx) = tx {
                    let _ = tx.try_send(why);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(_) => return,
        }
    }
}

/// Takes links sources set up to this node.
fn accept_loop(s: Arc<Shared>) {
    let busy = Arc::new(AtomicU32::new(0));
    while !s.stop.load(Ordering::SeqCst) {
        let ep = match s.fabric.incoming().recv_timeout(Duration::from_millis(200)) {
            Ok(ep) => ep,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(_) => return,
        };
        if busy.load(Ordering::SeqCst) as usize >= SETUPS_MAX {
            warn!(peer = ep.peer(), "too many links being set up at once; refusing one");
            continue;
        }
        busy.fetch_add(1, Ordering::SeqCst);
        let (s2, b2) = (s.clone(), busy.clone());
        let spawned = std::thread::Builder::new().name("stager-repl-setup".into()).spawn(move || {
            let peer = ep.peer().to_string();
            if let Err(why) = accept_one(&s2, ep) {
                warn!(peer, "refused a replication link: {why}");
            }
            b2.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            busy.fetch_sub(1, Ordering::SeqCst);
            error!("cannot start a thread to set up a replication link");
        }
    }
}

fn accept_one(s: &Shared, mut ep: Endpoint) -> Result<(), String> {
    let source = ep.peer().to_string();
    let refuse = |ep: &mut Endpoint, why: String| {
        let _ = ep.send_msg(&Ctl::Refused { why: why.clone() }.encode());
        // Give the message a moment to leave before the endpoint is dropped.
        let mut events = Vec::new();
        for _ in 0..20 {
            ep.poll(&mut events);
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(why)
    };
    let (volume, blocks, epoch, ring_bytes, ack_key) = match next_msg(&mut ep, CTL_TIMEOUT)? {
        Ctl::Open { volume, blocks, epoch, ring_bytes, ack_key } => {
            (VolumeId(volume), blocks, Epoch(epoch), ring_bytes, ack_key)
        }
        other => return refuse(&mut ep, format!("expected `open`, got {other:?}")),
    };
    let ack_key = match key_of(&ack_key) {
        Ok(k) if k.len() >= BLOCK_LEN as u64 => k,
        Ok(_) => return refuse(&mut ep, "its acknowledgement region is too small".into()),
        Err(e) => return refuse(&mut ep, e),
    };
    let Some(dev) = s.volumes.replica_dev else {
        return refuse(&mut ep, "this node has no flash device for copies".into());
    };
    if s.volumes.volumes.iter().any(|v| v.id == volume) {
        return refuse(&mut ep, format!("{volume} is one of this node's own volumes"));
    }
    let ring_max = s.ring_bytes * RING_GRANT_FACTOR;
    if ring_bytes < RING_BYTES_MIN || ring_bytes > ring_max || !ring_bytes.is_multiple_of(4096) {
        return refuse(&mut ep, format!("a ring of {ring_bytes} bytes is out of range {RING_BYTES_MIN}..={ring_max}"));
    }
    if blocks == 0 {
        return refuse(&mut ep, "a volume of 0 blocks".into());
    }
    let copy = match ask(
        &s.volumes,
        dev,
        |reply| HostMsg::OpenCopy { volume, blocks, source: source.clone(), epoch, reply },
        CTL_TIMEOUT,
    )
    .and_then(|r| r)
    {
        Ok(c) => c,
        Err(why) => return refuse(&mut ep, why),
    };
    let region = match s.fabric.alloc_region((RING_OFFSET + ring_bytes) as usize) {
        Ok(r) => Arc::new(r),
        Err(e) => return refuse(&mut ep, format!("cannot register a ring: {e}")),
    };
    let ring_key = match ep.expose(region.clone()) {
        Ok(k) => k,
        Err(e) => return refuse(&mut ep, format!("cannot expose the ring: {e}")),
    };
    let opened = Ctl::Opened {
        durable: copy.durable.0,
        watermark: copy.watermark.0,
        epoch: copy.epoch.0,
        ring_key: key_text(&ring_key),
    };
    ep.send_msg(&opened.encode()).map_err(|e| e.to_string())?;
    let link = LinkId(s.next_link.fetch_add(1, Ordering::Relaxed));
    let handoff = LinkHandoff { link, volume, peer: source.clone(), ring_bytes, ep, local: region, remote: ack_key };
    ask(&s.volumes, dev, |reply| HostMsg::AttachInbound { link: handoff, reply }, CTL_TIMEOUT).and_then(|r| r)?;
    info!(
        "{volume}: node {source} replicates to this node ({} ring, copy holds up to seq {})",
        super::status::human_bytes(ring_bytes),
        copy.durable.0
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_garbage_is_an_error() {
        let m = Ctl::Open { volume: 3, blocks: 10, epoch: 4, ring_bytes: 1 << 22, ack_key: "00ff".into() };
        match Ctl::decode(&m.encode()) {
            Ok(Ctl::Open { volume: 3, blocks: 10, epoch: 4, .. }) => {}
            other => panic!("{other:?}"),
        }
        for bad in [&b""[..], b"{", b"{\"msg\":\"open\"}", b"\xff\xfe", b"{\"msg\":\"opened\",\"x\":1}"] {
            assert!(Ctl::decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(unhex(&hex(&[1, 2, 255])).unwrap(), vec![1, 2, 255]);
        assert!(unhex("abc").is_err() && unhex("zz").is_err() && unhex("é1").is_err());
    }
}
