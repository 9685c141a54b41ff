//! The hosts that talk to the cluster: clients writing through every entry point, the
//! operator changing membership, and the inspector that waits for the cluster to converge and
//! reads what it holds. They record everything in one [`Record`], at simulated times.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use dxr::Value;
use dynamite::rpc::client::{CallError, RpcClient};
use dynamite::security::Outgoing;

use crate::checker::{Figure, Held, Op};
use crate::nemesis::{BALANCERS, Change, FAULTS_UNTIL, Plan, nodes};
use crate::world::{BALANCER_PORT, N, NODE_PORT, SimDialer, SplitMix};

pub const CLIENTS: [&str; 3] = ["client1", "client2", "client3"];
/// Keys each client overwrites, written by it alone.
const OWN_KEYS: u64 = 6;
/// Keys every client writes, with contexts, concurrently.
const SHARED_KEYS: u64 = 3;
/// How long a client waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the cluster has, once healed, to converge.
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(120);
/// How many tasks a balancer may have beyond the number it had idle before the workload.
const TASKS_SLACK: u64 = 64;

/// Everything a run did and saw.
#[derive(Default)]
pub struct Record {
    /// The history: one line per event, at the simulated time.
    pub events: Vec<String>,
    /// Every write, for the checker.
    pub ops: Vec<Op>,
    /// Keys one client writes one operation at a time.
    pub single_writer: BTreeSet<String>,
    /// What the cluster holds at the end, per key.
    pub held: BTreeMap<String, Held>,
    pub figures: Vec<Figure>,
    /// What went wrong outside the checker's rules (the cluster never converged, a change
    /// never applied).
    pub failures: Vec<String>,
    /// Balancers' tasks once they served, before the workload.
    idle_tasks: BTreeMap<String, u64>,
    /// Clients whose work is over: the inspector waits for all of them, so that a write
    /// answered after the faults ended is read too.
    stopped: usize,
    /// Simulated time the cluster took to converge after the healing.
    pub converged_after: Option<Duration>,
    /// The hosts' clients, kept until the simulation is over: dropped when a host's work ends,
    /// a client's pool would close its connections in its `HashMap`'s order, which differs
    /// from run to run.
    pub clients: Vec<RpcClient>,
}

pub type Shared = Rc<RefCell<Record>>;

fn now() -> Duration {
    turmoil::sim_elapsed().unwrap_or_default()
}

fn log(record: &Shared, line: String) {
    let at = now().as_micros();
    record
        .borrow_mut()
        .events
        .push(format!("{at:>10}us {line}"));
}

fn rpc() -> RpcClient {
    RpcClient::with_outgoing(&Outgoing {
        dialer: Some(Arc::new(SimDialer)),
        ..Outgoing::default()
    })
}

fn node_address(node: &str) -> String {
    format!("{node}:{NODE_PORT}")
}

fn balancer_address(balancer: &str) -> String {
    format!("{balancer}:{BALANCER_PORT}")
}

fn text(value: &str) -> Value {
    Value::String(value.to_owned())
}

fn field<'a>(value: &'a Value, name: &str) -> Option<&'a Value> {
    match value {
        Value::Struct(fields) => fields.get(name),
        _ => None,
    }
}

fn int(value: Option<&Value>) -> Option<u64> {
    match value {
        Some(Value::Integer(n)) => u64::try_from(*n).ok(),
        Some(Value::Long(n)) => u64::try_from(*n).ok(),
        _ => None,
    }
}

/// A short form of an answer for the history.
fn brief(answer: &Result<Value, CallError>) -> String {
    match answer {
        Ok(Value::String(text)) => text.clone(),
        Ok(other) => format!("{other:?}"),
        Err(error) => {
            let mut text = error.to_string();
            text.truncate(120);
            format!("error: {text}")
        }
    }
}

