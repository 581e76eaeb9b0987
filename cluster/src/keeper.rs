//! The keep-alive task of one lease: a keep-alive request every `ttl / KEEPALIVE_PER_TTL`, one
//! at a time, each answer reported to `Shared` with the send time of its request (`lease.rs`
//! says why that time). A request unanswered within the interval drops the stream (its answer
//! could otherwise arrive late and be matched to the wrong request) and the next tick opens a
//! new one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::LeaseClient;

use crate::client::{Op, Shared};
use crate::lease::keepalive_interval;

pub(crate) async fn keep_alive(mut lc: LeaseClient, shared: Arc<Shared>, op: Op, id: i64, granted: Duration) {
    let interval = keepalive_interval(shared.ttl().min(granted));
    let mut stream = None;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(interval).await;
        if !shared.holds_lease(id) {
            return;
        }
        shared.check_lost(id);
        let sent_at = Instant::now();
        let answer: Result<Option<i64>, String> = match stream.as_mut() {
            None => match tokio::time::timeout(interval, lc.keep_alive(id)).await {
                // Opening the stream sends the first request and waits for its answer; the
                // crate keeps that answer's TTL, and fails when it is 0 (below).
                Ok(Ok(s)) => {
                    stream = Some(s);
                    Ok(Some(granted.as_secs() as i64))
                }
                // etcd-client's words for a keep-alive answered with TTL 0: the lease does not
                // exist (any more).
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m.contains("not found") => Ok(None),
                Ok(Err(e)) => Err(op.fail(e).to_string()),
                Err(_) => Err(format!("no answer within {} ms", interval.as_millis())),
            },
            Some((keeper, responses)) => {
                let exchange = async {
                    keeper.keep_alive().await?;
                    responses.message().await
                };
                match tokio::time::timeout(interval, exchange).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some(resp.ttl())),
                    Ok(Ok(Some(_))) => Ok(None),
                    Ok(Ok(None)) => Err("the keep-alive stream ended".to_string()),
                    Ok(Err(e)) => Err(op.fail(e).to_string()),
                    Err(_) => Err(format!("no answer within {} ms", interval.as_millis())),
                }
            }
        };
        match answer {
            Ok(Some(ttl)) => {
                failures = 0;
                shared.renewed(id, sent_at, Duration::from_secs(u64::try_from(ttl).unwrap_or(0)));
            }
            Ok(None) => {
                shared.lease_gone(id);
                return;
            }
            Err(why) => {
                stream = None;
                failures += 1;
                // The first failure of a run, then every tenth: enough to see it in the log.
                if failures % 10 == 1 {
                    tracing::warn!(lease = format!("{id:x}"), failures, "cluster lease keep-alive failed: {why}");
                }
            }
        }
        shared.check_lost(id);
    }
}
