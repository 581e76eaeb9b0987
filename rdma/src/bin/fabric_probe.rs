//! `stager-fabric-probe`: two processes that check one fabric end to end and measure it roughly.
//! The guest test (tests/rdma_verbs.sh) runs it over Soft-RoCE between two QEMU guests; on a
//! host it runs over the tcp fabric on 127.0.0.1.
//!
//! The server exposes one region and sends its key. The client then
//! 1. writes `rounds` batches of `batch` writes with patterns, the last of each batch WITH
//!    IMMEDIATE = round; at that immediate the server checks every byte of the batch (an
//!    immediate promises all earlier writes are visible) and answers `OK round` or `BAD ...`;
//! 2. sends `messages` messages that the server echoes, and checks the echoes;
//! 3. streams `stream` writes without waiting (Busy = poll and retry), the last with an
//!    immediate, which the server checks;
//! 4. says `BYE`; both print a report line (`probe-server: PASS ...`, `probe-client: PASS ...`)
//!    and exit 0, or print `FAIL` with the reason and exit 1.
//!
//! Latencies are printed as a table (and JSON with `--json`): round = batch of writes to the
//! server's answer, msg = message echo round trip; stream = throughput. They measure the machine
//! they run on (under TCG emulation they mean nothing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use stager_rdma::{Endpoint, Event, Fabric, FabricConfig, FabricError, FabricKind, RemoteKey};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Kind {
    Tcp,
    Verbs,
}

