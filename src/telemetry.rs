//! Logging set-up and the small metrics registry both daemons expose on `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Sends `tracing` output to stderr; `RUST_LOG` overrides the default level.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .try_init();
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

/// Builds a Prometheus text exposition.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        let _ = write!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
        );
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: i64) -> &mut Self {
        let _ = write!(
            self.0,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
        );
        self
    }

    /// Every figure, the series of one metric (consecutive figures with the same metric
    /// name) under one HELP and TYPE.
    pub fn figures(&mut self, figures: &[Figure]) -> &mut Self {
        let mut previous: Option<&str> = None;
        for figure in figures {
            let name = figure.metric;
            if previous != Some(name) {
                let kind = match figure.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                };
                let _ = write!(
                    self.0,
                    "# HELP {name} {}\n# TYPE {name} {kind}\n",
                    figure.help
                );
            }
            previous = Some(name);
            match figure.label {
                Some((label, value)) => {
                    let _ = writeln!(self.0, "{name}{{{label}=\"{value}\"}} {}", figure.value);
                }
                None => {
                    let _ = writeln!(self.0, "{name} {}", figure.value);
                }
            }
        }
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_render_one_help_per_metric_and_a_line_per_series() {
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
        let mut out = Exposition::default();
        out.figures(&figures);
        assert_eq!(
            out.finish(),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\n\
             x_requests_total{method=\"put\"} 3\nx_requests_total{method=\"get\"} 1\n\
             # HELP x_errors_total Faults.\n# TYPE x_errors_total counter\nx_errors_total 0\n\
             # HELP x_keys Keys.\n# TYPE x_keys gauge\nx_keys 7\n"
        );
    }
}
