//! What a replica does to one key's sibling set, as pure functions: admit and stamp a client's
//! write, fold in a copy, drop reaped tombstones.
//!
//! The node around them reads the set under the key's lock, calls one of these, and commits
//! what they left (`transaction.rs`); the rules themselves touch no engine, lock or clock, so
//! each is a table test away. What the set may hold after a client's write is bounded
//! ([`MAX_SIBLINGS`], [`MAX_SET_VALUE_BYTES`]): writes from stale contexts pile up siblings
//! (each concurrent with the rest), and past the bounds a write must resolve them, so no key
//! grows without limit, every merge stays cheap, and every key can be read (a read answers
//! the whole set in one reply).

use crate::error::Error;
use crate::version::{ActorId, Dot, Siblings, VClock};

/// Most versions one key may hold after a client's write.
pub const MAX_SIBLINGS: usize = 64;

/// Most bytes of values one key may hold after a client's write, so that any key can be read:
/// replies are capped (`rpc::client::MAX_RESPONSE_BYTES`, 256 MiB), and two values of the
/// default largest request (32 MiB) fit. Sets merged from several coordinators can exceed it
/// (siblings written concurrently at different replicas, or by a fallback into a hint): with
/// N = 3, three such sets and a batch's read budget still fit under the cap; with a larger N
/// and concurrent heavy writes at every replica, a read of such a key can still pass it.
pub const MAX_SET_VALUE_BYTES: usize = 64 * 1024 * 1024;

/// How far ahead of this node's clock a write's entry time may be. Entry times are read on
/// the cluster clock, which follows the median storage node ([`crate::clock`]), so an entry
/// time this far ahead means this node's clock (or the coordinator's) is badly off: NTP keeps
/// machines within milliseconds. A version stamped far in the future would win `get` over
/// every write made until that time came, so the node refuses to coordinate it (another
/// replica does, and this node still takes the write as a copy) and says why.
pub const MAX_ENTRY_AHEAD_US: u64 = 10_000_000;

/// A client's write as its coordinator stamps it.
#[derive(Debug, Clone, Copy)]
pub struct Stamp<'a> {
    /// This node's actor id.
    pub actor: ActorId,
    /// The highest counter stamped under `actor` so far, for any key: the new dot's is
    /// above it (`stamper.rs`).
    pub after: u64,
    /// What the client had seen; `None` for a blind write.
    pub context: Option<&'a VClock>,
    /// When the request entered the cluster (see [`crate::version`]).
    pub entered_us: u64,
    /// This node's clock now.
    pub now_us: u64,
    /// The entry time of a delete of this key reaped here lately, if any.
    pub reaped_us: Option<u64>,
}

/// What became of a write this node was asked to coordinate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coordinated {
    /// Stamped with this dot and added to the set.
    Applied(Dot),
    /// It entered before a delete whose tombstones every replica has since dropped (it
    /// reached this node late): the delete supersedes it, and it must not bring the value
    /// back. The set is left as it was.
    SupersededByReapedDelete,
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The key would hold this many siblings.
    TooManySiblings(usize),
    /// The key would hold this many bytes of values; `single` when in one version.
    TooHeavy { bytes: usize, single: bool },
    /// The write entered the cluster this far ahead of this node's clock.
    AheadOfClock { ahead_us: u64 },
    /// The context counts writes of this node's actor it never stamped (made up, not from
    /// `get_versions`): its past would cover every write the node stamps up to there.
    ContextAhead { counter: u64 },
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Error {
        let mib = |bytes: usize| bytes.div_ceil(1 << 20);
        match refusal {
            Refusal::TooManySiblings(count) => Error::invalid(format!(
                "the key would have {count} siblings (at most {MAX_SIBLINGS}); write with the context from get_versions to resolve them"
            )),
            Refusal::TooHeavy {
                bytes,
                single: true,
            } => Error::invalid(format!(
                "a value of {} MiB is over the {} MiB a key may hold",
                mib(bytes),
                MAX_SET_VALUE_BYTES >> 20
            )),
            Refusal::TooHeavy {
                bytes,
                single: false,
            } => Error::invalid(format!(
                "the key's versions would hold {} MiB of values (at most {} MiB); write with the context from get_versions to resolve them",
                mib(bytes),
                MAX_SET_VALUE_BYTES >> 20
            )),
            Refusal::ContextAhead { counter } => Error::invalid(format!(
                "the context counts write {counter} of a node that has not stamped so many; use a context from get_versions"
            )),
            // Not the client's fault: another replica coordinates (see the balancer).
            Refusal::AheadOfClock { ahead_us } => Error::Internal(format!(
                "the write entered the cluster {} ms ahead of this node's clock",
                ahead_us / 1000
            )),
        }
    }
}

