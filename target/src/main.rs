//! `stagerd`: runs a Stager target. With no arguments it runs the embedded default (one
//! subsystem, one 1 GiB file-backed namespace under ./stager-data/, 127.0.0.1:4420);
//! `--config FILE` runs a YAML deployment; `--check-config FILE` validates one and exits.

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
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
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
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("signal received: finishing in-flight I/O, closing connections, syncing files");
    target.shutdown();
    ExitCode::SUCCESS
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
    println!("Stop with Ctrl-C (SIGINT) or SIGTERM.");
}
