use super::*;

fn member(address: &str) -> Member {
    Member {
        address: address.into(),
        zone: String::new(),
        weight: 1,
    }
}

fn three() -> History {
    History::initial(vec![member("c:3"), member("a:1"), member("b:2")], 3)
}

/// `three` with d:4 applied as version 2.
fn growing() -> History {
    let mut history = three();
    history.stage_add(member("d:4"), 10, "a:1").expect("stages");
    let (next, moved) = history.next_version(2).expect("applies");
    assert!(moved > 0 && moved < 768, "moved {moved}");
    history.with_applied(next, 20, "a:1")
}

#[test]
fn apply_needs_the_next_number_and_something_staged() {
    let history = three();
    assert!(history.next_version(2).is_err(), "nothing staged");
    let mut staged = three();
    staged.stage_add(member("d:4"), 1, "x").expect("stages");
    for wrong in [0, 1, 3, 7] {
        let refused = staged.next_version(wrong).expect_err("wrong number");
        assert!(refused.0.contains("next one is 2"), "{refused}");
    }
    let (next, _) = staged.next_version(2).expect("applies");
    assert_eq!(next.members.len(), 4);
    let applied = staged.with_applied(next, 2, "x");
    assert!(applied.staged.changes.is_empty());
    assert!(applied.in_transition());
}

#[test]
fn staging_edits_and_refusals() {
    let mut history = three();
    assert!(history.stage_remove("z:9", 1, "x").is_err(), "not a member");
    let heavy = Member {
        weight: 0,
        ..member("d:4")
    };
    assert!(history.stage_add(heavy, 1, "x").is_err(), "weight 0");
    assert!(history.stage_add(member("nohost"), 1, "x").is_err());
    history.stage_add(member("d:4"), 2, "x").expect("stages");
    history.stage_remove("a:1", 3, "x").expect("stages");
    assert_eq!(history.staged.changes.len(), 2);
    // Re-adding a member as it is stages nothing for it; removing a staged add unstages it.
    history.stage_add(member("b:2"), 4, "x").expect("no-op");
    assert_eq!(history.staged.changes.len(), 2);
    history.stage_remove("d:4", 5, "x").expect("unstages");
    assert_eq!(history.staged.changes, vec![Change::Remove("a:1".into())]);
    history.stage_revert(6, "x");
    assert!(history.staged.changes.is_empty());
    // Every edit is stamped after the last, even with a clock that went back.
    assert!(history.staged.stamp.0 >= 6);
}

#[test]
fn merges_commute_and_converge() {
    let base = growing();
    let mut one = base.clone();
    History::raise(&mut one.ack, "a:1", 2);
    History::raise(&mut one.sync, "d:4", 2);
    one.stage_remove("b:2", 100, "a:1").expect("stages");
    let mut two = base.clone();
    History::raise(&mut two.ack, "b:2", 2);
    two.stage_revert(50, "b:2");
    let mut left = one.clone();
    left.merge(&two);
    let mut right = two.clone();
    right.merge(&one);
    assert_eq!(left, right);
    assert_eq!(left.ack.get("a:1"), Some(&2));
    assert_eq!(left.ack.get("b:2"), Some(&2));
    assert_eq!(left.staged.changes.len(), 1, "the later edit wins");
    // Merging again changes nothing.
    assert!(!left.merge(&one).changed);
}

#[test]
fn a_stale_history_catches_up_and_new_versions_append() {
    let old = three();
    let new = growing();
    let mut caught_up = old.clone();
    assert!(caught_up.merge(&new).changed);
    assert_eq!(caught_up.current().number, 2);
    // The newer side learns nothing from the older one.
    let mut newer = new.clone();
    assert!(!newer.merge(&old).changed);
}

#[test]
fn two_versions_with_one_number_converge_on_one() {
    let mut left = three();
    left.stage_add(member("d:4"), 1, "a:1").expect("stages");
    let (v2_left, _) = left.next_version(2).expect("applies");
    let left = left.with_applied(v2_left, 2, "a:1");
    let mut right = three();
    right.stage_add(member("e:5"), 1, "b:2").expect("stages");
    let (v2_right, _) = right.next_version(2).expect("applies");
    let right = right.with_applied(v2_right, 2, "b:2");
    let mut a = left.clone();
    let merged_a = a.merge(&right);
    let mut b = right.clone();
    let merged_b = b.merge(&left);
    assert!(merged_a.conflict.is_some() && merged_b.conflict.is_some());
    assert_eq!(a.versions, b.versions, "both keep the same version 2");
}

