//! Stopping a daemon with SIGTERM or SIGINT, told as stories against the real binaries. The
//! contract (SPEC, *Security (v2)*): a daemon stops accepting, finishes what is in flight (at
//! most 5 s), syncs its storage and exits 0; nothing acknowledged is lost. A second signal
//! ends it at once; a signal while it starts ends it at once too, with status 0.
//!
//! Every stop is timed from the signal to the exit and held to [`EXIT_DEADLINE`]: a deadline
//! of the contract, not a speed claim.

mod common;

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::membership::{layout_of, placement, replicas};
use common::*;

/// What the daemons give requests in flight (5 s).
const DRAIN: Duration = dynamite::shutdown::DRAIN_TIMEOUT;
/// From the signal to the exit: [`DRAIN`] for what is in flight, then the storage sync and
/// the runtime's leftovers (1 s), and a second of slack for a loaded 2-core machine: 7 s.
const EXIT_DEADLINE: Duration = DRAIN
    .saturating_add(dynamite::runtime::LEFTOVER_TIMEOUT)
    .saturating_add(Duration::from_secs(1));
/// The balancers' replica timeout in these stories (`--timeout-ms`): a write acknowledged at
/// W = 2 may still be on its way to its third replica for this long.
const REPLICA_TIMEOUT: Duration = Duration::from_millis(2000);
/// N and W of the three-node stories (the daemons' defaults).
const REPLICAS: usize = 3;
const W: usize = 2;
/// How long a cluster may take to notice a node is gone or back, or hand off its hints.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the stories let clients write before and after a stop.
const LOAD_SPELL: Duration = Duration::from_secs(1);

/// The value every story writes under `key`.
fn value_of(key: &str) -> Value {
    s(&format!("{key}=v"))
}

/// Which signal a stop sends.
#[derive(Debug, Clone, Copy)]
enum Signal {
    Term,
    Int,
}

/// Stops `daemon` with `signal` and checks the contract's outcome: exit status 0, within
/// [`EXIT_DEADLINE`] of the signal. Answers how long it took.
fn stop_cleanly(daemon: &mut Daemon, signal: Signal) -> Duration {
    let began = Instant::now();
    let status = match signal {
        Signal::Term => daemon.terminate(),
        Signal::Int => daemon.interrupt(),
    };
    let took = began.elapsed();
    assert!(
        status.success(),
        "{signal:?}: the daemon exited with {status}\n{}",
        daemon.logs()
    );
    assert!(
        took < EXIT_DEADLINE,
        "{signal:?}: the daemon took {took:?} to exit, over the {EXIT_DEADLINE:?} deadline\n{}",
        daemon.logs()
    );
    eprintln!("{signal:?}: exited 0 after {took:?}");
    took
}

// ---------------------------------------------------------------------------------------------
// Clients writing as fast as they can
// ---------------------------------------------------------------------------------------------

/// What a writer saw.
#[derive(Default)]
struct Record {
    /// Every key acknowledged with `"200"`, with when the answer came.
    acked: Vec<(String, Instant)>,
    /// Calls answered with a fault.
    faults: Vec<(i32, String)>,
    /// Calls that failed in transport (refused, reset, closed, timed out), counted by kind.
    transport: BTreeMap<String, usize>,
    /// The longest one call took, answered or failed.
    slowest: Duration,
}

impl Record {
    fn merge(&mut self, other: Record) {
        self.acked.extend(other.acked);
        self.faults.extend(other.faults);
        for (kind, count) in other.transport {
            *self.transport.entry(kind).or_default() += count;
        }
        self.slowest = self.slowest.max(other.slowest);
    }
}

/// Client threads putting unique keys (`prefix-thread-i`), each over its own keep-alive
/// connection, as fast as they are answered, until [`Writers::finish`].
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Record>>,
}

