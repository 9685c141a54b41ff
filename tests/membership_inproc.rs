//! Live membership in process: the main transition stories of `tests/membership.rs`, with
//! the daemons inside the test binary ([`InProcessCluster`]), in-memory nodes, a few thousand
//! keys and anti-entropy every [`AAE_INTERVAL_MS`], so that a story takes seconds, not
//! minutes. A cluster grows under a write load, shrinks, loses a stopped node for good, has a
//! joining node stopped in the middle of its transfer (in memory it comes back empty, so the
//! transfer starts over), and takes two racing applies.
//!
//! Every story ends with the checks of `tests/membership.rs` ([`assert_settled`]):
//!
//! - no acknowledged write is lost: every key put and acknowledged reads back, through a
//!   balancer, the last value acknowledged for it (a read answered with a fault is tried
//!   again for a while, as every daemon shares this machine's cores; one answered with
//!   another value fails at once); where the story reads while the layout changes, no read
//!   returns a value older than one acknowledged before the read began ([`Load`]);
//! - the transition ends on every daemon (`transition` false in `cluster.status()` of every
//!   running node and balancer, all with the same members);
//! - once rehoming has finished, every key is on exactly N nodes, those the final layout
//!   places it on, by each node's `local.get` (batched in `system.multicall`), and a node that
//!   was removed holds nothing.
//!
//! # Replaying a story
//!
//! Every story takes a seed: `DYNAMITE_SEED` (decimal, or hex with `0x`), or
//! [`DEFAULT_SEED`] when it is unset. The story prints it when it starts, with the choices it
//! drew from it, and again when it fails. The seed drives every choice a story makes: how
//! many keys it writes, which member a new node seeds from, which daemons stage and apply,
//! which node is removed or stopped, how far into its transfer the joining node is stopped,
//! which daemons race, and which keys the writer overwrites. So a failing run is repeated by
//!
//! ```text
//! DYNAMITE_SEED=<seed> cargo test --test membership_inproc -- <story> --exact
//! ```
//!
//! What a seed does not fix is the threads' timing (how many writes land during a transition,
//! which of two racing applies reaches the lock first): it replays the story's choices, and
//! its schedule only as far as the machine repeats it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::membership::*;
use common::*;

/// The seed of a run without `DYNAMITE_SEED`.
const DEFAULT_SEED: u64 = 20_240_611;
/// Replicas per key in every story (the daemons' default with three nodes or more).
const N: usize = 3;
/// Time between anti-entropy rounds of every node.
const AAE_INTERVAL_MS: u64 = 200;
/// The balancers' `--timeout-ms`: generous, as every daemon shares this machine's cores.
const REPLICA_TIMEOUT_MS: u64 = 2000;
/// How long a transition may take to end on every daemon.
const TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long rehoming may take, once the transition is over, to leave every key on exactly
/// its replicas.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to learn the cluster's layout.
const LEARN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one key may stay unacknowledged while the writer retries it.
const PUT_PATIENCE: Duration = Duration::from_secs(30);
/// How long a key's read-back may keep failing (faults, not wrong values) before the check
/// gives up on it.
const READ_PATIENCE: Duration = Duration::from_secs(10);
/// How long to wait for a transfer to be caught mid-way.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Keys per `system.multicall` of `local.get`.
const KEYS_PER_MULTICALL: usize = 500;

// ---------------------------------------------------------------------------------------------
// The stories
// ---------------------------------------------------------------------------------------------

/// 1. Three nodes grow to four while a writer puts keys through the balancer started with the
///    cluster, and a reader checks every read against what was acknowledged before it began.
#[test]
fn grow_from_three_to_four_under_a_steady_write_load() {
    let mut replay = Replay::start("grow_from_three_to_four_under_a_steady_write_load");
    let mut story = Story::start(3);
    let keys_before = replay.between(1000, 3000);
    let seed_node = replay.below(3);
    let before_change = replay.between(100, 400);
    let mut ledger = fill(story.lb_port(), &keys("grow-bulk", keys_before), 4);
    let load = Load::start(story.lb_port(), "grow", replay.fork());
    load.wait_for_more(
        before_change,
        "the writer has keys acknowledged before the change",
    );

    let fourth = story.join(seed_node);
    let stager = replay.pick(&story.running_daemons());
    let applier = replay.pick(&story.running_daemons());
    replay.chose(&format!(
        "{keys_before} keys, then {before_change} by the writer; node-{fourth} seeded from \
         node-{seed_node}; staged through {}, applied through {}",
        stager.0, applier.0
    ));
    stage_add(&stager.rpc(), &story.addr(fourth));
    wait_staged(&applier, 1);
    let acked_at_apply = load.acked();
    let moved = apply(&applier.rpc(), 2);
    assert!(moved > 0, "adding a node to three moves replicas: {moved}");

    wait_transition_over(&story, 2);
    let acked_in_transition = load.acked() - acked_at_apply;
    load.wait_for_more(100, "writes go on after the transition");
    ledger.extend(load.finish());
    assert!(
        acked_in_transition > 0,
        "writes are acknowledged while the transition runs"
    );
    assert_eq!(
        layout_addresses(&story.lb()),
        story.addresses(&[0, 1, 2, 3])
    );
    assert_settled(&story, &ledger);
}

