//! The coordinator's decisions, one state machine per client request: replies in, actions
//! out, no I/O and no clock of its own.
//!
//! Dynamo's coordinator is a handful of rules: which replica stamps a write, when a lagging
//! one is passed over, when W or R is met or can no longer be, which replicas are repaired
//! after a read, when a deleted key's tombstones may go. Here each rule is a step of a
//! synchronous machine ([`Write`], [`Read`]) fed the replies as they come, so every rule is a
//! table test away. The balancer's async shell ([`super::Balancer`]) only sends what an
//! [`Action::Send`] says, feeds each reply back with the time on the cluster clock, answers
//! the client on [`Action::Answer`] and counts [`Action::Note`]s. (toydb's Raft node and
//! Garage's quorum helper are the models.)
//!
//! A machine ignores replies it is not waiting for (late, duplicated or from a target it
//! never asked), answers the client exactly once, and keeps listening after the answer: a
//! write's copies still count nothing, but a read's stragglers decide the repair. A write
//! asked for a receipt answers which replicas had acknowledged it when the answer went out
//! ([`Receipt`]); a request's own W or R is in the tallies of the [`Plan`] it is started with.

use std::sync::Arc;

use crate::error::{Error, FAULT_INVALID_PARAMS, QuorumKind, Result};
use crate::quorum::{Outcome, Tally};
use crate::rpc::client::CallError;
use crate::rpc::messages::{
    CoordinateRequest, MergeRequest, Op, OpReply, ReadRequest, ReapRequest,
};
use crate::version::{MAX_CLOCK_ENTRIES, Siblings, VClock};

use super::targets::{Plan, Target};

/// What a machine asks its driver to do.
#[derive(Debug)]
pub enum Action<T> {
    /// Send `op` to the replica; its reply comes back to the machine with the same target.
    Send(Target, Op),
    /// Answer the client. Happens once per request.
    Answer(Result<T>),
    /// Something worth counting.
    Note(Event),
}

/// Equal when they would do the same: errors compare by the fault the client would get.
impl<T: PartialEq> PartialEq for Action<T> {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Action::Send(a, op_a), Action::Send(b, op_b)) => a == b && op_a == op_b,
            (Action::Answer(Ok(a)), Action::Answer(Ok(b))) => a == b,
            (Action::Answer(Err(a)), Action::Answer(Err(b))) => {
                (a.fault_code(), a.fault_string()) == (b.fault_code(), b.fault_string())
            }
            (Action::Note(a), Action::Note(b)) => a == b,
            _ => false,
        }
    }
}

/// What the balancer counts (see its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A write was coordinated by a later preferred replica because the first was lagging.
    CoordinatorSwitched,
    /// A request answered 503.
    QuorumFailed(QuorumKind),
    /// A write answered 503 because its coordinator took it and did not answer.
    OutcomeUnknown,
    /// Replicas sent the merged set after a read.
    ReadRepairs(usize),
    /// A deleted key's tombstones were sent for reaping.
    Reaped,
}

/// A machine the shell drives: the replies to its sends, one at a time.
pub trait Machine: Send + 'static {
    type Output: Send + 'static;

    /// One reply from `target`; `now_us` is the cluster clock when it came.
    fn on_reply(
        &mut self,
        target: Target,
        reply: std::result::Result<OpReply, CallError>,
        now_us: u64,
    ) -> Vec<Action<Self::Output>>;
}

/// What a request knows of the cluster: every server's address, indexed like the ring's.
#[derive(Debug, Clone)]
pub struct Servers(pub Arc<[String]>);

impl Servers {
    fn address(&self, server: usize) -> &str {
        self.0.get(server).map_or("?", String::as_str)
    }

    /// The owner's address when `target` is a fallback: what the hint names.
    fn hint_for(&self, target: Target) -> Option<String> {
        target
            .is_fallback()
            .then(|| self.address(target.owner).to_owned())
    }

    fn describe(&self, target: Target, error: &dyn std::fmt::Display) -> String {
        format!("{}: {error}", self.address(target.server))
    }
}

/// Counts toward a quorum and remembers the first failure, for the 503 text. While a layout
/// transition runs, a write counts one tally per live version, each over its own replicas:
/// it is met when every one is, failed as soon as one is.
#[derive(Debug, Clone)]
struct Count {
    kind: QuorumKind,
    /// Each tally with the targets that count for it; `None`: every target counts.
    tallies: Vec<(Tally, Option<Vec<Target>>)>,
    first_failure: Option<String>,
}

