//! The set-up handshake, run to completion on a blocking socket before an endpoint exists: on
//! the accept side in a handshake thread, on the connecting side in `Fabric::connect`'s caller.
//! The messages and the proofs are in [`crate::wire::setup`]; this is the conversation.
//!
//! Every refusal is logged on the side that refuses, with the remote address and node id, and
//! told to the other side in a `REFUSED` message, so both ends' logs say what went wrong.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use rand::RngCore;
use tracing::{info, warn};

use crate::constants::SETUP_MSG_BYTES_MAX;
use crate::fabric::Shared;
use crate::wire::setup::{self, SetupMsg, Side, Transcript, NONCE_BYTES, VERSION};
use crate::FabricError;

/// A socket in the set-up phase, with a deadline for the whole conversation.
pub(crate) struct SetupConn {
    pub stream: TcpStream,
    pub remote: SocketAddr,
    buf: Vec<u8>,
    deadline: Instant,
}

impl SetupConn {
    pub fn new(stream: TcpStream, remote: SocketAddr, deadline: Instant) -> SetupConn {
        SetupConn { stream, remote, buf: Vec::with_capacity(2 * SETUP_MSG_BYTES_MAX), deadline }
    }

    fn remaining(&self, what: &str) -> Result<std::time::Duration, FabricError> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FabricError::Timeout(format!("fabric set-up with {}: {what}", self.remote)));
        }
        Ok(left)
    }

    pub fn send(&mut self, msg: &SetupMsg) -> Result<(), FabricError> {
        let mut out = Vec::with_capacity(64);
        setup::encode(msg, &mut out);
        let left = self.remaining("sending")?;
        self.stream.set_write_timeout(Some(left)).map_err(|e| FabricError::io("set-up socket", e))?;
        self.stream.write_all(&out).map_err(|e| self.io_error("sending", e))
    }

    pub fn recv(&mut self) -> Result<SetupMsg, FabricError> {
        loop {
            match setup::decode(&self.buf) {
                Ok(Some((msg, used))) => {
                    self.buf.drain(..used);
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(FabricError::Refused(format!("malformed set-up message from {}: {e}", self.remote)))
                }
            }
            let left = self.remaining("waiting for the peer")?;
            self.stream.set_read_timeout(Some(left)).map_err(|e| FabricError::io("set-up socket", e))?;
            let mut chunk = [0u8; SETUP_MSG_BYTES_MAX];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(FabricError::PeerGone(format!("{} (closed during set-up)", self.remote))),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(self.io_error("receiving", e)),
            }
        }
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> FabricError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                FabricError::Timeout(format!("fabric set-up with {}: {what}", self.remote))
            }
            _ => FabricError::io(format!("fabric set-up with {}: {what}", self.remote), e),
        }
    }

    /// Refuses the peer: logs why, tells it, and returns the error.
    fn refuse(&mut self, peer: Option<&str>, reason: String) -> FabricError {
        warn!(remote = %self.remote, peer = peer.unwrap_or("?"), "fabric: refused: {reason}");
        let _ = self.send(&SetupMsg::Refused { reason: reason.clone() });
        FabricError::Refused(reason)
    }

    /// Bytes received after the last set-up message (the peer's first frames).
    pub fn into_parts(self) -> (TcpStream, Vec<u8>) {
        (self.stream, self.buf)
    }
}

fn their_refusal(remote: SocketAddr, reason: &str) -> FabricError {
    warn!(%remote, "fabric: the peer refused us: {reason}");
    FabricError::Refused(format!("the peer at {remote} refused: {reason}"))
}

