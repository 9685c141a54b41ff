//! Table tests of the coordinator's rules: each case feeds a machine replies and checks the
//! actions it asks for.

use super::*;
use crate::quorum::Tally;

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;
const D: usize = 3;

fn servers() -> Servers {
    Servers(
        ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]
            .map(String::from)
            .into(),
    )
}

fn own(server: usize) -> Target {
    Target {
        server,
        owner: server,
    }
}

fn plan(targets: Vec<Target>, needed: usize) -> Plan {
    Plan {
        targets,
        tally: Tally::new(3, needed),
        detail: None,
        groups: Vec::new(),
    }
}

fn request(value: Option<&str>) -> WriteRequest {
    WriteRequest {
        key: "k".into(),
        value: value.map(str::to_owned),
        context: None,
        entered_us: 1_000,
    }
}

fn coordinate(target: Target, hint_for: Option<&str>) -> Action<()> {
    Action::Send(
        target,
        Op::Coordinate(CoordinateRequest {
            key: "k".into(),
            value: Some("<value>v</value>".into()),
            context: None,
            hint_for: hint_for.map(str::to_owned),
            entered_us: 1_000,
        }),
    )
}

fn merge<T>(target: Target, siblings: &Siblings, hint_for: Option<&str>) -> Action<T> {
    Action::Send(
        target,
        Op::Merge(MergeRequest {
            key: "k".into(),
            siblings: siblings.clone(),
            hint_for: hint_for.map(str::to_owned),
        }),
    )
}

/// A sibling set holding one write of `value` entered at `entered_us`.
fn set(actor: u64, value: Option<&str>, entered_us: u64) -> Siblings {
    let mut s = Siblings::new();
    s.write(actor, None, value.map(str::to_owned), entered_us);
    s
}

fn ok(siblings: &Siblings) -> std::result::Result<OpReply, CallError> {
    Ok(OpReply::Siblings(siblings.clone()))
}

fn fault(code: i32) -> std::result::Result<OpReply, CallError> {
    Err(CallError::Fault {
        code,
        message: "refused".into(),
    })
}

/// The answer among `actions`, as the client would see it: `Ok(())` or the fault string.
fn answer<T: std::fmt::Debug>(actions: &[Action<T>]) -> Option<std::result::Result<&T, String>> {
    actions.iter().find_map(|action| match action {
        Action::Answer(Ok(value)) => Some(Ok(value)),
        Action::Answer(Err(error)) => Some(Err(error.fault_string())),
        _ => None,
    })
}

fn sends<T>(actions: &[Action<T>]) -> Vec<Target> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send(target, _) => Some(*target),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

/// A put of `<value>v</value>` to A, B and C, in that order, needing `w` of them.
fn write_to_abc(w: usize) -> (Write, Vec<Action<()>>) {
    Write::start(
        servers(),
        request(Some("<value>v</value>")),
        plan(vec![own(A), own(B), own(C)], w),
        false,
    )
}

/// The first target coordinates; its set goes to the others as copies; the client hears at
/// W; copies answering after that change nothing.
#[test]
fn a_write_is_coordinated_copied_and_answered_at_w() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let (mut write, actions) = write_to_abc(2);
    assert_eq!(actions, vec![coordinate(own(A), None)]);
    let actions = write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(
        actions,
        vec![merge(own(B), &stored, None), merge(own(C), &stored, None)]
    );
    assert_eq!(
        write.on_reply(own(C), Ok(OpReply::Merged), 0),
        vec![Action::Answer(Ok(()))]
    );
    assert_eq!(
        write.on_reply(own(B), Ok(OpReply::Merged), 0),
        vec![],
        "answered once"
    );
    assert_eq!(
        write.on_reply(own(B), Ok(OpReply::Merged), 0),
        vec![],
        "a duplicate"
    );
}

/// W = 1: the coordinator's own store is the quorum; the copies still go out.
#[test]
fn w_of_one_is_met_by_the_coordinator() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let (mut write, _) = write_to_abc(1);
    let actions = write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(sends(&actions), vec![own(B), own(C)]);
    assert_eq!(answer(&actions), Some(Ok(&())));
}

/// A lagging first replica passed over is counted, and the order given is kept.
#[test]
fn a_coordinator_switch_is_noted() {
    let (_, actions) = Write::start(
        servers(),
        request(Some("<value>v</value>")),
        plan(vec![own(B), own(A), own(C)], 2),
        true,
    );
    assert_eq!(
        actions,
        vec![
            Action::Note(Event::CoordinatorSwitched),
            coordinate(own(B), None)
        ]
    );
}

