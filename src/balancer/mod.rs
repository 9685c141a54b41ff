//! The load balancer: Dynamo's request coordinator.
//!
//! It owns the ring and nothing else: no data, no state that must survive it, so any number of
//! balancers run side by side over the same nodes. For each request it computes the key's
//! replicas (the preference list, with down nodes replaced by fallbacks: [`targets`], fed by
//! the failure detector in `health`) and drives them:
//!
//! - **put / delete**: the balancer reads the time the request entered the cluster on the
//!   cluster clock ([`crate::clock`]); the first preferred replica that answers
//!   *coordinates*: it stamps the write with its dot and that entry time, and stores it (see
//!   [`crate::version`] for why the dot is a node's, and why a blind write supersedes only
//!   what entered before it).
//!   A first replica that is lagging (work outstanding, nothing answered for a couple of
//!   milliseconds: see [`crate::rpc::batch`]) is passed over for the next preferred one, as
//!   Dynamo lets any of the top N coordinate, so a write does not queue behind a stall.
//!   Its reconciled sibling set then goes to the other replicas in parallel (fallbacks keep it
//!   as a hint), and the client gets `"200"` once W replicas have it in their journal.
//! - **get**: every replica is asked in parallel; the answer goes out after R replies, merged.
//!   The task that asked keeps listening for the stragglers (each bounded by the timeout) and
//!   then writes the merged set back to every replica that answered with less (read repair),
//!   or reaps the key when all N hold the same old tombstones; both off the client's path.
//!
//! Every replica call runs in its own task with the replica timeout and travels in a batch to
//! its node ([`crate::rpc::batch`]); it reports on a channel, and when the client has its
//! answer the receiver may be gone: the remaining tasks simply end when their call does.
//! Nothing outlives the timeout, on the node either: each operation carries the moment the
//! balancer stops waiting for it, and a node refuses one that arrives later.

mod health;
pub mod targets;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dxr::Value;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::BalancerConfig;
use crate::error::{Error, QuorumKind, Result};
use crate::quorum::{Outcome, Tally};
use crate::ring::Ring;
use crate::rpc::batch::{NodeQueue, micros};
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::codec;
use crate::rpc::messages::{
    CoordinateRequest, MergeRequest, Op, OpReply, ReadRequest, ReapRequest,
};
use crate::rpc::params::{delete_params, key_param, put_params};
use crate::rpc::server::{self, Handler, ServerLimits};
use crate::telemetry::{Counter, Exposition};
use crate::version::{Siblings, VClock};
use health::Health;
use targets::Target;

/// Extra wait after the grace period before a delete's tombstones are checked, so that the
/// tombstones are strictly older than the grace period when the check runs.
const TOMBSTONE_CHECK_SLACK: Duration = Duration::from_millis(100);

/// How far a balancer's entry times may run ahead of the cluster clock to stay increasing
/// when the clock's estimate moves back (the median node changed, an estimate improved: a
/// few milliseconds between NTP-kept machines). Moved back further, the estimate was wrong
/// before, and entry times follow the clock rather than stay ahead of every other
/// balancer's.
const MAX_ENTRY_CARRY: Duration = Duration::from_secs(1);

/// How long a balancer waits for the nodes' clocks to be measured, at start or before its
/// first write.
const MEASURE_TIMEOUT: Duration = Duration::from_millis(500);

const METHODS: &[(&str, &str)] = &[
    (
        "put",
        "put(key, value[, context]) -> \"200\" once W replicas stored the value",
    ),
    (
        "get",
        "get(key) -> the value of the version written last, or nil",
    ),
    (
        "get_versions",
        "get_versions(key) -> {values: [sibling values, latest first], context}",
    ),
    (
        "delete",
        "delete(key[, context]) -> \"200\" once W replicas stored the tombstone",
    ),
    (
        "stats",
        "stats() -> {servers: [{address, state}], N, R, W, counters}",
    ),
];

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
    ring: Ring,
    /// The ring's fingerprint with N, as storage nodes with peers report theirs.
    fingerprint: String,
    client: RpcClient,
    /// One batching queue per storage node, indexed like `ring.servers()`.
    nodes: Vec<NodeQueue>,
    health: Health,
    metrics: BalancerMetrics,
    /// The last entry time handed out, so that requests entering one after another get
    /// increasing times even when the cluster clock's estimate moves back a little.
    last_entry_us: AtomicU64,
}

