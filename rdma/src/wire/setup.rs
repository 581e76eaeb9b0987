//! The set-up handshake's messages, and the HMAC both sides prove themselves with.
//!
//! Every message is `len u16 LE` (bytes after it, at most `SETUP_MSG_BYTES_MAX`), `type u8`,
//! then its body:
//!
//! ```text
//! HELLO      (1) client -> server  "STGF" | version u8 | kind u8 | nonce_c [32] | id_len u8 | client id
//! CHALLENGE  (2) server -> client  kind u8 | nonce_s [32] | mac_s [32] | id_len u8 | server id
//! PROOF      (3) client -> server  mac_c [32]
//! WELCOME    (4) server -> client  (empty): authenticated both ways
//! REFUSED    (5) either way        reason (UTF-8, <= 255 bytes): the handshake ends here
//! VERBS_INFO (6) both ways (verbs) qpn u32 | psn u32 | lid u16 | mtu u8 | gid [16]
//! READY      (7) both ways (verbs) (empty): my queue pair is ready to receive
//! ```
//!
//! `mac_s = HMAC-SHA256(secret, "stager-fabric/1 server" | transcript)` and
//! `mac_c = HMAC-SHA256(secret, "stager-fabric/1 client" | transcript)` with
//! `transcript = kind | nonce_c | nonce_s | id_len | client id | id_len | server id`. Each side
//! proves it holds the cluster secret over the other side's fresh nonce, with a label per
//! direction so one side's proof never serves as the other's; both node ids are bound in, so a
//! proof cannot be replayed for another pair of nodes. The server proves first: a client that
//! does not know the secret learns nothing it can reuse.
//!
//! [`decode`] is pure and total (fuzzed: `fuzz/fuzz_targets/fabric_setup.rs`).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::constants::{NODE_ID_BYTES_MAX, SETUP_MSG_BYTES_MAX};

pub const MAGIC: [u8; 4] = *b"STGF";
pub const VERSION: u8 = 1;
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
pub const REASON_BYTES_MAX: usize = 255;

const TYPE_HELLO: u8 = 1;
const TYPE_CHALLENGE: u8 = 2;
const TYPE_PROOF: u8 = 3;
const TYPE_WELCOME: u8 = 4;
const TYPE_REFUSED: u8 = 5;
const TYPE_VERBS_INFO: u8 = 6;
const TYPE_READY: u8 = 7;

/// Which backend a node runs; both ends of an endpoint must agree.
pub const KIND_TCP: u8 = 1;
pub const KIND_VERBS: u8 = 2;

/// What a verbs endpoint tells its peer about its queue pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerbsInfo {
    pub qpn: u32,
    pub psn: u32,
    pub lid: u16,
    /// `ibv_mtu` enum value (1 = 256 ... 5 = 4096) of the port's active MTU.
    pub mtu: u8,
    pub gid: [u8; 16],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupMsg {
    Hello { version: u8, kind: u8, nonce: [u8; NONCE_BYTES], node: String },
    Challenge { kind: u8, nonce: [u8; NONCE_BYTES], mac: [u8; MAC_BYTES], node: String },
    Proof { mac: [u8; MAC_BYTES] },
    Welcome,
    Refused { reason: String },
    VerbsInfo(VerbsInfo),
    Ready,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SetupError {
    #[error("set-up message of {0} bytes (at most {SETUP_MSG_BYTES_MAX})")]
    TooLong(usize),
    #[error("empty set-up message")]
    Empty,
    #[error("unknown set-up message type {0}")]
    UnknownType(u8),
    #[error("set-up message type {ty} of {len} bytes (expected {expected})")]
    BadLength { ty: u8, len: usize, expected: usize },
    #[error("not a stager fabric peer (bad magic)")]
    BadMagic,
    #[error("invalid node id: {0}")]
    BadNodeId(String),
}

/// A node id is 1..=64 ASCII letters, digits, `-`, `_`, `.` or `:` (it appears in log lines).
pub fn valid_node_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= NODE_ID_BYTES_MAX
        && id.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

/// Decodes the message at the start of `buf`: `Ok(None)` if it is not complete yet, else the
/// message and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(SetupMsg, usize)>, SetupError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let len = u16::from_le_bytes([buf[0], buf[1]]) as usize;
    if len > SETUP_MSG_BYTES_MAX {
        return Err(SetupError::TooLong(len));
    }
    if len == 0 {
        return Err(SetupError::Empty);
    }
    if buf.len() < 2 + len {
        return Ok(None);
    }
    let (ty, body) = (buf[2], &buf[3..2 + len]);
    let exact = |expected: usize| {
        if body.len() == expected {
            Ok(())
        } else {
            Err(SetupError::BadLength { ty, len: body.len(), expected })
        }
    };
    // A node id that ends the body: id_len u8 then the id.
    let node_at = |at: usize| -> Result<String, SetupError> {
        let id_len = *body.get(at).ok_or(SetupError::BadLength { ty, len: body.len(), expected: at + 2 })? as usize;
        exact(at + 1 + id_len)?;
        let id = &body[at + 1..];
        if !valid_node_id(id) {
            return Err(SetupError::BadNodeId(String::from_utf8_lossy(id).into_owned()));
        }
        Ok(String::from_utf8_lossy(id).into_owned())
    };
    let msg = match ty {
        TYPE_HELLO => {
            if body.len() < 4 || body[..4] != MAGIC {
                return Err(SetupError::BadMagic);
            }
            let node = node_at(6 + NONCE_BYTES)?;
            SetupMsg::Hello { version: body[4], kind: body[5], nonce: array(&body[6..]), node }
        }
        TYPE_CHALLENGE => {
            let node = node_at(1 + NONCE_BYTES + MAC_BYTES)?;
            SetupMsg::Challenge { kind: body[0], nonce: array(&body[1..]), mac: array(&body[1 + NONCE_BYTES..]), node }
        }
        TYPE_PROOF => {
            exact(MAC_BYTES)?;
            SetupMsg::Proof { mac: array(body) }
        }
        TYPE_WELCOME => {
            exact(0)?;
            SetupMsg::Welcome
        }
        TYPE_REFUSED => {
            if body.len() > REASON_BYTES_MAX {
                return Err(SetupError::BadLength { ty, len: body.len(), expected: REASON_BYTES_MAX });
            }
            SetupMsg::Refused { reason: reason_text(&String::from_utf8_lossy(body)).to_string() }
        }
        TYPE_VERBS_INFO => {
            exact(27)?;
            SetupMsg::VerbsInfo(VerbsInfo {
                qpn: u32::from_le_bytes(array(body)),
                psn: u32::from_le_bytes(array(&body[4..])),
                lid: u16::from_le_bytes(array(&body[8..])),
                mtu: body[10],
                gid: array(&body[11..]),
            })
        }
        TYPE_READY => {
            exact(0)?;
            SetupMsg::Ready
        }
        _ => return Err(SetupError::UnknownType(ty)),
    };
    Ok(Some((msg, 2 + len)))
}

