//! `stager-perf`: the command-line front end of the harness (see the library, `stager_perf`,
//! for how each command works, and docs/perf.md for every flag and the JSON schema).
//!
//! This file only turns arguments into library configurations, prints what comes back, and
//! maps errors to exit codes: 0 success, 1 the run failed (cannot connect, lost connection,
//! command errors), 2 bad usage (clap's code too), 3 data-integrity failure (`--verify`,
//! `verify`). Tables go to stdout, progress and diagnostics to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use stager_perf::compare::{load_reports, print_comparison};
use stager_perf::cpu::parse_cpu_list;
use stager_perf::floor::{FloorConfig, FloorMode};
use stager_perf::plot::{write_svg, PlotOptions, YScale};
use stager_perf::run::{PollMode, RunConfig};
use stager_perf::scan::{verify_state, VerifyConfig};
use stager_perf::scenario::{print_plan, run_scenario, Scenario, ScenarioOptions};
use stager_perf::session::{self, SessionOptions};
use stager_perf::units::{parse_disk_range, parse_duration, parse_io_size, parse_range, ByteRange};
use stager_perf::workload::Workload;
use stager_perf::{PerfError, TargetUrl, EXIT_OK};

#[derive(Parser)]
#[command(name = "stager-perf", version, about = "Latency/throughput harness and data verifier for NVMe/TCP targets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a workload against a target and print IOPS, MiB/s and latency percentiles.
    Run(RunArgs),
    /// Measure raw loopback TCP request/response with the same sizes and depth (the floor).
    Floor(FloorArgs),
    /// Measure a file or block device alone (O_DIRECT, durable writes with --sync), the way
    /// stagerd's flash log writes it.
    Disk(DiskArgs),
    /// Read back every block recorded in a verify state file and check it.
    Verify(VerifyArgs),
    /// Print a target's discovery log.
    Discover(DiscoverArgs),
    /// Print runs (JSON reports) side by side with ratios against the first.
    Compare(CompareArgs),
    /// Draw latency CDFs of runs (JSON reports) into an SVG file.
    Plot(PlotArgs),
    /// Run a YAML matrix of runs and print a markdown summary.
    Scenario(ScenarioArgs),
    /// Play a misbehaving host (never reads, stalls mid-PDU, overruns its queue...) and report
    /// what the target did.
    Hostile(HostileArgs),
}

#[derive(Args)]
struct HostileArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// no-read | idle | no-handshake | no-connect | half-pdu | overrun.
    #[arg(long, value_enum)]
    mode: stager_perf::hostile::HostileMode,
    /// Connections to misbehave on.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100000))]
    connections: u32,
    /// How long to hold them (seconds, or 500ms, 2m...); the target may close them sooner.
    #[arg(short = 't', long, default_value = "10", value_parser = parse_duration)]
    time: Duration,
    /// I/O queue depth asked for (no-read, half-pdu, overrun).
    #[arg(short = 'q', long = "qd", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1023))]
    qd: u32,
    /// Exit 1 unless the target closed every connection before --time ran out.
    #[arg(long)]
    expect_closed: bool,
    /// Exit 1 unless the target sent a C2HTermReq with this FES (e.g. 2, PDU Sequence Error).
    #[arg(long)]
    expect_term: Option<u16>,
}

fn parse_target(s: &str) -> Result<TargetUrl, String> {
    TargetUrl::parse(s).map_err(|e| e.to_string())
}

fn parse_cpus(s: &str) -> Result<CpuList, String> {
    parse_cpu_list(s).map(CpuList)
}

/// A CPU list as one argument value (`0,2-3`).
#[derive(Clone, Debug)]
struct CpuList(Vec<usize>);