/// Waits until the balancer answers its health check.
async fn wait_serving(rpc: &RpcClient, balancer: &str) {
    while rpc
        .check_health(&balancer_address(balancer), CALL_TIMEOUT)
        .await
        .is_err()
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client: from the balancers' first answer until the faults end, writes its own keys (blind
/// overwrites, new unique keys, writes and deletes with a context) and the shared keys (with a
/// context), each through an entry point the seed picks: a balancer or a storage node.
pub async fn client(name: &'static str, mut random: SplitMix, record: Shared) -> turmoil::Result {
    let rpc = rpc();
    for balancer in BALANCERS {
        wait_serving(&rpc, balancer).await;
    }
    if name == CLIENTS[0] {
        for balancer in BALANCERS {
            let stats = rpc
                .call(&balancer_address(balancer), "stats", vec![], CALL_TIMEOUT)
                .await;
            if let Some(tasks) = stats.ok().and_then(|stats| int(field(&stats, "tasks"))) {
                record
                    .borrow_mut()
                    .idle_tasks
                    .insert(balancer.to_owned(), tasks);
            }
        }
    }
    log(&record, format!("{name} starts"));
    {
        let mut record = record.borrow_mut();
        for k in 0..OWN_KEYS {
            record.single_writer.insert(format!("{name}-k{k}"));
        }
    }
    let entries: Vec<String> = BALANCERS
        .iter()
        .map(|b| balancer_address(b))
        .chain(nodes().iter().map(|n| node_address(n)))
        .collect();
    let mut written = 0u64;
    let mut unique = 0u64;
    while now() < FAULTS_UNTIL {
        // Balancers take two thirds of the calls, the nodes the rest.
        let entry = if random.chance(66) {
            entries[random.below(2) as usize].clone()
        } else {
            entries[2 + random.below(entries.len() as u64 - 2) as usize].clone()
        };
        written += 1;
        let value = format!("{name}-v{written}");
        let roll = random.below(100);
        let (key, with_context, delete) = match roll {
            0..=44 => (format!("{name}-k{}", random.below(OWN_KEYS)), false, false),
            45..=59 => {
                unique += 1;
                (format!("{name}-u{unique}"), false, false)
            }
            60..=74 => (format!("{name}-k{}", random.below(OWN_KEYS)), true, false),
            75..=84 => (format!("{name}-k{}", random.below(OWN_KEYS)), true, true),
            _ => (format!("shared-{}", random.below(SHARED_KEYS)), true, false),
        };
        if key.starts_with("shared") {
            record.borrow_mut().single_writer.remove(&key);
        }
        write(
            &rpc,
            &record,
            name,
            &entry,
            key,
            value,
            with_context,
            delete,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(random.below(100))).await;
    }
    log(&record, format!("{name} stops"));
    record.borrow_mut().clients.push(rpc);
    record.borrow_mut().stopped += 1;
    Ok(())
}

/// One write, recorded: a blind put, or a put or delete with the context of a `get_versions`
/// made just before through the same entry point.
#[allow(clippy::too_many_arguments)]
async fn write(
    rpc: &RpcClient,
    record: &Shared,
    client: &str,
    entry: &str,
    key: String,
    value: String,
    with_context: bool,
    delete: bool,
) {
    let mut params = vec![text(&key)];
    let mut seen = None;
    if with_context {
        let read = rpc
            .call(entry, "get_versions", vec![text(&key)], CALL_TIMEOUT)
            .await;
        let (values, context) = match &read {
            Ok(answer) => match (field(answer, "values"), field(answer, "context")) {
                (Some(Value::Array(values)), Some(Value::String(context))) => (
                    values
                        .iter()
                        .map(|value| match value {
                            Value::String(text) => text.clone(),
                            other => format!("{other:?}"),
                        })
                        .collect::<Vec<String>>(),
                    context.clone(),
                ),
                _ => {
                    log(
                        record,
                        format!("{client} get_versions {key} via {entry} -> odd answer {answer:?}"),
                    );
                    return;
                }
            },
            Err(_) => {
                log(
                    record,
                    format!(
                        "{client} get_versions {key} via {entry} -> {}",
                        brief(&read)
                    ),
                );
                return;
            }
        };
        log(
            record,
            format!("{client} get_versions {key} via {entry} -> {values:?}"),
        );
        if delete && values.is_empty() {
            return; // nothing to delete: a delete without a context would be blind
        }
        seen = Some(values);
        if !delete {
            params.push(text(&value));
        }
        params.push(Value::String(context));
    } else {
        params.push(text(&value));
    }
    let invoked_us = now().as_micros() as u64;
    let method = if delete { "delete" } else { "put" };
    let answer = rpc.call(entry, method, params, CALL_TIMEOUT).await;
    let acked = matches!(&answer, Ok(Value::String(status)) if status == "200");
    let what = if delete {
        format!(
            "delete {key} seen {:?}",
            seen.as_deref().unwrap_or_default()
        )
    } else if let Some(seen) = &seen {
        format!("put {key}={value} seen {seen:?}")
    } else {
        format!("put {key}={value}")
    };
    log(
        record,
        format!("{client} {what} via {entry} -> {}", brief(&answer)),
    );
    record.borrow_mut().ops.push(Op {
        client: client.to_owned(),
        key,
        value: (!delete).then_some(value),
        seen,
        invoked_us,
        acked,
    });
}

/// The operator: makes each planned membership change at its time, through a daemon the seed
/// picks, trying again (another daemon, the layout read anew) until it is applied.
pub async fn operator(plan: Plan, mut random: SplitMix, record: Shared) -> turmoil::Result {
    let rpc = rpc();
    for (at, change) in plan.changes.clone() {
        tokio::time::sleep(at.saturating_sub(now())).await;
        let (method, node) = match change {
            Change::Grow(node) => ("cluster.stage_add", node),
            Change::Shrink(node) | Change::RemoveDead(node) => ("cluster.stage_remove", node),
        };
        let mut applied = false;
        for attempt in 1..=30 {
            let daemons: Vec<String> = BALANCERS
                .iter()
                .map(|b| balancer_address(b))
                .chain(
                    nodes()
                        .into_iter()
                        .filter(|n| *n != node && Some(*n) != plan.dead())
                        .map(node_address),
                )
                .collect();
            let daemon = daemons[random.below(daemons.len() as u64) as usize].clone();
            match make_change(&rpc, &daemon, method, node).await {
                Ok(version) => {
                    log(
                        &record,
                        format!(
                            "operator {change} via {daemon}: layout {version} applied (attempt {attempt})"
                        ),
                    );
                    applied = true;
                    break;
                }
                Err(why) => {
                    log(&record, format!("operator {change} via {daemon}: {why}"));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if !applied {
            record.borrow_mut().failures.push(format!(
                "the operator could not make the change {change} in 30 attempts"
            ));
        }
    }
    record.borrow_mut().clients.push(rpc);
    Ok(())
}

/// Stages one change on `daemon` and applies it as the next layout version; the version, or
/// why not. A change already in the layout (an apply that landed though its answer was lost)
/// counts as made.
async fn make_change(
    rpc: &RpcClient,
    daemon: &str,
    method: &str,
    node: &str,
) -> Result<u64, String> {
    let layout = rpc
        .call(daemon, "cluster.layout", vec![], CALL_TIMEOUT)
        .await
        .map_err(|error| format!("cluster.layout: {error}"))?;
    let version = int(field(&layout, "version")).ok_or("no layout version")?;
    let address = node_address(node);
    let member = matches!(field(&layout, "nodes"), Some(Value::Array(nodes))
        if nodes.iter().any(|n| matches!(field(n, "address"), Some(Value::String(a)) if *a == address)));
    let adding = method == "cluster.stage_add";
    if member == adding {
        return Ok(version);
    }
    rpc.call(daemon, "cluster.stage_revert", vec![], CALL_TIMEOUT)
        .await
        .map_err(|error| format!("cluster.stage_revert: {error}"))?;
    rpc.call(daemon, method, vec![text(&address)], CALL_TIMEOUT)
        .await
        .map_err(|error| format!("{method}: {error}"))?;
    let next = i32::try_from(version + 1).map_err(|_| "version overflow")?;
    rpc.call(
        daemon,
        "cluster.apply",
        vec![Value::Integer(next)],
        CALL_TIMEOUT,
    )
    .await
    .map_err(|error| format!("cluster.apply({next}): {error}"))?;
    Ok(version + 1)
}

/// The inspector: once the faults ended, waits until the cluster converged (one layout on
/// every daemon, no transition, every key's replicas alike and in their place), then reads
/// every key through every balancer, and the figures that must not grow.
pub async fn inspector(plan: Plan, record: Shared) -> turmoil::Result {
    let rpc = rpc();
    tokio::time::sleep(FAULTS_UNTIL.saturating_sub(now()) + Duration::from_secs(1)).await;
    while record.borrow().stopped < CLIENTS.len() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let healed = now();
    let alive: Vec<&'static str> = nodes()
        .into_iter()
        .filter(|node| Some(*node) != plan.dead())
        .filter(|node| *node != crate::nemesis::SPARE || plan.spare_starts.is_some())
        .collect();
    let keys: Vec<String> = {
        let record = record.borrow();
        let keys: BTreeSet<String> = record.ops.iter().map(|op| op.key.clone()).collect();
        keys.into_iter().collect()
    };
    let mut replicas = BTreeMap::new();
    let mut converged = false;
    let mut last_why = String::new();
    while now() < healed + CONVERGE_LIMIT {
        let why = match settled(&rpc, &alive).await {
            Err(why) => why,
            Ok(()) => {
                replicas = holdings(&rpc, &alive, &keys).await;
                match unconverged(&replicas) {
                    None => {
                        converged = true;
                        break;
                    }
                    Some(why) => why,
                }
            }
        };
        if why != last_why {
            log(&record, format!("inspector waits: {why}"));
            last_why = why;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let took = now() - healed;
    if converged {
        log(
            &record,
            format!("converged {} ms after the healing", took.as_millis()),
        );
        record.borrow_mut().converged_after = Some(took);
    } else {
        log(
            &record,
            format!("not converged after {} s: {last_why}", took.as_secs()),
        );
        record.borrow_mut().failures.push(format!(
            "the cluster did not converge within {} s of the healing: {last_why}",
            CONVERGE_LIMIT.as_secs()
        ));
        replicas = holdings(&rpc, &alive, &keys).await;
    }

    for key in &keys {
        let mut held = Held {
            replicas: replicas.remove(key).unwrap_or_default(),
            ..Held::default()
        };
        for balancer in BALANCERS {
            let read = rpc
                .call(
                    &balancer_address(balancer),
                    "get",
                    vec![text(key)],
                    CALL_TIMEOUT,
                )
                .await;
            let value = match &read {
                Ok(Value::String(value)) => Some(value.clone()),
                Ok(Value::Nil) => None,
                _ => Some(format!("<{}>", brief(&read))),
            };
            held.reads.push((balancer.to_owned(), value));
        }
        let options: Value = Value::Struct([("r".to_owned(), Value::Integer(N as i32))].into());
        let versions = rpc
            .call(
                &balancer_address(BALANCERS[0]),
                "get_versions",
                vec![text(key), options],
                CALL_TIMEOUT,
            )
            .await;
        match versions.as_ref().ok().and_then(|v| field(v, "values")) {
            Some(Value::Array(values)) => {
                held.versions = values
                    .iter()
                    .map(|value| match value {
                        Value::String(text) => text.clone(),
                        other => format!("{other:?}"),
                    })
                    .collect();
            }
            _ => record.borrow_mut().failures.push(format!(
                "{key}: get_versions at r={N} failed: {}",
                brief(&versions)
            )),
        }
        log(
            &record,
            format!(
                "final {key}: reads {:?}, versions {:?}, on {:?}",
                held.reads,
                held.versions,
                held.replicas.keys().collect::<Vec<_>>()
            ),
        );
        record.borrow_mut().held.insert(key.clone(), held);
    }

    let mut figures = Vec::new();
    for node in &alive {
        let stats = rpc
            .call(&node_address(node), "stats", vec![], CALL_TIMEOUT)
            .await;
        match stats
            .as_ref()
            .ok()
            .and_then(|stats| int(field(stats, "hints")))
        {
            Some(hints) => figures.push(Figure {
                what: format!("hints held by {node}"),
                value: hints,
                bound: 0,
            }),
            None => record
                .borrow_mut()
                .failures
                .push(format!("{node}: stats() {}", brief(&stats))),
        }
    }
    for balancer in BALANCERS {
        let stats = rpc
            .call(&balancer_address(balancer), "stats", vec![], CALL_TIMEOUT)
            .await;
        let idle = record.borrow().idle_tasks.get(balancer).copied();
        match (
            stats
                .as_ref()
                .ok()
                .and_then(|stats| int(field(stats, "tasks"))),
            idle,
        ) {
            (Some(tasks), Some(idle)) => figures.push(Figure {
                what: format!("tasks of {balancer} (idle before the workload: {idle})"),
                value: tasks,
                bound: idle + TASKS_SLACK,
            }),
            _ => record
                .borrow_mut()
                .failures
                .push(format!("{balancer}: stats() {}", brief(&stats))),
        }
    }
    log(&record, format!("figures: {figures:?}"));
    record.borrow_mut().figures = figures;
    record.borrow_mut().clients.push(rpc);
    Ok(())
}

/// One layout on every running daemon, no transition, every member up.
async fn settled(rpc: &RpcClient, alive: &[&str]) -> Result<(), String> {
    let mut versions = BTreeSet::new();
    let daemons = BALANCERS
        .iter()
        .map(|b| balancer_address(b))
        .chain(alive.iter().map(|n| node_address(n)));
    for daemon in daemons {
        let status = rpc
            .call(&daemon, "cluster.status", vec![], CALL_TIMEOUT)
            .await
            .map_err(|error| format!("{daemon}: cluster.status: {error}"))?;
        if field(&status, "transition") != Some(&Value::Boolean(false)) {
            return Err(format!("{daemon}: a transition runs"));
        }
        versions.insert(int(field(&status, "version")).unwrap_or_default());
        if let Some(Value::Array(nodes)) = field(&status, "nodes") {
            for node in nodes {
                if field(node, "state") != Some(&Value::String("up".into())) {
                    return Err(format!("{daemon} sees a member down: {node:?}"));
                }
                if int(field(node, "syncing")).unwrap_or_default() > 0 {
                    return Err(format!("{daemon} sees a member syncing: {node:?}"));
                }
            }
        }
    }
    if versions.len() > 1 {
        return Err(format!("daemons are at layout versions {versions:?}"));
    }
    Ok(())
}

/// Each key's live versions on each node, by dot; nodes holding none left out.
async fn holdings(
    rpc: &RpcClient,
    alive: &[&str],
    keys: &[String],
) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut holdings: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for node in alive {
        for key in keys {
            let answer = rpc
                .call(
                    &node_address(node),
                    "local.explain",
                    vec![text(key)],
                    CALL_TIMEOUT,
                )
                .await;
            let dots: BTreeSet<String> =
                match answer.as_ref().ok().and_then(|a| field(a, "versions")) {
                    Some(Value::Array(versions)) => versions
                        .iter()
                        .filter(|version| {
                            field(version, "tombstone") != Some(&Value::Boolean(true))
                        })
                        .filter_map(|version| match field(version, "dot") {
                            Some(Value::String(dot)) => Some(dot.clone()),
                            _ => None,
                        })
                        .collect(),
                    _ => [format!("<{}>", brief(&answer))].into(),
                };
            if !dots.is_empty() {
                holdings
                    .entry(key.clone())
                    .or_default()
                    .insert((*node).to_owned(), dots);
            }
        }
    }
    holdings
}

/// Why the holdings are not converged yet, if they are not: replicas that differ, or a key on
/// more or fewer than N nodes.
fn unconverged(holdings: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Option<String> {
    for (key, nodes) in holdings {
        let mut sets = nodes.values();
        if let Some(first) = sets.next()
            && sets.any(|set| set != first)
        {
            return Some(format!("{key}: replicas differ: {nodes:?}"));
        }
        if nodes.len() != N {
            return Some(format!(
                "{key}: on {} nodes: {:?}",
                nodes.len(),
                nodes.keys().collect::<Vec<_>>()
            ));
        }
    }
    None
}
