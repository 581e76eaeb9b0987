//! `stagerctl`: the operator's CLI.
//!
//! - `stagerctl status` — every flash device and volume of a running stagerd: requested and
//!   effective policy, flash footprint (dirty, clean cached, replica), destage rate, SAN health.
//! - `stagerctl volume set-policy ID POLICY` — change a volume's write policy live.
//! - `stagerctl volume accept-loss ID` — accept that a volume's lost blocks (acknowledged data in
//!   a damaged part of the log) are gone: reads of them return the SAN's data again.
//! - `stagerctl ana show` — this node's ANA paths (subsystem, group, listener) and their states.
//! - `stagerctl ana set GROUP STATE` — set an ANA group's state on this node (optimized,
//!   non-optimized, inaccessible, persistent-loss, change); hosts get an ANA change notice.
//! - `stagerctl flash inspect DEVICE` — the volumes and dirty bytes a flash device holds, and
//!   what replay would recover and lose, read-only, without a daemon (a device moved from
//!   another node).
//! - `stagerctl flash destage DEVICE --config FILE` — destage a device's dirty data to the SANs
//!   the file names, with a progress bar; refuses a device a running stagerd owns. On a
//!   replica's flash it destages the copies it keeps (the source node's file names the SANs).
//!
//! DEVICE is a flash file or block device, an NVMe generic device `/dev/ngXnY` (driven by io_uring
//! passthrough), or `vfio:ADDRESS` for an NVMe controller bound to vfio-pci (the same names
//! `stagerctl status` shows).
//!
//! - `stagerctl flash fail NAME` — fault injection on a running stagerd (failure drills, tests):
//!   its flash device NAME fails every command from now on, until stagerd restarts.
//! - `stagerctl flash wipe DEVICE` — make a device blank (its superblock and log start zeroed) so
//!   that stagerd formats it; refuses while it holds data not on a SAN unless `--force`.
//!
//! Exit status: 0 done, 1 the operation failed (for `inspect`: it cannot tell what the device
//! holds), 2 bad arguments, 3 `inspect` found acknowledged data lost to log damage (listed).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use stager_nvme::bdev::DeviceSpec;
use stager_target::config::{self, DEFAULT_MANAGEMENT_SOCKET};
use stager_target::management::{call, Request};
use stager_target::volume::offline;
use stager_target::volume::status::{human_bytes, render};

