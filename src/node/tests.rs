//! Stories of one node's replica operations, run on an in-memory node.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::*;
use crate::config::NodeConfig;
use crate::rpc::client::RpcClient;
use crate::rpc::messages::{
    self, CoordinateRequest, MergeRequest, Op, OpReply, ReadRequest, ReapRequest,
};
use crate::storage::{StorageConfig, WriteOp};

fn node() -> StorageNode {
    let config = NodeConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        peers: vec![],
        storage: StorageConfig::InMemory,
        log_requests: false,
        max_request_bytes: 1 << 20,
        ring: None,
        aae_interval: Duration::from_secs(1),
        aae_max_keys: 1000,
        // On, so that the stories below also check the cache stays true to the engine.
        cache_bytes: 1 << 20,
        advertise: "127.0.0.1:1".into(),
        zone: String::new(),
        replicas: 3,
        security: crate::security::Security::default(),
    };
    StorageNode::open(&config).expect("in-memory node opens")
}

fn put(node: &StorageNode, key: &str, value: Option<&str>) -> Siblings {
    let request = CoordinateRequest {
        entered_us: crate::clock::now_us(),
        key: key.into(),
        value: value.map(str::to_owned),
        context: None,
        hint_for: None,
    };
    node.coordinate(request).expect("coordinate")
}

/// A blind write of key "k" (`None`: a delete) that entered the cluster at `entered_us`.
fn write_at(node: &StorageNode, value: Option<&str>, entered_us: u64) -> Siblings {
    node.coordinate(CoordinateRequest {
        key: "k".into(),
        value: value.map(str::to_owned),
        context: None,
        hint_for: None,
        entered_us,
    })
    .expect("coordinate")
}

fn counts(node: &StorageNode) -> (i64, i64) {
    (
        node.live_keys.load(Ordering::Relaxed),
        node.tombstone_keys.load(Ordering::Relaxed),
    )
}

#[test]
fn counts_follow_puts_deletes_and_reaps() {
    let node = node();
    put(&node, "a", Some("<value>1</value>"));
    put(&node, "b", Some("<value>2</value>"));
    assert_eq!(counts(&node), (2, 0));
    let tombstone = put(&node, "a", None);
    assert_eq!(counts(&node), (1, 1));
    let reaped = node.reap(&ReapRequest {
        key: "a".into(),
        dots: tombstone.dots().collect(),
    });
    assert!(reaped.expect("reap"));
    assert_eq!(counts(&node), (1, 0));
    assert!(
        node.read(&ReadRequest {
            key: "a".into(),
            hint_for: None
        })
        .expect("read")
        .is_empty()
    );
}

#[test]
fn reap_spares_a_key_written_since() {
    let node = node();
    let tombstone = put(&node, "k", None);
    put(&node, "k", Some("<value>again</value>"));
    let reaped = node.reap(&ReapRequest {
        key: "k".into(),
        dots: tombstone.dots().collect(),
    });
    assert!(!reaped.expect("reap"));
    let held = node
        .read(&ReadRequest {
            key: "k".into(),
            hint_for: None,
        })
        .expect("read");
    assert_eq!(held.latest_value(), Some("<value>again</value>"));
}

#[test]
fn merge_brings_a_replica_up_to_date_and_is_idempotent() {
    let coordinator = node();
    let replica = node();
    let set = put(&coordinator, "k", Some("<value>v</value>"));
    let request = MergeRequest {
        key: "k".into(),
        siblings: set.clone(),
        hint_for: None,
    };
    assert_eq!(replica.merge(request.clone()).expect("merge"), set);
    assert_eq!(replica.merge(request).expect("merge again"), set);
    assert_eq!(counts(&replica), (1, 0));
}

#[test]
fn sibling_explosion_is_refused_until_resolved() {
    let node = node();
    let stale = Some(crate::version::VClock::new());
    let write = |context: Option<crate::version::VClock>| {
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "k".into(),
            value: Some("<value>v</value>".into()),
            context,
            hint_for: None,
        })
    };
    for _ in 0..MAX_SIBLINGS {
        write(stale.clone()).expect("siblings up to the bound");
    }
    let error = write(stale.clone()).expect_err("one more sibling");
    assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
    let held = node
        .read(&ReadRequest {
            key: "k".into(),
            hint_for: None,
        })
        .expect("read");
    assert_eq!(held.versions().len(), MAX_SIBLINGS);
    let resolved = write(Some(held.context())).expect("a write with the full context");
    assert_eq!(resolved.versions().len(), 1);
}

