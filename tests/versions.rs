//! Versions as a client sees them: vector clocks and siblings (concurrent writes are all
//! kept, sequential ones collapse), contexts, read repair, tombstones that keep a deleted value
//! from coming back, tombstones that are reaped once every replica holds them, and writes a
//! fallback coordinates.
//!
//! The daemons run inside the test process ([`InProcessCluster`]): none of these stories needs
//! a signal or a crash, so they run faster, and a breakpoint or a `tracing` subscriber
//! (`RUST_LOG=debug cargo test --test versions -- --nocapture`) sees every daemon. A node that
//! "dies" here is stopped: it answers nothing, its runtime is gone, and a durable one comes back
//! on its data directory. Stories that need a real crash or a frozen process are in
//! `failures.rs` and `cluster.rs`.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

/// How long a node may take to be seen down, or up again, by a balancer.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a background mechanism (read repair, reaping, anti-entropy) may take to act.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until the balancer behind `lb` sees `address` in `state`.
fn wait_for_state(lb: &Rpc, address: &str, state: &str) {
    wait_until(
        DETECTION_TIMEOUT,
        &format!("the balancer shows {address} {state:?}"),
        || server_state(&lb.stats(), address).0 == state,
    );
}

// ---------------------------------------------------------------------------------------------
// Siblings
// ---------------------------------------------------------------------------------------------

/// Two clients writing from the same context through different balancers make two siblings,
/// and a write from the context that saw both replaces them.
#[test]
fn two_writers_from_one_context_through_two_balancers_make_siblings_that_a_merge_collapses() {
    let cluster = InProcessCluster::builder()
        .nodes(3)
        .balancers(2)
        .in_memory()
        .start();
    let (a, b) = (cluster.balancers[0].rpc(), cluster.balancers[1].rpc());

    assert_eq!(a.put("cart", s("v0")), ok200());
    let (values, context) = a.get_versions("cart").expect("get_versions");
    assert_eq!(values, vec![s("v0")]);
    assert!(!context.is_empty(), "an existing key has a context");

    // Two clients read the same version, then each writes its own change from it.
    assert_eq!(a.put_with_context("cart", s("left"), &context), ok200());
    assert_eq!(b.put_with_context("cart", s("right"), &context), ok200());

    // Neither write saw the other: both are kept, the later one first, and a get through
    // either balancer shows the one written last.
    let mut merged_context = String::new();
    for (name, lb) in [("A", &a), ("B", &b)] {
        let (values, context) = lb.get_versions("cart").expect("get_versions");
        assert_eq!(
            values,
            vec![s("right"), s("left")],
            "siblings through balancer {name}"
        );
        assert_eq!(
            lb.get("cart"),
            Ok(s("right")),
            "get through balancer {name}"
        );
        merged_context = context;
    }

    // A client that saw both versions writes their reconciliation: it supersedes both.
    assert_eq!(
        b.put_with_context("cart", s("merged"), &merged_context),
        ok200()
    );
    for (name, lb) in [("A", &a), ("B", &b)] {
        let (values, _) = lb.get_versions("cart").expect("get_versions");
        assert_eq!(values, vec![s("merged")], "after the merge, through {name}");
        assert_eq!(lb.get("cart"), Ok(s("merged")), "get through {name}");
    }
}

