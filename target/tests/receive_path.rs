//! The receive path against the real target over real sockets: PDU streams cut at every byte
//! (each cut its own TCP segment), many PDUs in one send, header and data digests, writes
//! whose data comes through several outstanding R2Ts answered out of order, the per-R2T rules
//! an H2CData must follow — and the transport's own count of how a write's data reached its
//! I/O buffer (copied from the receive buffer, or received straight into it).
//!
//! Every case checks bytes: what was written is read back through a second, well-behaved host.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use stager_nvme::command::{sgl, Command, DataDirection};
use stager_nvme::host::{io_cmd, Controller, HostOptions};
use stager_nvme::status::Status;
use stager_nvme::tcp::pdu::{self, fes, DataHeader, Decoded, Digests, Pdu, R2t};

/// An I/O queue connected through the host library, then handed over as its raw socket.
fn raw_queue(t: &TestTarget, o: &HostOptions) -> (Controller, TcpStream, Digests) {
    let mut c = t.connect(&HostOptions { io_queues: 1, ..o.clone() });
    let q = c.take_io_queues().pop().expect("an I/O queue");
    let (s, dg) = q.into_raw();
    s.set_nonblocking(false).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (c, s, dg)
}

fn capsule(cmd: Command, cid: u16, data: &[u8], dg: Digests, out: &mut Vec<u8>) {
    let mut cmd = cmd;
    cmd.set_cid(cid);
    if data.is_empty() {
        cmd.set_sgl(sgl::TRANSPORT, 0, cmd.sgl_length());
    } else {
        cmd.set_sgl(sgl::IN_CAPSULE, 0, data.len() as u32);
    }
    pdu::encode(&Pdu::CapsuleCmd(cmd), data, dg, out);
}

/// Reads PDUs until `n` response capsules arrived; returns them and any R2Ts / C2H data.
struct Reader {
    buf: Vec<u8>,
}

impl Reader {
    fn new() -> Reader {
        Reader { buf: Vec::new() }
    }
    fn next(&mut self, s: &mut TcpStream, dg: Digests) -> Pdu {
        self.next_with_data(s, dg).0
    }
    fn next_with_data(&mut self, s: &mut TcpStream, dg: Digests) -> (Pdu, Vec<u8>) {
        loop {
            match pdu::decode(&self.buf, dg, 1 << 24) {
                Ok(Decoded::Frame(f)) => {
                    assert!(f.data_digest_ok, "bad data digest from the target");
                    let data = self.buf[f.data.clone()].to_vec();
                    self.buf.drain(..f.len);
                    return (f.pdu, data);
                }
                Ok(Decoded::Need(_)) => {}
                Err(e) => panic!("undecodable PDU from the target: {e}"),
            }
            let mut b = [0u8; 65536];
            let n = s.read(&mut b).expect("the target answers");
            assert!(n > 0, "the target closed the connection");
            self.buf.extend_from_slice(&b[..n]);
        }
    }
    fn response(&mut self, s: &mut TcpStream, dg: Digests) -> (u16, Status) {
        match self.next(s, dg) {
            Pdu::CapsuleResp(c) => (c.cid, c.status),
            other => panic!("expected a response capsule, got {other:?}"),
        }
    }
}

/// Sends `bytes` as two TCP segments split at `cut`, with a pause between them so the
/// target's receive sees the first piece on its own.
fn send_cut(s: &mut TcpStream, bytes: &[u8], cut: usize) {
    s.write_all(&bytes[..cut]).unwrap();
    std::thread::sleep(Duration::from_micros(150));
    s.write_all(&bytes[cut..]).unwrap();
}

fn read_back(c: &mut Controller, nsid: u32, slba: u64, bs: usize, len: usize) -> Vec<u8> {
    let q = c.io_queue(0);
    let r = q
        .execute(io_cmd::read(nsid, slba, (len / bs) as u32), vec![0; len], DataDirection::ControllerToHost)
        .expect("read");
    assert_eq!(r.status(), Status::SUCCESS);
    r.data
}

