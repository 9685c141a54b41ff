//! What a node answers: the XML-RPC methods (its own copy for people, anti-entropy for
//! peers), the binary batch endpoint, `stats()` and `/metrics`, the last two from one list
//! of counters.

use std::sync::atomic::{AtomicI64, Ordering};

use dxr::Value;

use crate::error::{Error, Result};
use crate::rpc::codec;
use crate::rpc::messages::{self, CoordinateRequest, Envelope, ReadRequest, check_key};
use crate::rpc::server::{self, Handler};
use crate::telemetry::{Counter, Figure};

use super::StorageNode;
use super::request::Request;

/// What the node counts.
#[derive(Debug, Default)]
pub(super) struct NodeMetrics {
    pub(super) coordinates: Counter,
    pub(super) merges: Counter,
    pub(super) reads: Counter,
    pub(super) local_gets: Counter,
    pub(super) local_puts: Counter,
    pub(super) reaps: Counter,
    pub(super) batches: Counter,
    pub(super) errors: Counter,
    /// Operations refused because they arrived after their deadline.
    pub(super) expired: Counter,
    /// Writes refused because they entered the cluster too far ahead of this node's clock.
    pub(super) clock_refusals: Counter,
    /// Keys handed to their replicas and dropped here (see `rehome.rs`).
    pub(super) rehomed: Counter,
    /// Keys this node does not replicate still here, as the last rehoming pass left them.
    pub(super) rehome_left: std::sync::atomic::AtomicI64,
    /// Pages of a partition served to a node receiving it.
    pub(super) sync_pages_served: Counter,
    /// Keys received from other nodes for partitions a new layout gave this node.
    pub(super) sync_keys_received: Counter,
    /// Payload bytes of those transfers: values (one holder's copy, and keys another holder
    /// had otherwise) ...
    pub(super) sync_bytes_received: Counter,
    /// ... and the entry-hash listings from the other holders.
    pub(super) sync_listing_bytes: Counter,
    /// Payload bytes of the keys handed to their replicas before this node dropped them.
    pub(super) rehome_bytes_sent: Counter,
    /// Hints delivered to their owners (and dropped here).
    pub(super) hints_handed_off: Counter,
    /// Calls' time, by method (`internal.batch` for replica batches).
    pub(super) request_latency: crate::telemetry::HistogramFamily,
    /// Snapshots of `request_latency` for the status page's charts.
    pub(super) requests_sampled: crate::status::Sampler,
}