impl Writers {
    /// `threads` clients calling `method(key, value)` (`put` on a balancer, `local.put` on a
    /// node) on the daemon at `port`.
    fn start(port: u16, method: &'static str, prefix: &str, threads: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let threads = (0..threads)
            .map(|t| {
                let (stop, acked) = (stop.clone(), acked.clone());
                let prefix = format!("{prefix}-{t}");
                std::thread::spawn(move || {
                    let rpc = Rpc::new(port);
                    let mut record = Record::default();
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let key = format!("{prefix}-{i:07}");
                        let began = Instant::now();
                        let answer = rpc.try_call(method, vec![s(&key), value_of(&key)]);
                        record.slowest = record.slowest.max(began.elapsed());
                        match answer {
                            Ok(Ok(value)) if value == s("200") => {
                                record.acked.push((key, Instant::now()));
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Ok(other)) => panic!("{method}({key}) answered {other:?}"),
                            Ok(Err(fault)) => record.faults.push(fault),
                            Err(error) => {
                                *record
                                    .transport
                                    .entry(format!("{:?}", error.kind()))
                                    .or_default() += 1;
                                // The daemon is gone or going: no spinning on refusals.
                                std::thread::sleep(Duration::from_millis(20));
                            }
                        }
                    }
                    record
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            threads,
        }
    }

    /// How many writes were acknowledged so far.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `count` writes in all were acknowledged.
    fn wait_for_acks(&self, count: usize) {
        wait_until(
            CONVERGENCE_TIMEOUT,
            &format!("{count} writes are acknowledged"),
            || self.acked() >= count,
        );
    }

    /// Stops the clients and answers what they saw together.
    fn finish(self) -> Record {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Record::default();
        for thread in self.threads {
            all.merge(
                thread
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p)),
            );
        }
        all
    }
}

/// How many of `replicas_of_key` hold `key`'s value, read with `local.get` on each; `nodes`
/// are clients of the storage nodes by address.
fn copies(nodes: &BTreeMap<String, Rpc>, replicas_of_key: &[String], key: &str) -> usize {
    replicas_of_key
        .iter()
        .filter(|address| {
            let node = nodes
                .get(*address)
                .unwrap_or_else(|| panic!("{address} is no node of the cluster"));
            node.local_get(key) == Ok(value_of(key))
        })
        .count()
}

/// How many of its replicas hold each key of `keys` (in order), under the cluster's layout as
/// its balancer has it; read with `local.get` on each, from a few threads.
fn count_copies(cluster: &Cluster, keys: &[(String, Instant)]) -> Vec<usize> {
    let layout = placement(&layout_of(&cluster.client()));
    let servers = cluster.servers();
    let chunk = keys.len().div_ceil(3).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .chunks(chunk)
            .map(|chunk| {
                let (layout, servers) = (&layout, &servers);
                scope.spawn(move || {
                    let nodes: BTreeMap<String, Rpc> = servers
                        .iter()
                        .map(|address| {
                            let port = address.rsplit(':').next().expect("port");
                            (address.clone(), Rpc::new(port.parse().expect("port")))
                        })
                        .collect();
                    chunk
                        .iter()
                        .map(|(key, _)| copies(&nodes, &replicas(layout, key), key))
                        .collect::<Vec<usize>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            })
            .collect()
    })
}

/// Reads every key of `keys` back through `lb`; answers those that do not read back.
fn unreadable(lb: &Rpc, keys: &[(String, Instant)]) -> Vec<String> {
    keys.iter()
        .filter_map(|(key, _)| {
            let got = lb.get(key);
            (got != Ok(value_of(key))).then(|| format!("{key}: {got:?}"))
        })
        .collect()
}

/// When `at` was, told from `signal`.
fn relative_to(at: Instant, signal: Instant) -> String {
    if at < signal {
        format!("{:?} before the signal", signal - at)
    } else {
        format!("{:?} after the signal", at - signal)
    }
}

