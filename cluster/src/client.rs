//! [`Cluster`]: the blocking handle stagerd's control threads use, and the etcd calls behind it.
//!
//! Every call runs as a future on the private runtime (`runtime.rs`) and is bounded by
//! `op_timeout` (a campaign by its own timeout plus that). Writes to volume records are
//! transactions that compare the record's mod revision, so two writers can never both succeed
//! from the same revision and no update is lost; the resource manager's writes also compare the
//! create revision of its own election key, so a manager that was deposed — its key deleted or
//! its lease expired, perhaps while it was partitioned — cannot write at all, whatever it
//! believes.
//!
//! Locally shared state (`Shared`) is what the background tasks update: the lease's deadline
//! (keep-alive task) and the leadership (its key's watch). Its locks are held only to read or
//! swap a few fields, never across an await or a call.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, LeaseClient, PutOptions, Txn, TxnOp,
};
use tokio::task::AbortHandle;

use crate::constants::{LEASE_TTL_MAX, LEASE_TTL_MIN, OP_TIMEOUT_MAX, OP_TIMEOUT_MIN};
use crate::error::ClusterError;
use crate::lease::{ttl_seconds, LeaseClock, LeaseState};
use crate::record::{
    check_endpoint, check_node_id, check_prefix, decode_node, decode_volume, encode_node, encode_volume, Keys,
    NodeInfo, VolumeRecord,
};
use crate::runtime::Runtime;
use crate::{election, watch, ClusterConfig, Revision, VolumeEvent};

/// A handle on the cluster state. `Send + Sync`; clones share one etcd client, one lease and one
/// runtime thread. Dropping the last clone is `stop()`.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClusterConfig,
    keys: Keys,
    client: Client,
    rt: Runtime,
    shared: Arc<Shared>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.rt.stop();
    }
}

/// State the background tasks and the blocking calls share.
pub(crate) struct Shared {
    node: String,
    ttl: Duration,
    lease: Mutex<LeaseSlot>,
    leader: Mutex<Option<Leadership>>,
}

struct LeaseSlot {
    /// The current lease; `None` before `register` and after `deregister`/`stop`.
    id: Option<i64>,
    clock: LeaseClock,
    keeper: Option<AbortHandle>,
    /// Whether the keeper already logged the loss (it says so once per loss).
    said_lost: bool,
}

/// This node's won election: its candidate key and that key's create revision, which every
/// leader-only write compares.
#[derive(Clone)]
pub(crate) struct Leadership {
    key: String,
    create_rev: i64,
    lease: i64,
    watcher: Option<AbortHandle>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding one of these locks leaves plain data behind; use it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn lease_state(&self, now: Instant) -> (Option<i64>, LeaseState) {
        let slot = lock(&self.lease);
        match slot.id {
            Some(id) => (Some(id), slot.clock.state(now)),
            None => (None, LeaseState::Lost),
        }
    }

    /// The lease, if it is alive now.
    fn live_lease(&self) -> Result<i64, ClusterError> {
        match self.lease_state(Instant::now()) {
            (Some(id), LeaseState::Alive { .. }) => Ok(id),
            (Some(_), LeaseState::Lost) => Err(ClusterError::LeaseLost { node: self.node.clone() }),
            (None, _) => Err(ClusterError::NotRegistered { node: self.node.clone() }),
        }
    }

    /// The keep-alive task's report: a request for `id` sent at `sent_at` got `ttl`.
    pub(crate) fn renewed(&self, id: i64, sent_at: Instant, ttl: Duration) {
        let mut slot = lock(&self.lease);
        if slot.id != Some(id) {
            return; // a keeper of a lease we no longer hold
        }
        slot.clock.renewed(sent_at, ttl);
        if slot.said_lost && matches!(slot.clock.state(Instant::now()), LeaseState::Alive { .. }) {
            slot.said_lost = false;
            tracing::warn!(node = %self.node, lease = format!("{id:x}"), "cluster lease renewed again: alive");
        }
    }

    /// etcd says lease `id` does not exist.
    pub(crate) fn lease_gone(&self, id: i64) {
        let mut slot = lock(&self.lease);
        if slot.id == Some(id) {
            slot.clock.gone();
            tracing::error!(node = %self.node, lease = format!("{id:x}"), "cluster lease expired in etcd: register again");
        }
    }

