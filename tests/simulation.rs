//! The whole cluster in one deterministic simulation (issue 19, first step; see
//! docs/simulation.md).
//!
//! Three storage nodes (in memory) and a balancer run as turmoil hosts: the real
//! `dynamite::node::run` and `dynamite::balancer::run`, their HTTP server, pooled client,
//! coordinator, gossip, probes and anti-entropy, over turmoil's simulated network and
//! simulated time, all in this test's thread. A client host writes and overwrites keys through
//! the balancer's XML-RPC, one node is cut off from every other host for a while, and once it
//! is back every acknowledged write must read back. One seed decides everything that varies:
//! the workload, the node cut off and when, the network's latencies, the order hosts are run
//! in each step, the daemons' own random numbers, and how far each daemon's wall clock is off
//! (up to 100 ms either way, read on the simulation's clock; the balancer must measure each
//! node's where it is).
//!
//! The seed is `DYNAMITE_SEED` (a fixed one by default), printed first. The run is made twice
//! and the two histories compared line by line: a difference is nondeterminism, a bug of the
//! simulation (or of what it fails to control) to fix before any finding can be replayed.
//!
//!     DYNAMITE_SEED=42 cargo test --test simulation -- --nocapture
//!
//! `RUST_LOG=info` shows the daemons' logs (at simulated times).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use dxr::Value;
use dynamite::rpc::client::RpcClient;
use dynamite::rpc::transport::{DialFuture, Dialer, Listener, Stream};
use dynamite::security::Outgoing;

/// The seed when `DYNAMITE_SEED` is not set.
const DEFAULT_SEED: u64 = 19;
/// The storage nodes' host names; each listens on [`NODE_PORT`].
const NODES: [&str; 3] = ["node1", "node2", "node3"];
const NODE_PORT: u16 = 25000;
const BALANCER: &str = "balancer";
const BALANCER_PORT: u16 = 30000;
/// Keys the workload writes.
const KEYS: usize = 12;
/// Writes made while every node is reachable, then while one is cut off.
const WRITES_BEFORE: usize = 12;
const WRITES_DURING: usize = 24;
/// How long a client call may take (simulated time).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Time given to the cluster after the partition heals, before the reads: the balancer
/// probes the node back up within 250 ms, anti-entropy runs every second here.
const SETTLE: Duration = Duration::from_secs(5);
/// Bound on a whole run, in simulated time.
const SIMULATION_LIMIT: Duration = Duration::from_secs(300);
/// Each daemon's wall clock is off the simulation's by up to this much, either way (the seed
/// says how far): what NTP gone wrong looks like, well within what the daemons measure and
/// correct for (docs/time.md).
const MAX_SKEW_US: u64 = 100_000;
/// When every run's simulated wall clock starts (2027-01-15): fixed, so that entry times and
/// everything derived from them are the same in every run.
const EPOCH_S: u64 = 1_800_000_000;

#[test]
fn acknowledged_writes_survive_a_partition_deterministically() {
    let seed = std::env::var("DYNAMITE_SEED")
        .ok()
        .map(|text| {
            text.parse()
                .unwrap_or_else(|_| panic!("DYNAMITE_SEED={text} is not a u64"))
        })
        .unwrap_or(DEFAULT_SEED);
    println!("DYNAMITE_SEED={seed}");
    init_tracing();

    let started = std::time::Instant::now();
    let first = run(seed);
    let once = started.elapsed();
    let second = run(seed);
    println!("{}", first.events.join("\n"));
    println!(
        "two runs of {} events each, {:.1} s and {:.1} s of real time",
        first.events.len(),
        once.as_secs_f64(),
        (started.elapsed() - once).as_secs_f64()
    );
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
            "DYNAMITE_SEED={seed}: two runs of one seed diverged at event {at}\n\
             first run:\n{}\nsecond run:\n{}",
            around(&first.events),
            around(&second.events),
        );
    }
    assert!(
        first.violations.is_empty(),
        "DYNAMITE_SEED={seed}: {} violations:\n{}\n\nhistory:\n{}",
        first.violations.len(),
        first.violations.join("\n"),
        first.events.join("\n")
    );
}