/// Asserts `problems` is empty, showing the first few.
fn assert_none(problems: &[String], what: &str) {
    assert!(
        problems.is_empty(),
        "{} {what}, for instance: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// The stories
// ---------------------------------------------------------------------------------------------

/// Three durable nodes and a balancer, clients writing through the balancer and one writing
/// straight to a node's own copy; that node is SIGTERMed under the load. It exits 0 within the
/// deadline, writes go on at W = 2 while it is down, and once it is back: every write it
/// acknowledged itself is in its store, every write acknowledged before the signal is on all
/// three replicas, every other on at least two, and all of them read back.
#[test]
fn a_node_sigtermed_under_write_load_exits_0_and_keeps_every_acknowledged_write() {
    let mut cluster = Cluster::builder()
        .aae_off() // what is found on a node is what it kept, not what a peer repaired
        .timeout_ms(REPLICA_TIMEOUT.as_millis() as u64)
        .start();
    let victim = 2;
    let through_lb = Writers::start(cluster.balancer_port(0), "put", "lb", 3);
    let straight = Writers::start(cluster.nodes[victim].port(), "local.put", "own", 1);
    through_lb.wait_for_acks(100);
    straight.wait_for_acks(20);
    std::thread::sleep(LOAD_SPELL);
    // A write acknowledged at W = 2 may still be on its way to its third replica, for up to
    // the replica timeout: those acknowledged before `settled` are on all three by the signal.
    let settled = Instant::now();
    std::thread::sleep(REPLICA_TIMEOUT + Duration::from_millis(500));

    let signalled = Instant::now();
    stop_cleanly(&mut cluster.nodes[victim], Signal::Term);
    let acked_at_exit = through_lb.acked();
    std::thread::sleep(LOAD_SPELL);
    let acked_after_exit = through_lb.acked() - acked_at_exit;
    let own = straight.finish();
    let through = through_lb.finish();
    eprintln!(
        "through the balancer: {} acknowledged ({acked_after_exit} with the node down), {} \
         faults, slowest call {:?}; straight to the node: {} acknowledged, transport errors \
         {:?}",
        through.acked.len(),
        through.faults.len(),
        through.slowest,
        own.acked.len(),
        own.transport
    );
    assert!(
        acked_after_exit > 0,
        "writes go on at W = 2 with the node down; faults: {:?}",
        &through.faults[..through.faults.len().min(5)]
    );
    assert!(
        through.transport.is_empty(),
        "the balancer stayed up: {:?}",
        through.transport
    );
    assert!(
        through.slowest < EXIT_DEADLINE,
        "a client waited {:?} on the balancer",
        through.slowest
    );
    assert!(
        own.acked
            .iter()
            .any(|(_, at)| *at + LOAD_SPELL >= signalled),
        "the node was acknowledging its own writes in the second before the signal"
    );

    cluster.nodes[victim].restart();
    let node = cluster.node_client(victim);
    let lost: Vec<String> = own
        .acked
        .iter()
        .filter(|(key, _)| node.local_get(key) != Ok(value_of(key)))
        .map(|(key, at)| format!("{key} (acknowledged {})", relative_to(*at, signalled)))
        .collect();
    assert_none(
        &lost,
        "writes the node acknowledged are gone after its restart",
    );
    // Before any read through a balancer, which would repair what it finds missing.
    let found = count_copies(&cluster, &through.acked);
    let short: Vec<String> = through
        .acked
        .iter()
        .zip(found)
        .filter_map(|((key, at), found)| {
            let needed = if *at < settled { REPLICAS } else { W };
            (found < needed).then(|| {
                let when = relative_to(*at, signalled);
                format!("{key}: {found} copies, {needed} needed (acknowledged {when})")
            })
        })
        .collect();
    assert_none(&short, "acknowledged writes lack copies");
    assert_none(
        &unreadable(&cluster.client(), &through.acked),
        "acknowledged writes do not read back",
    );
}

/// Clients keep-alive connections to a balancer, writing without pause; the balancer is
/// SIGTERMed. It exits 0 within the deadline; a call in flight gets its answer or its
/// connection closes (refused or reset), none hangs and none is answered with a fault; and
/// every write acknowledged is on at least W = 2 replicas and reads back through a new
/// balancer.
#[test]
fn a_balancer_sigtermed_under_keep_alive_load_exits_0_and_loses_nothing() {
    let mut cluster = Cluster::builder()
        .aae_off()
        .timeout_ms(REPLICA_TIMEOUT.as_millis() as u64)
        .start();
    let writers = Writers::start(cluster.balancer_port(0), "put", "ka", 4);
    writers.wait_for_acks(100);
    std::thread::sleep(LOAD_SPELL);
    stop_cleanly(&mut cluster.balancers[0], Signal::Term);
    std::thread::sleep(Duration::from_millis(300));
    let record = writers.finish();
    eprintln!(
        "{} acknowledged, transport errors {:?}, slowest call {:?}",
        record.acked.len(),
        record.transport,
        record.slowest
    );
    assert!(
        record.faults.is_empty(),
        "every node was up: no write in flight fails with a fault: {:?}",
        &record.faults[..record.faults.len().min(5)]
    );
    let closed = [
        io::ErrorKind::ConnectionRefused,
        io::ErrorKind::ConnectionReset,
        io::ErrorKind::ConnectionAborted,
        io::ErrorKind::UnexpectedEof,
        io::ErrorKind::BrokenPipe,
    ]
    .map(|kind| format!("{kind:?}"));
    let unclean: Vec<&String> = record
        .transport
        .keys()
        .filter(|kind| !closed.contains(kind))
        .collect();
    assert!(
        unclean.is_empty(),
        "calls ended otherwise than answered or closed: {unclean:?}"
    );
    assert!(
        record.slowest < EXIT_DEADLINE,
        "a call hung for {:?}",
        record.slowest
    );

    cluster.balancers[0].restart();
    // The balancer answered at W = 2: a write's third copy may have been cut with it.
    let found = count_copies(&cluster, &record.acked);
    let cut = found.iter().filter(|&&found| found < REPLICAS).count();
    eprintln!(
        "{cut} of {} acknowledged writes have fewer than {REPLICAS} copies",
        found.len()
    );
    let short: Vec<String> = record
        .acked
        .iter()
        .zip(found)
        .filter(|&(_, found)| found < W)
        .map(|((key, _), found)| format!("{key}: {found} copies"))
        .collect();
    assert_none(&short, "acknowledged writes lack copies");
    assert_none(
        &unreadable(&cluster.client(), &record.acked),
        "acknowledged writes do not read back",
    );
}

/// Four durable nodes, N = 3, W = 2; one is killed, so the writes it should take wait at
/// fallbacks as hints. A fallback holding hints is stopped with SIGINT (Ctrl-C): it exits 0
/// within the deadline, comes back with every hint it held, and once the dead node returns the
/// hints are handed off and the node holds every key it replicates.
#[test]
fn a_fallback_siginted_keeps_its_hints_and_hands_them_off_later() {
    let mut cluster = Cluster::builder()
        .nodes(4)
        .replicas(3)
        .write_quorum(2)
        .aae_off()
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let layout = placement(&layout_of(&lb));
    let dead = 1;
    let x = servers[dead].clone();
    let keys: Vec<String> = (0..200).map(|i| format!("hinted-{i:04}")).collect();
    let owned_by_x: Vec<&String> = keys
        .iter()
        .filter(|key| replicas(&layout, key).contains(&x))
        .collect();
    assert!(!owned_by_x.is_empty(), "X replicates none of the keys");

    cluster.nodes[dead].kill();
    // A read that involves X makes the balancer notice it is gone.
    let probe = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|key| replicas(&layout, key).contains(&x))
        .expect("some key lives on X");
    assert_eq!(lb.get(&probe), Ok(Value::Nil));
    wait_until(CONVERGENCE_TIMEOUT, "X is shown down", || {
        server_state(&lb.stats(), &x).0 == "down"
    });
    for key in &keys {
        assert_eq!(lb.put(key, value_of(key)), ok200(), "put {key} with X dead");
    }
    let live = [0, 2, 3];
    let ports = cluster.node_ports();
    let hints_of = |i: usize| int_member(&Rpc::new(ports[i]).stats(), "hints");
    wait_until(
        CONVERGENCE_TIMEOUT,
        &format!("the live nodes hold {} hints for X", owned_by_x.len()),
        || live.iter().map(|&i| hints_of(i)).sum::<i64>() == owned_by_x.len() as i64,
    );
    let held: BTreeMap<usize, i64> = live.iter().map(|&i| (i, hints_of(i))).collect();
    let (&fallback, &hints) = held
        .iter()
        .max_by_key(|(_, hints)| **hints)
        .expect("live nodes");
    assert!(hints > 0, "no fallback holds a hint: {held:?}");

    stop_cleanly(&mut cluster.nodes[fallback], Signal::Int);
    cluster.nodes[fallback].restart();
    assert_eq!(
        hints_of(fallback),
        hints,
        "the fallback's hints after its stop and start"
    );

    cluster.nodes[dead].restart();
    wait_until(CONVERGENCE_TIMEOUT, "every hint is handed off", || {
        (0..4).all(|i| hints_of(i) == 0)
    });
    let node_x = cluster.node_client(dead);
    for key in owned_by_x {
        assert_eq!(
            node_x.local_get(key),
            Ok(value_of(key)),
            "X's own copy of {key}"
        );
    }
}

/// A request whose body is still coming when the node is SIGTERMed is finished and answered;
/// the node exits 0 within the deadline, and what it acknowledged is there after a restart.
#[test]
fn a_request_in_flight_at_sigterm_is_finished_and_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = durable_node(dir.path());
    let mut slow = SlowCall::begin(node.port(), "local.put", "in-flight");

    let signalled = Instant::now();
    node.signal("-TERM");
    wait_until(DRAIN, "the node says it is stopping", || {
        node.logs().contains("stopping:")
    });
    let answer = slow.finish();
    assert_eq!(answer, ok200(), "the call in flight is answered");
    let status = node.wait_exit("-TERM");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}\n{}", node.logs());
    assert!(took < EXIT_DEADLINE, "exited {took:?} after SIGTERM");

    node.restart();
    assert_eq!(node.rpc().local_get("in-flight"), Ok(value_of("in-flight")));
}

