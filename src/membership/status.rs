//! The `cluster.*` methods, answered alike by storage nodes and balancers: reading their
//! parameters, and the structs `cluster.layout()` and `cluster.status()` answer.

use dxr::Value;

use crate::error::{Error, Result};
use crate::layout::Member;
use crate::rpc::codec::{self, Param};
use crate::rpc::messages;
use crate::rpc::server;

use super::history::{Change, History};
use super::{Membership, Report, Role};

/// The `cluster.*` methods, by name, with their help.
pub const METHODS: &[(&str, &str)] = &[
    (
        "cluster.layout",
        "cluster.layout() -> {version, partitions, replicas, nodes: [{address, zone, weight}], staged: [{op, address, zone, weight}], transition}",
    ),
    (
        "cluster.stage_add",
        "cluster.stage_add(address[, zone, weight]) -> \"200\": stage a node to join, or a new zone or weight",
    ),
    (
        "cluster.stage_remove",
        "cluster.stage_remove(address) -> \"200\": stage a node to leave",
    ),
    (
        "cluster.stage_revert",
        "cluster.stage_revert() -> \"200\": drop the staged changes",
    ),
    (
        "cluster.apply",
        "cluster.apply(version) -> {version, moved}: the staged changes become layout `version`, the current one + 1",
    ),
    (
        "cluster.status",
        "cluster.status() -> {version, transition, nodes: [{address, zone, state, layout_version, syncing, keys}]}",
    ),
    (
        super::GOSSIP_METHOD,
        "cluster.gossip(message) -> internal: compare and merge layout histories",
    ),
    (
        super::apply::LOCK_METHOD,
        "cluster.lock(message) -> internal: lock a layout version for an apply",
    ),
];

/// A `cluster.*` call, read.
#[derive(Debug, Clone)]
pub enum ClusterCall {
    Layout,
    StageAdd {
        address: String,
        zone: Option<String>,
        weight: Option<u32>,
    },
    StageRemove(String),
    StageRevert,
    Apply(u64),
    Status,
    Gossip(Box<super::GossipRequest>),
    Lock(super::apply::LockRequest),
}

fn string(param: &Param, what: &str) -> Result<String> {
    match param.tree() {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(Error::invalid(format!("the {what} must be a string"))),
    }
}

fn int(param: &Param, what: &str) -> Result<i64> {
    match param.tree() {
        Some(Value::Integer(n)) => Ok(i64::from(*n)),
        Some(Value::Long(n)) => Ok(*n),
        _ => Err(Error::invalid(format!("the {what} must be an int"))),
    }
}

/// Reads a `cluster.*` call's parameters (`index` into [`METHODS`]).
pub fn parse(index: usize, params: Vec<Param>) -> Result<ClusterCall> {
    let name = METHODS.get(index).map_or("", |(name, _)| *name);
    Ok(match name {
        "cluster.layout" => {
            server::expect_params(&params, 0)?;
            ClusterCall::Layout
        }
        "cluster.stage_add" => match params.len() {
            1 => ClusterCall::StageAdd {
                address: string(&params[0], "address")?,
                zone: None,
                weight: None,
            },
            3 => {
                let weight = int(&params[2], "weight")?;
                let weight = u32::try_from(weight)
                    .ok()
                    .filter(|w| (1..=super::history::MAX_WEIGHT).contains(w))
                    .ok_or_else(|| {
                        Error::invalid(format!(
                            "weight {weight} is out of range: it must be 1..={}",
                            super::history::MAX_WEIGHT
                        ))
                    })?;
                ClusterCall::StageAdd {
                    address: string(&params[0], "address")?,
                    zone: Some(string(&params[1], "zone")?),
                    weight: Some(weight),
                }
            }
            n => {
                return Err(Error::invalid(format!(
                    "cluster.stage_add takes (address) or (address, zone, weight), got {n} parameters"
                )));
            }
        },
        "cluster.stage_remove" => {
            server::expect_params(&params, 1)?;
            ClusterCall::StageRemove(string(&params[0], "address")?)
        }
        "cluster.stage_revert" => {
            server::expect_params(&params, 0)?;
            ClusterCall::StageRevert
        }
        "cluster.apply" => {
            server::expect_params(&params, 1)?;
            let version = int(&params[0], "version")?;
            ClusterCall::Apply(
                u64::try_from(version)
                    .map_err(|_| Error::invalid("the version must be positive"))?,
            )
        }
        "cluster.status" => {
            server::expect_params(&params, 0)?;
            ClusterCall::Status
        }
        super::GOSSIP_METHOD => ClusterCall::Gossip(Box::new(messages::from_params(&params)?)),
        super::apply::LOCK_METHOD => ClusterCall::Lock(messages::from_params(&params)?),
        _ => return Err(Error::UnknownMethod(name.into())),
    })
}

