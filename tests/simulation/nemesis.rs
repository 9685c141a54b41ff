//! The faults of one run, drawn from its seed before the run starts (a pure plan), and put in
//! place by the test thread between turmoil's steps.
//!
//! Three tracks overlap: the network (one node cut off, the cluster split in halves, a
//! one-way cut, messages lost or held or slowed on a link), crashes (a node's process killed
//! or its machine's power cut, then started again) and membership (a node added, a live node
//! removed, a dead node removed: the operator host stages and applies these; the plan says
//! when, and starts or kills the node). Within a track faults follow one another.
//!
//! Two limits keep the plan inside what Dynamo promises, so that the checker may hold the
//! cluster to its promises: at most one node is down at a time (besides a node that died for
//! good), and two power losses are at least [`POWER_LOSS_SPACING`] apart (a write acknowledged
//! by W = 2 replicas is lost only if both lose power within one sync interval, 1 s).

use std::fmt;
use std::time::Duration;

use crate::disk::Crash;
use crate::world::SplitMix;

/// Storage nodes in the layout when the run starts.
pub const MEMBERS: [&str; 4] = ["node1", "node2", "node3", "node4"];
/// The node a growth adds; its host waits until then.
pub const SPARE: &str = "node5";
pub const BALANCERS: [&str; 2] = ["balancer1", "balancer2"];
/// When the faults start and stop; the workload runs from the balancers' first answer until
/// [`FAULTS_UNTIL`], when every fault is healed and every crashed node started again.
pub const FAULTS_FROM: Duration = Duration::from_secs(3);
pub const FAULTS_UNTIL: Duration = Duration::from_secs(40);
/// Least time between two power losses.
pub const POWER_LOSS_SPACING: Duration = Duration::from_secs(5);
/// How long before its `stage_remove` a dead node dies, and before its `stage_add` a new node
/// starts.
pub const LEAD: Duration = Duration::from_secs(2);
/// A link's usual latency bound (turmoil's builder sets it for every link).
pub const MAX_LATENCY: Duration = Duration::from_millis(5);

/// Every storage node host, the spare included.
pub fn nodes() -> Vec<&'static str> {
    MEMBERS.iter().copied().chain([SPARE]).collect()
}

/// Every daemon host: what the network faults pick from.
pub fn daemons() -> Vec<&'static str> {
    nodes().into_iter().chain(BALANCERS).collect()
}

/// One thing the nemesis does at one moment.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Crash(&'static str, Crash),
    Restart(&'static str),
    /// Cuts every pair (both ways).
    Partition(Vec<(&'static str, &'static str)>),
    Repair(Vec<(&'static str, &'static str)>),
    /// Cuts what `.0` sends to `.1`.
    PartitionOneWay(&'static str, &'static str),
    RepairOneWay(&'static str, &'static str),
    /// Holds every message on the link until released (a long delay).
    Hold(&'static str, &'static str),
    Release(&'static str, &'static str),
    /// Drops messages on the link with this probability.
    Loss(&'static str, &'static str, f64),
    /// Bounds the link's latency (from its usual [`MAX_LATENCY`]).
    Latency(&'static str, &'static str, Duration),
    /// Ends every fault: repairs and releases every link, restarts every crashed node that is
    /// not dead for good.
    HealAll,
}

/// A change of membership, made by the operator host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Grow(&'static str),
    Shrink(&'static str),
    RemoveDead(&'static str),
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Grow(node) => write!(f, "grow: add {node}"),
            Change::Shrink(node) => write!(f, "shrink: remove {node}, alive"),
            Change::RemoveDead(node) => write!(f, "remove {node}, dead"),
        }
    }
}

/// The whole plan of one run.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// In time order.
    pub actions: Vec<(Duration, Action)>,
    pub changes: Vec<(Duration, Change)>,
    /// When the spare node starts, if a growth adds it.
    pub spare_starts: Option<Duration>,
}

