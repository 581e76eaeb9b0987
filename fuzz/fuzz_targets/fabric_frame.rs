//! A byte stream of fabric frames as an endpoint's receive loop sees it (rdma/src/channel.rs,
//! `Channel::receive`): decode the header at the current offset; on a header skip its body and
//! go on; on `Need` stop (more bytes would come); on an error stop (the endpoint is failed).
//! Checks what the receive loop relies on:
//!
//! - a decoded header is exactly what `frame::encode` writes for it (the decoder accepts only
//!   canonical headers: reserved bytes zero, no stray flags or immediates), so nothing a peer
//!   sends can mean two things;
//! - `Need(n)` asks for more than is there and never more than the longest header;
//! - every proper prefix of a valid header asks for more (never an error, never another frame);
//! - a body length never exceeds its type's limit (WRITE_BYTES_MAX, MSG_BYTES_MAX, 0), so the
//!   receive buffer and region bounds checks downstream see sane numbers;
//! - the loop always advances.
//!
//! The first 20 bytes also go to `RemoteKey::decode` (keys arrive in peers' messages): a decoded
//! key re-encodes to the same bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_rdma::constants::{MSG_BYTES_MAX, WRITE_BYTES_MAX};
use stager_rdma::wire::frame::{self, Decoded, Frame, HEADER_BYTES_MAX};
use stager_rdma::RemoteKey;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = RemoteKey::decode(data) {
        assert_eq!(&k.encode()[..], &data[..RemoteKey::ENCODED_LEN]);
    }
    let mut pos = 0;
    while pos < data.len() {
        let rest = &data[pos..];
        match frame::decode(rest) {
            Err(_) => break,
            Ok(Decoded::Need(n)) => {
                assert!(n > rest.len() && n <= HEADER_BYTES_MAX, "Need({n}) with {} bytes", rest.len());
                break;
            }
            Ok(Decoded::Header { frame: f, header_len }) => {
                let mut h = [0u8; HEADER_BYTES_MAX];
                let n = frame::encode(&f, &mut h);
                assert_eq!(n, header_len);
                assert_eq!(&h[..n], &rest[..n], "{f:?} decoded from non-canonical bytes");
                for cut in 0..header_len {
                    assert!(matches!(frame::decode(&rest[..cut]), Ok(Decoded::Need(_))), "prefix {cut} of {f:?}");
                }
                let max = match f {
                    Frame::Write { .. } => WRITE_BYTES_MAX,
                    Frame::Msg { .. } => MSG_BYTES_MAX,
                    Frame::Heartbeat | Frame::Ack { .. } => 0,
                };
                assert!(f.body_len() <= max);
                let next = pos + header_len + f.body_len();
                assert!(next > pos);
                pos = next;
            }
        }
    }
});
