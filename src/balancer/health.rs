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

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::rpc::client::{CallError, RpcClient};

/// How often down nodes are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Longest a probe may take; a node slower than that to say it is healthy stays down.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Health {
    addresses: Vec<String>,
    up: Vec<AtomicBool>,
    last_error: Vec<Mutex<Option<String>>>,
}

impl Health {
    pub fn new(addresses: &[String]) -> Self {
        Health {
            addresses: addresses.to_vec(),
            up: addresses.iter().map(|_| AtomicBool::new(true)).collect(),
            last_error: addresses.iter().map(|_| Mutex::new(None)).collect(),
        }
    }

    pub fn is_up(&self, server: usize) -> bool {
        self.up[server].load(Ordering::Relaxed)
    }

    pub fn mark_up(&self, server: usize) {
        if !self.up[server].swap(true, Ordering::Relaxed) {
            tracing::info!(server = self.addresses[server], "storage node is up again");
        }
    }

    /// Records a failed call; only failures that say the node is unreachable mark it down.
    pub fn record_failure(&self, server: usize, error: &CallError) {
        if let Ok(mut last) = self.last_error[server].lock() {
            *last = Some(error.to_string());
        }
        let unreachable = matches!(error, CallError::Timeout | CallError::Transport(_));
        if unreachable && self.up[server].swap(false, Ordering::Relaxed) {
            tracing::warn!(server = self.addresses[server], %error, "storage node is down");
        }
    }

    pub fn state(&self, server: usize) -> &'static str {
        if self.is_up(server) { "up" } else { "down" }
    }

    pub fn last_error(&self, server: usize) -> Option<String> {
        self.last_error[server]
            .lock()
            .ok()
            .and_then(|last| last.clone())
    }

    pub fn up_count(&self) -> usize {
        (0..self.up.len())
            .filter(|&server| self.is_up(server))
            .count()
    }

    /// Probes the down nodes, concurrently, once.
    pub async fn probe_down_nodes(&self, client: &RpcClient) {
        let mut probes = tokio::task::JoinSet::new();
        for server in (0..self.up.len()).filter(|&server| !self.is_up(server)) {
            let (client, address) = (client.clone(), self.addresses[server].clone());
            probes.spawn(async move { (server, client.probe(&address, PROBE_TIMEOUT).await) });
        }
        while let Some(probed) = probes.join_next().await {
            if let Ok((server, true)) = probed {
                self.mark_up(server);
            }
        }
    }
}
