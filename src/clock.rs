//! Wall-clock time across machines: how far each peer's clock is from ours, and a cluster
//! time that every balancer agrees on whatever its own clock says.
//!
//! Two things depend on wall clocks that live on different machines:
//!
//! - **Deadlines.** A replica operation must not be applied after its coordinator stopped
//!   waiting for it (a request held up in a kernel's retransmit queue, a node paused by the
//!   OS): applied late, a write could act on state it was never meant to see. So every
//!   operation carries the moment after which the receiving node refuses it, and that moment
//!   must be read on the *receiver's* clock.
//! - **Entry times.** A write is stamped with the time its client request entered the
//!   cluster ([`crate::version`]), and a blind write supersedes only versions stamped no later
//!   than it. Two balancers whose clocks differ by 50 ms would order a client's two writes,
//!   made 10 ms apart through each of them, the wrong way round.
//!
//! We do not require the machines' clocks to agree. Every response a daemon sends carries
//! two readings of its clock ([`CLOCK_HEADER`]: when it began handling the request, when it
//! answered), and the caller pairs them with its own send and receive times, as NTP does:
//! the peer's offset is known within half the exchange's network delay. Each peer keeps the
//! best of its last few exchanges ([`OffsetEstimate`]), a sample growing less certain with
//! age (clocks drift), and all of them dropped when an exchange contradicts them (a clock
//! was stepped). Deadlines are then
//! translated into the receiver's clock, widened by that uncertainty and a small margin, so a
//! skewed clock neither refuses live operations nor lets late ones through. Entry times are
//! read on the *cluster clock*, which every daemon reads in (nearly) the same time base,
//! that of the median storage node, whatever its own clock says. Each storage node works
//! out where its own measurements put it (its *anchor*: the median of the members' offsets,
//! its own at 0) and sends it with every answer; every daemon then takes the median of the
//! members' anchors, each read through its offset to that member. A median over one's own
//! measurements alone would differ between two daemons by the gaps between the nodes'
//! clocks whenever they had measured different nodes (one started after a member died).
//! Each offset counts only as far as the
//! evidence demands (the value nearest zero within its uncertainty), so daemons whose
//! clocks already agree read them as they are, rather than each adding the noise of its
//! estimates: on a loaded machine a round trip takes milliseconds, and two balancers on it
//! would otherwise stamp a client's successive writes out of order.
//!
//! The estimate's error is half the round trip of the best recent exchange: tens of
//! microseconds on one machine, well under a millisecond on a LAN. What this does not fix:
//! the storage nodes' clocks disagreeing among themselves moves the reference by up to that
//! disagreement when the median node changes. Before its first exchange with any peer a
//! daemon has only its own clock; a balancer therefore measures the nodes before it serves,
//! and stamps no write until it has measured one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

/// Response header with two readings of the responder's wall clock, in microseconds since
/// the Unix epoch: when it began handling the request, and when it answered; then, once the
/// responder has measured a peer, how far ahead of its own clock its measurements put the
/// cluster clock (`"received,replied[,anchor]"`, see [`PeerClocks::anchor_us`]).
pub const CLOCK_HEADER: &str = "dynamite-clock";

/// Exchanges an estimate keeps; the least uncertain one is used. A handful is enough to ride
/// out a burst of slow replies.
const SAMPLES: usize = 8;

/// How fast two clocks may drift apart, in microseconds per second (100 ppm: a quartz
/// clock with no NTP at all; NTP keeps them within a few ppm). A sample's uncertainty grows
/// by this much per second of its age, so an old sample from a quick exchange does not
/// outweigh a fresh one from a slower exchange, and the deadline sent to a peer not heard
/// from for a while is widened by what the clocks may have drifted since.
const DRIFT_US_PER_S: u64 = 100;

/// Added to a translated deadline beyond the estimate's own uncertainty: drift since the
/// sample was taken and the time between the receiver's check and its commit. A node
/// applying an operation this much after its coordinator gave up does no harm (a blind write
/// still supersedes only what is older than it); refusing one the coordinator still awaits
/// would fail a healthy replica.
pub const DEADLINE_MARGIN_US: u64 = 2_000;

/// Widening of a deadline sent to a peer whose clock has never been measured: clocks of
/// machines kept by NTP agree far better than this, and the first exchange replaces it.
pub const UNMEASURED_SKEW_US: u64 = 1_000_000;