impl Count {
    fn new(kind: QuorumKind, plan: &Plan) -> Self {
        let tallies = if plan.groups.is_empty() {
            vec![(plan.tally, None)]
        } else {
            plan.groups
                .iter()
                .map(|(tally, targets)| (*tally, Some(targets.clone())))
                .collect()
        };
        Count {
            kind,
            tallies,
            first_failure: plan.detail.clone(),
        }
    }

    fn outcome(&self) -> Outcome {
        let outcomes = self.tallies.iter().map(|(tally, _)| tally.outcome());
        let mut all_met = true;
        for outcome in outcomes {
            match outcome {
                Outcome::Failed => return Outcome::Failed,
                Outcome::Pending => all_met = false,
                Outcome::Met => {}
            }
        }
        if all_met {
            Outcome::Met
        } else {
            Outcome::Pending
        }
    }

    fn record(&mut self, target: Target, success: bool) -> Outcome {
        for (tally, targets) in &mut self.tallies {
            if targets.as_ref().is_none_or(|t| t.contains(&target)) {
                if success {
                    tally.success();
                } else {
                    tally.failure();
                }
            }
        }
        self.outcome()
    }

    fn success(&mut self, target: Target) -> Outcome {
        self.record(target, true)
    }

    fn failure(
        &mut self,
        servers: &Servers,
        target: Target,
        error: &dyn std::fmt::Display,
    ) -> Outcome {
        self.first_failure
            .get_or_insert_with(|| servers.describe(target, error));
        self.record(target, false)
    }

    fn error(&self) -> Error {
        let tally = self
            .tallies
            .iter()
            .map(|(tally, _)| *tally)
            .find(|tally| tally.outcome() != Outcome::Met)
            .unwrap_or(self.tallies[0].0);
        Error::Quorum {
            kind: self.kind,
            needed: tally.needed,
            answered: tally.succeeded,
            replicas: tally.replicas,
            detail: self.first_failure.clone(),
        }
    }

    fn failed<T>(&self) -> Vec<Action<T>> {
        vec![
            Action::Note(Event::QuorumFailed(self.kind)),
            Action::Answer(Err(self.error())),
        ]
    }
}

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

/// Takes `target` out of `waiting`; false when it was not there (a late or duplicate reply).
fn take(waiting: &mut Vec<Target>, target: Target) -> bool {
    match waiting.iter().position(|t| *t == target) {
        Some(i) => {
            waiting.swap_remove(i);
            true
        }
        None => false,
    }
}

/// What a write carries to its coordinator.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub key: String,
    /// `None` for a delete.
    pub value: Option<String>,
    pub context: Option<VClock>,
    /// When the request entered the cluster (see [`crate::version`]).
    pub entered_us: u64,
    /// The client asked for a [`Receipt`].
    pub receipt: bool,
}

/// What a write asked for a receipt answers: which replicas acknowledged it by the time the
/// answer went out, and the context to write after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The context of the version the write made ([`written_context`]).
    pub context: VClock,
    /// The replicas that acknowledged, in the order they did (the coordinator first).
    pub replicas: Vec<Acknowledgement>,
}

/// One replica that acknowledged a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    pub address: String,
    /// It holds the write as a hint for a preferred replica that is down (sloppy quorum).
    pub fallback: bool,
}

/// The context of the version a write made, found in its coordinator's sibling set: the
/// clock of the versions stamped with the write's entry time and holding its value (the one
/// it made; two balancers may hand out one entry time, and then equal values make the choice
/// moot, so each such version counts). A write with it supersedes this write and what this
/// write superseded, and nothing else: a sibling left beside the write stays, since its
/// writer has not seen it. Where the write left no sibling (the usual case), it is the context
/// `get_versions` gives. A set without the write (a reaped delete that entered after it
/// dropped it) gives the set's own context, again what `get_versions` would.
pub fn written_context(siblings: &Siblings, request: &WriteRequest) -> VClock {
    let mut clock = VClock::new();
    let mut found = false;
    for version in siblings
        .versions()
        .iter()
        .filter(|v| v.timestamp_us == request.entered_us && v.value == request.value)
    {
        clock.merge(&version.past);
        clock.witness(version.dot, version.timestamp_us);
        found = true;
    }
    if !found {
        return siblings.context();
    }
    clock.prune(MAX_CLOCK_ENTRIES);
    clock
}

