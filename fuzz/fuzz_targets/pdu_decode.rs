//! One buffer of arbitrary bytes through the NVMe/TCP PDU decoder (`pdu::peek`, `pdu::decode`)
//! under every digest combination and several data limits, checking what a caller relies on:
//!
//! - `peek` and `decode` agree (same error, same PLEN);
//! - `Need(n)` always asks for more than the buffer holds, and never for more than a PDU within
//!   `max_data` can be (the receive buffer is sized on that bound);
//! - a `Frame` lies inside the buffer, its data inside the frame; its data digest is "ok" when
//!   no data digest was negotiated; trailing bytes after it do not change it, and every proper
//!   prefix of it asks for more (never an error, never a different frame);
//! - raising `max_data` never turns a frame into an error;
//! - `decode_head` (the header before its data) agrees with `decode`: same errors, a head for
//!   every frame with the same PDU, length and data range, never more bytes asked for, and an
//!   early head only for a PDU whose data a receiver places (`Head::has_payload`);
//! - re-encoding the decoded PDU with its data (`pdu::encode`) decodes to the same `Pdu` and
//!   the same data, and encoding is then a fixed point (canonical bytes). The original bytes
//!   are not compared: encode writes canonical PDO (right after the header), clears flag bits
//!   the `Pdu` does not keep (reserved bits, DDGSTF on a PDU without data), zeroes reserved
//!   header bytes and drops the phase/CRD/M bits of a CapsuleResp status.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_nvme::constants::{DIGEST_BYTES, PDU_LEN_MAX};
use stager_nvme::tcp::pdu::{self, fes, Decoded, Digests, Frame, HeadDecoded, COMMON_HEADER_BYTES, TERM_DATA_MAX};

/// Data limits to decode under, ascending: none, a sector, the admin in-capsule size, the
/// default MAXH2CDATA, and no limit at all.
const MAX_DATA: [usize; 5] = [0, 512, 8192, 128 << 10, usize::MAX];

/// Largest PLEN a PDU that passes `peek` may have: PDO is one byte, so data starts at most at
/// 255; a TermReq is at most its 24-byte header plus TERM_DATA_MAX; other headers are <= 128.
fn plen_bound(max_data: usize) -> usize {
    max_data.saturating_add(255 + DIGEST_BYTES).clamp(24 + TERM_DATA_MAX, PDU_LEN_MAX)
}

fuzz_target!(|buf: &[u8]| {
    for bits in 0..4 {
        let digests = Digests::from_bits(bits);
        let mut frame_at_lower_limit: Option<Frame> = None;
        for max_data in MAX_DATA {
            let frame = check(buf, digests, max_data);
            if let Some(lower) = &frame_at_lower_limit {
                assert_eq!(frame.as_ref(), Some(lower), "raising max_data to {max_data} changed a decoded frame");
            }
            if frame.is_some() {
                frame_at_lower_limit = frame;
            }
        }
    }
});

/// Decodes `buf` once and checks every invariant; returns the frame if there was one.
fn check(buf: &[u8], digests: Digests, max_data: usize) -> Option<Frame> {
    let peeked = pdu::peek(buf, digests, max_data);
    let decoded = pdu::decode(buf, digests, max_data);
    match (&peeked, &decoded) {
        (Err(pe), Err(de)) => assert_eq!(pe, de, "peek and decode report different errors"),
        (Err(pe), Ok(d)) => panic!("peek failed ({pe}) but decode gave {d:?}"),
        (Ok(None), d) => {
            assert!(buf.len() < COMMON_HEADER_BYTES, "peek wants a header of a {}-byte buffer", buf.len());
            assert_eq!(d, &Ok(Decoded::Need(COMMON_HEADER_BYTES)));
        }
        (Ok(Some(plen)), d) => {
            let plen = *plen;
            assert!(plen >= COMMON_HEADER_BYTES && plen <= plen_bound(max_data), "peek accepted PLEN {plen}");
            match d {
                Ok(Decoded::Need(n)) => {
                    assert!(buf.len() < plen, "Need with the whole PDU present");
                    assert_eq!(*n, plen, "Need differs from PLEN");
                }
                Ok(Decoded::Frame(f)) => assert_eq!(f.len, plen, "frame length differs from PLEN"),
                // Past the common header only the digest and DATAL checks may fail.
                Err(e) => assert!(
                    buf.len() >= plen && [fes::HEADER_DIGEST_ERROR, fes::DATA_OUT_OF_RANGE].contains(&e.fes),
                    "unexpected error after peek accepted the header: {e}"
                ),
            }
        }
    }
    check_head(buf, digests, max_data, &decoded);
    match decoded {
        Ok(Decoded::Need(n)) => {
            assert!(n > buf.len(), "Need({n}) with {} bytes present: no progress", buf.len());
            assert!(n <= plen_bound(max_data), "Need({n}) beyond any PDU within max_data {max_data}");
            None
        }
        Err(_) => None,
        Ok(Decoded::Frame(f)) => {
            check_frame(buf, digests, max_data, &f);
            Some(f)
        }
    }
}

