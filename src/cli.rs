//! Command-line flags of both daemons (docs/protocol.md's tables), turned into validated configs.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

use crate::config::{
    BalancerConfig, BalancerFlags, ConfigError, DEFAULT_MAX_REQUEST_BYTES, NodeConfig, NodeRing,
    validate_address,
};
use crate::security::{Security, SecurityFiles};
use crate::storage::{Recovery, StorageConfig};
use crate::telemetry::LogFormat;

/// The security flags both daemons take (docs/protocol.md, Security). Secrets are read from
/// files, never given on the command line, where `ps` and shell history would show them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Client calls need HTTP Basic credentials: this user, and a password of
    /// --auth-password-file; anything else is refused with HTTP 401 (/health stays open)
    /// [default: no password needed].
    #[arg(long, value_name = "USER", requires = "auth_password_file")]
    pub auth_user: Option<String>,
    /// File holding the client password, one per line: any line is accepted, so a password
    /// can be replaced without refusing clients that still send the old one [default: none;
    /// required with --auth-user].
    #[arg(long, value_name = "FILE", requires = "auth_user")]
    pub auth_password_file: Option<PathBuf>,
    /// File holding the cluster secret (at least 16 characters, e.g. `openssl rand -hex 32`):
    /// calls between daemons carry the first line, and internal methods (replica batches,
    /// anti-entropy, local.*, cluster.*) are refused without one of its lines. Every daemon
    /// of a cluster, and the `dynamite` command, needs it [default: internal methods need
    /// what client methods need].
    #[arg(long, value_name = "FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate (then any intermediates) [default: plain HTTP].
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert [default: none; required with --tls-cert].
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificates of the CAs this daemon trusts when it calls other daemons, which
    /// it then calls over HTTPS, checking their certificates [default: plain HTTP to them].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl SecurityArgs {
    /// Reads the files; logs, once, each warning at start (secrets others can read, a daemon
    /// anyone who reaches can write to).
    pub fn into_security(
        self,
        daemon: &str,
        listen: std::net::SocketAddr,
    ) -> Result<Security, ConfigError> {
        let files = SecurityFiles {
            auth_user: self.auth_user,
            auth_password_file: self.auth_password_file,
            cluster_secret_file: self.cluster_secret_file,
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
        };
        let (security, mut warnings) = Security::from_files(&files)?;
        warnings.extend(crate::security::exposure_warning(
            daemon,
            listen,
            &security.credentials,
        ));
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        Ok(security)
    }
}