/// 2. Four nodes shrink to three under a write load: the removed node hands everything over,
///    holds nothing, and can be stopped without losing a key.
#[test]
fn shrink_from_four_to_three() {
    let mut replay = Replay::start("shrink_from_four_to_three");
    let mut story = Story::start(4);
    let count = replay.between(1000, 4000);
    let victim = replay.below(4);
    let mut ledger = fill(story.lb_port(), &keys("shrink-bulk", count), 4);
    let load = Load::start(story.lb_port(), "shrink", replay.fork());
    load.wait_for_more(100, "the writer has keys acknowledged before the change");

    let stager = replay.pick(&story.running_daemons());
    let applier = replay.pick(&story.running_daemons());
    replay.chose(&format!(
        "{count} keys; removing node-{victim}; staged through {}, applied through {}",
        stager.0, applier.0
    ));
    stage_remove(&stager.rpc(), &story.addr(victim));
    wait_staged(&applier, 1);
    apply(&applier.rpc(), 2);
    wait_transition_over(&story, 2);
    load.wait_for_more(100, "writes go on after the transition");
    ledger.extend(load.finish());
    let survivors: Vec<usize> = (0..4).filter(|&i| i != victim).collect();
    assert_eq!(layout_addresses(&story.lb()), story.addresses(&survivors));
    // The removed node still runs: assert_settled checks that it holds nothing.
    assert_settled(&story, &ledger);

    story.stop_node(victim);
    assert_reads_back(story.lb_port(), &ledger, "after the removed node stopped");
}

/// 3. A node is stopped and never comes back; it is removed like any other, and the
///    transition ends without it, every key on N of the three survivors. When it is started
///    again after all (in memory: empty), it learns that it is no member and stays empty.
#[test]
fn remove_a_node_that_was_stopped() {
    let mut replay = Replay::start("remove_a_node_that_was_stopped");
    let mut story = Story::start(4);
    let count = replay.between(1000, 4000);
    let victim = replay.below(4);
    let mut ledger = fill(story.lb_port(), &keys("dead-bulk", count), 4);
    let load = Load::start(story.lb_port(), "dead", replay.fork());
    load.wait_for_more(100, "the writer has keys acknowledged before the stop");

    story.stop_node(victim);
    load.wait_for_more(100, "writes are acknowledged while the node is down");
    let stager = replay.pick(&story.running_daemons());
    let applier = replay.pick(&story.running_daemons());
    replay.chose(&format!(
        "{count} keys; stopping and removing node-{victim}; staged through {}, applied \
         through {}",
        stager.0, applier.0
    ));
    let survivors: Vec<usize> = (0..4).filter(|&i| i != victim).collect();
    // Writes for the down node went to a fallback, with a hint naming it as their owner.
    let hints_held = || -> i64 {
        survivors
            .iter()
            .map(|&i| int_member(&story.node(i).stats(), "hints"))
            .sum()
    };
    wait_until(
        TRANSFER_TIMEOUT,
        "fallbacks hold hints for the down node",
        || hints_held() > 0,
    );
    stage_remove(&stager.rpc(), &story.addr(victim));
    wait_staged(&applier, 1);
    apply(&applier.rpc(), 2);
    wait_transition_over(&story, 2);
    // Its owner is gone for good: each hint goes to the key's replicas in the new layout.
    wait_until(
        SETTLE_TIMEOUT,
        "the hints held for the removed node are handed to the keys' replicas",
        || hints_held() == 0,
    );
    load.wait_for_more(100, "writes go on after the transition");
    ledger.extend(load.finish());
    assert_eq!(layout_addresses(&story.lb()), story.addresses(&survivors));
    assert_settled(&story, &ledger);

    story.start_node(victim);
    let node = story.node(victim);
    wait_until(
        LEARN_TIMEOUT,
        "the node that came back knows layout 2",
        || {
            node.call("cluster.layout", vec![])
                .is_ok_and(|layout| int_member(&layout, "version") == 2)
        },
    );
    assert_settled(&story, &ledger);
}

