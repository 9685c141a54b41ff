//! Anti-entropy: replicas converge in the background, without client reads.
//!
//! Read repair mends what is read and hinted handoff mends short outages; anything else that
//! drifts (a hint lost with its holder, a wiped disk, a node down for days) is found here, as
//! in Dynamo §4.7. A node with `-s` peers builds the same layout the balancers build (the
//! peers and itself, `-N`), so it knows, for every key it stores, which peers replicate
//! it too. For each peer it keeps a [`merkle::Tree`] over exactly the keys the two share,
//! updated in place on every write, and periodically compares it with the peer's tree for it,
//! top down: one hash when in sync, and only the differing leaves' key lists otherwise. Keys
//! that differ are pushed to and pulled from the peer in batches and merged by vector clock
//! on each side (tombstones included, so a delete is never undone), so one exchange repairs
//! both replicas.
//!
//! Both ends check that they share a layout (its fingerprint, still called `ring` on the wire
//! and in `stats()`): an exchange between nodes configured with different layouts is refused
//! with a clear error rather than "repairing" keys into the wrong
//! places. The cost per round is bounded by `--aae-max-keys`.
//!
//! The trees live in memory (16 bytes × 4369 nodes per peer) and are rebuilt from a scan of
//! the data when the node starts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dxr::Value;

use crate::config::NodeRing;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::merkle::{self, EntryHash, LEAVES, LEVELS};
use crate::rpc::client::RpcClient;
use crate::rpc::messages::{
    self, AaeQuery, AaeReply, AaeRequest, MergeManyRequest, ReadManyRequest,
};
use crate::telemetry::Counter;
use crate::version::Siblings;

use super::StorageNode;

/// Keys per push or pull batch.
const BATCH_KEYS: usize = 256;
/// How long a peer may take to answer one push or pull of a batch of keys (values and
/// all).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a peer may take to answer a question about its tree (a few hashes, or the keys
/// of some leaves, within `--aae-max-keys`): one that has not answered by then is down or
/// cut off, and the exchange ends until the next round.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct AaeMetrics {
    /// Exchanges started.
    pub rounds: Counter,
    /// Exchanges that found the two trees equal.
    pub in_sync: Counter,
    pub keys_pushed: Counter,
    pub keys_pulled: Counter,
    /// Payload bytes sent and received by exchanges this node started.
    pub bytes: Counter,
    pub failures: Counter,
    /// Keys read from storage to list the keys of differing leaves: what exchanges cost in
    /// reads, which follows the leaves that differ, not what the node stores.
    pub keys_scanned: Counter,
    /// Differing keys left to a later round because a version was too recent to tell a
    /// write in flight from a replica that missed it.
    pub keys_unsettled: Counter,
}

/// A key as an exchange lists it: the key, its entry hash, and when its newest version
/// entered the cluster (microseconds).
type Listed = (String, EntryHash, u64);

/// Listed keys, by leaf.
type ListedByLeaf = BTreeMap<usize, Vec<Listed>>;

/// How old a differing key's newest version must be before an exchange repairs it: a write
/// still on its way to its replicas makes their trees differ for a moment, and "repairing"
/// it would only send it twice. Its copies leave the balancer within its replica timeout
/// (1 s by default).
const SETTLE: Duration = Duration::from_secs(2);

/// What one exchange did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    pub pushed: usize,
    pub pulled: usize,
}

pub struct AntiEntropy {
    layout: Layout,
    me: usize,
    me_address: String,
    replicas: usize,
    /// The layout's fingerprint (with N): what two daemons must agree on.
    fingerprint: String,
    /// Per partition, the peers that replicate it with this node (none where this node is
    /// not a replica): looked up on every write, so computed once.
    sharing: Vec<Vec<usize>>,
    /// One tree per server this node shares a partition with (none for itself and for
    /// servers it shares nothing with: a tree is 1.1 MB).
    trees: Vec<Option<Mutex<merkle::Tree>>>,
    /// Per peer: has a ring mismatch already been reported? (Once is clear enough.)
    mismatch_reported: Vec<AtomicBool>,
    pub interval: Duration,
    max_keys: usize,
    pub metrics: std::sync::Arc<AaeMetrics>,
    /// The walk that fills the trees from what is stored, while the node serves: built for
    /// one layout, the trees are built anew (and filled again) when the layout changes.
    pub(super) filled: super::census::Census,
}

