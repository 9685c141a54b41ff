//! Security against the real binaries: client passwords, the cluster secret, TLS on every
//! hop, secrets kept out of everything printed, and a secret replaced by rolling restarts.
//! Python's `xmlrpc.client` is the client (`tests/python/secure_session.py`): no code of ours
//! for credentials or TLS.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use dxr::Value;
use dynamite::rpc::client::{CallError, RpcClient};
use dynamite::security::{Security, SecurityFiles};

const SECURE_SESSION: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/python/secure_session.py"
);
const PYTHON_TIMEOUT: Duration = Duration::from_secs(60);
const USER: &str = "ann";
const PASSWORD: &str = "correct-horse-battery";
const SECRET: &str = "3f9c1e0a7b5d42e8a6c4f2e0d8b6a4c2";
const NEW_SECRET: &str = "9a8b7c6d5e4f30211203f4e5d6c7b8a9";

/// The files a secured cluster is started with: a CA and a certificate for 127.0.0.1 signed
/// by it, another CA nobody's certificate comes from, the password and the cluster secret.
struct Kit {
    dir: tempfile::TempDir,
}

impl Kit {
    fn new() -> Kit {
        let dir = tempfile::Builder::new()
            .prefix("dynamite-kit-")
            .tempdir()
            .expect("temp dir");
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let ca = ca_params("Dynamite test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("CA");
        let node_key = rcgen::KeyPair::generate().expect("node key");
        let mut node =
            rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("node params");
        node.subject_alt_names.push(rcgen::SanType::IpAddress(
            std::net::Ipv4Addr::LOCALHOST.into(),
        ));
        let node_cert = node
            .signed_by(&node_key, &issuer)
            .expect("node certificate");
        let other_key = rcgen::KeyPair::generate().expect("other CA key");
        let other = rcgen::CertifiedIssuer::self_signed(ca_params("Someone else's CA"), other_key)
            .expect("other CA");
        let kit = Kit { dir };
        kit.write("ca.pem", &issuer.pem(), 0o644);
        kit.write("other-ca.pem", &other.pem(), 0o644);
        kit.write("node.pem", &node_cert.pem(), 0o644);
        kit.write("node.key", &node_key.serialize_pem(), 0o600);
        kit.write("password", &format!("{PASSWORD}\n"), 0o600);
        kit.write("secret", &format!("{SECRET}\n"), 0o600);
        kit
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    fn write(&self, name: &str, text: &str, mode: u32) {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write kit file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Password and cluster secret flags, the same on every daemon.
    fn credential_flags(&self) -> Vec<String> {
        vec![
            "--auth-user".into(),
            USER.into(),
            "--auth-password-file".into(),
            self.arg("password"),
            "--cluster-secret-file".into(),
            self.arg("secret"),
        ]
    }

    /// Serve HTTPS with the node certificate, and call others trusting `ca`.
    fn tls_flags(&self, ca: &str) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.arg("node.pem"),
            "--tls-key".into(),
            self.arg("node.key"),
            "--tls-ca".into(),
            self.arg(ca),
        ]
    }

    /// What the cluster's own daemons (and the `dynamite` command) send: the secret, over
    /// HTTPS when `tls`.
    fn member_client(&self, tls: bool) -> RpcClient {
        let files = SecurityFiles {
            cluster_secret_file: Some(self.path("secret")),
            tls_ca: tls.then(|| self.path("ca.pem")),
            ..SecurityFiles::default()
        };
        let (security, _) = Security::from_files(&files).expect("member credentials");
        RpcClient::with_outgoing(&security.outgoing)
    }
}

fn ca_params(name: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// One call with `client`, from a test thread.
fn call(
    client: &RpcClient,
    port: u16,
    method: &str,
    params: Vec<Value>,
) -> Result<Value, CallError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(client.call(&addr(port), method, params, Duration::from_secs(10)))
}

/// Runs the Python session against `cluster`; panics with its output when it fails.
fn run_secure_session(cluster: &Cluster, kit: &Kit, scheme: &str) {
    let args = vec![
        SECURE_SESSION.to_owned(),
        cluster.balancer_port(0).to_string(),
        cluster.node_ports()[0].to_string(),
        scheme.to_owned(),
        kit.arg("ca.pem"),
        USER.to_owned(),
        kit.arg("password"),
    ];
    run_python_script(cluster.dir(), &args, PYTHON_TIMEOUT);
}

/// Every log line every daemon of `cluster` wrote, every generation.
fn all_logs(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).expect("cluster dir").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "log") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    text
}

