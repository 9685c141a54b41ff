//! Per-request options against the real binaries: `put(key, value, context, options)`,
//! `get(key, options)`, `get_versions(key, options)`, `delete(key, context, options)`. A
//! request's own W or R, meeting or missing it with a node killed; a short `timeout_ms`
//! answering in time against a hung node; a receipt naming exactly the replicas that hold the
//! write, a fallback among them; bad options refused; Python's `xmlrpc.client` passing them.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// How long a balancer may take to notice that a node died and show it down.
const DETECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// An options struct.
fn options(members: &[(&str, Value)]) -> Value {
    Value::Struct(
        members
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect(),
    )
}

fn w(n: i32) -> (&'static str, Value) {
    ("w", Value::Integer(n))
}

fn r(n: i32) -> (&'static str, Value) {
    ("r", Value::Integer(n))
}

fn timeout_ms(ms: i32) -> (&'static str, Value) {
    ("timeout_ms", Value::Integer(ms))
}

fn receipt() -> (&'static str, Value) {
    ("receipt", Value::Boolean(true))
}

/// `put(key, value, "", options)`: a blind put with options.
fn put(rpc: &Rpc, key: &str, value: &str, members: &[(&str, Value)]) -> RpcResult {
    rpc.call("put", vec![s(key), s(value), s(""), options(members)])
}

fn get(rpc: &Rpc, key: &str, members: &[(&str, Value)]) -> RpcResult {
    rpc.call("get", vec![s(key), options(members)])
}

/// A receipt's replicas, as `(address, fallback)`, sorted by address.
fn receipt_replicas(receipt: &Value) -> Vec<(String, bool)> {
    assert_eq!(member(receipt, "status"), &s("200"), "{receipt:?}");
    let mut replicas: Vec<(String, bool)> = array(member(receipt, "replicas"))
        .iter()
        .map(|replica| {
            let fallback = match member(replica, "fallback") {
                Value::Boolean(fallback) => *fallback,
                other => panic!("fallback is not a boolean: {other:?}"),
            };
            (string(member(replica, "address")).to_owned(), fallback)
        })
        .collect();
    replicas.sort();
    replicas
}

/// A node's state in the balancer's `stats()`.
fn state_of(lb: &Rpc, address: &str) -> String {
    server_state(&lb.stats(), address).0
}

/// W = 3 of three needs every replica: with one killed, a put asking for it fails with 503,
/// while one asking for W = 1 succeeds; R likewise for gets. The daemon's own W and R (2)
/// are untouched for requests without options, and a node coordinating takes the same
/// options as the balancer.
#[test]
fn a_request_quorum_of_three_fails_with_a_node_killed_and_one_of_one_succeeds() {
    let mut cluster = Cluster::builder().nodes(3).in_memory().aae_off().start();
    let lb = cluster.client();
    let servers = cluster.servers();

    // All up: W = 3 and R = 3 are met.
    assert_eq!(put(&lb, "k", "v1", &[w(3)]), ok200());
    assert_eq!(get(&lb, "k", &[r(3)]), Ok(s("v1")));

    cluster.nodes[2].kill();
    // Whether or not the balancer has noticed yet: with N = 3 on three nodes there is no
    // fallback, so three replicas cannot answer.
    assert_quorum_fault(
        "put with w = 3, one node killed",
        put(&lb, "k", "v2", &[w(3)]),
        ("W", "write"),
        2,
        &servers,
    );
    assert_quorum_fault(
        "get with r = 3, one node killed",
        get(&lb, "k", &[r(3)]),
        ("R", "read"),
        2,
        &servers,
    );
    assert_eq!(put(&lb, "k", "v3", &[w(1)]), ok200());
    assert_eq!(get(&lb, "k", &[r(1)]), Ok(s("v3")));
    // Requests without options keep the daemon's W = R = 2, met by the two left.
    assert_eq!(lb.put("k", s("v4")), ok200());
    assert_eq!(lb.get("k"), Ok(s("v4")));

    // A storage node coordinating takes the same options.
    let node = cluster.node_client(0);
    assert_quorum_fault(
        "put with w = 3 through a node",
        put(&node, "k", "v5", &[w(3)]),
        ("W", "write"),
        2,
        &servers,
    );
    assert_quorum_fault(
        "get with r = 3 through a node",
        get(&node, "k", &[r(3)]),
        ("R", "read"),
        2,
        &servers,
    );
    assert_eq!(put(&node, "k", "v6", &[w(1)]), ok200());
    assert_eq!(get(&node, "k", &[r(1)]), Ok(s("v6")));
    let versions = node
        .call("get_versions", vec![s("k"), options(&[r(2)])])
        .expect("get_versions with r = 2");
    assert_eq!(array(member(&versions, "values")), [s("v6")]);
}