/// Coordinator candidates are asked one after the other: one that fails counts as failed
/// and does not get a copy; one that answers but will not coordinate is passed over and
/// gets the copy; a refusal of the write itself is the answer.
#[test]
fn coordinator_failures_table() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    // (first reply, what follows: second candidate asked?, copies after B coordinates,
    // answer when C's copy succeeds)
    struct Case {
        first: std::result::Result<OpReply, CallError>,
        second_asked: bool,
        copies: Vec<Target>,
        answer_after_c: Option<std::result::Result<(), String>>,
    }
    let cases = [
        // A timed out: counted failed; B coordinates, C gets the copy; W met by B and C.
        Case {
            first: Err(CallError::Timeout),
            second_asked: true,
            copies: vec![own(C)],
            answer_after_c: Some(Ok(())),
        },
        // A refused to coordinate (clock, or expired): passed over, gets a copy, W met.
        Case {
            first: fault(crate::error::FAULT_INTERNAL),
            second_asked: true,
            copies: vec![own(A), own(C)],
            answer_after_c: Some(Ok(())),
        },
        Case {
            first: Err(CallError::Expired { late_by_ms: 3 }),
            second_asked: true,
            copies: vec![own(A), own(C)],
            answer_after_c: Some(Ok(())),
        },
        // A refused the write itself: the client's fault, nobody else asked.
        Case {
            first: fault(FAULT_INVALID_PARAMS),
            second_asked: false,
            copies: vec![],
            answer_after_c: None,
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let (mut write, _) = write_to_abc(2);
        let actions = write.on_reply(own(A), case.first, 0);
        if !case.second_asked {
            assert_eq!(sends(&actions), vec![], "case {i}");
            assert_eq!(answer(&actions), Some(Err("refused".into())), "case {i}");
            continue;
        }
        assert_eq!(actions, vec![coordinate(own(B), None)], "case {i}");
        let actions = write.on_reply(own(B), ok(&stored), 0);
        assert_eq!(sends(&actions), case.copies, "case {i}");
        assert_eq!(answer(&actions), None, "case {i}: W = 2 not met by B alone");
        let actions = write.on_reply(own(C), Ok(OpReply::Merged), 0);
        assert_eq!(
            answer(&actions).map(|a| a.map(|_| ())),
            case.answer_after_c,
            "case {i}"
        );
    }
}

/// When W can no longer be met, the client gets 503 saying which quorum, how many answered
/// and the first failure.
#[test]
fn an_impossible_write_quorum_is_a_503_that_says_why() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    // Two coordinators time out: with N = 3 and W = 2, nothing is left to try.
    let (mut write, _) = write_to_abc(2);
    assert_eq!(
        sends(&write.on_reply(own(A), Err(CallError::Timeout), 0)),
        vec![own(B)]
    );
    let actions = write.on_reply(own(B), Err(CallError::Timeout), 0);
    assert_eq!(sends(&actions), vec![]);
    assert!(actions.contains(&Action::Note(Event::QuorumFailed(QuorumKind::Write))));
    assert_eq!(
        answer(&actions),
        Some(Err(
            "write (W) quorum not met: 2 of 3 replicas needed, 0 answered (10.0.0.1:1: timed out)"
                .into()
        ))
    );
    assert_eq!(
        write.on_reply(own(C), ok(&stored), 0),
        vec![],
        "C was never asked"
    );

    // The coordinator stores it, but both copies fail: 1 of 2.
    let (mut write, _) = write_to_abc(2);
    write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(write.on_reply(own(B), Err(CallError::Timeout), 0), vec![]);
    let actions = write.on_reply(own(C), Err(CallError::Transport("refused".into())), 0);
    assert_eq!(
        answer(&actions),
        Some(Err(
            "write (W) quorum not met: 2 of 3 replicas needed, 1 answered (10.0.0.2:1: timed out)"
                .into()
        ))
    );

    // Every candidate refused to coordinate: each counts as failed in the end.
    let (mut write, _) = Write::start(
        servers(),
        request(Some("<value>v</value>")),
        plan(vec![own(A), own(B)], 2),
        false,
    );
    write.on_reply(own(A), fault(crate::error::FAULT_INTERNAL), 0);
    let actions = write.on_reply(own(B), fault(crate::error::FAULT_INTERNAL), 0);
    assert_eq!(
        answer(&actions),
        Some(Err(
            "write (W) quorum not met: 2 of 3 replicas needed, 0 answered (10.0.0.1:1: fault -32603: refused)"
                .into()
        ))
    );
}

