//! Applying staged changes, so that of two racing `cluster.apply(v)` exactly one wins.
//!
//! Garage lets two applies of one version number both succeed, each somewhere, and the
//! cluster is broken until an operator notices. Here the daemon that applies first asks every
//! member of the current version for a lock on version v; only with a majority's grants does
//! it make v and spread it. A member grants one proposal per version at a time (for
//! [`LOCK_TTL`], so a proposer that died does not block the next), so two proposals cannot
//! both collect a majority. A proposal that lost the race (no majority: both may lose
//! when the grants split) lets go of its grants and tries again after a random pause, and
//! finds then either the lock free or version v made by the other: "version v exists".
//!
//! The grant expires after [`LOCK_TTL`], and a proposer that held its majority longer than
//! [`COMMIT_WITHIN`] gives up instead of making v, so a grant never runs out under a
//! proposer still about to use it. Should two versions with one number meet anyway (a
//! proposer stopped between the two for longer than the lock lasts), the merge keeps one of
//! them everywhere (see `history.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
// Simulated time under a simulation (docs/simulation.md); `std::time::Instant` otherwise.
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::rpc::messages;

use super::Membership;

pub const LOCK_TTL: Duration = Duration::from_secs(10);
const COMMIT_WITHIN: Duration = Duration::from_secs(3);
const LOCK_TIMEOUT: Duration = Duration::from_secs(2);
const ATTEMPTS: usize = 6;

pub const LOCK_METHOD: &str = "cluster.lock";

/// A grant held on a member.
#[derive(Debug, Clone)]
pub struct Lock {
    version: u64,
    proposal: u64,
    until: Instant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockRequest {
    pub version: u64,
    pub proposal: u64,
    /// Release instead of take.
    pub release: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LockReply {
    Granted,
    /// Held by another proposal.
    Busy,
    /// The version exists already here.
    Exists,
}

/// What `cluster.apply` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub moved: usize,
}

impl Membership {
    /// A member's side of the lock.
    pub fn answer_lock(&self, request: &LockRequest) -> LockReply {
        if self
            .history()
            .is_some_and(|h| h.current().number >= request.version)
        {
            return LockReply::Exists;
        }
        let mut lock = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        if request.release {
            if lock
                .as_ref()
                .is_some_and(|l| l.proposal == request.proposal)
            {
                *lock = None;
            }
            return LockReply::Granted;
        }
        match &*lock {
            Some(held)
                if held.until > now
                    && held.version == request.version
                    && held.proposal != request.proposal =>
            {
                LockReply::Busy
            }
            _ => {
                *lock = Some(Lock {
                    version: request.version,
                    proposal: request.proposal,
                    until: now + LOCK_TTL,
                });
                LockReply::Granted
            }
        }
    }

    async fn ask_lock(&self, member: &str, request: &LockRequest) -> Option<LockReply> {
        if member == self.me {
            return Some(self.answer_lock(request));
        }
        let param = messages::to_param(request).ok()?;
        let value = self
            .client()
            .call(member, LOCK_METHOD, vec![param], LOCK_TIMEOUT)
            .await
            .ok()?;
        messages::from_value(&value).ok()
    }

    /// `cluster.apply(version)`: see the module doc.
    pub async fn apply(&self, version: u64) -> Result<Applied> {
        let report = super::Report::default();
        for attempt in 0..ATTEMPTS {
            // What every member staged and applied, merged first.
            let Some(history) = self.history() else {
                return Err(Error::Internal("this daemon has no layout yet".into()));
            };
            let members: Vec<String> = history
                .current()
                .members
                .iter()
                .map(|m| m.address.clone())
                .collect();
            let pulls = members
                .iter()
                .filter(|m| **m != self.me)
                .map(|m| self.gossip_with(m, &report));
            futures_util::future::join_all(pulls).await;
            let history = self.history().unwrap_or(history);
            let (next, moved) = history
                .next_version(version)
                .map_err(|refused| Error::invalid(refused.0))?;
            let proposal = crate::random::random_u64();
            let request = LockRequest {
                version,
                proposal,
                release: false,
            };
            let locked_at = Instant::now();
            let asked = members.iter().map(|m| self.ask_lock(m, &request));
            let replies = futures_util::future::join_all(asked).await;
            let granted = replies
                .iter()
                .filter(|r| matches!(r, Some(LockReply::Granted)))
                .count();
            let exists = replies.iter().any(|r| matches!(r, Some(LockReply::Exists)));
            if granted * 2 > members.len() && !exists && locked_at.elapsed() < COMMIT_WITHIN {
                let applied = history.with_applied(next, crate::clock::now_us(), &self.me);
                self.merge(&applied)?;
                // Spread it now rather than at the next round.
                let pushes = self.peers().into_iter().map(|peer| {
                    let report = report.clone();
                    async move { self.gossip_with(&peer, &report).await }
                });
                futures_util::future::join_all(pushes).await;
                tracing::info!(version, moved, "applied a new layout version");
                return Ok(Applied { version, moved });
            }
            let release = LockRequest {
                release: true,
                ..request
            };
            let releases = members.iter().map(|m| self.ask_lock(m, &release));
            futures_util::future::join_all(releases).await;
            if exists {
                continue; // the next pass finds the version and says so
            }
            tracing::info!(
                version,
                attempt,
                granted,
                members = members.len(),
                "apply did not get a majority's lock; trying again"
            );
            let pause = 50 + crate::random::random_u64() % 250;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        Err(Error::Internal(format!(
            "could not apply version {version}: no majority of the members granted the lock \
             (members down, or other applies racing); nothing was changed"
        )))
    }
}
