//! `stagerd`: runs a Stager target. With no arguments it runs the embedded default (one
//! subsystem exporting a write-back volume: a 256 MiB flash log file and a 1 GiB SAN file under
//! ./stager-data/, on 127.0.0.1:4420); `--config FILE` runs a YAML deployment;
//! `--check-config FILE` validates one and exits. SIGHUP re-reads the file and applies volume
//! policy changes live.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use stager_target::config::{self, BackendConfig, Config};
use stager_target::Target;

#[derive(Parser)]
#[command(name = "stagerd", version, about = "Stager: a polled-mode NVMe/TCP storage target")]
struct Cli {
    /// Run the deployment described by this YAML file (default: the embedded configuration).
    #[arg(long, value_name = "FILE", conflicts_with = "check_config")]
    config: Option<std::path::PathBuf>,
    /// Validate this YAML file, print what it describes, and exit (0 valid, 2 invalid).
    #[arg(long, value_name = "FILE")]
    check_config: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = cli.check_config {
        return match config::load(&path) {
            Ok(c) => {
                println!("{}: valid", path.display());
                describe(&c);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("stagerd: {e}");
                ExitCode::from(2)
            }
        };
    }
    let (cfg, origin) = match &cli.config {
        Some(path) => match config::load(path) {
            Ok(c) => (c, path.display().to_string()),
            Err(e) => {
                eprintln!("stagerd: {e}");
                return ExitCode::from(2);
            }
        },
        None => {
            let c = config::embedded_default();
            if let Err(e) = c.validate(config::EMBEDDED_ORIGIN) {
                eprintln!("stagerd: {e}");
                return ExitCode::from(2);
            }
            (c, config::EMBEDDED_ORIGIN.to_string())
        }
    };
    init_logging(&cfg.logging.level);
    tracing::info!("stagerd {} starting with {origin}", env!("CARGO_PKG_VERSION"));
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    for (sig, flag) in [
        (signal_hook::consts::SIGINT, &stop),
        (signal_hook::consts::SIGTERM, &stop),
        (signal_hook::consts::SIGHUP, &reload),
    ] {
        if let Err(e) = signal_hook::flag::register(sig, flag.clone()) {
            eprintln!("stagerd: cannot install a handler for signal {sig}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let target = match Target::start(cfg.clone()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("stagerd: {e}");
            return ExitCode::FAILURE;
        }
    };
    print_banner(&cfg, &target);
    #[cfg(feature = "cluster")]
    let membership = stager_target::cluster::Membership::start(
        &cfg,
        (0..cfg.listeners.len()).map(|i| target.listen_addr(i).to_string()).collect(),
        target.fabric_addr(),
        target.volumes().cloned(),
        target.replication(),
        Some(target.shared()),
    );
    let mut running = cfg.clone();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        if reload.swap(false, Ordering::Relaxed) {
            match &cli.config {
                Some(path) => reload_policies(path, &mut running, &target),
                None => tracing::info!("SIGHUP: running the embedded configuration; nothing to re-read"),
            }
        }
    }
    tracing::info!("signal received: finishing in-flight I/O, closing connections, syncing files");
    #[cfg(feature = "cluster")]
    if let Some(m) = membership {
        m.stop();
    }
    target.shutdown();
    ExitCode::SUCCESS
}

