//! The whole cluster in one deterministic simulation, under faults, replayable from a seed
//! (docs/simulation.md).
//!
//! Five storage node hosts (four members and a spare), two balancers, three clients, an
//! operator and an inspector run as turmoil hosts in this test's thread: the real
//! `dynamite::node::run` and `dynamite::balancer::run` over turmoil's simulated network and
//! time, each node on a simulated disk that outlives its crashes ([`disk`]). One seed decides
//! everything: the clients' writes ([`workload`]), the faults and membership changes
//! ([`nemesis`]), the network's latencies, the order hosts run in, the daemons' own random
//! numbers and each daemon's clock skew. Once the faults end, the inspector waits for the
//! cluster to converge and reads what it holds; [`checker`] holds it to Dynamo's promises.
//!
//!     cargo test --test simulation                        # the fixed seeds, as CI runs them
//!     DYNAMITE_SEED=42 cargo test --test simulation -- one_seed --nocapture   # one seed
//!     examples/simulate.sh 200                            # 200 random seeds (release build)
//!
//! A failing seed prints its plan and its history; `RUST_LOG=info` adds the daemons' logs, at
//! simulated times.

mod checker;
mod disk;
mod nemesis;
mod workload;
mod world;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use disk::SimDisk;
use nemesis::{BALANCERS, MEMBERS, Plan, SPARE};
use workload::{CLIENTS, Record};
use world::{BALANCER_PORT, NODE_PORT, SimListener, SplitMix};

/// The seeds `cargo test` runs: each seed that found a bug, with what it found (docs/simulation.md,
/// *Findings*). The first is also `one_seed`'s.
const SEEDS: &[u64] = &[
    // Removing a dead node cost its connect timeout per partition it held.
    1,
    // A removed node kept keys a lagging balancer wrote after its last rehoming pass.
    17_304_219_534_521_234_593,
    // After a power loss, a node reused a lost write's dot: an acknowledged put vanished.
    10_993_899_993_539_229_180,
    // A node's cluster clock was a median over other nodes than a balancer's: misordered puts.
    13_225_024_545_647_926_430,
    // A new node whose only seed was dead founded a cluster of its own and never joined.
    1_885_940_644_450_548_452,
    // A sync pass begun before a dead member's removal asked it for every partition.
    10_669_215_548_643_412_663,
    // The checker's own bug: a nil read beside a value a delete had not seen is allowed.
    3_316_445_014_348_666_048,
    // A joining node never measured a dead member others still counted: misordered puts.
    16_593_410_812_772_747_330,
    // A restarted node never measured a dead member: a put read nil after the delete before.
    7_953_218_549_841_756_565,
    // Anti-entropy waited 30 s on a peer cut off, while the only copy's holder died: lost.
    4_516_822_222_265_640_413,
    // A node stood in for two owners of a key and gave two writes one dot: a put lost.
    16_132_755_956_858_121_918,
    // A put's coordinator took it and its answer was lost; another coordinated it again,
    // and the client's next read saw one of the two versions: the other came back.
    7_111_450_290_566_311_040,
    2_828_748_826_363_007_481,
    // A replica missed a reap; a put after it counted its dot from 1 and the kept tombstone
    // covered it, while anti-entropy moved the key every round.
    11_968_976_092_161_788_853,
];
/// Each daemon's wall clock is off the simulation's by up to this much, either way.
const MAX_SKEW_US: u64 = 100_000;
/// When every run's simulated wall clock starts (2027-01-15), fixed so that entry times and
/// everything derived from them repeat.
const EPOCH_S: u64 = 1_800_000_000;
/// Bound on a whole run, in simulated time.
const SIMULATION_LIMIT: Duration = Duration::from_secs(400);

/// What one run did, saw and found wrong.
pub struct Outcome {
    pub seed: u64,
    pub plan: Vec<String>,
    pub events: Vec<String>,
    pub violations: Vec<String>,
    /// Simulated time the run covered.
    pub simulated: Duration,
    pub converged_after: Option<Duration>,
    pub acked: usize,
    pub writes: usize,
}