/// Microseconds since the Unix epoch on this machine's wall clock: everything in the crate
/// that reads the wall clock (entry times, deadlines, the clock exchanges, leases) reads it
/// here, so that a simulation can put a clock of its own underneath
/// ([`crate::simulation::Hooks::now_us`]).
pub fn now_us() -> u64 {
    match crate::simulation::hooks() {
        Some(hooks) => (hooks.now_us)(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
    }
}

/// A duration in whole microseconds, saturating.
pub fn micros(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// Milliseconds since the Unix epoch on this machine's wall clock.
pub fn now_ms() -> u64 {
    now_us() / 1000
}

/// One request and its answer, each end read on its own clock (microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exchange {
    /// Ours: when the request left.
    pub sent_us: u64,
    /// The peer's: when it began handling the request.
    pub received_us: u64,
    /// The peer's: when it answered.
    pub replied_us: u64,
    /// Ours: when the answer arrived.
    pub answered_us: u64,
}

/// How far a peer's clock is ahead of ours (negative: behind), and how sure we are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    pub offset_us: i64,
    /// The true offset lies within `offset_us ± error_us`.
    pub error_us: u64,
}

impl Offset {
    /// Of the offsets this estimate allows, the one nearest zero: our own clock, moved only as
    /// far as the evidence demands. Machines whose clocks agree (NTP) then read their own
    /// clocks exactly, instead of each adding the noise of its own estimates (two balancers
    /// on one machine would otherwise stamp up to a round trip apart); machines whose clocks
    /// disagree by more than the uncertainty are moved to within it.
    pub fn nearest_zero_us(&self) -> i64 {
        let shrunk = self.offset_us.unsigned_abs().saturating_sub(self.error_us);
        let shrunk = i64::try_from(shrunk).unwrap_or(i64::MAX);
        if self.offset_us < 0 { -shrunk } else { shrunk }
    }

    /// Whether the two estimates can both be true: their intervals overlap. When a new
    /// exchange contradicts the samples kept, the peer's clock (or ours) was stepped.
    fn agrees_with(&self, other: &Offset) -> bool {
        let gap = self.offset_us.abs_diff(other.offset_us);
        gap <= self.error_us.saturating_add(other.error_us)
    }
}

impl Exchange {
    /// Time the request and its answer spent on the network, without the peer's own time;
    /// `None` when the readings contradict each other (a clock stepped mid-exchange).
    pub fn delay_us(&self) -> Option<u64> {
        let round_trip = self.answered_us.checked_sub(self.sent_us)?;
        let at_peer = self.replied_us.checked_sub(self.received_us)?;
        round_trip.checked_sub(at_peer)
    }

    /// The peer's offset as this exchange shows it: the midpoint of what the two legs allow
    /// (NTP's formula); wrong by at most half the delay, whatever the two legs took.
    pub fn offset(&self) -> Option<Offset> {
        let delay = self.delay_us()?;
        let outbound = i128::from(self.received_us) - i128::from(self.sent_us);
        let inbound = i128::from(self.replied_us) - i128::from(self.answered_us);
        let offset = i64::try_from((outbound + inbound) / 2).ok()?;
        Some(Offset {
            offset_us: offset,
            error_us: delay.div_ceil(2),
        })
    }
}

/// A peer's offset from the least uncertain of its last [`SAMPLES`] exchanges, each sample's
/// uncertainty grown by its age ([`DRIFT_US_PER_S`]).
#[derive(Debug, Clone, Default)]
pub struct OffsetEstimate {
    /// Each with the time (ours, microseconds) the exchange ended.
    samples: Vec<(Offset, u64)>,
    next: usize,
}

