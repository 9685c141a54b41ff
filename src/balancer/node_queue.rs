//! Batching replica operations to one storage node.
//!
//! Under load a balancer has many operations in flight to each node at once. Sending each in
//! its own HTTP request costs a request's worth of parsing and syscalls on both sides per
//! operation; the profile of the first version showed those, not the work, dominating. So
//! operations for a node go into a queue, and a dispatcher sends whatever has accumulated as
//! one binary batch ([`crate::rpc::batch`]) per request. A batch has its node to itself while it is
//! answered promptly; one slow to answer lets a second go beside it ([`SOLE_BATCH_FOR`]).
//! When the node is idle a batch holds one operation and leaves at once, so batching adds no
//! latency; when it is busy, batches grow by themselves, like a journal's group commit.
//!
//! Each operation keeps its own deadline: it fails after the replica timeout even if its
//! batch is still queued ([`CallError::Timeout`] once sent, [`CallError::TimedOutUnsent`]
//! before), and late replies are dropped. The
//! deadline also travels with the operation, translated into the node's clock
//! ([`crate::clock`]), and the node refuses it unapplied once it has passed
//! ([`crate::rpc::messages::Envelope`]): an operation the balancer gave up on cannot be applied later,
//! when a retransmitted or long-queued request finally reaches the node.
//!
//! The queue also tells whether its node is *lagging*: it has work outstanding and has made
//! no progress (answered nothing) for [`LAG_THRESHOLD`]. On a busy machine a node's threads
//! are now and then descheduled for several milliseconds; the balancer lets another replica
//! coordinate a write meanwhile, instead of queueing it behind the stalled one. A node that
//! has answered nothing for half the replica timeout is *stuck*: new operations for it fail
//! at once, so the failure detector marks it down without waiting for the first timeout,
//! and a hung node does not collect a queue of doomed operations (with their values) first.
//! The values waiting for one node are bounded in bytes too
//! ([`MAX_OUTSTANDING_VALUE_BYTES`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
// Simulated time under a simulation (docs/simulation.md); `std::time::Instant` otherwise.
use tokio::time::Instant;

use crate::clock::{self, micros};
use crate::rpc::batch::send_batch;
use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::messages::{Op, OpReply};

/// Batches in flight to one node at most.
const BATCHES_IN_FLIGHT: usize = 2;
/// How long a batch has its node to itself before a second one may follow it. One batch at a
/// time makes the biggest batches, so the fewest requests, wake-ups and journal writes per
/// operation: more throughput and a lower p99 than two at all times (docs/performance.md,
/// item 13). A batch that is slow to answer (a large value travelling either way, a node
/// stalled in a flush) then lets a second one go, so small operations do not queue behind
/// it. The same 2 ms as [`LAG_THRESHOLD`]: a
/// batch not answered by then is late by the same measure that passes a node over as
/// coordinator.
const SOLE_BATCH_FOR: Duration = LAG_THRESHOLD;
/// A batch carrying this many bytes of values never has its node to itself.
const HEAVY_BATCH_VALUE_BYTES: usize = 1024 * 1024;
/// Most operations in one batch.
const MAX_BATCH_OPS: usize = 256;
/// A batch stops growing past this many bytes of values (it always takes one operation).
const MAX_BATCH_VALUE_BYTES: usize = 4 * 1024 * 1024;
/// Operations that may wait for one node before new ones are refused at once.
const QUEUE_CAPACITY: usize = 16 * 1024;
/// Bytes of values that may be queued or in flight for one node before new operations are
/// refused at once (one operation alone is always taken). Without it, a node that stopped
/// answering would collect every copy sent to it until the failure detector noticed: at full
/// speed with large values, gigabytes of the balancer's memory.
pub const MAX_OUTSTANDING_VALUE_BYTES: usize = 128 * 1024 * 1024;
/// How long a node with work outstanding may go without answering before it counts as
/// lagging. A batch is typically answered within a millisecond under full load; the stalls
/// worth avoiding last several milliseconds (docs/performance.md).
pub const LAG_THRESHOLD: Duration = Duration::from_millis(2);