/// A request that never finishes does not hold a SIGTERMed node past the deadline: it gets
/// its 5 s, then the node syncs and exits 0 all the same.
#[test]
fn a_request_that_never_finishes_does_not_hold_the_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = durable_node(dir.path());
    put_own_keys(&node, 10);
    let _stuck = SlowCall::begin(node.port(), "local.put", "never-finished");
    stop_cleanly(&mut node, Signal::Term);
    node.restart();
    for i in 0..10 {
        assert_eq!(node.rpc().local_get(&key(i)), Ok(value(i)), "{}", key(i));
    }
}

/// While a node waits for a request in flight after SIGTERM, a second signal (SIGINT) ends
/// it at once, with status 128 + 2 as a shell reports Ctrl-C, and says so; what it
/// acknowledged is there after a restart.
#[test]
fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node = durable_node(dir.path());
    put_own_keys(&node, 10);
    let _stuck = SlowCall::begin(node.port(), "local.put", "never-finished");

    let first = Instant::now();
    node.signal("-TERM");
    wait_until(DRAIN, "the node says it is stopping", || {
        node.logs().contains("stopping:")
    });
    assert!(node.is_running(), "the node waits for the call in flight");
    node.signal("-INT");
    let status = node.wait_exit("-INT");
    let took = first.elapsed();
    assert_eq!(
        status.code(),
        Some(130),
        "exit status {status}\n{}",
        node.logs()
    );
    assert!(
        took < DRAIN,
        "the second signal ended the node {took:?} after the first, not at once"
    );
    assert!(node.logs().contains("second signal"), "{}", node.logs());

    node.restart();
    for i in 0..10 {
        assert_eq!(node.rpc().local_get(&key(i)), Ok(value(i)), "{}", key(i));
    }
}

