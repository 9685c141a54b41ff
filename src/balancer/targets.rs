//! Choosing the replicas of one request: Dynamo's sloppy quorum, as a pure function.
//!
//! The key's preference list is the first N distinct servers clockwise. Each of them that is
//! up serves for itself. Each that is down is replaced by the next up server further along
//! the ring, which takes the request *with a hint* naming the owner it stands in for, so the
//! write reaches the owner once it is back (Dynamo §4.6). A down owner with no spare server
//! left is simply missing: the request counts it as failed without waiting for it.
//!
//! A write also needs a coordinator among the targets ([`order_for_write`]): the first
//! preferred replica that keeps up.

use crate::quorum::Tally;

/// One replica of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Who receives the request.
    pub server: usize,
    /// The preferred replica it stands for; equal to `server` unless this is a fallback.
    pub owner: usize,
}

impl Target {
    /// Does `server` hold the data for someone else (a hinted fallback)?
    pub fn is_fallback(&self) -> bool {
        self.server != self.owner
    }
}

/// The replicas a request asks, and where its quorum count starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Counts, as failed already, the down replicas left out.
    pub tally: Tally,
    /// Why some replicas were left out, for the 503 text.
    pub detail: Option<String>,
    /// While more than one layout version is live, a write needs its quorum in each
    /// version's replica set: one tally per version, with the targets that count for it
    /// (empty: the one tally above, over every target).
    pub groups: Vec<(Tally, Vec<Target>)>,
}

/// One plan per live layout version (the version reads use first) made into one: every
/// target once, in that order, each version's tally counting its own targets.
pub fn combine(plans: Vec<Plan>) -> Plan {
    if plans.len() == 1 {
        return plans.into_iter().next().unwrap_or_else(|| Plan {
            targets: Vec::new(),
            tally: Tally::new(0, 0),
            detail: None,
            groups: Vec::new(),
        });
    }
    let mut targets: Vec<Target> = Vec::new();
    let mut groups = Vec::with_capacity(plans.len());
    let mut detail = None;
    let mut tally = Tally::new(0, 0);
    for (i, plan) in plans.into_iter().enumerate() {
        for target in &plan.targets {
            if !targets.contains(target) {
                targets.push(*target);
            }
        }
        if i == 0 {
            tally = plan.tally;
        }
        detail = detail.or(plan.detail);
        groups.push((plan.tally, plan.targets));
    }
    Plan {
        targets,
        tally,
        detail,
        groups,
    }
}

/// The replicas for a request needing `needed` of the key's `replicas`: the preference list
/// with down nodes replaced by fallbacks ([`choose`]). Down nodes with no fallback are left
/// out, and counted as failed, while the others can still meet the quorum; when they cannot,
/// the down nodes are asked after all, as a last resort: the request would fail anyway, and a
/// node may be back before the prober noticed.
pub fn plan(walk: &[usize], replicas: usize, needed: usize, is_up: impl Fn(usize) -> bool) -> Plan {
    let (mut targets, missing) = choose(walk, replicas, is_up);
    let mut tally = Tally::new(replicas, needed);
    let mut detail = None;
    if targets.len() >= needed {
        for _ in &missing {
            tally.failure();
        }
        if !missing.is_empty() {
            detail = Some(format!(
                "{} replica(s) down with no fallback",
                missing.len()
            ));
        }
    } else {
        targets.extend(missing.into_iter().map(|owner| Target {
            server: owner,
            owner,
        }));
    }
    Plan {
        targets,
        tally,
        detail,
        groups: Vec::new(),
    }
}

/// The order in which a write's targets are asked to coordinate, and whether the first
/// preferred replica was passed over for lagging.
///
/// A preferred replica coordinates whenever one is up: it holds the key's history, so a
/// blind write or delete supersedes what is there; a fallback holds only hints for the key,
/// and a write it stamped would merely sit beside the old versions as a sibling. Any
/// preferred replica may coordinate (Dynamo §6.4): the first one does, unless it is lagging
/// (stalled with work outstanding), then the next preferred one that is not, instead of
/// queueing the write behind the stall. The lagging one still gets the write as a copy.
pub fn order_for_write(
    mut targets: Vec<Target>,
    is_lagging: impl Fn(usize) -> bool,
) -> (Vec<Target>, bool) {
    targets.sort_by_key(Target::is_fallback);
    let keeping_up = targets
        .iter()
        .position(|target| !target.is_fallback() && !is_lagging(target.server));
    let switched = keeping_up.is_some_and(|position| position > 0);
    if let Some(position) = keeping_up {
        targets[..=position].rotate_right(1);
    }
    (targets, switched)
}

