//! One-sided writes on the tcp backend: placed in order, an immediate after everything before
//! it, gathered sources, flow control (Busy) under large and many writes, messages, sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stager_rdma::constants::{MSG_BYTES_MAX, SEND_DEPTH, WRITE_BYTES_MAX};
use stager_rdma::{Event, FabricError, RemoteKey};

/// b exposes a region of `len` bytes on its endpoint and tells a the key in a message.
fn expose_to_a(
    b: &stager_rdma::Fabric,
    eb: &mut stager_rdma::Endpoint,
    ea: &mut stager_rdma::Endpoint,
    len: usize,
) -> (Arc<stager_rdma::Region>, RemoteKey) {
    let region = Arc::new(b.alloc_region(len).unwrap());
    let key = eb.expose(region.clone()).unwrap();
    eb.send_msg(&key.encode()).unwrap();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [ea, eb], &mut evs, WAIT, |e| !e[0].is_empty()));
    let Event::Message(m) = &evs[0][0] else { panic!("{:?}", evs[0]) };
    let got = RemoteKey::decode(m).unwrap();
    assert_eq!(got, key);
    assert_eq!(got.len(), len as u64);
    (region, got)
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i.wrapping_mul(131) as usize + j * 7) as u8).collect()
}

#[test]
fn writes_and_immediates_are_visible_in_order() {
    let (_a, b, mut ea, mut eb) = pair();
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, 1 << 20);
    let mut model = vec![0u8; 1 << 20];
    for i in 0..200u64 {
        // Overlapping offsets: a later write must win.
        let off = (i * 3000) % ((1 << 20) - 9000);
        let data = pattern(i, 1 + (i as usize * 37) % 9000);
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        let imm = (i % 10 == 9).then_some(i as u32);
        loop {
            match ea.write(i, &[&data], key, off, imm) {
                Ok(()) => break,
                Err(FabricError::Busy) => {
                    ea.poll(&mut Vec::new());
                    eb.poll(&mut Vec::new());
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    let mut evs = vec![Vec::new(), Vec::new()];
    let mut seen_imm = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| {
        for ev in e[1].iter().skip(seen_imm.len()) {
            let Event::Imm { imm, .. } = ev else { panic!("unexpected {ev:?}") };
            seen_imm.push(*imm);
        }
        e[0].len() == 200 && seen_imm.last() == Some(&199)
    }));
    assert_eq!(seen_imm, (0..20).map(|k| k * 10 + 9).collect::<Vec<u32>>());
    let done: Vec<u64> =
        evs[0].iter().map(|e| if let Event::WriteDone { wr_id } = e { *wr_id } else { panic!("{e:?}") }).collect();
    assert_eq!(done, (0..200).collect::<Vec<u64>>(), "completions in posting order");
    region.copy_out(0, &mut buf).unwrap();
    assert!(buf == model, "region differs from the writes applied in order");
    let s = eb.stats();
    assert_eq!((s.writes_received, s.imms_received), (200, 20));
    assert_eq!(ea.stats().writes, 200);
}

#[test]
fn an_immediate_implies_every_earlier_write_is_visible() {
    // Each round: 8 writes, then an empty write with immediate = round. When b sees the
    // immediate, the round's 8 writes must all be there (b checks before polling again).
    let (_a, b, mut ea, mut eb) = pair();
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, 64 << 10);
    for round in 0..50u32 {
        for k in 0..8u64 {
            let data = pattern(round as u64 * 8 + k, 4096);
            ea.write(k, &[&data], key, k * 4096, None).unwrap();
        }
        ea.write(99, &[], key, 0, Some(round)).unwrap();
        let mut evs = vec![Vec::new(), Vec::new()];
        assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| {
            e[1].iter().any(|ev| matches!(ev, Event::Imm { .. })) && e[0].len() == 9
        }));
        assert_eq!(evs[1], vec![Event::Imm { imm: round, len: 0 }]);
        for k in 0..8u64 {
            let mut got = vec![0u8; 4096];
            region.copy_out(k * 4096, &mut got).unwrap();
            assert!(got == pattern(round as u64 * 8 + k, 4096), "round {round} write {k} not visible at its immediate");
        }
    }
}