/// A reason as it travels: at most `REASON_BYTES_MAX` bytes, cut at a character boundary. (Decode
/// applies it too: invalid UTF-8 turned into U+FFFD can grow past the limit.)
fn reason_text(reason: &str) -> &str {
    let mut cut = reason.len().min(REASON_BYTES_MAX);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    &reason[..cut]
}

/// The first `N` bytes of `b`; callers have checked the length.
fn array<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

/// Appends `msg` to `out`. Node ids and reasons are the caller's (checked at config time);
/// a reason longer than 255 bytes is cut at a character boundary.
pub fn encode(msg: &SetupMsg, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    let push_node = |out: &mut Vec<u8>, node: &str| {
        assert!(valid_node_id(node.as_bytes()), "node id {node:?} must be validated before the handshake");
        out.push(node.len() as u8);
        out.extend_from_slice(node.as_bytes());
    };
    match msg {
        SetupMsg::Hello { version, kind, nonce, node } => {
            out.push(TYPE_HELLO);
            out.extend_from_slice(&MAGIC);
            out.extend_from_slice(&[*version, *kind]);
            out.extend_from_slice(nonce);
            push_node(out, node);
        }
        SetupMsg::Challenge { kind, nonce, mac, node } => {
            out.push(TYPE_CHALLENGE);
            out.push(*kind);
            out.extend_from_slice(nonce);
            out.extend_from_slice(mac);
            push_node(out, node);
        }
        SetupMsg::Proof { mac } => {
            out.push(TYPE_PROOF);
            out.extend_from_slice(mac);
        }
        SetupMsg::Welcome => out.push(TYPE_WELCOME),
        SetupMsg::Refused { reason } => {
            out.push(TYPE_REFUSED);
            out.extend_from_slice(reason_text(reason).as_bytes());
        }
        SetupMsg::VerbsInfo(v) => {
            out.push(TYPE_VERBS_INFO);
            out.extend_from_slice(&v.qpn.to_le_bytes());
            out.extend_from_slice(&v.psn.to_le_bytes());
            out.extend_from_slice(&v.lid.to_le_bytes());
            out.push(v.mtu);
            out.extend_from_slice(&v.gid);
        }
        SetupMsg::Ready => out.push(TYPE_READY),
    }
    let len = (out.len() - start - 2) as u16;
    out[start..start + 2].copy_from_slice(&len.to_le_bytes());
}

/// Which side a proof comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// Everything both sides' proofs cover.
pub struct Transcript<'a> {
    pub kind: u8,
    pub nonce_c: &'a [u8; NONCE_BYTES],
    pub nonce_s: &'a [u8; NONCE_BYTES],
    pub client: &'a str,
    pub server: &'a str,
}