fn int_value(n: u64) -> Value {
    codec::int_value(i64::try_from(n).unwrap_or(i64::MAX))
}

fn field(name: &str, value: Value) -> (String, Value) {
    (name.to_owned(), value)
}

fn member_value(member: &Member) -> Value {
    Value::Struct(
        [
            field("address", Value::String(member.address.clone())),
            field("zone", Value::String(member.zone.clone())),
            field("weight", int_value(u64::from(member.weight))),
        ]
        .into(),
    )
}

/// `cluster.layout()`.
pub fn layout_value(history: &History) -> Value {
    let current = history.current();
    let staged = history
        .staged
        .changes
        .iter()
        .map(|change| {
            let (op, zone, weight) = match change {
                Change::Add(m) => ("add", m.zone.clone(), m.weight),
                Change::Remove(address) => {
                    let old = current.members.iter().find(|m| m.address == *address);
                    (
                        "remove",
                        old.map(|m| m.zone.clone()).unwrap_or_default(),
                        old.map_or(0, |m| m.weight),
                    )
                }
            };
            Value::Struct(
                [
                    field("op", Value::String(op.into())),
                    field("address", Value::String(change.address().into())),
                    field("zone", Value::String(zone)),
                    field("weight", int_value(u64::from(weight))),
                ]
                .into(),
            )
        })
        .collect();
    let layout = current.layout();
    Value::Struct(
        [
            field("version", int_value(current.number)),
            field("partitions", int_value(crate::layout::PARTITIONS as u64)),
            field("replicas", int_value(layout.replicas() as u64)),
            field(
                "nodes",
                Value::Array(current.members.iter().map(member_value).collect()),
            ),
            field("staged", Value::Array(staged)),
            field("transition", Value::Boolean(history.in_transition())),
        ]
        .into(),
    )
}

/// What `cluster.status()` tells: the layout versions, and every member of a live version
/// (and, on a node, the node itself) with what it last said of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub version: u64,
    pub transition: bool,
    pub read_version: u64,
    pub nodes: Vec<NodeStatus>,
}

/// One node in [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub address: String,
    /// Its zone in the newest version that has it, else the one it reports.
    pub zone: String,
    /// Heard from within the last few seconds (always, for the daemon answering of itself).
    pub up: bool,
    /// What it last said of itself (all zero when never heard from).
    pub report: Report,
}

impl Membership {
    fn need_history(&self) -> Result<History> {
        self.history().ok_or_else(|| {
            Error::Internal(
                "this daemon has no layout yet: start it with -s naming a member, or start \
                 a balancer over the nodes"
                    .into(),
            )
        })
    }

    /// `cluster.status()`: every member of a live version (and this node), with what it last
    /// said of itself.
    pub fn status(&self, own: &Report) -> Result<ClusterStatus> {
        let history = self.need_history()?;
        let mut addresses = history.all_members();
        if self.role == Role::Node && !addresses.contains(&self.me) {
            addresses.push(self.me.clone());
        }
        let zone_of = |address: &str| {
            history
                .versions
                .iter()
                .rev()
                .flat_map(|v| v.members.iter())
                .find(|m| m.address == address)
                .map(|m| m.zone.clone())
        };
        let nodes = addresses
            .into_iter()
            .map(|address| {
                let (up, report) = if address == self.me {
                    (true, own.clone())
                } else {
                    self.heard_from(&address).unwrap_or_default()
                };
                NodeStatus {
                    zone: zone_of(&address).unwrap_or(report.zone.clone()),
                    address,
                    up,
                    report,
                }
            })
            .collect();
        Ok(ClusterStatus {
            version: history.current().number,
            transition: history.in_transition(),
            read_version: history.read_version(),
            nodes,
        })
    }