/// Where two histories part: the first line that differs, or the end of the shorter one.
fn first_difference(a: &[String], b: &[String]) -> Option<usize> {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(at) => Some(at),
        None if a.len() != b.len() => Some(a.len().min(b.len())),
        None => None,
    }
}

/// What one run saw: its history, one line per event, and what the checker found wrong.
#[derive(Default)]
struct Outcome {
    events: Vec<String>,
    violations: Vec<String>,
}

/// Runs the cluster and the workload once under `seed`.
fn run(seed: u64) -> Outcome {
    install_hooks();
    DAEMON_RANDOM.with(|state| state.set(Some(seed ^ 0x5EED_DAE0_0000_0000)));
    let mut skews = SplitMix(seed ^ 0x5EED_C10C_0000_0000);
    SKEW_US.with(|skew| {
        *skew.borrow_mut() = NODES
            .iter()
            .chain(&[BALANCER])
            .map(|host| {
                let drawn = skews.below(2 * MAX_SKEW_US + 1) as i64;
                (host.to_string(), drawn - MAX_SKEW_US as i64)
            })
            .collect();
    });

    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .enable_random_order()
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_S))
        .simulation_duration(SIMULATION_LIMIT)
        .min_message_latency(Duration::from_micros(100))
        .max_message_latency(Duration::from_millis(5))
        .build();

    for name in NODES {
        sim.host(name, move || async move {
            let listener = turmoil::net::TcpListener::bind(("0.0.0.0", NODE_PORT)).await?;
            dynamite::node::run(
                node_config(name),
                SimListener(listener),
                std::future::pending(),
            )
            .await?;
            Ok(())
        });
    }
    sim.host(BALANCER, || async {
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", BALANCER_PORT)).await?;
        dynamite::balancer::run(
            balancer_config(),
            SimListener(listener),
            std::future::pending(),
        )
        .await?;
        Ok(())
    });

    let outcome = Rc::new(RefCell::new(Outcome::default()));
    sim.client("client", workload(seed, outcome.clone()));
    if let Err(error) = sim.run() {
        panic!("DYNAMITE_SEED={seed}: the simulation failed: {error}");
    }
    drop(sim);
    Rc::try_unwrap(outcome)
        .unwrap_or_else(|_| panic!("the client host is gone with the simulation"))
        .into_inner()
}

/// The client: writes, a partition, more writes, the healing, then the check.
async fn workload(seed: u64, outcome: Rc<RefCell<Outcome>>) -> turmoil::Result {
    let mut client = Client {
        rpc: RpcClient::with_outgoing(&Outgoing {
            dialer: Some(Arc::new(SimDialer)),
            ..Outgoing::default()
        }),
        balancer: format!("{BALANCER}:{BALANCER_PORT}"),
        random: SplitMix(seed),
        started: tokio::time::Instant::now(),
        outcome,
        possible: BTreeMap::new(),
        written: 0,
    };

    // The balancer serves once it learned the layout and measured the nodes' clocks.
    while client
        .rpc
        .check_health(&client.balancer, CALL_TIMEOUT)
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.log("balancer serving".into());

    for _ in 0..WRITES_BEFORE {
        client.write().await;
    }
    let victim = NODES[client.random.below(NODES.len() as u64) as usize];
    let others: Vec<&str> = NODES
        .iter()
        .copied()
        .filter(|name| *name != victim)
        .chain([BALANCER])
        .collect();
    for other in &others {
        turmoil::partition(victim, *other);
    }
    client.log(format!("partition: {victim} cut off from {others:?}"));
    for _ in 0..WRITES_DURING {
        client.write().await;
    }
    for other in &others {
        turmoil::repair(victim, *other);
    }
    client.log(format!("healed: {victim} reachable again"));
    tokio::time::sleep(SETTLE).await;
    client.check().await;
    client.check_clocks().await;
    Ok(())
}

