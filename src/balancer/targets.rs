//! Choosing the replicas of one request: Dynamo's sloppy quorum, as a pure function.
//!
//! The key's preference list is the first N distinct servers clockwise. Each of them that is
//! up serves for itself. Each that is down is replaced by the next up server further along
//! the ring, which takes the request *with a hint* naming the owner it stands in for, so the
//! write reaches the owner once it is back (Dynamo §4.6). A down owner with no spare server
//! left is simply missing: the request counts it as failed without waiting for it.

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
    fn fallbacks_are_marked() {
        assert!(t(0, 1).is_fallback());
        assert!(!t(1, 1).is_fallback());
    }
}