/// A Dynamite storage node: stores versioned values for the load balancers.
#[derive(Debug, Parser)]
#[command(name = "storage_node", version)]
pub struct NodeArgs {
    /// Port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 25000)]
    pub port: u16,
    /// Another member of the cluster, HOST:PORT (repeatable): a seed from which this node
    /// learns the cluster's layout, and a peer for anti-entropy [default: none: the node waits
    /// for a balancer or an operator to give it the layout].
    #[arg(short = 's', long = "server", value_name = "HOST:PORT")]
    pub servers: Vec<String>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Where to keep data [default: dynamite-data/node-PORT].
    #[arg(long, value_name = "DIR", conflicts_with = "in_memory")]
    pub data_dir: Option<PathBuf>,
    /// Keep nothing on disk [default: off].
    #[arg(long)]
    pub in_memory: bool,
    /// Storage engine for --data-dir: `log` (an append-only log with an in-memory index of
    /// the keys, like Riak's Bitcask) or `fjall` (an LSM tree) [default: the engine that wrote
    /// the directory, `log` for a new one].
    #[arg(long, value_enum, conflicts_with = "in_memory")]
    pub engine: Option<EngineChoice>,
    /// Start even though stored records are damaged (log engine): skip the damaged records
    /// (logged, counted in stats() and /metrics as salvaged_records), keep every other, and
    /// let anti-entropy and read repair refill what they held from peers [default: off: a node
    /// refuses to start over damage, naming the file and the offset].
    #[arg(long, conflicts_with = "in_memory")]
    pub salvage: bool,
    /// Do not log a line per request (an info event with the method and the key) [default:
    /// off: a line per request].
    #[arg(long)]
    pub quiet: bool,
    /// Log format: `text` (a line per event) or `json` (a JSON object per line); RUST_LOG
    /// (e.g. `warn`) sets the level in either.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Largest HTTP body accepted, in bytes; larger ones get HTTP 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// This node's HOST:PORT as balancers and peers name it [default: 127.0.0.1:PORT, or
    /// --bind's address:PORT when that is a specific address].
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Ignored, with a warning: keys are placed by 256 partitions (accepted so that command
    /// lines written for the ring of virtual nodes still start) [default: none].
    #[arg(long, value_name = "V")]
    pub vnodes: Option<usize>,
    /// Replicas per key, for a layout version 1 this node builds; a cluster's later versions
    /// keep its N [default: 3; the layout holds fewer while there are fewer nodes].
    #[arg(short = 'N', long = "replicas", value_name = "N")]
    pub replicas: Option<usize>,
    /// Time between anti-entropy rounds with the -s peers, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub aae_interval_ms: u64,
    /// Most keys one anti-entropy exchange with a peer repairs.
    #[arg(long, value_name = "K", default_value_t = 20_000)]
    pub aae_max_keys: usize,
    /// The failure domain this node is in (rack, room, data centre): where there are at
    /// least N zones, a partition's replicas are in N distinct zones.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub zone: String,
    /// Memory for the cache of recently read and written keys, in MiB (0: no cache; ignored
    /// with --in-memory).
    #[arg(long, value_name = "MB", default_value_t = 32)]
    pub cache_mb: u64,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// Says once, in the log, that `--vnodes` no longer does anything.
fn warn_vnodes(vnodes: Option<usize>) {
    if vnodes.is_some() {
        tracing::warn!(
            "--vnodes is ignored: keys are placed by {} partitions (see docs/architecture.md, Layout)",
            crate::layout::PARTITIONS
        );
    }
}

impl NodeArgs {
    pub fn into_config(self) -> Result<NodeConfig, ConfigError> {
        warn_vnodes(self.vnodes);
        let mut peers = Vec::with_capacity(self.servers.len());
        for server in &self.servers {
            peers.push(validate_address(server)?);
        }
        peers.sort();
        peers.dedup();
        if self.max_request_bytes < 1024 {
            return Err(ConfigError(
                "--max-request-bytes must be at least 1024".into(),
            ));
        }
        if self.aae_interval_ms == 0 || self.aae_max_keys == 0 {
            return Err(ConfigError(
                "--aae-interval-ms and --aae-max-keys must be at least 1".into(),
            ));
        }
        let advertise = match self.advertise {
            Some(address) => validate_address(&address)?,
            None if self.bind.is_unspecified() => format!("127.0.0.1:{}", self.port),
            None => std::net::SocketAddr::new(self.bind, self.port).to_string(),
        };
        let ring = if peers.is_empty() {
            None
        } else {
            Some(NodeRing::new(advertise.clone(), &peers, self.replicas)?)
        };
        let replicas = self.replicas.unwrap_or(3);
        if replicas == 0 {
            return Err(ConfigError("-N must be at least 1".into()));
        }
        let storage = if self.in_memory {
            StorageConfig::InMemory
        } else {
            let dir = self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(format!("dynamite-data/node-{}", self.port)));
            let engine = self.engine.unwrap_or_else(|| {
                if crate::storage::written_by_fjall(&dir) {
                    EngineChoice::Fjall
                } else {
                    EngineChoice::Log
                }
            });
            match (engine, self.salvage) {
                (EngineChoice::Fjall, true) => {
                    return Err(ConfigError(format!(
                        "--salvage applies to the log engine only, and {} is opened with \
                         fjall, which recovers its journal itself at start and cannot skip a \
                         damaged record and keep the rest: --salvage would change nothing",
                        dir.display()
                    )));
                }
                (EngineChoice::Fjall, false) => StorageConfig::Fjall { dir },
                (EngineChoice::Log, salvage) => StorageConfig::Log {
                    dir,
                    recovery: if salvage {
                        Recovery::Salvage
                    } else {
                        Recovery::Refuse
                    },
                },
            }
        };
        let listen = std::net::SocketAddr::new(self.bind, self.port);
        let security = self.security.into_security("storage_node", listen)?;
        Ok(NodeConfig {
            listen,
            security,
            peers,
            storage,
            log_requests: !self.quiet,
            max_request_bytes: self.max_request_bytes,
            ring,
            aae_interval: std::time::Duration::from_millis(self.aae_interval_ms),
            aae_max_keys: self.aae_max_keys,
            cache_bytes: if self.in_memory {
                0
            } else {
                self.cache_mb.saturating_mul(1024 * 1024)
            },
            advertise,
            zone: self.zone,
            replicas,
        })
    }
}

/// The storage engines a node can keep its data in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    Fjall,
    Log,
}

