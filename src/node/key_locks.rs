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
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        let stripe = &self.stripes[(hash as usize) % STRIPES];
        // A panic while holding the lock cannot leave the unit value inconsistent.
        stripe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
}