/// Stamps a client's write of `value` (`None`: a delete) into `siblings`, unless it is
/// refused; on refusal `siblings` is left as it was.
pub fn coordinate(
    siblings: &mut Siblings,
    stamp: Stamp<'_>,
    value: Option<String>,
) -> Result<Coordinated, Refusal> {
    let ahead_us = stamp.entered_us.saturating_sub(stamp.now_us);
    if ahead_us > MAX_ENTRY_AHEAD_US {
        return Err(Refusal::AheadOfClock { ahead_us });
    }
    if let Some(counter) = stamp
        .context
        .map(|context| context.get(stamp.actor))
        .filter(|&counter| counter > stamp.after)
    {
        return Err(Refusal::ContextAhead { counter });
    }
    if stamp
        .reaped_us
        .is_some_and(|reaped_us| stamp.entered_us <= reaped_us)
    {
        return Ok(Coordinated::SupersededByReapedDelete);
    }
    let value_bytes = value.as_ref().map_or(0, String::len);
    if siblings.versions().len() < MAX_SIBLINGS
        && siblings.value_bytes().saturating_add(value_bytes) <= MAX_SET_VALUE_BYTES
    {
        // A write adds at most one version, so it stays within both bounds.
        let dot = siblings.write_after(
            stamp.actor,
            stamp.after,
            stamp.context,
            value,
            stamp.entered_us,
        );
        return Ok(Coordinated::Applied(dot));
    }
    let mut next = siblings.clone();
    let dot = next.write_after(
        stamp.actor,
        stamp.after,
        stamp.context,
        value,
        stamp.entered_us,
    );
    let count = next.versions().len();
    if count > MAX_SIBLINGS {
        return Err(Refusal::TooManySiblings(count));
    }
    let bytes = next.value_bytes();
    // A write that leaves the set no heavier (a delete, a resolving write) always goes
    // through, even on a set merged past the bound.
    if bytes > MAX_SET_VALUE_BYTES && bytes > siblings.value_bytes() {
        return Err(Refusal::TooHeavy {
            bytes,
            single: count == 1,
        });
    }
    *siblings = next;
    Ok(Coordinated::Applied(dot))
}

/// Folds a copy another replica, a read repair or anti-entropy sent into `siblings`, without
/// what entered no later than a delete of this key reaped lately (`reaped_us`): the reaped
/// tombstones themselves, and writes the delete came after. That goes for what is held here
/// too: a replica that missed the reap, and learnt of it from another replica's copy, drops
/// what the reap dropped (a replica that reaped holds nothing that old already).
pub fn merge(siblings: &mut Siblings, incoming: &Siblings, reaped_us: Option<u64>) {
    match reaped_us {
        Some(reaped_us) => {
            let mut kept = siblings.newer_than(reaped_us);
            kept.merge(&incoming.newer_than(reaped_us));
            *siblings = kept;
        }
        None => siblings.merge(incoming),
    }
}

