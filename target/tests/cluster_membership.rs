//! stagerd with a `cluster:` section (feature `cluster`) against a real etcd on 127.0.0.1: the
//! node registers under its lease with what placement needs (fault domain, listeners, free
//! replica flash, the volumes whose SAN answers); `kill -9` leaves the record until etcd expires
//! the lease; SIGTERM deregisters it at once.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{free_port, spawn_stagerd};

use stager_cluster::testing::{wait_for, EtcdServer};
use stager_cluster::{Cluster, ClusterConfig, NodeInfo};

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
    let yaml = format!(
        "reactors: {{ cores: [0] }}\nlisteners: [{{ name: t, address: \"127.0.0.1:{nvme}\" }}]\n\
         node: {{ id: node-a, fault_domain: rack-1, fabric: {{ listen: \"127.0.0.1:{fabric}\" }} }}\n\
         cluster: {{ endpoints: [\"{etcd}\"], prefix: {PREFIX}, lease_ttl_ms: {ttl}, op_timeout_ms: 1000 }}\n\
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
