//! The management socket: a Unix stream socket on which `stagerctl` asks for status and changes
//! volumes' policies live. Control plane, so an ordinary thread (DESIGN.md): one request per
//! connection, one JSON line each way:
//!
//! ```text
//! -> {"op":"status"}
//! <- {"ok":true,"status":{...NodeStatus...}}
//! -> {"op":"set-policy","volume":1,"policy":"write-through"}
//! <- {"ok":true,"message":"volume 1: requested write-through, effective write-through; destaging 12.0 MiB of dirty data"}
//! <- {"ok":false,"error":"no volume 7 on this node"}
//! -> {"op":"accept-loss","volume":1}
//! <- {"ok":true,"message":"volume 1: loss of 3 block(s) accepted; reads of them return what the SAN holds"}
//! -> {"op":"flash-fail","flash":"flash0"}                      (fault injection)
//! <- {"ok":true,"message":"flash flash0: every command to it fails from now on (until stagerd restarts)"}
//! -> {"op":"cluster"}
//! <- {"ok":true,"cluster":{"node":"node-a","manager":"node-c","nodes":[...],"volumes":[...],...}}
//! -> {"op":"ana-show"}
//! <- {"ok":true,"ana":[{"subsystem":"nqn...","group":1,"listener":"tcp0","state":"optimized",...}]}
//! -> {"op":"ana-set","group":1,"state":"optimized"}            (optional "subsystem", "listener")
//! <- {"ok":true,"message":"ANA group 1: optimized on 1 path(s), 2 controller(s) notified","ana":[...]}
//! ```
//!
//! The socket file is created with the daemon's umask; anyone who can open it can change
//! policies, so put it in a directory only operators can reach.
//!
//! Each client is served on a thread of its own (at most `CLIENTS_MAX` at once), so a client
//! that connects and says nothing costs the others nothing; it gets an error line when its
//! `REQUEST_TIMEOUT` runs out. Anything that is not a request line — garbage, bytes that are not
//! UTF-8, an unknown `op` — gets `{"ok":false,"error":"bad request: …"}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stager_policy::WritePolicy;
use tracing::{info, warn};

use crate::ana::{AnaPathStatus, AnaScope};
use crate::subsystem::TargetShared;
use crate::volume::status::NodeStatus;
use crate::volume::VolumeService;

/// Largest request line read; real ones are under 100 bytes.
const REQUEST_BYTES_MAX: u64 = 64 << 10;
/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients served at once; more are told to try again (each costs a thread).
const CLIENTS_MAX: usize = 16;
/// How long `call` waits for stagerd's answer (a status waits up to 5 s for each reactor).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    SetPolicy {
        volume: u32,
        policy: String,
    },
    AcceptLoss {
        volume: u32,
    },
    /// Fault injection: a flash device fails every command from now on (failure drills, tests).
    FlashFail {
        flash: String,
    },
    /// Every ANA path of the node and its state.
    AnaShow,
    /// The cluster as this node last read it from etcd.
    Cluster,
    /// Set an ANA group's state (in one subsystem / through one listener, or everywhere).
    AnaSet {
        group: u32,
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subsystem: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listener: Option<String>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// ANA paths: all of them (`ana-show`) or those a change touched (`ana-set`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ana: Option<Vec<AnaPathStatus>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::volume::status::ClusterView>,
}

impl Response {
    fn error(e: impl Into<String>) -> Response {
        Response { ok: false, status: None, message: None, error: Some(e.into()), ana: None, cluster: None }
    }
    fn ok() -> Response {
        Response { ok: true, status: None, message: None, error: None, ana: None, cluster: None }
    }
}

