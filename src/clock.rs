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
//! read on the *cluster clock*: this daemon's clock plus the median offset of the peers it
//! has measured, so every balancer stamps in (nearly) the same time base, that of the
//! median storage node, whatever its own clock says. Each offset counts only as far as the
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
/// the Unix epoch: when it began handling the request, and when it answered
/// (`"received,replied"`).
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
#[derive(Debug, Default)]
pub struct PeerClocks {
    peers: Mutex<Peers>,
    /// The median of the peers' best offsets, kept up to date by [`Self::record`], so that
    /// reading the cluster clock costs no lock.
    median_us: AtomicI64,
}

#[derive(Debug, Default)]
struct Peers {
    estimates: HashMap<String, OffsetEstimate>,
    /// Each peer's best offset, moved as near zero as its uncertainty allows
    /// ([`Offset::nearest_zero_us`]), when the median was last computed: the median is
    /// computed again only when one of them changes.
    best_us: HashMap<String, i64>,
    /// The storage nodes of the newest layout, and this daemon's own address when it is one
    /// of them ([`PeerClocks::set_members`]).
    members: Option<(Vec<String>, Option<String>)>,
}

impl Peers {
    /// The median of the members' best offsets, this daemon's own being 0: every daemon takes
    /// it over the same nodes, so that their cluster clocks agree (a median over whichever
    /// nodes each happened to call differs by the gaps between the nodes' clocks). Over every
    /// peer measured until the members are known, or when none of them is measured.
    fn median_us(&self) -> i64 {
        if let Some((members, me)) = &self.members {
            let measured: Vec<i64> = members
                .iter()
                .filter(|member| me.as_ref() != Some(*member))
                .filter_map(|member| self.best_us.get(member).copied())
                .collect();
            if !measured.is_empty() {
                return median_offset_us(measured.into_iter().chain(me.as_ref().map(|_| 0)));
            }
        }
        median_offset_us(self.best_us.values().copied())
    }
}

impl PeerClocks {
    pub fn record(&self, peer: &str, exchange: &Exchange) {
        let mut peers = self.lock();
        let Peers {
            estimates, best_us, ..
        } = &mut *peers;
        let estimate = match estimates.get_mut(peer) {
            Some(estimate) => estimate,
            None => estimates.entry(peer.to_owned()).or_default(),
        };
        estimate.record(exchange);
        let Some(best) = estimate.estimate(exchange.answered_us) else {
            return;
        };
        let nearest_zero = best.nearest_zero_us();
        if best_us.get(peer) == Some(&nearest_zero) {
            return;
        }
        best_us.insert(peer.to_owned(), nearest_zero);
        let median = peers.median_us();
        self.median_us.store(median, Ordering::Relaxed);
    }

    /// The nodes the cluster clock is the median of: the newest layout's storage nodes, and
    /// `me` (offset 0) when this daemon is one of them.
    pub fn set_members(&self, members: Vec<String>, me: Option<String>) {
        let mut peers = self.lock();
        let me = me.filter(|me| members.contains(me));
        peers.members = Some((members, me));
        let median = peers.median_us();
        self.median_us.store(median, Ordering::Relaxed);
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

    /// Microseconds since the epoch on the cluster clock: ours moved by the median offset
    /// of the peers measured (each as near zero as its uncertainty allows).
    pub fn cluster_now_us(&self) -> u64 {
        now_us().saturating_add_signed(self.median_us.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Peers> {
        // Plain estimates: a panic elsewhere cannot leave them half-updated.
        self.peers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The header value a responder sends: its clock when it began handling, and now.
pub fn header_value(received_us: u64) -> String {
    format!("{received_us},{}", now_us())
}

/// Reads a [`CLOCK_HEADER`] value back: `(received_us, replied_us)`.
pub fn parse_header(value: &str) -> Option<(u64, u64)> {
    let (received, replied) = value.split_once(',')?;
    Some((received.trim().parse().ok()?, replied.trim().parse().ok()?))
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

    #[test]
    fn the_cluster_clock_is_the_median_of_the_members_with_oneself_at_zero() {
        // Exchanges that measure `peer` at `offset` µs with no uncertainty to speak of.
        let clocks = PeerClocks::default();
        let measure = |peer: &str, offset: i64| {
            let at = 1_000_000u64;
            let remote = at.saturating_add_signed(offset);
            clocks.record(peer, &exchange(at, remote, remote, at));
        };
        measure("n2", -50_000);
        measure("n3", 0);
        measure("n4", 30_000);
        measure("gone", 90_000);
        // Before the layout is known: every peer measured (lower middle of four).
        assert_eq!(clocks.median_us.load(Ordering::Relaxed), 0);
        // A node among n1..n4 (itself at 0), the removed one left out: median of
        // {0, -50 ms, 0, 30 ms}.
        clocks.set_members(
            ["n1", "n2", "n3", "n4"].map(String::from).to_vec(),
            Some("n1".into()),
        );
        assert_eq!(clocks.median_us.load(Ordering::Relaxed), 0);
        // A balancer over n2..n4: median of {-50 ms, 0, 30 ms}.
        clocks.set_members(["n2", "n3", "n4"].map(String::from).to_vec(), None);
        assert_eq!(clocks.median_us.load(Ordering::Relaxed), 0);
        // Members none of which is measured: every peer measured.
        clocks.set_members(["x", "y"].map(String::from).to_vec(), None);
        assert_eq!(clocks.median_us.load(Ordering::Relaxed), 0);
        clocks.set_members(["n4", "gone"].map(String::from).to_vec(), None);
        assert_eq!(clocks.median_us.load(Ordering::Relaxed), 30_000);
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
            clocks.record(peer, &exchange(t, remote + 50, remote + 50, t + 100));
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
        let value = header_value(42);
        let (received, replied) = parse_header(&value).expect("parses");
        assert_eq!(received, 42);
        assert!(replied >= 42);
        assert_eq!(parse_header("1, 2"), Some((1, 2)));
        for garbage in ["", "1", "a,b", "1,2,3", "-1,2"] {
            assert_eq!(parse_header(garbage), None, "{garbage:?}");
        }
    }
}
