//! A node's life: opening its storage (refusing a directory another process holds), loading
//! or drawing its actor id, counting what it holds; then serving, with the background tasks
//! (journal sync, hint handoff, anti-entropy); then stopping cleanly.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use crate::config::NodeConfig;
use crate::error::Result;
use crate::rpc::client::RpcClient;
use crate::rpc::server::{self, ServerLimits};
use crate::rpc::transport::Listener;
use crate::storage::{self, Engine, Tree};

use super::StorageNode;
use super::anti_entropy::AntiEntropy;
use super::census::Census;
use super::hints;
use super::key_locks::KeyLocks;
use super::reaped::ReapedTombstones;
use super::row_cache::RowCache;
use super::stamper::Stamper;
use super::surface::NodeMetrics;

/// How often the journal is forced to disk. Writes are acknowledged once the OS has them
/// (they survive a crash of the process); this bounds what a power loss can take.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);

impl StorageNode {
    /// Opens the node's storage (refusing a directory another process holds), loads its
    /// actor id, drawing a new one for fresh storage, and counts what it holds.
    pub fn open(config: &NodeConfig) -> Result<Self> {
        let node = Self::open_uncounted(config)?;
        node.census.run(&node)?;
        if let Some(aae) = node.aae() {
            aae.fill(&*node.engine)?;
        }
        Ok(node)
    }

    /// As [`Self::open`], leaving the count of what it holds to `Census::run`
    /// (figures low and anti-entropy waiting until then).
    pub(super) fn open_uncounted(config: &NodeConfig) -> Result<Self> {
        let engine = storage::open(&config.storage)?;
        let stamper = Stamper::start(&*engine)?;
        let membership = Arc::new(
            crate::membership::Membership::new(
                config.advertise.clone(),
                crate::membership::Role::Node,
                config.peers.clone(),
                u32::try_from(config.replicas).unwrap_or(3),
                config.zone.clone(),
                Some(engine.clone()),
            )?
            .with_client(RpcClient::with_outgoing(&config.security.outgoing)),
        );
        // Anti-entropy over the stored layout's newest version, or the one -s gives.
        let stored_layout = membership
            .routing()
            .map(|routing| routing.current().clone())
            .filter(|layout| layout.servers().contains(&config.advertise));
        let aae_metrics = Arc::new(super::anti_entropy::AaeMetrics::default());
        let layout = stored_layout.or_else(|| {
            config
                .ring
                .as_ref()
                .map(|ring| crate::layout::Layout::new(&ring.servers, ring.replicas))
        });
        let aae = match layout {
            Some(layout) => Some(Arc::new(AntiEntropy::from_layout(
                layout,
                &config.advertise,
                config.aae_interval,
                config.aae_max_keys,
                aae_metrics.clone(),
            )?)),
            None => None,
        };
        super::keys::convert(&*engine)?;
        let hints = count_entries(&*engine, Tree::Hints)?;
        Ok(StorageNode {
            engine,
            stamper,
            locks: KeyLocks::new(),
            live_keys: AtomicI64::new(0),
            tombstone_keys: AtomicI64::new(0),
            hints: AtomicI64::new(hints),
            corrupt_hints: AtomicI64::new(0),
            coordinator: crate::balancer::Balancer::for_node(
                crate::config::BalancerConfig::for_node(config),
                membership.clone(),
            ),
            aae: std::sync::RwLock::new(aae),
            aae_metrics,
            aae_interval: config.aae_interval,
            aae_max_keys: config.aae_max_keys,
            membership,
            syncing: AtomicI64::new(0),
            sync_progress: Default::default(),
            census: Census::pending(),
            reaped: ReapedTombstones::default(),
            strays: tokio::sync::Notify::new(),
            last_clock_warning_us: std::sync::atomic::AtomicU64::new(0),
            cache: RowCache::new(config.cache_bytes),
            log_requests: config.log_requests,
            data_dir: match &config.storage {
                crate::storage::StorageConfig::Log { dir, .. }
                | crate::storage::StorageConfig::Fjall { dir } => Some(dir.clone()),
                crate::storage::StorageConfig::InMemory
                | crate::storage::StorageConfig::Provided(_) => None,
            },
            port: config.listen.port(),
            metrics: NodeMetrics::default(),
        })
    }
}