fn unexpected(conn: &mut SetupConn, peer: Option<&str>, got: &SetupMsg, wanted: &str) -> FabricError {
    let what = match got {
        SetupMsg::Refused { reason } => return their_refusal(conn.remote, reason),
        SetupMsg::Hello { .. } => "HELLO",
        SetupMsg::Challenge { .. } => "CHALLENGE",
        SetupMsg::Proof { .. } => "PROOF",
        SetupMsg::Welcome => "WELCOME",
        SetupMsg::VerbsInfo(_) => "VERBS_INFO",
        SetupMsg::Ready => "READY",
    };
    conn.refuse(peer, format!("expected {wanted}, got {what}"))
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        setup::KIND_TCP => "tcp",
        setup::KIND_VERBS => "verbs",
        _ => "unknown",
    }
}

fn nonce() -> [u8; NONCE_BYTES] {
    let mut n = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

/// The accepting side: returns the authenticated peer's node id.
pub(crate) fn accept(conn: &mut SetupConn, shared: &Shared) -> Result<String, FabricError> {
    let (version, kind, nonce_c, client) = match conn.recv()? {
        SetupMsg::Hello { version, kind, nonce, node } => (version, kind, nonce, node),
        other => return Err(unexpected(conn, None, &other, "HELLO")),
    };
    if version != VERSION {
        return Err(
            conn.refuse(Some(&client), format!("fabric protocol version {version}, this node speaks {VERSION}"))
        );
    }
    if kind != shared.kind_byte() {
        return Err(conn.refuse(
            Some(&client),
            format!("peer runs the {} fabric, this node the {}", kind_name(kind), kind_name(shared.kind_byte())),
        ));
    }
    if !shared.peers.contains(&client) {
        return Err(
            conn.refuse(Some(&client), format!("node '{client}' is not in the peers of node '{}'", shared.node))
        );
    }
    let nonce_s = nonce();
    let t = Transcript { kind, nonce_c: &nonce_c, nonce_s: &nonce_s, client: &client, server: &shared.node };
    let mac = setup::prove(&shared.secret, Side::Server, &t);
    conn.send(&SetupMsg::Challenge { kind, nonce: nonce_s, mac, node: shared.node.clone() })?;
    match conn.recv()? {
        SetupMsg::Proof { mac } if setup::verify(&shared.secret, Side::Client, &t, &mac) => {}
        SetupMsg::Proof { .. } => {
            return Err(
                conn.refuse(Some(&client), format!("node '{client}' failed authentication (wrong cluster secret?)"))
            )
        }
        other => return Err(unexpected(conn, Some(&client), &other, "PROOF")),
    }
    conn.send(&SetupMsg::Welcome)?;
    info!(remote = %conn.remote, peer = %client, "fabric: accepted an authenticated endpoint");
    Ok(client)
}

/// The connecting side: succeeds only if the server proves the secret and is `peer`.
pub(crate) fn connect(conn: &mut SetupConn, shared: &Shared, peer: &str) -> Result<(), FabricError> {
    let kind = shared.kind_byte();
    let nonce_c = nonce();
    conn.send(&SetupMsg::Hello { version: VERSION, kind, nonce: nonce_c, node: shared.node.clone() })?;
    let (nonce_s, mac) = match conn.recv()? {
        SetupMsg::Challenge { kind: k, nonce, mac, node } => {
            if node != peer {
                return Err(conn.refuse(Some(&node), format!("expected node '{peer}', this is node '{node}'")));
            }
            if k != kind {
                return Err(conn.refuse(Some(&node), "fabric kind changed in the challenge".into()));
            }
            (nonce, mac)
        }
        other => return Err(unexpected(conn, Some(peer), &other, "CHALLENGE")),
    };
    let t = Transcript { kind, nonce_c: &nonce_c, nonce_s: &nonce_s, client: &shared.node, server: peer };
    if !setup::verify(&shared.secret, Side::Server, &t, &mac) {
        return Err(conn.refuse(Some(peer), format!("node '{peer}' failed authentication (wrong cluster secret?)")));
    }
    conn.send(&SetupMsg::Proof { mac: setup::prove(&shared.secret, Side::Client, &t) })?;
    match conn.recv()? {
        SetupMsg::Welcome => Ok(()),
        other => Err(unexpected(conn, Some(peer), &other, "WELCOME")),
    }
}