impl Plan {
    pub fn draw(random: &mut SplitMix) -> Plan {
        let mut plan = Plan::default();
        let mut membership = random.fork(1);
        let mut crashes = random.fork(2);
        let mut network = random.fork(3);

        // Membership: one or two changes, never fewer than N = 3 members.
        let mut members: Vec<&'static str> = MEMBERS.to_vec();
        let mut dead: Option<(&'static str, Duration)> = None;
        let mut at = Duration::from_millis(membership.between(6_000, 14_000));
        let count = 1 + membership.below(2);
        for _ in 0..count {
            let grow = !members.contains(&SPARE) && (members.len() == 3 || membership.chance(40));
            let change = if grow {
                members.push(SPARE);
                plan.spare_starts = Some(at - LEAD);
                Change::Grow(SPARE)
            } else {
                let node = membership.pick(&members);
                members.retain(|member| *member != node);
                if dead.is_none() && membership.chance(50) {
                    dead = Some((node, at - LEAD));
                    plan.actions
                        .push((at - LEAD, Action::Crash(node, Crash::Power)));
                    Change::RemoveDead(node)
                } else {
                    Change::Shrink(node)
                }
            };
            plan.changes.push((at, change));
            at += Duration::from_millis(membership.between(8_000, 12_000));
        }

        // Crashes: one node down at a time, power losses spaced.
        let mut last_power_loss = dead.map(|(_, at)| at);
        let mut at = FAULTS_FROM + Duration::from_millis(crashes.between(0, 3_000));
        while at < FAULTS_UNTIL {
            let down = Duration::from_millis(crashes.between(300, 4_000));
            let candidates: Vec<&'static str> = nodes()
                .into_iter()
                .filter(|node| dead.is_none_or(|(dead, _)| dead != *node))
                .filter(|node| *node != SPARE || plan.spare_starts.is_some_and(|s| s < at))
                .collect();
            let node = crashes.pick(&candidates);
            let power_ok = last_power_loss.is_none_or(|last| {
                at.abs_diff(last) >= POWER_LOSS_SPACING
                    && dead.is_none_or(|(_, died)| at.abs_diff(died) >= POWER_LOSS_SPACING)
            });
            let crash = if power_ok && crashes.chance(50) {
                last_power_loss = Some(at);
                Crash::Power
            } else {
                Crash::Process
            };
            let back = (at + down).min(FAULTS_UNTIL);
            plan.actions.push((at, Action::Crash(node, crash)));
            plan.actions.push((back, Action::Restart(node)));
            at = back + Duration::from_millis(crashes.between(1_000, 5_000));
        }

        // The network.
        let mut at = FAULTS_FROM + Duration::from_millis(network.between(0, 2_000));
        while at < FAULTS_UNTIL {
            let lasts = Duration::from_millis(network.between(500, 4_000));
            let end = (at + lasts).min(FAULTS_UNTIL);
            let daemons = daemons();
            let (start, stop) = match network.below(6) {
                0 => {
                    let node = network.pick(&nodes());
                    let pairs: Vec<_> = daemons
                        .iter()
                        .filter(|other| **other != node)
                        .map(|other| (node, *other))
                        .collect();
                    (Action::Partition(pairs.clone()), Action::Repair(pairs))
                }
                1 => {
                    let mut side: Vec<bool> = daemons.iter().map(|_| network.chance(50)).collect();
                    if side.iter().all(|s| *s) || side.iter().all(|s| !*s) {
                        side[0] = !side[0];
                    }
                    let mut pairs = Vec::new();
                    for (i, a) in daemons.iter().enumerate() {
                        for (j, b) in daemons.iter().enumerate().skip(i + 1) {
                            if side[i] != side[j] {
                                pairs.push((*a, *b));
                            }
                        }
                    }
                    (Action::Partition(pairs.clone()), Action::Repair(pairs))
                }
                kind => {
                    let (a, b) = two_of(&mut network, &daemons);
                    match kind {
                        2 => (Action::PartitionOneWay(a, b), Action::RepairOneWay(a, b)),
                        3 => (Action::Hold(a, b), Action::Release(a, b)),
                        4 => {
                            let rate = network.between(2, 20) as f64 / 100.0;
                            (Action::Loss(a, b, rate), Action::Loss(a, b, 0.0))
                        }
                        _ => {
                            let latency = Duration::from_millis(network.between(20, 400));
                            (
                                Action::Latency(a, b, latency),
                                Action::Latency(a, b, MAX_LATENCY),
                            )
                        }
                    }
                }
            };
            plan.actions.push((at, start));
            plan.actions.push((end, stop));
            at = end + Duration::from_millis(network.between(500, 4_000));
        }

        plan.actions.push((FAULTS_UNTIL, Action::HealAll));
        // Stable: at one moment, a track's end comes before the next start, as drawn.
        plan.actions.sort_by_key(|(at, _)| *at);
        plan
    }

    /// The node that dies for good, if any.
    pub fn dead(&self) -> Option<&'static str> {
        self.changes.iter().find_map(|(_, change)| match change {
            Change::RemoveDead(node) => Some(*node),
            _ => None,
        })
    }

