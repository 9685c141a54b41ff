//! Live membership, told as stories with the real binaries: a cluster grows, shrinks, loses a
//! node for good, has a joining node or every node crash in the middle of a transfer, takes
//! two applies at the same moment, is followed by a balancer that knows one node, spreads
//! replicas over zones, and is driven by the `dynamite` command.
//!
//! Every story ends with the same checks (see [`assert_settled`]), the promises of the
//! contract's *Membership* section:
//!
//! - no acknowledged write is lost: every key put and acknowledged reads back, through a
//!   balancer, the last value acknowledged for it;
//! - where the story reads while the layout changes, no read returns a value older than one
//!   acknowledged before the read began ([`Load`]);
//! - once the transition is over (`transition` false in `cluster.status()` of every daemon)
//!   and rehoming has finished, every key is on exactly N nodes, all members of the final
//!   layout (the nodes its placement names), and a node that was removed holds nothing.
//!
//! A node's own copy of a key is what its `local.get` (or, where that method does not exist
//! yet, its `get`) answers. Values are `KEY@SEQ...`, SEQ growing with every attempt to
//! write, so a read tells which write it saw.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::membership::*;
use common::*;

/// Path of the `dynamite` admin command under test.
const DYNAMITE: &str = env!("CARGO_BIN_EXE_dynamite");

/// Replicas per key in every story.
const N: usize = 3;
/// How long a transition may take to end on every daemon.
const TRANSITION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long rehoming may take, once the transition is over, to leave every key on exactly
/// its replicas.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new daemon may take to learn the cluster's layout.
const LEARN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one key may stay unacknowledged while the writer retries it.
const PUT_PATIENCE: Duration = Duration::from_secs(60);
/// How long to wait for a transfer to be caught mid-way (stories 4 and 5).
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);
/// The balancers' `--timeout-ms`: generous, for a loaded 2-core machine.
const REPLICA_TIMEOUT_MS: &str = "2000";

// ---------------------------------------------------------------------------------------------
// The stories
// ---------------------------------------------------------------------------------------------