/// The client host's state: what it wrote, and what reads may return.
struct Client {
    rpc: RpcClient,
    /// The balancer's address.
    balancer: String,
    /// The workload's choices.
    random: SplitMix,
    started: tokio::time::Instant,
    outcome: Rc<RefCell<Outcome>>,
    /// Per key, the values a read may return: the last acknowledged write's, and those of the
    /// writes after it that failed (they may have landed anyway).
    possible: BTreeMap<String, Vec<String>>,
    /// Writes made so far: each writes a value never written before.
    written: usize,
}

impl Client {
    /// Adds a line to the history, at the client's simulated time.
    fn log(&self, line: String) {
        let at = self.started.elapsed().as_micros();
        self.outcome
            .borrow_mut()
            .events
            .push(format!("{at:>10}us {line}"));
    }

    /// Puts a new value in a key the seed picks, then pauses up to 50 ms.
    async fn write(&mut self) {
        let key = format!("k{:02}", self.random.below(KEYS as u64));
        self.written += 1;
        let value = format!("{key}-w{}", self.written);
        let answer = self
            .rpc
            .call(
                &self.balancer,
                "put",
                vec![Value::String(key.clone()), Value::String(value.clone())],
                CALL_TIMEOUT,
            )
            .await;
        let values = self.possible.entry(key.clone()).or_default();
        let acknowledged = matches!(&answer, Ok(Value::String(status)) if status == "200");
        if acknowledged {
            values.clear();
        }
        values.push(value.clone());
        self.log(match answer {
            _ if acknowledged => format!("put {key}={value} -> 200"),
            other => format!("put {key}={value} -> not acknowledged: {other:?}"),
        });
        let pause = Duration::from_millis(self.random.below(50));
        tokio::time::sleep(pause).await;
    }

    /// Every acknowledged write reads back: through the balancer at its R, and with all three
    /// replicas answering (r = 3).
    async fn check(&self) {
        for (key, values) in &self.possible {
            for r in [None, Some(3)] {
                let mut params = vec![Value::String(key.clone())];
                if let Some(r) = r {
                    params.push(Value::Struct(
                        [("r".to_owned(), Value::Integer(r))].into_iter().collect(),
                    ));
                }
                let read = self
                    .rpc
                    .call(&self.balancer, "get", params, CALL_TIMEOUT)
                    .await;
                let quorum = r.map_or("R".to_owned(), |r| format!("r={r}"));
                let line = format!("get {key} ({quorum}) -> {read:?}");
                let right = matches!(&read, Ok(Value::String(value)) if values.contains(value));
                if !right {
                    self.violation(format!("{line}; expected one of {values:?}"));
                }
                self.log(line);
            }
            // The context names the dots that wrote the key: which replica coordinated what,
            // so that two runs that differ inside the cluster differ here too.
            let versions = self
                .rpc
                .call(
                    &self.balancer,
                    "get_versions",
                    vec![Value::String(key.clone())],
                    CALL_TIMEOUT,
                )
                .await;
            self.log(format!("get_versions {key} -> {versions:?}"));
        }
    }
}