/// `decode_head` against what `decode` said about the same bytes.
fn check_head(buf: &[u8], digests: Digests, max_data: usize, decoded: &Result<Decoded, pdu::PduError>) {
    let head = pdu::decode_head(buf, digests, max_data);
    match (decoded, &head) {
        (Err(e), Err(h)) => assert_eq!(e, h, "decode and decode_head report different errors"),
        (Err(e), Ok(h)) => panic!("decode failed ({e}) but decode_head gave {h:?}"),
        (Ok(Decoded::Frame(f)), Ok(HeadDecoded::Head(h))) => {
            assert_eq!((&h.pdu, &h.data, h.len), (&f.pdu, &f.data, f.len), "head differs from frame");
        }
        (Ok(Decoded::Frame(f)), other) => panic!("decode found {:?} but decode_head gave {other:?}", f.pdu),
        (Ok(Decoded::Need(n)), Ok(HeadDecoded::Need(m))) => {
            assert!(m <= n && *m > buf.len(), "decode_head needs {m}, decode {n}, buffer {}", buf.len());
        }
        (Ok(Decoded::Need(_)), Ok(HeadDecoded::Head(h))) => {
            assert!(h.has_payload(), "a head before the whole {:?}, which has no payload to place", h.pdu);
            assert!(h.data.start <= buf.len() && h.data.end <= h.len, "head data {:?} of {}", h.data, h.len);
        }
        // The header (digest, DATAL) can be judged before the data is in.
        (Ok(Decoded::Need(_)), Err(e)) => assert!(
            [fes::HEADER_DIGEST_ERROR, fes::DATA_OUT_OF_RANGE].contains(&e.fes),
            "decode_head failed early with {e}"
        ),
    }
}

fn check_frame(buf: &[u8], digests: Digests, max_data: usize, f: &Frame) {
    assert!(
        f.len >= COMMON_HEADER_BYTES && f.len <= buf.len(),
        "frame of {} bytes in a {}-byte buffer",
        f.len,
        buf.len()
    );
    assert!(f.data.start <= f.data.end && f.data.end <= f.len, "data {:?} outside the {}-byte frame", f.data, f.len);
    assert!(f.data_digest_ok || digests.data, "data digest failed with no data digest negotiated");
    let data = &buf[f.data.clone()];

    // Bytes after the PDU are not part of it.
    assert_eq!(pdu::decode(&buf[..f.len], digests, max_data), Ok(Decoded::Frame(f.clone())));
    // Every proper prefix asks for more: a receiver never acts on half a PDU.
    for cut in [0, 1, COMMON_HEADER_BYTES - 1, COMMON_HEADER_BYTES, f.len / 2, f.len - 1] {
        if cut < f.len {
            let want = if cut < COMMON_HEADER_BYTES { COMMON_HEADER_BYTES } else { f.len };
            assert_eq!(pdu::decode(&buf[..cut], digests, max_data), Ok(Decoded::Need(want)), "prefix of {cut}");
        }
    }

    // Round trip through the encoder.
    let mut out = Vec::new();
    pdu::encode(&f.pdu, data, digests, &mut out);
    let g = match pdu::decode(&out, digests, max_data) {
        Ok(Decoded::Frame(g)) => g,
        other => panic!("re-encoded {:?} with {} data bytes does not decode: {other:?}", f.pdu, data.len()),
    };
    assert_eq!(g.pdu, f.pdu, "round trip changed the PDU");
    assert_eq!(&out[g.data.clone()], data, "round trip changed the data");
    assert_eq!(g.len, out.len(), "re-encoded PDU is not all of the encoder's output");
    assert!(g.data_digest_ok, "encoder wrote a bad data digest");
    // The encoder's output is canonical: encoding it again gives the same bytes.
    let mut again = Vec::new();
    pdu::encode(&g.pdu, &out[g.data.clone()], digests, &mut again);
    assert_eq!(again, out, "encode(decode(encode(x))) != encode(x)");
}