/// SIGHUP: re-reads the file and applies what can change live — volume write policies. Other
/// changes are reported as needing a restart.
fn reload_policies(path: &std::path::Path, running: &mut Config, target: &Target) {
    let new = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("SIGHUP: {e}; keeping the running configuration");
            return;
        }
    };
    let policies = |c: &Config| -> Vec<(u32, stager_policy::WritePolicy)> {
        c.subsystems
            .iter()
            .flat_map(|s| &s.namespaces)
            .filter_map(|n| match &n.backend {
                BackendConfig::Volume { id, policy, .. } => Some((*id, *policy)),
                _ => None,
            })
            .collect()
    };
    let (old, wanted) = (policies(running), policies(&new));
    let mut applied = 0;
    for (id, policy) in &wanted {
        let Some((_, before)) = old.iter().find(|(o, _)| o == id) else {
            tracing::warn!("SIGHUP: volume {id} is new; adding volumes needs a restart");
            continue;
        };
        if before == policy {
            continue;
        }
        match target.volumes().map(|v| v.set_policy(*id, *policy, None)) {
            Some(Ok(m)) => {
                tracing::info!("SIGHUP: {m}");
                applied += 1;
            }
            Some(Err(e)) => tracing::error!("SIGHUP: volume {id}: {e}"),
            None => tracing::error!("SIGHUP: no write-back volumes are running"),
        }
    }
    let mut rest = new.clone();
    let mut was = running.clone();
    for c in [&mut rest, &mut was] {
        for n in c.subsystems.iter_mut().flat_map(|s| s.namespaces.iter_mut()) {
            if let BackendConfig::Volume { policy, .. } = &mut n.backend {
                *policy = stager_policy::WritePolicy::WriteBack;
            }
        }
    }
    if rest != was {
        tracing::warn!(
            "SIGHUP: {} has changes besides volume policies; they take effect at the next restart",
            path.display()
        );
    }
    tracing::info!("SIGHUP: configuration re-read, {applied} policy change(s) applied");
    *running = new;
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("stager={level},stagerd={level},{level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

fn describe(c: &Config) {
    for l in &c.listeners {
        println!("  listener {} on {} ({})", l.name, l.address, l.transport);
    }
    for s in &c.subsystems {
        let hosts = if s.allow_any_host { "any host".to_string() } else { s.hosts.join(", ") };
        println!("  subsystem {} (hosts: {hosts})", s.nqn);
        for n in &s.namespaces {
            println!("    namespace {}: {}", n.nsid, backend_text(&n.backend));
        }
    }
    println!("  reactors on cores {:?}", c.reactors.cores);
    if let Some(n) = &c.node {
        let domain = n.fault_domain.as_deref().map(|d| format!(", fault domain {d}")).unwrap_or_default();
        let kind = match n.fabric.kind {
            config::FabricKindYaml::Tcp => "tcp",
            config::FabricKindYaml::Verbs => "verbs",
        };
        println!("  node {}{domain}: {kind} fabric on {}", n.id, n.fabric.listen);
        for p in &n.peers {
            println!("    peer {} at {}", p.id, p.address);
        }
        if let Some(cl) = &c.cluster {
            println!(
                "    registered in etcd at {} under {} (lease {} ms)",
                cl.endpoints.join(", "),
                cl.prefix,
                cl.lease_ttl_ms
            );
        }
        if !n.peers.is_empty() {
            let f = n.replica_flash.clone().or_else(|| c.flash.first().map(|f| f.name.clone()));
            match f {
                Some(f) => println!("    copies for peers kept on flash {f}"),
                None => println!("    no flash device: this node keeps no copies for peers"),
            }
        }
    }
}

fn backend_text(b: &BackendConfig) -> String {
    match b {
        BackendConfig::Memory { size_bytes, block_size } => {
            format!("memory, {} MiB, {block_size}-byte blocks", size_bytes >> 20)
        }
        BackendConfig::File { path, size_bytes, block_size, direct } => format!(
            "file {}{}, {block_size}-byte blocks{}",
            path.display(),
            size_bytes.map(|s| format!(" ({} MiB)", s >> 20)).unwrap_or_default(),
            if *direct { ", O_DIRECT" } else { "" }
        ),
        BackendConfig::NvmePassthru { path, block_size } => {
            format!("NVMe passthrough {}, {block_size}-byte blocks", path.display())
        }
        BackendConfig::Vfio { pci, block_size } => format!("NVMe on VFIO {pci}, {block_size}-byte blocks"),
        BackendConfig::Volume { id, flash, policy, san, replicas, .. } => {
            let san = match san {
                config::SanConfig::File { path, .. } => format!("file {}", path.display()),
                config::SanConfig::Iscsi { url, .. } => url.clone(),
            };
            let policy = match (policy, replicas.len()) {
                (stager_policy::WritePolicy::WriteBack, n) if n > 0 => {
                    format!("write-back+{n} (replicas {})", replicas.join(", "))
                }
                (p, _) => p.to_string(),
            };
            format!("volume {id}, {policy} on flash {flash}, SAN {san}")
        }
        BackendConfig::Standby { id, size_bytes } => format!(
            "standby of volume {id} ({} MiB): served from this node's copy only when the cluster says so",
            size_bytes >> 20
        ),
    }
}

fn print_banner(c: &Config, t: &Target) {
    let addr = t.listen_addr(0);
    println!("stagerd is serving NVMe/TCP on {addr}");
    for s in &c.subsystems {
        println!("  subsystem {}", s.nqn);
        for n in &s.namespaces {
            println!("    namespace {}: {}", n.nsid, backend_text(&n.backend));
        }
    }
    if let Some(s) = c.subsystems.first() {
        println!("Connect from a Linux host:");
        println!("  nvme discover -t tcp -a {} -s {}", addr.ip(), addr.port());
        println!("  nvme connect -t tcp -a {} -s {} -n {}", addr.ip(), addr.port(), s.nqn);
        println!("Or measure it:  stager-perf run --target tcp://{addr}/{} -q 1 -s 4k -w randread -t 5", s.nqn);
    }
    if let Some(sock) = &c.management.socket {
        println!("Watch it:  stagerctl status --socket {}", sock.display());
    }
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
}