/// A put or delete: one replica coordinates (stamps and stores the write), then its sibling
/// set goes to the others as copies; the client is answered once W replicas hold it.
///
/// The targets are asked to coordinate one after the other, in the order
/// [`super::targets::order_for_write`] gave. One that could not be reached counts as a failed
/// replica and the next is asked; one that answers but will not coordinate (a node refusing a
/// write stamped far ahead of its clock, an operation that expired on the way) is passed over
/// without counting, and gets the write as a copy like the rest. A refusal of the write itself
/// (-32602: too many siblings, too many bytes) is the client's to fix, and every replica
/// would refuse it too: it is the answer.
///
/// One that took the write and gave no answer (a timeout, a connection lost mid-call) may
/// have stamped and stored it. Asking the next would stamp the same write again under
/// another dot: two versions of one request, which a later read may see only one of (its
/// other replicas not reached yet); a write from that read's context supersedes that one,
/// and the other comes back as a sibling of a value the client had overwritten. So the
/// answer is 503, saying the outcome is unknown, as Riak and Cassandra answer a coordinator's
/// timeout; the client reads the key before writing again.
///
/// A write asked for a receipt answers one ([`Receipt`]): the replicas whose success counted
/// before the answer, each marked as a fallback or not, and the context of the version it
/// made; otherwise it answers `None`.
#[derive(Debug)]
pub struct Write {
    servers: Servers,
    request: WriteRequest,
    /// Coordinator candidates not asked yet, in order.
    candidates: std::collections::VecDeque<Target>,
    /// The candidate asked, while no replica has coordinated.
    asking: Option<Target>,
    passed_over: Vec<Target>,
    /// Copies sent and not answered yet.
    waiting: Vec<Target>,
    count: Count,
    answered: bool,
    /// The replicas that stored the write, in the order they said so.
    acknowledged: Vec<Target>,
    /// The context of the version the write made, once a replica coordinated it (kept only
    /// for a receipt).
    written: Option<VClock>,
}

impl Write {
    /// The machine and its first actions; `targets` in coordination order, `switched` when
    /// the first preferred replica was passed over for lagging.
    pub fn start(
        servers: Servers,
        request: WriteRequest,
        plan: Plan,
        switched: bool,
    ) -> (Self, Vec<Action<Option<Receipt>>>) {
        let count = Count::new(QuorumKind::Write, &plan);
        let mut write = Write {
            servers,
            request,
            candidates: plan.targets.into(),
            asking: None,
            passed_over: Vec::new(),
            waiting: Vec::new(),
            count,
            answered: false,
            acknowledged: Vec::new(),
            written: None,
        };
        let mut actions = Vec::new();
        if switched {
            actions.push(Action::Note(Event::CoordinatorSwitched));
        }
        actions.extend(write.ask_next());
        (write, actions)
    }

    fn coordinate(&self, target: Target) -> Op {
        let request = &self.request;
        Op::Coordinate(CoordinateRequest {
            key: request.key.clone(),
            value: request.value.clone(),
            context: request.context.clone(),
            hint_for: self.servers.hint_for(target),
            entered_us: request.entered_us,
        })
    }

    /// Asks the next candidate to coordinate, or gives up when none is left.
    fn ask_next(&mut self) -> Vec<Action<Option<Receipt>>> {
        match self.candidates.pop_front() {
            Some(target) => {
                self.asking = Some(target);
                vec![Action::Send(target, self.coordinate(target))]
            }
            None => {
                self.asking = None;
                // Those passed over answered, but nothing was stored: they count as failed.
                for target in std::mem::take(&mut self.passed_over) {
                    self.count.record(target, false);
                }
                self.answer_failure()
            }
        }
    }

    fn answer(&mut self, result: Result<()>) -> Vec<Action<Option<Receipt>>> {
        if std::mem::replace(&mut self.answered, true) {
            return Vec::new();
        }
        match result {
            Ok(()) => vec![Action::Answer(Ok(self.receipt()))],
            Err(error) => vec![Action::Answer(Err(error))],
        }
    }

