//! Logging set-up and the small metrics registry both daemons expose on `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a daemon writes its log (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// A line per event for a person: time, level, message, then the fields as `name=value`.
    #[default]
    Text,
    /// A JSON object per line for a log collector: `timestamp`, `level`, `fields` (the
    /// `message` and the event's own fields, each as its own member) and `target`.
    Json,
}

/// Sends `tracing` output to stderr, one event a line, in `format`. `RUST_LOG` (a filter such
/// as `warn` or `info,dynamite::node=debug`) overrides the default level, info, in either
/// format. Colours only on a terminal: files, journald and containers get plain text.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.with_ansi(false).json().try_init(),
    };
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether a figure only grows (a count of events) or goes up and down (a level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// One figure a daemon reports, declared once and read by both `stats()` (under `stats`)
/// and `/metrics` (as `metric`, with `label` when it is one series of a metric, e.g.
/// requests by method), so the two never disagree on what is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Figure {
    pub stats: &'static str,
    pub metric: &'static str,
    pub label: Option<(&'static str, &'static str)>,
    pub help: &'static str,
    pub kind: Kind,
    pub value: i64,
}

impl Figure {
    pub fn counter(
        stats: &'static str,
        metric: &'static str,
        help: &'static str,
        value: &Counter,
    ) -> Self {
        Figure {
            stats,
            metric,
            label: None,
            help,
            kind: Kind::Counter,
            value: i64::try_from(value.get()).unwrap_or(i64::MAX),
        }
    }

    pub fn gauge(
        stats: &'static str,
        metric: &'static str,
        help: &'static str,
        value: i64,
    ) -> Self {
        Figure {
            stats,
            metric,
            label: None,
            help,
            kind: Kind::Gauge,
            value,
        }
    }

    /// The same figure as one series of a labelled metric.
    pub fn labelled(self, name: &'static str, value: &'static str) -> Self {
        Figure {
            label: Some((name, value)),
            ..self
        }
    }
}

/// Upper bounds, in seconds, of the latency buckets every histogram shares: fine from
/// 100 µs (a node's own write) to 10 s (far past any replica timeout), a bucket per factor
/// of about 2.5, so that p50 and p99 read from them are within a bucket's width.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A latency histogram: a count per bucket of [`LATENCY_BUCKETS`] (and one past the last),
/// and the sum. Lock-free, so that every request can record into it.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, elapsed: std::time::Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .map(|count| count.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

/// A histogram's figures at one moment; the difference of two is the histogram of what
/// happened between them (the status page's "last minutes").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per bucket of [`LATENCY_BUCKETS`] and one past the last; not cumulative.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram).
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .enumerate()
                .map(|(i, &count)| {
                    count.saturating_sub(earlier.counts.get(i).copied().unwrap_or(0))
                })
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }

    /// Adds `other`'s counts to these (histograms of several series, summed).
    pub fn add(&mut self, other: &HistogramSnapshot) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum_us += other.sum_us;
    }

    /// The `q` quantile (0..=1) in seconds, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does; `None` when nothing was recorded. Past the last
    /// bound, the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, &count) in self.counts.iter().enumerate() {
            if count > 0 && (below + count) as f64 >= rank {
                let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                    return LATENCY_BUCKETS.last().copied();
                };
                let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
                let within = ((rank - below as f64) / count as f64).clamp(0.0, 1.0);
                return Some(lower + (upper - lower) * within);
            }
            below += count;
        }
        LATENCY_BUCKETS.last().copied()
    }

    /// Buckets as OpenMetrics encodes them: (upper bound, count), the last one +Inf.
    fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.counts.iter().copied().chain(std::iter::repeat(0)))
            .collect()
    }
}

/// A histogram per label value (a method, a node), made on first use.
#[derive(Debug, Default)]
pub struct HistogramFamily {
    series: std::sync::RwLock<std::collections::BTreeMap<String, std::sync::Arc<Histogram>>>,
}

