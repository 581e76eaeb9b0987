//! Fencing of the resource manager checked at etcd itself: a leader-only write carrying a stale
//! leadership (the election key's old create revision) is refused by the transaction, not only
//! by the client's local checks, which these tests bypass.

use std::time::Duration;

use crate::testing::EtcdServer;
use crate::{Cluster, ClusterConfig, ClusterError, NodeInfo, VolumeRecord};

fn connect(etcd: &EtcdServer, node: &str) -> Cluster {
    let c = Cluster::connect(ClusterConfig {
        endpoints: vec![etcd.endpoint()],
        prefix: "/stager/fence".into(),
        node: node.into(),
        lease_ttl: Duration::from_secs(2),
        op_timeout: Duration::from_secs(1),
    })
    .unwrap();
    c.register(&NodeInfo {
        id: node.into(),
        fault_domain: None,
        fabric_addr: "127.0.0.1:1".into(),
        nvme_addrs: Vec::new(),
        flash_free_bytes: 1,
        sans_reachable: vec![1],
        sans_unreachable: vec![],
        started_unix_ms: 0,
    })
    .unwrap();
    c
}

fn record(owner: &str, epoch: u64) -> VolumeRecord {
    VolumeRecord {
        id: 1,
        owner: owner.into(),
        replicas: Vec::new(),
        epoch,
        requested: "write-back".into(),
        effective: "write-back".into(),
        reason: String::new(),
        history: Vec::new(),
        unprotected_ms: 0,
        unprotected_since_unix_ms: 0,
        unreachable: Vec::new(),
        san: String::new(),
        in_sync: Vec::new(),
        rescuer: String::new(),
        rescued_unix_ms: 0,
        rescued_upto: 0,
        server: String::new(),
        served: false,
        handback: false,
    }
}

#[test]
fn a_stale_leadership_is_refused_by_etcd_itself() {
    let etcd = EtcdServer::start().unwrap();
    let (a, b) = (connect(&etcd, "node-a"), connect(&etcd, "node-b"));
    assert!(a.campaign(Duration::from_secs(1)).unwrap());
    let stale = a.leadership().unwrap();
    a.resign().unwrap();
    assert!(b.campaign(Duration::from_secs(1)).unwrap());
    let err = a.put_volume_with_guard(&record("node-a", 1), None, stale.clone()).unwrap_err();
    assert!(matches!(err, ClusterError::NotLeader { .. }), "{err:?}");
    assert_eq!(b.volume(1).unwrap(), None, "the deposed write reached etcd");

    // node-a leads again with the same lease, so its election key has the same name as before,
    // but a new create revision: the old leadership still does not count.
    b.resign().unwrap();
    assert!(a.campaign(Duration::from_secs(1)).unwrap());
    let current = a.leadership().unwrap();
    assert_eq!(current.0, stale.0);
    assert_ne!(current.1, stale.1);
    let err = a.put_volume_with_guard(&record("node-a", 1), None, stale).unwrap_err();
    assert!(matches!(err, ClusterError::NotLeader { .. }), "{err:?}");
    let rev = a.put_volume_with_guard(&record("node-a", 1), None, current).unwrap().unwrap();
    assert_eq!(b.volume(1).unwrap().unwrap().1, rev);
}