fn assert_no_secret_in(text: &str, what: &str) {
    for secret in [PASSWORD, SECRET, NEW_SECRET] {
        assert!(!text.contains(secret), "{what} carries a secret");
    }
}

/// Passwords on client calls, the secret on internal ones, over plain HTTP: the Python
/// session checks every door, then the cluster's own work (replication, the `dynamite`
/// command with the secret) goes on through them. No secret is in any log line, even at
/// trace level.
#[test]
fn passwords_and_the_cluster_secret_guard_every_door() {
    let kit = Kit::new();
    let mut builder = Cluster::builder().replicas(3);
    for flag in kit.credential_flags() {
        builder = builder.node_arg(&flag).balancer_arg(&flag);
    }
    let cluster = builder.start();
    run_secure_session(&cluster, &kit, "http");

    // The cluster's own calls carry the secret: a write reaches all three replicas.
    let member = kit.member_client(false);
    let lb = cluster.balancer_port(0);
    let put = call(&member, lb, "put", vec![s("k"), s("v")]).expect("a member may put");
    assert_eq!(put, s("200"));
    for port in cluster.node_ports() {
        wait_until(
            Duration::from_secs(10),
            "every replica holds the write",
            || call(&member, port, "local.get", vec![s("k")]).ok() == Some(s("v")),
        );
    }
    // The `dynamite` command: with the secret it shows the cluster, without it says why not.
    let with = dynamite(&[
        "-s",
        &addr(lb),
        "--cluster-secret-file",
        &kit.arg("secret"),
        "status",
    ]);
    assert!(with.status.success(), "{with:?}");
    assert!(
        String::from_utf8_lossy(&with.stdout).contains("up"),
        "{with:?}"
    );
    let without = dynamite(&["-s", &addr(lb), "status"]);
    assert!(!without.status.success());
    let said = String::from_utf8_lossy(&without.stderr);
    assert!(
        said.contains("401") && said.contains("--cluster-secret-file"),
        "{said}"
    );

    // A balancer logging everything (hyper's and rustls's traces too) writes through the
    // cluster: no secret in any line of any daemon.
    let mut args = kit.credential_flags();
    args.extend(["-N".to_owned(), "3".to_owned()]);
    let port = free_port();
    let all = ["-p", &port.to_string(), "--bind", "127.0.0.1"]
        .into_iter()
        .map(str::to_owned)
        .chain(
            cluster
                .servers()
                .into_iter()
                .flat_map(|server| ["-s".to_owned(), server]),
        )
        .chain(args)
        .collect();
    let _tracing = Daemon::start_with_env(
        cluster.dir(),
        "tracing-balancer",
        env!("CARGO_BIN_EXE_load_balancer"),
        port,
        all,
        vec![("RUST_LOG".to_owned(), "trace".to_owned())],
    );
    let put = call(&member, port, "put", vec![s("traced"), s("v")]).expect("put");
    assert_eq!(put, s("200"));
    let logs = all_logs(cluster.dir());
    assert!(logs.contains("TRACE"), "the balancer logged at trace level");
    assert_no_secret_in(&logs, "a daemon's log");
    let stats = call(&member, cluster.node_ports()[0], "stats", vec![]).expect("stats");
    assert_no_secret_in(&format!("{stats:?}"), "a node's stats()");
}

fn dynamite(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dynamite"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dynamite")
}