/// A down replica left out by the plan starts the count as failed and names itself in the
/// 503 text; a fallback coordinates and copies with the owner's address as a hint.
#[test]
fn sloppy_quorum_hints_and_left_out_replicas() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let fallback = Target {
        server: D,
        owner: A,
    };
    let mut tally = Tally::new(3, 2);
    tally.failure();
    let plan = Plan {
        targets: vec![fallback, own(B)],
        tally,
        detail: Some("1 replica(s) down with no fallback".into()),
        groups: Vec::new(),
    };
    let (mut write, actions) =
        Write::start(servers(), request(Some("<value>v</value>")), plan, false);
    assert_eq!(actions, vec![coordinate(fallback, Some("10.0.0.1:1"))]);
    assert_eq!(
        write.on_reply(fallback, ok(&stored), 0),
        vec![merge(own(B), &stored, None)]
    );
    let actions = write.on_reply(own(B), Err(CallError::Timeout), 0);
    assert_eq!(
        answer(&actions),
        Some(Err(
            "write (W) quorum not met: 2 of 3 replicas needed, 1 answered (1 replica(s) down with no fallback)"
                .into()
        ))
    );
}

/// Replies nobody waits for change nothing: from a target never asked, a second reply from
/// the coordinator, a copy's answer after the client has its answer.
#[test]
fn late_and_duplicate_write_replies_are_ignored() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let (mut write, _) = write_to_abc(2);
    assert_eq!(
        write.on_reply(own(D), ok(&stored), 0),
        vec![],
        "never asked"
    );
    assert_eq!(
        write.on_reply(own(B), Ok(OpReply::Merged), 0),
        vec![],
        "not asked yet"
    );
    write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(
        write.on_reply(own(A), ok(&stored), 0),
        vec![],
        "the coordinator again"
    );
    assert_eq!(
        answer(&write.on_reply(own(B), Ok(OpReply::Merged), 0)),
        Some(Ok(&()))
    );
    assert_eq!(write.on_reply(own(C), Err(CallError::Timeout), 0), vec![]);
}

// ---------------------------------------------------------------------------------------------
// Reads
// ---------------------------------------------------------------------------------------------

const GRACE_US: u64 = 10_000_000;

fn read(targets: Vec<Target>, needed: usize) -> (Read, Vec<Action<Siblings>>) {
    Read::start(servers(), "k".into(), plan(targets, needed), 3, GRACE_US)
}

fn read_op(target: Target, hint_for: Option<&str>) -> Action<Siblings> {
    Action::Send(
        target,
        Op::Read(ReadRequest {
            key: "k".into(),
            hint_for: hint_for.map(str::to_owned),
        }),
    )
}

/// Every replica is asked at once; the client gets the merged set at R; the stragglers'
/// answers then decide the repair: every replica that answered with less gets the merged set.
#[test]
fn a_read_answers_at_r_and_repairs_what_is_stale() {
    let old = set(7, Some("<value>old</value>"), 1_000);
    let mut new = old.clone();
    new.write(8, None, Some("<value>new</value>".into()), 2_000);
    let fallback = Target {
        server: D,
        owner: C,
    };
    let (mut read, actions) = read(vec![own(A), own(B), fallback], 2);
    assert_eq!(
        actions,
        vec![
            read_op(own(A), None),
            read_op(own(B), None),
            read_op(fallback, Some("10.0.0.3:1"))
        ]
    );
    assert_eq!(read.on_reply(own(A), ok(&new), 0), vec![]);
    let actions = read.on_reply(own(B), ok(&old), 0);
    assert_eq!(answer(&actions), Some(Ok(&new)), "merged at R");
    let actions = read.on_reply(fallback, ok(&Siblings::new()), 0);
    assert_eq!(
        actions,
        vec![
            Action::Note(Event::ReadRepairs(2)),
            merge(own(B), &new, None),
            merge(fallback, &new, Some("10.0.0.3:1")),
        ]
    );
    assert_eq!(
        read.on_reply(own(B), Ok(OpReply::Merged), 0),
        vec![],
        "a repair's answer"
    );
}

/// Replicas that all agree need no repair; a failed replica is not repaired either.
#[test]
fn agreeing_replicas_are_left_alone() {
    let value = set(7, Some("<value>v</value>"), 1_000);
    let (mut read, _) = read(vec![own(A), own(B), own(C)], 2);
    read.on_reply(own(A), ok(&value), 0);
    read.on_reply(own(C), Err(CallError::Timeout), 0);
    let actions = read.on_reply(own(B), ok(&value), 0);
    assert_eq!(actions, vec![Action::Answer(Ok(value))]);
}