#[test]
fn gathered_sources_land_concatenated() {
    let (_a, b, mut ea, mut eb) = pair();
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, 8192);
    let parts: Vec<Vec<u8>> = (0..12).map(|i| pattern(i, 100 + i as usize)).collect();
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    ea.write(1, &slices[..3], key, 5, Some(1)).unwrap();
    ea.write(2, &slices, key, 3000, Some(2)).unwrap(); // more slices than writev takes directly
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| e[1].len() == 2));
    let want1 = parts[..3].concat();
    let want2 = parts.concat();
    assert_eq!(
        evs[1],
        vec![Event::Imm { imm: 1, len: want1.len() as u32 }, Event::Imm { imm: 2, len: want2.len() as u32 }]
    );
    let mut got = vec![0u8; want1.len()];
    region.copy_out(5, &mut got).unwrap();
    assert_eq!(got, want1);
    let mut got = vec![0u8; want2.len()];
    region.copy_out(3000, &mut got).unwrap();
    assert_eq!(got, want2);
}

#[test]
fn local_checks_refuse_before_sending() {
    let (_a, b, mut ea, mut eb) = pair();
    let (_region, key) = expose_to_a(&b, &mut eb, &mut ea, 4096);
    assert!(matches!(ea.write(1, &[&[0u8; 10]], key, 4090, None), Err(FabricError::OutOfBounds { .. })));
    assert!(matches!(ea.write(1, &[&[0u8; 1]], key, u64::MAX, None), Err(FabricError::OutOfBounds { .. })));
    let big = vec![0u8; WRITE_BYTES_MAX + 1];
    assert!(matches!(ea.write(1, &[&big], key, 0, None), Err(FabricError::TooLarge { .. })));
    let msg = vec![0u8; MSG_BYTES_MAX + 1];
    assert!(matches!(ea.send_msg(&msg), Err(FabricError::TooLarge { .. })));
    assert_eq!(ea.stats().writes, 0);
}

