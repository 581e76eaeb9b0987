//! `stager-perf hostile`: hosts that misbehave on purpose, to show what a target does about
//! them — the part of a test or a benchmark that plays the bad neighbour while a verified
//! stream runs beside it.
//!
//! Every mode speaks real NVMe/TCP up to the point where it stops behaving, then holds its
//! connections for `--time` and reports what the target did (for how long it kept reading, when
//! it closed a connection, which TermReq it sent), one line per fact, so scripts can check them:
//!
//! - `no-read`: a controller with one I/O queue that submits reads as fast as the target takes
//!   them and never reads a response (its socket's receive buffer shrunk to the minimum). A
//!   bounded target stops reading its commands once every queue slot's response is waiting.
//! - `idle`: `--connections` admin queues connected (ICReq, Connect, no keep-alive), then
//!   silent: what idle connections cost the target.
//! - `no-handshake`: TCP connections that never send an ICReq.
//! - `no-connect`: ICReq done, never a Fabrics Connect.
//! - `half-pdu`: an I/O queue that sends half of a command capsule and stalls.
//! - `overrun`: an I/O queue that sends one command more than the queue size it negotiated,
//!   all of them writes whose data it never sends (so none can complete).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use stager_nvme::command::sgl;
use stager_nvme::host::{self, connect_queue, io_cmd, Controller, HostOptions, QueuePair};
use stager_nvme::tcp::pdu::{self, Decoded, Digests, Pdu};

use crate::session::{self, describe, SessionOptions};
use crate::url::TargetUrl;
use crate::{PerfError, Result};

/// How the hosts misbehave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum HostileMode {
    NoRead,
    Idle,
    NoHandshake,
    NoConnect,
    HalfPdu,
    Overrun,
}

#[derive(Clone, Debug)]
pub struct HostileConfig {
    pub target: TargetUrl,
    pub mode: HostileMode,
    pub connections: usize,
    /// How long to hold the connections (the target may close them sooner).
    pub time: Duration,
    /// I/O queue depth asked for (no-read, half-pdu, overrun).
    pub queue_depth: usize,
    pub hostnqn: Option<String>,
    pub timeout: Duration,
}

/// What happened, as lines for the report.
#[derive(Debug, Default)]
pub struct HostileOutcome {
    pub lines: Vec<String>,
    /// The target closed every connection before `time` ran out.
    pub all_closed: bool,
    /// The target sent a C2HTermReq with this FES.
    pub term_fes: Option<u16>,
}

pub fn run(cfg: &HostileConfig) -> Result<HostileOutcome> {
    let opts = SessionOptions {
        hostnqn: cfg.hostnqn.clone(),
        queue_depth: cfg.queue_depth,
        timeout: cfg.timeout,
        busy_poll: false,
        ..SessionOptions::default()
    };
    let addr = session::resolve(&cfg.target)?;
    let subnqn = match &cfg.target.nqn {
        Some(n) => n.clone(),
        None => session::first_nvm_subsystem(&cfg.target, &opts)?,
    };
    let mut ho = opts.host_options();
    // A misbehaving host sends no keep-alives either: the target must cope by other means.
    ho.kato_ms = 0;
    match cfg.mode {
        HostileMode::NoHandshake => hold_raw(cfg, addr, Ok),
        HostileMode::NoConnect => hold_raw(cfg, addr, |s| {
            let mut b = Vec::new();
            pdu::encode(
                &Pdu::IcReq { pfv: 0, hpda: 0, digests: Digests::default(), maxr2t: 0 },
                &[],
                Digests::default(),
                &mut b,
            );
            let mut s = s;
            s.write_all(&b)?;
            Ok(s)
        }),
        HostileMode::Idle => idle(cfg, addr, &subnqn, &ho),
        HostileMode::NoRead => no_read(cfg, addr, &subnqn, &ho),
        HostileMode::HalfPdu => half_pdu(cfg, addr, &subnqn, &ho),
        HostileMode::Overrun => overrun(cfg, addr, &subnqn, &ho),
    }
}

