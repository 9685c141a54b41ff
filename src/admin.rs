//! `dynamite`, the admin command: a person's view of a cluster's membership (docs/protocol.md,
//! Membership) and of where a key lives (`explain`).
//!
//! The command is a thin client of the admin methods every daemon answers. A subcommand
//! becomes one or two XML-RPC calls ([`execute`]); the answer becomes text a person reads
//! (tables) or one JSON document a script reads ([`to_json`]).
//!
//! Answers are rendered from whatever struct the server sends, not from a fixed Rust type: the
//! fields the command knows come first, in the order a person expects, and fields it does not
//! know yet are still shown (extra columns, extra lines). So an older `dynamite` stays useful
//! against a newer daemon, and `explain`, whose struct is still growing, needs no code here
//! when it gains a field.
//!
//! Everything here but [`run`] is pure: [`execute`] takes the transport as a closure, so the
//! flows of several calls (`layout apply` reads the layout first) are tested without a network.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use comfy_table::{CellAlignment, Table, presets};
use dxr::Value;

use crate::rpc::client::{CallError, RpcClient};
use crate::rpc::codec::int_value;

/// The balancer's default listening address: where `-s` points when it is not given.
pub const DEFAULT_SERVER: &str = "127.0.0.1:30000";
/// Longest wait for a TCP connection when finding out why a server could not be reached.
const CONNECT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const ABOUT: &str = "Administer a Dynamite cluster: its status, its layout (membership), \
                     and where a key lives.";
const AFTER_HELP: &str = "\
Examples:
  dynamite status
  dynamite -s 10.0.0.1:25000 layout add 10.0.0.4:25000 --zone b --weight 2
  dynamite layout show
  dynamite layout apply
  dynamite --json explain user:42

-s may name any storage node or load balancer of the cluster: every daemon answers the admin
methods. Exit status: 0 on success, 1 when the server refused or could not be reached, 2 on a
usage error.";

/// The `dynamite` command line.
#[derive(Debug, Parser)]
#[command(
    name = "dynamite",
    version,
    about = ABOUT,
    after_help = AFTER_HELP,
    arg_required_else_help = true
)]
pub struct AdminArgs {
    /// Any storage node or load balancer of the cluster.
    #[arg(
        short = 's',
        long = "server",
        value_name = "HOST:PORT",
        default_value = DEFAULT_SERVER,
        value_parser = parse_address,
        global = true
    )]
    pub server: String,
    /// Print the server's answer as one JSON document (struct → object, array → array, nil →
    /// null, base64 and dateTime → string) instead of tables [default: off: tables].
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for each answer, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..),
        global = true
    )]
    pub timeout_ms: u64,
    /// The cluster's secret file, as the daemons have it: `cluster.*` needs it when the
    /// cluster has one [default: none: calls carry no secret].
    #[arg(long, value_name = "FILE", global = true)]
    pub cluster_secret_file: Option<std::path::PathBuf>,
    /// The CA certificates (PEM) to trust: the server is then called over HTTPS [default:
    /// plain HTTP].
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client user, for a cluster with passwords and no cluster secret [default: none: no
    /// credentials sent].
    #[arg(
        long,
        value_name = "USER",
        requires = "auth_password_file",
        global = true
    )]
    pub auth_user: Option<String>,
    /// The file holding the password of --auth-user (its first line) [default: none; required
    /// with --auth-user].
    #[arg(long, value_name = "FILE", requires = "auth_user", global = true)]
    pub auth_password_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Show every node: up or down, the layout version it runs, partitions it still has to
    /// receive, keys it holds.
    #[command(
        long_about = "Show the cluster's layout version, whether a transition is \
                            running, and every node: its zone, up or down, the layout version it \
                            runs, how many partitions it still has to receive (syncing) and how \
                            many keys it holds. A transition is over when no node is syncing."
    )]
    Status,
    /// Show or change the layout: the nodes, their zones and weights.
    #[command(
        subcommand,
        long_about = "Show or change the layout: the nodes that hold data, their zones and \
                      weights. Changes are staged first (add, remove), shown (show), then applied \
                      together as the next layout version (apply), or dropped (revert).",
        after_help = "A change takes three steps:\n  \
                      dynamite layout add 10.0.0.4:25000 --zone b\n  \
                      dynamite layout show\n  \
                      dynamite layout apply"
    )]
    Layout(LayoutCommand),
    /// Show where KEY lives: its partition, its replicas, the versions each one stores.
    #[command(
        long_about = "Show where KEY lives: its partition, its replicas in every live \
                            layout version (preferred or fallback, up or down), the versions each \
                            replica stores (clock, timestamp, size, tombstone) and the hints held \
                            for it. Ask a load balancer. Put `--` before a key that starts with \
                            '-'."
    )]
    Explain {
        /// The key: any string, the empty one included.
        key: String,
    },
}

/// What to do with the layout.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum LayoutCommand {
    /// Show the current layout and the staged changes.
    #[command(
        long_about = "Show the current layout: its version, N (replicas per key), the \
                            number of partitions, whether a transition is running, its nodes \
                            (address, zone, weight) and the changes staged for the next version."
    )]
    Show,
    /// Stage a node to join, or to change its zone or weight.
    #[command(
        long_about = "Stage a node to join the layout, or to change its zone or weight \
                            if it is already a member. Nothing moves until `layout apply`. The \
                            node must be running, started with -s naming a member. Without \
                            --zone and --weight the server picks them; with one of them, the \
                            other defaults to zone \"\" or weight 1."
    )]
    Add {
        /// The node's HOST:PORT, spelled as the other daemons name it.
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        address: String,
        /// The node's zone (a rack, a room, a data centre): replicas of a key go to distinct
        /// zones where there are enough [default: the node's own --zone, or "" when --weight
        /// is given].
        #[arg(long, value_name = "Z")]
        zone: Option<String>,
        /// The node's weight: its share of partitions grows with it [default: 1].
        #[arg(long, value_name = "W", value_parser = clap::value_parser!(i32).range(0..))]
        weight: Option<i32>,
    },
    /// Stage a node to leave.
    #[command(
        long_about = "Stage a node to leave the layout. After `layout apply` its \
                            partitions move to the remaining nodes; once `dynamite status` shows no \
                            transition, it holds nothing and may be stopped. A node that is down \
                            for good is moved out the same way: the survivors re-replicate its \
                            partitions from the remaining copies."
    )]
    Remove {
        /// The node's HOST:PORT, as `layout show` names it.
        #[arg(value_name = "ADDRESS", value_parser = parse_address)]
        address: String,
    },
    /// Drop every staged change.
    Revert,
    /// Apply the staged changes as the next layout version.
    #[command(
        long_about = "Apply the staged changes as the next layout version. Partitions \
                            that change hands move in the background while every request keeps \
                            its usual meaning; watch the transition with `dynamite status`. Of two \
                            racing applies exactly one wins: the other is refused."
    )]
    Apply {
        /// The version to create; it must be the current version + 1 [default: read the
        /// current version from the server and add 1].
        #[arg(long, value_name = "V", value_parser = clap::value_parser!(i64).range(1..))]
        version: Option<i64>,
    },
}

