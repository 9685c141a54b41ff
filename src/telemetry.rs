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

    /// One metric with a label per series, e.g. requests by method.
    pub fn labelled_counter(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: &[(&str, u64)],
    ) -> &mut Self {
        let _ = write!(self.0, "# HELP {name} {help}\n# TYPE {name} counter\n");
        for (value_of_label, value) in series {
            let _ = writeln!(self.0, "{name}{{{label}=\"{value_of_label}\"}} {value}");
        }
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}
