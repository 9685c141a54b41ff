//! Hinted handoff: writes held for a replica that was unreachable, and their delivery.
//!
//! While a key's preferred replica is down, a balancer sends its writes to the next healthy
//! node on the ring with a hint naming the owner (Dynamo §4.6). Such a node keeps them apart
//! from its own data, in the engine's `Hints` tree, so they never count as its keys and never
//! mix with a copy it replicates itself. A worker scans the hints periodically and offers each
//! one to its owner as an ordinary merge; once the owner has it, the hint is dropped, unless
//! a newer write for the same key arrived meanwhile, which then goes on the next round.
//!
//! The hint carries the owner's address as the balancer knows it, so handoff works without
//! `-s` peers.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use std::collections::BTreeMap;

use crate::rpc::batch;
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::messages::{MergeRequest, Op, OpReply};
use crate::storage::{self, Tree};
use crate::version::Siblings;

use super::StorageNode;

/// How often the worker looks for hints to hand off.
pub const HANDOFF_INTERVAL: Duration = Duration::from_millis(500);
/// How long the owner may take to accept one hint.
const HANDOFF_TIMEOUT: Duration = Duration::from_secs(2);
/// Hints read per page, and handed off concurrently.
const HANDOFF_BATCH: usize = 64;

/// One hint as stored: the owner and key travel in the value, so the storage key may be a
/// digest when the two together are too long to be a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HintRecord {
    pub owner: String,
    pub key: String,
    pub siblings: Siblings,
}

/// The storage key of the hint for `key` held for `owner`: `owner \0 key`, grouping hints by
/// owner; when that is too long for the engine, `owner \1 md5(key)`, and the record's own
/// key field tells the rare digest collision apart (the node refuses such a write).
pub fn slot(owner: &str, key: &str) -> Vec<u8> {
    let mut slot = Vec::with_capacity(owner.len() + 1 + key.len().min(16));
    slot.extend_from_slice(owner.as_bytes());
    if owner.len() + 1 + key.len() <= storage::MAX_KEY_BYTES {
        slot.push(0);
        slot.extend_from_slice(key.as_bytes());
    } else {
        slot.push(1);
        slot.extend_from_slice(&md5::compute(key.as_bytes()).0);
    }
    slot
}

/// Hands hints to their owners until the task is dropped.
impl StorageNode {
    /// The hints this node holds for `key`, by owner (a scan of every hint: for `explain`).
    pub fn hints_for(&self, key: &str) -> crate::error::Result<Vec<(String, Siblings)>> {
        let mut found = Vec::new();
        storage::for_each(&*self.engine, Tree::Hints, |_, bytes| {
            if let Ok(record) = postcard::from_bytes::<HintRecord>(bytes)
                && record.key == key
            {
                found.push((record.owner, record.siblings));
            }
        })?;
        Ok(found)
    }
}

pub async fn handoff_periodically(node: Arc<StorageNode>, client: RpcClient) {
    let mut ticks = tokio::time::interval(HANDOFF_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        handoff_round(&node, &client).await;
    }
}

