//! stagerd with a `cluster:` section (feature `cluster`) against a real etcd on 127.0.0.1: the
//! node registers under its lease with what placement needs (fault domain, listeners, free
//! replica flash, the volumes whose SAN answers); `kill -9` leaves the record until etcd expires
//! the lease; SIGTERM deregisters it at once. And a write is acknowledged only once the
//! volume's record names this node its owner (the cluster confirmed its copies).

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{free_port, spawn_stagerd};

use stager_cluster::testing::{wait_for, EtcdServer};
use stager_cluster::{Cluster, ClusterConfig, NodeInfo, VolumeRecord};
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, Controller, HostOptions, Response};

const TTL: Duration = Duration::from_secs(2);
const PREFIX: &str = "/stager/membership";

struct Stagerd(Child);

impl Drop for Stagerd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, etcd: &str, nvme: u16, run: u32) -> Stagerd {
    spawn_under(dir, etcd, nvme, run, PREFIX)
}

fn spawn_under(dir: &Path, etcd: &str, nvme: u16, run: u32, prefix: &str) -> Stagerd {
    let yaml = format!(
        "reactors: {{ cores: [0] }}\nlisteners: [{{ name: t, address: \"127.0.0.1:{nvme}\" }}]\n\
         node: {{ id: node-a, fault_domain: rack-1, fabric: {{ listen: \"127.0.0.1:{fabric}\" }} }}\n\
         cluster: {{ endpoints: [\"{etcd}\"], prefix: {prefix}, lease_ttl_ms: {ttl}, op_timeout_ms: 1000 }}\n\
         flash: [{{ name: f0, path: {d}/flash.img, size: 48MiB }}]\n\
         subsystems:\n  - nqn: nqn.2026-11.dev.stager:membership\n    allow_any_host: true\n    namespaces:\n\
         \x20     - nsid: 1\n        backend: {{ kind: volume, id: 7, flash: f0, policy: write-back,\n\
         \x20                   san: {{ kind: file, path: {d}/san.img, size: 16MiB }} }}\n",
        fabric = free_port(),
        ttl = TTL.as_millis(),
        d = dir.display()
    );
    let child = spawn_stagerd(dir, &format!("node-a.{run}"), &yaml);
    Stagerd(child)
}

fn registered(observer: &Cluster) -> Option<NodeInfo> {
    observer.nodes().unwrap().into_iter().find(|n| n.id == "node-a")
}

#[test]
fn stagerd_registers_and_leaves_by_lease_expiry_or_at_once() {
    let etcd = EtcdServer::start().unwrap();
    let dir: PathBuf = std::env::temp_dir().join(format!("stager-membership-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let observer = Cluster::connect(ClusterConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX.into(),
        node: "observer".into(),
        lease_ttl: TTL,
        op_timeout: Duration::from_secs(1),
    })
    .unwrap();
    let nvme = free_port();

    // Registered, with the facts placement reads.
    let mut node = spawn(&dir, &etcd.endpoint(), nvme, 1);
    assert!(wait_for(Duration::from_secs(30), || registered(&observer).is_some()).is_some(), "never registered");
    // The first registration may precede the volume's first status; the next refresh has it.
    let ready = wait_for(Duration::from_secs(10), || registered(&observer).is_some_and(|n| n.sans_reachable == [7]));
    let info = registered(&observer).unwrap();
    assert!(ready.is_some(), "volume 7's SAN never reported reachable: {info:?}");
    assert_eq!(info.fault_domain.as_deref(), Some("rack-1"));
    assert_eq!(info.nvme_addrs, [format!("127.0.0.1:{nvme}")]);
    assert!(info.flash_free_bytes > 0 && info.flash_free_bytes < 48 << 20, "{info:?}");

    // kill -9: the record stays until etcd expires the lease (its last keep-alive went out at
    // most a quarter TTL before the kill), then goes.
    let killed = Instant::now();
    node.0.kill().unwrap();
    node.0.wait().unwrap();
    wait_for(TTL * 4, || registered(&observer).is_none()).expect("the killed node's record never expired");
    let gone = killed.elapsed();
    assert!(gone >= TTL - TTL / 4, "the record went {gone:?} after kill -9, before the lease could expire");
    drop(node);

    // Back again, then SIGTERM: a graceful leave removes the record at once.
    let node = spawn(&dir, &etcd.endpoint(), nvme, 2);
    assert!(wait_for(Duration::from_secs(30), || registered(&observer).is_some()).is_some(), "never re-registered");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(node.0.id() as libc::pid_t, libc::SIGTERM) };
    let left = wait_for(TTL / 2, || registered(&observer).is_none());
    assert!(left.is_some(), "SIGTERM left the record to expire instead of deregistering");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_is_acknowledged_only_once_the_record_names_this_node_the_owner() {
    const PREFIX_HELD: &str = "/stager/held";
    let etcd = EtcdServer::start().unwrap();
    let dir: PathBuf = std::env::temp_dir().join(format!("stager-held-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let observer = Cluster::connect(ClusterConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: PREFIX_HELD.into(),
        node: "observer".into(),
        lease_ttl: TTL,
        op_timeout: Duration::from_secs(1),
    })
    .unwrap();
    // Another node owns volume 7 (as after a takeover): this node must not acknowledge its writes.
    let rec = VolumeRecord {
        id: 7,
        owner: "node-z".into(),
        epoch: 5,
        requested: "write-back".into(),
        effective: "write-back".into(),
        ..Default::default()
    };
    observer.put_volume_if(&rec, None).unwrap().expect("record created");
    let nvme = free_port();
    let _node = spawn_under(&dir, &etcd.endpoint(), nvme, 1, PREFIX_HELD);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{nvme}").parse().unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut ctrl = loop {
        match Controller::connect(addr, "nqn.2026-11.dev.stager:membership", &HostOptions::default()) {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < until, "stagerd never served: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let q = ctrl.io_queue(0);
    let data = common::pattern(77, 4096);
    q.submit(io_cmd::write(1, 8, 1), data.clone(), DataDirection::HostToController, 1).unwrap();
    let mut out: Vec<Response> = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        q.poll(&mut out).unwrap();
        assert!(out.is_empty(), "a write was acknowledged while the record names node-z the owner: {out:?}");
        std::thread::sleep(Duration::from_millis(10));
    }

    // The record gives the volume to this node: the held acknowledgement goes out.
    let (mut rec, rev) = observer.volume(7).unwrap().expect("the record");
    rec.owner = "node-a".into();
    rec.epoch += 1;
    observer.put_volume_if(&rec, Some(rev)).unwrap().expect("record updated");
    let acked = wait_for(Duration::from_secs(5), || {
        q.poll(&mut out).unwrap();
        !out.is_empty()
    });
    assert!(acked.is_some(), "the held write was never acknowledged");
    out[0].ok().expect("the held write succeeded");
    let back = q.execute(io_cmd::read(1, 8, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
    back.ok().unwrap();
    assert_eq!(back.data, data, "the block reads back as written");
    let log = std::fs::read_to_string(dir.join("node-a.1.log")).unwrap_or_default();
    assert!(log.contains("not acknowledged here"), "the node said nothing about holding writes:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
