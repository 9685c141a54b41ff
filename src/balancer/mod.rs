//! The load balancer: Dynamo's request coordinator.
//!
//! It owns the layout and nothing else: no data, no state that must survive it, so any number of
//! balancers run side by side over the same nodes. For each request it computes the key's
//! replicas (the preference list, with down nodes replaced by fallbacks: [`targets`], fed by
//! the failure detector in `health`) and drives them:
//!
//! - **put / delete**: the balancer reads the time the request entered the cluster on the
//!   cluster clock ([`crate::clock`]); the first preferred replica that answers
//!   *coordinates*: it stamps the write with its dot and that entry time, and stores it (see
//!   [`crate::version`] for why the dot is a node's, and why a blind write supersedes only
//!   what entered before it). A first replica that is lagging (work outstanding, nothing
//!   answered for a couple of milliseconds: see [`node_queue`]) is passed over for the
//!   next preferred one, as Dynamo lets any of the top N coordinate, so a write does not
//!   queue behind a stall. Its reconciled sibling set then goes to the other replicas in
//!   parallel (fallbacks keep it as a hint), and the client gets `"200"` once W replicas have
//!   it in their journal.
//! - **get**: every replica is asked in parallel; the answer goes out after R replies, merged.
//!   The stragglers are still awaited (each bounded by the timeout); then every replica that
//!   answered with less gets the merged set (read repair), or the key is reaped when all N
//!   hold the same old tombstones; both off the client's path.
//!
//! The rules are the pure machines of [`coordinator`], one per request, with table tests;
//! this module is their async shell: it plans the targets, sends what a machine asks, feeds
//! it the replies with the time on the cluster clock, and answers the client. Every replica
//! call travels in a batch to its node ([`node_queue`]) and is bounded by the replica
//! timeout (or the request's own `timeout_ms`: see [`request`] for the per-request options);
//! nothing outlives it, on the node either: each operation carries the moment the balancer
//! stops waiting for it, and a node refuses one that arrives later.

pub mod coordinator;
pub mod explain;
mod health;
pub mod node_queue;
pub mod request;
pub mod targets;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dxr::Value;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::oneshot;

use crate::clock::micros;
use crate::config::BalancerConfig;
use crate::error::{Error, QuorumKind, Result};
use crate::layout::Layout;
use crate::membership::{Membership, Report, Routing};
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::codec;
use crate::rpc::messages::{Op, OpReply};
use crate::rpc::server::{self, Handler, ServerLimits};
use crate::rpc::transport::Listener;
use crate::telemetry::{Counter, Figure};
use crate::version::{Siblings, VClock};
use coordinator::{Action, Event, Machine, Read, Receipt, Servers, Write, WriteRequest};
use health::Health;
use node_queue::NodeQueue;
use request::{ReadOptions, Request, WriteOptions, quorum_for};
use targets::Plan;

/// Extra wait after the grace period before a delete's tombstones are checked, so that the
/// tombstones are strictly older than the grace period when the check runs.
const TOMBSTONE_CHECK_SLACK: Duration = Duration::from_millis(100);

/// How many times a delete's tombstones are checked for reaping: once after the grace
/// period, then again while the key still reads as deleted, [`TOMBSTONE_RECHECK_AFTER`]
/// later, then twice that, and so on (about 15 s in all).
const TOMBSTONE_CHECKS: u32 = 5;
const TOMBSTONE_RECHECK_AFTER: Duration = Duration::from_secs(1);

/// How far a balancer's entry times may run ahead of the cluster clock to stay increasing
/// when the clock's estimate moves back (the median node changed, an estimate improved: a
/// few milliseconds between NTP-kept machines). Moved back further, the estimate was wrong
/// before, and entry times follow the clock rather than stay ahead of every other
/// balancer's.
const MAX_ENTRY_CARRY: Duration = Duration::from_secs(1);

/// How long a balancer waits for the nodes' clocks to be measured, at start or before its
/// first write.
const MEASURE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Default)]
struct BalancerMetrics {
    puts: Counter,
    gets: Counter,
    get_versions: Counter,
    deletes: Counter,
    write_quorum_failures: Counter,
    read_quorum_failures: Counter,
    replica_failures: Counter,
    /// Writes coordinated by a later preferred replica because the first was lagging.
    coordinator_switches: Counter,
    /// Writes answered 503 because their coordinator took them and did not answer.
    outcomes_unknown: Counter,
    read_repairs: Counter,
    reaps: Counter,
    /// Client requests' time, by method.
    request_latency: crate::telemetry::HistogramFamily,
    /// Replica operations' time (queueing, batch and answer), by node.
    replica_latency: crate::telemetry::HistogramFamily,
    /// Snapshots of `request_latency` for the status page's charts.
    requests_sampled: crate::status::Sampler,
}

