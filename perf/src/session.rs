//! Reaching a namespace: URL → socket address → (discovery →) subsystem → controller with I/O
//! queues → namespace identity. Every command of the harness that talks to a target starts
//! here, so every one of them fails the same clear way ("cannot connect to 127.0.0.1:4420:
//! connection refused") rather than with a bare `io::Error`.
//!
//! The harness connects to the address in the URL even when the discovery log names another
//! (`traddr`/`trsvcid`): a benchmark measures the path it was told to measure, and a target
//! on an ephemeral test port may not know the port it was reached on.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use stager_nvme::host::{self, Controller, HostError, HostOptions};
use stager_nvme::identify::NamespaceIdentity;
use stager_nvme::log_page::{self, DiscoveryEntry};
use stager_nvme::tcp::Digests;

use crate::url::TargetUrl;
use crate::{PerfError, Result};

/// How to connect.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Host NQN; `None` = the host library's default.
    pub hostnqn: Option<String>,
    /// Header and data digests (CRC32C) on every PDU.
    pub digests: bool,
    /// Spin on sockets instead of sleeping in poll(2).
    pub busy_poll: bool,
    pub queue_depth: usize,
    pub io_queues: usize,
    /// Give up on any one response after this long.
    pub timeout: Duration,
    /// Namespace; `None` = the first active one.
    pub nsid: Option<u32>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            hostnqn: None,
            digests: false,
            busy_poll: true,
            queue_depth: 32,
            io_queues: 1,
            timeout: Duration::from_secs(30),
            nsid: None,
        }
    }
}

impl SessionOptions {
    pub fn host_options(&self) -> HostOptions {
        let mut o = HostOptions::default();
        if let Some(n) = &self.hostnqn {
            o.hostnqn.clone_from(n);
        }
        o.digests = Digests { header: self.digests, data: self.digests };
        o.busy_poll = self.busy_poll;
        o.queue_depth = self.queue_depth.clamp(1, crate::constants::QUEUE_DEPTH_MAX) as u16;
        o.io_queues = self.io_queues.min(crate::constants::CONNECTIONS_MAX) as u16;
        o.timeout_ms = self.timeout.as_millis().clamp(1, u64::MAX as u128) as u64;
        o
    }
}

/// A connected controller and the namespace a run uses.
pub struct Session {
    pub controller: Controller,
    pub addr: SocketAddr,
    /// The URL with the subsystem NQN filled in (from discovery if it had none).
    pub url: TargetUrl,
    pub subnqn: String,
    pub nsid: u32,
    pub namespace: NamespaceIdentity,
}

/// Why a connection attempt failed, in words ("connection refused").
pub fn describe(e: &HostError) -> String {
    match e {
        HostError::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::TimedOut
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
            | ErrorKind::AddrNotAvailable
            | ErrorKind::NotConnected
            | ErrorKind::BrokenPipe => io.kind().to_string(),
            _ => io.to_string(),
        },
        HostError::Nvme(s) => format!("the target refused: {s}"),
        other => other.to_string(),
    }
}

/// Resolves the URL's host and port.
pub fn resolve(url: &TargetUrl) -> Result<SocketAddr> {
    let authority = url.authority();
    host::resolve(&authority).map_err(|e| PerfError::Connect {
        addr: authority.clone(),
        reason: format!("cannot resolve the address ({})", describe(&e)),
    })
}

/// Reads the discovery log at the URL's address.
pub fn discover(url: &TargetUrl, opts: &SessionOptions) -> Result<Vec<DiscoveryEntry>> {
    let addr = resolve(url)?;
    host::discover(addr, &opts.host_options())
        .map_err(|e| PerfError::Connect { addr: format!("the discovery controller at {addr}"), reason: describe(&e) })
}

/// The first NVM subsystem in the discovery log.
pub fn first_nvm_subsystem(url: &TargetUrl, opts: &SessionOptions) -> Result<String> {
    let entries = discover(url, opts)?;
    entries.iter().find(|e| e.subtype == log_page::subtype::NVM).map(|e| e.subnqn.clone()).ok_or_else(|| {
        PerfError::Target(format!(
            "the discovery log at {} lists no NVM subsystem ({} entries); name one in the URL: tcp://HOST:PORT/NQN",
            url.authority(),
            entries.len()
        ))
    })
}

/// Connects to the URL's subsystem (or the first one discovery lists) with
/// `opts.io_queues` I/O queues, and identifies the namespace.
pub fn open(url: &TargetUrl, opts: &SessionOptions) -> Result<Session> {
    let addr = resolve(url)?;
    let subnqn = match &url.nqn {
        Some(n) => n.clone(),
        None => first_nvm_subsystem(url, opts)?,
    };
    let controller = Controller::connect(addr, &subnqn, &opts.host_options())
        .map_err(|e| PerfError::Connect { addr: format!("{addr} (subsystem {subnqn})"), reason: describe(&e) })?;
    let active = controller.active_namespaces().map_err(|e| PerfError::host("listing active namespaces", e))?;
    let nsid = match opts.nsid {
        Some(n) if active.contains(&n) => n,
        Some(n) => {
            return Err(PerfError::Target(format!(
                "namespace {n} is not active in {subnqn} (active: {})",
                if active.is_empty() { "none".to_string() } else { format!("{active:?}") }
            )))
        }
        None => *active.first().ok_or_else(|| PerfError::Target(format!("{subnqn} has no active namespace")))?,
    };
    let namespace =
        controller.identify_namespace(nsid).map_err(|e| PerfError::host(format!("identifying namespace {nsid}"), e))?;
    if namespace.blocks == 0 {
        return Err(PerfError::Target(format!("namespace {nsid} of {subnqn} has no blocks")));
    }
    Ok(Session { controller, addr, url: url.with_nqn(&subnqn), subnqn, nsid, namespace })
}

impl Session {
    /// Largest transfer the controller accepts (MDTS), capped by the harness's own limit.
    pub fn max_io_bytes(&self) -> usize {
        self.controller
            .info
            .max_transfer_bytes()
            .unwrap_or(crate::constants::IO_BYTES_MAX)
            .min(crate::constants::IO_BYTES_MAX)
    }

    /// Normal shutdown (CC.SHN); failures only matter as a warning.
    pub fn close(self) {
        if let Err(e) = self.controller.shutdown() {
            eprintln!("stager-perf: warning: controller shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_connection_is_named_clearly() {
        // Bind and drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = TargetUrl::parse(&format!("tcp://127.0.0.1:{port}/nqn.x:y")).unwrap();
        let opts = SessionOptions { timeout: Duration::from_secs(2), ..Default::default() };
        let e = open(&url, &opts).err().expect("nothing listens there");
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("cannot connect to 127.0.0.1:{port}")), "{msg}");
        assert!(msg.ends_with("connection refused"), "{msg}");
        let url = TargetUrl::parse(&format!("tcp://127.0.0.1:{port}")).unwrap();
        let msg = open(&url, &opts).err().expect("nothing listens there").to_string();
        assert!(msg.contains("discovery") && msg.ends_with("connection refused"), "{msg}");
    }

    #[test]
    fn unresolvable_host_is_an_error() {
        let url = TargetUrl::parse("tcp://no-such-host.invalid:4420/nqn.x").unwrap();
        let msg = resolve(&url).unwrap_err().to_string();
        assert!(msg.contains("no-such-host.invalid:4420") && msg.contains("resolve"), "{msg}");
    }
}
