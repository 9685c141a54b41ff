//! Counting replica replies until a quorum is met or can no longer be.
//!
//! The balancer sends an operation to N replicas and must answer the client as soon as W (or
//! R) of them succeeded, and fail as soon as so many failed that W can no longer be reached:
//! waiting for the stragglers then only adds latency. This is that decision, kept pure so it
//! can be tested with a table of cases (raft-rs `quorum/majority.rs` does the same).

/// Where a quorum stands after some replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enough replicas succeeded.
    Met,
    /// So many failed that the quorum cannot be met any more.
    Failed,
    /// Still waiting for replies.
    Pending,
}

/// Tally of replies for one operation sent to `replicas` replicas, needing `needed` successes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub replicas: usize,
    pub needed: usize,
    pub succeeded: usize,
    pub failed: usize,
}

impl Tally {
    pub fn new(replicas: usize, needed: usize) -> Self {
        Tally {
            replicas,
            needed,
            succeeded: 0,
            failed: 0,
        }
    }

    pub fn success(&mut self) -> Outcome {
        self.succeeded += 1;
        self.outcome()
    }

    pub fn failure(&mut self) -> Outcome {
        self.failed += 1;
        self.outcome()
    }

    pub fn outcome(&self) -> Outcome {
        if self.succeeded >= self.needed {
            Outcome::Met
        } else if self.replicas.saturating_sub(self.failed) < self.needed {
            Outcome::Failed
        } else {
            Outcome::Pending
        }
    }
}

/// The default quorum for N replicas: a majority, so that any read quorum meets any write
/// quorum (R + W > N) out of the box.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_table() {
        // (replicas, needed, successes, failures, expected)
        let cases = [
            (3, 2, 0, 0, Outcome::Pending),
            (3, 2, 1, 0, Outcome::Pending),
            (3, 2, 2, 0, Outcome::Met),
            (3, 2, 1, 1, Outcome::Pending),
            (3, 2, 0, 2, Outcome::Failed),
            (3, 2, 1, 2, Outcome::Failed),
            (3, 3, 2, 1, Outcome::Failed),
            (3, 1, 1, 2, Outcome::Met),
            (1, 1, 0, 1, Outcome::Failed),
            (5, 3, 2, 2, Outcome::Pending),
            (5, 3, 2, 3, Outcome::Failed),
        ];
        for (replicas, needed, succeeded, failed, expected) in cases {
            let tally = Tally {
                replicas,
                needed,
                succeeded,
                failed,
            };
            assert_eq!(tally.outcome(), expected, "{tally:?}");
        }
    }

    #[test]
    fn counting_step_by_step() {
        let mut tally = Tally::new(3, 2);
        assert_eq!(tally.failure(), Outcome::Pending);
        assert_eq!(tally.success(), Outcome::Pending);
        assert_eq!(tally.success(), Outcome::Met);
    }

    #[test]
    fn majority_table() {
        for (n, m) in [(1, 1), (2, 2), (3, 2), (4, 3), (5, 3)] {
            assert_eq!(majority(n), m, "n={n}");
        }
    }
}
