//! `explain(key)` and `dynamite explain KEY` against the real binaries: the key's partition,
//! its replicas (preferred, or a fallback standing in for a down one), and what each holds:
//! versions with their dot, context, timestamp, size and tombstone flag, and hints.

mod common;

use std::process::Command;
use std::time::Duration;

use common::membership::{layout_of, placement, replicas};
use common::*;
use dxr::Value;

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    member(value, name)
}

/// The entries of `answer`'s only layout version.
fn replica_entries(answer: &Value) -> Vec<(String, String, String, String)> {
    let layouts = array(field(answer, "layouts"));
    assert_eq!(layouts.len(), 1, "one live layout version: {answer:?}");
    array(field(&layouts[0], "replicas"))
        .iter()
        .map(|replica| {
            (
                string(field(replica, "address")).to_owned(),
                string(field(replica, "role")).to_owned(),
                string(field(replica, "for")).to_owned(),
                string(field(replica, "state")).to_owned(),
            )
        })
        .collect()
}

/// What `answer` says `address` holds: its entry of `stored`.
fn stored_at<'a>(answer: &'a Value, address: &str) -> &'a Value {
    array(field(answer, "stored"))
        .iter()
        .find(|entry| string(field(entry, "address")) == address)
        .unwrap_or_else(|| panic!("no stored entry for {address}: {answer:?}"))
}

fn has_member(value: &Value, name: &str) -> bool {
    matches!(value, Value::Struct(fields) if fields.contains_key(name))
}

#[test]
fn explain_shows_where_a_key_lives_and_what_each_replica_holds() {
    let mut cluster = Cluster::builder().nodes(4).replicas(3).never_reap().start();
    let lb = cluster.client();
    assert_eq!(lb.put("cart", s("milk")), ok200());
    let owners = replicas(&placement(&layout_of(&lb)), "cart");
    assert_eq!(owners.len(), 3);

    // Everything up: the three preferred replicas, each with the one version.
    let answer = lb.call("explain", vec![s("cart")]).expect("explain");
    assert_eq!(
        int(field(&answer, "partition")),
        i64::try_from(dynamite::layout::Layout::partition_of(b"cart")).expect("partition")
    );
    let entries = replica_entries(&answer);
    let expected: Vec<_> = owners
        .iter()
        .map(|a| {
            (
                a.clone(),
                "preferred".to_owned(),
                a.clone(),
                "up".to_owned(),
            )
        })
        .collect();
    assert_eq!(entries, expected);
    wait_until(
        Duration::from_secs(5),
        "every replica holds the write",
        || {
            let answer = lb.call("explain", vec![s("cart")]).expect("explain");
            owners
                .iter()
                .all(|owner| array(field(stored_at(&answer, owner), "versions")).len() == 1)
        },
    );
    let answer = lb.call("explain", vec![s("cart")]).expect("explain");
    for owner in &owners {
        let stored = stored_at(&answer, owner);
        let version = &array(field(stored, "versions"))[0];
        assert!(!string(field(version, "dot")).is_empty());
        // What the version had seen: nothing, for the key's first write.
        assert_eq!(string(field(version, "context")), "");
        assert!(int(field(version, "timestamp_us")) > 0);
        assert!(int(field(version, "size")) > 0);
        assert_eq!(field(version, "tombstone"), &Value::Boolean(false));
        assert!(array(field(stored, "hints")).is_empty());
    }

    // The first preferred replica down: a fallback stands in and holds a hint for it.
    let down = owners[0].clone();
    let index = cluster
        .servers()
        .iter()
        .position(|a| *a == down)
        .expect("a node of the cluster");
    cluster.nodes[index].kill();
    let mut last = Value::Nil;
    wait_until(
        Duration::from_secs(15),
        "a fallback holds a hint for the down node",
        || {
            let _ = lb.put("cart", s("milk and eggs"));
            last = lb.call("explain", vec![s("cart")]).expect("explain");
            replica_entries(&last)
                .iter()
                .any(|(address, role, owner, state)| {
                    role == "fallback"
                        && *owner == down
                        && state == "up"
                        && array(field(stored_at(&last, address), "hints"))
                            .iter()
                            .any(|hint| string(field(hint, "owner")) == down)
                })
        },
    );
    let entries = replica_entries(&last);
    assert!(
        entries.contains(&(
            down.clone(),
            "preferred".into(),
            down.clone(),
            "down".into()
        )),
        "the down preferred replica is listed, down: {entries:?}"
    );
    assert!(
        has_member(stored_at(&last, &down), "error"),
        "the down node cannot say what it holds: {last:?}"
    );

    // A delete: the live replicas hold a tombstone.
    assert_eq!(lb.delete("cart"), ok200());
    let answer = lb.call("explain", vec![s("cart")]).expect("explain");
    let tombstones = owners[1..]
        .iter()
        .filter(|owner| {
            array(field(stored_at(&answer, owner), "versions"))
                .iter()
                .any(|v| field(v, "tombstone") == &Value::Boolean(true))
        })
        .count();
    assert!(tombstones >= 1, "{answer:?}");

    // The command: a table a person reads, and JSON for scripts.
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dynamite"))
            .args(["-s", &addr(cluster.balancer_port(0))])
            .args(args)
            .output()
            .expect("run dynamite")
    };
    let table = run(&["explain", "cart"]);
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains(&owners[1]) && text.contains("fallback"),
        "{text}"
    );
    let json = run(&["--json", "explain", "cart"]);
    assert!(json.status.success(), "{json:?}");
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(parsed["key"], "cart");
    assert!(parsed["stored"].as_array().is_some_and(|s| s.len() >= 3));
}