#[test]
fn a_key_cannot_grow_past_the_byte_bound_until_resolved() {
    let node = node();
    let stale = Some(crate::version::VClock::new());
    let third = MAX_SET_VALUE_BYTES / 3 + 1;
    let write = |context: Option<crate::version::VClock>, bytes: usize| {
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "k".into(),
            value: Some("x".repeat(bytes)),
            context,
            hint_for: None,
        })
    };
    write(stale.clone(), third).expect("a first sibling");
    write(stale.clone(), third).expect("a second");
    let error = write(stale.clone(), third).expect_err("a third would pass the bound");
    assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
    assert!(
        error.fault_string().contains("MiB"),
        "{}",
        error.fault_string()
    );
    let held = node.load("k").expect("load");
    assert_eq!(held.versions().len(), 2, "the refused write left nothing");
    // A write that supersedes what it saw replaces both, so it fits.
    let resolved = write(Some(held.context()), third).expect("a resolving write");
    assert_eq!(resolved.versions().len(), 1);
    // So does a blind write: it supersedes what the node holds.
    let replaced = write(None, MAX_SET_VALUE_BYTES).expect("one value up to the bound");
    assert_eq!(replaced.value_bytes(), MAX_SET_VALUE_BYTES);
    let error = write(None, MAX_SET_VALUE_BYTES + 1).expect_err("one value over it");
    assert!(
        error.fault_string().contains("a value of"),
        "{}",
        error.fault_string()
    );

    // Siblings written at two replicas can merge past the bound; a delete or a resolving
    // write, which leave the set no heavier, still go through there.
    let other = super::tests::node();
    let half = MAX_SET_VALUE_BYTES / 2 + 1;
    let sibling = |node: &StorageNode| {
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "m".into(),
            value: Some("y".repeat(half)),
            context: stale.clone(),
            hint_for: None,
        })
        .expect("a sibling within the bound")
    };
    sibling(&node);
    let two = sibling(&other);
    let merged = node
        .merge(MergeRequest {
            key: "m".into(),
            siblings: two,
            hint_for: None,
        })
        .expect("merge");
    assert!(
        merged.value_bytes() > MAX_SET_VALUE_BYTES,
        "two siblings past the bound"
    );
    let deleted = node
        .coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "m".into(),
            value: None,
            context: stale.clone(),
            hint_for: None,
        })
        .expect("a delete of a heavy key");
    assert_eq!(deleted.value_bytes(), merged.value_bytes());
    node.coordinate(CoordinateRequest {
        entered_us: crate::clock::now_us(),
        key: "m".into(),
        value: Some("z".into()),
        context: Some(deleted.context()),
        hint_for: None,
    })
    .expect("a resolving write");
}

#[test]
fn a_batch_defers_the_reads_past_its_reply_budget() {
    let node = node();
    let big = READ_REPLY_BUDGET / 2 + 1;
    for key in ["a", "b", "c"] {
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: key.into(),
            value: Some("x".repeat(big)),
            context: None,
            hint_for: None,
        })
        .expect("put");
    }
    let read = |key: &str| {
        Op::Read(ReadRequest {
            key: key.into(),
            hint_for: None,
        })
    };
    let replies = node.apply_batch(vec![read("a"), read("b"), read("c"), read("missing")]);
    assert_eq!(replies[0].value_bytes(), big);
    // The budget is passed once "b" is in the reply: what follows waits for a later batch.
    assert_eq!(replies[1].value_bytes(), big);
    assert_eq!(replies[2..], [OpReply::Deferred, OpReply::Deferred]);
    assert_eq!(
        node.metrics.reads.get(),
        2,
        "a deferred read counts when it runs"
    );
    let again = node.apply_batch(vec![read("c"), read("missing")]);
    assert_eq!(node.metrics.reads.get(), 4);
    assert_eq!(again[0].value_bytes(), big);
    assert!(matches!(&again[1], OpReply::Siblings(set) if set.is_empty()));
    // Writes whose replies pass the budget defer every read; sent again alone, the read
    // runs.
    let replies = node.apply_batch(vec![
        Op::Coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "d".into(),
            value: Some("x".repeat(READ_REPLY_BUDGET + 1)),
            context: None,
            hint_for: None,
        }),
        read("missing"),
    ]);
    assert_eq!(replies[1], OpReply::Deferred);
    assert!(matches!(
        &node.apply_batch(vec![read("missing")])[..],
        [OpReply::Siblings(set)] if set.is_empty()
    ));
}

