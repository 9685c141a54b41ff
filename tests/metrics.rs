//! `/metrics` against the real binaries, read by the Prometheus project's own parser
//! (Python's `prometheus_client`): request latency histograms by method, replica call
//! latency by node, quorum failures by kind, hints held and handed off, anti-entropy rounds,
//! keys and disk, layout version and partitions syncing, refused credentials; and `stats()`
//! showing the same figures.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use dxr::Value;
use dynamite::rpc::client::{CallError, RpcClient};

const SCRAPE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/scrape.py");
const USER: &str = "ops";

/// One scrape: every sample by `name{labels}` (labels sorted, `k=v` joined by commas), and
/// each family's type.
struct Scrape {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in {:#?}", self.samples.keys()))
    }

    /// The sum of every series whose name is `name`, whatever its labels.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .sum()
    }

    /// The label sets of `name`'s series.
    fn labels(&self, name: &str) -> Vec<String> {
        self.samples
            .keys()
            .filter_map(|series| {
                let (metric, labels) = series.split_once('{')?;
                (metric == name).then(|| labels.trim_end_matches('}').to_owned())
            })
            .collect()
    }
}

fn scrape(port: u16, password_file: &std::path::Path) -> Scrape {
    let output = Command::new("python3")
        .args([
            SCRAPE,
            &format!("http://127.0.0.1:{port}/metrics"),
            USER,
            &password_file.to_string_lossy(),
        ])
        .output()
        .expect("python3 must be on PATH");
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics of {port}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the scraper prints JSON");
    let samples = parsed["samples"]
        .as_object()
        .expect("samples")
        .iter()
        .map(|(series, value)| (series.clone(), value.as_f64().unwrap_or(f64::NAN)))
        .collect();
    let types = parsed["types"]
        .as_object()
        .expect("types")
        .iter()
        .map(|(name, kind)| (name.clone(), kind.as_str().unwrap_or("").to_owned()))
        .collect();
    Scrape { samples, types }
}

fn call(
    client: &RpcClient,
    port: u16,
    method: &str,
    params: Vec<Value>,
) -> Result<Value, CallError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(client.call(&addr(port), method, params, Duration::from_secs(10)))
}

