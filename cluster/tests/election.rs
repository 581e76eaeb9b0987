//! The resource manager's election: one of two candidates leads; when its client stops the
//! other takes over (once etcd expires the stopped one's lease); a resign hands over at once;
//! a deposed manager's writes are refused.

mod common;

use std::time::{Duration, Instant};

use common::{config, info, record, TTL};
use stager_cluster::testing::{wait_for, EtcdServer};
use stager_cluster::{Cluster, ClusterError};

fn two(etcd: &EtcdServer, prefix: &str) -> (Cluster, Cluster) {
    let a = Cluster::connect(config(&etcd.endpoint(), prefix, "node-a")).unwrap();
    let b = Cluster::connect(config(&etcd.endpoint(), prefix, "node-b")).unwrap();
    a.register(&info("node-a")).unwrap();
    b.register(&info("node-b")).unwrap();
    (a, b)
}

#[test]
fn one_leads_and_the_other_takes_over_when_its_client_stops() {
    let etcd = EtcdServer::start().unwrap();
    let (a, b) = two(&etcd, "/stager/elect");
    assert_eq!(a.leader().unwrap(), None);
    assert!(a.campaign(Duration::from_secs(1)).unwrap());
    assert!(a.is_leader());
    assert!(a.campaign(Duration::from_secs(1)).unwrap(), "campaigning again while leading");
    let started = Instant::now();
    assert!(!b.campaign(Duration::from_millis(300)).unwrap(), "two leaders");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(!b.is_leader());
    assert_eq!(b.leader().unwrap().as_deref(), Some("node-a"));
    // The losing candidacy was withdrawn: only the leader's key is left.
    assert_eq!(common::raw_keys(&etcd.endpoint(), "/stager/elect/manager/").len(), 1);

    let campaigner = {
        let b = b.clone();
        std::thread::spawn(move || b.campaign(TTL * 5).map(|won| (won, Instant::now())))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!b.is_leader());
    let stopped = Instant::now();
    a.stop();
    assert!(!a.is_leader());
    let (won, at) = campaigner.join().unwrap().unwrap();
    assert!(won, "node-b never took over");
    eprintln!(
        "node-b led {} ms after node-a's client stopped (TTL {} ms)",
        (at - stopped).as_millis(),
        TTL.as_millis()
    );
    assert!(at - stopped >= TTL - TTL / 4, "node-b led before node-a's lease could have expired");
    assert!(b.is_leader());
    assert_eq!(b.leader().unwrap().as_deref(), Some("node-b"));
}

#[test]
fn a_resign_hands_over_at_once() {
    let etcd = EtcdServer::start().unwrap();
    let (a, b) = two(&etcd, "/stager/resign");
    assert!(b.campaign(Duration::from_secs(1)).unwrap());
    let campaigner = {
        let a = a.clone();
        std::thread::spawn(move || a.campaign(TTL * 5))
    };
    std::thread::sleep(Duration::from_millis(300));
    let resigned = Instant::now();
    b.resign().unwrap();
    assert!(!b.is_leader());
    assert!(campaigner.join().unwrap().unwrap());
    assert!(resigned.elapsed() < TTL, "the handover waited for a lease to expire");
    assert!(a.is_leader());
    assert_eq!(b.leader().unwrap().as_deref(), Some("node-a"));
    b.resign().unwrap(); // not leading: nothing to do
}

#[test]
fn a_deposed_leader_cannot_write() {
    let etcd = EtcdServer::start().unwrap();
    let (a, b) = two(&etcd, "/stager/deposed");
    assert!(matches!(b.put_volume_as_leader(&record(1, "node-b", 1), None), Err(ClusterError::NotLeader { .. })));
    assert!(a.campaign(Duration::from_secs(1)).unwrap());
    let rev = a.put_volume_as_leader(&record(1, "node-a", 1), None).unwrap().unwrap();

    // An operator (or etcd, for an expired lease) removes node-a's election key; node-b wins.
    let keys = common::raw_keys(&etcd.endpoint(), "/stager/deposed/manager/");
    assert_eq!(keys.len(), 1);
    common::raw_delete(&etcd.endpoint(), &keys[0]);
    assert!(b.campaign(Duration::from_secs(2)).unwrap());
    let rev_b = b.put_volume_as_leader(&record(1, "node-b", 2), Some(rev)).unwrap().unwrap();

    // node-a's write is refused, whether its watch already told it or etcd's check does.
    let err = a.put_volume_as_leader(&record(1, "node-a", 3), Some(rev_b)).unwrap_err();
    assert!(matches!(err, ClusterError::NotLeader { .. }), "{err:?}");
    assert!(wait_for(TTL, || !a.is_leader()).is_some(), "node-a still thinks it leads");
    let (rec, now) = b.volume(1).unwrap().unwrap();
    assert_eq!((rec.owner.as_str(), rec.epoch, now), ("node-b", 2, rev_b));
    // A write conditioned on a node being gone is not made while it is registered.
    assert!(b.is_leader());
    let (_, now) = b.volume(1).unwrap().unwrap();
    assert_eq!(
        b.put_volume_as_leader_while_gone(&record(1, "node-b", 3), Some(now), Some("node-a")).unwrap(),
        Err(Some(now))
    );
    assert!(b.put_volume_as_leader_while_gone(&record(1, "node-b", 3), Some(now), Some("node-z")).unwrap().is_ok());
    let (_, rev_b) = b.volume(1).unwrap().unwrap();
    // Plain compare-and-put does not need the leadership.
    assert!(a.put_volume_if(&record(1, "node-a", 4), Some(rev_b)).unwrap().is_ok());
}