/// The replicas for a key whose ring walk is `walk`, and the preferred replicas that are down
/// with no fallback to take their place.
pub fn choose(
    walk: &[usize],
    replicas: usize,
    is_up: impl Fn(usize) -> bool,
) -> (Vec<Target>, Vec<usize>) {
    let split = replicas.min(walk.len());
    let (preferred, beyond) = walk.split_at(split);
    let mut spares = beyond.iter().copied().filter(|&server| is_up(server));
    let mut targets = Vec::with_capacity(split);
    let mut missing = Vec::new();
    for &owner in preferred {
        if is_up(owner) {
            targets.push(Target {
                server: owner,
                owner,
            });
        } else if let Some(server) = spares.next() {
            targets.push(Target { server, owner });
        } else {
            missing.push(owner);
        }
    }
    (targets, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(server: usize, owner: usize) -> Target {
        Target { server, owner }
    }

    #[test]
    fn choice_table() {
        let walk = [3, 1, 4, 0, 2];
        // (servers down, N, expected targets, expected missing)
        type Case = (&'static [usize], usize, Vec<Target>, Vec<usize>);
        let cases: Vec<Case> = vec![
            (&[], 3, vec![t(3, 3), t(1, 1), t(4, 4)], vec![]),
            (&[1], 3, vec![t(3, 3), t(0, 1), t(4, 4)], vec![]),
            (&[3, 4], 3, vec![t(0, 3), t(1, 1), t(2, 4)], vec![]),
            (&[3, 0], 3, vec![t(2, 3), t(1, 1), t(4, 4)], vec![]),
            (&[3, 1, 4, 0], 3, vec![t(2, 3)], vec![1, 4]),
            (&[0, 1, 2, 3, 4], 3, vec![], vec![3, 1, 4]),
            (&[1], 5, vec![t(3, 3), t(4, 4), t(0, 0), t(2, 2)], vec![1]),
        ];
        for (down, n, expected, missing) in cases {
            let (targets, unplaced) = choose(&walk, n, |s| !down.contains(&s));
            assert_eq!(
                (targets, unplaced),
                (expected, missing),
                "down {down:?}, N={n}"
            );
        }
    }

    #[test]
    fn plan_table() {
        let walk = [3, 1, 4, 0, 2];
        // (down, needed): targets, failures counted, detail
        type Case = (
            &'static [usize],
            usize,
            Vec<Target>,
            usize,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            // All up: the preference list.
            (&[], 2, vec![t(3, 3), t(1, 1), t(4, 4)], 0, None),
            // One down, a spare takes its place with a hint.
            (&[1], 2, vec![t(3, 3), t(0, 1), t(4, 4)], 0, None),
            // Two down, one spare: one owner left out and counted failed, the quorum still
            // possible with the others.
            (
                &[3, 1, 4],
                1,
                vec![t(0, 3), t(2, 1)],
                1,
                Some("1 replica(s) down with no fallback"),
            ),
            // The same, needing more than the up ones: the down owner is asked anyway.
            (&[3, 1, 4], 3, vec![t(0, 3), t(2, 1), t(4, 4)], 0, None),
            // Everything down: every owner asked, as a last resort.
            (
                &[0, 1, 2, 3, 4],
                2,
                vec![t(3, 3), t(1, 1), t(4, 4)],
                0,
                None,
            ),
        ];
        for (down, needed, targets, failed, detail) in cases {
            let plan = plan(&walk, 3, needed, |s| !down.contains(&s));
            assert_eq!(plan.targets, targets, "down {down:?}, needing {needed}");
            assert_eq!(plan.tally.failed, failed, "down {down:?}");
            assert_eq!(plan.detail.as_deref(), detail, "down {down:?}");
        }
    }

    #[test]
    fn write_order_table() {
        // (targets, lagging servers) -> (order, switched)
        type Case = (Vec<Target>, &'static [usize], Vec<Target>, bool);
        let cases: Vec<Case> = vec![
            // The first preferred replica coordinates.
            (
                vec![t(1, 1), t(2, 2), t(3, 3)],
                &[],
                vec![t(1, 1), t(2, 2), t(3, 3)],
                false,
            ),
            // It lags: the next preferred one that keeps up goes first, the rest keep order.
            (
                vec![t(1, 1), t(2, 2), t(3, 3)],
                &[1],
                vec![t(2, 2), t(1, 1), t(3, 3)],
                true,
            ),
            (
                vec![t(1, 1), t(2, 2), t(3, 3)],
                &[1, 2],
                vec![t(3, 3), t(1, 1), t(2, 2)],
                true,
            ),
            // All lag: the first keeps its turn (nobody better).
            (
                vec![t(1, 1), t(2, 2)],
                &[1, 2],
                vec![t(1, 1), t(2, 2)],
                false,
            ),
            // Fallbacks go last, whatever their place in the list.
            (
                vec![t(5, 1), t(2, 2), t(3, 3)],
                &[],
                vec![t(2, 2), t(3, 3), t(5, 1)],
                false,
            ),
            // A fallback never coordinates ahead of a preferred replica, lagging or not.
            (vec![t(5, 1), t(2, 2)], &[2], vec![t(2, 2), t(5, 1)], false),
        ];
        for (targets, lagging, order, switched) in cases {
            let got = order_for_write(targets.clone(), |s| lagging.contains(&s));
            assert_eq!(got, (order, switched), "{targets:?}, lagging {lagging:?}");
        }
    }

    #[test]
    fn fallbacks_are_marked() {
        assert!(t(0, 1).is_fallback());
        assert!(!t(1, 1).is_fallback());
    }
}
