//! A replica operation that reaches its node late must not erase writes acknowledged meanwhile.
//!
//! The story, from a partition test: three durable nodes that know their peers, a balancer with
//! N=3 R=2 W=2, and a client making blind puts (`put(key, "key=SEQ")`, no context) of one key,
//! one after the other. The put of seq 32 leaves the balancer, as a "coordinate" operation in a
//! binary batch on `POST /internal/batch`, for n1, the key's first preferred replica, just as
//! n1's link drops. The balancer waits one `--timeout-ms` on n1 and marks it down (it then had
//! n2 coordinate the put instead; today it tells the client the put may or may not have been
//! applied); seqs 33 to 230 are acknowledged by n2 and n3. The kernel keeps
//! retransmitting the abandoned request, so it reaches n1 after the link is back and after
//! anti-entropy has already brought n1 up to date. n1 runs it as a fresh blind put, which
//! supersedes everything n1 holds (230 included); anti-entropy copies that to n2 and n3, and
//! every replica ends up holding `key=32` only: 198 acknowledged writes are gone.
//!
//! Here the link is a TCP proxy in the test process ([`LinkProxy`]), between n1 and everyone
//! who talks to it. n1 advertises the proxy's address, and the balancer and the other nodes
//! name n1 by it, so every daemon builds the same ring (n1's own `-s` names n2 and n3
//! directly, so n1's own anti-entropy rounds go around the proxy). The proxy can *cut* the
//! link (bytes are read and held, nothing is forwarded and nothing is reset, as with a link
//! dropping packets that TCP will retransmit), *heal* it for new connections, and *release*
//! what it held, which delivers the late request to n1 exactly as a retransmission would,
//! even though the balancer has long closed its end.
//!
//! Both tests only use the daemons' public XML-RPC interface and the real binaries, so they
//! say what must hold, not how: a late operation must not undo acknowledged writes, whether
//! it arrives after the coordinator gave up on it or before.

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// How long a node may take to be seen up again by the balancer.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long anti-entropy may take to bring a node up to date, or to run a few rounds.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long n1 may take to answer the requests the proxy held, once they are delivered.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Anti-entropy interval of every node: short, so that the test is quick.
const AAE_INTERVAL_MS: u64 = 200;
/// Anti-entropy rounds every node must run after the late operation was applied, before the
/// test looks: enough for a change on one node to reach both others.
const AAE_ROUNDS_AFTER: i64 = 3;

// ---------------------------------------------------------------------------------------------
// The link: a TCP proxy that can drop packets for a while, then deliver them late
// ---------------------------------------------------------------------------------------------

/// How long a proxy thread blocks in a read before it looks at the proxy's state again.
const PUMP_TICK: Duration = Duration::from_millis(25);
/// How long a released connection's side towards n1 stays open waiting for n1's reply (the
/// test's own wait, [`REPLY_TIMEOUT`], is shorter).
const REPLY_WAIT: Duration = Duration::from_secs(60);
/// Bound on one write to a socket, so that no proxy thread can block forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP proxy on 127.0.0.1 in front of one node ("upstream"). Each accepted connection gets
/// a connection to the node and two threads pumping bytes, one each way.
///
/// - [`LinkProxy::cut`]: from then on, the bytes of every existing connection and of every
///   connection accepted meanwhile are read and held, in both directions; nothing is reset,
///   and a client closing its end is not passed on either.
/// - [`LinkProxy::heal`]: connections accepted from then on are forwarded normally; the ones
///   held during the cut keep holding (their packets are still "in the network").
/// - [`LinkProxy::release`]: the held bytes are delivered, and those connections forward
///   normally from then on. One whose client has closed meanwhile stays open towards the node
///   until the node has answered (or closed it, or [`REPLY_WAIT`] passed), as the node's kernel
///   would have received the retransmitted request and the node answered it; the client's
///   close is not passed on before, since a server may drop a request whose connection
///   closes. [`LinkProxy::wait_for_replies`] waits for those answers.
///
/// Dropping it stops and joins every thread.
struct LinkProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

