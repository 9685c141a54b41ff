//! Table tests of the coordinator's rules: each case feeds a machine replies and checks the
//! actions it asks for.

use super::*;
use crate::quorum::Tally;

/// What a write machine asks.
type WriteAction = Action<Option<Receipt>>;

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
        receipt: false,
    }
}

fn coordinate(target: Target, hint_for: Option<&str>) -> WriteAction {
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

/// The answer among `actions`, as the client would see it: the value or the fault string.
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
fn write_to_abc(w: usize) -> (Write, Vec<WriteAction>) {
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
        vec![Action::Answer(Ok(None))]
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
    assert_eq!(answer(&actions), Some(Ok(&None)));
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

/// Coordinator candidates are asked one after the other: one that could not be reached
/// counts as failed and does not get a copy; one that answers but will not coordinate is
/// passed over and gets the copy; a refusal of the write itself is the answer. One that took
/// the write and gave no answer may have stored it: asking another would stamp the one write
/// twice, as two versions a later read might see only one of, and a write from that read's
/// context would leave the other standing as a sibling. So the answer is that the outcome is
/// unknown.
#[test]
fn coordinator_failures_table() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    // (first reply, what follows: second candidate asked?, copies after B coordinates,
    // answer when C's copy succeeds; or the answer at once, as a piece of its text)
    struct Case {
        first: std::result::Result<OpReply, CallError>,
        second_asked: bool,
        copies: Vec<Target>,
        answer_after_c: Option<std::result::Result<(), String>>,
        at_once: &'static str,
    }
    let unknown =
        "may or may not have been applied: 10.0.0.1:1, asked to coordinate it, did not answer";
    let cases = [
        // A could not be reached: counted failed; B coordinates, C gets the copy; W met by B
        // and C.
        Case {
            first: Err(CallError::Unsent("connection refused".into())),
            second_asked: true,
            copies: vec![own(C)],
            answer_after_c: Some(Ok(())),
            at_once: "",
        },
        // Its time ran out while the operation still waited in A's queue: never sent.
        Case {
            first: Err(CallError::TimedOutUnsent),
            second_asked: true,
            copies: vec![own(C)],
            answer_after_c: Some(Ok(())),
            at_once: "",
        },
        // A took it and did not answer, or its answer could not be read: nobody else asked.
        Case {
            first: Err(CallError::Timeout),
            second_asked: false,
            copies: vec![],
            answer_after_c: None,
            at_once: unknown,
        },
        Case {
            first: Err(CallError::Transport("connection reset".into())),
            second_asked: false,
            copies: vec![],
            answer_after_c: None,
            at_once: unknown,
        },
        Case {
            first: Err(CallError::BadResponse("cut short".into())),
            second_asked: false,
            copies: vec![],
            answer_after_c: None,
            at_once: unknown,
        },
        // A refused to coordinate (clock, or expired): passed over, gets a copy, W met.
        Case {
            first: fault(crate::error::FAULT_INTERNAL),
            second_asked: true,
            copies: vec![own(A), own(C)],
            answer_after_c: Some(Ok(())),
            at_once: "",
        },
        Case {
            first: Err(CallError::Expired { late_by_ms: 3 }),
            second_asked: true,
            copies: vec![own(A), own(C)],
            answer_after_c: Some(Ok(())),
            at_once: "",
        },
        // A refused the write itself: the client's fault, nobody else asked.
        Case {
            first: fault(FAULT_INVALID_PARAMS),
            second_asked: false,
            copies: vec![],
            answer_after_c: None,
            at_once: "refused",
        },
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let (mut write, _) = write_to_abc(2);
        let actions = write.on_reply(own(A), case.first, 0);
        if !case.second_asked {
            assert_eq!(sends(&actions), vec![], "case {i}");
            match answer(&actions) {
                Some(Err(text)) => assert!(text.contains(case.at_once), "case {i}: {text}"),
                other => panic!("case {i}: {other:?}"),
            }
            assert_eq!(
                actions.contains(&Action::Note(Event::OutcomeUnknown)),
                case.at_once == unknown,
                "case {i}"
            );
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
    // Two coordinators cannot be reached: with N = 3 and W = 2, nothing is left to try.
    let refused = || Err(CallError::Unsent("refused".into()));
    let (mut write, _) = write_to_abc(2);
    assert_eq!(sends(&write.on_reply(own(A), refused(), 0)), vec![own(B)]);
    let actions = write.on_reply(own(B), refused(), 0);
    assert_eq!(sends(&actions), vec![]);
    assert!(actions.contains(&Action::Note(Event::QuorumFailed(QuorumKind::Write))));
    assert_eq!(
        answer(&actions),
        Some(Err(
            "write (W) quorum not met: 2 of 3 replicas needed, 0 answered (10.0.0.1:1: unreachable: refused)"
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
        Some(Ok(&None))
    );
    assert_eq!(write.on_reply(own(C), Err(CallError::Timeout), 0), vec![]);
}

/// A write asked for a receipt answers the replicas whose success had counted when the
/// answer went out (the coordinator first, then copies in the order they answered), each
/// marked as a fallback or not, and the written version's context. Replies after the answer,
/// and failed replicas, are not in it.
#[test]
fn a_receipt_names_the_replicas_that_acknowledged_before_the_answer() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let fallback = Target {
        server: D,
        owner: A,
    };
    let merged = || Ok(OpReply::Merged);
    type Reply = std::result::Result<OpReply, CallError>;
    // (targets in coordination order, W, the replies in order) -> the receipt's replicas as
    // (server, fallback); None: no answer expected to be a success.
    type Case = (Vec<Target>, usize, Vec<(Target, Reply)>, Vec<(usize, bool)>);
    let cases: Vec<Case> = vec![
        // W = 2: the coordinator and the first copy; C answers after the answer.
        (
            vec![own(A), own(B), own(C)],
            2,
            vec![
                (own(A), ok(&stored)),
                (own(C), merged()),
                (own(B), merged()),
            ],
            vec![(A, false), (C, false)],
        ),
        // W = 3: all three, in the order they answered.
        (
            vec![own(A), own(B), own(C)],
            3,
            vec![
                (own(A), ok(&stored)),
                (own(C), merged()),
                (own(B), merged()),
            ],
            vec![(A, false), (C, false), (B, false)],
        ),
        // W = 1: the coordinator alone, the copies still on their way.
        (
            vec![own(A), own(B), own(C)],
            1,
            vec![(own(A), ok(&stored))],
            vec![(A, false)],
        ),
        // A failed copy is not in it.
        (
            vec![own(A), own(B), own(C)],
            2,
            vec![
                (own(A), ok(&stored)),
                (own(B), Err(CallError::Timeout)),
                (own(C), merged()),
            ],
            vec![(A, false), (C, false)],
        ),
        // The first coordinator could not be reached: the next one stamped the write.
        (
            vec![own(A), own(B), own(C)],
            2,
            vec![
                (own(A), Err(CallError::Unsent("refused".into()))),
                (own(B), ok(&stored)),
                (own(C), merged()),
            ],
            vec![(B, false), (C, false)],
        ),
        // The first would not coordinate: passed over, it acknowledges its copy.
        (
            vec![own(A), own(B), own(C)],
            2,
            vec![
                (own(A), fault(crate::error::FAULT_INTERNAL)),
                (own(B), ok(&stored)),
                (own(A), merged()),
            ],
            vec![(B, false), (A, false)],
        ),
        // A preferred replica is down: its fallback holds the copy as a hint, and says so.
        (
            vec![own(B), own(C), fallback],
            2,
            vec![(own(B), ok(&stored)), (fallback, merged())],
            vec![(B, false), (D, true)],
        ),
    ];
    for (i, (targets, w, replies, expected)) in cases.into_iter().enumerate() {
        let mut receipt_asked = request(Some("<value>v</value>"));
        receipt_asked.receipt = true;
        let (mut write, _) = Write::start(servers(), receipt_asked, plan(targets, w), false);
        let mut answered = None;
        for (target, reply) in replies {
            let actions = write.on_reply(target, reply, 0);
            if let Some(answer) = answer(&actions) {
                assert!(answered.is_none(), "case {i}: answered twice");
                answered = Some(answer.cloned());
            }
        }
        let receipt = answered
            .unwrap_or_else(|| panic!("case {i}: no answer"))
            .unwrap_or_else(|fault| panic!("case {i}: {fault}"))
            .unwrap_or_else(|| panic!("case {i}: no receipt"));
        let replicas: Vec<(String, bool)> = receipt
            .replicas
            .iter()
            .map(|r| (r.address.clone(), r.fallback))
            .collect();
        let expected: Vec<(String, bool)> = expected
            .into_iter()
            .map(|(server, fallback)| (servers().address(server).to_owned(), fallback))
            .collect();
        assert_eq!(replicas, expected, "case {i}");
        assert_eq!(
            receipt.context,
            stored.context(),
            "case {i}: no sibling left"
        );
    }
}

/// Without the option, a write answers no receipt (and `"200"` goes to the client).
#[test]
fn no_receipt_unless_asked() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let (mut write, _) = write_to_abc(1);
    let actions = write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(answer(&actions), Some(Ok(&None)));
}

/// While a layout transition runs, the request's W is needed of each live version's
/// replicas: with W = 1 and versions {A, B, C} and {B, C, D}, A's store meets the first
/// version's tally only, and the answer waits for a replica of the second; the receipt names
/// both.
#[test]
fn a_request_w_applies_to_each_live_version() {
    let stored = set(7, Some("<value>v</value>"), 1_000);
    let old = vec![own(A), own(B), own(C)];
    let new = vec![own(B), own(C), own(D)];
    let plan = super::super::targets::combine(vec![
        plan(old.clone(), 1),
        Plan {
            targets: new.clone(),
            tally: Tally::new(3, 1),
            detail: None,
            groups: Vec::new(),
        },
    ]);
    assert_eq!(plan.targets, vec![own(A), own(B), own(C), own(D)]);
    let mut receipt_asked = request(Some("<value>v</value>"));
    receipt_asked.receipt = true;
    let (mut write, _) = Write::start(servers(), receipt_asked, plan, false);
    let actions = write.on_reply(own(A), ok(&stored), 0);
    assert_eq!(sends(&actions), vec![own(B), own(C), own(D)]);
    assert_eq!(answer(&actions), None, "the new version has no copy yet");
    let actions = write.on_reply(own(D), Ok(OpReply::Merged), 0);
    let Some(Ok(Some(receipt))) = answer(&actions) else {
        panic!("expected a receipt, got {actions:?}");
    };
    let named: Vec<&str> = receipt
        .replicas
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(named, ["10.0.0.1:1", "10.0.0.4:1"]);
}

/// The receipt's context is that of the version the write made: the whole set's when the
/// write left no sibling (what get_versions gives), and never one of a sibling the writer has
/// not seen.
#[test]
fn written_context_table() {
    let value = |v: &str| Some(format!("<value>{v}</value>"));
    let write_request = |value: Option<String>, entered_us: u64| WriteRequest {
        key: "k".into(),
        value,
        context: None,
        entered_us,
        receipt: true,
    };
    // A blind write onto nothing.
    let alone = set(7, value("v").as_deref(), 1_000);
    // A blind write over an older version, which it supersedes.
    let mut over = set(7, value("old").as_deref(), 500);
    over.write(8, None, value("v"), 1_000);
    // A blind write that entered before a version the node already held: that version stays
    // beside it as a sibling (see `crate::version`).
    let mut beside = set(9, value("newer").as_deref(), 2_000);
    let written = beside.write(8, None, value("v"), 1_000);
    let newer = beside
        .versions()
        .iter()
        .find(|v| v.timestamp_us == 2_000)
        .expect("the newer sibling")
        .dot;
    // A delete: its tombstone.
    let mut deleted = set(7, value("old").as_deref(), 500);
    let tombstone = deleted.write(8, None, None, 1_000);
    // The write is not in the set (a reaped delete that entered after it dropped it).
    let reaped = set(7, value("other").as_deref(), 3_000);

    assert_eq!(
        written_context(&alone, &write_request(value("v"), 1_000)),
        alone.context()
    );
    assert_eq!(
        written_context(&over, &write_request(value("v"), 1_000)),
        over.context()
    );
    let context = written_context(&beside, &write_request(value("v"), 1_000));
    assert!(context.covers(written), "covers the write");
    assert!(!context.covers(newer), "not the sibling it left beside it");
    assert_ne!(context, beside.context());
    let context = written_context(&deleted, &write_request(None, 1_000));
    assert!(context.covers(tombstone));
    assert_eq!(context, deleted.context());
    assert_eq!(
        written_context(&reaped, &write_request(value("v"), 1_000)),
        reaped.context()
    );
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
