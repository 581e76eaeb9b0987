//! End-to-end: the harness against a real Stager target started in-process
//! (`stager_target::Target`) on an ephemeral loopback port, with memory namespaces.
//!
//! Covers every workload kind, queue depths 1..128, sizes 512 B..1 MiB, digests on and off,
//! several connections, discovery, `--verify` on a healthy target (and its state file across
//! runs), detection of a target that lost acknowledged writes, a target that goes away in the
//! middle of a run (state saved with the writes in flight, verified after a restart), floors,
//! compare/plot of real reports, scenarios, and the binary's exit codes. Runs are short (a
//! few hundred ms); the whole file takes well under a minute.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stager_perf::floor::{FloorConfig, FloorMode};
use stager_perf::run::{run, PollMode, RunConfig};
use stager_perf::scan::{verify_state, VerifyConfig};
use stager_perf::scenario::{run_scenario, Scenario, ScenarioOptions};
use stager_perf::session::SessionOptions;
use stager_perf::units::ByteRange;
use stager_perf::verify::FailureKind;
use stager_perf::workload::Workload;
use stager_perf::{TargetUrl, EXIT_OK, EXIT_USAGE, EXIT_VERIFY};
use stager_target::config::{self, BackendConfig, Config, NamespaceConfig};
use stager_target::Target;

const NQN: &str = "nqn.2026-11.dev.stager:perf-e2e";
/// 64 MiB of 4 KiB blocks.
const NS_4K: u32 = 1;
/// 16 MiB of 512-byte blocks.
const NS_512: u32 = 2;

fn config_with(backend_1: BackendConfig) -> Config {
    let mut c = config::embedded_default();
    // The default's flash device and management socket are per machine: tests run many targets
    // at once, each with its own namespaces (set below) and no socket.
    c.flash.clear();
    c.management.socket = None;
    c.listeners[0].address = "127.0.0.1:0".parse().expect("literal address");
    c.reactors.idle_poll_us = 200;
    let s = &mut c.subsystems[0];
    s.nqn = NQN.into();
    s.allow_any_host = true;
    s.namespaces = vec![
        NamespaceConfig { nsid: NS_4K, backend: backend_1, uuid: None },
        NamespaceConfig {
            nsid: NS_512,
            backend: BackendConfig::Memory { size_bytes: 16 << 20, block_size: 512 },
            uuid: None,
        },
    ];
    c
}

fn memory_config() -> Config {
    config_with(BackendConfig::Memory { size_bytes: 64 << 20, block_size: 4096 })
}

/// A running target that shuts down when dropped.
struct TestTarget {
    target: Option<Target>,
    addr: SocketAddr,
}