#[test]
fn a_batch_applies_its_writes_in_order_and_answers_each() {
    let node = node();
    let write = |key: &str, value: &str, hint_for: Option<&str>| {
        Op::Coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: key.into(),
            value: Some(value.into()),
            context: None,
            hint_for: hint_for.map(str::to_owned),
        })
    };
    let too_long = "k".repeat(messages::MAX_KEY_BYTES + 1);
    let replies = node.apply_batch(vec![
        write("k", "<value>1</value>", None),
        write("k", "<value>2</value>", None),
        Op::Read(ReadRequest {
            key: "k".into(),
            hint_for: None,
        }),
        write(&too_long, "<value>x</value>", None),
        write("other", "<value>3</value>", None),
        write("k", "<value>for B</value>", Some("127.0.0.1:1")),
    ]);
    let values = |reply: &OpReply| match reply {
        OpReply::Siblings(set) => set
            .versions()
            .iter()
            .filter_map(|v| v.value.clone())
            .collect::<Vec<_>>(),
        other => panic!("expected a sibling set, got {other:?}"),
    };
    assert_eq!(replies.len(), 6);
    assert_eq!(values(&replies[0]), ["<value>1</value>"]);
    // A blind write supersedes what the node holds, including the batch's own first write.
    assert_eq!(values(&replies[1]), ["<value>2</value>"]);
    assert_eq!(values(&replies[2]), ["<value>2</value>"]);
    match &replies[3] {
        OpReply::Fault { code, .. } => {
            assert_eq!(*code, crate::error::FAULT_INVALID_PARAMS)
        }
        other => panic!("a key over the limit: expected a fault, got {other:?}"),
    }
    assert_eq!(values(&replies[4]), ["<value>3</value>"]);
    // The hint is kept apart: it neither counts as a key nor changes the node's own copy.
    assert_eq!(values(&replies[5]), ["<value>for B</value>"]);
    assert_eq!(counts(&node), (2, 0));
    assert_eq!(node.hints.load(Ordering::Relaxed), 1);
    assert_eq!(
        node.load("k").expect("load").latest_value(),
        Some("<value>2</value>")
    );
}

/// A hint that cannot be decoded stays where it is (it may be the write's only other
/// copy), and the node's metrics count it for as long as it is there.
#[tokio::test]
async fn a_corrupt_hint_is_counted_and_left_in_place() {
    let node = Arc::new(node());
    let slot = hints::slot("127.0.0.1:1", "k");
    node.engine
        .write(vec![WriteOp::put(
            Tree::Hints,
            slot.clone(),
            b"\xff\xff\xff".to_vec(),
        )])
        .expect("write");
    let client = RpcClient::new();
    for _ in 0..2 {
        assert_eq!(hints::handoff_round(&node, &client).await, 0);
        assert_eq!(node.corrupt_hints.load(Ordering::Relaxed), 1);
        assert!(exposition(&node).contains("\ndynamite_node_hints_corrupt 1\n"));
    }
    assert!(node.engine.get(Tree::Hints, &slot).expect("read").is_some());
    // Once it is gone (an operator removed it), the count says so.
    node.engine
        .write(vec![WriteOp::remove(Tree::Hints, slot)])
        .expect("write");
    hints::handoff_round(&node, &client).await;
    assert_eq!(node.corrupt_hints.load(Ordering::Relaxed), 0);
}

#[test]
fn a_merge_in_a_batch_is_acknowledged_without_the_set() {
    let coordinator = node();
    let replica = node();
    let set = put(&coordinator, "m", Some("<value>v</value>"));
    let replies = replica.apply_batch(vec![Op::Merge(MergeRequest {
        key: "m".into(),
        siblings: set.clone(),
        hint_for: None,
    })]);
    assert_eq!(replies, [OpReply::Merged]);
    assert_eq!(replica.load("m").expect("load"), set);
}

