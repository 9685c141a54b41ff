//! What the daemons run on in the simulation: turmoil's network (a listener and a dialer),
//! a wall clock and random numbers from the seed, one thread-local per simulation thread; the
//! tracing layer that tells the clock whose host is being run; the daemons' settings, from the
//! flags a person would type.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use dynamite::rpc::transport::{DialFuture, Dialer, Listener, Stream};

/// Every storage node listens on this port of its host.
pub const NODE_PORT: u16 = 25000;
/// Every balancer listens on this port of its host.
pub const BALANCER_PORT: u16 = 30000;
/// Replicas per key.
pub const N: usize = 3;

/// A storage node's settings: in memory on `disk` (which outlives the node), `peers` as its
/// `-s`, anti-entropy every second.
pub fn node_config(
    name: &str,
    peers: &[&str],
    disk: Arc<dyn dynamite::storage::Engine>,
) -> dynamite::config::NodeConfig {
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
    for peer in peers.iter().filter(|peer| **peer != name) {
        args.extend(["-s".to_owned(), format!("{peer}:{NODE_PORT}")]);
    }
    let mut config = <dynamite::cli::NodeArgs as clap::Parser>::try_parse_from(&args)
        .expect("storage_node flags")
        .into_config()
        .expect("storage_node settings");
    config.storage =
        dynamite::storage::StorageConfig::Provided(dynamite::storage::ProvidedEngine(disk));
    config.security.outgoing.dialer = Some(Arc::new(SimDialer));
    config
}

/// A balancer's settings, from its flags: `nodes` as its `-s`, the defaults otherwise.
pub fn balancer_config(nodes: &[&str]) -> dynamite::config::BalancerConfig {
    let mut args = vec![
        "load_balancer".to_owned(),
        "-p".to_owned(),
        BALANCER_PORT.to_string(),
    ];
    for node in nodes {
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
pub struct SimListener(pub turmoil::net::TcpListener);

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Stream> {
        let (stream, _) = self.0.accept().await?;
        Ok(stream)
    }
}

/// Opens connections on turmoil's network, resolving host names in its DNS.
pub struct SimDialer;

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
    /// The turmoil host being run on this thread ([`HostTracker`]), or crashed or started by
    /// the nemesis ([`as_host`]).
    static CURRENT_HOST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Puts the simulation's clock and randomness in place of the machine's, for this process,
/// and seeds them for the run this thread is about to make.
pub fn install(seed: u64, skews: BTreeMap<String, i64>) {
    // Already installed by an earlier run in this process: the same functions.
    let _ = dynamite::simulation::install(dynamite::simulation::Hooks {
        now_us: simulated_now_us,
        random_u64: simulated_random_u64,
    });
    DAEMON_RANDOM.with(|state| state.set(Some(seed ^ 0x5EED_DAE0_0000_0000)));
    SKEW_US.with(|skew| *skew.borrow_mut() = skews);
}

/// Runs `f` (the test thread crashing or starting `host`) as if `host` were being run, so that
/// whatever its dropped tasks read of the clock is its clock.
pub fn as_host<T>(host: &str, f: impl FnOnce() -> T) -> T {
    let before = CURRENT_HOST.with(|current| current.replace(Some(host.to_owned())));
    let result = f();
    CURRENT_HOST.with(|current| *current.borrow_mut() = before);
    result
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

/// Brings tokio's next task id to a multiple of 64.
///
/// tokio numbers tasks from one counter for the whole process, and a runtime keeps its tasks
/// in lists chosen by id (four for a host's runtime); when turmoil crashes a host, its tasks are
/// dropped list by list, so the order in which the dropped connections close, and with it the
/// simulated network's later state, follows the ids' remainders. Two runs of a seed in one
/// process, or a replay in another, start from the same remainder this way.
pub fn align_task_ids() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime to number tasks");
    loop {
        let id = runtime.block_on(async { tokio::spawn(async { tokio::task::id() }).await });
        let id: u64 = id
            .expect("a task that returns its id")
            .to_string()
            .parse()
            .expect("a task id is a number");
        if id % 64 == 63 {
            return;
        }
    }
}

/// SplitMix64: a small, good, seedable generator (Steele, Lea and Flood, 2014).
#[derive(Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// An independent stream, for one part of the run, so that drawing more in one part does
    /// not change what another draws.
    pub fn fork(&mut self, salt: u64) -> SplitMix {
        SplitMix(self.next() ^ salt)
    }
}

/// The daemons' logs, when `RUST_LOG` asks for them, stamped with the simulated time; and
/// the [`HostTracker`] the clock hook needs, whatever `RUST_LOG` says. Once per process.
pub fn init_tracing() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let logs = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
        let node_spans = tracing_subscriber::filter::filter_fn(|metadata| {
            metadata.is_span()
                && metadata.name() == "node"
                && metadata.target().starts_with("turmoil")
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
    });
}

/// Follows the span turmoil enters around each step of each host (`node`, its `name` field
/// the host's name), so that the clock hook knows whose clock it reads: turmoil 0.7 names the
/// host being run nowhere in its public API. Should turmoil rename the span, the hook fails
/// loudly (no host being run) rather than reading the wrong clock.
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