#[test]
fn metrics_are_valid_openmetrics_and_count_what_happened() {
    let secrets = tempfile::tempdir().expect("temp dir");
    let password_file = secrets.path().join("password");
    let secret_file = secrets.path().join("secret");
    std::fs::write(&password_file, "metrics-password\n").expect("write");
    std::fs::write(&secret_file, "0123456789abcdef-metrics-secret\n").expect("write");
    for file in [&password_file, &secret_file] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let flags = [
        "--auth-user".to_owned(),
        USER.to_owned(),
        "--auth-password-file".to_owned(),
        password_file.to_string_lossy().into_owned(),
        "--cluster-secret-file".to_owned(),
        secret_file.to_string_lossy().into_owned(),
    ];
    let mut builder = Cluster::builder()
        .nodes(4)
        .replicas(3)
        .aae_interval_ms(500)
        .timeout_ms(500);
    for flag in &flags {
        builder = builder.node_arg(flag).balancer_arg(flag);
    }
    let mut cluster = builder.start();
    let lb = cluster.balancer_port(0);
    let client = password_client(USER, &password_file);
    for i in 0..20 {
        assert_eq!(
            call(&client, lb, "put", vec![s(&key(i)), s("v")]).expect("put"),
            s("200")
        );
        assert_eq!(
            call(&client, lb, "get", vec![s(&key(i))]).expect("get"),
            s("v")
        );
    }
    // One refused password.
    let anonymous = RpcClient::new();
    assert!(matches!(
        call(&anonymous, lb, "get", vec![s("k")]),
        Err(CallError::Status(401))
    ));

    let balancer = scrape(lb, &password_file);
    assert_eq!(
        balancer.types["dynamite_request_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        balancer.value("dynamite_request_duration_seconds_count{method=put}"),
        20.0
    );
    assert_eq!(
        balancer.value("dynamite_request_duration_seconds_count{method=get}"),
        20.0
    );
    assert!(balancer.value("dynamite_request_duration_seconds_sum{method=put}") > 0.0);
    assert_eq!(
        balancer.value("dynamite_request_duration_seconds_bucket{le=+Inf,method=put}"),
        20.0
    );
    // Replica calls, one series per node: every put and get reached all three.
    let mut nodes = balancer.labels("dynamite_replica_call_duration_seconds_count");
    nodes.sort();
    let mut expected: Vec<String> = cluster
        .servers()
        .iter()
        .map(|a| format!("node={a}"))
        .collect();
    expected.sort();
    assert_eq!(nodes, expected);
    assert!(balancer.sum("dynamite_replica_call_duration_seconds_count") >= 80.0);
    assert_eq!(
        balancer.value("dynamite_balancer_requests_total{method=put}"),
        20.0
    );
    assert!(balancer.value("dynamite_auth_failures_total{kind=no_password}") >= 1.0);
    assert_eq!(balancer.value("dynamite_balancer_servers_up{}"), 4.0);

    let node_ports = cluster.node_ports();
    wait_until(
        Duration::from_secs(10),
        "the nodes hold 3 copies of 20 keys",
        || {
            let total: f64 = node_ports
                .iter()
                .map(|&port| scrape(port, &password_file).value("dynamite_node_keys{}"))
                .sum();
            total == 60.0
        },
    );
    let node = scrape(node_ports[0], &password_file);
    assert!(
        node.value("dynamite_node_disk_bytes{}") > 0.0,
        "a durable node uses disk"
    );
    assert_eq!(node.value("dynamite_node_layout_version{}"), 1.0);
    assert_eq!(node.value("dynamite_node_partitions_syncing{}"), 0.0);
    assert!(node.value("dynamite_request_duration_seconds_count{method=internal.batch}") >= 1.0);
    wait_until(
        Duration::from_secs(15),
        "anti-entropy rounds are counted",
        || scrape(node_ports[0], &password_file).value("dynamite_node_aae_rounds_total{}") >= 1.0,
    );

    // A node down: writes leave hints on the others, and they are handed off once it returns.
    cluster.nodes[3].kill();
    for i in 100..130 {
        let _ = call(&client, lb, "put", vec![s(&key(i)), s("v")]);
    }
    let held: f64 = node_ports[..3]
        .iter()
        .map(|&port| scrape(port, &password_file).value("dynamite_node_hints{}"))
        .sum();
    assert!(held > 0.0, "hints are held for the node that is down");
    // Three of four down: a write cannot reach W = 2, and the balancer counts a write quorum
    // failure.
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    let failed = call(&client, lb, "put", vec![s("no-quorum"), s("v")]);
    assert!(
        matches!(failed, Err(CallError::Fault { code: 503, .. })),
        "{failed:?}"
    );
    let balancer = scrape(lb, &password_file);
    assert!(balancer.value("dynamite_balancer_quorum_failures_total{quorum=write}") >= 1.0);
    for i in 1..4 {
        cluster.nodes[i].restart();
    }
    wait_until(Duration::from_secs(30), "the hints are handed off", || {
        let scrapes: Vec<Scrape> = node_ports[..3]
            .iter()
            .map(|&port| scrape(port, &password_file))
            .collect();
        scrapes
            .iter()
            .map(|s| s.value("dynamite_node_hints_handed_off_total{}"))
            .sum::<f64>()
            >= held
            && scrapes
                .iter()
                .all(|s| s.value("dynamite_node_hints{}") == 0.0)
    });

    // stats() shows the same latency figures.
    let stats = call(&client, lb, "stats", vec![]).expect("stats");
    let latency = member(&stats, "latency");
    let put = member(latency, "put");
    assert!(int(member(put, "count")) >= 20, "{put:?}");
    assert!(
        matches!(member(put, "p99_ms"), Value::Double(ms) if *ms > 0.0),
        "{put:?}"
    );
}