/// The coordinator; cheap to clone (shared state behind an `Arc`), so spawned tasks own a copy.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    config: BalancerConfig,
    /// The layout history, learned from the seeds and followed by gossip.
    membership: Arc<Membership>,
    /// What requests route with, made from the membership's snapshot.
    topology: std::sync::RwLock<Option<Arc<Topology>>>,
    /// One batching queue per storage node ever routed to, by address.
    queues: std::sync::Mutex<std::collections::HashMap<String, Arc<NodeQueue>>>,
    client: RpcClient,
    metrics: BalancerMetrics,
    /// Why no node answered the last clock measurement, when none did: said in the 503 a
    /// write gets then (a node not trusting our certificate, a wrong port...).
    unmeasured_reason: std::sync::Mutex<Option<String>>,
    /// The last entry time handed out, so that requests entering one after another get
    /// increasing times even when the cluster clock's estimate moves back a little.
    last_entry_us: AtomicU64,
    /// Requests' tails still running, for a stop to let them end.
    tails: Arc<Tails>,
}

/// What requests still do after their answer (a write's copies past W, hinted ones among
/// them; a read's repairs), counted, so that a stopping daemon lets them land instead of
/// cutting them: the runtime drops whatever task is left when the daemon's `run` returns.
#[derive(Default)]
struct Tails {
    running: std::sync::atomic::AtomicUsize,
    ended: tokio::sync::Notify,
}

/// One running tail, counted out when dropped (its task ended, or was dropped).
struct Tail(Arc<Tails>);

impl Tails {
    fn start(self: &Arc<Self>) -> Tail {
        self.running.fetch_add(1, Ordering::SeqCst);
        Tail(self.clone())
    }

    /// Resolves once no tail runs.
    async fn all_ended(&self) {
        loop {
            let ended = self.ended.notified();
            let mut ended = std::pin::pin!(ended);
            ended.as_mut().enable();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.ended.notify_waiters();
        }
    }
}

/// What requests route with: the membership's snapshot, with the balancer's per-node state
/// for every server of every live layout version. A request holds it for its whole life, which
/// is how the balancer knows when no request still routes with an older layout.
pub struct Topology {
    routing: Arc<Routing>,
    /// Every server of every live version, sorted, as the coordinator's machines name them.
    servers: Servers,
    nodes: Vec<Arc<NodeQueue>>,
    health: Health,
    /// Per live version (in `routing.layouts` order): the layout's server index to ours.
    maps: Vec<Vec<usize>>,
}

impl Topology {
    fn address(&self, server: usize) -> &str {
        self.servers.0.get(server).map_or("?", String::as_str)
    }

    /// `key`'s walk in live version `version` (index), in our server indexes.
    fn walk(&self, version: usize, key: &str) -> Vec<usize> {
        let layout = &self.routing.layouts[version].1;
        let map = &self.maps[version];
        layout.walk(key.as_bytes()).map(|s| map[s]).collect()
    }
}

impl Balancer {
    /// A coordinator routing with `membership`: a storage node's own, or (from [`Self::new`])
    /// a balancer's.
    pub fn for_node(config: BalancerConfig, membership: Arc<Membership>) -> Self {
        let beacon = Arc::new(crate::membership::Beacon(Arc::downgrade(&membership)));
        let client = RpcClient::with_outgoing(&config.security.outgoing)
            .with_beacon(beacon)
            .with_clocks(membership.clocks());
        Balancer {
            shared: Arc::new(Shared {
                config,
                membership,
                topology: std::sync::RwLock::new(None),
                queues: Default::default(),
                client,
                metrics: BalancerMetrics::default(),
                last_entry_us: AtomicU64::new(0),
                tails: Arc::default(),
                unmeasured_reason: std::sync::Mutex::new(None),
            }),
        }
    }

    pub fn new(config: BalancerConfig) -> Self {
        let me = format!(
            "balancer-{:08x}@{}",
            crate::random::random_u64() as u32,
            config.listen
        );
        let replicas = u32::try_from(config.layout_replicas).unwrap_or(3);
        let membership = Membership::gateway(me, config.servers.clone(), replicas)
            .with_client(RpcClient::with_outgoing(&config.security.outgoing));
        Self::for_node(config, Arc::new(membership))
    }

