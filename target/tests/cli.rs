//! The stagerd binary: --check-config on good and bad files, and a real run from a YAML file
//! that serves a host and shuts down cleanly on SIGTERM with the data on disk.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use stager_nvme::command::DataDirection;
use stager_nvme::host::{io_cmd, Controller};

const STAGERD: &str = env!("CARGO_BIN_EXE_stagerd");

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("stager-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn check_config_accepts_the_examples() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/minimal.yaml");
    let out = Command::new(STAGERD).args(["--check-config", root]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));
}

#[test]
fn check_config_names_file_key_and_problem() {
    let d = tmpdir("bad");
    let f = d.join("bad.yaml");
    std::fs::write(
        &f,
        "listeners:\n  - name: tcp0\n    address: 127.0.0.1:4420\nsubsystems:\n  - nqn: nqn.2026-11.dev.stager:x\n    allow_any_host: true\n    namespaces:\n      - nsid: 1\n        backend: { kind: memory, sise: 1MiB }\n",
    )
    .unwrap();
    let out = Command::new(STAGERD).arg("--check-config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("sise") && err.contains("subsystems[0]"),
        "unhelpful error: {err}"
    );
    // A missing file and garbage both fail cleanly, never panic.
    let out = Command::new(STAGERD).args(["--check-config", "/nonexistent/x.yaml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&f, [0xFFu8, 0xFE, 0x00, 0x41]).unwrap();
    let out = Command::new(STAGERD).arg("--check-config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn serves_from_yaml_and_stops_cleanly_on_sigterm() {
    let d = tmpdir("run");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let img = d.join("ns1.img");
    let yaml = format!(
        "listeners:\n  - name: tcp0\n    address: 127.0.0.1:{port}\nsubsystems:\n  - nqn: {NQN}\n    hosts: [{HOSTNQN}]\n    namespaces:\n      - nsid: 1\n        backend: {{ kind: file, path: {}, size: 32MiB }}\n",
        img.display()
    );
    let cfg = d.join("stagerd.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut child =
        Command::new(STAGERD).arg("--config").arg(&cfg).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let banner = lines.next().unwrap().unwrap();
    assert!(banner.contains(&format!("127.0.0.1:{port}")), "banner: {banner}");
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Controller::connect(addr, NQN, &opts()).unwrap();
    let data = pattern(5, 256 << 10);
    c.io_queue(0)
        .execute(io_cmd::write(1, 8, 64), data.clone(), DataDirection::HostToController)
        .unwrap()
        .ok()
        .unwrap();
    // SIGTERM with the host still connected: stagerd closes it and exits 0.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut status = None;
    for _ in 0..100 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("stagerd did not exit within 5 s of SIGTERM")
    });
    assert!(status.success(), "stagerd exit status {status}");
    drop(c);
    let on_disk = std::fs::read(&img).unwrap();
    assert!(on_disk[8 * 4096..8 * 4096 + data.len()] == data[..], "written data not in the file after shutdown");
    let _ = std::fs::remove_dir_all(d);
}
