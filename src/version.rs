//! Versions of a value: vector clocks, dots and sibling sets.
//!
//! Dynamo keeps every version of a key that no other version descends from, and lets the
//! client (or the next write) reconcile them. This module is the pure core of that: it decides
//! which versions survive a merge and how a new write is stamped. It does no I/O.
//!
//! # How clocks are incremented: dotted versions at the coordinating replica
//!
//! A write is stamped by one storage node, the *coordinator* (the first replica of the key's
//! preference list that answers), with a **dot** `(actor, counter)`: the node's actor id and a
//! counter one past anything the node has seen for that key, and past every counter it
//! stamped before for any key (a node's set of a key can lose its own history: a reap, a key
//! that moved away and back). The version also records its
//! **past**, the clock of everything the writer had seen (the client's context, or for a blind
//! put everything the coordinator held). A version is made obsolete by another exactly when
//! the other's past covers its dot.
//!
//! Why not plain vector clocks (Dynamo) with the coordinator bumping its entry? Two clients
//! writing concurrently from the same context through the same coordinator would get clocks
//! `{n:k+1}` and `{n:k+2}`, and the second would silently swallow the first: a lost update.
//! Keeping the dot apart from the past (dotted version vectors, Preguiça et al.; what Riak
//! does since 2.0) makes the second write's past `{…n:k}`, which does not cover `(n, k+1)`, so
//! both survive as siblings. Why not the balancer as actor? There can be any number of
//! balancers and they keep no state, so their counters could not be made monotonic; a storage
//! node keeps its actor id in its engine, and draws a fresh one when its data is wiped (a node
//! that forgot its counters must not reuse them).
//!
//! # What a blind write supersedes: entry times
//!
//! Every write carries the time its client request *entered the cluster*, read once by the
//! coordinating balancer on the cluster clock ([`crate::clock`]); it is the version's
//! `timestamp_us`, and travels with every copy, hint and repair. A write with a context
//! supersedes what the context covers. A blind write (no context) supersedes the versions
//! the coordinator holds that are stamped no later than it entered, and nothing newer: a
//! request that reaches its coordinator late (held in a kernel's retransmit queue through a
//! partition, sent again, delayed behind a paused process) cannot erase writes acknowledged
//! after it entered. Those survive beside it as siblings, and win `get`, which shows the
//! version written last. Puts made one after another by a client enter one after another,
//! so each supersedes the one before and they never make siblings, whichever balancer they
//! go through; puts made concurrently from the same context do.
//!
//! Why not let the coordinator stamp the arrival time, or let a blind write take everything
//! it finds (as this module once did)? Then a late request is stamped late and supersedes
//! whatever it finds: writes acknowledged while it was held up disappear. Entry times are
//! read on different balancers, so they are only as comparable as those balancers' cluster
//! clocks, which agree within the error of their estimates (well under a millisecond on a
//! LAN; see [`crate::clock`]); every node also refuses operations that arrive after their
//! deadline, which bounds how late a request can be applied at all.
//!
//! A blind write's past is a vector clock, which cannot say "saw (n, 6) but not (n, 5)":
//! when a version it must not supersede has a smaller counter of some actor than one it
//! supersedes (possible only when requests reached that actor out of order), the past is cut
//! below the newer version's dot, and the older one lingers as a sibling that loses `get` to
//! the new write: a spurious sibling, never a lost write.
//!
//! The coordinator replicates its whole reconciled sibling set, not just the new version, so
//! a replica that holds a dot `(n, k)` also holds every live dot of `n` below `k`; a context
//! built from any replica's answer therefore never claims to have seen a version it has not.
//!
//! # Bounded clocks
//!
//! A clock keeps at most [`MAX_CLOCK_ENTRIES`] actors; past that, the entries updated longest
//! ago are dropped, as Dynamo does. Dropping an entry can only make a clock cover *less*, so
//! the cost is a version that lingers as a spurious sibling until the next write with a
//! context resolves it, never a lost write. Actors per key are normally the key's N replicas
//! plus the odd fallback, far below the bound.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Entries a clock keeps before the oldest are pruned (Dynamo used 10).
pub const MAX_CLOCK_ENTRIES: usize = 10;

/// Identity of a storage node's data, drawn at random when its data directory is created.
pub type ActorId = u64;