/// An operation that reaches the node after its deadline is refused and leaves nothing
/// behind, whatever it is; one within its deadline is applied as usual.
#[test]
fn operations_past_their_deadline_are_refused_unapplied() {
    let node = node();
    let now = crate::clock::now_us();
    let (past, future) = (now - 1_000_000, now + 60_000_000);
    let coordinate = |key: &str| {
        Op::Coordinate(CoordinateRequest {
            key: key.into(),
            value: Some("<value>v</value>".into()),
            context: None,
            hint_for: None,
            entered_us: now,
        })
    };
    let elsewhere = put(&super::tests::node(), "m", Some("<value>m</value>"));
    let merge = Op::Merge(MergeRequest {
        key: "m".into(),
        siblings: elsewhere.clone(),
        hint_for: None,
    });
    let read = Op::Read(ReadRequest {
        key: "k".into(),
        hint_for: None,
    });
    let replies = node.apply(vec![
        (coordinate("late"), past),
        (merge.clone(), past),
        (coordinate("k"), future),
        (read.clone(), past),
    ]);
    let late = |reply: &OpReply| matches!(reply, OpReply::Expired { late_by_us } if *late_by_us >= 1_000_000);
    assert!(late(&replies[0]), "{:?}", replies[0]);
    assert!(late(&replies[1]), "{:?}", replies[1]);
    assert!(matches!(&replies[2], OpReply::Siblings(set) if set.is_live()));
    assert!(late(&replies[3]), "{:?}", replies[3]);
    assert!(
        node.load("late").expect("load").is_empty(),
        "nothing applied"
    );
    assert!(node.load("m").expect("load").is_empty(), "nothing merged");
    assert_eq!(counts(&node), (1, 0));
    assert_eq!(node.metrics.expired.get(), 3);
    assert!(exposition(&node).contains("\ndynamite_node_expired_total 3\n"));
    // The same merge in time goes through.
    assert_eq!(node.apply(vec![(merge, future)]), [OpReply::Merged]);
    assert_eq!(node.load("m").expect("load"), elsewhere);
    // So does a merge from anti-entropy, and the same one late is refused.
    let error = node
        .merge_own_many_until(
            vec![("n".into(), messages::HeldCopy::unreaped(elsewhere.clone()))],
            past,
        )
        .expect_err("a late push");
    assert!(error.fault_string().contains("deadline"), "{error}");
    assert!(node.load("n").expect("load").is_empty());
}

/// A blind put that reaches the node after newer writes (it entered the cluster before
/// them) supersedes only what is older than it: the newer write stays what a read shows.
#[test]
fn a_late_blind_put_leaves_newer_writes_in_place() {
    let node = node();
    let write = |value: &str, entered_us: u64| write_at(&node, Some(value), entered_us);
    let now = crate::clock::now_us();
    write("<value>31</value>", now - 3_000);
    write("<value>33</value>", now - 1_000);
    let held = write("<value>32</value>", now - 2_000);
    assert_eq!(held.versions().len(), 2, "{held:?}");
    assert_eq!(held.latest_value(), Some("<value>33</value>"));
}

/// Once a key's tombstones are reaped, a write that entered before the delete and reaches
/// the node only now (a put delayed within its deadline, a copy read before the delete
/// arrived) must not bring the value back; a write that entered after it goes through.
#[test]
fn a_write_older_than_a_reaped_delete_does_not_bring_the_value_back() {
    let node = node();
    let now = crate::clock::now_us();
    let write = |value: Option<&str>, entered_us: u64| write_at(&node, value, entered_us);
    write(Some("<value>old</value>"), now - 3_000);
    let tombstone = write(None, now - 2_000);
    assert!(
        node.reap(&ReapRequest {
            key: "k".into(),
            dots: tombstone.dots().collect(),
        })
        .expect("reap")
    );
    // A put that entered before the delete, arriving late.
    assert!(write(Some("<value>late</value>"), now - 2_500).is_empty());
    // A copy of the old value, from a replica that read it before the delete came.
    let mut old_copy = Siblings::new();
    old_copy.write(7, None, Some("<value>old</value>".into()), now - 3_000);
    node.merge(MergeRequest {
        key: "k".into(),
        siblings: old_copy,
        hint_for: None,
    })
    .expect("merge");
    assert!(node.load("k").expect("load").is_empty(), "still deleted");
    assert_eq!(counts(&node), (0, 0));
    // A put after the delete is a put.
    let again = write(Some("<value>again</value>"), now);
    assert_eq!(again.latest_value(), Some("<value>again</value>"));
}