    /// The plan, one line per action, for the history.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<(Duration, String)> = self
            .actions
            .iter()
            .map(|(at, action)| (*at, format!("nemesis {action:?}")))
            .chain(
                self.changes
                    .iter()
                    .map(|(at, change)| (*at, format!("operator {change}"))),
            )
            .chain(self.spare_starts.map(|at| (at, format!("{SPARE} starts"))))
            .collect();
        lines.sort_by_key(|(at, _)| *at);
        lines
            .into_iter()
            .map(|(at, line)| format!("{:>8} ms: {line}", at.as_millis()))
            .collect()
    }
}

fn two_of(random: &mut SplitMix, hosts: &[&'static str]) -> (&'static str, &'static str) {
    let a = random.below(hosts.len() as u64) as usize;
    let b = (a + 1 + random.below(hosts.len() as u64 - 1) as usize) % hosts.len();
    (hosts[a], hosts[b])
}

/// The faults in place, as the nemesis put them.
#[derive(Default)]
pub struct Nemesis {
    /// Nodes crashed and not started again.
    pub down: Vec<&'static str>,
    cuts: Vec<(&'static str, &'static str)>,
    one_way: Vec<(&'static str, &'static str)>,
    holds: Vec<(&'static str, &'static str)>,
    losses: Vec<(&'static str, &'static str, f64)>,
}

impl Nemesis {
    /// Puts `action` in place on the running simulation; `crash_disk` crashes a node's disk as
    /// its host goes down. Returns a line for the history.
    pub fn apply(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        action: &Action,
        plan: &Plan,
        crash_disk: &mut dyn FnMut(&'static str, Crash) -> usize,
    ) -> String {
        match action {
            Action::Crash(node, crash) => {
                self.crash(sim, node);
                let lost = crash_disk(node, *crash);
                self.down.push(node);
                format!("nemesis: {node} crashed ({crash:?}), {lost} unsynced writes lost")
            }
            Action::Restart(node) => {
                crate::world::as_host(node, || sim.bounce(*node));
                self.down.retain(|other| other != node);
                format!("nemesis: {node} started again")
            }
            Action::Partition(pairs) => {
                for (a, b) in pairs {
                    sim.partition(*a, *b);
                }
                self.cuts.extend(pairs);
                format!("nemesis: partition {pairs:?}")
            }
            Action::Repair(pairs) => {
                for (a, b) in pairs {
                    sim.repair(*a, *b);
                }
                self.cuts.retain(|pair| !pairs.contains(pair));
                "nemesis: repaired".to_owned()
            }
            Action::PartitionOneWay(a, b) => {
                sim.partition_oneway(*a, *b);
                self.one_way.push((a, b));
                format!("nemesis: {a} -> {b} cut one way")
            }
            Action::RepairOneWay(a, b) => {
                sim.repair_oneway(*a, *b);
                self.one_way.retain(|pair| *pair != (a, b));
                format!("nemesis: {a} -> {b} repaired")
            }
            Action::Hold(a, b) => {
                sim.hold(*a, *b);
                self.holds.push((a, b));
                format!("nemesis: {a} <-> {b} held")
            }
            Action::Release(a, b) => {
                sim.release(*a, *b);
                self.holds.retain(|pair| *pair != (a, b));
                format!("nemesis: {a} <-> {b} released")
            }
            Action::Loss(a, b, rate) => {
                sim.set_link_fail_rate(*a, *b, *rate);
                self.losses.retain(|(x, y, _)| (x, y) != (a, b));
                if *rate > 0.0 {
                    self.losses.push((a, b, *rate));
                }
                format!("nemesis: {a} <-> {b} loses {rate} of messages")
            }
            Action::Latency(a, b, latency) => {
                sim.set_link_max_message_latency(*a, *b, *latency);
                format!("nemesis: {a} <-> {b} latency up to {latency:?}")
            }
            Action::HealAll => {
                let daemons = daemons();
                for (i, a) in daemons.iter().enumerate() {
                    for b in daemons.iter().skip(i + 1) {
                        sim.repair(*a, *b);
                        sim.release(*a, *b);
                        sim.set_link_fail_rate(*a, *b, 0.0);
                        sim.set_link_max_message_latency(*a, *b, MAX_LATENCY);
                    }
                }
                self.cuts.clear();
                self.one_way.clear();
                self.holds.clear();
                self.losses.clear();
                let restart: Vec<&'static str> = self
                    .down
                    .iter()
                    .copied()
                    .filter(|node| Some(*node) != plan.dead())
                    .collect();
                for node in &restart {
                    crate::world::as_host(node, || sim.bounce(*node));
                }
                self.down.retain(|node| !restart.contains(node));
                format!("nemesis: healed; started again {restart:?}")
            }
        }
    }

    /// Crashes `node` as a machine that loses power does: it sends nothing more. turmoil would
    /// send a FIN for every connection the crash drops, in an order that follows tokio's task
    /// ids, which count across the whole process (and across two runs of a seed, or tests run
    /// in parallel): the FINs would draw their latencies from the seeded generator in another
    /// order, and the runs would part. So the node is cut from every host while it goes down;
    /// a peer learns of the crash when it next sends (turmoil answers a segment for a socket
    /// gone with a RST) or from its own timeout. The faults the network track had put on the
    /// node's links are then put back.
    fn crash(&mut self, sim: &mut turmoil::Sim<'_>, node: &'static str) {
        let others: Vec<&'static str> = all_hosts().into_iter().filter(|h| *h != node).collect();
        for other in &others {
            // A lossy link could break and mend itself on a FIN and undo the cut.
            sim.set_link_fail_rate(node, *other, 0.0);
            sim.partition(node, *other);
        }
        crate::world::as_host(node, || sim.crash(node));
        for other in &others {
            sim.repair(node, *other);
        }
        for (a, b) in &self.cuts {
            if *a == node || *b == node {
                sim.partition(*a, *b);
            }
        }
        for (a, b) in &self.one_way {
            if *a == node || *b == node {
                sim.partition_oneway(*a, *b);
            }
        }
        for (a, b) in &self.holds {
            if *a == node || *b == node {
                sim.hold(*a, *b);
            }
        }
        for (a, b, rate) in &self.losses {
            if *a == node || *b == node {
                sim.set_link_fail_rate(*a, *b, *rate);
            }
        }
    }
}

/// Every host of the simulation.
pub fn all_hosts() -> Vec<&'static str> {
    daemons()
        .into_iter()
        .chain(crate::workload::CLIENTS)
        .chain(["operator", "inspector"])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over many seeds, the plans keep the limits the checker relies on and use every fault.
    #[test]
    fn plans_keep_their_limits_and_use_every_fault() {
        let mut kinds = std::collections::BTreeSet::new();
        for seed in 0..500 {
            let plan = Plan::draw(&mut SplitMix(seed));
            let mut down: Vec<&str> = Vec::new();
            let mut powers = Vec::new();
            for (at, action) in &plan.actions {
                let name = format!("{action:?}");
                kinds.insert(name.split('(').next().unwrap_or_default().to_owned());
                match action {
                    Action::Crash(node, crash) => {
                        assert!(!down.contains(node), "seed {seed}: {node} crashed twice");
                        down.push(node);
                        let others = down.iter().filter(|n| Some(**n) != plan.dead()).count();
                        assert!(others <= 1, "seed {seed}: two nodes down at {at:?}");
                        if *crash == Crash::Power {
                            powers.push(*at);
                        }
                    }
                    Action::Restart(node) => down.retain(|n| n != node),
                    _ => {}
                }
                assert!(*at <= FAULTS_UNTIL, "seed {seed}: {action:?} at {at:?}");
            }
            powers.sort();
            for pair in powers.windows(2) {
                assert!(pair[1] - pair[0] >= POWER_LOSS_SPACING, "seed {seed}");
            }
            assert!(!plan.changes.is_empty());
            for (_, change) in &plan.changes {
                kinds.insert(
                    format!("{change:?}")
                        .split('(')
                        .next()
                        .unwrap_or_default()
                        .into(),
                );
            }
        }
        for kind in [
            "Crash",
            "Restart",
            "Partition",
            "PartitionOneWay",
            "Hold",
            "Loss",
            "Latency",
            "Grow",
            "Shrink",
            "RemoveDead",
        ] {
            assert!(kinds.contains(kind), "no plan has {kind}: {kinds:?}");
        }
    }
}