/// `-s` and ADDRESS: HOST:PORT, spelled as given (the layout hashes the text).
fn parse_address(text: &str) -> Result<String, String> {
    crate::config::validate_address(text).map_err(|error| error.to_string())
}

/// Why a command failed; printed as `error: {self}`, exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// The server answered with a fault.
    #[error("{message} (fault {code})")]
    Fault { code: i32, message: String },
    /// No answer: no connection, or none within the timeout.
    #[error("cannot reach {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// Something answered, but not a Dynamite daemon's XML-RPC answer.
    #[error("{address} answered {what}")]
    BadAnswer { address: String, what: String },
    /// The security flags cannot be used.
    #[error("{0}")]
    Usage(String),
}

impl AdminError {
    /// The error a failed call to `address` becomes.
    fn from_call(address: &str, error: CallError, timeout: Duration) -> Self {
        let address = address.to_owned();
        match error {
            CallError::Fault { code, message } => AdminError::Fault { code, message },
            CallError::Transport(reason) | CallError::Unsent(reason) => {
                AdminError::Unreachable { address, reason }
            }
            CallError::Timeout => AdminError::Unreachable {
                address,
                reason: format!("no answer within {} ms", timeout.as_millis()),
            },
            CallError::Status(401) => AdminError::BadAnswer {
                address,
                what: "HTTP 401: it needs credentials (--cluster-secret-file, or \
                       --auth-user and --auth-password-file)"
                    .into(),
            },
            CallError::Status(403) => AdminError::BadAnswer {
                address,
                what: "HTTP 403: it refused the cluster secret of --cluster-secret-file".into(),
            },
            CallError::Status(status) => AdminError::BadAnswer {
                address,
                what: format!("HTTP status {status}: is it a Dynamite daemon?"),
            },
            other => AdminError::BadAnswer {
                address,
                what: format!("in a way this command cannot read ({other})"),
            },
        }
    }
}

/// What a successful command prints: `text` on stdout, each warning on stderr.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Output {
    pub text: String,
    pub warnings: Vec<String>,
}

/// Runs the command against `args.server` over XML-RPC.
pub async fn run(args: &AdminArgs) -> Result<Output, AdminError> {
    let files = crate::security::SecurityFiles {
        auth_user: args.auth_user.clone(),
        auth_password_file: args.auth_password_file.clone(),
        cluster_secret_file: args.cluster_secret_file.clone(),
        tls_ca: args.tls_ca.clone(),
        ..Default::default()
    };
    let (security, file_warnings) = crate::security::Security::from_files(&files)
        .map_err(|error| AdminError::Usage(error.0))?;
    let client = RpcClient::with_outgoing(&security.outgoing);
    let timeout = Duration::from_millis(args.timeout_ms);
    let server = args.server.as_str();
    let mut output = execute(args, async |method, params| {
        match client.call(server, method, params, timeout).await {
            Err(CallError::Transport(reason) | CallError::Unsent(reason)) => {
                Err(CallError::Transport(why_unreachable(server, reason).await))
            }
            answer => answer,
        }
    })
    .await?;
    output.warnings.splice(0..0, file_warnings);
    Ok(output)
}

/// A readable reason for a failed connection: hyper's error only says "client error
/// (Connect)", so connect once more and report what the operating system said.
async fn why_unreachable(address: &str, transport: String) -> String {
    match tokio::time::timeout(
        CONNECT_PROBE_TIMEOUT,
        tokio::net::TcpStream::connect(address),
    )
    .await
    {
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!(
            "no connection within {} ms",
            CONNECT_PROBE_TIMEOUT.as_millis()
        ),
        // It accepts connections now: the exchange itself failed.
        Ok(Ok(_)) => transport,
    }
}