impl HistogramFamily {
    /// The histogram of `label`; hold on to it rather than asking per observation.
    pub fn series(&self, label: &str) -> std::sync::Arc<Histogram> {
        if let Some(histogram) = self
            .series
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(label)
        {
            return histogram.clone();
        }
        self.series
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(label.to_owned())
            .or_default()
            .clone()
    }

    pub fn observe(&self, label: &str, elapsed: std::time::Duration) {
        self.series(label).observe(elapsed);
    }

    /// Every series' figures now, by label.
    pub fn snapshot(&self) -> Vec<(String, HistogramSnapshot)> {
        self.series
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(label, histogram)| (label.clone(), histogram.snapshot()))
            .collect()
    }
}

/// `stats()`'s view of a histogram family since start: per label `{count, p50_ms, p99_ms}`.
pub fn latency_summary(series: &[(String, HistogramSnapshot)]) -> dxr::Value {
    let millis = |seconds: Option<f64>| dxr::Value::Double(seconds.map_or(0.0, |s| s * 1000.0));
    dxr::Value::Struct(
        series
            .iter()
            .map(|(label, snapshot)| {
                let figures = [
                    (
                        "count".to_owned(),
                        crate::rpc::codec::int_value(
                            i64::try_from(snapshot.count()).unwrap_or(i64::MAX),
                        ),
                    ),
                    ("p50_ms".to_owned(), millis(snapshot.quantile(0.5))),
                    ("p99_ms".to_owned(), millis(snapshot.quantile(0.99))),
                ];
                (
                    label.clone(),
                    dxr::Value::Struct(figures.into_iter().collect()),
                )
            })
            .collect(),
    )
}

/// One labelled histogram metric as a scrape shows it.
#[derive(Debug, Clone)]
pub struct HistogramMetric {
    pub metric: &'static str,
    pub help: &'static str,
    pub label: &'static str,
    pub series: Vec<(String, HistogramSnapshot)>,
}

/// The OpenMetrics text of `figures` and `histograms`, by prometheus-client's encoder (the
/// content type is [`OPENMETRICS_CONTENT_TYPE`]). A counter's metric name is declared
/// without its `_total`, which the encoder adds to its samples.
pub fn render(figures: &[Figure], histograms: &[HistogramMetric]) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Collected {
        figures: figures.to_vec(),
        histograms: histograms.to_vec(),
    }));
    let mut text = String::new();
    // Writing to a String cannot fail; an encoder error would leave a partial text, which
    // is still better than none.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// What `GET /metrics` answers with.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct Collected {
    figures: Vec<Figure>,
    histograms: Vec<HistogramMetric>,
}