/// A replica the reap of a deleted key missed keeps its tombstone. A write made after the reap
/// at a replica that did reap must survive meeting that tombstone (its dot is not one the
/// tombstone's past counts), and the replica that missed the reap learns of it from the
/// other's copy, so that the two hold the same set and anti-entropy stops moving the key.
#[test]
fn a_replica_that_missed_a_reap_learns_it_from_a_copy() {
    let reaper = node();
    let missed = node();
    let now = crate::clock::now_us();
    let write = |value: Option<&str>, entered_us: u64| write_at(&reaper, value, entered_us);
    for i in 0..3 {
        write(Some("<value>old</value>"), now - 10_000 + i);
    }
    let tombstone = write(None, now - 5_000);
    missed
        .merge(MergeRequest {
            key: "k".into(),
            siblings: tombstone.clone(),
            hint_for: None,
        })
        .expect("the delete's copy");
    // The reap reaches only `reaper`; then a client writes the key again there.
    assert!(
        reaper
            .reap(&ReapRequest {
                key: "k".into(),
                dots: tombstone.dots().collect(),
            })
            .expect("reap")
    );
    write(Some("<value>new</value>"), now);
    let copy = reaper.read_own("k").expect("read");
    assert_eq!(
        copy.reaped_us,
        Some(now - 5_000),
        "the copy says what was reaped"
    );

    // Met without word of the reap (a read repair), the new write is a sibling that shows.
    let mut met = missed.load("k").expect("load");
    met.merge(&copy.siblings);
    assert_eq!(met.latest_value(), Some("<value>new</value>"), "{met:?}");
    assert_eq!(met.versions().len(), 2, "the tombstone beside it");

    // Through anti-entropy, the replica that missed the reap drops the tombstone too.
    missed
        .merge_own_many(vec![("k".into(), copy.clone())])
        .expect("pull");
    assert_eq!(missed.load("k").expect("load"), copy.siblings);
    assert_eq!(
        missed.read_own("k").expect("read"),
        copy,
        "and remembers it"
    );
    // Its tombstone, pushed back by a third replica that missed the reap, stays out.
    missed
        .merge_own_many(vec![("k".into(), messages::HeldCopy::unreaped(tombstone))])
        .expect("push");
    assert_eq!(missed.load("k").expect("load"), copy.siblings);
    assert_eq!(counts(&missed), (1, 0));
}

/// A write stamped far ahead of this node's clock would win every read until that time
/// came: the node refuses to coordinate it, and says why.
#[test]
fn a_write_stamped_far_ahead_of_the_node_clock_is_refused() {
    let node = node();
    let error = node
        .coordinate(CoordinateRequest {
            key: "k".into(),
            value: Some("<value>v</value>".into()),
            context: None,
            hint_for: None,
            entered_us: crate::clock::now_us() + 2 * MAX_ENTRY_AHEAD_US,
        })
        .expect_err("refused");
    assert!(error.fault_string().contains("ahead"), "{error}");
    assert!(node.load("k").expect("load").is_empty());
}

#[test]
fn keys_over_the_limit_are_refused() {
    let node = node();
    let key = "k".repeat(messages::MAX_KEY_BYTES + 1);
    let error = node
        .read(&ReadRequest {
            key,
            hint_for: None,
        })
        .expect_err("too long");
    assert_eq!(error.fault_code(), crate::error::FAULT_INVALID_PARAMS);
}

