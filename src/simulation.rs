//! What a deterministic simulation puts in place of the machine a daemon runs on.
//!
//! A simulation (tokio-rs's turmoil, in `tests/simulation.rs`; see docs/simulation.md) runs
//! every daemon of a cluster as a host in one thread, over a simulated network, with
//! `tokio::time` simulated: the same seed gives the same run. The network comes in through
//! [`crate::rpc::transport`]. Three things a daemon takes from the machine lie beyond
//! tokio's reach, and a simulation replaces them here:
//!
//! - the wall clock: [`crate::clock::now_us`] (entry times, deadlines, clock exchanges,
//!   leases) reads [`Hooks::now_us`], which can give each simulated host a clock of its own;
//! - randomness: [`crate::random::random_u64`] (actor ids, a balancer's name, layout
//!   proposals, retry pauses) draws from [`Hooks::random_u64`], that is from the seed;
//! - blocking work: [`crate::runtime::blocking`] runs it at once on the simulation's thread
//!   instead of on tokio's blocking pool, whose threads finish when the OS lets them.
//!
//! Durations (timeouts, intervals, a node's silence) are read on `tokio::time`, which the
//! simulation drives already. The hooks are installed once per process, before any daemon
//! starts, and never by a daemon: in production they are absent, and reading the clock costs
//! one more atomic load.

use std::sync::OnceLock;

/// A simulation's stand-ins. Plain functions: a simulation that gives each host a state of its
/// own (a clock skew, a random stream) finds the host being run from inside them.
#[derive(Debug, Clone, Copy)]
pub struct Hooks {
    /// The wall clock of the host being run, in microseconds since the Unix epoch.
    pub now_us: fn() -> u64,
    /// A random number, following from the simulation's seed.
    pub random_u64: fn() -> u64,
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Puts `hooks` in place of the machine for the rest of the process. Answers false, and changes
/// nothing, when hooks were installed already.
pub fn install(hooks: Hooks) -> bool {
    HOOKS.set(hooks).is_ok()
}

/// The hooks installed, if this process runs a simulation.
pub fn hooks() -> Option<&'static Hooks> {
    HOOKS.get()
}