/// With the balancer's timeout at 5 s, a request asking for 300 ms against a hung replica
/// (SIGSTOP) answers in about that: 503 where it needs the hung one, success where it does
/// not. Nothing is asserted of time but a generous bound (10x the request's timeout).
#[test]
fn a_short_timeout_answers_in_time_against_a_hung_node() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .aae_off()
        .timeout_ms(5_000)
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    assert_eq!(lb.put("k", s("v1")), ok200());

    // Hang the replica that coordinates the key's writes, so that a put first waits on it.
    let first = &replicas_of(&servers, "k", 3)[0];
    let hung = servers.iter().position(|s| s == first).expect("a node");
    cluster.nodes[hung].stop();

    const TIMEOUT_MS: i32 = 300;
    let bound = Duration::from_millis(10 * TIMEOUT_MS as u64);
    let timed = |what: &str, call: &dyn Fn() -> RpcResult| -> RpcResult {
        let started = Instant::now();
        let result = call();
        let took = started.elapsed();
        assert!(
            took < bound,
            "{what}: answered after {took:?}, past 10x its timeout_ms of {TIMEOUT_MS} ms"
        );
        result
    };
    let result = timed("get r = 3", &|| {
        get(&lb, "k", &[r(3), timeout_ms(TIMEOUT_MS)])
    });
    assert_quorum_fault("get r = 3, one hung", result, ("R", "read"), 2, &servers);
    let result = timed("put w = 3", &|| {
        put(&lb, "k", "v2", &[w(3), timeout_ms(TIMEOUT_MS)])
    });
    assert_quorum_fault("put w = 3, one hung", result, ("W", "write"), 2, &servers);
    let result = timed("put w = 2", &|| {
        put(&lb, "k", "v3", &[w(2), timeout_ms(TIMEOUT_MS)])
    });
    assert_eq!(result, ok200(), "put w = 2 with one of three hung");
    let result = timed("get r = 2", &|| {
        get(&lb, "k", &[r(2), timeout_ms(TIMEOUT_MS)])
    });
    assert_eq!(result, Ok(s("v3")), "get r = 2 with one of three hung");
    // And through a node that is not the hung one.
    let node = cluster.node_client((hung + 1) % 3);
    let result = timed("get r = 3 through a node", &|| {
        get(&node, "k", &[r(3), timeout_ms(TIMEOUT_MS)])
    });
    assert_quorum_fault("get r = 3 via a node", result, ("R", "read"), 2, &servers);
    // A client's own short bound running out says nothing of the node: the balancer has not
    // marked it down for everyone (its own 5 s timeout, or the node's queue found stuck,
    // would).
    assert_eq!(state_of(&lb, &servers[hung]), "up");

    cluster.nodes[hung].cont();
    // The hung node is back: a request needing all three succeeds again.
    wait_until_ok(DETECTION_TIMEOUT, "W = 3 is met again", || {
        match put(&lb, "k", "v4", &[w(3), timeout_ms(2_000)]) {
            Ok(_) => Ok(()),
            Err(fault) => Err(format!("{fault:?}")),
        }
    });
}