/// 1. Three nodes grow to five while a writer puts keys through a balancer started before the
///    change, and a reader checks every read against what was acknowledged before it began.
#[test]
fn grow_from_three_to_five_under_a_steady_write_load() {
    let _timer = Timer::start("grow_from_three_to_five_under_a_steady_write_load");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0, 1, 2], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let load = Load::start(story.balancer_port(lb), "grow");
    load.wait_for_more(300, "the writer has keys acknowledged before the change");

    let fourth = story.join(0, None);
    let fifth = story.join(1, None);
    let admin = story.lb(lb);
    stage_add(&admin, &story.addr(fourth));
    stage_add(&admin, &story.addr(fifth));
    let acked_at_apply = load.acked();
    let moved = apply(&admin, 2);
    assert!(
        moved > 0,
        "adding two nodes to three moves replicas: {moved}"
    );

    wait_transition_over(&story, 2);
    let acked_in_transition = load.acked() - acked_at_apply;
    load.wait_for_more(200, "writes go on after the transition");
    let ledger = load.finish();
    assert!(
        acked_in_transition > 0,
        "writes are acknowledged while the transition runs"
    );
    assert_eq!(
        layout_addresses(&story.lb(lb)),
        story.addresses(&[0, 1, 2, 3, 4])
    );
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 2. Five nodes shrink to four: the removed node hands everything over, holds nothing, and
///    can be stopped without losing a key.
#[test]
fn shrink_from_five_to_four() {
    let _timer = Timer::start("shrink_from_five_to_four");
    let mut story = Story::start(5);
    let lb = story.add_balancer(&[0, 1, 2, 3, 4], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let load = Load::start(story.balancer_port(lb), "shrink");
    load.wait_for_more(300, "the writer has keys acknowledged before the change");

    stage_remove(&story.node(1), &story.addr(4));
    apply(&story.node(2), 2);
    wait_transition_over(&story, 2);
    load.wait_for_more(200, "writes go on after the transition");
    let ledger = load.finish();
    assert_eq!(
        layout_addresses(&story.lb(lb)),
        story.addresses(&[0, 1, 2, 3])
    );
    // The removed node still runs: assert_settled checks it holds nothing.
    assert_settled(&story, &ledger, story.balancer_port(lb));

    let status = story.nodes[4].terminate();
    assert!(status.success(), "the removed node stops cleanly: {status}");
    story.down[4] = true;
    assert_reads_back(
        story.balancer_port(lb),
        &ledger,
        "after the removed node stopped",
    );
}

/// 3. A node is SIGKILLed and never comes back; it is removed like any other, and the
///    transition ends without it, every key on N of the four survivors. When it comes back
///    on its old data after all, it holds nothing.
#[test]
fn remove_a_node_that_was_killed() {
    let _timer = Timer::start("remove_a_node_that_was_killed");
    let mut story = Story::start(5);
    let lb = story.add_balancer(&[0, 1, 2, 3, 4], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let load = Load::start(story.balancer_port(lb), "dead");
    load.wait_for_more(300, "the writer has keys acknowledged before the kill");

    story.kill_node(2);
    load.wait_for_more(200, "writes are acknowledged while node 2 is dead");
    stage_remove(&story.node(0), &story.addr(2));
    apply(&story.lb(lb), 2);
    wait_transition_over(&story, 2);
    load.wait_for_more(100, "writes go on after the transition");
    let ledger = load.finish();
    assert_eq!(
        layout_addresses(&story.lb(lb)),
        story.addresses(&[0, 1, 3, 4])
    );
    assert_settled(&story, &ledger, story.balancer_port(lb));

    let hints: Vec<i64> = story
        .running_nodes()
        .iter()
        .map(|(_, port)| int_member(&Rpc::new(*port).stats(), "hints"))
        .collect();
    eprintln!("hints held by the survivors once the transition is over: {hints:?}");

    // The dead node comes back on its old data after it was removed: it learns that it is
    // no member any more, and its stale copies change nothing and go.
    story.restart_node(2);
    let node2 = story.node(2);
    wait_until(
        LEARN_TIMEOUT,
        "the node that came back knows layout 2",
        || {
            node2
                .call("cluster.layout", vec![])
                .is_ok_and(|layout| int_member(&layout, "version") == 2)
        },
    );
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 4. A joining node is killed in the middle of receiving its partitions, and restarted with
///    the same data directory: the transition ends and nothing is lost.
#[test]
fn a_joining_node_killed_mid_transfer_restarts_and_finishes() {
    let timer = Timer::start("a_joining_node_killed_mid_transfer_restarts_and_finishes");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0, 1, 2], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let ledger = fill(story.balancer_port(lb), &keys("bulk", 20_000), 4);
    timer.lap("20000 keys written");

    let joiner = story.join(0, None);
    stage_add(&story.node(1), &story.addr(joiner));
    apply(&story.node(0), 2);
    let share = share_of(&story.node(0), &ledger, &story.addr(joiner));
    let caught = catch_mid_transfer(&story, joiner, share);
    story.kill_node(joiner);
    eprintln!("killed the joining node mid-transfer: {caught}");
    story.restart_node(joiner);

    wait_transition_over(&story, 2);
    timer.lap("the transition is over");
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 5. Every storage node is SIGKILLed while a transition runs (a joining node in the middle
///    of its transfer), then all are started again on the same data: the transition ends and
///    nothing is lost.
#[test]
fn every_node_restarted_mid_transition() {
    let timer = Timer::start("every_node_restarted_mid_transition");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0, 1, 2], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let ledger = fill(story.balancer_port(lb), &keys("restart", 10_000), 4);
    timer.lap("10000 keys written");

    let joiner = story.join(2, None);
    stage_add(&story.node(0), &story.addr(joiner));
    apply(&story.node(1), 2);
    let share = share_of(&story.node(0), &ledger, &story.addr(joiner));
    let caught = catch_mid_transfer(&story, joiner, share);
    // The joiner goes first, before it has received everything: the transition cannot end.
    story.kill_node(joiner);
    let status = call_ok(&story.node(0), "cluster.status", vec![]);
    assert_eq!(
        member(&status, "transition"),
        &Value::Boolean(true),
        "{status:?}"
    );
    for i in [0, 1, 2] {
        story.kill_node(i);
    }
    eprintln!("killed every node mid-transition: {caught}");
    for i in [0, 1, 2, joiner] {
        story.restart_node(i);
    }

    wait_transition_over(&story, 2);
    timer.lap("the transition is over");
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 6. Two applies of the same version race through two different daemons: exactly one wins,
///    the other is refused, and every daemon ends with the winner's layout. Five rounds,
///    adding and removing a spare node in turn, through different pairs of daemons.
#[test]
fn of_two_racing_applies_exactly_one_wins() {
    let _timer = Timer::start("of_two_racing_applies_exactly_one_wins");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0, 1, 2], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let spare = story.join(0, None);
    let ledger = fill(story.balancer_port(lb), &keys("race", 300), 2);

    let node_port = |i: usize| story.nodes[i].port();
    let lb_port = story.balancer_port(lb);
    let pairs = [
        (node_port(0), node_port(1)),
        (node_port(1), lb_port),
        (node_port(2), node_port(0)),
        (lb_port, node_port(2)),
        (node_port(spare), lb_port),
    ];
    let mut refusals = Vec::new();
    let mut overlapped = 0;
    for (round, (first, second)) in pairs.into_iter().enumerate() {
        let version = round as i64 + 2;
        let stager = story.node(round % 3);
        if round % 2 == 0 {
            stage_add(&stager, &story.addr(spare));
        } else {
            stage_remove(&stager, &story.addr(spare));
        }
        for port in [first, second] {
            wait_until(LEARN_TIMEOUT, "both daemons see the staged change", || {
                !array(member(&layout_of(&Rpc::new(port)), "staged")).is_empty()
            });
        }

        let barrier = Arc::new(Barrier::new(2));
        let racers: Vec<JoinHandle<(RpcResult, Instant, Instant)>> = [first, second]
            .into_iter()
            .map(|port| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let rpc = Rpc::new(port);
                    barrier.wait();
                    let began = Instant::now();
                    let result = rpc.call("cluster.apply", vec![Value::Integer(version as i32)]);
                    (result, began, Instant::now())
                })
            })
            .collect();
        let (results, spans): (Vec<RpcResult>, Vec<(Instant, Instant)>) = racers
            .into_iter()
            .map(|racer| {
                let (result, began, ended) = racer
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                (result, (began, ended))
            })
            .unzip();
        // Whether both calls were in flight at once: the race really happened.
        if spans[0].0 < spans[1].1 && spans[1].0 < spans[0].1 {
            overlapped += 1;
        }
        let winners: Vec<&Value> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one of two racing applies of version {version} wins: \
             {results:?}"
        );
        assert_eq!(int_member(winners[0], "version"), version, "round {round}");
        let refusal = results.iter().find_map(|r| r.as_ref().err()).cloned();
        refusals.push(refusal.expect("the other one is a fault"));

        let final_layout = wait_transition_over(&story, version);
        let members = addresses_of(&final_layout);
        let spare_in = members.contains(&story.addr(spare));
        assert_eq!(spare_in, round % 2 == 0, "round {round}: {members:?}");
        assert_eq!(members.len(), if spare_in { 4 } else { 3 }, "{members:?}");
        if !spare_in {
            let spare_node = story.node(spare);
            wait_until(SETTLE_TIMEOUT, "the removed spare holds nothing", || {
                int_member(&spare_node.stats(), "keys") == 0
            });
        }
    }
    eprintln!(
        "the two applies were in flight together in {overlapped} of {} rounds; the losers \
         were refused with: {refusals:?}",
        pairs.len()
    );
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 7. A balancer given one node of a three-node cluster, and no -N, -R or -W, learns the
///    whole layout, routes with N = 3, and follows a fourth node's arrival.
#[test]
fn a_balancer_seeded_with_one_node_learns_and_follows_the_layout() {
    let _timer = Timer::start("a_balancer_seeded_with_one_node_learns_and_follows_the_layout");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0], &[]);
    let client = story.lb(lb);
    wait_until(LEARN_TIMEOUT, "the balancer has learned layout 1", || {
        int_member(&client.stats(), "layout_version") >= 1
    });
    let stats = client.stats();
    assert_eq!(
        (
            int_member(&stats, "N"),
            int_member(&stats, "R"),
            int_member(&stats, "W")
        ),
        (3, 2, 2),
        "N from the layout, majorities for R and W: {stats:?}"
    );
    let mut ledger = fill(story.balancer_port(lb), &["one-seed-first".to_owned()], 1);
    let holders = holders_of(&story, &["one-seed-first".to_owned()]).remove(0);
    assert_eq!(holders, story.addresses(&[0, 1, 2]), "on all three nodes");
    ledger.extend(fill(story.balancer_port(lb), &keys("before", 150), 2));

    let fourth = story.join(2, None);
    stage_add(&client, &story.addr(fourth));
    apply(&client, 2);
    wait_transition_over(&story, 2);
    assert_eq!(int_member(&client.stats(), "layout_version"), 2);
    assert_eq!(int_member(&client.stats(), "N"), 3);

    let after = fill(story.balancer_port(lb), &["one-seed-after".to_owned()], 1);
    let placement = placement(&layout_of(&story.node(fourth)));
    let holders = holders_of(&story, &["one-seed-after".to_owned()]).remove(0);
    assert_eq!(
        holders,
        sorted(replicas(&placement, "one-seed-after")),
        "a key put after the change is on its three replicas of layout 2"
    );
    ledger.extend(after);
    ledger.extend(fill(story.balancer_port(lb), &keys("after", 150), 2));
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

