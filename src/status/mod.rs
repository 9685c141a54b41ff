//! The status page both daemons serve on `GET /`, for an operator's second screen.
//!
//! The page (`page.html`: markup, CSS and a small script, nothing loaded from anywhere) asks
//! the daemon for [`JSON_PATH`] every 2 s and draws it: the layout version and any
//! transition, every node with its zone, state, share of the partitions, keys, disk and, while
//! a transition runs, how far it is in receiving its new partitions; and two small charts of
//! the requests this daemon served over the last [`HISTORY`].
//!
//! The node figures are `cluster.status()`'s view ([`Membership::status`]: what each node
//! last said of itself in gossip, and whether it was heard from lately), with what the
//! layouts tell: each node's share and the partitions a transition gives it. The charts come
//! from a [`Sampler`]: every [`SAMPLE_INTERVAL`] a daemon's task takes a snapshot of its
//! request-latency histograms, summed over methods, and keeps the last [`HISTORY`] of them;
//! the difference of two consecutive snapshots is the histogram of what happened in between,
//! from which a rate, p50 and p99 are read.
//!
//! Both paths go through the daemon's credential check like every path but `/health`: a
//! daemon with a password asks the browser for it, and the page's own requests then carry it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use serde::Serialize;

use crate::layout::{Layout, PARTITIONS};
use crate::membership::status::ClusterStatus;
use crate::membership::{Membership, Report, Role};
use crate::telemetry::HistogramSnapshot;

/// The page's markup, style and script, with [`NONCE`] where each response puts its own.
const PAGE: &str = include_str!("page.html");
/// Stands for the response's nonce in [`PAGE`].
const NONCE: &str = "{{nonce}}";
/// Where the page reads its figures, relative to the page.
pub const JSON_PATH: &str = "/status.json";
/// How often a daemon takes a snapshot of its request figures.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How far back the charts go.
pub const HISTORY: Duration = Duration::from_secs(600);
/// The shortest stretch since the last snapshot that the charts show as a point of its own
/// (shorter, its rate and quantiles would be too noisy to be worth it).
const LIVE_EDGE_MIN: Duration = Duration::from_secs(1);