/// With W = N = 3, a receipt names exactly the three nodes holding the key (`local.get`
/// shows the value on those and on no other); with a preferred replica killed, the fallback
/// that took its place is named and marked, and holds the write as a hint for it
/// (`local.explain`). The receipt's context chains the next write, and is the context
/// `get_versions` gives; a delete gives a receipt too.
#[test]
fn a_receipt_names_exactly_the_replicas_holding_the_write() {
    let mut cluster = Cluster::builder()
        .nodes(4)
        .in_memory()
        .replicas(3)
        .aae_off()
        .never_reap()
        .start();
    let lb = cluster.client();
    let servers = cluster.servers();
    let nodes = nodes_of(&cluster);

    let answer = put(&lb, "k", "v1", &[w(3), receipt()]).expect("put with a receipt");
    let named = receipt_replicas(&answer);
    let holders: Vec<(String, bool)> = servers
        .iter()
        .zip(local_copies(&nodes, "k"))
        .filter(|(_, copy)| *copy == s("v1"))
        .map(|(address, _)| (address.clone(), false))
        .collect();
    assert_eq!(
        named, holders,
        "the receipt names the nodes holding the key"
    );
    let mut expected: Vec<String> = replicas_of(&servers, "k", 3);
    expected.sort();
    let named_addresses: Vec<String> = named.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(named_addresses, expected, "the key's three replicas");

    // The receipt's context is get_versions' (the write left no sibling), and chains.
    let context = string(member(&answer, "context")).to_owned();
    assert!(!context.is_empty());
    let (values, read_context) = lb.get_versions("k").expect("get_versions");
    assert_eq!((values, read_context), (vec![s("v1")], context.clone()));
    let chained = lb
        .call(
            "put",
            vec![s("k"), s("v2"), s(&context), options(&[w(3), receipt()])],
        )
        .expect("a put with the receipt's context");
    let (values, _) = lb.get_versions("k").expect("get_versions");
    assert_eq!(
        values,
        vec![s("v2")],
        "the chained write superseded the first"
    );
    assert_eq!(receipt_replicas(&chained), named);

    // Kill a preferred replica of another key; the balancer notices.
    let key = "fallback-key";
    let preferred = replicas_of(&servers, key, 3);
    let dead = servers
        .iter()
        .position(|s| *s == preferred[1])
        .expect("a node");
    cluster.nodes[dead].kill();
    assert_eq!(get(&lb, key, &[r(1)]), Ok(Value::Nil));
    wait_until(DETECTION_TIMEOUT, "the killed node is shown down", || {
        state_of(&lb, &servers[dead]) == "down"
    });

    let answer = put(&lb, key, "hinted", &[w(3), receipt()]).expect("put with a fallback");
    let named = receipt_replicas(&answer);
    let fallback: Vec<&String> = servers.iter().filter(|s| !preferred.contains(s)).collect();
    let mut expected: Vec<(String, bool)> = preferred
        .iter()
        .filter(|address| **address != servers[dead])
        .map(|address| (address.clone(), false))
        .chain(fallback.iter().map(|address| ((*address).clone(), true)))
        .collect();
    expected.sort();
    assert_eq!(
        named, expected,
        "two preferred replicas and the fallback, marked"
    );
    // The preferred ones hold it as their own; the fallback as a hint for the dead node.
    for (i, address) in servers.iter().enumerate() {
        if i == dead {
            continue;
        }
        let own = nodes[i].local_get(key).expect("local.get");
        let explained = nodes[i]
            .call("local.explain", vec![s(key)])
            .expect("local.explain");
        let hints_for: Vec<&str> = array(member(&explained, "hints"))
            .iter()
            .map(|hint| string(member(hint, "owner")))
            .collect();
        if preferred.contains(address) {
            assert_eq!(own, s("hinted"), "{address} holds its own copy");
            assert!(hints_for.is_empty(), "{address}: {explained:?}");
        } else {
            assert_eq!(
                own,
                Value::Nil,
                "the fallback {address} has no copy of its own"
            );
            assert_eq!(
                hints_for,
                [servers[dead].as_str()],
                "the fallback {address} holds a hint for the dead node"
            );
        }
    }

    // A delete with a receipt.
    let deleted = lb
        .call("delete", vec![s("k"), s(""), options(&[w(2), receipt()])])
        .expect("delete with a receipt");
    let named = receipt_replicas(&deleted);
    assert!(named.len() >= 2, "{deleted:?}");
    assert_eq!(lb.get("k"), Ok(Value::Nil));
}

