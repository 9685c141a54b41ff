//! Machines whose clocks disagree, told as stories against real processes with skewed clocks
//! (libfaketime shifts one daemon's wall clock by whole seconds).
//!
//! Two things read wall clocks on different machines: the time a write entered the cluster
//! (a blind write supersedes only what entered no later) and the deadline after which a node
//! refuses an operation. Neither may depend on the machines agreeing: every answer carries the
//! answering daemon's clock, each daemon estimates its peers' offsets from them, balancers
//! stamp entry times on the cluster clock (their own moved by the median node's offset) and
//! send deadlines in the receiving node's clock. Skewed by tens of seconds here, far more
//! than NTP ever lets a machine drift, so that an ignored offset could not go unnoticed.
//!
//! The tests skip, saying why, where libfaketime is not installed (the test script installs
//! it; CI fails instead, see `common::skip`).

mod common;

use std::time::Duration;

use common::*;

/// How long a balancer may take to have measured every node's clock.
const MEASURE_TIMEOUT: Duration = Duration::from_secs(10);

/// `clock_offset_us` of every server in a balancer's `stats()`, once it has one for all of
/// them: how far ahead of the balancer each node's clock is.
fn measured_offsets_s(lb: &Rpc, servers: &[String]) -> Vec<f64> {
    let mut offsets = Vec::new();
    wait_until(
        MEASURE_TIMEOUT,
        "the balancer measured every node's clock",
        || {
            let stats = lb.stats();
            let measured: Option<Vec<f64>> = servers
                .iter()
                .map(|address| {
                    array(member(&stats, "servers"))
                        .iter()
                        .find(|entry| string(member(entry, "address")) == address)
                        .and_then(|entry| match entry {
                            Value::Struct(fields) => fields.get("clock_offset_us"),
                            _ => None,
                        })
                        .map(|offset| int(offset) as f64 / 1e6)
                })
                .collect();
            match measured {
                Some(measured) => {
                    offsets = measured;
                    true
                }
                None => false,
            }
        },
    );
    offsets
}

/// Storage nodes, each with its clock `skews[i]` seconds off the machine's: durable and
/// knowing their peers, or in memory and alone.
struct SkewedNodes {
    /// Declared first: dropped last, after the daemons that log into it.
    dir: tempfile::TempDir,
    servers: Vec<String>,
    nodes: Vec<Daemon>,
}

impl SkewedNodes {
    fn start(skews: &[i64], durable_with_peers: bool) -> SkewedNodes {
        let dir = tempfile::Builder::new()
            .prefix("dynamite-clocks-")
            .tempdir()
            .expect("create temp dir");
        let ports: Vec<u16> = skews.iter().map(|_| free_port()).collect();
        let servers: Vec<String> = ports.iter().map(|&p| addr(p)).collect();
        let nodes = ports
            .iter()
            .zip(skews)
            .enumerate()
            .map(|(i, (&port, &skew))| {
                let args = if durable_with_peers {
                    let data = dir.path().join(format!("node-{i}"));
                    let mut args =
                        vec!["--data-dir".to_owned(), data.to_string_lossy().into_owned()];
                    args.extend(peer_args(&servers, i));
                    args
                } else {
                    vec!["--in-memory".to_owned()]
                };
                Daemon::storage_node_with_clock(dir.path(), &format!("node-{i}"), port, &args, skew)
            })
            .collect();
        SkewedNodes {
            dir,
            servers,
            nodes,
        }
    }
}