#[test]
fn reads_move_once_every_member_synced_and_versions_end_when_everyone_reads() {
    let now = 1_000;
    let mut history = growing();
    assert_eq!(history.read_version(), 1);
    assert_eq!(history.ack_min(now), 1);
    for who in ["a:1", "b:2", "c:3", "d:4"] {
        History::raise(&mut history.ack, who, 2);
    }
    assert_eq!(history.ack_min(now), 2);
    // A balancer heard of lately holds the acks back; one gone for long does not.
    history.gateways.insert("lb".into(), now);
    assert_eq!(history.ack_min(now), 1);
    assert_eq!(history.ack_min(now + GATEWAY_LEASE_US + 1), 2);
    History::raise(&mut history.ack, "lb", 2);
    assert_eq!(history.ack_min(now), 2);
    for who in ["a:1", "b:2", "c:3"] {
        History::raise(&mut history.sync, who, 2);
    }
    assert_eq!(history.read_version(), 1, "d:4 has not synced");
    assert!(!history.prune(now));
    History::raise(&mut history.sync, "d:4", 2);
    assert_eq!(history.read_version(), 2);
    assert!(!history.prune(now), "nobody said it reads version 2 yet");
    for who in ["a:1", "b:2", "c:3", "d:4"] {
        History::raise(&mut history.sync_ack, who, 2);
    }
    assert!(!history.prune(now), "the balancer still reads version 1");
    History::raise(&mut history.sync_ack, "lb", 2);
    assert!(history.prune(now));
    assert_eq!(history.versions.len(), 1);
    assert_eq!(history.current().number, 2);
}

#[test]
fn a_removed_member_holds_nothing_back() {
    let now = 0;
    let mut history = three();
    history.stage_remove("c:3", 1, "a:1").expect("stages");
    let (next, _) = history.next_version(2).expect("applies");
    let mut history = history.with_applied(next, 2, "a:1");
    for who in ["a:1", "b:2"] {
        History::raise(&mut history.ack, who, 2);
        History::raise(&mut history.sync, who, 2);
        History::raise(&mut history.sync_ack, who, 2);
    }
    assert_eq!(history.ack_min(now), 2);
    assert_eq!(history.read_version(), 2);
    assert!(history.prune(now));
}

#[test]
fn a_joining_node_receives_what_it_lacks_from_every_old_holder() {
    let history = growing();
    let wanted = history.partitions_to_receive("d:4");
    let new = history.current().layout();
    let d = new
        .servers()
        .iter()
        .position(|s| s == "d:4")
        .expect("member");
    let held = new.replica_counts()[d];
    assert_eq!(wanted.len(), held, "d:4 held nothing before");
    for (_, sources) in &wanted {
        assert_eq!(sources, &["a:1", "b:2", "c:3"]);
    }
    // N = 3 of 3 before: the old members held everything and receive nothing.
    for who in ["a:1", "b:2", "c:3"] {
        assert!(history.partitions_to_receive(who).is_empty(), "{who}");
    }
    assert!(three().partitions_to_receive("a:1").is_empty());
}

#[test]
fn histories_round_trip_and_refuse_garbage() {
    let history = growing();
    assert_eq!(History::decode(&history.encode()), Some(history.clone()));
    assert_eq!(History::decode(b"\x01\x02garbage"), None);
    assert_ne!(history.digest(), three().digest());
}

#[test]
fn a_daemon_with_another_version_one_is_ignored() {
    let mut mine = three();
    let theirs = History::initial(vec![member("a:1"), member("z:9")], 2);
    let merged = mine.merge(&theirs);
    assert!(!merged.changed);
    assert!(merged.conflict.is_some());
    assert_eq!(mine, three());
}

/// With three versions live, reads stay on the oldest until the newest's members all synced
/// it: a middle version's members pulled only what the newest gives them.
#[test]
fn reads_never_use_a_middle_version() {
    let mut history = growing();
    history.stage_add(member("e:5"), 30, "a:1").expect("stages");
    let (v3, _) = history.next_version(3).expect("applies");
    let mut history = history.with_applied(v3, 40, "a:1");
    for who in ["a:1", "b:2", "c:3", "d:4"] {
        History::raise(&mut history.sync, who, 3);
    }
    assert_eq!(
        history.read_version(),
        1,
        "e:5 has not synced; v2 is not readable"
    );
    History::raise(&mut history.sync, "e:5", 3);
    assert_eq!(history.read_version(), 3);
}