/// One event: the `counter`-th write an actor stamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Dot {
    pub actor: ActorId,
    pub counter: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct ClockEntry {
    actor: ActorId,
    counter: u64,
    /// Timestamp of the write that set `counter`; only used to choose what to prune.
    timestamp_us: u64,
}

/// A vector clock: for each actor, how many of its writes have been seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VClock {
    /// Sorted by actor, one entry per actor.
    entries: Vec<ClockEntry>,
}

impl VClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, actor: ActorId) -> u64 {
        match self.entries.binary_search_by_key(&actor, |e| e.actor) {
            Ok(i) => self.entries[i].counter,
            Err(_) => 0,
        }
    }

    /// Has this clock seen the event `dot`?
    pub fn covers(&self, dot: Dot) -> bool {
        self.get(dot.actor) >= dot.counter
    }

    /// Forgets events of `actor` past `counter`, so the clock covers none of them.
    pub fn cap(&mut self, actor: ActorId, counter: u64) {
        if let Ok(i) = self.entries.binary_search_by_key(&actor, |e| e.actor) {
            if counter == 0 {
                self.entries.remove(i);
            } else {
                let entry = &mut self.entries[i];
                entry.counter = entry.counter.min(counter);
            }
        }
    }

    /// Records that `dot` (written at `timestamp_us`) has been seen.
    pub fn witness(&mut self, dot: Dot, timestamp_us: u64) {
        if dot.counter == 0 {
            return; // counters start at 1; zero means "nothing seen"
        }
        match self.entries.binary_search_by_key(&dot.actor, |e| e.actor) {
            Ok(i) => {
                let entry = &mut self.entries[i];
                if dot.counter > entry.counter {
                    entry.counter = dot.counter;
                    entry.timestamp_us = entry.timestamp_us.max(timestamp_us);
                }
            }
            Err(i) => self.entries.insert(
                i,
                ClockEntry {
                    actor: dot.actor,
                    counter: dot.counter,
                    timestamp_us,
                },
            ),
        }
    }

    /// The least upper bound of two clocks: every event either has seen.
    pub fn merge(&mut self, other: &VClock) {
        for entry in &other.entries {
            self.witness(
                Dot {
                    actor: entry.actor,
                    counter: entry.counter,
                },
                entry.timestamp_us,
            );
        }
    }

    /// Has this clock seen everything `other` has?
    pub fn descends(&self, other: &VClock) -> bool {
        other.entries.iter().all(|e| self.get(e.actor) >= e.counter)
    }

    /// Causal order of two clocks; `None` when they are concurrent.
    pub fn compare(&self, other: &VClock) -> Option<Ordering> {
        match (self.descends(other), other.descends(self)) {
            (true, true) => Some(Ordering::Equal),
            (true, false) => Some(Ordering::Greater),
            (false, true) => Some(Ordering::Less),
            (false, false) => None,
        }
    }

    /// Drops the least recently updated entries beyond `max_entries` (see the module doc).
    pub fn prune(&mut self, max_entries: usize) {
        if self.entries.len() <= max_entries {
            return;
        }
        let mut by_age: Vec<ClockEntry> = self.entries.clone();
        by_age.sort_by_key(|e| (std::cmp::Reverse(e.timestamp_us), e.actor));
        by_age.truncate(max_entries);
        by_age.sort_by_key(|e| e.actor);
        self.entries = by_age;
    }

    /// The opaque context string handed to clients: base64 of the compact binary form.
    pub fn to_context(&self) -> String {
        if self.entries.is_empty() {
            return String::new();
        }
        use base64::Engine as _;
        match postcard::to_allocvec(self) {
            Ok(bytes) => base64::engine::general_purpose::STANDARD.encode(bytes),
            Err(_) => String::new(),
        }
    }

    /// Reads a context string back; `None` when it is not one we produced.
    pub fn from_context(context: &str) -> Option<VClock> {
        if context.is_empty() {
            return Some(VClock::new());
        }
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(context)
            .ok()?;
        let (clock, rest): (VClock, _) = postcard::take_from_bytes(&bytes).ok()?;
        let sorted_and_distinct = clock.entries.windows(2).all(|w| w[0].actor < w[1].actor);
        let counted = clock.entries.iter().all(|e| e.counter > 0);
        let well_formed = rest.is_empty() && sorted_and_distinct && counted;
        (well_formed && clock.entries.len() <= 4 * MAX_CLOCK_ENTRIES).then_some(clock)
    }
}