/// Serves the node on `listener` (a `tokio::net::TcpListener`, or a simulated network's:
/// [`crate::rpc::transport`]) until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    listener: impl Listener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let node = Arc::new(StorageNode::open_uncounted(&config)?);
    tracing::info!(
        address = %config.listen,
        engine = node.engine.name(),
        tls = config.security.acceptor.is_some(),
        "storage node serving (counting its keys)"
    );
    {
        let node = node.clone();
        crate::runtime::spawn_blocking(move || {
            if let Err(error) = node.census.run(&node) {
                tracing::error!(%error, "counting the stored keys failed");
            }
        });
    }
    if let Some(aae) = node.aae() {
        fill_in_background(&node, aae);
    }
    let follow = tokio::spawn(follow_layout(node.clone()));
    let syncer = tokio::spawn(sync_periodically(node.engine.clone()));
    let client = || RpcClient::with_outgoing(&config.security.outgoing);
    let handoff = tokio::spawn(hints::handoff_periodically(node.clone(), client()));
    let anti_entropy = tokio::spawn(anti_entropy_periodically(node.clone(), client()));
    let rehome = tokio::spawn(super::rehome::rehome_until_done(node.clone(), client()));
    let gossip = {
        let reporter = node.clone();
        tokio::spawn(node.membership.clone().run(move || reporter.report()))
    };
    let sync = tokio::spawn(super::sync::sync_forever(node.clone()));
    let prober = tokio::spawn(crate::balancer::probe_periodically(Arc::new(
        node.coordinator.clone(),
    )));
    let sampler = {
        let node = node.clone();
        tokio::spawn(async move {
            crate::status::sample_forever(&node.metrics.requests_sampled, || {
                node.metrics.request_latency.snapshot()
            })
            .await;
        })
    };
    let limits = ServerLimits {
        max_request_bytes: config.max_request_bytes,
    };
    server::serve(
        listener,
        node.clone(),
        limits,
        config.security.clone(),
        shutdown,
    )
    .await;
    // The copies of writes this node coordinated, past W, land before it stops.
    node.coordinator.finish_tails().await;
    // The count of the keys, if it still runs, is a blocking task, which cannot be aborted:
    // the runtime gives it `runtime::LEFTOVER_TIMEOUT`, and the process ends without it.
    syncer.abort();
    handoff.abort();
    anti_entropy.abort();
    rehome.abort();
    gossip.abort();
    sync.abort();
    follow.abort();
    prober.abort();
    sampler.abort();
    node.engine.sync()?;
    node.stamper.mark_clean_stop(&*node.engine)?;
    Ok(())
}

/// Runs anti-entropy rounds until the task is dropped (returns at once without peers).
async fn anti_entropy_periodically(node: Arc<StorageNode>, client: RpcClient) {
    let mut ticks = tokio::time::interval(node.aae_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate; let the cluster come up first
    loop {
        ticks.tick().await;
        match node.aae() {
            // Its trees are complete once filled; they are built for one layout, and pause
            // while the cluster's is another (a transition moves data by its own means, see
            // `sync.rs`, and the trees are built anew once it is over).
            Some(aae) if aae.is_filled() && node.aae_layout_current(&aae) => {
                aae.round(&node, &client).await
            }
            _ => {}
        }
    }
}

/// Fills `aae`'s trees from the stored data, in the background.
fn fill_in_background(node: &Arc<StorageNode>, aae: Arc<AntiEntropy>) {
    let engine = node.engine.clone();
    crate::runtime::spawn_blocking(move || {
        let started = std::time::Instant::now();
        match aae.fill(&*engine) {
            Ok(()) => tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "anti-entropy trees filled"
            ),
            Err(error) => tracing::error!(%error, "filling the anti-entropy trees failed"),
        }
    });
}

/// Builds anti-entropy anew for each layout that is the only live one (the one at start may
/// be another: a node that joined, or a cluster that changed while this node was down), and
/// drops it for a node that is no member.
async fn follow_layout(node: Arc<StorageNode>) {
    let mut changes = node.membership.watch();
    loop {
        if let Some(routing) = node.membership.routing()
            && !routing.in_transition()
        {
            let layout = routing.current();
            let member = layout.servers().contains(&node.membership.me);
            let current = node.aae();
            let stale = current
                .as_ref()
                .is_none_or(|aae| aae.fingerprint() != layout.fingerprint());
            if !member && current.is_some() {
                *node
                    .aae
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                tracing::info!("not a member of the layout any more: anti-entropy stops");
            } else if member && stale {
                match AntiEntropy::from_layout(
                    layout.clone(),
                    &node.membership.me,
                    node.aae_interval,
                    node.aae_max_keys,
                    node.aae_metrics.clone(),
                ) {
                    Ok(aae) => {
                        let aae = Arc::new(aae);
                        *node
                            .aae
                            .write()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(aae.clone());
                        tracing::info!(
                            version = routing.current_version(),
                            "anti-entropy rebuilt for the layout"
                        );
                        fill_in_background(&node, aae);
                    }
                    Err(error) => tracing::error!(%error, "cannot build anti-entropy"),
                }
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

async fn sync_periodically(engine: Arc<dyn Engine>) {
    let mut ticks = tokio::time::interval(SYNC_INTERVAL);
    loop {
        ticks.tick().await;
        let engine = engine.clone();
        match crate::runtime::blocking(move || engine.sync()).await {
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
            disk_bytes: self.disk_bytes(),
        }
    }
}

/// Entries of a tree, counted once at start.
fn count_entries(engine: &dyn Engine, tree: Tree) -> Result<i64> {
    let mut count = 0;
    storage::for_each(engine, tree, |_, _| count += 1)?;
    Ok(count)
}
