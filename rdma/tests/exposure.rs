//! Exposure is per endpoint: a peer writes only the regions exposed on its own endpoint. A key
//! exposed to one peer is worthless to another — and using it fails the other's endpoint.

mod common;

use std::sync::Arc;

use common::*;
use stager_rdma::{Endpoint, Event, Fabric, FabricError};

/// b with two peers a and c connected: b, then [a's end, b's end for a, c's end, b's end for
/// c], then a's and c's fabrics (kept alive).
fn star() -> (Fabric, [Endpoint; 4], [Fabric; 2]) {
    let b = start("b", &["a", "c"]);
    let a = start("a", &["b"]);
    let c = start("c", &["b"]);
    let ea = a.connect(b.local_addr(), "b", WAIT).unwrap();
    let eb_a = accept(&b);
    let ec = c.connect(b.local_addr(), "b", WAIT).unwrap();
    let eb_c = accept(&b);
    (b, [ea, eb_a, ec, eb_c], [a, c])
}

#[test]
fn peer_c_cannot_write_the_region_exposed_to_a() {
    let (b, [mut ea, mut eb_a, mut ec, mut eb_c], _others) = star();
    assert_eq!((eb_a.peer(), eb_c.peer()), ("a", "c"));

    let for_a = Arc::new(b.alloc_region(4096).unwrap());
    let for_c = Arc::new(b.alloc_region(4096).unwrap());
    let key_a = eb_a.expose(for_a.clone()).unwrap();
    let key_c = eb_c.expose(for_c.clone()).unwrap();

    // c's own region works.
    ec.write(1, &[b"c's own"], key_c, 0, Some(1)).unwrap();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ec, &mut eb_c], &mut evs, WAIT, |e| !e[0].is_empty() && !e[1].is_empty()));
    assert_eq!(evs[1], vec![Event::Imm { imm: 1, len: 7 }]);

    // c got hold of a's key: using it fails c's endpoint at b, and a's region stays untouched.
    ec.write(2, &[b"stolen"], key_a, 0, Some(2)).unwrap();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ec, &mut eb_c], &mut evs, WAIT, |e| failed(&e[0]).is_some() && failed(&e[1]).is_some()));
    match failed(&evs[1]) {
        Some(FabricError::Protocol { peer, what }) => {
            assert_eq!(peer, "c");
            assert!(what.contains("not exposed"), "{what}");
        }
        other => panic!("{other:?}"),
    }
    assert!(evs[0].contains(&Event::WriteFailed { wr_id: 2, error: failed(&evs[0]).unwrap().clone() }));
    let mut got = [0u8; 6];
    for_a.copy_out(0, &mut got).unwrap();
    assert_eq!(got, [0u8; 6]);

    // a writes its region as always.
    ea.write(3, &[b"a's data"], key_a, 0, Some(3)).unwrap();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb_a], &mut evs, WAIT, |e| !e[0].is_empty() && !e[1].is_empty()));
    assert_eq!(evs[1], vec![Event::Imm { imm: 3, len: 8 }]);
    let mut got = [0u8; 8];
    for_a.copy_out(0, &mut got).unwrap();
    assert_eq!(&got, b"a's data");
}

#[test]
fn one_region_exposed_to_two_peers_takes_both() {
    let (b, [mut ea, mut eb_a, mut ec, mut eb_c], _others) = star();
    let shared = Arc::new(b.alloc_region(4096).unwrap());
    let ka = eb_a.expose(shared.clone()).unwrap();
    let kc = eb_c.expose(shared.clone()).unwrap();
    assert_ne!(ka, kc);
    ea.write(1, &[&[0xAA; 100]], ka, 0, Some(1)).unwrap();
    ec.write(1, &[&[0xCC; 100]], kc, 100, Some(1)).unwrap();
    let mut evs = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb_a, &mut ec, &mut eb_c], &mut evs, WAIT, |e| e.iter().all(|v| !v.is_empty())));
    let mut got = [0u8; 200];
    shared.copy_out(0, &mut got).unwrap();
    assert_eq!(&got[..100], &[0xAA; 100]);
    assert_eq!(&got[100..], &[0xCC; 100]);
    // The region outlives the endpoints it was exposed on.
    drop((ea, eb_a, ec, eb_c));
    shared.copy_out(0, &mut got).unwrap();
    assert_eq!(got[0], 0xAA);
}