impl Outcome {
    /// The report of a failing run: its seed, how to replay it, what was wrong, its plan and
    /// its history.
    fn report(&self) -> String {
        format!(
            "DYNAMITE_SEED={seed}: {} violations:\n{}\n\nreplay: DYNAMITE_SEED={seed} cargo test \
             --test simulation -- one_seed --nocapture\n\nplan:\n{}\n\nhistory:\n{}",
            self.violations.len(),
            self.violations.join("\n"),
            self.plan.join("\n"),
            self.events.join("\n"),
            seed = self.seed,
        )
    }

    fn summary(&self) -> String {
        format!(
            "seed {}: {:.0} s simulated, {} of {} writes acknowledged, converged {}, {} violations",
            self.seed,
            self.simulated.as_secs_f64(),
            self.acked,
            self.writes,
            self.converged_after.map_or("never".to_owned(), |t| format!(
                "{:.1} s after the healing",
                t.as_secs_f64()
            )),
            self.violations.len()
        )
    }
}

/// One simulation at a time in this process: tokio numbers tasks across the process, and
/// another test's tasks would shift this run's numbers ([`world::align_task_ids`]).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the cluster under `seed` once.
pub fn run(seed: u64) -> Outcome {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    world::init_tracing();
    world::align_task_ids();
    let mut random = SplitMix(seed);
    let mut skews = random.fork(0xC10C);
    world::install(
        seed,
        nemesis::daemons()
            .iter()
            .map(|host| {
                let drawn = skews.below(2 * MAX_SKEW_US + 1) as i64;
                (host.to_string(), drawn - MAX_SKEW_US as i64)
            })
            .collect(),
    );
    let plan = Plan::draw(&mut random.fork(0xFA17));
    let mut crash_random = random.fork(0xC4A5);

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .enable_random_order()
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(SIMULATION_LIMIT)
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(nemesis::MAX_LATENCY)
        .build();

    let disks: BTreeMap<&'static str, Arc<SimDisk>> = nemesis::nodes()
        .into_iter()
        .map(|node| (node, Arc::new(SimDisk::new(node))))
        .collect();
    for node in nemesis::nodes() {
        let disk = disks[node].clone();
        let starts = if node == SPARE {
            plan.spare_starts
        } else {
            Some(Duration::ZERO)
        };
        sim.host(node, move || {
            let disk: Arc<dyn dynamite::storage::Engine> = disk.clone();
            async move {
                let Some(starts) = starts else {
                    return std::future::pending().await;
                };
                tokio::time::sleep(
                    starts.saturating_sub(turmoil::sim_elapsed().unwrap_or_default()),
                )
                .await;
                // A new node knows one member; the first members know each other.
                let peers: &[&str] = if node == SPARE {
                    &MEMBERS[..1]
                } else {
                    &MEMBERS
                };
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", NODE_PORT)).await?;
                dynamite::node::run(
                    world::node_config(node, peers, disk),
                    SimListener(listener),
                    std::future::pending(),
                )
                .await?;
                Ok(())
            }
        });
    }
    for balancer in BALANCERS {
        sim.host(balancer, || async {
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", BALANCER_PORT)).await?;
            dynamite::balancer::run(
                world::balancer_config(&MEMBERS),
                SimListener(listener),
                std::future::pending(),
            )
            .await?;
            Ok(())
        });
    }

    let record = Rc::new(RefCell::new(Record::default()));
    for (index, name) in CLIENTS.into_iter().enumerate() {
        sim.client(
            name,
            workload::client(name, random.fork(0xC1 + index as u64), record.clone()),
        );
    }
    sim.client(
        "operator",
        workload::operator(plan.clone(), random.fork(0x09E2), record.clone()),
    );
    sim.client(
        "inspector",
        workload::inspector(plan.clone(), record.clone()),
    );

    let mut actions = plan.actions.iter().peekable();
    let mut nemesis = nemesis::Nemesis::default();
    loop {
        while let Some((at, action)) = actions.peek()
            && *at <= sim.elapsed()
        {
            let line = nemesis.apply(&mut sim, action, &plan, &mut |node, crash| {
                disks[node].crash(crash, |pending| {
                    crash_random.below(pending as u64 + 1) as usize
                })
            });
            let at = sim.elapsed().as_micros();
            record
                .borrow_mut()
                .events
                .push(format!("{at:>10}us {line}"));
            actions.next();
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                let at = sim.elapsed().as_micros();
                record
                    .borrow_mut()
                    .failures
                    .push(format!("the simulation stopped at {at} us: {error}"));
                break;
            }
        }
    }
    let simulated = sim.elapsed();
    drop(sim);

    let record = Rc::try_unwrap(record)
        .unwrap_or_else(|_| panic!("a host outlived the simulation"))
        .into_inner();
    let mut violations = record.failures.clone();
    violations.extend(checker::check(
        &record.ops,
        &record.held,
        &record.single_writer,
        world::N,
        &record.figures,
    ));
    Outcome {
        seed,
        plan: plan.lines(),
        acked: record.ops.iter().filter(|op| op.acked).count(),
        writes: record.ops.len(),
        events: record.events,
        violations,
        simulated,
        converged_after: record.converged_after,
    }
}