/// Writes from one stale context are concurrent however they arrive: one after the other or
/// eight at once through one balancer, every one is kept until a write resolves them.
#[test]
fn writes_from_one_context_through_one_balancer_are_siblings_too() {
    let cluster = InProcessCluster::builder().nodes(3).in_memory().start();
    let lb = cluster.client();

    // One after the other, both from the same stale context.
    assert_eq!(lb.put("doc", s("v0")), ok200());
    let (_, context) = lb.get_versions("doc").expect("get_versions");
    assert_eq!(lb.put_with_context("doc", s("first"), &context), ok200());
    assert_eq!(lb.put_with_context("doc", s("second"), &context), ok200());
    let (values, context) = lb.get_versions("doc").expect("get_versions");
    assert_eq!(values, vec![s("second"), s("first")]);
    assert_eq!(lb.get("doc"), Ok(s("second")));

    // At the same moment: eight clients, each on its own connection to the same balancer,
    // all writing from the context that holds both siblings above.
    const WRITERS: usize = 8;
    let port = cluster.balancer_port(0);
    let barrier = Arc::new(Barrier::new(WRITERS));
    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let (barrier, context) = (barrier.clone(), context.clone());
            std::thread::spawn(move || {
                let client = Rpc::new(port);
                barrier.wait();
                client.put_with_context("doc", s(&format!("writer-{i}")), &context)
            })
        })
        .collect();
    for (i, writer) in writers.into_iter().enumerate() {
        assert_eq!(writer.join().expect("writer thread"), ok200(), "writer {i}");
    }

    // Every concurrent write survives; the two it superseded are gone.
    let (values, context) = lb.get_versions("doc").expect("get_versions");
    let got: BTreeSet<&str> = values.iter().map(string).collect();
    let expected: BTreeSet<String> = (0..WRITERS).map(|i| format!("writer-{i}")).collect();
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(got, expected, "siblings after {WRITERS} concurrent writes");
    assert_eq!(values.len(), WRITERS, "no sibling twice: {values:?}");
    // get shows the sibling listed first (the latest).
    assert_eq!(lb.get("doc"), Ok(values[0].clone()));

    assert_eq!(lb.put_with_context("doc", s("resolved"), &context), ok200());
    assert_eq!(
        lb.get_versions("doc").expect("get_versions").0,
        vec![s("resolved")]
    );
}

/// Puts without a context, one after the other through alternating balancers, each replace
/// the previous value: a blind write supersedes what entered the cluster before it.
#[test]
fn blind_puts_one_after_another_through_two_balancers_never_make_siblings() {
    let cluster = InProcessCluster::builder()
        .nodes(3)
        .balancers(2)
        .in_memory()
        .start();
    let lbs = [cluster.balancers[0].rpc(), cluster.balancers[1].rpc()];

    for i in 0..30 {
        let (writer, reader) = (&lbs[i % 2], &lbs[(i + 1) % 2]);
        let written = s(&format!("write-{i}"));
        assert_eq!(writer.put("counter", written.clone()), ok200(), "put #{i}");
        for (name, lb) in [("writer", writer), ("the other balancer", reader)] {
            let (values, context) = lb.get_versions("counter").expect("get_versions");
            assert_eq!(
                values,
                vec![written.clone()],
                "after blind put #{i}, through {name}"
            );
            assert!(!context.is_empty());
        }
        assert_eq!(reader.get("counter"), Ok(written), "get after put #{i}");
    }
}

// ---------------------------------------------------------------------------------------------
// Read repair
// ---------------------------------------------------------------------------------------------

/// A replica that was down during 50 writes gets every key back from the reads that find it
/// stale (read repair), with anti-entropy off.
#[test]
fn a_get_repairs_a_replica_that_missed_the_writes() {
    let mut cluster = InProcessCluster::builder()
        .nodes(3)
        .replicas(3)
        .read_quorum(2)
        .write_quorum(2)
        .aae_off()
        .start();
    let lb = cluster.client();
    let c = cluster.nodes[2].addr();

    cluster.nodes[2].stop();
    lb.put_keys(0..50, "with C dead");

    // C comes back with its disk, but it missed every write.
    cluster.nodes[2].start();
    let node_c = cluster.node_client(2);
    for i in 0..50 {
        assert_eq!(
            node_c.local_get(&key(i)),
            Ok(Value::Nil),
            "C holds {}",
            key(i)
        );
    }
    wait_for_state(&lb, &c, "up");
    let repairs_before = balancer_counter(&lb.stats(), "read_repairs");

    // One read of each key, answered by any two replicas; C's stale answer is mended after.
    for i in 0..50 {
        assert_eq!(lb.get(&key(i)), Ok(value(i)), "get {}", key(i));
    }
    wait_until(
        CONVERGENCE_TIMEOUT,
        "read repair gave C every key that was read",
        || (0..50).all(|i| node_c.local_get(&key(i)) == Ok(value(i))),
    );
    let repairs = balancer_counter(&lb.stats(), "read_repairs") - repairs_before;
    assert!(
        repairs >= 50,
        "read_repairs grew by {repairs}; C was stale on 50 keys"
    );
    assert_eq!(int_member(&node_c.stats(), "keys"), 50);
}

