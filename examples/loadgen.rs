//! A load generator for Dynamite: many concurrent keep-alive XML-RPC clients.
//!
//! Each worker is a tokio task that owns exactly one HTTP/1.1 connection (a
//! `hyper::client::conn::http1` handshake over its own `TcpStream`, no pool) and sends one
//! request at a time on it, so `--connections` is both the number of sockets and the number
//! of requests in flight. A worker picks each operation at random (`--get-ratio` of gets) on a
//! key drawn uniformly from `key-000000` .. `--keys`.
//!
//! Bodies are byte for byte what Python's `xmlrpc.client` sends for `put(key, value)` and
//! `get(key)`, with its headers (`POST /RPC2`, `Content-Type: text/xml`, `User-Agent:
//! Python-xmlrpc/3.11`), so the server does the same work as for the project's real clients.
//! A storage node answers the same `put` and `get` for its own copy, so one load generator
//! measures a node on its own and a balancer over nodes.
//!
//! Every response is checked: HTTP 200, and no `<fault>` in the body. Errors are counted apart
//! from the latencies and printed; a run with errors says so and exits with status 1.
//!
//!     cargo run --release --example loadgen -- --target 127.0.0.1:30000 --preload --duration-secs 10
//!
//! Progress goes to stderr once a second; the summary to stdout (`--json` adds one
//! machine-readable line starting with `{`).
//!
//! Against daemons started with the security flags: `--auth-user USER --auth-password-file
//! FILE` sends `Authorization: Basic …` on every request (where Python's `xmlrpc.client` puts
//! it for `http://user:password@host`), and `--tls-ca FILE` speaks HTTPS (rustls over aws-lc-rs, as
//! the daemons), verifying the server's certificate against the CAs of FILE for the host of
//! `--target` (an IP address there must be one of the certificate's IP SANs). Without these
//! flags a request costs exactly what it did before they existed.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use dynamite::rpc::codec;

/// What Python 3.11's `xmlrpc.client` says it is.
const PYTHON_USER_AGENT: &str = "Python-xmlrpc/3.11";
/// The path `ServerProxy("http://host:port")` posts to.
const RPC_PATH: &str = "/RPC2";
/// Errors printed as they happen; later ones are only counted (all kinds are listed at the end).
const ERRORS_PRINTED: u64 = 10;
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_DURATION_SECS: f64 = 10.0;
/// Latencies are nanoseconds, reported within 0.1 %.
const LATENCY_SIGFIGS: u8 = 3;

