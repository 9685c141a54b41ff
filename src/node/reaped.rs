//! Memory of recently reaped tombstones, so that a replica does not take them back.
//!
//! A reap reaches the replicas of a key one by one. In between, a replica that has not reaped
//! yet still holds the tombstones, and anti-entropy would dutifully copy them back to the one
//! that already did; once every replica holds them again nothing reaps them until a client
//! reads the key. So each node remembers, for a while, which tombstones it reaped and refuses
//! to merge exactly those back. Anything else for the key (a new write, a new delete) has
//! other dots and goes through.
//!
//! The memory is bounded in time and size and lives only in memory: forgetting early costs a
//! tombstone that lingers until the next read reaps it, never data.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::version::{Dot, Siblings};

/// How long a reap is remembered: many anti-entropy rounds.
const REMEMBER_FOR: Duration = Duration::from_secs(600);
/// Most reaps remembered at once; the oldest are forgotten first.
const MAX_REMEMBERED: usize = 100_000;

#[derive(Default)]
pub struct ReapedTombstones {
    inner: Mutex<Memory>,
}

#[derive(Default)]
struct Memory {
    by_key: HashMap<String, (Vec<Dot>, Instant)>,
    order: VecDeque<(String, Instant)>,
}

impl ReapedTombstones {
    pub fn remember(&self, key: &str, dots: Vec<Dot>) {
        let now = Instant::now();
        let mut memory = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        memory.forget_old(now);
        memory.by_key.insert(key.to_owned(), (dots, now));
        memory.order.push_back((key.to_owned(), now));
    }

    /// Is `incoming` exactly (a subset of) the tombstones this node reaped for `key`?
    pub fn is_reaped(&self, key: &str, incoming: &Siblings) -> bool {
        if !incoming.is_tombstoned() {
            return false;
        }
        let memory = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match memory.by_key.get(key) {
            Some((dots, when)) if when.elapsed() < REMEMBER_FOR => {
                incoming.dots().all(|dot| dots.contains(&dot))
            }
            _ => false,
        }
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

    fn tombstone(actor: u64) -> Siblings {
        let mut s = Siblings::new();
        s.write(actor, None, None, 1);
        s
    }

    #[test]
    fn remembers_exactly_the_reaped_tombstones() {
        let memory = ReapedTombstones::default();
        let reaped = tombstone(1);
        memory.remember("k", reaped.dots().collect());
        assert!(memory.is_reaped("k", &reaped));
        assert!(!memory.is_reaped("other", &reaped));
        assert!(
            !memory.is_reaped("k", &tombstone(2)),
            "a new delete has other dots"
        );
        let mut live = Siblings::new();
        live.write(1, None, Some("<value>v</value>".into()), 2);
        assert!(
            !memory.is_reaped("k", &live),
            "a live value is never refused"
        );
    }

    #[test]
    fn memory_is_bounded() {
        let memory = ReapedTombstones::default();
        for i in 0..MAX_REMEMBERED + 10 {
            memory.remember(&format!("k{i}"), vec![]);
        }
        let inner = memory.inner.lock().expect("lock");
        assert!(inner.by_key.len() <= MAX_REMEMBERED + 1);
    }
}
