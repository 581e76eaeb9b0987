//! The resource manager's election, on plain keys and transactions (etcd's election recipe):
//! each candidate puts `{prefix}/manager/{lease}` attached to its lease; the key with the lowest
//! create revision leads; the others wait for a deletion under the prefix and look again. A
//! leader stays leader exactly as long as its key exists — every later candidate's key has a
//! higher create revision — so comparing that key's create revision in a transaction is a
//! complete leadership check, and its lease expiring (or a resign) hands over.
//!
//! Plain keys rather than etcd's v3election service: the campaign must give up after a timeout
//! (the service's Campaign blocks until won, and its cancellation leaves the key behind), and
//! leader-only writes need the key and create revision in our own transactions anyway.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, KvClient, PutOptions, Txn, TxnOp, WatchClient, WatchOptions};

use crate::client::{within, Op, Shared};
use crate::constants::{RETRY_PAUSE_MAX, RETRY_PAUSE_MIN};
use crate::error::ClusterError;
use crate::record::check_node_id;

/// Campaigns with `lease` for at most `wait`: `Some(create_rev)` of this node's key once it
/// leads, `None` when the time ran out (the candidacy is withdrawn then).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn campaign(
    mut kv: KvClient,
    mut watch: WatchClient,
    op: &Op,
    keys: &crate::record::Keys,
    node: &str,
    lease: i64,
    wait: Duration,
    limit: Duration,
) -> Result<Option<i64>, ClusterError> {
    let deadline = tokio::time::Instant::now() + wait;
    let key = keys.candidate(lease);
    // Put-if-absent: a candidacy this lease already has keeps its place in line.
    let txn = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key.clone(),
        node,
        Some(PutOptions::new().with_lease(lease)),
    )]);
    within(op, limit, kv.txn(txn)).await?;
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        let resp = within(op, limit, kv.get(keys.manager(), Some(GetOptions::new().with_prefix()))).await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        let Some(mine) = resp.kvs().iter().find(|kv| kv.key() == key.as_bytes()) else {
            // Our key is gone: the lease expired (or someone deleted it).
            return Err(ClusterError::LeaseLost { node: node.to_string() });
        };
        let my_rev = mine.create_revision();
        if resp.kvs().iter().all(|kv| kv.create_revision() >= my_rev) {
            return Ok(Some(my_rev));
        }
        // Wait for a deletion under the prefix after `rev` (the predecessor leaving), or the
        // deadline.
        let waited = tokio::time::timeout_at(deadline, async {
            let opts = WatchOptions::new().with_prefix().with_start_revision(rev + 1);
            let mut stream = match within(op, limit, watch.watch(keys.manager(), Some(opts))).await {
                Ok(s) => s,
                Err(_) => return,
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() || resp.events().iter().any(|e| e.kv().is_some_and(|kv| kv.version() == 0)) {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        })
        .await;
        if waited.is_err() {
            withdraw(&mut kv, op, &key, my_rev, limit).await;
            return Ok(None);
        }
        // A broken watch returns at once: do not spin on an etcd that is down.
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
        pause = (pause * 2).min(RETRY_PAUSE_MAX);
    }
}

async fn withdraw(kv: &mut KvClient, op: &Op, key: &str, create_rev: i64, limit: Duration) {
    let txn = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, create_rev)])
        .and_then([TxnOp::delete(key, None)]);
    if let Err(e) = within(op, limit, kv.txn(txn)).await {
        // The key stays until the lease ends; campaigning again picks it up.
        tracing::warn!("withdrawing the manager candidacy failed: {e}");
    }
}

/// The node id of the current leader.
pub(crate) async fn leader(
    mut kv: KvClient,
    op: &Op,
    keys: &crate::record::Keys,
    limit: Duration,
) -> Result<Option<String>, ClusterError> {
    let resp = within(op, limit, kv.get(keys.manager(), Some(GetOptions::new().with_prefix()))).await?;
    let Some(first) = resp.kvs().iter().min_by_key(|kv| kv.create_revision()) else { return Ok(None) };
    let node = std::str::from_utf8(first.value()).map_err(|_| Op::malformed(first.key(), "not UTF-8"))?;
    check_node_id(node).map_err(|e| Op::malformed(first.key(), e))?;
    Ok(Some(node.to_string()))
}

/// Watches this node's election key while it leads; clears the leadership when the key is
/// deleted (resign elsewhere, lease expiry, an operator). Ends when the leadership ends.
pub(crate) async fn watch_leadership(
    mut watch: WatchClient,
    mut kv: KvClient,
    op: Op,
    key: String,
    create_rev: i64,
    shared: Arc<Shared>,
) {
    let limit = shared.ttl();
    let mut from = create_rev + 1;
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        let opts = WatchOptions::new().with_start_revision(from);
        if let Ok(mut stream) = within(&op, limit, watch.watch(key.clone(), Some(opts))).await {
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if !resp.canceled() => {
                        for e in resp.events() {
                            if let Some(kv) = e.kv() {
                                if kv.version() == 0 {
                                    shared.clear_leader(&key, create_rev);
                                    return;
                                }
                                from = kv.mod_revision() + 1;
                            }
                        }
                        pause = RETRY_PAUSE_MIN;
                    }
                    // Ended, failed, or compacted past `from`: check the key itself below.
                    _ => break,
                }
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_PAUSE_MAX);
        if let Ok(resp) = within(&op, limit, kv.get(key.clone(), None)).await {
            if resp.kvs().first().map(|kv| kv.create_revision()) != Some(create_rev) {
                shared.clear_leader(&key, create_rev);
                return;
            }
            from = resp.header().map(|h| h.revision()).unwrap_or(from - 1) + 1;
        }
    }
}