    /// The topology requests route with now; a 503 before the balancer learned a layout.
    fn topology(&self) -> Result<Arc<Topology>> {
        let shared = &self.shared;
        let current = shared.membership.routing();
        {
            let held = shared
                .topology
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match (&*held, &current) {
                (Some(topology), Some(routing)) if Arc::ptr_eq(&topology.routing, routing) => {
                    return Ok(topology.clone());
                }
                (_, None) => {
                    return Err(Error::Quorum {
                        kind: QuorumKind::Read,
                        needed: 1,
                        answered: 0,
                        replicas: 0,
                        detail: Some(
                            "no layout known here yet: a balancer learns it from its -s seeds, \
                             a node from its -s seeds or from a balancer over it"
                                .into(),
                        ),
                    });
                }
                _ => {}
            }
        }
        let routing = current.ok_or_else(|| Error::Internal("no layout".into()))?;
        let mut held = shared
            .topology
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(topology) = &*held
            && Arc::ptr_eq(&topology.routing, &routing)
        {
            return Ok(topology.clone());
        }
        let all = routing.all_servers();
        let nodes: Vec<Arc<NodeQueue>> = {
            let mut queues = shared
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            all.iter()
                .map(|address| {
                    queues
                        .entry(address.clone())
                        .or_insert_with(|| {
                            Arc::new(
                                NodeQueue::new(
                                    address.clone(),
                                    shared.client.clone(),
                                    shared.config.replica_timeout,
                                )
                                .with_latency(shared.metrics.replica_latency.series(address)),
                            )
                        })
                        .clone()
                })
                .collect()
        };
        let health = Health::new(&all);
        if let Some(old) = &*held {
            health.carry_from(&old.health);
        }
        let maps = routing
            .layouts
            .iter()
            .map(|(_, layout)| {
                layout
                    .servers()
                    .iter()
                    .map(|address| all.binary_search(address).unwrap_or(0))
                    .collect()
            })
            .collect();
        let topology = Arc::new(Topology {
            routing,
            servers: Servers(all.into()),
            nodes,
            health,
            maps,
        });
        *held = Some(topology.clone());
        Ok(topology)
    }

    /// N, and R or W, for a layout: the flags when given, else a majority of its N.
    fn quorum(&self, layout: &Layout, explicit: Option<usize>) -> (usize, usize) {
        let n = layout.replicas().max(1);
        let needed = explicit.unwrap_or_else(|| crate::quorum::majority(n));
        (n, needed.clamp(1, n))
    }

    /// The replicas a read of `key` asks: R of the version reads use (see
    /// [`targets::plan`]), as the failure detector sees the nodes now; `r` is the request's
    /// own R, if it asked for one (-32602 above the key's N).
    fn plan_read(&self, topology: &Topology, key: &str, r: Option<usize>) -> Result<(Plan, usize)> {
        let version = topology.routing.read;
        let layout = &topology.routing.layouts[version].1;
        let (n, default) = self.quorum(layout, self.shared.config.explicit_read);
        let r = quorum_for(r, "r", n, default)?;
        let walk = topology.walk(version, key);
        Ok((
            targets::plan(&walk, n, r, |server| topology.health.is_up(server)),
            n,
        ))
    }

    /// The replicas a write of `key` reaches: W of every live version's (the version reads
    /// use first, so that one of its replicas coordinates); `w` is the request's own W, if
    /// it asked for one, needed of each version's replicas alike (-32602 above a version's N).
    fn plan_write(&self, topology: &Topology, key: &str, w: Option<usize>) -> Result<Plan> {
        let read = topology.routing.read;
        let order = std::iter::once(read).chain((0..topology.maps.len()).filter(|&v| v != read));
        let plans = order
            .map(|version| {
                let layout = &topology.routing.layouts[version].1;
                let (n, default) = self.quorum(layout, self.shared.config.explicit_write);
                let w = quorum_for(w, "w", n, default)?;
                let walk = topology.walk(version, key);
                Ok(targets::plan(&walk, n, w, |server| {
                    topology.health.is_up(server)
                }))
            })
            .collect::<Result<_>>()?;
        Ok(targets::combine(plans))
    }

