//! The harness for Dynamite's integration tests: real `storage_node` and `load_balancer`
//! processes on 127.0.0.1, and a small blocking XML-RPC client to talk to them.
//!
//! - [`Daemon`] owns one child process. It starts it, waits (bounded) until `GET /health`
//!   answers 200, and kills it on drop, so a failing test leaves nothing behind. Its stdout and
//!   stderr go to files in the test's temporary directory; if the test panics, dropping the
//!   daemon prints the tail of those files, so the failure comes with the daemons' side of it.
//! - [`Cluster`] starts n storage nodes and one or more balancers over them, each in its own
//!   temporary directory and on its own free port, so tests run in parallel.
//! - [`Rpc`] is a blocking XML-RPC client over `std::net::TcpStream` (HTTP/1.1, keep-alive),
//!   with `dxr` for the XML. A call returns `Ok(value)` or `Err((faultCode, faultString))`.
//! - [`http`] sends raw bytes and returns the HTTP status and body, for malformed input.
//! - [`wait_until`] polls a condition until a deadline: no test synchronises with a bare sleep.
//! - [`inproc`] runs the same daemons inside the test process instead ([`InProcessCluster`]),
//!   for the stories that need no signal, no crash and no flag parsing by a real binary.
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code)]

pub mod inproc;
pub mod membership;

#[allow(unused_imports)] // as dead_code above: each test binary uses a part
pub use inproc::{InProcessCluster, InProcessDaemon, Port};

use std::borrow::Cow;
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use dxr::Value;

/// Path of the `storage_node` binary under test.
pub const STORAGE_NODE: &str = env!("CARGO_BIN_EXE_storage_node");
/// Path of the `load_balancer` binary under test.
pub const LOAD_BALANCER: &str = env!("CARGO_BIN_EXE_load_balancer");

/// How long a daemon may take from spawn to answering `GET /health` with 200.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the harness polls a condition (health, [`wait_until`]).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one RPC may take before the client gives up (and the test fails).
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process expected to exit (bad flags, locked data dir) may run.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How much of each log file a failing test prints.
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The result of an XML-RPC call: the value, or the fault as `(faultCode, faultString)`.
pub type RpcResult = Result<Value, (i32, String)>;

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// Lowest port [`free_port`] hands out.
const FIRST_TEST_PORT: u16 = 10_000;

/// A port on 127.0.0.1 that was free a moment ago, never handed out before by this process.
///
/// Two traps make the plain "bind 127.0.0.1:0, read the port, drop" unreliable here: the
/// kernel may hand the same port to two consecutive calls (seen: two daemons of one cluster
/// got the same port, and the second one's health check was answered by the first), and a
/// port from the ephemeral range can be taken, while its daemon is down for a restart, as the
/// source port of some outgoing connection. So ports
/// come from below the ephemeral range (`ip_local_port_range`), from a per-process starting
/// point, each checked with a bind and remembered. Where that range is too small, it falls
/// back to port 0, still never repeating a port.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    static HANDED_OUT: Mutex<std::collections::BTreeSet<u16>> =
        Mutex::new(std::collections::BTreeSet::new());
    static NEXT: AtomicU32 = AtomicU32::new(0);

    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let span = u32::from(ephemeral_range_start().saturating_sub(FIRST_TEST_PORT));
    if span >= 1000 {
        let start = std::process::id().wrapping_mul(7919) % span;
        for _ in 0..span {
            let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let port = FIRST_TEST_PORT + offset as u16;
            if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed_out.insert(port);
                return port;
            }
        }
    }
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// First port of the kernel's ephemeral range (Linux), or the usual 32768.
fn ephemeral_range_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Whether process `pid` holds a TCP socket listening on `port`, from `/proc` (Linux);
/// `None` where that cannot be told. Guards against taking another process's answer on a
/// port for our daemon's.
fn pid_listens_on(pid: u32, port: u16) -> Option<bool> {
    let mut inodes = Vec::new();
    let mut any_table = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        any_table = true;
        for line in text.lines().skip(1) {
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() <= 9 || fields[3] != "0A" {
                continue; // not LISTEN
            }
            let local_port = fields[1]
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok());
            if local_port == Some(port) {
                inodes.push(format!("socket:[{}]", fields[9]));
            }
        }
    }
    if !any_table {
        return None;
    }
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    let listens = fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .map(|link| {
                inodes
                    .iter()
                    .any(|inode| link.as_os_str() == inode.as_str())
            })
            .unwrap_or(false)
    });
    Some(listens)
}

/// `HOST:PORT` of a daemon on 127.0.0.1, as given to `-s`.
pub fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// An XML-RPC string value.
pub fn s(text: &str) -> Value {
    Value::String(text.to_owned())
}

/// The `i`-th key of a test's data set.
pub fn key(i: usize) -> String {
    format!("key-{i:04}")
}

/// The value stored under [`key`]`(i)`.
pub fn value(i: usize) -> Value {
    s(&format!("value-{i:04}"))
}

/// A client for every storage node of the cluster, in start order.
pub fn nodes_of(cluster: &Cluster) -> Vec<Rpc> {
    (0..cluster.nodes.len())
        .map(|i| cluster.node_client(i))
        .collect()
}

/// Asserts that the balancer behind `lb` served no client read: what repaired the data was
/// a background mechanism.
pub fn assert_no_client_reads(lb: &Rpc) {
    let stats = lb.stats();
    assert_eq!(balancer_counter(&stats, "gets"), 0, "no client read");
    assert_eq!(
        balancer_counter(&stats, "get_versions"),
        0,
        "no client read"
    );
}