/// One version of a key's value. `value` is the value's XML-RPC encoding (`<value>…</value>`),
/// kept as text so that nodes store and return it without parsing it; `None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub dot: Dot,
    /// Everything the writer had seen when it wrote this version.
    pub past: VClock,
    /// When the write's client request entered the cluster (microseconds since the epoch on
    /// the cluster clock): picks the sibling `get` shows, and bounds what a blind write
    /// supersedes (see the module doc). Microseconds, so that two writes a client makes one
    /// after the other never share a timestamp. (Versions stored before timestamps were
    /// microseconds hold milliseconds, so they read as written early in 1970: older than any
    /// write since, which they are.)
    pub timestamp_us: u64,
    pub value: Option<String>,
}

impl Version {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// Order in which `get` prefers siblings: latest entry time, then the dot as a tie-break
    /// that every node and balancer computes the same way.
    fn recency(&self) -> (u64, Dot) {
        (self.timestamp_us, self.dot)
    }
}

/// Every version of one key that no other version descends from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Siblings {
    /// Sorted by dot, so equal sets have equal encodings.
    versions: Vec<Version>,
}

impl Siblings {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn versions(&self) -> &[Version] {
        &self.versions
    }

    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }

    /// Bytes of the values (as their XML text) of every version: what the set weighs on the
    /// wire, give or take its clocks.
    pub fn value_bytes(&self) -> usize {
        self.versions
            .iter()
            .map(|version| version.value.as_ref().map_or(0, String::len))
            .sum()
    }

    /// The live (non-tombstone) versions.
    pub fn values(&self) -> impl Iterator<Item = &Version> {
        self.versions.iter().filter(|v| !v.is_tombstone())
    }

    /// Does the key have a value here (at least one live sibling)?
    pub fn is_live(&self) -> bool {
        self.values().next().is_some()
    }

    /// Is the key deleted here: versions are held, all of them tombstones?
    pub fn is_tombstoned(&self) -> bool {
        !self.versions.is_empty() && !self.is_live()
    }

    /// Timestamp of the newest version (microseconds since the epoch).
    pub fn newest_timestamp_us(&self) -> u64 {
        self.versions
            .iter()
            .map(|v| v.timestamp_us)
            .max()
            .unwrap_or(0)
    }

    /// The value `get` returns: that of the version written last (ties broken by dot), or
    /// none when that version is a tombstone. A delete concurrent with an older put, such as a
    /// put that reached its coordinator late, leaves both; the key reads as deleted, since the
    /// delete came last.
    pub fn latest_value(&self) -> Option<&str> {
        self.versions
            .iter()
            .max_by_key(|v| v.recency())
            .and_then(|v| v.value.as_deref())
    }

    /// The clock of everything in this set: what a client that read it has seen.
    pub fn context(&self) -> VClock {
        let mut clock = VClock::new();
        for version in &self.versions {
            clock.merge(&version.past);
            clock.witness(version.dot, version.timestamp_us);
        }
        clock.prune(MAX_CLOCK_ENTRIES);
        clock
    }

    /// The versions that entered after `entered_us`.
    pub fn newer_than(&self, entered_us: u64) -> Siblings {
        Siblings {
            versions: self
                .versions
                .iter()
                .filter(|v| v.timestamp_us > entered_us)
                .cloned()
                .collect(),
        }
    }

    /// The dots present, which identify the set: two replicas with equal dots hold the same data.
    pub fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        self.versions.iter().map(|v| v.dot)
    }

    /// Adds every version of `other` and drops those another version's past covers. Merge is
    /// commutative, associative and idempotent (property-tested below), so replicas may
    /// exchange sets in any order and converge.
    pub fn merge(&mut self, other: &Siblings) {
        for version in &other.versions {
            if let Err(i) = self.versions.binary_search_by_key(&version.dot, |v| v.dot) {
                self.versions.insert(i, version.clone());
            }
        }
        self.drop_obsolete();
    }

    fn drop_obsolete(&mut self) {
        let obsolete: Vec<bool> = self
            .versions
            .iter()
            .map(|v| {
                self.versions
                    .iter()
                    .any(|w| w.dot != v.dot && w.past.covers(v.dot))
            })
            .collect();
        let mut flags = obsolete.into_iter();
        self.versions.retain(|_| !flags.next().unwrap_or(false));
    }

    /// Stamps a new write at coordinator `actor`: `value` (None for a delete), whose client
    /// request entered the cluster at `entered_us`, supersedes every version `context`
    /// covers, or, for a blind write (`context` None), every version held here stamped no
    /// later than `entered_us` (see the module doc). Returns the new version's dot.
    pub fn write(
        &mut self,
        actor: ActorId,
        context: Option<&VClock>,
        value: Option<String>,
        entered_us: u64,
    ) -> Dot {
        self.write_after(actor, 0, context, value, entered_us)
    }

    /// As [`Self::write`], with a counter above `after` too: the highest the actor stamped
    /// for any key, since what is held here need not count all it stamped for this one
    /// (`node/stamper.rs`).
    pub fn write_after(
        &mut self,
        actor: ActorId,
        after: u64,
        context: Option<&VClock>,
        value: Option<String>,
        entered_us: u64,
    ) -> Dot {
        let mut past = match context {
            Some(clock) => clock.clone(),
            None => self.seen_by_a_write_entered_at(entered_us),
        };
        let seen_here = self
            .versions
            .iter()
            .map(|v| {
                if v.dot.actor == actor {
                    v.dot.counter
                } else {
                    0
                }
                .max(v.past.get(actor))
            })
            .max()
            .unwrap_or(0);
        let dot = Dot {
            actor,
            counter: seen_here.max(past.get(actor)).max(after).saturating_add(1),
        };
        past.prune(MAX_CLOCK_ENTRIES);
        let version = Version {
            dot,
            past,
            timestamp_us: entered_us,
            value,
        };
        self.merge(&Siblings {
            versions: vec![version],
        });
        dot
    }

    /// The past of a blind write that entered at `entered_us`: every version stamped no later,
    /// and nothing of the newer ones, whose dots it is cut below.
    fn seen_by_a_write_entered_at(&self, entered_us: u64) -> VClock {
        let mut clock = VClock::new();
        for version in self
            .versions
            .iter()
            .filter(|v| v.timestamp_us <= entered_us)
        {
            clock.merge(&version.past);
            clock.witness(version.dot, version.timestamp_us);
        }
        for version in self.versions.iter().filter(|v| v.timestamp_us > entered_us) {
            clock.cap(version.dot.actor, version.dot.counter.saturating_sub(1));
        }
        clock
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Siblings> {
        let (siblings, rest): (Siblings, _) = postcard::take_from_bytes(bytes).ok()?;
        let sorted = siblings.versions.windows(2).all(|w| w[0].dot < w[1].dot);
        (rest.is_empty() && sorted).then_some(siblings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: ActorId = 1;
    const B: ActorId = 2;

    fn clock(entries: &[(ActorId, u64)]) -> VClock {
        let mut c = VClock::new();
        for &(actor, counter) in entries {
            c.witness(Dot { actor, counter }, counter);
        }
        c
    }

    fn value(s: &str) -> Option<String> {
        Some(format!("<value><string>{s}</string></value>"))
    }

    #[test]
    fn compare_table() {
        let cases = [
            (clock(&[]), clock(&[]), Some(Ordering::Equal)),
            (clock(&[(A, 1)]), clock(&[]), Some(Ordering::Greater)),
            (clock(&[(A, 1)]), clock(&[(A, 2)]), Some(Ordering::Less)),
            (
                clock(&[(A, 2), (B, 1)]),
                clock(&[(A, 1)]),
                Some(Ordering::Greater),
            ),
            (clock(&[(A, 1)]), clock(&[(B, 1)]), None),
            (clock(&[(A, 2), (B, 1)]), clock(&[(A, 1), (B, 2)]), None),
        ];
        for (left, right, expected) in cases {
            assert_eq!(left.compare(&right), expected, "{left:?} vs {right:?}");
        }
    }

    #[test]
    fn cap_table() {
        let cases = [
            (clock(&[(A, 5), (B, 2)]), A, 3, clock(&[(A, 3), (B, 2)])),
            (clock(&[(A, 5), (B, 2)]), A, 9, clock(&[(A, 5), (B, 2)])),
            (clock(&[(A, 5), (B, 2)]), A, 0, clock(&[(B, 2)])),
            (clock(&[(B, 2)]), A, 0, clock(&[(B, 2)])),
        ];
        for (mut before, actor, counter, expected) in cases {
            before.cap(actor, counter);
            assert_eq!(before.len(), expected.len());
            assert!(before.descends(&expected) && expected.descends(&before));
        }
    }

    #[test]
    fn blind_writes_one_after_another_never_make_siblings() {
        let mut s = Siblings::new();
        s.write(A, None, value("1"), 10);
        s.write(A, None, value("2"), 20);
        s.write(B, None, value("3"), 30);
        assert_eq!(s.versions().len(), 1);
        assert_eq!(s.latest_value(), value("3").as_deref());
    }

    #[test]
    fn concurrent_writes_from_one_context_at_one_coordinator_are_both_kept() {
        let mut s = Siblings::new();
        s.write(A, None, value("base"), 10);
        let context = s.context();
        s.write(A, Some(&context), value("left"), 20);
        s.write(A, Some(&context), value("right"), 30);
        let values: Vec<_> = s.values().filter_map(|v| v.value.clone()).collect();
        assert_eq!(values.len(), 2, "{s:?}");
        assert_eq!(s.latest_value(), value("right").as_deref());
        // A write with the context of both collapses them.
        let both = s.context();
        s.write(B, Some(&both), value("merged"), 40);
        assert_eq!(s.versions().len(), 1);
        assert_eq!(s.latest_value(), value("merged").as_deref());
    }

    #[test]
    fn delete_leaves_a_tombstone_that_reads_as_nothing() {
        let mut s = Siblings::new();
        s.write(A, None, value("x"), 10);
        s.write(A, None, None, 20);
        assert_eq!(s.versions().len(), 1);
        assert!(!s.is_live());
        assert_eq!(s.latest_value(), None);
        // A replica that missed the delete cannot bring the value back.
        let mut stale = Siblings::new();
        stale.write(A, None, value("x"), 10);
        stale.merge(&s);
        assert!(!stale.is_live());
    }

    /// The story of a late request: a blind put that entered before others were acknowledged
    /// reaches its coordinator after them (held in a retransmit queue, say). It supersedes
    /// only what is older than it; the newer write survives and stays what `get` shows.
    #[test]
    fn a_late_blind_write_supersedes_only_what_entered_before_it() {
        let mut s = Siblings::new();
        s.write(A, None, value("31"), 310);
        s.write(B, None, value("33"), 330);
        s.write(B, None, value("230"), 2_300);
        // The put of 32, which entered at 320, arrives now.
        s.write(A, None, value("32"), 320);
        let values: Vec<_> = s.values().filter_map(|v| v.value.clone()).collect();
        assert_eq!(values.len(), 2, "{s:?}");
        assert_eq!(s.latest_value(), value("230").as_deref());
        // The next write supersedes both, as ever.
        s.write(A, None, value("231"), 2_310);
        assert_eq!(s.versions().len(), 1);
        assert_eq!(s.latest_value(), value("231").as_deref());
    }

    /// A request applied a second time where its first application is held (sent again to
    /// a replica that had already applied it) supersedes the first: one version, not two.
    /// (Applied at two replicas that each lacked the other's, it leaves two versions with
    /// one value, until the next write.)
    #[test]
    fn a_blind_write_supersedes_a_version_with_its_own_entry_time() {
        let mut s = Siblings::new();
        s.write(A, None, value("1"), 100);
        s.write(B, None, value("1"), 100);
        assert_eq!(s.versions().len(), 1);
    }

    /// A delete concurrent with an older put (a put that arrived after the delete) keeps
    /// both, and the key reads as deleted: the delete was written last.
    #[test]
    fn a_put_older_than_a_delete_does_not_bring_the_value_back() {
        let mut s = Siblings::new();
        s.write(A, None, value("x"), 10);
        s.write(A, None, None, 30);
        s.write(B, None, value("late"), 20);
        assert!(s.is_live(), "the late put is kept as a sibling");
        assert_eq!(s.latest_value(), None);
        // A put after the delete shows again.
        s.write(B, None, value("again"), 40);
        assert_eq!(s.latest_value(), value("again").as_deref());
        assert_eq!(s.versions().len(), 1);
    }

    /// Requests reaching one coordinator out of order give it a newer version with a smaller
    /// counter than an older one. A later blind write that falls between them must not take
    /// the newer one with it: the clock cannot leave a hole, so it is cut below the newer
    /// dot, and the older version lingers as a sibling that loses to the new write.
    #[test]
    fn a_clock_is_cut_below_the_dots_of_newer_versions() {
        let mut s = Siblings::new();
        let newer = s.write(A, None, value("entered at 200"), 200);
        let older = s.write(A, None, value("entered at 100"), 100);
        assert!(older.counter > newer.counter);
        s.write(A, None, value("entered at 150"), 150);
        let values: Vec<_> = s.values().filter_map(|v| v.value.clone()).collect();
        assert!(
            values.contains(&value("entered at 200").expect("a value")),
            "the newest write survives: {s:?}"
        );
        assert_eq!(s.latest_value(), value("entered at 200").as_deref());
        let at_150 = s
            .versions()
            .iter()
            .find(|v| v.timestamp_us == 150)
            .expect("the write of 150");
        assert!(!at_150.past.covers(newer));
    }

    #[test]
    fn prune_keeps_the_most_recent_entries() {
        let mut c = VClock::new();
        for actor in 0..20u64 {
            c.witness(Dot { actor, counter: 1 }, actor * 10);
        }
        c.prune(MAX_CLOCK_ENTRIES);
        assert_eq!(c.len(), MAX_CLOCK_ENTRIES);
        assert_eq!(c.get(0), 0);
        assert_eq!(c.get(19), 1);
    }

    #[test]
    fn context_round_trip_and_rejection() {
        let c = clock(&[(A, 3), (B, 7)]);
        assert_eq!(VClock::from_context(&c.to_context()), Some(c));
        assert_eq!(VClock::from_context(""), Some(VClock::new()));
        assert_eq!(VClock::from_context("not base64!"), None);
        assert_eq!(VClock::from_context("AAAA"), None);
    }

    fn arb_clock() -> impl Strategy<Value = VClock> {
        prop::collection::vec((0u64..5, 0u64..6), 0..6).prop_map(|entries| {
            let mut c = VClock::new();
            for (actor, counter) in entries {
                c.witness(Dot { actor, counter }, counter);
            }
            c
        })
    }

    /// Sibling sets as a history of writes by a few actors, each from some earlier context,
    /// so that the dots are consistent the way real coordinators make them.
    fn arb_histories() -> impl Strategy<Value = Vec<Siblings>> {
        prop::collection::vec((0u64..3, any::<bool>(), 0usize..3, any::<bool>()), 1..12).prop_map(
            |steps| {
                let mut replicas = vec![Siblings::new(), Siblings::new(), Siblings::new()];
                for (i, (actor, blind, replica, tombstone)) in steps.into_iter().enumerate() {
                    let target = &mut replicas[replica];
                    let context = if blind { None } else { Some(VClock::new()) };
                    let v = if tombstone {
                        None
                    } else {
                        value(&i.to_string())
                    };
                    target.write(actor + replica as u64 * 10, context.as_ref(), v, i as u64);
                }
                replicas
            },
        )
    }

    /// One client's write: what it is, and how the cluster acknowledged it.
    #[derive(Debug, Clone)]
    struct ClientWrite {
        /// Blind, or with the context read from `read_from` just before it entered.
        blind: bool,
        delete: bool,
        read_from: usize,
        /// The replica that coordinated it, and the one more that had it before the
        /// acknowledgement (W = 2).
        coordinator: usize,
        copy_to: usize,
        /// Microseconds after the previous write entered (sequential: at least 1).
        gap_us: u64,
    }

    /// Something the network or the cluster did in between: a request applied again late,
    /// a copy delivered late, an anti-entropy exchange.
    #[derive(Debug, Clone)]
    enum Noise {
        /// The coordinate of an earlier write (`back` writes ago) reaches `at` late: applied
        /// again with its own entry time, context and value.
        LateCoordinate { back: usize, at: usize },
        /// The set an earlier write's coordinator produced reaches `at` late.
        LateCopy { back: usize, at: usize },
        /// Replica `from`'s whole set merged into `to`.
        AntiEntropy { from: usize, to: usize },
    }

    const REPLICAS: usize = 3;

    fn arb_client_write() -> impl Strategy<Value = ClientWrite> {
        (
            any::<bool>(),
            prop::bool::weighted(0.2),
            0..REPLICAS,
            0..REPLICAS,
            1..REPLICAS,
            1u64..2_000,
        )
            .prop_map(|(blind, delete, read_from, coordinator, step, gap_us)| {
                ClientWrite {
                    blind,
                    delete,
                    read_from,
                    coordinator,
                    copy_to: (coordinator + step) % REPLICAS,
                    gap_us,
                }
            })
    }

    fn arb_noise() -> impl Strategy<Value = Noise> {
        prop_oneof![
            (0usize..6, 0..REPLICAS).prop_map(|(back, at)| Noise::LateCoordinate { back, at }),
            (0usize..6, 0..REPLICAS).prop_map(|(back, at)| Noise::LateCopy { back, at }),
            (0..REPLICAS, 0..REPLICAS).prop_map(|(from, to)| Noise::AntiEntropy { from, to }),
        ]
    }

    /// A write as its coordinator received it, kept so that it can be delivered again.
    #[derive(Debug, Clone)]
    struct Sent {
        context: Option<VClock>,
        value: Option<String>,
        entered_us: u64,
        /// What its coordinator held after applying it.
        coordinated: Siblings,
    }

    /// Plays a client's sequential writes against three replicas with noise before each
    /// (noise at position i, taken modulo the writes + 1, happens after write i-1 was
    /// acknowledged), then lets anti-entropy bring every replica up to date. Returns the
    /// replicas, the writes as sent, and every quorum read (R = 2: any two replicas merged)
    /// made right after a write was acknowledged that did not show it.
    fn play(
        writes: &[ClientWrite],
        noise: &[(usize, Noise)],
    ) -> (Vec<Siblings>, Vec<Sent>, Vec<String>) {
        let mut replicas = vec![Siblings::new(); REPLICAS];
        let actor = |replica: usize| replica as ActorId + 1;
        let mut sent: Vec<Sent> = Vec::new();
        let mut stale_reads = Vec::new();
        let mut entered_us = 1_700_000_000_000_000u64;
        for position in 0..=writes.len() {
            let here = |at: &usize| at % (writes.len() + 1) == position;
            for (_, event) in noise.iter().filter(|(at, _)| here(at)) {
                match *event {
                    Noise::LateCoordinate { back, at } if back < sent.len() => {
                        let late = sent[sent.len() - 1 - back].clone();
                        replicas[at].write(
                            actor(at),
                            late.context.as_ref(),
                            late.value,
                            late.entered_us,
                        );
                    }
                    Noise::LateCopy { back, at } if back < sent.len() => {
                        let late = &sent[sent.len() - 1 - back];
                        replicas[at].merge(&late.coordinated);
                    }
                    Noise::AntiEntropy { from, to } => {
                        let from = replicas[from].clone();
                        replicas[to].merge(&from);
                    }
                    _ => {}
                }
            }
            let Some(write) = writes.get(position) else {
                break;
            };
            entered_us += write.gap_us;
            let context = (!write.blind).then(|| replicas[write.read_from].context());
            let value = if write.delete {
                None
            } else {
                value(&format!("write {position}"))
            };
            let coordinator = &mut replicas[write.coordinator];
            coordinator.write(
                actor(write.coordinator),
                context.as_ref(),
                value.clone(),
                entered_us,
            );
            let coordinated = coordinator.clone();
            replicas[write.copy_to].merge(&coordinated);
            for (a, b) in [(0, 1), (0, 2), (1, 2)] {
                let mut read = replicas[a].clone();
                read.merge(&replicas[b]);
                if read.latest_value() != value.as_deref() {
                    stale_reads.push(format!(
                        "after write {position}, replicas {a} and {b} read {:?}",
                        read.latest_value()
                    ));
                }
            }
            sent.push(Sent {
                context,
                value,
                entered_us,
                coordinated,
            });
        }
        // Anti-entropy until every replica holds everything.
        let mut all = Siblings::new();
        for replica in &replicas {
            all.merge(replica);
        }
        for replica in &mut replicas {
            replica.merge(&all);
        }
        (replicas, sent, stale_reads)
    }

    proptest! {
        #[test]
        fn clock_merge_is_commutative(a in arb_clock(), b in arb_clock()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(ab, ba);
        }

        #[test]
        fn clock_merge_is_associative(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            let mut left = a.clone(); left.merge(&b); left.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut right = a.clone(); right.merge(&bc);
            prop_assert_eq!(left, right);
        }

        #[test]
        fn clock_merge_is_idempotent_and_an_upper_bound(a in arb_clock(), b in arb_clock()) {
            let mut aa = a.clone(); aa.merge(&a);
            prop_assert_eq!(&aa, &a);
            let mut ab = a.clone(); ab.merge(&b);
            prop_assert!(ab.descends(&a) && ab.descends(&b));
        }

        #[test]
        fn descends_is_a_partial_order(a in arb_clock(), b in arb_clock(), c in arb_clock()) {
            prop_assert!(a.descends(&a));
            if a.descends(&b) && b.descends(&a) { prop_assert_eq!(&a, &b); }
            if a.descends(&b) && b.descends(&c) { prop_assert!(a.descends(&c)); }
        }

        #[test]
        fn sibling_merge_is_commutative_associative_idempotent(replicas in arb_histories()) {
            let (a, b, c) = (&replicas[0], &replicas[1], &replicas[2]);
            let mut ab = a.clone(); ab.merge(b);
            let mut ba = b.clone(); ba.merge(a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(c);
            let mut bc = b.clone(); bc.merge(c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            let mut aa = a.clone(); aa.merge(a);
            prop_assert_eq!(&aa, a);
        }

        #[test]
        fn merged_siblings_are_mutually_concurrent(replicas in arb_histories()) {
            let mut all = Siblings::new();
            for r in &replicas { all.merge(r); }
            for v in all.versions() {
                for w in all.versions() {
                    if v.dot != w.dot { prop_assert!(!w.past.covers(v.dot)); }
                }
            }
        }

        #[test]
        fn a_write_with_the_full_context_leaves_one_version(replicas in arb_histories()) {
            let mut all = Siblings::new();
            for r in &replicas { all.merge(r); }
            let context = all.context();
            all.write(99, Some(&context), value("final"), 1_000);
            prop_assert_eq!(all.versions().len(), 1);
            let expected = value("final");
            prop_assert_eq!(all.latest_value(), expected.as_deref());
        }

        #[test]
        fn encoding_round_trips(replicas in arb_histories()) {
            for r in &replicas {
                let decoded = Siblings::decode(&r.encode());
                prop_assert_eq!(decoded.as_ref(), Some(r));
            }
        }
    }

    proptest! {
        // The orders that matter (two late requests at the replica that coordinated the
        // newest write, after it) are rare among all orders: many cases.
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// However late, duplicated or reordered the requests and copies of a client's
        /// sequential writes reach the replicas, blind or with a context, a quorum read right
        /// after each acknowledgement shows that write, and the newest acknowledged write
        /// survives on every replica and is what `get` shows (nothing, when it was a
        /// delete).
        #[test]
        fn the_newest_acknowledged_write_survives_late_and_duplicated_requests(
            writes in prop::collection::vec(arb_client_write(), 1..10),
            noise in prop::collection::vec((any::<usize>(), arb_noise()), 0..24),
        ) {
            let (replicas, sent, stale_reads) = play(&writes, &noise);
            prop_assert!(stale_reads.is_empty(), "{:?}", stale_reads);
            let newest = sent.last().expect("at least one write");
            for (i, replica) in replicas.iter().enumerate() {
                prop_assert_eq!(replica, &replicas[0], "replica {} converged", i);
                let survivor = replica
                    .versions()
                    .iter()
                    .find(|v| v.timestamp_us == newest.entered_us && v.value == newest.value);
                prop_assert!(survivor.is_some(), "replica {} lost the newest write: {:?}", i, replica);
                prop_assert_eq!(replica.latest_value(), newest.value.as_deref());
            }
        }

        /// Blind puts one after another, each coordinated by a replica that had the one
        /// before, never make siblings, however late their copies reach the others.
        #[test]
        fn sequential_blind_puts_never_make_siblings(
            writes in prop::collection::vec(arb_client_write(), 1..10),
            noise in prop::collection::vec((any::<usize>(), arb_noise()), 0..24),
        ) {
            let mut writes = writes;
            for i in 0..writes.len() {
                writes[i].blind = true;
                writes[i].delete = false;
                if i > 0 && writes[i].coordinator != writes[i - 1].coordinator {
                    writes[i].coordinator = writes[i - 1].copy_to;
                }
                if writes[i].copy_to == writes[i].coordinator {
                    writes[i].copy_to = (writes[i].coordinator + 1) % REPLICAS;
                }
            }
            let noise: Vec<_> = noise
                .into_iter()
                .filter(|(_, event)| !matches!(event, Noise::LateCoordinate { .. }))
                .collect();
            let (replicas, sent, _) = play(&writes, &noise);
            for replica in &replicas {
                prop_assert_eq!(replica.versions().len(), 1, "{:?}", replica);
                prop_assert_eq!(replica.latest_value(), sent.last().and_then(|w| w.value.as_deref()));
            }
        }
    }
}
