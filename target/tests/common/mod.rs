//! Shared helpers for the target's integration tests: start an in-process target on an
//! ephemeral port with memory namespaces, connect hosts to it, make patterns.
#![allow(dead_code)]

use std::net::SocketAddr;

use stager_nvme::host::{Controller, HostOptions};
use stager_target::config::{self, BackendConfig, Config, NamespaceConfig};
use stager_target::Target;

pub const NQN: &str = "nqn.2026-11.dev.stager:test";
pub const HOSTNQN: &str = "nqn.2026-11.dev.stager:test-host";

/// A config with one subsystem: nsid 1 = 64 MiB memory (4 KiB blocks), nsid 2 = 16 MiB memory
/// (512-byte blocks); only HOSTNQN may connect.
pub fn config() -> Config {
    let mut c = config::embedded_default();
    // The default's flash device and management socket are per machine: tests run many targets
    // at once, each with its own namespaces (set below) and no socket.
    c.flash.clear();
    c.management.socket = None;
    c.listeners[0].address = "127.0.0.1:0".parse().unwrap();
    c.reactors.idle_poll_us = 200;
    let s = &mut c.subsystems[0];
    s.nqn = NQN.into();
    s.allow_any_host = false;
    s.hosts = vec![HOSTNQN.into()];
    s.namespaces = vec![
        NamespaceConfig {
            nsid: 1,
            backend: BackendConfig::Memory { size_bytes: 64 << 20, block_size: 4096 },
            uuid: None,
        },
        NamespaceConfig {
            nsid: 2,
            backend: BackendConfig::Memory { size_bytes: 16 << 20, block_size: 512 },
            uuid: None,
        },
    ];
    c
}

pub struct TestTarget {
    pub target: Option<Target>,
    pub addr: SocketAddr,
}

impl TestTarget {
    pub fn start(c: Config) -> TestTarget {
        let target = Target::start(c).expect("target starts");
        let addr = target.listen_addr(0);
        TestTarget { target: Some(target), addr }
    }
    pub fn default() -> TestTarget {
        Self::start(config())
    }
    pub fn connect(&self, opts: &HostOptions) -> Controller {
        Controller::connect(self.addr, NQN, opts).expect("host connects")
    }
}

impl Drop for TestTarget {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            t.shutdown();
        }
    }
}

pub fn opts() -> HostOptions {
    HostOptions { hostnqn: HOSTNQN.into(), timeout_ms: 10_000, ..HostOptions::default() }
}

/// Deterministic bytes that differ per (seed, position).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP port on 127.0.0.1 that was free just now (for configs written before the process that
/// binds it starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs the stagerd binary on `yaml`, written to `{dir}/{name}.yaml`; its output goes to
/// `{dir}/{name}.log`.
pub fn spawn_stagerd(dir: &std::path::Path, name: &str, yaml: &str) -> std::process::Child {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(&cfg, yaml).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_stagerd"))
        .arg("--config")
        .arg(&cfg)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("stagerd starts")
}

/// One round of pipelined I/O on `q`: `n` writes (in-capsule 4 KiB and 64 KiB through R2T)
/// then reads of the same blocks, checking every byte.
pub fn round(q: &mut stager_nvme::host::QueuePair, seed: u64, n: u64) {
    let len = |i: u64| if i.is_multiple_of(2) { 4096 } else { 65536 };
    let mut out: Vec<stager_nvme::host::Response> = Vec::new();
    for i in 0..n {
        let l = len(i);
        let lba = i * 16;
        q.submit(
            stager_nvme::host::io_cmd::write(1, lba, (l / 4096) as u32),
            pattern(seed + i, l),
            stager_nvme::command::DataDirection::HostToController,
            i,
        )
        .unwrap();
    }
    while out.len() < n as usize {
        q.wait(&mut out).unwrap();
    }
    assert!(out.iter().all(|r| r.status() == stager_nvme::status::Status::SUCCESS));
    out.clear();
    for i in 0..n {
        let l = len(i);
        q.submit(
            stager_nvme::host::io_cmd::read(1, i * 16, (l / 4096) as u32),
            vec![0; l],
            stager_nvme::command::DataDirection::ControllerToHost,
            i,
        )
        .unwrap();
    }
    while out.len() < n as usize {
        q.wait(&mut out).unwrap();
    }
    for r in &out {
        assert_eq!(r.status(), stager_nvme::status::Status::SUCCESS);
        assert!(r.data == pattern(seed + r.tag, len(r.tag)), "read of block {} returned other bytes", r.tag * 16);
    }
}
