//! The layout history: every live layout version, the staged changes, and what each daemon
//! has done about each version. Pure data with pure rules; gossip spreads it, nodes store it.
//!
//! A change of membership is not one switch but a transition between two layouts, and a
//! daemon cannot see the whole cluster at once. So the history keeps every version still
//! needed (oldest first), and three trackers, each a map from daemon to the highest version
//! it vouches for (Garage's update trackers, from "Preserving read-after-write consistency
//! in Garage"):
//!
//! - `ack`: the daemon routes writes with this version (to a quorum of *every* live version's
//!   replicas) and no write it started under an older one is still in flight;
//! - `sync`: the storage node has pulled, from the older versions' holders, every partition
//!   this version gives it (once everyone acked: no write can slip past the pull);
//! - `sync_ack`: the daemon reads from this version (or a newer one).
//!
//! From these follow the decisions, each a pure function here: which version reads use
//! ([`History::read_version`]: the newest one whose members all synced it), when a node may
//! start pulling ([`History::ack_min`]), and which versions are over ([`History::prune`]:
//! older than what every daemon reads). Every tracker only grows and merges by maximum, and
//! versions only get appended, so histories merge in any order to the same result.
//!
//! Two applies of the same version number are prevented by a lock a majority must grant
//! (see `apply.rs`); should two different versions with one number meet anyway, the merge
//! keeps the one with the smaller hash everywhere (and drops what was built on the other),
//! and says so, instead of leaving the cluster split as Garage does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::{Layout, Member};

/// How long a daemon that is not a member (a balancer) counts in the trackers after it was
/// last heard of: one that went away stops holding transitions back after this.
pub const GATEWAY_LEASE_US: u64 = 30_000_000;

/// How stale a gateway's own `seen` stamp may get before it renews it: renewals change the
/// history's digest, so they are spaced out.
pub const GATEWAY_RENEW_US: u64 = 5_000_000;

/// Most weight a member may have.
pub const MAX_WEIGHT: u32 = 1000;

/// One layout version: its number, N, and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub number: u64,
    /// Replicas per partition wanted (the layout uses fewer when there are fewer members).
    pub replicas: u32,
    /// Sorted by address, one entry per address.
    pub members: Vec<Member>,
}

impl Version {
    pub fn layout(&self) -> Layout {
        Layout::from_members(&self.members, self.replicas as usize)
    }

    pub fn has(&self, address: &str) -> bool {
        self.members.iter().any(|m| m.address == address)
    }

    fn hash(&self) -> [u8; 16] {
        md5::compute(postcard::to_allocvec(self).unwrap_or_default()).0
    }
}

/// A staged change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Join, or change zone or weight.
    Add(Member),
    Remove(String),
}

impl Change {
    pub fn address(&self) -> &str {
        match self {
            Change::Add(member) => &member.address,
            Change::Remove(address) => address,
        }
    }
}

/// The staged changes, last writer wins as a whole: every edit stamps them anew.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub changes: Vec<Change>,
    /// (microseconds, who): the edit's time, ties broken by the editor's name.
    pub stamp: (u64, String),
}

/// The history; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// Live versions, oldest first; never empty.
    pub versions: Vec<Version>,
    pub staged: Staged,
    pub ack: BTreeMap<String, u64>,
    pub sync: BTreeMap<String, u64>,
    pub sync_ack: BTreeMap<String, u64>,
    /// Daemons that are not members but route requests (balancers), and when they were last
    /// heard of (microseconds, their clock): they count in the trackers for
    /// [`GATEWAY_LEASE_US`] after that.
    pub gateways: BTreeMap<String, u64>,
}

/// Why an edit or an apply was refused: the text of a -32602 fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What a merge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub changed: bool,
    /// Two different versions with one number met: what happened, for the log.
    pub conflict: Option<String>,
}

