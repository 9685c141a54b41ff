//! Memory of recently reaped deletes, so that nothing older than them comes back.
//!
//! A reap reaches the replicas of a key one by one. In between, a replica that has not reaped
//! yet still holds the tombstones, and anti-entropy would dutifully copy them back to the one
//! that already did; once every replica holds them again nothing reaps them until a client
//! reads the key. Worse, a write that entered the cluster before the delete and reaches a
//! replica only after the reap (a request delayed within its deadline, a copy pushed by
//! anti-entropy from a read made just before the delete arrived) would find no tombstone to
//! lose to, and bring the deleted value back. So each node remembers, for a while, the entry
//! time of the newest tombstone it reaped for a key, and drops every incoming version that
//! entered no later: the tombstones themselves, and any write the delete came after, which
//! would read as deleted anyway (`get` shows the version that entered last). Anything newer
//! (a new write, a new delete) goes through.
//!
//! A replica the reap missed (its reap request lost, or it was down) keeps the tombstones,
//! and anti-entropy would move the key between it and the others every round for as long as
//! they remember. So a copy anti-entropy moves carries the sender's memory of the key's reap,
//! and a replica that learns of one drops what the reap dropped, as if it had reaped too.
//! Without that, worse: once the others forgot, the tombstones would come back beside a
//! write made since.
//!
//! The memory is bounded in time and size and lives only in memory: forgetting early costs a
//! tombstone that lingers until the next read reaps it; the writes it guards against arrive
//! within their senders' deadlines, seconds after the reap at most.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

// Simulated time under a simulation (docs/simulation.md); `std::time::Instant` otherwise.
use tokio::time::Instant;

/// How long a reap is remembered: many anti-entropy rounds, far beyond any deadline.
const REMEMBER_FOR: Duration = Duration::from_secs(600);
/// Most reaps remembered at once; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct ReapedTombstones {
    inner: Mutex<Memory>,
    /// Keys remembered, so that a node that reaped nothing lately takes no lock per write.
    remembered: AtomicUsize,
}

#[derive(Default)]
struct Memory {
    /// For each key, the newest entry time among the tombstones reaped, and when.
    by_key: HashMap<String, (u64, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl ReapedTombstones {
    /// Remembers that `key`'s tombstones, the newest of which entered at `newest_us`, were
    /// reaped, here or (reported by anti-entropy) at another replica; unless a reap as new is
    /// remembered already, since forgetting the newer would let what it dropped back in.
    pub fn remember(&self, key: &str, newest_us: u64) {
        let now = Instant::now();
        let mut memory = self.lock();
        memory.forget_old(now);
        if memory
            .by_key
            .get(key)
            .is_some_and(|&(known_us, _)| known_us >= newest_us)
        {
            return;
        }
        memory.by_key.insert(key.to_owned(), (newest_us, now));
        memory.order.push_back((key.to_owned(), now));
        self.remembered
            .store(memory.by_key.len(), Ordering::Relaxed);
    }

    /// The entry time of the newest tombstone reaped lately for `key`.
    pub fn reaped_at(&self, key: &str) -> Option<u64> {
        if self.remembered.load(Ordering::Relaxed) == 0 {
            return None; // the common case, without the lock
        }
        let memory = self.lock();
        match memory.by_key.get(key) {
            Some((newest_us, when)) if when.elapsed() < REMEMBER_FOR => Some(*newest_us),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Memory {
    fn forget_old(&mut self, now: Instant) {
        while let Some((key, when)) = self.order.front() {
            let expired = now.duration_since(*when) >= REMEMBER_FOR;
            if !expired && self.order.len() < MAX_REMEMBERED {
                break;
            }
            // Only drop the entry if it is this one (the key may have been reaped again since).
            if self.by_key.get(key).is_some_and(|(_, at)| at == when) {
                self.by_key.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::Siblings;

    fn write(actor: u64, value: Option<&str>, entered_us: u64) -> Siblings {
        let mut s = Siblings::new();
        s.write(actor, None, value.map(str::to_owned), entered_us);
        s
    }

    /// What a node keeps of an incoming set for a key reaped lately.
    fn kept(memory: &ReapedTombstones, key: &str, incoming: &Siblings) -> Siblings {
        match memory.reaped_at(key) {
            Some(reaped_us) => incoming.newer_than(reaped_us),
            None => incoming.clone(),
        }
    }

    #[test]
    fn drops_what_entered_no_later_than_the_reaped_delete() {
        let memory = ReapedTombstones::default();
        assert_eq!(memory.reaped_at("k"), None);
        let reaped = write(1, None, 100);
        memory.remember("k", 100);
        assert!(kept(&memory, "k", &reaped).is_empty(), "the tombstones");
        let older_put = write(2, Some("<value>old</value>"), 90);
        assert!(
            kept(&memory, "k", &older_put).is_empty(),
            "a put the delete came after"
        );
        let newer = write(3, Some("<value>new</value>"), 110);
        assert_eq!(kept(&memory, "k", &newer), newer);
        assert_eq!(kept(&memory, "other", &older_put), older_put, "another key");
        // A set holding both keeps only the newer version.
        let mut both = older_put.clone();
        both.merge(&newer);
        assert_eq!(both.versions().len(), 2);
        let left = kept(&memory, "k", &both);
        assert_eq!(left.latest_value(), Some("<value>new</value>"));
        assert_eq!(left.versions().len(), 1);
    }

    /// Reaps arrive in any order (this node's own, others' reported by anti-entropy): the
    /// newest is what is remembered.
    #[test]
    fn the_newest_reap_is_remembered() {
        let memory = ReapedTombstones::default();
        for (reaped_us, remembered) in [(100, 100), (90, 100), (120, 120), (100, 120)] {
            memory.remember("k", reaped_us);
            assert_eq!(memory.reaped_at("k"), Some(remembered), "after {reaped_us}");
        }
    }

    #[test]
    fn memory_is_bounded() {
        let memory = ReapedTombstones::default();
        for i in 0..MAX_REMEMBERED + 10 {
            memory.remember(&format!("k{i}"), 1);
        }
        let inner = memory.lock();
        assert!(inner.by_key.len() <= MAX_REMEMBERED + 1);
    }
}
