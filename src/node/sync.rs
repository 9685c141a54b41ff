//! Receiving partitions during a transition: a node pulls each partition the newest layout
//! version gives it, from every holder of that partition in the older live versions, by range
//! scans of their partition-ordered data, and merges what comes by vector clock.
//!
//! It starts only once every router acknowledged the newest version (`ack_min`): from then
//! on every write reaches this node directly, so what the pull misses can only be newer than
//! it and is here already. It pulls from every old holder, not one, because a write
//! acknowledged by W of them may be missing on the others; but only the first sends its
//! values: the others send each key's entry hash (16 bytes), and only the keys whose hash
//! differs from what this node now holds are fetched, so the bytes moved stay near one copy
//! of the partition. A holder that cannot be reached
//! is retried (logged, counted in `cluster.status()` as partitions still syncing), unless it
//! has been removed from the newest version: a dead node is taken out with a new version,
//! and then its partitions come from the copies that survive. Once every partition is in, the
//! node says so (`sync` tracker), and reads move to the new version when every member has.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::membership::history::History;
use crate::merkle::{self, EntryHash};
use crate::rpc::messages;
use crate::rpc::messages::HeldCopy;
use crate::storage::Tree;
use crate::version::Siblings;

use super::StorageNode;

pub const SYNC_PAGE_METHOD: &str = "node.sync_page";

/// Entries per page, and a page's byte budget.
const PAGE_KEYS: usize = 512;
const PAGE_BYTES: usize = 4 << 20;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys fetched per call when a listing showed they differ.
const FETCH_KEYS: usize = 16;
/// Between passes while something is left.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncPageRequest {
    pub partition: u16,
    /// The engine key after which to go on; `None` from the partition's start.
    pub after: Option<Vec<u8>>,
    /// Each key's entry hash instead of its sibling set.
    pub hashes_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncPageReply {
    pub entries: Vec<(String, Siblings)>,
    pub hashes: Vec<(String, EntryHash)>,
    /// Where the next page starts; `None` when the partition is done.
    pub next: Option<Vec<u8>>,
}

/// Keys whose entry hashes a node is asked for (`node.hashes`): before a node drops keys it
/// no longer replicates, it sends only those a replica does not hold as it does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HashesRequest {
    pub keys: Vec<String>,
}

pub const HASHES_METHOD: &str = "node.hashes";

/// What this node has received for which version.
#[derive(Debug, Default)]
pub struct Progress {
    version: u64,
    done: BTreeSet<usize>,
}

impl StorageNode {
    /// A page of this node's own copies of a partition's keys, for a node receiving it.
    pub(super) fn sync_page(&self, request: &SyncPageRequest) -> Result<SyncPageReply> {
        let (start, before) = super::keys::partition_range(usize::from(request.partition));
        let after = request.after.clone().unwrap_or(start);
        let page =
            self.engine
                .scan_range(Tree::Data, Some(&after), before.as_deref(), PAGE_KEYS)?;
        let full = page.len() == PAGE_KEYS;
        // Where the next page starts when this one is sent whole (past undecodable keys too).
        let last = page.last().map(|(key, _)| key.clone());
        let mut entries = Vec::new();
        let mut hashes = Vec::new();
        let mut bytes = 0;
        let mut next = None;
        for (stored, value) in page {
            let Some(key) = super::keys::user_key(&stored) else {
                continue;
            };
            let Ok(key_text) = String::from_utf8(key.to_vec()) else {
                continue;
            };
            if request.hashes_only {
                hashes.push((key_text, merkle::entry_hash(key, &value)));
                next = Some(stored);
                continue;
            }
            let Some(siblings) = Siblings::decode(&value) else {
                continue; // undecodable: reads of it fail the same way here
            };
            bytes += value.len() + key_text.len();
            entries.push((key_text, siblings));
            next = Some(stored);
            if bytes >= PAGE_BYTES {
                break;
            }
        }
        let stopped_early = bytes >= PAGE_BYTES;
        if !stopped_early {
            next = last;
        }
        let more = full || stopped_early;
        self.metrics.sync_pages_served.inc();
        Ok(SyncPageReply {
            entries,
            hashes,
            next: if more { next } else { None },
        })
    }