    /// [`Self::status`] as `cluster.status()` answers it.
    pub fn status_value(&self, own: &Report) -> Result<Value> {
        let status = self.status(own)?;
        let nodes = status
            .nodes
            .iter()
            .map(|node| {
                Value::Struct(
                    [
                        field("address", Value::String(node.address.clone())),
                        field("zone", Value::String(node.zone.clone())),
                        field(
                            "state",
                            Value::String(if node.up { "up" } else { "down" }.into()),
                        ),
                        field("layout_version", int_value(node.report.layout_version)),
                        field("syncing", int_value(node.report.syncing)),
                        field("keys", int_value(node.report.keys)),
                    ]
                    .into(),
                )
            })
            .collect();
        Ok(Value::Struct(
            [
                field("version", int_value(status.version)),
                field("transition", Value::Boolean(status.transition)),
                field("read_version", int_value(status.read_version)),
                field("nodes", Value::Array(nodes)),
            ]
            .into(),
        ))
    }

    /// Changes the staged edits and spreads them to every member at once, so that an apply
    /// made through another daemon right after sees them.
    async fn stage(&self, edit: impl FnOnce(&mut History) -> Result<()>) -> Result<String> {
        let mut history = self.need_history()?;
        edit(&mut history)?;
        self.merge(&history)?;
        let report = Report::default();
        let members = history.current().members.clone();
        let pushes = members
            .iter()
            .filter(|m| m.address != self.me)
            .map(|m| self.gossip_with(&m.address, &report));
        futures_util::future::join_all(pushes).await;
        Ok(codec::string_xml("200"))
    }

    /// Answers a `cluster.*` call; `own` is what this daemon says of itself.
    pub async fn answer(&self, call: ClusterCall, own: Report) -> Result<String> {
        let now = crate::clock::now_us();
        match call {
            ClusterCall::Layout => codec::value_to_xml(&layout_value(&self.need_history()?)),
            ClusterCall::Status => codec::value_to_xml(&self.status_value(&own)?),
            ClusterCall::StageAdd {
                address,
                zone,
                weight,
            } => {
                let history = self.need_history()?;
                let known = history
                    .current()
                    .members
                    .iter()
                    .find(|m| m.address == address);
                // Without a zone, the node's own --zone (as it reports it), else what it has.
                let zone = zone
                    .or_else(|| known.map(|m| m.zone.clone()))
                    .or_else(|| self.heard_from(&address).map(|(_, r)| r.zone))
                    .unwrap_or_default();
                let weight = weight.or_else(|| known.map(|m| m.weight)).unwrap_or(1);
                let me = self.me.clone();
                self.stage(move |h| {
                    h.stage_add(
                        Member {
                            address,
                            zone,
                            weight,
                        },
                        now,
                        &me,
                    )
                    .map_err(|r| Error::invalid(r.0))
                })
                .await
            }
            ClusterCall::StageRemove(address) => {
                let me = self.me.clone();
                self.stage(move |h| {
                    h.stage_remove(&address, now, &me)
                        .map_err(|r| Error::invalid(r.0))
                })
                .await
            }
            ClusterCall::StageRevert => {
                let me = self.me.clone();
                self.stage(move |h| {
                    h.stage_revert(now, &me);
                    Ok(())
                })
                .await
            }
            ClusterCall::Apply(version) => {
                let applied = self.apply(version).await?;
                codec::value_to_xml(&Value::Struct(
                    [
                        field("version", int_value(applied.version)),
                        field("moved", int_value(applied.moved as u64)),
                    ]
                    .into(),
                ))
            }
            ClusterCall::Gossip(request) => {
                messages::reply_xml(&self.answer_gossip(*request, own)?)
            }
            ClusterCall::Lock(request) => messages::reply_xml(&self.answer_lock(&request)),
        }
    }
}
