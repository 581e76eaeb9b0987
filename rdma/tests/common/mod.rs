//! Helpers shared by the fabric's integration tests: fabrics on 127.0.0.1, a loop that polls
//! several endpoints until a condition holds, and a raw client/server that speaks the set-up
//! protocol by hand (so a test can misbehave exactly where it wants).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use stager_rdma::wire::frame::{self, Frame, HEADER_BYTES_MAX};
use stager_rdma::wire::setup::{self, SetupMsg, Side, Transcript, KIND_TCP, VERSION};
use stager_rdma::{Endpoint, Event, Fabric, FabricConfig};

pub const SECRET: &[u8] = b"test-cluster-secret-0123456789";
pub const WAIT: Duration = Duration::from_secs(10);

pub fn config(node: &str, peers: &[&str]) -> FabricConfig {
    FabricConfig {
        node: node.into(),
        secret: SECRET.to_vec(),
        peers: peers.iter().map(|p| p.to_string()).collect(),
        peer_timeout: Duration::from_secs(3),
        ..FabricConfig::default()
    }
}

pub fn start(node: &str, peers: &[&str]) -> Fabric {
    Fabric::start(config(node, peers)).expect("fabric starts")
}

/// The next inbound endpoint of `f`.
pub fn accept(f: &Fabric) -> Endpoint {
    f.incoming().recv_timeout(WAIT).expect("an inbound endpoint")
}

/// Two fabrics "a" and "b", and the endpoint pair of a connecting to b: (a, b, a's end, b's end).
pub fn pair() -> (Fabric, Fabric, Endpoint, Endpoint) {
    let a = start("a", &["b"]);
    let b = start("b", &["a"]);
    let ea = a.connect(b.local_addr(), "b", WAIT).expect("a connects to b");
    let eb = accept(&b);
    assert_eq!(ea.peer(), "b");
    assert_eq!(eb.peer(), "a");
    (a, b, ea, eb)
}

/// Polls every endpoint (events go to the matching vector) until `done` says so; false on timeout.
pub fn drive(
    eps: &mut [&mut Endpoint],
    evs: &mut [Vec<Event>],
    timeout: Duration,
    mut done: impl FnMut(&[Vec<Event>]) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut n = 0;
        for (ep, ev) in eps.iter_mut().zip(evs.iter_mut()) {
            n += ep.poll(ev);
        }
        if done(evs) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        if n == 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

pub fn failed(evs: &[Event]) -> Option<&stager_rdma::FabricError> {
    evs.iter().find_map(|e| if let Event::Failed(err) = e { Some(err) } else { None })
}

fn read_msg(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<SetupMsg> {
    loop {
        if let Some((m, used)) = setup::decode(buf).map_err(|e| std::io::Error::other(e.to_string()))? {
            buf.drain(..used);
            return Ok(m);
        }
        let mut chunk = [0u8; 512];
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn send_msg(s: &mut TcpStream, m: &SetupMsg) {
    let mut out = Vec::new();
    setup::encode(m, &mut out);
    s.write_all(&out).expect("send set-up message");
}

/// A hand-made client: says HELLO as `node`, answers the challenge with `secret`'s proof
/// (without checking the server's), returns the stream after the server's answer.
pub fn raw_client(addr: SocketAddr, node: &str, secret: &[u8]) -> (TcpStream, SetupMsg) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let nonce_c = [7u8; 32];
    send_msg(&mut s, &SetupMsg::Hello { version: VERSION, kind: KIND_TCP, nonce: nonce_c, node: node.into() });
    let mut buf = Vec::new();
    let (nonce_s, server) = match read_msg(&mut s, &mut buf).unwrap() {
        SetupMsg::Challenge { nonce, node, .. } => (nonce, node),
        other => return (s, other),
    };
    let t = Transcript { kind: KIND_TCP, nonce_c: &nonce_c, nonce_s: &nonce_s, client: node, server: &server };
    send_msg(&mut s, &SetupMsg::Proof { mac: setup::prove(secret, Side::Client, &t) });
    let answer = read_msg(&mut s, &mut buf).unwrap_or(SetupMsg::Refused { reason: "closed".into() });
    (s, answer)
}

/// A raw client that completed the handshake as a legitimate member.
pub fn raw_member(addr: SocketAddr, node: &str) -> TcpStream {
    let (s, answer) = raw_client(addr, node, SECRET);
    assert_eq!(answer, SetupMsg::Welcome);
    s
}

/// A hand-made server on 127.0.0.1 that answers one HELLO as `node` with a challenge proved
/// with `secret`, and returns what the client said next.
pub fn raw_server(
    node: &'static str,
    secret: &'static [u8],
) -> (SocketAddr, std::thread::JoinHandle<Option<SetupMsg>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().ok()?;
        s.set_read_timeout(Some(WAIT)).ok()?;
        let mut buf = Vec::new();
        let SetupMsg::Hello { kind, nonce: nonce_c, node: client, .. } = read_msg(&mut s, &mut buf).ok()? else {
            return None;
        };
        let nonce_s = [9u8; 32];
        let t = Transcript { kind, nonce_c: &nonce_c, nonce_s: &nonce_s, client: &client, server: node };
        let mac = setup::prove(secret, Side::Server, &t);
        send_msg(&mut s, &SetupMsg::Challenge { kind, nonce: nonce_s, mac, node: node.into() });
        read_msg(&mut s, &mut buf).ok()
    });
    (addr, h)
}

/// A frame's bytes: header then body.
pub fn frame_bytes(f: Frame, body: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_BYTES_MAX];
    let n = frame::encode(&f, &mut h);
    let mut v = h[..n].to_vec();
    v.extend_from_slice(body);
    v
}
