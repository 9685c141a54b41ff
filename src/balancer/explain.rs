//! `explain(key)`: where a key lives and what each replica holds of it, for a person
//! wondering why a read answered what it did.
//!
//! The balancer (or a node coordinating) answers with the key's partition, its replicas in
//! every live layout version as a request would reach them now (preferred, or a fallback
//! standing in for a down one), and, from each of those nodes, `local.explain(key)`: its own
//! stored versions and the hints it holds for the key.

use std::collections::BTreeMap;
use std::time::Duration;

use dxr::Value;

use crate::rpc::codec;
use crate::version::{Siblings, Version};

use super::{Balancer, targets};

pub const LOCAL_EXPLAIN: &str = "local.explain";
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

fn field(name: &str, value: Value) -> (String, Value) {
    (name.to_owned(), value)
}

fn int(n: u64) -> Value {
    codec::int_value(i64::try_from(n).unwrap_or(i64::MAX))
}

/// One stored version, as `explain` shows it.
fn version_value(version: &Version) -> Value {
    Value::Struct(
        [
            field(
                "dot",
                Value::String(format!(
                    "{:016x}:{}",
                    version.dot.actor, version.dot.counter
                )),
            ),
            field("context", Value::String(version.past.to_context())),
            field("timestamp_us", int(version.timestamp_us)),
            field(
                "size",
                int(version.value.as_ref().map_or(0, |v| v.len() as u64)),
            ),
            field("tombstone", Value::Boolean(version.is_tombstone())),
        ]
        .into(),
    )
}

/// A node's own versions of a key and the hints it holds for it (`local.explain`).
pub fn local_value(own: &Siblings, hints: &[(String, Siblings)]) -> Value {
    let versions = own.versions().iter().map(version_value).collect();
    let hints = hints
        .iter()
        .map(|(owner, siblings)| {
            Value::Struct(
                [
                    field("owner", Value::String(owner.clone())),
                    field(
                        "versions",
                        Value::Array(siblings.versions().iter().map(version_value).collect()),
                    ),
                ]
                .into(),
            )
        })
        .collect();
    Value::Struct(
        [
            field("versions", Value::Array(versions)),
            field("hints", Value::Array(hints)),
        ]
        .into(),
    )
}

impl Balancer {
    /// `explain(key)`: see the module doc.
    pub async fn explain(&self, key: &str) -> crate::error::Result<Value> {
        let topology = self.topology()?;
        let mut asked: BTreeMap<String, ()> = BTreeMap::new();
        let mut layouts = Vec::new();
        for (index, (number, layout)) in topology.routing.layouts.iter().enumerate() {
            let walk = topology.walk(index, key);
            let (targets, missing) = targets::choose(&walk, layout.replicas(), |server| {
                topology.health.is_up(server)
            });
            let mut replicas: Vec<Value> = targets
                .iter()
                .map(|target| {
                    let address = topology.address(target.server).to_owned();
                    asked.insert(address.clone(), ());
                    Value::Struct(
                        [
                            field("address", Value::String(address)),
                            field(
                                "role",
                                Value::String(
                                    if target.is_fallback() {
                                        "fallback"
                                    } else {
                                        "preferred"
                                    }
                                    .into(),
                                ),
                            ),
                            field(
                                "for",
                                Value::String(topology.address(target.owner).to_owned()),
                            ),
                            field(
                                "state",
                                Value::String(topology.health.state(target.server).into()),
                            ),
                        ]
                        .into(),
                    )
                })
                .collect();
            // A preferred replica a fallback stands in for is listed too, down as it is, and
            // asked: what it holds (or that it cannot answer) is part of the story.
            let replaced: Vec<usize> = targets
                .iter()
                .filter(|target| target.is_fallback())
                .map(|target| target.owner)
                .collect();
            for &owner in &replaced {
                let address = topology.address(owner).to_owned();
                asked.insert(address.clone(), ());
                replicas.push(Value::Struct(
                    [
                        field("address", Value::String(address.clone())),
                        field("role", Value::String("preferred".into())),
                        field("for", Value::String(address)),
                        field("state", Value::String(topology.health.state(owner).into())),
                    ]
                    .into(),
                ));
            }
            replicas.extend(missing.iter().map(|&owner| {
                Value::Struct(
                    [
                        field("address", Value::String(topology.address(owner).to_owned())),
                        field("role", Value::String("preferred".into())),
                        field("for", Value::String(topology.address(owner).to_owned())),
                        field("state", Value::String(topology.health.state(owner).into())),
                    ]
                    .into(),
                )
            }));
            let read = index == topology.routing.read;
            layouts.push(Value::Struct(
                [
                    field("version", int(*number)),
                    field("reads", Value::Boolean(read)),
                    field("replicas", Value::Array(replicas)),
                ]
                .into(),
            ));
        }
        let client = &self.shared.client;
        let calls = asked.keys().map(|address| async move {
            let answer = client
                .call(
                    address,
                    LOCAL_EXPLAIN,
                    vec![Value::String(key.to_owned())],
                    CALL_TIMEOUT,
                )
                .await;
            let mut entry = vec![field("address", Value::String(address.clone()))];
            match answer {
                Ok(Value::Struct(fields)) => {
                    entry.extend(fields);
                }
                Ok(other) => entry.push(field("error", Value::String(format!("{other:?}")))),
                Err(error) => entry.push(field("error", Value::String(error.to_string()))),
            }
            Value::Struct(entry.into_iter().collect())
        });
        let stored = futures_util::future::join_all(calls).await;
        Ok(Value::Struct(
            [
                field("key", Value::String(key.to_owned())),
                field(
                    "partition",
                    int(crate::layout::Layout::partition_of(key.as_bytes()) as u64),
                ),
                field("layouts", Value::Array(layouts)),
                field("stored", Value::Array(stored)),
            ]
            .into(),
        ))
    }
}
