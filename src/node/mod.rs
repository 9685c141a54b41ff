//! The storage node: a replica that keeps sibling sets in a storage engine.
//!
//! A node never decides placement or quorums; balancers do. It applies replica operations
//! that arrive in binary batches ([`crate::rpc::messages::Op`]): `coordinate` stamps a new
//! write with this node's actor id and stores it, `merge` folds in a sibling set another
//! replica or a read repair sends, `read` returns what the node holds, `reap` drops tombstones
//! every replica holds. Each is a read-modify-write of one key, serialised per key by a
//! striped lock so concurrent writes to a key merge instead of overwriting each other, and
//! each is in the engine's journal before the node answers.
//!
//! A walk through its files:
//!
//! - [`replica`]: what an operation does to one key's sibling set, as pure functions
//!   (admission limits, stamping, merging, reaping);
//! - `operations.rs`: those rules applied to the node's own copies and hints, each under the
//!   key's lock in a transaction (`transaction.rs`: one journal write for a whole batch);
//! - `batch.rs`: a batch from the wire run as one transaction, operations past their
//!   deadline refused, reads deferred past the reply budget;
//! - `surface.rs`: the XML-RPC methods, `stats()` and `/metrics`, from one list of counters;
//! - `lifecycle.rs`: opening the storage, the background tasks, serving and stopping;
//!   `census.rs`: the count of what the node holds, made in the background after start;
//! - [`hints`] (writes held for an unreachable peer, and their handoff), [`anti_entropy`]
//!   (background convergence with the `-s` peers), `reaped.rs` (recently reaped deletes),
//!   `row_cache.rs` (stored bytes of recently used keys), `stamper.rs` (the actor id, and
//!   the highest dot counter stamped under it), `key_locks.rs`.
//!
//! For people, it also answers `get(key)` and `put(key, value)` on its own copy, and `stats()`.

pub mod anti_entropy;
mod batch;
mod census;
pub mod hints;
mod key_locks;
pub mod keys;
mod lifecycle;
mod operations;
mod reaped;
pub mod rehome;
pub mod replica;
pub mod request;
mod row_cache;
mod stamper;
mod surface;
pub mod sync;
mod transaction;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use crate::error::{Error, Result};
use crate::storage::{Engine, Tree};
use crate::version::{ActorId, Siblings};
use anti_entropy::AntiEntropy;
use hints::HintRecord;
use key_locks::KeyLocks;
use reaped::ReapedTombstones;
use row_cache::RowCache;
use surface::NodeMetrics;

pub use batch::READ_REPLY_BUDGET;
pub use lifecycle::{SYNC_INTERVAL, run};
pub use replica::{MAX_ENTRY_AHEAD_US, MAX_SET_VALUE_BYTES, MAX_SIBLINGS};

pub struct StorageNode {
    engine: Arc<dyn Engine>,
    /// Its actor id, and the highest dot counter stamped under it.
    stamper: stamper::Stamper,
    locks: KeyLocks,
    /// Keys with at least one live sibling; counted at start (`census`), then kept up to
    /// date per write.
    live_keys: AtomicI64,
    /// Keys whose every sibling is a tombstone, waiting to be reaped.
    tombstone_keys: AtomicI64,
    /// Hints held for other nodes.
    hints: AtomicI64,
    /// Hints that cannot be decoded, as the last handoff pass found them (see
    /// [`hints::handoff_round`]).
    corrupt_hints: AtomicI64,
    /// Background convergence with the peers sharing partitions; `None` for a node without
    /// a layout at start. Built for one layout: it pauses while the layout is another.
    aae: std::sync::RwLock<Option<Arc<AntiEntropy>>>,
    /// Anti-entropy's counters, kept across rebuilds of its trees.
    aae_metrics: Arc<anti_entropy::AaeMetrics>,
    aae_interval: std::time::Duration,
    aae_max_keys: usize,
    /// Coordinates `put`, `get`, `get_versions` and `delete` for the whole cluster, with a
    /// balancer's code and semantics.
    pub coordinator: crate::balancer::Balancer,
    /// The layout history, gossip and `cluster.*`.
    pub membership: Arc<crate::membership::Membership>,
    /// Partitions still to receive for the newest layout version.
    syncing: AtomicI64,
    sync_progress: std::sync::Mutex<sync::Progress>,
    /// The count of the keys and the anti-entropy trees, made once after start.
    census: census::Census,
    /// Tombstones reaped lately, refused if a replica sends them back.
    reaped: ReapedTombstones,
    /// Wakes rehoming: a write stored a key that no live layout version places here (a
    /// router that had not yet heard that a transition ended still wrote to an old replica).
    /// Without it such a key would stay until the next layout change.
    strays: tokio::sync::Notify,
    /// When the log last said this node refused writes for its clock (microseconds).
    last_clock_warning_us: std::sync::atomic::AtomicU64,
    /// Stored bytes of recently used keys of the `Data` tree.
    cache: RowCache,
    log_requests: bool,
    /// Where the engine keeps its files (`None` in memory), for the disk it uses.
    data_dir: Option<std::path::PathBuf>,
    /// Shown on each request line, so that nodes sharing a terminal can be told apart.
    port: u16,
    metrics: NodeMetrics,
}

impl StorageNode {
    pub fn actor(&self) -> ActorId {
        self.stamper.actor()
    }

    /// Whether some live layout version of `routing` places `partition` on this node.
    fn replicates_partition(&self, routing: &crate::membership::Routing, partition: usize) -> bool {
        let me = &self.membership.me;
        routing.layouts.iter().any(|(_, layout)| {
            let servers = layout.servers();
            layout
                .replicas_of(partition)
                .iter()
                .any(|&server| servers.get(usize::from(server)) == Some(me))
        })
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// Anti-entropy as it is now (built for the current layout, or none).
    pub fn aae(&self) -> Option<Arc<AntiEntropy>> {
        self.aae
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The key's own copy, for a reader that does not hold the key's lock.
    fn load(&self, key: &str) -> Result<Siblings> {
        let stored_key = keys::data_key(key.as_bytes());
        let stored: Option<Arc<[u8]>> = match self.cache.get(&stored_key) {
            Some(bytes) => Some(bytes),
            None => self.engine.get(Tree::Data, &stored_key)?.map(Arc::from),
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

    /// The line per request, to watch the keys spread over the nodes: an info event
    /// `request` with the node's `port`, the operation as `method` and the `key`, cut to
    /// [`LOGGED_KEY_CHARS`] characters (a key may be 64 KiB), with `key_bytes`, the whole
    /// key's length, when it was cut. The formatter escapes the key: quoted in text, a JSON
    /// string in JSON. Off with `--quiet`, or with `RUST_LOG` above info (the fields are then
    /// not even computed).
    fn log(&self, operation: &str, key: &str, delete: bool) {
        if self.log_requests {
            let method = if delete { "delete" } else { operation };
            let (shown, cut) = logged_key(key);
            tracing::info!(
                port = self.port,
                method = %method,
                key = shown,
                key_bytes = cut.then_some(key.len()),
                "request"
            );
        }
    }
}

/// The most characters of a key the request log shows.
const LOGGED_KEY_CHARS: usize = 80;

/// The start of `key` the request log shows, and whether it is cut short.
fn logged_key(key: &str) -> (&str, bool) {
    match key.char_indices().nth(LOGGED_KEY_CHARS) {
        Some((end, _)) => (&key[..end], true),
        None => (key, false),
    }
}

#[cfg(test)]
mod tests;