impl Client {
    /// The balancer measured each node's clock where that node's skew puts it, within the
    /// uncertainty it states (`stats()`: `clock_offset_us ± clock_error_us`).
    async fn check_clocks(&self) {
        let stats = self
            .rpc
            .call(&self.balancer, "stats", vec![], CALL_TIMEOUT)
            .await;
        let servers = match &stats {
            Ok(Value::Struct(stats)) => stats.get("servers"),
            _ => None,
        };
        let Some(Value::Array(servers)) = servers else {
            self.violation(format!("the balancer's stats() has no servers: {stats:?}"));
            return;
        };
        let skews = SKEW_US.with(|skews| skews.borrow().clone());
        for server in servers {
            let field = |name: &str| match server {
                Value::Struct(fields) => fields.get(name).cloned(),
                _ => None,
            };
            let int = |name: &str| match field(name) {
                Some(Value::Integer(n)) => Some(i64::from(n)),
                Some(Value::Long(n)) => Some(n),
                _ => None,
            };
            let Some(Value::String(address)) = field("address") else {
                self.violation(format!("a server without an address: {server:?}"));
                continue;
            };
            let host = address.split(':').next().unwrap_or_default();
            let skew = |host: &str| skews.get(host).copied().unwrap_or(0);
            let expected = skew(host) - skew(BALANCER);
            let line = match (int("clock_offset_us"), int("clock_error_us")) {
                (Some(offset), Some(error)) => {
                    let line = format!(
                        "clock of {host}: measured {offset} ± {error} us from the balancer's, \
                         off by {expected} us"
                    );
                    if offset.abs_diff(expected) > error.unsigned_abs() {
                        self.violation(line.clone());
                    }
                    line
                }
                _ => {
                    let line = format!("clock of {host}: not measured: {server:?}");
                    self.violation(line.clone());
                    line
                }
            };
            self.log(line);
        }
    }

    fn violation(&self, what: String) {
        self.outcome.borrow_mut().violations.push(what);
    }
}

/// A storage node's settings, from the flags a person would give it.
fn node_config(name: &str) -> dynamite::config::NodeConfig {
    let mut args: Vec<String> = vec![
        "storage_node".into(),
        "-p".into(),
        NODE_PORT.to_string(),
        "--in-memory".into(),
        "--quiet".into(),
        "--aae-interval-ms".into(),
        "1000".into(),
        "--advertise".into(),
        format!("{name}:{NODE_PORT}"),
    ];
    for peer in NODES.iter().filter(|peer| **peer != name) {
        args.extend(["-s".to_owned(), format!("{peer}:{NODE_PORT}")]);
    }
    let mut config = <dynamite::cli::NodeArgs as clap::Parser>::try_parse_from(&args)
        .expect("storage_node flags")
        .into_config()
        .expect("storage_node settings");
    config.security.outgoing.dialer = Some(Arc::new(SimDialer));
    config
}

/// The balancer's settings, from its flags.
fn balancer_config() -> dynamite::config::BalancerConfig {
    let mut args = vec![
        "load_balancer".to_owned(),
        "-p".to_owned(),
        BALANCER_PORT.to_string(),
    ];
    for node in NODES {
        args.extend(["-s".to_owned(), format!("{node}:{NODE_PORT}")]);
    }
    let mut config = <dynamite::cli::BalancerArgs as clap::Parser>::try_parse_from(&args)
        .expect("load_balancer flags")
        .into_config()
        .expect("load_balancer settings");
    config.security.outgoing.dialer = Some(Arc::new(SimDialer));
    config
}

/// A turmoil listener, as the daemons' server accepts from.
struct SimListener(turmoil::net::TcpListener);

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        let (stream, _) = self.0.accept().await?;
        Ok(stream)
    }
}

/// Opens connections on turmoil's network, resolving host names in its DNS.
struct SimDialer;

impl Dialer for SimDialer {
    fn dial(&self, host: &str, port: u16) -> DialFuture {
        let host = host.to_owned();
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }
}