/// Runs the command, calling methods on the server through `call`, and renders the answer.
///
/// With `--json` the output is the answer of the command's own call (for `layout add`, the
/// `"200"` of `cluster.stage_add`), with no extra calls after it.
pub async fn execute(
    args: &AdminArgs,
    mut call: impl AsyncFnMut(&'static str, Vec<Value>) -> Result<Value, CallError>,
) -> Result<Output, AdminError> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let server = args.server.as_str();
    let mut ask = async |method: &'static str, params: Vec<Value>| {
        call(method, params)
            .await
            .map_err(|error| AdminError::from_call(server, error, timeout))
    };
    // The answer as JSON, or as `human` renders it for a person.
    let render = |answer: &Value, human: &dyn Fn(&Value) -> String| Output {
        text: if args.json {
            to_json(answer) + "\n"
        } else {
            human(answer)
        },
        warnings: Vec::new(),
    };
    match &args.command {
        Command::Status => Ok(render(
            &ask("cluster.status", vec![]).await?,
            &render_status,
        )),
        Command::Explain { key } => Ok(render(
            &ask("explain", vec![Value::String(key.clone())]).await?,
            &render_generic,
        )),
        Command::Layout(LayoutCommand::Show) => {
            Ok(render(&ask("cluster.layout", vec![]).await?, &|layout| {
                render_layout(layout) + &staged_hint(layout, server)
            }))
        }
        Command::Layout(LayoutCommand::Apply { version }) => {
            let version = match version {
                Some(version) => *version,
                None => {
                    let layout = ask("cluster.layout", vec![]).await?;
                    next_version(&layout).ok_or_else(|| AdminError::BadAnswer {
                        address: server.to_owned(),
                        what: "cluster.layout() without an integer version".into(),
                    })?
                }
            };
            Ok(render(
                &ask("cluster.apply", vec![int_value(version)]).await?,
                &|answer| render_apply(answer, version, server),
            ))
        }
        Command::Layout(change) => {
            let Some((method, params, done)) = stage_call(change) else {
                // Show and Apply, matched above: not changes.
                return Ok(Output::default());
            };
            let answer = ask(method, params).await?;
            if args.json {
                return Ok(render(&answer, &|_| String::new()));
            }
            let mut output = Output {
                text: done + "\n",
                warnings: Vec::new(),
            };
            match ask("cluster.layout", vec![]).await {
                Ok(layout) => {
                    output.text += &render_staged(&layout);
                    output.text += &staged_hint(&layout, server);
                }
                Err(error) => output
                    .warnings
                    .push(format!("cannot show the staged changes: {error}")),
            }
            Ok(output)
        }
    }
}

/// The call that stages `change`, and the line that says it was done; `None` for `show` and
/// `apply`, which stage nothing.
///
/// `cluster.stage_add` takes the address alone, or the address with a zone and a weight: when
/// only one of `--zone` and `--weight` is given, the other is zone `""` or weight 1.
pub fn stage_call(change: &LayoutCommand) -> Option<(&'static str, Vec<Value>, String)> {
    let stage = match change {
        LayoutCommand::Add {
            address,
            zone: None,
            weight: None,
        } => (
            "cluster.stage_add",
            vec![Value::String(address.clone())],
            format!("staged: add {address}"),
        ),
        LayoutCommand::Add {
            address,
            zone,
            weight,
        } => {
            let zone = zone.clone().unwrap_or_default();
            let weight = weight.unwrap_or(1);
            let line = format!(
                "staged: add {address} (zone {}, weight {weight})",
                display_string(&zone)
            );
            (
                "cluster.stage_add",
                vec![
                    Value::String(address.clone()),
                    Value::String(zone),
                    Value::Integer(weight),
                ],
                line,
            )
        }
        LayoutCommand::Remove { address } => (
            "cluster.stage_remove",
            vec![Value::String(address.clone())],
            format!("staged: remove {address}"),
        ),
        LayoutCommand::Revert => (
            "cluster.stage_revert",
            vec![],
            "staged changes dropped".to_owned(),
        ),
        LayoutCommand::Show | LayoutCommand::Apply { .. } => return None,
    };
    Some(stage)
}

/// The version `layout apply` creates when none is given: the current one + 1.
pub fn next_version(layout: &Value) -> Option<i64> {
    integer(field(layout, "version")?)?.checked_add(1)
}

// ---------------------------------------------------------------------------------------------
// Human output
// ---------------------------------------------------------------------------------------------

/// Columns of `cluster.status()`'s nodes, in this order; others the server adds follow.
const STATUS_COLUMNS: &[&str] = &[
    "address",
    "zone",
    "state",
    "layout_version",
    "syncing",
    "keys",
];
/// Columns of `cluster.layout()`'s nodes.
const NODE_COLUMNS: &[&str] = &["address", "zone", "weight"];
/// Columns of `cluster.layout()`'s staged changes.
const STAGED_COLUMNS: &[&str] = &["op", "address", "zone", "weight"];

/// `cluster.status()`: the version, the transition, a table of the nodes.
pub fn render_status(status: &Value) -> String {
    let Value::Struct(fields) = status else {
        return render_generic(status);
    };
    let mut out = String::new();
    line(
        &mut out,
        0,
        &labelled("layout version", fields.get("version")),
    );
    line(
        &mut out,
        0,
        &labelled("transition", fields.get("transition")),
    );
    write_records(&mut out, "nodes", fields.get("nodes"), STATUS_COLUMNS);
    write_rest(&mut out, fields, &["version", "transition", "nodes"]);
    out
}

/// `cluster.layout()`: the version, N, partitions, the transition, the nodes, the staged
/// changes.
pub fn render_layout(layout: &Value) -> String {
    let Value::Struct(fields) = layout else {
        return render_generic(layout);
    };
    let mut out = String::new();
    line(
        &mut out,
        0,
        &labelled("layout version", fields.get("version")),
    );
    line(
        &mut out,
        0,
        &labelled("replicas (N)", fields.get("replicas")),
    );
    line(
        &mut out,
        0,
        &labelled("partitions", fields.get("partitions")),
    );
    line(
        &mut out,
        0,
        &labelled("transition", fields.get("transition")),
    );
    write_records(&mut out, "nodes", fields.get("nodes"), NODE_COLUMNS);
    out += &render_staged(layout);
    write_rest(
        &mut out,
        fields,
        &[
            "version",
            "replicas",
            "partitions",
            "transition",
            "nodes",
            "staged",
        ],
    );
    out
}

/// The staged changes of a `cluster.layout()` answer, after a blank line: a table, or "no
/// staged changes".
pub fn render_staged(layout: &Value) -> String {
    let mut out = String::new();
    match field(layout, "staged") {
        Some(Value::Array(changes)) if changes.is_empty() => {
            line(&mut out, 0, "\nno staged changes")
        }
        staged => write_records(&mut out, "staged changes", staged, STAGED_COLUMNS),
    }
    out
}

/// After the staged changes, how to apply them (nothing when none are staged).
fn staged_hint(layout: &Value, server: &str) -> String {
    match field(layout, "staged") {
        Some(Value::Array(changes)) if !changes.is_empty() => format!(
            "apply them with `dynamite -s {server} layout apply`, or drop them with \
             `dynamite -s {server} layout revert`\n"
        ),
        _ => String::new(),
    }
}

