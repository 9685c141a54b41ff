//! The balancer's failure detector: which storage nodes it believes are up.
//!
//! Detection is passive first: a call that cannot reach a node or times out marks it down,
//! and requests stop waiting on it at once (its share goes to a fallback; see the balancer's
//! sloppy quorum). Recovery is active: a prober asks each down node for `GET /health` every
//! [`PROBE_INTERVAL`] and marks it up when it answers. So a hung node (SIGSTOP: it accepts
//! connections and never answers) costs one timeout, not one per request.
//!
//! A fault from a node (it answered, but refused the call) says nothing about its health and
//! does not mark it down.
//!
//! The prober also checks, once per node and again whenever a node comes back, that a node
//! with `-s` peers built the same ring as this balancer (its `stats()` shows the fingerprint).
//! A node on another ring would run anti-entropy towards the wrong replicas; it is reported
//! and left out ("mismatch") until it is restarted with matching flags.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use dxr::Value;

use crate::rpc::client::{CallError, RpcClient};

/// How often down nodes are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest a probe may take; a node slower than that to say it is healthy stays down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

const UP: u8 = 0;
const DOWN: u8 = 1;
const MISMATCH: u8 = 2;

/// What a successful probe learned.
enum Probed {
    /// `GET /health` answered 200.
    Healthy,
    /// `stats()` answered, with the node's ring in it.
    Stats(Value),
}

pub struct Health {
    addresses: Vec<String>,
    state: Vec<AtomicU8>,
    /// Has the node's ring been compared with ours since it was last seen coming up?
    ring_checked: Vec<AtomicBool>,
    last_error: Vec<Mutex<Option<String>>>,
}

impl Health {
    pub fn new(addresses: &[String]) -> Self {
        Health {
            addresses: addresses.to_vec(),
            state: addresses.iter().map(|_| AtomicU8::new(UP)).collect(),
            ring_checked: addresses.iter().map(|_| AtomicBool::new(false)).collect(),
            last_error: addresses.iter().map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Takes over what `old` knew of the nodes both name (a new layout keeps its nodes'
    /// states).
    pub fn carry_from(&self, old: &Health) {
        for (server, address) in self.addresses.iter().enumerate() {
            if let Some(before) = old.addresses.iter().position(|a| a == address) {
                let state = old.state[before].load(Ordering::Relaxed);
                self.state[server].store(if state == DOWN { DOWN } else { UP }, Ordering::Relaxed);
                if let Some(error) = old.last_error(before) {
                    self.set_last_error(server, error);
                }
            }
        }
    }

    /// Leaves out (or takes back) a node by what the membership says of its layout.
    pub fn set_mismatch(&self, server: usize, mismatch: Option<String>) {
        match mismatch {
            Some(message) => {
                if self.state[server].swap(MISMATCH, Ordering::Relaxed) != MISMATCH {
                    tracing::error!(server = self.addresses[server], "{message}");
                }
                self.set_last_error(server, message);
            }
            None => {
                let _ = self.state[server].compare_exchange(
                    MISMATCH,
                    UP,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
    }

    pub fn is_up(&self, server: usize) -> bool {
        self.state[server].load(Ordering::Relaxed) == UP
    }

    pub fn mark_up(&self, server: usize) {
        if self.state[server]
            .compare_exchange(DOWN, UP, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::info!(server = self.addresses[server], "storage node is up again");
        }
    }

    /// Records a failed call; only failures that say the node is unreachable mark it down.
    pub fn record_failure(&self, server: usize, error: &CallError) {
        self.set_last_error(server, error.to_string());
        if error.is_unreachable()
            && self.state[server]
                .compare_exchange(UP, DOWN, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.ring_checked[server].store(false, Ordering::Relaxed);
            tracing::warn!(server = self.addresses[server], %error, "storage node is down");
        }
    }

    fn set_last_error(&self, server: usize, error: String) {
        if let Ok(mut last) = self.last_error[server].lock() {
            *last = Some(error);
        }
    }

    pub fn state(&self, server: usize) -> &'static str {
        match self.state[server].load(Ordering::Relaxed) {
            UP => "up",
            MISMATCH => "mismatch",
            _ => "down",
        }
    }

    pub fn last_error(&self, server: usize) -> Option<String> {
        self.last_error[server]
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    pub fn up_count(&self) -> usize {
        (0..self.addresses.len())
            .filter(|&server| self.is_up(server))
            .count()
    }

    /// One prober round: probe down nodes. (The layout is no longer compared here: every
    /// daemon follows the history gossip spreads.)
    pub async fn probe(&self, client: &RpcClient) {
        self.probe_checking(client, None).await
    }

    async fn probe_checking(&self, client: &RpcClient, fingerprint: Option<&str>) {
        let mut probes = tokio::task::JoinSet::new();
        for server in 0..self.addresses.len() {
            let state = self.state[server].load(Ordering::Relaxed);
            let check_ring = fingerprint.is_some()
                && (state == MISMATCH
                    || (state == UP && !self.ring_checked[server].load(Ordering::Relaxed)));
            if state != DOWN && !check_ring {
                continue;
            }
            let (client, address) = (client.clone(), self.addresses[server].clone());
            probes.spawn(async move {
                let probed = if check_ring {
                    // The node's stats carry its ring; answering at all also means it is up.
                    client
                        .call(&address, "stats", vec![], PROBE_TIMEOUT)
                        .await
                        .ok()
                        .map(Probed::Stats)
                } else {
                    client
                        .probe(&address, PROBE_TIMEOUT)
                        .await
                        .then_some(Probed::Healthy)
                };
                (server, probed)
            });
        }
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok((server, Some(Probed::Healthy))) => self.mark_up(server),
                Ok((server, Some(Probed::Stats(stats)))) => {
                    self.compare_ring(server, &stats, fingerprint.unwrap_or_default())
                }
                _ => {}
            }
        }
    }

    /// Leaves out a node whose ring differs from ours; takes back one that now agrees.
    fn compare_ring(&self, server: usize, stats: &Value, fingerprint: &str) {
        let theirs = match stats {
            Value::Struct(fields) => match fields.get("ring") {
                Some(Value::String(ring)) => Some(ring.as_str()),
                _ => None, // a node without -s peers runs no anti-entropy: nothing to agree on
            },
            _ => None,
        };
        self.ring_checked[server].store(true, Ordering::Relaxed);
        match theirs {
            Some(ring) if ring != fingerprint => {
                let message = format!(
                    "ring mismatch: the node has ring {ring}, this balancer {fingerprint}; start every daemon with the same servers, --vnodes and -N"
                );
                if self.state[server].swap(MISMATCH, Ordering::Relaxed) != MISMATCH {
                    tracing::error!(server = self.addresses[server], "{message}");
                }
                self.set_last_error(server, message);
            }
            _ => {
                if self.state[server]
                    .compare_exchange(MISMATCH, UP, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::info!(
                        server = self.addresses[server],
                        "storage node's ring now matches"
                    );
                }
            }
        }
    }
}
