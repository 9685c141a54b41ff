//! Validated settings for each daemon.
//!
//! `cli` turns flags into these; everything that can be wrong with a combination of flags is
//! checked here once, at start, so the daemons never meet an impossible setting at run time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::security::Security;
use crate::storage::StorageConfig;

/// Largest HTTP body either daemon accepts by default (32 MiB, as docs/protocol.md says).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: SocketAddr,
    /// The other storage nodes of the cluster ("host:port"), for node-to-node work.
    pub peers: Vec<String>,
    pub storage: StorageConfig,
    /// Print a line per request served, so a person can watch keys being spread.
    pub log_requests: bool,
    pub max_request_bytes: usize,
    /// The ring this node shares with its peers, for anti-entropy; `None` without peers.
    pub ring: Option<NodeRing>,
    /// Time between anti-entropy rounds (one exchange with each peer).
    pub aae_interval: Duration,
    /// Most keys one anti-entropy exchange repairs: the rate bound.
    pub aae_max_keys: usize,
    /// Capacity of the node's row cache ([`crate::node`]); 0 turns it off.
    pub cache_bytes: u64,
    /// This node's address as members name it (`--advertise`).
    pub advertise: String,
    /// Its failure domain (`--zone`).
    pub zone: String,
    /// N for a layout version 1 this node builds from its `-s` servers.
    pub replicas: usize,
    /// Who may call it, how it serves, what its calls carry.
    pub security: Security,
}

/// The layout as a storage node sees it: itself and its `-s` peers, placed exactly as the
/// balancers place them, so it knows which keys it shares with which peer.
#[derive(Debug, Clone)]
pub struct NodeRing {
    /// This node's address as the balancers and peers name it (`--advertise`).
    pub me: String,
    /// Every storage node, this one included, deduplicated and sorted.
    pub servers: Vec<String>,
    pub replicas: usize,
}

impl NodeRing {
    pub fn new(me: String, peers: &[String], replicas: Option<usize>) -> Result<Self, ConfigError> {
        let mut servers: Vec<String> = peers.to_vec();
        servers.push(me.clone());
        servers.sort();
        servers.dedup();
        // -N is the cluster's N for a layout version 1 this node builds; with fewer servers
        // known at start (a node joining with one seed), its layout holds fewer replicas
        // until more nodes are members.
        let replicas = replicas.unwrap_or(3).min(servers.len());
        if replicas == 0 {
            return Err(ConfigError("-N must be at least 1".into()));
        }
        Ok(NodeRing {
            me,
            servers,
            replicas,
        })
    }
}

#[derive(Debug, Clone)]
pub struct BalancerConfig {
    pub listen: SocketAddr,
    /// The storage nodes ("host:port"), deduplicated and sorted.
    pub servers: Vec<String>,
    pub replicas: usize,
    pub read_quorum: usize,
    pub write_quorum: usize,
    /// N for a layout version 1 this balancer builds (when no node has a layout yet): -N,
    /// or 3 (the layout holds fewer replicas while there are fewer nodes).
    pub layout_replicas: usize,
    /// -R and -W as given; without them, a majority of the layout's N.
    pub explicit_read: Option<usize>,
    pub explicit_write: Option<usize>,
    /// How long one replica may take before it counts as failed.
    pub replica_timeout: Duration,
    pub max_request_bytes: usize,
    /// How long a deleted key's tombstones stay after every replica has them.
    pub tombstone_grace: Duration,
    /// Who may call it, how it serves, what its calls carry.
    pub security: Security,
}

/// A setting that cannot work, as a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The flags of a balancer before validation; `None` means "use the default".
#[derive(Debug, Clone)]
pub struct BalancerFlags {
    pub bind: IpAddr,
    pub port: u16,
    pub servers: Vec<String>,
    pub replicas: Option<usize>,
    pub read_quorum: Option<usize>,
    pub write_quorum: Option<usize>,
    pub timeout_ms: u64,
    pub max_request_bytes: usize,
    pub tombstone_grace_ms: u64,
    pub security: Security,
}

