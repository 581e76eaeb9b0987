//! Volume records change only through compare-and-put: of many concurrent writers from one
//! revision exactly one wins; the watch delivers every change in order; malformed records are
//! clean errors naming their key, never panics.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::{config, record};
use stager_cluster::testing::EtcdServer;
use stager_cluster::{Cluster, ClusterError, VolumeEvent};

const WRITERS: usize = 6;
const ROUNDS: u64 = 15;

#[test]
fn exactly_one_writer_wins_per_revision() {
    let etcd = EtcdServer::start().unwrap();
    let clients: Vec<Cluster> = (0..WRITERS)
        .map(|i| Cluster::connect(config(&etcd.endpoint(), "/stager/cas", &format!("node-{i}"))).unwrap())
        .collect();
    assert_eq!(clients[0].volume(9).unwrap(), None);

    // Creation race: only one `None` expectation succeeds.
    let barrier = Arc::new(Barrier::new(WRITERS));
    let outcomes: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (c, barrier) = (c.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                c.put_volume_if(&record(9, &format!("node-{i}"), 1), None).unwrap()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    let created: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
    assert_eq!(created.len(), 1, "{outcomes:?}");
    let rev0 = *created[0];
    assert!(outcomes.iter().all(|o| *o == Ok(rev0) || *o == Err(Some(rev0))), "{outcomes:?}");

    // Rounds of bumps: every writer reads the same revision, all try, exactly one wins.
    let mut expected = rev0;
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(WRITERS));
        let threads: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (c, barrier) = (c.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let (mut rec, rev) = c.volume(9).unwrap().unwrap();
                    rec.epoch += 1;
                    rec.owner = format!("node-{i}");
                    rec.push_transition(round, format!("bumped by node-{i}"));
                    barrier.wait();
                    (rev, c.put_volume_if(&rec, Some(rev)).unwrap())
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(results.iter().all(|(read, _)| *read == expected));
        let winners: Vec<_> = results.iter().filter_map(|(_, r)| r.as_ref().ok().copied()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        assert!(winners[0] > expected);
        for (_, r) in &results {
            if let Err(current) = r {
                assert_eq!(*current, Some(winners[0]), "a loser is told the winner's revision");
            }
        }
        expected = winners[0];
    }
    let (rec, rev) = clients[0].volume(9).unwrap().unwrap();
    assert_eq!((rec.epoch, rev), (1 + ROUNDS, expected), "no update lost");
    assert_eq!(rec.history.len(), 1 + ROUNDS as usize);
    // A stale expectation, and `None` for an existing record, are refused with the current one.
    assert_eq!(clients[1].put_volume_if(&rec, Some(rev0)).unwrap(), Err(Some(rev)));
    assert_eq!(clients[1].put_volume_if(&rec, None).unwrap(), Err(Some(rev)));
    assert_eq!(clients[1].put_volume_if(&record(10, "node-1", 1), Some(rev)).unwrap(), Err(None));
}

#[test]
fn the_watch_delivers_every_change_in_order() {
    let etcd = EtcdServer::start().unwrap();
    let c = Cluster::connect(config(&etcd.endpoint(), "/stager/watch", "node-a")).unwrap();
    let rev1 = c.put_volume_if(&record(1, "node-a", 1), None).unwrap().unwrap();
    let events = c.watch_volumes().unwrap();
    // The snapshot first.
    match events.recv_timeout(Duration::from_secs(2)).unwrap() {
        VolumeEvent::Changed { id: 1, record: r, revision } => assert_eq!((r.epoch, revision), (1, rev1)),
        other => panic!("{other:?}"),
    }
    // Writes to three volumes, interleaved, and a delete.
    let mut revs = std::collections::HashMap::from([(1u32, rev1)]);
    let mut written = Vec::new();
    for i in 0..30u64 {
        let id = (i % 3) as u32 + 1;
        let rec = record(id, "node-a", i + 2);
        let rev = c.put_volume_if(&rec, revs.get(&id).copied()).unwrap().unwrap();
        revs.insert(id, rev);
        written.push((id, Some(i + 2), rev));
    }
    common::raw_delete(&etcd.endpoint(), "/stager/watch/volumes/2");
    written.push((2, None, 0));
    // A record for another prefix is not ours.
    common::raw_put(&etcd.endpoint(), "/stager/other/volumes/1", b"{}");
    let mut last = rev1;
    for (id, epoch, rev) in written {
        match (events.recv_timeout(Duration::from_secs(2)).unwrap(), epoch) {
            (VolumeEvent::Changed { id: got, record: r, revision }, Some(e)) => {
                assert_eq!((got, r.id, r.epoch, revision), (id, id, e, rev));
                assert!(revision > last, "out of order");
                last = revision;
            }
            (VolumeEvent::Deleted { id: got }, None) => assert_eq!(got, id),
            (other, _) => panic!("expected volume {id} epoch {epoch:?}, got {other:?}"),
        }
    }
    assert!(events.recv_timeout(Duration::from_millis(200)).is_err(), "an event nobody caused");
    c.stop();
    assert!(events.recv_timeout(Duration::from_secs(2)).is_err(), "the channel closes on stop");
}

#[test]
fn malformed_records_are_clean_errors() {
    let etcd = EtcdServer::start().unwrap();
    let ep = etcd.endpoint();
    let c = Cluster::connect(config(&ep, "/stager/bad", "node-a")).unwrap();
    c.put_volume_if(&record(1, "node-a", 1), None).unwrap().unwrap();
    let events = c.watch_volumes().unwrap();
    assert!(matches!(events.recv_timeout(Duration::from_secs(2)).unwrap(), VolumeEvent::Changed { id: 1, .. }));

    let good = serde_json::to_string(&record(7, "node-a", 1)).unwrap();
    let cases: Vec<(u32, String, &str)> = vec![
        (7, "{not json".into(), "not a record"),
        (7, good.replace("\"epoch\":1", "\"epoch\":\"one\""), "not a record"),
        (7, good.replace("\"id\":7", "\"id\":8"), "not volume 7"),
        (7, good.replace("\"replicas\":[]", "\"replicas\":[\"node-a\"]"), "is the owner"),
        (7, String::from_utf8_lossy(&[0xff, 0xfe, 0x00]).into_owned(), "not a record"),
    ];
    for (id, value, needle) in cases {
        common::raw_put(&ep, &format!("/stager/bad/volumes/{id}"), value.as_bytes());
        let err = c.volume(id).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ClusterError::Malformed { .. }), "{err:?}");
        assert!(msg.contains("/stager/bad/volumes/7") && msg.contains(needle), "{msg:?} lacks {needle:?}");
        assert!(matches!(c.volumes(), Err(ClusterError::Malformed { .. })));
    }
    common::raw_put(&ep, "/stager/bad/volumes/7", &[0xff; 3]);
    common::raw_put(&ep, "/stager/bad/volumes/not-a-number", good.as_bytes());
    common::raw_put(&ep, "/stager/bad/nodes/ghost", b"[1,2,3]");
    common::raw_put(&ep, "/stager/bad/manager/0000000000000001", b"not a node id!");
    let msg = c.nodes().unwrap_err().to_string();
    assert!(msg.contains("/stager/bad/nodes/ghost"), "{msg}");
    assert!(matches!(c.leader(), Err(ClusterError::Malformed { .. })));

    // The watch skips malformed records and keeps delivering good ones.
    let rev = c.volume(1).unwrap().unwrap().1;
    let rev2 = c.put_volume_if(&record(1, "node-a", 2), Some(rev)).unwrap().unwrap();
    match events.recv_timeout(Duration::from_secs(2)).unwrap() {
        VolumeEvent::Changed { id: 1, revision, .. } => assert_eq!(revision, rev2),
        other => panic!("{other:?}"),
    }
    // Still usable for good records, and a bad one can be repaired by a write.
    assert_eq!(c.volume(1).unwrap().unwrap().0.epoch, 2);
}
