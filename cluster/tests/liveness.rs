//! Conservative liveness: a node that cannot renew its lease reports `Lost` strictly before etcd
//! could expire the lease (and another node take over), whether etcd is partitioned away from
//! it, stopped (SIGSTOP), or killed. Each test measures the order of events, not their speed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{config, info, TTL};
use stager_cluster::testing::{wait_for, EtcdServer, TcpProxy};
use stager_cluster::{Cluster, LeaseState};

/// Polls `node.lease_state()` every 2 ms from a thread; the first time it was seen `Lost`.
struct LostWatcher {
    seen: Arc<Mutex<Option<Instant>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LostWatcher {
    fn start(node: &Cluster) -> LostWatcher {
        let (seen, stop) = (Arc::new(Mutex::new(None)), Arc::new(AtomicBool::new(false)));
        let (node, s, st) = (node.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                if node.lease_state() == LeaseState::Lost {
                    s.lock().unwrap().get_or_insert_with(Instant::now);
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        LostWatcher { seen, stop, thread: Some(thread) }
    }

    fn lost_at(&self) -> Option<Instant> {
        *self.seen.lock().unwrap()
    }
}

impl Drop for LostWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn partitioned_node_knows_before_etcd_expires_its_lease() {
    let etcd = EtcdServer::start().unwrap();
    let proxy = TcpProxy::start(etcd.endpoint().parse().unwrap()).unwrap();
    let a = Cluster::connect(config(&proxy.endpoint(), "/stager/part", "node-a")).unwrap();
    let observer = Cluster::connect(config(&etcd.endpoint(), "/stager/part", "observer")).unwrap();
    a.register(&info("node-a")).unwrap();
    std::thread::sleep(TTL / 2);
    assert!(matches!(a.lease_state(), LeaseState::Alive { .. }));

    let watcher = LostWatcher::start(&a);
    let cut = Instant::now();
    proxy.cut();
    // The observer polls etcd: `present_sent` is the send time of the last read that still
    // found node-a's record, a strict lower bound of the moment etcd expired the lease.
    let mut present_sent = cut;
    let expired = wait_for(TTL * 4, || {
        let sent = Instant::now();
        let present = observer.nodes().unwrap().iter().any(|n| n.id == "node-a");
        if present {
            present_sent = sent;
        }
        !present
    });
    assert!(expired.is_some(), "etcd never expired node-a's lease");
    let lost = watcher.lost_at().expect("node-a never saw its lease lost");
    eprintln!(
        "partition: node-a Lost {} ms after the cut; etcd still had the lease {} ms after the cut",
        (lost - cut).as_millis(),
        (present_sent - cut).as_millis()
    );
    assert!(lost < present_sent, "node-a learned of the loss only after etcd could have expired it");
    assert!(lost - cut < TTL, "the local deadline is at most a TTL after the last answered keep-alive");

    // Healed: etcd says the lease is gone, which is final; registering again starts a new one.
    proxy.heal();
    std::thread::sleep(TTL / 2);
    assert_eq!(a.lease_state(), LeaseState::Lost);
    a.register(&info("node-a")).unwrap();
    assert!(matches!(a.lease_state(), LeaseState::Alive { .. }));
    assert!(observer.nodes().unwrap().iter().any(|n| n.id == "node-a"));
}

#[test]
fn stopped_etcd_leaves_the_node_lost_before_it_can_expire_anything() {
    let etcd = EtcdServer::start().unwrap();
    let a = Cluster::connect(config(&etcd.endpoint(), "/stager/sigstop", "node-a")).unwrap();
    a.register(&info("node-a")).unwrap();
    std::thread::sleep(TTL / 2);
    let watcher = LostWatcher::start(&a);
    let paused = Instant::now();
    etcd.pause();
    let lost = wait_for(TTL * 2, || watcher.lost_at().is_some());
    // etcd cannot expire a lease while stopped: the earliest it can is on resuming. Stay
    // stopped past a whole TTL after the pause (so past any renewal etcd received before it):
    // a shorter pause would let node-a's next keep-alive renew a lease that is not yet due.
    std::thread::sleep((paused + TTL + TTL / 4).saturating_duration_since(Instant::now()));
    let resumed = Instant::now();
    etcd.resume();
    let lost = lost.and(watcher.lost_at()).expect("node-a never saw its lease lost while etcd was stopped");
    eprintln!("SIGSTOP: node-a Lost {} ms after etcd stopped", (lost - paused).as_millis());
    assert!(lost - paused < TTL);
    assert!(lost < resumed);
    // Overdue, the lease expires right after etcd resumes; node-a learns it is gone for good.
    let observer = Cluster::connect(config(&etcd.endpoint(), "/stager/sigstop", "observer")).unwrap();
    assert!(wait_for(TTL * 3, || observer.nodes().unwrap().is_empty()).is_some(), "lease never expired");
    std::thread::sleep(TTL / 2);
    assert_eq!(a.lease_state(), LeaseState::Lost);
}

#[test]
fn killed_etcd_leaves_the_node_lost_and_a_restart_brings_the_lease_back() {
    let mut etcd = EtcdServer::start().unwrap();
    let a = Cluster::connect(config(&etcd.endpoint(), "/stager/kill", "node-a")).unwrap();
    a.register(&info("node-a")).unwrap();
    std::thread::sleep(TTL / 2);
    let watcher = LostWatcher::start(&a);
    let killed = Instant::now();
    etcd.kill();
    let lost = wait_for(TTL * 2, || watcher.lost_at().is_some()).and(watcher.lost_at());
    let lost = lost.expect("node-a never saw its lease lost with etcd dead");
    eprintln!("kill -9: node-a Lost {} ms after etcd died", (lost - killed).as_millis());
    assert!(lost - killed < TTL);
    let err = a.nodes().expect_err("etcd is dead");
    assert!(err.to_string().contains(&etcd.endpoint()), "{err}");

    // etcd restarts with its data: the lease is restored and extended (nothing expired it),
    // so the next keep-alive is answered and node-a is alive again under the same lease.
    etcd.restart().unwrap();
    let back = wait_for(TTL * 5, || matches!(a.lease_state(), LeaseState::Alive { .. }));
    assert!(back.is_some(), "the lease never came back after etcd restarted");
    assert_eq!(a.nodes().unwrap().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["node-a"]);
}
