//! One thread per listener accepts TCP connections and hands each to a reactor, round-robin
//! across reactors, so connections spread over cores. Accepting is control-plane work; it
//! never runs on a reactor.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, warn};

use crate::reactor::{ReactorHandle, ReactorMsg};

pub fn spawn(
    listener: TcpListener,
    index: usize,
    name: String,
    reactors: Arc<Vec<ReactorHandle>>,
    next: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    std::thread::Builder::new().name(format!("accept-{name}")).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    if stream.set_nonblocking(false).is_err() {
                        continue;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed) % reactors.len();
                    debug!("listener {name}: connection from {peer} → reactor {i}");
                    reactors[i].send(ReactorMsg::Connection(stream, peer, index));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut p = libc::pollfd {
                        fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd for the duration of the call.
                    unsafe { libc::poll(&mut p, 1, 100) };
                }
                Err(e) => {
                    warn!("listener {name}: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    })
}
