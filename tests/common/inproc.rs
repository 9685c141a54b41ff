//! The in-process harness: storage nodes and balancers run inside the test binary, by the
//! same `dynamite::node::run` and `dynamite::balancer::run` the daemons' `main` calls, on
//! 127.0.0.1 and talked to over TCP with the blocking [`Rpc`] client, like real processes.
//!
//! - Each [`InProcessDaemon`] has a multi-thread tokio runtime of its own, whose threads are
//!   named after it (`node-1:41234`). Stopping it resolves its shutdown future, waits (bounded)
//!   for `run` to return, then shuts the runtime down, which drops every task it still had
//!   (repairs, handoffs, exchanges in flight): nothing of a stopped daemon keeps running, as
//!   after a kill. A breakpoint in the library stops in whichever daemon gets there; the thread
//!   name says which.
//! - Every daemon's `tracing` events go to one subscriber (`RUST_LOG`, `info` by default) that
//!   writes through the test harness's capture, so a failing test prints its daemons' logs,
//!   and `--nocapture` shows them as they come, each line with its daemon's thread name.
//! - Ports: a daemon's first start binds 127.0.0.1:0 ([`Port::any`]). While it is down its
//!   port stays bound, though not listening ([`Port`]): connections are refused as by a dead
//!   machine, and no outgoing connection can take the port as its source port (Linux skips
//!   ports bound explicitly), so the daemon comes back on the port the ring names it by.
//! - A durable node restarts on its data directory; an in-memory one comes back empty.
//! - [`InProcessCluster`] mirrors the process [`Cluster`](super::Cluster): the same builder
//!   settings ([`InProcessBuilder`]), turned into the same flags, parsed by the daemons' own
//!   `NodeArgs`/`BalancerArgs`, so every default is the binaries'. A node can join it later,
//!   seeded from some members ([`InProcessCluster::add_node`]). Dropping it stops every
//!   daemon, balancers first, each within bounded waits, then removes its directory.
//!
//! What a process has and this does not: signals (SIGSTOP, SIGKILL without a last sync), exit
//! codes, flags refused at start, a clock of its own (libfaketime), a network namespace. And
//! process-wide statics are shared by every daemon of the binary: the count of accepted
//! connections (`stats()["connections"]`, `dynamite_connections_accepted_total`) counts all of
//! them. Tests of those stay on processes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use clap::Parser;
use dynamite::cli::{BalancerArgs, NodeArgs};
use dynamite::config::{BalancerConfig, NodeConfig};
use tokio::net::TcpSocket;
use tokio::sync::oneshot;

use super::{
    Cluster, ClusterBuilder, Daemons, Listening, POLL_INTERVAL, STARTUP_TIMEOUT, addr, health,
};

/// How long `run` may take to return once its shutdown future resolved (the server itself
/// gives open connections up to 5 s to finish their request).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped daemon's runtime may take to drop its remaining tasks and let its
/// blocking threads (a journal sync) finish.
const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopped daemon's port may take to be bound again (sockets of closed
/// connections linger a moment).
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Worker threads of each daemon's runtime: what a daemon gets on a two-core machine.
const WORKER_THREADS: usize = 2;
/// Pending connections a daemon's listener queues.
const LISTEN_BACKLOG: u32 = 1024;

/// Installs the subscriber every in-process daemon logs to, once per test binary.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Fails only when a subscriber is already installed: then that one sees the daemons.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_thread_names(true)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// A port on 127.0.0.1, bound but not listening: held for a daemon while it is down.
pub struct Port {
    number: u16,
    socket: TcpSocket,
}

impl Port {
    /// A port the kernel picks (127.0.0.1:0).
    pub fn any() -> Port {
        Port::bind(0).expect("bind 127.0.0.1:0")
    }

