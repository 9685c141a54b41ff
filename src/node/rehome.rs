//! Rehoming: keys a node holds but no longer replicates are handed to their replicas, then
//! dropped.
//!
//! A node's own data should hold only keys whose partition it replicates. It can hold others
//! after the layout changed under it: its data was written under another placement (the ring
//! of virtual nodes before partitions), or the node was restarted with another set of `-s`
//! servers or another `-N`. Left alone, such keys are lost to readers: the balancers ask the
//! new replicas, which never had them, and anti-entropy only compares keys two nodes share.
//!
//! So a node with peers walks its data once at start. Every key it no longer replicates is
//! sent, as an ordinary merge, to each of the key's replicas; once *every one* of them has
//! it, the node drops its own copy, and only if the copy is still the one it sent (a write
//! that arrived meanwhile stays until the next pass). A replica that does not answer keeps
//! the key here, and the pass is tried again later, further apart each time, until nothing is
//! left to move. Nothing is dropped before all N replicas hold it, so a replica failing
//! right after costs nothing that anti-entropy cannot bring back.

use std::sync::Arc;
use std::time::Duration;

use crate::rpc::batch;
use crate::rpc::client::RpcClient;
use crate::rpc::messages::{MergeRequest, Op, OpReply};
use crate::storage::Tree;
use crate::version::{Dot, Siblings};

use super::StorageNode;

/// Keys read per page of the walk, and sent per batch to each replica.
const PAGE_KEYS: usize = 256;
/// How long a replica may take to accept a page of keys.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before the first pass (let the cluster come up), and the first wait between passes
/// that left keys behind; doubled each time, up to [`MAX_RETRY_AFTER`].
const FIRST_RETRY_AFTER: Duration = Duration::from_secs(2);
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// What a pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Keys handed to all their replicas and dropped here.
    pub moved: usize,
    /// Keys this node does not replicate that are still here (a replica did not answer, or
    /// the key changed while it was being sent).
    pub left: usize,
}

/// Passes until one leaves nothing behind, and again whenever the layout history changes
/// (a transition that ended leaves the old holders' copies to go).
pub async fn rehome_until_done(node: Arc<StorageNode>, client: RpcClient) {
    let mut changes = node.membership.watch();
    let mut wait = FIRST_RETRY_AFTER;
    loop {
        tokio::time::sleep(wait).await;
        // Taken before the pass: a layout that changes during it gets a pass of its own.
        let seen = node.membership.routing();
        let pass = rehome_pass(&node, &client).await;
        if pass.moved > 0 || pass.left > 0 {
            tracing::info!(
                moved = pass.moved,
                left = pass.left,
                "handed keys this node no longer replicates to their replicas"
            );
        }
        if pass.left == 0 {
            // Until the layouts change again (not merely the trackers), or a write stores a
            // key no live version places here.
            loop {
                tokio::select! {
                    // A fixed order, not tokio's coin (a simulation replays it).
                    biased;
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = node.strays.notified() => break,
                }
                let now = node.membership.routing();
                let same = match (&seen, &now) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    break;
                }
            }
            wait = FIRST_RETRY_AFTER;
        } else {
            wait = (wait * 2).min(MAX_RETRY_AFTER);
        }
    }
}

/// One walk over the node's data.
pub async fn rehome_pass(node: &Arc<StorageNode>, client: &RpcClient) -> Pass {
    // The layouts, copied: a pass may take long, and holding the snapshot itself would keep
    // this node from acknowledging a newer layout meanwhile.
    let Some(routing) = node.membership.routing().map(|r| View::of(&r)) else {
        return Pass::default();
    };
    let me = node.membership.me.clone();
    let routing = routing.with_me(&me);
    let mut pass = Pass::default();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let engine = node.engine.clone();
        let from = after.clone();
        let scanned =
            crate::runtime::blocking(move || engine.scan(Tree::Data, from.as_deref(), PAGE_KEYS))
                .await
                .unwrap_or_else(|error| {
                    Err(crate::storage::StorageError::Io(std::io::Error::other(
                        error.to_string(),
                    )))
                });
        let page = match scanned {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, "rehoming cannot read this node's data");
                pass.left += 1;
                return pass;
            }
        };
        let full_page = page.len() == PAGE_KEYS;
        after = page.last().map(|(key, _)| key.clone());
        let strays: Vec<(String, Siblings)> = page
            .iter()
            .filter_map(|(stored, bytes)| {
                let key = super::keys::user_key(stored)?;
                // A key stays while any live layout version places it here.
                if routing.replicates(&me, key) {
                    return None;
                }
                let key = String::from_utf8(key.to_vec()).ok()?;
                Some((key, Siblings::decode(bytes)?))
            })
            .collect();
        if !strays.is_empty() {
            let page_pass = hand_over(node, client, &routing, strays).await;
            pass.moved += page_pass.moved;
            pass.left += page_pass.left;
        }
        node.metrics.rehome_left.store(
            i64::try_from(pass.left).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        if !full_page {
            return pass;
        }
    }
}

/// What a pass needs of the layouts, copied out of the snapshot.
struct View {
    /// Every live version's layout.
    layouts: Vec<crate::layout::Layout>,
    /// Whether this node is a member of some live version.
    member: bool,
}

impl View {
    fn of(routing: &crate::membership::Routing) -> View {
        View {
            layouts: routing.layouts.iter().map(|(_, l)| l.clone()).collect(),
            member: false,
        }
    }

    fn with_me(mut self, me: &str) -> View {
        self.member = self
            .layouts
            .iter()
            .any(|l| l.servers().iter().any(|s| s == me));
        self
    }