/// 8. Four nodes in zones a, a, b and c with N = 3: every key's three copies are in three
///    distinct zones.
#[test]
fn replicas_are_spread_over_distinct_zones() {
    let _timer = Timer::start("replicas_are_spread_over_distinct_zones");
    let zones = ["a", "a", "b", "c"];
    let mut story = Story::start_zoned(&zones);
    let lb = story.add_balancer(&[0, 1, 2, 3], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let mut ledger = fill(story.balancer_port(lb), &keys("zoned-before", 150), 2);

    // Layout 1 is built from -s, where a node knows its own zone only: stage every node
    // whose zone layout 1 does not have, with it.
    let admin = story.node(0);
    let layout1 = layout_of(&admin);
    let zone_in_layout = zone_map(&layout1);
    let mut version = int_member(&layout1, "version");
    let mut restaged = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        let address = story.addr(i);
        if zone_in_layout.get(&address).map(String::as_str) != Some(*zone) {
            let answer = admin.call(
                "cluster.stage_add",
                vec![s(&address), s(zone), Value::Integer(1)],
            );
            assert_eq!(answer, ok200(), "stage_add({address}, {zone}, 1)");
            restaged.push(address);
        }
    }
    eprintln!("layout 1 had zones {zone_in_layout:?}; restaged {restaged:?}");
    if !restaged.is_empty() {
        version += 1;
        apply(&admin, version);
    }
    let final_layout = wait_transition_over(&story, version);
    let zone_of = zone_map(&final_layout);
    for (i, zone) in zones.iter().enumerate() {
        assert_eq!(
            zone_of.get(&story.addr(i)).map(String::as_str),
            Some(*zone),
            "{final_layout:?}"
        );
    }
    ledger.extend(fill(story.balancer_port(lb), &keys("zoned-after", 150), 2));
    assert_settled(&story, &ledger, story.balancer_port(lb));

    let names: Vec<String> = ledger.keys().cloned().collect();
    for (key, holders) in names.iter().zip(holders_of(&story, &names)) {
        let zones: BTreeSet<&String> = holders.iter().map(|h| &zone_of[h]).collect();
        assert_eq!(
            zones.len(),
            N,
            "{key} is held by {holders:?}, in zones {zones:?}"
        );
    }
}