/// What the page may load: its own inline style and script (by this response's nonce) and
/// requests to the daemon itself; nothing from any other origin, and no framing.
fn content_security_policy(nonce: &str) -> String {
    format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `GET /`: the page, with a nonce of its own in its policy.
pub fn page_response() -> Response<Full<Bytes>> {
    // Not a secret: it only has to be unknown in advance to whoever could inject markup,
    // and the page shows nothing as markup anyway (its script writes text only).
    let nonce = format!(
        "{:016x}{:016x}",
        crate::random::random_u64(),
        crate::random::random_u64()
    );
    let mut response = Response::new(Full::new(Bytes::from(PAGE.replace(NONCE, &nonce))));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(policy) = HeaderValue::from_str(&content_security_policy(&nonce)) {
        headers.insert("content-security-policy", policy);
    }
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}

/// `GET /status.json`.
pub fn json_response(json: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(json)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// Snapshots of a daemon's request histogram (summed over the methods [`counts`] keeps),
/// the last [`HISTORY`] of them.
#[derive(Debug, Default)]
pub struct Sampler {
    samples: Mutex<VecDeque<(Instant, HistogramSnapshot)>>,
}

impl Sampler {
    /// Keeps `requests`, taken `at`, and forgets what is older than [`HISTORY`] before it.
    pub fn record(&self, at: Instant, requests: HistogramSnapshot) {
        let mut samples = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        samples.push_back((at, requests));
        while samples
            .front()
            .is_some_and(|(taken, _)| at.saturating_duration_since(*taken) > HISTORY)
        {
            samples.pop_front();
        }
    }

    /// The chart points up to `now`, where the histogram reads `live`: one per interval
    /// between snapshots, and one for the stretch since the last if it is long enough.
    fn points(&self, now: Instant, live: HistogramSnapshot) -> Vec<Point> {
        let mut samples: Vec<(Instant, HistogramSnapshot)> = self
            .samples
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect();
        if samples
            .last()
            .is_some_and(|(taken, _)| now.saturating_duration_since(*taken) >= LIVE_EDGE_MIN)
        {
            samples.push((now, live));
        }
        points(&samples, now)
    }
}

/// Takes a snapshot of `requests` (a daemon's request histograms by method) into `sampler`
/// every [`SAMPLE_INTERVAL`], until the task is dropped.
pub async fn sample_forever(
    sampler: &Sampler,
    requests: impl Fn() -> Vec<(String, HistogramSnapshot)>,
) {
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        sampler.record(Instant::now(), requests_of(&requests()));
    }
}

/// Whether calls of `method` count as requests on the charts: what clients and coordinators
/// ask (`put`, `get`, replica batches, `local.*`, `stats`...), not the cluster's own
/// background chatter (`cluster.gossip` every 500 ms from every peer, anti-entropy's
/// `node.*`, and the other `cluster.*` calls).
fn counts(method: &str) -> bool {
    !(method.starts_with("cluster.") || method.starts_with("node."))
}

/// The histograms of the methods that [`counts`] keeps, summed.
fn requests_of(series: &[(String, HistogramSnapshot)]) -> HistogramSnapshot {
    let mut sum = HistogramSnapshot::default();
    for (method, snapshot) in series {
        if counts(method) {
            sum.add(snapshot);
        }
    }
    sum
}

/// One interval of the request charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Point {
    /// Seconds before now that the interval ended.
    age_s: f64,
    /// Requests per second over the interval.
    rate: f64,
    /// Quantiles of the interval's request times; none without requests.
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

/// The intervals between consecutive `samples` (oldest first), seen from `now`.
fn points(samples: &[(Instant, HistogramSnapshot)], now: Instant) -> Vec<Point> {
    let ms = |seconds: Option<f64>| seconds.map(|s| s * 1000.0);
    samples
        .windows(2)
        .filter_map(|pair| {
            let [(start, before), (end, after)] = pair else {
                return None;
            };
            let seconds = end.saturating_duration_since(*start).as_secs_f64();
            if seconds <= 0.0 {
                return None;
            }
            let during = after.since(before);
            Some(Point {
                age_s: now.saturating_duration_since(*end).as_secs_f64(),
                rate: during.count() as f64 / seconds,
                p50_ms: ms(during.quantile(0.5)),
                p99_ms: ms(during.quantile(0.99)),
            })
        })
        .collect()
}

/// One node as the page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct NodeView {
    address: String,
    zone: String,
    /// `up` or `down`, as `cluster.status()` says.
    state: &'static str,
    layout_version: u64,
    keys: u64,
    disk_bytes: u64,
    /// Its share of the partitions' replicas in the newest version (0..=1).
    share: f64,
    /// The same in the oldest live version, while a transition runs.
    share_before: Option<f64>,
    /// Partitions the newest version gives it that it did not hold (0 outside transitions),
    to_receive: u64,
    /// ... of which it still has to receive this many (as it last said).
    syncing: u64,
    /// Whether it has every partition of the newest version.
    synced: bool,
}

/// The layouts' side of the view: the live versions' layouts (oldest first, with their
/// numbers) and the highest version each node said it has received in full.
struct Layouts<'a> {
    live: &'a [(u64, Layout)],
    synced: &'a BTreeMap<String, u64>,
}

/// A server's share of the partitions' replicas in `layout`.
fn share(layout: &Layout, address: &str) -> f64 {
    let slots = PARTITIONS * layout.replicas();
    match layout.servers().iter().position(|s| s == address) {
        Some(index) if slots > 0 => layout.replica_counts()[index] as f64 / slots as f64,
        _ => 0.0,
    }
}

