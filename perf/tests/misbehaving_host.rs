//! Misbehaving hosts (`stager-perf hostile`) against a real target started in-process, each
//! next to a well-behaved host whose data is checked with `--verify`: a host that never reads
//! its responses is back-pressured, not buffered; connections that never finish their
//! handshake, or stop in the middle of a PDU, are closed after the configured time; a host that
//! sends more commands than its queue size gets the fatal transport error. The good host loses
//! nothing and never sees an error.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use stager_perf::hostile::{self, HostileConfig, HostileMode};
use stager_perf::run::{run, RunConfig};
use stager_perf::workload::Workload;
use stager_perf::TargetUrl;
use stager_target::config::{self, BackendConfig, Config, NamespaceConfig};
use stager_target::Target;

const NQN: &str = "nqn.2026-11.dev.stager:hostile";

fn config() -> Config {
    let mut c = config::embedded_default();
    c.flash.clear();
    c.management.socket = None;
    c.listeners[0].address = "127.0.0.1:0".parse().expect("literal address");
    c.reactors.idle_poll_us = 200;
    c.transport.handshake_timeout_ms = 300;
    c.transport.pdu_timeout_ms = 300;
    let s = &mut c.subsystems[0];
    s.nqn = NQN.into();
    s.allow_any_host = true;
    s.namespaces = vec![NamespaceConfig {
        nsid: 1,
        backend: BackendConfig::Memory { size_bytes: 64 << 20, block_size: 4096 },
        uuid: None,
    }];
    c
}

struct TestTarget {
    target: Option<Target>,
    addr: SocketAddr,
}

impl TestTarget {
    fn start() -> TestTarget {
        let target = Target::start(config()).expect("target starts");
        let addr = target.listen_addr(0);
        TestTarget { target: Some(target), addr }
    }
    fn url(&self) -> TargetUrl {
        TargetUrl::parse(&format!("tcp://{}/{NQN}", self.addr)).expect("valid URL")
    }
    fn stats(&self) -> &stager_target::transport::tcp::TransportStats {
        self.target.as_ref().expect("running").transport_stats()
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
    }
}

fn hostile_cfg(t: &TestTarget, mode: HostileMode, connections: usize, time: Duration) -> HostileConfig {
    HostileConfig {
        target: t.url(),
        mode,
        connections,
        time,
        queue_depth: 128,
        hostnqn: Some("nqn.2026-11.dev.stager:bad-host".into()),
        timeout: Duration::from_secs(10),
    }
}

/// A verified mixed stream on its own controller: returns its IOPS; panics on any error.
fn verified_stream(t: &TestTarget, seconds: f64, range_start: u64) -> f64 {
    let mut c = RunConfig::new(t.url());
    c.workload = Workload::Rw;
    c.mix_read_pct = 50;
    c.io_bytes = 4096;
    c.queue_depth = 8;
    c.time = Duration::from_secs_f64(seconds);
    c.verify = true;
    c.progress = false;
    c.range = Some(stager_perf::units::ByteRange { offset_bytes: range_start, len_bytes: Some(16 << 20) });
    let out = run(&c).expect("the good host runs");
    assert_eq!(out.failures.total, 0, "the good host lost data: {:?}", out.failures.kept);
    assert!(out.report.errors.is_empty(), "the good host failed: {:?}", out.report.errors);
    assert_eq!(out.report.results.errors, 0, "the good host got error statuses");
    assert!(out.report.results.ios > 0);
    out.report.results.iops
}

#[test]
fn a_host_that_never_reads_is_backpressured_and_others_keep_going() {
    let t = TestTarget::start();
    let cfg = hostile_cfg(&t, HostileMode::NoRead, 2, Duration::from_secs(3));
    let bad = std::thread::spawn(move || hostile::run(&cfg).expect("the bad host connects"));
    std::thread::sleep(Duration::from_millis(500));
    let iops = verified_stream(&t, 2.0, 0);
    let out = bad.join().expect("hostile thread");
    for l in &out.lines {
        eprintln!("hostile: {l}");
    }
    assert!(
        out.lines.iter().filter(|l| l.contains("stopped taking commands")).count() == 2,
        "the target kept reading a host that never reads: {:?}",
        out.lines
    );
    let episodes = t.stats().backpressure_episodes.load(Ordering::Relaxed);
    assert!(episodes >= 2, "{episodes} back-pressure episodes for two hosts that never read");
    assert!(iops > 100.0, "the good host crawled at {iops:.0} IOPS next to the bad one");
}

#[test]
fn stalled_handshakes_and_pdus_are_closed() {
    let t = TestTarget::start();
    for (mode, what) in [
        (HostileMode::NoHandshake, "no ICReq"),
        (HostileMode::NoConnect, "no Connect"),
        (HostileMode::HalfPdu, "half a capsule"),
    ] {
        let out = hostile::run(&hostile_cfg(&t, mode, 3, Duration::from_secs(5))).expect("connects");
        assert!(out.all_closed, "{what}: the target kept the connections: {:?}", out.lines);
    }
    let s = t.stats();
    assert_eq!(s.handshake_timeouts.load(Ordering::Relaxed), 6);
    assert_eq!(s.pdu_timeouts.load(Ordering::Relaxed), 3);
    verified_stream(&t, 0.5, 0);
}

#[test]
fn a_command_beyond_the_queue_size_is_a_fatal_transport_error() {
    let t = TestTarget::start();
    let mut cfg = hostile_cfg(&t, HostileMode::Overrun, 1, Duration::from_secs(5));
    cfg.queue_depth = 16;
    let out = hostile::run(&cfg).expect("connects");
    assert_eq!(out.term_fes, Some(stager_nvme::tcp::pdu::fes::PDU_SEQUENCE_ERROR), "{:?}", out.lines);
    assert_eq!(t.stats().queue_overruns.load(Ordering::Relaxed), 1);
    verified_stream(&t, 0.5, 0);
}

#[test]
fn idle_connections_are_kept_and_cost_the_others_nothing() {
    let t = TestTarget::start();
    let cfg = hostile_cfg(&t, HostileMode::Idle, 200, Duration::from_secs(2));
    let bad = std::thread::spawn(move || hostile::run(&cfg).expect("the idle hosts connect"));
    std::thread::sleep(Duration::from_millis(500));
    verified_stream(&t, 0.5, 16 << 20);
    let out = bad.join().expect("hostile thread");
    assert!(!out.all_closed, "idle, connected queues must stay: {:?}", out.lines);
    // They all closed from the host side now; the target lets go of them.
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.stats().connections.load(Ordering::Relaxed) <= 1);
}
