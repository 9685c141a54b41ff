//! Live membership: the layout history as one daemon holds it, spread by gossip, stored by
//! nodes, changed by `cluster.*` calls.
//!
//! [`history`] holds the rules (pure). This module is their shell, shared by both daemons:
//!
//! - the history, and a [`Routing`] snapshot made from it that requests hold for their whole
//!   life: a daemon acknowledges a new version (`ack`) once no request still holds a snapshot
//!   without it, and says it reads from a version (`sync_ack`) once no request still reads
//!   from an older one;
//! - gossip: every [`GOSSIP_INTERVAL`] a daemon sends the digest of its history to every
//!   member (and its seeds); on a mismatch the two exchange histories and merge;
//! - the start: a node loads its stored history; a daemon without one asks its seeds and
//!   takes theirs, and only when every seed answered without one (or some did and the
//!   others stayed silent for [`BOOTSTRAP_PATIENCE`]) does it build version 1 from itself and
//!   its `-s` servers (so a cluster started as today gets today's layout, and a node started
//!   with `-s any-member` joins the existing cluster instead); a node none of whose seeds
//!   ever answers builds nothing and waits;
//! - applies (`apply.rs`): a lock granted by a majority of the current members makes sure
//!   that of two racing `cluster.apply(v)` exactly one wins.

pub mod apply;
pub mod changes;
pub mod history;
pub mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
// Simulated time under a simulation (docs/simulation.md); `std::time::Instant` otherwise.
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::layout::{Layout, Member};
use crate::rpc::client::RpcClient;
use crate::rpc::messages;
use crate::storage::{Engine, Tree, WriteOp};
use history::History;

/// How often a daemon compares histories with every member.
pub const GOSSIP_INTERVAL: Duration = Duration::from_millis(500);
/// How long one gossip call may take.
const GOSSIP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a daemon without a history waits for its seeds before building version 1 from
/// its `-s` servers anyway.
const BOOTSTRAP_PATIENCE: Duration = Duration::from_secs(5);
/// A peer heard of within this long is "up" in `cluster.status()`.
const UP_WITHIN: Duration = Duration::from_secs(3);

const HISTORY_KEY: &[u8] = b"layout_history";

pub const GOSSIP_METHOD: &str = "cluster.gossip";

/// What a daemon is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A storage node: `me` is its address as members name it.
    Node,
    /// A balancer: routes requests, stores nothing; `me` is a name of its own.
    Gateway,
}

/// What a daemon says of itself in gossip, for `cluster.status()`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub zone: String,
    /// Newest layout version it knows.
    pub layout_version: u64,
    /// Partitions it still has to receive.
    pub syncing: u64,
    pub keys: u64,
    /// Bytes of its data directory (0 in memory, for a balancer, and from a daemon too old
    /// to send it).
    #[serde(default, deserialize_with = "absent_as_default")]
    pub disk_bytes: u64,
}