impl OffsetEstimate {
    /// Adds an exchange that ended at `exchange.answered_us`. One that contradicts every
    /// sample kept (a clock was stepped: NTP corrected it, a VM resumed) replaces them all,
    /// since the old samples no longer describe the clocks.
    pub fn record(&mut self, exchange: &Exchange) {
        let Some(offset) = exchange.offset() else {
            return;
        };
        let at = exchange.answered_us;
        let contradicted = !self.samples.is_empty()
            && self
                .samples
                .iter()
                .all(|(sample, taken)| !aged(sample, *taken, at).agrees_with(&offset));
        if contradicted {
            self.samples.clear();
            self.next = 0;
        }
        if self.samples.len() < SAMPLES {
            self.samples.push((offset, at));
        } else {
            self.samples[self.next] = (offset, at);
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    /// The best estimate as of `now_us` (our clock).
    pub fn estimate(&self, now_us: u64) -> Option<Offset> {
        self.samples
            .iter()
            .map(|(sample, taken)| aged(sample, *taken, now_us))
            .min_by_key(|offset| offset.error_us)
    }
}

/// A sample taken at `taken_us`, its uncertainty grown by what the clocks may have drifted
/// apart until `now_us`.
fn aged(sample: &Offset, taken_us: u64, now_us: u64) -> Offset {
    let age_s = now_us.saturating_sub(taken_us) / 1_000_000;
    Offset {
        offset_us: sample.offset_us,
        error_us: sample
            .error_us
            .saturating_add(age_s.saturating_mul(DRIFT_US_PER_S)),
    }
}

/// `local_deadline_us` (on our clock) as the peer's clock will read it, widened so that it
/// is never earlier than the true moment: the offset's uncertainty plus
/// [`DEADLINE_MARGIN_US`], or [`UNMEASURED_SKEW_US`] for a peer never measured.
pub fn remote_deadline_us(local_deadline_us: u64, offset: Option<Offset>) -> u64 {
    match offset {
        Some(offset) => local_deadline_us
            .saturating_add_signed(offset.offset_us)
            .saturating_add(offset.error_us)
            .saturating_add(DEADLINE_MARGIN_US),
        None => local_deadline_us.saturating_add(UNMEASURED_SKEW_US),
    }
}

/// The median of the measured offsets (the lower middle one of an even count), 0 with none.
pub fn median_offset_us(offsets: impl IntoIterator<Item = i64>) -> i64 {
    let mut offsets: Vec<i64> = offsets.into_iter().collect();
    if offsets.is_empty() {
        return 0;
    }
    offsets.sort_unstable();
    offsets[(offsets.len() - 1) / 2]
}

/// What a daemon knows of its peers' clocks, filled by every exchange its client makes.
#[derive(Debug)]
pub struct PeerClocks {
    peers: Mutex<Peers>,
    /// The cluster clock's offset from ours ([`Peers::cluster_us`]), kept up to date by
    /// [`Self::record`], so that reading the cluster clock costs no lock.
    median_us: AtomicI64,
    /// What this daemon tells its callers its own measurements put the cluster clock at
    /// ([`Peers::anchor_us`]), [`NO_ANCHOR`] before it has measured anyone.
    anchor_us: AtomicI64,
}

/// [`PeerClocks::anchor_us`] before this daemon has measured a peer.
const NO_ANCHOR: i64 = i64::MIN;

/// How long a member's offset and anchor count after its last answer. A member silent for
/// longer is down or cut off, and counting it would make the cluster clock depend on who
/// happened to measure it before it went (a daemon started since never did). Every member
/// is gossiped with twice a second, so a live one is never near this.
const FRESH_FOR_US: u64 = 10_000_000;

/// How often the cluster clock is worked out again while nothing else changes, so that a
/// member falling silent stops counting.
const RECHECK_US: u64 = 1_000_000;

#[derive(Debug, Default)]
struct Peers {
    estimates: HashMap<String, OffsetEstimate>,
    /// Each peer's best offset, moved as near zero as its uncertainty allows
    /// ([`Offset::nearest_zero_us`]): the cluster clock is worked out again when one of
    /// them or an anchor changes, and otherwise once every [`RECHECK_US`].
    best_us: HashMap<String, i64>,
    /// The anchor each peer sent with its last answer: how far ahead of its own clock its
    /// measurements put the cluster clock ([`CLOCK_HEADER`]).
    anchors_us: HashMap<String, i64>,
    /// When (our clock) each peer last answered.
    heard_us: HashMap<String, u64>,
    /// When the cluster clock was last worked out (our clock).
    published_us: u64,
    /// The storage nodes of the newest layout, and this daemon's own address when it is one
    /// of them ([`PeerClocks::set_members`]).
    members: Option<(Vec<String>, Option<String>)>,
}

impl Peers {
    /// The members this daemon counts as of `now_us`, itself left out, and whether it is
    /// one: the newest layout's storage nodes it has measured that answered within
    /// [`FRESH_FOR_US`] (all it measured when none did); every peer measured until the
    /// members are known, or when none of them is measured.
    fn counted(&self, now_us: u64) -> (Vec<&String>, bool) {
        if let Some((members, me)) = &self.members {
            let measured: Vec<&String> = members
                .iter()
                .filter(|member| me.as_ref() != Some(*member))
                .filter(|member| self.best_us.contains_key(*member))
                .collect();
            if !measured.is_empty() {
                return (self.prefer_fresh(measured, now_us), me.is_some());
            }
        }
        (
            self.prefer_fresh(self.best_us.keys().collect(), now_us),
            false,
        )
    }

    /// Those of `measured` that answered within [`FRESH_FOR_US`] of `now_us`, or all of
    /// them when none did (a daemon cut off from everyone keeps its last view).
    fn prefer_fresh<'a>(&self, measured: Vec<&'a String>, now_us: u64) -> Vec<&'a String> {
        let live: Vec<&String> = measured
            .iter()
            .copied()
            .filter(|peer| {
                self.heard_us
                    .get(*peer)
                    .is_some_and(|heard| heard.saturating_add(FRESH_FOR_US) >= now_us)
            })
            .collect();
        if live.is_empty() { measured } else { live }
    }

