//! The storage node: a replica that keeps sibling sets in a storage engine.
//!
//! A node never decides placement or quorums; balancers do. It applies replica operations
//! that arrive in binary batches ([`crate::rpc::messages::Op`]): `coordinate` stamps a new
//! write with this node's actor id and stores it, `merge` folds in a sibling set another
//! replica or a read repair sends, `read` returns what the node holds, `reap` drops tombstones
//! every replica holds. Each is a read-modify-write of one key, serialised per key by a
//! striped lock so concurrent writes to a key merge instead of overwriting each other, and
//! each is in the engine's journal before the node answers. The writes of one batch form one
//! transaction (`transaction.rs`): one journal write for all of them. A row cache
//! (`row_cache.rs`) keeps the stored bytes of recently used keys, since every write reads its
//! key first. Writes a node takes for an unreachable peer are kept apart as hints and handed
//! over later ([`hints`]); nodes started with peers also converge in the background
//! ([`anti_entropy`]).
//!
//! For people, it also answers `get(key)` and `put(key, value)` on its own copy, and `stats()`.

pub mod anti_entropy;
pub mod hints;
mod key_locks;
mod reaped;
mod row_cache;
mod transaction;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use dxr::Value;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::rpc::client::RpcClient;
use crate::rpc::codec;
use crate::rpc::messages::{
    self, CoordinateRequest, Envelope, MergeManyRequest, MergeRequest, Op, OpReply,
    ReadManyRequest, ReadRequest, ReapRequest, check_key,
};
use crate::rpc::params;
use crate::rpc::server::{self, Handler, ServerLimits, expect_params};
use crate::storage::{self, Engine, Tree, WriteOp};
use crate::telemetry::{Counter, Exposition};
use crate::version::{ActorId, Dot, Siblings};
use anti_entropy::AntiEntropy;
use hints::HintRecord;
use key_locks::KeyLocks;
use reaped::ReapedTombstones;
use row_cache::RowCache;
use transaction::{Place, Transaction};

/// How often the journal is forced to disk. Writes are acknowledged once the OS has them
/// (they survive a crash of the process); this bounds what a power loss can take.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Most versions one key may hold after a client's write. Writes from stale contexts pile up
/// siblings (each one concurrent with the rest); past this bound a write must resolve them,
/// so no key grows without limit and every merge stays cheap.
pub const MAX_SIBLINGS: usize = 64;

/// Most bytes of values one key may hold after a client's write, for the same reason, and so
/// that any key can be read: a read answers the whole set in one reply, and replies are
/// capped (`rpc::client::MAX_RESPONSE_BYTES`, 256 MiB). Two values of the default largest
/// request (32 MiB) fit. Sets merged from several coordinators can exceed it (siblings written
/// concurrently at different replicas, or by a fallback into a hint): with N = 3, three such
/// sets and a batch's [`READ_REPLY_BUDGET`] still fit under the cap; with a larger N and
/// concurrent heavy writes at every replica, a read of such a key can still pass it.
pub const MAX_SET_VALUE_BYTES: usize = 64 * 1024 * 1024;

/// Bytes of values a batch's replies may carry before its remaining reads are deferred
/// ([`OpReply::Deferred`]): a batch of 256 reads of small values stays far below it, while
/// reads of large keys go out a few per batch instead of all in one oversized reply.
pub const READ_REPLY_BUDGET: usize = 32 * 1024 * 1024;

const _: () =
    assert!(3 * MAX_SET_VALUE_BYTES + READ_REPLY_BUDGET <= crate::rpc::client::MAX_RESPONSE_BYTES);

/// How far ahead of this node's clock a write's entry time may be. Entry times are read on
/// the cluster clock, which follows the median storage node ([`crate::clock`]), so an entry
/// time this far ahead means this node's clock (or the coordinator's) is badly off: NTP keeps
/// machines within milliseconds. A version stamped far in the future would win `get` over
/// every write made until that time came, so the node refuses to coordinate it (another
/// replica does, and this node still takes the write as a copy) and says why.
pub const MAX_ENTRY_AHEAD_US: u64 = 10_000_000;

/// Least time between two log lines about writes refused for [`MAX_ENTRY_AHEAD_US`]: a node
/// with a bad clock meets one per write it would coordinate.
const CLOCK_WARNING_INTERVAL_US: u64 = 10_000_000;

const ACTOR_ID_KEY: &[u8] = b"actor_id";

const METHODS: &[(&str, &str)] = &[
    (
        "get",
        "get(key) -> this node's own copy of the key's value, or nil",
    ),
    (
        "put",
        "put(key, value[, context]) -> \"200\": writes this node's copy only, no replication",
    ),
    (
        "stats",
        "stats() -> {keys, hints, ...}: what this node holds",
    ),
    (
        messages::AAE,
        "internal: anti-entropy questions from a peer about the keys the two share",
    ),
    (
        messages::MERGE_MANY,
        "internal: merge many keys' sibling sets (anti-entropy)",
    ),
    (
        messages::READ_MANY,
        "internal: many keys' sibling sets (anti-entropy)",
    ),
];

#[derive(Debug, Default)]
struct NodeMetrics {
    coordinates: Counter,
    merges: Counter,
    reads: Counter,
    local_gets: Counter,
    local_puts: Counter,
    reaps: Counter,
    batches: Counter,
    errors: Counter,
    /// Operations refused because they arrived after their deadline.
    expired: Counter,
    /// Writes refused because they entered the cluster too far ahead of this node's clock.
    clock_refusals: Counter,
}

pub struct StorageNode {
    engine: Arc<dyn Engine>,
    actor: ActorId,
    locks: KeyLocks,
    /// Keys with at least one live sibling; counted at start, then kept up to date per write.
    live_keys: AtomicI64,
    /// Keys whose every sibling is a tombstone, waiting to be reaped.
    tombstone_keys: AtomicI64,
    /// Hints held for other nodes.
    hints: AtomicI64,
    /// Hints that cannot be decoded, as the last handoff pass found them (see
    /// [`hints::handoff_round`]).
    corrupt_hints: AtomicI64,
    /// Background convergence with the `-s` peers; `None` for a node without peers.
    aae: Option<AntiEntropy>,
    /// Tombstones reaped lately, refused if a replica sends them back.
    reaped: ReapedTombstones,
    /// When the log last said this node refused writes for its clock (microseconds).
    last_clock_warning_us: std::sync::atomic::AtomicU64,
    /// Stored bytes of recently used keys of the `Data` tree.
    cache: RowCache,
    log_requests: bool,
    /// Shown on each request line, so that nodes sharing a terminal can be told apart.
    port: u16,
    metrics: NodeMetrics,
}

