//! The target's receive buffer (`stager_target::transport::rx::RxBuffer`) fed a byte stream the
//! way a connection feeds it: receives of the sizes the input chooses, into the buffer or — once
//! a data PDU's header is parsed — straight into a destination for its data, then its digest,
//! then the buffer again (`RecvPlan::Payload`), sometimes asking for header-sized receives.
//!
//! Input: byte 0 picks the digests (bits 0-1), the data limit (bits 2-3) and whether receives
//! are header-sized (bit 4); byte 1 the receive buffer's size; then pairs of bytes give the size
//! of each receive (cycled); the rest is the stream.
//!
//! Checked: it never panics; every receive fits the plan; the loop always progresses; and the
//! PDUs, their data (whether copied from the buffer or received in place) and data digest
//! verdicts are exactly those `pdu::decode` finds in the whole stream, in order — up to where
//! the whole-stream decode stops. At that point the buffer may additionally report an error the
//! whole-stream decode would report once more bytes came (a bad header judged before its data).

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_nvme::tcp::pdu::{self, Decoded, Digests, Pdu, PduError};
use stager_target::transport::rx::{RecvPlan, RxBuffer, Step};

const MAX_DATA: [usize; 4] = [8192, 128 << 10, 0, 4096 + 17];

#[derive(Debug, PartialEq)]
enum Event {
    Pdu(Pdu, Vec<u8>, bool),
    Error(PduError),
}

/// What the whole stream decodes to, as a connection would act on it.
fn reference(stream: &[u8], dg: Digests, max_data: usize) -> Vec<Event> {
    let mut at = 0;
    let mut out = Vec::new();
    loop {
        match pdu::decode(&stream[at..], dg, max_data) {
            Ok(Decoded::Frame(f)) => {
                out.push(Event::Pdu(f.pdu, stream[at + f.data.start..at + f.data.end].to_vec(), f.data_digest_ok));
                at += f.len;
            }
            Ok(Decoded::Need(_)) => return out,
            Err(e) => {
                out.push(Event::Error(e));
                return out;
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let (cfg, cap_byte) = (input[0], input[1]);
    let dg = Digests::from_bits(cfg & 3);
    let max_data = MAX_DATA[((cfg >> 2) & 3) as usize];
    let small = (cfg & 0x10 != 0).then_some(24 + if dg.header { 4 } else { 0 });
    let cap = 512 + cap_byte as usize * 64;
    let n_sizes = (input[2] as usize % 8) + 1;
    let sizes_end = (3 + 2 * n_sizes).min(input.len());
    let sizes: Vec<usize> =
        input[3..sizes_end].chunks(2).map(|c| 1 + (c[0] as usize | (*c.get(1).unwrap_or(&0) as usize) << 8)).collect();
    let stream = &input[sizes_end..];
    let want = reference(stream, dg, max_data);

    let mut rx = RxBuffer::new(cap);
    let mut got = Vec::new();
    let mut dest: Option<(Pdu, Vec<u8>)> = None;
    let (mut at, mut i) = (0usize, 0usize);
    'outer: loop {
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= stream.len() + 2, "the parse loop does not progress");
            match rx.step(dg, max_data) {
                Ok(Step::Need) => break,
                Ok(Step::Pdu(h, d)) => got.push(Event::Pdu(h.pdu, d.to_vec(), true)),
                Ok(Step::Data(h)) => {
                    let mut d = vec![0u8; h.data.len()];
                    rx.place(&mut d);
                    dest = Some((h.pdu, d));
                }
                Ok(Step::DataDone { ddgst }) => {
                    let Some((p, d)) = dest.take() else { panic!("data done without a destination") };
                    let ok = ddgst.is_none_or(|g| g == crc32c::crc32c(&d));
                    got.push(Event::Pdu(p, d, ok));
                }
                Err(e) => {
                    got.push(Event::Error(e));
                    break 'outer;
                }
            }
        }
        if at == stream.len() {
            break;
        }
        let mut n = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(1).max(1);
        i += 1;
        match rx.plan(small) {
            RecvPlan::Buffer { ptr, len } => {
                assert!(len > 0, "a receive of nothing (the socket would read it as EOF)");
                n = n.min(len).min(stream.len() - at);
                // SAFETY: stand-in for the kernel: ptr is valid for len >= n bytes.
                unsafe { std::ptr::copy_nonoverlapping(stream[at..].as_ptr(), ptr, n) };
            }
            RecvPlan::Payload { data_at, data_len, ddgst, ddgst_len, tail, tail_len } => {
                let Some((_, d)) = dest.as_mut() else { panic!("payload without a destination") };
                assert!(data_at + data_len <= d.len(), "payload beyond its destination");
                n = n.min(data_len + ddgst_len + tail_len).min(stream.len() - at);
                let k = n.min(data_len);
                d[data_at..data_at + k].copy_from_slice(&stream[at..at + k]);
                let g = (n - k).min(ddgst_len);
                let t = n - k - g;
                // SAFETY: as above, for the digest and buffer pieces of the plan.
                unsafe {
                    std::ptr::copy_nonoverlapping(stream[at + k..].as_ptr(), ddgst, g);
                    std::ptr::copy_nonoverlapping(stream[at + k + g..].as_ptr(), tail, t);
                }
            }
        }
        at += n;
        rx.received(n);
    }
    let common = want.len().min(got.len());
    assert_eq!(got[..common], want[..common], "the buffer saw other PDUs than the whole stream holds");
    match got.len().cmp(&want.len()) {
        std::cmp::Ordering::Equal => {}
        std::cmp::Ordering::Greater => {
            assert_eq!(got.len(), want.len() + 1, "more than one event beyond the whole-stream decode");
            assert!(matches!(got.last(), Some(Event::Error(_))), "an extra PDU the whole stream does not hold");
        }
        std::cmp::Ordering::Less => panic!("missed {:?}", &want[got.len()..]),
    }
});
