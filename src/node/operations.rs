//! Replica operations on this node's own copies and on the hints it holds: each reads the
//! key's set under its lock, applies one of the rules of [`super::replica`], and commits
//! the result in a transaction.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::rpc::messages::{
    CoordinateRequest, HeldCopy, MergeRequest, Op, OpReply, ReadRequest, ReapRequest, check_key,
};
use crate::storage::{Tree, WriteOp};
use crate::version::{Dot, Siblings};

use super::StorageNode;
use super::hints::{self, HintRecord};
use super::replica;
use super::transaction::{Place, Transaction};

/// Least time between two log lines about writes refused for
/// [`replica::MAX_ENTRY_AHEAD_US`]: a node with a bad clock meets one per write it would
/// coordinate.
const CLOCK_WARNING_INTERVAL_US: u64 = 10_000_000;

impl StorageNode {
    /// Drops a hint its owner accepted, unless it changed since it was read for delivery.
    pub fn drop_delivered_hint(&self, delivered: &HintRecord) -> Result<bool> {
        let slot = hints::slot(&delivered.owner, &delivered.key);
        let _guard = self.locks.lock(&slot);
        let current = self.load_hint(&slot, &delivered.owner, &delivered.key)?;
        if current.as_ref() != Some(delivered) {
            return Ok(false);
        }
        self.engine
            .write(vec![WriteOp::remove(Tree::Hints, slot)])?;
        self.hints.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The node's own copy of a key, and the entry time of a delete of it reaped here lately
    /// (anti-entropy, partition transfers).
    pub fn read_own(&self, key: &str) -> Result<HeldCopy> {
        Ok(HeldCopy {
            siblings: self.load(key)?,
            reaped_us: self.reaped.reaped_at(key),
        })
    }

    /// Merges other replicas' copies into the node's own (anti-entropy push and pull), as one
    /// batch: one transaction, one journal write. Fails with the first refusal. A reap a copy
    /// reports is remembered first, so that the merge drops what that reap dropped.
    pub fn merge_own_many(&self, entries: Vec<(String, HeldCopy)>) -> Result<()> {
        self.merge_own_many_until(entries, u64::MAX)
    }

    /// As [`Self::merge_own_many`], each entry refused if its turn comes after `deadline_us`
    /// (this node's clock; see [`Envelope`]): the entries in time are merged, and the call
    /// fails if any was refused.
    pub fn merge_own_many_until(
        &self,
        entries: Vec<(String, HeldCopy)>,
        deadline_us: u64,
    ) -> Result<()> {
        let ops = entries
            .into_iter()
            .map(|(key, copy)| {
                if let Some(reaped_us) = copy.reaped_us {
                    self.reaped.remember(&key, reaped_us);
                }
                Op::Merge(MergeRequest {
                    key,
                    siblings: copy.siblings,
                    hint_for: None,
                })
            })
            .collect();
        for reply in self.apply_until(ops, deadline_us) {
            match reply {
                OpReply::Fault { code, message } => return Err(Error::Fault { code, message }),
                OpReply::Expired { late_by_us } => {
                    return Err(Error::Internal(format!(
                        "arrived {} ms after its deadline; refused",
                        late_by_us / 1000
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Drops the node's own copy of `key` if it still holds exactly the versions `dots`
    /// (rehoming: the copy was handed to the key's replicas); answers whether it did.
    pub fn drop_if_unchanged(&self, key: &str, dots: &[Dot]) -> Result<bool> {
        check_key(key)?;
        let place = Place::own(key);
        Ok(self
            .write_one(place, |tx, place| {
                let siblings = tx.siblings(place)?;
                if !siblings.dots().eq(dots.iter().copied()) {
                    return Ok(false);
                }
                *siblings = Siblings::new();
                Ok(true)
            })?
            .0)
    }

    /// Runs one write in a transaction of its own; answers what `stage` returned and the
    /// place's sibling set after the write.
    fn write_one<T>(
        &self,
        place: Place,
        stage: impl FnOnce(&mut Transaction<'_>, &Place) -> Result<T>,
    ) -> Result<(T, Siblings)> {
        let mut transaction = Transaction::begin(self, [&place]);
        let outcome = stage(&mut transaction, &place)?;
        let mut committed = transaction.commit()?;
        Ok((outcome, committed.take(&place)))
    }

    /// Removes a key whose tombstones every replica holds (the balancer checked), but only if
    /// this node still holds exactly those tombstones: anything written since keeps the key.
    pub fn reap(&self, request: &ReapRequest) -> Result<bool> {
        check_key(&request.key)?;
        let place = Place::own(&request.key);
        Ok(self
            .write_one(place, |tx, place| self.stage_reap(tx, place, &request.dots))?
            .0)
    }

    pub fn coordinate(&self, request: CoordinateRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        let place = Place::new(&request.key, request.hint_for.as_deref());
        Ok(self
            .write_one(place, |tx, place| self.stage_coordinate(tx, place, request))?
            .1)
    }

    pub fn merge(&self, request: MergeRequest) -> Result<Siblings> {
        check_key(&request.key)?;
        let place = Place::new(&request.key, request.hint_for.as_deref());
        Ok(self
            .write_one(place, |tx, place| {
                self.stage_merge(tx, place, &request.siblings)
            })?
            .1)
    }

    /// Stamps a client's write with this node's actor id against what the place holds (the
    /// rules: [`replica::coordinate`]).
    pub(super) fn stage_coordinate(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        request: CoordinateRequest,
    ) -> Result<()> {
        self.log("put", place.key(), request.value.is_none());
        let reaped_us = self.reaped_at(place);
        let siblings = transaction.siblings(place)?;
        let (actor, after) = stamping_actor(&self.stamper, place);
        let stamp = replica::Stamp {
            actor,
            after,
            context: request.context.as_ref(),
            entered_us: request.entered_us,
            now_us: crate::clock::now_us(),
            reaped_us,
        };
        match replica::coordinate(siblings, stamp, request.value) {
            Ok(replica::Coordinated::Applied(dot)) => {
                self.stamper.stamped(dot);
                Ok(())
            }
            Ok(replica::Coordinated::SupersededByReapedDelete) => Ok(()),
            Err(refusal) => {
                if let replica::Refusal::AheadOfClock { ahead_us } = refusal {
                    self.warn_clock(ahead_us, stamp.now_us);
                }
                Err(refusal.into())
            }
        }
    }

    /// Counts a write refused for being stamped ahead of this node's clock, and says so in
    /// the log, at most every [`CLOCK_WARNING_INTERVAL_US`].
    fn warn_clock(&self, ahead_us: u64, now_us: u64) {
        self.metrics.clock_refusals.inc();
        let last = self.last_clock_warning_us.load(Ordering::Relaxed);
        if now_us.saturating_sub(last) >= CLOCK_WARNING_INTERVAL_US
            && self
                .last_clock_warning_us
                .compare_exchange(last, now_us, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                ahead_ms = ahead_us / 1000,
                refused = self.metrics.clock_refusals.get(),
                "refusing to coordinate writes stamped ahead of this node's clock (other replicas coordinate them): is this machine's clock synchronised?"
            );
        }
    }

    /// The entry time of a delete reaped lately at `place`; hints are never reaped.
    fn reaped_at(&self, place: &Place) -> Option<u64> {
        if place.is_hint() {
            None
        } else {
            self.reaped.reaped_at(place.key())
        }
    }

    /// Folds in a sibling set another replica or a read repair sent (see [`replica::merge`]).
    pub(super) fn stage_merge(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        incoming: &Siblings,
    ) -> Result<()> {
        self.log("store", place.key(), false);
        let reaped_us = self.reaped_at(place);
        let siblings = transaction.siblings(place)?;
        replica::merge(siblings, incoming, reaped_us);
        Ok(())
    }

    /// Drops the place's tombstones if they are exactly `dots`; answers whether it did.
    pub(super) fn stage_reap(
        &self,
        transaction: &mut Transaction<'_>,
        place: &Place,
        dots: &[Dot],
    ) -> Result<bool> {
        self.log("reap", place.key(), false);
        let siblings = transaction.siblings(place)?;
        let Some(newest_us) = replica::reap(siblings, dots) else {
            return Ok(false);
        };
        // Remembered at once, so a merge later in the same batch cannot bring them back; if
        // the commit fails the node still holds these tombstones and skipping their merge is
        // a no-op.
        self.reaped.remember(place.key(), newest_us);
        Ok(true)
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
}

/// The actor a write coordinated at `place` is stamped with, and the counter its dot must
/// pass ([`replica::Stamp::after`]). A hint holds only what this node coordinated or received
/// for one owner since its last handoff, beside the node's own copy and its other hints. Two
/// writes coordinated into hints (for two owners, or for one owner after a handoff emptied
/// the hint) once got the same dot under the node's own actor, and a client whose context
/// covered one superseded the other (the simulation lost an acknowledged put so, seed
/// 16132755956858121918). The node's highest counter would now keep their dots apart, but
/// not their clocks: a clock that counts the node's dot 6 counts its dot 5 as seen, and 5 may
/// be in another place that the reader never saw. So a hint is stamped under an actor drawn
/// for that one write, unique by construction, and counting from 1. It costs a clock entry
/// per such write, and such writes are rare (every preferred replica was down); clocks are
/// pruned past `MAX_CLOCK_ENTRIES`, which can only leave a spurious sibling, never drop a
/// write.
fn stamping_actor(
    stamper: &super::stamper::Stamper,
    place: &Place,
) -> (crate::version::ActorId, u64) {
    if place.is_hint() {
        (crate::random::random_u64(), 0)
    } else {
        (stamper.actor(), stamper.highest())
    }
}
