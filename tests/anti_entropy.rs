//! Anti-entropy, told as stories against real processes: a node that lost its disk is
//! rebuilt by its peers with no client read at all; replicas that agree exchange hashes and
//! nothing else. (Nodes started with other `-s` servers or `-N` no longer make a layout of
//! their own: they learn the cluster's from their seeds; see tests/membership.rs and the
//! history's unit tests for a daemon whose layout version 1 differs.)

mod common;

use std::time::Duration;

use common::*;

/// How long anti-entropy may take to rebuild a node.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a handful of anti-entropy rounds (or a balancer's ring check) may take.
const ROUNDS_TIMEOUT: Duration = Duration::from_secs(30);

/// Three nodes, N=3 W=2, anti-entropy every 300 ms, holding `keys` keys put through the
/// balancer.
fn three_replicas_holding(keys: usize) -> Cluster {
    let cluster = Cluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(2)
        .aae_interval_ms(300)
        .start();
    cluster.client().put_keys(0..keys, "");
    cluster
}

/// Waits up to `timeout` until `node` holds all `keys` keys again, then checks its copies.
fn wait_until_rebuilt(node: &Rpc, keys: usize, timeout: Duration, what: &str) {
    wait_until(timeout, what, || {
        int_member(&node.stats(), "keys") == keys as i64
    });
    for i in (0..keys).step_by(7) {
        assert_eq!(
            node.local_get(&key(i)),
            Ok(value(i)),
            "C's copy of {}",
            key(i)
        );
    }
}

#[test]
fn a_wiped_node_is_rebuilt_by_its_peers_without_client_reads() {
    const KEYS: usize = 500;
    let mut cluster = three_replicas_holding(KEYS);
    let lb = cluster.client();

    // C loses its disk: killed, its data directory removed, started again on nothing.
    cluster.nodes[2].kill();
    let data_dir = cluster.data_dir(2);
    assert!(data_dir.exists(), "{data_dir:?} was never created");
    std::fs::remove_dir_all(&data_dir).expect("remove C's data directory");
    // Its peers are frozen while it starts, so that nothing reaches it before we looked.
    cluster.nodes[0].stop();
    cluster.nodes[1].stop();
    cluster.nodes[2].restart();
    let node_c = cluster.node_client(2);
    let stats = node_c.stats();
    assert_eq!(int_member(&stats, "keys"), 0, "C starts empty: {stats:?}");
    assert_eq!(node_c.local_get(&key(0)), Ok(Value::Nil), "C starts empty");
    cluster.nodes[0].cont();
    cluster.nodes[1].cont();

    wait_until_rebuilt(
        &node_c,
        KEYS,
        REBUILD_TIMEOUT,
        &format!("C holds all {KEYS} keys again"),
    );
    assert_no_client_reads(&lb);
    assert_eq!(balancer_counter(&lb.stats(), "read_repairs"), 0);
}

/// A peer that hangs (SIGSTOP: it accepts connections and answers nothing) holds up each
/// round only for the few seconds a question about its tree may take: the other two
/// replicas go on repairing each other. Before, every round waited out the hung peer's call
/// timeout (30 s) before it reached the next peer.
#[test]
fn a_hung_peer_holds_up_repairs_between_the_others_only_briefly() {
    const KEYS: usize = 200;
    let mut cluster = three_replicas_holding(KEYS);
    let lb = cluster.client();

    // C loses its disk while A hangs; B alone can rebuild it.
    cluster.nodes[0].stop();
    cluster.nodes[2].kill();
    std::fs::remove_dir_all(cluster.data_dir(2)).expect("remove C's data directory");
    cluster.nodes[2].restart();
    let node_c = cluster.node_client(2);
    // Well within A's call timeouts: a round that waited for A would not get here in time.
    wait_until_rebuilt(
        &node_c,
        KEYS,
        Duration::from_secs(25),
        &format!("C holds all {KEYS} keys again, from B, while A hangs"),
    );
    cluster.nodes[0].cont();
    assert_no_client_reads(&lb);
}

/// Per node: (rounds, in_sync, keys_pushed, keys_pulled, failures).
fn aae_snapshot(nodes: &[Rpc]) -> Vec<[i64; 5]> {
    nodes
        .iter()
        .map(|node| {
            let stats = node.stats();
            [
                "rounds",
                "in_sync",
                "keys_pushed",
                "keys_pulled",
                "failures",
            ]
            .map(|name| aae_counter(&stats, name))
        })
        .collect()
}

