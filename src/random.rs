//! One random number now and then, without a dependency for it.

use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

/// A random 64-bit number from the standard library's per-process random hasher keys, mixed
/// with the time and process id: for the few numbers drawn once per data directory (a node's
/// actor id, its memtable size), a balancer's name, a layout proposal, a retry's pause; not
/// for anything secret. A simulation draws them from its seed instead
/// ([`crate::simulation::Hooks::random_u64`]).
pub fn random_u64() -> u64 {
    if let Some(hooks) = crate::simulation::hooks() {
        return (hooks.random_u64)();
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}
