//! Per-key mutual exclusion for read-modify-write, with a fixed number of locks.
//!
//! Two replicas' writes to one key arriving together must both be merged; a lock per key
//! would need a map that grows with the key space, so keys are hashed onto a fixed set of
//! stripes instead. Unrelated keys rarely share a stripe, and when they do they only wait
//! for one short engine write.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::{Mutex, MutexGuard};

/// Number of stripes: far more than the threads that can hold one at a time.
const STRIPES: usize = 1024;

pub struct KeyLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for KeyLocks {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyLocks {
    pub fn new() -> Self {
        KeyLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Holds the key's stripe until the guard is dropped.
    pub fn lock(&self, key: &[u8]) -> MutexGuard<'_, ()> {
        self.lock_stripe(stripe_of(key))
    }

    /// Holds the stripes of all `keys` until the guards are dropped. Stripes are taken in
    /// ascending order, each once, so holders of several never wait for each other in a cycle
    /// (and a holder of one waits for nothing while holding it).
    pub fn lock_all<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> Vec<MutexGuard<'_, ()>> {
        let mut stripes: Vec<usize> = keys.into_iter().map(stripe_of).collect();
        stripes.sort_unstable();
        stripes.dedup();
        stripes
            .into_iter()
            .map(|stripe| self.lock_stripe(stripe))
            .collect()
    }

    fn lock_stripe(&self, stripe: usize) -> MutexGuard<'_, ()> {
        // A panic while holding the lock cannot leave the unit value inconsistent.
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn stripe_of(key: &[u8]) -> usize {
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
    (hash as usize) % STRIPES
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn one_key_is_never_held_twice() {
        let locks = Arc::new(KeyLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let _guard = locks.lock(b"hot key");
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no thread panicked");
        }
    }

    #[test]
    fn holders_of_many_stripes_neither_deadlock_nor_overlap() {
        let locks = Arc::new(KeyLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("key {i}").into_bytes()).collect();
        let keys = Arc::new(keys);
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let (locks, inside, keys) = (locks.clone(), inside.clone(), keys.clone());
                std::thread::spawn(move || {
                    for round in 0..500 {
                        // Each thread takes the keys in another order, with a shared one.
                        let mut mine: Vec<&[u8]> = keys
                            .iter()
                            .skip((thread + round) % 7)
                            .step_by(3)
                            .map(Vec::as_slice)
                            .collect();
                        mine.push(b"shared".as_slice());
                        mine.reverse();
                        let _guards = locks.lock_all(mine);
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("no thread panicked");
        }
    }
}
