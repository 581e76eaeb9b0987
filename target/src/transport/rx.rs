//! The receive side of one NVMe/TCP connection, without the socket: a fixed buffer that many
//! PDUs land in per receive, parsed in place, and the bookkeeping that lets a PDU's data go
//! straight from the socket into the buffer the caller chose for it (a write's pooled I/O
//! buffer), so the transport copies a write's data only where it cannot avoid it.
//!
//! A connection alternates two kinds of receive (`plan`):
//! - **into the buffer**, as many bytes as fit: headers, small PDUs, and whatever data follows
//!   a header in the same receive;
//! - **into a payload**, once the header of a PDU with data has been parsed (`step` returns
//!   `Step::Data`) and the caller gave it a destination (`place`): one `recvmsg` whose iovecs
//!   are the rest of the data (in the caller's buffer), its data digest, and then the buffer
//!   again for the headers that follow.
//!
//! **Where a copy remains.** Data bytes that arrived in the same receive as their header (or
//! an earlier one) are already in this buffer when the header is parsed; `place` copies them
//! into the destination (`copied_bytes`). Everything after that lands in the destination
//! directly (`direct_bytes`). How much is copied depends on how the receives fall: a 4 KiB
//! in-capsule write usually arrives whole with its capsule and is copied; a large H2CData PDU
//! is mostly received in place, and all of it when the connection asks for header-sized
//! receives while it expects such PDUs (`plan(Some(..))`). Both counters are kept so the copy
//! count can be stated from measurement, not argument.
//!
//! The type is pure (no socket, no ring) so the property that matters — a stream cut at any
//! byte, or many PDUs in one receive, yields exactly the PDUs and data `pdu::decode` sees in
//! the whole stream — is tested exhaustively here and fuzzed (`fuzz/fuzz_targets/rx_stream.rs`).

use stager_nvme::constants::DIGEST_BYTES;
use stager_nvme::tcp::pdu::{self, Digests, Head, HeadDecoded, PduError, TERM_DATA_MAX};

/// What the next receive should fill (raw pointers: the caller hands them to the kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvPlan {
    /// Receive up to `len` bytes at `ptr` (the free end of the buffer).
    Buffer { ptr: *mut u8, len: usize },
    /// A payload is being received: first `data_len` bytes into the caller's destination from
    /// byte `data_at` of the PDU's data on, then `ddgst_len` digest bytes at `ddgst`, then up to
    /// `tail_len` bytes into the buffer at `tail`.
    Payload { data_at: usize, data_len: usize, ddgst: *mut u8, ddgst_len: usize, tail: *mut u8, tail_len: usize },
}

/// What the buffer holds next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Nothing complete: receive more.
    Need,
    /// A whole PDU without a payload to place (no data, or a TermReq's header echo in `data`).
    /// It is consumed.
    Pdu(Head, &'a [u8]),
    /// The header of a PDU with data. The caller calls `place` with the data's destination, or
    /// leaves it here (to be returned again) while it cannot take it yet.
    Data(Head),
    /// The data placed earlier is complete; `ddgst` is the data digest the host sent, if any.
    DataDone { ddgst: Option<u32> },
}

/// A payload being received into the caller's destination.
#[derive(Clone, Copy, Debug)]
struct Payload {
    len: usize,
    got: usize,
    ddgst_len: usize,
    ddgst_got: usize,
}

impl Payload {
    fn complete(&self) -> bool {
        self.got == self.len && self.ddgst_got == self.ddgst_len
    }
}

pub struct RxBuffer {
    buf: Box<[u8]>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    /// The PDU whose header `step` returned as `Step::Data`, until `place`.
    head: Option<Head>,
    payload: Option<Payload>,
    ddgst: [u8; DIGEST_BYTES],
    /// Bytes (from `start`) the last `step` said it needs: a header-sized receive asks for
    /// exactly the rest of them.
    need: usize,
    /// Where the PDU `step` last looked at starts (for echoing its header in a TermReq).
    last_at: usize,
    /// A receive planned by `plan` has not been reported by `received` yet: the buffer and
    /// the caller's destination belong to the kernel until then.
    in_flight: bool,
    /// Data bytes copied from this buffer into destinations, and received straight into them.
    pub copied_bytes: u64,
    pub direct_bytes: u64,
}

