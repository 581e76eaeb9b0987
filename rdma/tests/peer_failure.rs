//! A peer that dies or falls silent fails its endpoint: `WriteFailed` for every outstanding
//! write, then `Failed`; silence is noticed within `peer_timeout` thanks to heartbeats (which
//! also keep an idle but healthy pair alive).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use stager_rdma::{Event, Fabric, FabricConfig, FabricError};

#[test]
fn a_dropped_peer_fails_the_endpoint_and_its_outstanding_writes() {
    let (_a, b, mut ea, eb) = pair();
    let region = Arc::new(b.alloc_region(1 << 20).unwrap());
    let mut eb = eb;
    let key = eb.expose(region).unwrap();
    // a learns the key out of band (it is only valid on this endpoint anyway).
    for i in 0..10u64 {
        ea.write(i, &[&[1u8; 1000]], key, i * 1000, None).unwrap();
    }
    drop(eb); // like a killed process: the kernel closes the socket
    let mut evs = vec![Vec::new()];
    assert!(drive(&mut [&mut ea], &mut evs, WAIT, |e| failed(&e[0]).is_some()));
    let failed_ids: Vec<u64> = evs[0]
        .iter()
        .filter_map(|e| if let Event::WriteFailed { wr_id, .. } = e { Some(*wr_id) } else { None })
        .collect();
    assert_eq!(failed_ids, (0..10).collect::<Vec<_>>());
    assert!(matches!(evs[0].last(), Some(Event::Failed(FabricError::PeerGone(_)))), "{:?}", evs[0]);
    assert!(matches!(ea.write(11, &[&[1]], key, 0, None), Err(FabricError::Closed(_))));
}

#[test]
fn a_silent_peer_fails_within_the_peer_timeout() {
    let timeout = Duration::from_millis(600);
    let b = Fabric::start(FabricConfig { peer_timeout: timeout, ..config("b", &["a"]) }).unwrap();
    // The silence counts from the peer's last word, which comes before `accept` returns: the
    // clock starts before it (started after, it once read 599.99 ms for a 600 ms timeout).
    let t0 = Instant::now();
    let _silent = raw_member(b.local_addr(), "a"); // authenticates, then never says a word
    let mut eb = accept(&b);
    let mut evs = vec![Vec::new()];
    assert!(drive(&mut [&mut eb], &mut evs, timeout * 10, |e| failed(&e[0]).is_some()));
    assert!(matches!(failed(&evs[0]), Some(FabricError::Timeout(_))), "{:?}", evs[0]);
    // Not before the timeout; the upper bound is generous (this is no timing test).
    assert!(t0.elapsed() >= timeout, "failed after {:?}", t0.elapsed());
}

#[test]
fn heartbeats_keep_an_idle_pair_alive() {
    let timeout = Duration::from_millis(300);
    let a = Fabric::start(FabricConfig { peer_timeout: timeout, ..config("a", &["b"]) }).unwrap();
    let b = Fabric::start(FabricConfig { peer_timeout: timeout, ..config("b", &["a"]) }).unwrap();
    let mut ea = a.connect(b.local_addr(), "b", WAIT).unwrap();
    let mut eb = accept(&b);
    let mut evs = vec![Vec::new(), Vec::new()];
    // Poll, idle, for 5 timeouts: nothing fails.
    drive(&mut [&mut ea, &mut eb], &mut evs, timeout * 5, |_| false);
    assert!(evs.iter().all(|e| e.is_empty()), "{evs:?}");
}

#[test]
fn stop_fails_the_endpoints_of_the_stopped_fabric() {
    let (a, b, mut ea, mut eb) = pair();
    b.stop();
    b.stop();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| failed(&e[0]).is_some() && failed(&e[1]).is_some()));
    assert_eq!(failed(&evs[1]), Some(&FabricError::Stopped));
    assert!(matches!(failed(&evs[0]), Some(FabricError::PeerGone(_))));
    assert!(a.connect(b.local_addr(), "b", Duration::from_secs(1)).is_err());
}