    /// Whether `address` replicates `key` in some live version.
    fn replicates(&self, address: &str, key: &[u8]) -> bool {
        self.layouts.iter().any(|layout| {
            layout
                .preference_list(key, layout.replicas())
                .into_iter()
                .any(|s| layout.servers()[s] == address)
        })
    }

    /// `key`'s replicas in the newest version.
    fn current_replicas(&self, key: &[u8]) -> Vec<String> {
        let Some(layout) = self.layouts.last() else {
            return Vec::new();
        };
        layout
            .preference_list(key, layout.replicas())
            .into_iter()
            .map(|s| layout.servers()[s].clone())
            .collect()
    }
}

/// The replica's entry hash of each stray it is asked about, by index; `None` when it did
/// not answer (then everything is sent).
async fn replica_hashes(
    node: &StorageNode,
    client: &RpcClient,
    address: &str,
    strays: &[(String, Siblings)],
    indexes: &[usize],
) -> Option<std::collections::HashMap<usize, Option<crate::merkle::EntryHash>>> {
    let request = super::sync::HashesRequest {
        keys: indexes.iter().map(|&i| strays[i].0.clone()).collect(),
    };
    let param = crate::rpc::messages::to_param(&request).ok()?;
    node.metrics
        .rehome_bytes_sent
        .add(super::sync::payload_len(&param));
    let value = client
        .call(
            address,
            super::sync::HASHES_METHOD,
            vec![param],
            SEND_TIMEOUT,
        )
        .await
        .ok()?;
    node.metrics
        .rehome_bytes_sent
        .add(super::sync::payload_len(&value));
    let hashes: Vec<Option<crate::merkle::EntryHash>> =
        crate::rpc::messages::from_value(&value).ok()?;
    (hashes.len() == indexes.len()).then(|| indexes.iter().copied().zip(hashes).collect())
}

/// Sends `strays` to each of their replicas, then drops the ones every replica took.
async fn hand_over(
    node: &Arc<StorageNode>,
    client: &RpcClient,
    routing: &View,
    strays: Vec<(String, Siblings)>,
) -> Pass {
    if !routing.member && !node.membership.was_member_while_running() {
        // Removed while it was down: see `Membership::was_member_while_running`.
        let mut pass = Pass::default();
        for (key, siblings) in strays {
            let dots: Vec<Dot> = siblings.dots().collect();
            if node.drop_if_unchanged(&key, &dots).unwrap_or(false) {
                pass.moved += 1;
            } else {
                pass.left += 1;
            }
        }
        node.metrics.rehomed.add(pass.moved as u64);
        return pass;
    }
    // Per replica address, the indexes of the strays it must take.
    let mut by_replica: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (index, (key, _)) in strays.iter().enumerate() {
        for replica in routing.current_replicas(key.as_bytes()) {
            by_replica.entry(replica).or_default().push(index);
        }
    }
    let mut taken = vec![0usize; strays.len()];
    let mut replicas_of = vec![0usize; strays.len()];
    for indexes in by_replica.values() {
        for &index in indexes {
            replicas_of[index] += 1;
        }
    }
    let deadline_us = crate::clock::now_us().saturating_add(crate::clock::micros(SEND_TIMEOUT));
    let ours: Vec<crate::merkle::EntryHash> = strays
        .iter()
        .map(|(key, siblings)| crate::merkle::entry_hash(key.as_bytes(), &siblings.encode()))
        .collect();
    for (address, indexes) in by_replica {
        // What the replica holds as this node does needs no sending: after a transition,
        // that is nearly everything (the replica pulled it).
        let theirs = replica_hashes(node, client, &address, &strays, &indexes).await;
        let indexes: Vec<usize> = indexes
            .into_iter()
            .filter(|&index| {
                let same = theirs
                    .as_ref()
                    .is_some_and(|theirs| theirs.get(&index) == Some(&Some(ours[index])));
                if same {
                    taken[index] += 1;
                }
                !same
            })
            .collect();
        if indexes.is_empty() {
            continue;
        }
        let bytes: u64 = indexes
            .iter()
            .map(|&index| (strays[index].0.len() + strays[index].1.value_bytes()) as u64)
            .sum();
        node.metrics.rehome_bytes_sent.add(bytes);
        let ops: Vec<Op> = indexes
            .iter()
            .map(|&index| {
                let (key, siblings) = &strays[index];
                Op::Merge(MergeRequest {
                    key: key.clone(),
                    siblings: siblings.clone(),
                    hint_for: None,
                })
            })
            .collect();
        let sent: Vec<(&Op, u64)> = ops.iter().map(|op| (op, deadline_us)).collect();
        match batch::send_batch(client, &address, &sent, SEND_TIMEOUT).await {
            Ok(replies) => {
                for (&index, reply) in indexes.iter().zip(replies) {
                    if reply == OpReply::Merged {
                        taken[index] += 1;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(replica = address, %error, "a replica did not take rehomed keys");
            }
        }
    }
    let mut pass = Pass::default();
    for (index, (key, siblings)) in strays.into_iter().enumerate() {
        let everyone = replicas_of[index] > 0 && taken[index] == replicas_of[index];
        let dropped = everyone
            && node
                .drop_if_unchanged(&key, &siblings.dots().collect::<Vec<Dot>>())
                .unwrap_or(false);
        if dropped {
            pass.moved += 1;
        } else {
            pass.left += 1;
        }
    }
    node.metrics.rehomed.add(pass.moved as u64);
    pass
}