#[derive(Debug, Parser)]
#[command(about = "Load generator for Dynamite's XML-RPC daemons")]
struct Args {
    /// The daemon to load, HOST:PORT.
    #[arg(long)]
    target: String,
    /// Concurrent workers, each with one keep-alive connection and one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keys drawn from: key-000000 .. key-(N-1).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Length of each value, in ASCII characters.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Fraction of gets in the mix: 0 = all puts, 1 = all gets.
    #[arg(long, default_value_t = 0.5)]
    get_ratio: f64,
    /// Measure for this long (default 10 s when --requests is not given).
    #[arg(long, conflicts_with = "requests")]
    duration_secs: Option<f64>,
    /// Measure this many requests instead (0 with --preload: only preload).
    #[arg(long)]
    requests: Option<u64>,
    /// Load without measuring for this long first.
    #[arg(long, default_value_t = 0.0)]
    warmup_secs: f64,
    /// Put every key once before warming up, so gets hit existing keys.
    #[arg(long)]
    preload: bool,
    /// Also print the summary as one JSON line.
    #[arg(long)]
    json: bool,
    /// Threads of the load generator's own runtime.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A name for this run, repeated in the JSON line.
    #[arg(long, default_value = "")]
    label: String,
    /// Seed of the workers' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Call a storage node's `local.put` and `local.get` (its own copy) instead of `put` and
    /// `get` (which a node coordinates for the whole cluster): to measure one node alone.
    #[arg(long)]
    local: bool,
    /// Print the body of this operation for key number 123 (raw, to stdout) and exit.
    #[arg(long, value_enum)]
    print_body: Option<Op>,
    /// Speak HTTPS, trusting only the CA certificates (PEM) of FILE; the server's certificate
    /// must name the host of --target.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Send HTTP Basic credentials on every request: this user ...
    #[arg(long, value_name = "USER", requires = "auth_password_file")]
    auth_user: Option<String>,
    /// ... and the first non-empty line of FILE (blanks around it cut, as the daemons read
    /// it) as the password.
    #[arg(long, value_name = "FILE", requires = "auth_user")]
    auth_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Op {
    Put,
    Get,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !(0.0..=1.0).contains(&args.get_ratio) {
        eprintln!("loadgen: --get-ratio must be between 0 and 1");
        return ExitCode::from(2);
    }
    if args.connections == 0 || args.keys == 0 {
        eprintln!("loadgen: --connections and --keys must be at least 1");
        return ExitCode::from(2);
    }
    let bodies = Bodies::new(args.value_bytes, args.local);
    if let Some(op) = args.print_body {
        use std::io::Write as _;
        let body = bodies.build(op, 123);
        let _ = std::io::stdout().write_all(&body);
        return ExitCode::SUCCESS;
    }
    let security = match Security::from_args(&args) {
        Ok(security) => Arc::new(security),
        Err(error) => {
            eprintln!("loadgen: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args, bodies, security))
}

async fn run(args: Args, bodies: Bodies, security: Arc<Security>) -> ExitCode {
    let addr = match tokio::net::lookup_host(&args.target)
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(addr)) => addr,
        _ => {
            eprintln!("loadgen: cannot resolve --target {}", args.target);
            return ExitCode::from(2);
        }
    };
    let shared = Arc::new(Shared::new(args.target.clone()));
    let bodies = Arc::new(bodies);

    let mut conns = Vec::with_capacity(args.connections);
    let connecting = Instant::now();
    for _ in 0..args.connections {
        match Conn::connect(addr, &args.target, security.clone()).await {
            Ok(conn) => conns.push(conn),
            Err(error) => {
                eprintln!("loadgen: cannot connect to {}: {error}", args.target);
                return ExitCode::FAILURE;
            }
        }
    }
    let connect_time = connecting.elapsed();
    eprintln!(
        "connect: {} connections{} in {:.1} ms, one at a time ({:.3} ms each)",
        args.connections,
        if security.tls.is_some() {
            " (TLS handshakes)"
        } else {
            ""
        },
        connect_time.as_secs_f64() * 1e3,
        connect_time.as_secs_f64() * 1e3 / args.connections as f64
    );
    let progress = tokio::spawn(report_progress(shared.clone()));

    if args.preload {
        shared.set_phase(Phase::Preload);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for conn in conns.drain(..) {
            let (shared, bodies) = (shared.clone(), bodies.clone());
            let keys = args.keys;
            tasks.push(tokio::spawn(preload(conn, shared, bodies, keys)));
        }
        for task in tasks {
            conns.push(task.await.expect("preload task panicked"));
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "preload: {} keys in {secs:.1} s ({:.0} puts/s), {} errors",
            args.keys,
            args.keys as f64 / secs,
            shared.errors.load(Ordering::Relaxed)
        );
    }
    let preload_errors = shared.errors.load(Ordering::Relaxed);

    let budget = match (args.requests, args.duration_secs) {
        (Some(n), _) => Budget::Requests(n),
        (None, Some(secs)) => Budget::Time(Duration::from_secs_f64(secs)),
        (None, None) => Budget::Time(Duration::from_secs_f64(DEFAULT_DURATION_SECS)),
    };
    let mut summary = Summary::default();
    let mut run = RunTotals {
        preload_errors,
        connect_time,
        ..RunTotals::default()
    };
    if budget != Budget::Requests(0) {
        let answered_before = shared.answered.load(Ordering::Relaxed);
        let cpu_before = process_cpu_secs();
        let start = Instant::now();
        let measure_start = start + Duration::from_secs_f64(args.warmup_secs);
        let plan = Arc::new(Plan {
            measure_start,
            budget,
            keys: args.keys,
            get_ratio: args.get_ratio,
        });
        shared.set_phase(if args.warmup_secs > 0.0 {
            Phase::Warmup
        } else {
            Phase::Measure
        });
        let mut tasks = Vec::new();
        for (i, conn) in conns.drain(..).enumerate() {
            let seed = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64 + 1);
            let (shared, bodies, plan) = (shared.clone(), bodies.clone(), plan.clone());
            tasks.push(tokio::spawn(work(conn, shared, bodies, plan, seed)));
        }
        if args.warmup_secs > 0.0 {
            tokio::time::sleep_until(measure_start.into()).await;
            shared.set_phase(Phase::Measure);
        }
        let mut last_end = measure_start;
        for task in tasks {
            let (worker, end) = task.await.expect("worker task panicked");
            summary.merge(&worker);
            last_end = last_end.max(end);
        }
        run.elapsed = last_end.saturating_duration_since(measure_start);
        run.answered = shared.answered.load(Ordering::Relaxed) - answered_before;
        run.cpu_secs = process_cpu_secs()
            .zip(cpu_before)
            .map(|(after, before)| after - before);
    }
    shared.set_phase(Phase::Done);
    progress.abort();

    let errors = shared.errors.load(Ordering::Relaxed);
    run.errors = errors;
    print_summary(&args, &summary, &run);
    if args.json {
        println!("{}", json_line(&args, &summary, &run));
    }
    if errors > 0 {
        let kinds = shared.error_kinds.lock().expect("error table");
        eprintln!();
        eprintln!("!!!!!!!! THIS RUN HAD {errors} ERRORS: its figures are not valid !!!!!!!!");
        let mut kinds: Vec<_> = kinds.iter().collect();
        kinds.sort_by(|a, b| b.1.cmp(a.1));
        for (kind, count) in kinds {
            eprintln!("  {count:>10}  {kind}");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Security: HTTPS and HTTP Basic

/// What every connection and request carries besides the call; both `None` without the flags.
struct Security {
    tls: Option<Tls>,
    /// The `Authorization` header's value, built once.
    authorization: Option<HeaderValue>,
}

struct Tls {
    connector: TlsConnector,
    /// The name the server's certificate must hold: the host of `--target`.
    server_name: ServerName<'static>,
}

impl Security {
    fn from_args(args: &Args) -> Result<Self, String> {
        let tls = match &args.tls_ca {
            Some(ca) => Some(Tls {
                connector: TlsConnector::from(Arc::new(tls_client_config(ca)?)),
                server_name: server_name(&args.target)?,
            }),
            None => None,
        };
        let authorization = match (&args.auth_user, &args.auth_password_file) {
            (Some(user), Some(file)) => Some(basic_authorization(user, file)?),
            _ => None,
        };
        Ok(Security { tls, authorization })
    }
}

/// A client that trusts the CA certificates of `ca` and nothing else, over aws-lc-rs, with the
/// daemons' protocol versions and ALPN.
fn tls_client_config(ca: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certificates = CertificateDer::pem_file_iter(ca)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", ca.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", ca.display()));
    }
    for certificate in certificates {
        roots
            .add(certificate)
            .map_err(|e| format!("{} holds an unusable CA certificate: {e}", ca.display()))?;
    }
    // aws-lc-rs, as the daemons use (post-quantum key exchange first).
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The host part of `HOST:PORT` (`[v6]:PORT` too), as a name or an IP address.
fn server_name(target: &str) -> Result<ServerName<'static>, String> {
    let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| {
        format!("--target's host {host:?} cannot be checked against a certificate: {e}")
    })
}