/// Where two histories part: the first line that differs, or the end of the shorter one.
fn first_difference(a: &[String], b: &[String]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(at) => Some(at),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

fn seed_from_env() -> Option<u64> {
    let text = std::env::var("DYNAMITE_SEED").ok()?;
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("DYNAMITE_SEED={text} is not a u64")))
}

/// Every fixed seed keeps every promise.
#[test]
fn fixed_seeds() {
    let mut failed = Vec::new();
    for &seed in SEEDS {
        let started = std::time::Instant::now();
        let outcome = run(seed);
        println!(
            "{}; {:.1} s of real time",
            outcome.summary(),
            started.elapsed().as_secs_f64()
        );
        if !outcome.violations.is_empty() {
            println!("{}", outcome.report());
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "seeds {failed:?} failed (their reports are above)"
    );
}

/// One seed (`DYNAMITE_SEED`, or the first fixed one), run twice: the two histories must be
/// the same line for line, or a finding could not be replayed; and the run keeps every
/// promise.
#[test]
fn one_seed() {
    let seed = seed_from_env().unwrap_or(SEEDS[0]);
    println!("DYNAMITE_SEED={seed}");
    let first = run(seed);
    let second = run(seed);
    println!("{}", first.plan.join("\n"));
    println!("{}", first.events.join("\n"));
    println!("{}", first.summary());
    if let Some(at) = first_difference(&first.events, &second.events) {
        let around = |events: &[String]| {
            let from = at.saturating_sub(5).min(events.len());
            events[from..]
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        };
        panic!(
            "DYNAMITE_SEED={seed}: two runs of one seed diverged at event {at}\nfirst run:\n{}\n\
             second run:\n{}",
            around(&first.events),
            around(&second.events),
        );
    }
    assert!(first.violations.is_empty(), "{}", first.report());
}

/// Random seeds for as long as asked: `DYNAMITE_SIM_SEEDS` seeds (default 20) from
/// `DYNAMITE_SIM_FIRST` (default: drawn from the time), or until `DYNAMITE_SIM_MINUTES` pass.
/// Prints each failing seed's report and a summary. `examples/simulate.sh` runs it.
#[test]
#[ignore = "long: run by examples/simulate.sh"]
fn random_seeds() {
    let number = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let count = number("DYNAMITE_SIM_SEEDS").unwrap_or(20);
    let minutes = number("DYNAMITE_SIM_MINUTES");
    let first = number("DYNAMITE_SIM_FIRST").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as u64)
    });
    let started = std::time::Instant::now();
    let mut failed = Vec::new();
    let mut ran = 0u64;
    let mut simulated = Duration::ZERO;
    let mut seeds = SplitMix(first);
    loop {
        let done = match minutes {
            Some(minutes) => started.elapsed() >= Duration::from_secs(minutes * 60),
            None => ran >= count,
        };
        if done {
            break;
        }
        let seed = seeds.next();
        let outcome = run(seed);
        ran += 1;
        simulated += outcome.simulated;
        println!("{}", outcome.summary());
        if !outcome.violations.is_empty() {
            println!("{}", outcome.report());
            failed.push(seed);
        }
    }
    println!(
        "{ran} seeds, {:.2} simulated hours, {:.1} minutes of real time; failing seeds: {failed:?}",
        simulated.as_secs_f64() / 3600.0,
        started.elapsed().as_secs_f64() / 60.0
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
}