impl AntiEntropy {
    pub fn new(config: &NodeRing, interval: Duration, max_keys: usize) -> Result<Self> {
        let layout = Layout::new(&config.servers, config.replicas);
        Self::from_layout(layout, &config.me, interval, max_keys, Default::default())
    }

    /// Anti-entropy for `me` over `layout`.
    pub fn from_layout(
        layout: Layout,
        me_address: &str,
        interval: Duration,
        max_keys: usize,
        metrics: std::sync::Arc<AaeMetrics>,
    ) -> Result<Self> {
        let replicas = layout.replicas();
        let me = layout
            .servers()
            .iter()
            .position(|server| server == me_address)
            .ok_or_else(|| Error::Internal("this node is missing from its own layout".into()))?;
        let servers = layout.servers().len();
        let sharing: Vec<Vec<usize>> = (0..crate::layout::PARTITIONS)
            .map(|partition| {
                let replicas: Vec<usize> =
                    layout.partition_walk(partition).take(replicas).collect();
                if !replicas.contains(&me) {
                    return Vec::new();
                }
                replicas
                    .into_iter()
                    .filter(|&server| server != me)
                    .collect()
            })
            .collect();
        let mut shares = vec![false; servers];
        for &peer in sharing.iter().flatten() {
            shares[peer] = true;
        }
        Ok(AntiEntropy {
            sharing,
            fingerprint: layout.fingerprint(),
            layout,
            me,
            me_address: me_address.to_owned(),
            replicas,
            trees: shares
                .iter()
                .map(|&shared| shared.then(|| Mutex::new(merkle::Tree::new())))
                .collect(),
            mismatch_reported: (0..servers).map(|_| AtomicBool::new(false)).collect(),
            interval,
            max_keys,
            metrics,
            filled: super::census::Census::pending(),
        })
    }

    /// Fills the trees from what `engine` stores, a page at a time, while commits go on
    /// (they update the trees themselves for keys the walk passed).
    pub fn fill(&self, engine: &dyn crate::storage::Engine) -> Result<()> {
        while !self.fill_step(engine)? {}
        Ok(())
    }

    /// One page of [`Self::fill`]; true when the trees are full.
    pub fn fill_step(&self, engine: &dyn crate::storage::Engine) -> Result<bool> {
        self.filled
            .step_with(engine, |key, bytes| self.record(key, None, Some(bytes)))
    }

    pub fn is_filled(&self) -> bool {
        self.filled.is_done()
    }

    /// What this node and any balancer or peer must agree on; shown in `stats()`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether this node is one of `key`'s replicas in the layout.
    pub fn replicates(&self, key: &[u8]) -> bool {
        self.layout
            .preference_list(key, self.replicas)
            .contains(&self.me)
    }

    /// The addresses of `key`'s replicas in the layout.
    pub fn replica_addresses(&self, key: &[u8]) -> Vec<String> {
        self.layout
            .preference_list(key, self.replicas)
            .into_iter()
            .map(|server| self.layout.servers()[server].clone())
            .collect()
    }

    /// Updates the trees for a key whose stored bytes changed from `old` to `new`.
    pub fn record(&self, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let digest = md5::compute(key).0;
        let peers = &self.sharing[usize::from(digest[0])]; // the key's partition
        if peers.is_empty() {
            return;
        }
        let bucket = merkle::bucket_of_digest(&digest);
        let old = old.map(|bytes| merkle::entry_hash(key, bytes));
        let new = new.map(|bytes| merkle::entry_hash(key, bytes));
        for &peer in peers {
            if let Some(tree) = &self.trees[peer] {
                let mut tree = tree
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tree.update(bucket, old, new);
            }
        }
    }