/// `cluster.apply(version)`'s `{version, moved}`, and how to follow the transition.
pub fn render_apply(answer: &Value, requested: i64, server: &str) -> String {
    let version = field(answer, "version")
        .and_then(integer)
        .unwrap_or(requested);
    let moved = match field(answer, "moved").and_then(integer) {
        Some(1) => "1 partition replica moves".to_owned(),
        Some(moved) => format!("{moved} partition replicas move"),
        None => "partition replicas move".to_owned(),
    };
    format!(
        "applied layout version {version}: {moved}\n\
         watch the transition with `dynamite -s {server} status` until no node is syncing\n"
    )
}

/// Any answer, rendered without knowing its shape: a struct's scalar fields as `name: value`
/// lines, arrays of flat structs as tables (the union of their fields as columns), nested
/// structs indented under their name, other arrays as `- ` lists.
pub fn render_generic(value: &Value) -> String {
    let mut out = String::new();
    write_block(&mut out, value, 0);
    out
}

/// `label: value`, or `label: -` where the field is missing.
fn labelled(label: &str, value: Option<&Value>) -> String {
    format!(
        "{:<15} {}",
        format!("{label}:"),
        value.map_or("-".into(), inline)
    )
}

/// `title:` and a table of `records` (structs), or `title: none`, or the value as it came if
/// it is not an array of structs.
fn write_records(out: &mut String, title: &str, records: Option<&Value>, columns: &[&str]) {
    out.push('\n');
    match records {
        None => line(out, 0, &format!("{title}: -")),
        Some(Value::Array(items)) if items.is_empty() => line(out, 0, &format!("{title}: none")),
        Some(Value::Array(items)) if items.iter().all(|item| matches!(item, Value::Struct(_))) => {
            line(out, 0, &format!("{title} ({}):", items.len()));
            write_table(out, items, columns, 0);
        }
        Some(other) => write_field(out, title, other, 0),
    }
}

/// The fields of `fields` not in `shown`, generically: nothing the server sends is hidden.
fn write_rest(out: &mut String, fields: &BTreeMap<String, Value>, shown: &[&str]) {
    let rest: BTreeMap<String, Value> = fields
        .iter()
        .filter(|(name, _)| !shown.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    if !rest.is_empty() {
        out.push('\n');
        write_struct(out, &rest, 0);
    }
}

/// A value as a block of lines at `indent`.
fn write_block(out: &mut String, value: &Value, indent: usize) {
    match value {
        Value::Struct(fields) if !fields.is_empty() => write_struct(out, fields, indent),
        Value::Array(items) if is_table(items) => write_table(out, items, &[], indent),
        Value::Array(items) if !is_inline(value) => {
            for item in items {
                // Each item as a block, its first line marked `- ` like a YAML list.
                let mut block = String::new();
                write_block(&mut block, item, indent + 2);
                let first = " ".repeat(indent) + "- ";
                out.push_str(&first);
                out.push_str(block.get(first.len()..).unwrap_or(""));
            }
        }
        other => line(out, indent, &inline(other)),
    }
}

/// A struct's fields: those that fit on a line first, then the nested ones, each in name order.
fn write_struct(out: &mut String, fields: &BTreeMap<String, Value>, indent: usize) {
    let (flat, nested): (Vec<_>, Vec<_>) = fields.iter().partition(|(_, value)| is_inline(value));
    for (name, value) in flat {
        line(out, indent, &format!("{name}: {}", inline(value)));
    }
    for (name, value) in nested {
        write_field(out, name, value, indent);
    }
}

/// `name:` and the value's block under it, or `name: value` when it fits on the line.
fn write_field(out: &mut String, name: &str, value: &Value, indent: usize) {
    if is_inline(value) {
        line(out, indent, &format!("{name}: {}", inline(value)));
    } else {
        line(out, indent, &format!("{name}:"));
        write_block(out, value, indent + 2);
    }
}

/// A table of structs: the `preferred` columns first (shown even where no struct has them),
/// then every other field in the order first met. Numeric columns are right-aligned.
fn write_table(out: &mut String, items: &[Value], preferred: &[&str], indent: usize) {
    let mut columns: Vec<&str> = preferred.to_vec();
    for item in items {
        if let Value::Struct(fields) = item {
            for name in fields.keys() {
                if !columns.contains(&name.as_str()) {
                    columns.push(name);
                }
            }
        }
    }
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(columns.iter().copied());
    for item in items {
        table.add_row(
            columns
                .iter()
                .map(|column| field(item, column).map_or("-".into(), cell)),
        );
    }
    for (index, column) in columns.iter().enumerate() {
        let numeric = items.iter().all(|item| {
            matches!(
                field(item, column),
                None | Some(Value::Integer(_) | Value::Long(_) | Value::Double(_))
            )
        });
        if numeric && let Some(column) = table.column_mut(index) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    for table_line in table.lines() {
        line(out, indent, &table_line);
    }
}

/// Is `items` a table: structs whose fields all fit in a cell?
fn is_table(items: &[Value]) -> bool {
    !items.is_empty()
        && items.iter().all(|item| match item {
            Value::Struct(fields) => fields.values().all(fits_cell),
            _ => false,
        })
}

/// Does a value fit in a table cell: a scalar, or an array or struct of scalars?
fn fits_cell(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().all(is_scalar),
        Value::Struct(fields) => fields.values().all(is_scalar),
        _ => true,
    }
}

/// Does a value fit after `name: ` on one line: a scalar, an empty array or struct, an array
/// of scalars?
fn is_inline(value: &Value) -> bool {
    match value {
        Value::Array(items) => items.iter().all(is_scalar),
        Value::Struct(fields) => fields.is_empty(),
        _ => true,
    }
}

fn is_scalar(value: &Value) -> bool {
    !matches!(value, Value::Array(_) | Value::Struct(_))
}

/// A value on one line: scalars as [`scalar`], an array of scalars as `a, b, c`, `none` for
/// nothing.
fn inline(value: &Value) -> String {
    match value {
        Value::Array(items) if items.is_empty() => "none".into(),
        Value::Struct(fields) if fields.is_empty() => "none".into(),
        other => compact(other),
    }
}

/// A value in a table cell.
fn cell(value: &Value) -> String {
    compact(value)
}

/// Any value on one line: arrays as `a, b` (bracketed when nested), structs as `{a: 1, b: 2}`.
fn compact(value: &Value) -> String {
    fn nested(value: &Value) -> String {
        match value {
            Value::Array(_) => format!("[{}]", compact(value)),
            other => compact(other),
        }
    }
    match value {
        Value::Array(items) => items.iter().map(nested).collect::<Vec<_>>().join(", "),
        Value::Struct(fields) => {
            let members: Vec<String> = fields
                .iter()
                .map(|(name, value)| format!("{name}: {}", nested(value)))
                .collect();
            format!("{{{}}}", members.join(", "))
        }
        scalar => display_scalar(scalar),
    }
}

/// A scalar for a person: booleans as yes/no, nil as `-`, strings bare unless they are empty
/// or hold control characters (then quoted and escaped, so one value stays on one line).
fn display_scalar(value: &Value) -> String {
    match value {
        Value::Integer(n) => n.to_string(),
        Value::Long(n) => n.to_string(),
        Value::Boolean(true) => "yes".into(),
        Value::Boolean(false) => "no".into(),
        Value::String(text) => display_string(text),
        Value::Double(x) => format!("{x:?}"),
        Value::DateTime(moment) => moment.to_string(),
        Value::Base64(bytes) => format!("base64:{}", base64_text(bytes)),
        Value::Nil => "-".into(),
        other => compact_unknown(other),
    }
}

/// A string for a person: bare, or JSON-quoted when empty or holding control characters.
fn display_string(text: &str) -> String {
    if text.is_empty() || text.chars().any(char::is_control) {
        let mut quoted = String::with_capacity(text.len() + 2);
        write_json_string(&mut quoted, text);
        quoted
    } else {
        text.to_owned()
    }
}

/// A value of a kind newer than this code (dxr's `Value` is non-exhaustive): its XML.
fn compact_unknown(value: &Value) -> String {
    value.to_xml().unwrap_or_else(|_| "?".into())
}

/// One line at `indent`.
fn line(out: &mut String, indent: usize, text: &str) {
    let _ = writeln!(out, "{:indent$}{text}", "");
}

/// A struct's member, if `value` is a struct that has it.
fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Struct(fields) => fields.get(name),
        _ => None,
    }
}

