//! Set-up: nodes authenticate each other with the cluster secret (both directions), only
//! configured peers get in, and the connecting side gets the node it asked for.

mod common;

use common::*;
use stager_rdma::wire::setup::SetupMsg;
use stager_rdma::{Fabric, FabricConfig, FabricError, FabricKind};

#[test]
fn handshake_gives_authenticated_endpoints_both_sides() {
    let (a, b, ea, eb) = pair();
    assert_eq!(ea.peer(), "b");
    assert_eq!(eb.peer(), "a");
    assert_eq!(a.refusals() + b.refusals(), 0);
    assert_eq!(a.node(), "a");
    assert!(b.incoming().is_empty());
}

#[test]
fn wrong_secret_is_refused_by_the_connecting_side() {
    // b holds another secret: a sees b's proof fail and refuses b (and tells it).
    let a = start("a", &["b"]);
    let b =
        Fabric::start(FabricConfig { secret: b"another-secret-of-16+bytes".to_vec(), ..config("b", &["a"]) }).unwrap();
    let err = a.connect(b.local_addr(), "b", WAIT).unwrap_err();
    assert!(matches!(&err, FabricError::Refused(r) if r.contains("failed authentication")), "{err}");
    assert_eq!(a.refusals(), 1);
    assert!(b.incoming().recv_timeout(std::time::Duration::from_millis(300)).is_err());

    // A fake b that answers with a proof made with the wrong secret hears why it was refused.
    let (addr, fake) = raw_server("b", b"not-the-cluster-secret");
    let err = a.connect(addr, "b", WAIT).unwrap_err();
    assert!(matches!(err, FabricError::Refused(_)), "{err}");
    match fake.join().unwrap() {
        Some(SetupMsg::Refused { reason }) => assert!(reason.contains("failed authentication"), "{reason}"),
        other => panic!("fake server heard {other:?}"),
    }
}

#[test]
fn wrong_secret_is_refused_by_the_accepting_side() {
    // A client that ignores the server's proof and answers with a wrong one is refused by b.
    let b = start("b", &["a"]);
    let (_s, answer) = raw_client(b.local_addr(), "a", b"not-the-cluster-secret");
    match answer {
        SetupMsg::Refused { reason } => assert!(reason.contains("failed authentication"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(b.incoming().recv_timeout(std::time::Duration::from_millis(300)).is_err());
    assert_eq!(b.refusals(), 1);
    // The right secret still gets in afterwards.
    let (_s, answer) = raw_client(b.local_addr(), "a", SECRET);
    assert_eq!(answer, SetupMsg::Welcome);
    assert_eq!(accept(&b).peer(), "a");
}

#[test]
fn unknown_node_is_refused() {
    let b = start("b", &["a"]);
    let (_s, answer) = raw_client(b.local_addr(), "mallory", SECRET);
    match answer {
        SetupMsg::Refused { reason } => assert!(reason.contains("'mallory' is not in the peers"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A real node with the right secret but not in b's peers.
    let c = start("c", &["b"]);
    let err = c.connect(b.local_addr(), "b", WAIT).unwrap_err();
    assert!(matches!(&err, FabricError::Refused(r) if r.contains("not in the peers")), "{err}");
    assert!(b.incoming().recv_timeout(std::time::Duration::from_millis(300)).is_err());
    assert_eq!(b.refusals(), 2);
}

#[test]
fn connecting_side_checks_the_peer_id() {
    let a = start("a", &["b", "c"]);
    let b = start("b", &["a"]);
    let err = a.connect(b.local_addr(), "c", WAIT).unwrap_err();
    assert!(matches!(&err, FabricError::Refused(r) if r.contains("expected node 'c'")), "{err}");
}

#[test]
fn garbage_and_silence_before_the_handshake_hurt_no_one() {
    use std::io::Write;
    let b = start("b", &["a"]);
    let mut junk = std::net::TcpStream::connect(b.local_addr()).unwrap();
    junk.write_all(&[0xff; 600]).unwrap();
    let _silent = std::net::TcpStream::connect(b.local_addr()).unwrap();
    let a = start("a", &["b"]);
    let ea = a.connect(b.local_addr(), "b", WAIT).unwrap();
    assert_eq!(ea.peer(), "b");
    assert_eq!(accept(&b).peer(), "a");
}

#[test]
fn bad_configs_are_errors_that_say_what() {
    let short = Fabric::start(FabricConfig { secret: b"short".to_vec(), ..config("a", &[]) }).err().unwrap();
    assert!(short.to_string().contains("secret"), "{short}");
    let bad_id = Fabric::start(config("a b", &[])).err().unwrap();
    assert!(bad_id.to_string().contains("node id"), "{bad_id}");
    let bad_peer = Fabric::start(config("a", &[""])).err().unwrap();
    assert!(bad_peer.to_string().contains("peer id"), "{bad_peer}");
}

#[cfg(not(feature = "verbs"))]
#[test]
fn verbs_without_the_feature_says_so() {
    let err = Fabric::start(FabricConfig { kind: FabricKind::Verbs, ..config("a", &[]) }).err().unwrap();
    assert_eq!(err, FabricError::VerbsNotBuilt);
    assert!(err.to_string().contains("--features stager-rdma/verbs"), "{err}");
}

#[cfg(feature = "verbs")]
#[test]
fn verbs_without_a_device_says_so() {
    // On machines with no RDMA device (CI, this host) opening the fabric fails with a clear error.
    match Fabric::start(FabricConfig {
        kind: FabricKind::Verbs,
        verbs_device: Some("nosuchdev0".into()),
        ..config("a", &[])
    }) {
        Err(e) => assert!(e.to_string().contains("nosuchdev0"), "{e}"),
        Ok(_) => panic!("a device named nosuchdev0 exists?"),
    }
}

#[test]
fn many_silent_connections_do_not_lock_out_a_member() {
    // More silent clients than handshake threads: the member still gets in once their
    // handshakes time out (HANDSHAKE_TIMEOUT), and the accept thread does not spin meanwhile.
    let b = start("b", &["a"]);
    let silent: Vec<_> = (0..stager_rdma::constants::HANDSHAKES_MAX + 2)
        .map(|_| std::net::TcpStream::connect(b.local_addr()).unwrap())
        .collect();
    let a = start("a", &["b"]);
    let ea = a.connect(b.local_addr(), "b", stager_rdma::constants::HANDSHAKE_TIMEOUT * 3).unwrap();
    assert_eq!(ea.peer(), "b");
    drop(silent);
}