/// A Dynamite load balancer: sends each key to its storage nodes (the layout's replicas of its
/// partition) and answers once a quorum of them replied.
#[derive(Debug, Parser)]
#[command(name = "load_balancer", version)]
pub struct BalancerArgs {
    /// A storage node, HOST:PORT (repeatable, at least one): a seed from which the balancer
    /// learns the cluster's layout and follows every change [required].
    #[arg(
        short = 's',
        long = "server",
        value_name = "HOST:PORT",
        required = true
    )]
    pub servers: Vec<String>,
    /// Port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 30000)]
    pub port: u16,
    /// Replicas per key, for a layout version 1 this balancer builds when no node has a layout
    /// yet [default: 3, or the number of servers if fewer].
    #[arg(short = 'N', long = "replicas", value_name = "N")]
    pub replicas: Option<usize>,
    /// Replies a get waits for, at most the layout's N [default: majority of the layout's N].
    #[arg(short = 'R', long = "read-quorum", value_name = "R")]
    pub read_quorum: Option<usize>,
    /// Acknowledgements a put waits for, at most the layout's N [default: majority of the
    /// layout's N].
    #[arg(short = 'W', long = "write-quorum", value_name = "W")]
    pub write_quorum: Option<usize>,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// How long one replica may take before it counts as failed, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Ignored, with a warning: keys are placed by 256 partitions (accepted so that command
    /// lines written for the ring of virtual nodes still start) [default: none].
    #[arg(long, value_name = "V")]
    pub vnodes: Option<usize>,
    /// Largest HTTP body accepted, in bytes; larger ones get HTTP 413.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_bytes: usize,
    /// How long a deleted key's tombstones are kept once every replica has them, in
    /// milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub tombstone_grace_ms: u64,
    /// Log format: `text` (a line per event) or `json` (a JSON object per line); RUST_LOG
    /// (e.g. `warn`) sets the level in either.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub security: SecurityArgs,
}