#[test]
fn a_stream_cut_at_every_byte_reaches_the_device() {
    let mut cfg = config();
    // 4 KiB in-capsule data: an 8 KiB write goes through R2T.
    cfg.transport.in_capsule_data_bytes = 4096;
    let t = TestTarget::start(cfg);
    let mut good = t.connect(&opts());
    for dg in [Digests::default(), Digests { header: true, data: true }] {
        let (_c, mut s, dg) = raw_queue(&t, &HostOptions { digests: dg, ..opts() });
        let mut rd = Reader::new();
        // A 512-byte in-capsule write to nsid 2 (512-byte blocks) and a read, cut at every byte.
        let mut probe = Vec::new();
        capsule(io_cmd::write(2, 0, 1), 1, &[0; 512], dg, &mut probe);
        for cut in 1..probe.len() + 72 {
            let lba = cut as u64;
            let mut bytes = Vec::new();
            capsule(io_cmd::write(2, lba, 1), 1, &pattern(lba, 512), dg, &mut bytes);
            let mut r = io_cmd::read(2, lba, 1);
            r.set_sgl(sgl::TRANSPORT, 0, 512);
            capsule(r, 2, &[], dg, &mut bytes);
            send_cut(&mut s, &bytes, cut.min(bytes.len() - 1));
            assert_eq!(rd.response(&mut s, dg), (1, Status::SUCCESS), "write, cut at {cut}");
            let (p, data) = rd.next_with_data(&mut s, dg);
            assert!(matches!(p, Pdu::C2HData(_)), "C2HData, cut at {cut}");
            assert!(data == pattern(lba, 512), "read after the write cut at {cut}: other bytes");
            assert_eq!(rd.response(&mut s, dg), (2, Status::SUCCESS));
        }
        // An 8 KiB write through R2T, its H2CData cut at every 37th byte and around its edges.
        let mut h2c_len = 0;
        let mut cuts: Vec<usize> = (1..100).chain((100..8300).step_by(37)).collect();
        cuts.push(usize::MAX);
        for (i, cut) in cuts.into_iter().enumerate() {
            let lba = 1000 + i as u64 * 2;
            let mut w = io_cmd::write(1, lba, 2);
            w.set_sgl(sgl::TRANSPORT, 0, 8192);
            let mut bytes = Vec::new();
            capsule(w, 3, &[], dg, &mut bytes);
            s.write_all(&bytes).unwrap();
            let Pdu::R2T(r2t) = rd.next(&mut s, dg) else { panic!("expected an R2T") };
            assert_eq!((r2t.cccid, r2t.offset, r2t.length), (3, 0, 8192));
            let data = pattern(lba, 8192);
            let h = DataHeader { cccid: 3, ttag: r2t.ttag, offset: 0, length: 8192, last: true, success: false };
            let mut pdu_bytes = Vec::new();
            pdu::encode(&Pdu::H2CData(h), &data, dg, &mut pdu_bytes);
            h2c_len = pdu_bytes.len();
            send_cut(&mut s, &pdu_bytes, cut.clamp(1, pdu_bytes.len() - 1));
            assert_eq!(rd.response(&mut s, dg), (3, Status::SUCCESS), "R2T write, H2CData cut at {cut}");
            assert!(read_back(&mut good, 1, lba, 4096, 8192) == data, "H2CData cut at {cut}: other bytes");
        }
        assert!(h2c_len > 8192);
    }
    good.shutdown().unwrap();
}