/// Whether the node keeps up, shared by the queue's clones and its dispatcher.
#[derive(Default)]
struct Progress {
    load: Mutex<Load>,
}

/// The three change together (an operation arriving at an idle node restarts the silence),
/// so they sit under one lock: counters apart could show work outstanding with the time of
/// an answer from before the node went idle, a long silence that never was.
#[derive(Default)]
struct Load {
    /// Operations queued or in flight.
    operations: usize,
    /// Bytes of values those operations carry.
    value_bytes: usize,
    /// When the node last answered a batch, or was given work while it had none; `None`
    /// before either.
    last_progress: Option<Instant>,
    /// An operation sent to the node timed out, and the node has answered nothing since.
    timed_out: bool,
}

impl Progress {
    fn load(&self) -> MutexGuard<'_, Load> {
        // Plain counters: a panic elsewhere cannot leave them half-updated.
        self.load.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node answered.
    fn mark(&self) {
        let mut load = self.load();
        load.last_progress = Some(Instant::now());
        load.timed_out = false;
    }

    /// See [`NodeQueue::is_lagging`]: one look under the lock.
    fn is_lagging(&self) -> bool {
        let load = self.load();
        load.timed_out || load.silent_for() > LAG_THRESHOLD
    }

    /// How long the node has had work outstanding without answering anything.
    fn silent_for(&self) -> Duration {
        self.load().silent_for()
    }
}

impl Load {
    fn silent_for(&self) -> Duration {
        match self.last_progress {
            Some(since) if self.operations > 0 => since.elapsed(),
            _ => Duration::ZERO,
        }
    }
}

/// Counts an operation and its value bytes as outstanding until dropped.
struct Outstanding<'a> {
    progress: &'a Progress,
    value_bytes: usize,
}

impl<'a> Outstanding<'a> {
    /// Takes the operation in, unless the node already has too many value bytes waiting.
    fn new(progress: &'a Progress, value_bytes: usize) -> Result<Self, CallError> {
        let mut load = progress.load();
        if load.value_bytes > 0
            && load.value_bytes.saturating_add(value_bytes) > MAX_OUTSTANDING_VALUE_BYTES
        {
            return Err(CallError::Unsent(format!(
                "more than {} MiB of values waiting for this node",
                MAX_OUTSTANDING_VALUE_BYTES >> 20
            )));
        }
        if load.operations == 0 {
            load.last_progress = Some(Instant::now());
        }
        load.operations += 1;
        load.value_bytes += value_bytes;
        Ok(Outstanding {
            progress,
            value_bytes,
        })
    }
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        let mut load = self.progress.load();
        load.operations = load.operations.saturating_sub(1);
        load.value_bytes = load.value_bytes.saturating_sub(self.value_bytes);
    }
}

struct Pending {
    op: Op,
    /// When the caller stops waiting, on this machine's clock (microseconds since the epoch).
    deadline_us: u64,
    reply: oneshot::Sender<Result<OpReply, CallError>>,
    /// Who had the operation last: a batch about to send it, or its caller giving up first.
    handoff: Handoff,
}

/// Settles, once, whether an operation went out before its caller gave up: the caller then
/// knows whether the node may have applied it (a timeout) or cannot have (never sent).
#[derive(Clone, Default)]
struct Handoff(Arc<AtomicU8>);

const QUEUED: u8 = 0;
const SENT: u8 = 1;
const ABANDONED: u8 = 2;

impl Handoff {
    /// For a batch about to go out: false if the caller gave up first (leave it out).
    fn send(&self) -> bool {
        match self
            .0
            .compare_exchange(QUEUED, SENT, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => true,
            Err(state) => state == SENT, // sent before, in a batch whose reads are resent
        }
    }