    /// Where this daemon's own measurements put the cluster clock (ahead of its own): the
    /// median of the members' best offsets, its own being 0 when it is one, or `None` before
    /// it has measured anyone. It is what a node tells its callers, and it rests on real
    /// clocks only: no daemon's anchor depends on another's.
    fn anchor_us(&self, now_us: u64) -> Option<i64> {
        let (counted, me) = self.counted(now_us);
        if counted.is_empty() {
            return None;
        }
        let offsets = counted.iter().filter_map(|peer| self.best_us.get(*peer));
        Some(median_offset_us(offsets.copied().chain(me.then_some(0))))
    }

    /// The cluster clock, ahead of ours: the median of the members' anchors, each read
    /// through our offset to that member, and ours (`own`) when we are one. A median over our own
    /// measurements alone depends on which members we measured (a daemon that started after
    /// a member died never measured it), and with clocks 100 ms apart two daemons would
    /// stamp 100 ms apart; the members' anchors agree with each other unless a member's own
    /// view is short of one, and the median outvotes a few that are.
    fn cluster_us(&self, now_us: u64, own: Option<i64>) -> i64 {
        let (counted, me) = self.counted(now_us);
        let views: Vec<i64> = counted
            .iter()
            .filter_map(|peer| {
                let offset = self.best_us.get(*peer)?;
                let anchor = self.anchors_us.get(*peer)?;
                Some(offset.saturating_add(*anchor))
            })
            .chain(own.filter(|_| me))
            .collect();
        if views.is_empty() {
            return own.unwrap_or(0);
        }
        median_offset_us(views)
    }

    fn publish(&mut self, clocks: &PeerClocks, now_us: u64) {
        self.published_us = now_us;
        let own = self.anchor_us(now_us);
        clocks
            .anchor_us
            .store(own.unwrap_or(NO_ANCHOR), Ordering::Relaxed);
        clocks
            .median_us
            .store(self.cluster_us(now_us, own), Ordering::Relaxed);
    }
}

impl Default for PeerClocks {
    fn default() -> Self {
        PeerClocks {
            peers: Mutex::default(),
            median_us: AtomicI64::new(0),
            anchor_us: AtomicI64::new(NO_ANCHOR),
        }
    }
}