/// What each of `nodes` holds locally under `key` (`Nil` where it holds nothing).
pub fn local_copies(nodes: &[Rpc], key: &str) -> Vec<Value> {
    nodes
        .iter()
        .map(|node| {
            node.local_get(key)
                .unwrap_or_else(|fault| panic!("local get({key:?}) on a node: {fault:?}"))
        })
        .collect()
}

/// Checks a "quorum not met" fault: code 503, a string that names the quorum (`W` or
/// "write", `R` or "read") and counts the replicas that answered: at most `alive`, fewer if
/// the balancer gave up as soon as the quorum became impossible.
pub fn assert_quorum_fault(
    what: &str,
    result: RpcResult,
    (letter, word): (&str, &str),
    alive: u64,
    servers: &[String],
) {
    let text = match result {
        Err((503, text)) => text,
        other => panic!("{what}: expected fault 503, got {other:?}"),
    };
    // Addresses are full of digits; they do not count.
    let mut scrubbed = text.clone();
    for server in servers {
        scrubbed = scrubbed.replace(server.as_str(), " ");
    }
    scrubbed = scrubbed.replace("127.0.0.1", " ");
    assert!(
        scrubbed.contains(letter) || scrubbed.to_lowercase().contains(word),
        "{what}: the fault does not name the {word} quorum: {text:?}"
    );
    let numbers: Vec<u64> = scrubbed
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|digits| digits.parse().ok())
        .collect();
    assert!(
        numbers.iter().any(|&n| n <= alive),
        "{what}: the fault does not say how many replicas answered: {text:?}"
    );
}

/// Whether a write answered that its coordinator took it and went silent: applied or not.
pub fn is_outcome_unknown(result: &RpcResult) -> bool {
    matches!(result, Err((503, message)) if message.contains("may or may not have been applied"))
}

/// `"200"`, what `put` and `delete` answer.
pub fn ok200() -> RpcResult {
    Ok(s("200"))
}

/// An integer of either width (`i4`/`int` or the `i8` extension).
pub fn int(value: &Value) -> i64 {
    match value {
        Value::Integer(i) => i64::from(*i),
        Value::Long(l) => *l,
        other => panic!("expected an integer, got {other:?}"),
    }
}

/// The contents of a string value.
pub fn string(value: &Value) -> &str {
    match value {
        Value::String(text) => text,
        other => panic!("expected a string, got {other:?}"),
    }
}

/// The items of an array value.
pub fn array(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        other => panic!("expected an array, got {other:?}"),
    }
}

/// A member of a struct value; panics, naming the members present, if it is missing.
pub fn member<'a>(value: &'a Value, name: &str) -> &'a Value {
    match value {
        Value::Struct(members) => members.get(name).unwrap_or_else(|| {
            let names: Vec<&String> = members.keys().collect();
            panic!("struct has no member {name:?}; it has {names:?}")
        }),
        other => panic!("expected a struct with member {name:?}, got {other:?}"),
    }
}

/// Polls `condition` every [`POLL_INTERVAL`] until it holds; panics naming `what` if it
/// still does not after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// One daemon process (storage node or balancer) listening on 127.0.0.1:`port`.
///
/// Killed with SIGKILL and reaped on drop.
pub struct Daemon {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    log_dir: PathBuf,
    /// How many times the process was spawned; each spawn logs to its own files.
    generation: u32,
    child: Option<Child>,
    /// Environment variables set for the process, beyond the harness's own.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a storage node on `port`. `args` come after `-p PORT --bind 127.0.0.1 --quiet`
    /// (typically `--data-dir DIR` or `--in-memory`, and `-s` for peers).
    pub fn storage_node(log_dir: &Path, name: &str, port: u16, args: &[String]) -> Daemon {
        Daemon::start(log_dir, name, STORAGE_NODE, port, node_args(port, args))
    }

    /// As [`Daemon::storage_node`], with the process's wall clock `skew_s` seconds off this
    /// machine's (libfaketime; see [`faketime_available`]).
    pub fn storage_node_with_clock(
        log_dir: &Path,
        name: &str,
        port: u16,
        args: &[String],
        skew_s: i64,
    ) -> Daemon {
        let all = node_args(port, args);
        Daemon::start_with_env(log_dir, name, STORAGE_NODE, port, all, skewed_clock(skew_s))
    }

    /// As [`Daemon::load_balancer`], with the process's wall clock `skew_s` seconds off this
    /// machine's.
    pub fn load_balancer_with_clock(
        log_dir: &Path,
        name: &str,
        port: u16,
        servers: &[String],
        args: &[String],
        skew_s: i64,
    ) -> Daemon {
        let all = balancer_args(port, servers, args);
        Daemon::start_with_env(
            log_dir,
            name,
            LOAD_BALANCER,
            port,
            all,
            skewed_clock(skew_s),
        )
    }

    /// Starts a load balancer on `port` over `servers` (`HOST:PORT`, passed as `-s` in this
    /// order, duplicates included). `args` come last (`-N`, `-R`, `--timeout-ms`...).
    ///
    /// docs/protocol.md gives `--quiet` to storage_node only, so the balancer does not get it.
    pub fn load_balancer(
        log_dir: &Path,
        name: &str,
        port: u16,
        servers: &[String],
        args: &[String],
    ) -> Daemon {
        let all = balancer_args(port, servers, args);
        Daemon::start(log_dir, name, LOAD_BALANCER, port, all)
    }