/// 4. A joining node is stopped in the middle of receiving its partitions and started again.
///    In memory it comes back empty: the transfer starts over, the transition ends, and
///    nothing is lost.
#[test]
fn a_joining_node_stopped_mid_transfer_starts_again_and_finishes() {
    let mut replay = Replay::start("a_joining_node_stopped_mid_transfer_starts_again_and_finishes");
    let mut story = Story::start(3);
    let count = replay.between(2000, 5000);
    let seed_node = replay.below(3);
    let percent = replay.between(10, 80);
    let ledger = fill(story.lb_port(), &keys("bulk", count), 4);
    replay.lap(&format!("{count} keys written"));

    let joiner = story.join(seed_node);
    let stager = replay.pick(&story.running_daemons());
    let applier = replay.pick(&story.running_daemons());
    replay.chose(&format!(
        "{count} keys; node-{joiner} seeded from node-{seed_node}, stopped once it holds \
         {percent}% of its share; staged through {}, applied through {}",
        stager.0, applier.0
    ));
    stage_add(&stager.rpc(), &story.addr(joiner));
    wait_staged(&applier, 1);
    apply(&applier.rpc(), 2);
    let share = share_of(&applier.rpc(), &ledger, &story.addr(joiner));
    let caught = catch_mid_transfer(&story, joiner, share, (share * percent / 100).max(1));
    story.stop_node(joiner);
    eprintln!("stopped the joining node mid-transfer: {caught}");
    let status = call_ok(&story.node(seed_node), "cluster.status", vec![]);
    assert_eq!(
        member(&status, "transition"),
        &Value::Boolean(true),
        "the transition cannot end while the joining node is down: {status:?}"
    );
    story.start_node(joiner);

    wait_transition_over(&story, 2);
    replay.lap("the transition is over");
    let received = int_member(&story.node(joiner).stats(), "sync_keys_received");
    eprintln!("the joining node received {received} keys after it came back (its share: {share})");
    assert_settled(&story, &ledger);
}

/// 5. Two applies of the same version race through two different daemons: exactly one wins,
///    the other is refused, and every daemon ends with the winner's layout. Four rounds,
///    adding and removing a spare node in turn, each through a pair of daemons the seed picks.
#[test]
fn of_two_racing_applies_exactly_one_wins() {
    let mut replay = Replay::start("of_two_racing_applies_exactly_one_wins");
    let mut story = Story::start(3);
    let seed_node = replay.below(3);
    let count = replay.between(200, 600);
    let spare = story.join(seed_node);
    let ledger = fill(story.lb_port(), &keys("race", count), 2);

    const ROUNDS: usize = 4;
    let daemons = story.running_daemons();
    let mut plan = Vec::new();
    for _ in 0..ROUNDS {
        let first = replay.below(daemons.len());
        let second = (first + 1 + replay.below(daemons.len() - 1)) % daemons.len();
        let stager = replay.pick(&daemons[..3]);
        plan.push((stager, daemons[first].clone(), daemons[second].clone()));
    }
    replay.chose(&format!(
        "{count} keys; spare node-{spare} seeded from node-{seed_node}; rounds (stager, racers): {:?}",
        plan.iter()
            .map(|(stager, a, b)| format!("{} ({} vs {})", stager.0, a.0, b.0))
            .collect::<Vec<_>>()
    ));

    let mut refusals = Vec::new();
    let mut overlapped = 0;
    for (round, (stager, first, second)) in plan.into_iter().enumerate() {
        let version = round as i64 + 2;
        if round % 2 == 0 {
            stage_add(&stager.rpc(), &story.addr(spare));
        } else {
            stage_remove(&stager.rpc(), &story.addr(spare));
        }
        wait_staged(&first, 1);
        wait_staged(&second, 1);

        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<JoinHandle<(RpcResult, Instant, Instant)>> = [first.1, second.1]
            .into_iter()
            .map(|port| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let rpc = Rpc::new(port);
                    barrier.wait();
                    let began = Instant::now();
                    let result = rpc.call("cluster.apply", vec![Value::Integer(version as i32)]);
                    (result, began, Instant::now())
                })
            })
            .collect();
        let (results, spans): (Vec<RpcResult>, Vec<(Instant, Instant)>) = racers
            .into_iter()
            .map(|racer| {
                let (result, began, ended) = racer
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (result, (began, ended))
            })
            .unzip();
        // Whether both calls were in flight at once: the race really happened.
        if spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1 {
            overlapped += 1;
        }
        let winners: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of two racing applies of version {version} through \
             {} and {} wins: {results:?}",
            first.0,
            second.0
        );
        assert_eq!(int_member(winners[0], "version"), version, "round {round}");
        let refusal = results.iter().find_map(|r| r.as_ref().err()).cloned();
        refusals.push(refusal.expect("the other one is a fault"));

        let final_layout = wait_transition_over(&story, version);
        let members = addresses_of(&final_layout);
        let spare_in = members.contains(&story.addr(spare));
        assert_eq!(spare_in, round % 2 == 0, "round {round}: {members:?}");
        assert_eq!(members.len(), if spare_in { 4 } else { 3 }, "{members:?}");
        if !spare_in {
            let spare_node = story.node(spare);
            wait_until(SETTLE_TIMEOUT, "the removed spare holds nothing", || {
                int_member(&spare_node.stats(), "keys") == 0
            });
        }
    }
    eprintln!(
        "the two applies were in flight together in {overlapped} of {ROUNDS} rounds; the \
         losers were refused with: {refusals:?}"
    );
    assert_settled(&story, &ledger);
}