#[derive(Parser)]
#[command(about = "Checks and roughly measures a Stager fabric between two processes")]
struct Cli {
    #[command(subcommand)]
    role: Role,
    #[arg(long, value_enum, default_value = "tcp", global = true)]
    fabric: Kind,
    /// This node's id.
    #[arg(long, global = true, default_value = "probe")]
    node: String,
    /// The other node's id.
    #[arg(long, global = true, default_value = "probe-peer")]
    peer: String,
    /// The cluster secret (at least 16 bytes).
    #[arg(long, global = true, default_value = "stager-fabric-probe-secret")]
    secret: String,
    /// Verbs device (default: the first).
    #[arg(long, global = true)]
    device: Option<String>,
    /// Verbs GID index (default: an IPv4-mapped GID, else 0).
    #[arg(long, global = true)]
    gid_index: Option<u8>,
    /// Give up after this many seconds in all.
    #[arg(long, global = true, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Subcommand)]
enum Role {
    /// Exposes a region, verifies what the client writes.
    Server {
        #[arg(long, default_value = "0.0.0.0:7471")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 8)]
        region_mib: usize,
    },
    /// Writes, sends messages, measures.
    Client {
        #[arg(long)]
        connect: SocketAddr,
        #[arg(long, default_value_t = 200)]
        rounds: u32,
        #[arg(long, default_value_t = 8)]
        batch: u32,
        #[arg(long, default_value_t = 4096)]
        size: usize,
        #[arg(long, default_value_t = 100)]
        messages: u32,
        #[arg(long, default_value_t = 2000)]
        stream: u32,
        /// Keep retrying the connection this long (the server may still be starting).
        #[arg(long, default_value_t = 30)]
        connect_retry_secs: u64,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

/// Byte `j` of write `k` of round `r` (both sides compute it).
fn pattern(r: u32, k: u32, len: usize, out: &mut Vec<u8>) {
    out.clear();
    let seed = (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (k as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    out.extend((0..len).map(|j| (seed.wrapping_add(j as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8));
}

/// Size of write `k` of a batch: `size`, with odd sizes mixed in to exercise unaligned placement.
fn write_len(size: usize, k: u32) -> usize {
    if k % 3 == 1 {
        size.saturating_sub(k as usize * 7 + 1).max(1)
    } else {
        size
    }
}

/// Where write `k` of round `r` goes.
fn write_offset(r: u32, k: u32, size: usize, region: u64, batch: u32) -> u64 {
    let span = (batch as u64) * (size as u64 + 64);
    let room = region.saturating_sub(span).max(1);
    (r as u64 * 4160) % room + k as u64 * (size as u64 + 64)
}

fn fail(who: &str, why: impl std::fmt::Display) -> ! {
    println!("{who}: FAIL {why}");
    std::process::exit(1);
}

/// Polls until `until` holds for an event (it sees each once), sleeping on the wait fd when idle.
fn wait_for(
    ep: &mut Endpoint,
    who: &str,
    deadline: Instant,
    mut until: impl FnMut(&Event, &mut Endpoint) -> bool,
) -> Result<(), String> {
    let mut evs = Vec::new();
    loop {
        evs.clear();
        if ep.poll(&mut evs) == 0 {
            if Instant::now() > deadline {
                return Err(format!("{who}: timed out"));
            }
            if ep.arm() {
                let mut p = libc::pollfd { fd: ep.wait_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 20) };
            }
            continue;
        }
        let mut hit = false;
        for ev in &evs {
            if let Event::Failed(e) = ev {
                return Err(format!("endpoint failed: {e}"));
            }
            if let Event::WriteFailed { wr_id, error } = ev {
                return Err(format!("write {wr_id} failed: {error}"));
            }
            if until(ev, ep) {
                hit = true;
            }
        }
        if hit {
            return Ok(());
        }
    }
}

fn config(cli: &Cli, listen: SocketAddr) -> FabricConfig {
    FabricConfig {
        kind: match cli.fabric {
            Kind::Tcp => FabricKind::Tcp,
            Kind::Verbs => FabricKind::Verbs,
        },
        node: cli.node.clone(),
        listen,
        secret: cli.secret.as_bytes().to_vec(),
        peers: vec![cli.peer.clone()],
        verbs_device: cli.device.clone(),
        verbs_gid_index: cli.gid_index,
        peer_timeout: Duration::from_secs(30),
    }
}

fn server(cli: &Cli, listen: SocketAddr, region_mib: usize) {
    let who = "probe-server";
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    let fabric = Fabric::start(config(cli, listen)).unwrap_or_else(|e| fail(who, e));
    println!("{who}: listening on {} ({:?} fabric, node {})", fabric.local_addr(), cli.fabric, cli.node);
    let mut ep = fabric
        .incoming()
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .unwrap_or_else(|_| fail(who, "no client connected"));
    println!("{who}: {} connected", ep.peer());
    let region = Arc::new(fabric.alloc_region(region_mib << 20).unwrap_or_else(|e| fail(who, e)));
    let key = ep.expose(region.clone()).unwrap_or_else(|e| fail(who, e));
    let mut msg = b"KEY".to_vec();
    msg.extend_from_slice(&key.encode());
    ep.send_msg(&msg).unwrap_or_else(|e| fail(who, e));

    let (mut batch, mut size) = (0u32, 0usize);
    let (mut rounds_ok, mut bytes_ok, mut echoes) = (0u32, 0u64, 0u32);
    let mut stream_last: Option<(u32, u64)> = None;
    let mut bye = false;
    let (mut want, mut got) = (Vec::new(), Vec::new());
    let mut problem: Option<String> = None;
    let r = wait_for(&mut ep, who, deadline, |ev, ep| {
        match ev {
            Event::Message(m) if m.starts_with(b"PARAMS ") => {
                let text = String::from_utf8_lossy(&m[7..]).into_owned();
                let mut it = text.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
                batch = it.next().unwrap_or(0) as u32;
                size = it.next().unwrap_or(0) as usize;
            }
            Event::Message(m) if m.starts_with(b"STREAM ") => {
                let text = String::from_utf8_lossy(&m[7..]).into_owned();
                let mut it = text.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
                stream_last = Some((it.next().unwrap_or(0) as u32, it.next().unwrap_or(0)));
            }
            Event::Message(m) if m.starts_with(b"PING") => {
                echoes += 1;
                if let Err(e) = ep.send_msg(m) {
                    problem = Some(format!("echo: {e}"));
                    return true;
                }
            }
            Event::Message(m) if m.as_slice() == b"BYE" => {
                bye = true;
                return true;
            }
            Event::Imm { imm, .. } if *imm == u32::MAX => {
                // The stream's last write: it went to offset given by STREAM.
                let Some((k, off)) = stream_last else {
                    problem = Some("stream immediate before STREAM".into());
                    return true;
                };
                pattern(u32::MAX, k, size, &mut want);
                got.resize(size, 0);
                if region.copy_out(off, &mut got).is_err() || got != want {
                    problem = Some("the stream's last write is not in the region at its immediate".into());
                    return true;
                }
                bytes_ok += size as u64;
                let _ = ep.send_msg(b"STREAM-OK");
            }
            Event::Imm { imm: round, .. } => {
                for k in 0..batch {
                    let len = write_len(size, k);
                    let off = write_offset(*round, k, size, region.len() as u64, batch);
                    pattern(*round, k, len, &mut want);
                    got.resize(len, 0);
                    if region.copy_out(off, &mut got).is_err() || got != want {
                        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
                        let _ = ep.send_msg(format!("BAD {round} {k} {off} {first}").as_bytes());
                        problem = Some(format!(
                            "round {round} write {k} ({len} bytes at {off}) differs at byte {first} at its immediate"
                        ));
                        return true;
                    }
                    bytes_ok += len as u64;
                }
                rounds_ok += 1;
                if let Err(e) = ep.send_msg(format!("OK {round}").as_bytes()) {
                    problem = Some(format!("answer: {e}"));
                    return true;
                }
            }
            _ => {}
        }
        false
    });
    // Let the last answers leave.
    let _ = wait_for(&mut ep, who, Instant::now() + Duration::from_millis(200), |_, _| false);
    let s = ep.stats();
    let report = format!(
        "{rounds_ok} rounds verified, {bytes_ok} bytes checked, {} writes and {} immediates received, {echoes} \
         messages echoed",
        s.writes_received, s.imms_received
    );
    match (r, problem, bye) {
        (Ok(()), None, true) => println!("{who}: PASS {report}"),
        (Err(e), _, _) => fail(who, format!("{e} ({report})")),
        (_, Some(p), _) => fail(who, format!("{p} ({report})")),
        (Ok(()), None, false) => fail(who, format!("client left without BYE ({report})")),
    }
    fabric.stop();
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Posts a write, polling while the queue is full; counts the completions seen meanwhile.
fn post(
    ep: &mut Endpoint,
    wr_id: u64,
    data: &[u8],
    key: RemoteKey,
    off: u64,
    imm: Option<u32>,
    done: &mut u64,
) -> Result<(), String> {
    let mut evs = Vec::new();
    loop {
        match ep.write(wr_id, &[data], key, off, imm) {
            Ok(()) => return Ok(()),
            Err(FabricError::Busy) => {
                ep.poll(&mut evs);
                for ev in evs.drain(..) {
                    match ev {
                        Event::WriteDone { .. } => *done += 1,
                        Event::Failed(e) => return Err(format!("endpoint failed: {e}")),
                        _ => {}
                    }
                }
            }
            Err(e) => return Err(format!("write: {e}")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn client(
    cli: &Cli,
    connect: SocketAddr,
    rounds: u32,
    batch: u32,
    size: usize,
    messages: u32,
    stream: u32,
    retry: u64,
    json: Option<&std::path::Path>,
) {
    let who = "probe-client";
    if size == 0 || batch == 0 {
        fail(who, "--size and --batch must be at least 1");
    }
    let deadline = Instant::now() + Duration::from_secs(cli.timeout_secs);
    let fabric = Fabric::start(config(cli, "0.0.0.0:0".parse().unwrap_or_else(|e| fail(who, e))))
        .unwrap_or_else(|e| fail(who, e));
    let give_up = Instant::now() + Duration::from_secs(retry);
    let mut ep = loop {
        match fabric.connect(connect, &cli.peer, Duration::from_secs(20)) {
            Ok(ep) => break ep,
            Err(e @ FabricError::Refused(_)) => fail(who, e),
            Err(e) if Instant::now() > give_up => fail(who, format!("connecting to {connect}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    println!("{who}: connected to {} at {connect} ({:?} fabric)", ep.peer(), cli.fabric);
    let mut key = None;
    wait_for(&mut ep, who, deadline, |ev, _| {
        if let Event::Message(m) = ev {
            if m.starts_with(b"KEY") {
                key = RemoteKey::decode(&m[3..]).ok();
                return true;
            }
        }
        false
    })
    .unwrap_or_else(|e| fail(who, e));
    let key = key.unwrap_or_else(|| fail(who, "bad KEY message"));
    if write_offset(0, batch, size, key.len(), batch) > key.len() {
        fail(who, format!("a batch of {batch} x {size} bytes does not fit the server's region of {}", key.len()));
    }
    ep.send_msg(format!("PARAMS {batch} {size}").as_bytes()).unwrap_or_else(|e| fail(who, e));

    // 1. Rounds of writes, the last of each with an immediate, verified by the server.
    let mut data = Vec::new();
    let mut round_us = Vec::with_capacity(rounds as usize);
    let mut wr = 0u64;
    for r in 0..rounds {
        let t0 = Instant::now();
        for k in 0..batch {
            pattern(r, k, write_len(size, k), &mut data);
            let imm = (k == batch - 1).then_some(r);
            post(&mut ep, wr, &data, key, write_offset(r, k, size, key.len(), batch), imm, &mut 0)
                .unwrap_or_else(|e| fail(who, e));
            wr += 1;
        }
        let want = format!("OK {r}");
        wait_for(&mut ep, who, deadline, |ev, _| match ev {
            Event::Message(m) if m.starts_with(b"BAD") => fail(who, String::from_utf8_lossy(m)),
            Event::Message(m) => m.as_slice() == want.as_bytes(),
            _ => false,
        })
        .unwrap_or_else(|e| fail(who, format!("round {r}: {e}")));
        round_us.push(t0.elapsed().as_secs_f64() * 1e6);
    }

    // 2. Messages echoed.
    let mut msg_us = Vec::with_capacity(messages as usize);
    for i in 0..messages {
        let m = format!("PING {i} {}", "x".repeat((i as usize * 97) % 3000));
        let t0 = Instant::now();
        ep.send_msg(m.as_bytes()).unwrap_or_else(|e| fail(who, e));
        wait_for(&mut ep, who, deadline, |ev, _| matches!(ev, Event::Message(x) if x == m.as_bytes()))
            .unwrap_or_else(|e| fail(who, format!("message {i}: {e}")));
        msg_us.push(t0.elapsed().as_secs_f64() * 1e6);
    }

    // 3. A stream of writes without waiting; the last one carries u32::MAX and is checked.
    let t0 = Instant::now();
    let last_k = stream.max(1) - 1;
    let last_off = write_offset(7, 0, size, key.len(), batch);
    ep.send_msg(format!("STREAM {last_k} {last_off}").as_bytes()).unwrap_or_else(|e| fail(who, e));
    let first_wr = wr;
    let mut done = 0u64;
    for k in 0..stream.max(1) {
        pattern(u32::MAX, k, size, &mut data);
        let (off, imm) = if k == last_k {
            (last_off, Some(u32::MAX))
        } else {
            (write_offset(k, 1 + k % batch.max(2).saturating_sub(1), size, key.len(), batch), None)
        };
        let mut evs = Vec::new();
        ep.poll(&mut evs);
        done += evs.iter().filter(|e| matches!(e, Event::WriteDone { .. })).count() as u64;
        if let Some(Event::Failed(e)) = evs.iter().find(|e| matches!(e, Event::Failed(_))) {
            fail(who, format!("stream: {e}"));
        }
        post(&mut ep, wr, &data, key, off, imm, &mut done).unwrap_or_else(|e| fail(who, e));
        wr += 1;
    }
    let total = wr - first_wr;
    let mut stream_ok = false;
    wait_for(&mut ep, who, deadline, |ev, _| {
        match ev {
            Event::WriteDone { .. } => done += 1,
            Event::Message(m) if m.as_slice() == b"STREAM-OK" => stream_ok = true,
            Event::Message(m) if m.starts_with(b"BAD") => fail(who, String::from_utf8_lossy(m)),
            _ => {}
        }
        done >= total && stream_ok
    })
    .unwrap_or_else(|e| fail(who, format!("stream: {e} ({done} of {total} writes done)")));
    let stream_s = t0.elapsed().as_secs_f64();
    ep.send_msg(b"BYE").unwrap_or_else(|e| fail(who, e));
    let _ = wait_for(&mut ep, who, Instant::now() + Duration::from_millis(300), |_, _| false);

    let s = ep.stats();
    let (r50, r99) = (percentile(&mut round_us, 0.5), percentile(&mut round_us, 0.99));
    let (m50, m99) = (percentile(&mut msg_us, 0.5), percentile(&mut msg_us, 0.99));
    let mb_s = (total as f64 * size as f64) / stream_s / 1e6;
    let w_s = total as f64 / stream_s;
    println!("{who}: {:<28} {:>12} {:>12}", "", "p50 us", "p99 us");
    println!("{who}: {:<28} {r50:>12.1} {r99:>12.1}", format!("round ({batch} writes + imm, answer)"));
    println!("{who}: {:<28} {m50:>12.1} {m99:>12.1}", "message echo");
    println!("{who}: stream of {total} x {size} B writes: {w_s:.0} writes/s, {mb_s:.1} MB/s");
    let json_text = format!(
        "{{\"fabric\":\"{:?}\",\"rounds\":{rounds},\"batch\":{batch},\"size\":{size},\"round_p50_us\":{r50:.1},\
         \"round_p99_us\":{r99:.1},\"msg_p50_us\":{m50:.1},\"msg_p99_us\":{m99:.1},\"stream_writes\":{total},\
         \"stream_writes_per_s\":{w_s:.0},\"stream_mb_per_s\":{mb_s:.1},\"staged_copies\":{},\"writes\":{}}}",
        cli.fabric, s.staged_copies, s.writes
    );
    if let Some(p) = json {
        std::fs::write(p, format!("{json_text}\n")).unwrap_or_else(|e| fail(who, format!("{}: {e}", p.display())));
    }
    println!(
        "{who}: PASS {rounds} rounds of {batch} writes verified by the server, {messages} messages echoed, {total} \
         streamed writes completed ({} writes, {} immediates, {} bytes in all)",
        s.writes, s.imms_sent, s.write_bytes
    );
    fabric.stop();
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match &cli.role {
        Role::Server { listen, region_mib } => server(&cli, *listen, *region_mib),
        Role::Client { connect, rounds, batch, size, messages, stream, connect_retry_secs, json } => {
            client(&cli, *connect, *rounds, *batch, *size, *messages, *stream, *connect_retry_secs, json.as_deref())
        }
    }
}
