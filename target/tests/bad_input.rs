//! Malformed PDUs from a host: each terminates only the offending connection with the
//! C2HTermReq the NVMe/TCP spec prescribes (right FES, the offending header echoed), and a
//! healthy connection on the same target keeps working throughout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use stager_nvme::command::{Command, DataDirection};
use stager_nvme::host::io_cmd;
use stager_nvme::tcp::pdu::{self, fes, DataHeader, Decoded, Digests, Pdu, TermReq};

/// Opens a raw TCP connection and does the ICReq/ICResp exchange with `digests`.
fn raw_conn(t: &TestTarget, ic: bool, digests: Digests) -> TcpStream {
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if ic {
        let mut b = Vec::new();
        pdu::encode(&Pdu::IcReq { pfv: 0, hpda: 0, digests, maxr2t: 0 }, &[], Digests::default(), &mut b);
        s.write_all(&b).unwrap();
        let mut resp = [0u8; 128];
        s.read_exact(&mut resp).unwrap();
        assert_eq!(resp[0], 0x01, "ICResp");
    }
    s
}

/// Reads until EOF; returns the C2HTermReq found (and checks nothing follows it).
fn expect_term(s: &mut TcpStream, digests: Digests) -> (TermReq, Vec<u8>) {
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let mut off = 0;
    while off < all.len() {
        match pdu::decode(&all[off..], digests, 1 << 24) {
            Ok(Decoded::Frame(f)) => {
                if let Pdu::C2HTermReq(t) = f.pdu {
                    assert_eq!(off + f.len, all.len(), "bytes after the C2HTermReq");
                    return (t, all[off + f.data.start..off + f.data.end].to_vec());
                }
                off += f.len;
            }
            other => panic!("undecodable bytes from the target: {other:?}"),
        }
    }
    panic!("connection closed without a C2HTermReq ({} bytes)", all.len());
}

fn capsule(cmd: Command, data: &[u8], digests: Digests) -> Vec<u8> {
    let mut b = Vec::new();
    pdu::encode(&Pdu::CapsuleCmd(cmd), data, digests, &mut b);
    b
}