    /// Called by the keeper on every tick: says once when the lease's deadline has passed.
    pub(crate) fn check_lost(&self, id: i64) {
        let mut slot = lock(&self.lease);
        if slot.id == Some(id) && !slot.said_lost && slot.clock.state(Instant::now()) == LeaseState::Lost {
            slot.said_lost = true;
            tracing::error!(
                node = %self.node,
                lease = format!("{id:x}"),
                "cluster lease lost: no keep-alive answered in time; this node must stop acting as an owner"
            );
        }
    }

    pub(crate) fn holds_lease(&self, id: i64) -> bool {
        lock(&self.lease).id == Some(id)
    }

    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Drops the leadership if it is still the one identified by `key` and `create_rev`.
    pub(crate) fn clear_leader(&self, key: &str, create_rev: i64) {
        let mut leader = lock(&self.leader);
        if leader.as_ref().is_some_and(|l| l.key == key && l.create_rev == create_rev) {
            *leader = None;
            tracing::warn!(node = %self.node, "no longer the resource manager: its election key is gone");
        }
    }

    fn take_leader(&self) -> Option<Leadership> {
        let l = lock(&self.leader).take();
        if let Some(w) = l.as_ref().and_then(|l| l.watcher.as_ref()) {
            w.abort();
        }
        l
    }

    /// Forgets the lease (and with it the leadership), stopping its keeper.
    fn drop_lease(&self) -> Option<i64> {
        self.take_leader();
        let mut slot = lock(&self.lease);
        if let Some(k) = slot.keeper.take() {
            k.abort();
        }
        slot.said_lost = false;
        slot.clock = LeaseClock::new(self.ttl);
        slot.id.take()
    }
}

/// What one call is doing, for its errors.
#[derive(Clone)]
pub(crate) struct Op {
    endpoints: Arc<str>,
    what: String,
}

impl Op {
    /// The error for a failed etcd call.
    pub(crate) fn fail(&self, e: etcd_client::Error) -> ClusterError {
        // gRPC status codes (tonic::Code's discriminants are the wire values).
        const DEADLINE_EXCEEDED: i32 = 4;
        const UNAVAILABLE: i32 = 14;
        let (endpoints, what) = (self.endpoints.to_string(), self.what.clone());
        match e {
            etcd_client::Error::GRpcStatus(s) if s.code() as i32 == UNAVAILABLE => {
                ClusterError::Unreachable { endpoints, what, detail: s.message().to_string() }
            }
            etcd_client::Error::GRpcStatus(s) if s.code() as i32 == DEADLINE_EXCEEDED => {
                ClusterError::Timeout { endpoints, what, after: Duration::ZERO }
            }
            etcd_client::Error::GRpcStatus(s) => {
                ClusterError::Etcd { what, detail: format!("{:?}: {}", s.code(), s.message()) }
            }
            etcd_client::Error::TransportError(e) => {
                ClusterError::Unreachable { endpoints, what, detail: e.to_string() }
            }
            etcd_client::Error::IoError(e) => ClusterError::Unreachable { endpoints, what, detail: e.to_string() },
            other => ClusterError::Etcd { what, detail: other.to_string() },
        }
    }

    pub(crate) fn timeout(&self, after: Duration) -> ClusterError {
        ClusterError::Timeout { endpoints: self.endpoints.to_string(), what: self.what.clone(), after }
    }

    pub(crate) fn malformed(key: &[u8], detail: impl Into<String>) -> ClusterError {
        ClusterError::Malformed { key: String::from_utf8_lossy(key).into_owned(), detail: detail.into() }
    }
}

/// Bounds one etcd request to `limit` inside a task.
pub(crate) async fn within<T>(
    op: &Op,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, ClusterError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| op.fail(e)),
        Err(_) => Err(op.timeout(limit)),
    }
}