impl PeerClocks {
    /// Records an exchange with `peer`, and the anchor its answer carried.
    pub fn record(&self, peer: &str, exchange: &Exchange, anchor_us: Option<i64>) {
        let mut peers = self.lock();
        let now = exchange.answered_us;
        let Peers {
            estimates,
            best_us,
            anchors_us,
            heard_us,
            published_us,
            ..
        } = &mut *peers;
        match heard_us.get_mut(peer) {
            Some(heard) => *heard = now,
            None => {
                heard_us.insert(peer.to_owned(), now);
            }
        }
        let due = now >= published_us.saturating_add(RECHECK_US);
        let anchor_changed = match (anchor_us, anchors_us.get_mut(peer)) {
            (Some(anchor), Some(kept)) => std::mem::replace(kept, anchor) != anchor,
            (Some(anchor), None) => anchors_us.insert(peer.to_owned(), anchor).is_none(),
            (None, _) => anchors_us.remove(peer).is_some(),
        };
        let estimate = match estimates.get_mut(peer) {
            Some(estimate) => estimate,
            None => estimates.entry(peer.to_owned()).or_default(),
        };
        estimate.record(exchange);
        let best_changed = match estimate.estimate(now) {
            Some(best) => {
                let nearest_zero = best.nearest_zero_us();
                match best_us.get_mut(peer) {
                    Some(kept) => std::mem::replace(kept, nearest_zero) != nearest_zero,
                    None => best_us.insert(peer.to_owned(), nearest_zero).is_none(),
                }
            }
            None => false,
        };
        if anchor_changed || best_changed || due {
            peers.publish(self, now);
        }
    }

    /// The nodes the cluster clock is the median of: the newest layout's storage nodes, and
    /// `me` (offset 0) when this daemon is one of them.
    pub fn set_members(&self, members: Vec<String>, me: Option<String>) {
        let mut peers = self.lock();
        let me = me.filter(|me| members.contains(me));
        peers.members = Some((members, me));
        peers.publish(self, now_us());
    }

    /// What this daemon's own measurements put the cluster clock at, ahead of its own clock
    /// (see [`Peers::anchor_us`]); `None` before it has measured a peer. Sent with every
    /// answer ([`header_value`]).
    pub fn anchor_us(&self) -> Option<i64> {
        let anchor = self.anchor_us.load(Ordering::Relaxed);
        (anchor != NO_ANCHOR).then_some(anchor)
    }

    /// The peer's offset now, if it was ever measured.
    pub fn offset(&self, peer: &str) -> Option<Offset> {
        let now = now_us();
        self.lock().estimates.get(peer)?.estimate(now)
    }

    /// How many peers have been measured.
    pub fn measured(&self) -> usize {
        self.lock().best_us.len()
    }