thread_local! {
    /// The daemons' random stream for the simulation this thread runs (every host runs on it).
    static DAEMON_RANDOM: Cell<Option<u64>> = const { Cell::new(None) };
    /// Each host's clock skew for the simulation this thread runs, in µs (ahead when
    /// positive); hosts not named run on the simulation's clock.
    static SKEW_US: RefCell<BTreeMap<String, i64>> = const { RefCell::new(BTreeMap::new()) };
    /// The turmoil host being run on this thread ([`HostTracker`]).
    static CURRENT_HOST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Puts the simulation's clock and randomness in place of the machine's, for this process.
fn install_hooks() {
    // Already installed by an earlier run in this process: the same functions.
    let _ = dynamite::simulation::install(dynamite::simulation::Hooks {
        now_us: simulated_now_us,
        random_u64: simulated_random_u64,
    });
}

/// The simulated wall clock of the host being run: the simulation's epoch plus the simulated
/// time since, plus that host's skew. Read anywhere else, it is a bug of the harness (a thread
/// turmoil does not run).
fn simulated_now_us() -> u64 {
    let since = turmoil::since_epoch()
        .expect("the wall clock is read outside the simulation's hosts (another thread?)");
    let skew = CURRENT_HOST.with(|host| {
        let host = host.borrow();
        let host = host.as_deref().expect("no turmoil host is being run");
        SKEW_US.with(|skews| skews.borrow().get(host).copied().unwrap_or(0))
    });
    u64::try_from(since.as_micros())
        .unwrap_or(u64::MAX)
        .saturating_add_signed(skew)
}

fn simulated_random_u64() -> u64 {
    DAEMON_RANDOM.with(|state| {
        let mut random = SplitMix(
            state
                .get()
                .expect("random numbers drawn outside a simulation's thread"),
        );
        let drawn = random.next();
        state.set(Some(random.0));
        drawn
    })
}

/// SplitMix64: a small, good, seedable generator (Steele, Lea and Flood, 2014).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The daemons' logs, when `RUST_LOG` asks for them, stamped with the simulated time; and
/// the [`HostTracker`] the clock hook needs, whatever `RUST_LOG` says.
fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let logs = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let node_spans = tracing_subscriber::filter::filter_fn(|metadata| {
        metadata.is_span() && metadata.name() == "node" && metadata.target().starts_with("turmoil")
    });
    let installed = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_timer(SimulatedTime)
                .with_test_writer()
                .with_ansi(false)
                .with_filter(logs),
        )
        .with(HostTracker.with_filter(node_spans))
        .try_init();
    assert!(
        installed.is_ok(),
        "another tracing subscriber is installed: the host tracker cannot see turmoil's spans"
    );
}

/// Follows the span turmoil enters around each step of each host (`node`, its `name` field
/// the host's name), so that the clock hook knows whose clock it reads: turmoil 0.7 names the
/// host being run nowhere in its public API.
struct HostTracker;

/// The host a `node` span is for, kept in the span's extensions.
struct HostName(String);

impl<S> tracing_subscriber::Layer<S> for HostTracker
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attributes: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        context: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Name(Option<String>);
        impl tracing::field::Visit for Name {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "name" {
                    self.0 = Some(value.to_owned());
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut name = Name(None);
        attributes.record(&mut name);
        if let (Some(name), Some(span)) = (name.0, context.span(id)) {
            span.extensions_mut().insert(HostName(name));
        }
    }

    fn on_enter(&self, id: &tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = context.span(id)
            && let Some(HostName(name)) = span.extensions().get::<HostName>()
        {
            CURRENT_HOST.with(|host| *host.borrow_mut() = Some(name.clone()));
        }
    }

    fn on_exit(&self, id: &tracing::span::Id, context: tracing_subscriber::layer::Context<'_, S>) {
        if let Some(span) = context.span(id)
            && span.extensions().get::<HostName>().is_some()
        {
            CURRENT_HOST.with(|host| *host.borrow_mut() = None);
        }
    }
}

/// Log lines' time: the simulated time since the run began, where a host is being run.
struct SimulatedTime;

impl tracing_subscriber::fmt::time::FormatTime for SimulatedTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        match turmoil::sim_elapsed() {
            Some(elapsed) => write!(w, "{:>10}us", elapsed.as_micros()),
            None => write!(w, "{:>12}", "-"),
        }
    }
}