/// A balancer SIGTERMed while it starts (learning the layout from seeds that do not answer,
/// which it waits for a while) exits 0 at once, instead of dying of the signal.
#[test]
fn a_signal_while_starting_exits_0_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let seeds = [free_port(), free_port()];
    let mut args: Vec<String> = Vec::new();
    for seed in seeds {
        args.extend(["-s".to_owned(), addr(seed)]);
    }
    args.extend([
        "-p".to_owned(),
        port.to_string(),
        "--bind".to_owned(),
        "127.0.0.1".to_owned(),
    ]);
    // The log goes to stderr.
    let log = dir.path().join("balancer.log");
    let mut balancer = Reaped(
        Command::new(LOAD_BALANCER)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("balancer.out")).expect("log file"),
            ))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn load_balancer"),
    );
    // Listening (the port is bound before it asks its seeds), and not serving yet.
    wait_until(STARTUP_TIMEOUT, "the balancer listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &balancer.0.id().to_string()])
        .status()
        .expect("run kill(1)");
    assert!(kill.success());
    let status = balancer.wait(EXIT_TIMEOUT);
    let took = signalled.elapsed();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit status {status}\n{logged}");
    assert!(
        logged.contains("before serving"),
        "it stopped while starting: {logged}"
    );
    assert!(took < EXIT_DEADLINE, "exited {took:?} after SIGTERM");
}

