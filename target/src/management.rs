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
//! ```
//!
//! The socket file is created with the daemon's umask; anyone who can open it can change
//! policies, so put it in a directory only operators can reach.

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

use crate::volume::status::NodeStatus;
use crate::volume::VolumeService;

/// Largest request line read; real ones are under 100 bytes.
const REQUEST_BYTES_MAX: u64 = 64 << 10;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Status,
    SetPolicy { volume: u32, policy: String },
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
}

impl Response {
    fn error(e: impl Into<String>) -> Response {
        Response { ok: false, status: None, message: None, error: Some(e.into()) }
    }
}

pub struct Management {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl Management {
    pub fn start(path: &Path, volumes: Option<Arc<VolumeService>>) -> Result<Management, String> {
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
            .spawn(move || serve(listener, volumes, stop2))
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

fn serve(listener: UnixListener, volumes: Option<Arc<VolumeService>>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle(stream, volumes.as_deref()) {
                    warn!("management request failed: {e}");
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

fn handle(stream: UnixStream, volumes: Option<&VolumeService>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new((&stream).take(REQUEST_BYTES_MAX)).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(line.trim()) {
        Err(e) => Response::error(format!("bad request: {e}")),
        Ok(req) => answer(req, volumes),
    };
    let mut out = serde_json::to_string(&response).map_err(std::io::Error::other)?;
    out.push('\n');
    (&stream).write_all(out.as_bytes())
}

fn answer(req: Request, volumes: Option<&VolumeService>) -> Response {
    match req {
        Request::Status => match volumes {
            None => Response {
                ok: true,
                status: Some(NodeStatus { pid: std::process::id(), uptime_s: 0.0, devices: Vec::new() }),
                message: None,
                error: None,
            },
            Some(v) => match v.status() {
                Ok(s) => Response { ok: true, status: Some(s), message: None, error: None },
                Err(e) => Response::error(e),
            },
        },
        Request::SetPolicy { volume, policy } => {
            let policy = match policy.parse::<WritePolicy>() {
                Ok(p) => p,
                Err(e) => return Response::error(e),
            };
            let Some(v) = volumes else { return Response::error("this node has no write-back volumes") };
            match v.set_policy(volume, policy) {
                Ok(m) => {
                    info!("management: {m}");
                    Response { ok: true, status: None, message: Some(m), error: None }
                }
                Err(e) => Response::error(e),
            }
        }
    }
}

/// The client side (`stagerctl`, tests): one request, one response.
pub fn call(path: &Path, req: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(path).map_err(|e| {
        format!("cannot reach stagerd at {}: {e} (is it running, with management.socket set?)", path.display())
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new((&stream).take(64 << 20)).read_line(&mut resp).map_err(|e| e.to_string())?;
    serde_json::from_str(resp.trim()).map_err(|e| format!("unreadable answer from stagerd: {e}"))
}
