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
//! timeout; nothing outlives it, on the node either: each operation carries the moment the
//! balancer stops waiting for it, and a node refuses one that arrives later.

pub mod coordinator;
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
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::clock::micros;
use crate::config::BalancerConfig;
use crate::error::{Error, QuorumKind, Result};
use crate::layout::Layout;
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::codec;
use crate::rpc::messages::{Op, OpReply};
use crate::rpc::server::{self, Handler, ServerLimits};
use crate::telemetry::{Counter, Exposition, Figure};
use crate::version::{Siblings, VClock};
use coordinator::{Action, Event, Machine, Read, Servers, Write, WriteRequest};
use health::Health;
use node_queue::NodeQueue;
use request::Request;
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
    read_repairs: Counter,
    reaps: Counter,
}

/// The coordinator; cheap to clone (shared state behind an `Arc`), so spawned tasks own a copy.
#[derive(Clone)]
pub struct Balancer {
    shared: Arc<Shared>,
}

struct Shared {
    config: BalancerConfig,
    layout: Layout,
    /// The layout's servers, as the coordinator's machines name them.
    servers: Servers,
    /// The layout's fingerprint (with N), as storage nodes with peers report theirs.
    fingerprint: String,
    client: RpcClient,
    /// One batching queue per storage node, indexed like `layout.servers()`.
    nodes: Vec<NodeQueue>,
    health: Health,
    metrics: BalancerMetrics,
    /// The last entry time handed out, so that requests entering one after another get
    /// increasing times even when the cluster clock's estimate moves back a little.
    last_entry_us: AtomicU64,
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        let layout = Layout::new(&config.servers, config.replicas);
        let health = Health::new(layout.servers());
        let fingerprint = layout.fingerprint();
        let client = RpcClient::new();
        let nodes = layout
            .servers()
            .iter()
            .map(|address| NodeQueue::new(address.clone(), client.clone(), config.replica_timeout))
            .collect();
        let servers = Servers(layout.servers().to_vec().into());
        Balancer {
            shared: Arc::new(Shared {
                config,
                fingerprint,
                layout,
                servers,
                client,
                nodes,
                health,
                metrics: BalancerMetrics::default(),
                last_entry_us: AtomicU64::new(0),
            }),
        }
    }

    /// The replicas a request for `key` asks, needing `needed` of them (see
    /// [`targets::plan`]), as the failure detector sees the nodes now.
    fn plan(&self, key: &str, needed: usize) -> Plan {
        let shared = &self.shared;
        let walk: Vec<usize> = shared.layout.walk(key.as_bytes()).collect();
        targets::plan(&walk, shared.config.replicas, needed, |server| {
            shared.health.is_up(server)
        })
    }

    fn address(&self, server: usize) -> &str {
        &self.shared.layout.servers()[server]
    }

    /// One operation on one replica, bounded by the replica timeout; records the outcome in
    /// `health`. Operations travel in batches per node (see [`NodeQueue`]).
    async fn call_replica(&self, server: usize, op: Op) -> std::result::Result<OpReply, CallError> {
        let shared = &self.shared;
        let result = shared.nodes[server]
            .call(op, shared.config.replica_timeout)
            .await;
        match &result {
            Ok(_) => shared.health.mark_up(server),
            Err(error) => {
                shared.metrics.replica_failures.inc();
                tracing::debug!(server = self.address(server), %error, "replica call failed");
                shared.health.record_failure(server, error);
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
    /// profile), and nothing outlives the replica timeout.
    ///
    /// The task ends with what the machine noted, for whoever waits for the whole request.
    fn drive<M: Machine>(
        &self,
        mut machine: M,
        first: Vec<Action<M::Output>>,
    ) -> (
        oneshot::Receiver<Result<M::Output>>,
        tokio::task::JoinHandle<Vec<Event>>,
    ) {
        let (answer, answered) = oneshot::channel();
        let this = self.clone();
        let finished = tokio::spawn(async move {
            let mut noted = Vec::new();
            let mut answer = Some(answer);
            let mut pending = FuturesUnordered::new();
            let mut actions = first;
            loop {
                for action in actions {
                    match action {
                        Action::Send(target, op) => {
                            let this = this.clone();
                            pending.push(async move {
                                let reply = this.call_replica(target.server, op).await;
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
                    detail: Some(
                        "no storage node has answered yet, so the cluster's time is unknown".into(),
                    ),
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
        let probes = shared
            .layout
            .servers()
            .iter()
            .map(|address| shared.client.probe(address, MEASURE_TIMEOUT));
        futures_util::future::join_all(probes).await;
    }

    /// A put (`value` Some) or delete (`value` None) through a coordinating replica; the
    /// request entered the cluster at `entered_us` (see [`Self::entry_time_us`]).
    pub async fn write(
        &self,
        key: String,
        value: Option<String>,
        context: Option<VClock>,
        entered_us: u64,
    ) -> Result<()> {
        let shared = &self.shared;
        let mut plan = self.plan(&key, shared.config.write_quorum);
        let (order, switched) =
            targets::order_for_write(std::mem::take(&mut plan.targets), |server| {
                shared.nodes[server].is_lagging()
            });
        plan.targets = order;
        let request = WriteRequest {
            key,
            value,
            context,
            entered_us,
        };
        let (machine, first) = Write::start(shared.servers.clone(), request, plan, switched);
        Self::answer(self.drive(machine, first).0).await
    }

    /// Reads the key from R replicas and returns their merged sibling set; read repair (or
    /// reaping) follows in the background once the stragglers answered.
    pub async fn read(&self, key: String) -> Result<Siblings> {
        Self::answer(self.start_read(key).0).await
    }

    fn start_read(
        &self,
        key: String,
    ) -> (
        oneshot::Receiver<Result<Siblings>>,
        tokio::task::JoinHandle<Vec<Event>>,
    ) {
        let shared = &self.shared;
        let plan = self.plan(&key, shared.config.read_quorum);
        let grace_us = micros(shared.config.tombstone_grace);
        let (machine, first) = Read::start(
            shared.servers.clone(),
            key,
            plan,
            shared.config.replicas,
            grace_us,
        );
        self.drive(machine, first)
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
                let (answered, finished) = this.start_read(key.clone());
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

    async fn handle(&self, request: Request) -> Result<String> {
        let metrics = &self.shared.metrics;
        match request {
            Request::Put {
                key,
                value,
                context,
            } => {
                metrics.puts.inc();
                let entered_us = self.entry_time_us().await?;
                self.write(key, Some(value), context, entered_us).await?;
                Ok(codec::string_xml("200"))
            }
            Request::Delete { key, context } => {
                metrics.deletes.inc();
                let entered_us = self.entry_time_us().await?;
                self.write(key.clone(), None, context, entered_us).await?;
                self.check_tombstones_later(key);
                Ok(codec::string_xml("200"))
            }
            Request::Get { key } => {
                metrics.gets.inc();
                let siblings = self.read(key).await?;
                Ok(siblings
                    .latest_value()
                    .map_or_else(|| codec::NIL_XML.to_owned(), str::to_owned))
            }
            Request::GetVersions { key } => {
                metrics.get_versions.inc();
                let siblings = self.read(key).await?;
                Ok(versions_xml(&siblings))
            }
            Request::Stats => codec::value_to_xml(&self.stats()),
        }
    }

    /// Everything the balancer counts, each figure declared once (see [`Figure`]):
    /// `stats()` shows them under `counters`.
    fn figures(&self) -> Vec<Figure> {
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
                i64::try_from(self.shared.health.up_count()).unwrap_or(i64::MAX),
            ),
        ]
    }

    fn stats(&self) -> Value {
        let shared = &self.shared;
        let servers = shared
            .layout
            .servers()
            .iter()
            .enumerate()
            .map(|(index, address)| {
                let mut entry = vec![
                    ("address".to_string(), Value::String(address.clone())),
                    (
                        "state".to_string(),
                        Value::String(shared.health.state(index).into()),
                    ),
                ];
                if let Some(error) = shared.health.last_error(index) {
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
                        codec::int_value(i64::try_from(offset.error_us).unwrap_or(i64::MAX)),
                    ));
                }
                Value::Struct(entry.into_iter().collect())
            })
            .collect();
        let counters = self
            .figures()
            .iter()
            .map(|figure| (figure.stats.to_owned(), codec::int_value(figure.value)))
            .collect();
        let config = &shared.config;
        let int = |n: usize| codec::int_value(i64::try_from(n).unwrap_or(i64::MAX));
        Value::Struct(
            [
                ("servers".to_string(), Value::Array(servers)),
                ("N".to_string(), int(config.replicas)),
                ("R".to_string(), int(config.read_quorum)),
                ("W".to_string(), int(config.write_quorum)),
                ("partitions".to_string(), int(crate::layout::PARTITIONS)),
                (
                    "timeout_ms".to_string(),
                    int(config.replica_timeout.as_millis() as usize),
                ),
                (
                    "ring".to_string(),
                    Value::String(shared.fingerprint.clone()),
                ),
                ("counters".to_string(), Value::Struct(counters)),
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
}

impl Handler for Balancer {
    type Request = Request;

    async fn call(&self, request: Request) -> Result<String> {
        self.handle(request).await
    }

    fn metrics(&self) -> String {
        let mut out = Exposition::default();
        out.figures(&self.figures());
        out.finish()
    }
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

/// Serves the balancer on `listener` until `shutdown` resolves.
pub async fn run(
    config: BalancerConfig,
    listener: TcpListener,
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
        "load balancer serving"
    );
    let balancer = Arc::new(Balancer::new(config));
    // Entry times are read on the cluster clock: measure it before the first write comes.
    balancer.measure_clocks().await;
    let prober = tokio::spawn(probe_periodically(balancer.clone()));
    server::serve(listener, balancer, limits, shutdown).await;
    prober.abort();
    Ok(())
}

/// Probes down nodes until the task is dropped.
async fn probe_periodically(balancer: Arc<Balancer>) {
    let mut ticks = tokio::time::interval(health::PROBE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let shared = &balancer.shared;
        shared
            .health
            .probe(&shared.client, &shared.fingerprint)
            .await;
    }
}