    /// One operation on one replica, bounded by `timeout` (the replica timeout, or the
    /// request's own `timeout_ms`); records the outcome in `health`. Operations travel in
    /// batches per node (see [`NodeQueue`]).
    async fn call_replica(
        &self,
        topology: &Topology,
        server: usize,
        op: Op,
        timeout: Duration,
    ) -> std::result::Result<OpReply, CallError> {
        let shared = &self.shared;
        let result = topology.nodes[server].call(op, timeout).await;
        match &result {
            Ok(_) => topology.health.mark_up(server),
            Err(error) => {
                shared.metrics.replica_failures.inc();
                tracing::debug!(server = topology.address(server), %error, "replica call failed");
                // A request's own bound, shorter than the replica timeout, running out says
                // nothing of the node: a client asking for 1 ms must not mark nodes down for
                // everyone. (A node that is really hung is still found stuck by its queue.)
                let own_bound = matches!(error, CallError::Timeout | CallError::TimedOutUnsent)
                    && timeout < shared.config.replica_timeout;
                if !own_bound {
                    topology.health.record_failure(server, error);
                }
            }
        }
        result
    }

    /// Runs a request's machine to its end in a task of its own: sends what it asks, feeds
    /// it every reply with the cluster clock's time, counts what it notes. The client's
    /// answer comes out on the returned channel as soon as the machine gives it; the task
    /// stays for the rest (a write's copies, a read's stragglers and repairs), so what the
    /// machine decides after the answer happens even if the client has gone. One task drives
    /// all of a request's calls (a task per call cost a spawn and a wake-up each, in the
    /// profile), and nothing outlives `timeout`, which bounds each call: the replica timeout,
    /// or the request's own `timeout_ms`.
    ///
    /// The task ends with what the machine noted, for whoever waits for the whole request.
    fn drive<M: Machine>(
        &self,
        topology: Arc<Topology>,
        mut machine: M,
        first: Vec<Action<M::Output>>,
        timeout: Duration,
    ) -> (
        oneshot::Receiver<Result<M::Output>>,
        tokio::task::JoinHandle<Vec<Event>>,
    ) {
        let (answer, answered) = oneshot::channel();
        let this = self.clone();
        let tail = self.shared.tails.start();
        let finished = tokio::spawn(async move {
            let _tail = tail;
            let mut noted = Vec::new();
            let mut answer = Some(answer);
            let mut pending = FuturesUnordered::new();
            let mut actions = first;
            loop {
                for action in actions {
                    match action {
                        Action::Send(target, op) => {
                            let this = this.clone();
                            let topology = topology.clone();
                            pending.push(async move {
                                let reply = this
                                    .call_replica(&topology, target.server, op, timeout)
                                    .await;
                                (target, reply)
                            });
                        }
                        Action::Answer(result) => {
                            if let Some(answer) = answer.take() {
                                // The client may have gone: the rest goes on regardless.
                                let _ = answer.send(result);
                            }
                        }
                        Action::Note(event) => {
                            this.note(event);
                            noted.push(event);
                        }
                    }
                }
                let Some((target, reply)) = pending.next().await else {
                    break;
                };
                let now_us = this.shared.client.clocks().cluster_now_us();
                actions = machine.on_reply(target, reply, now_us);
            }
            noted
        });
        (answered, finished)
    }

    /// Waits for the answer [`Self::drive`] gives.
    async fn answer<T>(answered: oneshot::Receiver<Result<T>>) -> Result<T> {
        answered
            .await
            .map_err(|_| Error::Internal("the request ended without an answer".into()))?
    }

    fn note(&self, event: Event) {
        let metrics = &self.shared.metrics;
        match event {
            Event::CoordinatorSwitched => metrics.coordinator_switches.inc(),
            Event::OutcomeUnknown => metrics.outcomes_unknown.inc(),
            Event::QuorumFailed(QuorumKind::Write) => metrics.write_quorum_failures.inc(),
            Event::QuorumFailed(QuorumKind::Read) => metrics.read_quorum_failures.inc(),
            Event::ReadRepairs(count) => metrics.read_repairs.add(count as u64),
            Event::Reaped => metrics.reaps.inc(),
        }
    }