/// Every node of `status` with its share and, during a transition, its progress.
fn node_views(status: &ClusterStatus, layouts: &Layouts) -> Vec<NodeView> {
    let newest = layouts.live.last();
    let oldest = layouts.live.first();
    let layouts_only: Vec<Layout> = layouts.live.iter().map(|(_, l)| l.clone()).collect();
    status
        .nodes
        .iter()
        .map(|node| {
            let to_receive = if status.transition {
                crate::membership::history::partitions_to_receive(&layouts_only, &node.address)
                    .len() as u64
            } else {
                0
            };
            let synced = to_receive == 0
                || layouts.synced.get(&node.address).copied().unwrap_or(0) >= status.version;
            NodeView {
                address: node.address.clone(),
                zone: node.zone.clone(),
                state: if node.up { "up" } else { "down" },
                layout_version: node.report.layout_version,
                keys: node.report.keys,
                disk_bytes: node.report.disk_bytes,
                share: newest.map_or(0.0, |(_, l)| share(l, &node.address)),
                share_before: oldest
                    .filter(|_| status.transition)
                    .map(|(_, l)| share(l, &node.address)),
                to_receive,
                syncing: if synced { 0 } else { node.report.syncing },
                synced,
            }
        })
        .collect()
}

/// The layout side of the document.
#[derive(Debug, Serialize)]
struct ClusterView {
    version: u64,
    read_version: u64,
    transition: bool,
    /// N: replicas per partition in the newest version.
    replicas: usize,
    partitions: usize,
}

/// What `GET /status.json` answers.
#[derive(Debug, Serialize)]
struct Document {
    /// `node` or `balancer`, and its name in the cluster.
    role: &'static str,
    name: String,
    version: &'static str,
    /// `None` until the daemon has a layout; `problem` says why.
    cluster: Option<ClusterView>,
    problem: Option<String>,
    nodes: Vec<NodeView>,
    sample_interval_s: u64,
    history_s: u64,
    requests: Vec<Point>,
}