struct ProxyShared {
    upstream_port: u16,
    stopping: AtomicBool,
    links: Mutex<Links>,
    pumps: Mutex<Vec<JoinHandle<()>>>,
}

/// Every connection the proxy accepted, and whether the link is cut (under one lock, so that a
/// connection accepted during a cut is held from its first byte).
#[derive(Default)]
struct Links {
    cut: bool,
    all: Vec<Arc<Link>>,
}

/// One proxied connection: `client` is the side that connected to the proxy, `server` the
/// proxy's connection to the node.
struct Link {
    id: usize,
    client: TcpStream,
    server: TcpStream,
    state: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// Bytes are held instead of forwarded.
    held: bool,
    /// Held bytes from the client, not yet delivered to the node.
    to_server: Vec<u8>,
    /// Held bytes from the node, not yet delivered to the client.
    to_client: Vec<u8>,
    /// The client closed its end (or failed).
    client_closed: bool,
    /// When held bytes were delivered to the node, while no reply has come back yet.
    awaiting_reply: Option<Instant>,
    /// The first line of the request a release delivered, for messages.
    released: Option<String>,
    /// What the node did with the bytes a release delivered, once it did something.
    outcome: Option<Outcome>,
}

/// What the node did with a request delivered late.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// It answered (whatever the answer).
    Answered,
    /// It closed the connection without answering: it is done with the request too.
    Closed,
    /// The proxy could not deliver the bytes, or the node did nothing for [`REPLY_WAIT`].
    Failed(String),
}

/// A request the proxy held during a cut and delivered at a release.
#[derive(Debug, Clone)]
struct Released {
    link: usize,
    /// Its first line, e.g. `POST /internal/batch HTTP/1.1`.
    request_line: String,
    /// Whether the client had closed its end before the release (it gave up on the request).
    client_gone: bool,
}

impl Released {
    /// A batch of replica operations from the balancer (a put's coordinate operation travels
    /// in one).
    fn is_batch(&self) -> bool {
        is_batch_line(&self.request_line)
    }
}

fn is_batch_line(line: &str) -> bool {
    line.starts_with("POST /internal/batch ")
}