    /// Reads the tree kept for `peer` under its lock (a tree is 1.1 MB: never copied).
    /// A server this node shares nothing with has the empty tree.
    fn with_tree<T>(&self, peer: usize, read: impl FnOnce(&merkle::Tree) -> T) -> T {
        match &self.trees[peer] {
            Some(tree) => read(
                &tree
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            ),
            None => read(&merkle::Tree::new()),
        }
    }

    /// The root of the tree kept for `peer` (tests compare trees built in different ways).
    #[cfg(test)]
    pub fn root(&self, peer: usize) -> merkle::EntryHash {
        self.with_tree(peer, merkle::Tree::root)
    }

    /// What an exchange's two sides must agree on: the layout, N, and the trees' shape.
    fn agreement(&self) -> String {
        format!(
            "{} leaves={LEAVES} hash={}",
            self.fingerprint,
            merkle::ENTRY_HASH
        )
    }

    /// Answers a peer's question about the tree kept for it.
    pub fn answer(&self, node: &StorageNode, request: AaeRequest) -> Result<AaeReply> {
        if !self.is_filled() {
            return Err(Error::Internal(
                "this node is still filling its anti-entropy trees (after its start or a \
                 layout change); they are not complete yet"
                    .into(),
            ));
        }
        if request.ring != self.agreement() {
            return Err(Error::invalid(format!(
                "ring mismatch: this node has layout {}, the asking node {} (check -s and -N, \
                 and that both run the same version)",
                self.agreement(),
                request.ring
            )));
        }
        let peer = self
            .layout
            .servers()
            .iter()
            .position(|server| *server == request.from)
            .filter(|&peer| peer != self.me)
            .ok_or_else(|| Error::invalid("the asking node is not a peer in this layout"))?;
        match request.query {
            AaeQuery::Root => Ok(AaeReply::Root(self.with_tree(peer, merkle::Tree::root))),
            AaeQuery::Children { level, parents } => {
                if parents.len() > LEAVES {
                    return Err(Error::invalid("too many tree nodes asked for"));
                }
                Ok(AaeReply::Children(
                    self.with_tree(peer, |tree| tree.children(level, &parents)),
                ))
            }
            AaeQuery::Keys { leaves } => {
                let leaves: BTreeSet<usize> = leaves.into_iter().filter(|&l| l < LEAVES).collect();
                let (listed, complete) = self.list_keys(node, peer, &leaves, self.max_keys)?;
                let entries = listed.into_values().flatten().collect();
                Ok(AaeReply::Keys {
                    entries,
                    complete_leaves: complete,
                })
            }
        }
    }

    /// The keys this node shares with `peer` in `leaves`, grouped by leaf; whole leaves only,
    /// as many as fit in `max_keys` (at least one).
    ///
    /// It runs on the worker that called it, like every bounded piece of engine work on a
    /// node (a batch, a page of hints): range scans of at most `max_keys` keys and a leaf.
    /// Moving it off the worker with `block_in_place` made tokio start a new worker thread
    /// each time, and with it a new allocator heap, which cost a node with peers 5-15 MiB of
    /// RSS under load for nothing.
    fn list_keys(
        &self,
        node: &StorageNode,
        peer: usize,
        leaves: &BTreeSet<usize>,
        max_keys: usize,
    ) -> Result<(ListedByLeaf, Vec<usize>)> {
        // Each leaf is a range of the node's storage (`super::keys`): read just those ranges,
        // and no more leaves than fit in the bound (what is read is held until the exchange
        // ends: a wiped peer differs in every leaf).
        let mut kept = ListedByLeaf::new();
        let mut complete = Vec::new();
        let mut total = 0;
        for &leaf in leaves {
            let mut entries = Vec::new();
            // A leaf lies in one partition: a peer shares all of its keys or none.
            if self.sharing[merkle::partition_of_leaf(leaf)].contains(&peer) {
                let mut scanned = 0u64;
                super::keys::scan_leaf(&**node.engine(), leaf, |key, bytes| {
                    scanned += 1;
                    if let Ok(text) = std::str::from_utf8(key) {
                        let newest_us =
                            Siblings::decode(bytes).map_or(0, |s| s.newest_timestamp_us());
                        entries.push((text.to_owned(), merkle::entry_hash(key, bytes), newest_us));
                    }
                })?;
                self.metrics.keys_scanned.add(scanned);
            }
            // Leaves with no keys are complete too; keep whole leaves within the bound.
            if total > 0 && total + entries.len() > max_keys {
                break;
            }
            total += entries.len();
            complete.push(leaf);
            kept.insert(leaf, entries);
        }
        Ok((kept, complete))
    }