/// Three nodes on the machine's clock; balancer A's clock 30 s ahead, B's 20 s behind. A
/// client writes one key with blind puts through A and B in turn. Stamped on their own
/// clocks, every put through B would enter "before" the one through A it followed and lose
/// to it as a sibling, and the nodes would refuse to coordinate A's puts, stamped 30 s
/// ahead of them. On the cluster clock, each put supersedes the one before.
#[test]
fn balancers_with_skewed_clocks_order_one_clients_writes() {
    if !faketime_or_skip("balancers_with_skewed_clocks_order_one_clients_writes") {
        return;
    }
    let cluster = Cluster::builder().nodes(3).balancers(0).start();
    let servers = cluster.servers();
    let args: Vec<String> = ["-N", "3", "-R", "2", "-W", "2"].map(str::to_owned).into();
    let ahead = Daemon::load_balancer_with_clock(
        cluster.dir(),
        "balancer-ahead",
        free_port(),
        &servers,
        &args,
        30,
    );
    let behind = Daemon::load_balancer_with_clock(
        cluster.dir(),
        "balancer-behind",
        free_port(),
        &servers,
        &args,
        -20,
    );
    let lbs = [ahead.rpc(), behind.rpc()];
    for (lb, expected_s) in [(&lbs[0], -30.0), (&lbs[1], 20.0)] {
        for offset in measured_offsets_s(lb, &servers) {
            assert!(
                (offset - expected_s).abs() < 1.0,
                "a balancer measured a node's clock {offset} s from its own, not {expected_s}"
            );
        }
    }

    for i in 0..30 {
        let (writer, other) = (&lbs[i % 2], &lbs[(i + 1) % 2]);
        let written = s(&format!("write-{i}"));
        assert_eq!(writer.put("counter", written.clone()), ok200(), "put #{i}");
        for (name, lb) in [("the writer", writer), ("the other balancer", other)] {
            let (values, _) = lb.get_versions("counter").expect("get_versions");
            assert_eq!(
                values,
                vec![written.clone()],
                "after blind put #{i}, through {name}"
            );
        }
    }
    for (i, node) in nodes_of(&cluster).iter().enumerate() {
        assert_eq!(
            int_member(&node.stats(), "expired"),
            0,
            "node {i} refused no operation as late"
        );
    }
}

/// One node's clock 5 s ahead, one 5 s behind, one right; the balancer's right. Deadlines
/// are sent in each node's own clock: the node ahead does not find every operation already
/// late, and writes coordinated by any of them read back in order. (The node behind would
/// take operations 5 s late if its deadlines were read on the balancer's clock; that it
/// refuses late ones is `late_write.rs`'s story, told there with a node behind too.)
#[test]
fn nodes_with_skewed_clocks_take_operations_in_time_and_order_writes() {
    if !faketime_or_skip("nodes_with_skewed_clocks_take_operations_in_time_and_order_writes") {
        return;
    }
    let skews = [5, -5, 0];
    let SkewedNodes {
        dir,
        servers,
        nodes,
    } = SkewedNodes::start(&skews, true);
    let args: Vec<String> = ["-N", "3", "-R", "2", "-W", "3"].map(str::to_owned).into();
    let balancer = Daemon::load_balancer(dir.path(), "balancer", free_port(), &servers, &args);
    let lb = balancer.rpc();
    let offsets = measured_offsets_s(&lb, &servers);
    for (offset, skew) in offsets.iter().zip(skews) {
        assert!(
            (offset - skew as f64).abs() < 1.0,
            "measured {offsets:?} s, skews are {skews:?}"
        );
    }

    // W = 3: every write reaches every node, each of which coordinates the keys it leads.
    for round in 0..5 {
        for i in 0..30 {
            let written = s(&format!("round-{round}"));
            assert_eq!(lb.put(&key(i), written.clone()), ok200(), "put {}", key(i));
            assert_eq!(
                lb.get(&key(i)),
                Ok(written),
                "get {} in round {round}",
                key(i)
            );
        }
    }
    for i in 0..30 {
        let (values, _) = lb.get_versions(&key(i)).expect("get_versions");
        assert_eq!(
            values,
            vec![s("round-4")],
            "{}: one version, the last",
            key(i)
        );
    }
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            int_member(&node.rpc().stats(), "expired"),
            0,
            "node {i} (clock {:+} s) refused no operation as late",
            skews[i]
        );
    }
}