#[test]
fn large_writes_fill_the_queue_then_drain() {
    // Without b polling, a's writes of 2 MiB queue up until Busy; then everything drains,
    // completes in order and the region holds the last write of each slot.
    let (_a, b, mut ea, mut eb) = pair();
    let slots = 4;
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, slots * WRITE_BYTES_MAX);
    let mut posted = 0u64;
    let mut busy = 0;
    let mut evs = vec![Vec::new(), Vec::new()];
    let total = 24u64;
    while posted < total {
        let data = pattern(posted, WRITE_BYTES_MAX);
        let off = (posted % slots as u64) * WRITE_BYTES_MAX as u64;
        match ea.write(posted, &[&data], key, off, Some(posted as u32)) {
            Ok(()) => posted += 1,
            Err(FabricError::Busy) => {
                busy += 1;
                if busy > 1 {
                    // Let b drain a little.
                    drive(&mut [&mut ea, &mut eb], &mut evs, Duration::from_millis(5), |_| false);
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(busy > 0, "2 MiB writes never filled the send buffer");
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| e[0].len() == total as usize));
    let done: Vec<u64> =
        evs[0].iter().map(|e| if let Event::WriteDone { wr_id } = e { *wr_id } else { panic!("{e:?}") }).collect();
    assert_eq!(done, (0..total).collect::<Vec<_>>());
    for s in 0..slots as u64 {
        let last = (total - slots as u64..total).find(|i| i % slots as u64 == s).unwrap();
        let mut got = vec![0u8; WRITE_BYTES_MAX];
        region.copy_out(s * WRITE_BYTES_MAX as u64, &mut got).unwrap();
        assert!(got == pattern(last, WRITE_BYTES_MAX), "slot {s}");
    }
    assert_eq!(eb.stats().bytes_received, total * WRITE_BYTES_MAX as u64);
}

#[test]
fn many_small_writes_respect_the_send_depth() {
    let (_a, b, mut ea, mut eb) = pair();
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, 1 << 20);
    // The send queue holds SEND_DEPTH writes: one more is Busy until completions come back.
    for i in 0..SEND_DEPTH as u64 {
        ea.write(i, &[&i.to_le_bytes()], key, i * 8, None).unwrap();
    }
    assert_eq!(ea.write(9999, &[&[1]], key, 0, None), Err(FabricError::Busy));
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| e[0].len() == SEND_DEPTH));
    // Then 20 000 more, posting whenever there is room.
    let n = 20_000u64;
    let mut next = SEND_DEPTH as u64;
    let mut done = SEND_DEPTH;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut ev = Vec::new();
    while done < SEND_DEPTH + n as usize {
        assert!(std::time::Instant::now() < deadline, "stuck at {done}");
        while next < SEND_DEPTH as u64 + n {
            match ea.write(
                next,
                &[&next.to_le_bytes()],
                key,
                (next % 131_072) * 8,
                next.is_multiple_of(1000).then_some(next as u32),
            ) {
                Ok(()) => next += 1,
                Err(FabricError::Busy) => break,
                Err(e) => panic!("{e}"),
            }
        }
        eb.poll(&mut ev);
        ev.clear();
        ea.poll(&mut ev);
        done += ev.iter().filter(|e| matches!(e, Event::WriteDone { .. })).count();
        assert!(ev.iter().all(|e| matches!(e, Event::WriteDone { .. })), "{ev:?}");
        ev.clear();
    }
    for slot in [0u64, 1, 4095, 20_000] {
        let last = (0..SEND_DEPTH as u64 + n).rev().find(|i| i % 131_072 == slot).unwrap();
        let mut got = [0u8; 8];
        region.copy_out(slot * 8, &mut got).unwrap();
        assert_eq!(u64::from_le_bytes(got), last, "slot {slot}");
    }
    let s = ea.stats();
    assert_eq!(s.writes, SEND_DEPTH as u64 + n);
    assert_eq!(eb.stats().writes_received, s.writes);
}

#[test]
fn messages_round_trip_in_order() {
    let (_a, _b, mut ea, mut eb) = pair();
    let sizes = [0usize, 1, 17, 4096, 60_000, MSG_BYTES_MAX];
    for (i, &n) in sizes.iter().enumerate() {
        ea.send_msg(&pattern(i as u64, n)).unwrap();
    }
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| e[1].len() == sizes.len()));
    for (i, &n) in sizes.iter().enumerate() {
        assert_eq!(evs[1][i], Event::Message(pattern(i as u64, n)));
        // Echo back.
        let Event::Message(m) = &evs[1][i] else { unreachable!() };
        eb.send_msg(m).unwrap();
    }
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| e[0].len() == sizes.len()));
    for (i, &n) in sizes.iter().enumerate() {
        assert_eq!(evs[0][i], Event::Message(pattern(i as u64, n)));
    }
    assert_eq!((ea.stats().msgs_sent, ea.stats().msgs_received), (sizes.len() as u64, sizes.len() as u64));
}

#[test]
fn a_sleeping_reactor_wakes_on_its_wait_fd() {
    let (_a, b, mut ea, mut eb) = pair();
    let (region, key) = expose_to_a(&b, &mut eb, &mut ea, 4096);
    let mut ev = Vec::new();
    eb.poll(&mut ev);
    assert!(eb.arm(), "nothing pending, yet arm() says work is waiting");
    ea.write(7, &[b"wake up"], key, 100, Some(5)).unwrap();
    let mut pfd = libc::pollfd { fd: eb.wait_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(r, 1, "wait_fd never became readable");
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb], &mut evs, WAIT, |e| !e[1].is_empty() && !e[0].is_empty()));
    assert_eq!(evs[1], vec![Event::Imm { imm: 5, len: 7 }]);
    assert_eq!(evs[0], vec![Event::WriteDone { wr_id: 7 }]);
    let mut got = [0u8; 7];
    region.copy_out(100, &mut got).unwrap();
    assert_eq!(&got, b"wake up");
}
