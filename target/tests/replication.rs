//! Write-back+1 and +2 between in-process stagerd nodes on 127.0.0.1, over the tcp fabric:
//! every acknowledged write is in each replica's log (inspected on the replica's flash, and
//! destaged from there alone), a stale source is refused, published watermarks are applied
//! lazily on the replica, a replica that stops answering holds back only its own volume, and a
//! replica whose copy was damaged on its flash says so until its source has resynced it.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use stager_nvme::bdev::DeviceSpec;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, QueuePair};
use stager_policy::{Epoch, VolumeId, WritePolicy};
use stager_target::config::{
    BackendConfig, Config, DeviceKind, FabricKindYaml, FabricYaml, FlashConfig, NamespaceConfig, NodeConfig,
    PeerConfig, SanConfig,
};
use stager_target::volume::offline;
use stager_target::volume::status::NodeStatus;
use stager_target::Target;

const BS: usize = 4096;
const VOLUME_BYTES: u64 = 16 << 20;
const SECRET: &str = "a cluster secret for the tests";

/// A test's folder, removed when the test passes (kept for a look when it fails).
struct Dir(PathBuf);

impl std::ops::Deref for Dir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("stager-repl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn flash(path: PathBuf) -> FlashConfig {
    FlashConfig {
        name: "f0".into(),
        kind: DeviceKind::File,
        path,
        pci: None,
        size: Some(48 << 20),
        cache_percent: 10,
        direct: true,
    }
}

fn node(id: &str, peers: &[(&str, std::net::SocketAddr)]) -> NodeConfig {
    NodeConfig {
        id: id.into(),
        fault_domain: Some(format!("rack-{id}")),
        fabric: FabricYaml {
            kind: FabricKindYaml::Tcp,
            listen: "127.0.0.1:0".parse().unwrap(),
            device: None,
            secret: Some(SECRET.into()),
            secret_file: None,
            peer_timeout_ms: 2000,
            ring_size: 8 << 20,
        },
        peers: peers.iter().map(|(p, a)| PeerConfig { id: p.to_string(), address: *a, fault_domain: None }).collect(),
        replica_flash: None,
        san_initiator: None,
    }
}

/// A replica node: a flash device for copies, no volumes of its own.
fn replica_config(d: &Path, id: &str, sources: &[&str]) -> Config {
    let mut c = config();
    c.subsystems[0].namespaces.truncate(1);
    c.flash = vec![flash(d.join(format!("{id}-flash.img")))];
    // It never connects to its sources: their addresses only need to be well formed.
    let peers: Vec<(&str, std::net::SocketAddr)> =
        sources.iter().enumerate().map(|(i, s)| (*s, format!("127.0.0.1:{}", 9 + i).parse().unwrap())).collect();
    c.node = Some(node(id, &peers));
    c
}

/// A source node with write-back volumes: (volume id, nsid, replicas) each over its own SAN file.
fn source_config(
    d: &Path,
    id: &str,
    flash_file: &str,
    volumes: &[(u32, u32, Vec<&str>)],
    peers: &[(&str, std::net::SocketAddr)],
) -> Config {
    let mut c = config();
    c.flash = vec![flash(d.join(flash_file))];
    c.subsystems[0].namespaces = volumes
        .iter()
        .map(|(vid, nsid, replicas)| NamespaceConfig {
            nsid: *nsid,
            backend: BackendConfig::Volume {
                id: *vid,
                flash: "f0".into(),
                policy: WritePolicy::WriteBack,
                read_cache: true,
                san: SanConfig::File {
                    path: d.join(format!("san{vid}.img")),
                    size_bytes: Some(VOLUME_BYTES),
                    direct: true,
                },
                size_bytes: None,
                replicas: replicas.iter().map(|r| r.to_string()).collect(),
            },
            uuid: None,
        })
        .collect();
    c.node = Some(node(id, peers));
    c
}

fn status(t: &Target) -> NodeStatus {
    t.volumes().expect("volumes").status().expect("status")
}