    /// For a caller giving up: true if the operation was never sent, and now never will be.
    fn abandon(&self) -> bool {
        self.0
            .compare_exchange(QUEUED, ABANDONED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The queue of operations for one storage node.
#[derive(Clone)]
pub struct NodeQueue {
    queue: mpsc::Sender<Pending>,
    progress: Arc<Progress>,
    /// How long the node may go without answering, work outstanding, before it is stuck.
    stuck_after: Duration,
    /// Where each operation's time, queueing included, is recorded (the balancer's replica
    /// call latency for this node).
    latency: Option<Arc<crate::telemetry::Histogram>>,
}

impl NodeQueue {
    /// Starts the dispatcher for the node at `address`; it stops when every clone is dropped.
    pub fn new(address: String, client: RpcClient, batch_timeout: Duration) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE_CAPACITY);
        let progress = Arc::new(Progress::default());
        tokio::spawn(dispatch(
            address,
            client,
            batch_timeout,
            pending,
            progress.clone(),
        ));
        NodeQueue {
            queue,
            progress,
            stuck_after: batch_timeout / 2,
            latency: None,
        }
    }

    /// This queue, recording each operation's time in `latency`.
    pub fn with_latency(mut self, latency: Arc<crate::telemetry::Histogram>) -> Self {
        self.latency = Some(latency);
        self
    }

    /// Whether the node has had work outstanding without answering anything for
    /// [`LAG_THRESHOLD`], or let an operation sent to it time out and answered nothing since.
    /// The second matters for writes: a coordinator that takes a write and does not answer
    /// leaves its outcome unknown (`coordinator::Write`), so a node that just did so is not
    /// asked first again, even by requests whose own short timeouts never mark it down.
    pub fn is_lagging(&self) -> bool {
        self.progress.is_lagging()
    }

    /// Runs one operation on the node, within `timeout`.
    pub async fn call(&self, op: Op, timeout: Duration) -> Result<OpReply, CallError> {
        let started = Instant::now();
        let result = self.call_unmeasured(op, timeout).await;
        if let Some(latency) = &self.latency {
            latency.observe(started.elapsed());
        }
        result
    }

    async fn call_unmeasured(&self, op: Op, timeout: Duration) -> Result<OpReply, CallError> {
        let silent = self.progress.silent_for();
        if silent > self.stuck_after {
            return Err(CallError::Unsent(format!(
                "no answer for {} ms with work outstanding",
                silent.as_millis()
            )));
        }
        let _outstanding = Outstanding::new(&self.progress, value_len(&op))?;
        let (reply, mut answer) = oneshot::channel();
        let deadline_us = clock::now_us().saturating_add(micros(timeout));
        let handoff = Handoff::default();
        self.queue
            .try_send(Pending {
                op,
                deadline_us,
                reply,
                handoff: handoff.clone(),
            })
            .map_err(|_| CallError::Unsent("too many operations queued for this node".into()))?;
        let result = match tokio::time::timeout(timeout, &mut answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) if handoff.abandon() => {
                Err(CallError::Unsent("batch dispatcher stopped".into()))
            }
            Ok(Err(_)) => Err(CallError::Transport("batch dispatcher stopped".into())),
            Err(_) => {
                answer.close();
                // An answer that came as the wait ended still counts.
                match answer.try_recv() {
                    Ok(result) => result,
                    Err(_) if handoff.abandon() => Err(CallError::TimedOutUnsent),
                    Err(_) => Err(CallError::Timeout),
                }
            }
        };
        // Sent, and no answer came (its batch's or this caller's wait ran out, or the
        // connection broke): not one to coordinate a write next, until it answers again.
        if matches!(result, Err(CallError::Timeout | CallError::Transport(_))) {
            self.progress.load().timed_out = true;
        }
        result
    }
}

