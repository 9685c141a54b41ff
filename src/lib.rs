//! Dynamite: a Dynamo-style replicated key-value store (DeCandia et al., SOSP 2007).
//!
//! The request path, client → balancer → replicas:
//!
//! 1. A client POSTs an XML-RPC call to a `load_balancer` ([`rpc::server`] parses it with
//!    [`rpc::codec`]).
//! 2. The balancer ([`balancer`]) notes when the request entered the cluster (on the
//!    [`clock`] every balancer shares), hashes the key onto the [`ring`] and picks the key's
//!    preference list: the first N distinct storage nodes clockwise, a down one replaced by
//!    the next up node, which keeps the write as a hint (sloppy quorum).
//! 3. It fans the operation out to those replicas in per-node binary batches over pooled
//!    keep-alive HTTP ([`balancer::node_queue`], [`rpc::batch`]), each operation with the moment the
//!    balancer stops waiting for it, and counts replies ([`quorum`]) until W (writes) or R
//!    (reads) of them answered, or until that can no longer happen.
//! 4. Each `storage_node` ([`node`]) refuses an operation that arrives after that moment,
//!    reconciles the incoming versions ([`version`]) with what it holds and writes the
//!    result to its [`storage`] engine before it acknowledges.
//!
//! In the background, nodes hand hints to their owners and compare [`merkle`] trees with
//! their peers (anti-entropy); balancers repair stale replicas they read and reap tombstones.
//!
//! Everything that decides (ring placement, clocks, quorum counting, target choice, tree
//! diffs) is pure and does no I/O; networking lives in [`rpc`], [`node`] and [`balancer`].

pub mod admin;
pub mod balancer;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod layout;
pub mod membership;
pub mod merkle;
pub mod node;
pub mod quorum;
pub mod random;
pub mod rpc;
pub mod runtime;
pub mod security;
pub mod shutdown;
pub mod simulation;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod version;