impl BalancerConfig {
    pub fn from_flags(flags: BalancerFlags) -> Result<Self, ConfigError> {
        let mut servers = Vec::with_capacity(flags.servers.len());
        for server in &flags.servers {
            servers.push(validate_address(server)?);
        }
        servers.sort();
        servers.dedup();
        if servers.is_empty() {
            return Err(ConfigError(
                "at least one storage node (-s HOST:PORT) is needed".into(),
            ));
        }
        let distinct = servers.len();
        let replicas = flags.replicas.unwrap_or(distinct.min(3));
        if replicas == 0 || replicas > distinct {
            return Err(ConfigError(format!(
                "-N {replicas} is impossible with {distinct} distinct server(s): N must be 1..={distinct}"
            )));
        }
        let majority = crate::quorum::majority(replicas);
        let read_quorum = flags.read_quorum.unwrap_or(majority);
        let write_quorum = flags.write_quorum.unwrap_or(majority);
        for (flag, value) in [("-R", read_quorum), ("-W", write_quorum)] {
            if value == 0 || value > replicas {
                return Err(ConfigError(format!(
                    "{flag} {value} is impossible with N={replicas}: it must be 1..={replicas}"
                )));
            }
        }
        if flags.timeout_ms == 0 {
            return Err(ConfigError("--timeout-ms must be at least 1".into()));
        }
        if flags.max_request_bytes < 1024 {
            return Err(ConfigError(
                "--max-request-bytes must be at least 1024".into(),
            ));
        }
        Ok(BalancerConfig {
            listen: SocketAddr::new(flags.bind, flags.port),
            servers,
            replicas,
            read_quorum,
            write_quorum,
            layout_replicas: flags.replicas.unwrap_or(3),
            explicit_read: flags.read_quorum,
            explicit_write: flags.write_quorum,
            replica_timeout: Duration::from_millis(flags.timeout_ms),
            max_request_bytes: flags.max_request_bytes,
            tombstone_grace: Duration::from_millis(flags.tombstone_grace_ms),
            security: flags.security,
        })
    }
}

impl BalancerConfig {
    /// The coordinator a storage node runs for `put`, `get`, `get_versions` and `delete`
    /// (any node coordinates): a balancer's defaults, over the node's layout.
    pub fn for_node(node: &NodeConfig) -> BalancerConfig {
        let replicas = node.replicas.max(1);
        let majority = crate::quorum::majority(replicas);
        BalancerConfig {
            listen: node.listen,
            servers: node.peers.clone(),
            replicas,
            read_quorum: majority,
            write_quorum: majority,
            layout_replicas: replicas,
            explicit_read: None,
            explicit_write: None,
            replica_timeout: Duration::from_millis(1000),
            max_request_bytes: node.max_request_bytes,
            tombstone_grace: Duration::from_millis(10_000),
            security: node.security.clone(),
        }
    }
}

/// Checks that a server address is `host:port` with a port, and normalises nothing else:
/// the layout hashes the address text, so every daemon must be given the same spelling.
pub fn validate_address(address: &str) -> Result<String, ConfigError> {
    let Some((host, port)) = address.rsplit_once(':') else {
        return Err(ConfigError(format!(
            "server address {address:?} is not HOST:PORT"
        )));
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(ConfigError(format!(
            "server address {address:?} is not HOST:PORT"
        )));
    }
    Ok(address.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(servers: &[&str]) -> BalancerFlags {
        BalancerFlags {
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 30000,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            replicas: None,
            read_quorum: None,
            write_quorum: None,
            timeout_ms: 1000,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            tombstone_grace_ms: 10_000,
            security: Security::default(),
        }
    }

    const THREE: [&str; 3] = ["a:1", "b:2", "c:3"];

    #[test]
    fn defaults_are_three_replicas_and_majorities() {
        let config = BalancerConfig::from_flags(flags(&THREE)).expect("valid");
        assert_eq!(
            (config.replicas, config.read_quorum, config.write_quorum),
            (3, 2, 2)
        );
        let config = BalancerConfig::from_flags(flags(&["a:1"])).expect("valid");
        assert_eq!(
            (config.replicas, config.read_quorum, config.write_quorum),
            (1, 1, 1)
        );
        let config = BalancerConfig::from_flags(flags(&["a:1", "b:2", "a:1"])).expect("valid");
        assert_eq!(config.servers, vec!["a:1", "b:2"]);
        assert_eq!(
            (config.replicas, config.read_quorum, config.write_quorum),
            (2, 2, 2)
        );
    }

    #[test]
    fn impossible_settings_are_refused() {
        type Tweak = fn(&mut BalancerFlags);
        let cases: [(&str, Tweak); 8] = [
            ("N=0", |f| f.replicas = Some(0)),
            ("N>servers", |f| f.replicas = Some(4)),
            ("R=0", |f| f.read_quorum = Some(0)),
            ("R>N", |f| f.read_quorum = Some(4)),
            ("W=0", |f| f.write_quorum = Some(0)),
            ("W>N", |f| {
                f.replicas = Some(2);
                f.write_quorum = Some(3)
            }),
            ("no servers", |f| f.servers.clear()),
            ("bad address", |f| f.servers.push("nohost".into())),
        ];
        for (name, tweak) in cases {
            let mut f = flags(&THREE);
            tweak(&mut f);
            let error = BalancerConfig::from_flags(f).expect_err(name);
            assert!(!error.0.contains('\n'), "{name}: one line");
        }
    }

    #[test]
    fn duplicates_count_once_toward_n() {
        let mut f = flags(&["a:1", "a:1", "b:2"]);
        f.replicas = Some(3);
        assert!(BalancerConfig::from_flags(f).is_err());
    }
}