async fn dispatch(
    address: String,
    client: RpcClient,
    batch_timeout: Duration,
    mut pending: mpsc::Receiver<Pending>,
    progress: Arc<Progress>,
) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    let sole = Arc::new(Semaphore::new(1));
    loop {
        // Take a slot and the turn first: while a batch has the node to itself, or every slot
        // is busy, operations pile up into the next batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok(turn) = sole.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = pending.recv().await else {
            return;
        };
        let mut batch = vec![first];
        let mut value_bytes = value_len(&batch[0].op);
        while batch.len() < MAX_BATCH_OPS && value_bytes < MAX_BATCH_VALUE_BYTES {
            match pending.try_recv() {
                Ok(next) => {
                    value_bytes += value_len(&next.op);
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let (client, address, progress) = (client.clone(), address.clone(), progress.clone());
        tokio::spawn(async move {
            let mut sending =
                std::pin::pin!(send(&client, &address, batch, batch_timeout, &progress));
            if value_bytes < HEAVY_BATCH_VALUE_BYTES {
                tokio::select! {
                    // An answer that comes as the wait ends counts as in time (a fixed order,
                    // not tokio's coin, which a simulation could not replay).
                    biased;
                    () = &mut sending => return,
                    () = tokio::time::sleep(SOLE_BATCH_FOR) => {}
                }
            }
            drop(turn);
            sending.await;
            drop(slot);
        });
    }
}

/// Sends a batch and hands out the answers, sending the reads the node deferred again until
/// none is left. Each answered round counts as the node's progress (a timeout or a failed
/// connection is none; an error status is an answer).
async fn send(
    client: &RpcClient,
    address: &str,
    batch: Vec<Pending>,
    timeout: Duration,
    progress: &Progress,
) {
    let mut batch = batch;
    loop {
        // Operations whose caller gave up are not sent.
        batch.retain(|pending| pending.handoff.send() && !pending.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let ops: Vec<(&Op, u64)> = batch.iter().map(|p| (&p.op, p.deadline_us)).collect();
        let timeout = batch_timeout(timeout, &batch, clock::now_us());
        let answers = match send_batch(client, address, &ops, timeout).await {
            Ok(answers) => answers,
            Err(error) => {
                if !error.is_unreachable() {
                    progress.mark(); // an error status, a refusal: an answer all the same
                }
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
                return;
            }
        };
        progress.mark();
        // Resent batches hold only reads, and a node runs the first read of a batch whose
        // writes answered nothing large: a node deferring a whole batch, or anything but a
        // read, would be asked forever or made to write twice.
        let deferred_wrongly = answers.iter().zip(&batch).any(|(answer, pending)| {
            matches!(answer, OpReply::Deferred) && !matches!(pending.op, Op::Read(_))
        });
        if deferred_wrongly
            || answers
                .iter()
                .all(|answer| matches!(answer, OpReply::Deferred))
        {
            let error = CallError::BadResponse("the node deferred what it must answer".into());
            for pending in batch {
                let _ = pending.reply.send(Err(error.clone()));
            }
            return;
        }
        let mut deferred = Vec::new();
        for (pending, answer) in batch.into_iter().zip(answers) {
            let result = match answer {
                OpReply::Deferred => {
                    deferred.push(pending);
                    continue;
                }
                OpReply::Fault { code, message } => Err(CallError::Fault { code, message }),
                OpReply::Expired { late_by_us } => Err(CallError::Expired {
                    late_by_ms: late_by_us / 1000,
                }),
                other => Ok(other),
            };
            let _ = pending.reply.send(result);
        }
        batch = deferred;
    }
}

/// How long a batch may take: the replica timeout, or longer while one of its operations'
/// callers waits longer (a request's own `timeout_ms` above the replica timeout, at most
/// [`MAX_TIMEOUT_MS`](crate::balancer::request::MAX_TIMEOUT_MS)); each caller still stops at
/// its own deadline.
fn batch_timeout(replica_timeout: Duration, batch: &[Pending], now_us: u64) -> Duration {
    let longest = Duration::from_millis(crate::balancer::request::MAX_TIMEOUT_MS.unsigned_abs());
    let latest_us = batch.iter().map(|p| p.deadline_us).max().unwrap_or(0);
    let wanted = Duration::from_micros(latest_us.saturating_sub(now_us)).min(longest);
    replica_timeout.max(wanted)
}

/// Bytes of values an operation carries, to keep batches of huge values small.
fn value_len(op: &Op) -> usize {
    match op {
        Op::Coordinate(request) => request.value_bytes(),
        Op::Merge(request) => request.siblings.value_bytes(),
        Op::Read(_) | Op::Reap(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::test_node::{FakeNode, fake_node, read};

    /// A node's answer to a batch of `len`: the first operation answered, the rest deferred.
    fn answer_first_defer_rest(ops: &[Op]) -> Vec<OpReply> {
        let mut answers = vec![OpReply::Deferred; ops.len()];
        answers[0] = OpReply::Siblings(crate::version::Siblings::new());
        answers
    }

    /// Sends `batch` to the node at `address`; the progress it recorded.
    async fn send_to(address: &str, batch: Vec<Pending>) -> Progress {
        let progress = Progress::default();
        send(
            &RpcClient::new(),
            address,
            batch,
            Duration::from_secs(5),
            &progress,
        )
        .await;
        progress
    }

    fn pending(key: &str) -> (Pending, oneshot::Receiver<Result<OpReply, CallError>>) {
        let (reply, answer) = oneshot::channel();
        (
            Pending {
                op: read(key),
                deadline_us: u64::MAX,
                reply,
                handoff: Handoff::default(),
            },
            answer,
        )
    }

    /// The node defers all but the first read of each batch: they are sent again, fewer each
    /// time, until every caller has its answer.
    #[tokio::test]
    async fn deferred_operations_are_sent_again_until_answered() {
        let FakeNode { address, sizes, .. } = fake_node(answer_first_defer_rest);
        let (batch, answers): (Vec<_>, Vec<_>) = ["a", "b", "c"].map(pending).into_iter().unzip();
        let progress = send_to(&address, batch).await;
        assert!(
            progress.load().last_progress.is_some(),
            "answers are progress"
        );
        for answer in answers {
            assert!(matches!(
                answer.await.expect("an answer"),
                Ok(OpReply::Siblings(_))
            ));
        }
        assert_eq!(*sizes.lock().expect("sizes"), [3, 2, 1]);
    }

    /// A node's answer to a batch: a refusal of each operation, 1000 bytes long.
    fn answer_long_faults(ops: &[Op]) -> Vec<OpReply> {
        let fault = OpReply::Fault {
            code: -32602,
            message: "x".repeat(1000),
        };
        vec![fault; ops.len()]
    }

    /// A reply over the cap is a bad answer, not silence: the node is up, and a balancer that
    /// took it for unreachable would mark a healthy node down (`health.rs` only counts
    /// timeouts and transport errors).
    #[tokio::test]
    async fn a_reply_over_the_cap_is_a_bad_response_from_a_node_that_answered() {
        let FakeNode { address, .. } = fake_node(answer_long_faults);
        let (batch, answers): (Vec<_>, Vec<_>) = ["a", "b"].map(pending).into_iter().unzip();
        let progress = Progress::default();
        let client = RpcClient::with_max_response_bytes(1000);
        send(&client, &address, batch, Duration::from_secs(5), &progress).await;
        for answer in answers {
            let answer = answer.await.expect("an answer");
            assert!(
                matches!(&answer, Err(CallError::BadResponse(message)) if message.contains("1000 bytes")),
                "{answer:?}"
            );
        }
        assert!(progress.load().last_progress.is_some(), "the node answered");
        // Within the cap, the same reply is read as usual.
        let (batch, answers): (Vec<_>, Vec<_>) = ["a"].map(pending).into_iter().unzip();
        let client = RpcClient::with_max_response_bytes(10_000);
        send(&client, &address, batch, Duration::from_secs(5), &progress).await;
        for answer in answers {
            assert!(matches!(
                answer.await.expect("an answer"),
                Err(CallError::Fault { code: -32602, .. })
            ));
        }
    }

    /// Only reads may be deferred: a write sent twice could be applied twice.
    #[tokio::test]
    async fn a_deferred_write_is_a_bad_response() {
        let FakeNode { address, sizes, .. } = fake_node(answer_first_defer_rest);
        let (read_pending, read_answer) = pending("a");
        let (reply, write_answer) = oneshot::channel();
        let write = Pending {
            op: Op::Coordinate(crate::rpc::messages::CoordinateRequest {
                key: "b".into(),
                value: Some("<value>v</value>".into()),
                context: None,
                hint_for: None,
                entered_us: 1,
            }),
            deadline_us: u64::MAX,
            reply,
            handoff: Handoff::default(),
        };
        let batch = vec![read_pending, write];
        send_to(&address, batch).await;
        assert!(matches!(
            write_answer.await.expect("an answer"),
            Err(CallError::BadResponse(_))
        ));
        assert!(read_answer.await.expect("an answer").is_err());
        assert_eq!(*sizes.lock().expect("sizes"), [2], "nothing was sent twice");
    }

    /// A node that defers a whole batch would be asked forever: its callers get an error.
    #[tokio::test]
    async fn a_node_deferring_everything_is_a_bad_response() {
        let FakeNode { address, sizes, .. } = fake_node(|ops| vec![OpReply::Deferred; ops.len()]);
        let (batch, answers): (Vec<_>, Vec<_>) = ["a", "b"].map(pending).into_iter().unzip();
        send_to(&address, batch).await;
        for answer in answers {
            assert!(matches!(
                answer.await.expect("an answer"),
                Err(CallError::BadResponse(_))
            ));
        }
        assert_eq!(*sizes.lock().expect("sizes"), [2]);
    }

    /// A node's refusal of an operation that came too late reaches the caller as such.
    #[tokio::test]
    async fn an_expired_operation_is_an_error_of_its_own() {
        let FakeNode { address, .. } =
            fake_node(|ops| vec![OpReply::Expired { late_by_us: 7_000 }; ops.len()]);
        let (batch, answers): (Vec<_>, Vec<_>) = ["a"].map(pending).into_iter().unzip();
        send_to(&address, batch).await;
        for answer in answers {
            assert!(matches!(
                answer.await.expect("an answer"),
                Err(CallError::Expired { late_by_ms: 7 })
            ));
        }
    }

    #[test]
    fn values_waiting_for_one_node_are_bounded_in_bytes() {
        let progress = Progress::default();
        let huge = Outstanding::new(&progress, MAX_OUTSTANDING_VALUE_BYTES * 2)
            .expect("one operation alone is always taken");
        assert!(matches!(
            Outstanding::new(&progress, 0),
            Err(CallError::Unsent(_))
        ));
        drop(huge);
        let half = MAX_OUTSTANDING_VALUE_BYTES / 2;
        let first = Outstanding::new(&progress, half).expect("within the bound");
        let second = Outstanding::new(&progress, half).expect("up to the bound");
        assert!(Outstanding::new(&progress, 1).is_err());
        drop((first, second));
        let load = progress.load();
        assert_eq!((load.operations, load.value_bytes), (0, 0));
    }

    /// A node that accepts connections and never answers (like one under SIGSTOP) is lagging
    /// at once, and stuck after half the timeout: then new calls fail at once instead of
    /// joining the queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_node_is_lagging_then_stuck() {
        let address = crate::rpc::test_node::silent_peer();
        let timeout = Duration::from_secs(4);
        let queue = NodeQueue::new(address, RpcClient::new(), timeout);
        assert!(!queue.is_lagging(), "nothing outstanding, nothing lagging");

        let call = |key: &'static str, timeout: Duration| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.call(read(key), timeout).await })
        };
        let first = call("a", timeout);
        // A second batch goes beside the first once it is late; a third waits for a slot
        // that frees only after its caller gave up, so its operation is never sent.
        tokio::time::sleep(LAG_THRESHOLD * 2).await;
        let second = call("a2", timeout);
        tokio::time::sleep(LAG_THRESHOLD * 2).await;
        let third = call("a3", timeout / 4);
        tokio::time::sleep(LAG_THRESHOLD * 6).await;
        assert!(queue.is_lagging());

        // Past half the timeout, before the first call's own timeout.
        tokio::time::sleep(timeout * 13 / 20).await;
        match queue.call(read("b"), timeout).await {
            Err(CallError::Unsent(message)) => {
                assert!(message.contains("no answer"), "{message}")
            }
            other => panic!("a call to a stuck node: expected it unsent, got {other:?}"),
        }
        // Sent and not answered: the node may have applied them. Never sent: it cannot have.
        for (call, sent) in [(first, true), (second, true), (third, false)] {
            match call.await.expect("a call's task") {
                Err(CallError::Timeout) => assert!(sent, "an unsent operation timed out"),
                Err(CallError::TimedOutUnsent) => {
                    assert!(!sent, "a sent operation reported unsent")
                }
                other => panic!("expected a timeout or unsent, got {other:?}"),
            }
        }
        // Nothing outstanding any more, but it let calls time out and answered nothing
        // since: still not one to ask to coordinate a write.
        assert_eq!(queue.progress.load().operations, 0);
        assert!(queue.is_lagging());
    }

    /// Answers every operation with an empty set; a batch whose first key starts with "slow"
    /// only after `SLOW_ANSWER`.
    fn answer_slow_keys_late(ops: &[Op]) -> Vec<OpReply> {
        if matches!(ops.first(), Some(Op::Read(request)) if request.key.starts_with("slow")) {
            std::thread::sleep(SLOW_ANSWER);
        }
        vec![OpReply::Siblings(crate::version::Siblings::new()); ops.len()]
    }

    const SLOW_ANSWER: Duration = Duration::from_millis(600);

    /// Calls `key` on `queue` in a task of its own.
    fn call_in_task(
        queue: &NodeQueue,
        key: &'static str,
    ) -> tokio::task::JoinHandle<Result<OpReply, CallError>> {
        let queue = queue.clone();
        tokio::spawn(async move { queue.call(read(key), Duration::from_secs(10)).await })
    }

    /// A batch slow to answer has the node to itself only briefly: an operation sent after it
    /// travels in a second batch, beside it, and is answered first. A third batch waits for a
    /// slot: the node never has more than two to answer at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_batch_lets_one_more_go_and_no_more() {
        let node = fake_node(answer_slow_keys_late);
        let queue = NodeQueue::new(
            node.address.clone(),
            RpcClient::new(),
            Duration::from_secs(10),
        );
        let slow = call_in_task(&queue, "slow-1");
        node.received(1).await;
        let fast = tokio::time::timeout(SLOW_ANSWER / 2, queue.call(read("fast"), SLOW_ANSWER))
            .await
            .expect("the second batch went while the first was unanswered");
        assert!(fast.is_ok(), "{fast:?}");
        assert!(!slow.is_finished());

        // Two slow batches at the node: the next operation waits for one of them.
        let second_slow = call_in_task(&queue, "slow-2");
        node.received(3).await;
        let third = call_in_task(&queue, "fast-too");
        for call in [slow, second_slow, third] {
            let answer = call.await.expect("task");
            assert!(answer.is_ok(), "{answer:?}");
        }
        assert_eq!(node.batches(), 4, "one batch per call");
        assert_eq!(node.busy.lock().expect("busy").most, 2);
    }

    /// A batch waits the replica timeout, or longer while one of its callers waits longer
    /// (a request's own timeout_ms), never past the longest timeout_ms a request may ask.
    #[test]
    fn batch_timeout_table() {
        let now_us = 1_000_000_000;
        let replica = Duration::from_secs(1);
        // (the callers' deadlines, microseconds after now) -> the batch's timeout
        let cases: [(&[u64], Duration); 5] = [
            (&[1_000_000], replica),
            (&[200_000, 300_000], replica),
            (&[200_000, 5_000_000], Duration::from_secs(5)),
            (&[u64::MAX - now_us], Duration::from_secs(60)),
            (&[], replica),
        ];
        for (deadlines, expected) in cases {
            let batch: Vec<Pending> = deadlines
                .iter()
                .map(|after_us| {
                    let (mut pending, _) = pending("k");
                    pending.deadline_us = now_us + after_us;
                    pending
                })
                .collect();
            assert_eq!(
                batch_timeout(replica, &batch, now_us),
                expected,
                "{deadlines:?}"
            );
        }
    }
}