    /// The time a request entering now entered the cluster: the cluster clock, in
    /// microseconds, after any entry time this balancer handed out before, unless the
    /// cluster clock moved back by more than [`MAX_ENTRY_CARRY`] (then it follows the
    /// clock). A balancer that has measured no node's clock yet measures them first, and
    /// stamps nothing while none answers: its own clock may be far off.
    async fn entry_time_us(&self) -> Result<u64> {
        let clocks = self.shared.client.clocks();
        if clocks.measured() == 0 {
            self.measure_clocks().await;
            if clocks.measured() == 0 {
                let config = &self.shared.config;
                self.note(Event::QuorumFailed(QuorumKind::Write));
                return Err(Error::Quorum {
                    kind: QuorumKind::Write,
                    needed: config.write_quorum,
                    answered: 0,
                    replicas: config.replicas,
                    detail: Some(format!(
                        "no storage node has answered yet, so the cluster's time is unknown{}",
                        self.shared
                            .unmeasured_reason
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .as_ref()
                            .map(|reason| format!("; {reason}"))
                            .unwrap_or_default()
                    )),
                });
            }
        }
        let now = clocks.cluster_now_us();
        let last = &self.shared.last_entry_us;
        let mut previous = last.load(Ordering::Relaxed);
        loop {
            let carried = previous.saturating_add(1);
            let next = if carried > now.saturating_add(micros(MAX_ENTRY_CARRY)) {
                tracing::warn!(
                    back_ms = (carried - now) / 1000,
                    "the cluster clock moved back; entry times follow it"
                );
                now
            } else {
                now.max(carried)
            };
            match last.compare_exchange_weak(previous, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(next),
                Err(current) => previous = current,
            }
        }
    }

    /// Asks every node for `GET /health`, which measures its clock (see [`crate::clock`]).
    async fn measure_clocks(&self) {
        let shared = &self.shared;
        let servers = match self.topology() {
            Ok(topology) => topology.servers.0.to_vec(),
            Err(_) => shared.config.servers.clone(),
        };
        let probes = servers.iter().map(|address| async move {
            let checked = shared.client.check_health(address, MEASURE_TIMEOUT).await;
            checked.map_err(|why| format!("{address}: {why}"))
        });
        let failures: Vec<String> = futures_util::future::join_all(probes)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if failures.len() == servers.len()
            && let Some(first) = failures.first()
        {
            tracing::warn!(reason = %first, "no storage node answered GET /health");
            *shared
                .unmeasured_reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(first.clone());
        }
    }

    /// A put (`value` Some) or delete (`value` None) through a coordinating replica; the
    /// request entered the cluster at `entered_us` (see [`Self::entry_time_us`]). Answers
    /// the receipt when `options` asked for one.
    pub async fn write(
        &self,
        key: String,
        value: Option<String>,
        context: Option<VClock>,
        entered_us: u64,
        options: WriteOptions,
    ) -> Result<Option<Receipt>> {
        let topology = self.topology()?;
        let mut plan = self.plan_write(&topology, &key, options.w)?;
        let (order, switched) =
            targets::order_for_write(std::mem::take(&mut plan.targets), |server| {
                topology.nodes[server].is_lagging()
            });
        plan.targets = order;
        let request = WriteRequest {
            key,
            value,
            context,
            entered_us,
            receipt: options.receipt,
        };
        let timeout = options
            .timeout
            .unwrap_or(self.shared.config.replica_timeout);
        let (machine, first) = Write::start(topology.servers.clone(), request, plan, switched);
        Self::answer(self.drive(topology, machine, first, timeout).0).await
    }

    /// Reads the key from R replicas and returns their merged sibling set; read repair (or
    /// reaping) follows in the background once the stragglers answered.
    pub async fn read(&self, key: String, options: ReadOptions) -> Result<Siblings> {
        Self::answer(self.start_read(key, options)?.0).await
    }

    #[allow(clippy::type_complexity)]
    fn start_read(
        &self,
        key: String,
        options: ReadOptions,
    ) -> Result<(
        oneshot::Receiver<Result<Siblings>>,
        tokio::task::JoinHandle<Vec<Event>>,
    )> {
        let shared = &self.shared;
        let topology = self.topology()?;
        let (plan, n) = self.plan_read(&topology, &key, options.r)?;
        // No tombstone is reaped while a transition runs: a replica of another version may
        // not hold it yet, and would bring the deleted value back.
        let grace_us = if topology.routing.in_transition() {
            u64::MAX
        } else {
            micros(shared.config.tombstone_grace)
        };
        let timeout = options.timeout.unwrap_or(shared.config.replica_timeout);
        let (machine, first) = Read::start(topology.servers.clone(), key, plan, n, grace_us);
        Ok(self.drive(topology, machine, first, timeout))
    }