/// An `int` or `i8` as an i64.
fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Integer(n) => Some(i64::from(*n)),
        Value::Long(n) => Some(*n),
        _ => None,
    }
}

fn base64_text(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

// ---------------------------------------------------------------------------------------------
// JSON output
// ---------------------------------------------------------------------------------------------

/// An XML-RPC value as one compact JSON document: struct → object, array → array, string,
/// int, i8, boolean and double → JSON scalars (a double that is not finite → null), nil →
/// null, base64 → its base64 text, dateTime → its ISO 8601 text as XML-RPC writes it.
pub fn to_json(value: &Value) -> String {
    let mut out = String::new();
    write_json(&mut out, value);
    out
}

fn write_json(out: &mut String, value: &Value) {
    match value {
        Value::Integer(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Long(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::String(text) => write_json_string(out, text),
        // `{:?}` writes the shortest text that reads back as the same double, always with a
        // `.` or an exponent (`1.0`, `1e300`): valid JSON numbers.
        Value::Double(x) if x.is_finite() => {
            let _ = write!(out, "{x:?}");
        }
        Value::Double(_) | Value::Nil => out.push_str("null"),
        Value::DateTime(moment) => write_json_string(out, &moment.to_string()),
        Value::Base64(bytes) => write_json_string(out, &base64_text(bytes)),
        Value::Struct(fields) => {
            out.push('{');
            for (i, (name, member)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json_string(out, name);
                out.push(':');
                write_json(out, member);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        other => write_json_string(out, &compact_unknown(other)),
    }
}

/// `text` as a JSON string (RFC 8259, section 7): quotes, backslashes and the control
/// characters U+0000..U+001F escaped, everything else (non-ASCII included) written as UTF-8.
pub fn write_json_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c < '\u{20}' => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;

    use proptest::prelude::*;

    fn s(text: &str) -> Value {
        Value::String(text.into())
    }

    fn int(n: i32) -> Value {
        Value::Integer(n)
    }

    fn strukt(members: &[(&str, Value)]) -> Value {
        Value::Struct(
            members
                .iter()
                .map(|(name, value)| (name.to_string(), value.clone()))
                .collect(),
        )
    }

    fn parse(args: &[&str]) -> Result<AdminArgs, clap::Error> {
        AdminArgs::try_parse_from(std::iter::once("dynamite").chain(args.iter().copied()))
    }

    fn sample_status() -> Value {
        strukt(&[
            ("version", int(4)),
            ("transition", Value::Boolean(true)),
            (
                "nodes",
                Value::Array(vec![
                    strukt(&[
                        ("address", s("10.0.0.1:25000")),
                        ("zone", s("a")),
                        ("state", s("up")),
                        ("layout_version", int(4)),
                        ("syncing", int(0)),
                        ("keys", Value::Long(1_204_331)),
                    ]),
                    strukt(&[
                        ("address", s("10.0.0.2:25000")),
                        ("zone", s("b")),
                        ("state", s("up")),
                        ("layout_version", int(4)),
                        ("syncing", int(17)),
                        ("keys", int(1_187_020)),
                    ]),
                    strukt(&[
                        ("address", s("10.0.0.3:25000")),
                        ("zone", s("")),
                        ("state", s("down")),
                        ("layout_version", int(3)),
                        ("syncing", int(0)),
                        ("keys", int(0)),
                    ]),
                ]),
            ),
        ])
    }

    fn sample_layout(staged: Vec<Value>) -> Value {
        strukt(&[
            ("version", int(4)),
            ("partitions", int(256)),
            ("replicas", int(3)),
            ("transition", Value::Boolean(false)),
            (
                "nodes",
                Value::Array(vec![
                    strukt(&[
                        ("address", s("10.0.0.1:25000")),
                        ("zone", s("a")),
                        ("weight", int(1)),
                    ]),
                    strukt(&[
                        ("address", s("10.0.0.2:25000")),
                        ("zone", s("b")),
                        ("weight", int(2)),
                    ]),
                ]),
            ),
            ("staged", Value::Array(staged)),
        ])
    }

    fn staged_add() -> Value {
        strukt(&[
            ("op", s("add")),
            ("address", s("10.0.0.4:25000")),
            ("zone", s("c")),
            ("weight", int(1)),
        ])
    }

    #[test]
    fn flags_parse_with_defaults_and_globals_anywhere() {
        let args = parse(&["status"]).expect("parses");
        assert_eq!(args.server, DEFAULT_SERVER);
        assert!(!args.json);
        assert_eq!(args.timeout_ms, 10_000);
        assert_eq!(args.command, Command::Status);

        let args =
            parse(&["layout", "add", "h:1", "--zone", "a", "-s", "x:2", "--json"]).expect("parses");
        assert_eq!(args.server, "x:2");
        assert!(args.json);
        assert_eq!(
            args.command,
            Command::Layout(LayoutCommand::Add {
                address: "h:1".into(),
                zone: Some("a".into()),
                weight: None
            })
        );

        let args = parse(&["--timeout-ms", "250", "explain", "--", "-odd key"]).expect("parses");
        assert_eq!(args.timeout_ms, 250);
        assert_eq!(
            args.command,
            Command::Explain {
                key: "-odd key".into()
            }
        );
        let args = parse(&["explain", ""]).expect("the empty key is a key");
        assert_eq!(args.command, Command::Explain { key: "".into() });
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &[][..],
            &["frobnicate"],
            &["layout"],
            &["layout", "add"],
            &["layout", "add", "no-port"],
            &["layout", "add", "h:1", "--weight", "-1"],
            &["layout", "remove", "h:0"],
            &["layout", "apply", "--version", "0"],
            &["-s", "nowhere", "status"],
            &["--timeout-ms", "0", "status"],
            &["explain"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?} must be refused"));
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn stage_add_sends_zone_and_weight_only_when_one_is_given() {
        let add = |zone: Option<&str>, weight: Option<i32>| {
            let (method, params, _) = stage_call(&LayoutCommand::Add {
                address: "h:1".into(),
                zone: zone.map(str::to_owned),
                weight,
            })
            .expect("a change");
            assert_eq!(method, "cluster.stage_add");
            params
        };
        assert_eq!(add(None, None), vec![s("h:1")]);
        assert_eq!(add(Some("b"), None), vec![s("h:1"), s("b"), int(1)]);
        assert_eq!(add(None, Some(3)), vec![s("h:1"), s(""), int(3)]);
        assert_eq!(add(Some("b"), Some(0)), vec![s("h:1"), s("b"), int(0)]);
        assert_eq!(
            stage_call(&LayoutCommand::Remove {
                address: "h:1".into()
            }),
            Some((
                "cluster.stage_remove",
                vec![s("h:1")],
                "staged: remove h:1".into()
            ))
        );
        assert_eq!(
            stage_call(&LayoutCommand::Revert).map(|stage| stage.0),
            Some("cluster.stage_revert")
        );
        assert_eq!(stage_call(&LayoutCommand::Show), None);
    }

    type Reply = Result<Value, CallError>;

    /// Runs `args` against a server that expects exactly `script`'s calls, in order.
    fn run_script(
        args: &[&str],
        script: Vec<(&'static str, Vec<Value>, Reply)>,
    ) -> Result<Output, AdminError> {
        let args = parse(args).expect("parses");
        let mut script = VecDeque::from(script);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let result = runtime.block_on(execute(&args, async |method, params| {
            let (expected, expected_params, reply) = script
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected call {method}"));
            assert_eq!((method, &params), (expected, &expected_params));
            reply
        }));
        assert!(script.is_empty(), "calls not made: {script:?}");
        result
    }

    #[test]
    fn apply_without_version_applies_the_next_one() {
        let output = run_script(
            &["-s", "h:9", "layout", "apply"],
            vec![
                ("cluster.layout", vec![], Ok(sample_layout(vec![]))),
                (
                    "cluster.apply",
                    vec![int(5)],
                    Ok(strukt(&[("version", int(5)), ("moved", int(12))])),
                ),
            ],
        )
        .expect("applies");
        assert_eq!(
            output.text,
            "applied layout version 5: 12 partition replicas move\n\
             watch the transition with `dynamite -s h:9 status` until no node is syncing\n"
        );
    }

    #[test]
    fn apply_with_version_makes_one_call_and_json_prints_the_answer() {
        let output = run_script(
            &["--json", "layout", "apply", "--version", "7"],
            vec![(
                "cluster.apply",
                vec![int(7)],
                Ok(strukt(&[("version", int(7)), ("moved", int(1))])),
            )],
        )
        .expect("applies");
        assert_eq!(output.text, "{\"moved\":1,\"version\":7}\n");
    }

    #[test]
    fn apply_refused_is_the_servers_fault() {
        let error = run_script(
            &["layout", "apply", "--version", "3"],
            vec![(
                "cluster.apply",
                vec![int(3)],
                Err(CallError::Fault {
                    code: -32602,
                    message: "layout version 3 is not the current version + 1 (4)".into(),
                }),
            )],
        )
        .expect_err("refused");
        assert_eq!(
            error.to_string(),
            "layout version 3 is not the current version + 1 (4) (fault -32602)"
        );
    }

    #[test]
    fn apply_against_a_layout_without_version_says_so() {
        let error = run_script(
            &["-s", "h:9", "layout", "apply"],
            vec![("cluster.layout", vec![], Ok(s("200")))],
        )
        .expect_err("no version");
        assert_eq!(
            error.to_string(),
            "h:9 answered cluster.layout() without an integer version"
        );
    }

    #[test]
    fn a_change_is_followed_by_the_staged_changes() {
        let output = run_script(
            &[
                "-s",
                "h:9",
                "layout",
                "add",
                "10.0.0.4:25000",
                "--zone",
                "c",
            ],
            vec![
                (
                    "cluster.stage_add",
                    vec![s("10.0.0.4:25000"), s("c"), int(1)],
                    Ok(s("200")),
                ),
                (
                    "cluster.layout",
                    vec![],
                    Ok(sample_layout(vec![staged_add()])),
                ),
            ],
        )
        .expect("staged");
        assert_eq!(
            output.text,
            "\
staged: add 10.0.0.4:25000 (zone c, weight 1)

staged changes (1):
┌─────┬────────────────┬──────┬────────┐
│ op  ┆ address        ┆ zone ┆ weight │
╞═════╪════════════════╪══════╪════════╡
│ add ┆ 10.0.0.4:25000 ┆ c    ┆      1 │
└─────┴────────────────┴──────┴────────┘
apply them with `dynamite -s h:9 layout apply`, or drop them with `dynamite -s h:9 layout revert`
"
        );
        assert!(output.warnings.is_empty());

        let output = run_script(
            &["layout", "revert"],
            vec![
                ("cluster.stage_revert", vec![], Ok(s("200"))),
                ("cluster.layout", vec![], Ok(sample_layout(vec![]))),
            ],
        )
        .expect("reverted");
        assert_eq!(output.text, "staged changes dropped\n\nno staged changes\n");
    }

    #[test]
    fn a_change_whose_layout_cannot_be_read_still_succeeds_with_a_warning() {
        let output = run_script(
            &["-s", "h:9", "layout", "remove", "h:1"],
            vec![
                ("cluster.stage_remove", vec![s("h:1")], Ok(s("200"))),
                ("cluster.layout", vec![], Err(CallError::Timeout)),
            ],
        )
        .expect("staged");
        assert_eq!(output.text, "staged: remove h:1\n");
        assert_eq!(
            output.warnings,
            vec!["cannot show the staged changes: cannot reach h:9: no answer within 10000 ms"]
        );
    }

    #[test]
    fn json_change_prints_only_the_change_answer() {
        let output = run_script(
            &["--json", "layout", "add", "h:1"],
            vec![("cluster.stage_add", vec![s("h:1")], Ok(s("200")))],
        )
        .expect("staged");
        assert_eq!(output.text, "\"200\"\n");
    }

    #[test]
    fn call_errors_become_the_commands_errors() {
        let timeout = Duration::from_millis(500);
        let cases = [
            (
                CallError::Fault {
                    code: -32601,
                    message: "unknown method \"x\"".into(),
                },
                "unknown method \"x\" (fault -32601)",
            ),
            (
                CallError::Transport("Connection refused (os error 111)".into()),
                "cannot reach h:1: Connection refused (os error 111)",
            ),
            (
                CallError::Timeout,
                "cannot reach h:1: no answer within 500 ms",
            ),
            (
                CallError::Status(404),
                "h:1 answered HTTP status 404: is it a Dynamite daemon?",
            ),
            (
                CallError::BadResponse("response is not UTF-8".into()),
                "h:1 answered in a way this command cannot read (bad response: response is not UTF-8)",
            ),
        ];
        for (error, expected) in cases {
            assert_eq!(
                AdminError::from_call("h:1", error, timeout).to_string(),
                expected
            );
        }
    }

    #[test]
    fn status_renders_as_a_table() {
        assert_eq!(
            render_status(&sample_status()),
            "\
layout version: 4
transition:     yes

nodes (3):
┌────────────────┬──────┬───────┬────────────────┬─────────┬─────────┐
│ address        ┆ zone ┆ state ┆ layout_version ┆ syncing ┆    keys │
╞════════════════╪══════╪═══════╪════════════════╪═════════╪═════════╡
│ 10.0.0.1:25000 ┆ a    ┆ up    ┆              4 ┆       0 ┆ 1204331 │
│ 10.0.0.2:25000 ┆ b    ┆ up    ┆              4 ┆      17 ┆ 1187020 │
│ 10.0.0.3:25000 ┆ \"\"   ┆ down  ┆              3 ┆       0 ┆       0 │
└────────────────┴──────┴───────┴────────────────┴─────────┴─────────┘
"
        );
    }

    #[test]
    fn layout_renders_nodes_and_staged_changes() {
        assert_eq!(
            render_layout(&sample_layout(vec![])),
            "\
layout version: 4
replicas (N):   3
partitions:     256
transition:     no

nodes (2):
┌────────────────┬──────┬────────┐
│ address        ┆ zone ┆ weight │
╞════════════════╪══════╪════════╡
│ 10.0.0.1:25000 ┆ a    ┆      1 │
│ 10.0.0.2:25000 ┆ b    ┆      2 │
└────────────────┴──────┴────────┘

no staged changes
"
        );
        let remove = strukt(&[("op", s("remove")), ("address", s("10.0.0.2:25000"))]);
        let staged = render_staged(&sample_layout(vec![staged_add(), remove]));
        assert_eq!(
            staged,
            "
staged changes (2):
┌────────┬────────────────┬──────┬────────┐
│ op     ┆ address        ┆ zone ┆ weight │
╞════════╪════════════════╪══════╪════════╡
│ add    ┆ 10.0.0.4:25000 ┆ c    ┆      1 │
│ remove ┆ 10.0.0.2:25000 ┆ -    ┆      - │
└────────┴────────────────┴──────┴────────┘
"
        );
    }

    #[test]
    fn fields_the_command_does_not_know_are_shown_too() {
        let mut layout = sample_layout(vec![]);
        if let Value::Struct(fields) = &mut layout {
            fields.insert("epoch_ms".into(), Value::Long(1_700_000_000_000));
            if let Some(Value::Array(nodes)) = fields.get_mut("nodes") {
                for node in nodes {
                    if let Value::Struct(node) = node {
                        node.insert("partitions".into(), int(128));
                    }
                }
            }
        }
        let text = render_layout(&layout);
        assert!(
            text.contains("│ address        ┆ zone ┆ weight ┆ partitions │"),
            "{text}"
        );
        assert!(
            text.ends_with("no staged changes\n\nepoch_ms: 1700000000000\n"),
            "{text}"
        );
        // Not a struct at all: shown as it came.
        assert_eq!(render_status(&s("200")), "200\n");
        assert_eq!(render_layout(&Value::Nil), "-\n");
    }

    #[test]
    fn any_struct_renders_generically() {
        let explain = strukt(&[
            ("key", s("user:42")),
            ("partition", int(17)),
            ("hints", Value::Array(vec![])),
            ("tags", Value::Array(vec![s("a"), s("b")])),
            (
                "layouts",
                Value::Array(vec![strukt(&[
                    ("version", int(4)),
                    (
                        "replicas",
                        Value::Array(vec![
                            strukt(&[
                                ("address", s("n1:1")),
                                ("fallback", Value::Boolean(false)),
                                ("state", s("up")),
                            ]),
                            strukt(&[("address", s("n2:1")), ("fallback", Value::Boolean(true))]),
                        ]),
                    ),
                ])]),
            ),
            (
                "stored",
                Value::Array(vec![strukt(&[
                    ("clock", strukt(&[("n1:1", int(3)), ("n2:1", int(1))])),
                    ("size", int(120)),
                    ("tombstone", Value::Boolean(false)),
                    ("value", Value::Nil),
                ])]),
            ),
            ("owner", strukt(&[("node", s("n1:1")), ("since", int(2))])),
        ]);
        assert_eq!(
            render_generic(&explain),
            "\
hints: none
key: user:42
partition: 17
tags: a, b
layouts:
  - version: 4
    replicas:
      ┌─────────┬──────────┬───────┐
      │ address ┆ fallback ┆ state │
      ╞═════════╪══════════╪═══════╡
      │ n1:1    ┆ no       ┆ up    │
      │ n2:1    ┆ yes      ┆ -     │
      └─────────┴──────────┴───────┘
owner:
  node: n1:1
  since: 2
stored:
  ┌────────────────────┬──────┬───────────┬───────┐
  │ clock              ┆ size ┆ tombstone ┆ value │
  ╞════════════════════╪══════╪═══════════╪═══════╡
  │ {n1:1: 3, n2:1: 1} ┆  120 ┆ no        ┆ -     │
  └────────────────────┴──────┴───────────┴───────┘
"
        );
        assert_eq!(render_generic(&s("line\nbreak")), "\"line\\nbreak\"\n");
        assert_eq!(
            render_generic(&Value::Array(vec![int(1), Value::Array(vec![int(2)])])),
            "- 1\n- 2\n"
        );
    }

    #[test]
    fn every_xml_rpc_type_becomes_json() {
        let moment: dxr::DateTime = "20240229T23:59:01".parse().expect("a dateTime");
        let cases = [
            (int(-7), "-7"),
            (Value::Long(i64::MAX), "9223372036854775807"),
            (Value::Boolean(true), "true"),
            (Value::Boolean(false), "false"),
            (s("plain"), "\"plain\""),
            (s(""), "\"\""),
            (Value::Double(1.5), "1.5"),
            (Value::Double(3.0), "3.0"),
            (Value::Double(-0.0), "-0.0"),
            (Value::Double(1e300), "1e300"),
            (Value::Double(2.5e-8), "2.5e-8"),
            (Value::Double(f64::NAN), "null"),
            (Value::Double(f64::INFINITY), "null"),
            (Value::Nil, "null"),
            (Value::DateTime(moment), "\"20240229T23:59:01\""),
            (Value::Base64(b"hi\x00\xff".to_vec()), "\"aGkA/w==\""),
            (Value::Base64(vec![]), "\"\""),
            (Value::Array(vec![]), "[]"),
            (Value::Struct(BTreeMap::new()), "{}"),
            (
                Value::Array(vec![int(1), s("a"), Value::Nil, Value::Array(vec![])]),
                "[1,\"a\",null,[]]",
            ),
            (
                strukt(&[
                    ("b", Value::Boolean(false)),
                    ("a", strukt(&[("x\"y", Value::Array(vec![int(2)]))])),
                ]),
                "{\"a\":{\"x\\\"y\":[2]},\"b\":false}",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(to_json(&value), expected, "{value:?}");
        }
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_control_characters() {
        let cases = [
            ("say \"hi\"", r#""say \"hi\"""#),
            ("a\\b", r#""a\\b""#),
            ("/", r#""/""#),
            ("\n\r\t\u{8}\u{c}", r#""\n\r\t\b\f""#),
            ("\u{0}\u{1}\u{1f}", r#""\u0000\u0001\u001f""#),
            ("\u{7f}", "\"\u{7f}\""),
            ("héllo wörld", "\"héllo wörld\""),
            ("日本語", "\"日本語\""),
            ("😀", "\"😀\""),
            ("\u{2028}", "\"\u{2028}\""),
        ];
        for (text, expected) in cases {
            let mut out = String::new();
            write_json_string(&mut out, text);
            assert_eq!(out, expected, "{text:?}");
        }
    }

    /// Reads back one JSON string literal (RFC 8259's grammar), for the round-trip law below.
    fn read_json_string(json: &str) -> Option<String> {
        let inner = json.strip_prefix('"')?.strip_suffix('"')?;
        let mut out = String::new();
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    '"' => out.push('"'),
                    '\\' => out.push('\\'),
                    '/' => out.push('/'),
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    'b' => out.push('\u{8}'),
                    'f' => out.push('\u{c}'),
                    'u' => {
                        let hex: String = chars.by_ref().take(4).collect();
                        out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                    }
                    _ => return None,
                },
                '"' => return None,
                c if c < '\u{20}' => return None,
                c => out.push(c),
            }
        }
        Some(out)
    }

    proptest! {
        #[test]
        fn json_strings_read_back_as_the_text(text in any::<String>()) {
            let mut out = String::new();
            write_json_string(&mut out, &text);
            prop_assert_eq!(read_json_string(&out), Some(text));
        }
    }
}