/// 9. The `dynamite` command against a real cluster: tables for a person, JSON for a script,
///    a node added and applied, and a wrong version refused with the server's fault.
#[test]
fn the_dynamite_command_drives_a_real_cluster() {
    let _timer = Timer::start("the_dynamite_command_drives_a_real_cluster");
    let mut story = Story::start(3);
    let lb = story.add_balancer(&[0, 1, 2], &["--timeout-ms", REPLICA_TIMEOUT_MS]);
    let ledger = fill(story.balancer_port(lb), &keys("cli", 200), 2);
    let spare = story.join(1, None);
    let node0 = story.addr(0);
    let lb_addr = addr(story.balancer_port(lb));
    let spare_addr = story.addr(spare);

    let status = dynamite(&story, &["-s", &node0, "status"]);
    assert!(
        status.stdout.contains("layout version"),
        "{}",
        status.stdout
    );
    for address in story.addresses(&[0, 1, 2]) {
        assert!(status.stdout.contains(&address), "{}", status.stdout);
    }

    let json = dynamite(&story, &["-s", &lb_addr, "--json", "status"]);
    let text = json.stdout.trim();
    assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
    assert!(text.contains("\"version\""), "{text}");
    assert!(text.contains(&format!("\"{node0}\"")), "{text}");

    let show = dynamite(&story, &["-s", &story.addr(1), "layout", "show"]);
    for word in [
        "layout version",
        "address",
        "zone",
        "weight",
        "no staged changes",
    ] {
        assert!(show.stdout.contains(word), "{word}: {}", show.stdout);
    }
    for address in story.addresses(&[0, 1, 2]) {
        assert!(show.stdout.contains(&address), "{}", show.stdout);
    }

    let add = dynamite(&story, &["-s", &node0, "layout", "add", &spare_addr]);
    assert!(
        add.stdout.contains(&format!("staged: add {spare_addr}")),
        "{}",
        add.stdout
    );
    assert!(add.stdout.contains("staged changes"), "{}", add.stdout);

    let wrong = run_to_exit(
        story.dir.path(),
        DYNAMITE,
        &["-s", &node0, "layout", "apply", "--version", "99"],
    );
    assert_eq!(wrong.status.code(), Some(1), "{wrong:?}");
    assert!(wrong.stderr.starts_with("error: "), "{}", wrong.stderr);
    assert!(wrong.stderr.contains("-32602"), "{}", wrong.stderr);
    assert!(wrong.stderr.contains("99"), "{}", wrong.stderr);
    assert_eq!(wrong.stdout, "");

    let applied = dynamite(&story, &["-s", &node0, "layout", "apply"]);
    assert!(
        applied.stdout.contains("applied layout version 2"),
        "{}",
        applied.stdout
    );
    wait_transition_over(&story, 2);

    let status = dynamite(&story, &["-s", &spare_addr, "status"]);
    assert!(status.stdout.contains(&spare_addr), "{}", status.stdout);
    let show = dynamite(&story, &["-s", &lb_addr, "layout", "show"]);
    assert!(show.stdout.contains(&spare_addr), "{}", show.stdout);
    assert_settled(&story, &ledger, story.balancer_port(lb));
}

// ---------------------------------------------------------------------------------------------
// The cluster of a story
// ---------------------------------------------------------------------------------------------

/// The daemons of one story: storage nodes by index (node `i` keeps its data in
/// `dir/node-i`), balancers, and which nodes are down. Dropping it kills them all.
struct Story {
    nodes: Vec<Daemon>,
    /// `down[i]`: node `i` was killed or stopped (and not restarted).
    down: Vec<bool>,
    balancers: Vec<Daemon>,
    // Declared last: dropped after the daemons, which log into it.
    dir: tempfile::TempDir,
}