impl StorageNode {
    /// Everything the node counts, each figure declared once (see [`Figure`]).
    fn node_figures(&self) -> Vec<Figure> {
        let m = &self.metrics;
        let level = |n: &AtomicI64| n.load(Ordering::Relaxed).max(0);
        let request = |stats, method, counter| {
            Figure::counter(
                stats,
                "dynamite_node_requests_total",
                "Requests served, by method.",
                counter,
            )
            .labelled("method", method)
        };
        vec![
            Figure::gauge(
                "keys",
                "dynamite_node_keys",
                "Live keys stored here.",
                level(&self.live_keys),
            ),
            Figure::gauge(
                "keys_counted",
                "dynamite_node_keys_counted",
                "1 once the count of the stored keys made after start is done; until then \
                 keys and tombstones are low and anti-entropy waits.",
                i64::from(self.census.is_done()),
            ),
            Figure::gauge(
                "tombstones",
                "dynamite_node_tombstones",
                "Deleted keys whose tombstones are not reaped yet.",
                level(&self.tombstone_keys),
            ),
            Figure::gauge(
                "hints",
                "dynamite_node_hints",
                "Writes held here for another node.",
                level(&self.hints),
            ),
            Figure::gauge(
                "hints_corrupt",
                "dynamite_node_hints_corrupt",
                "Hints that cannot be decoded, left in place and not handed over.",
                self.corrupt_hints.load(Ordering::Relaxed),
            ),
            Figure::gauge(
                "salvaged_records",
                "dynamite_node_salvaged_records",
                "Damaged records skipped at start under --salvage; peers refill what they held.",
                i64::try_from(self.engine.salvaged().records).unwrap_or(i64::MAX),
            ),
            Figure::gauge(
                "salvaged_bytes",
                "dynamite_node_salvaged_bytes",
                "Bytes of the damaged records skipped at start under --salvage.",
                i64::try_from(self.engine.salvaged().bytes).unwrap_or(i64::MAX),
            ),
            Figure::gauge(
                "cache_bytes",
                "dynamite_node_cache_bytes",
                "Bytes held by the row cache.",
                i64::try_from(self.cache.weight()).unwrap_or(i64::MAX),
            ),
            Figure::gauge(
                "disk_bytes",
                "dynamite_node_disk_bytes",
                "Bytes of the files in the data directory (0 in memory).",
                i64::try_from(self.disk_bytes()).unwrap_or(i64::MAX),
            ),
            Figure::counter(
                "hints_handed_off",
                "dynamite_node_hints_handed_off_total",
                "Hints delivered to their owners.",
                &m.hints_handed_off,
            ),
            request("coordinates", "coordinate", &m.coordinates),
            request("merges", "merge", &m.merges),
            request("reads", "read", &m.reads),
            request("local_gets", "get", &m.local_gets),
            request("local_puts", "put", &m.local_puts),
            request("reaps", "reap", &m.reaps),
            Figure::counter(
                "errors",
                "dynamite_node_errors_total",
                "Requests answered with a fault.",
                &m.errors,
            ),
            Figure::counter(
                "batches",
                "dynamite_node_batches_total",
                "Binary batches of replica operations served.",
                &m.batches,
            ),
            Figure::counter(
                "expired",
                "dynamite_node_expired_total",
                "Replica operations refused unapplied because they arrived after their deadline.",
                &m.expired,
            ),
            Figure::counter(
                "rehomed",
                "dynamite_node_rehomed_total",
                "Keys this node no longer replicates, handed to their replicas and dropped here.",
                &m.rehomed,
            ),
            Figure::gauge(
                "rehome_left",
                "dynamite_node_rehome_left",
                "Keys this node does not replicate still here, after the last rehoming pass.",
                m.rehome_left.load(Ordering::Relaxed),
            ),
            Figure::gauge(
                "syncing",
                "dynamite_node_partitions_syncing",
                "Partitions this node still has to receive for the newest layout version.",
                self.syncing.load(Ordering::Relaxed),
            ),
            Figure::gauge(
                "layout_version",
                "dynamite_node_layout_version",
                "The newest layout version this node knows (0: none yet).",
                self.membership.routing().map_or(0, |r| {
                    i64::try_from(r.current_version()).unwrap_or(i64::MAX)
                }),
            ),
            Figure::counter(
                "sync_keys_received",
                "dynamite_node_sync_keys_received_total",
                "Keys received for partitions a new layout version gave this node.",
                &m.sync_keys_received,
            ),
            Figure::counter(
                "sync_bytes_received",
                "dynamite_node_sync_bytes_received_total",
                "Payload bytes received for partitions a new layout version gave this node.",
                &m.sync_bytes_received,
            ),
            Figure::counter(
                "sync_listing_bytes",
                "dynamite_node_sync_listing_bytes_total",
                "Payload bytes of entry-hash listings received from the other holders of partitions being received.",
                &m.sync_listing_bytes,
            ),
            Figure::counter(
                "rehome_bytes_sent",
                "dynamite_node_rehome_bytes_sent_total",
                "Payload bytes this node sent to drop keys it no longer replicates: the entry-hash questions to their replicas, and the keys a replica did not hold as it does.",
                &m.rehome_bytes_sent,
            ),
            Figure::counter(
                "sync_pages_served",
                "dynamite_node_sync_pages_served_total",
                "Pages of partitions sent to nodes receiving them.",
                &m.sync_pages_served,
            ),
            Figure::counter(
                "clock_refusals",
                "dynamite_node_clock_refusals_total",
                "Writes this node refused to coordinate: stamped over 10 s ahead of its clock.",
                &m.clock_refusals,
            ),
        ]
    }