/// TLS on every hop: clients, balancer to nodes, node to node (hinted handoff, the
/// `dynamite` command). A client or a balancer that does not trust the cluster's CA gets
/// nothing.
#[test]
fn tls_on_every_hop() {
    let kit = Kit::new();
    let mut builder = Cluster::builder().replicas(3);
    for flag in kit
        .credential_flags()
        .into_iter()
        .chain(kit.tls_flags("ca.pem"))
    {
        builder = builder.node_arg(&flag).balancer_arg(&flag);
    }
    let mut cluster = builder.start();
    run_secure_session(&cluster, &kit, "https");

    let member = kit.member_client(true);
    let lb = cluster.balancer_port(0);
    // A node is down: writes go to a fallback as hints, over TLS, and come back to it over
    // TLS once it returns.
    let down = cluster.node_ports()[2];
    cluster.nodes[2].kill();
    let keys: Vec<String> = (0..20).map(|i| format!("tls-{i}")).collect();
    for key in &keys {
        let answer = call(&member, lb, "put", vec![s(key), s("over-tls")]);
        assert_eq!(answer.expect("put with a node down"), s("200"));
    }
    cluster.nodes[2].restart();
    wait_until(
        Duration::from_secs(30),
        "the hints reach the returned node",
        || {
            keys.iter().all(|key| {
                call(&member, down, "local.get", vec![s(key)]).ok() == Some(s("over-tls"))
            })
        },
    );
    let status = dynamite(&[
        "-s",
        &addr(lb),
        "--cluster-secret-file",
        &kit.arg("secret"),
        "--tls-ca",
        &kit.arg("ca.pem"),
        "status",
    ]);
    assert!(status.status.success(), "{status:?}");

    // A balancer that trusts another CA reaches no node: the nodes' certificates are checked.
    let servers: Vec<String> = cluster.node_ports().iter().map(|&p| addr(p)).collect();
    let mut args: Vec<String> = kit.credential_flags();
    args.extend(kit.tls_flags("other-ca.pem"));
    args.extend(["-N".to_owned(), "3".to_owned()]);
    let stranger = Daemon::load_balancer(cluster.dir(), "stranger", free_port(), &servers, &args);
    let answer = call(&member, stranger.port(), "put", vec![s("k"), s("v")]);
    assert!(
        matches!(&answer, Err(CallError::Fault { code: 503, message }) if message.contains("certificate")),
        "a balancer that does not trust the nodes' CA cannot write, and says why: {answer:?}"
    );
    assert_no_secret_in(&all_logs(cluster.dir()), "a daemon's log");
}

/// What a daemon says at start: a secret file others can read, and a daemon that whoever
/// reaches can write to. (The daemon on 0.0.0.0 is given a port this test holds, so it
/// warns, then fails to listen: nothing is ever served beyond 127.0.0.1.)
#[test]
fn start_up_warnings_name_the_file_and_the_exposure_never_the_secret() {
    let kit = Kit::new();
    kit.write("open-secret", &format!("{SECRET}\n"), 0o644);
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("address").port().to_string();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_storage_node"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run storage_node")
    };
    let exposed = run(&["-p", &port, "--bind", "0.0.0.0", "--in-memory"]);
    let said = String::from_utf8_lossy(&exposed.stderr);
    assert!(
        !exposed.status.success(),
        "the held port cannot be bound: {said}"
    );
    let warning: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("anyone who reaches"))
        .collect();
    assert_eq!(warning.len(), 1, "one line says it: {said}");
    assert!(
        warning[0].contains("--cluster-secret-file"),
        "and how to close it: {said}"
    );

    let open_file = kit.arg("open-secret");
    let readable = run(&[
        "-p",
        &port,
        "--bind",
        "0.0.0.0",
        "--in-memory",
        "--cluster-secret-file",
        &open_file,
    ]);
    let said = String::from_utf8_lossy(&readable.stderr);
    assert!(
        said.contains(&open_file) && said.contains("chmod 600"),
        "{said}"
    );
    assert!(
        !said.contains("anyone who reaches"),
        "a secret closes the exposure: {said}"
    );
    assert_no_secret_in(&said, "the start-up output");

    // A secret too short is refused, without echoing it.
    kit.write("short", "short-secret\n", 0o600);
    let short = run(&[
        "-p",
        &port,
        "--in-memory",
        "--cluster-secret-file",
        &kit.arg("short"),
    ]);
    let said = String::from_utf8_lossy(&short.stderr);
    assert_eq!(short.status.code(), Some(2), "{said}");
    assert!(
        said.contains("16") && !said.contains("short-secret\n"),
        "{said}"
    );

    // --help names the files, and no value could be a secret.
    for program in [
        env!("CARGO_BIN_EXE_storage_node"),
        env!("CARGO_BIN_EXE_load_balancer"),
    ] {
        let help = Command::new(program).arg("--help").output().expect("help");
        let text = String::from_utf8_lossy(&help.stdout);
        for flag in [
            "--auth-password-file",
            "--cluster-secret-file",
            "--tls-key",
            "--tls-ca",
        ] {
            assert!(text.contains(flag), "{program} --help explains {flag}");
        }
        assert!(
            !text.contains("--auth-password "),
            "no flag takes a password itself"
        );
    }
    drop(held);
}