impl Story {
    /// `count` durable nodes, each with the others as `-s` peers and `-N 3`; returns once
    /// every node has layout version 1 with all of them.
    fn start(count: usize) -> Story {
        Story::start_zoned(&vec![""; count])
    }

    /// As [`Story::start`], node `i` with `--zone zones[i]` (none where it is empty).
    fn start_zoned(zones: &[&str]) -> Story {
        let dir = tempfile::Builder::new()
            .prefix("dynamite-membership-")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<u16> = zones.iter().map(|_| free_port()).collect();
        let servers: Vec<String> = ports.iter().map(|&p| addr(p)).collect();
        let mut story = Story {
            nodes: Vec::new(),
            down: Vec::new(),
            balancers: Vec::new(),
            dir,
        };
        for (i, zone) in zones.iter().enumerate() {
            let mut args = story.data_args(i, zone);
            args.extend(peer_args(&servers, i));
            args.extend(["-N".to_owned(), N.to_string()]);
            story.spawn_node(ports[i], args);
        }
        for i in 0..zones.len() {
            let node = story.node(i);
            wait_until(LEARN_TIMEOUT, "every node has layout 1 with all", || {
                node.call("cluster.layout", vec![])
                    .is_ok_and(|layout| addresses_of(&layout) == sorted(servers.clone()))
            });
        }
        story
    }

    fn data_args(&self, i: usize, zone: &str) -> Vec<String> {
        let data = self.dir.path().join(format!("node-{i}"));
        let mut args = vec!["--data-dir".to_owned(), data.to_string_lossy().into_owned()];
        if !zone.is_empty() {
            args.extend(["--zone".to_owned(), zone.to_owned()]);
        }
        args
    }

    fn spawn_node(&mut self, port: u16, args: Vec<String>) -> usize {
        let i = self.nodes.len();
        let node = Daemon::storage_node(self.dir.path(), &format!("node-{i}"), port, &args);
        self.nodes.push(node);
        self.down.push(false);
        i
    }

    /// Starts a new node with `-s` naming node `seed` only; returns its index once it has
    /// learned the cluster's layout (of which it is not a member yet).
    fn join(&mut self, seed: usize, zone: Option<&str>) -> usize {
        let i = self.nodes.len();
        let mut args = self.data_args(i, zone.unwrap_or(""));
        args.extend(["-s".to_owned(), self.addr(seed)]);
        let i = self.spawn_node(free_port(), args);
        let node = self.node(i);
        wait_until(LEARN_TIMEOUT, "the new node has learned the layout", || {
            node.call("cluster.layout", vec![]).is_ok()
        });
        i
    }

    /// Starts a balancer with `-s` naming the nodes `seeds`; returns its index.
    fn add_balancer(&mut self, seeds: &[usize], args: &[&str]) -> usize {
        let i = self.balancers.len();
        let servers = self.addresses(seeds);
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let balancer = Daemon::load_balancer(
            self.dir.path(),
            &format!("balancer-{i}"),
            free_port(),
            &servers,
            &args,
        );
        self.balancers.push(balancer);
        i
    }

    fn kill_node(&mut self, i: usize) {
        self.nodes[i].kill();
        self.down[i] = true;
    }

    fn restart_node(&mut self, i: usize) {
        self.nodes[i].restart();
        self.down[i] = false;
    }

    fn addr(&self, i: usize) -> String {
        self.nodes[i].addr()
    }

    /// The addresses of nodes `indexes`, sorted.
    fn addresses(&self, indexes: &[usize]) -> Vec<String> {
        sorted(indexes.iter().map(|&i| self.addr(i)).collect())
    }

    fn node(&self, i: usize) -> Rpc {
        self.nodes[i].rpc()
    }

    fn lb(&self, i: usize) -> Rpc {
        self.balancers[i].rpc()
    }

    fn balancer_port(&self, i: usize) -> u16 {
        self.balancers[i].port()
    }

    /// `(address, port)` of every node that runs.
    fn running_nodes(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .zip(&self.down)
            .filter(|(_, down)| !**down)
            .map(|(node, _)| (node.addr(), node.port()))
            .collect()
    }

    /// `(name, port)` of every daemon that runs: nodes, then balancers.
    fn running_daemons(&self) -> Vec<(String, u16)> {
        let mut daemons = self.running_nodes();
        daemons.extend(
            self.balancers
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("balancer-{i}"), b.port())),
        );
        daemons
    }
}

/// Prints how long a test took, and whether it passed, when it ends.
struct Timer {
    name: &'static str,
    started: Instant,
}

impl Timer {
    fn start(name: &'static str) -> Timer {
        Timer {
            name,
            started: Instant::now(),
        }
    }