impl History {
    /// Version 1 over `members`.
    pub fn initial(mut members: Vec<Member>, replicas: u32) -> History {
        members.sort_by(|a, b| a.address.cmp(&b.address));
        members.dedup_by(|a, b| a.address == b.address);
        History {
            versions: vec![Version {
                number: 1,
                replicas,
                members,
            }],
            staged: Staged::default(),
            ack: BTreeMap::new(),
            sync: BTreeMap::new(),
            sync_ack: BTreeMap::new(),
            gateways: BTreeMap::new(),
        }
    }

    pub fn current(&self) -> &Version {
        // Never empty: every constructor and merge keeps one version at least.
        &self.versions[self.versions.len() - 1]
    }

    pub fn oldest(&self) -> u64 {
        self.versions[0].number
    }

    pub fn in_transition(&self) -> bool {
        self.versions.len() > 1
    }

    pub fn version(&self, number: u64) -> Option<&Version> {
        self.versions.iter().find(|v| v.number == number)
    }

    /// A short hex digest of everything: equal digests, equal histories.
    pub fn digest(&self) -> String {
        let digest = md5::compute(postcard::to_allocvec(self).unwrap_or_default()).0;
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<History> {
        let history: History = postcard::from_bytes(bytes).ok()?;
        (!history.versions.is_empty()).then_some(history)
    }

    /// Every address that is a member of some live version.
    pub fn all_members(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .versions
            .iter()
            .flat_map(|v| v.members.iter().map(|m| m.address.clone()))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    fn tracker(map: &BTreeMap<String, u64>, who: &str, floor: u64) -> u64 {
        map.get(who).copied().unwrap_or(0).max(floor)
    }

    /// Gateways whose lease is running at `now_us`.
    fn leased_gateways(&self, now_us: u64) -> impl Iterator<Item = &String> {
        self.gateways
            .iter()
            .filter(move |(_, seen)| seen.saturating_add(GATEWAY_LEASE_US) >= now_us)
            .map(|(who, _)| who)
    }

    /// The daemons that route writes and whose acks a transition waits for: the members of
    /// the newest version (a member removed by it routes nothing the newest version needs),
    /// and the leased gateways.
    fn routers(&self, now_us: u64) -> Vec<&String> {
        self.current()
            .members
            .iter()
            .map(|m| &m.address)
            .chain(self.leased_gateways(now_us))
            .collect()
    }

    /// The newest version every router acknowledged: from then on no write misses it.
    pub fn ack_min(&self, now_us: u64) -> u64 {
        let floor = self.oldest();
        self.routers(now_us)
            .into_iter()
            .map(|who| Self::tracker(&self.ack, who, floor))
            .min()
            .unwrap_or(floor)
            .min(self.current().number)
    }

    /// The version reads use: the newest, once its members all synced it, else the oldest
    /// live one (read from before, so it needs no sync). Never one in between: a node pulls
    /// what the *newest* version gives it, so a middle version's members may never have
    /// received what that version alone gave them.
    pub fn read_version(&self) -> u64 {
        let floor = self.oldest();
        let newest = self.current();
        let synced = newest
            .members
            .iter()
            .all(|m| Self::tracker(&self.sync, &m.address, floor) >= newest.number);
        if synced { newest.number } else { floor }
    }

    /// Drops the versions no daemon reads from any more: older than the smallest `sync_ack`
    /// among the routers (never the read version or anything newer). True when one went.
    pub fn prune(&mut self, now_us: u64) -> bool {
        let floor = self.oldest();
        let read = self.read_version();
        let everyone_reads = self
            .routers(now_us)
            .into_iter()
            .map(|who| Self::tracker(&self.sync_ack, who, floor))
            .min()
            .unwrap_or(floor)
            .min(read);
        let before = self.versions.len();
        self.versions.retain(|v| v.number >= everyone_reads);
        before != self.versions.len()
    }

    /// Raises `who`'s tracker in `map` to `version`; true when it moved.
    pub fn raise(map: &mut BTreeMap<String, u64>, who: &str, version: u64) -> bool {
        let entry = map.entry(who.to_owned()).or_insert(0);
        if *entry < version {
            *entry = version;
            true
        } else {
            false
        }
    }

    /// Merges `other` into this history (see the module doc for why any order gives the
    /// same result).
    pub fn merge(&mut self, other: &History) -> Merged {
        let before = self.clone();
        let mut conflict = None;
        if self.current().number < other.oldest() {
            // Every version we know is over: take theirs.
            self.versions = other.versions.clone();
        } else {
            for theirs in &other.versions {
                match self.versions.iter().position(|v| v.number == theirs.number) {
                    Some(i) if self.versions[i] != *theirs => {
                        // Two versions with one number. Two versions 1 are daemons started
                        // with different servers: each keeps its own (the operator must
                        // fix the flags; a misconfigured node must not re-place a running
                        // cluster). Later ones come from an apply whose lock ran out: the
                        // smaller hash wins everywhere, and what was built on the loser
                        // goes with it.
                        if theirs.number == 1 {
                            conflict = Some(format!(
                                "a daemon has another layout version 1 (members {:?}): it was \
                                 started with other -s servers; ignoring its layout",
                                theirs
                                    .members
                                    .iter()
                                    .map(|m| &m.address)
                                    .collect::<Vec<_>>()
                            ));
                            return Merged {
                                changed: false,
                                conflict,
                            };
                        }
                        if theirs.hash() < self.versions[i].hash() {
                            conflict = Some(format!(
                                "two different layouts numbered {} met; keeping the one with \
                                 members {:?} and dropping the other",
                                theirs.number,
                                theirs
                                    .members
                                    .iter()
                                    .map(|m| &m.address)
                                    .collect::<Vec<_>>()
                            ));
                            self.versions.truncate(i);
                            self.versions.push(theirs.clone());
                        } else {
                            conflict = Some(format!(
                                "two different layouts numbered {} met; keeping this one",
                                theirs.number
                            ));
                        }
                    }
                    Some(_) => {}
                    None if theirs.number == self.current().number + 1 => {
                        self.versions.push(theirs.clone());
                    }
                    None => {} // older than ours, or a gap (their next one comes later)
                }
            }
            // Versions they pruned are over for us too: pruning follows trackers we merge.
        }
        for (mine, theirs) in [
            (&mut self.ack, &other.ack),
            (&mut self.sync, &other.sync),
            (&mut self.sync_ack, &other.sync_ack),
            (&mut self.gateways, &other.gateways),
        ] {
            for (who, &version) in theirs {
                Self::raise(mine, who, version);
            }
        }
        if other.staged.stamp > self.staged.stamp {
            self.staged = other.staged.clone();
        }
        Merged {
            changed: *self != before,
            conflict,
        }
    }

    /// Replaces the staged changes, stamped after every earlier edit.
    fn restage(&mut self, changes: Vec<Change>, now_us: u64, editor: &str) {
        let at = now_us.max(self.staged.stamp.0.saturating_add(1));
        self.staged = Staged {
            changes,
            stamp: (at, editor.to_owned()),
        };
    }

    /// Stages `member` to join (or to take a new zone or weight).
    pub fn stage_add(&mut self, member: Member, now_us: u64, editor: &str) -> Result<(), Refused> {
        if member.weight == 0 || member.weight > MAX_WEIGHT {
            return Err(Refused(format!(
                "weight {} is out of range: it must be 1..={MAX_WEIGHT}",
                member.weight
            )));
        }
        crate::config::validate_address(&member.address).map_err(|e| Refused(e.0))?;
        let mut changes = self.staged.changes.clone();
        changes.retain(|c| c.address() != member.address);
        if !self.current().members.contains(&member) {
            changes.push(Change::Add(member));
        }
        self.restage(changes, now_us, editor);
        Ok(())
    }

    /// Stages `address` to leave.
    pub fn stage_remove(
        &mut self,
        address: &str,
        now_us: u64,
        editor: &str,
    ) -> Result<(), Refused> {
        let mut changes = self.staged.changes.clone();
        let was_staged = changes.iter().any(|c| c.address() == address);
        changes.retain(|c| c.address() != address);
        if self.current().has(address) {
            changes.push(Change::Remove(address.to_owned()));
        } else if !was_staged {
            return Err(Refused(format!(
                "{address} is not a member of layout version {}",
                self.current().number
            )));
        }
        self.restage(changes, now_us, editor);
        Ok(())
    }

    pub fn stage_revert(&mut self, now_us: u64, editor: &str) {
        self.restage(Vec::new(), now_us, editor);
    }

    /// The version the staged changes make, numbered `number` (which must be the current
    /// one + 1), and how many partition replicas change hands.
    pub fn next_version(&self, number: u64) -> Result<(Version, usize), Refused> {
        let current = self.current();
        if number != current.number + 1 {
            return Err(Refused(format!(
                "cannot apply version {number}: the current layout version is {}, so the next \
                 one is {}",
                current.number,
                current.number + 1
            )));
        }
        if self.staged.changes.is_empty() {
            return Err(Refused("nothing is staged".into()));
        }
        let mut members = current.members.clone();
        for change in &self.staged.changes {
            members.retain(|m| m.address != change.address());
            if let Change::Add(member) = change {
                members.push(member.clone());
            }
        }
        members.sort_by(|a, b| a.address.cmp(&b.address));
        if members.is_empty() {
            return Err(Refused(
                "the staged changes would leave no storage node".into(),
            ));
        }
        let next = Version {
            number,
            replicas: current.replicas,
            members,
        };
        let moved = Layout::moved_replicas(&current.layout(), &next.layout());
        Ok((next, moved))
    }

    /// This history with `version` applied: appended, staged changes cleared.
    pub fn with_applied(&self, version: Version, now_us: u64, editor: &str) -> History {
        let mut next = self.clone();
        next.versions.push(version);
        next.restage(Vec::new(), now_us, editor);
        next
    }

    /// Partitions `address` must receive for the newest version, each with the holders to
    /// pull it from: those where it is a replica in the newest version and not in some
    /// older live one, from every replica of the older versions but itself.
    pub fn partitions_to_receive(&self, address: &str) -> Vec<(usize, Vec<String>)> {
        if !self.in_transition() {
            return Vec::new();
        }
        let layouts: Vec<Layout> = self.versions.iter().map(Version::layout).collect();
        partitions_to_receive(&layouts, address)
    }
}

/// [`History::partitions_to_receive`] over the live versions' layouts, oldest first (built
/// once per snapshot: a layout costs hashes per partition and member).
pub fn partitions_to_receive(layouts: &[Layout], address: &str) -> Vec<(usize, Vec<String>)> {
    {
        let Some((newest, older)) = layouts.split_last() else {
            return Vec::new();
        };
        let Some(me) = newest.servers().iter().position(|s| s == address) else {
            return Vec::new();
        };
        let mut wanted = Vec::new();
        for partition in 0..crate::layout::PARTITIONS {
            if !newest
                .partition_walk(partition)
                .take(newest.replicas())
                .any(|s| s == me)
            {
                continue;
            }
            let mut sources: Vec<String> = Vec::new();
            let mut new_here = false;
            for layout in older {
                let set: Vec<&String> = layout
                    .partition_walk(partition)
                    .take(layout.replicas())
                    .map(|s| &layout.servers()[s])
                    .collect();
                if !set.iter().any(|s| *s == address) {
                    new_here = true;
                }
                sources.extend(set.into_iter().filter(|s| *s != address).cloned());
            }
            if new_here {
                sources.sort();
                sources.dedup();
                wanted.push((partition, sources));
            }
        }
        wanted
    }
}

#[cfg(test)]
mod tests;
