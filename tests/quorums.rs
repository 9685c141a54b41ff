//! Placement and quorums, told as stories against a cluster that runs inside the test process
//! ([`InProcessCluster`]): where keys live (every balancer places a key on the same N nodes,
//! whatever order it was given them in), and what the quorums do when nodes are down: writes
//! and reads go on with one of three replicas gone, fail with 503 with two gone, and a node
//! that came back empty is repaired by reads.
//!
//! None of these needs a signal or a crash, so the daemons run in process: faster, and a
//! breakpoint or `RUST_LOG=debug cargo test --test quorums -- --nocapture` sees every daemon. A
//! "dead" node is a stopped one: its listener is closed and its port refuses connections, as a
//! killed process's would. A node frozen with SIGSTOP, and crashes, are in `cluster.rs` and
//! `failures.rs`.

mod common;

use std::time::Duration;

use common::*;

/// How long a balancer may take to notice that a node died, or came back, and act on it.
const FAILURE_DETECTION_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Placement
// ---------------------------------------------------------------------------------------------

/// Two balancers given the same nodes in different orders, one with a duplicate, put every key
/// on the same N nodes: what one writes, the other reads and overwrites everywhere.
#[test]
fn balancers_given_the_servers_in_any_order_agree_on_placement() {
    // Four nodes and N = 2: each key lives on only half of them, so two balancers that
    // disagreed on placement would write to and read from different nodes.
    let mut cluster = InProcessCluster::builder()
        .nodes(4)
        .in_memory()
        .replicas(2)
        .write_quorum(2)
        .read_quorum(1)
        .balancers(0)
        .start();
    let servers = cluster.servers();
    let mut shuffled = servers.clone();
    shuffled.reverse();
    shuffled.swap(0, 2);
    shuffled.push(servers[1].clone()); // a duplicate -s
    let a = cluster.add_balancer(&servers, &[]);
    let b = cluster.add_balancer(&shuffled, &[]);
    let (a, b) = (cluster.balancers[a].rpc(), cluster.balancers[b].rpc());

    a.put_keys(0..200, "through A");
    for i in 0..200 {
        assert_eq!(b.get(&key(i)), Ok(value(i)), "get {} through B", key(i));
    }

    // Overwrite through B: B must reach exactly the two nodes A wrote to, or some node
    // would be left with A's value.
    for i in 0..200 {
        assert_eq!(
            b.put(&key(i), s("rewritten")),
            ok200(),
            "put {} through B",
            key(i)
        );
    }
    let nodes: Vec<Rpc> = (0..4).map(|i| cluster.node_client(i)).collect();
    for i in 0..200 {
        let copies = local_copies(&nodes, &key(i));
        let rewritten = copies.iter().filter(|v| **v == s("rewritten")).count();
        let absent = copies.iter().filter(|v| **v == Value::Nil).count();
        assert_eq!(
            (rewritten, absent),
            (2, 2),
            "{}: local copies {copies:?}; B's overwrite missed a replica A wrote",
            key(i)
        );
    }
    for i in 0..200 {
        assert_eq!(
            a.get(&key(i)),
            Ok(s("rewritten")),
            "get {} through A",
            key(i)
        );
    }
}