/// Waits until `volume` runs write-back with every replica in sync.
fn wait_in_sync(t: &Target, volume: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(t);
        let v = s.devices.iter().flat_map(|d| &d.volumes).find(|v| v.id == volume).expect("volume");
        if v.effective_policy == "write-back" && v.replicas.iter().all(|r| r.state == "in-sync") {
            return;
        }
        assert!(Instant::now() < deadline, "volume {volume} never got its replicas in sync: {v:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn write(q: &mut QueuePair, nsid: u32, slba: u64, data: &[u8]) {
    let nlb = (data.len() / BS) as u32;
    let r = q.execute(io_cmd::write(nsid, slba, nlb), data.to_vec(), DataDirection::HostToController).unwrap();
    assert!(r.status().is_success(), "write {slba}: {}", r.status());
}

fn read(q: &mut QueuePair, nsid: u32, slba: u64, len: usize) -> Vec<u8> {
    let r =
        q.execute(io_cmd::read(nsid, slba, (len / BS) as u32), vec![0; len], DataDirection::ControllerToHost).unwrap();
    assert!(r.status().is_success(), "read {slba}: {}", r.status());
    r.data
}

fn file_spec(path: PathBuf) -> DeviceSpec {
    DeviceSpec::File { path, size_bytes: None, block_size: BS as u32, direct: true }
}

#[test]
fn write_back_plus_one_keeps_every_acknowledged_write_in_the_replicas_log() {
    let d = dir("plus1");
    let b = TestTarget::start(replica_config(&d, "node-b", &["node-a"]));
    let b_addr = b.target.as_ref().unwrap().fabric_addr().expect("node-b has a fabric");
    let a_cfg = source_config(&d, "node-a", "a-flash.img", &[(7, 1, vec!["node-b"])], &[("node-b", b_addr)]);
    let a = TestTarget::start(a_cfg.clone());
    wait_in_sync(a.target.as_ref().unwrap(), 7);

    let mut c = a.connect(&opts());
    let q = c.io_queue(0);
    let mut newest: Vec<Option<Vec<u8>>> = vec![None; (VOLUME_BYTES / BS as u64) as usize];
    for i in 0..400u64 {
        let slba = (i * 37) % 3000;
        let data = pattern(i, BS * (1 + (i % 3) as usize));
        write(q, 1, slba, &data);
        for (k, blk) in data.chunks(BS).enumerate() {
            newest[slba as usize + k] = Some(blk.to_vec());
        }
    }
    for slba in [0u64, 37, 74, 2997] {
        let got = read(q, 1, slba, BS);
        assert_eq!(Some(&got), newest[slba as usize].as_ref(), "read-back of block {slba}");
    }
    // The source says the replica has every write durable; the replica says it keeps a copy.
    let sa = status(a.target.as_ref().unwrap());
    let va = sa.devices[0].volumes.iter().find(|v| v.id == 7).unwrap();
    assert_eq!(va.requested_policy, "write-back+1");
    assert!(va.replicas[0].durable_seq >= 400, "replica durable only to {}", va.replicas[0].durable_seq);
    let sb = status(b.target.as_ref().unwrap());
    let copy = sb.devices[0].copies.iter().find(|c| c.volume == 7).expect("node-b keeps a copy of volume 7");
    assert_eq!(copy.source, "node-a");
    assert!(copy.durable_seq >= 400);
    drop(c);
    drop(a);
    drop(b);

    // On node-b's flash, read without a daemon: the copy is there, with data.
    let inspected = offline::inspect(&file_spec(d.join("node-b-flash.img"))).expect("inspect the replica's flash");
    let cv = inspected.device.copies.iter().find(|c| c.volume == 7).expect("inspect lists the copy");
    assert_eq!(cv.source, "node-a");
    // Destage the copy alone into a fresh SAN file: every block it puts there is the newest
    // acknowledged data (the rest was destaged by node-a before the watermark it published).
    let fresh = d.join("fresh-san.img");
    std::fs::write(&fresh, vec![0u8; VOLUME_BYTES as usize]).unwrap();
    let mut to_fresh = a_cfg.clone();
    if let BackendConfig::Volume { san, .. } = &mut to_fresh.subsystems[0].namespaces[0].backend {
        *san = SanConfig::File { path: fresh.clone(), size_bytes: None, direct: true };
    }
    offline::destage(&file_spec(d.join("node-b-flash.img")), &to_fresh, |_| {}).expect("destage the copy");
    let san = std::fs::read(&fresh).unwrap();
    let mut from_copy = 0;
    for (blk, want) in newest.iter().enumerate() {
        let got = &san[blk * BS..(blk + 1) * BS];
        if got.iter().all(|&x| x == 0) {
            continue;
        }
        from_copy += 1;
        assert_eq!(Some(got), want.as_deref(), "block {blk} from the copy is not the newest acknowledged data");
    }
    eprintln!("copy held {} bytes; {from_copy} blocks destaged from it", cv.bytes);
    // Destaging is lazy on the source: most of the 400 writes were still in the copy.
    assert!(from_copy > 0 || cv.bytes == 0, "the copy held {} bytes but destaged no block", cv.bytes);
}

#[test]
fn write_back_plus_two_waits_for_both_replicas_and_a_stale_source_is_refused() {
    let d = dir("plus2");
    let b = TestTarget::start(replica_config(&d, "node-b", &["node-a"]));
    let c = TestTarget::start(replica_config(&d, "node-c", &["node-a"]));
    let b_addr = b.target.as_ref().unwrap().fabric_addr().unwrap();
    let c_addr = c.target.as_ref().unwrap().fabric_addr().unwrap();
    let peers = [("node-b", b_addr), ("node-c", c_addr)];
    let a_cfg = source_config(&d, "node-a", "a-flash.img", &[(9, 1, vec!["node-b", "node-c"])], &peers);
    for run in 0..2 {
        let a = TestTarget::start(a_cfg.clone());
        wait_in_sync(a.target.as_ref().unwrap(), 9);
        let mut host = a.connect(&opts());
        let q = host.io_queue(0);
        for i in 0..100u64 {
            write(q, 1, i * 8, &pattern(run * 1000 + i, BS));
        }
        let s = status(a.target.as_ref().unwrap());
        let v = &s.devices[0].volumes[0];
        assert_eq!(v.requested_policy, "write-back+2");
        assert_eq!(v.replicas.len(), 2);
        for r in &v.replicas {
            assert_eq!(r.state, "in-sync", "{r:?}");
            assert!(r.durable_seq >= 100 * (run + 1), "{} durable only to {}", r.node, r.durable_seq);
        }
        for t in [&b, &c] {
            let copy = &status(t.target.as_ref().unwrap()).devices[0].copies;
            assert!(copy.iter().any(|c| c.volume == 9 && c.durable_seq >= 100), "{copy:?}");
        }
    }
    // The same node id and volume on a fresh flash device: its epoch (that of a first start)
    // is older than the one the replicas saw from the real node-a's second start.
    let stale_cfg = source_config(&d, "node-a", "stale-flash.img", &[(9, 1, vec!["node-b", "node-c"])], &peers);
    let stale = TestTarget::start(stale_cfg);
    std::thread::sleep(Duration::from_secs(2));
    let s = status(stale.target.as_ref().unwrap());
    let v = &s.devices[0].volumes[0];
    assert_eq!(v.effective_policy, "write-through", "a stale source must not run write-back: {v:?}");
    assert_eq!(v.reason, "replica-unavailable");
    assert!(v.replicas.iter().all(|r| r.state == "down"), "{:?}", v.replicas);
    // It still serves writes (through to the SAN), and the replicas' copies were not touched.
    let mut host = stale.connect(&opts());
    write(host.io_queue(0), 1, 3000, &pattern(7, BS));
    for t in [&b, &c] {
        let copy = &status(t.target.as_ref().unwrap()).devices[0].copies;
        assert!(copy.iter().any(|c| c.volume == 9 && c.durable_seq >= 200), "{copy:?}");
    }
}

#[test]
fn a_replica_discards_its_copy_lazily_once_the_source_publishes_its_watermark() {
    let d = dir("lazy");
    let b = TestTarget::start(replica_config(&d, "node-b", &["node-a"]));
    let b_addr = b.target.as_ref().unwrap().fabric_addr().unwrap();
    let a =
        TestTarget::start(source_config(&d, "node-a", "a-flash.img", &[(4, 1, vec!["node-b"])], &[("node-b", b_addr)]));
    let at = a.target.as_ref().unwrap();
    wait_in_sync(at, 4);
    let mut host = a.connect(&opts());
    for i in 0..300u64 {
        write(host.io_queue(0), 1, (i * 3) % 2000, &pattern(i, 2 * BS));
    }
    let copy_bytes = |t: &TestTarget| status(t.target.as_ref().unwrap()).devices[0].copies[0].bytes;
    assert!(copy_bytes(&b) > 0, "the replica holds the entries right after the writes");
    // The source destages (a fast SAN file) and publishes its watermark; the replica applies
    // it once its source has been quiet for a while, then frees its log with one superblock.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sa = status(at);
        let va = &sa.devices[0].volumes[0];
        let sb = status(b.target.as_ref().unwrap());
        let c = &sb.devices[0].copies[0];
        // The replica's acknowledgement of the watermark reaches the source a moment after the
        // copy is let go: wait for both (checking them at one instant was a race).
        if va.dirty_bytes == 0 && c.bytes == 0 && va.replicas[0].watermark == va.persisted_watermark {
            assert_eq!(c.watermark, va.persisted_watermark, "the copy's watermark is the source's");
            assert_eq!(sb.devices[0].log_used_bytes, 0, "the replica's log is free again");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the copy was never discarded, or the source never learned it: source {va:?}, copy {c:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A stagerd process, killed when dropped.
/// Flips one byte of a data block in the second-to-last data frame of a flash file's log (later
/// frames prove the damaged one was acknowledged). Returns the block's offset.
fn flip_late_data_block(path: &Path) -> u64 {
    const LOG_START: usize = 8192;
    let mut img = std::fs::read(path).unwrap();
    let mut data_frames = Vec::new();
    let mut at = LOG_START;
    while at + BS <= img.len() {
        let b = &img[at..at + BS];
        if &b[..4] == b"STLF" && u32::from_le_bytes([b[12], b[13], b[14], b[15]]) > 0 {
            data_frames.push(at);
        }
        at += BS;
    }
    assert!(data_frames.len() >= 2, "the log holds {} data frames", data_frames.len());
    let frame = data_frames[data_frames.len() - 2];
    img[frame + BS + 100] ^= 0xff;
    std::fs::write(path, img).unwrap();
    (frame + BS) as u64
}

#[test]
fn a_damaged_copy_says_so_until_its_source_has_resynced_it() {
    let d = dir("damaged-copy");
    let b_cfg = replica_config(&d, "node-b", &["node-a"]);
    let written: Vec<Vec<u8>> = {
        let b = TestTarget::start(b_cfg.clone());
        let b_addr = b.target.as_ref().unwrap().fabric_addr().unwrap();
        let a = TestTarget::start(source_config(
            &d,
            "node-a",
            "a-flash.img",
            &[(5, 1, vec!["node-b"])],
            &[("node-b", b_addr)],
        ));
        wait_in_sync(a.target.as_ref().unwrap(), 5);
        let mut host = a.connect(&opts());
        let data: Vec<Vec<u8>> = (0..60u64).map(|i| pattern(500 + i, 2 * BS)).collect();
        for (i, p) in data.iter().enumerate() {
            write(host.io_queue(0), 1, i as u64 * 2, p);
        }
        // Both stop at once: the replica has not applied a watermark over these entries yet.
        drop(host);
        drop(b);
        drop(a);
        data
    };
    let flipped = flip_late_data_block(&d.join("node-b-flash.img"));
    eprintln!("flipped a byte of the replica's log block at {flipped}");
    let inspected = offline::inspect(&file_spec(d.join("node-b-flash.img"))).expect("inspect the replica's flash");
    let replay = inspected.device.replay.as_ref().expect("a replay report");
    assert!(replay.lost_entries >= 1, "{replay:?}");
    assert!(inspected.device.copies.iter().any(|c| c.volume == 5 && c.damaged), "{:?}", inspected.device.copies);

    // The replica restarts and says its copy is damaged; its source comes back, resyncs it,
    // destages, and once the watermark it publishes covers the lost entry the copy is whole.
    let b = TestTarget::start(b_cfg);
    let bt = b.target.as_ref().unwrap();
    let copy = |t: &Target| status(t).devices[0].copies.iter().find(|c| c.volume == 5).cloned().expect("the copy");
    assert!(copy(bt).damaged, "the restarted replica does not report its damaged copy");
    let b_addr = bt.fabric_addr().unwrap();
    let a =
        TestTarget::start(source_config(&d, "node-a", "a-flash.img", &[(5, 1, vec!["node-b"])], &[("node-b", b_addr)]));
    wait_in_sync(a.target.as_ref().unwrap(), 5);
    let deadline = Instant::now() + Duration::from_secs(30);
    while copy(bt).damaged {
        assert!(Instant::now() < deadline, "the copy is still damaged after its source resynced: {:?}", copy(bt));
        std::thread::sleep(Duration::from_millis(50));
    }
    // Nothing was lost on the source's side: every write reads back.
    let mut host = a.connect(&opts());
    for (i, p) in written.iter().enumerate() {
        assert_eq!(&read(host.io_queue(0), 1, i as u64 * 2, 2 * BS), p, "write {i} after the resync");
    }
}

struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_node(d: &Path, name: &str, yaml: String) -> Node {
    Node(spawn_stagerd(d, name, &yaml))
}

fn node_status(sock: &Path) -> Option<NodeStatus> {
    let r = stager_target::management::call(sock, &stager_target::management::Request::Status).ok()?;
    r.status
}

#[test]
fn a_replica_that_stops_answering_holds_back_only_its_own_volume() {
    let d = dir("slow");
    let secret = SECRET;
    let (fa, fb, fc) = (free_port(), free_port(), free_port());
    let nvme = free_port();
    let replica = |id: &str, port: u16| {
        format!(
            "reactors: {{ cores: [0] }}\nlisteners: [{{ name: t, address: \"127.0.0.1:{}\" }}]\n\
             management: {{ socket: {dir}/{id}.sock }}\n\
             node: {{ id: {id}, fabric: {{ listen: \"127.0.0.1:{port}\", secret: \"{secret}\", peer_timeout_ms: 1500, ring_size: 8MiB }},\n\
               peers: [{{ id: node-a, address: \"127.0.0.1:{fa}\" }}] }}\n\
             flash: [{{ name: f0, path: {dir}/{id}.img, size: 48MiB }}]\n",
            free_port(),
            dir = d.display()
        )
    };
    let _b = spawn_node(&d, "node-b", replica("node-b", fb));
    let c = spawn_node(&d, "node-c", replica("node-c", fc));
    let volume = |id: u32, r: &str| {
        format!(
            "      - nsid: {id}\n        backend: {{ kind: volume, id: {id}, flash: f0, policy: write-back+1, replicas: [{r}],\n\
                       san: {{ kind: file, path: {dir}/san{id}.img, size: 16MiB }} }}\n",
            dir = d.display()
        )
    };
    let a_yaml = format!(
        "reactors: {{ cores: [1] }}\nlisteners: [{{ name: t, address: \"127.0.0.1:{nvme}\" }}]\n\
         management: {{ socket: {dir}/node-a.sock }}\n\
         node: {{ id: node-a, fabric: {{ listen: \"127.0.0.1:{fa}\", secret: \"{secret}\", peer_timeout_ms: 1500, ring_size: 8MiB }},\n\
           peers: [{{ id: node-b, address: \"127.0.0.1:{fb}\" }}, {{ id: node-c, address: \"127.0.0.1:{fc}\" }}] }}\n\
         flash: [{{ name: f0, path: {dir}/node-a.img, size: 48MiB }}]\n\
         subsystems:\n  - nqn: {NQN}\n    allow_any_host: true\n    namespaces:\n{}{}",
        volume(1, "node-b"),
        volume(2, "node-c"),
        dir = d.display()
    );
    let _a = spawn_node(&d, "node-a", a_yaml);
    let sock = d.join("node-a.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let in_sync = node_status(&sock).is_some_and(|s| {
            let v: Vec<_> = s.devices.iter().flat_map(|d| &d.volumes).collect();
            v.len() == 2 && v.iter().all(|v| v.effective_policy == "write-back")
        });
        if in_sync {
            break;
        }
        assert!(Instant::now() < deadline, "the volumes never got in sync: {:?}", node_status(&sock));
        std::thread::sleep(Duration::from_millis(50));
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{nvme}").parse().unwrap();
    let connect = || stager_nvme::host::Controller::connect(addr, NQN, &opts()).expect("host connects");
    // node-c stops answering (as a hung process or a dead link would): volume 2's writes wait
    // for it; volume 1's must not.
    let pid = c.0.id() as i32;
    // SAFETY: kill(2) with a child's pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let done2 = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done2.clone();
    let mut h2 = connect();
    let waiter = std::thread::spawn(move || {
        let start = Instant::now();
        write(h2.io_queue(0), 2, 0, &pattern(2, BS));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
        start.elapsed()
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut h1 = connect();
    let start = Instant::now();
    for i in 0..50u64 {
        write(h1.io_queue(0), 1, i, &pattern(100 + i, BS));
    }
    let took1 = start.elapsed();
    assert!(
        !done2.load(std::sync::atomic::Ordering::SeqCst),
        "volume 2's write finished while its replica was stopped (volume 1's 50 writes took {took1:?})"
    );
    // Once the link to node-c times out, volume 2 goes write-through and its waiting write is
    // acknowledged after it is destaged: held back, never lost, never failed.
    let took2 = waiter.join().expect("volume 2's write");
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(took2 > took1, "volume 2 waited ({took2:?}) longer than volume 1's 50 writes ({took1:?})");
    let mut h1 = connect();
    assert_eq!(read(h1.io_queue(0), 2, 0, BS), pattern(2, BS), "volume 2's held-back write landed");
}

#[test]
fn a_replica_set_changes_live_and_the_old_replica_lets_its_copy_go() {
    let d = dir("reset");
    let b = TestTarget::start(replica_config(&d, "node-b", &["node-a"]));
    let c = TestTarget::start(replica_config(&d, "node-c", &["node-a"]));
    let b_addr = b.target.as_ref().unwrap().fabric_addr().expect("node-b has a fabric");
    let c_addr = c.target.as_ref().unwrap().fabric_addr().expect("node-c has a fabric");
    let a_cfg = source_config(
        &d,
        "node-a",
        "a-flash.img",
        &[(7, 1, vec!["node-b"])],
        &[("node-b", b_addr), ("node-c", c_addr)],
    );
    let a = TestTarget::start(a_cfg);
    let ta = a.target.as_ref().unwrap();
    wait_in_sync(ta, 7);
    let mut conn = a.connect(&opts());
    let q = conn.io_queue(0);
    for i in 0..200u64 {
        write(q, 1, i * 3, &pattern(i, BS));
    }
    let durable = status(ta).devices[0].volumes[0].replicas[0].durable_seq;
    assert!(durable >= 200, "node-b durable to {durable}");

    // The cluster moves the copy to node-c under a newer epoch: node-b's link goes, node-c's
    // comes up and syncs, and the volume is write-back+1 again with node-c.
    let repl = ta.replication().expect("node-a replicates");
    let epoch = repl.set_replicas(VolumeId(7), &["node-c".to_string()], 1, Epoch(40)).expect("set replicas");
    assert!(epoch >= Epoch(40), "the volume's epoch follows the record's: {epoch:?}");
    wait_in_sync(ta, 7);
    let v = status(ta).devices[0].volumes.iter().find(|v| v.id == 7).cloned().unwrap();
    assert_eq!(v.replicas.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(), ["node-c"]);
    assert_eq!(v.requested_policy, "write-back+1");
    for i in 200..300u64 {
        write(q, 1, i * 3, &pattern(i, BS));
    }
    for i in [0u64, 199, 250, 299] {
        assert_eq!(read(q, 1, i * 3, BS), pattern(i, BS), "block of write {i}");
    }
    let copy_c = status(c.target.as_ref().unwrap()).devices[0].copies.iter().find(|c| c.volume == 7).cloned();
    assert!(copy_c.is_some_and(|c| c.durable_seq >= 300), "node-c holds the new writes");

    // Naming fewer replicas than the policy's copies runs the volume write-through.
    repl.set_replicas(VolumeId(7), &[], 1, Epoch(41)).expect("no replica");
    let v = status(ta).devices[0].volumes.iter().find(|v| v.id == 7).cloned().unwrap();
    assert_eq!((v.effective_policy.as_str(), v.reason.as_str()), ("write-through", "replica-unavailable"));
    write(q, 1, 2000, &pattern(5000, BS));
    assert_eq!(read(q, 1, 2000, BS), pattern(5000, BS));
    // A node not among node.peers cannot be named.
    assert!(repl.set_replicas(VolumeId(7), &["node-z".to_string()], 1, Epoch(42)).is_err());

    // node-b still holds its old copy; told it is no longer a replica, it lets it go.
    let vb = b.target.as_ref().unwrap().volumes().unwrap();
    let held = vb.status().unwrap().devices[0].copies.iter().find(|c| c.volume == 7).map_or(0, |c| c.bytes);
    assert!(held > 0, "node-b kept its copy until told");
    assert_eq!(vb.discard_copy(7).expect("discard"), held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = vb.status().unwrap();
        let left = s.devices[0].copies.iter().find(|c| c.volume == 7).map_or(0, |c| c.bytes);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "node-b's copy still holds {left} bytes");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(vb.discard_copy(1).is_err(), "no copy of volume 1 there");
}