    /// Spawns `program args` and waits until it serves `GET /health` on `port`.
    pub fn start(
        log_dir: &Path,
        name: &str,
        program: impl Into<PathBuf>,
        port: u16,
        args: Vec<String>,
    ) -> Daemon {
        Daemon::start_with_env(log_dir, name, program, port, args, Vec::new())
    }

    /// As [`Daemon::start`], with `env` set for the process.
    pub fn start_with_env(
        log_dir: &Path,
        name: &str,
        program: impl Into<PathBuf>,
        port: u16,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Daemon {
        let mut daemon = Daemon {
            name: name.to_owned(),
            program: program.into(),
            args,
            port,
            log_dir: log_dir.to_owned(),
            generation: 0,
            child: None,
            env,
        };
        daemon.spawn_and_wait_healthy();
        daemon
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is not running").id()
    }

    /// Whether the process is still alive (a stopped process counts as alive).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL, then reap: a crash, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (bounded by [`EXIT_TIMEOUT`]) until it exits: a clean stop.
    /// Answers its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        self.stop_on("-TERM")
    }

    /// SIGINT (Ctrl-C), then waits (bounded by [`EXIT_TIMEOUT`]) until it exits: a clean
    /// stop. Answers its exit status.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.stop_on("-INT")
    }

    /// Sends `signal` (as kill(1) names it), then waits, bounded, until the process exits.
    fn stop_on(&mut self, signal: &str) -> ExitStatus {
        self.signal(signal);
        self.wait_exit(signal)
    }

    /// Waits (bounded by [`EXIT_TIMEOUT`]) until the process exits, after `signal` (named in
    /// the failure message); answers its exit status.
    pub fn wait_exit(&mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is not running");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {EXIT_TIMEOUT:?} of {signal}\n{}",
                    self.name,
                    self.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Its arguments (flags after the program's name).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Kills it if it runs, then starts it again with `extra` flags added to its own (for
    /// this start and the later ones) and waits until it is healthy.
    pub fn restart_with(&mut self, extra: &[&str]) {
        self.kill();
        self.args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        self.spawn_and_wait_healthy();
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing, like a hung machine.
    pub fn stop(&mut self) {
        self.signal("-STOP");
    }

    /// SIGCONT: resume after [`Daemon::stop`].
    pub fn cont(&mut self) {
        self.signal("-CONT");
    }

    /// Kills it if it runs, then starts it again with the same arguments (so the same port
    /// and the same data directory) and waits until it is healthy.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_and_wait_healthy();
    }

    /// Everything it has logged so far, every generation, each file cut to its tail.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for generation in 1..=self.generation {
            for stream in ["stdout", "stderr"] {
                let path = self.log_path(generation, stream);
                let text = tail(&path, LOG_TAIL_BYTES);
                if !text.trim().is_empty() {
                    out.push_str(&format!(
                        "----- {} (start #{generation}) {stream} -----\n{text}\n",
                        self.name
                    ));
                }
            }
        }
        if out.is_empty() {
            out = format!("----- {}: no output -----\n", self.name);
        }
        out
    }

    /// The file its latest start writes `stream` (`"stdout"` or `"stderr"`) to, whole.
    pub fn log_file(&self, stream: &str) -> PathBuf {
        self.log_path(self.generation, stream)
    }

    fn log_path(&self, generation: u32, stream: &str) -> PathBuf {
        self.log_dir
            .join(format!("{}.{generation}.{stream}.log", self.name))
    }

    /// Sends `signal` (`-TERM`, `-INT`..., as kill(1) takes it) and returns at once.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }

    fn spawn_and_wait_healthy(&mut self) {
        self.generation += 1;
        let stdout = File::create(self.log_path(self.generation, "stdout")).expect("log file");
        let stderr = File::create(self.log_path(self.generation, "stderr")).expect("log file");
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} ({:?}): {e}", self.name, self.program));
        self.child = Some(child);

        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "{} exited during startup with {status}\nargs: {:?}\n{}",
                    self.name,
                    self.args,
                    self.logs()
                );
            }
            // Healthy, and really this process answering, not another one on the port. A
            // daemon serving HTTPS cannot be asked in plain HTTP: its listening socket is
            // what tells (it binds once it is ready to serve).
            let pid = child.id();
            let serving = if self.args.iter().any(|arg| arg == "--tls-cert") {
                pid_listens_on(pid, self.port) == Some(true)
            } else {
                health(self.port) == Some(200) && pid_listens_on(pid, self.port) != Some(false)
            };
            if serving {
                return;
            }
            if Instant::now() >= deadline {
                self.kill();
                panic!(
                    "{} did not answer GET /health with 200 within {STARTUP_TIMEOUT:?}\n\
                     args: {:?}\n{}",
                    self.name,
                    self.args,
                    self.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// A storage node's arguments: `-p PORT --bind 127.0.0.1 --quiet`, then `args`.
fn node_args(port: u16, args: &[String]) -> Vec<String> {
    let mut all = vec![
        "-p".to_owned(),
        port.to_string(),
        "--bind".to_owned(),
        "127.0.0.1".to_owned(),
        "--quiet".to_owned(),
    ];
    all.extend_from_slice(args);
    all
}

/// A balancer's arguments: `-s` for each of `servers`, `-p PORT --bind 127.0.0.1`, `args`.
fn balancer_args(port: u16, servers: &[String], args: &[String]) -> Vec<String> {
    let mut all = Vec::new();
    for server in servers {
        all.push("-s".to_owned());
        all.push(server.clone());
    }
    all.extend([
        "-p".to_owned(),
        port.to_string(),
        "--bind".to_owned(),
        "127.0.0.1".to_owned(),
    ]);
    all.extend_from_slice(args);
    all
}

/// `-s PEER` for every server of `servers` but the `i`-th: a node's peers.
pub fn peer_args(servers: &[String], i: usize) -> Vec<String> {
    servers
        .iter()
        .enumerate()
        .filter(|&(j, _)| j != i)
        .flat_map(|(_, peer)| ["-s".to_owned(), peer.clone()])
        .collect()
}

/// What a daemon of either harness offers a test: where it listens, and a client.
pub trait Listening {
    /// The port it listens on.
    fn port(&self) -> u16;

    /// `127.0.0.1:PORT`.
    fn addr(&self) -> String {
        addr(self.port())
    }

    /// A fresh XML-RPC client to it.
    fn rpc(&self) -> Rpc {
        Rpc::new(self.port())
    }
}

impl Listening for Daemon {
    fn port(&self) -> u16 {
        self.port
    }
}

/// What a cluster of either harness (real processes, or [`InProcessCluster`]) offers a test,
/// written once over its daemons.
pub trait Daemons {
    type Daemon: Listening;
    fn node_daemons(&self) -> &[Self::Daemon];
    fn balancer_daemons(&self) -> &[Self::Daemon];
    /// The temporary directory holding the data dirs (and logs).
    fn dir(&self) -> &Path;

    /// The storage nodes' ports, in start order.
    fn node_ports(&self) -> Vec<u16> {
        self.node_daemons().iter().map(Listening::port).collect()
    }

    /// The storage nodes' `HOST:PORT`, in start order, as the balancers are given them.
    fn servers(&self) -> Vec<String> {
        self.node_daemons().iter().map(Listening::addr).collect()
    }

    /// Port of balancer `i`.
    fn balancer_port(&self, i: usize) -> u16 {
        self.balancer_daemons()[i].port()
    }

    /// A client of the first balancer.
    fn client(&self) -> Rpc {
        self.balancer_daemons()[0].rpc()
    }

    /// A client of storage node `i`, to inspect its local copies and stats.
    fn node_client(&self, i: usize) -> Rpc {
        self.node_daemons()[i].rpc()
    }

    /// A client of every storage node, in start order.
    fn node_clients(&self) -> Vec<Rpc> {
        self.node_daemons().iter().map(Listening::rpc).collect()
    }

    /// Data directory of storage node `i` (unused when in memory).
    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir().join(format!("node-{i}"))
    }
}

impl Daemons for Cluster {
    type Daemon = Daemon;

    fn node_daemons(&self) -> &[Daemon] {
        &self.nodes
    }

    fn balancer_daemons(&self) -> &[Daemon] {
        &self.balancers
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// A test that cannot run on this machine (no root, no libfaketime) says why and passes,
/// except where `DYNAMITE_REQUIRE_ALL` is set (CI sets it): there it fails, so that a
/// machine missing something cannot pass a run that skipped the story.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("DYNAMITE_REQUIRE_ALL").is_some() {
        panic!("{test} cannot run here, and DYNAMITE_REQUIRE_ALL is set: {reason}");
    }
    eprintln!("SKIPPED {test}: {reason}");
}

/// Skips `test` (see [`skip`]) unless libfaketime can skew daemons' clocks; whether to go on.
pub fn faketime_or_skip(test: &str) -> bool {
    if faketime_available() {
        return true;
    }
    skip(
        test,
        "libfaketime (Debian package faketime) is missing or does not shift clocks; tests/run.sh installs it",
    );
    false
}

/// libfaketime, as Debian's `faketime` package installs it (the test script does).
pub fn libfaketime() -> Option<PathBuf> {
    let lib = std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .find_map(|dir| {
            let candidate = dir.path().join("faketime/libfaketime.so.1");
            candidate.exists().then_some(candidate)
        });
    lib.or_else(|| {
        let candidate = PathBuf::from("/usr/lib/faketime/libfaketime.so.1");
        candidate.exists().then_some(candidate)
    })
}

/// Whether daemons can be started with a skewed clock: libfaketime is installed and shifts
/// a program's wall clock.
pub fn faketime_available() -> bool {
    if libfaketime().is_none() {
        return false;
    }
    let output = Command::new("date")
        .arg("+%s")
        .envs(skewed_clock(3600))
        .output();
    let Ok(output) = output else {
        return false;
    };
    let shifted: Option<u64> = String::from_utf8_lossy(&output.stdout).trim().parse().ok();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    shifted.is_some_and(|shifted| shifted.abs_diff(now + 3600) < 60)
}

/// The environment that runs a program with its wall clock `skew_s` seconds off this
/// machine's (its monotonic clock untouched); empty without libfaketime. The program keeps
/// its pid, which the harness checks.
fn skewed_clock(skew_s: i64) -> Vec<(String, String)> {
    let Some(lib) = libfaketime() else {
        return Vec::new();
    };
    vec![
        ("LD_PRELOAD".to_owned(), lib.to_string_lossy().into_owned()),
        ("FAKETIME".to_owned(), format!("{skew_s:+}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
        // Read FAKETIME once: a daemon calls the clock often.
        ("FAKETIME_NO_CACHE".to_owned(), "0".to_owned()),
    ]
}

/// The last `max` bytes of a file, lossily decoded; empty if it cannot be read.
pub fn tail(path: &Path, max: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let skip = len.saturating_sub(max);
    let mut bytes = Vec::new();
    if io::Seek::seek(&mut file, io::SeekFrom::Start(skip)).is_err()
        || file.read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if skip > 0 {
        format!("[... {skip} bytes cut ...]\n{text}")
    } else {
        text
    }
}

/// How a process that was expected to exit on its own ended.
#[derive(Debug)]
pub struct Exited {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program args` to completion with output captured in `dir`; kills it and panics if
/// it is still running after [`EXIT_TIMEOUT`]. For flags that must be refused at start.
pub fn run_to_exit(dir: &Path, program: &str, args: &[&str]) -> Exited {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = dir.join(format!("run-{n}.stdout.log"));
    let err_path = dir.join(format!("run-{n}.stderr.log"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("log file"))
        .stderr(File::create(&err_path).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {args:?} was expected to exit but still ran after {EXIT_TIMEOUT:?}\n\
                 stdout: {}\nstderr: {}",
                tail(&out_path, LOG_TAIL_BYTES),
                tail(&err_path, LOG_TAIL_BYTES)
            );
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Exited {
        status,
        stdout: tail(&out_path, LOG_TAIL_BYTES),
        stderr: tail(&err_path, LOG_TAIL_BYTES),
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------------

/// Storage nodes plus balancers over them, all on 127.0.0.1, with a temporary directory for
/// data and logs. Dropping it kills every process, then removes the directory.
pub struct Cluster {
    /// The storage nodes, in start order.
    pub nodes: Vec<Daemon>,
    /// The balancers, in start order.
    pub balancers: Vec<Daemon>,
    config: ClusterBuilder,
    // Declared last: dropped after the daemons, which log into it.
    dir: tempfile::TempDir,
}

/// How to start a [`Cluster`]; see [`Cluster::builder`].
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    nodes: usize,
    balancers: usize,
    in_memory: bool,
    n: Option<usize>,
    r: Option<usize>,
    w: Option<usize>,
    timeout_ms: Option<u64>,
    balancer_args: Vec<String>,
    node_args: Vec<String>,
}

impl Cluster {
    /// Three durable storage nodes and one balancer with the daemons' default N, R, W,
    /// until told otherwise.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 3,
            balancers: 1,
            in_memory: false,
            n: None,
            r: None,
            w: None,
            timeout_ms: None,
            balancer_args: Vec::new(),
            node_args: Vec::new(),
        }
    }

    /// Starts one more balancer, with the cluster's N/R/W/timeout, over `servers` exactly as
    /// given (any order, duplicates allowed), plus `extra_args`. Returns its index.
    pub fn add_balancer(&mut self, servers: &[String], extra_args: &[&str]) -> usize {
        let i = self.balancers.len();
        let mut args = self.config.balancer_flags();
        args.extend(extra_args.iter().map(|a| (*a).to_owned()));
        let balancer = Daemon::load_balancer(
            self.dir.path(),
            &format!("balancer-{i}"),
            free_port(),
            servers,
            &args,
        );
        self.balancers.push(balancer);
        i
    }

    /// Kills every storage node and balancer (SIGKILL), then restarts them all on the same
    /// ports and data directories, nodes first.
    pub fn crash_and_restart_all(&mut self) {
        for daemon in self.balancers.iter_mut().chain(self.nodes.iter_mut()) {
            daemon.kill();
        }
        for node in &mut self.nodes {
            node.restart();
        }
        for balancer in &mut self.balancers {
            balancer.restart();
        }
    }
}

impl ClusterBuilder {
    /// How many storage nodes (default 3).
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// How many balancers, each over all nodes in start order (default 1).
    pub fn balancers(mut self, balancers: usize) -> Self {
        self.balancers = balancers;
        self
    }

    /// Storage nodes with `--in-memory` instead of a data directory.
    pub fn in_memory(mut self) -> Self {
        self.in_memory = true;
        self
    }

    /// `-N`.
    pub fn replicas(mut self, n: usize) -> Self {
        self.n = Some(n);
        self
    }

    /// `-R`.
    pub fn read_quorum(mut self, r: usize) -> Self {
        self.r = Some(r);
        self
    }

    /// `-W`.
    pub fn write_quorum(mut self, w: usize) -> Self {
        self.w = Some(w);
        self
    }

    /// `--timeout-ms`.
    pub fn timeout_ms(mut self, ms: u64) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// `--aae-interval-ms` for every storage node.
    pub fn aae_interval_ms(self, ms: u64) -> Self {
        self.node_arg("--aae-interval-ms").node_arg(&ms.to_string())
    }

    /// Anti-entropy rounds too far apart to happen during a test.
    pub fn aae_off(self) -> Self {
        self.aae_interval_ms(3_600_000)
    }

    /// `--tombstone-grace-ms` for every balancer.
    pub fn tombstone_grace_ms(self, ms: u64) -> Self {
        self.balancer_arg("--tombstone-grace-ms")
            .balancer_arg(&ms.to_string())
    }

    /// Tombstones kept longer than any test runs.
    pub fn never_reap(self) -> Self {
        self.tombstone_grace_ms(3_600_000)
    }

    /// Extra flags for every storage node (e.g. `--max-request-bytes 1024`).
    pub fn node_arg(mut self, arg: &str) -> Self {
        self.node_args.push(arg.to_owned());
        self
    }

    /// Extra flags for every balancer (e.g. `--max-request-bytes 1024`).
    pub fn balancer_arg(mut self, arg: &str) -> Self {
        self.balancer_args.push(arg.to_owned());
        self
    }

    fn balancer_flags(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in [("-N", self.n), ("-R", self.r), ("-W", self.w)] {
            if let Some(value) = value {
                args.push(flag.to_owned());
                args.push(value.to_string());
            }
        }
        if let Some(ms) = self.timeout_ms {
            args.push("--timeout-ms".to_owned());
            args.push(ms.to_string());
        }
        args.extend(self.balancer_args.iter().cloned());
        args
    }

    /// The flags of storage node `i` of `servers` (after `-p`, `--bind` and `--quiet`): its
    /// storage (`--in-memory`, or `DIR/node-i`), the other nodes as `-s` peers, `-N`, and the
    /// extra node flags.
    fn node_flags(&self, dir: &Path, servers: &[String], i: usize) -> Vec<String> {
        let mut args = Vec::new();
        if self.in_memory {
            args.push("--in-memory".to_owned());
        } else {
            args.push("--data-dir".to_owned());
            args.push(dir.join(format!("node-{i}")).to_string_lossy().into_owned());
        }
        args.extend(peer_args(servers, i));
        // Nodes with peers build the balancers' ring for anti-entropy: same N.
        if let Some(n) = self.n {
            args.push("-N".to_owned());
            args.push(n.to_string());
        }
        args.extend(self.node_args.iter().cloned());
        args
    }

    /// Starts the nodes (each told about the others with `-s`), waits until each is healthy,
    /// then the balancers.
    pub fn start(self) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("dynamite-test-")
            .tempdir()
            .expect("create temp dir");
        let ports: Vec<u16> = (0..self.nodes).map(|_| free_port()).collect();
        let servers: Vec<String> = ports.iter().map(|p| addr(*p)).collect();

        let mut nodes = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let args = self.node_flags(dir.path(), &servers, i);
            nodes.push(Daemon::storage_node(
                dir.path(),
                &format!("node-{i}"),
                *port,
                &args,
            ));
        }

        let mut cluster = Cluster {
            nodes,
            balancers: Vec::new(),
            config: self.clone(),
            dir,
        };
        for _ in 0..self.balancers {
            cluster.add_balancer(&servers, &[]);
        }
        cluster
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and XML-RPC
// ---------------------------------------------------------------------------------------------

/// An HTTP response: status code and body (lossily decoded as UTF-8).
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
    /// Whether the server said it closes the connection.
    close: bool,
}

/// Status of `GET /health`, or `None` if nothing answers on the port.
pub fn health(port: u16) -> Option<u16> {
    http_with_timeout(port, "GET", "/health", b"", Duration::from_secs(2))
        .ok()
        .map(|r| r.status)
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
///
/// If the server answers before reading the whole body (413) and the write fails, the
/// response is still read.
pub fn http(port: u16, method: &str, path: &str, body: &[u8]) -> io::Result<HttpResponse> {
    http_with_timeout(port, method, path, body, RPC_TIMEOUT)
}

/// `POST /` with `body` as `text/xml`, on a fresh connection.
pub fn post_raw(port: u16, body: &[u8]) -> HttpResponse {
    http(port, "POST", "/", body)
        .unwrap_or_else(|e| panic!("POST / to 127.0.0.1:{port} failed: {e}"))
}

fn http_with_timeout(
    port: u16,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> io::Result<HttpResponse> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = request_bytes(method, path, body, true);
    // A server may refuse a large body early and close; the status it sent still counts.
    let write_result = (&stream).write_all(&request);
    let mut reader = BufReader::new(stream);
    match read_response(&mut reader) {
        Ok(response) => Ok(response),
        Err(read_error) => Err(write_result.err().unwrap_or(read_error)),
    }
}

fn request_bytes(method: &str, path: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: dynamite-tests\r\n\
         Content-Type: text/xml\r\nContent-Length: {}\r\n",
        body.len()
    );
    if close {
        request.push_str("Connection: close\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads one response: status line, headers, then a body delimited by Content-Length,
/// chunked encoding, or the end of the connection. Skips interim 1xx responses.
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<HttpResponse> {
    loop {
        let mut status_line = String::new();
        match reader.read_line(&mut status_line) {
            Ok(0) => {
                return Err(no_response(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                ));
            }
            Ok(_) => {}
            Err(e) if status_line.is_empty() => return Err(no_response(e.kind(), e)),
            Err(e) => return Err(e),
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;

        let mut content_length = None;
        let mut chunked = false;
        let mut close = status_line.starts_with("HTTP/1.0");
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Err(invalid("connection closed inside the headers".into()));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                return Err(invalid(format!("bad header line {line:?}")));
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => {
                    content_length = Some(
                        value
                            .parse::<usize>()
                            .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
                    )
                }
                "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        if (100..200).contains(&status) {
            continue;
        }

        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size_line = String::new();
                reader.read_line(&mut size_line)?;
                let size_hex = size_line.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| invalid(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        let mut trailer = String::new();
                        if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                reader.read_exact(&mut body[start..])?;
                let mut crlf = [0u8; 2];
                reader.read_exact(&mut crlf)?;
            }
        } else if let Some(length) = content_length {
            body.resize(length, 0);
            reader.read_exact(&mut body)?;
        } else if status != 204 && status != 304 {
            reader.read_to_end(&mut body)?;
            close = true;
        }
        return Ok(HttpResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            close,
        });
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Marks an error that happened before any byte of a response arrived.
#[derive(Debug)]
struct NoResponse(String);

impl std::fmt::Display for NoResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no response: {}", self.0)
    }
}

impl std::error::Error for NoResponse {}

fn no_response(kind: io::ErrorKind, cause: impl std::fmt::Display) -> io::Error {
    io::Error::new(kind, NoResponse(cause.to_string()))
}

/// The XML of a method call.
pub fn call_xml(method: &str, params: Vec<Value>) -> String {
    dxr::MethodCall {
        name: Cow::Borrowed(method),
        params,
    }
    .to_xml()
    .expect("serialise method call")
}

/// Parses an XML-RPC response body into a value or a fault; panics on anything else.
pub fn parse_response(body: &str) -> RpcResult {
    if let Ok(response) = dxr::MethodResponse::from_xml(body) {
        return Ok(response.value);
    }
    if let Ok(fault) = dxr::FaultResponse::from_xml(body) {
        return Err((fault.fault.code(), fault.fault.string().to_owned()));
    }
    panic!("neither a methodResponse nor a fault: {body:?}")
}

/// A blocking XML-RPC client of one daemon, over one keep-alive connection.
pub struct Rpc {
    port: u16,
    path: String,
    timeout: Duration,
    conn: RefCell<Option<BufReader<TcpStream>>>,
    connections_opened: std::cell::Cell<u32>,
}

impl Rpc {
    /// A client of 127.0.0.1:`port`, posting to `/`.
    pub fn new(port: u16) -> Rpc {
        Rpc {
            port,
            path: "/".to_owned(),
            timeout: RPC_TIMEOUT,
            conn: RefCell::new(None),
            connections_opened: std::cell::Cell::new(0),
        }
    }

    /// How many TCP connections this client has opened so far: 1 for any number of calls
    /// while the server keeps the connection alive.
    pub fn connections_opened(&self) -> u32 {
        self.connections_opened.get()
    }

    /// The same client posting to another path (`/RPC2`).
    pub fn with_path(mut self, path: &str) -> Rpc {
        self.path = path.to_owned();
        self
    }

    /// Calls `method(params)`. Panics on transport errors and on non-200 HTTP statuses:
    /// XML-RPC faults travel in 200 responses.
    pub fn call(&self, method: &str, params: Vec<Value>) -> RpcResult {
        self.try_call(method, params)
            .unwrap_or_else(|e| panic!("{method} to 127.0.0.1:{}: {e}", self.port))
    }

    /// As [`Rpc::call`], answering a transport error (refused, reset, closed, timed out)
    /// instead of panicking on it, for a daemon that may be going away; the next call opens
    /// a new connection. Still panics on a non-200 HTTP status.
    pub fn try_call(&self, method: &str, params: Vec<Value>) -> io::Result<RpcResult> {
        let body = call_xml(method, params);
        let response = self.exchange(body.as_bytes())?;
        assert_eq!(
            response.status, 200,
            "{method} to 127.0.0.1:{} answered HTTP {}: {}",
            self.port, response.status, response.body
        );
        Ok(parse_response(&response.body))
    }

    /// Puts `value(i)` under `key(i)` for every `i` in `keys`, asserting each answers `"200"`;
    /// `when` says under which circumstances, for the failure message.
    pub fn put_keys(&self, keys: std::ops::Range<usize>, when: &str) {
        for i in keys {
            assert_eq!(
                self.put(&key(i), value(i)),
                ok200(),
                "put {} {when}",
                key(i)
            );
        }
    }

    /// As [`Self::put_keys`] with a node hung: a put the hung node was asked to coordinate
    /// before anything knew it hung answers 503 with its outcome unknown, and is written
    /// again, as that fault asks. Returns how many were.
    pub fn put_keys_with_a_hung_node(&self, keys: std::ops::Range<usize>, when: &str) -> usize {
        let mut unknown = 0;
        for i in keys {
            let put = self.put(&key(i), value(i));
            if is_outcome_unknown(&put) {
                unknown += 1;
                assert_eq!(self.put(&key(i), value(i)), ok200(), "put {} again", key(i));
            } else {
                assert_eq!(put, ok200(), "put {} {when}", key(i));
            }
        }
        unknown
    }

    /// `put(key, value)`.
    pub fn put(&self, key: &str, value: Value) -> RpcResult {
        self.call("put", vec![s(key), value])
    }

    /// `put(key, value, context)`.
    pub fn put_with_context(&self, key: &str, value: Value, context: &str) -> RpcResult {
        self.call("put", vec![s(key), value, s(context)])
    }

    /// `get(key)`.
    pub fn get(&self, key: &str) -> RpcResult {
        self.call("get", vec![s(key)])
    }

    /// `local.get(key)` on a storage node: its own copy, nil where it has none.
    pub fn local_get(&self, key: &str) -> RpcResult {
        self.call("local.get", vec![s(key)])
    }

    /// `local.put(key, value)` on a storage node: writes its own copy only.
    pub fn local_put(&self, key: &str, value: Value) -> RpcResult {
        self.call("local.put", vec![s(key), value])
    }

    /// `get_versions(key)`: `(values, context)`, or the fault.
    pub fn get_versions(&self, key: &str) -> Result<(Vec<Value>, String), (i32, String)> {
        let versions = self.call("get_versions", vec![s(key)])?;
        let values = array(member(&versions, "values")).to_vec();
        let context = string(member(&versions, "context")).to_owned();
        Ok((values, context))
    }

    /// `delete(key)`.
    pub fn delete(&self, key: &str) -> RpcResult {
        self.call("delete", vec![s(key)])
    }

    /// `delete(key, context)`.
    pub fn delete_with_context(&self, key: &str, context: &str) -> RpcResult {
        self.call("delete", vec![s(key), s(context)])
    }

    /// `stats()`, which must succeed.
    pub fn stats(&self) -> Value {
        self.call("stats", vec![])
            .unwrap_or_else(|fault| panic!("stats() on 127.0.0.1:{}: {fault:?}", self.port))
    }

    /// Sends one request on the kept-alive connection, opening one if needed. A connection
    /// the server closed while idle fails before any response byte; then (and only then)
    /// the request is sent once more on a new connection.
    fn exchange(&self, body: &[u8]) -> io::Result<HttpResponse> {
        let mut conn = self.conn.borrow_mut();
        let request = request_bytes("POST", &self.path, body, false);
        let reused = conn.is_some();
        match self.try_exchange(&mut conn, &request) {
            Ok(response) => Ok(response),
            Err(e) if reused && is_stale_connection(&e) => {
                *conn = None;
                self.try_exchange(&mut conn, &request)
            }
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }

    fn try_exchange(
        &self,
        conn: &mut Option<BufReader<TcpStream>>,
        request: &[u8],
    ) -> io::Result<HttpResponse> {
        if conn.is_none() {
            let stream = TcpStream::connect(("127.0.0.1", self.port))?;
            stream.set_read_timeout(Some(self.timeout))?;
            stream.set_write_timeout(Some(self.timeout))?;
            stream.set_nodelay(true)?;
            self.connections_opened
                .set(self.connections_opened.get() + 1);
            *conn = Some(BufReader::new(stream));
        }
        let reader = conn.as_mut().expect("connected above");
        if let Err(e) = reader.get_mut().write_all(request) {
            *conn = None;
            return Err(no_response(e.kind(), e));
        }
        let response = read_response(reader);
        match &response {
            Ok(r) if !r.close => {}
            _ => {
                if let Some(reader) = conn.take() {
                    let _ = reader.get_ref().shutdown(Shutdown::Both);
                }
            }
        }
        response
    }
}

/// Errors that mean "the server had already closed this idle connection": the connection
/// failed before any byte of a response came back.
fn is_stale_connection(e: &io::Error) -> bool {
    let before_response = e.get_ref().is_some_and(|inner| inner.is::<NoResponse>());
    before_response
        && matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe
        )
}

// ---------------------------------------------------------------------------------------------
// Reading stats() and placement
// ---------------------------------------------------------------------------------------------

/// An integer member of a struct (`stats()["keys"]`...).
pub fn int_member(value: &Value, name: &str) -> i64 {
    int(member(value, name))
}

/// One of a balancer's `stats()["counters"]` (`puts`, `gets`, `read_repairs`, `reaps`...).
pub fn balancer_counter(stats: &Value, name: &str) -> i64 {
    int(member(member(stats, "counters"), name))
}

/// One of a storage node's `stats()["anti_entropy"]` counters (`rounds`, `in_sync`...).
pub fn aae_counter(stats: &Value, name: &str) -> i64 {
    int(member(member(stats, "anti_entropy"), name))
}

/// What a balancer's `stats()` says of one server: its state (`"up"`, `"down"`,
/// `"mismatch"`) and its last error, if it reports one. Panics if the server is not listed.
pub fn server_state(stats: &Value, address: &str) -> (String, Option<String>) {
    let server = array(member(stats, "servers"))
        .iter()
        .find(|server| string(member(server, "address")) == address)
        .unwrap_or_else(|| panic!("{address} missing from stats {stats:?}"));
    let state = string(member(server, "state")).to_owned();
    let last_error = match server {
        Value::Struct(members) => members.get("last_error").map(|e| string(e).to_owned()),
        _ => None,
    };
    (state, last_error)
}

/// The addresses of `key`'s N replicas, coordinator first, as every balancer over
/// `servers` with N = `n` places it.
pub fn replicas_of(servers: &[String], key: &str, n: usize) -> Vec<String> {
    let layout = dynamite::layout::Layout::new(servers, n);
    layout
        .preference_list(key.as_bytes(), n)
        .into_iter()
        .map(|i| layout.servers()[i].clone())
        .collect()
}

/// Like [`wait_until`], for a check that explains itself: polls `check` until it returns
/// `Ok`; panics naming `what` and the last `Err` (what was still wrong) after `timeout`.
pub fn wait_until_ok(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(()) => return,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}; last seen: {last}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

// ---------------------------------------------------------------------------------------------
// Python and credentials
// ---------------------------------------------------------------------------------------------

/// Runs `python3 args...` (the script first), bounded by `timeout`, its output kept in
/// `dir` and printed; panics unless it exits 0.
pub fn run_python_script(dir: &Path, args: &[String], timeout: Duration) {
    let out = dir.join("python.stdout.log");
    let err = dir.join("python.stderr.log");
    let mut python = Command::new("python3")
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out).expect("log file"))
        .stderr(File::create(&err).expect("log file"))
        .spawn()
        .expect("python3 must be on PATH");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = python.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = python.kill();
            let _ = python.wait();
            break None;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    println!("python3 {args:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}");
    match status {
        None => panic!("python3 {args:?} still ran after {timeout:?}; killed"),
        Some(status) => assert!(status.success(), "python3 {args:?} failed: {status}"),
    }
}

/// A client of ours sending `user` and the first password of `password_file` (HTTP Basic).
pub fn password_client(user: &str, password_file: &Path) -> dynamite::rpc::client::RpcClient {
    let files = dynamite::security::SecurityFiles {
        auth_user: Some(user.to_owned()),
        auth_password_file: Some(password_file.to_owned()),
        ..Default::default()
    };
    let (security, _) = dynamite::security::Security::from_files(&files).expect("credentials");
    dynamite::rpc::client::RpcClient::with_outgoing(&security.outgoing)
}