    /// This node's entry hash of each key (`None` where it holds none).
    pub(super) fn hashes(&self, request: &HashesRequest) -> Result<Vec<Option<EntryHash>>> {
        request.keys.iter().map(|key| self.own_hash(key)).collect()
    }

    /// Whether this node stores any key of `partition`.
    fn holds_any_of(&self, partition: usize) -> bool {
        let (after, before) = super::keys::partition_range(partition);
        self.engine
            .scan_range(Tree::Data, Some(&after), before.as_deref(), 1)
            .is_ok_and(|page| !page.is_empty())
    }

    pub(super) fn own_hash(&self, key: &str) -> Result<Option<EntryHash>> {
        let stored = self
            .engine
            .get(Tree::Data, &super::keys::data_key(key.as_bytes()))?;
        Ok(stored.map(|bytes| merkle::entry_hash(key.as_bytes(), &bytes)))
    }
}

/// Pulls `partition` from `source` into this node: every value when `full`, else the keys
/// whose entry hash differs from this node's. The keys received.
async fn pull(
    node: &Arc<StorageNode>,
    source: &str,
    partition: usize,
    full: bool,
) -> Result<usize> {
    let client = node.membership.client().clone();
    let internal = |error: crate::rpc::client::CallError| {
        crate::error::Error::Internal(format!("{source}: {error}"))
    };
    let mut after = None;
    let mut received = 0;
    loop {
        let request = SyncPageRequest {
            partition: partition as u16,
            after,
            hashes_only: !full,
        };
        let param = messages::to_param(&request)?;
        let value = client
            .call(source, SYNC_PAGE_METHOD, vec![param], CALL_TIMEOUT)
            .await
            .map_err(internal)?;
        if full {
            node.metrics.sync_bytes_received.add(payload_len(&value));
        } else {
            node.metrics.sync_listing_bytes.add(payload_len(&value));
        }
        let reply: SyncPageReply = messages::from_value(&value)?;
        // Whole pages carry no reaps; a key read by itself below does.
        let mut entries: Vec<(String, HeldCopy)> = reply
            .entries
            .into_iter()
            .map(|(key, siblings)| (key, HeldCopy::unreaped(siblings)))
            .collect();
        if !reply.hashes.is_empty() {
            let differing: Vec<String> = {
                let node = node.clone();
                let hashes = reply.hashes;
                crate::runtime::blocking(move || {
                    hashes
                        .into_iter()
                        .filter(|(key, hash)| node.own_hash(key).ok().flatten() != Some(*hash))
                        .map(|(key, _)| key)
                        .collect()
                })
                .await
                .map_err(|e| crate::error::Error::Internal(e.to_string()))?
            };
            // Fetched a few at a time: a sibling set may be up to 64 MiB.
            for chunk in differing.chunks(FETCH_KEYS) {
                let param = messages::to_param(&crate::rpc::messages::ReadManyRequest {
                    keys: chunk.to_vec(),
                })?;
                let value = client
                    .call(
                        source,
                        crate::rpc::messages::READ_MANY,
                        vec![param],
                        CALL_TIMEOUT,
                    )
                    .await
                    .map_err(internal)?;
                node.metrics.sync_bytes_received.add(payload_len(&value));
                let sets: Vec<HeldCopy> = messages::from_value(&value)?;
                if sets.len() != chunk.len() {
                    return Err(crate::error::Error::Internal(format!(
                        "{source} answered {} sibling sets for {} keys",
                        sets.len(),
                        chunk.len()
                    )));
                }
                entries.extend(chunk.iter().cloned().zip(sets));
            }
        }
        received += entries.len();
        if !entries.is_empty() {
            let node = node.clone();
            let deadline = crate::clock::now_us() + crate::clock::micros(CALL_TIMEOUT);
            crate::runtime::blocking(move || node.merge_own_many_until(entries, deadline))
                .await
                .map_err(|e| crate::error::Error::Internal(e.to_string()))??;
        }
        match reply.next {
            Some(next) => after = Some(next),
            None => return Ok(received),
        }
    }
}

/// Bytes of an internal message (a base64 value).
pub(super) fn payload_len(value: &dxr::Value) -> u64 {
    match value {
        dxr::Value::Base64(bytes) => bytes.len() as u64,
        _ => 0,
    }
}

