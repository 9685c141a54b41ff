//! Keys a node no longer replicates are handed to their replicas, then dropped; and a data
//! directory from before partitions is rewritten at start (keys stored by partition).
//!
//! A node's data can hold keys it does not replicate when the layout changed under it: data
//! written under the ring of virtual nodes, or a layout version that moved partitions away
//! from it. The story here is the second: four durable nodes hold 300 keys at N = 3; a fifth
//! node joins (`cluster.stage_add` + `cluster.apply`), so about a fifth of the replicas change
//! hands. The new node pulls its partitions; once the transition is over every node hands
//! what it no longer replicates to the key's replicas and drops it, and every key reads back,
//! held by exactly its three replicas.

mod common;

use std::time::Duration;

use common::*;

/// How long the rehoming passes (and anti-entropy) may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const KEYS: usize = 300;

/// A durable node on `port` with `peers`, its data in `dir/node-{i}`.
fn node(dir: &std::path::Path, i: usize, port: u16, servers: &[String]) -> Daemon {
    let data = dir.join(format!("node-{i}"));
    let mut args = vec![
        "--data-dir".to_owned(),
        data.to_string_lossy().into_owned(),
        "-N".to_owned(),
        "3".to_owned(),
        "--aae-interval-ms".to_owned(),
        "500".to_owned(),
    ];
    args.extend(peer_args(servers, i));
    Daemon::storage_node(dir, &format!("node-{i}"), port, &args)
}

fn balancer(dir: &std::path::Path, servers: &[String]) -> Daemon {
    let args = ["-N", "3", "-R", "2", "-W", "2"].map(str::to_owned);
    Daemon::load_balancer(dir, "balancer", free_port(), servers, &args)
}

/// Each node's own copy of `key`, by node.
fn holders(nodes: &[Daemon], servers: &[String], key: &str) -> Vec<String> {
    nodes
        .iter()
        .zip(servers)
        .filter(|(node, _)| {
            node.rpc()
                .local_get(key)
                .is_ok_and(|value| value != Value::Nil)
        })
        .map(|(_, address)| address.clone())
        .collect()
}

#[test]
fn a_fifth_node_takes_its_share_and_the_others_let_go() {
    let dir = tempfile::tempdir().expect("temp dir");
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let all: Vec<String> = ports.iter().map(|&port| addr(port)).collect();
    let four = all[..4].to_vec();

    let mut nodes: Vec<Daemon> = (0..4)
        .map(|i| node(dir.path(), i, ports[i], &four))
        .collect();
    let lb = balancer(dir.path(), &four);
    lb.rpc().put_keys(0..KEYS, "on four nodes");
    wait_until(SETTLE_TIMEOUT, "every key is on its three replicas", || {
        (0..KEYS).all(|i| holders(&nodes, &four, &key(i)).len() == 3)
    });
    let will_move = (0..KEYS)
        .filter(|&i| replicas_of(&four, &key(i), 3) != replicas_of(&all, &key(i), 3))
        .count();
    assert!(
        will_move > KEYS / 10,
        "the fifth node changes the replicas of {will_move} keys"
    );

    // A fifth node joins: started with one member as its seed, staged, applied.
    let data = dir.path().join("node-4");
    let args: Vec<String> = [
        "--data-dir",
        &data.to_string_lossy(),
        "-N",
        "3",
        "--aae-interval-ms",
        "500",
        "-s",
        &all[0],
    ]
    .map(str::to_owned)
    .to_vec();
    nodes.push(Daemon::storage_node(dir.path(), "node-4", ports[4], &args));
    let admin = lb.rpc();
    assert_eq!(
        admin.call("cluster.stage_add", vec![s(&all[4])]),
        Ok(s("200"))
    );
    let applied = admin
        .call("cluster.apply", vec![Value::Integer(2)])
        .expect("apply");
    assert_eq!(int(member(&applied, "version")), 2);
    wait_until(SETTLE_TIMEOUT, "the transition ends", || {
        let status = admin.call("cluster.status", vec![]).expect("status");
        member(&status, "transition") == &Value::Boolean(false)
    });

    wait_until(
        SETTLE_TIMEOUT,
        "every key is held by exactly its replicas under the new layout",
        || {
            (0..KEYS).all(|i| {
                let mut expected = replicas_of(&all, &key(i), 3);
                expected.sort();
                holders(&nodes, &all, &key(i)) == expected
            })
        },
    );
    let rehomed: i64 = nodes
        .iter()
        .map(|node| int_member(&node.rpc().stats(), "rehomed"))
        .sum();
    assert!(
        rehomed > 0,
        "the nodes that lost keys handed them over and dropped them"
    );
    for node in &nodes {
        assert_eq!(int_member(&node.rpc().stats(), "rehome_left"), 0);
    }
    let client = lb.rpc();
    for i in 0..KEYS {
        assert_eq!(client.get(&key(i)), Ok(value(i)), "get {}", key(i));
    }
}

/// A data directory written before keys were stored by partition (each key its own engine
/// key) opens with its keys rewritten, once, and every value reads back: the node's own
/// copy at once, and through a balancer.
#[test]
fn a_data_directory_from_before_partitions_is_converted_at_start() {
    use dynamite::storage::{self, StorageConfig, Tree, WriteOp};
    use dynamite::version::Siblings;

    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("node-0");
    {
        // Written as the old code wrote it: a key's sibling set under the key itself.
        let engine = storage::open(&StorageConfig::Log {
            dir: data.clone(),
            recovery: storage::Recovery::Refuse,
        })
        .expect("open");
        let writes = (0..500)
            .map(|i| {
                let mut siblings = Siblings::new();
                let text = format!("<value><string>value-{i:04}</string></value>");
                siblings.write(7, None, Some(text), 1_000_000 + i as u64);
                WriteOp::put(Tree::Data, key(i).into_bytes(), siblings.encode())
            })
            .collect();
        engine.write(writes).expect("write");
        engine.sync().expect("sync");
    }
    let port = free_port();
    let args = vec!["--data-dir".to_owned(), data.to_string_lossy().into_owned()];
    let node = Daemon::storage_node(dir.path(), "node-0", port, &args);
    let stats = node.rpc().stats();
    assert_eq!(
        int_member(&stats, "keys"),
        500,
        "every key counted: {stats:?}"
    );
    for i in [0, 250, 499] {
        assert_eq!(node.rpc().local_get(&key(i)), Ok(value(i)), "{}", key(i));
    }
    let lb = Daemon::load_balancer(
        dir.path(),
        "balancer",
        free_port(),
        &[addr(port)],
        &["-N".to_owned(), "1".to_owned()],
    );
    for i in 0..500 {
        assert_eq!(lb.rpc().get(&key(i)), Ok(value(i)), "get {}", key(i));
    }
    // Opened again, nothing is left to convert, and everything is still there.
    drop(lb);
    let mut node = node;
    node.restart();
    assert_eq!(int_member(&node.rpc().stats(), "keys"), 500);
    assert!(
        node.logs().contains("rewrote the keys"),
        "the first start said so"
    );
}