pub struct Management {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Management {
    pub fn start(
        path: &Path,
        volumes: Option<Arc<VolumeService>>,
        target: Option<Arc<TargetShared>>,
    ) -> Result<Management, String> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("{}: another stagerd is serving this socket", path.display()));
            }
            // A socket file left by a daemon that died: nobody listens on it.
            std::fs::remove_file(path).map_err(|e| format!("{}: cannot remove a stale socket: {e}", path.display()))?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| format!("{}: cannot listen: {e}", path.display()))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("management".into())
            .spawn(move || serve(listener, volumes, target, stop2))
            .map_err(|e| e.to_string())?;
        info!("management socket {}", path.display());
        Ok(Management { stop, thread: Some(thread), path: path.to_path_buf() })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(
    listener: UnixListener,
    volumes: Option<Arc<VolumeService>>,
    target: Option<Arc<TargetShared>>,
    stop: Arc<AtomicBool>,
) {
    let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if clients.fetch_add(1, Ordering::SeqCst) >= CLIENTS_MAX {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    let _ =
                        reply(&stream, &Response::error(format!("{CLIENTS_MAX} clients are being served; try again")));
                    continue;
                }
                let (volumes, target, clients2) = (volumes.clone(), target.clone(), clients.clone());
                let spawned = std::thread::Builder::new().name("management-client".into()).spawn(move || {
                    if let Err(e) = handle(stream, volumes.as_deref(), target.as_deref()) {
                        warn!("management request failed: {e}");
                    }
                    clients2.fetch_sub(1, Ordering::SeqCst);
                });
                if let Err(e) = spawned {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    warn!("management socket: cannot start a client thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                warn!("management socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn handle(stream: UnixStream, volumes: Option<&VolumeService>, target: Option<&TargetShared>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = Vec::new();
    let read = BufReader::new((&stream).take(REQUEST_BYTES_MAX)).read_until(b'\n', &mut line);
    let response = match read {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Response::error(format!("no request line within {} s", REQUEST_TIMEOUT.as_secs()))
        }
        Err(e) => return Err(e),
        Ok(0) => return Ok(()),
        Ok(_) => match std::str::from_utf8(&line) {
            Err(_) => Response::error("bad request: not UTF-8 text (one JSON object per line)"),
            Ok(text) => match serde_json::from_str::<Request>(text.trim()) {
                Err(e) => Response::error(format!("bad request: {e}")),
                Ok(req) => answer(req, volumes, target),
            },
        },
    };
    reply(&stream, &response)
}

fn reply(stream: &UnixStream, response: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_string(response).map_err(std::io::Error::other)?;
    out.push('\n');
    let mut s = stream;
    s.write_all(out.as_bytes())
}

fn answer(req: Request, volumes: Option<&VolumeService>, target: Option<&TargetShared>) -> Response {
    match req {
        Request::Status => match volumes {
            None => Response {
                status: Some(NodeStatus { pid: std::process::id(), uptime_s: 0.0, devices: Vec::new() }),
                ..Response::ok()
            },
            Some(v) => match v.status() {
                Ok(s) => Response { status: Some(s), ..Response::ok() },
                Err(e) => Response::error(e),
            },
        },
        Request::AcceptLoss { volume } => {
            let Some(v) = volumes else { return Response::error("this node has no write-back volumes") };
            match v.accept_loss(volume) {
                Ok(m) => {
                    info!("management: {m}");
                    Response { message: Some(m), ..Response::ok() }
                }
                Err(e) => Response::error(e),
            }
        }
        Request::FlashFail { flash } => {
            let Some(v) = volumes else { return Response::error("this node has no flash devices") };
            match v.fail_flash(&flash) {
                Ok(m) => Response { message: Some(m), ..Response::ok() },
                Err(e) => Response::error(e),
            }
        }
        Request::Cluster => {
            let view = target.and_then(|t| t.cluster_view.lock().ok().and_then(|v| v.clone()));
            match view {
                Some(c) => Response { cluster: Some(c), ..Response::ok() },
                None => Response::error(
                    "this node has no cluster view: no `cluster:` section, or it has not reached etcd yet",
                ),
            }
        }
        Request::AnaShow => match target {
            Some(t) => Response { ana: Some(t.ana_status()), ..Response::ok() },
            None => Response::error("this daemon serves no subsystems"),
        },
        Request::AnaSet { group, state, subsystem, listener } => {
            let Some(t) = target else { return Response::error("this daemon serves no subsystems") };
            let Some(s) = stager_nvme::log_page::AnaState::from_name(&state) else {
                let names: Vec<&str> = stager_nvme::log_page::AnaState::ALL.iter().map(|a| a.name()).collect();
                return Response::error(format!("`{state}` is not an ANA state ({})", names.join(", ")));
            };
            match t.set_ana_state(group, s, &AnaScope { subsystem, listener }) {
                Ok(change) => {
                    let m = if change.changed.is_empty() {
                        format!("ANA group {group}: already {s} on every path asked for; nothing changed")
                    } else {
                        format!(
                            "ANA group {group}: {s} on {} path(s), {} controller(s) notified",
                            change.changed.len(),
                            change.controllers_notified
                        )
                    };
                    info!("management: {m}");
                    Response { message: Some(m), ana: Some(change.changed), ..Response::ok() }
                }
                Err(e) => Response::error(e.to_string()),
            }
        }
        Request::SetPolicy { volume, policy } => {
            let (policy, copies) = match crate::config::parse_policy(&policy) {
                Ok((p, n)) => (p, (p == WritePolicy::WriteBack && policy.contains('+')).then_some(n)),
                Err(e) => return Response::error(e),
            };
            let Some(v) = volumes else { return Response::error("this node has no write-back volumes") };
            match v.set_policy(volume, policy, copies) {
                Ok(m) => {
                    info!("management: {m}");
                    Response { message: Some(m), ..Response::ok() }
                }
                Err(e) => Response::error(e),
            }
        }
    }
}

/// The client side (`stagerctl`, tests): one request, one response.
pub fn call(path: &Path, req: &Request) -> Result<Response, String> {
    let p = path.display();
    let stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            format!(
                "no management socket at {p}: stagerd is not running there (or management.socket names another path)"
            )
        }
        std::io::ErrorKind::ConnectionRefused => {
            format!("nothing answers at {p}: stagerd is not running (the socket file was left by one that died)")
        }
        std::io::ErrorKind::PermissionDenied => {
            format!("{p}: permission denied (the socket is stagerd's; run as its user)")
        }
        _ => format!("cannot reach stagerd at {p}: {e}"),
    })?;
    let timed_out = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("stagerd at {p} did not answer within {} s (is it stopped, or hung?)", ANSWER_TIMEOUT.as_secs())
        }
        _ => format!("talking to stagerd at {p}: {e}"),
    };
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(timed_out)?;
    let mut resp = String::new();
    BufReader::new((&stream).take(64 << 20)).read_line(&mut resp).map_err(timed_out)?;
    if resp.is_empty() {
        return Err(format!("stagerd at {p} closed the connection without an answer"));
    }
    serde_json::from_str(resp.trim()).map_err(|e| format!("unreadable answer from stagerd: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn raw(path: &Path, bytes: &[u8]) -> String {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&s).write_all(bytes).unwrap();
        let mut out = String::new();
        BufReader::new(&s).read_line(&mut out).unwrap();
        out
    }

    #[test]
    fn clients_are_served_independently_and_garbage_gets_an_error() {
        let dir = std::env::temp_dir().join(format!("stager-mgmt-{}", std::process::id()));
        let path = dir.join("m.sock");
        let m = Management::start(&path, None, None).unwrap();
        // A client that connects and says nothing does not hold the others up.
        let _silent = UnixStream::connect(&path).unwrap();
        let t = Instant::now();
        let r = call(&path, &Request::Status).unwrap();
        assert!(r.ok && r.status.is_some());
        assert!(t.elapsed() < Duration::from_secs(2), "status took {:?} behind a silent client", t.elapsed());
        for bad in [&b"\xff\xfe garbage\n"[..], b"{\"op\":\"nope\"}\n", b"not json\n"] {
            let line = raw(&path, bad);
            let r: Response = serde_json::from_str(line.trim()).unwrap();
            assert!(!r.ok && r.error.as_deref().is_some_and(|e| e.starts_with("bad request")), "{line}");
        }
        let r = call(&path, &Request::SetPolicy { volume: 1, policy: "write-back".into() }).unwrap();
        assert_eq!(r.error.as_deref(), Some("this node has no write-back volumes"));
        m.stop();
        // Errors that say what is wrong when stagerd is not there.
        let e = call(&path, &Request::Status).unwrap_err();
        assert!(e.contains("no management socket"), "{e}");
        let _left = std::os::unix::net::UnixListener::bind(&path).map(drop);
        let e = call(&path, &Request::Status).unwrap_err();
        assert!(e.contains("not running"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