// ---------------------------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------------------------

/// A story's seed, the choices drawn from it, and its clock: prints the seed at the start,
/// and when the story ends whether it passed, how long it took, and, if it failed, how to
/// tell it again.
struct Replay {
    name: &'static str,
    seed: u64,
    rng: Rng,
    started: Instant,
}

impl Replay {
    fn start(name: &'static str) -> Replay {
        let seed = match std::env::var("DYNAMITE_SEED") {
            Err(_) => DEFAULT_SEED,
            Ok(text) => {
                let text = text.trim();
                match text.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).ok(),
                    None => text.parse().ok(),
                }
                .unwrap_or_else(|| panic!("DYNAMITE_SEED={text:?} is not a u64"))
            }
        };
        eprintln!("{name}: seed {seed} (DYNAMITE_SEED={seed} tells this story again)");
        // Each story draws its own stream from the seed, so that stories do not all make
        // the same choices.
        let story = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        Replay {
            name,
            seed,
            rng: Rng::new(seed ^ story),
            started: Instant::now(),
        }
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    /// A number in `low..high`.
    fn between(&mut self, low: usize, high: usize) -> usize {
        low + self.rng.below(high - low)
    }

    /// One of `items`.
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.rng.below(items.len())].clone()
    }

    /// A generator of its own, for a thread of the story.
    fn fork(&mut self) -> Rng {
        Rng::new(self.rng.next())
    }

    /// Says what the story chose.
    fn chose(&self, choices: &str) {
        eprintln!("{} (seed {}): {choices}", self.name, self.seed);
    }

    /// Says that `what` is done, and when.
    fn lap(&self, what: &str) {
        eprintln!(
            "{}: {what} after {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        if std::thread::panicking() {
            eprintln!(
                "{}: FAILED after {elapsed:.1} s with seed {}; tell it again with \
                 DYNAMITE_SEED={} cargo test --test membership_inproc -- {} --exact",
                self.name, self.seed, self.seed, self.name
            );
        } else {
            eprintln!("{}: passed after {elapsed:.1} s", self.name);
        }
    }
}

/// SplitMix64: a small generator that needs no crate and takes any seed, 0 included.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster of a story
// ---------------------------------------------------------------------------------------------

/// A daemon a story talks to: its name (`node-i` or `balancer-0`) and port.
#[derive(Clone, Debug)]
struct Named(String, u16);

impl Named {
    fn rpc(&self) -> Rpc {
        Rpc::new(self.1)
    }
}

/// The daemons of one story, all in this process: in-memory storage nodes by index and one
/// balancer over the first ones, started with them. Dropping it stops them all.
struct Story {
    cluster: InProcessCluster,
}

impl Story {
    /// `count` in-memory nodes, each with the others as `-s` peers, and a balancer over all
    /// of them; returns once every daemon has layout version 1 with every node.
    fn start(count: usize) -> Story {
        let cluster = InProcessCluster::builder()
            .nodes(count)
            .in_memory()
            .aae_interval_ms(AAE_INTERVAL_MS)
            .timeout_ms(REPLICA_TIMEOUT_MS)
            .start();
        let story = Story { cluster };
        let servers = sorted(story.cluster.servers());
        for daemon in story.running_daemons() {
            let rpc = daemon.rpc();
            wait_until(
                LEARN_TIMEOUT,
                &format!("{} has layout 1 with every node", daemon.0),
                || {
                    rpc.call("cluster.layout", vec![])
                        .is_ok_and(|layout| addresses_of(&layout) == servers)
                },
            );
        }
        story
    }