/// The status document of a daemon: `membership` and `own` (what it says of itself) for the
/// nodes, `sampler` and `requests` (its request histograms by method now) for the charts.
pub fn json(
    membership: &Membership,
    own: &Report,
    sampler: &Sampler,
    requests: &[(String, HistogramSnapshot)],
) -> String {
    let mut document = Document {
        role: match membership.role {
            Role::Node => "node",
            Role::Gateway => "balancer",
        },
        name: membership.me.clone(),
        version: env!("CARGO_PKG_VERSION"),
        cluster: None,
        problem: None,
        nodes: Vec::new(),
        sample_interval_s: SAMPLE_INTERVAL.as_secs(),
        history_s: HISTORY.as_secs(),
        requests: sampler.points(Instant::now(), requests_of(requests)),
    };
    match (membership.status(own), membership.routing()) {
        (Ok(status), Some(routing)) => {
            let layouts = Layouts {
                live: &routing.layouts,
                synced: &routing.history.sync,
            };
            document.nodes = node_views(&status, &layouts);
            document.cluster = Some(ClusterView {
                version: status.version,
                read_version: status.read_version,
                transition: status.transition,
                replicas: routing.current().replicas(),
                partitions: PARTITIONS,
            });
        }
        (Err(error), _) => document.problem = Some(error.fault_string()),
        (Ok(_), None) => document.problem = Some("no layout yet".into()),
    }
    serde_json::to_string(&document).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Member;
    use crate::membership::status::NodeStatus;
    use crate::telemetry::LATENCY_BUCKETS;

    /// A histogram with `counts` requests in the given buckets.
    fn histogram(counts: &[(usize, u64)]) -> HistogramSnapshot {
        let mut all = vec![0; LATENCY_BUCKETS.len() + 1];
        for &(bucket, count) in counts {
            all[bucket] = count;
        }
        HistogramSnapshot {
            counts: all,
            sum_us: 0,
        }
    }

    #[test]
    fn points_are_rates_and_quantiles_of_each_interval() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        // Samples as (seconds, buckets), now, and the points expected as (age_s, rate, p50_ms).
        type Case = (
            Vec<(u64, Vec<(usize, u64)>)>,
            u64,
            Vec<(f64, f64, Option<f64>)>,
        );
        let cases: [Case; 4] = [
            // One sample: no interval yet.
            (vec![(0, vec![])], 3, vec![]),
            // 50 requests in (1 ms, 2.5 ms] over 5 s: 10/s, median half way.
            (
                vec![(0, vec![]), (5, vec![(4, 50)])],
                5,
                vec![(0.0, 10.0, Some(1.75))],
            ),
            // A quiet interval has a rate of 0 and no quantiles.
            (
                vec![(0, vec![(4, 50)]), (5, vec![(4, 50)]), (10, vec![(4, 60)])],
                12,
                vec![(7.0, 0.0, None), (2.0, 2.0, Some(1.75))],
            ),
            // A daemon's histogram only grows; a smaller one (a restart) counts as nothing.
            (
                vec![(0, vec![(4, 50)]), (10, vec![(4, 20)])],
                10,
                vec![(0.0, 0.0, None)],
            ),
        ];
        for (samples, now, expected) in cases {
            let samples: Vec<(Instant, HistogramSnapshot)> = samples
                .iter()
                .map(|(s, counts)| (at(*s), histogram(counts)))
                .collect();
            let got = points(&samples, at(now));
            assert_eq!(got.len(), expected.len(), "{got:?}");
            for (point, (age_s, rate, p50_ms)) in got.iter().zip(&expected) {
                assert!((point.age_s - age_s).abs() < 1e-9, "{point:?}");
                assert!((point.rate - rate).abs() < 1e-9, "{point:?}");
                match p50_ms {
                    Some(p50) => assert!(close(point.p50_ms, *p50), "{point:?}"),
                    None => assert_eq!(point.p50_ms, None, "{point:?}"),
                }
                assert_eq!(point.p99_ms.is_some(), p50_ms.is_some(), "{point:?}");
            }
        }
    }

    #[test]
    fn the_sampler_keeps_ten_minutes_and_adds_a_live_edge() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        for i in 0..=200u64 {
            sampler.record(t0 + SAMPLE_INTERVAL * i as u32, histogram(&[(4, i * 5)]));
        }
        let last = t0 + SAMPLE_INTERVAL * 200;
        // 121 snapshots: 120 intervals of 5 s, one request a second each.
        let points = sampler.points(last, histogram(&[(4, 1000)]));
        assert_eq!(points.len(), 120);
        assert!(points.iter().all(|p| (p.rate - 1.0).abs() < 1e-9));
        assert!((points[0].age_s - 595.0).abs() < 1e-9);
        // Two seconds later, 8 more requests: a live point at 4/s.
        let points = sampler.points(last + Duration::from_secs(2), histogram(&[(4, 1008)]));
        assert_eq!(points.len(), 121);
        assert!((points[120].rate - 4.0).abs() < 1e-9);
        assert_eq!(points[120].age_s, 0.0);
        // Half a second later: too short for a point of its own.
        let points = sampler.points(last + Duration::from_millis(500), histogram(&[]));
        assert_eq!(points.len(), 120);
    }

    #[test]
    fn gossip_and_anti_entropy_are_not_requests() {
        let series = [
            ("put".to_owned(), histogram(&[(4, 3)])),
            ("internal.batch".to_owned(), histogram(&[(2, 5)])),
            ("cluster.gossip".to_owned(), histogram(&[(1, 100)])),
            ("node.aae".to_owned(), histogram(&[(1, 7)])),
            ("local.get".to_owned(), histogram(&[(0, 1)])),
        ];
        let sum = requests_of(&series);
        assert_eq!(sum.count(), 9);
        assert_eq!(sum.counts[1], 0);
    }

    fn member(address: &str, zone: &str) -> Member {
        Member {
            address: address.into(),
            zone: zone.into(),
            weight: 1,
        }
    }

    fn node(address: &str, up: bool, syncing: u64) -> NodeStatus {
        NodeStatus {
            address: address.into(),
            zone: String::new(),
            up,
            report: Report {
                syncing,
                keys: 10,
                disk_bytes: 4096,
                ..Report::default()
            },
        }
    }

    #[test]
    fn nodes_show_their_share_and_what_a_transition_gives_them() {
        let three: Vec<Member> = ["a:1", "b:1", "c:1"]
            .iter()
            .map(|a| member(a, ""))
            .collect();
        let mut four = three.clone();
        four.push(member("d:1", ""));
        let v1 = Layout::from_members(&three, 3);
        let v2 = Layout::from_members(&four, 3);
        let none = BTreeMap::new();

        // Steady: every node of three holds a third; nothing to receive.
        let steady = ClusterStatus {
            version: 1,
            transition: false,
            read_version: 1,
            nodes: vec![node("a:1", true, 0), node("b:1", false, 0)],
        };
        let live = [(1, v1.clone())];
        let views = node_views(
            &steady,
            &Layouts {
                live: &live,
                synced: &none,
            },
        );
        assert_eq!(views.len(), 2);
        assert_eq!((views[0].state, views[1].state), ("up", "down"));
        for view in &views {
            assert!((view.share - 1.0 / 3.0).abs() < 1e-9, "{view:?}");
            assert_eq!(
                (view.share_before, view.to_receive, view.synced),
                (None, 0, true)
            );
            assert_eq!((view.keys, view.disk_bytes), (10, 4096));
        }

        // Adding d: d receives every partition it holds in v2, from a to c; the others
        // receive none (they already hold whatever v2 gives them).
        let moving = ClusterStatus {
            version: 2,
            transition: true,
            read_version: 1,
            nodes: vec![node("a:1", true, 0), node("d:1", true, 40)],
        };
        let live = [(1, v1.clone()), (2, v2.clone())];
        let d_slots = v2.replica_counts()[3] as u64;
        let views = node_views(
            &moving,
            &Layouts {
                live: &live,
                synced: &none,
            },
        );
        let (a, d) = (&views[0], &views[1]);
        assert_eq!((a.to_receive, a.synced), (0, true));
        assert!((a.share_before.unwrap() - 1.0 / 3.0).abs() < 1e-9);
        assert!(a.share < 1.0 / 3.0);
        assert_eq!((d.to_receive, d.syncing, d.synced), (d_slots, 40, false));
        assert_eq!(d.share_before, Some(0.0));
        assert!((d.share - d_slots as f64 / 768.0).abs() < 1e-9);

        // Once d said it has version 2 in full, it is synced whatever its last report.
        let synced = BTreeMap::from([("d:1".to_owned(), 2)]);
        let views = node_views(
            &moving,
            &Layouts {
                live: &live,
                synced: &synced,
            },
        );
        assert_eq!((views[1].syncing, views[1].synced), (0, true));
    }

    #[test]
    fn the_page_names_no_other_origin_and_carries_its_nonce() {
        for needle in ["http:", "https:", "//cdn", "@import", "src=\""] {
            assert!(!PAGE.contains(needle), "the page contains {needle:?}");
        }
        let response = page_response();
        let policy = response.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        let nonce = policy
            .split("'nonce-")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap();
        assert_eq!(nonce.len(), 32);
        assert!(policy.starts_with("default-src 'none';"));
        let body = PAGE.replace(NONCE, nonce);
        assert!(body.contains(&format!("<script nonce=\"{nonce}\">")));
        assert!(body.contains(&format!("<style nonce=\"{nonce}\">")));
    }
}