impl RxBuffer {
    /// A buffer of `capacity` bytes; it must hold the largest header, padding and TermReq
    /// (a few hundred bytes), and more makes more PDUs per receive.
    pub fn new(capacity: usize) -> RxBuffer {
        assert!(capacity >= 512, "receive buffer of {capacity} bytes cannot hold a header");
        RxBuffer {
            buf: vec![0; capacity].into_boxed_slice(),
            start: 0,
            end: 0,
            head: None,
            payload: None,
            ddgst: [0; DIGEST_BYTES],
            need: 0,
            last_at: 0,
            in_flight: false,
            copied_bytes: 0,
            direct_bytes: 0,
        }
    }

    /// Bytes of a PDU that have arrived but not been acted on (a partial header, or a payload
    /// not yet complete): a connection stalled with some is waiting for the rest of a PDU.
    pub fn partial(&self) -> bool {
        self.end > self.start || self.payload.is_some_and(|p| !p.complete())
    }

    /// Parses what the buffer holds. Returns PDUs one at a time; call again after each.
    pub fn step(&mut self, digests: Digests, max_data: usize) -> Result<Step<'_>, PduError> {
        assert!(!self.in_flight, "rx: step while a receive is in flight");
        if let Some(p) = self.payload {
            if !p.complete() {
                return Ok(Step::Need);
            }
            self.payload = None;
            let ddgst = (p.ddgst_len > 0).then(|| u32::from_le_bytes(self.ddgst));
            return Ok(Step::DataDone { ddgst });
        }
        self.last_at = self.start;
        match pdu::decode_head(&self.buf[self.start..self.end], digests, max_data)? {
            HeadDecoded::Need(n) => {
                self.need = n;
                Ok(Step::Need)
            }
            HeadDecoded::Head(h) if h.has_payload() => {
                self.head = Some(h.clone());
                Ok(Step::Data(h))
            }
            HeadDecoded::Head(h) => {
                let at = self.start;
                if at + h.len > self.end {
                    // decode_head returns a PDU without payload only once whole; never act on
                    // bytes that are not here (a codec bug must not become a panic).
                    debug_assert!(false, "decode_head returned {:?} before it was whole", h.pdu);
                    self.need = h.len;
                    return Ok(Step::Need);
                }
                self.start += h.len;
                let data = &self.buf[at + h.data.start..at + h.data.end];
                Ok(Step::Pdu(h, data))
            }
        }
    }

    /// The type of the next PDU, once its first byte is here (and no payload is under way).
    pub fn next_type(&self) -> Option<u8> {
        match self.payload.is_some_and(|p| !p.complete()) {
            true => None,
            false => self.buf[self.start..self.end].first().copied(),
        }
    }

    /// The start of the unparsed bytes, up to the header length its common header states
    /// (at most `TERM_DATA_MAX`): what a TermReq about the next PDU echoes. Error path only.
    pub fn echo_next(&self) -> Vec<u8> {
        let b = &self.buf[self.start..self.end];
        let hlen = b.get(2).copied().unwrap_or(8).max(8) as usize;
        b[..b.len().min(hlen).min(TERM_DATA_MAX)].to_vec()
    }

    /// The header of the whole PDU `step` just returned as `Step::Pdu` (still in the buffer
    /// until the next receive is planned). Error path only.
    pub fn echo_last(&self, head: &Head) -> Vec<u8> {
        let b = &self.buf[self.last_at..self.last_at + head.len];
        let hlen = b.get(2).copied().unwrap_or(8).max(8) as usize;
        b[..b.len().min(hlen).min(TERM_DATA_MAX)].to_vec()
    }

    /// Gives the data of the PDU last returned as `Step::Data` its destination (exactly its
    /// data length). Copies the data bytes already buffered; the rest arrive through
    /// `RecvPlan::Payload`. Returns the bytes copied.
    pub fn place(&mut self, dest: &mut [u8]) -> usize {
        assert!(!self.in_flight, "rx: place while a receive is in flight");
        let Some(h) = self.head.take() else { panic!("rx: place without a data header") };
        assert_eq!(dest.len(), h.data.len(), "rx: destination does not fit the data");
        self.start += h.data.start;
        let k = (self.end - self.start).min(dest.len());
        dest[..k].copy_from_slice(&self.buf[self.start..self.start + k]);
        self.start += k;
        let ddgst_len = if h.ddgst { DIGEST_BYTES } else { 0 };
        let g = (self.end - self.start).min(ddgst_len);
        self.ddgst[..g].copy_from_slice(&self.buf[self.start..self.start + g]);
        self.start += g;
        self.copied_bytes += k as u64;
        self.payload = Some(Payload { len: dest.len(), got: k, ddgst_len, ddgst_got: g });
        self.reset_if_empty();
        k
    }

    fn reset_if_empty(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// What the next receive should fill. `small`: receive only up to the end of the next
    /// header (or this many bytes when nothing is buffered), so that a large PDU's data is not
    /// pulled into the buffer with its header — for when large H2CData PDUs are expected.
    pub fn plan(&mut self, small: Option<usize>) -> RecvPlan {
        assert!(!self.in_flight, "rx: a receive is already in flight");
        self.in_flight = true;
        if let Some(p) = self.payload.filter(|p| !p.complete()) {
            // Everything buffered belonged to this PDU: the buffer is empty.
            debug_assert_eq!((self.start, self.end), (0, 0));
            let tail_len = small.unwrap_or(self.buf.len()).min(self.buf.len());
            return RecvPlan::Payload {
                data_at: p.got,
                data_len: p.len - p.got,
                // SAFETY: ddgst_got <= DIGEST_BYTES: in bounds (or one past the end, len 0).
                ddgst: unsafe { self.ddgst.as_mut_ptr().add(p.ddgst_got) },
                ddgst_len: p.ddgst_len - p.ddgst_got,
                tail: self.buf.as_mut_ptr(),
                tail_len,
            };
        }
        self.reset_if_empty();
        let buffered = self.end - self.start;
        let want = match small {
            Some(w) if buffered == 0 => w,
            Some(_) => self.need.saturating_sub(buffered).max(1),
            None => usize::MAX,
        };
        // Keep room for the rest of the PDU being parsed; move it to the front if it would not
        // fit, or when the free end got small.
        let room = self.buf.len() - self.end;
        if self.start > 0 && (room < self.need.saturating_sub(buffered) || room < self.buf.len() / 4) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end = buffered;
            self.start = 0;
        }
        let free = &mut self.buf[self.end..];
        RecvPlan::Buffer { ptr: free.as_mut_ptr(), len: want.min(free.len()) }
    }

    /// The planned receive completed with `n` bytes (the socket gives them in plan order).
    pub fn received(&mut self, n: usize) {
        assert!(self.in_flight, "rx: received without a planned receive");
        self.in_flight = false;
        let mut n = n;
        if let Some(p) = self.payload.as_mut().filter(|p| !p.complete()) {
            let d = n.min(p.len - p.got);
            p.got += d;
            self.direct_bytes += d as u64;
            n -= d;
            let g = n.min(p.ddgst_len - p.ddgst_got);
            p.ddgst_got += g;
            n -= g;
        }
        self.end += n;
        assert!(self.end <= self.buf.len(), "rx: the kernel reported more than we asked for");
    }

    /// The planned receive did not happen (the socket failed or closed).
    pub fn abandoned(&mut self) {
        self.in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stager_nvme::command::Command;
    use stager_nvme::tcp::pdu::{DataHeader, Decoded, Pdu, TermReq};

    /// A stream of every kind of PDU a host sends, with payloads of assorted sizes.
    fn stream(dg: Digests) -> Vec<u8> {
        let mut out = Vec::new();
        let mut seed = 7u8;
        let mut data = |n: usize| {
            seed = seed.wrapping_mul(31).wrapping_add(1);
            (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect::<Vec<u8>>()
        };
        for n in [0, 512, 4096, 8192, 1, 0, 20000, 3] {
            pdu::encode(&Pdu::CapsuleCmd(Command::new(1, n as u16)), &data(n), dg, &mut out);
            let h = DataHeader { cccid: 1, ttag: 2, offset: 0, length: n as u32, last: true, success: false };
            if n > 0 {
                pdu::encode(&Pdu::H2CData(h), &data(n), dg, &mut out);
            }
        }
        pdu::encode(&Pdu::H2CTermReq(TermReq { fes: 1, fei: 0 }), &data(24), dg, &mut out);
        out
    }

    /// What the stream holds, decoded whole: (pdu, data, data digest ok).
    fn expected(s: &[u8], dg: Digests) -> Vec<(Pdu, Vec<u8>, bool)> {
        let mut at = 0;
        let mut v = Vec::new();
        while at < s.len() {
            let Ok(Decoded::Frame(f)) = pdu::decode(&s[at..], dg, 1 << 20) else { panic!("bad stream") };
            v.push((f.pdu, s[at + f.data.start..at + f.data.end].to_vec(), f.data_digest_ok));
            at += f.len;
        }
        v
    }

    /// Feeds `s` through an RxBuffer the way a connection does, each receive returning at most
    /// `chunk(i)` bytes; returns what the caller saw.
    fn run(
        s: &[u8],
        dg: Digests,
        cap: usize,
        small: Option<usize>,
        mut chunk: impl FnMut(usize) -> usize,
    ) -> (Vec<(Pdu, Vec<u8>, bool)>, RxBuffer) {
        let mut rx = RxBuffer::new(cap);
        let mut seen = Vec::new();
        let mut pending: Option<(Pdu, Vec<u8>)> = None;
        let mut at = 0;
        let mut i = 0;
        loop {
            loop {
                match rx.step(dg, 1 << 20).expect("valid stream") {
                    Step::Need => break,
                    Step::Pdu(h, d) => seen.push((h.pdu, d.to_vec(), true)),
                    Step::Data(h) => {
                        let mut dest = vec![0u8; h.data.len()];
                        rx.place(&mut dest);
                        pending = Some((h.pdu, dest));
                    }
                    Step::DataDone { ddgst } => {
                        let (p, dest) = pending.take().expect("data done without data");
                        let ok = ddgst.is_none_or(|d| d == crc32c::crc32c(&dest));
                        seen.push((p, dest, ok));
                    }
                }
            }
            if at == s.len() {
                break;
            }
            // One receive: the kernel fills the plan's pieces in order.
            let mut n = chunk(i).max(1);
            i += 1;
            match rx.plan(small) {
                RecvPlan::Buffer { ptr, len } => {
                    n = n.min(len).min(s.len() - at);
                    // SAFETY: test stand-in for the kernel: ptr is valid for len >= n bytes.
                    unsafe { std::ptr::copy_nonoverlapping(s[at..].as_ptr(), ptr, n) };
                }
                RecvPlan::Payload { data_at, data_len, ddgst, ddgst_len, tail, tail_len } => {
                    n = n.min(data_len + ddgst_len + tail_len).min(s.len() - at);
                    let (_, dest) = pending.as_mut().expect("payload without destination");
                    let d = n.min(data_len);
                    dest[data_at..data_at + d].copy_from_slice(&s[at..at + d]);
                    let g = (n - d).min(ddgst_len);
                    let t = n - d - g;
                    // SAFETY: as above, for the digest and tail pieces.
                    unsafe {
                        std::ptr::copy_nonoverlapping(s[at + d..].as_ptr(), ddgst, g);
                        std::ptr::copy_nonoverlapping(s[at + d + g..].as_ptr(), tail, t);
                    }
                }
            }
            at += n;
            rx.received(n);
        }
        assert!(!rx.partial(), "bytes left over at the end of the stream");
        (seen, rx)
    }

    #[test]
    fn a_stream_cut_at_every_byte_decodes_the_same() {
        for dg in [Digests::default(), Digests { header: true, data: true }] {
            let s = stream(dg);
            let want = expected(&s, dg);
            // Two receives: the first ends at byte `cut`, the second takes the rest.
            for cut in 1..s.len() {
                let (got, _) = run(&s, dg, 64 << 10, None, |i| if i == 0 { cut } else { usize::MAX });
                assert_eq!(got, want, "cut at {cut}");
            }
            // Byte by byte, and many PDUs per receive.
            assert_eq!(run(&s, dg, 512, None, |_| 1).0, want);
            let (got, rx) = run(&s, dg, 1 << 20, None, |_| usize::MAX);
            assert_eq!(got, want);
            assert_eq!(rx.direct_bytes, 0, "a whole stream in one receive is all copied");
        }
    }

    #[test]
    fn header_sized_receives_place_large_data_without_copying() {
        let dg = Digests { header: true, data: true };
        let s = stream(dg);
        let want = expected(&s, dg);
        let (got, rx) = run(&s, dg, 4096, Some(28), |_| usize::MAX);
        assert_eq!(got, want);
        assert_eq!(rx.copied_bytes, 0, "header-sized receives copied data");
        assert!(rx.direct_bytes > 60_000);
        // Odd receive sizes and a small buffer: same PDUs, same data.
        let mut x = 12345u64;
        let (got, _) = run(&s, dg, 600, None, |_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as usize % 700
        });
        assert_eq!(got, want);
    }

    #[test]
    fn a_bad_data_digest_is_reported_with_the_data() {
        let dg = Digests { header: false, data: true };
        let mut s = Vec::new();
        pdu::encode(&Pdu::CapsuleCmd(Command::new(1, 1)), &[9; 3000], dg, &mut s);
        let n = s.len();
        s[n - 10] ^= 0xFF;
        let (got, _) = run(&s, dg, 1024, None, |_| 700);
        assert_eq!(got.len(), 1);
        assert!(!got[0].2, "a corrupted payload passed its digest");
    }
}