/// The first line of some HTTP request bytes, for messages.
fn request_line(bytes: &[u8]) -> String {
    let end = bytes
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .unwrap_or(bytes.len())
        .min(120);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl LinkProxy {
    /// A proxy on a free port of 127.0.0.1 forwarding to 127.0.0.1:`upstream_port` (which need
    /// not listen yet: the proxy connects for each connection it accepts).
    fn start(upstream_port: u16) -> LinkProxy {
        // Bound once and held for the whole test, so a port the kernel picks is safe here
        // (the harness's `free_port` is for daemons that give their port up to restart).
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        let port = listener.local_addr().expect("the proxy's address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let shared = Arc::new(ProxyShared {
            upstream_port,
            stopping: AtomicBool::new(false),
            links: Mutex::default(),
            pumps: Mutex::default(),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || shared.accept_loop(&listener))
        };
        LinkProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// `127.0.0.1:PORT`: the address everyone but the node itself uses for it.
    fn addr(&self) -> String {
        addr(self.port)
    }

    /// Drops the link: every byte from now on is held, on every connection.
    fn cut(&self) {
        let mut links = lock(&self.shared.links);
        links.cut = true;
        for link in &links.all {
            lock(&link.state).held = true;
        }
    }

    /// Restores the link for new connections; the held ones keep holding.
    fn heal(&self) {
        lock(&self.shared.links).cut = false;
    }

    /// The first lines of the requests held right now, for the node.
    fn held_requests(&self) -> Vec<String> {
        let links = lock(&self.shared.links);
        links
            .all
            .iter()
            .filter_map(|link| {
                let state = lock(&link.state);
                (state.held && !state.to_server.is_empty()).then(|| request_line(&state.to_server))
            })
            .collect()
    }

    /// Delivers everything held, both ways, and forwards those connections normally from
    /// now on. Returns what was delivered to the node.
    fn release(&self) -> Vec<Released> {
        let links = lock(&self.shared.links);
        let mut released = Vec::new();
        for link in &links.all {
            let mut state = lock(&link.state);
            if !state.held {
                continue;
            }
            state.held = false;
            let to_server = std::mem::take(&mut state.to_server);
            if !to_server.is_empty() {
                let line = request_line(&to_server);
                state.released = Some(line.clone());
                match (&link.server).write_all(&to_server) {
                    Ok(()) => state.awaiting_reply = Some(Instant::now()),
                    Err(error) => {
                        state.outcome = Some(Outcome::Failed(format!(
                            "delivering the held bytes failed: {error}"
                        )))
                    }
                }
                released.push(Released {
                    link: link.id,
                    request_line: line,
                    client_gone: state.client_closed,
                });
            }
            let to_client = std::mem::take(&mut state.to_client);
            if !to_client.is_empty() && !state.client_closed {
                let _ = (&link.client).write_all(&to_client);
            }
            if state.client_closed && state.awaiting_reply.is_none() {
                // Nothing to wait for: pass the client's close on.
                let _ = link.server.shutdown(Shutdown::Both);
            }
        }
        released
    }

    /// Waits until the node has dealt with every request in `released` (answered it, or
    /// closed its connection); panics, naming the ones still waiting, after `timeout`.
    fn wait_for_replies(&self, released: &[Released], timeout: Duration) {
        wait_until_ok(
            timeout,
            "n1 answered every request the proxy held and released",
            || {
                let links = lock(&self.shared.links);
                let mut waiting = Vec::new();
                for request in released {
                    let state = lock(&links.all[request.link].state);
                    match &state.outcome {
                        Some(Outcome::Failed(reason)) => panic!(
                            "n1 never answered the released {:?}: {reason}",
                            request.request_line
                        ),
                        Some(_) => {}
                        None => waiting.push(request.request_line.clone()),
                    }
                }
                if waiting.is_empty() {
                    Ok(())
                } else {
                    Err(format!("no reply yet to {waiting:?}"))
                }
            },
        );
    }

    /// One line per connection, for a failing test's output.
    fn summary(&self) -> String {
        let links = lock(&self.shared.links);
        let mut out = format!("proxy 127.0.0.1:{} (cut: {}):\n", self.port, links.cut);
        for link in &links.all {
            let state = lock(&link.state);
            out.push_str(&format!(
                "  link {}: held {}, {} bytes held for n1 ({:?}), {} for the client, client \
                 closed {}, released {:?}, n1's reply to it {:?}\n",
                link.id,
                state.held,
                state.to_server.len(),
                request_line(&state.to_server),
                state.to_client.len(),
                state.client_closed,
                state.released,
                state.outcome
            ));
        }
        out
    }
}

impl ProxyShared {
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn accept_loop(self: &Arc<Self>, listener: &TcpListener) {
        while !self.stopping() {
            let client = match listener.accept() {
                Ok((client, _)) => client,
                Err(error) if is_timeout(&error) => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(error) => {
                    // Out of file descriptors and the like: the client will time out.
                    eprintln!("the proxy's accept failed: {error}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            // The node down: the client sees its connection closed, as with a refused one.
            let Ok(server) = TcpStream::connect(("127.0.0.1", self.upstream_port)) else {
                continue;
            };
            for stream in [&client, &server] {
                stream.set_nonblocking(false).expect("blocking socket");
                stream.set_nodelay(true).expect("TCP_NODELAY");
                stream
                    .set_read_timeout(Some(PUMP_TICK))
                    .expect("read timeout");
                stream
                    .set_write_timeout(Some(WRITE_TIMEOUT))
                    .expect("write timeout");
            }
            let link = {
                let mut links = lock(&self.links);
                let link = Arc::new(Link {
                    id: links.all.len(),
                    client,
                    server,
                    state: Mutex::new(LinkState {
                        held: links.cut,
                        ..LinkState::default()
                    }),
                });
                links.all.push(link.clone());
                link
            };
            let mut pumps = lock(&self.pumps);
            for towards_server in [true, false] {
                let (shared, link) = (self.clone(), link.clone());
                pumps.push(std::thread::spawn(move || {
                    if towards_server {
                        link.pump_to_server(&shared);
                    } else {
                        link.pump_to_client(&shared);
                    }
                }));
            }
        }
    }
}

impl Link {
    /// Client → node.
    fn pump_to_server(&self, shared: &ProxyShared) {
        let mut buffer = vec![0u8; 64 * 1024];
        while !shared.stopping() {
            let read = match (&self.client).read(&mut buffer) {
                Err(error) if is_timeout(&error) => continue,
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut state = lock(&self.state);
            if read == 0 {
                state.client_closed = true;
                // A held close stays held; a released request's close waits for its reply
                // (see `pump_to_client`), since the node could drop a request whose
                // connection closed under it.
                if !state.held && state.awaiting_reply.is_none() {
                    let _ = self.server.shutdown(Shutdown::Write);
                }
                return;
            }
            if state.held {
                state.to_server.extend_from_slice(&buffer[..read]);
            } else if (&self.server).write_all(&buffer[..read]).is_err() {
                return;
            }
        }
    }

    /// Node → client; also notices the node's replies to released bytes, and closes the
    /// connection once nobody needs it.
    fn pump_to_client(&self, shared: &ProxyShared) {
        let mut buffer = vec![0u8; 64 * 1024];
        while !shared.stopping() {
            {
                let mut state = lock(&self.state);
                if state.client_closed && !state.held && state.awaiting_reply.is_none() {
                    break;
                }
                if let Some(since) = state.awaiting_reply
                    && since.elapsed() > REPLY_WAIT
                {
                    state.awaiting_reply = None;
                    state.outcome =
                        Some(Outcome::Failed(format!("no reply within {REPLY_WAIT:?}")));
                    break;
                }
            }
            let read = match (&self.server).read(&mut buffer) {
                Err(error) if is_timeout(&error) => continue,
                Ok(0) | Err(_) => 0,
                Ok(n) => n,
            };
            let mut state = lock(&self.state);
            if read == 0 {
                if state.awaiting_reply.take().is_some() {
                    state.outcome = Some(Outcome::Closed);
                }
                // While held, the close is in the network too: wait for the release.
                while state.held && !shared.stopping() {
                    drop(state);
                    std::thread::sleep(PUMP_TICK);
                    state = lock(&self.state);
                }
                break;
            }
            if state.awaiting_reply.take().is_some() {
                state.outcome = Some(Outcome::Answered);
            }
            if state.held {
                state.to_client.extend_from_slice(&buffer[..read]);
            } else if !state.client_closed {
                let _ = (&self.client).write_all(&buffer[..read]);
            }
        }
        let _ = self.server.shutdown(Shutdown::Both);
        let _ = self.client.shutdown(Shutdown::Both);
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.summary());
        }
        self.shared.stopping.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let pumps = std::mem::take(&mut *lock(&self.shared.pumps));
        for pump in pumps {
            let _ = pump.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster: n1 behind the proxy, n2 and n3 direct
// ---------------------------------------------------------------------------------------------

/// Three durable storage nodes and a balancer N=3 R=2 W=2; n1 is reached through `proxy`
/// by the balancer and by n2 and n3.
struct ProxiedCluster {
    /// Declared first: its threads stop before the daemons are killed.
    proxy: LinkProxy,
    /// n1, n2, n3.
    nodes: Vec<Daemon>,
    balancer: Daemon,
    /// How every daemon names n1, n2, n3: the proxy's address for n1.
    servers: Vec<String>,
    // Declared last: dropped after the daemons, which log into it.
    _dir: tempfile::TempDir,
}

impl ProxiedCluster {
    /// With n1's wall clock `n1_skew_s` seconds off the machine's (0: untouched).
    fn start(timeout_ms: u64, n1_skew_s: i64) -> ProxiedCluster {
        let dir = tempfile::Builder::new()
            .prefix("dynamite-late-write-")
            .tempdir()
            .expect("create temp dir");
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let proxy = LinkProxy::start(ports[0]);
        let servers = vec![proxy.addr(), addr(ports[1]), addr(ports[2])];
        let direct: Vec<String> = ports.iter().map(|&p| addr(p)).collect();
        let aae_interval = AAE_INTERVAL_MS.to_string();

        let mut nodes = Vec::new();
        for (i, &port) in ports.iter().enumerate() {
            let data_dir = dir.path().join(format!("n{}", i + 1));
            let mut args: Vec<String> = vec![
                "--data-dir".into(),
                data_dir.to_string_lossy().into_owned(),
                "-N".into(),
                "3".into(),
                "--aae-interval-ms".into(),
                aae_interval.clone(),
            ];
            if i == 0 {
                args.extend(["--advertise".into(), proxy.addr()]);
            }
            // n1 reaches its peers directly; they reach n1 through the proxy.
            for (j, peer) in servers.iter().enumerate() {
                if j != i {
                    let peer = if i == 0 { &direct[j] } else { peer };
                    args.extend(["-s".into(), peer.clone()]);
                }
            }
            let name = format!("n{}", i + 1);
            nodes.push(if i == 0 && n1_skew_s != 0 {
                Daemon::storage_node_with_clock(dir.path(), &name, port, &args, n1_skew_s)
            } else {
                Daemon::storage_node(dir.path(), &name, port, &args)
            });
        }
        let timeout_ms = timeout_ms.to_string();
        let balancer_args =
            ["-N", "3", "-R", "2", "-W", "2", "--timeout-ms", &timeout_ms].map(str::to_owned);
        let balancer = Daemon::load_balancer(
            dir.path(),
            "balancer",
            free_port(),
            &servers,
            &balancer_args,
        );
        let cluster = ProxiedCluster {
            proxy,
            nodes,
            balancer,
            servers,
            _dir: dir,
        };

        // Every daemon built the same ring, so the balancer uses n1 and anti-entropy runs.
        let lb = cluster.balancer.rpc();
        let ring = string(member(&lb.stats(), "ring")).to_owned();
        for (i, node) in cluster.node_clients().iter().enumerate() {
            let stats = node.stats();
            assert_eq!(
                string(member(&stats, "ring")),
                ring,
                "n{}'s ring differs from the balancer's",
                i + 1
            );
        }
        for address in &cluster.servers {
            assert_eq!(
                server_state(&lb.stats(), address).0,
                "up",
                "{address} at start"
            );
        }
        cluster
    }

    /// Clients of n1, n2, n3 on their own ports (not through the proxy), for their own copies.
    fn node_clients(&self) -> Vec<Rpc> {
        self.nodes.iter().map(Daemon::rpc).collect()
    }

    /// A key whose preference list starts with n1: n1 coordinates its puts while it keeps up.
    fn key_coordinated_by_n1(&self) -> String {
        (0..)
            .map(|i| format!("key-{i}"))
            .find(|key| replicas_of(&self.servers, key, 3)[0] == self.servers[0])
            .expect("some key has n1 first")
    }

    fn n1_state(&self, lb: &Rpc) -> String {
        server_state(&lb.stats(), &self.servers[0]).0
    }

    /// Waits until n1's own copy of `key` is `value`.
    fn wait_for_n1_copy(&self, key: &str, value: &str, why: &str) {
        let n1 = self.nodes[0].rpc();
        wait_until_ok(
            CONVERGENCE_TIMEOUT,
            &format!("n1's own copy of {key} is {value:?} ({why})"),
            || match n1.local_get(key) {
                Ok(Value::String(held)) if held == value => Ok(()),
                other => Err(format!("n1 holds {}", show(&other))),
            },
        );
    }

    /// Waits until every node has started `rounds` more anti-entropy rounds (one exchange
    /// with each of its two peers per round) than now.
    fn wait_for_aae_rounds(&self, rounds: i64) {
        const EXCHANGES_PER_ROUND: i64 = 2;
        let nodes = self.node_clients();
        let counts = || -> Vec<i64> {
            nodes
                .iter()
                .map(|node| aae_counter(&node.stats(), "rounds"))
                .collect()
        };
        let since = counts();
        wait_until_ok(
            CONVERGENCE_TIMEOUT,
            &format!("every node ran {rounds} more anti-entropy rounds"),
            || {
                let now = counts();
                if now
                    .iter()
                    .zip(&since)
                    .all(|(now, since)| *now >= since + rounds * EXCHANGES_PER_ROUND)
                {
                    Ok(())
                } else {
                    Err(format!("exchanges started: {since:?} then, {now:?} now"))
                }
            },
        );
    }

    /// What the balancer and every node answer for `key`, for failure messages.
    fn observe(&self, key: &str) -> Observed {
        let lb = self.balancer.rpc();
        Observed {
            get: lb.get(key),
            versions: lb.get_versions(key).map(|(values, _)| values),
            copies: self
                .node_clients()
                .iter()
                .map(|node| node.local_get(key))
                .collect(),
        }
    }
}

/// What a reader sees of one key.
struct Observed {
    /// The balancer's `get`.
    get: RpcResult,
    /// The balancer's `get_versions` values.
    versions: Result<Vec<Value>, (i32, String)>,
    /// n1's, n2's and n3's own copies.
    copies: Vec<RpcResult>,
}

impl Observed {
    /// Asserts that the balancer's `get` and every node's own copy show `last`, the last
    /// acknowledged put; `story` says what happened, for the message.
    fn assert_last_survives(&self, last: &str, story: &str) {
        assert_eq!(
            self.get,
            Ok(s(last)),
            "the balancer's get lost the last acknowledged put ({last:?}): {story}"
        );
        for (i, copy) in self.copies.iter().enumerate() {
            assert_eq!(
                copy,
                &Ok(s(last)),
                "n{}'s own copy lost the last acknowledged put: {story}",
                i + 1
            );
        }
    }
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions = match &self.versions {
            Ok(values) => format!(
                "[{}]",
                values
                    .iter()
                    .map(|v| show(&Ok(v.clone())))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(fault) => format!("fault {fault:?}"),
        };
        write!(
            f,
            "balancer get {}, get_versions {versions}; own copies: n1 {}, n2 {}, n3 {}",
            show(&self.get),
            show(&self.copies[0]),
            show(&self.copies[1]),
            show(&self.copies[2])
        )
    }
}

/// A value as a reader would print it: the string itself, `nil`, or the fault.
fn show(result: &RpcResult) -> String {
    match result {
        Ok(Value::String(text)) => format!("{text:?}"),
        Ok(Value::Nil) => "nil".into(),
        Ok(other) => format!("{other:?}"),
        Err(fault) => format!("fault {fault:?}"),
    }
}

/// The requests a release delivered, for messages.
fn describe(released: &[Released]) -> String {
    let lines: Vec<String> = released
        .iter()
        .map(|r| {
            let client = if r.client_gone {
                "its sender gone"
            } else {
                "its sender waiting"
            };
            format!("{} ({client})", r.request_line)
        })
        .collect();
    lines.join(", ")
}

/// What the client writes at `seq`.
fn seq_value(key: &str, seq: u32) -> String {
    format!("{key}={seq}")
}

fn put_seq(lb: &Rpc, key: &str, seq: u32, when: &str) {
    assert_eq!(
        lb.put(key, s(&seq_value(key, seq))),
        ok200(),
        "put of seq {seq} {when}"
    );
}

// ---------------------------------------------------------------------------------------------
// The stories
// ---------------------------------------------------------------------------------------------

/// The partition test's story: a put abandoned by the balancer after `--timeout-ms` (the
/// client told its outcome is unknown) reaches n1 long after, once n1 is back and up to date.
/// The client was told about seqs 33 to 230 in that order; a request the cluster gave up on
/// must not roll the key back to 32 when it finally arrives.
#[test]
fn a_put_that_reaches_its_coordinator_after_the_deadline_does_not_erase_later_writes() {
    late_after_the_deadline(0);
}

/// The same story with n1's clock 5 s behind the balancer's: read on n1's clock as it was
/// sent, the deadline would still be seconds away when the late request arrives. Deadlines
/// travel in the receiver's clock, so n1 refuses it all the same.
#[test]
fn a_node_whose_clock_is_behind_still_refuses_a_late_put() {
    if !faketime_or_skip("a_node_whose_clock_is_behind_still_refuses_a_late_put") {
        return;
    }
    late_after_the_deadline(-5);
}

fn late_after_the_deadline(n1_skew_s: i64) {
    const LATE: u32 = 32;
    const LAST: u32 = 230;
    let cluster = ProxiedCluster::start(1000, n1_skew_s);
    let lb = cluster.balancer.rpc();
    let key = cluster.key_coordinated_by_n1();
    let last = seq_value(&key, LAST);

    let switches = || balancer_counter(&lb.stats(), "coordinator_switches");
    for seq in 1..LATE {
        put_seq(&lb, &key, seq, "before the cut");
    }
    let switches_before = switches();

    // n1's link drops as the put of 32 leaves for n1, its coordinator. The balancer waits one
    // timeout on n1, marks it down, and tells the client the put may or may not have been
    // applied: n1 took it, and another coordinator could make a second version of it.
    cluster.proxy.cut();
    let put = lb.put(&key, s(&seq_value(&key, LATE)));
    assert!(
        is_outcome_unknown(&put),
        "put of seq {LATE} while n1's link is cut: {put:?}"
    );
    assert_eq!(
        switches(),
        switches_before,
        "the put of seq {LATE} went to n1 first, its first preferred replica, not lagging"
    );
    assert_eq!(
        cluster.n1_state(&lb),
        "down",
        "the put of seq {LATE} timed out on n1"
    );
    let held = cluster.proxy.held_requests();
    assert!(
        held.iter().any(|line| is_batch_line(line)),
        "the proxy holds the batch carrying the put of seq {LATE} for n1; it holds {held:?}"
    );
    for seq in LATE + 1..=LAST {
        put_seq(&lb, &key, seq, "with n1 cut off and down");
    }

    // The link comes back; anti-entropy brings n1 up to date.
    cluster.proxy.heal();
    wait_until(DETECTION_TIMEOUT, "the balancer shows n1 up again", || {
        cluster.n1_state(&lb) == "up"
    });
    cluster.wait_for_n1_copy(&key, &last, "anti-entropy after the heal");

    // The retransmitted request reaches n1 at last, and n1 answers it.
    let released = cluster.proxy.release();
    assert!(
        released.iter().any(|r| r.is_batch() && r.client_gone),
        "the batch the balancer gave up on was delivered to n1; delivered: {released:?}"
    );
    cluster.proxy.wait_for_replies(&released, REPLY_TIMEOUT);
    // n1 refused it unapplied: it came after the moment the balancer stopped waiting for it.
    let expired = int_member(&cluster.nodes[0].rpc().stats(), "expired");
    assert!(
        expired >= 1,
        "n1 refused the operation that arrived after its deadline (expired = {expired})"
    );
    cluster.wait_for_aae_rounds(AAE_ROUNDS_AFTER);

    let seen = cluster.observe(&key);
    let story = format!(
        "the put of seq {LATE} reached n1 after the balancer had given up on it and after \
         seqs {} to {LAST} were acknowledged (held and delivered late: {}); then anti-entropy \
         ran {AAE_ROUNDS_AFTER} rounds. Seen: {seen}",
        LATE + 1,
        describe(&released)
    );
    seen.assert_last_survives(&last, &story);
    assert_eq!(
        seen.versions,
        Ok(vec![s(&last)]),
        "get_versions must hold exactly the last acknowledged put: {story}"
    );
}

/// The same late delivery, but within the coordinator's deadline: with a long
/// `--timeout-ms`, the put of seq K still waits for n1 when n1 receives it. Meanwhile the
/// balancer passed the lagging n1 over and acknowledged K+1 to K+5 through n2 and n3. The put
/// of K entered the cluster before any of those was acknowledged, so however late it is
/// applied, it must not erase them: the key must still read K+5.
#[test]
fn a_put_released_before_its_deadline_does_not_erase_writes_acknowledged_meanwhile() {
    const K: u32 = 11;
    const AFTER: u32 = 5;
    const TIMEOUT_MS: u64 = 10_000;
    let cluster = ProxiedCluster::start(TIMEOUT_MS, 0);
    let lb = cluster.balancer.rpc();
    let key = cluster.key_coordinated_by_n1();
    let last = seq_value(&key, K + AFTER);

    for seq in 1..K {
        put_seq(&lb, &key, seq, "before the cut");
    }

    let switches = || balancer_counter(&lb.stats(), "coordinator_switches");
    let switches_before = switches();

    // The put of K leaves for n1 as its link drops: it hangs, waiting for n1.
    cluster.proxy.cut();
    let cut_at = Instant::now();
    let (answered, answer) = mpsc::channel();
    let late_put = {
        let (port, key) = (cluster.balancer.port(), key.clone());
        std::thread::spawn(move || {
            let answer = Rpc::new(port).put(&key, s(&seq_value(&key, K)));
            let _ = answered.send(answer);
        })
    };
    wait_until(
        DETECTION_TIMEOUT,
        &format!("the proxy holds the batch carrying the put of seq {K} for n1"),
        || {
            cluster
                .proxy
                .held_requests()
                .iter()
                .any(|line| is_batch_line(line))
        },
    );
    assert_eq!(
        switches(),
        switches_before,
        "the put of seq {K} went to n1, its first preferred replica, not lagging"
    );
    // The balancer passes over a coordinator silent for 2 ms with work outstanding: a
    // duration, so let it pass.
    std::thread::sleep(Duration::from_millis(20));

    for seq in K + 1..=K + AFTER {
        put_seq(
            &lb,
            &key,
            seq,
            &format!("while the put of seq {K} hangs on n1"),
        );
    }
    assert_eq!(
        switches() - switches_before,
        i64::from(AFTER),
        "n2 coordinated every put after seq {K}, n1 lagging, instead of queueing them on n1"
    );
    assert!(
        matches!(answer.try_recv(), Err(mpsc::TryRecvError::Empty)),
        "the put of seq {K} still waits for n1"
    );

    // The link comes back; anti-entropy brings n1 up to date; then n1 gets the put of K,
    // well within the balancer's deadline.
    cluster.proxy.heal();
    cluster.wait_for_n1_copy(&key, &last, "anti-entropy after the heal");
    let waited = cut_at.elapsed();
    assert!(
        waited < Duration::from_millis(TIMEOUT_MS / 2),
        "the test took {waited:?} to get here, too close to the balancer's deadline of \
         {TIMEOUT_MS} ms for the put of seq {K} to arrive within it"
    );
    let released = cluster.proxy.release();
    assert!(
        released.iter().any(|r| r.is_batch() && !r.client_gone),
        "the batch the balancer still waits for was delivered to n1; delivered: {released:?}"
    );
    cluster.proxy.wait_for_replies(&released, REPLY_TIMEOUT);
    let late_answer = answer
        .recv_timeout(Duration::from_millis(TIMEOUT_MS) + REPLY_TIMEOUT)
        .unwrap_or_else(|_| panic!("the put of seq {K} never returned"));
    late_put.join().expect("the late put's thread");
    cluster.wait_for_aae_rounds(AAE_ROUNDS_AFTER);

    let seen = cluster.observe(&key);
    let story = format!(
        "the put of seq {K} was held {waited:?} (its deadline: {TIMEOUT_MS} ms) and reached n1 \
         after seqs {} to {} were acknowledged (held and delivered late: {}), and the client \
         got {}; then anti-entropy ran {AAE_ROUNDS_AFTER} rounds. Seen: {seen}",
        K + 1,
        K + AFTER,
        describe(&released),
        show(&late_answer)
    );
    seen.assert_last_survives(&last, &story);
    // Within its deadline, n1 applied the put of K, and it survives too, as a sibling that
    // loses to K+5: it entered the cluster first.
    assert_eq!(
        seen.versions,
        Ok(vec![s(&last), s(&seq_value(&key, K))]),
        "get_versions must hold the last acknowledged put, then the late one: {story}"
    );
    assert_eq!(
        int_member(&cluster.nodes[0].rpc().stats(), "expired"),
        0,
        "n1 took the put of seq {K}, which arrived in time: {story}"
    );
}