    /// Starts a new in-memory node with `-s` naming node `seed` only; returns its index once
    /// it has learned the cluster's layout (of which it is no member yet).
    fn join(&mut self, seed: usize) -> usize {
        let i = self.cluster.add_node(&[seed]);
        let node = self.node(i);
        wait_until(LEARN_TIMEOUT, "the new node has learned the layout", || {
            node.call("cluster.layout", vec![]).is_ok()
        });
        i
    }

    /// Stops node `i`: for an in-memory node, everything it held is gone.
    fn stop_node(&mut self, i: usize) {
        self.cluster.nodes[i].stop();
    }

    /// Starts node `i` again, on its port and flags: in memory, it comes back empty.
    fn start_node(&mut self, i: usize) {
        self.cluster.nodes[i].start();
    }

    fn addr(&self, i: usize) -> String {
        self.cluster.nodes[i].addr()
    }

    /// The addresses of nodes `indexes`, sorted.
    fn addresses(&self, indexes: &[usize]) -> Vec<String> {
        sorted(indexes.iter().map(|&i| self.addr(i)).collect())
    }

    fn node(&self, i: usize) -> Rpc {
        self.cluster.node_client(i)
    }

    fn lb(&self) -> Rpc {
        self.cluster.client()
    }

    fn lb_port(&self) -> u16 {
        self.cluster.balancer_port(0)
    }

    /// `(address, port)` of every node that runs.
    fn running_nodes(&self) -> Vec<(String, u16)> {
        self.cluster
            .nodes
            .iter()
            .filter(|node| node.is_running())
            .map(|node| (node.addr(), node.port()))
            .collect()
    }

    /// Every daemon that runs: nodes, then balancers.
    fn running_daemons(&self) -> Vec<Named> {
        let nodes = self.cluster.nodes.iter().enumerate();
        let balancers = self.cluster.balancers.iter().enumerate();
        nodes
            .filter(|(_, node)| node.is_running())
            .map(|(i, node)| Named(format!("node-{i}"), node.port()))
            .chain(
                balancers
                    .filter(|(_, balancer)| balancer.is_running())
                    .map(|(i, balancer)| Named(format!("balancer-{i}"), balancer.port())),
            )
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, values and the ledger of acknowledged writes
// ---------------------------------------------------------------------------------------------

/// Sequence numbers of writes, growing in the order the attempts are made.
static SEQ: AtomicU64 = AtomicU64::new(1);

/// Puts `key` with a new value until a put is acknowledged, within [`PUT_PATIENCE`];
/// answers the acknowledged value's sequence number and how many attempts failed.
fn put_until_acked(rpc: &Rpc, key: &str) -> (u64, u64) {
    let deadline = Instant::now() + PUT_PATIENCE;
    let mut failures = 0;
    loop {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let answer = rpc.put(key, tagged(key, seq));
        if answer == ok200() {
            return (seq, failures);
        }
        failures += 1;
        assert!(
            Instant::now() < deadline,
            "put {key} not acknowledged within {PUT_PATIENCE:?}; last answer {answer:?}"
        );
        // Pacing between retries, not synchronisation: the loop is bounded by the deadline.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Puts every key of `keys` through the balancer on `port`, from `threads` threads, each
/// until acknowledged; answers the ledger.
fn fill(port: u16, keys: &[String], threads: usize) -> Ledger {
    let chunk = keys.len().div_ceil(threads.max(1)).max(1);
    let (ledger, failures) = std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .chunks(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    let rpc = Rpc::new(port);
                    let mut ledger = Ledger::new();
                    let mut failures = 0;
                    for key in chunk {
                        let (seq, failed) = put_until_acked(&rpc, key);
                        ledger.insert(key.clone(), seq);
                        failures += failed;
                    }
                    (ledger, failures)
                })
            })
            .collect();
        let mut all = Ledger::new();
        let mut failures = 0;
        for worker in workers {
            let (ledger, failed) = worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            all.extend(ledger);
            failures += failed;
        }
        (all, failures)
    });
    if failures > 0 {
        eprintln!(
            "fill: {failures} put attempts failed and were retried ({} keys)",
            keys.len()
        );
    }
    ledger
}