/// Has every node started `rounds` more rounds (one exchange with each of its two peers)
/// in `now` than in `since`?
fn rounds_later(since: &[[i64; 5]], now: &[[i64; 5]], rounds: i64) -> bool {
    const EXCHANGES_PER_ROUND: i64 = 2;
    now.iter()
        .zip(since)
        .all(|(now, since)| now[0] >= since[0] + rounds * EXCHANGES_PER_ROUND)
}

#[test]
fn replicas_in_sync_exchange_hashes_and_no_values() {
    let cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(3)
        .aae_interval_ms(200)
        .start();
    let lb = cluster.client();
    let nodes: Vec<Rpc> = (0..3).map(|i| cluster.node_client(i)).collect();
    // W = 3: every put is on every replica when it is acknowledged.
    lb.put_keys(0..300, "");
    let after_writes = aae_snapshot(&nodes);
    wait_until(
        ROUNDS_TIMEOUT,
        "every node ran 3 rounds after the writes",
        || rounds_later(&after_writes, &aae_snapshot(&nodes), 3),
    );

    let before = aae_snapshot(&nodes);
    let mut after = before.clone();
    wait_until(ROUNDS_TIMEOUT, "every node ran 3 more rounds", || {
        after = aae_snapshot(&nodes);
        rounds_later(&before, &after, 3)
    });
    for (i, (before, after)) in before.iter().zip(&after).enumerate() {
        let [_, in_sync_0, pushed_0, pulled_0, failures_0] = *before;
        let [_, in_sync_1, pushed_1, pulled_1, failures_1] = *after;
        assert_eq!(
            (pushed_1, pulled_1),
            (pushed_0, pulled_0),
            "node {i} moved keys (pushed, pulled) between replicas in sync"
        );
        assert!(
            in_sync_1 >= in_sync_0 + 3,
            "node {i}: in_sync went from {in_sync_0} to {in_sync_1} over 3 rounds"
        );
        assert_eq!(failures_1, failures_0, "node {i}: exchanges failed");
    }
    for (i, node) in nodes.iter().enumerate() {
        assert_eq!(int_member(&node.stats(), "keys"), 300, "node {i}");
    }
}

#[test]
fn anti_entropy_does_not_bring_reaped_tombstones_back() {
    // Deleted keys are reaped once every replica holds their tombstones. Anti-entropy runs
    // all the while, and often, to give it every chance to interleave with the reaping: it
    // must not copy a tombstone back to a replica that already reaped it (the tombstone
    // would then sit on every replica with nothing left to reap it). Several rounds of
    // deletes, each left to be reaped, make the interleaving likely.
    let cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .aae_interval_ms(20)
        .tombstone_grace_ms(300)
        .start();
    let lb = cluster.client();
    let nodes: Vec<Rpc> = (0..3).map(|i| cluster.node_client(i)).collect();
    const CYCLES: usize = 5;
    const KEYS: usize = 200;
    for cycle in 0..CYCLES {
        let keys: Vec<String> = (0..KEYS)
            .map(|i| format!("cycle-{cycle}-{}", key(i)))
            .collect();
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(lb.put(k, value(i)), ok200(), "put {k}");
        }
        for k in &keys {
            assert_eq!(lb.delete(k), ok200(), "delete {k}");
        }
        wait_until_ok(
            ROUNDS_TIMEOUT,
            &format!("every tombstone of cycle {cycle} is reaped from every node"),
            || {
                let held: Vec<(i64, i64)> = nodes
                    .iter()
                    .map(|node| {
                        let stats = node.stats();
                        (int_member(&stats, "keys"), int_member(&stats, "tombstones"))
                    })
                    .collect();
                if held
                    .iter()
                    .all(|&(keys, tombstones)| keys == 0 && tombstones == 0)
                {
                    Ok(())
                } else {
                    Err(format!(
                        "nodes' (keys, tombstones): {held:?}; balancer reaps: {} of {} deletes",
                        balancer_counter(&lb.stats(), "reaps"),
                        (cycle + 1) * KEYS
                    ))
                }
            },
        );
    }
    assert_eq!(balancer_counter(&lb.stats(), "gets"), 0, "no client read");
}
