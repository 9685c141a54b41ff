//! Failures, told as stories against real processes: a balancer notices a dead node and
//! notices it coming back; while a replica is down its writes go to a fallback with a hint
//! (sloppy quorum) and reach it once it is back (hinted handoff); a cluster with no spare
//! node heals by anti-entropy; a hung node costs one timeout, not one per request.
//!
//! (Every process of a cluster SIGKILLed and restarted is in `cluster.rs`.)

mod common;

use std::time::Duration;

use common::*;

/// How long a node may take to be seen down, or up again, by a balancer.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a background mechanism (handoff, anti-entropy) may take to act.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);

fn state_of(lb: &Rpc, address: &str) -> String {
    server_state(&lb.stats(), address).0
}

#[test]
fn a_dead_node_is_marked_down_and_the_prober_sees_it_come_back() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .timeout_ms(500)
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    for address in &servers {
        assert_eq!(state_of(&lb, address), "up", "{address} before any failure");
    }

    cluster.nodes[1].kill();
    lb.put_keys(0..5, "");
    wait_until(DETECTION_TIMEOUT, "the dead node is shown down", || {
        state_of(&lb, &servers[1]) == "down"
    });
    let stats = lb.stats();
    let (_, last_error) = server_state(&stats, &servers[1]);
    assert!(
        last_error.as_deref().is_some_and(|e| !e.trim().is_empty()),
        "a down server comes with its last error: {stats:?}"
    );
    for live in [&servers[0], &servers[2]] {
        assert_eq!(server_state(&stats, live).0, "up", "{live}: {stats:?}");
    }

    // Back, and found back by the prober alone: no client request in between.
    let requests = |stats: &Value| {
        ["puts", "gets", "get_versions", "deletes"]
            .iter()
            .map(|c| balancer_counter(stats, c))
            .sum::<i64>()
    };
    let before = requests(&stats);
    cluster.nodes[1].restart();
    wait_until(DETECTION_TIMEOUT, "the restarted node is shown up", || {
        state_of(&lb, &servers[1]) == "up"
    });
    assert_eq!(requests(&lb.stats()), before, "no client request was made");
    for i in 0..5 {
        assert_eq!(lb.get(&key(i)), Ok(value(i)));
    }
}

#[test]
fn writes_for_a_dead_node_are_hinted_and_handed_off_when_it_returns() {
    let mut cluster = Cluster::builder()
        .nodes(4)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .aae_off()
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let x = servers[1].clone();
    const KEYS: usize = 200;
    let owned_by_x: Vec<bool> = (0..KEYS)
        .map(|i| replicas_of(&servers, &key(i), 3).contains(&x))
        .collect();
    let x_keys = owned_by_x.iter().filter(|&&owned| owned).count();
    assert!(x_keys > 0, "X replicates none of {KEYS} keys");

    cluster.nodes[1].kill();
    // A read that involves X makes the balancer notice it is gone.
    let probe = (0..)
        .map(|i| format!("probe-{i}"))
        .find(|k| replicas_of(&servers, k, 3).contains(&x))
        .expect("some key lives on X");
    assert_eq!(lb.get(&probe), Ok(Value::Nil));
    wait_until(DETECTION_TIMEOUT, "X is shown down", || {
        state_of(&lb, &x) == "down"
    });

    lb.put_keys(0..KEYS, "with X dead");
    let live: Vec<Rpc> = [0, 2, 3].iter().map(|&i| cluster.node_client(i)).collect();
    let hints = || -> i64 {
        live.iter()
            .map(|node| int_member(&node.stats(), "hints"))
            .sum()
    };
    // Every write X should have taken waits at a fallback, one hint per key.
    wait_until(
        CONVERGENCE_TIMEOUT,
        &format!("the live nodes hold {x_keys} hints for X"),
        || hints() == x_keys as i64,
    );
    for i in 0..KEYS {
        assert_eq!(lb.get(&key(i)), Ok(value(i)), "get {} with X dead", key(i));
    }

    // X returns, empty: the fallbacks hand it what it missed.
    cluster.nodes[1].restart();
    let all = nodes_of(&cluster);
    wait_until(CONVERGENCE_TIMEOUT, "every hint is handed off", || {
        all.iter()
            .all(|node| int_member(&node.stats(), "hints") == 0)
    });
    let node_x = cluster.node_client(1);
    for (i, &owned) in owned_by_x.iter().enumerate() {
        let expected = if owned { value(i) } else { Value::Nil };
        assert_eq!(
            node_x.local_get(&key(i)),
            Ok(expected),
            "X's own copy of {} (a replica: {owned})",
            key(i)
        );
    }
    assert_eq!(int_member(&node_x.stats(), "keys"), x_keys as i64);
}

#[test]
fn with_no_spare_node_a_returning_node_is_healed_by_anti_entropy_without_reads() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .aae_interval_ms(300)
        .start();
    let lb = cluster.client();

    cluster.nodes[2].kill();
    lb.put_keys(0..100, "with C dead");
    // Every server is in every key's preference list: there is no fallback to hold hints.
    for i in 0..2 {
        let stats = cluster.node_client(i).stats();
        assert_eq!(int_member(&stats, "hints"), 0, "node {i}: {stats:?}");
        assert_eq!(int_member(&stats, "keys"), 100, "node {i}: {stats:?}");
    }

    cluster.nodes[2].restart();
    let node_c = cluster.node_client(2);
    wait_until(CONVERGENCE_TIMEOUT, "C holds all 100 keys again", || {
        int_member(&node_c.stats(), "keys") == 100
    });
    for i in 0..100 {
        assert_eq!(
            node_c.local_get(&key(i)),
            Ok(value(i)),
            "C's copy of {}",
            key(i)
        );
    }
    assert_no_client_reads(&lb);
    for node in nodes_of(&cluster) {
        assert_eq!(int_member(&node.stats(), "hints"), 0);
    }
}