    /// Port `number` again, once the sockets its daemon left behind let it (bounded).
    fn rebind(number: u16) -> Port {
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match Port::bind(number) {
                Ok(port) => return port,
                Err(error) if Instant::now() >= deadline => {
                    panic!("cannot bind 127.0.0.1:{number} again after {REBIND_TIMEOUT:?}: {error}")
                }
                Err(_) => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    fn bind(number: u16) -> std::io::Result<Port> {
        let socket = TcpSocket::new_v4()?;
        // Lets the port be bound while connections its daemon closed linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], number)))?;
        let number = socket.local_addr()?.port();
        Ok(Port { number, socket })
    }

    /// The port number.
    pub fn number(&self) -> u16 {
        self.number
    }
}

/// What a daemon runs, with its validated settings.
#[derive(Clone)]
enum Role {
    Node(NodeConfig),
    Balancer(BalancerConfig),
}

/// One storage node or balancer running in this process on 127.0.0.1:`port`; stopped on drop.
pub struct InProcessDaemon {
    name: String,
    port: u16,
    role: Role,
    /// The port while the daemon is down.
    held: Option<Port>,
    running: Option<Running>,
}

/// A started daemon: its runtime, the sender that stops it, and where `run`'s result comes.
struct Running {
    runtime: tokio::runtime::Runtime,
    shutdown: oneshot::Sender<()>,
    ended: mpsc::Receiver<Result<(), String>>,
}

impl InProcessDaemon {
    /// Starts a storage node on `port` and waits until it is healthy. `args` are
    /// `storage_node` flags after `-p PORT --bind 127.0.0.1 --quiet` (typically `--data-dir DIR`
    /// or `--in-memory`, and `-s` for peers).
    pub fn storage_node(name: &str, port: Port, args: &[String]) -> InProcessDaemon {
        let mut all = vec!["storage_node".to_owned()];
        all.extend(listen_flags(port.number));
        all.push("--quiet".to_owned());
        all.extend_from_slice(args);
        let config = NodeArgs::try_parse_from(&all)
            .unwrap_or_else(|e| panic!("{name}: storage_node flags {all:?}: {e}"))
            .into_config()
            .unwrap_or_else(|e| panic!("{name}: storage_node flags {all:?}: {e}"));
        InProcessDaemon::start_new(name, port, Role::Node(config))
    }

    /// Starts a balancer on `port` over `servers` (`HOST:PORT`, as `-s` in this order) and waits
    /// until it is healthy. `args` come last (`-N`, `-R`, `--timeout-ms`...).
    pub fn load_balancer(
        name: &str,
        port: Port,
        servers: &[String],
        args: &[String],
    ) -> InProcessDaemon {
        let mut all = vec!["load_balancer".to_owned()];
        for server in servers {
            all.push("-s".to_owned());
            all.push(server.clone());
        }
        all.extend(listen_flags(port.number));
        all.extend_from_slice(args);
        let config = BalancerArgs::try_parse_from(&all)
            .unwrap_or_else(|e| panic!("{name}: load_balancer flags {all:?}: {e}"))
            .into_config()
            .unwrap_or_else(|e| panic!("{name}: load_balancer flags {all:?}: {e}"));
        InProcessDaemon::start_new(name, port, Role::Balancer(config))
    }

    fn start_new(name: &str, port: Port, role: Role) -> InProcessDaemon {
        init_tracing();
        let mut daemon = InProcessDaemon {
            name: name.to_owned(),
            port: port.number,
            role,
            held: Some(port),
            running: None,
        };
        daemon.start();
        daemon
    }

    /// Whether it runs (started and not stopped since).
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts it again, on its port and with its settings (a durable node on its data
    /// directory), and waits until it answers `GET /health` with 200. Panics if it runs.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "{} is already running", self.name);
        let port = self.held.take().unwrap_or_else(|| Port::rebind(self.port));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name(format!("{}:{}", self.name, self.port))
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{}: build its runtime: {e}", self.name));
        let (shutdown, stop_signal) = oneshot::channel::<()>();
        let (ended_tx, ended) = mpsc::channel();
        let role = self.role.clone();
        runtime.spawn(async move {
            // Resolves when told to stop, or when the sender is dropped with its daemon.
            let stopped = async {
                let _ = stop_signal.await;
            };
            let result = match port.socket.listen(LISTEN_BACKLOG) {
                Err(error) => Err(format!("listen: {error}")),
                Ok(listener) => match role {
                    Role::Node(config) => dynamite::node::run(config, listener, stopped).await,
                    Role::Balancer(config) => {
                        dynamite::balancer::run(config, listener, stopped).await
                    }
                }
                .map_err(|error| error.to_string()),
            };
            let _ = ended_tx.send(result);
        });
        self.running = Some(Running {
            runtime,
            shutdown,
            ended,
        });
        self.wait_healthy();
    }

    /// Stops it: resolves its shutdown future, waits until `run` returned, drops what its
    /// runtime still ran, and holds its port (bound, not listening) until it starts again. For a "node is down"
    /// story this is the kill; a durable node's data stays in its directory. Does nothing if
    /// it is not running; panics if it does not stop cleanly within the bounds.
    pub fn stop(&mut self) {
        if let Err(problem) = self.try_stop() {
            panic!("{problem}");
        }
        if self.held.is_none() {
            self.held = Some(Port::rebind(self.port));
        }
    }

    /// Stops it if it runs, then starts it again.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    fn try_stop(&mut self) -> Result<(), String> {
        let Some(running) = self.running.take() else {
            return Ok(());
        };
        let _ = running.shutdown.send(());
        let outcome = match running.ended.recv_timeout(STOP_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("{} stopped with an error: {error}", self.name)),
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "{} did not stop within {STOP_TIMEOUT:?} of its shutdown",
                self.name
            )),
            Err(RecvTimeoutError::Disconnected) => Err(format!("{} panicked", self.name)),
        };
        running.runtime.shutdown_timeout(RUNTIME_SHUTDOWN_TIMEOUT);
        outcome
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let running = self.running.as_ref().expect("started");
            match running.ended.try_recv() {
                Ok(result) => {
                    self.running = None;
                    panic!("{} ended during startup: {result:?}", self.name);
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.running = None;
                    panic!("{} panicked during startup", self.name);
                }
                Err(mpsc::TryRecvError::Empty) => {}
            }
            if health(self.port) == Some(200) {
                return;
            }
            if Instant::now() >= deadline {
                let _ = self.try_stop();
                panic!(
                    "{} did not answer GET /health with 200 within {STARTUP_TIMEOUT:?}",
                    self.name
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for InProcessDaemon {
    fn drop(&mut self) {
        if let Err(problem) = self.try_stop() {
            eprintln!("{problem}");
        }
    }
}

/// `-p PORT --bind 127.0.0.1`.
fn listen_flags(port: u16) -> [String; 4] {
    [
        "-p".to_owned(),
        port.to_string(),
        "--bind".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

// ---------------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------------

/// Storage nodes plus balancers over them, all in this process, with a temporary directory for
/// data. Dropping it stops every daemon, balancers first, then removes the directory.
pub struct InProcessCluster {
    /// The storage nodes, in start order.
    pub nodes: Vec<InProcessDaemon>,
    /// The balancers, in start order.
    pub balancers: Vec<InProcessDaemon>,
    config: ClusterBuilder,
    // Declared last: dropped after the daemons, whose data it holds.
    dir: tempfile::TempDir,
}

/// How to start an [`InProcessCluster`]: the settings of the process [`ClusterBuilder`].
#[derive(Clone, Debug)]
pub struct InProcessBuilder(ClusterBuilder);

/// Builder methods that set what the process builder's method of the same name sets.
macro_rules! same_as_process_builder {
    ($($(#[$doc:meta])* $method:ident($($arg:ident: $ty:ty),*);)*) => {
        $(
            $(#[$doc])*
            pub fn $method(self, $($arg: $ty),*) -> Self {
                InProcessBuilder(self.0.$method($($arg),*))
            }
        )*
    };
}

impl InProcessBuilder {
    same_as_process_builder! {
        /// How many storage nodes (default 3).
        nodes(nodes: usize);
        /// How many balancers, each over all nodes in start order (default 1).
        balancers(balancers: usize);
        /// Storage nodes in memory instead of in a data directory.
        in_memory();
        /// N (`-N`).
        replicas(n: usize);
        /// R (`-R`).
        read_quorum(r: usize);
        /// W (`-W`).
        write_quorum(w: usize);
        /// The replica timeout (`--timeout-ms`).
        timeout_ms(ms: u64);
        /// Time between anti-entropy rounds of every node (`--aae-interval-ms`).
        aae_interval_ms(ms: u64);
        /// Anti-entropy rounds too far apart to happen during a test.
        aae_off();
        /// How long balancers keep tombstones every replica holds (`--tombstone-grace-ms`).
        tombstone_grace_ms(ms: u64);
        /// Tombstones kept longer than any test runs.
        never_reap();
        /// An extra flag for every storage node.
        node_arg(arg: &str);
        /// An extra flag for every balancer.
        balancer_arg(arg: &str);
    }

    /// Binds a port for every node, starts the nodes (each told about the others with `-s`)
    /// and waits until each is healthy, then the balancers.
    pub fn start(self) -> InProcessCluster {
        let settings = self.0;
        let dir = tempfile::Builder::new()
            .prefix("dynamite-inproc-")
            .tempdir()
            .expect("create temp dir");
        let ports: Vec<Port> = (0..settings.nodes).map(|_| Port::any()).collect();
        let servers: Vec<String> = ports.iter().map(|port| addr(port.number())).collect();
        let nodes = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                let args = settings.node_flags(dir.path(), &servers, i);
                InProcessDaemon::storage_node(&format!("node-{i}"), port, &args)
            })
            .collect();
        let mut cluster = InProcessCluster {
            nodes,
            balancers: Vec::new(),
            config: settings.clone(),
            dir,
        };
        for _ in 0..settings.balancers {
            cluster.add_balancer(&servers, &[]);
        }
        cluster
    }
}

impl Listening for InProcessDaemon {
    fn port(&self) -> u16 {
        self.port
    }
}

impl Daemons for InProcessCluster {
    type Daemon = InProcessDaemon;

    fn node_daemons(&self) -> &[InProcessDaemon] {
        &self.nodes
    }

    fn balancer_daemons(&self) -> &[InProcessDaemon] {
        &self.balancers
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl InProcessCluster {
    /// Three durable storage nodes and one balancer with the daemons' default N, R, W,
    /// until told otherwise.
    pub fn builder() -> InProcessBuilder {
        InProcessBuilder(Cluster::builder())
    }

    /// Starts one more balancer, with the cluster's N/R/W/timeout, over `servers` exactly as
    /// given (any order, duplicates allowed), plus `extra_args`. Returns its index.
    pub fn add_balancer(&mut self, servers: &[String], extra_args: &[&str]) -> usize {
        let i = self.balancers.len();
        let mut args = self.config.balancer_flags();
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let balancer =
            InProcessDaemon::load_balancer(&format!("balancer-{i}"), Port::any(), servers, &args);
        self.balancers.push(balancer);
        i
    }

    /// Starts one more storage node, with the cluster's node settings (in memory or in
    /// `DIR/node-i`, `-N` and the extra node flags), told about the nodes `seeds` only (`-s`,
    /// in this order), as a node joining a running cluster is; waits until it is healthy.
    /// It is no member of the layout until a `cluster.apply` makes it one. Returns its index.
    pub fn add_node(&mut self, seeds: &[usize]) -> usize {
        let i = self.nodes.len();
        let distinct: std::collections::BTreeSet<&usize> = seeds.iter().collect();
        assert!(
            !seeds.is_empty() && distinct.len() == seeds.len() && seeds.iter().all(|&s| s < i),
            "node-{i} is seeded from distinct nodes of the cluster, not {seeds:?}"
        );
        let servers: Vec<String> = seeds.iter().map(|&s| self.nodes[s].addr()).collect();
        // `servers` has fewer than `i + 1` entries, so none is left out as "node i itself".
        let args = self.config.node_flags(self.dir.path(), &servers, i);
        let node = InProcessDaemon::storage_node(&format!("node-{i}"), Port::any(), &args);
        self.nodes.push(node);
        i
    }
}

impl Drop for InProcessCluster {
    fn drop(&mut self) {
        let problems: Vec<String> = self
            .balancers
            .iter_mut()
            .chain(self.nodes.iter_mut())
            .filter_map(|daemon| daemon.try_stop().err())
            .collect();
        if !problems.is_empty() {
            if std::thread::panicking() {
                eprintln!("stopping the cluster: {problems:?}");
            } else {
                panic!("stopping the cluster: {problems:?}");
            }
        }
    }
}