/// `Basic base64(user:password)`, the password being the first non-empty line of `file`.
fn basic_authorization(user: &str, file: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read the password file {}: {e}", file.display()))?;
    let password = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .ok_or_else(|| format!("the password file {} is empty", file.display()))?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|e| format!("--auth-user cannot go in a header: {e}"))?;
    value.set_sensitive(true);
    Ok(value)
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// Builds request bodies. Keys are `key-%06d`; a value is `--value-bytes` lowercase letters.
struct Bodies {
    /// `a..z` repeated, 26 characters longer than a value, so a value is a slice of it.
    letters: String,
    value_bytes: usize,
    /// Call `local.put` and `local.get`.
    local: bool,
}

impl Bodies {
    fn new(value_bytes: usize, local: bool) -> Self {
        let letters = (0..value_bytes + 26)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        Bodies {
            letters,
            value_bytes,
            local,
        }
    }

    fn key(index: u64) -> String {
        format!("key-{index:06}")
    }

    /// The value written to key number `index` (it starts at a letter that depends on the key).
    fn value(&self, index: u64) -> &str {
        let start = (index % 26) as usize;
        &self.letters[start..start + self.value_bytes]
    }

    fn build(&self, op: Op, index: u64) -> Bytes {
        let key = Self::key(index);
        let (get, put) = if self.local {
            ("local.get", "local.put")
        } else {
            ("get", "put")
        };
        match op {
            Op::Get => python_call(get, &[&key]),
            Op::Put => python_call(put, &[&key, self.value(index)]),
        }
    }
}