impl TestTarget {
    fn start(c: Config) -> TestTarget {
        let target = Target::start(c).expect("target starts");
        let addr = target.listen_addr(0);
        TestTarget { target: Some(target), addr }
    }
    fn url(&self) -> TargetUrl {
        TargetUrl::parse(&format!("tcp://{}/{NQN}", self.addr)).expect("valid URL")
    }
    /// The URL without an NQN: the harness asks discovery.
    fn bare_url(&self) -> TargetUrl {
        TargetUrl::parse(&format!("tcp://{}", self.addr)).expect("valid URL")
    }
    fn stop(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A short run. Sleep-polling keeps many concurrent tests from starving each other on small
/// machines; a few tests use busy polling explicitly.
fn cfg(url: TargetUrl, w: Workload, size: usize, qd: usize) -> RunConfig {
    let mut c = RunConfig::new(url);
    c.workload = w;
    c.io_bytes = size;
    c.queue_depth = qd;
    c.time = Duration::from_millis(300);
    c.poll = PollMode::Sleep;
    c.seed = Some(42);
    c.timeout = Duration::from_secs(10);
    c
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stager-perf-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Runs and checks the run was clean and did I/O.
fn run_ok(c: &RunConfig) -> stager_perf::run::RunOutcome {
    let out = run(c).unwrap_or_else(|e| panic!("{}: {e}", c.default_name()));
    let r = &out.report;
    assert!(r.errors.is_empty(), "{}: {:?}", r.name, r.errors);
    assert_eq!(r.results.errors, 0, "{}: {:?}", r.name, r.first_command_error);
    assert_eq!(out.failures.total, 0, "{}: {:?}", r.name, out.failures.kept);
    assert!(r.results.ios > 0 && r.results.iops > 0.0, "{}: no I/O", r.name);
    assert!(r.results.latency_us.p50 > 0.0);
    assert_eq!(out.exit_code(), EXIT_OK);
    out
}

#[test]
fn every_workload_kind_runs() {
    let t = TestTarget::start(memory_config());
    for w in Workload::ALL {
        let out = run_ok(&cfg(t.url(), w, 4096, 4));
        let r = &out.report.results;
        match w {
            Workload::Read | Workload::RandRead => assert_eq!(r.write_ios, 0),
            Workload::Write | Workload::RandWrite => assert_eq!(r.read_ios, 0),
            Workload::Rw => assert!(r.read_ios > 0 && r.write_ios > 0),
        }
        assert_eq!(out.report.settings.workload, w.name());
    }
}

#[test]
fn queue_depths_from_1_to_128() {
    let t = TestTarget::start(memory_config());
    for qd in [1, 2, 8, 32, 128] {
        let mut c = cfg(t.url(), Workload::RandRead, 4096, qd);
        c.poll = if qd == 1 { PollMode::Busy } else { PollMode::Sleep };
        let out = run_ok(&c);
        assert_eq!(out.report.settings.queue_depth as usize, qd);
        let mut c = cfg(t.url(), Workload::RandWrite, 4096, qd);
        c.time = Duration::from_millis(150);
        run_ok(&c);
    }
}

#[test]
fn sizes_from_512_bytes_to_1_mib() {
    let t = TestTarget::start(memory_config());
    for (nsid, size) in
        [(NS_512, 512), (NS_512, 4096), (NS_4K, 4096), (NS_4K, 8192), (NS_4K, 128 << 10), (NS_4K, 1 << 20)]
    {
        for w in [Workload::Write, Workload::Read, Workload::Rw] {
            let mut c = cfg(t.url(), w, size, 4);
            c.nsid = Some(nsid);
            c.time = Duration::from_millis(150);
            let out = run_ok(&c);
            assert_eq!(out.report.results.bytes, out.report.results.ios * size as u64);
            assert_eq!(out.report.settings.block_bytes, Some(if nsid == NS_512 { 512 } else { 4096 }));
        }
    }
}

#[test]
fn digests_on_and_off() {
    let t = TestTarget::start(memory_config());
    for digests in [false, true] {
        for (w, size) in [(Workload::RandWrite, 4096), (Workload::RandRead, 4096), (Workload::Write, 256 << 10)] {
            let mut c = cfg(t.url(), w, size, 8);
            c.digests = digests;
            let out = run_ok(&c);
            assert_eq!(out.report.settings.digests, digests);
        }
    }
}

#[test]
fn discovery_finds_the_subsystem_and_connections_split_the_range() {
    let t = TestTarget::start(memory_config());
    let mut c = cfg(t.bare_url(), Workload::Rw, 4096, 8);
    c.connections = 3;
    c.ramp = Duration::from_millis(100);
    let out = run_ok(&c);
    assert_eq!(out.report.settings.subnqn.as_deref(), Some(NQN));
    assert_eq!(out.report.settings.connections, 3);
    let entries = stager_perf::session::discover(&t.bare_url(), &SessionOptions::default()).expect("discovery");
    assert!(entries.iter().any(|e| e.subnqn == NQN && e.subtype == 2));
}

#[test]
fn verify_passes_on_a_healthy_target_and_state_carries_over() {
    let t = TestTarget::start(memory_config());
    let dir = temp_dir("healthy");
    let state = dir.join("state.bin");
    // Random mixed I/O over a small range, so reads hit blocks written in the same run.
    for (nsid, size, qd, conns) in
        [(NS_4K, 4096, 16, 2), (NS_512, 512, 8, 1), (NS_4K, 64 << 10, 4, 1), (NS_512, 8192, 32, 2)]
    {
        let mut c = cfg(t.url(), Workload::Rw, size, qd);
        c.nsid = Some(nsid);
        c.connections = conns;
        c.verify = true;
        c.range = Some(ByteRange { offset_bytes: 1 << 20, len_bytes: Some(4 << 20) });
        let out = run_ok(&c);
        let v = out.report.results.verify.clone().expect("verify summary");
        assert!(v.blocks_written > 0 && v.blocks_checked > 0, "{v:?}");
    }
    // Write with a state file, then read it back with a run and with `verify`.
    let mut c = cfg(t.url(), Workload::RandWrite, 4096, 16);
    c.verify = true;
    c.verify_state = Some(state.clone());
    c.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(2 << 20) });
    assert_eq!(run_ok(&c).state_saved.as_deref(), Some(state.as_path()));
    let mut c = cfg(t.url(), Workload::Read, 8192, 8);
    c.verify = true;
    c.verify_state = Some(state.clone());
    c.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(2 << 20) });
    let out = run_ok(&c);
    assert!(out.report.results.verify.as_ref().is_some_and(|v| v.blocks_checked > 0));
    let vc = VerifyConfig { target: t.bare_url(), session: SessionOptions::default(), state_path: state.clone() };
    let v = verify_state(&vc).expect("verify runs");
    assert_eq!(v.exit_code(), EXIT_OK, "{:?}", v.failures.kept);
    assert_eq!(v.counts.blocks_checked, v.blocks_recorded);
    assert!(v.blocks_recorded > 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn verify_catches_a_target_that_lost_acknowledged_writes() {
    // A memory namespace forgets everything on restart: exactly a target losing acked writes.
    let dir = temp_dir("lost");
    let state = dir.join("state.bin");
    let mut t = TestTarget::start(memory_config());
    let mut c = cfg(t.url(), Workload::RandWrite, 4096, 8);
    c.verify_state = Some(state.clone());
    c.verify = true;
    c.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(1 << 20) });
    run_ok(&c);
    t.stop();
    let t = TestTarget::start(memory_config());
    let vc = VerifyConfig { target: t.url(), session: SessionOptions::default(), state_path: state.clone() };
    let v = verify_state(&vc).expect("verify runs");
    assert_eq!(v.exit_code(), EXIT_VERIFY);
    assert_eq!(v.failures.total, v.blocks_recorded);
    assert!(v.failures.kept.iter().all(|f| f.kind == FailureKind::Lost));
    // A verifying run notices too, and exits 3.
    let mut c = cfg(t.url(), Workload::RandRead, 4096, 4);
    c.verify = true;
    c.verify_state = Some(state);
    c.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(1 << 20) });
    let out = run(&c).expect("run starts");
    assert_eq!(out.exit_code(), EXIT_VERIFY);
    assert!(out.failures.kept.iter().any(|f| f.to_string().contains("lost write")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn target_going_away_mid_run_keeps_in_flight_writes_pending() {
    let dir = temp_dir("crash");
    let img = dir.join("ns1.img");
    let state = dir.join("state.bin");
    let file_backend =
        || BackendConfig::File { path: img.clone(), size_bytes: Some(32 << 20), block_size: 4096, direct: false };
    let t = TestTarget::start(config_with(file_backend()));
    let mut c = cfg(t.url(), Workload::Rw, 4096, 32);
    c.connections = 2;
    c.verify = true;
    c.verify_state = Some(state.clone());
    c.time = Duration::from_secs(5);
    c.timeout = Duration::from_secs(3);
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        drop(t);
    });
    let out = run(&c).expect("run starts");
    stopper.join().expect("stopper thread");
    assert!(!out.report.errors.is_empty(), "the run should have lost its connections");
    assert_eq!(out.exit_code(), stager_perf::EXIT_FAILURE);
    assert_eq!(out.failures.total, 0);
    assert_eq!(out.state_saved.as_deref(), Some(state.as_path()));
    // Same file, new target: everything acknowledged must be there; in-flight writes may or may not be.
    let t = TestTarget::start(config_with(file_backend()));
    let vc = VerifyConfig { target: t.url(), session: SessionOptions::default(), state_path: state.clone() };
    let v = verify_state(&vc).expect("verify runs");
    assert_eq!(v.exit_code(), EXIT_OK, "{:?}", v.failures.kept);
    assert!(v.blocks_recorded > 0);
    // A later run resolves the pending writes and goes on verifying.
    let mut c = cfg(t.url(), Workload::Rw, 4096, 8);
    c.verify = true;
    c.verify_state = Some(state);
    let out = run_ok(&c);
    assert_eq!(out.report.results.verify.as_ref().map(|v| v.pending_resolved), Some(v.pending_recorded));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP relay between the harness and the target that can cut every connection at once,
/// like a network partition or a host crash seen from the target: commands in flight may or
/// may not have been executed, and no completion for them ever arrives.
struct CuttingProxy {
    addr: SocketAddr,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl CuttingProxy {
    fn start(upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listens");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy address");
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (streams.clone(), stop.clone());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let Ok(up) = TcpStream::connect(upstream) else { continue };
                let _ = down.set_nonblocking(false);
                for s in [&down, &up] {
                    let _ = s.set_nodelay(true);
                }
                let pairs = [(down.try_clone(), up.try_clone()), (up.try_clone(), down.try_clone())];
                for (from, to) in pairs {
                    if let (Ok(mut from), Ok(mut to)) = (from, to) {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
                if let Ok(mut v) = st.lock() {
                    v.push(down);
                    v.push(up);
                }
            }
        });
        CuttingProxy { addr, streams, stop }
    }
    fn url(&self) -> TargetUrl {
        TargetUrl::parse(&format!("tcp://{}/{NQN}", self.addr)).expect("valid URL")
    }
    fn cut(&self) {
        if let Ok(v) = self.streams.lock() {
            for s in v.iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

#[test]
fn cut_connections_leave_pending_writes_that_verify_accepts() {
    let t = TestTarget::start(memory_config());
    let proxy = CuttingProxy::start(t.addr);
    let dir = temp_dir("cut");
    let state = dir.join("state.bin");
    let mut c = cfg(proxy.url(), Workload::RandWrite, 4096, 32);
    c.connections = 2;
    c.verify = true;
    c.verify_state = Some(state.clone());
    c.range = Some(ByteRange { offset_bytes: 0, len_bytes: Some(8 << 20) });
    c.time = Duration::from_secs(5);
    c.timeout = Duration::from_secs(3);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            proxy.cut();
        });
        run(&c).expect("run starts")
    });
    assert!(!out.report.errors.is_empty(), "the run should have lost its connections");
    assert_eq!(out.failures.total, 0);
    // Straight to the target: acknowledged writes are there, cut ones may or may not be.
    let vc = VerifyConfig { target: t.url(), session: SessionOptions::default(), state_path: state.clone() };
    let v = verify_state(&vc).expect("verify runs");
    assert_eq!(v.exit_code(), EXIT_OK, "{:?}", v.failures.kept);
    assert!(v.pending_recorded > 0, "no write was in flight when the connections were cut");
    assert_eq!(v.counts.pending_resolved, v.pending_recorded);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn floor_compare_and_plot_real_reports() {
    let t = TestTarget::start(memory_config());
    let dir = temp_dir("compare");
    let mut c = cfg(t.url(), Workload::RandRead, 4096, 1);
    c.poll = PollMode::Busy;
    let run_report = run_ok(&c).report;
    let floor = stager_perf::floor::floor(&FloorConfig {
        mode: FloorMode::Read,
        time: Duration::from_millis(300),
        ..Default::default()
    })
    .expect("floor runs");
    assert!(floor.results.iops > 0.0);
    let (a, b) = (dir.join("floor.json"), dir.join("run.json"));
    floor.save(&a).expect("save");
    run_report.save(&b).expect("save");
    let reports = stager_perf::compare::load_reports(&[&a, &b]).expect("load");
    assert_eq!(reports[1], run_report);
    let mut out = Vec::new();
    stager_perf::compare::print_comparison(&reports, &mut out).expect("print");
    let text = String::from_utf8(out).expect("utf8");
    assert!(text.contains("floor-read-4k-qd1") && text.contains("randread-4k-qd1"), "{text}");
    let svg = dir.join("cdf.svg");
    stager_perf::plot::write_svg(&reports, &Default::default(), &svg).expect("plot");
    let s = std::fs::read_to_string(&svg).expect("svg");
    assert_eq!(s.matches("<polyline").count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn scenario_runs_and_summarises() {
    let t = TestTarget::start(memory_config());
    let dir = temp_dir("scenario");
    let yaml = dir.join("s.yaml");
    std::fs::write(
        &yaml,
        "name: e2e\ndefaults: { time: 200ms, poll: sleep }\nruns:\n  - { name: rr, workload: randread, size: 4k, qd: 4, floor: true }\n  - { name: rw-verify, workload: rw, size: 4k, qd: 8, verify: true, range: '0:4m' }\n  - { name: rr2, workload: randread, size: 4k, qd: 4, floor: true }\n",
    )
    .expect("write scenario");
    let sc = Scenario::load(&yaml, &t.url()).expect("scenario parses");
    let opts = ScenarioOptions {
        target: t.url(),
        out_dir: dir.join("out"),
        only: Vec::new(),
        time: None,
        ramp: None,
        hostnqn: None,
        timeout: Duration::from_secs(10),
        cpus: Vec::new(),
        progress: false,
    };
    let mut log = Vec::new();
    let out = run_scenario(&sc, &opts, &mut log).expect("scenario runs");
    assert_eq!(out.exit_code(), EXIT_OK, "{}", String::from_utf8_lossy(&log));
    assert_eq!(out.entries.len(), 3);
    assert!(out.entries[0].floor.is_some() && out.entries[2].floor.is_some());
    for f in ["rr.json", "rw-verify.json", "rr2.json", "floor-read-4k-qd4.json"] {
        assert!(dir.join("out").join(f).exists(), "{f} missing");
    }
    assert!(out.markdown.contains("| rr | randread | 4 KiB | 4 | 1 |"), "{}", out.markdown);
    let _ = std::fs::remove_dir_all(&dir);
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_stager-perf"))
}

#[test]
fn binary_exit_codes() {
    let t = TestTarget::start(memory_config());
    let dir = temp_dir("binary");
    let url = t.url().to_string();
    let json = dir.join("r.json");
    let o = binary()
        .args([
            "run", "--target", &url, "-q", "2", "-s", "4k", "-w", "rw", "--mix", "70", "-t", "300ms", "--quiet",
            "--poll", "sleep",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("p99.99") && table.contains("CPU"), "{table}");
    assert!(stager_perf::Report::load(&json).is_ok());
    for bad in [
        vec!["run", "--target", "tcp://", "-t", "1"],
        vec!["run", "--target", &url, "-s", "4q"],
        vec!["run", "--target", &url, "-q", "0"],
        vec!["run", "--target", &url, "-w", "sideways"],
        vec!["run", "--target", &url, "--mix", "101"],
        vec!["run", "--target", &url, "--verify-state"],
        vec!["nonsense"],
    ] {
        let o = binary().args(&bad).output().expect("runs");
        assert_eq!(o.status.code(), Some(EXIT_USAGE), "{bad:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    let o = binary().args(["discover", "--target", &t.bare_url().to_string()]).output().expect("runs");
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains(NQN));
    // Nothing listens on a just-closed port: exit 1 and a clear message.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let o =
        binary().args(["run", "--target", &format!("tcp://127.0.0.1:{port}/{NQN}"), "-t", "1"]).output().expect("runs");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot connect to 127.0.0.1:{port}")) && err.contains("connection refused"),
        "{err}"
    );
    // A missing or damaged state file is an error, not a panic.
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"not a state file").expect("write");
    let o = binary().args(["verify", "--target", &url, "--verify-state"]).arg(&junk).output().expect("runs");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("junk.bin"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn binary_verify_failure_exits_3() {
    let dir = temp_dir("binary-verify");
    let state = dir.join("s.bin");
    let mut t = TestTarget::start(memory_config());
    let url = t.url().to_string();
    let o = binary()
        .args([
            "run",
            "--target",
            &url,
            "-q",
            "4",
            "-w",
            "randwrite",
            "-t",
            "200ms",
            "--range",
            "0:256k",
            "--quiet",
            "--poll",
            "sleep",
        ])
        .arg("--verify-state")
        .arg(&state)
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    t.stop();
    let t = TestTarget::start(memory_config());
    let o = binary()
        .args(["verify", "--target", &t.url().to_string(), "--verify-state"])
        .arg(&state)
        .output()
        .expect("runs");
    assert_eq!(o.status.code(), Some(EXIT_VERIFY));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("VERIFY FAILURE LBA") && err.contains("lost write"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