/// A replica that missed a delete still holds the value; a read returns nothing and carries
/// the tombstone to it.
#[test]
fn a_replica_that_missed_a_delete_does_not_bring_the_value_back_on_read() {
    let mut cluster = InProcessCluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(2)
        .aae_off()
        .never_reap()
        .start();
    let lb = cluster.client();
    let c = cluster.nodes[2].addr();
    let node_c = cluster.node_client(2);

    assert_eq!(lb.put("ghost", s("boo")), ok200());
    wait_until(CONVERGENCE_TIMEOUT, "C holds ghost", || {
        node_c.local_get("ghost") == Ok(s("boo"))
    });

    cluster.nodes[2].stop();
    assert_eq!(lb.delete("ghost"), ok200());
    cluster.nodes[2].start();
    // C still has the value it had before the delete.
    assert_eq!(
        node_c.local_get("ghost"),
        Ok(s("boo")),
        "C's copy after its restart"
    );
    wait_for_state(&lb, &c, "up");

    // The tombstone wins over C's older value, and the read carries it to C.
    assert_eq!(lb.get("ghost"), Ok(Value::Nil));
    assert_eq!(lb.get_versions("ghost"), Ok((vec![], String::new())));
    wait_until(
        CONVERGENCE_TIMEOUT,
        "read repair gave C the tombstone",
        || node_c.local_get("ghost") == Ok(Value::Nil),
    );
    let stats = node_c.stats();
    assert_eq!(int_member(&stats, "keys"), 0, "C's stats {stats:?}");
    assert_eq!(int_member(&stats, "tombstones"), 1, "C's stats {stats:?}");
    assert_eq!(lb.get("ghost"), Ok(Value::Nil));
}

/// A replica that missed a delete gets the tombstone from anti-entropy alone, with no client
/// read, and the value stays gone across its next restart.
#[test]
fn a_replica_that_missed_a_delete_gets_the_tombstone_by_anti_entropy_without_reads() {
    let mut cluster = InProcessCluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(2)
        .aae_interval_ms(200)
        .never_reap()
        .start();
    let lb = cluster.client();
    let node_c = cluster.node_client(2);

    assert_eq!(lb.put("ghost", s("boo")), ok200());
    wait_until(CONVERGENCE_TIMEOUT, "C holds ghost", || {
        node_c.local_get("ghost") == Ok(s("boo"))
    });

    cluster.nodes[2].stop();
    assert_eq!(lb.delete("ghost"), ok200());

    // Take the other replicas down while C restarts, so that nothing reaches C before we
    // looked at its copy: it still holds the value. They keep their disks.
    cluster.nodes[0].stop();
    cluster.nodes[1].stop();
    cluster.nodes[2].start();
    assert_eq!(
        node_c.local_get("ghost"),
        Ok(s("boo")),
        "C's copy after its restart"
    );
    cluster.nodes[0].start();
    cluster.nodes[1].start();

    // No client reads anything: anti-entropy alone brings C the tombstone.
    wait_until(
        CONVERGENCE_TIMEOUT,
        "anti-entropy gave C the tombstone",
        || node_c.local_get("ghost") == Ok(Value::Nil),
    );
    let stats = lb.stats();
    assert_eq!(balancer_counter(&stats, "gets"), 0);
    assert_eq!(balancer_counter(&stats, "get_versions"), 0);
    assert_eq!(balancer_counter(&stats, "read_repairs"), 0);
    let moved: i64 = cluster
        .node_clients()
        .iter()
        .map(|node| {
            let stats = node.stats();
            aae_counter(&stats, "keys_pushed") + aae_counter(&stats, "keys_pulled")
        })
        .sum();
    assert!(moved > 0, "no node reports a key moved by anti-entropy");
    assert_eq!(int_member(&node_c.stats(), "tombstones"), 1);

    // The value never comes back: not through the balancer, not after C restarts again.
    assert_eq!(lb.get("ghost"), Ok(Value::Nil));
    assert_eq!(lb.get_versions("ghost"), Ok((vec![], String::new())));
    cluster.nodes[2].restart();
    assert_eq!(
        node_c.local_get("ghost"),
        Ok(Value::Nil),
        "C after a second restart"
    );
    assert_eq!(lb.get("ghost"), Ok(Value::Nil));
}

// ---------------------------------------------------------------------------------------------
// Reaping tombstones
// ---------------------------------------------------------------------------------------------