/// Reads a field appended to a message that ends the messages it travels in (as [`Report`]
/// ends [`GossipRequest`] and [`GossipReply`]): postcard writes fields in order with no
/// names, so an older daemon's message simply stops before it, and the end reads as the
/// default. An older daemon reading ours ignores the bytes left over.
fn absent_as_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(T::deserialize(deserializer).unwrap_or_default())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipRequest {
    pub from: String,
    pub digest: String,
    pub history: Option<History>,
    pub report: Report,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GossipReply {
    /// `None` from a daemon that has no history yet.
    pub digest: Option<String>,
    /// Sent when the digests differ (after merging what came).
    pub history: Option<History>,
    pub report: Report,
}

/// A daemon's view of the layouts, fixed for the requests that hold it.
#[derive(Debug)]
pub struct Routing {
    pub history: History,
    /// The live versions' layouts, oldest first, with their numbers.
    pub layouts: Vec<(u64, Layout)>,
    /// Index in `layouts` of the version reads use.
    pub read: usize,
}

impl Routing {
    fn new(history: History) -> Routing {
        let layouts: Vec<(u64, Layout)> = history
            .versions
            .iter()
            .map(|v| (v.number, v.layout()))
            .collect();
        let read_version = history.read_version();
        let read = layouts
            .iter()
            .position(|(n, _)| *n == read_version)
            .unwrap_or(0);
        Routing {
            history,
            layouts,
            read,
        }
    }

    pub fn current(&self) -> &Layout {
        &self.layouts[self.layouts.len() - 1].1
    }

    pub fn current_version(&self) -> u64 {
        self.layouts[self.layouts.len() - 1].0
    }

    pub fn read_layout(&self) -> &Layout {
        &self.layouts[self.read].1
    }

    pub fn read_version(&self) -> u64 {
        self.layouts[self.read].0
    }

    pub fn in_transition(&self) -> bool {
        self.layouts.len() > 1
    }

    /// Every address of every live version, sorted.
    pub fn all_servers(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .layouts
            .iter()
            .flat_map(|(_, l)| l.servers().iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Whether `address` replicates `key` in some live version.
    pub fn replicates(&self, address: &str, key: &[u8]) -> bool {
        self.layouts.iter().any(|(_, layout)| {
            layout
                .preference_list(key, layout.replicas())
                .into_iter()
                .any(|s| layout.servers()[s] == address)
        })
    }

    /// `key`'s replicas in the newest version.
    pub fn current_replicas(&self, key: &[u8]) -> Vec<String> {
        let layout = self.current();
        layout
            .preference_list(key, layout.replicas())
            .into_iter()
            .map(|s| layout.servers()[s].clone())
            .collect()
    }
}

/// What a daemon last heard from a peer.
#[derive(Debug, Clone)]
struct Heard {
    at: Instant,
    report: Report,
}

struct State {
    history: Option<History>,
    /// Snapshots handed out before the current one, still held by some request or not.
    old: Vec<Weak<Routing>>,
}

pub struct Membership {
    pub me: String,
    pub role: Role,
    /// The `-s` servers.
    seeds: Vec<String>,
    /// N for a version 1 this daemon builds.
    replicas: u32,
    pub zone: String,
    state: Mutex<State>,
    routing: RwLock<Option<Arc<Routing>>>,
    store: Option<Arc<dyn Engine>>,
    client: RpcClient,
    heard: Mutex<BTreeMap<String, Heard>>,
    /// Wakes whoever waits for the history to change (sync, rehoming, the gossip loop).
    changed: changes::Changes,
    pub(crate) lock: Mutex<Option<apply::Lock>>,
    conflict_logged: Mutex<Option<Instant>>,
    mismatched: Mutex<BTreeMap<String, String>>,
    /// Wakes the gossip loop at once: a peer knows a newer layout version.
    nudge: tokio::sync::Notify,
    /// The current snapshot's newest and oldest live versions, read without a lock on every
    /// request (the layout header, the stale-sender check).
    newest_version: std::sync::atomic::AtomicU64,
    oldest_version: std::sync::atomic::AtomicU64,
    /// Whether this process, since it started, learned from a peer a live layout version
    /// that has it as a member (see [`Membership::was_member_while_running`]).
    member_seen: std::sync::atomic::AtomicBool,
}

/// The membership's side of [`crate::rpc::client::LAYOUT_HEADER`], for the daemon's clients
/// (weak: the clients live inside what the membership serves).
pub struct Beacon(pub std::sync::Weak<Membership>);

impl crate::rpc::client::LayoutBeacon for Beacon {
    fn own_version(&self) -> u64 {
        self.0.upgrade().map_or(0, |m| m.version())
    }

    fn heard_version(&self, version: u64) {
        if let Some(membership) = self.0.upgrade() {
            membership.heard_version(version);
        }
    }
}

impl Membership {
    /// A daemon's membership; a node passes its engine, from which the stored history is
    /// loaded (and where every change is kept).
    pub fn new(
        me: String,
        role: Role,
        seeds: Vec<String>,
        replicas: u32,
        zone: String,
        store: Option<Arc<dyn Engine>>,
    ) -> Result<Membership> {
        let stored = match &store {
            Some(engine) => match engine.get(Tree::Meta, HISTORY_KEY)? {
                Some(bytes) => Some(History::decode(&bytes).ok_or_else(|| {
                    Error::Internal("the stored layout history cannot be decoded".into())
                })?),
                None => None,
            },
            None => None,
        };
        let membership = Self::empty(me, role, seeds, replicas, zone, store);
        if let Some(history) = stored {
            membership.install(history, false)?;
        }
        Ok(membership)
    }

    /// This membership, calling its peers with `client` (one carrying the daemon's
    /// credentials).
    pub fn with_client(mut self, client: RpcClient) -> Self {
        self.client = client;
        self.set_clock_members();
        self
    }

    /// Tells the peer clocks which nodes the cluster clock is the median of: the newest
    /// layout's (see [`crate::clock::PeerClocks::set_members`]).
    fn set_clock_members(&self) {
        if let Some(routing) = self.routing() {
            let me = (self.role == Role::Node).then(|| self.me.clone());
            self.client
                .clocks()
                .set_members(routing.current().servers().to_vec(), me);
        }
    }

    /// Where this node's own clock measurements put the cluster clock (see
    /// [`crate::clock::PeerClocks::anchor_us`]).
    pub fn clock_anchor_us(&self) -> Option<i64> {
        self.client.clocks().anchor_us()
    }

    /// The peer clocks its gossip measures, for the daemon's other clients to share.
    pub fn clocks(&self) -> Arc<crate::clock::PeerClocks> {
        self.client.shared_clocks()
    }

    /// A balancer's membership: nothing stored, the history learned from `seeds`.
    pub fn gateway(me: String, seeds: Vec<String>, replicas: u32) -> Membership {
        Self::empty(me, Role::Gateway, seeds, replicas, String::new(), None)
    }

    fn empty(
        me: String,
        role: Role,
        seeds: Vec<String>,
        replicas: u32,
        zone: String,
        store: Option<Arc<dyn Engine>>,
    ) -> Membership {
        Membership {
            me,
            role,
            seeds,
            replicas,
            zone,
            state: Mutex::new(State {
                history: None,
                old: Vec::new(),
            }),
            routing: RwLock::new(None),
            store,
            client: RpcClient::new(),
            heard: Mutex::new(BTreeMap::new()),
            changed: changes::Changes::default(),
            lock: Mutex::new(None),
            conflict_logged: Mutex::new(None),
            mismatched: Mutex::new(BTreeMap::new()),
            nudge: tokio::sync::Notify::new(),
            member_seen: std::sync::atomic::AtomicBool::new(false),
            newest_version: std::sync::atomic::AtomicU64::new(0),
            oldest_version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether this process was a member of a live layout version while it ran (as a peer
    /// told it, not as its stored history says). A node that was removed while it was down
    /// was not: what it holds is older than anything the cluster acknowledged since, and
    /// handing it over could bring back deletes reaped meanwhile; it is dropped instead.
    pub fn was_member_while_running(&self) -> bool {
        self.member_seen.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The newest layout version this daemon knows (0: none yet).
    pub fn version(&self) -> u64 {
        self.newest_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The oldest live layout version this daemon knows (0: none yet).
    pub fn oldest_version(&self) -> u64 {
        self.oldest_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A peer said it knows `version`: gossip at once if that is newer than ours.
    pub fn heard_version(&self, version: u64) {
        if version > self.version() {
            self.nudge.notify_one();
        }
    }

    /// The snapshot requests route with; `None` until the daemon has a history.
    pub fn routing(&self) -> Option<Arc<Routing>> {
        self.routing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn history(&self) -> Option<History> {
        self.state().history.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A receiver that sees a new value whenever the history changes.
    pub fn watch(&self) -> changes::ChangesReceiver {
        self.changed.subscribe()
    }

    pub fn client(&self) -> &RpcClient {
        &self.client
    }

    /// Makes `history` this daemon's (after its own trackers are brought up to date), stores
    /// it on a node, and hands out a new snapshot when the layouts changed.
    fn install(&self, history: History, persist_always: bool) -> Result<bool> {
        let mut state = self.state();
        self.install_locked(&mut state, history, persist_always)
    }

    /// Reads, changes and installs the history under one hold of the state lock, so that two
    /// changes made at once (gossip handlers, the gossip loop, the sync pass, an apply) never
    /// undo each other.
    fn update(
        &self,
        persist_always: bool,
        change: impl FnOnce(Option<History>) -> Option<History>,
    ) -> Result<bool> {
        let mut state = self.state();
        match change(state.history.clone()) {
            Some(history) => self.install_locked(&mut state, history, persist_always),
            None => Ok(false),
        }
    }

    fn install_locked(
        &self,
        state: &mut State,
        mut history: History,
        persist_always: bool,
    ) -> Result<bool> {
        // The snapshot requests route with moves to `old` *before* this daemon's own trackers
        // are computed: requests still holding it keep the acks back.
        self.replace_routing(state, &history);
        self.update_own_trackers(&mut history, &mut state.old);
        // Pruning (in the trackers' update) may have ended a version.
        self.replace_routing(state, &history);
        let changed = state.history.as_ref() != Some(&history);
        if !changed && !persist_always {
            return Ok(false);
        }
        if let Some(engine) = &self.store {
            engine.write(vec![WriteOp::put(
                Tree::Meta,
                HISTORY_KEY,
                history.encode(),
            )])?;
        }
        state.history = Some(history);
        self.changed.bump();
        Ok(true)
    }

    /// Hands out a new snapshot when `history`'s versions or read version differ from the
    /// current snapshot's.
    fn replace_routing(&self, state: &mut State, history: &History) {
        let current = self.routing();
        let same = current.as_ref().is_some_and(|routing| {
            routing.history.versions == history.versions
                && routing.read_version() == history.read_version()
        });
        if same {
            return;
        }
        if let Some(previous) = current {
            state.old.push(Arc::downgrade(&previous));
        }
        *self
            .routing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(Arc::new(Routing::new(history.clone())));
        self.newest_version.store(
            history.current().number,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.oldest_version
            .store(history.oldest(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            version = history.current().number,
            live = history.versions.len(),
            read = history.read_version(),
            "layout history changed"
        );
        self.set_clock_members();
    }

    /// This daemon's own trackers: ack what no request still routes without, say it reads
    /// what no request still reads older than; prune what everyone is done with.
    fn update_own_trackers(&self, history: &mut History, old: &mut Vec<Weak<Routing>>) {
        old.retain(|snapshot| snapshot.strong_count() > 0);
        let held: Vec<Arc<Routing>> = old.iter().filter_map(Weak::upgrade).collect();
        let newest = history.current().number;
        let ack = held
            .iter()
            .map(|r| r.current_version())
            .min()
            .unwrap_or(newest)
            .min(newest);
        let reads = held
            .iter()
            .map(|r| r.read_version())
            .chain(std::iter::once(history.read_version()))
            .min()
            .unwrap_or(newest);
        drop(held);
        let me = self.me.clone();
        History::raise(&mut history.ack, &me, ack);
        History::raise(&mut history.sync_ack, &me, reads);
        let now = crate::clock::now_us();
        if self.role == Role::Gateway {
            let seen = history.gateways.get(&me).copied().unwrap_or(0);
            if seen.saturating_add(history::GATEWAY_RENEW_US) <= now {
                history.gateways.insert(me, now);
            }
        }
        history.prune(now);
    }

    /// Marks this node as having received everything for `version`.
    pub fn mark_synced(&self, version: u64) -> Result<()> {
        self.update(false, |history| {
            let mut history = history?;
            History::raise(&mut history.sync, &self.me, version).then_some(history)
        })?;
        Ok(())
    }

    /// Merges a history that came from elsewhere.
    pub fn merge(&self, theirs: &History) -> Result<bool> {
        self.merge_from(None, theirs)
    }

    /// Peers whose layout version 1 differs from ours (started with other `-s` servers or
    /// `-N`), with why: their histories are ignored, and balancers route around them.
    pub fn mismatched(&self, peer: &str) -> Option<String> {
        self.mismatched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(peer)
            .cloned()
    }

    fn merge_from(&self, peer: Option<&str>, theirs: &History) -> Result<bool> {
        if let (Some(peer), Some(mine)) = (peer, self.history()) {
            let mut mismatched = self
                .mismatched
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match (mine.version(1), theirs.version(1)) {
                (Some(ours), Some(other)) if ours != other => {
                    mismatched.insert(
                        peer.to_owned(),
                        format!(
                            "ring mismatch: {peer} has another layout version 1 (members {:?}, \
                             N={}) than this daemon (members {:?}, N={}); start every daemon \
                             with the same servers and -N",
                            other.members.iter().map(|m| &m.address).collect::<Vec<_>>(),
                            other.replicas,
                            ours.members.iter().map(|m| &m.address).collect::<Vec<_>>(),
                            ours.replicas,
                        ),
                    );
                }
                _ => {
                    mismatched.remove(peer);
                }
            }
        }
        if theirs.versions.is_empty() {
            return Ok(false); // not a history: never installed, never merged
        }
        let mut conflict = None;
        let result = self.update(true, |mine| {
            let Some(mut mine) = mine else {
                return Some(theirs.clone());
            };
            let merged = mine.merge(theirs);
            conflict = merged.conflict;
            merged.changed.then_some(mine)
        });
        if self
            .routing()
            .is_some_and(|r| r.all_servers().contains(&self.me))
        {
            self.member_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(conflict) = conflict {
            // Said once a minute, not every gossip round.
            let mut last = self
                .conflict_logged
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                tracing::error!("{conflict}");
                *last = Some(Instant::now());
            }
        }
        result
    }

    /// Re-runs the own-tracker rules (called each gossip round: requests holding old
    /// snapshots finish between rounds).
    pub fn refresh(&self) -> Result<()> {
        self.update(false, |history| history)?;
        Ok(())
    }

    /// Builds version 1 from this daemon (if a node) and its seeds.
    fn build_initial(&self) -> Result<()> {
        let mut addresses = self.seeds.clone();
        if self.role == Role::Node {
            addresses.push(self.me.clone());
        }
        // Every daemon of a new cluster builds this version on its own, and they must build
        // the same: so no zones (a node knows only its own); `dynamite layout add` sets them.
        let members: Vec<Member> = addresses
            .into_iter()
            .map(|address| Member {
                zone: String::new(),
                address,
                weight: 1,
            })
            .collect();
        let history = History::initial(members, self.replicas.max(1));
        if self.role == Role::Node {
            self.member_seen
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        tracing::info!(
            members = ?history.current().members.iter().map(|m| &m.address).collect::<Vec<_>>(),
            "no member of the cluster has a layout yet: built version 1 from -s"
        );
        self.install(history, true)?;
        Ok(())
    }

    /// Who this daemon gossips with: every member of a live version and its seeds.
    fn peers(&self) -> Vec<String> {
        let mut peers = self.seeds.clone();
        if let Some(routing) = self.routing() {
            peers.extend(routing.all_servers());
        }
        peers.sort();
        peers.dedup();
        peers.retain(|p| *p != self.me);
        peers
    }

    /// Answers a peer's gossip.
    pub fn answer_gossip(&self, request: GossipRequest, report: Report) -> Result<GossipReply> {
        self.hear(&request.from, request.report.clone());
        if let Some(theirs) = &request.history {
            self.merge_from(Some(&request.from), theirs)?;
        }
        // A balancer's lease, renewed on this node's clock too: one whose own clock is
        // behind would otherwise drop out of the trackers while it still routes.
        if self.role == Role::Node && request.from.starts_with("balancer-") {
            let now = crate::clock::now_us();
            self.update(false, |history| {
                let mut history = history?;
                let seen = history.gateways.get(&request.from).copied().unwrap_or(0);
                if seen.saturating_add(history::GATEWAY_RENEW_US) > now {
                    return None;
                }
                history.gateways.insert(request.from.clone(), now);
                Some(history)
            })?;
        }
        let mine = self.history();
        let digest = mine.as_ref().map(History::digest);
        let history = match (&mine, &digest) {
            (Some(mine), Some(digest)) if *digest != request.digest => Some(mine.clone()),
            _ => None,
        };
        Ok(GossipReply {
            digest,
            history,
            report,
        })
    }

    fn hear(&self, from: &str, report: Report) {
        self.heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                from.to_owned(),
                Heard {
                    at: Instant::now(),
                    report,
                },
            );
    }

    /// The last report from `address` if heard lately.
    pub fn heard_from(&self, address: &str) -> Option<(bool, Report)> {
        let heard = self
            .heard
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        heard
            .get(address)
            .map(|h| (h.at.elapsed() <= UP_WITHIN, h.report.clone()))
    }

    /// One exchange with `peer`; answers what it said of itself and whether it has a history.
    pub async fn gossip_with(&self, peer: &str, report: &Report) -> Option<GossipReply> {
        let mine = self.history();
        let request = GossipRequest {
            from: self.me.clone(),
            digest: mine.as_ref().map(History::digest).unwrap_or_default(),
            history: None,
            report: report.clone(),
        };
        let reply = self.call_gossip(peer, &request).await?;
        self.hear(peer, reply.report.clone());
        if let Some(theirs) = &reply.history
            && let Err(error) = self.merge_from(Some(peer), theirs)
        {
            tracing::error!(%error, "could not keep the layout history");
        }
        // Theirs is older or different: send ours (merged) back.
        let ours = self.history();
        let our_digest = ours.as_ref().map(History::digest);
        if ours.is_some() && our_digest != reply.digest {
            let push = GossipRequest {
                history: ours,
                digest: our_digest.unwrap_or_default(),
                ..request
            };
            let _ = self.call_gossip(peer, &push).await;
        }
        Some(reply)
    }

    async fn call_gossip(&self, peer: &str, request: &GossipRequest) -> Option<GossipReply> {
        let param = messages::to_param(request).ok()?;
        match self
            .client
            .call(peer, GOSSIP_METHOD, vec![param], GOSSIP_TIMEOUT)
            .await
        {
            Ok(value) => messages::from_value(&value).ok(),
            Err(error) => {
                tracing::debug!(peer, %error, "gossip failed");
                None
            }
        }
    }

    /// One round with every peer.
    pub async fn gossip_round(&self, report: &Report) {
        if let Err(error) = self.refresh() {
            tracing::error!(%error, "could not keep the layout history");
        }
        let peers = self.peers();
        let calls = peers.iter().map(|peer| self.gossip_with(peer, report));
        futures_util::future::join_all(calls).await;
    }

    /// Gets a history at start: the stored one, a seed's, or version 1 built from `-s`.
    pub async fn bootstrap(&self, report: &Report) {
        if self.history().is_some() {
            return;
        }
        if self.seeds.is_empty() {
            return; // a node alone waits for a balancer or an operator to tell it
        }
        let started = Instant::now();
        let mut answered_once = false;
        let mut warned = false;
        loop {
            let request = GossipRequest {
                from: self.me.clone(),
                digest: String::new(),
                history: None,
                report: report.clone(),
            };
            let calls = self
                .seeds
                .iter()
                .map(|seed| self.call_gossip(seed, &request));
            let replies = futures_util::future::join_all(calls).await;
            // The history most seeds agree on (by version 1: seeds started with other flags
            // are outvoted, not raced), the newest of those first.
            let histories: Vec<(&String, &History)> = self
                .seeds
                .iter()
                .zip(&replies)
                .filter_map(|(seed, reply)| Some((seed, reply.as_ref()?.history.as_ref()?)))
                // Not a history (no version): never looked at, let alone taken.
                .filter(|(_, history)| !history.versions.is_empty())
                .collect();
            let agreeing = |h: &History| {
                histories
                    .iter()
                    .filter(|(_, other)| other.version(1) == h.version(1))
                    .count()
            };
            let chosen = histories.iter().max_by_key(|(seed, h)| {
                (agreeing(h), h.current().number, std::cmp::Reverse(*seed))
            });
            if let Some((_, chosen)) = chosen {
                if let Err(error) = self.merge(chosen) {
                    tracing::error!(%error, "could not keep the layout history");
                }
                for (seed, history) in &histories {
                    let _ = self.merge_from(Some(seed), history);
                }
            }
            if self.history().is_some() {
                return; // a seed had one, or one reached us meanwhile
            }
            let everyone_answered = replies.iter().all(Option::is_some);
            // Never alone: a node none of whose seeds ever answered would found a cluster of
            // itself and seeds that may be dead for good (a new node given one member that
            // had died), take writes into it, and refuse the real cluster's layout forever.
            // It waits instead, for a seed, or for the members to gossip their layout to it
            // once an operator adds it. A balancer stores nothing: it routes by its `-s`
            // servers meanwhile, as before.
            let someone_answered =
                answered_once || self.role == Role::Gateway || replies.iter().any(Option::is_some);
            answered_once = someone_answered;
            let patient = started.elapsed() >= BOOTSTRAP_PATIENCE;
            if everyone_answered || (patient && someone_answered) {
                if let Err(error) = self.build_initial() {
                    tracing::error!(%error, "could not keep the layout history");
                }
                return;
            }
            if patient && !warned {
                warned = true;
                tracing::warn!(
                    seeds = ?self.seeds,
                    "no seed has answered: waiting for one, or for the cluster's layout to reach \
                     this daemon (add it with cluster.stage_add on any member)"
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs gossip forever (both daemons); `report` says what this daemon is now.
    pub async fn run(self: Arc<Self>, report: impl Fn() -> Report + Send + Sync + 'static) {
        self.bootstrap(&report()).await;
        let mut ticks = tokio::time::interval(GOSSIP_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Either starts a round; a fixed order, not tokio's coin, decides which when
                // both are ready (a simulation replays it: docs/simulation.md).
                biased;
                _ = ticks.tick() => {}
                () = self.nudge.notified() => {}
            }
            self.gossip_round(&report()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Report` as daemons sent it before `disk_bytes`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct OldReport {
        zone: String,
        layout_version: u64,
        syncing: u64,
        keys: u64,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct OldGossipReply {
        digest: Option<String>,
        history: Option<History>,
        report: OldReport,
    }

    /// A report from a daemon of the previous version reads with no disk figure, and one of
    /// ours reads on such a daemon: gossip keeps working through a rolling upgrade.
    #[test]
    fn reports_read_across_the_added_disk_figure() {
        let old = OldGossipReply {
            digest: Some("d".into()),
            history: None,
            report: OldReport {
                zone: "rack-a".into(),
                layout_version: 4,
                syncing: 2,
                keys: 17,
            },
        };
        let bytes = postcard::to_allocvec(&old).unwrap();
        let read: GossipReply = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            read.report,
            Report {
                zone: "rack-a".into(),
                layout_version: 4,
                syncing: 2,
                keys: 17,
                disk_bytes: 0,
            }
        );
        let new = GossipReply {
            report: Report {
                disk_bytes: 1 << 40,
                ..read.report.clone()
            },
            ..read
        };
        let bytes = postcard::to_allocvec(&new).unwrap();
        assert_eq!(
            postcard::from_bytes::<GossipReply>(&bytes).unwrap().report,
            new.report
        );
        assert_eq!(postcard::from_bytes::<OldGossipReply>(&bytes).unwrap(), old);
    }

    /// A history with no version (only a peer can send one) is neither taken nor merged: every
    /// rule reads the current version, and would panic on it.
    #[test]
    fn a_history_without_versions_is_refused() {
        let membership = Membership::gateway("lb".into(), vec!["a:1".into()], 3);
        let mut empty = History::initial(Vec::new(), 3);
        empty.versions.clear();
        assert_eq!(membership.merge(&empty).ok(), Some(false));
        assert!(membership.history().is_none());
        let real = History::initial(
            vec![Member {
                address: "a:1".into(),
                zone: String::new(),
                weight: 1,
            }],
            3,
        );
        assert_eq!(membership.merge(&real).ok(), Some(true));
        assert_eq!(membership.merge(&empty).ok(), Some(false));
        assert_eq!(membership.version(), 1);
    }
}