/// One replica's reply, tagged with the target it came from.
type Reply = (Target, std::result::Result<OpReply, CallError>);

/// The sibling set a replica answered, or why it did not.
fn siblings_of(
    reply: std::result::Result<OpReply, CallError>,
) -> std::result::Result<Siblings, String> {
    match reply {
        Ok(OpReply::Siblings(siblings)) => Ok(siblings),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

impl Balancer {
    pub fn new(config: BalancerConfig) -> Self {
        let ring = Ring::new(&config.servers, config.vnodes);
        let health = Health::new(ring.servers());
        let fingerprint = crate::node::anti_entropy::fingerprint(&ring, config.replicas);
        let client = RpcClient::new();
        let nodes = ring
            .servers()
            .iter()
            .map(|address| NodeQueue::new(address.clone(), client.clone(), config.replica_timeout))
            .collect();
        Balancer {
            shared: Arc::new(Shared {
                config,
                fingerprint,
                ring,
                client,
                nodes,
                health,
                metrics: BalancerMetrics::default(),
                last_entry_us: AtomicU64::new(0),
            }),
        }
    }

    /// The replicas for a request needing `needed` of them: the preference list with down
    /// nodes replaced by fallbacks (see [`targets`]). Down nodes with no fallback are left out
    /// (and counted as failed in the returned tally) while the others can still meet the
    /// quorum; when they cannot, the down nodes are tried after all, as a last resort: the
    /// request would fail anyway, and the node may be back before the prober noticed.
    fn targets(&self, key: &str, needed: usize) -> (Vec<Target>, Tally, Option<String>) {
        let shared = &self.shared;
        let walk: Vec<usize> = shared.ring.walk(key.as_bytes()).collect();
        let (mut targets, missing) = targets::choose(&walk, shared.config.replicas, |server| {
            shared.health.is_up(server)
        });
        let mut tally = Tally::new(shared.config.replicas, needed);
        let mut detail = None;
        if targets.len() >= needed {
            for _ in &missing {
                tally.failure();
            }
            if !missing.is_empty() {
                detail = Some(format!(
                    "{} replica(s) down with no fallback",
                    missing.len()
                ));
            }
        } else {
            targets.extend(missing.into_iter().map(|owner| Target {
                server: owner,
                owner,
            }));
        }
        (targets, tally, detail)
    }

    fn address(&self, server: usize) -> &str {
        &self.shared.ring.servers()[server]
    }

    /// The owner's address when `target` is a fallback: what the hint names.
    fn hint_for(&self, target: Target) -> Option<String> {
        target
            .is_fallback()
            .then(|| self.address(target.owner).to_owned())
    }

    fn describe_failure(&self, target: Target, error: &dyn std::fmt::Display) -> String {
        format!("{}: {error}", self.address(target.server))
    }

    /// One operation on one replica, bounded by the replica timeout; records the outcome in
    /// `health`. Operations travel in batches per node (see [`crate::rpc::batch`]).
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

    /// Each target's operation, running concurrently inside whichever task polls them; a
    /// reply comes out as soon as it is in. Calls are bounded by the replica timeout.
    fn replica_calls(
        &self,
        calls: Vec<(Target, Op)>,
    ) -> FuturesUnordered<impl Future<Output = Reply> + '_> {
        calls
            .into_iter()
            .map(|(target, op)| async move { (target, self.call_replica(target.server, op).await) })
            .collect()
    }

    /// Sends each target its operation at once; replies arrive on the channel as they come.
    /// One task drives all the calls (a task per call cost a spawn and a wake-up each, in the
    /// profile), and ends when the last call does.
    fn fan_out(&self, calls: Vec<(Target, Op)>) -> mpsc::Receiver<Reply> {
        let (sender, receiver) = mpsc::channel(calls.len().max(1));
        let this = self.clone();
        tokio::spawn(async move {
            let mut pending = this.replica_calls(calls);
            while let Some(reply) = pending.next().await {
                // The receiver is gone once the client has its answer: that is fine.
                let _ = sender.send(reply).await;
            }
        });
        receiver
    }

    /// Builds one operation per target from one that differs only in its hint.
    fn calls(&self, targets: &[Target], op: impl Fn(Option<String>) -> Op) -> Vec<(Target, Op)> {
        targets
            .iter()
            .map(|&target| (target, op(self.hint_for(target))))
            .collect()
    }

    fn quorum_error(&self, kind: QuorumKind, tally: &Tally, detail: Option<String>) -> Error {
        let metrics = &self.shared.metrics;
        match kind {
            QuorumKind::Write => metrics.write_quorum_failures.inc(),
            QuorumKind::Read => metrics.read_quorum_failures.inc(),
        }
        Error::Quorum {
            kind,
            needed: tally.needed,
            answered: tally.succeeded,
            replicas: tally.replicas,
            detail,
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
                return Err(self.quorum_error(
                    QuorumKind::Write,
                    &Tally::new(config.replicas, config.write_quorum),
                    Some(
                        "no storage node has answered yet, so the cluster's time is unknown".into(),
                    ),
                ));
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
            .ring
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
        let (mut targets, mut tally, mut first_failure) =
            self.targets(&key, self.shared.config.write_quorum);
        // A preferred replica coordinates whenever one is up: it holds the key's history, so a
        // blind write or delete supersedes what is there. A fallback holds only hints for the
        // key, and a write it stamped would merely sit beside the old versions as a sibling.
        targets.sort_by_key(Target::is_fallback);
        // Any preferred replica may coordinate (Dynamo §6.4). The first one does, unless it is
        // lagging, i.e. stalled with work outstanding: then the next preferred one that is not
        // takes the write instead of queueing it behind the stall. The lagging one still gets
        // the merge like any other replica.
        let keeping_up = targets.iter().position(|target| {
            !target.is_fallback() && !self.shared.nodes[target.server].is_lagging()
        });
        if let Some(position) = keeping_up {
            if position > 0 {
                self.shared.metrics.coordinator_switches.inc();
            }
            targets[..=position].rotate_right(1);
        }

        // The first replica that answers coordinates; the ones before it count as failed,
        // except those that answered but would not coordinate (a node refusing a write stamped
        // far ahead of its clock, an operation that expired on the way): they are passed over
        // like a lagging replica, and still get the write as a copy.
        let mut coordinated = None;
        let mut passed_over = Vec::new();
        for (position, &target) in targets.iter().enumerate() {
            let request = CoordinateRequest {
                key: key.clone(),
                value: value.clone(),
                context: context.clone(),
                hint_for: self.hint_for(target),
                entered_us,
            };
            let reply = self
                .call_replica(target.server, Op::Coordinate(request))
                .await;
            // A replica refusing the write itself (too many siblings, too many bytes) is the
            // client's to fix, and every other replica would refuse it too: its fault goes to
            // the client as it is.
            if let Err(CallError::Fault {
                code: code @ crate::error::FAULT_INVALID_PARAMS,
                message,
            }) = reply
            {
                return Err(Error::Fault { code, message });
            }
            if let Err(error @ (CallError::Fault { .. } | CallError::Expired { .. })) = &reply {
                first_failure.get_or_insert_with(|| self.describe_failure(target, error));
                passed_over.push(target);
                continue;
            }
            match siblings_of(reply) {
                Ok(siblings) => {
                    coordinated = Some((position, siblings));
                    break;
                }
                Err(error) => {
                    first_failure.get_or_insert_with(|| self.describe_failure(target, &error));
                    if tally.failure() == Outcome::Failed {
                        break;
                    }
                }
            }
        }
        let Some((position, siblings)) = coordinated else {
            for _ in &passed_over {
                tally.failure();
            }
            return Err(self.quorum_error(QuorumKind::Write, &tally, first_failure));
        };
        let outcome = tally.success();
        passed_over.extend_from_slice(&targets[position + 1..]);
        let calls = self.calls(&passed_over, |hint_for| {
            Op::Merge(MergeRequest {
                key: key.clone(),
                siblings: siblings.clone(),
                hint_for,
            })
        });
        let mut replies = self.fan_out(calls);
        if outcome == Outcome::Met {
            return Ok(());
        }
        while let Some((target, reply)) = replies.recv().await {
            let outcome = match reply {
                Ok(_) => tally.success(),
                Err(error) => {
                    first_failure.get_or_insert_with(|| self.describe_failure(target, &error));
                    tally.failure()
                }
            };
            match outcome {
                Outcome::Met => return Ok(()),
                Outcome::Failed => break,
                Outcome::Pending => {}
            }
        }
        Err(self.quorum_error(QuorumKind::Write, &tally, first_failure))
    }

    /// Reads the key from R replicas and returns their merged sibling set; read repair (or
    /// reaping) follows in the background once the stragglers answered.
    pub async fn read(&self, key: String) -> Result<Siblings> {
        let (targets, mut tally, mut first_failure) =
            self.targets(&key, self.shared.config.read_quorum);
        let calls = self.calls(&targets, |hint_for| {
            Op::Read(ReadRequest {
                key: key.clone(),
                hint_for,
            })
        });
        let (answer, answered) = oneshot::channel::<Result<Siblings>>();
        let this = self.clone();
        // One task asks the replicas, answers the client at R, and stays for the stragglers.
        tokio::spawn(async move {
            let mut replies = this.replica_calls(calls);
            let mut answer = Some(answer);
            let mut merged = Siblings::new();
            let mut seen: Vec<(Target, Siblings)> = Vec::with_capacity(targets.len());
            while let Some((target, reply)) = replies.next().await {
                let outcome = match siblings_of(reply) {
                    Ok(siblings) => {
                        merged.merge(&siblings);
                        seen.push((target, siblings));
                        tally.success()
                    }
                    Err(error) => {
                        first_failure.get_or_insert_with(|| this.describe_failure(target, &error));
                        tally.failure()
                    }
                };
                // Once the client has its answer, stragglers only feed the repair below.
                let Some(client) = answer.take_if(|_| outcome != Outcome::Pending) else {
                    continue;
                };
                let result = match outcome {
                    Outcome::Met => Ok(merged.clone()),
                    _ => Err(this.quorum_error(QuorumKind::Read, &tally, first_failure.clone())),
                };
                let _ = client.send(result);
            }
            // Every reply is in and neither outcome was reached (no replica to ask at all).
            if let Some(answer) = answer.take() {
                let _ = answer.send(Err(this.quorum_error(
                    QuorumKind::Read,
                    &tally,
                    first_failure,
                )));
            }
            this.after_read(key, merged, seen);
        });
        answered
            .await
            .map_err(|_| Error::Internal("read coordinator stopped without an answer".into()))?
    }

    /// Once every reply is in: repair the replicas that answered with less, or, when all N
    /// preferred replicas hold the same old tombstones, reap the key.
    fn after_read(&self, key: String, merged: Siblings, seen: Vec<(Target, Siblings)>) {
        let all_primaries = seen.len() == self.shared.config.replicas
            && seen.iter().all(|(target, _)| !target.is_fallback());
        let everyone_agrees = seen.iter().all(|(_, siblings)| *siblings == merged);
        if all_primaries && everyone_agrees && merged.is_tombstoned() {
            let now_us = self.shared.client.clocks().cluster_now_us();
            let age_us = now_us.saturating_sub(merged.newest_timestamp_us());
            if u128::from(age_us) >= self.shared.config.tombstone_grace.as_micros() {
                let replicas: Vec<Target> = seen.into_iter().map(|(target, _)| target).collect();
                self.reap(key, &merged, &replicas);
            }
            return;
        }
        self.repair(key, merged, seen);
    }

    /// Removes a key's tombstones from every replica (each checks it still holds exactly them).
    fn reap(&self, key: String, tombstones: &Siblings, replicas: &[Target]) {
        self.shared.metrics.reaps.inc();
        let request = ReapRequest {
            key,
            dots: tombstones.dots().collect(),
        };
        drop(self.fan_out(self.calls(replicas, |_| Op::Reap(request.clone()))));
    }

    /// A delete's tombstones can go once the grace period is over and every replica has
    /// them; a read then finds that out and reaps (see [`Self::after_read`]).
    fn check_tombstones_later(&self, key: String) {
        let this = self.clone();
        let wait = self.shared.config.tombstone_grace + TOMBSTONE_CHECK_SLACK;
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            let _ = this.read(key).await;
        });
    }

    /// Writes the merged set back to every replica whose answer lacked part of it.
    fn repair(&self, key: String, merged: Siblings, seen: Vec<(Target, Siblings)>) {
        let stale: Vec<Target> = seen
            .into_iter()
            .filter(|(_, siblings)| *siblings != merged)
            .map(|(target, _)| target)
            .collect();
        if stale.is_empty() {
            return;
        }
        self.shared.metrics.read_repairs.add(stale.len() as u64);
        let calls = self.calls(&stale, |hint_for| {
            Op::Merge(MergeRequest {
                key: key.clone(),
                siblings: merged.clone(),
                hint_for,
            })
        });
        // Nobody waits for these replies; the tasks end with their calls.
        drop(self.fan_out(calls));
    }

    async fn handle(&self, method: &str, params: Vec<Value>) -> Result<String> {
        let metrics = &self.shared.metrics;
        match method {
            "put" => {
                metrics.puts.inc();
                let (key, value, context) = put_params(params)?;
                let entered_us = self.entry_time_us().await?;
                self.write(key, Some(value), context, entered_us).await?;
                Ok(codec::string_xml("200"))
            }
            "delete" => {
                metrics.deletes.inc();
                let (key, context) = delete_params(params)?;
                let entered_us = self.entry_time_us().await?;
                self.write(key.clone(), None, context, entered_us).await?;
                self.check_tombstones_later(key);
                Ok(codec::string_xml("200"))
            }
            "get" => {
                metrics.gets.inc();
                let key = key_param(params)?;
                let siblings = self.read(key).await?;
                Ok(siblings
                    .latest_value()
                    .map_or_else(|| codec::NIL_XML.to_owned(), str::to_owned))
            }
            "get_versions" => {
                metrics.get_versions.inc();
                let key = key_param(params)?;
                let siblings = self.read(key).await?;
                Ok(versions_xml(&siblings))
            }
            "stats" => {
                server::expect_params(&params, 0)?;
                codec::value_to_xml(&self.stats())
            }
            _ => Err(Error::UnknownMethod(method.to_owned())),
        }
    }

    fn stats(&self) -> Value {
        let shared = &self.shared;
        let servers = shared
            .ring
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
        let m = &shared.metrics;
        let counters = [
            ("puts", m.puts.get()),
            ("gets", m.gets.get()),
            ("get_versions", m.get_versions.get()),
            ("deletes", m.deletes.get()),
            ("write_quorum_failures", m.write_quorum_failures.get()),
            ("read_quorum_failures", m.read_quorum_failures.get()),
            ("replica_failures", m.replica_failures.get()),
            ("coordinator_switches", m.coordinator_switches.get()),
            ("read_repairs", m.read_repairs.get()),
            ("reaps", m.reaps.get()),
        ]
        .into_iter()
        .map(|(name, value)| {
            (
                name.to_string(),
                codec::int_value(i64::try_from(value).unwrap_or(i64::MAX)),
            )
        })
        .collect();
        let config = &shared.config;
        let int = |n: usize| codec::int_value(i64::try_from(n).unwrap_or(i64::MAX));
        Value::Struct(
            [
                ("servers".to_string(), Value::Array(servers)),
                ("N".to_string(), int(config.replicas)),
                ("R".to_string(), int(config.read_quorum)),
                ("W".to_string(), int(config.write_quorum)),
                ("vnodes".to_string(), int(config.vnodes)),
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
    async fn call(&self, method: &str, params: Vec<Value>) -> Result<String> {
        self.handle(method, params).await
    }

    fn methods(&self) -> &'static [(&'static str, &'static str)] {
        METHODS
    }

    fn metrics(&self) -> String {
        let m = &self.shared.metrics;
        let mut out = Exposition::default();
        out.labelled_counter(
            "dynamite_balancer_requests_total",
            "Client requests, by method.",
            "method",
            &[
                ("put", m.puts.get()),
                ("get", m.gets.get()),
                ("get_versions", m.get_versions.get()),
                ("delete", m.deletes.get()),
            ],
        )
        .labelled_counter(
            "dynamite_balancer_quorum_failures_total",
            "Requests answered with fault 503, by quorum.",
            "quorum",
            &[
                ("write", m.write_quorum_failures.get()),
                ("read", m.read_quorum_failures.get()),
            ],
        )
        .counter(
            "dynamite_balancer_replica_failures_total",
            "Replica calls that failed or timed out.",
            m.replica_failures.get(),
        )
        .counter(
            "dynamite_balancer_read_repairs_total",
            "Replicas sent a merged sibling set after a read.",
            m.read_repairs.get(),
        )
        .counter(
            "dynamite_balancer_reaps_total",
            "Deleted keys whose tombstones were reaped.",
            m.reaps.get(),
        )
        .counter(
            "dynamite_balancer_coordinator_switches_total",
            "Writes coordinated by a later preferred replica because the first was lagging.",
            m.coordinator_switches.get(),
        );
        let up = self.shared.health.up_count();
        out.gauge(
            "dynamite_balancer_servers_up",
            "Storage nodes whose last call succeeded.",
            up as i64,
        );
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