    /// One exchange with `peer`: compare trees top down, then push and pull the keys that differ.
    pub async fn exchange(
        &self,
        node: &StorageNode,
        client: &RpcClient,
        peer: usize,
    ) -> Result<Exchange> {
        self.metrics.rounds.inc();
        let address = self.layout.servers()[peer].clone();
        let ask = |query: AaeQuery| {
            let request = AaeRequest {
                from: self.me_address.clone(),
                ring: self.agreement(),
                query,
            };
            self.call::<AaeReply>(client, &address, messages::AAE, request, QUERY_TIMEOUT)
        };
        let AaeReply::Root(root) = ask(AaeQuery::Root).await? else {
            return Err(Error::Internal("peer answered another question".into()));
        };
        if root == self.with_tree(peer, merkle::Tree::root) {
            self.metrics.in_sync.inc();
            return Ok(Exchange::default());
        }
        let mut frontier = vec![0];
        for level in 0..LEVELS {
            let AaeReply::Children(theirs) = ask(AaeQuery::Children {
                level,
                parents: frontier.clone(),
            })
            .await?
            else {
                return Err(Error::Internal("peer answered another question".into()));
            };
            frontier = self.with_tree(peer, |tree| {
                tree.differing_children(level, &frontier, &theirs)
            });
            if frontier.is_empty() {
                self.metrics.in_sync.inc();
                return Ok(Exchange::default());
            }
        }
        let AaeReply::Keys {
            entries,
            complete_leaves,
        } = ask(AaeQuery::Keys { leaves: frontier }).await?
        else {
            return Err(Error::Internal("peer answered another question".into()));
        };
        let complete: BTreeSet<usize> = complete_leaves.into_iter().collect();
        let by_key = |entries: Vec<Listed>| -> Compared {
            entries
                .into_iter()
                .map(|(key, hash, newest_us)| (key, (hash, newest_us)))
                .collect()
        };
        // Compared: the leaves both sides listed whole, within the bound on each side (the
        // rest is left to the next exchange).
        let (ours, complete) = self.list_keys(node, peer, &complete, self.max_keys)?;
        let complete: BTreeSet<usize> = complete.into_iter().collect();
        let theirs = by_key(
            entries
                .into_iter()
                .filter(|(key, _, _)| complete.contains(&merkle::bucket(key.as_bytes())))
                .collect(),
        );
        let ours = by_key(ours.into_values().flatten().collect());

        let settled_before = crate::clock::now_us().saturating_sub(crate::clock::micros(SETTLE));
        let Repair {
            mut push,
            mut pull,
            unsettled,
        } = plan_repair(&ours, &theirs, settled_before);
        self.metrics.keys_unsettled.add(unsettled);
        // When the bound bites, start at a varying place, so that two peers repairing the same
        // node do not both send it the same first keys.
        let start = usize::try_from(crate::clock::now_ms()).unwrap_or(0);
        for keys in [&mut push, &mut pull] {
            if keys.len() > self.max_keys {
                let len = keys.len();
                keys.rotate_left(start % len);
            }
        }
        push.truncate(self.max_keys);
        pull.truncate(self.max_keys.saturating_sub(push.len()).max(1));

        for chunk in push.chunks(BATCH_KEYS) {
            // Requests first: a repair of many keys goes a chunk at a time, and lets the
            // worker's other tasks run between chunks.
            tokio::task::yield_now().await;
            let entries = chunk
                .iter()
                .map(|key| Ok((key.clone(), node.read_own(key)?)))
                .collect::<Result<Vec<_>>>()?;
            // Refused by the peer once this call has timed out here (see `Envelope`).
            let deadline_us = crate::clock::remote_deadline_us(
                crate::clock::now_us().saturating_add(CALL_TIMEOUT.as_micros() as u64),
                client.clocks().offset(&address),
            );
            let request = MergeManyRequest {
                entries,
                deadline_us,
            };
            let _merged: u64 = self
                .call(
                    client,
                    &address,
                    messages::MERGE_MANY,
                    request,
                    CALL_TIMEOUT,
                )
                .await?;
            self.metrics.keys_pushed.add(chunk.len() as u64);
        }
        for chunk in pull.chunks(BATCH_KEYS) {
            tokio::task::yield_now().await;
            let request = ReadManyRequest {
                keys: chunk.to_vec(),
            };
            let sets: Vec<messages::HeldCopy> = self
                .call(client, &address, messages::READ_MANY, request, CALL_TIMEOUT)
                .await?;
            let entries = chunk.iter().cloned().zip(sets).collect();
            node.merge_own_many(entries)?;
            self.metrics.keys_pulled.add(chunk.len() as u64);
        }
        Ok(Exchange {
            pushed: push.len(),
            pulled: pull.len(),
        })
    }