    /// Anti-entropy's figures, for a node with peers: `stats()` shows them under
    /// `anti_entropy`.
    fn anti_entropy_figures(&self) -> Vec<Figure> {
        if self.aae().is_none() && self.aae_metrics.rounds.get() == 0 {
            return Vec::new();
        }
        let m = &self.aae_metrics;
        vec![
            Figure::counter(
                "rounds",
                "dynamite_node_aae_rounds_total",
                "Anti-entropy exchanges started.",
                &m.rounds,
            ),
            Figure::counter(
                "in_sync",
                "dynamite_node_aae_in_sync_total",
                "Anti-entropy exchanges that found the two trees equal.",
                &m.in_sync,
            ),
            Figure::counter(
                "keys_pushed",
                "dynamite_node_aae_keys_pushed_total",
                "Keys sent to a peer by anti-entropy.",
                &m.keys_pushed,
            ),
            Figure::counter(
                "keys_pulled",
                "dynamite_node_aae_keys_pulled_total",
                "Keys taken from a peer by anti-entropy.",
                &m.keys_pulled,
            ),
            Figure::counter(
                "bytes",
                "dynamite_node_aae_bytes_total",
                "Payload bytes of the anti-entropy exchanges this node started.",
                &m.bytes,
            ),
            Figure::counter(
                "failures",
                "dynamite_node_aae_failures_total",
                "Anti-entropy exchanges that failed.",
                &m.failures,
            ),
            Figure::counter(
                "keys_unsettled",
                "dynamite_node_aae_keys_unsettled_total",
                "Differing keys left to a later round: a version too recent to tell from a write in flight.",
                &m.keys_unsettled,
            ),
            Figure::counter(
                "keys_scanned",
                "dynamite_node_aae_keys_scanned_total",
                "Keys read from storage to list the keys of leaves that differ from a peer's.",
                &m.keys_scanned,
            ),
        ]
    }