    /// The receipt, if the client asked for one: what has been acknowledged so far.
    fn receipt(&self) -> Option<Receipt> {
        if !self.request.receipt {
            return None;
        }
        let replicas = self
            .acknowledged
            .iter()
            .map(|target| Acknowledgement {
                address: self.servers.address(target.server).to_owned(),
                fallback: target.is_fallback(),
            })
            .collect();
        Some(Receipt {
            context: self.written.clone().unwrap_or_default(),
            replicas,
        })
    }

    /// Counts `target`'s success: it stored the write.
    fn stored(&mut self, target: Target) -> Outcome {
        if !self.acknowledged.contains(&target) {
            self.acknowledged.push(target);
        }
        self.count.success(target)
    }

    fn answer_failure(&mut self) -> Vec<Action<Option<Receipt>>> {
        if std::mem::replace(&mut self.answered, true) {
            return Vec::new();
        }
        self.count.failed()
    }

    fn on_coordinated(&mut self, siblings: Siblings) -> Vec<Action<Option<Receipt>>> {
        if self.request.receipt {
            self.written = Some(written_context(&siblings, &self.request));
        }
        let outcome = match self.asking.take() {
            Some(target) => self.stored(target),
            None => self.count.outcome(),
        };
        let copies: Vec<Target> = self
            .passed_over
            .drain(..)
            .chain(self.candidates.drain(..))
            .collect();
        let mut actions: Vec<Action<Option<Receipt>>> = copies
            .iter()
            .map(|&target| {
                Action::Send(
                    target,
                    Op::Merge(MergeRequest {
                        key: self.request.key.clone(),
                        siblings: siblings.clone(),
                        hint_for: self.servers.hint_for(target),
                    }),
                )
            })
            .collect();
        self.waiting = copies;
        match outcome {
            Outcome::Met => actions.extend(self.answer(Ok(()))),
            Outcome::Failed => actions.extend(self.answer_failure()),
            Outcome::Pending if self.waiting.is_empty() => actions.extend(self.answer_failure()),
            Outcome::Pending => {}
        }
        actions
    }
}

impl Machine for Write {
    type Output = Option<Receipt>;

    fn on_reply(
        &mut self,
        target: Target,
        reply: std::result::Result<OpReply, CallError>,
        _now_us: u64,
    ) -> Vec<Action<Option<Receipt>>> {
        if self.asking == Some(target) {
            return match reply {
                Err(CallError::Fault {
                    code: FAULT_INVALID_PARAMS,
                    message,
                }) => {
                    self.asking = None;
                    self.candidates.clear();
                    self.answer(Err(Error::Fault {
                        code: FAULT_INVALID_PARAMS,
                        message,
                    }))
                }
                Err(error @ (CallError::Fault { .. } | CallError::Expired { .. })) => {
                    self.count
                        .first_failure
                        .get_or_insert_with(|| self.servers.describe(target, &error));
                    self.passed_over.push(target);
                    self.ask_next()
                }
                Err(error) if error.maybe_applied() => {
                    self.count.failure(&self.servers, target, &error);
                    self.asking = None;
                    self.candidates.clear();
                    let mut actions = vec![Action::Note(Event::OutcomeUnknown)];
                    actions.extend(self.answer(Err(Error::OutcomeUnknown {
                        addr: self.servers.address(target.server).to_owned(),
                        why: error.to_string(),
                    })));
                    actions
                }
                reply => match siblings_of(reply) {
                    Ok(siblings) => self.on_coordinated(siblings),
                    Err(error) => {
                        if self.count.failure(&self.servers, target, &error) == Outcome::Failed {
                            self.asking = None;
                            self.candidates.clear();
                            self.answer_failure()
                        } else {
                            self.ask_next()
                        }
                    }
                },
            };
        }
        if !take(&mut self.waiting, target) {
            return Vec::new();
        }
        let outcome = match reply {
            Ok(_) => self.stored(target),
            Err(error) => self.count.failure(&self.servers, target, &error),
        };
        match outcome {
            Outcome::Met => self.answer(Ok(())),
            Outcome::Failed => self.answer_failure(),
            Outcome::Pending if self.waiting.is_empty() => self.answer_failure(),
            Outcome::Pending => Vec::new(),
        }
    }
}