/// Connection options shared by every command that talks to a target.
#[derive(Args, Clone)]
struct ConnectArgs {
    /// tcp://HOST:PORT[/NQN]; without an NQN the first NVM subsystem from discovery is used.
    #[arg(long, value_parser = parse_target)]
    target: TargetUrl,
    /// Host NQN to connect as (default: the host library's).
    #[arg(long)]
    hostnqn: Option<String>,
    /// Give up on any one response after this long (seconds, or 500ms, 2m...).
    #[arg(long, default_value = "30", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Commands in flight per connection.
    #[arg(short = 'q', long = "qd", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    /// I/O size: 512, 4k, 4KiB, 1m, 1MiB.
    #[arg(short = 's', long, default_value = "4k", value_parser = parse_io_size)]
    size: usize,
    /// read | write | randread | randwrite | rw.
    #[arg(short = 'w', long, default_value = "randread")]
    workload: Workload,
    /// For rw: percent of I/Os that are reads.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    mix: u8,
    /// Measured time (seconds, or 500ms, 2m...).
    #[arg(short = 't', long, default_value = "10", value_parser = parse_duration)]
    time: Duration,
    /// Connections: threads, each with one TCP I/O queue.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// Run this long before measuring (excluded from the results).
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    ramp: Duration,
    /// Byte range of the namespace to use: OFFSET:LEN (or OFFSET: for the rest).
    #[arg(long, value_parser = parse_range)]
    range: Option<ByteRange>,
    /// Header and data digests (CRC32C) on every PDU.
    #[arg(long)]
    digests: bool,
    /// Stamp every block written and check every block read (exit code 3 on a bad block).
    #[arg(long)]
    verify: bool,
    /// Load this verify state first (if it exists), save the updated one at the end. Implies --verify.
    #[arg(long)]
    verify_state: Option<PathBuf>,
    /// Write the report (schema stager-perf/1) to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Namespace (default: the verify state's, else the first active one).
    #[arg(long)]
    nsid: Option<u32>,
    /// busy: spin on the socket (default, honest QD1 latency); sleep: sleep in poll(2).
    #[arg(long, default_value = "busy")]
    poll: PollMode,
    /// Seed of the I/O sequence and of verify stamps (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Pin connection threads to these CPUs, round robin (e.g. 1 or 0,2-3).
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    /// Label of the run in tables and plots.
    #[arg(long)]
    name: Option<String>,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct FloorArgs {
    /// Requests in flight per connection.
    #[arg(short = 'q', long = "qd", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    /// Payload size.
    #[arg(short = 's', long, default_value = "4k", value_parser = parse_io_size)]
    size: usize,
    /// Size of the small message (read: the request; write: the response).
    #[arg(long, default_value = "72", value_parser = parse_io_size)]
    req_size: usize,
    /// read: small request, SIZE response; write: SIZE request, small response; echo: SIZE both.
    #[arg(long, default_value = "read")]
    mode: FloorMode,
    #[arg(short = 't', long, default_value = "10", value_parser = parse_duration)]
    time: Duration,
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    ramp: Duration,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    connections: u32,
    /// busy (default) or sleep, for both client and server.
    #[arg(long, default_value = "busy")]
    poll: PollMode,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Pin client threads to these CPUs.
    #[arg(long, value_parser = parse_cpus)]
    client_cpus: Option<CpuList>,
    /// Pin echo server threads to these CPUs.
    #[arg(long, value_parser = parse_cpus)]
    server_cpus: Option<CpuList>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct DiskArgs {
    /// The file or block device (its current size; nothing is created).
    #[arg(long)]
    file: PathBuf,
    /// write, randwrite, read, randread.
    #[arg(short = 'w', long, default_value = "randwrite")]
    workload: String,
    #[arg(short = 'q', long = "qd", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    #[arg(short = 's', long, default_value = "4k", value_parser = parse_io_size)]
    size: usize,
    /// The part of the device to use: SIZE (its first SIZE bytes) or OFFSET:LEN (OFFSET: for
    /// the rest).
    #[arg(long, value_parser = parse_disk_range)]
    range: Option<ByteRange>,
    /// Writes durable on completion (RWF_DSYNC: FUA or a flush), as a log frame is.
    #[arg(long)]
    sync: bool,
    #[arg(short = 't', long, default_value = "10", value_parser = parse_duration)]
    time: Duration,
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    ramp: Duration,
    /// busy (default: spin on the completion queue, like a reactor) or sleep.
    #[arg(long, default_value = "busy")]
    poll: PollMode,
    /// Pin the thread to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The state file a run with --verify-state wrote.
    #[arg(long)]
    verify_state: PathBuf,
    /// Reads in flight.
    #[arg(short = 'q', long = "qd", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    qd: u32,
    /// Namespace (default: the one the state file records).
    #[arg(long)]
    nsid: Option<u32>,
    #[arg(long)]
    digests: bool,
    #[arg(long, default_value = "busy")]
    poll: PollMode,
}

#[derive(Args)]
struct DiscoverArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Reports written by --json (the first is the baseline).
    #[arg(required = true)]
    reports: Vec<PathBuf>,
}

#[derive(Args)]
struct PlotArgs {
    #[arg(required = true)]
    reports: Vec<PathBuf>,
    /// The SVG file to write.
    #[arg(short = 'o', long)]
    output: PathBuf,
    #[arg(long)]
    title: Option<String>,
    /// Fraction axis: linear (the body) or nines (the tail: 90%, 99%, 99.9%...).
    #[arg(long, default_value = "linear")]
    y: YScale,
}

#[derive(Args)]
struct ScenarioArgs {
    /// The scenario YAML file (see perf/scenarios/).
    file: PathBuf,
    /// tcp://HOST:PORT[/NQN]; not needed with --list.
    #[arg(long, value_parser = parse_target)]
    target: Option<TargetUrl>,
    /// Directory for the JSON reports (one per run and per floor).
    #[arg(long, default_value = "perf-results")]
    out: PathBuf,
    /// Write the markdown summary here instead of stdout.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Only the run with this name (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Override every run's measured time (e.g. a quick pass).
    #[arg(long, value_parser = parse_duration)]
    time: Option<Duration>,
    /// Override every run's ramp.
    #[arg(long, value_parser = parse_duration)]
    ramp: Option<Duration>,
    /// Print the planned runs and exit.
    #[arg(long)]
    list: bool,
    #[arg(long)]
    hostnqn: Option<String>,
    #[arg(long, default_value = "30", value_parser = parse_duration)]
    timeout: Duration,
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<CpuList>,
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stager-perf: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn dispatch(cmd: Command) -> Result<i32, PerfError> {
    match cmd {
        Command::Run(a) => cmd_run(a),
        Command::Floor(a) => cmd_floor(a),
        Command::Disk(a) => cmd_disk(a),
        Command::Verify(a) => cmd_verify(a),
        Command::Discover(a) => cmd_discover(a),
        Command::Compare(a) => {
            let reports = load_reports(&a.reports)?;
            print_comparison(&reports, &mut std::io::stdout().lock()).map_err(|e| PerfError::file("stdout", e))?;
            Ok(EXIT_OK)
        }
        Command::Plot(a) => {
            let reports = load_reports(&a.reports)?;
            write_svg(&reports, &PlotOptions { title: a.title, y: a.y }, &a.output)?;
            eprintln!("stager-perf: wrote {}", a.output.display());
            Ok(EXIT_OK)
        }
        Command::Scenario(a) => cmd_scenario(a),
        Command::Hostile(a) => cmd_hostile(a),
    }
}

fn cmd_hostile(a: HostileArgs) -> Result<i32, PerfError> {
    let cfg = stager_perf::hostile::HostileConfig {
        target: a.connect.target,
        mode: a.mode,
        connections: a.connections as usize,
        time: a.time,
        queue_depth: a.qd as usize,
        hostnqn: a.connect.hostnqn,
        timeout: a.connect.timeout,
    };
    let out = stager_perf::hostile::run(&cfg)?;
    for l in &out.lines {
        println!("hostile: {l}");
    }
    let mut code = EXIT_OK;
    if a.expect_closed && !out.all_closed {
        eprintln!("stager-perf: the target did not close every connection within {:?}", a.time);
        code = stager_perf::EXIT_FAILURE;
    }
    if let Some(want) = a.expect_term {
        if out.term_fes != Some(want) {
            eprintln!("stager-perf: expected a C2HTermReq with FES {want:#x}, got {:?}", out.term_fes);
            code = stager_perf::EXIT_FAILURE;
        }
    }
    Ok(code)
}

fn cmd_run(a: RunArgs) -> Result<i32, PerfError> {
    let mut cfg = RunConfig::new(a.connect.target);
    cfg.name = a.name;
    cfg.nsid = a.nsid;
    cfg.hostnqn = a.connect.hostnqn;
    cfg.workload = a.workload;
    cfg.mix_read_pct = a.mix;
    cfg.io_bytes = a.size;
    cfg.queue_depth = a.qd as usize;
    cfg.connections = a.connections as usize;
    cfg.time = a.time;
    cfg.ramp = a.ramp;
    cfg.range = a.range;
    cfg.digests = a.digests;
    cfg.verify = a.verify || a.verify_state.is_some();
    cfg.verify_state = a.verify_state;
    cfg.poll = a.poll;
    cfg.seed = a.seed;
    cfg.cpus = a.cpus.map(|c| c.0).unwrap_or_default();
    cfg.timeout = a.connect.timeout;
    cfg.progress = !a.quiet;
    let outcome = stager_perf::run::run(&cfg)?;
    let _ = outcome.report.print_table(&mut std::io::stdout().lock());
    outcome.failures.print(&mut std::io::stderr().lock());
    if let Some(p) = &a.json {
        outcome.report.save(p)?;
    }
    if let Some(p) = &outcome.state_saved {
        eprintln!("stager-perf: verify state saved to {}", p.display());
    }
    for e in &outcome.report.errors {
        eprintln!("stager-perf: {e}");
    }
    Ok(outcome.exit_code())
}

fn cmd_floor(a: FloorArgs) -> Result<i32, PerfError> {
    let cfg = FloorConfig {
        name: a.name,
        mode: a.mode,
        io_bytes: a.size,
        small_bytes: a.req_size,
        queue_depth: a.qd as usize,
        connections: a.connections as usize,
        time: a.time,
        ramp: a.ramp,
        poll: a.poll,
        client_cpus: a.client_cpus.map(|c| c.0).unwrap_or_default(),
        server_cpus: a.server_cpus.map(|c| c.0).unwrap_or_default(),
        progress: !a.quiet,
    };
    let report = stager_perf::floor::floor(&cfg)?;
    let _ = report.print_table(&mut std::io::stdout().lock());
    if let Some(p) = &a.json {
        report.save(p)?;
    }
    for e in &report.errors {
        eprintln!("stager-perf: {e}");
    }
    Ok(if report.errors.is_empty() { EXIT_OK } else { stager_perf::EXIT_FAILURE })
}

fn cmd_disk(a: DiskArgs) -> Result<i32, PerfError> {
    let cfg = stager_perf::disk::DiskConfig {
        name: a.name,
        path: a.file,
        workload: a.workload,
        io_bytes: a.size,
        queue_depth: a.qd as usize,
        range: a.range,
        sync: a.sync,
        time: a.time,
        ramp: a.ramp,
        poll: a.poll,
        cpu: a.cpu,
        progress: !a.quiet,
    };
    let report = stager_perf::disk::disk(&cfg)?;
    let _ = report.print_table(&mut std::io::stdout().lock());
    if let Some(p) = &a.json {
        report.save(p)?;
    }
    for e in &report.errors {
        eprintln!("stager-perf: {e}");
    }
    Ok(if report.errors.is_empty() { EXIT_OK } else { stager_perf::EXIT_FAILURE })
}

fn cmd_verify(a: VerifyArgs) -> Result<i32, PerfError> {
    let cfg = VerifyConfig {
        target: a.connect.target,
        session: SessionOptions {
            hostnqn: a.connect.hostnqn,
            digests: a.digests,
            busy_poll: a.poll == PollMode::Busy,
            queue_depth: a.qd as usize,
            io_queues: 1,
            timeout: a.connect.timeout,
            nsid: a.nsid,
        },
        state_path: a.verify_state,
    };
    let out = verify_state(&cfg)?;
    out.failures.print(&mut std::io::stderr().lock());
    if let Some(e) = &out.reads.first_read_error {
        eprintln!("stager-perf: {} reads failed; first: {e}", out.reads.read_errors);
    }
    println!(
        "verify: {} blocks recorded ({} with a write in flight), {} checked in {:.2} s, {} in-flight writes resolved, {} failures",
        out.blocks_recorded,
        out.pending_recorded,
        out.counts.blocks_checked,
        out.elapsed.as_secs_f64(),
        out.counts.pending_resolved,
        out.failures.total
    );
    Ok(out.exit_code())
}

fn cmd_discover(a: DiscoverArgs) -> Result<i32, PerfError> {
    let opts = SessionOptions {
        hostnqn: a.connect.hostnqn,
        timeout: a.connect.timeout,
        busy_poll: false,
        ..Default::default()
    };
    let entries = session::discover(&a.connect.target, &opts)?;
    let mut out = std::io::stdout().lock();
    for e in &entries {
        let kind = match e.subtype {
            1 => "referral",
            2 => "nvm",
            3 => "discovery",
            _ => "unknown",
        };
        let _ = writeln!(out, "{} ({kind})\t{}\t{}:{}", e.subtype, e.subnqn, e.traddr, e.trsvcid);
    }
    if entries.is_empty() {
        eprintln!("stager-perf: the discovery log is empty");
    }
    Ok(EXIT_OK)
}

fn cmd_scenario(a: ScenarioArgs) -> Result<i32, PerfError> {
    // --list needs no target; any URL satisfies the parser.
    let target = match (&a.target, a.list) {
        (Some(t), _) => t.clone(),
        (None, true) => TargetUrl { host: "localhost".into(), port: stager_perf::url::DEFAULT_PORT, nqn: None },
        (None, false) => {
            return Err(PerfError::Usage("scenario needs --target tcp://HOST:PORT[/NQN] (or --list)".into()))
        }
    };
    let sc = Scenario::load(&a.file, &target)?;
    if a.list {
        let _ = print_plan(&sc, &mut std::io::stdout().lock());
        return Ok(EXIT_OK);
    }
    let opts = ScenarioOptions {
        target,
        out_dir: a.out,
        only: a.only,
        time: a.time,
        ramp: a.ramp,
        hostnqn: a.hostnqn,
        timeout: a.timeout,
        cpus: a.cpus.map(|c| c.0).unwrap_or_default(),
        progress: !a.quiet,
    };
    let outcome = run_scenario(&sc, &opts, &mut std::io::stderr().lock())?;
    match &a.summary {
        Some(p) => {
            std::fs::write(p, &outcome.markdown).map_err(|e| PerfError::file(p, e))?;
            eprintln!("stager-perf: summary written to {}", p.display());
        }
        None => print!("{}", outcome.markdown),
    }
    Ok(outcome.exit_code())
}