impl StorageNode {
    /// Opens the node's storage (refusing a directory another process holds) and loads its
    /// actor id, drawing a new one for fresh storage.
    pub fn open(config: &NodeConfig) -> Result<Self> {
        let engine = storage::open(&config.storage)?;
        let actor = load_or_create_actor(&*engine)?;
        let aae = match &config.ring {
            Some(ring) => Some(AntiEntropy::new(
                ring,
                config.aae_interval,
                config.aae_max_keys,
            )?),
            None => None,
        };
        let (live_keys, tombstone_keys) = scan_data(&*engine, aae.as_ref())?;
        let hints = count_entries(&*engine, Tree::Hints)?;
        Ok(StorageNode {
            engine,
            actor,
            locks: KeyLocks::new(),
            live_keys: AtomicI64::new(live_keys),
            tombstone_keys: AtomicI64::new(tombstone_keys),
            hints: AtomicI64::new(hints),
            corrupt_hints: AtomicI64::new(0),
            aae,
            reaped: ReapedTombstones::default(),
            last_clock_warning_us: std::sync::atomic::AtomicU64::new(0),
            cache: RowCache::new(config.cache_bytes),
            log_requests: config.log_requests,
            port: config.listen.port(),
            metrics: NodeMetrics::default(),
        })
    }