impl prometheus_client::collector::Collector for Collected {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        let mut start = 0;
        while start < self.figures.len() {
            let metric = self.figures[start].metric;
            let end = start
                + self.figures[start..]
                    .iter()
                    .take_while(|figure| figure.metric == metric)
                    .count();
            let first = &self.figures[start];
            let (name, kind) = match first.kind {
                Kind::Counter => (
                    metric.strip_suffix("_total").unwrap_or(metric),
                    MetricType::Counter,
                ),
                Kind::Gauge => (metric, MetricType::Gauge),
            };
            let mut descriptor = encoder.encode_descriptor(name, first.help, None, kind)?;
            for figure in &self.figures[start..end] {
                match figure.label {
                    Some((key, value)) => {
                        let labels = [(key, value)];
                        encode_value(&mut descriptor.encode_family(&labels)?, figure)?;
                    }
                    None => encode_value(&mut descriptor, figure)?,
                }
            }
            start = end;
        }
        for histogram in &self.histograms {
            let mut descriptor = encoder.encode_descriptor(
                histogram.metric,
                histogram.help,
                None,
                MetricType::Histogram,
            )?;
            for (value, snapshot) in &histogram.series {
                let labels = [(histogram.label, value.as_str())];
                descriptor
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(
                        snapshot.sum_us as f64 / 1e6,
                        snapshot.count(),
                        &snapshot.buckets(),
                        None,
                    )?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    series: &mut prometheus_client::encoding::MetricEncoder,
    figure: &Figure,
) -> Result<(), std::fmt::Error> {
    match figure.kind {
        Kind::Counter => series.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &u64::try_from(figure.value).unwrap_or(0),
            None,
        ),
        Kind::Gauge => series.encode_gauge(&figure.value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_and_histograms_render_as_openmetrics() {
        let (puts, gets, errors) = (Counter::new(), Counter::new(), Counter::new());
        puts.add(3);
        gets.inc();
        let request = |stats, method, counter| {
            Figure::counter(stats, "x_requests_total", "Requests.", counter)
                .labelled("method", method)
        };
        let figures = [
            request("puts", "put", &puts),
            request("gets", "get", &gets),
            Figure::counter("errors", "x_errors_total", "Faults.", &errors),
            Figure::gauge("keys", "x_keys", "Keys.", 7),
        ];
        let histogram = Histogram::default();
        histogram.observe(std::time::Duration::from_micros(300));
        histogram.observe(std::time::Duration::from_secs(20));
        let histograms = [HistogramMetric {
            metric: "x_duration_seconds",
            help: "Time.",
            label: "method",
            series: vec![("put".to_owned(), histogram.snapshot())],
        }];
        let text = render(&figures, &histograms);
        for line in [
            "# TYPE x_requests counter",
            "x_requests_total{method=\"put\"} 3",
            "x_requests_total{method=\"get\"} 1",
            "x_errors_total 0",
            "# TYPE x_keys gauge",
            "x_keys 7",
            "# TYPE x_duration_seconds histogram",
            "x_duration_seconds_count{method=\"put\"} 2",
            "x_duration_seconds_bucket{le=\"0.00025\",method=\"put\"} 0",
            "x_duration_seconds_bucket{le=\"0.0005\",method=\"put\"} 1",
            "x_duration_seconds_bucket{le=\"10.0\",method=\"put\"} 1",
            "x_duration_seconds_bucket{le=\"+Inf\",method=\"put\"} 2",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from\n{text}"
            );
        }
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let snapshot = |counts: &[(usize, u64)]| {
            let mut all = vec![0; LATENCY_BUCKETS.len() + 1];
            for &(bucket, count) in counts {
                all[bucket] = count;
            }
            HistogramSnapshot {
                counts: all,
                sum_us: 0,
            }
        };
        // (buckets, q, expected seconds)
        // (non-empty buckets with their counts, q, the quantile expected)
        type Case<'a> = (&'a [(usize, u64)], f64, Option<f64>);
        let cases: [Case; 6] = [
            (&[], 0.5, None),
            // All in (0.001, 0.0025]: the median is half way.
            (&[(4, 10)], 0.5, Some(0.00175)),
            (&[(4, 10)], 1.0, Some(0.0025)),
            // 99 fast ones and one slow: p50 fast, p99 at the fast bucket's top.
            (&[(0, 99), (12, 1)], 0.5, Some(0.0001 * 50.0 / 99.0)),
            (&[(0, 99), (12, 1)], 0.995, Some(0.5 + 0.5 * 0.5)),
            // Past the last bound: the last bound.
            (&[(16, 3)], 0.5, Some(10.0)),
        ];
        for (counts, q, expected) in cases {
            let got = snapshot(counts).quantile(q);
            match (got, expected) {
                (Some(got), Some(expected)) => {
                    assert!(
                        (got - expected).abs() < 1e-9,
                        "{counts:?} q{q}: {got} vs {expected}"
                    )
                }
                _ => assert_eq!(got, expected, "{counts:?} q{q}"),
            }
        }
        let later = snapshot(&[(4, 10), (5, 2)]);
        let earlier = snapshot(&[(4, 7)]);
        assert_eq!(later.since(&earlier).counts[4..6], [3, 2]);
    }
}