/// A get or get_versions: every replica is asked at once; the client gets the merged set
/// once R replied. The machine keeps listening for the stragglers, then either repairs the
/// replicas that answered with less than the merged set (read repair), or, when all N
/// preferred replicas hold exactly the same tombstones, older than the grace period, has the
/// key reaped.
#[derive(Debug)]
pub struct Read {
    servers: Servers,
    key: String,
    replicas: usize,
    tombstone_grace_us: u64,
    waiting: Vec<Target>,
    count: Count,
    merged: Siblings,
    seen: Vec<(Target, Siblings)>,
    answered: bool,
}

impl Read {
    pub fn start(
        servers: Servers,
        key: String,
        plan: Plan,
        replicas: usize,
        tombstone_grace_us: u64,
    ) -> (Self, Vec<Action<Siblings>>) {
        let actions: Vec<Action<Siblings>> = plan
            .targets
            .iter()
            .map(|&target| {
                Action::Send(
                    target,
                    Op::Read(ReadRequest {
                        key: key.clone(),
                        hint_for: servers.hint_for(target),
                    }),
                )
            })
            .collect();
        let count = Count::new(QuorumKind::Read, &plan);
        let mut read = Read {
            servers,
            key,
            replicas,
            tombstone_grace_us,
            waiting: plan.targets,
            count,
            merged: Siblings::new(),
            seen: Vec::new(),
            answered: false,
        };
        let mut actions = actions;
        if read.waiting.is_empty() {
            // No replica to ask at all.
            actions.extend(read.finish(0));
        }
        (read, actions)
    }

    /// Once every reply is in: the answer if none went out yet, then repair or reap.
    fn finish(&mut self, now_us: u64) -> Vec<Action<Siblings>> {
        let mut actions = Vec::new();
        if !std::mem::replace(&mut self.answered, true) {
            actions.extend(self.count.failed());
        }
        let seen = std::mem::take(&mut self.seen);
        let all_primaries =
            seen.len() == self.replicas && seen.iter().all(|(target, _)| !target.is_fallback());
        let everyone_agrees = seen.iter().all(|(_, siblings)| *siblings == self.merged);
        if all_primaries && everyone_agrees && self.merged.is_tombstoned() {
            let age_us = now_us.saturating_sub(self.merged.newest_timestamp_us());
            if age_us >= self.tombstone_grace_us {
                let request = ReapRequest {
                    key: self.key.clone(),
                    dots: self.merged.dots().collect(),
                };
                actions.push(Action::Note(Event::Reaped));
                actions.extend(
                    seen.into_iter()
                        .map(|(target, _)| Action::Send(target, Op::Reap(request.clone()))),
                );
            }
            return actions;
        }
        let stale: Vec<Target> = seen
            .into_iter()
            .filter(|(_, siblings)| *siblings != self.merged)
            .map(|(target, _)| target)
            .collect();
        if !stale.is_empty() {
            actions.push(Action::Note(Event::ReadRepairs(stale.len())));
            actions.extend(stale.into_iter().map(|target| {
                Action::Send(
                    target,
                    Op::Merge(MergeRequest {
                        key: self.key.clone(),
                        siblings: self.merged.clone(),
                        hint_for: self.servers.hint_for(target),
                    }),
                )
            }));
        }
        actions
    }
}

impl Machine for Read {
    type Output = Siblings;

    fn on_reply(
        &mut self,
        target: Target,
        reply: std::result::Result<OpReply, CallError>,
        now_us: u64,
    ) -> Vec<Action<Siblings>> {
        if !take(&mut self.waiting, target) {
            // A late or duplicate reply, or the answer to a repair or reap: nothing to decide.
            return Vec::new();
        }
        let outcome = match siblings_of(reply) {
            Ok(siblings) => {
                self.merged.merge(&siblings);
                self.seen.push((target, siblings));
                self.count.success(target)
            }
            Err(error) => self.count.failure(&self.servers, target, &error),
        };
        let mut actions = Vec::new();
        if !self.answered {
            match outcome {
                Outcome::Met => {
                    self.answered = true;
                    actions.push(Action::Answer(Ok(self.merged.clone())));
                }
                Outcome::Failed => {
                    self.answered = true;
                    actions.extend(self.count.failed());
                }
                Outcome::Pending => {}
            }
        }
        if self.waiting.is_empty() {
            actions.extend(self.finish(now_us));
        }
        actions
    }
}

#[cfg(test)]
mod tests;
