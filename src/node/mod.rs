//! The storage node: a replica that keeps sibling sets in a storage engine.
//!
//! A node never decides placement or quorums; balancers do. It applies replica operations
//! that arrive in binary batches ([`crate::rpc::messages::Op`]): `coordinate` stamps a new
//! write with this node's actor id and stores it, `merge` folds in a sibling set another
//! replica or a read repair sends, `read` returns what the node holds, `reap` drops tombstones
//! every replica holds. Each is a read-modify-write of one key, serialised per key by a
//! striped lock so concurrent writes to a key merge instead of overwriting each other, and
//! each is in the engine's journal before the node answers. Writes a node takes for an
//! unreachable peer are kept apart as hints and handed over later ([`hints`]); nodes started
//! with peers also converge in the background ([`anti_entropy`]).
//!
//! For people, it also answers `get(key)` and `put(key, value)` on its own copy, and `stats()`.

pub mod anti_entropy;
pub mod hints;
mod key_locks;
mod reaped;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dxr::Value;
use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::rpc::client::RpcClient;
use crate::rpc::codec;
use crate::rpc::messages::{
    self, CoordinateRequest, MergeManyRequest, MergeRequest, Op, OpReply, ReadManyRequest,
    ReadRequest, ReapRequest, check_key,
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

/// How often the journal is forced to disk. Writes are acknowledged once the OS has them
/// (they survive a crash of the process); this bounds what a power loss can take.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Most versions one key may hold after a client's write. Writes from stale contexts pile up
/// siblings (each one concurrent with the rest); past this bound a write must resolve them,
/// so no key grows without limit and every merge stays cheap.
pub const MAX_SIBLINGS: usize = 64;

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
    /// Background convergence with the `-s` peers; `None` for a node without peers.
    aae: Option<AntiEntropy>,
    /// Tombstones reaped lately, refused if a replica sends them back.
    reaped: ReapedTombstones,
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
            aae,
            reaped: ReapedTombstones::default(),
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

    fn load(&self, key: &str) -> Result<Siblings> {
        Ok(self.load_raw(key)?.1)
    }

    /// The stored bytes of a key's own copy, and the sibling set they hold.
    fn load_raw(&self, key: &str) -> Result<(Option<Vec<u8>>, Siblings)> {
        match self.engine.get(Tree::Data, key.as_bytes())? {
            None => Ok((None, Siblings::new())),
            Some(bytes) => {
                let siblings = Siblings::decode(&bytes)
                    .ok_or_else(|| Error::Internal("stored sibling set is corrupt".into()))?;
                Ok((Some(bytes), siblings))
            }
        }
    }

    /// Read-modify-write of one key of this node's own data, under the key's lock.
    fn update(&self, key: &str, change: impl FnOnce(&mut Siblings)) -> Result<Siblings> {
        let _guard = self.locks.lock(key.as_bytes());
        let (old_bytes, mut siblings) = self.load_raw(key)?;
        // A version is identified by its dot, so comparing dots tells whether the set changed
        // without copying the values.
        let dots_before: Vec<Dot> = siblings.dots().collect();
        let (was_live, was_tombstoned) = (siblings.is_live(), siblings.is_tombstoned());
        change(&mut siblings);
        if !siblings.dots().eq(dots_before.iter().copied()) {
            let stored = (!siblings.is_empty()).then(|| siblings.encode());
            self.engine.write(vec![WriteOp {
                tree: Tree::Data,
                key: key.as_bytes().to_vec(),
                value: stored.clone(),
            }])?;
            if let Some(aae) = &self.aae {
                aae.record(key.as_bytes(), old_bytes.as_deref(), stored.as_deref());
            }
            let live = i64::from(siblings.is_live()) - i64::from(was_live);
            self.live_keys.fetch_add(live, Ordering::Relaxed);
            let dead = i64::from(siblings.is_tombstoned()) - i64::from(was_tombstoned);
            self.tombstone_keys.fetch_add(dead, Ordering::Relaxed);
        }
        Ok(siblings)
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

    /// Read-modify-write of the hint held for `owner`, under the slot's lock.
    fn update_hint(
        &self,
        owner: &str,
        key: &str,
        change: impl FnOnce(&mut Siblings),
    ) -> Result<Siblings> {
        let slot = hints::slot(owner, key);
        let _guard = self.locks.lock(&slot);
        let existing = self.load_hint(&slot, owner, key)?;
        let mut siblings = existing
            .as_ref()
            .map(|r| r.siblings.clone())
            .unwrap_or_default();
        change(&mut siblings);
        if existing.as_ref().map(|r| &r.siblings) != Some(&siblings) {
            let record = HintRecord {
                owner: owner.to_owned(),
                key: key.to_owned(),
                siblings,
            };
            let bytes = postcard::to_allocvec(&record)
                .map_err(|_| Error::Internal("hint could not be encoded".into()))?;
            self.engine.write(vec![WriteOp {
                tree: Tree::Hints,
                key: slot,
                value: Some(bytes),
            }])?;
            if existing.is_none() {
                self.hints.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(record.siblings);
        }
        Ok(siblings)
    }

    /// Drops a hint its owner accepted, unless it changed since it was read for delivery.
    pub fn drop_delivered_hint(&self, delivered: &HintRecord) -> Result<bool> {
        let slot = hints::slot(&delivered.owner, &delivered.key);
        let _guard = self.locks.lock(&slot);
        let current = self.load_hint(&slot, &delivered.owner, &delivered.key)?;
        if current.as_ref() != Some(delivered) {
            return Ok(false);
        }
        self.engine.write(vec![WriteOp {
            tree: Tree::Hints,
            key: slot,
            value: None,
        }])?;
        self.hints.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The node's own copy of a key (anti-entropy push).
    pub fn read_own(&self, key: &str) -> Result<Siblings> {
        self.load(key)
    }

    /// Merges a sibling set into the node's own copy (anti-entropy pull).
    pub fn merge_own(&self, key: &str, incoming: &Siblings) -> Result<Siblings> {
        check_key(key)?;
        if self.reaped.is_reaped(key, incoming) {
            return self.load(key);
        }
        self.update(key, |siblings| siblings.merge(incoming))
    }

    /// Applies `change` to the key's own copy, or to the hint held for `hint_for`.
    fn update_place(
        &self,
        key: &str,
        hint_for: Option<&str>,
        change: impl FnOnce(&mut Siblings),
    ) -> Result<Siblings> {
        match hint_for {
            None => self.update(key, change),
            Some(owner) => self.update_hint(owner, key, change),
        }
    }

    /// Removes a key whose tombstones every replica holds (the balancer checked), but only if
    /// this node still holds exactly those tombstones: anything written since keeps the key.
    pub fn reap(&self, request: &ReapRequest) -> Result<bool> {
        check_key(&request.key)?;
        self.log("reap", &request.key, false);
        let mut reaped = false;
        self.update(&request.key, |siblings| {
            let same: bool =
                siblings.is_tombstoned() && siblings.dots().eq(request.dots.iter().copied());
            if same {
                *siblings = Siblings::new();
                reaped = true;
            }
        })?;
        if reaped {
            self.reaped.remember(&request.key, request.dots.clone());
        }
        Ok(reaped)
    }

    pub fn coordinate(&self, request: CoordinateRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        self.log("put", &request.key, request.value.is_none());
        let now = now_ms();
        let CoordinateRequest {
            key,
            value,
            context,
            hint_for,
        } = request;
        let mut refused = None;
        let stored = self.update_place(&key, hint_for.as_deref(), |siblings| {
            let mut next = siblings.clone();
            next.write(self.actor, context.as_ref(), value, now);
            if next.versions().len() > MAX_SIBLINGS {
                refused = Some(next.versions().len());
            } else {
                *siblings = next;
            }
        })?;
        match refused {
            None => Ok(stored),
            Some(count) => Err(Error::invalid(format!(
                "the key would have {count} siblings (at most {MAX_SIBLINGS}); write with the context from get_versions to resolve them"
            ))),
        }
    }

    pub fn merge(&self, request: MergeRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        self.log("store", &request.key, false);
        let MergeRequest {
            key,
            siblings: incoming,
            hint_for,
        } = request;
        if hint_for.is_none() && self.reaped.is_reaped(&key, &incoming) {
            return self.load(&key);
        }
        self.update_place(&key, hint_for.as_deref(), |siblings| {
            siblings.merge(&incoming)
        })
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

    async fn batch(&self, body: bytes::Bytes) -> Result<Vec<u8>> {
        let ops: Vec<Op> = postcard::from_bytes(&body)
            .map_err(|_| Error::invalid("batch could not be decoded"))?;
        self.metrics.batches.inc();
        let replies: Vec<OpReply> = ops.into_iter().map(|op| self.apply(op)).collect();
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
        .gauge(
            "dynamite_node_keys",
            "Live keys stored here.",
            self.live_keys.load(Ordering::Relaxed),
        );
        out.finish()
    }
}

impl StorageNode {
    /// Runs one operation of a batch; a refusal becomes that operation's fault, not the batch's.
    fn apply(&self, op: Op) -> OpReply {
        let result = match op {
            Op::Coordinate(request) => {
                self.metrics.coordinates.inc();
                self.coordinate(request).map(OpReply::Siblings)
            }
            Op::Merge(request) => {
                self.metrics.merges.inc();
                self.merge(request).map(OpReply::Siblings)
            }
            Op::Read(request) => {
                self.metrics.reads.inc();
                self.read(&request).map(OpReply::Siblings)
            }
            Op::Reap(request) => {
                self.metrics.reaps.inc();
                self.reap(&request).map(OpReply::Reaped)
            }
        };
        result.unwrap_or_else(|error| {
            self.metrics.errors.inc();
            OpReply::Fault {
                code: error.fault_code(),
                message: error.fault_string(),
            }
        })
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
                let merged = tokio::task::block_in_place(|| {
                    for (key, siblings) in &request.entries {
                        self.merge_own(key, siblings)?;
                    }
                    Ok::<_, Error>(request.entries.len() as u64)
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
    let actor = random_u64();
    engine.write(vec![WriteOp {
        tree: Tree::Meta,
        key: ACTOR_ID_KEY.to_vec(),
        value: Some(actor.to_be_bytes().to_vec()),
    }])?;
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
    let (mut live, mut tombstoned) = (0, 0);
    storage::for_each(engine, Tree::Data, |key, bytes| {
        if let Some(aae) = aae {
            aae.record(key, None, Some(bytes));
        }
        if let Some(siblings) = Siblings::decode(bytes) {
            live += i64::from(siblings.is_live());
            tombstoned += i64::from(siblings.is_tombstoned());
        }
    })?;
    Ok((live, tombstoned))
}

/// A random 64-bit id from the standard library's per-process random hasher keys, mixed with
/// the time and process id, so no extra dependency is needed for one number per data directory.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
        };
        StorageNode::open(&config).expect("in-memory node opens")
    }

    fn put(node: &StorageNode, key: &str, value: Option<&str>) -> Siblings {
        let request = CoordinateRequest {
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
