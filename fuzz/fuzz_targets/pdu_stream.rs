//! A byte stream of PDUs as the target's receive loop sees it (target/src/transport/tcp.rs,
//! `Connection::on_recv`): decode at the current offset; on a frame act on it and advance by
//! its length; on `Need` wait for more bytes; on an error terminate. Until an ICReq has been
//! decoded no digests apply; after it, the digests the ICReq asked for (the target grants them).
//!
//! The first input byte picks the data limit (low 2 bits) and how the stream arrives (the
//! rest: the chunk size of each "receive"); the remaining bytes are the stream. The stream is
//! decoded twice — all at once, and arriving chunk by chunk with decode retried after every
//! chunk — and both must see the same frames and the same terminal error: a PDU split across
//! receives decodes exactly like one that arrived whole. Every frame advances the offset (the
//! loop cannot spin), and the loop never runs more often than there are header-sized pieces.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_nvme::tcp::pdu::{self, Decoded, Digests, Pdu, PduError, COMMON_HEADER_BYTES};

/// Data limits: the admin queue's in-capsule size, the default MAXH2CDATA, and two odd ones.
const MAX_DATA: [usize; 4] = [8192, 128 << 10, 0, 4096 + 17];

#[derive(Debug, PartialEq)]
enum Event {
    Frame { pdu: Pdu, at: usize, len: usize, data: Vec<u8>, data_digest_ok: bool },
    Error(PduError),
}

/// Decodes `stream[..avail]` from `*pos` on as far as it goes, appending what happens.
/// Returns false once the connection would be terminated.
fn drain(
    stream: &[u8],
    avail: usize,
    pos: &mut usize,
    digests: &mut Option<Digests>,
    max_data: usize,
    events: &mut Vec<Event>,
) -> bool {
    let mut rounds = 0usize;
    loop {
        rounds += 1;
        assert!(rounds <= avail / COMMON_HEADER_BYTES + 2, "receive loop does not progress");
        let buf = &stream[*pos..avail];
        match pdu::decode(buf, digests.unwrap_or_default(), max_data) {
            Ok(Decoded::Need(n)) => {
                assert!(n > buf.len(), "Need({n}) with {} bytes buffered", buf.len());
                return true;
            }
            Ok(Decoded::Frame(f)) => {
                assert!(
                    f.len >= COMMON_HEADER_BYTES && f.len <= buf.len(),
                    "frame of {} in {} bytes",
                    f.len,
                    buf.len()
                );
                assert!(f.data.end <= f.len, "data {:?} past the frame ({})", f.data, f.len);
                if digests.is_none() {
                    // The target answers any ICReq it accepts with the same digests; anything
                    // else first is a sequence error there, here the stream simply goes on.
                    if let Pdu::IcReq { digests: d, .. } = f.pdu {
                        *digests = Some(d);
                    }
                }
                events.push(Event::Frame {
                    pdu: f.pdu,
                    at: *pos,
                    len: f.len,
                    data: buf[f.data.clone()].to_vec(),
                    data_digest_ok: f.data_digest_ok,
                });
                *pos += f.len;
            }
            Err(e) => {
                events.push(Event::Error(e));
                return false;
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&cfg, stream)) = input.split_first() else { return };
    let max_data = MAX_DATA[(cfg & 3) as usize];
    let chunk = 1 + (cfg >> 2) as usize * 3; // 1..=190 bytes per receive

    let (mut whole, mut pos, mut digests) = (Vec::new(), 0, None);
    drain(stream, stream.len(), &mut pos, &mut digests, max_data, &mut whole);
    let whole_end = pos;

    let (mut chunked, mut pos, mut digests) = (Vec::new(), 0, None);
    let mut avail = 0;
    while avail < stream.len() {
        avail = (avail + chunk).min(stream.len());
        if !drain(stream, avail, &mut pos, &mut digests, max_data, &mut chunked) {
            break;
        }
    }
    assert_eq!(chunked, whole, "chunked arrival decoded differently (chunk {chunk})");
    assert_eq!(pos, whole_end);
});