fn connect_err(addr: SocketAddr, e: host::HostError) -> PerfError {
    PerfError::Connect { addr: addr.to_string(), reason: describe(&e) }
}

/// A controller with one I/O queue, handed over as its raw socket.
fn raw_io_queue(addr: SocketAddr, subnqn: &str, ho: &HostOptions, depth: usize) -> Result<(Controller, TcpStream)> {
    let o = HostOptions { queue_depth: depth.clamp(1, 1024) as u16, io_queues: 1, ..ho.clone() };
    let mut c = Controller::connect(addr, subnqn, &o).map_err(|e| connect_err(addr, e))?;
    let q = c.take_io_queues().pop().ok_or_else(|| PerfError::Target("no I/O queue was created".into()))?;
    let (s, _) = q.into_raw();
    Ok((c, s))
}

/// Opens `connections` TCP connections, does `setup` on each, holds them; reports closures.
fn hold_raw(
    cfg: &HostileConfig,
    addr: SocketAddr,
    setup: impl Fn(TcpStream) -> std::io::Result<TcpStream>,
) -> Result<HostileOutcome> {
    let start = Instant::now();
    let mut socks = Vec::new();
    for _ in 0..cfg.connections {
        let s = TcpStream::connect_timeout(&addr, cfg.timeout)
            .map_err(|e| PerfError::Connect { addr: addr.to_string(), reason: e.to_string() })?;
        let s = setup(s).map_err(|e| PerfError::Connect { addr: addr.to_string(), reason: e.to_string() })?;
        s.set_nonblocking(true).map_err(|e| PerfError::Connect { addr: addr.to_string(), reason: e.to_string() })?;
        socks.push(Some(s));
    }
    let mut out = HostileOutcome::default();
    out.lines.push(format!("{} connection(s) open after {:.2} s", socks.len(), start.elapsed().as_secs_f64()));
    let closed = watch_closes(&mut socks, start, cfg.time);
    report_closes(&mut out, closed, socks.len(), start);
    Ok(out)
}

