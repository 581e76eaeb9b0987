//! Nodes register under leases: `nodes()` lists the live ones; a node whose client stops
//! disappears once etcd expires its lease (after the TTL, not before its last keep-alive plus
//! the TTL); a graceful leave removes it at once; bad configurations and unreachable etcd are
//! errors that say what is wrong.

mod common;

use std::time::{Duration, Instant};

use common::{config, info, TTL};
use stager_cluster::testing::{wait_for, EtcdServer};
use stager_cluster::{Cluster, ClusterError, LeaseState};

#[test]
fn registered_nodes_are_listed_and_updates_keep_the_lease() {
    let etcd = EtcdServer::start().unwrap();
    let a = Cluster::connect(config(&etcd.endpoint(), "/stager/reg", "node-a")).unwrap();
    let b = Cluster::connect(config(&etcd.endpoint(), "/stager/reg", "node-b")).unwrap();
    assert_eq!(a.lease_state(), LeaseState::Lost, "not registered yet");
    assert!(matches!(a.update(&info("node-a")), Err(ClusterError::NotRegistered { .. })));
    assert!(matches!(a.register(&info("node-b")), Err(ClusterError::Config(_))), "another node's info");

    a.register(&info("node-a")).unwrap();
    b.register(&info("node-b")).unwrap();
    assert!(matches!(a.lease_state(), LeaseState::Alive { valid_for } if valid_for <= TTL));
    let nodes = b.nodes().unwrap();
    assert_eq!(nodes, vec![info_like(&nodes[0], "node-a"), info_like(&nodes[1], "node-b")]);
    assert_eq!(nodes[0].sans_reachable, vec![1, 2, 3]);

    // Registering again while alive, and update, re-put under the same lease.
    let keys_before = common::raw_keys(&etcd.endpoint(), "/stager/reg/nodes/");
    let mut changed = info("node-a");
    changed.flash_free_bytes = 7;
    a.register(&changed).unwrap();
    assert_eq!(a.nodes().unwrap()[0].flash_free_bytes, 7);
    changed.flash_free_bytes = 8;
    a.update(&changed).unwrap();
    assert_eq!(a.nodes().unwrap()[0].flash_free_bytes, 8);
    assert_eq!(common::raw_keys(&etcd.endpoint(), "/stager/reg/nodes/"), keys_before);

    // Keep-alives hold the lease well past one TTL.
    std::thread::sleep(TTL * 2);
    assert!(matches!(a.lease_state(), LeaseState::Alive { .. }));
    assert_eq!(b.nodes().unwrap().len(), 2);

    // A graceful leave removes the node at once.
    a.deregister().unwrap();
    assert_eq!(a.lease_state(), LeaseState::Lost);
    assert_eq!(b.nodes().unwrap().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["node-b"]);
}

fn info_like(n: &stager_cluster::NodeInfo, id: &str) -> stager_cluster::NodeInfo {
    let mut want = info(id);
    want.started_unix_ms = n.started_unix_ms;
    want
}

#[test]
fn a_stopped_node_disappears_after_the_ttl() {
    let etcd = EtcdServer::start().unwrap();
    let a = Cluster::connect(config(&etcd.endpoint(), "/stager/stop", "node-a")).unwrap();
    let b = Cluster::connect(config(&etcd.endpoint(), "/stager/stop", "node-b")).unwrap();
    a.register(&info("node-a")).unwrap();
    b.register(&info("node-b")).unwrap();
    std::thread::sleep(TTL); // a few keep-alives
    let stopped = Instant::now();
    a.stop();
    assert_eq!(a.lease_state(), LeaseState::Lost);
    assert!(matches!(a.nodes(), Err(ClusterError::Stopped)));
    assert!(b.nodes().unwrap().iter().any(|n| n.id == "node-a"), "still listed right after it stopped");
    let gone = wait_for(TTL * 4, || b.nodes().unwrap().iter().all(|n| n.id != "node-a"));
    let gone = gone.map(|_| stopped.elapsed()).expect("node-a never disappeared");
    // Its last keep-alive went out at most a keep-alive interval (TTL/4) before the stop, and
    // etcd keeps a lease TTL past the last renewal it received.
    assert!(gone >= TTL - TTL / 4, "node-a disappeared {gone:?} after stopping, before its TTL could run out");
    eprintln!("node-a disappeared {} ms after its client stopped (TTL {} ms)", gone.as_millis(), TTL.as_millis());
    assert!(b.nodes().unwrap().iter().any(|n| n.id == "node-b"));
}

#[test]
fn unreachable_etcd_and_bad_configs_are_named() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let err = Cluster::connect(config(&endpoint, "/stager/x", "node-a")).err().expect("connected to nothing");
    assert!(started.elapsed() < Duration::from_secs(5), "connect took {:?}", started.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, ClusterError::Unreachable { .. }), "{err:?}");
    assert!(msg.contains(&endpoint) && msg.contains("connecting"), "{msg}");

    let base = config("127.0.0.1:1", "/stager/x", "node-a");
    let with = |f: &dyn Fn(&mut stager_cluster::ClusterConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c
    };
    for (c, needle) in [
        (with(&|c| c.endpoints.clear()), "no endpoints"),
        (with(&|c| c.prefix = "stager".into()), "prefix"),
        (with(&|c| c.node = "bad node".into()), "node"),
        (with(&|c| c.lease_ttl = Duration::from_millis(500)), "lease_ttl"),
        (with(&|c| c.op_timeout = Duration::ZERO), "op_timeout"),
    ] {
        let msg = Cluster::connect(c).err().expect("bad config accepted").to_string();
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
}