    /// Microseconds since the epoch on the cluster clock: ours moved by the median of the
    /// members' anchors (see [`Peers::cluster_us`]).
    pub fn cluster_now_us(&self) -> u64 {
        now_us().saturating_add_signed(self.median_us.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        // Plain estimates: a panic elsewhere cannot leave them half-updated.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The header value a responder sends: its clock when it began handling, now, and its
/// anchor ([`PeerClocks::anchor_us`]) when it has one.
pub fn header_value(received_us: u64, anchor_us: Option<i64>) -> String {
    match anchor_us {
        Some(anchor) => format!("{received_us},{},{anchor}", now_us()),
        None => format!("{received_us},{}", now_us()),
    }
}

/// What a [`CLOCK_HEADER`] value says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockReading {
    pub received_us: u64,
    pub replied_us: u64,
    pub anchor_us: Option<i64>,
}

/// Reads a [`CLOCK_HEADER`] value back.
pub fn parse_header(value: &str) -> Option<ClockReading> {
    let mut fields = value.split(',').map(str::trim);
    let received_us = fields.next()?.parse().ok()?;
    let replied_us = fields.next()?.parse().ok()?;
    let anchor_us = match fields.next() {
        Some(anchor) => Some(anchor.parse().ok()?),
        None => None,
    };
    if fields.next().is_some() {
        return None;
    }
    Some(ClockReading {
        received_us,
        replied_us,
        anchor_us,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(sent: u64, received: u64, replied: u64, answered: u64) -> Exchange {
        Exchange {
            sent_us: sent,
            received_us: received,
            replied_us: replied,
            answered_us: answered,
        }
    }

    #[test]
    fn offset_and_delay_table() {
        // (exchange, expected offset, expected error)
        let cases = [
            // Same clock, 100 µs each way, 50 µs at the peer.
            (exchange(1_000, 1_100, 1_150, 1_250), Some((0, 100))),
            // Peer 5 s ahead.
            (
                exchange(1_000, 5_001_100, 5_001_150, 1_250),
                Some((5_000_000, 100)),
            ),
            // Peer 3 ms behind.
            (exchange(10_000, 7_100, 7_150, 10_250), Some((-3_000, 100))),
            // Lopsided legs (900 out, 100 back): the estimate is off by 400, within the error.
            (exchange(0, 900, 900, 1_000), Some((400, 500))),
            // A clock stepped backwards during the exchange: no estimate.
            (exchange(1_000, 1_100, 1_050, 1_250), None),
            (exchange(1_000, 1_100, 1_150, 900), None),
            // The peer claims to have spent longer than the whole round trip.
            (exchange(1_000, 1_000, 2_000, 1_500), None),
        ];
        for (exchange, expected) in cases {
            let got = exchange.offset().map(|o| (o.offset_us, o.error_us));
            assert_eq!(got, expected, "{exchange:?}");
        }
    }

    #[test]
    fn the_least_uncertain_recent_exchange_wins() {
        let mut estimate = OffsetEstimate::default();
        assert_eq!(estimate.estimate(0), None);
        // A slow exchange, then a quick one: the quick one is trusted.
        estimate.record(&exchange(0, 2_000, 2_000, 10_000)); // offset -3000 ± 5000
        estimate.record(&exchange(20_000, 20_550, 20_550, 20_100)); // offset 500 ± 50
        let quick = Offset {
            offset_us: 500,
            error_us: 50,
        };
        assert_eq!(estimate.estimate(20_100), Some(quick));
        // Ten minutes later, with nothing heard since, the quick sample is 60 ms less sure
        // (the clocks may have drifted apart by that much).
        let later = 20_100 + 600_000_000;
        assert_eq!(
            estimate.estimate(later),
            Some(Offset {
                error_us: 50 + 600 * DRIFT_US_PER_S,
                ..quick
            })
        );
        // A slower exchange made then is trusted over the old quick one.
        estimate.record(&exchange(
            later,
            later + 1_500,
            later + 1_500,
            later + 2_000,
        ));
        assert_eq!(
            estimate.estimate(later + 2_000),
            Some(Offset {
                offset_us: 500,
                error_us: 1_000
            })
        );
    }

    /// A peer's clock stepped by a second (NTP corrected it, a VM resumed): the first
    /// exchange that contradicts every sample kept replaces them, so deadlines follow the
    /// new clock at once.
    #[test]
    fn a_stepped_clock_is_followed_at_once() {
        let mut estimate = OffsetEstimate::default();
        for i in 0..SAMPLES as u64 {
            let t = i * 10_000;
            estimate.record(&exchange(t, t + 50, t + 50, t + 100)); // offset 0 ± 50
        }
        estimate.record(&exchange(200_000, 1_200_100, 1_200_100, 200_200));
        assert_eq!(
            estimate.estimate(200_200),
            Some(Offset {
                offset_us: 1_000_000,
                error_us: 100
            })
        );
        // An exchange consistent with the kept samples (a slow one) adds to them instead.
        estimate.record(&exchange(300_000, 1_300_000, 1_300_000, 302_000));
        assert_eq!(
            estimate.estimate(302_000).map(|o| o.offset_us),
            Some(1_000_000)
        );
    }

    #[test]
    fn deadlines_are_translated_and_never_earlier_than_the_true_moment() {
        let ahead = Offset {
            offset_us: 5_000_000,
            error_us: 300,
        };
        let behind = Offset {
            offset_us: -2_000,
            error_us: 0,
        };
        let cases = [
            (1_000_000, Some(ahead), 6_000_000 + 300 + DEADLINE_MARGIN_US),
            (1_000_000, Some(behind), 998_000 + DEADLINE_MARGIN_US),
            (1_000_000, None, 1_000_000 + UNMEASURED_SKEW_US),
            (u64::MAX - 1, Some(ahead), u64::MAX),
        ];
        for (local, offset, expected) in cases {
            assert_eq!(remote_deadline_us(local, offset), expected, "{offset:?}");
        }
    }

    #[test]
    fn nearest_zero_table() {
        let cases = [
            (0, 100, 0),
            (80, 100, 0),
            (-80, 100, 0),
            (100, 100, 0),
            (5_000_000, 300, 4_999_700),
            (-5_000_000, 300, -4_999_700),
        ];
        for (offset_us, error_us, expected) in cases {
            let offset = Offset {
                offset_us,
                error_us,
            };
            assert_eq!(offset.nearest_zero_us(), expected, "{offset:?}");
        }
    }

    /// Exchanges that measure `peer` at `offset` µs with no uncertainty to speak of, its
    /// answer carrying `anchor`.
    fn measure(clocks: &PeerClocks, peer: &str, offset: i64, anchor: Option<i64>) {
        let at = 1_000_000u64;
        let remote = at.saturating_add_signed(offset);
        clocks.record(peer, &exchange(at, remote, remote, at), anchor);
    }

    fn cluster_us(clocks: &PeerClocks) -> i64 {
        clocks.median_us.load(Ordering::Relaxed)
    }

    #[test]
    fn the_anchor_is_the_median_of_the_members_with_oneself_at_zero() {
        let clocks = PeerClocks::default();
        assert_eq!(clocks.anchor_us(), None);
        measure(&clocks, "n2", -50_000, None);
        measure(&clocks, "n3", 0, None);
        measure(&clocks, "n4", 30_000, None);
        measure(&clocks, "gone", 90_000, None);
        // Before the layout is known: every peer measured (lower middle of four).
        assert_eq!(clocks.anchor_us(), Some(0));
        // A node among n1..n4 (itself at 0), the removed one left out: median of
        // {0, -50 ms, 0, 30 ms}.
        clocks.set_members(
            ["n1", "n2", "n3", "n4"].map(String::from).to_vec(),
            Some("n1".into()),
        );
        assert_eq!(clocks.anchor_us(), Some(0));
        // A balancer over n2..n4: median of {-50 ms, 0, 30 ms}.
        clocks.set_members(["n2", "n3", "n4"].map(String::from).to_vec(), None);
        assert_eq!(clocks.anchor_us(), Some(0));
        // Members none of which is measured: every peer measured.
        clocks.set_members(["x", "y"].map(String::from).to_vec(), None);
        assert_eq!(clocks.anchor_us(), Some(0));
        clocks.set_members(["n4", "gone"].map(String::from).to_vec(), None);
        assert_eq!(clocks.anchor_us(), Some(30_000));
        // Nobody sent an anchor: the cluster clock is our own anchor.
        assert_eq!(cluster_us(&clocks), 30_000);
    }

    /// The simulation's two findings (seeds 16593410812772747330 and 7953218549841756565):
    /// nodes' clocks 100 ms apart, and two daemons that measured different members (one
    /// started after a member died, so it never measured it) still stamp in one time base.
    #[test]
    fn daemons_that_measured_different_members_agree_on_the_cluster_clock() {
        // True clocks, ahead of the simulation's time: n3 is dead by the time the late
        // daemon starts.
        let skews = [
            ("n1", 99_000i64),
            ("n2", -45_000),
            ("n3", -5_000),
            ("n4", 64_000),
        ];
        let members: Vec<String> = skews.iter().map(|(n, _)| n.to_string()).collect();
        // Each member's anchor: the median over all four (each measured all of them while
        // they lived), with itself at 0. The lower middle of the four clocks is n3's.
        let anchor = |me: i64| -5_000 - me;
        // A daemon at `own` µs ahead that measured `measured`, the members answering with
        // their anchors.
        let daemon = |own: i64, measured: &[&str], me: Option<&str>| {
            let clocks = PeerClocks::default();
            clocks.set_members(members.clone(), me.map(String::from));
            for (peer, skew) in skews {
                if measured.contains(&peer) && Some(peer) != me {
                    measure(&clocks, peer, skew - own, Some(anchor(skew)));
                }
            }
            own + cluster_us(&clocks)
        };
        let early_balancer = daemon(-18_000, &["n1", "n2", "n3", "n4"], None);
        assert_eq!(early_balancer, -5_000);
        // A node that is not yet a member (joining), 59 ms behind, started after n3 died:
        // its own measurements would put the clock at n4's (+64 ms); the members' anchors
        // say n3's.
        let joining = daemon(-59_000, &["n1", "n2", "n4"], None);
        assert_eq!(joining, -5_000);
        // A member restarted after n3 died: its own anchor is off, the others' outvote it.
        let restarted = daemon(99_000, &["n1", "n2", "n4"], Some("n1"));
        assert_eq!(restarted, -5_000);
        // A member that measured everyone.
        assert_eq!(
            daemon(-45_000, &["n1", "n2", "n3", "n4"], Some("n2")),
            -5_000
        );
    }

    /// A member that stopped answering stops counting after [`FRESH_FOR_US`], so daemons
    /// that measured it before it went and daemons started since agree; a daemon that
    /// hears from no member keeps its last view.
    #[test]
    fn a_silent_member_stops_counting() {
        let clocks = PeerClocks::default();
        clocks.set_members(["a", "b", "c"].map(String::from).to_vec(), None);
        let at = |t: u64, peer: &str, offset: i64| {
            let remote = t.saturating_add_signed(offset);
            clocks.record(peer, &exchange(t, remote, remote, t), Some(0));
        };
        at(1_000_000, "a", 10_000);
        at(1_000_000, "b", 20_000);
        at(1_000_000, "c", 90_000);
        assert_eq!(cluster_us(&clocks), 20_000);
        // `c` falls silent; `a` and `b` go on answering. Within the window it still counts.
        at(9_000_000, "a", 10_000);
        at(9_000_000, "b", 20_000);
        assert_eq!(cluster_us(&clocks), 20_000);
        // Past it, the median is of `a` and `b` (the lower one).
        at(12_000_000, "a", 10_000);
        at(12_000_000, "b", 20_000);
        assert_eq!(cluster_us(&clocks), 10_000);
        // `c` answers again: it counts again.
        at(13_000_000, "c", 90_000);
        assert_eq!(cluster_us(&clocks), 20_000);
    }

    #[test]
    fn an_anchor_no_longer_sent_no_longer_counts() {
        let clocks = PeerClocks::default();
        clocks.set_members(["a", "b"].map(String::from).to_vec(), None);
        measure(&clocks, "a", 10_000, Some(5_000));
        measure(&clocks, "b", 20_000, Some(-5_000));
        // Views 15 ms and 15 ms.
        assert_eq!(cluster_us(&clocks), 15_000);
        // `b` restarted and has measured nobody yet: only `a`'s view counts.
        measure(&clocks, "b", 20_000, None);
        measure(&clocks, "a", 10_000, Some(7_000));
        assert_eq!(cluster_us(&clocks), 17_000);
    }

    #[test]
    fn median_table() {
        assert_eq!(median_offset_us([]), 0);
        assert_eq!(median_offset_us([7]), 7);
        assert_eq!(median_offset_us([-5, 100]), -5);
        assert_eq!(median_offset_us([3, -1_000_000, 5]), 3);
        assert_eq!(median_offset_us([10, 1, 5, 1_000_000]), 5);
    }

    /// The cluster clock follows the median peer: two daemons whose own clocks differ, each
    /// having measured the same three nodes, read (nearly) the same time.
    #[test]
    fn the_cluster_clock_follows_the_median_peer() {
        let clocks = PeerClocks::default();
        let t = now_us();
        // Nodes 10 s, 11 s and 500 s ahead of us; the one 500 s ahead is an outlier.
        for (peer, ahead_s) in [("a", 10u64), ("b", 11), ("c", 500)] {
            let remote = t + ahead_s * 1_000_000;
            clocks.record(peer, &exchange(t, remote + 50, remote + 50, t + 100), None);
        }
        let cluster = clocks.cluster_now_us();
        let expected = now_us() + 11_000_000;
        assert!(
            cluster.abs_diff(expected) < 1_000_000,
            "cluster clock {cluster}, expected about {expected}"
        );
        assert_eq!(clocks.offset("b").map(|o| o.offset_us), Some(11_000_000));
        assert_eq!(clocks.offset("unknown"), None);
        assert_eq!(clocks.measured(), 3);
    }

    #[test]
    fn header_round_trip() {
        let value = header_value(42, None);
        let reading = parse_header(&value).expect("parses");
        assert_eq!(reading.received_us, 42);
        assert!(reading.replied_us >= 42);
        assert_eq!(reading.anchor_us, None);
        let value = header_value(42, Some(-1_500));
        assert_eq!(parse_header(&value).and_then(|r| r.anchor_us), Some(-1_500));
        let reading = |received_us, replied_us, anchor_us| {
            Some(ClockReading {
                received_us,
                replied_us,
                anchor_us,
            })
        };
        assert_eq!(parse_header("1, 2"), reading(1, 2, None));
        assert_eq!(parse_header("1,2,-3"), reading(1, 2, Some(-3)));
        for garbage in ["", "1", "a,b", "1,2,x", "1,2,3,4", "-1,2", "1,2,"] {
            assert_eq!(parse_header(garbage), None, "{garbage:?}");
        }
    }
}