/// Deleted keys leave no tombstone behind once every replica holds one and the grace period
/// is over: the reads reap them.
#[test]
fn tombstones_are_reaped_once_every_replica_has_them() {
    let cluster = InProcessCluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .tombstone_grace_ms(300)
        .start();
    let lb = cluster.client();
    let nodes = cluster.node_clients();

    lb.put_keys(0..20, "");
    for i in 0..20 {
        assert_eq!(lb.delete(&key(i)), ok200(), "delete {}", key(i));
    }

    wait_until(
        CONVERGENCE_TIMEOUT,
        "every node reaped every tombstone",
        || {
            nodes.iter().all(|node| {
                let stats = node.stats();
                int_member(&stats, "tombstones") == 0 && int_member(&stats, "keys") == 0
            })
        },
    );
    for i in 0..20 {
        assert_eq!(lb.get(&key(i)), Ok(Value::Nil), "get {}", key(i));
        assert_eq!(lb.get_versions(&key(i)), Ok((vec![], String::new())));
    }
    let reaps = balancer_counter(&lb.stats(), "reaps");
    assert!(reaps >= 20, "reaps = {reaps} after 20 deletes were reaped");
}

/// With a replica down, the tombstones it must still receive are kept (the fallback holds its
/// copy as a hint) while the other keys' are reaped; once it is back and has them, they go too.
#[test]
fn tombstones_are_kept_while_a_replica_that_needs_them_is_down() {
    // Four nodes, N = 3: with X down, the keys X replicates keep their tombstones, the others
    // are reaped, which also tells the test that the grace period is over.
    let mut cluster = InProcessCluster::builder()
        .nodes(4)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .aae_off()
        .tombstone_grace_ms(300)
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let x = servers[0].clone();
    let replicas: Vec<Vec<String>> = (0..40).map(|i| replicas_of(&servers, &key(i), 3)).collect();
    let (blocked, free): (Vec<usize>, Vec<usize>) =
        (0..40).partition(|&i| replicas[i].contains(&x));
    assert!(
        !blocked.is_empty() && !free.is_empty(),
        "40 keys all on one side of X"
    );

    lb.put_keys(0..40, "");
    cluster.nodes[0].stop();
    // A read that involves X makes the balancer notice it is gone.
    assert_eq!(lb.get(&key(blocked[0])), Ok(value(blocked[0])));
    wait_for_state(&lb, &x, "down");

    // The keys X replicates are deleted first, so that once any of the others was reaped, the
    // grace period of every tombstone is over.
    for &i in blocked.iter().chain(&free) {
        assert_eq!(lb.delete(&key(i)), ok200(), "delete {}", key(i));
    }
    // Deleted is deleted, whichever replicas took the delete.
    for (i, replicas) in replicas.iter().enumerate() {
        let x_first = replicas[0] == x;
        assert_eq!(
            lb.get(&key(i)),
            Ok(Value::Nil),
            "get {} after its delete (X first of its replicas: {x_first})",
            key(i)
        );
        assert_eq!(
            lb.get_versions(&key(i)),
            Ok((vec![], String::new())),
            "get_versions {} after its delete (X first of its replicas: {x_first})",
            key(i)
        );
    }
    let live: Vec<(String, Rpc)> = (1..4)
        .map(|i| (servers[i].clone(), cluster.node_client(i)))
        .collect();
    let expected_tombstones = |address: &str| {
        blocked
            .iter()
            .filter(|&&i| replicas[i].iter().any(|r| r == address))
            .count() as i64
    };
    wait_until_ok(
        CONVERGENCE_TIMEOUT,
        "the keys X does not replicate are reaped, X's keep their tombstones",
        || {
            let reaps = balancer_counter(&lb.stats(), "reaps");
            let seen: Vec<(i64, i64, i64)> = live
                .iter()
                .map(|(address, node)| {
                    let stats = node.stats();
                    (
                        int_member(&stats, "keys"),
                        int_member(&stats, "tombstones"),
                        expected_tombstones(address),
                    )
                })
                .collect();
            let done = reaps >= free.len() as i64
                && seen
                    .iter()
                    .all(|&(keys, held, expected)| keys == 0 && held == expected);
            if done {
                Ok(())
            } else {
                Err(format!(
                    "reaps {reaps} of {} free keys; live nodes' (keys, tombstones, expected \
                     tombstones): {seen:?}",
                    free.len()
                ))
            }
        },
    );
    let reaps = balancer_counter(&lb.stats(), "reaps");
    let hints: i64 = live
        .iter()
        .map(|(_, node)| int_member(&node.stats(), "hints"))
        .sum();
    assert_eq!(
        hints,
        blocked.len() as i64,
        "the fallback holds X's tombstones"
    );

    // Reads after the grace period find only two of three replicas: no reaping.
    let gets_before = balancer_counter(&lb.stats(), "gets");
    for pass in 0..3 {
        for &i in &blocked {
            assert_eq!(
                lb.get(&key(i)),
                Ok(Value::Nil),
                "pass {pass}: get {}",
                key(i)
            );
        }
    }
    let stats = lb.stats();
    assert_eq!(
        balancer_counter(&stats, "gets") - gets_before,
        3 * blocked.len() as i64
    );
    assert_eq!(
        balancer_counter(&stats, "reaps"),
        reaps,
        "a key was reaped with a replica down"
    );
    for (address, node) in &live {
        let stats = node.stats();
        assert_eq!(
            int_member(&stats, "tombstones"),
            expected_tombstones(address),
            "tombstones on {address} after reads with X down: {stats:?}"
        );
    }

    // X comes back, the fallback hands the tombstones over, and reads reap them at last.
    cluster.nodes[0].start();
    wait_for_state(&lb, &x, "up");
    let all = cluster.node_clients();
    wait_until(CONVERGENCE_TIMEOUT, "every hint is handed off", || {
        all.iter()
            .all(|node| int_member(&node.stats(), "hints") == 0)
    });
    for &i in &blocked {
        assert_eq!(lb.get(&key(i)), Ok(Value::Nil), "get {}", key(i));
    }
    wait_until(
        CONVERGENCE_TIMEOUT,
        "the tombstones are reaped once X has them",
        || {
            all.iter()
                .all(|node| int_member(&node.stats(), "tombstones") == 0)
        },
    );
    assert!(balancer_counter(&lb.stats(), "reaps") >= reaps + blocked.len() as i64);
}