#[test]
fn a_hung_node_is_routed_around_then_timed_out_and_left_alone() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .read_quorum(2)
        .write_quorum(2)
        .timeout_ms(2000)
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let c = servers[2].clone();
    let coordinated_by_c = |i: &usize| replicas_of(&servers, &key(*i), 3)[0] == c;
    let (by_c, not_by_c): (Vec<usize>, Vec<usize>) = (0..50).partition(coordinated_by_c);
    assert!(
        not_by_c.len() >= 2 && !by_c.is_empty(),
        "C coordinates {} of 50 keys",
        by_c.len()
    );
    let failures = || balancer_counter(&lb.stats(), "replica_failures");
    let switches = || balancer_counter(&lb.stats(), "coordinator_switches");
    assert_eq!(switches(), 0, "no switch while every node keeps up");

    // SIGSTOP: C's sockets still accept connections, but nothing answers.
    cluster.nodes[2].stop();
    // Two puts C does not coordinate: each meets W = 2 without C and sends C a copy that
    // waits in the background; nobody can know yet that C hangs.
    for &i in &not_by_c[..2] {
        assert_eq!(
            lb.put(&key(i), value(i)),
            ok200(),
            "put {} with C hung",
            key(i)
        );
    }
    // C has sat on that work for longer than the lag threshold (2 ms), so the put C would
    // coordinate goes to the next replica at once instead of waiting out the timeout on C.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lb.put(&key(by_c[0]), value(by_c[0])), ok200());
    assert_eq!(switches(), 1, "the put C would coordinate went elsewhere");
    assert_eq!(
        server_state(&lb.stats(), &c).0,
        "up",
        "no call to C has timed out yet: the put did not wait for C"
    );
    for &i in not_by_c[2..].iter().chain(&by_c[1..]) {
        assert_eq!(
            lb.put(&key(i), value(i)),
            ok200(),
            "put {} with C hung",
            key(i)
        );
    }

    // The copies sent to C time out, and C is marked down.
    wait_until(DETECTION_TIMEOUT, "C shown down", || {
        state_of(&lb, &c) == "down"
    });
    let (_, last_error) = server_state(&lb.stats(), &c);
    assert!(last_error.is_some(), "C is down without a last_error");
    for i in 0..50 {
        assert_eq!(lb.get(&key(i)), Ok(value(i)), "get {} with C hung", key(i));
    }

    // A call made to C ends, failed, within one timeout. To know that every call made so far
    // has ended without sleeping, ask a second balancer, which has never heard from C, for a
    // read that needs C (R = 3): it waits one whole timeout on C, then fails. When it
    // answers, the first balancer's count of failed calls is final.
    let watch = Daemon::load_balancer(
        cluster.dir(),
        "watch-balancer",
        free_port(),
        &servers,
        &["-N", "3", "-R", "3", "-W", "2", "--timeout-ms", "2000"].map(str::to_owned),
    );
    match watch.rpc().get(&key(0)) {
        Err((503, _)) => {}
        other => panic!("a read needing hung C: expected fault 503, got {other:?}"),
    }
    let failed = failures();
    for i in 0..50 {
        assert_eq!(lb.put(&key(i), value(i + 1)), ok200(), "put {}", key(i));
        assert_eq!(lb.get(&key(i)), Ok(value(i + 1)), "get {}", key(i));
    }
    assert_eq!(
        failures(),
        failed,
        "requests went on calling C after it was found hung"
    );

    cluster.nodes[2].cont();
    wait_until(DETECTION_TIMEOUT, "C is shown up after SIGCONT", || {
        state_of(&lb, &c) == "up"
    });
    for i in 0..50 {
        assert_eq!(
            lb.get(&key(i)),
            Ok(value(i + 1)),
            "get {} after SIGCONT",
            key(i)
        );
    }
}

#[test]
fn late_replies_leave_no_tasks_behind() {
    // With R = W = 1 the client has its answer after the first replica; the other two replies
    // arrive late, and with one node hung some never arrive at all. Every per-request task
    // must still end (by reply or by timeout): the balancer's live task count comes back to
    // where it was, instead of growing with the number of requests.
    const REQUESTS: usize = 400;
    let mut cluster = Cluster::builder()
        .in_memory()
        .replicas(3)
        .read_quorum(1)
        .write_quorum(1)
        .timeout_ms(500)
        .start();
    let lb = cluster.client();
    for i in 0..20 {
        assert_eq!(lb.put(&key(i), value(i)), ok200());
    }
    let idle = int_member(&lb.stats(), "tasks");

    cluster.nodes[2].stop();
    let mut unknown = 0;
    for i in 0..REQUESTS {
        // The put that first asks hung C to coordinate, before anything marks C down: C
        // took it and never answers, so nobody can say whether it was applied.
        let put = lb.put(&key(i), value(i));
        if is_outcome_unknown(&put) {
            unknown += 1;
        } else {
            assert_eq!(put, ok200(), "put {}", key(i));
        }
        // R + W = 2 <= N: a read may miss the write just made; it must still be answered.
        assert!(lb.get(&key(i)).is_ok(), "get {}", key(i));
    }
    assert!(
        unknown <= 1,
        "{unknown} puts met hung C as their coordinator: its first timeout marks it down"
    );
    // A leak would keep a task per request; pooled connections and the stats call account
    // for a handful more than the idle count.
    wait_until(
        CONVERGENCE_TIMEOUT,
        "the balancer's tasks back to their idle level",
        || int_member(&lb.stats(), "tasks") <= idle + 16,
    );
    cluster.nodes[2].cont();
}
