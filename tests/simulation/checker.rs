//! What Dynamo promises, checked over a run's history and what the cluster holds once the
//! faults stopped and it converged. Pure: the history and the observations in, violations out.
//!
//! Every value is written once (the workload makes each unique), so a value names the write
//! that made it. What an operation *saw* is what the `get_versions` it took its context from
//! returned: its context covers those values (and what they had superseded already), and a
//! node holding a version also holds every older live version of the same actor, so it covers
//! nothing else (`src/version.rs`). A blind put or delete saw nothing; it supersedes what its
//! coordinator held that entered no later than it.
//!
//! The rules, per key:
//!
//! 1. **Nothing from nowhere**: every value read or held was written to that key.
//! 2. **What a write saw stays superseded** (siblings come only from concurrency; a deleted
//!    key stays deleted unless written again): no value an acknowledged write or delete saw
//!    is read or held.
//! 3. **No acknowledged write is lost**: an acknowledged put's value is held, unless a write
//!    that may have superseded it exists: one (acknowledged or not) that saw it, or a blind one
//!    invoked after it.
//! 4. **A single writer reads its last write**: where one client writes a key, one operation
//!    at a time, and its last operation was an acknowledged put, every read returns that
//!    value (it entered the cluster last of all, and `get` returns the latest entered).
//! 5. **Reads agree with the versions**: a read returns one of the values held, or nil when
//!    none is; or nil beside values when the key was deleted, since `get` answers the version
//!    that entered last and a delete's tombstone may have entered after a value it did not see
//!    (a concurrent sibling, listed by `get_versions`).
//! 6. **Replicas converge**: every node holding live versions of the key holds the same ones
//!    (by dot), and N nodes hold them (none when the key has none).
//! 7. **Nothing grows without bound**: each figure measured at the end is within its bound.

use std::collections::{BTreeMap, BTreeSet};

/// One write the workload made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub client: String,
    pub key: String,
    /// The value put, or `None` for a delete.
    pub value: Option<String>,
    /// The values of the `get_versions` its context came from; `None` for a blind write.
    pub seen: Option<Vec<String>>,
    pub invoked_us: u64,
    pub acked: bool,
}

/// What the cluster holds of one key at the end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    /// `get` through each entry point: (entry, value or nil).
    pub reads: Vec<(String, Option<String>)>,
    /// `get_versions` with every replica answering.
    pub versions: Vec<String>,
    /// Each node's live versions of the key, by dot (nodes holding none left out).
    pub replicas: BTreeMap<String, BTreeSet<String>>,
}

/// A figure that must stay within a bound at the end (hints held, tasks, connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Figure {
    pub what: String,
    pub value: u64,
    pub bound: u64,
}

/// Checks every rule; each violation is one line naming the key and what was wrong.
pub fn check(
    ops: &[Op],
    held: &BTreeMap<String, Held>,
    single_writer: &BTreeSet<String>,
    replicas: usize,
    figures: &[Figure],
) -> Vec<String> {
    let mut violations = Vec::new();
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op);
    }
    for (key, ops) in &by_key {
        let empty = Held::default();
        let held = held.get(*key).unwrap_or(&empty);
        check_key(
            key,
            ops,
            held,
            single_writer.contains(*key),
            replicas,
            &mut violations,
        );
    }
    for figure in figures {
        if figure.value > figure.bound {
            violations.push(format!(
                "{}: {} (bound {})",
                figure.what, figure.value, figure.bound
            ));
        }
    }
    violations
}

