//! A byte stream of fabric set-up (handshake) messages as `SetupConn::recv` (rdma/src/handshake.rs)
//! reads them: decode at the current offset, take the message, go on; stop at "incomplete" or an
//! error. Checks:
//!
//! - a decoded message re-encodes and decodes to the same message, and takes the bytes it says;
//! - every proper prefix of a message is "incomplete" (never an error, never another message);
//! - node ids in decoded messages are valid ids (they go into log lines and the peers check);
//! - the proof check (`setup::verify`) on decoded proofs never panics, and a proof made with the
//!   secret verifies while one from the other side does not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use stager_rdma::constants::SETUP_MSG_BYTES_MAX;
use stager_rdma::wire::setup::{self, SetupMsg, Side, Transcript};

const SECRET: &[u8] = b"fuzz-cluster-secret-0123";

fuzz_target!(|data: &[u8]| {
    let mut pos = 0;
    let mut nonce_c = [0u8; 32];
    while pos < data.len() {
        let rest = &data[pos..];
        let (msg, used) = match setup::decode(rest) {
            Ok(Some(m)) => m,
            Ok(None) | Err(_) => break,
        };
        assert!(used >= 3 && used <= 2 + SETUP_MSG_BYTES_MAX && used <= rest.len());
        for cut in 0..used {
            assert_eq!(setup::decode(&rest[..cut]), Ok(None), "prefix {cut} of {msg:?}");
        }
        let mut again = Vec::new();
        setup::encode(&msg, &mut again);
        assert_eq!(setup::decode(&again), Ok(Some((msg.clone(), again.len()))));
        match &msg {
            SetupMsg::Hello { nonce, node, .. } => {
                assert!(setup::valid_node_id(node.as_bytes()));
                nonce_c = *nonce;
            }
            SetupMsg::Challenge { kind, nonce, mac, node } => {
                assert!(setup::valid_node_id(node.as_bytes()));
                let t = Transcript { kind: *kind, nonce_c: &nonce_c, nonce_s: nonce, client: "client", server: node };
                let _ = setup::verify(SECRET, Side::Server, &t, mac);
                let good = setup::prove(SECRET, Side::Server, &t);
                assert!(setup::verify(SECRET, Side::Server, &t, &good));
                assert!(!setup::verify(SECRET, Side::Client, &t, &good));
            }
            _ => {}
        }
        pos += used;
    }
});