    pub fn actor(&self) -> ActorId {
        self.actor
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The key's own copy, for a reader that does not hold the key's lock.
    fn load(&self, key: &str) -> Result<Siblings> {
        let stored: Option<Arc<[u8]>> = match self.cache.get(key.as_bytes()) {
            Some(bytes) => Some(bytes),
            None => self.engine.get(Tree::Data, key.as_bytes())?.map(Arc::from),
        };
        match stored {
            None => Ok(Siblings::new()),
            Some(bytes) => Siblings::decode(&bytes)
                .ok_or_else(|| Error::Internal("stored sibling set is corrupt".into())),
        }
    }

    fn load_hint(&self, slot: &[u8], owner: &str, key: &str) -> Result<Option<HintRecord>> {
        let Some(bytes) = self.engine.get(Tree::Hints, slot)? else {
            return Ok(None);
        };
        let record: HintRecord = postcard::from_bytes(&bytes)
            .map_err(|_| Error::Internal("stored hint is corrupt".into()))?;
        if record.owner != owner || record.key != key {
            // Two very long keys whose digests collide: refuse rather than mix them up.
            return Err(Error::Internal("hint slot holds another key".into()));
        }
        Ok(Some(record))
    }

    /// Drops a hint its owner accepted, unless it changed since it was read for delivery.
    pub fn drop_delivered_hint(&self, delivered: &HintRecord) -> Result<bool> {
        let slot = hints::slot(&delivered.owner, &delivered.key);
        let _guard = self.locks.lock(&slot);
        let current = self.load_hint(&slot, &delivered.owner, &delivered.key)?;
        if current.as_ref() != Some(delivered) {
            return Ok(false);
        }
        self.engine
            .write(vec![WriteOp::remove(Tree::Hints, slot)])?;
        self.hints.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The node's own copy of a key (anti-entropy push).
    pub fn read_own(&self, key: &str) -> Result<Siblings> {
        self.load(key)
    }

    /// Merges sibling sets into the node's own copies (anti-entropy push and pull), as one
    /// batch: one transaction, one journal write. Fails with the first refusal.
    pub fn merge_own_many(&self, entries: Vec<(String, Siblings)>) -> Result<()> {
        self.merge_own_many_until(entries, u64::MAX)
    }

    /// As [`Self::merge_own_many`], each entry refused if its turn comes after `deadline_us`
    /// (this node's clock; see [`Envelope`]): the entries in time are merged, and the call
    /// fails if any was refused.
    pub fn merge_own_many_until(
        &self,
        entries: Vec<(String, Siblings)>,
        deadline_us: u64,
    ) -> Result<()> {
        let ops = entries
            .into_iter()
            .map(|(key, siblings)| {
                Op::Merge(MergeRequest {
                    key,
                    siblings,
                    hint_for: None,
                })
            })
            .collect();
        for reply in self.apply_until(ops, deadline_us) {
            match reply {
                OpReply::Fault { code, message } => return Err(Error::Fault { code, message }),
                OpReply::Expired { late_by_us } => {
                    return Err(Error::Internal(format!(
                        "arrived {} ms after its deadline; refused",
                        late_by_us / 1000
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Runs one write in a transaction of its own; answers what `stage` returned and the
    /// place's sibling set after the write.
    fn write_one<T>(
        &self,
        place: Place,
        stage: impl FnOnce(&mut Transaction<'_>, &Place) -> Result<T>,
    ) -> Result<(T, Siblings)> {
        let mut transaction = Transaction::begin(self, [&place]);
        let outcome = stage(&mut transaction, &place)?;
        let mut committed = transaction.commit()?;
        Ok((outcome, committed.take(&place)))
    }

    /// Removes a key whose tombstones every replica holds (the balancer checked), but only if
    /// this node still holds exactly those tombstones: anything written since keeps the key.
    pub fn reap(&self, request: &ReapRequest) -> Result<bool> {
        check_key(&request.key)?;
        let place = Place::own(&request.key);
        Ok(self
            .write_one(place, |tx, place| self.stage_reap(tx, place, &request.dots))?
            .0)
    }

    pub fn coordinate(&self, request: CoordinateRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        let place = Place::new(&request.key, request.hint_for.as_deref());
        Ok(self
            .write_one(place, |tx, place| self.stage_coordinate(tx, place, request))?
            .1)
    }

    pub fn merge(&self, request: MergeRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        let place = Place::new(&request.key, request.hint_for.as_deref());
        Ok(self
            .write_one(place, |tx, place| {
                self.stage_merge(tx, place, &request.siblings)
            })?
            .1)
    }

    /// Stamps a client's write with this node's actor id against what the place holds.
    fn stage_coordinate(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        request: CoordinateRequest,
    ) -> Result<()> {
        self.log("put", place.key(), request.value.is_none());
        let now = request.entered_us;
        let clock_now = crate::clock::now_us();
        let ahead_us = now.saturating_sub(clock_now);
        if ahead_us > MAX_ENTRY_AHEAD_US {
            self.metrics.clock_refusals.inc();
            let last = self.last_clock_warning_us.load(Ordering::Relaxed);
            if clock_now.saturating_sub(last) >= CLOCK_WARNING_INTERVAL_US
                && self
                    .last_clock_warning_us
                    .compare_exchange(last, clock_now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    ahead_ms = ahead_us / 1000,
                    refused = self.metrics.clock_refusals.get(),
                    "refusing to coordinate writes stamped ahead of this node's clock (other replicas coordinate them): is this machine's clock synchronised?"
                );
            }
            return Err(Error::Internal(format!(
                "the write entered the cluster {} ms ahead of this node's clock",
                ahead_us / 1000
            )));
        }
        if !place.is_hint()
            && self
                .reaped
                .reaped_at(place.key())
                .is_some_and(|reaped_us| now <= reaped_us)
        {
            // A write that entered before a delete whose tombstones every replica has since
            // dropped (it reached this node late): the delete supersedes it, and it must not
            // bring the value back.
            transaction.siblings(place)?;
            return Ok(());
        }
        let siblings = transaction.siblings(place)?;
        if siblings.versions().len() < MAX_SIBLINGS
            && siblings.value_bytes().saturating_add(request.value_bytes()) <= MAX_SET_VALUE_BYTES
        {
            // A write adds at most one version, so it stays within both bounds.
            siblings.write(self.actor, request.context.as_ref(), request.value, now);
            return Ok(());
        }
        let mut next = siblings.clone();
        next.write(self.actor, request.context.as_ref(), request.value, now);
        let count = next.versions().len();
        if count > MAX_SIBLINGS {
            return Err(Error::invalid(format!(
                "the key would have {count} siblings (at most {MAX_SIBLINGS}); write with the context from get_versions to resolve them"
            )));
        }
        let bytes = next.value_bytes();
        // A write that leaves the set no heavier (a delete, a resolving write) always goes
        // through, even on a set merged past the bound.
        if bytes > MAX_SET_VALUE_BYTES && bytes > siblings.value_bytes() {
            let mib = |bytes: usize| bytes.div_ceil(1 << 20);
            return Err(Error::invalid(if next.versions().len() == 1 {
                format!(
                    "a value of {} MiB is over the {} MiB a key may hold",
                    mib(bytes),
                    MAX_SET_VALUE_BYTES >> 20
                )
            } else {
                format!(
                    "the key's versions would hold {} MiB of values (at most {} MiB); write with the context from get_versions to resolve them",
                    mib(bytes),
                    MAX_SET_VALUE_BYTES >> 20
                )
            }));
        }
        *siblings = next;
        Ok(())
    }

    /// Folds in a sibling set another replica or a read repair sent.
    fn stage_merge(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        incoming: &Siblings,
    ) -> Result<()> {
        self.log("store", place.key(), false);
        let siblings = transaction.siblings(place)?;
        if !place.is_hint()
            && let Some(reaped_us) = self.reaped.reaped_at(place.key())
        {
            siblings.merge(&incoming.newer_than(reaped_us));
            return Ok(());
        }
        siblings.merge(incoming);
        Ok(())
    }

    /// Drops the place's tombstones if they are exactly `dots`; answers whether it did.
    fn stage_reap(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        dots: &[Dot],
    ) -> Result<bool> {
        self.log("reap", place.key(), false);
        let siblings = transaction.siblings(place)?;
        if !(siblings.is_tombstoned() && siblings.dots().eq(dots.iter().copied())) {
            return Ok(false);
        }
        let newest_us = siblings.newest_timestamp_us();
        *siblings = Siblings::new();
        // Remembered at once, so a merge later in the same batch cannot bring them back; if
        // the commit fails the node still holds these tombstones and skipping their merge is
        // a no-op.
        self.reaped.remember(place.key(), newest_us);
        Ok(true)
    }

    pub fn read(&self, request: &ReadRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        self.log("get", &request.key, false);
        match &request.hint_for {
            None => self.load(&request.key),
            Some(owner) => {
                let slot = hints::slot(owner, &request.key);
                let record = self.load_hint(&slot, owner, &request.key)?;
                Ok(record.map(|r| r.siblings).unwrap_or_default())
            }
        }
    }

    fn log(&self, operation: &str, key: &str, delete: bool) {
        if self.log_requests {
            let operation = if delete { "delete" } else { operation };
            tracing::info!("{} {operation} {}", self.port, printable_key(key));
        }
    }

    fn stats_xml(&self) -> Result<String> {
        let count = |n: &AtomicI64| codec::int_value(n.load(Ordering::Relaxed).max(0));
        let counter = |c: &Counter| codec::int_value(i64::try_from(c.get()).unwrap_or(i64::MAX));
        let mut stats: std::collections::BTreeMap<String, Value> = [
            ("keys".to_string(), count(&self.live_keys)),
            ("hints".to_string(), count(&self.hints)),
            ("tombstones".to_string(), count(&self.tombstone_keys)),
            (
                "engine".to_string(),
                Value::String(self.engine.name().into()),
            ),
            (
                "actor".to_string(),
                Value::String(format!("{:016x}", self.actor)),
            ),
            (
                "connections".to_string(),
                counter(&server::CONNECTIONS_ACCEPTED),
            ),
            ("expired".to_string(), counter(&self.metrics.expired)),
            (
                "clock_refusals".to_string(),
                counter(&self.metrics.clock_refusals),
            ),
            (
                "cache_bytes".to_string(),
                codec::int_value(i64::try_from(self.cache.weight()).unwrap_or(i64::MAX)),
            ),
        ]
        .into();
        if let Some(aae) = &self.aae {
            let m = &aae.metrics;
            stats.insert("ring".into(), Value::String(aae.fingerprint().to_owned()));
            let aae_stats = [
                ("rounds", counter(&m.rounds)),
                ("in_sync", counter(&m.in_sync)),
                ("keys_pushed", counter(&m.keys_pushed)),
                ("keys_pulled", counter(&m.keys_pulled)),
                ("bytes", counter(&m.bytes)),
                ("failures", counter(&m.failures)),
            ];
            let aae_stats = aae_stats
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            stats.insert("anti_entropy".into(), Value::Struct(aae_stats));
        }
        codec::value_to_xml(&Value::Struct(stats))
    }
}

impl Handler for StorageNode {
    async fn call(&self, method: &str, params: Vec<Value>) -> Result<String> {
        let result = self.call_sync(method, params);
        if result.is_err() {
            self.metrics.errors.inc();
        }
        result
    }

    fn methods(&self) -> &'static [(&'static str, &'static str)] {
        METHODS
    }

    const SERVES_BATCHES: bool = true;

    async fn batch(&self, body: bytes::Bytes) -> Result<Vec<u8>> {
        let envelopes: Vec<Envelope> = postcard::from_bytes(&body)
            .map_err(|_| Error::invalid("batch could not be decoded"))?;
        self.metrics.batches.inc();
        let replies = self.apply(
            envelopes
                .into_iter()
                .map(|envelope| (envelope.op, envelope.deadline_us))
                .collect(),
        );
        postcard::to_allocvec(&replies)
            .map_err(|_| Error::Internal("batch reply could not be encoded".into()))
    }

    fn metrics(&self) -> String {
        let m = &self.metrics;
        let mut out = Exposition::default();
        out.labelled_counter(
            "dynamite_node_requests_total",
            "Requests served, by method.",
            "method",
            &[
                ("coordinate", m.coordinates.get()),
                ("merge", m.merges.get()),
                ("read", m.reads.get()),
                ("get", m.local_gets.get()),
                ("put", m.local_puts.get()),
                ("reap", m.reaps.get()),
            ],
        )
        .counter(
            "dynamite_node_errors_total",
            "Requests answered with a fault.",
            m.errors.get(),
        )
        .counter(
            "dynamite_node_batches_total",
            "Binary batches of replica operations served.",
            m.batches.get(),
        )
        .counter(
            "dynamite_node_expired_total",
            "Replica operations refused unapplied because they arrived after their deadline.",
            m.expired.get(),
        )
        .counter(
            "dynamite_node_clock_refusals_total",
            "Writes this node refused to coordinate: stamped over 10 s ahead of its clock.",
            m.clock_refusals.get(),
        )
        .gauge(
            "dynamite_node_keys",
            "Live keys stored here.",
            self.live_keys.load(Ordering::Relaxed),
        )
        .gauge(
            "dynamite_node_hints_corrupt",
            "Hints that cannot be decoded, left in place and not handed over.",
            self.corrupt_hints.load(Ordering::Relaxed),
        );
        out.finish()
    }
}

impl StorageNode {
    /// Runs a batch of operations that carry no deadline (this node's own, and tests').
    pub fn apply_batch(&self, ops: Vec<Op>) -> Vec<OpReply> {
        self.apply_until(ops, u64::MAX)
    }

    fn apply_until(&self, ops: Vec<Op>, deadline_us: u64) -> Vec<OpReply> {
        self.apply(ops.into_iter().map(|op| (op, deadline_us)).collect())
    }

    /// Runs a batch: its writes as one transaction, so one engine commit, then its reads until
    /// the replies carry [`READ_REPLY_BUDGET`] of values (the reads left are deferred; the
    /// first read runs unless the writes' replies alone passed the budget, so a batch of reads
    /// only, as deferred reads are sent again, always gets one answered). A refused operation
    /// gets its own fault and the others go on; a failed commit fails every write of the
    /// batch. An operation whose deadline (this node's clock, microseconds) has passed when
    /// its turn comes is answered [`OpReply::Expired`] and not applied. Replies are in the
    /// order of `ops`.
    fn apply(&self, ops: Vec<(Op, u64)>) -> Vec<OpReply> {
        let mut replies: Vec<Option<OpReply>> = vec![None; ops.len()];
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for (index, (op, deadline_us)) in ops.into_iter().enumerate() {
            let op = match op {
                // Counted when it runs: a deferred read comes back in a later batch.
                Op::Read(request) => {
                    reads.push((index, request, deadline_us));
                    continue;
                }
                write => write,
            };
            self.count(&op);
            let place = op_place(&op);
            match check_key(place.key()) {
                Ok(()) => writes.push((index, place, op, deadline_us)),
                Err(error) => replies[index] = Some(self.fault(&error)),
            }
        }
        self.apply_writes(writes, &mut replies);
        let mut reply_bytes: usize = replies.iter().flatten().map(OpReply::value_bytes).sum();
        for (index, request, deadline_us) in reads {
            if reply_bytes > READ_REPLY_BUDGET {
                replies[index] = Some(OpReply::Deferred);
                continue;
            }
            if let Some(expired) = self.expired(deadline_us) {
                replies[index] = Some(expired);
                continue;
            }
            self.metrics.reads.inc();
            let reply = self.read(&request).map(OpReply::Siblings);
            let reply = reply.unwrap_or_else(|error| self.fault(&error));
            reply_bytes = reply_bytes.saturating_add(reply.value_bytes());
            replies[index] = Some(reply);
        }
        replies
            .into_iter()
            .map(|reply| {
                reply.unwrap_or_else(|| {
                    self.fault(&Error::Internal("operation left unanswered".into()))
                })
            })
            .collect()
    }

    /// The refusal of an operation whose deadline has passed; `None` while it has not.
    fn expired(&self, deadline_us: u64) -> Option<OpReply> {
        let late_by_us = crate::clock::now_us().checked_sub(deadline_us)?;
        if late_by_us == 0 {
            return None;
        }
        self.metrics.expired.inc();
        tracing::debug!(
            late_by_us,
            "refused an operation that arrived after its deadline"
        );
        Some(OpReply::Expired { late_by_us })
    }

    fn apply_writes(&self, writes: Vec<(usize, Place, Op, u64)>, replies: &mut [Option<OpReply>]) {
        if writes.is_empty() {
            return;
        }
        // A place written again later in the batch answers its state at that point (a copy);
        // the last write to a place answers the committed state itself.
        let mut last_write = std::collections::HashMap::new();
        for (position, (_, place, _, _)) in writes.iter().enumerate() {
            last_write.insert(place, position);
        }
        let is_last: Vec<bool> = (0..writes.len())
            .map(|position| last_write.get(&writes[position].1) == Some(&position))
            .collect();
        drop(last_write);

        let mut transaction = Transaction::begin(self, writes.iter().map(|(_, place, _, _)| place));
        let mut finals = Vec::new();
        let mut staged = Vec::new();
        for ((index, place, op, deadline_us), is_last) in writes.into_iter().zip(is_last) {
            // Checked once the keys are locked, right before the write: time spent waiting for
            // a lock counts.
            if let Some(expired) = self.expired(deadline_us) {
                replies[index] = Some(expired);
                continue;
            }
            let outcome = match op {
                Op::Coordinate(request) => self
                    .stage_coordinate(&mut transaction, &place, request)
                    .map(|()| None),
                Op::Merge(request) => self
                    .stage_merge(&mut transaction, &place, &request.siblings)
                    .map(|()| Some(OpReply::Merged)),
                Op::Reap(request) => self
                    .stage_reap(&mut transaction, &place, &request.dots)
                    .map(|reaped| Some(OpReply::Reaped(reaped))),
                Op::Read(_) => Err(Error::Internal("a read among the writes".into())),
            };
            let reply = match outcome {
                Err(error) => {
                    replies[index] = Some(self.fault(&error));
                    continue;
                }
                Ok(Some(reply)) => reply,
                Ok(None) if is_last => {
                    finals.push((index, place));
                    continue;
                }
                Ok(None) => match transaction.siblings(&place) {
                    Ok(siblings) => OpReply::Siblings(siblings.clone()),
                    Err(error) => self.fault(&error),
                },
            };
            staged.push((index, reply));
        }
        match transaction.commit() {
            Ok(mut committed) => {
                for (index, reply) in staged {
                    replies[index] = Some(reply);
                }
                for (index, place) in finals {
                    replies[index] = Some(OpReply::Siblings(committed.take(&place)));
                }
            }
            Err(error) => {
                // Every write of the batch failed with it, and each counts as an error.
                for index in staged
                    .iter()
                    .map(|(i, _)| *i)
                    .chain(finals.iter().map(|(i, _)| *i))
                {
                    replies[index] = Some(self.fault(&error));
                }
            }
        }
    }

    fn count(&self, op: &Op) {
        let counter = match op {
            Op::Coordinate(_) => &self.metrics.coordinates,
            Op::Merge(_) => &self.metrics.merges,
            Op::Read(_) => &self.metrics.reads,
            Op::Reap(_) => &self.metrics.reaps,
        };
        counter.inc();
    }

    /// An operation's refusal, as the fault the balancer passes on.
    fn fault(&self, error: &Error) -> OpReply {
        self.metrics.errors.inc();
        OpReply::Fault {
            code: error.fault_code(),
            message: error.fault_string(),
        }
    }

    /// The handlers themselves are synchronous: the engine's writes are short appends to the
    /// journal, and the lock per key is a std mutex never held across an `.await`.
    fn call_sync(&self, method: &str, params: Vec<Value>) -> Result<String> {
        match method {
            messages::AAE => {
                let aae = self.aae.as_ref().ok_or_else(|| {
                    Error::invalid("anti-entropy is off on this node (started without -s peers)")
                })?;
                let request = messages::from_params(&params)?;
                let reply = tokio::task::block_in_place(|| aae.answer(self, request))?;
                messages::reply_xml(&reply)
            }
            messages::MERGE_MANY => {
                let request: MergeManyRequest = messages::from_params(&params)?;
                let merged = request.entries.len() as u64;
                tokio::task::block_in_place(|| {
                    self.merge_own_many_until(request.entries, request.deadline_us)
                })?;
                messages::reply_xml(&merged)
            }
            messages::READ_MANY => {
                let request: ReadManyRequest = messages::from_params(&params)?;
                let sets = request
                    .keys
                    .iter()
                    .map(|key| {
                        check_key(key)?;
                        self.load(key)
                    })
                    .collect::<Result<Vec<_>>>()?;
                messages::reply_xml(&sets)
            }
            "put" => {
                self.metrics.local_puts.inc();
                let (key, value, context) = params::put_params(params)?;
                let hint_for = None;
                self.coordinate(CoordinateRequest {
                    key,
                    value: Some(value),
                    context,
                    hint_for,
                    entered_us: crate::clock::now_us(),
                })?;
                Ok(codec::string_xml("200"))
            }
            "get" => {
                self.metrics.local_gets.inc();
                let key = params::key_param(params)?;
                let siblings = self.read(&ReadRequest {
                    key,
                    hint_for: None,
                })?;
                Ok(siblings
                    .latest_value()
                    .map_or_else(|| codec::NIL_XML.to_owned(), str::to_owned))
            }
            "stats" => {
                expect_params(&params, 0)?;
                self.stats_xml()
            }
            _ => Err(Error::UnknownMethod(method.to_owned())),
        }
    }
}

/// Where a write operation lands.
fn op_place(op: &Op) -> Place {
    match op {
        Op::Coordinate(request) => Place::new(&request.key, request.hint_for.as_deref()),
        Op::Merge(request) => Place::new(&request.key, request.hint_for.as_deref()),
        Op::Read(request) => Place::new(&request.key, request.hint_for.as_deref()),
        Op::Reap(request) => Place::own(&request.key),
    }
}

/// Serves the node on `listener` until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let node = Arc::new(StorageNode::open(&config)?);
    tracing::info!(
        address = %config.listen,
        engine = node.engine.name(),
        keys = node.live_keys.load(Ordering::Relaxed),
        "storage node serving"
    );
    let syncer = tokio::spawn(sync_periodically(node.engine.clone()));
    let handoff = tokio::spawn(hints::handoff_periodically(node.clone(), RpcClient::new()));
    let anti_entropy = tokio::spawn(anti_entropy_periodically(node.clone(), RpcClient::new()));
    let limits = ServerLimits {
        max_request_bytes: config.max_request_bytes,
    };
    server::serve(listener, node.clone(), limits, shutdown).await;
    syncer.abort();
    handoff.abort();
    anti_entropy.abort();
    node.engine.sync()?;
    Ok(())
}

/// Runs anti-entropy rounds until the task is dropped (returns at once without peers).
async fn anti_entropy_periodically(node: Arc<StorageNode>, client: RpcClient) {
    let Some(interval) = node.aae.as_ref().map(|aae| aae.interval) else {
        return;
    };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; let the cluster come up first
    loop {
        ticks.tick().await;
        if let Some(aae) = &node.aae {
            aae.round(&node, &client).await;
        }
    }
}

async fn sync_periodically(engine: Arc<dyn Engine>) {
    let mut ticks = tokio::time::interval(SYNC_INTERVAL);
    loop {
        ticks.tick().await;
        let engine = engine.clone();
        match tokio::task::spawn_blocking(move || engine.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "journal sync failed"),
            Err(error) => tracing::error!(%error, "journal sync task failed"),
        }
    }
}

fn load_or_create_actor(engine: &dyn Engine) -> Result<ActorId> {
    if let Some(bytes) = engine.get(Tree::Meta, ACTOR_ID_KEY)? {
        let array: [u8; 8] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| Error::Internal("stored actor id is corrupt".into()))?;
        return Ok(u64::from_be_bytes(array));
    }
    let actor = crate::random::random_u64();
    engine.write(vec![WriteOp::put(
        Tree::Meta,
        ACTOR_ID_KEY,
        actor.to_be_bytes(),
    )])?;
    Ok(actor)
}

/// Entries of a tree, counted once at start.
fn count_entries(engine: &dyn Engine, tree: Tree) -> Result<i64> {
    let mut count = 0;
    storage::for_each(engine, tree, |_, _| count += 1)?;
    Ok(count)
}

/// Counts live and tombstoned keys, and fills the anti-entropy trees, once at start.
fn scan_data(engine: &dyn Engine, aae: Option<&AntiEntropy>) -> Result<(i64, i64)> {
    let (mut live, mut tombstoned, mut corrupt) = (0, 0, 0u64);
    storage::for_each(engine, Tree::Data, |key, bytes| {
        if let Some(aae) = aae {
            aae.record(key, None, Some(bytes));
        }
        match Siblings::decode(bytes) {
            Some(siblings) => {
                live += i64::from(siblings.is_live());
                tombstoned += i64::from(siblings.is_tombstoned());
            }
            None => corrupt += 1,
        }
    })?;
    if corrupt > 0 {
        // Reads and writes of these keys fail with "corrupt"; say so once at start.
        tracing::error!(corrupt, "stored sibling sets that cannot be decoded");
    }
    Ok((live, tombstoned))
}

/// A key as it appears in the request log: cut short and with control characters escaped.
fn printable_key(key: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    let mut shown: String = key
        .chars()
        .take(SHOWN_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if key.chars().nth(SHOWN_CHARS).is_some() {
        shown.push('…');
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StorageConfig;

    fn node() -> StorageNode {
        let config = NodeConfig {
            listen: "127.0.0.1:0".parse().expect("address"),
            peers: vec![],
            storage: StorageConfig::InMemory,
            log_requests: false,
            max_request_bytes: 1 << 20,
            ring: None,
            aae_interval: Duration::from_secs(1),
            aae_max_keys: 1000,
            // On, so that the stories below also check the cache stays true to the engine.
            cache_bytes: 1 << 20,
        };
        StorageNode::open(&config).expect("in-memory node opens")
    }

    fn put(node: &StorageNode, key: &str, value: Option<&str>) -> Siblings {
        let request = CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: key.into(),
            value: value.map(str::to_owned),
            context: None,
            hint_for: None,
        };
        node.coordinate(request).expect("coordinate")
    }

    fn counts(node: &StorageNode) -> (i64, i64) {
        (
            node.live_keys.load(Ordering::Relaxed),
            node.tombstone_keys.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn counts_follow_puts_deletes_and_reaps() {
        let node = node();
        put(&node, "a", Some("<value>1</value>"));
        put(&node, "b", Some("<value>2</value>"));
        assert_eq!(counts(&node), (2, 0));
        let tombstone = put(&node, "a", None);
        assert_eq!(counts(&node), (1, 1));
        let reaped = node.reap(&ReapRequest {
            key: "a".into(),
            dots: tombstone.dots().collect(),
        });
        assert!(reaped.expect("reap"));
        assert_eq!(counts(&node), (1, 0));
        assert!(
            node.read(&ReadRequest {
                key: "a".into(),
                hint_for: None
            })
            .expect("read")
            .is_empty()
        );
    }

    #[test]
    fn reap_spares_a_key_written_since() {
        let node = node();
        let tombstone = put(&node, "k", None);
        put(&node, "k", Some("<value>again</value>"));
        let reaped = node.reap(&ReapRequest {
            key: "k".into(),
            dots: tombstone.dots().collect(),
        });
        assert!(!reaped.expect("reap"));
        let held = node
            .read(&ReadRequest {
                key: "k".into(),
                hint_for: None,
            })
            .expect("read");
        assert_eq!(held.latest_value(), Some("<value>again</value>"));
    }

    #[test]
    fn merge_brings_a_replica_up_to_date_and_is_idempotent() {
        let coordinator = node();
        let replica = node();
        let set = put(&coordinator, "k", Some("<value>v</value>"));
        let request = MergeRequest {
            key: "k".into(),
            siblings: set.clone(),
            hint_for: None,
        };
        assert_eq!(replica.merge(request.clone()).expect("merge"), set);
        assert_eq!(replica.merge(request).expect("merge again"), set);
        assert_eq!(counts(&replica), (1, 0));
    }

    #[test]
    fn sibling_explosion_is_refused_until_resolved() {
        let node = node();
        let stale = Some(crate::version::VClock::new());
        let write = |context: Option<crate::version::VClock>| {
            node.coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: "k".into(),
                value: Some("<value>v</value>".into()),
                context,
                hint_for: None,
            })
        };
        for _ in 0..MAX_SIBLINGS {
            write(stale.clone()).expect("siblings up to the bound");
        }
        let error = write(stale.clone()).expect_err("one more sibling");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
        let held = node
            .read(&ReadRequest {
                key: "k".into(),
                hint_for: None,
            })
            .expect("read");
        assert_eq!(held.versions().len(), MAX_SIBLINGS);
        let resolved = write(Some(held.context())).expect("a write with the full context");
        assert_eq!(resolved.versions().len(), 1);
    }

    #[test]
    fn a_key_cannot_grow_past_the_byte_bound_until_resolved() {
        let node = node();
        let stale = Some(crate::version::VClock::new());
        let third = MAX_SET_VALUE_BYTES / 3 + 1;
        let write = |context: Option<crate::version::VClock>, bytes: usize| {
            node.coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: "k".into(),
                value: Some("x".repeat(bytes)),
                context,
                hint_for: None,
            })
        };
        write(stale.clone(), third).expect("a first sibling");
        write(stale.clone(), third).expect("a second");
        let error = write(stale.clone(), third).expect_err("a third would pass the bound");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
        assert!(
            error.fault_string().contains("MiB"),
            "{}",
            error.fault_string()
        );
        let held = node.load("k").expect("load");
        assert_eq!(held.versions().len(), 2, "the refused write left nothing");
        // A write that supersedes what it saw replaces both, so it fits.
        let resolved = write(Some(held.context()), third).expect("a resolving write");
        assert_eq!(resolved.versions().len(), 1);
        // So does a blind write: it supersedes what the node holds.
        let replaced = write(None, MAX_SET_VALUE_BYTES).expect("one value up to the bound");
        assert_eq!(replaced.value_bytes(), MAX_SET_VALUE_BYTES);
        let error = write(None, MAX_SET_VALUE_BYTES + 1).expect_err("one value over it");
        assert!(
            error.fault_string().contains("a value of"),
            "{}",
            error.fault_string()
        );

        // Siblings written at two replicas can merge past the bound; a delete or a resolving
        // write, which leave the set no heavier, still go through there.
        let other = super::tests::node();
        let half = MAX_SET_VALUE_BYTES / 2 + 1;
        let sibling = |node: &StorageNode| {
            node.coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: "m".into(),
                value: Some("y".repeat(half)),
                context: stale.clone(),
                hint_for: None,
            })
            .expect("a sibling within the bound")
        };
        sibling(&node);
        let two = sibling(&other);
        let merged = node
            .merge(MergeRequest {
                key: "m".into(),
                siblings: two,
                hint_for: None,
            })
            .expect("merge");
        assert!(
            merged.value_bytes() > MAX_SET_VALUE_BYTES,
            "two siblings past the bound"
        );
        let deleted = node
            .coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: "m".into(),
                value: None,
                context: stale.clone(),
                hint_for: None,
            })
            .expect("a delete of a heavy key");
        assert_eq!(deleted.value_bytes(), merged.value_bytes());
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "m".into(),
            value: Some("z".into()),
            context: Some(deleted.context()),
            hint_for: None,
        })
        .expect("a resolving write");
    }

    #[test]
    fn a_batch_defers_the_reads_past_its_reply_budget() {
        let node = node();
        let big = READ_REPLY_BUDGET / 2 + 1;
        for key in ["a", "b", "c"] {
            node.coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: key.into(),
                value: Some("x".repeat(big)),
                context: None,
                hint_for: None,
            })
            .expect("put");
        }
        let read = |key: &str| {
            Op::Read(ReadRequest {
                key: key.into(),
                hint_for: None,
            })
        };
        let replies = node.apply_batch(vec![read("a"), read("b"), read("c"), read("missing")]);
        assert_eq!(replies[0].value_bytes(), big);
        // The budget is passed once "b" is in the reply: what follows waits for a later batch.
        assert_eq!(replies[1].value_bytes(), big);
        assert_eq!(replies[2..], [OpReply::Deferred, OpReply::Deferred]);
        assert_eq!(
            node.metrics.reads.get(),
            2,
            "a deferred read counts when it runs"
        );
        let again = node.apply_batch(vec![read("c"), read("missing")]);
        assert_eq!(node.metrics.reads.get(), 4);
        assert_eq!(again[0].value_bytes(), big);
        assert!(matches!(&again[1], OpReply::Siblings(set) if set.is_empty()));
        // Writes whose replies pass the budget defer every read; sent again alone, the read
        // runs.
        let replies = node.apply_batch(vec![
            Op::Coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: "d".into(),
                value: Some("x".repeat(READ_REPLY_BUDGET + 1)),
                context: None,
                hint_for: None,
            }),
            read("missing"),
        ]);
        assert_eq!(replies[1], OpReply::Deferred);
        assert!(matches!(
            &node.apply_batch(vec![read("missing")])[..],
            [OpReply::Siblings(set)] if set.is_empty()
        ));
    }

    #[test]
    fn a_batch_applies_its_writes_in_order_and_answers_each() {
        let node = node();
        let write = |key: &str, value: &str, hint_for: Option<&str>| {
            Op::Coordinate(CoordinateRequest {
                entered_us: crate::clock::now_us(),
                key: key.into(),
                value: Some(value.into()),
                context: None,
                hint_for: hint_for.map(str::to_owned),
            })
        };
        let too_long = "k".repeat(messages::MAX_KEY_BYTES + 1);
        let replies = node.apply_batch(vec![
            write("k", "<value>1</value>", None),
            write("k", "<value>2</value>", None),
            Op::Read(ReadRequest {
                key: "k".into(),
                hint_for: None,
            }),
            write(&too_long, "<value>x</value>", None),
            write("other", "<value>3</value>", None),
            write("k", "<value>for B</value>", Some("127.0.0.1:1")),
        ]);
        let values = |reply: &OpReply| match reply {
            OpReply::Siblings(set) => set
                .versions()
                .iter()
                .filter_map(|v| v.value.clone())
                .collect::<Vec<_>>(),
            other => panic!("expected a sibling set, got {other:?}"),
        };
        assert_eq!(replies.len(), 6);
        assert_eq!(values(&replies[0]), ["<value>1</value>"]);
        // A blind write supersedes what the node holds, including the batch's own first write.
        assert_eq!(values(&replies[1]), ["<value>2</value>"]);
        assert_eq!(values(&replies[2]), ["<value>2</value>"]);
        match &replies[3] {
            OpReply::Fault { code, .. } => {
                assert_eq!(*code, crate::error::FAULT_INVALID_PARAMS)
            }
            other => panic!("a key over the limit: expected a fault, got {other:?}"),
        }
        assert_eq!(values(&replies[4]), ["<value>3</value>"]);
        // The hint is kept apart: it neither counts as a key nor changes the node's own copy.
        assert_eq!(values(&replies[5]), ["<value>for B</value>"]);
        assert_eq!(counts(&node), (2, 0));
        assert_eq!(node.hints.load(Ordering::Relaxed), 1);
        assert_eq!(
            node.load("k").expect("load").latest_value(),
            Some("<value>2</value>")
        );
    }

    /// A hint that cannot be decoded stays where it is (it may be the write's only other
    /// copy), and the node's metrics count it for as long as it is there.
    #[tokio::test]
    async fn a_corrupt_hint_is_counted_and_left_in_place() {
        let node = Arc::new(node());
        let slot = hints::slot("127.0.0.1:1", "k");
        node.engine
            .write(vec![WriteOp::put(
                Tree::Hints,
                slot.clone(),
                b"\xff\xff\xff".to_vec(),
            )])
            .expect("write");
        let client = RpcClient::new();
        for _ in 0..2 {
            assert_eq!(hints::handoff_round(&node, &client).await, 0);
            assert_eq!(node.corrupt_hints.load(Ordering::Relaxed), 1);
            assert!(node.metrics().contains("\ndynamite_node_hints_corrupt 1\n"));
        }
        assert!(node.engine.get(Tree::Hints, &slot).expect("read").is_some());
        // Once it is gone (an operator removed it), the count says so.
        node.engine
            .write(vec![WriteOp::remove(Tree::Hints, slot)])
            .expect("write");
        hints::handoff_round(&node, &client).await;
        assert_eq!(node.corrupt_hints.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_merge_in_a_batch_is_acknowledged_without_the_set() {
        let coordinator = node();
        let replica = node();
        let set = put(&coordinator, "m", Some("<value>v</value>"));
        let replies = replica.apply_batch(vec![Op::Merge(MergeRequest {
            key: "m".into(),
            siblings: set.clone(),
            hint_for: None,
        })]);
        assert_eq!(replies, [OpReply::Merged]);
        assert_eq!(replica.load("m").expect("load"), set);
    }

    /// An operation that reaches the node after its deadline is refused and leaves nothing
    /// behind, whatever it is; one within its deadline is applied as usual.
    #[test]
    fn operations_past_their_deadline_are_refused_unapplied() {
        let node = node();
        let now = crate::clock::now_us();
        let (past, future) = (now - 1_000_000, now + 60_000_000);
        let coordinate = |key: &str| {
            Op::Coordinate(CoordinateRequest {
                key: key.into(),
                value: Some("<value>v</value>".into()),
                context: None,
                hint_for: None,
                entered_us: now,
            })
        };
        let elsewhere = put(&super::tests::node(), "m", Some("<value>m</value>"));
        let merge = Op::Merge(MergeRequest {
            key: "m".into(),
            siblings: elsewhere.clone(),
            hint_for: None,
        });
        let read = Op::Read(ReadRequest {
            key: "k".into(),
            hint_for: None,
        });
        let replies = node.apply(vec![
            (coordinate("late"), past),
            (merge.clone(), past),
            (coordinate("k"), future),
            (read.clone(), past),
        ]);
        let late = |reply: &OpReply| matches!(reply, OpReply::Expired { late_by_us } if *late_by_us >= 1_000_000);
        assert!(late(&replies[0]), "{:?}", replies[0]);
        assert!(late(&replies[1]), "{:?}", replies[1]);
        assert!(matches!(&replies[2], OpReply::Siblings(set) if set.is_live()));
        assert!(late(&replies[3]), "{:?}", replies[3]);
        assert!(
            node.load("late").expect("load").is_empty(),
            "nothing applied"
        );
        assert!(node.load("m").expect("load").is_empty(), "nothing merged");
        assert_eq!(counts(&node), (1, 0));
        assert_eq!(node.metrics.expired.get(), 3);
        assert!(node.metrics().contains("\ndynamite_node_expired_total 3\n"));
        // The same merge in time goes through.
        assert_eq!(node.apply(vec![(merge, future)]), [OpReply::Merged]);
        assert_eq!(node.load("m").expect("load"), elsewhere);
        // So does a merge from anti-entropy, and the same one late is refused.
        let error = node
            .merge_own_many_until(vec![("n".into(), elsewhere.clone())], past)
            .expect_err("a late push");
        assert!(error.fault_string().contains("deadline"), "{error}");
        assert!(node.load("n").expect("load").is_empty());
    }

    /// A blind put that reaches the node after newer writes (it entered the cluster before
    /// them) supersedes only what is older than it: the newer write stays what a read shows.
    #[test]
    fn a_late_blind_put_leaves_newer_writes_in_place() {
        let node = node();
        let write = |value: &str, entered_us: u64| {
            node.coordinate(CoordinateRequest {
                key: "k".into(),
                value: Some(value.into()),
                context: None,
                hint_for: None,
                entered_us,
            })
            .expect("coordinate")
        };
        let now = crate::clock::now_us();
        write("<value>31</value>", now - 3_000);
        write("<value>33</value>", now - 1_000);
        let held = write("<value>32</value>", now - 2_000);
        assert_eq!(held.versions().len(), 2, "{held:?}");
        assert_eq!(held.latest_value(), Some("<value>33</value>"));
    }

    /// Once a key's tombstones are reaped, a write that entered before the delete and reaches
    /// the node only now (a put delayed within its deadline, a copy read before the delete
    /// arrived) must not bring the value back; a write that entered after it goes through.
    #[test]
    fn a_write_older_than_a_reaped_delete_does_not_bring_the_value_back() {
        let node = node();
        let now = crate::clock::now_us();
        let write = |value: Option<&str>, entered_us: u64| {
            node.coordinate(CoordinateRequest {
                key: "k".into(),
                value: value.map(str::to_owned),
                context: None,
                hint_for: None,
                entered_us,
            })
            .expect("coordinate")
        };
        write(Some("<value>old</value>"), now - 3_000);
        let tombstone = write(None, now - 2_000);
        assert!(
            node.reap(&ReapRequest {
                key: "k".into(),
                dots: tombstone.dots().collect(),
            })
            .expect("reap")
        );
        // A put that entered before the delete, arriving late.
        assert!(write(Some("<value>late</value>"), now - 2_500).is_empty());
        // A copy of the old value, from a replica that read it before the delete came.
        let mut old_copy = Siblings::new();
        old_copy.write(7, None, Some("<value>old</value>".into()), now - 3_000);
        node.merge(MergeRequest {
            key: "k".into(),
            siblings: old_copy,
            hint_for: None,
        })
        .expect("merge");
        assert!(node.load("k").expect("load").is_empty(), "still deleted");
        assert_eq!(counts(&node), (0, 0));
        // A put after the delete is a put.
        let again = write(Some("<value>again</value>"), now);
        assert_eq!(again.latest_value(), Some("<value>again</value>"));
    }

    /// A write stamped far ahead of this node's clock would win every read until that time
    /// came: the node refuses to coordinate it, and says why.
    #[test]
    fn a_write_stamped_far_ahead_of_the_node_clock_is_refused() {
        let node = node();
        let error = node
            .coordinate(CoordinateRequest {
                key: "k".into(),
                value: Some("<value>v</value>".into()),
                context: None,
                hint_for: None,
                entered_us: crate::clock::now_us() + 2 * MAX_ENTRY_AHEAD_US,
            })
            .expect_err("refused");
        assert!(error.fault_string().contains("ahead"), "{error}");
        assert!(node.load("k").expect("load").is_empty());
    }

    #[test]
    fn keys_over_the_limit_are_refused() {
        let node = node();
        let key = "k".repeat(messages::MAX_KEY_BYTES + 1);
        let error = node
            .read(&ReadRequest {
                key,
                hint_for: None,
            })
            .expect_err("too long");
        assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
    }
}