#[test]
fn many_pdus_in_one_send() {
    let t = TestTarget::default();
    let mut good = t.connect(&opts());
    for dg in [Digests::default(), Digests { header: true, data: true }] {
        let (_c, mut s, dg) = raw_queue(&t, &HostOptions { digests: dg, queue_depth: 128, ..opts() });
        let mut rd = Reader::new();
        // 64 in-capsule writes and 32 reads of other blocks, all in one write().
        let mut bytes = Vec::new();
        for i in 0..64u16 {
            capsule(io_cmd::write(1, 200 + i as u64, 1), i, &pattern(7000 + i as u64, 4096), dg, &mut bytes);
        }
        for i in 0..32u16 {
            let mut r = io_cmd::read(1, 5000 + i as u64, 1);
            r.set_sgl(sgl::TRANSPORT, 0, 4096);
            capsule(r, 100 + i, &[], dg, &mut bytes);
        }
        s.write_all(&bytes).unwrap();
        let mut answered = 0;
        while answered < 96 {
            match rd.next(&mut s, dg) {
                Pdu::CapsuleResp(c) => {
                    assert_eq!(c.status, Status::SUCCESS, "cid {}", c.cid);
                    answered += 1;
                }
                Pdu::C2HData(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        let back = read_back(&mut good, 1, 200, 4096, 64 * 4096);
        for i in 0..64usize {
            assert!(back[i * 4096..(i + 1) * 4096] == pattern(7000 + i as u64, 4096), "block {}", 200 + i);
        }
    }
    good.shutdown().unwrap();
}

#[test]
fn several_r2ts_answered_out_of_order() {
    let t = TestTarget::default();
    let mut good = t.connect(&opts());
    // The host takes four R2Ts per command (MAXR2T 3); MAXH2CDATA is 128 KiB.
    let (_c, mut s, dg) = raw_queue(&t, &HostOptions { maxr2t: 3, ..opts() });
    let mut rd = Reader::new();
    let data = pattern(42, 512 << 10);
    let mut w = io_cmd::write(1, 4096, 128);
    w.set_sgl(sgl::TRANSPORT, 0, 512 << 10);
    let mut bytes = Vec::new();
    capsule(w, 9, &[], dg, &mut bytes);
    s.write_all(&bytes).unwrap();
    let r2ts: Vec<R2t> = (0..4)
        .map(|_| match rd.next(&mut s, dg) {
            Pdu::R2T(r) => r,
            other => panic!("expected four R2Ts at once, got {other:?}"),
        })
        .collect();
    let mut offsets: Vec<(u32, u32)> = r2ts.iter().map(|r| (r.offset, r.length)).collect();
    offsets.sort();
    assert_eq!(offsets, (0..4).map(|k| (k * (128 << 10), 128 << 10)).collect::<Vec<_>>());
    let mut tags: Vec<u16> = r2ts.iter().map(|r| r.ttag).collect();
    tags.dedup();
    assert_eq!(tags.len(), 4, "each outstanding R2T has its own transfer tag");
    // Answer the last R2T first, each in two H2CData PDUs (LAST_PDU on the second).
    let mut bytes = Vec::new();
    for r in r2ts.iter().rev() {
        for half in 0..2u32 {
            let off = r.offset + half * (r.length / 2);
            let h = DataHeader {
                cccid: 9,
                ttag: r.ttag,
                offset: off,
                length: r.length / 2,
                last: half == 1,
                success: false,
            };
            let d = &data[off as usize..(off + r.length / 2) as usize];
            pdu::encode(&Pdu::H2CData(h), d, dg, &mut bytes);
        }
    }
    s.write_all(&bytes).unwrap();
    assert_eq!(rd.response(&mut s, dg), (9, Status::SUCCESS));
    assert!(read_back(&mut good, 1, 4096, 4096, 512 << 10) == data, "data of out-of-order R2Ts");

    // A host that takes one R2T at a time (MAXR2T 0) gets one for the whole transfer.
    let (_c2, mut s2, dg2) = raw_queue(&t, &HostOptions { maxr2t: 0, ..opts() });
    let mut rd2 = Reader::new();
    let mut bytes = Vec::new();
    let mut w = io_cmd::write(1, 8192, 128);
    w.set_sgl(sgl::TRANSPORT, 0, 512 << 10);
    capsule(w, 1, &[], dg2, &mut bytes);
    s2.write_all(&bytes).unwrap();
    let Pdu::R2T(r) = rd2.next(&mut s2, dg2) else { panic!("expected an R2T") };
    assert_eq!((r.offset, r.length), (0, 512 << 10));
    good.shutdown().unwrap();
}

#[test]
fn h2cdata_outside_its_r2t_is_fatal() {
    let t = TestTarget::default();
    let mut good = t.connect(&opts());
    type Bad = fn(&R2t) -> DataHeader;
    let cases: [(&str, Bad, u16); 3] = [
        (
            "offset beyond the next byte of its R2T",
            |r| DataHeader {
                cccid: 9,
                ttag: r.ttag,
                offset: r.offset + 4096,
                length: 4096,
                last: false,
                success: false,
            },
            fes::DATA_OUT_OF_RANGE,
        ),
        (
            "LAST_PDU before the end of its R2T",
            |r| DataHeader { cccid: 9, ttag: r.ttag, offset: r.offset, length: 4096, last: true, success: false },
            fes::INVALID_HEADER_FIELD,
        ),
        (
            "a transfer tag of another command",
            |r| DataHeader { cccid: 8, ttag: r.ttag, offset: r.offset, length: 4096, last: false, success: false },
            fes::INVALID_HEADER_FIELD,
        ),
    ];
    for (name, bad, want) in cases {
        let (_c, mut s, dg) = raw_queue(&t, &HostOptions { maxr2t: 3, ..opts() });
        let mut rd = Reader::new();
        let mut w = io_cmd::write(1, 0, 128);
        w.set_sgl(sgl::TRANSPORT, 0, 512 << 10);
        let mut bytes = Vec::new();
        capsule(w, 9, &[], dg, &mut bytes);
        s.write_all(&bytes).unwrap();
        let Pdu::R2T(r) = rd.next(&mut s, dg) else { panic!("expected an R2T") };
        let mut bytes = Vec::new();
        pdu::encode(&Pdu::H2CData(bad(&r)), &[1; 4096], dg, &mut bytes);
        s.write_all(&bytes).unwrap();
        let term = loop {
            match rd.next(&mut s, dg) {
                Pdu::C2HTermReq(t) => break t,
                Pdu::R2T(_) => {}
                other => panic!("{name}: expected a C2HTermReq, got {other:?}"),
            }
        };
        assert_eq!(term.fes, want, "{name}");
        // Others keep working.
        let q = good.io_queue(0);
        q.execute(io_cmd::write(1, 77, 1), pattern(77, 4096), DataDirection::HostToController).unwrap().ok().unwrap();
    }
    good.shutdown().unwrap();
}

#[test]
fn large_write_data_lands_in_the_io_buffer_without_a_copy() {
    let t = TestTarget::default();
    let mut c = t.connect(&HostOptions { queue_depth: 8, ..opts() });
    let stats = || {
        let s = t.target.as_ref().unwrap().transport_stats();
        (s.rx_data_copied_bytes.load(Ordering::Relaxed), s.rx_data_direct_bytes.load(Ordering::Relaxed))
    };
    // Connections add their counts on their timer ticks (every 250 ms): wait for `bytes` more.
    let settle = |from: (u64, u64), bytes: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (c, d) = stats();
            if (c - from.0) + (d - from.1) >= bytes || std::time::Instant::now() > deadline {
                return (c, d);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // The Connect commands' data (1 KiB each) is counted too: let those counts land first.
    std::thread::sleep(Duration::from_millis(600));
    let (c0, d0) = stats();
    // 32 writes of 1 MiB: R2Ts out, so receives stop at each header; the data goes straight in.
    let q = c.io_queue(0);
    for i in 0..32u64 {
        let r = q.execute(io_cmd::write(1, i * 256, 256), pattern(i, 1 << 20), DataDirection::HostToController);
        assert_eq!(r.unwrap().status(), Status::SUCCESS);
    }
    let (c1, d1) = settle((c0, d0), 32 << 20);
    let (copied, direct) = (c1 - c0, d1 - d0);
    assert_eq!(copied + direct, 32 << 20, "every data byte is counted once");
    assert!(copied * 100 <= (32 << 20), "large writes copied {copied} of {} bytes", 32 << 20);
    // Small in-capsule writes arrive with their capsule: that data is copied, and counted so.
    for i in 0..64u64 {
        let r = q.execute(io_cmd::write(1, 9000 + i, 1), pattern(i, 4096), DataDirection::HostToController);
        assert_eq!(r.unwrap().status(), Status::SUCCESS);
    }
    let (c2, d2) = settle((c1, d1), 64 * 4096);
    assert_eq!((c2 - c1) + (d2 - d1), 64 * 4096);
    for i in [0u64, 17, 31] {
        assert!(read_back(&mut c, 1, i * 256, 4096, 1 << 20) == pattern(i, 1 << 20));
    }
    c.shutdown().unwrap();
}