#[derive(Parser)]
#[command(name = "stagerctl", version, about = "Operate Stager: status, live policy changes, flash devices")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show a running stagerd's flash devices and volumes.
    Status {
        /// The daemon's management socket (management.socket in its configuration).
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Volume operations on a running stagerd.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Flash devices without a daemon.
    Flash {
        #[command(subcommand)]
        cmd: FlashCmd,
    },
    /// The cluster (etcd) as a running stagerd with a `cluster:` section sees it: live nodes,
    /// the resource manager, each volume's owner, replicas, epoch, requested and effective
    /// policy, time unprotected and transitions.
    Cluster {
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Asymmetric Namespace Access (multipath) states of a running stagerd.
    Ana {
        #[command(subcommand)]
        cmd: AnaCmd,
    },
}

#[derive(Subcommand)]
enum AnaCmd {
    /// Show every (subsystem, ANA group, listener) path of this node and its state.
    Show {
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Set an ANA group's state on this node; connected hosts get an ANA change notice.
    Set {
        group: u32,
        /// optimized, non-optimized, inaccessible, persistent-loss or change.
        state: String,
        /// Only in this subsystem (default: every subsystem with this group).
        #[arg(long)]
        subsystem: Option<String>,
        /// Only through this listener (default: all of them).
        #[arg(long)]
        listener: Option<String>,
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Change a volume's requested write policy (write-back or write-through), live.
    SetPolicy {
        id: u32,
        policy: String,
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
    },
    /// Accept that a volume's lost blocks (log damage) are gone: reads of them return the SAN's
    /// data again instead of Unrecovered Read Error.
    AcceptLoss {
        id: u32,
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum FlashCmd {
    /// List the volumes and dirty bytes a flash device holds (read-only).
    Inspect {
        /// A file or block device, /dev/ngXnY (NVMe passthrough) or vfio:0000:00:04.0.
        #[arg(value_parser = parse_device)]
        device: DeviceSpec,
        #[arg(long)]
        json: bool,
    },
    /// Destage a flash device's dirty data to the volumes' SANs named in a stagerd configuration.
    Destage {
        /// A file or block device, /dev/ngXnY (NVMe passthrough) or vfio:0000:00:04.0.
        #[arg(value_parser = parse_device)]
        device: DeviceSpec,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Fault injection on a running stagerd, for failure drills and tests: its flash device NAME
    /// (the `name` in its configuration) fails every command from now on, as if it died. Only a
    /// restart of stagerd undoes it.
    Fail {
        name: String,
        #[arg(long, default_value = DEFAULT_MANAGEMENT_SOCKET)]
        socket: PathBuf,
    },
    /// Make a flash device blank so that stagerd formats it (its superblock and the start of its
    /// log are zeroed). Refuses a device that holds dirty data or copies, or whose contents
    /// cannot be read, unless --force.
    Wipe {
        /// A file or block device, /dev/ngXnY (NVMe passthrough) or vfio:0000:00:04.0.
        #[arg(value_parser = parse_device)]
        device: DeviceSpec,
        /// Wipe even though data not on any SAN would be destroyed.
        #[arg(long)]
        force: bool,
    },
}

/// Prints what stagerd answered to a change request.
fn said(r: stager_target::management::Response) -> Result<u8, String> {
    match (r.ok, r.message, r.error) {
        (true, Some(m), _) => {
            println!("{m}");
            Ok(0)
        }
        (_, _, Some(e)) => Err(e),
        _ => Err("stagerd sent an empty answer".into()),
    }
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    DeviceSpec::from_arg(s, stager_policy::constants::BLOCK_SIZE_U64 as u32)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
    match run(cli.cmd) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("stagerctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `inspect` when acknowledged data was lost to log damage.
const EXIT_LOST: u8 = 3;

fn run(cmd: Cmd) -> Result<u8, String> {
    match cmd {
        Cmd::Status { socket, json } => {
            let r = call(&socket, &Request::Status)?;
            let status = match (r.ok, r.status) {
                (true, Some(s)) => s,
                _ => return Err(r.error.unwrap_or_else(|| "stagerd sent no status".into())),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&status).map_err(|e| e.to_string())?);
            } else {
                print!("{}", render(&status));
            }
            Ok(0)
        }
        Cmd::Cluster { socket, json } => {
            let r = call(&socket, &Request::Cluster)?;
            let view = match (r.ok, r.cluster) {
                (true, Some(c)) => c,
                _ => return Err(r.error.unwrap_or_else(|| "stagerd sent no cluster view".into())),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&view).map_err(|e| e.to_string())?);
            } else {
                print!("{}", stager_target::volume::status::render_cluster(&view));
            }
            Ok(0)
        }
        Cmd::Volume { cmd: VolumeCmd::SetPolicy { id, policy, socket } } => {
            said(call(&socket, &Request::SetPolicy { volume: id, policy })?)
        }
        Cmd::Volume { cmd: VolumeCmd::AcceptLoss { id, socket } } => {
            said(call(&socket, &Request::AcceptLoss { volume: id })?)
        }
        Cmd::Ana { cmd: AnaCmd::Show { socket, json } } => {
            let r = call(&socket, &Request::AnaShow)?;
            let paths = match (r.ok, r.ana) {
                (true, Some(p)) => p,
                _ => return Err(r.error.unwrap_or_else(|| "stagerd sent no ANA state".into())),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&paths).map_err(|e| e.to_string())?);
                return Ok(0);
            }
            println!(
                "{:<40} {:>5}  {:<12} {:<22} {:<15} {:>11}  namespaces",
                "subsystem", "group", "listener", "address", "state", "controllers"
            );
            for p in paths {
                let nsids: Vec<String> = p.namespaces.iter().map(u32::to_string).collect();
                println!(
                    "{:<40} {:>5}  {:<12} {:<22} {:<15} {:>11}  {}",
                    p.subsystem,
                    p.group,
                    p.listener,
                    p.address,
                    p.state,
                    p.controllers,
                    if nsids.is_empty() { "-".to_string() } else { nsids.join(",") }
                );
            }
            Ok(0)
        }
        Cmd::Ana { cmd: AnaCmd::Set { group, state, subsystem, listener, socket } } => {
            let r = call(&socket, &Request::AnaSet { group, state, subsystem, listener })?;
            said(r)
        }
        Cmd::Flash { cmd: FlashCmd::Inspect { device, json } } => {
            let i = offline::inspect(&device)?;
            let unknown = i.device.replay.as_ref().is_some_and(|r| r.unknown_regions > 0);
            let lost = i.device.replay.as_ref().is_some_and(|r| r.lost_data())
                || i.device.volumes.iter().any(|v| v.lost_blocks > 0)
                || i.device.copies.iter().any(|c| c.damaged);
            let code = if unknown {
                1
            } else if lost {
                EXIT_LOST
            } else {
                0
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&i).map_err(|e| e.to_string())?);
                return Ok(code);
            }
            println!(
                "{}: Stager flash device {:#x}, superblock generation {}, incarnation {}",
                i.path, i.device.device_id, i.superblock_generation, i.incarnation
            );
            if i.owned_by_running_process {
                println!("  NOTE: a running stagerd owns this device; these numbers are a snapshot of a live log");
            }
            println!(
                "  log {} of {} in use, clean cache area {}",
                human_bytes(i.device.log_used_bytes),
                human_bytes(i.device.log_capacity_bytes),
                human_bytes(i.device.cache_capacity_bytes)
            );
            if let Some(r) = &i.device.replay {
                println!(
                    "  replay: {} frames, {} entries recovered; the log ends {}{}",
                    r.frames,
                    r.entries,
                    r.stop_reason,
                    if r.repaired_headers > 0 {
                        format!("; {} frame header(s) read from their mirror", r.repaired_headers)
                    } else {
                        String::new()
                    }
                );
                if r.lost_data() {
                    println!(
                        "  DAMAGED LOG: {} damaged frame(s) with {} acknowledged entries lost, {} unreadable region(s)",
                        r.damaged_frames, r.lost_entries, r.unknown_regions
                    );
                    for d in &r.damage {
                        println!("    {d}");
                    }
                }
            }
            for v in &i.device.volumes {
                println!(
                    "  volume {}: {} dirty ({} entries above the persisted destage watermark, seq {})",
                    v.id,
                    human_bytes(v.dirty_bytes),
                    v.watermark_lag_entries,
                    v.persisted_watermark
                );
                if v.lost_blocks > 0 {
                    println!(
                        "    LOST: {} block(s) ({}) whose acknowledged data was in the damaged log; stagerd answers \
                         reads of them with Unrecovered Read Error until they are rewritten or the loss is accepted",
                        v.lost_blocks,
                        human_bytes(v.lost_blocks * stager_policy::constants::BLOCK_SIZE_U64)
                    );
                }
            }
            for c in &i.device.copies {
                println!(
                    "  copy of volume {} for node {}: {} above the source's watermark (seq {}), newest entry seq {}",
                    c.volume,
                    c.source,
                    human_bytes(c.bytes),
                    c.watermark,
                    c.durable_seq
                );
                if c.damaged {
                    println!("    DAMAGED: this copy is incomplete; only its source's own log or SAN is complete");
                }
            }
            let dirty: u64 = i.device.volumes.iter().map(|v| v.dirty_bytes).sum::<u64>()
                + i.device.copies.iter().map(|c| c.bytes).sum::<u64>();
            if !i.device.copies.is_empty() {
                println!(
                    "  (a replica's copies: if their source is lost for good, destage them with the source's \
                     configuration, which names the volumes' SANs)"
                );
            }
            if dirty > 0 {
                println!("  {} to destage: stagerctl flash destage {} --config FILE", human_bytes(dirty), i.path);
            } else if code == 0 {
                println!("  nothing to destage");
            } else {
                println!("  nothing intact left to destage");
            }
            if unknown {
                println!(
                    "  cannot tell which blocks the unreadable region(s) held: every block of the volumes with data \
                     above their watermark is marked lost. Keep the device until the SAN's data is checked."
                );
            }
            Ok(code)
        }
        Cmd::Flash { cmd: FlashCmd::Destage { device, config: path } } => {
            let cfg = config::load(&path).map_err(|e| e.to_string())?;
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} destaging [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .map_err(|e| e.to_string())?
                .progress_chars("=> "),
            );
            let result = offline::destage(&device, &cfg, |p| {
                bar.set_length(p.dirty_at_start);
                bar.set_position(p.dirty_at_start - p.dirty_now.min(p.dirty_at_start));
            });
            bar.finish_and_clear();
            let m = result?;
            println!("{}: {m}", device.label());
            Ok(0)
        }
        Cmd::Flash { cmd: FlashCmd::Fail { name, socket } } => {
            said(call(&socket, &Request::FlashFail { flash: name })?)
        }
        Cmd::Flash { cmd: FlashCmd::Wipe { device, force } } => {
            let m = offline::wipe(&device, force)?;
            println!("{}: {m}", device.label());
            Ok(0)
        }
    }
}