/// A method call with string parameters, formatted exactly as Python's `xmlrpc.client.dumps`
/// does (single-quoted XML declaration, a newline after each element that holds others).
/// The strings must need no escaping (ours are ASCII letters, digits and `-`).
fn python_call(method: &str, params: &[&str]) -> Bytes {
    let mut body = String::with_capacity(160 + params.iter().map(|p| p.len() + 48).sum::<usize>());
    body.push_str("<?xml version='1.0'?>\n<methodCall>\n<methodName>");
    body.push_str(method);
    body.push_str("</methodName>\n<params>\n");
    for param in params {
        debug_assert!(!param.contains(['<', '>', '&']));
        body.push_str("<param>\n<value><string>");
        body.push_str(param);
        body.push_str("</string></value>\n</param>\n");
    }
    body.push_str("</params>\n</methodCall>\n");
    Bytes::from(body)
}

// ---------------------------------------------------------------------------------------------
// One keep-alive connection

struct Conn {
    addr: SocketAddr,
    host: HeaderValue,
    /// `Authorization`'s value, with --auth-user.
    authorization: Option<HeaderValue>,
    security: Arc<Security>,
    /// `None` after the connection broke; the next request reconnects.
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// What a successful response said.
enum Reply {
    Value,
    Nil,
}

impl Conn {
    async fn connect(
        addr: SocketAddr,
        host: &str,
        security: Arc<Security>,
    ) -> Result<Self, String> {
        let mut conn = Conn {
            addr,
            host: HeaderValue::from_str(host).map_err(|e| e.to_string())?,
            authorization: security.authorization.clone(),
            security,
            sender: None,
        };
        conn.reconnect().await?;
        Ok(conn)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        // Title-Case header names on the wire, as Python's http.client writes them.
        let mut http = http1::Builder::new();
        http.title_case_headers(true);
        let sender = match &self.security.tls {
            None => {
                let (sender, connection) = http
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?;
                let (sender, connection) = http
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
        };
        self.sender = Some(sender);
        Ok(())
    }

    /// Sends one call and checks the answer: HTTP 200 and no fault.
    async fn call(&mut self, body: Bytes) -> Result<Reply, String> {
        if self.sender.as_ref().is_none_or(SendRequest::is_closed) {
            self.sender = None;
            self.reconnect().await?;
        }
        let sender = self.sender.as_mut().expect("connected");
        if let Err(error) = sender.ready().await {
            self.sender = None;
            return Err(format!("connection: {error}"));
        }
        // The headers Python's http.client and xmlrpc.client send, in their order
        // (`Authorization` from `http://user:password@host`, right after `Host`).
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(RPC_PATH)
            .header(HOST, self.host.clone());
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let request = request
            .header("Accept-Encoding", "gzip")
            .header(CONTENT_TYPE, "text/xml")
            .header(USER_AGENT, PYTHON_USER_AGENT)
            .header(CONTENT_LENGTH, body.len())
            .body(Full::new(body))
            .expect("a valid request");
        let response = match sender.send_request(request).await {
            Ok(response) => response,
            Err(error) => {
                self.sender = None;
                return Err(format!("transport: {error}"));
            }
        };
        let status = response.status();
        let body = match response.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                self.sender = None;
                return Err(format!("reading the response: {error}"));
            }
        };
        if status != StatusCode::OK {
            return Err(format!("HTTP {status}"));
        }
        if contains(&body, b"<fault>") {
            return Err(format!("fault: {}", fault_string(&body)));
        }
        if contains(&body, b"<nil/>") {
            Ok(Reply::Nil)
        } else {
            Ok(Reply::Value)
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The fault's code and string, for the error table (grouped by text, so kept short).
fn fault_string(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match codec::parse_response(&text) {
        Err((code, message)) => format!("{code} {}", message.chars().take(120).collect::<String>()),
        Ok(_) => text.chars().take(120).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Workers

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Budget {
    Time(Duration),
    Requests(u64),
}

struct Plan {
    measure_start: Instant,
    budget: Budget,
    keys: u64,
    get_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Connect = 0,
    Preload = 1,
    Warmup = 2,
    Measure = 3,
    Done = 4,
}

/// What all workers and the progress reporter share.
struct Shared {
    target: String,
    phase: AtomicU8,
    /// Requests answered (any phase, errors included), for the progress line.
    answered: AtomicU64,
    errors: AtomicU64,
    error_kinds: Mutex<HashMap<String, u64>>,
    /// Requests started in the measured phase, against `Budget::Requests`.
    started: AtomicU64,
    next_preload_key: AtomicU64,
}

impl Shared {
    fn new(target: String) -> Self {
        Shared {
            target,
            phase: AtomicU8::new(Phase::Connect as u8),
            answered: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            error_kinds: Mutex::new(HashMap::new()),
            started: AtomicU64::new(0),
            next_preload_key: AtomicU64::new(0),
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn error(&self, error: String) {
        let n = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= ERRORS_PRINTED {
            eprintln!("loadgen: ERROR from {}: {error}", self.target);
            if n == ERRORS_PRINTED {
                eprintln!("loadgen: (further errors are only counted)");
            }
        }
        // Errors that differ only by a number (an HTTP status, a count) still group well.
        *self
            .error_kinds
            .lock()
            .expect("error table")
            .entry(error)
            .or_default() += 1;
    }
}

async fn preload(mut conn: Conn, shared: Arc<Shared>, bodies: Arc<Bodies>, keys: u64) -> Conn {
    loop {
        let index = shared.next_preload_key.fetch_add(1, Ordering::Relaxed);
        if index >= keys {
            return conn;
        }
        let result = conn.call(bodies.build(Op::Put, index)).await;
        shared.answered.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = result {
            shared.error(error);
            if conn.sender.is_none() && conn.reconnect().await.is_err() {
                shared.error("reconnect failed; worker stopped".into());
                return conn;
            }
        }
    }
}

async fn work(
    mut conn: Conn,
    shared: Arc<Shared>,
    bodies: Arc<Bodies>,
    plan: Arc<Plan>,
    seed: u64,
) -> (Summary, Instant) {
    let mut rng = Rng::new(seed);
    let mut summary = Summary::default();
    let mut last_end = plan.measure_start;
    loop {
        let start = Instant::now();
        let measured = start >= plan.measure_start;
        match plan.budget {
            Budget::Time(duration) if start >= plan.measure_start + duration => break,
            Budget::Requests(n)
                if measured && shared.started.fetch_add(1, Ordering::Relaxed) >= n =>
            {
                break;
            }
            _ => {}
        }
        let op = if rng.unit() < plan.get_ratio {
            Op::Get
        } else {
            Op::Put
        };
        let index = rng.below(plan.keys);
        let result = conn.call(bodies.build(op, index)).await;
        let end = Instant::now();
        shared.answered.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(reply) => {
                if measured {
                    let stats = summary.op_mut(op);
                    record(&mut stats.latency, duration_ns(end - start));
                    if let Reply::Nil = reply {
                        stats.nils += 1;
                    }
                }
            }
            Err(error) => {
                if measured {
                    summary.op_mut(op).errors += 1;
                }
                shared.error(error);
                if conn.sender.is_none() && conn.reconnect().await.is_err() {
                    shared.error("reconnect failed; worker stopped".into());
                    break;
                }
            }
        }
        if measured {
            last_end = end;
        }
    }
    (summary, last_end)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// xorshift64*: plenty for picking keys and operations, and no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

async fn report_progress(shared: Arc<Shared>) {
    let started = Instant::now();
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    ticks.tick().await;
    let mut last = 0;
    let mut last_at = Instant::now();
    loop {
        ticks.tick().await;
        let answered = shared.answered.load(Ordering::Relaxed);
        let now = Instant::now();
        let rate = (answered - last) as f64 / (now - last_at).as_secs_f64();
        (last, last_at) = (answered, now);
        let phase = match shared.phase.load(Ordering::Relaxed) {
            0 => "connect",
            1 => "preload",
            2 => "warmup",
            3 => "measure",
            _ => "done",
        };
        eprintln!(
            "[{:>4.0}s] {phase:<7} {rate:>9.0} req/s  {answered:>10} answered  {} errors",
            started.elapsed().as_secs_f64(),
            shared.errors.load(Ordering::Relaxed)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Results

struct OpStats {
    /// Nanoseconds.
    latency: Histogram<u64>,
    errors: u64,
    /// Answers that were nil (a get of a key the server does not hold).
    nils: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            latency: latency_histogram(),
            errors: 0,
            nils: 0,
        }
    }
}

/// An empty latency histogram that grows to whatever it is given.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new(LATENCY_SIGFIGS).expect("3 significant figures is a valid precision")
}

/// Records `ns`; should the histogram fail to grow that far, the top it reaches stands in.
fn record(h: &mut Histogram<u64>, ns: u64) {
    if h.record(ns).is_err() {
        h.saturating_record(ns);
    }
}

/// Adds `other` into `h`. Both auto-resize, so `h` grows to take every value.
fn merge(h: &mut Histogram<u64>, other: &Histogram<u64>) {
    h.add(other)
        .expect("auto-resizing histograms of equal precision merge");
}

#[derive(Default)]
struct Summary {
    put: OpStats,
    get: OpStats,
}

impl Summary {
    fn op_mut(&mut self, op: Op) -> &mut OpStats {
        match op {
            Op::Put => &mut self.put,
            Op::Get => &mut self.get,
        }
    }

    fn merge(&mut self, other: &Summary) {
        for (mine, theirs) in [(&mut self.put, &other.put), (&mut self.get, &other.get)] {
            merge(&mut mine.latency, &theirs.latency);
            mine.errors += theirs.errors;
            mine.nils += theirs.nils;
        }
    }

    fn all(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        merge(&mut all, &self.put.latency);
        merge(&mut all, &self.get.latency);
        all
    }
}

/// Totals of one run, beside the per-operation [`Summary`].
#[derive(Default)]
struct RunTotals {
    /// From the start of measuring to the last measured answer.
    elapsed: Duration,
    /// Errors in every phase, and in the preload alone.
    errors: u64,
    preload_errors: u64,
    /// Requests answered while warming up and measuring (the preload excluded).
    answered: u64,
    /// CPU time the load generator itself used while warming up and measuring.
    cpu_secs: Option<f64>,
    /// Opening every connection, one after the other (with TLS, its handshake included).
    connect_time: Duration,
}

impl RunTotals {
    /// The load generator's own CPU time per request answered, in microseconds.
    fn cpu_us_per_request(&self) -> Option<f64> {
        self.cpu_secs
            .filter(|_| self.answered > 0)
            .map(|secs| secs * 1e6 / self.answered as f64)
    }
}

/// User plus system CPU time of this process so far, from `/proc/self/stat` (Linux; `None`
/// elsewhere). Its clock ticks are `USER_HZ`, 100 on every Linux platform in use.
fn process_cpu_secs() -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces): the 12th
    // and 13th of them are utime and stime.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

fn print_summary(args: &Args, s: &Summary, run: &RunTotals) {
    let all = s.all();
    let measured_errors = s.put.errors + s.get.errors;
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    let (errors, preload_errors) = (run.errors, run.preload_errors);
    if all.len() + measured_errors == 0 {
        println!(
            "target {}: nothing measured ({errors} errors, preload {preload_errors})",
            args.target
        );
        return;
    }
    println!(
        "target {}  connections {}  keys {}  value {} B  get ratio {}",
        args.target, args.connections, args.keys, args.value_bytes, args.get_ratio
    );
    println!(
        "requests {}  ok {}  errors {} (measured) / {} (all, preload {})  in {:.2} s",
        all.len() + measured_errors,
        all.len(),
        measured_errors,
        errors,
        preload_errors,
        secs
    );
    println!("throughput {:.0} req/s", all.len() as f64 / secs);
    if let Some(cpu) = run.cpu_us_per_request() {
        println!("loadgen's own CPU: {cpu:.1} us per request");
    }
    println!(
        "{:<5} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "op", "count", "req/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "nil", "errors"
    );
    let tried = |op: &OpStats| op.latency.len() + op.errors;
    let rows: Vec<(&str, &Histogram<u64>, u64, u64)> = match (tried(&s.put), tried(&s.get)) {
        (0, _) => vec![("get", &s.get.latency, s.get.errors, s.get.nils)],
        (_, 0) => vec![("put", &s.put.latency, s.put.errors, s.put.nils)],
        _ => vec![
            ("put", &s.put.latency, s.put.errors, s.put.nils),
            ("get", &s.get.latency, s.get.errors, s.get.nils),
            ("all", &all, measured_errors, s.put.nils + s.get.nils),
        ],
    };
    for (name, h, errors, nils) in rows {
        println!(
            "{name:<5} {:>10} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9} {errors:>9}",
            h.len(),
            h.len() as f64 / secs,
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99)),
            ms(h.value_at_quantile(0.999)),
            ms(h.max()),
            nils
        );
    }
    if args.get_ratio > 0.0 && s.get.nils > 0 {
        println!(
            "note: {} gets answered nil (keys not stored{})",
            s.get.nils,
            if args.preload {
                ""
            } else {
                "; --preload fills them"
            }
        );
    }
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn json_line(args: &Args, s: &Summary, run: &RunTotals) -> String {
    let all = s.all();
    let secs = run.elapsed.as_secs_f64().max(1e-9);
    let errors = run.errors;
    let op_json = |h: &Histogram<u64>, errors: u64, nils: u64| {
        format!(
            "{{\"count\":{},\"errors\":{errors},\"nil\":{nils},\"rps\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}",
            h.len(),
            h.len() as f64 / secs,
            h.value_at_quantile(0.5) as f64 / 1e3,
            h.value_at_quantile(0.99) as f64 / 1e3,
            h.value_at_quantile(0.999) as f64 / 1e3,
            h.max() as f64 / 1e3,
        )
    };
    let mut line = String::new();
    let _ = write!(
        line,
        "{{\"label\":\"{}\",\"target\":\"{}\",\"connections\":{},\"keys\":{},\"value_bytes\":{},\"get_ratio\":{},\"elapsed_s\":{:.3},\"requests\":{},\"errors\":{errors},\"throughput\":{:.1},\"answered_with_warmup\":{},\"loadgen_cpu_us_per_req\":{},\"connect_ms\":{:.3},\"tls\":{},\"put\":{},\"get\":{},\"all\":{}}}",
        args.label.replace(['"', '\\'], "_"),
        args.target,
        args.connections,
        args.keys,
        args.value_bytes,
        args.get_ratio,
        secs,
        all.len() + s.put.errors + s.get.errors,
        all.len() as f64 / secs,
        run.answered,
        run.cpu_us_per_request()
            .map_or_else(|| "null".to_owned(), |us| format!("{us:.1}")),
        run.connect_time.as_secs_f64() * 1e3,
        args.tls_ca.is_some(),
        op_json(&s.put.latency, s.put.errors, s.put.nils),
        op_json(&s.get.latency, s.get.errors, s.get.nils),
        op_json(&all, s.put.errors + s.get.errors, s.put.nils + s.get.nils),
    );
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_bodies() {
        assert_eq!(
            &python_call("get", &["key-000123"])[..],
            b"<?xml version='1.0'?>\n<methodCall>\n<methodName>get</methodName>\n<params>\n<param>\n<value><string>key-000123</string></value>\n</param>\n</params>\n</methodCall>\n"
        );
    }

    #[test]
    fn basic_authorization_is_what_the_daemons_check() {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), "\n  s3cret:x  \nsecond\n").expect("written");
        let value = basic_authorization("bench", file.path()).expect("read");
        assert_eq!(
            value.as_bytes(),
            dynamite::security::access::basic_value("bench", b"s3cret:x").as_bytes()
        );
        assert!(value.is_sensitive());
    }

    #[test]
    fn server_names_come_from_the_target_host() {
        for (target, ip) in [
            ("127.0.0.1:30000", true),
            ("[::1]:30000", true),
            ("db.local:1", false),
        ] {
            let name = server_name(target).expect("valid");
            assert_eq!(matches!(name, ServerName::IpAddress(_)), ip, "{target}");
        }
    }
}
