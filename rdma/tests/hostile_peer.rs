//! A peer that authenticated but then sends frames it must not: every kind of bad frame fails
//! that endpoint alone with a protocol error naming the peer, nothing of it is applied, nothing
//! panics, and the node keeps serving its other peers.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use stager_rdma::constants::WRITE_BYTES_MAX;
use stager_rdma::wire::frame::{self, Decoded, Frame};
use stager_rdma::{Event, FabricError, RemoteKey};

/// Reads frames from a raw connection until a message arrives; returns it.
fn read_message(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    loop {
        if let Ok(Decoded::Header { frame, header_len }) = frame::decode(&buf) {
            let end = header_len + frame.body_len();
            if buf.len() >= end {
                let body = buf[header_len..end].to_vec();
                buf.drain(..end);
                if let Frame::Msg { .. } = frame {
                    return body;
                }
                continue;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read from b");
        assert!(n > 0, "b closed before sending the key");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Connects "mallory" (a configured peer that misbehaves) and a well-behaved "a" to "b"; b
/// exposes one region to each and sends mallory its key. Then mallory sends `bad`.
fn hostile_case(bad: impl FnOnce(RemoteKey) -> Vec<u8>, what: &str) {
    let b = start("b", &["a", "mallory"]);
    let a = start("a", &["b"]);
    let mut ea = a.connect(b.local_addr(), "b", WAIT).unwrap();
    let mut eb_a = accept(&b);
    let mut raw = raw_member(b.local_addr(), "mallory");
    let mut eb_m = accept(&b);
    assert_eq!(eb_m.peer(), "mallory");

    let mine = Arc::new(b.alloc_region(1 << 16).unwrap());
    let theirs = Arc::new(b.alloc_region(1 << 16).unwrap());
    let key_a = eb_a.expose(mine.clone()).unwrap();
    let key_m = eb_m.expose(theirs.clone()).unwrap();
    eb_m.send_msg(&key_m.encode()).unwrap();
    eb_m.poll(&mut Vec::new());
    let got = RemoteKey::decode(&read_message(&mut raw)).unwrap();
    assert_eq!(got, key_m);

    raw.write_all(&bad(key_m)).unwrap();
    let mut evs = vec![Vec::new()];
    assert!(drive(&mut [&mut eb_m], &mut evs, WAIT, |e| failed(&e[0]).is_some()), "{what}: endpoint did not fail");
    match failed(&evs[0]).unwrap() {
        FabricError::Protocol { peer, what: why } => {
            assert_eq!(peer, "mallory");
            eprintln!("{what}: refused with: {why}");
        }
        other => panic!("{what}: failed with {other}"),
    }
    assert_eq!(eb_m.stats().refusals, 1);
    assert!(!evs[0].iter().any(|e| matches!(e, Event::Imm { .. })), "{what}: {:?}", evs[0]);
    // Nothing of the bad frame landed anywhere.
    let mut buf = vec![0u8; 1 << 16];
    theirs.copy_out(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "{what}: mallory's region was written");
    mine.copy_out(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0), "{what}: a's region was written");
    // The connection is closed on mallory.
    raw.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    let _ = raw.read_to_end(&mut rest);
    // A dead endpoint takes no more work and reports nothing more.
    assert!(matches!(eb_m.send_msg(b"x"), Err(FabricError::Closed(_))));
    assert_eq!(eb_m.poll(&mut Vec::new()), 0);

    // a is served as before.
    ea.write(1, &[b"still here"], key_a, 64, Some(3)).unwrap();
    let mut evs = vec![Vec::new(), Vec::new()];
    assert!(drive(&mut [&mut ea, &mut eb_a], &mut evs, WAIT, |e| !e[0].is_empty() && !e[1].is_empty()));
    assert_eq!(evs[1], vec![Event::Imm { imm: 3, len: 10 }]);
    let mut got = [0u8; 10];
    mine.copy_out(64, &mut got).unwrap();
    assert_eq!(&got, b"still here");
}

fn write_frame(key: u32, offset: u64, body: &[u8]) -> Vec<u8> {
    frame_bytes(Frame::Write { key, offset, imm: Some(1), len: body.len() as u32 }, body)
}

#[test]
fn unknown_key() {
    hostile_case(|k| write_frame(key_of(k) ^ 0x5a5a_0000, 0, b"x"), "unknown key");
}

#[test]
fn write_past_the_end() {
    hostile_case(|k| write_frame(key_of(k), k.len() - 4, &[1u8; 8]), "write past the end");
}

#[test]
fn offset_that_overflows() {
    hostile_case(|k| write_frame(key_of(k), u64::MAX - 2, &[1u8; 8]), "offset overflow");
}

#[test]
fn length_beyond_the_limit() {
    hostile_case(
        |k| {
            let mut f = write_frame(key_of(k), 0, &[1u8; 16]);
            f[4..8].copy_from_slice(&(WRITE_BYTES_MAX as u32 + 1).to_le_bytes());
            f
        },
        "length beyond the limit",
    );
}

#[test]
fn unknown_frame_type() {
    hostile_case(|_| vec![0x77, 0, 0, 0, 0, 0, 0, 0], "unknown frame type");
}

#[test]
fn ack_for_writes_never_sent() {
    hostile_case(|_| frame_bytes(Frame::Ack { count: 3 }, &[]), "bogus ack");
}

#[test]
fn immediate_without_its_flag() {
    hostile_case(
        |k| {
            let mut f = frame_bytes(Frame::Write { key: key_of(k), offset: 0, imm: None, len: 1 }, &[1]);
            f[12] = 9;
            f
        },
        "stray immediate",
    );
}

#[test]
fn garbage_after_a_good_write_is_refused_but_the_good_write_stays() {
    // A good write (placed, visible) followed by garbage: the endpoint fails, the good write
    // stays placed — bytes are applied frame by frame, a bad frame never partly.
    let b = start("b", &["mallory"]);
    let mut raw = raw_member(b.local_addr(), "mallory");
    let mut eb = accept(&b);
    let region = Arc::new(b.alloc_region(4096).unwrap());
    let key = eb.expose(region.clone()).unwrap();
    let mut bytes = write_frame(key_of(key), 10, b"good");
    bytes.extend_from_slice(&[0xEE; 40]);
    raw.write_all(&bytes).unwrap();
    let mut evs = vec![Vec::new()];
    assert!(drive(&mut [&mut eb], &mut evs, WAIT, |e| failed(&e[0]).is_some()));
    assert_eq!(evs[0][0], Event::Imm { imm: 1, len: 4 });
    let mut got = [0u8; 4];
    region.copy_out(10, &mut got).unwrap();
    assert_eq!(&got, b"good");
}

#[test]
fn a_frame_cut_by_a_closed_connection_fails_cleanly() {
    let b = start("b", &["mallory"]);
    let mut raw = raw_member(b.local_addr(), "mallory");
    let mut eb = accept(&b);
    let region = Arc::new(b.alloc_region(1 << 20).unwrap());
    let key = eb.expose(region.clone()).unwrap();
    let f = write_frame(key_of(key), 0, &vec![3u8; 100_000]);
    raw.write_all(&f[..50_000]).unwrap();
    drop(raw);
    let mut evs = vec![Vec::new()];
    assert!(drive(&mut [&mut eb], &mut evs, WAIT, |e| failed(&e[0]).is_some()));
    assert!(matches!(failed(&evs[0]), Some(FabricError::PeerGone(_))), "{:?}", evs[0]);
    assert!(!evs[0].iter().any(|e| matches!(e, Event::Imm { .. })));
    std::thread::sleep(Duration::from_millis(10));
}

/// The tcp backend's key (the first field of the encoding).
fn key_of(k: RemoteKey) -> u32 {
    u32::from_le_bytes(k.encode()[..4].try_into().unwrap())
}