/// The secret is turned on, then replaced, with rolling restarts and every write
/// acknowledged throughout. Turning it on: balancers first (nodes without a secret ignore the
/// header), then each node. Replacing it, with no refused internal call: every daemon first
/// accepts both (old sent), then sends the new one (old still accepted), then knows only the
/// new one. A node given a secret the others do not know is refused by them: the secret is
/// really checked.
#[test]
fn the_secret_is_turned_on_and_replaced_by_rolling_restarts() {
    let kit = Kit::new();
    let mut builder = Cluster::builder()
        .replicas(3)
        .write_quorum(2)
        .read_quorum(2);
    let password_flags = &kit.credential_flags()[..4];
    for flag in password_flags {
        builder = builder.node_arg(flag).balancer_arg(flag);
    }
    let mut cluster = builder.start();
    let lb = cluster.balancer_port(0);
    let password = password_client(USER, &kit.path("password"));
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let mut write = |cluster: &Cluster, tag: &str| {
        for i in 0..10 {
            let key = format!("{tag}-{i}");
            let answer = call(
                &password,
                cluster.balancer_port(0),
                "put",
                vec![s(&key), s(&key)],
            );
            match answer {
                Ok(value) if value == s("200") => acknowledged.push(key),
                other => refused.push(format!("{key}: {other:?}")),
            }
        }
    };
    write(&cluster, "before");

    // On: balancers first, then the nodes.
    let secret_flag = ["--cluster-secret-file", &kit.arg("secret")];
    cluster.balancers[0].restart_with(&secret_flag);
    write(&cluster, "on-balancer");
    for i in 0..cluster.nodes.len() {
        cluster.nodes[i].restart_with(&secret_flag);
        write(&cluster, &format!("on-node{i}"));
    }
    let on = log_sizes(cluster.dir());

    let steps = [
        ("both-old-first", format!("{SECRET}\n{NEW_SECRET}\n")),
        ("both-new-first", format!("{NEW_SECRET}\n{SECRET}\n")),
        ("new-only", format!("{NEW_SECRET}\n")),
    ];
    for (step, content) in &steps {
        kit.write("secret", content, 0o600);
        for i in 0..cluster.nodes.len() {
            cluster.nodes[i].restart();
            write(&cluster, &format!("{step}-node{i}"));
        }
        cluster.balancers[0].restart();
        write(&cluster, &format!("{step}-balancer"));
    }
    assert!(
        refused.is_empty(),
        "every write was acknowledged: {refused:#?}"
    );
    assert!(
        !logs_since(cluster.dir(), &on).contains("refused a call for its credentials"),
        "no call was refused while the secret was replaced"
    );
    let member = kit.member_client(false);
    for key in &acknowledged {
        let read = call(&member, lb, "get", vec![s(key)]).expect("get");
        assert_eq!(read, s(key), "{key} was acknowledged and reads back");
    }

    // A node that knows only a third secret: the others refuse its calls, it refuses theirs.
    kit.write("secret", "0000000000000000-a-third-secret\n", 0o600);
    cluster.nodes[0].restart();
    let _ = call(&member, lb, "put", vec![s("after"), s("x")]);
    wait_until(
        Duration::from_secs(10),
        "the stranger's calls are refused",
        || logs_since(cluster.dir(), &on).contains("wrong_secret"),
    );
}

/// How long each log file of `dir` is now.
fn log_sizes(dir: &Path) -> std::collections::HashMap<PathBuf, usize> {
    std::fs::read_dir(dir)
        .expect("cluster dir")
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
        .map(|path| {
            let size = std::fs::read(&path).map_or(0, |bytes| bytes.len());
            (path, size)
        })
        .collect()
}

/// What the daemons logged since `sizes` were taken.
fn logs_since(dir: &Path, sizes: &std::collections::HashMap<PathBuf, usize>) -> String {
    let mut text = String::new();
    for (path, size) in log_sizes(dir) {
        let start = sizes.get(&path).copied().unwrap_or(0).min(size);
        let bytes = std::fs::read(&path).unwrap_or_default();
        text.push_str(&String::from_utf8_lossy(&bytes[start.min(bytes.len())..]));
    }
    text
}