    /// An internal call whose message and reply are both binary; counts the bytes moved.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        client: &RpcClient,
        address: &str,
        method: &str,
        message: impl serde::Serialize,
        timeout: Duration,
    ) -> Result<T> {
        let param = messages::to_param(&message)?;
        self.metrics.bytes.add(payload_len(&param));
        let reply = client
            .call(address, method, vec![param], timeout)
            .await
            .map_err(|error| Error::Remote {
                addr: address.to_owned(),
                message: error.to_string(),
            })?;
        self.metrics.bytes.add(payload_len(&reply));
        messages::from_value(&reply)
    }

    /// Exchanges with every peer, once, one after another: two peers repairing a node at the
    /// same time would each send it what it missed. A peer down or cut off holds the round
    /// up for [`QUERY_TIMEOUT`] at most, not for a whole [`CALL_TIMEOUT`].
    pub async fn round(&self, node: &StorageNode, client: &RpcClient) {
        for peer in 0..self.layout.servers().len() {
            if self.trees[peer].is_none() {
                continue; // itself, or a server it shares no partition with
            }
            self.exchange_and_report(node, client, peer).await;
        }
    }

    /// One exchange with `peer`, its outcome logged and counted.
    async fn exchange_and_report(&self, node: &StorageNode, client: &RpcClient, peer: usize) {
        match self.exchange(node, client, peer).await {
            Ok(exchange) if exchange != Exchange::default() => {
                self.mismatch_reported[peer].store(false, Ordering::Relaxed);
                tracing::info!(
                    peer = self.layout.servers()[peer],
                    pushed = exchange.pushed,
                    pulled = exchange.pulled,
                    "anti-entropy repaired keys"
                );
            }
            Ok(_) => self.mismatch_reported[peer].store(false, Ordering::Relaxed),
            Err(error) => {
                self.metrics.failures.inc();
                let mismatch = error.to_string().contains("ring mismatch");
                if mismatch && !self.mismatch_reported[peer].swap(true, Ordering::Relaxed) {
                    tracing::error!(peer = self.layout.servers()[peer], %error, "anti-entropy refused");
                } else {
                    tracing::debug!(peer = self.layout.servers()[peer], %error, "anti-entropy exchange failed");
                }
            }
        }
    }
}

/// One side's listed keys: entry hash and newest entry time (microseconds), by key.
type Compared = BTreeMap<String, (EntryHash, u64)>;

/// What an exchange repairs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Repair {
    /// Keys the peer lacks or holds otherwise: sent to it.
    push: Vec<String>,
    /// Keys this node lacks or holds otherwise: read from the peer.
    pull: Vec<String>,
    /// Differences left to a later round (counted once per direction).
    unsettled: u64,
}