// ---------------------------------------------------------------------------------------------
// Writes coordinated by a fallback
// ---------------------------------------------------------------------------------------------

/// A put or delete without a context, coordinated by a fallback because the key's first
/// replica is down, still replaces the old value: no sibling, nothing comes back.
#[test]
fn a_blind_put_or_delete_while_the_first_replica_is_down_supersedes_the_old_value() {
    // Four nodes, N = 3: with X down, a key whose preference list starts with X is written
    // through a fallback. A write without a context is still a plain overwrite (or delete)
    // of what the key held: no sibling, no surviving old value.
    let mut cluster = InProcessCluster::builder()
        .nodes(4)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .aae_off()
        .never_reap()
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let x = servers[0].clone();
    let led_by_x: Vec<String> = (0..)
        .map(key)
        .filter(|k| replicas_of(&servers, k, 3)[0] == x)
        .take(10)
        .collect();

    for k in &led_by_x {
        assert_eq!(lb.put(k, s("old")), ok200(), "put {k}");
    }
    cluster.nodes[0].stop();
    assert_eq!(lb.get(&led_by_x[0]), Ok(s("old")));
    wait_for_state(&lb, &x, "down");

    let (overwritten, deleted) = led_by_x.split_at(5);
    for k in overwritten {
        assert_eq!(lb.put(k, s("new")), ok200(), "put {k} with X down");
        assert_eq!(
            lb.get_versions(k).map(|(values, _)| values),
            Ok(vec![s("new")]),
            "{k} after a blind put with X down"
        );
        assert_eq!(lb.get(k), Ok(s("new")), "get {k}");
    }
    for k in deleted {
        assert_eq!(lb.delete(k), ok200(), "delete {k} with X down");
        assert_eq!(
            lb.get(k),
            Ok(Value::Nil),
            "get {k} after its delete with X down"
        );
        assert_eq!(
            lb.get_versions(k),
            Ok((vec![], String::new())),
            "get_versions {k} after its delete with X down"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Edges of get_versions and contexts
// ---------------------------------------------------------------------------------------------

/// A context returned by `get_versions` supersedes every version it has seen: a put with it
/// leaves only the new value, a delete with it leaves nothing.
#[test]
fn a_context_supersedes_every_version_it_has_seen() {
    let cluster = InProcessCluster::builder().nodes(3).in_memory().start();
    let lb = cluster.client();

    assert_eq!(
        lb.get_versions("never-written"),
        Ok((vec![], String::new()))
    );

    // Two writes without a context: the second may supersede the first or become its
    // sibling; either way it is the one a get returns, being the later by wall clock.
    assert_eq!(lb.put("cart", s("first")), ok200());
    // Not synchronisation: only so that the two writes carry distinct wall-clock times.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(lb.put("cart", s("second")), ok200());
    assert_eq!(lb.get("cart"), Ok(s("second")));

    let (values, context) = lb.get_versions("cart").expect("get_versions");
    assert!(
        values.contains(&s("second")),
        "versions {values:?} lack the last write"
    );
    assert!(
        values.iter().all(|v| *v == s("first") || *v == s("second")),
        "versions {values:?} hold something never written"
    );
    assert!(
        !context.is_empty(),
        "an existing key has a non-empty context"
    );

    // A write with that context replaces every version it saw.
    assert_eq!(lb.put_with_context("cart", s("merged"), &context), ok200());
    let (values, context) = lb.get_versions("cart").expect("get_versions");
    assert_eq!(values, vec![s("merged")]);
    assert_eq!(lb.get("cart"), Ok(s("merged")));

    // And so does a delete with a context.
    assert_eq!(lb.delete_with_context("cart", &context), ok200());
    assert_eq!(lb.get("cart"), Ok(Value::Nil));
    assert_eq!(lb.get_versions("cart"), Ok((vec![], String::new())));
}

/// `get_versions` of a missing or deleted key is empty, and a context that is not one the
/// store handed out is refused with -32602 without writing anything.
#[test]
fn missing_and_deleted_keys_have_no_versions_and_garbage_contexts_are_refused() {
    let cluster = InProcessCluster::builder().nodes(3).in_memory().start();
    let lb = cluster.client();

    assert_eq!(
        lb.get_versions("never-written"),
        Ok((vec![], String::new()))
    );

    assert_eq!(lb.put("gone", s("soon")), ok200());
    assert_eq!(lb.delete("gone"), ok200());
    assert_eq!(lb.get_versions("gone"), Ok((vec![], String::new())));
    assert_eq!(lb.get("gone"), Ok(Value::Nil));

    assert_eq!(lb.put("kept", s("original")), ok200());
    for garbage in ["not a context!", "AAAA", "////", "\u{e9}t\u{e9}"] {
        match lb.put_with_context("kept", s("overwritten"), garbage) {
            Err((-32602, _)) => {}
            other => panic!("put with context {garbage:?}: expected fault -32602, got {other:?}"),
        }
        match lb.delete_with_context("kept", garbage) {
            Err((-32602, _)) => {}
            other => {
                panic!("delete with context {garbage:?}: expected fault -32602, got {other:?}")
            }
        }
    }
    // A context that is not even a string.
    match lb.call("put", vec![s("kept"), s("overwritten"), Value::Integer(7)]) {
        Err((-32602, _)) => {}
        other => panic!("put with an int context: expected fault -32602, got {other:?}"),
    }
    // Nothing refused was written.
    assert_eq!(
        lb.get_versions("kept").expect("get_versions").0,
        vec![s("original")]
    );
}

/// Concurrent siblings are bounded: past the bound a put is refused with a fault naming
/// siblings, and a write with the full context resolves them.
#[test]
fn siblings_stop_piling_up_until_a_write_resolves_them() {
    // Every put from the same stale context (here: the empty context of a missing key) is
    // concurrent with all the others, so each adds a sibling. Past the bound the store refuses
    // with a fault that says how to resolve them, and a write with the full context does.
    let cluster = InProcessCluster::builder().in_memory().start();
    let lb = cluster.client();
    let (_, empty) = lb.get_versions("crowded").expect("get_versions");
    assert_eq!(empty, "");
    let mut accepted = 0;
    let refusal = loop {
        match lb.put_with_context("crowded", s(&format!("v{accepted}")), &empty) {
            Ok(_) => accepted += 1,
            Err(fault) => break fault,
        }
        assert!(accepted <= 1000, "siblings are never bounded");
    };
    assert_eq!(refusal.0, -32602, "{refusal:?}");
    assert!(refusal.1.contains("siblings"), "{refusal:?}");
    let (values, context) = lb.get_versions("crowded").expect("get_versions");
    assert_eq!(values.len(), accepted);
    assert_eq!(
        lb.put_with_context("crowded", s("resolved"), &context),
        ok200()
    );
    assert_eq!(
        lb.get_versions("crowded").expect("get_versions").0,
        vec![s("resolved")]
    );
}