    /// A delete's tombstones can go once the grace period is over and every replica has
    /// them; a read then finds that out and reaps (see [`coordinator::Read`]). A read that
    /// could not reap (a replica slow to answer, or missing the tombstone until anti-entropy
    /// brings it) is tried again a few times, further apart each time, while the key still
    /// reads as deleted; otherwise its tombstones would stay until a client read the key.
    fn check_tombstones_later(&self, key: String) {
        let this = self.clone();
        let mut wait = self.shared.config.tombstone_grace + TOMBSTONE_CHECK_SLACK;
        tokio::spawn(async move {
            for retry in 0..TOMBSTONE_CHECKS {
                tokio::time::sleep(wait).await;
                let Ok((answered, finished)) = this.start_read(key.clone(), ReadOptions::default())
                else {
                    continue;
                };
                // A failed read says nothing: try again.
                let deleted = match Self::answer(answered).await {
                    Ok(siblings) => siblings.is_tombstoned(),
                    Err(_) => true,
                };
                let reaped = finished
                    .await
                    .is_ok_and(|noted| noted.contains(&Event::Reaped));
                if !deleted || reaped {
                    return;
                }
                wait = TOMBSTONE_RECHECK_AFTER * (1 << retry);
            }
        });
    }

    /// Answers a client's call (a storage node passes its `put`, `get`, `get_versions` and
    /// `delete` here).
    pub async fn handle(&self, request: Request) -> Result<String> {
        let metrics = &self.shared.metrics;
        match request {
            Request::Put {
                key,
                value,
                context,
                options,
            } => {
                metrics.puts.inc();
                let entered_us = self.entry_time_us().await?;
                let receipt = self
                    .write(key, Some(value), context, entered_us, options)
                    .await?;
                written_xml(receipt.as_ref())
            }
            Request::Delete {
                key,
                context,
                options,
            } => {
                metrics.deletes.inc();
                let entered_us = self.entry_time_us().await?;
                let receipt = self
                    .write(key.clone(), None, context, entered_us, options)
                    .await?;
                self.check_tombstones_later(key);
                written_xml(receipt.as_ref())
            }
            Request::Get { key, options } => {
                metrics.gets.inc();
                let siblings = self.read(key, options).await?;
                Ok(siblings
                    .latest_value()
                    .map_or_else(|| codec::NIL_XML.to_owned(), str::to_owned))
            }
            Request::GetVersions { key, options } => {
                metrics.get_versions.inc();
                let siblings = self.read(key, options).await?;
                Ok(versions_xml(&siblings))
            }
            Request::Stats => codec::value_to_xml(&self.stats()),
            Request::Explain { key } => codec::value_to_xml(&self.explain(&key).await?),
            Request::Cluster(call) => self.shared.membership.answer(call, self.report()).await,
        }
    }

    /// Everything the balancer counts, each figure declared once (see [`Figure`]):
    /// `stats()` shows them under `counters`.
    /// The latency histograms, for `/metrics`: requests by method, replica calls by node.
    pub fn latency_histograms(&self) -> Vec<crate::telemetry::HistogramMetric> {
        let m = &self.shared.metrics;
        vec![
            crate::telemetry::HistogramMetric {
                metric: "dynamite_request_duration_seconds",
                help: "Time to answer a call, by method.",
                label: "method",
                series: m.request_latency.snapshot(),
            },
            crate::telemetry::HistogramMetric {
                metric: "dynamite_replica_call_duration_seconds",
                help: "Time of one replica operation (queued, batched, answered), by node.",
                label: "node",
                series: m.replica_latency.snapshot(),
            },
        ]
    }

    pub(crate) fn counter_figures(&self) -> Vec<Figure> {
        let m = &self.shared.metrics;
        let request = |stats, method, counter| {
            Figure::counter(
                stats,
                "dynamite_balancer_requests_total",
                "Client requests, by method.",
                counter,
            )
            .labelled("method", method)
        };
        let quorum = |stats, which, counter| {
            Figure::counter(
                stats,
                "dynamite_balancer_quorum_failures_total",
                "Requests answered with fault 503, by quorum.",
                counter,
            )
            .labelled("quorum", which)
        };
        vec![
            request("puts", "put", &m.puts),
            request("gets", "get", &m.gets),
            request("get_versions", "get_versions", &m.get_versions),
            request("deletes", "delete", &m.deletes),
            quorum("write_quorum_failures", "write", &m.write_quorum_failures),
            quorum("read_quorum_failures", "read", &m.read_quorum_failures),
            Figure::counter(
                "replica_failures",
                "dynamite_balancer_replica_failures_total",
                "Replica calls that failed or timed out.",
                &m.replica_failures,
            ),
            Figure::counter(
                "coordinator_switches",
                "dynamite_balancer_coordinator_switches_total",
                "Writes coordinated by a later preferred replica because the first was lagging.",
                &m.coordinator_switches,
            ),
            Figure::counter(
                "outcomes_unknown",
                "dynamite_balancer_outcomes_unknown_total",
                "Writes answered 503 because the replica coordinating them took them and did not answer: applied or not.",
                &m.outcomes_unknown,
            ),
            Figure::counter(
                "read_repairs",
                "dynamite_balancer_read_repairs_total",
                "Replicas sent a merged sibling set after a read.",
                &m.read_repairs,
            ),
            Figure::counter(
                "reaps",
                "dynamite_balancer_reaps_total",
                "Deleted keys whose tombstones were reaped.",
                &m.reaps,
            ),
            Figure::gauge(
                "servers_up",
                "dynamite_balancer_servers_up",
                "Storage nodes whose last call succeeded.",
                self.topology().map_or(0, |t| {
                    i64::try_from(t.health.up_count()).unwrap_or(i64::MAX)
                }),
            ),
        ]
    }