impl BalancerArgs {
    pub fn into_config(self) -> Result<BalancerConfig, ConfigError> {
        warn_vnodes(self.vnodes);
        let listen = std::net::SocketAddr::new(self.bind, self.port);
        let security = self.security.into_security("load_balancer", listen)?;
        BalancerConfig::from_flags(BalancerFlags {
            security,
            bind: self.bind,
            port: self.port,
            servers: self.servers,
            replicas: self.replicas,
            read_quorum: self.read_quorum,
            write_quorum: self.write_quorum,
            timeout_ms: self.timeout_ms,
            max_request_bytes: self.max_request_bytes,
            tombstone_grace_ms: self.tombstone_grace_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_command_lines_parse() {
        let args = BalancerArgs::try_parse_from([
            "load_balancer",
            "-s",
            "127.0.0.1:20050",
            "-s",
            "127.0.0.1:20051",
            "-s",
            "127.0.0.1:20052",
        ])
        .expect("parses");
        let config = args.into_config().expect("valid");
        assert_eq!(config.listen.port(), 30000);
        assert_eq!(
            (config.replicas, config.read_quorum, config.write_quorum),
            (3, 2, 2)
        );
        let node = NodeArgs::try_parse_from(["storage_node", "-p", "20050"]).expect("parses");
        let config = node.into_config().expect("valid");
        assert_eq!(config.listen.port(), 20050);
        assert!(matches!(
            config.storage,
            StorageConfig::Log { ref dir, .. } | StorageConfig::Fjall { ref dir }
                if dir.ends_with("node-20050")
        ));
    }

    #[test]
    fn a_new_directory_gets_the_log_engine_unless_told_otherwise() {
        let parse = |extra: &[&str]| {
            let mut args = vec![
                "storage_node",
                "-p",
                "20050",
                "--data-dir",
                "/nonexistent/d",
            ];
            args.extend_from_slice(extra);
            let node = NodeArgs::try_parse_from(args).expect("parses");
            node.into_config().expect("valid").storage
        };
        let dir = PathBuf::from("/nonexistent/d");
        let log = |recovery| StorageConfig::Log {
            dir: dir.clone(),
            recovery,
        };
        assert_eq!(parse(&[]), log(Recovery::Refuse));
        assert_eq!(
            parse(&["--engine", "fjall"]),
            StorageConfig::Fjall { dir: dir.clone() }
        );
        assert_eq!(parse(&["--engine", "log"]), log(Recovery::Refuse));
        assert_eq!(parse(&["--salvage"]), log(Recovery::Salvage));
        assert!(
            NodeArgs::try_parse_from(["storage_node", "--in-memory", "--engine", "log"]).is_err()
        );
    }

    /// `--salvage` is the log engine's: with fjall it is refused (fjall recovers on its
    /// own and cannot skip a record), with --in-memory it is a usage error.
    #[test]
    fn salvage_is_for_the_log_engine_only() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["storage_node", "--data-dir", "/nonexistent/d", "--salvage"];
            args.extend_from_slice(extra);
            NodeArgs::try_parse_from(args).map(|node| node.into_config())
        };
        let refused = parse(&["--engine", "fjall"]).expect("parses");
        assert!(
            matches!(&refused, Err(ConfigError(reason)) if reason.contains("--salvage") && reason.contains("fjall")),
            "{refused:?}"
        );
        assert!(NodeArgs::try_parse_from(["storage_node", "--in-memory", "--salvage"]).is_err());
    }

    #[test]
    fn log_format_is_text_unless_told_json_on_both_daemons() {
        let node = |extra: &[&str]| {
            let mut args = vec!["storage_node"];
            args.extend_from_slice(extra);
            NodeArgs::try_parse_from(args).map(|args| args.log_format)
        };
        let balancer = |extra: &[&str]| {
            let mut args = vec!["load_balancer", "-s", "127.0.0.1:20050"];
            args.extend_from_slice(extra);
            BalancerArgs::try_parse_from(args).map(|args| args.log_format)
        };
        assert_eq!(node(&[]).expect("parses"), LogFormat::Text);
        assert_eq!(balancer(&[]).expect("parses"), LogFormat::Text);
        let json = ["--log-format", "json"];
        assert_eq!(node(&json).expect("parses"), LogFormat::Json);
        assert_eq!(balancer(&json).expect("parses"), LogFormat::Json);
        assert!(node(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        assert!(BalancerArgs::try_parse_from(["load_balancer"]).is_err());
        assert!(NodeArgs::try_parse_from(["storage_node", "-p", "notaport"]).is_err());
        assert!(
            NodeArgs::try_parse_from(["storage_node", "--in-memory", "--data-dir", "x"]).is_err()
        );
    }
}