/// Drops the key's tombstones if `siblings` holds exactly those (`dots`): anything written
/// since keeps the key. Returns the reaped delete's entry time when it did.
pub fn reap(siblings: &mut Siblings, dots: &[Dot]) -> Option<u64> {
    if !(siblings.is_tombstoned() && siblings.dots().eq(dots.iter().copied())) {
        return None;
    }
    let newest_us = siblings.newest_timestamp_us();
    *siblings = Siblings::new();
    Some(newest_us)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTOR: ActorId = 7;
    const NOW: u64 = 1_000_000_000;

    fn stamp(entered_us: u64, reaped_us: Option<u64>) -> Stamp<'static> {
        Stamp {
            actor: ACTOR,
            after: 0,
            context: None,
            entered_us,
            now_us: NOW,
            reaped_us,
        }
    }

    /// An outcome without the dot a write was stamped with.
    #[derive(Debug, PartialEq)]
    enum Kind {
        Applied,
        Superseded,
    }

    fn kind(got: Result<Coordinated, Refusal>) -> Result<Kind, Refusal> {
        got.map(|coordinated| match coordinated {
            Coordinated::Applied(_) => Kind::Applied,
            Coordinated::SupersededByReapedDelete => Kind::Superseded,
        })
    }

    fn value(text: &str) -> Option<String> {
        Some(format!("<value>{text}</value>"))
    }

    /// Siblings from a stale context, one per write, `count` of them, each `bytes` long.
    fn siblings(count: usize, bytes: usize) -> Siblings {
        let mut set = Siblings::new();
        let stale = VClock::new();
        for i in 0..count {
            let stamp = Stamp {
                context: Some(&stale),
                ..stamp(NOW - 1000 + i as u64, None)
            };
            coordinate(&mut set, stamp, Some("x".repeat(bytes))).expect("within the bounds");
        }
        set
    }

    #[test]
    fn admission_table() {
        let stale = VClock::new();
        let heavy = MAX_SET_VALUE_BYTES / 2 + 1;
        // (what is held, the write's context is stale?, value bytes, expected)
        type Case = (Siblings, bool, usize, Result<Kind, Refusal>);
        let cases: Vec<Case> = vec![
            (Siblings::new(), false, 10, Ok(Kind::Applied)),
            (siblings(MAX_SIBLINGS - 1, 1), true, 1, Ok(Kind::Applied)),
            (
                siblings(MAX_SIBLINGS, 1),
                true,
                1,
                Err(Refusal::TooManySiblings(MAX_SIBLINGS + 1)),
            ),
            // A blind write supersedes the lot: always within the bounds.
            (siblings(MAX_SIBLINGS, 1), false, 1, Ok(Kind::Applied)),
            (
                Siblings::new(),
                false,
                MAX_SET_VALUE_BYTES + 1,
                Err(Refusal::TooHeavy {
                    bytes: MAX_SET_VALUE_BYTES + 1,
                    single: true,
                }),
            ),
            (
                siblings(1, heavy),
                true,
                heavy,
                Err(Refusal::TooHeavy {
                    bytes: 2 * heavy,
                    single: false,
                }),
            ),
            (siblings(1, heavy), false, heavy, Ok(Kind::Applied)),
        ];
        for (i, (held, stale_context, bytes, expected)) in cases.into_iter().enumerate() {
            let mut set = held.clone();
            let write = Stamp {
                context: stale_context.then_some(&stale),
                ..stamp(NOW, None)
            };
            let got = kind(coordinate(&mut set, write, Some("y".repeat(bytes))));
            assert_eq!(got, expected, "case {i}");
            if got.is_err() {
                assert_eq!(set, held, "case {i}: a refused write leaves the set alone");
            }
        }
    }

    /// A delete or a resolving write leaves the set no heavier, so it goes through even on a
    /// set merged past the byte bound.
    #[test]
    fn a_write_leaving_a_heavy_set_no_heavier_goes_through() {
        let half = MAX_SET_VALUE_BYTES / 2 + 1;
        let mut set = siblings(1, half);
        let mut other = Siblings::new();
        coordinate(
            &mut other,
            Stamp {
                actor: ACTOR + 1,
                context: Some(&VClock::new()),
                ..stamp(NOW, None)
            },
            Some("z".repeat(half)),
        )
        .expect("one sibling");
        set.merge(&other);
        assert!(set.value_bytes() > MAX_SET_VALUE_BYTES);
        let stale = VClock::new();
        let delete = Stamp {
            context: Some(&stale),
            ..stamp(NOW + 1, None)
        };
        assert_eq!(kind(coordinate(&mut set, delete, None)), Ok(Kind::Applied));
        let context = set.context();
        let resolving = Stamp {
            context: Some(&context),
            // The node stamped the writes that context counts.
            after: context.get(ACTOR),
            ..stamp(NOW + 2, None)
        };
        assert_eq!(
            kind(coordinate(&mut set, resolving, value("small"))),
            Ok(Kind::Applied)
        );
        assert_eq!(set.versions().len(), 1);
    }

    #[test]
    fn clock_and_reap_table() {
        // (entered, reaped) -> outcome
        let cases = [
            (NOW, None, Ok(Kind::Applied)),
            (NOW + MAX_ENTRY_AHEAD_US, None, Ok(Kind::Applied)),
            (
                NOW + MAX_ENTRY_AHEAD_US + 1,
                None,
                Err(Refusal::AheadOfClock {
                    ahead_us: MAX_ENTRY_AHEAD_US + 1,
                }),
            ),
            (NOW - 10, Some(NOW - 10), Ok(Kind::Superseded)),
            (NOW - 20, Some(NOW - 10), Ok(Kind::Superseded)),
            (NOW - 5, Some(NOW - 10), Ok(Kind::Applied)),
        ];
        for (entered, reaped, expected) in cases {
            let mut set = Siblings::new();
            let got = kind(coordinate(&mut set, stamp(entered, reaped), value("v")));
            assert_eq!(got, expected, "entered {entered}, reaped {reaped:?}");
            assert_eq!(set.is_empty(), got != Ok(Kind::Applied));
        }
    }

    /// The node's set of a key need not count every dot the node stamped for it: after a
    /// reap, say, it is empty while another replica's tombstone counts (ACTOR, 5) in its past.
    /// The new write's counter is above everything the actor stamped, so that tombstone does
    /// not cover it.
    #[test]
    fn a_dot_counts_past_the_actors_highest_counter() {
        let mut tombstone = Siblings::new();
        for entered in 1..=5 {
            coordinate(
                &mut tombstone,
                stamp(NOW - 100 + entered, None),
                value("old"),
            )
            .expect("a write");
        }
        coordinate(&mut tombstone, stamp(NOW - 50, None), None).expect("a delete");
        // (held here, context, highest counter stamped) -> the new dot's counter
        let context = tombstone.context();
        let cases = [
            (Siblings::new(), None, 0, 1),
            (Siblings::new(), None, 6, 7),
            (Siblings::new(), Some(&context), 6, 7),
            (Siblings::new(), Some(&context), 9, 10),
            (tombstone.clone(), None, 0, 7),
            (tombstone.clone(), None, 3, 7),
            (tombstone.clone(), None, 40, 41),
        ];
        for (i, (held, context, after, counter)) in cases.into_iter().enumerate() {
            let mut set = held;
            let write = Stamp {
                after,
                context,
                ..stamp(NOW, None)
            };
            let got = coordinate(&mut set, write, value("new"));
            assert_eq!(
                got,
                Ok(Coordinated::Applied(Dot {
                    actor: ACTOR,
                    counter
                })),
                "case {i}"
            );
        }
        // The reap story: the replica that kept the tombstone takes the write made after the
        // reap as a sibling to show, not as something the delete saw.
        let mut reaped = Siblings::new();
        let highest = 6;
        coordinate(
            &mut reaped,
            Stamp {
                after: highest,
                ..stamp(NOW, None)
            },
            value("new"),
        )
        .expect("a write after the reap");
        let mut kept = tombstone.clone();
        merge(&mut kept, &reaped, None);
        assert_eq!(kept.latest_value(), value("new").as_deref());
    }

    /// A context is the client's to send: one counting writes of this node's actor past the
    /// highest it stamped was made up, and its past would cover the node's next writes.
    #[test]
    fn a_context_counting_writes_the_node_never_stamped_is_refused() {
        let mut forged = Siblings::new();
        forged.write(ACTOR, None, value("x"), NOW - 10);
        let context = forged.context(); // counts (ACTOR, 1)
        // (highest counter stamped) -> outcome
        for (after, expected) in [
            (0, Err(Refusal::ContextAhead { counter: 1 })),
            (1, Ok(Kind::Applied)),
            (5, Ok(Kind::Applied)),
        ] {
            let mut set = Siblings::new();
            let write = Stamp {
                after,
                context: Some(&context),
                ..stamp(NOW, None)
            };
            let got = kind(coordinate(&mut set, write, value("v")));
            assert_eq!(got, expected, "highest {after}");
            assert_eq!(set.is_empty(), got.is_err());
        }
    }

    #[test]
    fn refusals_say_why() {
        let cases = [
            (Refusal::TooManySiblings(65), -32602, "65 siblings"),
            (
                Refusal::TooHeavy {
                    bytes: 70 << 20,
                    single: true,
                },
                -32602,
                "a value of 70 MiB",
            ),
            (
                Refusal::TooHeavy {
                    bytes: 70 << 20,
                    single: false,
                },
                -32602,
                "would hold 70 MiB",
            ),
            (
                Refusal::AheadOfClock {
                    ahead_us: 12_000_000,
                },
                -32603,
                "12000 ms ahead",
            ),
            (Refusal::ContextAhead { counter: 99 }, -32602, "write 99"),
        ];
        for (refusal, code, text) in cases {
            let error = Error::from(refusal);
            assert_eq!(error.fault_code(), code, "{error}");
            assert!(error.fault_string().contains(text), "{error}");
        }
    }

    #[test]
    fn merge_and_reap_table() {
        let mut tombstones = Siblings::new();
        coordinate(&mut tombstones, stamp(NOW - 100, None), None).expect("a delete");
        let dots: Vec<Dot> = tombstones.dots().collect();

        // Only the exact tombstones are reaped.
        let mut held = tombstones.clone();
        assert_eq!(reap(&mut held, &[]), None);
        assert_eq!(reap(&mut held, &dots), Some(NOW - 100));
        assert!(held.is_empty());
        let mut live = Siblings::new();
        coordinate(&mut live, stamp(NOW, None), value("v")).expect("a put");
        let live_dots: Vec<Dot> = live.dots().collect();
        assert_eq!(
            reap(&mut live, &live_dots),
            None,
            "a live key is never reaped"
        );

        // After the reap, what entered no later is dropped from copies; newer is kept.
        let mut after = Siblings::new();
        merge(&mut after, &tombstones, Some(NOW - 100));
        assert!(after.is_empty(), "the tombstones do not come back");
        merge(&mut after, &live, Some(NOW - 100));
        assert_eq!(after, live, "a write after the delete is kept");
        let mut plain = Siblings::new();
        merge(&mut plain, &tombstones, None);
        assert_eq!(plain, tombstones);
    }
}