#[test]
fn malformed_pdus_terminate_only_their_connection() {
    let t = TestTarget::default();
    // A healthy host that must be unaffected by everything below.
    let mut good = t.connect(&opts());
    let check_good = |good: &mut stager_nvme::host::Controller, i: u64| {
        let q = good.io_queue(0);
        q.execute(io_cmd::write(1, i, 1), pattern(i, 4096), DataDirection::HostToController).unwrap().ok().unwrap();
        let r = q.execute(io_cmd::read(1, i, 1), vec![0; 4096], DataDirection::ControllerToHost).unwrap();
        assert!(r.data == pattern(i, 4096), "healthy connection got other data after case {i}");
    };
    let dg = Digests::default();
    let hd = Digests { header: true, data: false };
    let dd = Digests { header: true, data: true };
    let ident = stager_nvme::host::identify_cmd(1, 0);
    let mut cases: Vec<(&str, bool, Digests, Vec<u8>, u16)> = Vec::new();
    // A capsule before ICReq.
    cases.push(("capsule before ICReq", false, dg, capsule(ident, &[], dg), fes::PDU_SEQUENCE_ERROR));
    // Wrong header length.
    let mut b = capsule(ident, &[], dg);
    b[2] = 70;
    cases.push(("wrong HLEN", true, dg, b, fes::INVALID_HEADER_FIELD));
    // Unknown PDU type.
    let mut b = capsule(ident, &[], dg);
    b[0] = 0x0C;
    cases.push(("unknown PDU type", true, dg, b, fes::INVALID_HEADER_FIELD));
    // A PDU type only a controller sends.
    let mut b = Vec::new();
    pdu::encode(&Pdu::R2T(pdu::R2t { cccid: 1, ttag: 1, offset: 0, length: 4096 }), &[], dg, &mut b);
    cases.push(("R2T from a host", true, dg, b, fes::INVALID_HEADER_FIELD));
    // H2CData for a transfer tag that was never issued.
    let mut b = Vec::new();
    let h = DataHeader { cccid: 3, ttag: 9, offset: 0, length: 4096, last: true, success: false };
    pdu::encode(&Pdu::H2CData(h), &[0; 4096], dg, &mut b);
    cases.push(("H2CData unknown ttag", true, dg, b, fes::INVALID_HEADER_FIELD));
    // H2CData larger than MAXH2CDATA (128 KiB).
    let mut b = Vec::new();
    let h = DataHeader { cccid: 3, ttag: 0, offset: 0, length: 256 << 10, last: true, success: false };
    pdu::encode(&Pdu::H2CData(h), &vec![0; 256 << 10], dg, &mut b);
    cases.push(("H2CData beyond MAXH2CDATA", true, dg, b, fes::DATA_LIMIT_EXCEEDED));
    // Bad header digest.
    let mut b = capsule(ident, &[], hd);
    b[75] ^= 0xFF;
    cases.push(("bad header digest", true, hd, b, fes::HEADER_DIGEST_ERROR));
    // Header digest flag missing although negotiated.
    cases.push(("missing HDGSTF", true, hd, capsule(ident, &[], dg), fes::INVALID_HEADER_FIELD));
    // Absurd PLEN.
    let mut b = capsule(ident, &[], dg);
    b[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("PLEN 4 GiB", true, dg, b, fes::INVALID_HEADER_FIELD));
    // ICReq with an unsupported PDU format version.
    let mut b = Vec::new();
    pdu::encode(&Pdu::IcReq { pfv: 1, hpda: 0, digests: dg, maxr2t: 0 }, &[], dg, &mut b);
    cases.push(("ICReq PFV 1", false, dg, b, fes::UNSUPPORTED_PARAMETER));

    for (i, (name, ic, digests, bytes, want_fes)) in cases.into_iter().enumerate() {
        let mut s = raw_conn(&t, ic, digests);
        s.write_all(&bytes).unwrap();
        let (term, echoed) = expect_term(&mut s, digests);
        assert_eq!(term.fes, want_fes, "{name}: FES");
        assert!(!echoed.is_empty() && bytes.starts_with(&echoed), "{name}: the TermReq echoes the offending header");
        check_good(&mut good, i as u64);
    }

    // A data digest error is not fatal: the command fails with a transient transport error.
    let mut s = raw_conn(&t, true, dd);
    let mut b = Vec::new();
    let mut w = io_cmd::write(1, 0, 1);
    w.set_cid(5);
    w.set_sgl(stager_nvme::command::sgl::IN_CAPSULE, 0, 4096);
    pdu::encode(&Pdu::CapsuleCmd(w), &[1; 4096], dd, &mut b);
    let n = b.len();
    b[n - 10] ^= 1; // inside the data
    s.write_all(&b).unwrap();
    let mut resp = vec![0u8; 8 + 16 + 4];
    s.read_exact(&mut resp).unwrap();
    let Ok(Decoded::Frame(f)) = pdu::decode(&resp, dd, 0) else { panic!("no response") };
    let Pdu::CapsuleResp(c) = f.pdu else { panic!("expected CapsuleResp, got {:?}", f.pdu) };
    // Not connected yet, so sequence error would be acceptable too; the digest check comes first.
    assert!(c.status.same_code(stager_nvme::status::Status::TRANSIENT_TRANSPORT_ERROR), "{}", c.status);
    check_good(&mut good, 100);

    // A truncated PDU, then close: the target drops the connection and keeps serving.
    let mut s = raw_conn(&t, true, dg);
    let b = capsule(ident, &[], dg);
    s.write_all(&b[..30]).unwrap();
    drop(s);
    // A connection that closes mid-ICReq.
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.write_all(&[0u8; 50]).unwrap();
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    check_good(&mut good, 101);
    good.shutdown().unwrap();
}