/// Waits until every socket reads EOF (or an error) or `time` passes; returns when each closed.
fn watch_closes(socks: &mut [Option<TcpStream>], start: Instant, time: Duration) -> Vec<Duration> {
    let mut closed = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < time && closed.len() < socks.len() {
        for s in socks.iter_mut() {
            let Some(sock) = s else { continue };
            match sock.read(&mut buf) {
                Ok(0) => {
                    closed.push(start.elapsed());
                    *s = None;
                }
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    closed.push(start.elapsed());
                    *s = None;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    closed
}

fn report_closes(out: &mut HostileOutcome, closed: Vec<Duration>, total: usize, start: Instant) {
    out.all_closed = closed.len() == total;
    match (closed.first(), closed.last()) {
        (Some(first), Some(last)) => out.lines.push(format!(
            "target closed {} of {total} connection(s), the first after {:.2} s, the last after {:.2} s",
            closed.len(),
            first.as_secs_f64(),
            last.as_secs_f64()
        )),
        _ => out
            .lines
            .push(format!("target closed none of {total} connection(s) in {:.2} s", start.elapsed().as_secs_f64())),
    }
}

fn idle(cfg: &HostileConfig, addr: SocketAddr, subnqn: &str, ho: &HostOptions) -> Result<HostileOutcome> {
    let start = Instant::now();
    let mut socks = Vec::new();
    for _ in 0..cfg.connections {
        let mut q = QueuePair::open(addr, 0, 32, ho).map_err(|e| connect_err(addr, e))?;
        connect_queue(&mut q, subnqn, ho, 0, 31, 0xFFFF, 0).map_err(|e| connect_err(addr, e))?;
        let (s, _) = q.into_raw();
        let _ = s.set_nonblocking(true);
        socks.push(Some(s));
    }
    let mut out = HostileOutcome::default();
    out.lines.push(format!("{} idle admin queue(s) connected in {:.2} s", socks.len(), start.elapsed().as_secs_f64()));
    let closed = watch_closes(&mut socks, start, cfg.time);
    report_closes(&mut out, closed, socks.len(), start);
    Ok(out)
}

fn no_read(cfg: &HostileConfig, addr: SocketAddr, subnqn: &str, ho: &HostOptions) -> Result<HostileOutcome> {
    let mut ctrls = Vec::new();
    let mut socks = Vec::new();
    let mut nlb = 1;
    for _ in 0..cfg.connections {
        let (c, s) = raw_io_queue(addr, subnqn, ho, cfg.queue_depth)?;
        if let Ok(ns) = c.identify_namespace(1) {
            nlb = (4096 / ns.block_size.max(1)).max(1);
        }
        shrink_receive_buffer(&s);
        let _ = s.set_nonblocking(true);
        ctrls.push(c);
        socks.push(s);
    }
    let start = Instant::now();
    let mut out = HostileOutcome::default();
    let mut capsule = Vec::new();
    let mut sent = vec![0u64; socks.len()];
    let mut stopped: Vec<Option<Duration>> = vec![None; socks.len()];
    let mut last_progress = vec![start; socks.len()];
    let mut closed: Vec<Option<Duration>> = vec![None; socks.len()];
    let mut cid = 0u16;
    // One 4 KiB read after another, never reading a response.
    while start.elapsed() < cfg.time {
        let mut progressed = false;
        for (i, s) in socks.iter_mut().enumerate() {
            if closed[i].is_some() {
                continue;
            }
            capsule.clear();
            for _ in 0..64 {
                let mut cmd = io_cmd::read(1, (cid as u64 % 256) * nlb as u64, nlb);
                cmd.set_cid(cid);
                cmd.set_sgl(sgl::TRANSPORT, 0, 4096);
                cid = cid.wrapping_add(1);
                pdu::encode(&Pdu::CapsuleCmd(cmd), &[], Digests::default(), &mut capsule);
            }
            let mut off = 0;
            while off < capsule.len() {
                match s.write(&capsule[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        closed[i] = Some(start.elapsed());
                        break;
                    }
                }
            }
            sent[i] += off as u64;
            if off > 0 {
                progressed = true;
                last_progress[i] = Instant::now();
            } else if stopped[i].is_none() && last_progress[i].elapsed() > Duration::from_secs(1) {
                stopped[i] = Some(last_progress[i].duration_since(start));
            }
            let cut = off % pdu_capsule_len();
            if off < capsule.len() && cut != 0 {
                // A capsule cut in half: finish just that one (waiting a little), so the
                // stream stays whole PDUs; the target will read it when it reads again.
                let rest = &capsule[off..off + pdu_capsule_len() - cut];
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                if s.write_all(rest).is_ok() {
                    sent[i] += rest.len() as u64;
                }
                let _ = s.set_nonblocking(true);
            }
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (i, bytes) in sent.iter().enumerate() {
        let cmds = bytes / pdu_capsule_len() as u64;
        if let Some(t) = closed[i] {
            out.lines.push(format!(
                "connection {i}: the target closed the connection at {:.2} s after {cmds} commands",
                t.as_secs_f64()
            ));
        }
        match stopped[i] {
            Some(t) => out.lines.push(format!(
                "connection {i}: the target stopped taking commands after {cmds} ({bytes} bytes, including \
                 what the kernels buffer) at {:.2} s",
                t.as_secs_f64()
            )),
            None => out.lines.push(format!(
                "connection {i}: the target took {cmds} commands ({bytes} bytes) and never stopped in {:.1} s",
                cfg.time.as_secs_f64()
            )),
        }
    }
    out.all_closed = closed.iter().all(|c| c.is_some());
    drop(socks);
    drop(ctrls);
    Ok(out)
}

/// Bytes of one command capsule without digests.
fn pdu_capsule_len() -> usize {
    8 + 64
}

fn shrink_receive_buffer(s: &TcpStream) {
    let v: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own with a valid int option value; the kernel clamps
    // it to its minimum.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn half_pdu(cfg: &HostileConfig, addr: SocketAddr, subnqn: &str, ho: &HostOptions) -> Result<HostileOutcome> {
    let mut ctrls = Vec::new();
    let mut socks = Vec::new();
    let start = Instant::now();
    for _ in 0..cfg.connections {
        let (c, mut s) = raw_io_queue(addr, subnqn, ho, cfg.queue_depth)?;
        let mut b = Vec::new();
        let mut cmd = io_cmd::read(1, 0, 1);
        cmd.set_sgl(sgl::TRANSPORT, 0, 4096);
        pdu::encode(&Pdu::CapsuleCmd(cmd), &[], Digests::default(), &mut b);
        s.write_all(&b[..b.len() / 2])
            .map_err(|e| PerfError::Connect { addr: addr.to_string(), reason: e.to_string() })?;
        let _ = s.set_nonblocking(true);
        ctrls.push(c);
        socks.push(Some(s));
    }
    let mut out = HostileOutcome::default();
    out.lines.push(format!("{} connection(s) sent half a command capsule and stalled", socks.len()));
    let closed = watch_closes(&mut socks, start, cfg.time);
    report_closes(&mut out, closed, socks.len(), start);
    drop(ctrls);
    Ok(out)
}

fn overrun(cfg: &HostileConfig, addr: SocketAddr, subnqn: &str, ho: &HostOptions) -> Result<HostileOutcome> {
    let depth = cfg.queue_depth.clamp(1, 1023);
    let (c, mut s) = raw_io_queue(addr, subnqn, ho, depth)?;
    // SQSIZE = depth (0's based): the queue has depth + 1 entries, so depth + 1 commands may be
    // outstanding. Send one more, all writes too large for the capsule whose data never comes.
    let mut b = Vec::new();
    for cid in 0..=(depth as u16 + 1) {
        let mut cmd = io_cmd::write(1, cid as u64 * 64, 64);
        cmd.set_cid(cid);
        cmd.set_sgl(sgl::TRANSPORT, 0, 64 * 4096);
        pdu::encode(&Pdu::CapsuleCmd(cmd), &[], Digests::default(), &mut b);
    }
    let start = Instant::now();
    s.write_all(&b).map_err(|e| PerfError::Connect { addr: addr.to_string(), reason: e.to_string() })?;
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(cfg.time.max(Duration::from_millis(100))));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut out = HostileOutcome::default();
    let (mut r2ts, mut other) = (0usize, 0usize);
    'read: while start.elapsed() < cfg.time {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        loop {
            match pdu::decode(&got, Digests::default(), 1 << 20) {
                Ok(Decoded::Frame(f)) => {
                    match f.pdu {
                        Pdu::R2T(_) => r2ts += 1,
                        Pdu::C2HTermReq(t) => {
                            out.term_fes = Some(t.fes);
                            out.lines.push(format!(
                                "target sent C2HTermReq FES {:#x} FEI {} after {} R2Ts, {:.2} s after the burst",
                                t.fes,
                                t.fei,
                                r2ts,
                                start.elapsed().as_secs_f64()
                            ));
                            break 'read;
                        }
                        _ => other += 1,
                    }
                    got.drain(..f.len);
                }
                Ok(Decoded::Need(_)) => break,
                Err(e) => {
                    out.lines.push(format!("undecodable bytes from the target: {e}"));
                    break 'read;
                }
            }
        }
    }
    if out.term_fes.is_none() {
        out.lines.push(format!(
            "no C2HTermReq: {r2ts} R2Ts and {other} other PDUs for {} commands on a queue of {} entries",
            depth + 2,
            depth + 1
        ));
    }
    drop(c);
    Ok(out)
}