/// R cannot be met: 503 with the first failure; the replicas that did answer are still
/// repaired from each other.
#[test]
fn an_impossible_read_quorum_is_a_503_that_says_why() {
    let value = set(7, Some("<value>v</value>"), 1_000);
    let (mut read, _) = read(vec![own(A), own(B), own(C)], 3);
    read.on_reply(own(A), ok(&value), 0);
    let actions = read.on_reply(own(B), Err(CallError::Status(500)), 0);
    assert!(actions.contains(&Action::Note(Event::QuorumFailed(QuorumKind::Read))));
    assert_eq!(
        answer(&actions),
        Some(Err(
            "read (R) quorum not met: 3 of 3 replicas needed, 1 answered (10.0.0.2:1: HTTP status 500)"
                .into()
        ))
    );
    let actions = read.on_reply(own(C), ok(&Siblings::new()), 0);
    assert_eq!(
        actions,
        vec![
            Action::Note(Event::ReadRepairs(1)),
            merge(own(C), &value, None)
        ]
    );
}

/// Tombstones go once all N preferred replicas answered with exactly the same ones and the
/// newest is older than the grace period; otherwise they stay (and are repaired as usual).
#[test]
fn reap_table() {
    let deleted_at = 5_000_000;
    let tombstone = set(7, None, deleted_at);
    let reap = |target: Target| {
        Action::Send(
            target,
            Op::Reap(ReapRequest {
                key: "k".into(),
                dots: tombstone.dots().collect(),
            }),
        )
    };
    let fallback = Target {
        server: D,
        owner: C,
    };
    // (targets, replies, now) -> actions after the last reply
    type Case = (Vec<Target>, Vec<Siblings>, u64, Vec<Action<Siblings>>);
    let cases: Vec<Case> = vec![
        // All three hold it, grace over: reap everywhere.
        (
            vec![own(A), own(B), own(C)],
            vec![tombstone.clone(), tombstone.clone(), tombstone.clone()],
            deleted_at + GRACE_US,
            vec![
                Action::Note(Event::Reaped),
                reap(own(A)),
                reap(own(B)),
                reap(own(C)),
            ],
        ),
        // Within the grace period: kept.
        (
            vec![own(A), own(B), own(C)],
            vec![tombstone.clone(), tombstone.clone(), tombstone.clone()],
            deleted_at + GRACE_US - 1,
            vec![],
        ),
        // One replica stands in as a fallback: the owner may lack them; kept.
        (
            vec![own(A), own(B), fallback],
            vec![tombstone.clone(), tombstone.clone(), tombstone.clone()],
            deleted_at + GRACE_US,
            vec![],
        ),
        // One replica lacks them: repaired, not reaped.
        (
            vec![own(A), own(B), own(C)],
            vec![tombstone.clone(), tombstone.clone(), Siblings::new()],
            deleted_at + GRACE_US,
            vec![
                Action::Note(Event::ReadRepairs(1)),
                merge(own(C), &tombstone, None),
            ],
        ),
    ];
    for (i, (targets, replies, now, expected)) in cases.into_iter().enumerate() {
        let (mut read, _) = read(targets.clone(), 2);
        let mut last = Vec::new();
        for (target, reply) in targets.into_iter().zip(replies) {
            last = read.on_reply(target, ok(&reply), now);
        }
        let after_answer: Vec<_> = last
            .into_iter()
            .filter(|action| !matches!(action, Action::Answer(_)))
            .collect();
        assert_eq!(after_answer, expected, "case {i}");
    }
}

/// A plan with no replica at all answers 503 at once.
#[test]
fn a_read_with_nobody_to_ask_fails_at_once() {
    let mut tally = Tally::new(3, 2);
    for _ in 0..3 {
        tally.failure();
    }
    let plan = Plan {
        targets: vec![],
        tally,
        detail: Some("3 replica(s) down with no fallback".into()),
        groups: Vec::new(),
    };
    let (_, actions) = Read::start(servers(), "k".into(), plan, 3, GRACE_US);
    assert!(matches!(
        answer(&actions),
        Some(Err(text)) if text.contains("0 answered")
    ));
}

/// Late and duplicate read replies decide nothing twice.
#[test]
fn late_and_duplicate_read_replies_are_ignored() {
    let value = set(7, Some("<value>v</value>"), 1_000);
    let (mut read, _) = read(vec![own(A), own(B)], 1);
    assert_eq!(
        answer(&read.on_reply(own(A), ok(&value), 0)),
        Some(Ok(&value))
    );
    assert_eq!(
        read.on_reply(own(A), ok(&Siblings::new()), 0),
        vec![],
        "a duplicate"
    );
    assert_eq!(
        read.on_reply(own(C), ok(&Siblings::new()), 0),
        vec![],
        "never asked"
    );
    assert_eq!(
        read.on_reply(own(B), ok(&value), 0),
        vec![],
        "agrees: no repair"
    );
}