/// Options that are not ours, or out of range, or of the wrong kind, are refused with
/// -32602 and a text that says what is wrong, by the balancer and by a node alike; nothing
/// is written.
#[test]
fn bad_options_are_refused() {
    let cluster = Cluster::builder().nodes(3).in_memory().aae_off().start();
    let lb = cluster.client();
    let node = cluster.node_client(1);
    let bad_puts: Vec<(Value, &str)> = vec![
        (options(&[("consistency", s("all"))]), "unknown option"),
        (options(&[r(1)]), "takes w, not r"),
        (options(&[w(0)]), "w must be at least 1"),
        (options(&[w(4)]), "more than the key's 3 replicas"),
        (options(&[timeout_ms(0)]), "between 1 and 60000"),
        (options(&[timeout_ms(60_001)]), "between 1 and 60000"),
        (
            options(&[("receipt", Value::Integer(1))]),
            "must be a boolean",
        ),
        (s("w=2"), "options must be a struct"),
    ];
    for rpc in [&lb, &node] {
        for (bad, words) in &bad_puts {
            match rpc.call("put", vec![s("k"), s("v"), s(""), bad.clone()]) {
                Err((-32602, text)) => assert!(text.contains(words), "{bad:?}: {text}"),
                other => panic!("put with {bad:?}: expected -32602, got {other:?}"),
            }
        }
        for (method, bad, words) in [
            ("get", options(&[w(1)]), "w and receipt are a write's"),
            (
                "get_versions",
                options(&[("R", Value::Integer(1))]),
                "unknown option",
            ),
            ("get", options(&[r(4)]), "more than the key's 3 replicas"),
        ] {
            match rpc.call(method, vec![s("k"), bad.clone()]) {
                Err((-32602, text)) => assert!(text.contains(words), "{bad:?}: {text}"),
                other => panic!("{method} with {bad:?}: expected -32602, got {other:?}"),
            }
        }
        match rpc.call("delete", vec![s("k"), s(""), options(&[r(1)])]) {
            Err((-32602, text)) => assert!(text.contains("takes w, not r"), "{text}"),
            other => panic!("delete with r: expected -32602, got {other:?}"),
        }
    }
    assert_eq!(lb.get("k"), Ok(Value::Nil), "no refused put wrote anything");
    // The help says what the options are.
    for rpc in [&lb, &node] {
        let help = rpc
            .call("system.methodHelp", vec![s("put")])
            .expect("methodHelp");
        for option in ["w:", "timeout_ms", "receipt"] {
            assert!(string(&help).contains(option), "{help:?}");
        }
    }
}

/// Python's `xmlrpc.client` passes options as a dict: a put with `w` and a receipt, a get
/// with `r`, and a refused option as a `Fault`.
#[test]
fn python_client_passes_options() {
    let cluster = Cluster::builder().nodes(3).in_memory().aae_off().start();
    let script = r#"
import sys, xmlrpc.client
lb = xmlrpc.client.ServerProxy('http://127.0.0.1:%s' % sys.argv[1])
answer = lb.put('john', 'novatnack', '', {'w': 3, 'timeout_ms': 2000, 'receipt': True})
assert answer['status'] == '200', answer
assert len(answer['replicas']) == 3, answer
assert all(r['fallback'] is False for r in answer['replicas']), answer
assert lb.get('john', {'r': 3}) == 'novatnack'
versions = lb.get_versions('john', {'r': 2, 'timeout_ms': 500})
assert versions['values'] == ['novatnack'] and versions['context'] == answer['context'], versions
assert lb.put('john', 'smith', answer['context'], {}) == '200'
assert lb.get('john') == 'smith'
assert lb.delete('john', '', {'w': 2}) == '200'
assert lb.get('john', {'r': 3}) is None
try:
    lb.put('john', 'x', '', {'durable': True})
    raise SystemExit('an unknown option was accepted')
except xmlrpc.client.Fault as fault:
    assert fault.faultCode == -32602, fault
print('ok')
"#;
    let port = cluster.balancer_port(0).to_string();
    let mut python = Command::new("python3")
        .args(["-c", script, &port])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be on PATH to run the Python client test");
    let deadline = Instant::now() + Duration::from_secs(60);
    while python.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = python.kill();
            panic!("the Python session still ran after 60 s");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    let output = python.wait_with_output().expect("python output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success() && stdout.trim() == "ok",
        "python3: {}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
        output.status
    );
}