fn check_config(cfg: &ClusterConfig) -> Result<(), ClusterError> {
    let bad = |m: String| ClusterError::Config(m);
    if cfg.endpoints.is_empty() {
        return Err(bad("no endpoints".into()));
    }
    for e in &cfg.endpoints {
        check_endpoint(e).map_err(|m| bad(format!("endpoint {m}")))?;
    }
    check_prefix(&cfg.prefix).map_err(|e| bad(format!("prefix: {e}")))?;
    check_node_id(&cfg.node).map_err(|e| bad(format!("node: {e}")))?;
    let in_range = |name: &str, v: Duration, min: Duration, max: Duration| {
        if v < min || v > max {
            let ms = |d: Duration| d.as_millis();
            return Err(bad(format!("{name} {} ms is out of range {}..={} ms", ms(v), ms(min), ms(max))));
        }
        Ok(())
    };
    in_range("lease_ttl", cfg.lease_ttl, LEASE_TTL_MIN, LEASE_TTL_MAX)?;
    in_range("op_timeout", cfg.op_timeout, OP_TIMEOUT_MIN, OP_TIMEOUT_MAX)
}

/// Milliseconds since the Unix epoch (for `NodeInfo::started_unix_ms` and transitions).
pub fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Cluster {
    /// Connects to etcd and checks that it answers (within `op_timeout`).
    pub fn connect(cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        check_config(&cfg)?;
        let rt = Runtime::start()?;
        let op = Op { endpoints: cfg.endpoints.join(",").into(), what: "connecting".into() };
        let endpoints = cfg.endpoints.clone();
        let limit = cfg.op_timeout;
        let op2 = op.clone();
        let unreachable = move || ClusterError::Unreachable {
            endpoints: op2.endpoints.to_string(),
            what: op2.what.clone(),
            detail: format!("no answer within {} ms", limit.as_millis()),
        };
        let op3 = op.clone();
        let client = rt.call(limit, unreachable, async move {
            // No gRPC-level request timeout: it would cut the keep-alive and watch streams;
            // every request is bounded by `within` instead. HTTP/2 pings (every `limit`, also
            // while idle) close a connection that stopped answering — a partition that drops
            // packets without a reset — so the channel connects anew once etcd is reachable
            // again instead of failing every request on the dead one.
            let opts = ConnectOptions::new()
                .with_connect_timeout(limit)
                .with_keep_alive(limit, limit)
                .with_keep_alive_while_idle(true);
            let client = Client::connect(endpoints, Some(opts)).await.map_err(|e| op3.fail(e))?;
            within(&op3, limit, client.maintenance_client().status()).await?;
            Ok(client)
        })?;
        let shared = Arc::new(Shared {
            node: cfg.node.clone(),
            ttl: cfg.lease_ttl,
            lease: Mutex::new(LeaseSlot {
                id: None,
                clock: LeaseClock::new(cfg.lease_ttl),
                keeper: None,
                said_lost: false,
            }),
            leader: Mutex::new(None),
        });
        let keys = Keys::new(&cfg.prefix);
        Ok(Cluster { inner: Arc::new(Inner { cfg, keys, client, rt, shared }) })
    }

    fn op(&self, what: impl Into<String>) -> Op {
        Op { endpoints: self.inner.cfg.endpoints.join(",").into(), what: what.into() }
    }

    /// Runs `fut` on the runtime within `op_timeout`.
    fn run<T, F>(&self, op: &Op, fut: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        self.run_for(op, self.inner.cfg.op_timeout, fut)
    }

    fn run_for<T, F>(&self, op: &Op, limit: Duration, fut: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        let op = op.clone();
        self.inner.rt.call(limit, move || op.timeout(limit), fut)
    }

    fn kv(&self) -> KvClient {
        self.inner.client.kv_client()
    }

    fn lease_client(&self) -> LeaseClient {
        self.inner.client.lease_client()
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.cfg
    }

    /// Registers this node under a lease and keeps the lease alive from the background. While
    /// the lease is alive, calling it again re-puts `info` under the same lease (an update, like
    /// [`Cluster::update`]); once the lease is lost, it revokes the old lease (best effort, in
    /// the background: that drops this node's manager candidacy at once) and starts a new one.
    pub fn register(&self, info: &NodeInfo) -> Result<(), ClusterError> {
        let shared = &self.inner.shared;
        if info.id != self.inner.cfg.node {
            return Err(ClusterError::Config(format!(
                "NodeInfo names node {:?}, but this client is node {:?}",
                info.id, self.inner.cfg.node
            )));
        }
        if let Ok(id) = shared.live_lease() {
            return self.put_node(info, id);
        }
        let value = encode_node(&self.inner.keys, info)?;
        if let Some(old) = shared.drop_lease() {
            let mut lc = self.lease_client();
            let op = self.op("revoking a lost lease");
            let limit = self.inner.cfg.op_timeout;
            self.inner.rt.spawn(async move {
                let _ = within(&op, limit, lc.revoke(old)).await;
            });
        }
        let op = self.op(format!("registering node {}", info.id));
        let (mut lc, mut kv) = (self.lease_client(), self.kv());
        let key = self.inner.keys.node(&info.id);
        let ttl_s = ttl_seconds(self.inner.cfg.lease_ttl);
        let limit = self.inner.cfg.op_timeout;
        let op2 = op.clone();
        let (id, sent_at, granted) = self.run(&op, async move {
            let sent_at = Instant::now();
            let grant = within(&op2, limit, lc.grant(ttl_s, None)).await?;
            let granted = Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0));
            if granted.is_zero() || grant.id() == 0 {
                return Err(ClusterError::Etcd {
                    what: op2.what.clone(),
                    detail: format!("lease grant: {}", grant.error()),
                });
            }
            within(&op2, limit, kv.put(key, value, Some(PutOptions::new().with_lease(grant.id())))).await?;
            Ok((grant.id(), sent_at, granted))
        })?;
        {
            let mut slot = lock(&shared.lease);
            slot.id = Some(id);
            slot.clock = LeaseClock::new(self.inner.cfg.lease_ttl);
            slot.clock.renewed(sent_at, granted);
            slot.said_lost = false;
            let keeper = crate::keeper::keep_alive(
                self.lease_client(),
                shared.clone(),
                self.op("keeping the lease alive"),
                id,
                granted,
            );
            slot.keeper = Some(self.inner.rt.spawn(keeper));
        }
        tracing::info!(node = %info.id, lease = format!("{id:x}"), ttl_s = granted.as_secs(), "registered in the cluster");
        Ok(())
    }

    /// Re-puts this node's info under its current lease (free flash changed, a SAN became
    /// unreachable). Fails with `LeaseLost` rather than starting a new lease.
    pub fn update(&self, info: &NodeInfo) -> Result<(), ClusterError> {
        if info.id != self.inner.cfg.node {
            return Err(ClusterError::Config(format!(
                "NodeInfo names node {:?}, but this client is node {:?}",
                info.id, self.inner.cfg.node
            )));
        }
        let id = self.inner.shared.live_lease()?;
        self.put_node(info, id)
    }

    fn put_node(&self, info: &NodeInfo, lease: i64) -> Result<(), ClusterError> {
        let value = encode_node(&self.inner.keys, info)?;
        let op = self.op(format!("updating node {}", info.id));
        let (mut kv, key, limit, op2) =
            (self.kv(), self.inner.keys.node(&info.id), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move {
            within(&op2, limit, kv.put(key, value, Some(PutOptions::new().with_lease(lease)))).await.map(|_| ())
        })
    }

    /// Revokes this node's lease: its node record and manager candidacy disappear at once (a
    /// graceful leave; `stop` instead lets the lease run out, as a crash would).
    pub fn deregister(&self) -> Result<(), ClusterError> {
        let Some(id) = self.inner.shared.drop_lease() else { return Ok(()) };
        let op = self.op("revoking the lease");
        let (mut lc, limit, op2) = (self.lease_client(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move { within(&op2, limit, lc.revoke(id)).await.map(|_| ()) })
    }

    /// What this node may assume about its lease right now; `Lost` before `register`.
    pub fn lease_state(&self) -> LeaseState {
        if self.inner.rt.is_stopped() {
            return LeaseState::Lost;
        }
        self.inner.shared.lease_state(Instant::now()).1
    }

    /// The live (registered) nodes, by id.
    pub fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let op = self.op("listing nodes");
        let (mut kv, keys, limit, op2) = (self.kv(), self.inner.keys.clone(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move {
            let resp = within(&op2, limit, kv.get(keys.nodes(), Some(GetOptions::new().with_prefix()))).await?;
            resp.kvs().iter().map(|kv| decode_node(&keys, kv.key(), kv.value())).collect()
        })
    }

    /// Resource-manager election: blocks until this node is the manager (true) or `timeout`
    /// passes (false; its candidacy is withdrawn, so call again to stay in line). Needs a live
    /// lease: the candidacy is attached to it, so a manager whose lease expires is deposed.
    pub fn campaign(&self, timeout: Duration) -> Result<bool, ClusterError> {
        let shared = &self.inner.shared;
        let lease = shared.live_lease()?;
        if self.is_leader() {
            return Ok(true);
        }
        let op = self.op("campaigning for resource manager");
        let (kv, watch) = (self.kv(), self.inner.client.watch_client());
        let (keys, node, limit) = (self.inner.keys.clone(), self.inner.cfg.node.clone(), self.inner.cfg.op_timeout);
        let op2 = op.clone();
        let won = self.run_for(&op, timeout + limit * 3, async move {
            election::campaign(kv, watch, &op2, &keys, &node, lease, timeout, limit).await
        })?;
        let Some(create_rev) = won else { return Ok(false) };
        let key = self.inner.keys.candidate(lease);
        {
            let mut leader = lock(&shared.leader);
            if shared.holds_lease(lease) {
                let watcher = self.inner.rt.spawn(election::watch_leadership(
                    self.inner.client.watch_client(),
                    self.kv(),
                    self.op("watching the manager key"),
                    key.clone(),
                    create_rev,
                    shared.clone(),
                ));
                if let Some(old) = leader.replace(Leadership { key, create_rev, lease, watcher: Some(watcher) }) {
                    if let Some(w) = old.watcher {
                        w.abort();
                    }
                }
                tracing::info!(node = %self.inner.cfg.node, "elected resource manager");
            }
        }
        Ok(self.is_leader())
    }

    /// Whether this node is the resource manager now: it won, has not resigned, its election key
    /// still exists as far as its watch has seen, and its lease is alive (false as soon as the
    /// lease is `Lost`, and true again if the same lease is renewed after all).
    pub fn is_leader(&self) -> bool {
        let shared = &self.inner.shared;
        let (lease, state) = shared.lease_state(Instant::now());
        if !matches!(state, LeaseState::Alive { .. }) || self.inner.rt.is_stopped() {
            return false;
        }
        lock(&shared.leader).as_ref().is_some_and(|l| Some(l.lease) == lease)
    }

    /// The current resource manager's node id, if any node holds the role.
    pub fn leader(&self) -> Result<Option<String>, ClusterError> {
        let op = self.op("reading the resource manager");
        let (kv, keys, limit, op2) = (self.kv(), self.inner.keys.clone(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move { election::leader(kv, &op2, &keys, limit).await })
    }

    /// Gives up the manager role (deletes this node's election key). A no-op when not leading.
    pub fn resign(&self) -> Result<(), ClusterError> {
        let Some(l) = self.inner.shared.take_leader() else { return Ok(()) };
        tracing::info!(node = %self.inner.cfg.node, "resigning as resource manager");
        let op = self.op("resigning as resource manager");
        let (mut kv, limit, op2) = (self.kv(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move {
            let txn = Txn::new()
                .when([Compare::create_revision(l.key.clone(), CompareOp::Equal, l.create_rev)])
                .and_then([TxnOp::delete(l.key, None)]);
            within(&op2, limit, kv.txn(txn)).await.map(|_| ())
        })
    }

    /// One volume's record and its revision (what `put_volume_if` compares), if it exists.
    pub fn volume(&self, id: u32) -> Result<Option<(VolumeRecord, Revision)>, ClusterError> {
        let op = self.op(format!("reading volume {id}"));
        let (mut kv, keys, limit, op2) = (self.kv(), self.inner.keys.clone(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move {
            let resp = within(&op2, limit, kv.get(keys.volume(id), None)).await?;
            match resp.kvs().first() {
                None => Ok(None),
                Some(kv) => Ok(Some((decode_volume(&keys, kv.key(), kv.value())?, kv.mod_revision()))),
            }
        })
    }

    /// Every volume record with its revision, by volume id. A malformed record is an error
    /// naming its key (fix or delete it with etcdctl).
    pub fn volumes(&self) -> Result<Vec<(VolumeRecord, Revision)>, ClusterError> {
        let op = self.op("listing volumes");
        let (kv, keys, limit, op2) = (self.kv(), self.inner.keys.clone(), self.inner.cfg.op_timeout, op.clone());
        self.run(&op, async move { list_volumes(kv, &op2, &keys, limit, OnMalformed::Fail).await.map(|(v, _)| v) })
    }

    /// Compare-and-put: writes `rec` only if its record's current revision is `expected`
    /// (`None`: it must not exist). `Ok(Ok(new_rev))` written; `Ok(Err(current))` someone else
    /// changed it first (`current` is its revision now, `None` if it does not exist).
    pub fn put_volume_if(
        &self,
        rec: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Result<Revision, Option<Revision>>, ClusterError> {
        self.put_volume(rec, expected, None, None)
    }

    /// The same, but also requires (in the same transaction) that this node still holds the
    /// manager's election key, so a deposed manager cannot write: `Err(NotLeader)` then. Also
    /// refused locally, without asking etcd, while this node's lease is `Lost`.
    pub fn put_volume_as_leader(
        &self,
        rec: &VolumeRecord,
        expected: Option<Revision>,
    ) -> Result<Result<Revision, Option<Revision>>, ClusterError> {
        self.put_volume_as_leader_while_gone(rec, expected, None)
    }

    /// [`Cluster::put_volume_as_leader`], and only while node `gone` has no registration in
    /// etcd (its lease expired or it left): what the manager uses to make a rescuer, so a
    /// decision taken on a list of nodes read before the owner registered again is not written
    /// (`Ok(Err(_))`, as for a changed record: read again and decide again).
    pub fn put_volume_as_leader_while_gone(
        &self,
        rec: &VolumeRecord,
        expected: Option<Revision>,
        gone: Option<&str>,
    ) -> Result<Result<Revision, Option<Revision>>, ClusterError> {
        let shared = &self.inner.shared;
        let lease = shared.live_lease()?;
        let leadership = lock(&shared.leader).clone().filter(|l| l.lease == lease);
        let Some(l) = leadership else { return Err(ClusterError::NotLeader { node: self.inner.cfg.node.clone() }) };
        let gone = gone.map(|n| self.inner.keys.node(n));
        let r = self.put_volume(rec, expected, Some((l.key.clone(), l.create_rev)), gone);
        if let Err(ClusterError::NotLeader { .. }) = r {
            shared.clear_leader(&l.key, l.create_rev);
        }
        r
    }

    /// The compare-and-put behind both writes; `guard` is the election key and create revision
    /// a leader-only write also compares, `gone` a key that must not exist. Crate-visible so a
    /// test can present a stale guard to etcd directly, bypassing the local checks.
    pub(crate) fn put_volume(
        &self,
        rec: &VolumeRecord,
        expected: Option<Revision>,
        guard: Option<(String, i64)>,
        gone: Option<String>,
    ) -> Result<Result<Revision, Option<Revision>>, ClusterError> {
        let value = encode_volume(&self.inner.keys, rec)?;
        let key = self.inner.keys.volume(rec.id);
        let op = self.op(format!("writing volume {}", rec.id));
        let (mut kv, limit, op2, node) =
            (self.kv(), self.inner.cfg.op_timeout, op.clone(), self.inner.cfg.node.clone());
        self.run(&op, async move {
            let mut when = vec![match expected {
                Some(rev) => Compare::mod_revision(key.clone(), CompareOp::Equal, rev),
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            }];
            if let Some((leader_key, create_rev)) = &guard {
                when.push(Compare::create_revision(leader_key.clone(), CompareOp::Equal, *create_rev));
            }
            if let Some(gone) = &gone {
                when.push(Compare::create_revision(gone.clone(), CompareOp::Equal, 0));
            }
            let txn = Txn::new().when(when).and_then([TxnOp::put(key.clone(), value, None)]);
            let resp = within(&op2, limit, kv.txn(txn)).await?;
            if resp.succeeded() {
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                return Ok(Ok(rev));
            }
            // Which comparison failed? Read both now (not atomic with the transaction, which
            // only matters for the revision reported: it is at least as new as the one that
            // made the write fail).
            if let Some((leader_key, create_rev)) = guard {
                let resp = within(&op2, limit, kv.get(leader_key, None)).await?;
                if resp.kvs().first().map(|kv| kv.create_revision()) != Some(create_rev) {
                    return Err(ClusterError::NotLeader { node });
                }
            }
            let resp = within(&op2, limit, kv.get(key, None)).await?;
            Ok(Err(resp.kvs().first().map(|kv| kv.mod_revision())))
        })
    }

    /// Every change to volume records, in etcd's order: first one `Changed` per existing record
    /// (a snapshot; malformed ones are logged and skipped), then each put and delete as it
    /// happens. Survives etcd restarts and compaction (it re-reads and sends what changed). The
    /// channel is unbounded (records are few and small); it closes after `stop()`.
    pub fn watch_volumes(&self) -> Result<crossbeam_channel::Receiver<VolumeEvent>, ClusterError> {
        let op = self.op("starting the volume watch");
        let (kv, keys, limit, op2) = (self.kv(), self.inner.keys.clone(), self.inner.cfg.op_timeout, op.clone());
        let (records, rev) =
            self.run(&op, async move { list_volumes(kv, &op2, &keys, limit, OnMalformed::Skip).await })?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut known = HashSet::new();
        for (record, revision) in records {
            known.insert(record.id);
            let _ = tx.send(VolumeEvent::Changed { id: record.id, record, revision });
        }
        self.inner.rt.spawn(watch::volumes(
            self.inner.client.watch_client(),
            self.kv(),
            self.op("watching volumes"),
            self.inner.keys.clone(),
            rev,
            known,
            tx,
            limit,
        ));
        Ok(rx)
    }

    /// Stops the client: background keep-alive and watches end (watch channels close), and every
    /// later call fails with `Stopped`. The lease is not revoked — etcd expires it after the TTL,
    /// as it would after a crash (`deregister` first for a graceful leave).
    pub fn stop(&self) {
        self.inner.shared.drop_lease();
        self.inner.rt.stop();
    }

    /// A compare-and-put that presents `guard` as the leadership, skipping the local checks.
    #[cfg(test)]
    pub(crate) fn put_volume_with_guard(
        &self,
        rec: &VolumeRecord,
        expected: Option<Revision>,
        guard: (String, i64),
    ) -> Result<Result<Revision, Option<Revision>>, ClusterError> {
        self.put_volume(rec, expected, Some(guard), None)
    }

    /// The election key and create revision this node leads with.
    #[cfg(test)]
    pub(crate) fn leadership(&self) -> Option<(String, i64)> {
        lock(&self.inner.shared.leader).as_ref().map(|l| (l.key.clone(), l.create_rev))
    }
}

/// What a listing does with a malformed record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnMalformed {
    /// Fail the whole read with the record's error (`volumes()`: the caller can report it).
    Fail,
    /// Skip it with a log line (watches, which cannot return an error per record).
    Skip,
}

/// All volume records at one revision, by id, and that revision.
pub(crate) async fn list_volumes(
    mut kv: KvClient,
    op: &Op,
    keys: &Keys,
    limit: Duration,
    on_malformed: OnMalformed,
) -> Result<(Vec<(VolumeRecord, Revision)>, Revision), ClusterError> {
    let resp = within(op, limit, kv.get(keys.volumes(), Some(GetOptions::new().with_prefix()))).await?;
    let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
    let mut out = Vec::new();
    for kv in resp.kvs() {
        match decode_volume(keys, kv.key(), kv.value()) {
            Ok(r) => out.push((r, kv.mod_revision())),
            Err(e) if on_malformed == OnMalformed::Fail => return Err(e),
            Err(e) => tracing::warn!("volume watch skips a record: {e}"),
        }
    }
    out.sort_by_key(|(r, _)| r.id);
    Ok((out, rev))
}

// The handle is shared by control threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Cluster>();
};
