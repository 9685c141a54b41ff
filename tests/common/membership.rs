//! What the membership stories share, with the real binaries (tests/membership.rs) and in
//! process (tests/membership_inproc.rs): the `cluster.*` calls, reading a layout back into
//! the placement it stands for, and keys whose values say which write they are.

use std::collections::BTreeMap;

use dxr::Value;
use dynamite::layout::{Layout, Member};

use super::*;

/// Every key acknowledged, with the sequence number of its last acknowledged value.
pub type Ledger = BTreeMap<String, u64>;

/// The members' addresses of a `cluster.layout()` answer, sorted.
pub fn addresses_of(layout: &Value) -> Vec<String> {
    sorted(
        array(member(layout, "nodes"))
            .iter()
            .map(|node| string(member(node, "address")).to_owned())
            .collect(),
    )
}

/// `cluster.apply(version)`, which must succeed; answers `moved`.
pub fn apply(rpc: &Rpc, version: i64) -> i64 {
    let answer = call_ok(rpc, "cluster.apply", vec![Value::Integer(version as i32)]);
    assert_eq!(int_member(&answer, "version"), version, "{answer:?}");
    int_member(&answer, "moved")
}

pub fn call_ok(rpc: &Rpc, method: &str, params: Vec<Value>) -> Value {
    rpc.call(method, params.clone())
        .unwrap_or_else(|fault| panic!("{method}({params:?}): {fault:?}"))
}

/// `count` keys named `prefix-i`.
pub fn keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:06}")).collect()
}

pub fn layout_addresses(rpc: &Rpc) -> Vec<String> {
    addresses_of(&layout_of(rpc))
}

pub fn layout_of(rpc: &Rpc) -> Value {
    call_ok(rpc, "cluster.layout", vec![])
}

/// The members of a `cluster.layout()` answer, as placement sees them.
pub fn members_of(layout: &Value) -> Vec<Member> {
    array(member(layout, "nodes"))
        .iter()
        .map(|node| Member {
            address: string(member(node, "address")).to_owned(),
            zone: string(member(node, "zone")).to_owned(),
            weight: u32::try_from(int_member(node, "weight")).expect("weight"),
        })
        .collect()
}

/// The placement of a `cluster.layout()` answer's version.
pub fn placement(layout: &Value) -> Layout {
    let replicas = usize::try_from(int_member(layout, "replicas")).expect("replicas");
    Layout::from_members(&members_of(layout), replicas)
}

/// `key`'s replicas under `layout`.
pub fn replicas(layout: &Layout, key: &str) -> Vec<String> {
    layout
        .preference_list(key.as_bytes(), layout.replicas())
        .into_iter()
        .map(|i| layout.servers()[i].clone())
        .collect()
}

/// The sequence number of a value [`tagged`] for `key`; `None` for anything else.
pub fn seq_of(key: &str, value: &Value) -> Option<u64> {
    let Value::String(text) = value else {
        return None;
    };
    let rest = text.strip_prefix(key)?.strip_prefix('@')?;
    rest.split(':').next()?.parse().ok()
}

/// How many keys of `ledger` the newest layout (as `rpc` has it) gives `address`.
pub fn share_of(rpc: &Rpc, ledger: &Ledger, address: &str) -> usize {
    let layout = placement(&layout_of(rpc));
    ledger
        .keys()
        .filter(|key| replicas(&layout, key).iter().any(|r| r == address))
        .count()
}

pub fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items
}

pub fn stage_add(rpc: &Rpc, address: &str) {
    assert_eq!(
        rpc.call("cluster.stage_add", vec![s(address)]),
        ok200(),
        "stage_add({address})"
    );
}

pub fn stage_remove(rpc: &Rpc, address: &str) {
    assert_eq!(
        rpc.call("cluster.stage_remove", vec![s(address)]),
        ok200(),
        "stage_remove({address})"
    );
}

/// The value of write `seq` of `key`: the key, the sequence number, and some padding so
/// that a transfer has bytes to move.
pub fn tagged(key: &str, seq: u64) -> Value {
    s(&format!("{key}@{seq}:{}", "p".repeat(48)))
}