    fn stats(&self) -> Value {
        let shared = &self.shared;
        let topology = self.topology().ok();
        let servers = topology
            .iter()
            .flat_map(|topology| {
                topology
                    .servers
                    .0
                    .iter()
                    .enumerate()
                    .map(|(index, address)| {
                        let mut entry = vec![
                            ("address".to_string(), Value::String(address.clone())),
                            (
                                "state".to_string(),
                                Value::String(topology.health.state(index).into()),
                            ),
                        ];
                        if let Some(error) = topology.health.last_error(index) {
                            entry.push(("last_error".to_string(), Value::String(error)));
                        }
                        // How far the node's clock is from this balancer's, as measured (see
                        // `crate::clock`): deadlines are translated by it.
                        if let Some(offset) = shared.client.clocks().offset(address) {
                            entry.push((
                                "clock_offset_us".to_string(),
                                codec::int_value(offset.offset_us),
                            ));
                            entry.push((
                                "clock_error_us".to_string(),
                                codec::int_value(
                                    i64::try_from(offset.error_us).unwrap_or(i64::MAX),
                                ),
                            ));
                        }
                        Value::Struct(entry.into_iter().collect())
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let counters = self
            .counter_figures()
            .iter()
            .map(|figure| (figure.stats.to_owned(), codec::int_value(figure.value)))
            .collect();
        let config = &shared.config;
        let int = |n: usize| codec::int_value(i64::try_from(n).unwrap_or(i64::MAX));
        let (n, r, w, ring, version) = match &topology {
            Some(topology) => {
                let read = topology.routing.read_layout();
                let (n, r) = self.quorum(read, config.explicit_read);
                let (_, w) = self.quorum(read, config.explicit_write);
                (
                    n,
                    r,
                    w,
                    topology.routing.current().fingerprint(),
                    topology.routing.current_version(),
                )
            }
            None => (
                config.replicas,
                config.read_quorum,
                config.write_quorum,
                String::new(),
                0,
            ),
        };
        Value::Struct(
            [
                ("servers".to_string(), Value::Array(servers)),
                ("N".to_string(), int(n)),
                ("R".to_string(), int(r)),
                ("W".to_string(), int(w)),
                ("partitions".to_string(), int(crate::layout::PARTITIONS)),
                ("layout_version".to_string(), int(version as usize)),
                (
                    "timeout_ms".to_string(),
                    int(config.replica_timeout.as_millis() as usize),
                ),
                ("ring".to_string(), Value::String(ring)),
                ("counters".to_string(), Value::Struct(counters)),
                (
                    "latency".to_string(),
                    crate::telemetry::latency_summary(&shared.metrics.request_latency.snapshot()),
                ),
                // Tasks alive in the runtime: returns to its idle level once late replies are
                // in, which is how a leak of per-request tasks would show.
                (
                    "tasks".to_string(),
                    int(tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks()),
                ),
            ]
            .into(),
        )
    }

    /// What this balancer says of itself in gossip.
    fn report(&self) -> Report {
        Report {
            layout_version: self
                .shared
                .membership
                .routing()
                .map_or(0, |r| r.current_version()),
            ..Report::default()
        }
    }
}

impl Handler for Balancer {
    type Request = Request;

    async fn call(&self, request: Request) -> Result<String> {
        self.handle(request).await
    }

    fn figures(&self) -> Vec<Figure> {
        self.counter_figures()
    }

    fn histograms(&self) -> Vec<crate::telemetry::HistogramMetric> {
        self.latency_histograms()
    }

    fn observe(&self, method: &'static str, elapsed: Duration) {
        self.shared.metrics.request_latency.observe(method, elapsed);
    }

    fn layout_version(&self) -> u64 {
        self.shared.membership.version()
    }

    fn heard_layout_version(&self, version: u64) {
        self.shared.membership.heard_version(version);
    }

    const SERVES_STATUS: bool = true;

    fn status_json(&self) -> String {
        let m = &self.shared.metrics;
        crate::status::json(
            &self.shared.membership,
            &self.report(),
            &m.requests_sampled,
            &m.request_latency.snapshot(),
        )
    }
}

/// What a put or delete answers: `"200"`, or with a receipt `{status: "200", context,
/// replicas: [{address, fallback}]}`.
fn written_xml(receipt: Option<&Receipt>) -> Result<String> {
    let Some(receipt) = receipt else {
        return Ok(codec::string_xml("200"));
    };
    let replicas = receipt
        .replicas
        .iter()
        .map(|replica| {
            Value::Struct(
                [
                    (
                        "address".to_string(),
                        Value::String(replica.address.clone()),
                    ),
                    ("fallback".to_string(), Value::Boolean(replica.fallback)),
                ]
                .into(),
            )
        })
        .collect();
    codec::value_to_xml(&Value::Struct(
        [
            ("status".to_string(), Value::String("200".into())),
            (
                "context".to_string(),
                Value::String(receipt.context.to_context()),
            ),
            ("replicas".to_string(), Value::Array(replicas)),
        ]
        .into(),
    ))
}

/// `{values: [...], context: "..."}`, the live siblings latest first.
fn versions_xml(siblings: &Siblings) -> String {
    let mut live: Vec<_> = siblings.values().collect();
    live.sort_by_key(|v| std::cmp::Reverse((v.timestamp_us, v.dot)));
    let values = codec::array_xml(live.iter().filter_map(|v| v.value.as_deref()));
    let context = if live.is_empty() {
        String::new()
    } else {
        siblings.context().to_context()
    };
    codec::struct_xml(&[
        ("values", &values),
        ("context", &codec::string_xml(&context)),
    ])
}

/// Serves the balancer on `listener` (a `tokio::net::TcpListener`, or a simulated network's:
/// [`crate::rpc::transport`]) until `shutdown` resolves.
pub async fn run(
    config: BalancerConfig,
    listener: impl Listener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let limits = ServerLimits {
        max_request_bytes: config.max_request_bytes,
    };
    tracing::info!(
        address = %config.listen,
        servers = ?config.servers,
        n = config.replicas,
        r = config.read_quorum,
        w = config.write_quorum,
        tls = config.security.acceptor.is_some(),
        "load balancer serving"
    );
    let security = config.security.clone();
    let balancer = Arc::new(Balancer::new(config));
    // Learn the layout from the seeds (or build version 1 from them) before serving.
    let membership = balancer.shared.membership.clone();
    membership.bootstrap(&balancer.report()).await;
    // Entry times are read on the cluster clock: measure it before the first write comes.
    balancer.measure_clocks().await;
    let prober = tokio::spawn(probe_periodically(balancer.clone()));
    let sampler = {
        let balancer = balancer.clone();
        tokio::spawn(async move {
            let metrics = &balancer.shared.metrics;
            crate::status::sample_forever(&metrics.requests_sampled, || {
                metrics.request_latency.snapshot()
            })
            .await;
        })
    };
    let gossip = {
        let reporter = balancer.clone();
        tokio::spawn(membership.run(move || reporter.report()))
    };
    server::serve(listener, balancer.clone(), limits, security, shutdown).await;
    balancer.finish_tails().await;
    prober.abort();
    gossip.abort();
    sampler.abort();
    Ok(())
}

impl Balancer {
    /// Waits until the tails of the requests answered so far have ended (see [`Tails`]), at
    /// most the replica timeout, which bounds each of them. For a stopping daemon, once it
    /// answers no more requests.
    pub async fn finish_tails(&self) {
        let within = self.shared.config.replica_timeout;
        if tokio::time::timeout(within, self.shared.tails.all_ended())
            .await
            .is_err()
        {
            tracing::warn!("requests' last replica calls still running at the stop: cut");
        }
    }
}

/// Probes down nodes until the task is dropped.
pub async fn probe_periodically(balancer: Arc<Balancer>) {
    let mut ticks = tokio::time::interval(health::PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if let Ok(topology) = balancer.topology() {
            topology.health.probe(&balancer.shared.client).await;
            for (server, address) in topology.servers.0.iter().enumerate() {
                let mismatch = balancer.shared.membership.mismatched(address);
                topology.health.set_mismatch(server, mismatch);
            }
        }
    }
}
