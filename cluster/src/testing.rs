//! A real etcd for tests, and a TCP proxy that can cut a client off from it.
//!
//! Tests of cluster behaviour need the real server (leases expire on etcd's clock, elections
//! and compare-and-put are etcd's transactions), so [`EtcdServer`] starts Debian's `etcd` on
//! 127.0.0.1 with free ports and a fresh data directory, and stops it again when dropped — also
//! when the test panics. [`TcpProxy`] sits between one client and etcd so a test can partition
//! that client alone (etcd keeps running and expires its lease) without touching the others.
//!
//! The binary is `$STAGER_ETCD` if set, else `etcd` on `PATH`, else `/usr/bin/etcd` (Debian's
//! `etcd-server` package). Nothing here needs the `etcd` cargo feature.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long `start` waits for etcd to report itself healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A single-member etcd on 127.0.0.1, owned by the test that started it.
pub struct EtcdServer {
    child: Option<Child>,
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// The etcd binary tests run.
pub fn etcd_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("STAGER_ETCD") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file());
    let candidate = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"));
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no etcd binary: install Debian's etcd-server (apt-get install etcd-server) or set STAGER_ETCD",
        ))
    }
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl EtcdServer {
    /// Starts etcd and waits until it answers `/health`. Retries with other ports if one was
    /// taken between choosing it and etcd binding it.
    pub fn start() -> io::Result<EtcdServer> {
        let binary = etcd_binary()?;
        let mut last = None;
        for _ in 0..3 {
            let dir = std::env::temp_dir().join(format!(
                "stager-etcd-{}-{}",
                std::process::id(),
                NEXT_DIR.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let mut server = EtcdServer {
                child: None,
                binary: binary.clone(),
                dir,
                client_port: free_port()?,
                peer_port: free_port()?,
            };
            match server.spawn().and_then(|_| server.wait_ready()) {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("etcd.log"))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name=stager-test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=stager-test={peer}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Debian's package ships a default config path through the environment on some
        // versions; make sure only our flags count.
        cmd.env_remove("ETCD_CONFIG_FILE").env_remove("ETCD_DATA_DIR");
        // If the test process dies without running destructors (abort, SIGKILL), etcd goes with
        // it instead of outliving the test. PR_SET_PDEATHSIG fires when the *thread* that
        // started etcd exits, so a server must be started by the thread that owns it.
        // SAFETY: prctl and getppid are async-signal-safe; nothing else runs between fork and
        // exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            let parent = libc::getpid();
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("parent exited"));
                }
                Ok(())
            });
        }
        self.child = Some(cmd.spawn()?);
        Ok(())
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    return Err(io::Error::other(format!(
                        "etcd exited with {status} at start; its log: {}",
                        self.log_tail()
                    )));
                }
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("etcd not healthy; its log: {}", self.log_tail()),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// etcd's `/health` says true (it has a leader and serves reads).
    pub fn healthy(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
            return false;
        }
        let mut body = Vec::new();
        let _ = s.take(64 << 10).read_to_end(&mut body);
        String::from_utf8_lossy(&body).contains("\"health\":\"true\"")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// `127.0.0.1:PORT`, as `ClusterConfig::endpoints` takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    pub fn data_dir(&self) -> &Path {
        &self.dir
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child's pid; it has not been reaped while `child` is
            // Some, so the pid cannot have been reused.
            unsafe {
                libc::kill(child.id() as libc::pid_t, sig);
            }
        }
    }

    /// SIGSTOP: etcd stops answering (connections stay open, requests hang) and stops
    /// expiring leases until `resume`.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGKILL, and wait for it to be gone. The data directory stays for `restart`.
    pub fn kill(&mut self) {
        self.signal(libc::SIGCONT);
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (after `kill`).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP forwarder on 127.0.0.1 in front of one target: `cut()` silently drops everything in
/// both directions (connections stay open, so the client sees a partition, not a refusal),
/// `heal()` forwards again. Stops its threads when dropped.
pub struct TcpProxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl TcpProxy {
    pub fn start(target: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (cut, stop, threads) = (cut.clone(), stop.clone(), threads.clone());
            thread::Builder::new().name("test-proxy".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(server) = TcpStream::connect(target) else { continue };
                            for (from, to) in [(client.try_clone(), server.try_clone()), (Ok(server), Ok(client))] {
                                if let (Ok(from), Ok(to)) = (from, to) {
                                    let (cut, stop) = (cut.clone(), stop.clone());
                                    let t = thread::spawn(move || pump(from, to, &cut, &stop));
                                    threads.lock().unwrap_or_else(|e| e.into_inner()).push(t);
                                }
                            }
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })?
        };
        Ok(TcpProxy { addr, cut, stop, threads, acceptor: Some(acceptor) })
    }

    /// `127.0.0.1:PORT` to give the client instead of the target's address.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // A cut link swallows what it carries.
                if !cut.load(Ordering::SeqCst) && to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

/// Polls `f` every 10 ms until it is true or `limit` passes; the time it took, if it became true.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}
