//! The volume watch task: etcd's watch on `{prefix}/volumes/` turned into [`VolumeEvent`]s on a
//! channel, in revision order, with no gap and no repeat across reconnects.
//!
//! It resumes a broken watch from the revision after the last event it delivered. If etcd
//! compacted that revision away, it lists the records again and sends what differs from what it
//! delivered: a `Changed` for each record modified since, a `Deleted` for each that vanished.

use std::collections::HashSet;
use std::time::Duration;

use crossbeam_channel::Sender;
use etcd_client::{KvClient, WatchClient, WatchOptions};

use crate::client::{list_volumes, within, OnMalformed, Op};
use crate::constants::{RETRY_PAUSE_MAX, RETRY_PAUSE_MIN};
use crate::record::{decode_volume, Keys};
use crate::{Revision, VolumeEvent};

#[allow(clippy::too_many_arguments)]
pub(crate) async fn volumes(
    mut watch: WatchClient,
    kv: KvClient,
    op: Op,
    keys: Keys,
    listed_at: Revision,
    mut known: HashSet<u32>,
    tx: Sender<VolumeEvent>,
    limit: Duration,
) {
    let mut next = listed_at + 1;
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        let opts = WatchOptions::new().with_prefix().with_start_revision(next);
        let mut compacted = false;
        match within(&op, limit, watch.watch(keys.volumes(), Some(opts))).await {
            Ok(mut stream) => loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            compacted = resp.compact_revision() > 0;
                            if !compacted {
                                tracing::warn!("volume watch canceled by etcd: {}", resp.cancel_reason());
                            }
                            break;
                        }
                        for e in resp.events() {
                            let Some(kv) = e.kv() else { continue };
                            next = next.max(kv.mod_revision() + 1);
                            let Some(id) = std::str::from_utf8(kv.key()).ok().and_then(|k| keys.volume_id(k)) else {
                                tracing::warn!("volume watch skips key {}", String::from_utf8_lossy(kv.key()));
                                continue;
                            };
                            let event = if kv.version() == 0 {
                                if !known.remove(&id) {
                                    continue;
                                }
                                VolumeEvent::Deleted { id }
                            } else {
                                match decode_volume(&keys, kv.key(), kv.value()) {
                                    Ok(record) => {
                                        known.insert(id);
                                        VolumeEvent::Changed { id, record, revision: kv.mod_revision() }
                                    }
                                    Err(e) => {
                                        tracing::warn!("volume watch skips a record: {e}");
                                        continue;
                                    }
                                }
                            };
                            if tx.send(event).is_err() {
                                return; // nobody listens any more
                            }
                        }
                        pause = RETRY_PAUSE_MIN;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!("volume watch broke, resuming from revision {next}: {}", op.fail(e));
                        break;
                    }
                }
            },
            Err(e) => tracing::warn!("volume watch cannot start, retrying: {e}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_PAUSE_MAX);
        if compacted {
            match list_volumes(kv.clone(), &op, &keys, limit, OnMalformed::Skip).await {
                Ok((records, rev)) => {
                    let present: HashSet<u32> = records.iter().map(|(r, _)| r.id).collect();
                    let mut gone: Vec<u32> = known.difference(&present).copied().collect();
                    gone.sort_unstable();
                    for id in gone {
                        if tx.send(VolumeEvent::Deleted { id }).is_err() {
                            return;
                        }
                    }
                    for (record, revision) in records {
                        if revision >= next || !known.contains(&record.id) {
                            let id = record.id;
                            if tx.send(VolumeEvent::Changed { id, record, revision }).is_err() {
                                return;
                            }
                        }
                    }
                    known = present;
                    next = rev + 1;
                }
                Err(e) => tracing::warn!("volume watch cannot re-read after compaction, retrying: {e}"),
            }
        }
    }
}