fn check_key(
    key: &str,
    ops: &[&Op],
    held: &Held,
    single_writer: bool,
    replicas: usize,
    violations: &mut Vec<String>,
) {
    let mut report = |rule: &str, what: String| violations.push(format!("{key}: {rule}: {what}"));
    let written: BTreeSet<&str> = ops.iter().filter_map(|op| op.value.as_deref()).collect();
    let superseded: BTreeSet<&str> = ops
        .iter()
        .filter(|op| op.acked)
        .flat_map(|op| op.seen.iter().flatten().map(String::as_str))
        .collect();
    let versions: BTreeSet<&str> = held.versions.iter().map(String::as_str).collect();
    let read_values = held.reads.iter().filter_map(|(_, value)| value.as_deref());

    // 1 and 2.
    for value in versions.iter().copied().chain(read_values) {
        if !written.contains(value) {
            report(
                "nothing from nowhere",
                format!("{value:?} was never written"),
            );
        } else if superseded.contains(value) {
            report(
                "superseded stays superseded",
                format!("{value:?} is back, though an acknowledged write saw it"),
            );
        }
    }

    // 3.
    for (index, op) in ops.iter().enumerate() {
        let Some(value) = op.value.as_deref().filter(|_| op.acked) else {
            continue;
        };
        if versions.contains(value) {
            continue;
        }
        let seen_by_some = ops
            .iter()
            .any(|other| other.seen.iter().flatten().any(|seen| seen == value));
        let blind_after = ops
            .iter()
            .skip(index + 1)
            .any(|other| other.seen.is_none() && other.invoked_us >= op.invoked_us);
        if !seen_by_some && !blind_after {
            report(
                "no acknowledged write lost",
                format!("{value:?} was acknowledged and is gone; held: {versions:?}"),
            );
        }
    }

    // 4.
    if single_writer
        && let Some(last) = ops.iter().max_by_key(|op| op.invoked_us)
        && last.acked
        && let Some(value) = &last.value
    {
        for (entry, read) in &held.reads {
            if read.as_ref() != Some(value) {
                report(
                    "a single writer reads its last write",
                    format!("{entry} returned {read:?}, the last acknowledged put was {value:?}"),
                );
            }
        }
    }

    // 5.
    let deleted = ops.iter().any(|op| op.value.is_none());
    for (entry, read) in &held.reads {
        let agrees = match read {
            Some(value) => versions.contains(value.as_str()),
            None => versions.is_empty() || deleted,
        };
        if !agrees {
            report(
                "reads agree with the versions",
                format!("{entry} returned {read:?}; the versions are {versions:?}"),
            );
        }
    }

    // 6.
    let mut sets = held.replicas.values();
    if let Some(first) = sets.next()
        && sets.any(|set| set != first)
    {
        report(
            "replicas converge",
            format!("the replicas differ: {:?}", held.replicas),
        );
    }
    let holders = held.replicas.len();
    let expected = if versions.is_empty() { 0 } else { replicas };
    if holders != expected {
        report(
            "replicas converge",
            format!(
                "{holders} nodes hold live versions, {expected} should: {:?}",
                held.replicas.keys().collect::<Vec<_>>()
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: &str, value: &str, at: u64, acked: bool) -> Op {
        Op {
            client: client.into(),
            key: "k".into(),
            value: Some(value.into()),
            seen: None,
            invoked_us: at,
            acked,
        }
    }

    fn with_context(mut op: Op, seen: &[&str]) -> Op {
        op.seen = Some(seen.iter().map(|value| value.to_string()).collect());
        op
    }

    fn delete(seen: &[&str], at: u64, acked: bool) -> Op {
        with_context(
            Op {
                value: None,
                ..put("c1", "", at, acked)
            },
            seen,
        )
    }

    /// A key held as `versions` on three replicas alike, read as the latest of them.
    fn held(versions: &[&str]) -> Held {
        let versions: Vec<String> = versions.iter().map(|value| value.to_string()).collect();
        let dots: BTreeSet<String> = versions
            .iter()
            .map(|value| format!("dot-{value}"))
            .collect();
        Held {
            reads: vec![("balancer1".into(), versions.last().cloned())],
            replicas: if versions.is_empty() {
                BTreeMap::new()
            } else {
                ["n1", "n2", "n3"]
                    .iter()
                    .map(|node| (node.to_string(), dots.clone()))
                    .collect()
            },
            versions,
        }
    }

    fn violations(ops: &[Op], held_k: Held, single: bool) -> Vec<String> {
        let single_writer: BTreeSet<String> = if single {
            ["k".to_string()].into()
        } else {
            BTreeSet::new()
        };
        check(
            ops,
            &[("k".to_string(), held_k)].into(),
            &single_writer,
            3,
            &[],
        )
    }

    /// Which rules a case breaks, by the words each violation starts with.
    fn rules(found: &[String]) -> Vec<&str> {
        let mut rules: Vec<&str> = found
            .iter()
            .filter_map(|line| line.split(": ").nth(1))
            .collect();
        rules.dedup();
        rules
    }

    #[test]
    fn the_rules_on_small_histories() {
        // (story, ops, what is held, single writer, rules broken)
        type Case = (&'static str, Vec<Op>, Held, bool, Vec<&'static str>);
        let cases: Vec<Case> = vec![
            (
                "the last of a single writer's puts is held and read",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, true)],
                held(&["b"]),
                true,
                vec![],
            ),
            (
                "a blind overwrite may leave the old value as a sibling; the new one is read",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, true)],
                held(&["a", "b"]),
                true,
                vec![],
            ),
            (
                "a single writer reading an older value",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, true)],
                Held {
                    reads: vec![("balancer1".into(), Some("a".into()))],
                    ..held(&["a", "b"])
                },
                true,
                vec!["a single writer reads its last write"],
            ),
            (
                "the acknowledged last write is gone",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, true)],
                Held {
                    reads: vec![("balancer1".into(), Some("a".into()))],
                    ..held(&["a"])
                },
                true,
                vec![
                    "no acknowledged write lost",
                    "a single writer reads its last write",
                ],
            ),
            (
                "a failed put that landed after all",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, false)],
                held(&["b"]),
                true,
                vec![],
            ),
            (
                "a value nobody wrote",
                vec![put("c1", "a", 1, true)],
                held(&["a", "z"]),
                false,
                vec!["nothing from nowhere"],
            ),
            (
                "a context write supersedes what it saw",
                vec![
                    put("c1", "a", 1, true),
                    with_context(put("c1", "b", 2, true), &["a"]),
                ],
                held(&["b"]),
                true,
                vec![],
            ),
            (
                "what a context write saw comes back",
                vec![
                    put("c1", "a", 1, true),
                    with_context(put("c1", "b", 2, true), &["a"]),
                ],
                held(&["a", "b"]),
                true,
                vec!["superseded stays superseded"],
            ),
            (
                "a deleted key stays deleted",
                vec![put("c1", "a", 1, true), delete(&["a"], 2, true)],
                held(&[]),
                true,
                vec![],
            ),
            (
                "a deleted value is back",
                vec![put("c1", "a", 1, true), delete(&["a"], 2, true)],
                held(&["a"]),
                true,
                vec!["superseded stays superseded"],
            ),
            (
                "a delete that failed may or may not have landed",
                vec![put("c1", "a", 1, true), delete(&["a"], 2, false)],
                held(&[]),
                true,
                vec![],
            ),
            (
                "concurrent context writes from two clients: both kept as siblings",
                vec![
                    put("c1", "a", 1, true),
                    with_context(put("c1", "b", 2, true), &["a"]),
                    with_context(put("c2", "c", 3, true), &["a"]),
                ],
                held(&["b", "c"]),
                false,
                vec![],
            ),
            (
                "a concurrent write lost",
                vec![
                    with_context(put("c1", "b", 2, true), &[]),
                    with_context(put("c2", "c", 3, true), &[]),
                ],
                held(&["c"]),
                false,
                vec!["no acknowledged write lost"],
            ),
            (
                "a delete's tombstone newer than a value it did not see: nil beside the value",
                vec![
                    put("c1", "a", 1, false),
                    put("c1", "b", 2, true),
                    delete(&["b"], 3, true),
                ],
                Held {
                    reads: vec![("balancer1".into(), None)],
                    ..held(&["a"])
                },
                true,
                vec![],
            ),
            (
                "a read that is not among the versions",
                vec![put("c1", "a", 1, true), put("c1", "b", 2, false)],
                Held {
                    reads: vec![("balancer2".into(), None)],
                    ..held(&["a"])
                },
                false,
                vec!["reads agree with the versions"],
            ),
            (
                "replicas that differ",
                vec![put("c1", "a", 1, true)],
                Held {
                    replicas: [
                        ("n1".to_string(), ["x".to_string()].into()),
                        ("n2".to_string(), ["x".to_string()].into()),
                        ("n3".to_string(), ["y".to_string()].into()),
                    ]
                    .into(),
                    ..held(&["a"])
                },
                false,
                vec!["replicas converge"],
            ),
            (
                "a key on two nodes only",
                vec![put("c1", "a", 1, true)],
                Held {
                    replicas: [
                        ("n1".to_string(), ["x".to_string()].into()),
                        ("n2".to_string(), ["x".to_string()].into()),
                    ]
                    .into(),
                    ..held(&["a"])
                },
                false,
                vec!["replicas converge"],
            ),
        ];
        for (story, ops, held_k, single, expected) in cases {
            let found = violations(&ops, held_k, single);
            assert_eq!(rules(&found), expected, "{story}: {found:#?}");
        }
    }

    #[test]
    fn figures_past_their_bounds_are_violations() {
        let figures = [
            Figure {
                what: "hints held by node1".into(),
                value: 0,
                bound: 0,
            },
            Figure {
                what: "tasks of balancer1".into(),
                value: 900,
                bound: 400,
            },
        ];
        let found = check(&[], &BTreeMap::new(), &BTreeSet::new(), 3, &figures);
        assert_eq!(
            found,
            vec!["tasks of balancer1: 900 (bound 400)".to_string()]
        );
    }
}