/// The start's count, made in the background while commits go on, ends with the figures and
/// the anti-entropy trees a count of the final data gives: each key counted once, whether a
/// commit changed it before the count reached it or after.
#[test]
fn a_count_made_while_commits_go_on_counts_each_key_once() {
    let config = |storage| NodeConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        peers: vec!["127.0.0.1:2".into()],
        storage,
        log_requests: false,
        max_request_bytes: 1 << 20,
        ring: Some(
            crate::config::NodeRing::new("127.0.0.1:1".into(), &["127.0.0.1:2".into()], None)
                .expect("ring"),
        ),
        aae_interval: Duration::from_secs(1),
        aae_max_keys: 1000,
        cache_bytes: 1 << 20,
        advertise: "127.0.0.1:1".into(),
        zone: String::new(),
        replicas: 2,
        security: crate::security::Security::default(),
    };
    let dir = std::env::temp_dir().join(format!(
        "dynamite-census-{}-{}",
        std::process::id(),
        crate::random::random_u64()
    ));
    let storage = StorageConfig::Log {
        dir: dir.clone(),
        recovery: crate::storage::Recovery::Refuse,
    };
    {
        let node = StorageNode::open(&config(storage.clone())).expect("open");
        for i in 0..3000 {
            put(&node, &format!("k{i}"), Some("<value>v</value>"));
        }
        for i in 0..300 {
            put(&node, &format!("k{i}"), None);
        }
    }
    let node = StorageNode::open_uncounted(&config(storage.clone())).expect("reopen");
    let mut corrupt = 0;
    let mut round = 0;
    // A page of the count, then commits all over the key space: new keys, changed values,
    // deletes, keys brought back.
    let aae = node.aae().expect("peers");
    loop {
        // The count and the trees' fill walk apart, each a page at a time.
        let counted = node.census.step(&node, &mut corrupt).expect("step");
        let filled = aae.fill_step(&**node.engine()).expect("fill");
        if counted && filled {
            break;
        }
        for j in 0..20 {
            let i = round * 20 + j;
            put(&node, &format!("new{i}"), Some("<value>n</value>"));
            put(
                &node,
                &format!("k{}", (i * 7) % 3000),
                Some("<value>w</value>"),
            );
            put(&node, &format!("k{}", (i * 13 + 5) % 3000), None);
        }
        round += 1;
    }
    assert!(
        round >= 3,
        "the count took {round} pages: too few to interleave"
    );
    assert!(node.census.is_done());
    let during = counts(&node);
    let root_during = node.aae().expect("peers").root(1);
    drop(node);
    let counted = StorageNode::open(&config(storage)).expect("reopen");
    assert_eq!(during, counts(&counted), "(live, tombstones)");
    assert_eq!(root_during, counted.aae().expect("peers").root(1));
    drop(counted);
    let _ = std::fs::remove_dir_all(dir);
}

/// What the node's `/metrics` shows of its counters and gauges.
fn exposition(node: &StorageNode) -> String {
    crate::telemetry::render(&crate::rpc::server::Handler::figures(node), &[])
}

/// The simulation's seed 16132755956858121918: a node stood in for two owners of one key
/// (sloppy quorum), coordinating one client's put into a hint for each. Stamped under the
/// node's own actor, each hint (empty until then) gave its write the same dot, and the
/// client's next write, whose context covered the first, superseded the second too. Each
/// write into a hint now gets a dot no other write has.
#[test]
fn writes_coordinated_into_hints_never_share_a_dot() {
    let node = node();
    let into_hint = |owner: &str, value: &str, context: Option<crate::version::VClock>| {
        node.coordinate(CoordinateRequest {
            entered_us: crate::clock::now_us(),
            key: "k".into(),
            value: Some(value.into()),
            context,
            hint_for: Some(owner.into()),
        })
        .expect("coordinate into a hint")
    };
    let first = into_hint(
        "owner-a",
        "<value>1</value>",
        Some(crate::version::VClock::new()),
    );
    let second = into_hint(
        "owner-b",
        "<value>2</value>",
        Some(crate::version::VClock::new()),
    );
    // And a third owner.
    let third = into_hint(
        "owner-c",
        "<value>3</value>",
        Some(crate::version::VClock::new()),
    );
    let dots: Vec<crate::version::Dot> = [&first, &second, &third]
        .iter()
        .flat_map(|set| set.dots())
        .collect();
    let unique: std::collections::BTreeSet<crate::version::Dot> = dots.iter().copied().collect();
    assert_eq!(unique.len(), dots.len(), "dots {dots:?}");
    // A write that saw only the first supersedes only the first.
    let mut everything = first.clone();
    everything.merge(&second);
    everything.merge(&third);
    let mut resolving = first.clone();
    resolving.write(
        99,
        Some(&first.context()),
        Some("<value>4</value>".into()),
        1,
    );
    everything.merge(&resolving);
    let values: Vec<&str> = everything
        .values()
        .filter_map(|v| v.value.as_deref())
        .collect();
    assert_eq!(values.len(), 3, "{values:?}");
    assert!(!values.contains(&"<value>1</value>"), "{values:?}");
}
