//! A batch of replica operations from the wire, run as one transaction: one commit for its
//! writes, then its reads until the reply budget; an operation whose deadline has passed is
//! refused unapplied.

use std::collections::HashMap;

use crate::error::Error;
use crate::rpc::messages::{Op, OpReply, check_key};

use super::StorageNode;
use super::replica;
use super::transaction::{Place, Transaction};

/// Bytes of values a batch's replies may carry before its remaining reads are deferred
/// ([`OpReply::Deferred`]): a batch of 256 reads of small values stays far below it, while
/// reads of large keys go out a few per batch instead of all in one oversized reply.
pub const READ_REPLY_BUDGET: usize = 32 * 1024 * 1024;

const _: () = assert!(
    3 * replica::MAX_SET_VALUE_BYTES + READ_REPLY_BUDGET <= crate::rpc::client::MAX_RESPONSE_BYTES
);

impl StorageNode {
    /// Runs a batch of operations that carry no deadline (this node's own, and tests').
    pub fn apply_batch(&self, ops: Vec<Op>) -> Vec<OpReply> {
        self.apply_until(ops, u64::MAX)
    }

    pub(super) fn apply_until(&self, ops: Vec<Op>, deadline_us: u64) -> Vec<OpReply> {
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
    pub(super) fn apply(&self, ops: Vec<(Op, u64)>) -> Vec<OpReply> {
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
        let mut last_write = HashMap::new();
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