// ---------------------------------------------------------------------------------------------
// Helpers of the single-node stories
// ---------------------------------------------------------------------------------------------

/// A durable storage node alone, on a data directory in `dir`.
fn durable_node(dir: &std::path::Path) -> Daemon {
    let data_dir = dir.join("node").to_string_lossy().into_owned();
    Daemon::storage_node(
        dir,
        "node",
        free_port(),
        &["--data-dir".to_owned(), data_dir],
    )
}

/// Puts `key(i) = value(i)` for `i` below `count` into `node`'s own copy (`local.put`: a
/// node alone has no layout to coordinate a `put` with).
fn put_own_keys(node: &Daemon, count: usize) {
    let rpc = node.rpc();
    for i in 0..count {
        assert_eq!(
            rpc.local_put(&key(i), value(i)),
            ok200(),
            "local.put {}",
            key(i)
        );
    }
}

/// An XML-RPC call whose body is sent in two halves: the headers and the first half at
/// [`SlowCall::begin`], the rest at [`SlowCall::finish`] (or never).
struct SlowCall {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl SlowCall {
    /// Sends `method(key, value_of(key))`'s headers, asking to be told to go on (`Expect:
    /// 100-continue`), which the server does once its handler reads the body: from then on
    /// the call is in flight; then sends half the body.
    fn begin(port: u16, method: &str, key: &str) -> SlowCall {
        let body = call_xml(method, vec![s(key), value_of(key)]).into_bytes();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/xml\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(RPC_TIMEOUT))
            .expect("read timeout");
        stream.write_all(head.as_bytes()).expect("send the headers");
        let interim = read_head(&mut stream);
        assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
        let half = body.len() / 2;
        stream.write_all(&body[..half]).expect("send half the body");
        SlowCall {
            stream,
            rest: body[half..].to_vec(),
        }
    }

    /// Sends the rest of the body and answers the call's result.
    fn finish(&mut self) -> RpcResult {
        self.stream.write_all(&self.rest).expect("send the rest");
        let mut response = Vec::new();
        self.stream
            .read_to_end(&mut response)
            .expect("read the response");
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        parse_response(body)
    }
}

/// Reads a response's status line and headers, up to the empty line.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("read a response head");
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A child process killed and reaped on drop, unless it exited.
struct Reaped(Child);

impl Reaped {
    /// Waits until it exits, at most `timeout`; panics (killing it) after that.
    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running {timeout:?} after the signal"
            );
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