/// With W = N, every key is on exactly N of five nodes when put answers, each node's `stats()`
/// agrees with what it holds, and no node holds hints.
#[test]
fn each_key_lives_on_exactly_n_nodes() {
    let cluster = InProcessCluster::builder()
        .nodes(5)
        .in_memory()
        .replicas(3)
        .write_quorum(3)
        .start();
    let lb = cluster.client();
    lb.put_keys(0..200, "");

    // W = N: every replica acknowledged before put answered.
    let nodes: Vec<Rpc> = (0..5).map(|i| cluster.node_client(i)).collect();
    let mut per_node = vec![0usize; 5];
    for i in 0..200 {
        let copies = local_copies(&nodes, &key(i));
        for (n, copy) in copies.iter().enumerate() {
            if *copy == value(i) {
                per_node[n] += 1;
            } else {
                assert_eq!(
                    *copy,
                    Value::Nil,
                    "node {n} holds a wrong value for {}",
                    key(i)
                );
            }
        }
        let holders = copies.iter().filter(|v| **v == value(i)).count();
        assert_eq!(
            holders,
            3,
            "{} is held by {holders} nodes, not N = 3",
            key(i)
        );
    }

    // Each node's stats agree with what it holds, and nothing is held for another node.
    for (n, node) in nodes.iter().enumerate() {
        let stats = node.stats();
        assert_eq!(
            int(member(&stats, "keys")),
            per_node[n] as i64,
            "node {n} keys"
        );
        assert_eq!(int(member(&stats, "hints")), 0, "node {n} hints");
    }
    // 200 keys over 5 nodes: every node got some, which a ring with vnodes ensures.
    assert!(
        per_node.iter().all(|&k| k > 0),
        "keys per node: {per_node:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Quorums with nodes down
// ---------------------------------------------------------------------------------------------

/// Three in-memory nodes, N = 3, R = W = 2, a replica timeout of 500 ms.
fn three_nodes_in_memory_two_of_three() -> InProcessCluster {
    InProcessCluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .read_quorum(2)
        .timeout_ms(500)
        .start()
}

/// With N = 3 and R = W = 2, writes and reads go on while one node is dead, and `stats()` tells
/// the dead node apart from the live ones.
#[test]
fn writes_and_reads_go_on_while_one_of_three_nodes_is_dead() {
    let mut cluster = three_nodes_in_memory_two_of_three();
    let lb = cluster.client();

    lb.put_keys(0..100, "with all nodes up");

    let dead = cluster.nodes[1].addr();
    cluster.nodes[1].stop();

    // SIGSTOP: a put it was asked to coordinate before it counted as lagging may answer
    // that its outcome is unknown.
    let unknown = lb.put_keys_with_a_hung_node(100..200, &format!("with {dead} dead"));
    assert!(unknown <= 1, "{unknown} puts met {dead} as coordinator");
    for i in 0..200 {
        assert_eq!(
            lb.get(&key(i)),
            Ok(value(i)),
            "get {} with {dead} dead",
            key(i)
        );
    }

    // stats() tells the dead node apart from the live ones.
    let state_of = |stats: &Value, address: &str| -> Value {
        array(member(stats, "servers"))
            .iter()
            .find(|server| string(member(server, "address")) == address)
            .map(|server| member(server, "state").clone())
            .unwrap_or_else(|| panic!("{address} missing from stats {stats:?}"))
    };
    let live = cluster.nodes[0].addr();
    wait_until(
        FAILURE_DETECTION_TIMEOUT,
        "stats() shows the dead node in another state than the live ones",
        || {
            let stats = lb.stats();
            state_of(&stats, &dead) != state_of(&stats, &live)
        },
    );
}

/// With two of three replicas dead, puts and gets fail with a 503 fault that names the quorum
/// and counts who answered, and the balancer itself stays healthy.
#[test]
fn with_two_of_three_nodes_dead_quorums_fail_with_503() {
    let mut cluster = three_nodes_in_memory_two_of_three();
    let lb = cluster.client();
    assert_eq!(lb.put("before", s("the crash")), ok200());

    cluster.nodes[0].stop();
    cluster.nodes[2].stop();

    let servers = cluster.servers();
    let put = lb.put("after", s("the crash"));
    assert_quorum_fault(
        "put with 1 of 3 replicas alive",
        put,
        ("W", "write"),
        1,
        &servers,
    );
    let get = lb.get("before");
    assert_quorum_fault(
        "get with 1 of 3 replicas alive",
        get,
        ("R", "read"),
        1,
        &servers,
    );
    assert_eq!(
        health(cluster.balancer_port(0)),
        Some(200),
        "the balancer itself is fine"
    );
}

/// A node that restarts empty (in memory) is repaired by the reads that find it stale.
#[test]
fn a_node_that_lost_its_data_is_repaired_by_reads() {
    let mut cluster = InProcessCluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(3)
        .read_quorum(3)
        .start();
    let lb = cluster.client();
    lb.put_keys(0..50, "");

    // In memory, a restart is a node whose disk was replaced: it comes back empty.
    cluster.nodes[0].restart();
    let node = cluster.node_client(0);
    for i in 0..50 {
        assert_eq!(
            node.local_get(&key(i)),
            Ok(Value::Nil),
            "{} survived an in-memory restart",
            key(i)
        );
    }

    wait_until(
        FAILURE_DETECTION_TIMEOUT,
        "reads with R = 3 succeed with the restarted node",
        || lb.get(&key(0)) == Ok(value(0)),
    );
    for i in 0..50 {
        assert_eq!(
            lb.get(&key(i)),
            Ok(value(i)),
            "get {} after the restart",
            key(i)
        );
    }
    // Read repair runs after the answer; it reaches the stale node soon after.
    wait_until(
        FAILURE_DETECTION_TIMEOUT,
        "read repair gives the restarted node back every key that was read",
        || (0..50).all(|i| node.local_get(&key(i)) == Ok(value(i))),
    );
}

/// Anti-entropy costs what differs, not what is stored. Replicas in sync exchange hashes
/// and read no key at all, round after round; a node that missed 1,000 of 100,000 writes
/// while it was down gets exactly those back, and the exchanges read only the keys of the
/// leaves those writes fall in, not every key stored, every round, for every peer.
#[test]
fn anti_entropy_reads_only_the_leaves_that_differ() {
    const STORED: usize = 99_000;
    const MISSED: usize = 1_000;
    let mut cluster = InProcessCluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(2)
        .aae_interval_ms(200)
        .start();
    let lb_port = cluster.balancer_port(0);
    put_in_parallel(lb_port, 0..STORED);
    let scanned = |cluster: &InProcessCluster| -> Vec<i64> {
        cluster
            .node_clients()
            .iter()
            .map(|node| aae_counter(&node.stats(), "keys_scanned"))
            .collect()
    };
    let rounds = |cluster: &InProcessCluster| -> Vec<i64> {
        cluster
            .node_clients()
            .iter()
            .map(|node| aae_counter(&node.stats(), "in_sync"))
            .collect()
    };
    // Settled: every node holds every key, and a round on each found its trees equal.
    wait_until(Duration::from_secs(60), "the replicas are in sync", || {
        cluster
            .node_clients()
            .iter()
            .all(|node| int_member(&node.stats(), "keys") == STORED as i64)
            && rounds(&cluster).iter().all(|&r| r > 0)
    });
    let (before, in_sync_before) = (scanned(&cluster), rounds(&cluster));
    wait_until(Duration::from_secs(30), "five more rounds in sync", || {
        rounds(&cluster)
            .iter()
            .zip(&in_sync_before)
            .all(|(now, then)| now - then >= 5)
    });
    assert_eq!(scanned(&cluster), before, "rounds in sync read no keys");

    // Node 2 misses 1,000 writes, then comes back once they are older than the settle time
    // (2 s; before it, a round leaves a difference alone as a possible write in flight, and
    // reads its leaves again at the next round).
    cluster.nodes[2].stop();
    put_in_parallel(lb_port, STORED..STORED + MISSED);
    std::thread::sleep(Duration::from_millis(2_500));
    cluster.nodes[2].start();
    let node2 = cluster.node_client(2);
    wait_until(
        Duration::from_secs(60),
        "node 2 got the writes it missed",
        || int_member(&node2.stats(), "keys") == (STORED + MISSED) as i64,
    );
    for i in STORED..STORED + MISSED {
        assert_eq!(
            node2.local_get(&key(i)),
            Ok(value(i)),
            "node 2's own copy of {}",
            key(i)
        );
    }
    let repaired: i64 = cluster
        .node_clients()
        .iter()
        .map(|node| {
            let stats = node.stats();
            aae_counter(&stats, "keys_pushed") + aae_counter(&stats, "keys_pulled")
        })
        .sum();
    assert!(
        (MISSED as i64..=3 * MISSED as i64).contains(&repaired),
        "{repaired} keys moved for {MISSED} missed (a few exchanges may send the same key)"
    );
    let read: i64 = scanned(&cluster)
        .iter()
        .zip(&before)
        .map(|(now, then)| now - then)
        .sum();
    // What one side of one exchange reads: every key of the leaves a missed key falls in.
    let leaves: std::collections::HashSet<usize> = (STORED..STORED + MISSED)
        .map(|i| dynamite::merkle::bucket(key(i).as_bytes()))
        .collect();
    let in_leaves = (0..STORED + MISSED)
        .filter(|&i| leaves.contains(&dynamite::merkle::bucket(key(i).as_bytes())))
        .count() as i64;
    eprintln!(
        "anti-entropy moved {repaired} keys and read {read} from storage to repair {MISSED}; \
         their {} leaves hold {in_leaves} keys",
        leaves.len()
    );
    // Node 2 exchanges with both peers and they with it: each exchange that repairs reads
    // those leaves on both sides. A walk of everything would read 200,000 keys per exchange.
    assert!(
        read <= 8 * in_leaves,
        "the repair read {read} keys from storage, over 8 times the {in_leaves} keys of the \
         leaves that differ"
    );
}

/// Puts `key(i) = value(i)` for every i of `keys` through the daemon on `port`, from eight
/// threads with a connection each.
fn put_in_parallel(port: u16, keys: std::ops::Range<usize>) {
    const THREADS: usize = 8;
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let keys = keys.clone();
            scope.spawn(move || {
                let rpc = Rpc::new(port);
                for i in keys.skip(t).step_by(THREADS) {
                    assert_eq!(rpc.put(&key(i), value(i)), ok200(), "put {}", key(i));
                }
            });
        }
    });
}