/// One pass: pulls what is left for the newest version; true when everything is in.
async fn pass(node: &Arc<StorageNode>, history: &History) -> bool {
    let me = node.membership.me.clone();
    let newest = history.current().number;
    if history.sync.get(&me).copied().unwrap_or(0) >= newest || !history.in_transition() {
        node.syncing.store(0, Ordering::Relaxed);
        return true;
    }
    let Some(routing) = node.membership.routing() else {
        return false;
    };
    if routing.history.versions != history.versions {
        return false; // a snapshot of these versions is on its way
    }
    let layouts: Vec<crate::layout::Layout> =
        routing.layouts.iter().map(|(_, l)| l.clone()).collect();
    drop(routing); // held for the pass, it would hold this node's acks back
    let wanted = crate::membership::history::partitions_to_receive(&layouts, &me);
    {
        let mut progress = node
            .sync_progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if progress.version != newest {
            *progress = Progress {
                version: newest,
                done: BTreeSet::new(),
            };
        }
        let left = wanted
            .iter()
            .filter(|(p, _)| !progress.done.contains(p))
            .count();
        node.syncing.store(left as i64, Ordering::Relaxed);
    }
    if history.ack_min(crate::clock::now_us()) < newest {
        return false; // a router may still write under an older version only: wait
    }
    let mut complete = true;
    // Sources that did not answer in this pass: not asked again in it. Each would cost its
    // timeout per partition it holds, and the answer would be the same: a dead node removed
    // from a cluster held its survivors for minutes, and a pass begun under a version in which
    // that node was still a member went on asking it long after the version that removed it
    // had arrived. A member's partitions wait for the next pass; a removed node's come from
    // the other copies.
    let mut silent: BTreeSet<String> = BTreeSet::new();
    let must_ask = |source: &str| {
        history.current().has(source)
            || node.membership.heard_from(source).is_some_and(|(up, _)| up)
    };
    for (partition, sources) in wanted {
        let already = node
            .sync_progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .done
            .contains(&partition);
        if already {
            continue;
        }
        let mut ok = true;
        // One holder sends the values; the others only what differs from them. A node that
        // holds some of the partition already (restarted mid-transfer) takes listings only.
        let mut have_copy = node.holds_any_of(partition);
        for source in &sources {
            if silent.contains(source) {
                ok &= !must_ask(source);
                continue;
            }
            match pull(node, source, partition, !have_copy).await {
                Ok(keys) => {
                    have_copy = true;
                    node.metrics.sync_keys_received.add(keys as u64);
                }
                Err(error) if must_ask(source) => {
                    tracing::warn!(
                        partition,
                        source,
                        %error,
                        "could not pull a partition for the new layout; retrying"
                    );
                    ok = false;
                    silent.insert(source.clone());
                }
                Err(error) => {
                    tracing::info!(
                        partition,
                        source,
                        %error,
                        "a removed node is down; its partitions come from the other copies"
                    );
                    silent.insert(source.clone());
                }
            }
        }
        if ok {
            let mut progress = node
                .sync_progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            progress.done.insert(partition);
            node.syncing.fetch_sub(1, Ordering::Relaxed);
        } else {
            complete = false;
        }
    }
    if complete {
        node.syncing.store(0, Ordering::Relaxed);
        tracing::info!(
            version = newest,
            "received every partition of the new layout"
        );
        if let Err(error) = node.membership.mark_synced(newest) {
            tracing::error!(%error, "could not keep the layout history");
        }
    }
    complete
}

/// Runs passes whenever the history changes, and again while something is left.
pub async fn sync_forever(node: Arc<StorageNode>) {
    let mut changes = node.membership.watch();
    loop {
        let done = match node.membership.history() {
            Some(history) => pass(&node, &history).await,
            None => true,
        };
        if done {
            let _ = changes.changed().await;
        } else {
            tokio::select! {
                // Either wakes the next pass; a fixed order, not tokio's coin, decides which
                // when both are ready (a simulation replays it: docs/simulation.md).
                biased;
                _ = changes.changed() => {}
                () = tokio::time::sleep(RETRY_AFTER) => {}
            }
        }
    }
}