/// One pass over every hint; owners that fail are skipped for the rest of the pass.
pub async fn handoff_round(node: &Arc<StorageNode>, client: &RpcClient) -> usize {
    let mut delivered = 0;
    let mut corrupt = 0;
    let mut unreachable: Vec<String> = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = match node
            .engine()
            .scan(Tree::Hints, after.as_deref(), HANDOFF_BATCH)
        {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, "cannot read hints");
                return delivered;
            }
        };
        let full_page = page.len() == HANDOFF_BATCH;
        after = page.last().map(|(slot, _)| slot.clone());
        // Hints are stored grouped by owner: each owner gets its page's hints in one batch,
        // on the same endpoint balancers use.
        // Where each hint goes: its owner, or, for an owner that is no member of any live
        // layout version any more (removed while it was down), the key's replicas in the
        // newest version, every one of them before the hint goes.
        let routing = node.membership.routing();
        let members = routing.as_ref().map(|r| r.all_servers());
        let mut records: Vec<HintRecord> = Vec::new();
        let mut by_target: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut needed: Vec<usize> = Vec::new();
        for (_, bytes) in page {
            let record = match postcard::from_bytes::<HintRecord>(&bytes) {
                Ok(record) => record,
                Err(_) => {
                    corrupt += 1;
                    continue;
                }
            };
            let owner_left = members
                .as_ref()
                .is_some_and(|members| !members.contains(&record.owner));
            let targets = match (&routing, owner_left) {
                (Some(routing), true) => {
                    let replicas = routing.current_replicas(record.key.as_bytes());
                    let me = &node.membership.me;
                    if replicas.contains(me)
                        && let Err(error) = node.merge_own_many(vec![(
                            record.key.clone(),
                            crate::rpc::messages::HeldCopy::unreaped(record.siblings.clone()),
                        )])
                    {
                        tracing::warn!(%error, "cannot keep a hint whose owner left");
                        continue;
                    }
                    replicas.into_iter().filter(|t| t != me).collect()
                }
                _ => vec![record.owner.clone()],
            };
            // A hint goes only once every one of its targets took it: one unreachable this
            // round keeps it for the next.
            if targets.iter().any(|t| unreachable.contains(t)) {
                continue;
            }
            if targets.is_empty() {
                if owner_left {
                    // This node is the key's only replica now: merged above.
                    match node.drop_delivered_hint(&record) {
                        Ok(true) => delivered += 1,
                        Ok(false) => {}
                        Err(error) => tracing::error!(%error, "cannot drop a delivered hint"),
                    }
                }
                continue;
            }
            let index = records.len();
            needed.push(targets.len());
            for target in targets {
                by_target.entry(target).or_default().push(index);
            }
            records.push(record);
        }
        let records = Arc::new(records);
        let mut accepted = vec![0usize; records.len()];
        let mut deliveries = JoinSet::new();
        for (target, indexes) in by_target {
            let client = client.clone();
            let records = records.clone();
            deliveries.spawn(async move {
                let batch: Vec<HintRecord> = indexes.iter().map(|&i| records[i].clone()).collect();
                let outcome = deliver(&client, &target, &batch).await;
                (target, indexes, outcome)
            });
        }
        while let Some(joined) = deliveries.join_next().await {
            let (target, indexes, outcome) = match joined {
                Ok(delivery) => delivery,
                Err(error) => {
                    tracing::error!(%error, "a hint delivery task failed");
                    continue;
                }
            };
            match outcome {
                Ok(replies) => {
                    for (&index, reply) in indexes.iter().zip(replies) {
                        if matches!(reply, OpReply::Merged) {
                            accepted[index] += 1;
                        } else {
                            tracing::warn!(target, ?reply, "a replica refused a hint");
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(target, %error, "hint owner unreachable");
                    unreachable.push(target);
                }
            }
        }
        for (index, record) in records.iter().enumerate() {
            if accepted[index] < needed[index] {
                continue;
            }
            match node.drop_delivered_hint(record) {
                Ok(true) => delivered += 1,
                Ok(false) => {}
                Err(error) => tracing::error!(%error, "cannot drop a delivered hint"),
            }
        }
        if !full_page {
            break;
        }
    }
    if delivered > 0 {
        node.metrics
            .hints_handed_off
            .add(u64::try_from(delivered).unwrap_or(0));
        tracing::info!(delivered, "handed hints over to their owners");
    }
    note_corrupt_hints(node, corrupt);
    delivered
}

/// Hints that cannot be decoded (damaged on disk, or written by an incompatible version) can
/// never be delivered. They are left in place for an operator to look at, since the write
/// they hold may have no other copy, and counted in `dynamite_node_hints_corrupt`. The log
/// says so when the count changes, not on every pass (one pass every
/// [`HANDOFF_INTERVAL`]).
fn note_corrupt_hints(node: &StorageNode, corrupt: i64) {
    let before = node.corrupt_hints.swap(corrupt, Ordering::Relaxed);
    if corrupt != before && corrupt > 0 {
        tracing::error!(
            corrupt,
            "hints that cannot be decoded are left in place and not handed over"
        );
    }
}

/// Sends `records` to their owner as one batch of merges; the owner's answer to each.
async fn deliver(
    client: &RpcClient,
    owner: &str,
    records: &[HintRecord],
) -> Result<Vec<OpReply>, CallError> {
    let ops: Vec<Op> = records
        .iter()
        .map(|record| {
            let (key, siblings) = (record.key.clone(), record.siblings.clone());
            Op::Merge(MergeRequest {
                key,
                siblings,
                hint_for: None,
            })
        })
        .collect();
    let deadline_us = crate::clock::now_us().saturating_add(crate::clock::micros(HANDOFF_TIMEOUT));
    let ops: Vec<(&Op, u64)> = ops.iter().map(|op| (op, deadline_us)).collect();
    batch::send_batch(client, owner, &ops, HANDOFF_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_group_by_owner_and_stay_within_the_engine_limit() {
        let short = slot("127.0.0.1:1", "key");
        assert!(short.starts_with(b"127.0.0.1:1\0"));
        let long_key = "k".repeat(storage::MAX_KEY_BYTES);
        let long = slot("127.0.0.1:1", &long_key);
        assert!(long.len() <= storage::MAX_KEY_BYTES);
        assert!(long.starts_with(b"127.0.0.1:1\x01"));
        assert_ne!(slot("a:1", "k"), slot("a:2", "k"));
    }
}