/// Compares the keys both sides listed. A key whose entry differs is repaired only if its
/// newest version, on either side, entered the cluster no later than `settled_before`: a
/// younger one may only be a write still on its way to one of the two.
fn plan_repair(ours: &Compared, theirs: &Compared, settled_before: u64) -> Repair {
    let mut repair = Repair::default();
    let newest = |entry: Option<&(EntryHash, u64)>| entry.map_or(0, |&(_, newest)| newest);
    for (from, to, keys) in [
        (ours, theirs, &mut repair.push),
        (theirs, ours, &mut repair.pull),
    ] {
        for (key, &(hash, newest_us)) in from {
            let other = to.get(key);
            if other.map(|&(hash, _)| hash) == Some(hash) {
                continue;
            }
            if newest_us.max(newest(other)) <= settled_before {
                keys.push(key.clone());
            } else {
                repair.unsettled += 1;
            }
        }
    }
    repair
}

fn payload_len(value: &Value) -> u64 {
    match value {
        Value::Base64(bytes) => bytes.len() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries at a settle line of 1,000 µs: "old" entered before it, "new" after it.
    const SETTLED_BEFORE: u64 = 1_000;
    const OLD: u64 = 500;
    const NEW: u64 = 1_500;

    fn side(entries: &[(&str, u128, u64)]) -> Compared {
        entries
            .iter()
            .map(|&(key, hash, newest)| (key.to_owned(), (hash, newest)))
            .collect()
    }

    #[test]
    fn only_settled_differences_are_repaired() {
        // (case, ours, theirs, push, pull, unsettled)
        type Case = (
            &'static str,
            Vec<(&'static str, u128, u64)>,
            Vec<(&'static str, u128, u64)>,
            Vec<&'static str>,
            Vec<&'static str>,
            u64,
        );
        let cases: Vec<Case> = vec![
            (
                "equal",
                vec![("k", 1, OLD)],
                vec![("k", 1, OLD)],
                vec![],
                vec![],
                0,
            ),
            (
                "equal and new",
                vec![("k", 1, NEW)],
                vec![("k", 1, NEW)],
                vec![],
                vec![],
                0,
            ),
            (
                "only ours, old",
                vec![("k", 1, OLD)],
                vec![],
                vec!["k"],
                vec![],
                0,
            ),
            (
                "only theirs, old",
                vec![],
                vec![("k", 1, OLD)],
                vec![],
                vec!["k"],
                0,
            ),
            (
                "differ, both old",
                vec![("k", 1, OLD)],
                vec![("k", 2, OLD)],
                vec!["k"],
                vec!["k"],
                0,
            ),
            (
                "only ours, in flight",
                vec![("k", 1, NEW)],
                vec![],
                vec![],
                vec![],
                1,
            ),
            (
                "only theirs, in flight",
                vec![],
                vec![("k", 1, NEW)],
                vec![],
                vec![],
                1,
            ),
            (
                "ours old, theirs in flight",
                vec![("k", 1, OLD)],
                vec![("k", 2, NEW)],
                vec![],
                vec![],
                2,
            ),
            (
                "settle line itself is settled",
                vec![("k", 1, SETTLED_BEFORE)],
                vec![],
                vec!["k"],
                vec![],
                0,
            ),
            (
                "one of each",
                vec![("a", 1, OLD), ("b", 1, NEW), ("c", 1, OLD)],
                vec![("a", 1, OLD), ("d", 4, OLD)],
                vec!["c"],
                vec!["d"],
                1,
            ),
        ];
        for (case, ours, theirs, push, pull, unsettled) in cases {
            let repair = plan_repair(&side(&ours), &side(&theirs), SETTLED_BEFORE);
            let expected = Repair {
                push: push.into_iter().map(str::to_owned).collect(),
                pull: pull.into_iter().map(str::to_owned).collect(),
                unsettled,
            };
            assert_eq!(repair, expected, "{case}");
        }
    }
}