fn keyed(secret: &[u8], side: Side, t: &Transcript<'_>) -> Hmac<Sha256> {
    // HMAC takes keys of any length (longer ones are hashed first).
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(match side {
        Side::Server => b"stager-fabric/1 server",
        Side::Client => b"stager-fabric/1 client",
    });
    m.update(&[t.kind]);
    m.update(t.nonce_c);
    m.update(t.nonce_s);
    for id in [t.client, t.server] {
        m.update(&[id.len() as u8]);
        m.update(id.as_bytes());
    }
    m
}

/// The proof `side` sends.
pub fn prove(secret: &[u8], side: Side, t: &Transcript<'_>) -> [u8; MAC_BYTES] {
    keyed(secret, side, t).finalize().into_bytes().into()
}

/// Whether `mac` is `side`'s proof (compared in constant time).
pub fn verify(secret: &[u8], side: Side, t: &Transcript<'_>, mac: &[u8; MAC_BYTES]) -> bool {
    keyed(secret, side, t).verify_slice(mac).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<SetupMsg> {
        vec![
            SetupMsg::Hello { version: VERSION, kind: KIND_TCP, nonce: [3; 32], node: "node-a".into() },
            SetupMsg::Challenge { kind: KIND_VERBS, nonce: [4; 32], mac: [5; 32], node: "b.1:x_y".into() },
            SetupMsg::Proof { mac: [6; 32] },
            SetupMsg::Welcome,
            SetupMsg::Refused { reason: "node 'z' is not in peers".into() },
            SetupMsg::Refused { reason: String::new() },
            SetupMsg::VerbsInfo(VerbsInfo { qpn: 0x11, psn: 0xabcdef, lid: 0, mtu: 3, gid: [7; 16] }),
            SetupMsg::Ready,
        ]
    }

    #[test]
    fn round_trip_and_truncation() {
        for m in all() {
            let mut b = Vec::new();
            encode(&m, &mut b);
            assert_eq!(decode(&b), Ok(Some((m.clone(), b.len()))));
            for cut in 0..b.len() {
                assert_eq!(decode(&b[..cut]), Ok(None), "{m:?} cut at {cut}");
            }
            b.extend_from_slice(b"trailing");
            assert_eq!(decode(&b).unwrap().unwrap().0, m);
        }
    }

    #[test]
    fn hostile_messages_are_errors() {
        assert_eq!(decode(&[0xff, 0xff, 1]), Err(SetupError::TooLong(0xffff)));
        assert_eq!(decode(&[0, 0]), Err(SetupError::Empty));
        assert_eq!(decode(&[1, 0, 99]), Err(SetupError::UnknownType(99)));
        let mut b = Vec::new();
        encode(&SetupMsg::Hello { version: 1, kind: 1, nonce: [0; 32], node: "a".into() }, &mut b);
        let mut bad = b.clone();
        bad[3] = b'X';
        assert_eq!(decode(&bad), Err(SetupError::BadMagic));
        let mut bad = b.clone();
        *bad.last_mut().unwrap() = b' ';
        assert!(matches!(decode(&bad), Err(SetupError::BadNodeId(_))));
        let mut bad = b.clone();
        bad[2 + 1 + 6 + 32] = 9; // id_len beyond the body
        assert!(matches!(decode(&bad), Err(SetupError::BadLength { .. })));
        assert!(matches!(decode(&[2, 0, TYPE_PROOF, 1]), Err(SetupError::BadLength { .. })));
        assert!(matches!(decode(&[2, 0, TYPE_WELCOME, 1]), Err(SetupError::BadLength { .. })));
    }

    #[test]
    fn a_refusal_of_invalid_utf8_round_trips() {
        let mut b = vec![0, 0, TYPE_REFUSED];
        b.extend_from_slice(&[0xff; 200]);
        let len = (b.len() - 2) as u16;
        b[..2].copy_from_slice(&len.to_le_bytes());
        let (m, _) = decode(&b).unwrap().unwrap();
        let mut again = Vec::new();
        encode(&m, &mut again);
        assert_eq!(decode(&again).unwrap().unwrap().0, m);
    }

    #[test]
    fn proofs_bind_side_secret_nonces_and_ids() {
        let (nc, ns) = ([1u8; 32], [2u8; 32]);
        let t = Transcript { kind: KIND_TCP, nonce_c: &nc, nonce_s: &ns, client: "a", server: "b" };
        let mac = prove(b"secret", Side::Server, &t);
        assert!(verify(b"secret", Side::Server, &t, &mac));
        assert!(!verify(b"secret", Side::Client, &t, &mac), "a server proof must not pass as a client's");
        assert!(!verify(b"other", Side::Server, &t, &mac));
        let t2 = Transcript { client: "c", ..t };
        assert!(!verify(b"secret", Side::Server, &t2, &mac));
        let ns2 = [9u8; 32];
        let t3 = Transcript { nonce_s: &ns2, client: "a", ..t2 };
        assert!(!verify(b"secret", Side::Server, &t3, &mac));
    }
}