    /// Says that `what` is done, and when.
    fn lap(&self, what: &str) {
        eprintln!(
            "{}: {what} after {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        let outcome = if std::thread::panicking() {
            "FAILED"
        } else {
            "passed"
        };
        eprintln!(
            "{}: {outcome} after {:.1} s",
            self.name,
            self.started.elapsed().as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, values and the ledger of acknowledged writes
// ---------------------------------------------------------------------------------------------

/// Sequence numbers of writes, growing in the order the attempts are made.
static SEQ: AtomicU64 = AtomicU64::new(1);

/// Puts `key` with a new value until a put is acknowledged, within [`PUT_PATIENCE`];
/// answers the acknowledged value's sequence number and how many attempts failed.
fn put_until_acked(rpc: &Rpc, key: &str) -> (u64, u64) {
    let deadline = Instant::now() + PUT_PATIENCE;
    let mut failures = 0;
    loop {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let answer = rpc.put(key, tagged(key, seq));
        if answer == ok200() {
            return (seq, failures);
        }
        failures += 1;
        assert!(
            Instant::now() < deadline,
            "put {key} not acknowledged within {PUT_PATIENCE:?}; last answer {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Puts every key of `keys` through the balancer on `port`, from `threads` threads, each
/// until acknowledged; answers the ledger.
fn fill(port: u16, keys: &[String], threads: usize) -> Ledger {
    let chunk = keys.len().div_ceil(threads.max(1)).max(1);
    let (ledger, failures) = std::thread::scope(|scope| {
        let workers: Vec<_> = keys
            .chunks(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    let rpc = Rpc::new(port);
                    let mut ledger = Ledger::new();
                    let mut failures = 0;
                    for key in chunk {
                        let (seq, failed) = put_until_acked(&rpc, key);
                        ledger.insert(key.clone(), seq);
                        failures += failed;
                    }
                    (ledger, failures)
                })
            })
            .collect();
        let mut all = Ledger::new();
        let mut failures = 0;
        for worker in workers {
            let (ledger, failed) = worker
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            all.extend(ledger);
            failures += failed;
        }
        (all, failures)
    });
    if failures > 0 {
        eprintln!(
            "fill: {failures} put attempts failed and were retried ({} keys)",
            keys.len()
        );
    }
    ledger
}

/// A tiny xorshift generator, so that the load needs no crate.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n.max(1) as u64) as usize
    }
}

/// What the writer has had acknowledged so far, shared with the reader.
#[derive(Default)]
struct Written {
    ledger: Ledger,
    /// The ledger's keys, for picking one at random.
    keys: Vec<String>,
}

/// What the reader saw.
#[derive(Debug, Default)]
struct Reads {
    ok: u64,
    failed: u64,
    /// Reads that returned something older than a write acknowledged before they began
    /// (or nothing, or something else).
    stale: Vec<String>,
}

/// A steady load through one balancer: a writer putting new keys (and now and then
/// overwriting an old one), each until acknowledged, and a reader checking that every read
/// returns at least the value last acknowledged before it began.
struct Load {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Written>>,
    writer: Option<JoinHandle<u64>>,
    reader: Option<JoinHandle<Reads>>,
}

impl Load {
    fn start(port: u16, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Written::default()));
        let writer = {
            let (stop, written, prefix) = (stop.clone(), written.clone(), prefix.to_owned());
            std::thread::spawn(move || {
                let rpc = Rpc::new(port);
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
                let mut failures = 0;
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let overwrite = {
                        let written = written.lock().unwrap();
                        (i % 4 == 3 && !written.keys.is_empty())
                            .then(|| written.keys[rng.below(written.keys.len())].clone())
                    };
                    let key = overwrite.unwrap_or_else(|| format!("{prefix}-{i:06}"));
                    let (seq, failed) = put_until_acked(&rpc, &key);
                    failures += failed;
                    let mut written = written.lock().unwrap();
                    if written.ledger.insert(key.clone(), seq).is_none() {
                        written.keys.push(key);
                    }
                    drop(written);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(3));
                }
                failures
            })
        };
        let reader = {
            let (stop, written) = (stop.clone(), written.clone());
            std::thread::spawn(move || {
                let rpc = Rpc::new(port);
                let mut rng = Rng(0x2545_f491_4f6c_dd1d);
                let mut reads = Reads::default();
                while !stop.load(Ordering::Relaxed) {
                    let picked = {
                        let written = written.lock().unwrap();
                        (!written.keys.is_empty()).then(|| {
                            let key = written.keys[rng.below(written.keys.len())].clone();
                            let seq = written.ledger[&key];
                            (key, seq)
                        })
                    };
                    let Some((key, acked)) = picked else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    match rpc.get(&key) {
                        Ok(value) => {
                            reads.ok += 1;
                            match seq_of(&key, &value) {
                                Some(seq) if seq >= acked => {}
                                _ => reads.stale.push(format!(
                                    "get {key} returned {value:?}, but write #{acked} was \
                                     acknowledged before the read began"
                                )),
                            }
                        }
                        Err(_) => reads.failed += 1,
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                reads
            })
        };
        Load {
            stop,
            written,
            writer: Some(writer),
            reader: Some(reader),
        }
    }

    /// How many keys have been acknowledged.
    fn acked(&self) -> usize {
        self.written.lock().unwrap().keys.len()
    }

    /// Waits until `more` keys more than now are acknowledged.
    fn wait_for_more(&self, more: usize, what: &str) {
        let target = self.acked() + more;
        wait_until(TRANSITION_TIMEOUT, what, || {
            assert!(
                !self.writer.as_ref().is_some_and(JoinHandle::is_finished),
                "the writer stopped"
            );
            self.acked() >= target
        });
    }

    /// Stops both threads; asserts no read was stale; answers the ledger.
    fn finish(mut self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self
            .writer
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let reads = self
            .reader
            .take()
            .expect("running")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let ledger = std::mem::take(&mut self.written.lock().unwrap().ledger);
        eprintln!(
            "load: {} keys acknowledged, {failures} put attempts failed and were retried; \
             {} reads, {} failed, {} stale",
            ledger.len(),
            reads.ok,
            reads.failed,
            reads.stale.len()
        );
        assert!(
            reads.stale.is_empty(),
            "{} reads returned something older than a write acknowledged before they began; \
             the first: {:#?}",
            reads.stale.len(),
            &reads.stale[..reads.stale.len().min(10)]
        );
        assert!(reads.ok > 0, "the reader read something");
        ledger
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A failing test leaves the threads to end on their own at their next call.
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// cluster.* calls
// ---------------------------------------------------------------------------------------------

/// Member address → zone.
fn zone_map(layout: &Value) -> BTreeMap<String, String> {
    members_of(layout)
        .into_iter()
        .map(|m| (m.address, m.zone))
        .collect()
}

/// Polls the joining node `i` until it has received some of its `share` keys but not all,
/// and answers what it said then.
fn catch_mid_transfer(story: &Story, i: usize, share: usize) -> String {
    let node = story.node(i);
    let deadline = Instant::now() + TRANSFER_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let stats = node.stats();
        let keys = int_member(&stats, "keys");
        let syncing = int_member(&stats, "syncing");
        let received = int_member(&stats, "sync_keys_received");
        if keys > 0 && (keys as usize) < share {
            return format!(
                "{keys} of its {share} keys in, {syncing} partitions to go, \
                 {received} keys received"
            );
        }
        if seen.last() != Some(&(keys, syncing)) {
            seen.push((keys, syncing));
        }
        assert!(
            Instant::now() < deadline && (keys as usize) < share,
            "the joining node was never seen in the middle of its transfer of {share} keys \
             (keys, syncing seen: {seen:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every running daemon says layout `version` is the current one and no
/// transition runs, all with the same members; answers that layout.
fn wait_transition_over(story: &Story, version: i64) -> Value {
    let daemons = story.running_daemons();
    wait_until_ok(
        TRANSITION_TIMEOUT,
        &format!("the transition to layout {version} is over on every daemon"),
        || {
            for (name, port) in &daemons {
                let status = call_ok(&Rpc::new(*port), "cluster.status", vec![]);
                let seen = int_member(&status, "version");
                let transition = member(&status, "transition") == &Value::Boolean(true);
                if seen != version || transition {
                    return Err(format!(
                        "{name} says version {seen}, transition {transition}: {status:?}"
                    ));
                }
            }
            Ok(())
        },
    );
    let layouts: Vec<(String, Value)> = daemons
        .iter()
        .map(|(name, port)| (name.clone(), layout_of(&Rpc::new(*port))))
        .collect();
    let (first_name, first) = &layouts[0];
    for (name, layout) in &layouts {
        assert_eq!(int_member(layout, "version"), version, "{name}: {layout:?}");
        assert_eq!(
            members_of(layout),
            members_of(first),
            "{name} and {first_name} have the same members"
        );
    }
    first.clone()
}

// ---------------------------------------------------------------------------------------------
// Where keys are
// ---------------------------------------------------------------------------------------------

/// Which inspection method a node answers: 0 not known yet, 1 `local.get`, 2 `get`.
static OWN_COPY_METHOD: AtomicU8 = AtomicU8::new(0);

/// Whether the node behind `rpc` holds its own copy of `key`.
fn has_own_copy(rpc: &Rpc, key: &str) -> bool {
    let answer = match OWN_COPY_METHOD.load(Ordering::Relaxed) {
        2 => rpc.get(key),
        _ => match rpc.call("local.get", vec![s(key)]) {
            Err((-32601, _)) => {
                OWN_COPY_METHOD.store(2, Ordering::Relaxed);
                rpc.get(key)
            }
            answer => {
                OWN_COPY_METHOD.store(1, Ordering::Relaxed);
                answer
            }
        },
    };
    match answer {
        Ok(value) => value != Value::Nil,
        Err(fault) => panic!("own copy of {key} on a node: {fault:?}"),
    }
}

/// For each of `keys`, the running nodes holding their own copy of it (sorted addresses);
/// one thread per node.
fn holders_of(story: &Story, keys: &[String]) -> Vec<Vec<String>> {
    let nodes = story.running_nodes();
    let columns: Vec<Vec<bool>> = std::thread::scope(|scope| {
        let workers: Vec<_> = nodes
            .iter()
            .map(|(_, port)| {
                let port = *port;
                scope.spawn(move || {
                    let rpc = Rpc::new(port);
                    keys.iter().map(|key| has_own_copy(&rpc, key)).collect()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    (0..keys.len())
        .map(|k| {
            sorted(
                nodes
                    .iter()
                    .zip(&columns)
                    .filter(|(_, column)| column[k])
                    .map(|((address, _), _)| address.clone())
                    .collect(),
            )
        })
        .collect()
}

/// Every key of `ledger` reads back through `via` with its last acknowledged value.
fn assert_reads_back(port: u16, ledger: &Ledger, when: &str) {
    let entries: Vec<(&String, &u64)> = ledger.iter().collect();
    let chunk = entries.len().div_ceil(4).max(1);
    let wrong: Vec<String> = std::thread::scope(|scope| {
        let readers: Vec<_> = entries
            .chunks(chunk)
            .map(|chunk| {
                scope.spawn(move || {
                    let via = Rpc::new(port);
                    chunk
                        .iter()
                        .filter_map(|&(key, &seq)| {
                            let got = via.get(key);
                            (got != Ok(tagged(key, seq))).then(|| {
                                format!(
                                    "{key}: expected write #{seq}, got {:?}",
                                    got.as_ref().map(|v| seq_of(key, v))
                                )
                            })
                        })
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        readers
            .into_iter()
            .flat_map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged keys do not read back their last acknowledged value {when}; \
         the first: {:#?}",
        wrong.len(),
        ledger.len(),
        &wrong[..wrong.len().min(10)]
    );
}

/// The end of every story, once the transition is over: rehoming finishes (each member
/// holds its share, every other running node nothing), then every key of `ledger` is on
/// exactly N nodes, those its final layout places it on, and reads back through `via`.
fn assert_settled(story: &Story, ledger: &Ledger, via: u16) {
    let layout_value = layout_of(&Rpc::new(via));
    assert_eq!(
        member(&layout_value, "transition"),
        &Value::Boolean(false),
        "{layout_value:?}"
    );
    let layout = placement(&layout_value);
    let n = layout.replicas();
    assert_eq!(n, N, "{layout_value:?}");
    let members: BTreeSet<String> = layout.servers().iter().cloned().collect();
    let running = story.running_nodes();
    for address in &members {
        assert!(
            running.iter().any(|(a, _)| a == address),
            "member {address} of the final layout runs"
        );
    }

    wait_until_ok(
        SETTLE_TIMEOUT,
        "rehoming is over: the members hold N copies of every key, the others nothing",
        || {
            let mut held = 0;
            let mut counts = Vec::new();
            let mut wrong = false;
            for (address, port) in &running {
                let stats = Rpc::new(*port).stats();
                let keys = int_member(&stats, "keys");
                let left = int_member(&stats, "rehome_left");
                let hints = int_member(&stats, "hints");
                counts.push(format!(
                    "{address}: keys {keys}, rehome_left {left}, hints {hints}"
                ));
                if members.contains(address) {
                    held += keys;
                } else if keys != 0 {
                    wrong = true;
                }
                wrong |= left != 0;
            }
            let expected = (n * ledger.len()) as i64;
            if wrong || held != expected {
                return Err(format!(
                    "members hold {held} keys, expected {expected}; {counts:?}"
                ));
            }
            Ok(())
        },
    );

    let names: Vec<String> = ledger.keys().cloned().collect();
    wait_until_ok(
        SETTLE_TIMEOUT,
        "every key is on exactly its N replicas of the final layout",
        || {
            let mut wrong = Vec::new();
            for (key, holders) in names.iter().zip(holders_of(story, &names)) {
                let expected = sorted(replicas(&layout, key));
                if holders != expected {
                    let strangers: Vec<&String> =
                        holders.iter().filter(|h| !members.contains(*h)).collect();
                    wrong.push(format!(
                        "{key} is on {} nodes {holders:?} (non-members among them: \
                         {strangers:?}); its replicas are {expected:?}",
                        holders.len()
                    ));
                }
            }
            if wrong.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} of {} keys misplaced; the first: {:#?}",
                    wrong.len(),
                    names.len(),
                    &wrong[..wrong.len().min(10)]
                ))
            }
        },
    );
    assert_reads_back(via, ledger, "once the transition is over");
}

/// Runs `dynamite args` in the story's directory; asserts it exits 0.
fn dynamite(story: &Story, args: &[&str]) -> Exited {
    let run = run_to_exit(story.dir.path(), DYNAMITE, args);
    assert_eq!(run.status.code(), Some(0), "dynamite {args:?}: {run:?}");
    run
}