/// A node whose clock is 30 s behind the others is broken (NTP keeps machines within
/// milliseconds), and a write it stamped would be 30 s in its future: it refuses to
/// coordinate, says so, and the other replicas coordinate instead; it still takes every
/// write as a copy, so nothing is lost and the key reads right.
#[test]
fn a_node_far_behind_the_others_lets_them_coordinate() {
    if !faketime_or_skip("a_node_far_behind_the_others_lets_them_coordinate") {
        return;
    }
    let skews = [-30, 0, 0];
    let SkewedNodes {
        dir,
        servers,
        nodes,
    } = SkewedNodes::start(&skews, false);
    // Nodes without peers: what the slow node holds came from the balancer's copies alone.
    let args: Vec<String> = ["-N", "3", "-R", "3", "-W", "2"].map(str::to_owned).into();
    let balancer = Daemon::load_balancer(dir.path(), "balancer", free_port(), &servers, &args);
    let lb = balancer.rpc();
    measured_offsets_s(&lb, &servers);

    let led_by_slow: Vec<String> = (0..)
        .map(key)
        .filter(|k| replicas_of(&servers, k, 3)[0] == servers[0])
        .take(10)
        .collect();
    for k in &led_by_slow {
        for round in 0..3 {
            let written = s(&format!("round-{round}"));
            assert_eq!(lb.put(k, written.clone()), ok200(), "put {k}");
            assert_eq!(lb.get(k), Ok(written.clone()), "get {k} (R = 3)");
            // W = 2: the slow node's copy may still be on its way.
            wait_until(MEASURE_TIMEOUT, "the slow node holds its copy", || {
                nodes[0].rpc().get(k) == Ok(written.clone())
            });
        }
    }
    let refused = int_member(&nodes[0].rpc().stats(), "clock_refusals");
    assert!(
        refused >= led_by_slow.len() as i64,
        "the slow node refused to coordinate the writes it leads (refused {refused})"
    );
    wait_until(MEASURE_TIMEOUT, "the slow node's log says why", || {
        nodes[0]
            .logs()
            .contains("is this machine's clock synchronised")
    });
}

/// A balancer 30 s ahead starts before any node is up. It must not stamp a write on its own
/// clock: a put fails (503, saying why) while no node answers, and once the nodes are up the
/// next put measures them first and is stamped on their time (a write stamped 30 s ahead
/// would be refused by every node, and would win every read for 30 s if it were not).
#[test]
fn a_balancer_stamps_nothing_before_it_has_measured_a_node() {
    if !faketime_or_skip("a_balancer_stamps_nothing_before_it_has_measured_a_node") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("dynamite-clocks-")
        .tempdir()
        .expect("create temp dir");
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let servers: Vec<String> = ports.iter().map(|&p| addr(p)).collect();
    let args: Vec<String> = ["-N", "3", "-R", "2", "-W", "2"].map(str::to_owned).into();
    let balancer =
        Daemon::load_balancer_with_clock(dir.path(), "balancer", free_port(), &servers, &args, 30);
    let lb = balancer.rpc();
    match lb.put("k", s("before")) {
        Err((503, message)) => assert!(
            message.contains("time is unknown"),
            "the fault says why: {message}"
        ),
        other => panic!("a put with no node up: expected fault 503, got {other:?}"),
    }

    let nodes: Vec<Daemon> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| {
            Daemon::storage_node(
                dir.path(),
                &format!("node-{i}"),
                port,
                &["--in-memory".to_owned()],
            )
        })
        .collect();
    assert_eq!(lb.put("k", s("after")), ok200());
    assert_eq!(lb.get("k"), Ok(s("after")));
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(
            int_member(&node.rpc().stats(), "clock_refusals"),
            0,
            "node {i} took the write's entry time as its own time"
        );
    }
}
