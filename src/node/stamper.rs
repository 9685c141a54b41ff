//! The node's actor id and the highest dot counter it stamped under it, so that no two
//! writes it coordinates for a key ever share a dot.
//!
//! A dot's counter is one past what the node holds of the key ([`crate::version`]), but the
//! node does not always hold its own history of a key. After a reap dropped a deleted key's
//! tombstones, or after the key moved away and back, its set here is empty, while another
//! replica (one that missed the reap, a copy not yet dropped) may still hold versions whose
//! pasts count this actor's old dots. A counter counted from the set alone starts at 1
//! again, and the new write is taken for one those pasts already saw: obsolete wherever they
//! meet, an acknowledged write lost. So every counter is also above every counter stamped
//! under this actor id, for any key (Riak bumps a vnode's epoch for the same reason).
//!
//! The mark is stored at a clean stop, as the value of the clean-stop mark itself, so that a
//! clean stop by an older version, which stores one byte, counts as no mark. A client's
//! context counting past it was made up, and is refused (`replica::Refusal::ContextAhead`):
//! its past would cover the node's next writes. After a crash that lost writes the
//! engine had not synced (a power loss), the node could not know which counters it had
//! handed out, so it draws a new actor id instead, whose counters collide with nothing; each
//! costs one more entry in the clocks of the keys it coordinates, which pruning bounds.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::storage::{Engine, Tree, WriteOp};
use crate::version::{ActorId, Dot};

const ACTOR_ID_KEY: &[u8] = b"actor_id";
/// Present while the node is stopped after a clean stop, and only then; its value is the
/// highest counter stamped. A value of one byte is an older version's clean stop, which
/// counted nothing: that run's counters are unknown.
const CLEAN_STOP_KEY: &[u8] = b"clean_stop";

pub struct Stamper {
    actor: ActorId,
    highest: AtomicU64,
}

impl Stamper {
    /// The actor id and mark for this run: the stored ones after a clean stop, a new actor
    /// id otherwise (also after a clean stop of a version that stored no mark).
    pub fn start(engine: &dyn Engine) -> Result<Self> {
        let stored_actor = read_u64(engine, ACTOR_ID_KEY)?;
        let mark = engine
            .get(Tree::Meta, CLEAN_STOP_KEY)?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map(u64::from_be_bytes);
        let (actor, highest) = match (stored_actor, mark) {
            (Some(actor), Some(highest)) => (actor, highest),
            _ => (crate::random::random_u64(), 0),
        };
        engine.write(vec![
            WriteOp::put(Tree::Meta, ACTOR_ID_KEY, actor.to_be_bytes()),
            WriteOp::remove(Tree::Meta, CLEAN_STOP_KEY),
        ])?;
        // On disk before any write is stamped: a crash from here on finds no mark of a clean
        // stop.
        engine.sync()?;
        Ok(Stamper {
            actor,
            highest: AtomicU64::new(highest),
        })
    }

    pub fn actor(&self) -> ActorId {
        self.actor
    }

    /// The highest counter stamped under this actor id so far: a new dot's counter is above
    /// it.
    pub fn highest(&self) -> u64 {
        self.highest.load(Ordering::Acquire)
    }

    /// Records a dot just stamped (those of other actors, such as a hint's, are not ours to
    /// count).
    pub fn stamped(&self, dot: Dot) {
        if dot.actor == self.actor {
            self.highest.fetch_max(dot.counter, Ordering::AcqRel);
        }
    }

    /// Marks the stop as clean, once everything is synced: the next start keeps the actor id
    /// and counts on from the mark.
    pub fn mark_clean_stop(&self, engine: &dyn Engine) -> Result<()> {
        engine.write(vec![WriteOp::put(
            Tree::Meta,
            CLEAN_STOP_KEY,
            self.highest().to_be_bytes(),
        )])?;
        engine.sync()?;
        Ok(())
    }
}

fn read_u64(engine: &dyn Engine, key: &[u8]) -> Result<Option<u64>> {
    let Some(bytes) = engine.get(Tree::Meta, key)? else {
        return Ok(None);
    };
    let array: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
        Error::Internal(format!(
            "stored {} is corrupt",
            String::from_utf8_lossy(key).replace('_', " ")
        ))
    })?;
    Ok(Some(u64::from_be_bytes(array)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot(actor: ActorId, counter: u64) -> Dot {
        Dot { actor, counter }
    }

    #[test]
    fn the_actor_id_and_its_mark_survive_a_clean_stop_only() {
        let engine = crate::storage::MemoryEngine::new();
        let first = Stamper::start(&engine).expect("a first start");
        assert_eq!(first.highest(), 0);
        let after_crash = Stamper::start(&engine).expect("a start after a crash");
        assert_ne!(
            first.actor(),
            after_crash.actor(),
            "no clean stop: a new actor"
        );
        after_crash.stamped(dot(after_crash.actor(), 41));
        after_crash.stamped(dot(after_crash.actor(), 7));
        after_crash.stamped(dot(after_crash.actor() ^ 1, 99)); // a hint's actor
        assert_eq!(after_crash.highest(), 41, "the highest of its own dots");
        after_crash.mark_clean_stop(&engine).expect("a clean stop");
        let after_clean_stop = Stamper::start(&engine).expect("a start after a clean stop");
        assert_eq!(
            (after_clean_stop.actor(), after_clean_stop.highest()),
            (after_crash.actor(), 41),
            "a clean stop keeps the actor and counts on from its mark"
        );
        // The mark is gone once started: the next crash draws a new one again.
        let after_another_crash = Stamper::start(&engine).expect("another crash");
        assert_ne!(after_another_crash.actor(), after_clean_stop.actor());
        assert_eq!(after_another_crash.highest(), 0);
    }

    /// A clean stop by a version that stores no mark (an upgrade, or a run of the older
    /// version between two of this one): the counters it handed out are unknown, so the node
    /// starts as after a crash.
    #[test]
    fn a_clean_stop_without_a_mark_draws_a_new_actor() {
        let engine = crate::storage::MemoryEngine::new();
        // What the older version does: clears the mark at start, stores one byte at a clean
        // stop.
        let older_run = || {
            engine
                .write(vec![WriteOp::remove(Tree::Meta, CLEAN_STOP_KEY)])
                .expect("the older version's start");
            engine
                .write(vec![WriteOp::put(Tree::Meta, CLEAN_STOP_KEY, [1u8])])
                .expect("its clean stop");
        };
        let first = Stamper::start(&engine).expect("a first start");
        older_run();
        let upgraded = Stamper::start(&engine).expect("a start after it");
        assert_ne!(upgraded.actor(), first.actor());

        upgraded.stamped(dot(upgraded.actor(), 10));
        upgraded.mark_clean_stop(&engine).expect("a clean stop");
        // The older version keeps the actor and stamps past 10 without counting.
        older_run();
        let again = Stamper::start(&engine).expect("this version again");
        assert_ne!(
            again.actor(),
            upgraded.actor(),
            "the mark of 10 is not trusted"
        );
    }
}