/// What the writer has had acknowledged so far, shared with the reader.
#[derive(Default)]
struct Written {
    ledger: Ledger,
    /// The ledger's keys, for picking one at random.
    keys: Vec<String>,
}

/// What the reader saw.
#[derive(Debug, Default)]
struct Reads {
    ok: u64,
    failed: u64,
    /// Reads that returned something older than a write acknowledged before they began
    /// (or nothing, or something else).
    stale: Vec<String>,
}

/// A steady load through one balancer: a writer putting new keys (and now and then
/// overwriting an old one, which the story's seed picks), each until acknowledged, and a
/// reader checking that every read returns at least the value last acknowledged before it
/// began.
struct Load {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Written>>,
    writer: Option<JoinHandle<u64>>,
    reader: Option<JoinHandle<Reads>>,
}

impl Load {
    fn start(port: u16, prefix: &str, mut rng: Rng) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Written::default()));
        let mut reader_rng = Rng::new(rng.next());
        let writer = {
            let (stop, written, prefix) = (stop.clone(), written.clone(), prefix.to_owned());
            std::thread::spawn(move || {
                let rpc = Rpc::new(port);
                let mut failures = 0;
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let overwrite = {
                        let written = written.lock().unwrap();
                        (i % 4 == 3 && !written.keys.is_empty())
                            .then(|| written.keys[rng.below(written.keys.len())].clone())
                    };
                    let key = overwrite.unwrap_or_else(|| format!("{prefix}-{i:06}"));
                    let (seq, failed) = put_until_acked(&rpc, &key);
                    failures += failed;
                    let mut written = written.lock().unwrap();
                    if written.ledger.insert(key.clone(), seq).is_none() {
                        written.keys.push(key);
                    }
                    drop(written);
                    i += 1;
                    // Pacing: a steady load, not a flood.
                    std::thread::sleep(Duration::from_millis(3));
                }
                failures
            })
        };
        let reader = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let rpc = Rpc::new(port);
                let mut reads = Reads::default();
                while !stop.load(Ordering::Relaxed) {
                    let picked = {
                        let written = written.lock().unwrap();
                        (!written.keys.is_empty()).then(|| {
                            let key = written.keys[reader_rng.below(written.keys.len())].clone();
                            let seq = written.ledger[&key];
                            (key, seq)
                        })
                    };
                    let Some((key, acked)) = picked else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    match rpc.get(&key) {
                        Ok(value) => {
                            reads.ok += 1;
                            match seq_of(&key, &value) {
                                Some(seq) if seq >= acked => {}
                                _ => reads.stale.push(format!(
                                    "get {key} returned {value:?}, but write #{acked} was \
                                     acknowledged before the read began"
                                )),
                            }
                        }
                        Err(_) => reads.failed += 1,
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                reads
            })
        };
        Load {
            stop,
            written,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    /// How many keys have been acknowledged.
    fn acked(&self) -> usize {
        self.written.lock().unwrap().keys.len()
    }

    /// Waits until `more` keys more than now are acknowledged.
    fn wait_for_more(&self, more: usize, what: &str) {
        let target = self.acked() + more;
        wait_until(TRANSITION_TIMEOUT, what, || {
            assert!(
                !self.writer.as_ref().is_some_and(JoinHandle::is_finished),
                "the writer stopped"
            );
            self.acked() >= target
        });
    }

    /// Stops both threads; asserts no read was stale; answers the ledger.
    fn finish(mut self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .writer
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let reads = self
            .reader
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let ledger = std::mem::take(&mut self.written.lock().unwrap().ledger);
        eprintln!(
            "load: {} keys acknowledged, {failures} put attempts failed and were retried; \
             {} reads, {} failed, {} stale",
            ledger.len(),
            reads.ok,
            reads.failed,
            reads.stale.len()
        );
        assert!(
            reads.stale.is_empty(),
            "{} reads returned something older than a write acknowledged before they began; \
             the first: {:#?}",
            reads.stale.len(),
            &reads.stale[..reads.stale.len().min(10)]
        );
        assert!(reads.ok > 0, "the reader read something");
        ledger
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A failing test leaves the threads to end on their own at their next call.
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// cluster.* calls
// ---------------------------------------------------------------------------------------------

/// Waits until `daemon` sees `count` staged changes (staged through another daemon, they
/// reach it by gossip).
fn wait_staged(daemon: &Named, count: usize) {
    let rpc = daemon.rpc();
    wait_until(
        LEARN_TIMEOUT,
        &format!("{} sees {count} staged change(s)", daemon.0),
        || array(member(&layout_of(&rpc), "staged")).len() == count,
    );
}

/// Polls the joining node `i` until it holds at least `target` of its `share` keys but not
/// all, and answers what it said then.
fn catch_mid_transfer(story: &Story, i: usize, share: usize, target: usize) -> String {
    let node = story.node(i);
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let stats = node.stats();
        let keys = int_member(&stats, "keys") as usize;
        let syncing = int_member(&stats, "syncing");
        let received = int_member(&stats, "sync_keys_received");
        if keys >= target && keys < share {
            return format!(
                "{keys} of its {share} keys in (aimed at {target}), {syncing} partitions to \
                 go, {received} keys received"
            );
        }
        if seen.last() != Some(&(keys, syncing)) {
            seen.push((keys, syncing));
        }
        assert!(
            Instant::now() < deadline && keys < share,
            "the joining node was never seen between {target} and {share} keys of its \
             transfer (keys, syncing seen: {seen:?})"
        );
        // Pacing only, kept short so that a fast transfer is still caught mid-way.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until every running daemon says layout `version` is the current one and no
/// transition runs, all with the same members; answers that layout.
fn wait_transition_over(story: &Story, version: i64) -> Value {
    let daemons = story.running_daemons();
    wait_until_ok(
        TRANSITION_TIMEOUT,
        &format!("the transition to layout {version} is over on every daemon"),
        || {
            for daemon in &daemons {
                let status = call_ok(&daemon.rpc(), "cluster.status", vec![]);
                let seen = int_member(&status, "version");
                let transition = member(&status, "transition") == &Value::Boolean(true);
                if seen != version || transition {
                    return Err(format!(
                        "{} says version {seen}, transition {transition}: {status:?}",
                        daemon.0
                    ));
                }
            }
            Ok(())
        },
    );
    let layouts: Vec<(String, Value)> = daemons
        .iter()
        .map(|daemon| (daemon.0.clone(), layout_of(&daemon.rpc())))
        .collect();
    let (first_name, first) = &layouts[0];
    for (name, layout) in &layouts {
        assert_eq!(int_member(layout, "version"), version, "{name}: {layout:?}");
        assert_eq!(
            members_of(layout),
            members_of(first),
            "{name} and {first_name} have the same members"
        );
    }
    first.clone()
}

// ---------------------------------------------------------------------------------------------
// Where keys are
// ---------------------------------------------------------------------------------------------

/// Whether the node behind `rpc` holds its own copy of each of `keys`, by `local.get`,
/// [`KEYS_PER_MULTICALL`] to a `system.multicall`.
fn own_copies(rpc: &Rpc, keys: &[String]) -> Vec<bool> {
    let mut held = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(KEYS_PER_MULTICALL) {
        let calls = chunk
            .iter()
            .map(|key| {
                Value::Struct(BTreeMap::from([
                    ("methodName".to_owned(), s("local.get")),
                    ("params".to_owned(), Value::Array(vec![s(key)])),
                ]))
            })
            .collect();
        let results = call_ok(rpc, "system.multicall", vec![Value::Array(calls)]);
        let results = array(&results);
        assert_eq!(results.len(), chunk.len(), "one result per local.get");
        for (key, result) in chunk.iter().zip(results) {
            match result {
                Value::Array(value) if value.len() == 1 => held.push(value[0] != Value::Nil),
                fault => panic!("local.get({key:?}) on a node: {fault:?}"),
            }
        }
    }
    held
}

/// For each of `keys`, the running nodes holding their own copy of it (sorted addresses);
/// one thread per node.
fn holders_of(story: &Story, keys: &[String]) -> Vec<Vec<String>> {
    let nodes = story.running_nodes();
    let columns: Vec<Vec<bool>> = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .map(|(_, port)| {
                let port = *port;
                scope.spawn(move || own_copies(&Rpc::new(port), keys))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    (0..keys.len())
        .map(|k| {
            sorted(
                nodes
                    .iter()
                    .zip(&columns)
                    .filter(|(_, column)| column[k])
                    .map(|((address, _), _)| address.clone())
                    .collect(),
            )
        })
        .collect()
}

/// Every key of `ledger` reads back through the balancer on `port` with its last
/// acknowledged value. A read that fails (a fault: a replica too slow on this shared
/// machine, a quorum not met) is tried again until [`READ_PATIENCE`] has passed since the
/// first failure; a read that answers another value fails the check at once.
fn assert_reads_back(port: u16, ledger: &Ledger, when: &str) {
    let entries: Vec<(&String, &u64)> = ledger.iter().collect();
    let chunk = entries.len().div_ceil(4).max(1);
    let (wrong, retried): (Vec<String>, Vec<String>) = std::thread::scope(|scope| {
        let readers: Vec<_> = entries
            .chunks(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    let via = Rpc::new(port);
                    let mut wrong = Vec::new();
                    let mut retried = Vec::new();
                    for &(key, &seq) in chunk {
                        let mut first_fault = None;
                        let got = loop {
                            let got = via.get(key);
                            let Err(fault) = &got else { break got };
                            let since = *first_fault.get_or_insert_with(Instant::now);
                            if since.elapsed() >= READ_PATIENCE {
                                break got;
                            }
                            if retried.len() < 10 {
                                retried.push(format!("{key}: {fault:?}"));
                            }
                            // Pacing between retries; bounded by READ_PATIENCE.
                            std::thread::sleep(Duration::from_millis(50));
                        };
                        if got != Ok(tagged(key, seq)) {
                            wrong.push(format!(
                                "{key}: expected write #{seq}, got {:?}",
                                got.as_ref().map(|v| seq_of(key, v))
                            ));
                        }
                    }
                    (wrong, retried)
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .fold(
                (Vec::new(), Vec::new()),
                |(mut wrong, mut retried), (w, r)| {
                    wrong.extend(w);
                    retried.extend(r);
                    (wrong, retried)
                },
            )
    });
    if !retried.is_empty() {
        eprintln!(
            "reading back {when}: reads failed and were tried again; the first: {retried:#?}"
        );
    }
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged keys do not read back their last acknowledged value {when}; \
         the first: {:#?}",
        wrong.len(),
        ledger.len(),
        &wrong[..wrong.len().min(10)]
    );
}

/// The end of every story, once the transition is over: rehoming finishes (each member
/// holds its share, every other running node nothing), then every key of `ledger` is on
/// exactly N nodes, those its final layout places it on, and reads back through the
/// balancer.
fn assert_settled(story: &Story, ledger: &Ledger) {
    let layout_value = layout_of(&story.lb());
    assert_eq!(
        member(&layout_value, "transition"),
        &Value::Boolean(false),
        "{layout_value:?}"
    );
    let layout = placement(&layout_value);
    let n = layout.replicas();
    assert_eq!(n, N, "{layout_value:?}");
    let members: BTreeSet<String> = layout.servers().iter().cloned().collect();
    let running = story.running_nodes();
    for address in &members {
        assert!(
            running.iter().any(|(a, _)| a == address),
            "member {address} of the final layout runs"
        );
    }

    wait_until_ok(
        SETTLE_TIMEOUT,
        "rehoming is over: the members hold N copies of every key, the others nothing",
        || {
            let mut held = 0;
            let mut counts = Vec::new();
            let mut wrong = false;
            for (address, port) in &running {
                let stats = Rpc::new(*port).stats();
                let keys = int_member(&stats, "keys");
                let left = int_member(&stats, "rehome_left");
                let hints = int_member(&stats, "hints");
                counts.push(format!(
                    "{address}: keys {keys}, rehome_left {left}, hints {hints}"
                ));
                if members.contains(address) {
                    held += keys;
                } else if keys != 0 {
                    wrong = true;
                }
                wrong |= left != 0;
            }
            let expected = (n * ledger.len()) as i64;
            if wrong || held != expected {
                return Err(format!(
                    "members hold {held} keys, expected {expected}; {counts:?}"
                ));
            }
            Ok(())
        },
    );

    let names: Vec<String> = ledger.keys().cloned().collect();
    wait_until_ok(
        SETTLE_TIMEOUT,
        "every key is on exactly its N replicas of the final layout",
        || {
            let mut wrong = Vec::new();
            for (key, holders) in names.iter().zip(holders_of(story, &names)) {
                let expected = sorted(replicas(&layout, key));
                if holders != expected {
                    let strangers: Vec<&String> =
                        holders.iter().filter(|h| !members.contains(*h)).collect();
                    wrong.push(format!(
                        "{key} is on {} nodes {holders:?} (non-members among them: \
                         {strangers:?}); its replicas are {expected:?}",
                        holders.len()
                    ));
                }
            }
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} keys misplaced; the first: {:#?}",
                    wrong.len(),
                    names.len(),
                    &wrong[..wrong.len().min(10)]
                ))
            }
        },
    );
    assert_reads_back(story.lb_port(), ledger, "once the transition is over");
}
