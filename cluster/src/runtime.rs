//! The private tokio runtime behind the blocking API.
//!
//! etcd-client is async; stagerd's control plane is plain threads and its reactors must never
//! block. So the client lives on one background thread running a current-thread tokio runtime,
//! and every blocking call spawns its future there and waits on a channel with a time limit.
//! Long-lived work (lease keep-alive, watches) runs as tasks on the same thread. Dropping the
//! runtime (on `stop`) cancels all of it at once.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::error::ClusterError;

/// Slack a blocking caller gives a task beyond the task's own time limit before giving up on
/// it (the task enforces the limit itself; this only covers a runtime that stalled).
const CALLER_SLACK: Duration = Duration::from_millis(500);

pub(crate) struct Runtime {
    handle: Handle,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopped: Arc<AtomicBool>,
}

impl Runtime {
    pub(crate) fn start() -> Result<Runtime, ClusterError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClusterError::Config(format!("cannot start the cluster client's runtime: {e}")))?;
        let handle = rt.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("stager-cluster".into())
            .spawn(move || {
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
                // Cancels every task (keep-alive, watches, calls in flight); nothing here
                // blocks, so this is quick.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| ClusterError::Config(format!("cannot start the cluster client's thread: {e}")))?;
        Ok(Runtime {
            handle,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(Some(thread)),
            stopped: Arc::new(AtomicBool::new(false)),
        })
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Runs `fut` on the runtime and waits for it at most `limit`; `timeout` builds the error
    /// for a future that did not finish in time.
    pub(crate) fn call<T, F>(
        &self,
        limit: Duration,
        timeout: impl Fn() -> ClusterError,
        fut: F,
    ) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        if self.is_stopped() {
            return Err(ClusterError::Stopped);
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let err = timeout();
        self.handle.spawn(async move {
            let r = match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => Err(err),
            };
            let _ = tx.send(r);
        });
        match rx.recv_timeout(limit + CALLER_SLACK) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => Err(timeout()),
            Err(RecvTimeoutError::Disconnected) if self.is_stopped() => Err(ClusterError::Stopped),
            // The task was dropped without answering: it panicked (tokio contains the panic to
            // the task) or the runtime thread is gone.
            Err(RecvTimeoutError::Disconnected) => Err(ClusterError::Etcd {
                what: "a request".into(),
                detail: "the cluster client's request task failed".into(),
            }),
        }
    }

    /// Starts a background task (keep-alive, watch).
    pub(crate) fn spawn<F>(&self, fut: F) -> tokio::task::AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(fut).abort_handle()
    }

    /// Cancels every task and ends the runtime thread. Idempotent.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(tx) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(());
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            // Never join ourselves (a drop on the runtime thread would deadlock).
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop();
    }
}
