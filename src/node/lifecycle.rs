//! A node's life: opening its storage (refusing a directory another process holds), loading
//! or drawing its actor id, counting what it holds; then serving, with the background tasks
//! (journal sync, hint handoff, anti-entropy); then stopping cleanly.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::rpc::client::RpcClient;
use crate::rpc::server::{self, ServerLimits};
use crate::storage::{self, Engine, Tree, WriteOp};
use crate::version::ActorId;

use super::StorageNode;
use super::anti_entropy::AntiEntropy;
use super::census::Census;
use super::hints;
use super::key_locks::KeyLocks;
use super::reaped::ReapedTombstones;
use super::row_cache::RowCache;
use super::surface::NodeMetrics;

/// How often the journal is forced to disk. Writes are acknowledged once the OS has them
/// (they survive a crash of the process); this bounds what a power loss can take.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

const ACTOR_ID_KEY: &[u8] = b"actor_id";

impl StorageNode {
    /// Opens the node's storage (refusing a directory another process holds), loads its
    /// actor id, drawing a new one for fresh storage, and counts what it holds.
    pub fn open(config: &NodeConfig) -> Result<Self> {
        let node = Self::open_uncounted(config)?;
        node.census.run(&node)?;
        Ok(node)
    }

    /// As [`Self::open`], leaving the count of what it holds to `Census::run`
    /// (figures low and anti-entropy waiting until then).
    pub(super) fn open_uncounted(config: &NodeConfig) -> Result<Self> {
        let engine = storage::open(&config.storage)?;
        let actor = load_or_create_actor(&*engine)?;
        let membership = Arc::new(crate::membership::Membership::new(
            config.advertise.clone(),
            crate::membership::Role::Node,
            config.peers.clone(),
            u32::try_from(config.replicas).unwrap_or(3),
            config.zone.clone(),
            Some(engine.clone()),
        )?);
        // Anti-entropy over the stored layout's newest version, or the one -s gives.
        let stored_layout = membership
            .routing()
            .map(|routing| routing.current().clone())
            .filter(|layout| layout.servers().contains(&config.advertise));
        let aae = match (stored_layout, &config.ring) {
            (Some(layout), _) => Some(AntiEntropy::from_layout(
                layout,
                &config.advertise,
                config.aae_interval,
                config.aae_max_keys,
            )?),
            (None, Some(ring)) => Some(AntiEntropy::new(
                ring,
                config.aae_interval,
                config.aae_max_keys,
            )?),
            (None, None) => None,
        };
        super::keys::convert(&*engine)?;
        let hints = count_entries(&*engine, Tree::Hints)?;
        Ok(StorageNode {
            engine,
            actor,
            locks: KeyLocks::new(),
            live_keys: AtomicI64::new(0),
            tombstone_keys: AtomicI64::new(0),
            hints: AtomicI64::new(hints),
            corrupt_hints: AtomicI64::new(0),
            aae,
            membership,
            syncing: AtomicI64::new(0),
            sync_progress: Default::default(),
            census: Census::pending(),
            reaped: ReapedTombstones::default(),
            last_clock_warning_us: std::sync::atomic::AtomicU64::new(0),
            cache: RowCache::new(config.cache_bytes),
            log_requests: config.log_requests,
            port: config.listen.port(),
            metrics: NodeMetrics::default(),
        })
    }
}

/// Serves the node on `listener` until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let node = Arc::new(StorageNode::open_uncounted(&config)?);
    tracing::info!(
        address = %config.listen,
        engine = node.engine.name(),
        "storage node serving (counting its keys)"
    );
    let census = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(error) = node.census.run(&node) {
                tracing::error!(%error, "counting the stored keys failed");
            }
        })
    };
    let syncer = tokio::spawn(sync_periodically(node.engine.clone()));
    let handoff = tokio::spawn(hints::handoff_periodically(node.clone(), RpcClient::new()));
    let anti_entropy = tokio::spawn(anti_entropy_periodically(node.clone(), RpcClient::new()));
    let rehome = tokio::spawn(super::rehome::rehome_until_done(
        node.clone(),
        RpcClient::new(),
    ));
    let gossip = {
        let reporter = node.clone();
        tokio::spawn(node.membership.clone().run(move || reporter.report()))
    };
    let sync = tokio::spawn(super::sync::sync_forever(node.clone()));
    let limits = ServerLimits {
        max_request_bytes: config.max_request_bytes,
    };
    server::serve(listener, node.clone(), limits, shutdown).await;
    drop(census); // a blocking task cannot be aborted; the process ends with it
    syncer.abort();
    handoff.abort();
    anti_entropy.abort();
    rehome.abort();
    gossip.abort();
    sync.abort();
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
        match &node.aae {
            // Its trees are complete once the start's count is; they are built for one
            // layout, and pause while the cluster's is another (a transition moves data
            // by its own means, see `sync.rs`).
            Some(aae) if node.census.is_done() && node.aae_layout_current(aae) => {
                aae.round(&node, &client).await
            }
            _ => {}
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

impl StorageNode {
    /// Whether anti-entropy's layout is the cluster's only live one.
    fn aae_layout_current(&self, aae: &AntiEntropy) -> bool {
        self.membership.routing().is_some_and(|routing| {
            !routing.in_transition() && routing.current().fingerprint() == aae.fingerprint()
        })
    }

    /// What this node says of itself in gossip and `cluster.status()`.
    pub fn report(&self) -> crate::membership::Report {
        crate::membership::Report {
            zone: self.membership.zone.clone(),
            layout_version: self
                .membership
                .routing()
                .map_or(0, |routing| routing.current_version()),
            syncing: u64::try_from(self.syncing.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(0),
            keys: u64::try_from(self.live_keys.load(std::sync::atomic::Ordering::Relaxed))
                .unwrap_or(0),
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