    /// The bytes of every file under the data directory, walked now (a few files for the
    /// log engine, a few hundred for fjall).
    pub(crate) fn disk_bytes(&self) -> u64 {
        fn walk(dir: &std::path::Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return 0;
            };
            entries
                .flatten()
                .map(|entry| match entry.metadata() {
                    Ok(meta) if meta.is_dir() => walk(&entry.path()),
                    Ok(meta) => meta.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        self.data_dir.as_deref().map_or(0, walk)
    }

    fn stats_xml(&self) -> Result<String> {
        let int = |figure: &Figure| (figure.stats.to_owned(), codec::int_value(figure.value));
        let mut stats: std::collections::BTreeMap<String, Value> =
            self.node_figures().iter().map(int).collect();
        stats.insert("engine".into(), Value::String(self.engine.name().into()));
        stats.insert(
            "actor".into(),
            Value::String(format!("{:016x}", self.actor())),
        );
        stats.insert(
            "connections".into(),
            codec::int_value(i64::try_from(server::CONNECTIONS_ACCEPTED.get()).unwrap_or(i64::MAX)),
        );
        stats.insert(
            "latency".into(),
            crate::telemetry::latency_summary(&self.metrics.request_latency.snapshot()),
        );
        if let Some(aae) = self.aae() {
            stats.insert("ring".into(), Value::String(aae.fingerprint().to_owned()));
            let figures = self.anti_entropy_figures().iter().map(int).collect();
            stats.insert("anti_entropy".into(), Value::Struct(figures));
        }
        codec::value_to_xml(&Value::Struct(stats))
    }

    /// The handlers themselves are synchronous: the engine's writes are short appends to the
    /// journal, and the lock per key is a std mutex never held across an `.await`.
    fn call_sync(&self, request: Request) -> Result<String> {
        match request {
            Request::Aae(request) => {
                let aae = self.aae().ok_or_else(|| {
                    Error::invalid(
                        "anti-entropy is off on this node (no layout yet, or not a member of it)",
                    )
                })?;
                let reply = aae.answer(self, request)?;
                messages::reply_xml(&reply)
            }
            Request::MergeMany(request) => {
                let merged = request.entries.len() as u64;
                self.merge_own_many_until(request.entries, request.deadline_us)?;
                messages::reply_xml(&merged)
            }
            Request::ReadMany(request) => {
                let sets = request
                    .keys
                    .iter()
                    .map(|key| {
                        check_key(key)?;
                        self.read_own(key)
                    })
                    .collect::<Result<Vec<_>>>()?;
                messages::reply_xml(&sets)
            }
            Request::LocalPut {
                key,
                value,
                context,
            } => {
                self.metrics.local_puts.inc();
                self.coordinate(CoordinateRequest {
                    key,
                    value: Some(value),
                    context,
                    hint_for: None,
                    entered_us: crate::clock::now_us(),
                })?;
                Ok(codec::string_xml("200"))
            }
            Request::LocalGet { key } => {
                self.metrics.local_gets.inc();
                let siblings = self.read(&ReadRequest {
                    key,
                    hint_for: None,
                })?;
                Ok(siblings
                    .latest_value()
                    .map_or_else(|| codec::NIL_XML.to_owned(), str::to_owned))
            }
            Request::Stats => self.stats_xml(),
            Request::LocalExplain { key } => {
                let own = self.load(&key)?;
                let hints = self.hints_for(&key)?;
                codec::value_to_xml(&crate::balancer::explain::local_value(&own, &hints))
            }
            Request::SyncPage(request) => messages::reply_xml(&self.sync_page(&request)?),
            Request::Hashes(request) => messages::reply_xml(&self.hashes(&request)?),
            Request::Cluster(_) | Request::Coordinate(_) => {
                Err(Error::Internal("coordinated calls are async".into()))
            }
        }
    }
}

impl Handler for StorageNode {
    type Request = Request;

    async fn call(&self, request: Request) -> Result<String> {
        match request {
            Request::Cluster(call) => self.membership.answer(call, self.report()).await,
            Request::Coordinate(request) => self.coordinator.handle(request).await,
            request => self.call_sync(request),
        }
    }

    fn count_fault(&self) {
        self.metrics.errors.inc();
    }

    fn layout_version(&self) -> u64 {
        self.membership.version()
    }

    fn clock_anchor_us(&self) -> Option<i64> {
        self.membership.clock_anchor_us()
    }

    fn heard_layout_version(&self, version: u64) {
        self.membership.heard_version(version);
    }

    fn refuses_layout(&self, version: u64) -> Option<String> {
        let oldest = self.membership.oldest_version();
        (version < oldest).then(|| {
            format!(
                "routed with layout version {version}, but every version before {oldest} is \
                 over: learn the current layout and route again"
            )
        })
    }

    const SERVES_BATCHES: bool = true;

    async fn batch(&self, body: bytes::Bytes) -> Result<Vec<u8>> {
        let envelopes: Vec<Envelope> = postcard::from_bytes(&body)
            .map_err(|_| Error::invalid("batch could not be decoded"))?;
        self.metrics.batches.inc();
        let replies = self.apply(
            envelopes
                .into_iter()
                .map(|envelope| (envelope.op, envelope.deadline_us))
                .collect(),
        );
        postcard::to_allocvec(&replies)
            .map_err(|_| Error::Internal("batch reply could not be encoded".into()))
    }

    fn figures(&self) -> Vec<Figure> {
        let mut figures = self.node_figures();
        figures.extend(self.anti_entropy_figures());
        figures
    }

    fn histograms(&self) -> Vec<crate::telemetry::HistogramMetric> {
        // Requests by method as this node served them; replica calls by node as its
        // coordinator made them.
        let mut histograms = self.coordinator.latency_histograms();
        if let Some(requests) = histograms.first_mut() {
            requests.series = self.metrics.request_latency.snapshot();
        }
        histograms
    }

    fn observe(&self, method: &'static str, elapsed: std::time::Duration) {
        self.metrics.request_latency.observe(method, elapsed);
    }

    const SERVES_STATUS: bool = true;

    fn status_json(&self) -> String {
        crate::status::json(
            &self.membership,
            &self.report(),
            &self.metrics.requests_sampled,
            &self.metrics.request_latency.snapshot(),
        )
    }
}
