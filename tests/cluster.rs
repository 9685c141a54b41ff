//! The core of Dynamite's contract (docs/protocol.md), told as stories against real processes:
//! storage nodes and balancers started on free ports of 127.0.0.1, talked to over XML-RPC,
//! frozen with SIGSTOP or killed with SIGKILL where the story needs it.
//!
//! What stays here needs the binaries themselves: the README session, the wire (values, keys,
//! faults, HTTP limits, kept-alive and pooled connections, metrics), flags refused with an exit
//! status, a locked data directory, a hung node, a crash of every process. Placement and
//! quorum stories run in process, in `quorums.rs`; versions and repair, in `versions.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;

use common::*;

/// Seconds a cluster may take to notice that a node died and say so in `stats()`.
const FAILURE_DETECTION_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// The README session
// ---------------------------------------------------------------------------------------------

/// The README's session: put, get, delete through a balancer over three durable nodes, and
/// what `stats()` says of the cluster and of each node.
#[test]
fn seed_session_put_get_delete() {
    let cluster = Cluster::builder().nodes(3).start();
    let lb = cluster.client();

    assert_eq!(lb.put("john", s("novatnack")), ok200());
    assert_eq!(lb.get("john"), Ok(s("novatnack")));

    // With the defaults (N = 3, W = 2), at least two nodes hold their own copy.
    let nodes: Vec<Rpc> = (0..3).map(|i| cluster.node_client(i)).collect();
    let holders = local_copies(&nodes, "john")
        .iter()
        .filter(|v| **v == s("novatnack"))
        .count();
    assert!(
        holders >= 2,
        "only {holders} of 3 nodes hold john after a W=2 put"
    );

    assert_eq!(lb.get("nobody-ever-wrote-this"), Ok(Value::Nil));

    assert_eq!(lb.delete("john"), ok200());
    assert_eq!(lb.get("john"), Ok(Value::Nil));
    assert_eq!(lb.get_versions("john"), Ok((vec![], String::new())));

    // stats() describes the cluster it was started over, with the default quorums.
    let stats = lb.stats();
    assert_eq!(int(member(&stats, "N")), 3);
    assert_eq!(int(member(&stats, "R")), 2);
    assert_eq!(int(member(&stats, "W")), 2);
    let addresses: BTreeSet<String> = array(member(&stats, "servers"))
        .iter()
        .map(|server| {
            member(server, "state"); // present, whatever its form
            string(member(server, "address")).to_owned()
        })
        .collect();
    assert_eq!(addresses, cluster.servers().into_iter().collect());

    // A storage node reports what it stores.
    for node in &nodes {
        let stats = node.stats();
        int(member(&stats, "keys"));
        int(member(&stats, "hints"));
    }
}

// ---------------------------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------------------------

/// Four clients at once, each on one kept-alive connection for all its calls, see each
/// other's writes.
#[test]
fn many_clients_at_once_over_kept_alive_connections() {
    let cluster = Cluster::builder().nodes(3).in_memory().start();
    let port = cluster.balancer_port(0);

    let clients: Vec<_> = (0..4)
        .map(|client| {
            std::thread::spawn(move || {
                let lb = Rpc::new(port);
                let key = |i: usize| format!("client-{client}-{i}");
                for i in 0..50 {
                    assert_eq!(lb.put(&key(i), value(i)), ok200(), "put {}", key(i));
                }
                for i in 0..50 {
                    assert_eq!(lb.get(&key(i)), Ok(value(i)), "get {}", key(i));
                }
                lb.connections_opened()
            })
        })
        .collect();
    for (client, handle) in clients.into_iter().enumerate() {
        let connections = handle.join().expect("client thread panicked");
        assert_eq!(
            connections, 1,
            "client {client}: 100 calls needed {connections} connections"
        );
    }

    // Every client's writes are visible to everyone.
    let lb = cluster.client();
    for client in 0..4 {
        for i in 0..50 {
            assert_eq!(lb.get(&format!("client-{client}-{i}")), Ok(value(i)));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Values and keys
// ---------------------------------------------------------------------------------------------

fn date(text: &str) -> Value {
    Value::DateTime(dxr::DateTime::from_str(text).expect("valid dateTime"))
}

fn structure(members: &[(&str, Value)]) -> Value {
    Value::Struct(
        members
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Arrays and structs alternating, `depth` levels deep, with a leaf of every kind.
fn nested(depth: usize) -> Value {
    let mut value = Value::Array(vec![
        s("leaf"),
        Value::Integer(-7),
        Value::Boolean(false),
        Value::Double(0.5),
        Value::Base64(vec![0, 255]),
        date("20070101T12:00:00"),
    ]);
    for level in 0..depth {
        value = if level % 2 == 0 {
            structure(&[("level", Value::Integer(level as i32)), ("inner", value)])
        } else {
            Value::Array(vec![value, s(&format!("level {level}"))])
        };
    }
    value
}

/// Every XML-RPC value type, nested and at its extremes, comes back exactly as stored.
#[test]
fn every_value_type_round_trips_exactly() {
    let cluster = Cluster::builder().nodes(3).in_memory().start();
    let lb = cluster.client();

    let values: Vec<(&str, Value)> = vec![
        ("string", s("novatnack")),
        ("empty string", s("")),
        ("unicode string", s("héllo wörld ✓ 日本語 🦀")),
        (
            "XML special characters",
            s("<&>\"' and </value></param> & &amp;"),
        ),
        ("surrounding whitespace", s("  padded  ")),
        ("only spaces", s("   ")),
        ("newlines and tabs", s("\nfirst line\n\tsecond line\n")),
        ("int", Value::Integer(42)),
        ("int zero", Value::Integer(0)),
        ("int min", Value::Integer(i32::MIN)),
        ("int max", Value::Integer(i32::MAX)),
        ("true", Value::Boolean(true)),
        ("false", Value::Boolean(false)),
        ("double", Value::Double(3.25)),
        ("negative double", Value::Double(-1234.5678)),
        ("tiny double", Value::Double(1e-300)),
        ("large double", Value::Double(1.7976931348623157e308)),
        ("base64", Value::Base64(b"hello".to_vec())),
        ("empty base64", Value::Base64(vec![])),
        ("all bytes", Value::Base64((0..=255).collect())),
        ("dateTime", date("20070101T12:34:56")),
        ("dateTime epoch", date("19700101T00:00:00")),
        ("empty array", Value::Array(vec![])),
        ("empty struct", structure(&[])),
        (
            "struct of everything",
            structure(&[
                ("name", s("john")),
                ("age", Value::Integer(30)),
                ("admin", Value::Boolean(true)),
                ("score", Value::Double(-0.125)),
                ("avatar", Value::Base64(vec![1, 2, 3])),
                ("since", date("20000229T23:59:59")),
                ("tags", Value::Array(vec![s("a"), s("b")])),
                ("nothing", Value::Array(vec![])),
                ("member with spaces & <symbols>", s("x")),
            ]),
        ),
        ("nested twelve levels", nested(12)),
    ];

    for (i, (what, v)) in values.iter().enumerate() {
        let k = format!("type-{i}");
        assert_eq!(lb.put(&k, v.clone()), ok200(), "put {what}");
        assert_eq!(
            lb.get(&k),
            Ok(v.clone()),
            "{what} did not come back as stored"
        );
    }
    // Read again after all writes: nothing was clobbered.
    for (i, (what, v)) in values.iter().enumerate() {
        assert_eq!(
            lb.get(&format!("type-{i}")),
            Ok(v.clone()),
            "{what} on reread"
        );
    }
}

/// A value `depth` levels deep, arrays and structs alternating, as a client might write it
/// (whitespace between tags, `<int>`, untyped strings, struct members out of order, a nil),
/// and the XML text `get` must answer with: the same value as dxr writes it.
fn deep_value_xml(depth: usize) -> (String, String) {
    let mut sent = String::from(
        "<value><array><data>\n<value>bottom</value><value><boolean>1</boolean></value>\
         <value><base64>AAEC\n/w==</base64></value><value><double>0.5</double></value>\
         <value><dateTime.iso8601>20070101T12:34:56</dateTime.iso8601></value></data></array></value>",
    );
    let mut stored = String::from(
        "<value><array><data><value><string>bottom</string></value><value><boolean>1</boolean></value>\
         <value><base64>AAEC/w==</base64></value><value><double>0.5</double></value>\
         <value><dateTime.iso8601>20070101T12:34:56</dateTime.iso8601></value></data></array></value>",
    );
    for level in 0..depth {
        if level % 2 == 0 {
            sent = format!(
                "<value><struct>\n<member><name>z</name>{sent}</member>\n<member><name>n</name><value><nil/></value></member>\
                 <member><name>a</name><value><int>{level}</int></value></member>\n</struct></value>"
            );
            stored = format!(
                "<value><struct><member><name>a</name><value><i4>{level}</i4></value></member>\
                 <member><name>n</name><value><nil></nil></value></member><member><name>z</name>{stored}</member></struct></value>"
            );
        } else {
            sent = format!(
                "<value><array><data>\n{sent}\n<value>level {level} &amp; &lt;x&gt;</value>\n</data></array></value>"
            );
            stored = format!(
                "<value><array><data>{stored}<value><string>level {level} &amp; &lt;x&gt;</string></value></data></array></value>"
            );
        }
    }
    (sent, stored)
}

/// The value text inside a raw `methodResponse`, as the daemon wrote it.
fn response_value(body: &str) -> &str {
    let start = body.find("<param>").map(|i| i + "<param>".len());
    let end = body.rfind("</param>");
    match (start, end) {
        (Some(start), Some(end)) if start <= end => &body[start..end],
        _ => panic!("not a methodResponse: {}", &body[..body.len().min(300)]),
    }
}

#[test]
fn values_nest_to_any_depth_the_size_limit_allows() {
    let cluster = Cluster::builder().nodes(3).in_memory().start();
    let lb_port = cluster.balancer_port(0);
    // 10,000 levels: dxr's parser stops near 41, Python's marshaller near 500; a body built
    // by hand, about 1 MB.
    let (sent, stored) = deep_value_xml(10_000);
    let put = format!(
        "<?xml version='1.0'?>\n<methodCall>\n<methodName>put</methodName>\n<params>\n\
         <param>\n<value><string>deep</string></value>\n</param>\n<param>\n{sent}\n</param>\n</params>\n</methodCall>\n"
    );
    let response = post_raw(lb_port, put.as_bytes());
    assert_eq!(response.status, 200);
    assert_eq!(parse_response(&response.body), ok200());

    // get answers with exactly the stored text, from the balancer and from each replica.
    let get = call_xml("get", vec![s("deep")]);
    let response = post_raw(lb_port, get.as_bytes());
    assert_eq!(response.status, 200);
    assert!(
        response_value(&response.body) == stored,
        "the balancer's get differs from what was stored"
    );
    let mut holders = 0;
    for port in cluster.node_ports() {
        let response = post_raw(port, get.as_bytes());
        let value = response_value(&response.body);
        assert!(
            value == stored || value == "<value><nil/></value>",
            "a node holds something else"
        );
        holders += usize::from(value == stored);
    }
    assert!(
        holders >= 2,
        "{holders} nodes hold the deep value after a W=2 put"
    );

    // A nil at the top is still refused, at any depth below it is kept (above); a deep value
    // that is not well formed is a parse error, and the balancer keeps serving.
    let unclosed = put.replacen("</data>", "", 1);
    let response = post_raw(lb_port, unclosed.as_bytes());
    assert_eq!(
        parse_response(&response.body).map_err(|(code, _)| code),
        Err(-32700)
    );
    let lb = cluster.client();
    assert!(matches!(lb.put("deep", Value::Nil), Err((-32602, _))));
    assert_eq!(lb.put("after", s("deep")), ok200());
    assert_eq!(lb.get("after"), Ok(s("deep")));
}

/// Keys are any Unicode string up to 65536 bytes of UTF-8; one byte more is refused.
#[test]
fn keys_are_any_unicode_string_up_to_64_kib() {
    let cluster = Cluster::builder().nodes(3).in_memory().start();
    let lb = cluster.client();

    let longest_ascii = "k".repeat(65536);
    let longest_multibyte = "é".repeat(32768); // 65536 bytes of UTF-8
    let keys: Vec<(&str, &str)> = vec![
        ("empty key", ""),
        ("unicode key", "ключ-鍵-🔑"),
        ("XML special key", "<k&y \"quoted\" 'single'>"),
        ("whitespace key", "  spaced key\n"),
        ("65536-byte key", &longest_ascii),
        ("65536-byte multibyte key", &longest_multibyte),
    ];
    for (what, k) in &keys {
        assert_eq!(lb.put(k, s(what)), ok200(), "put with the {what}");
    }
    for (what, k) in &keys {
        assert_eq!(lb.get(k), Ok(s(what)), "get with the {what}");
    }
    // Keys that differ only in their last byte are different keys.
    assert_eq!(lb.get(&"k".repeat(65535)), Ok(Value::Nil));
    for (what, k) in &keys {
        assert_eq!(lb.delete(k), ok200(), "delete with the {what}");
        assert_eq!(
            lb.get(k),
            Ok(Value::Nil),
            "get after delete with the {what}"
        );
    }

    // One byte more is refused, counted in bytes of UTF-8, not in characters.
    for too_long in ["k".repeat(65537), format!("{longest_multibyte}a")] {
        let len = too_long.len();
        let code = |r: RpcResult| r.map_err(|(code, _)| code);
        assert_eq!(
            code(lb.put(&too_long, s("v"))),
            Err(-32602),
            "put, {len}-byte key"
        );
        assert_eq!(code(lb.get(&too_long)), Err(-32602), "get, {len}-byte key");
        assert_eq!(
            code(lb.delete(&too_long)),
            Err(-32602),
            "delete, {len}-byte key"
        );
    }
    assert_eq!(lb.put("still", s("serving")), ok200());
}

// ---------------------------------------------------------------------------------------------
// Faults and the wire
// ---------------------------------------------------------------------------------------------

/// The fault in a raw response, which must travel as HTTP 200 like any XML-RPC response.
fn fault_of(response: &HttpResponse) -> (i32, String) {
    assert_eq!(
        response.status, 200,
        "a fault is an HTTP 200 response: {response:?}"
    );
    match parse_response(&response.body) {
        Err(fault) => fault,
        Ok(value) => panic!("expected a fault, got the value {value:?}"),
    }
}

/// Something no daemon has a reason to say back.
const MARKER: &str = "QZXJ-GARBAGE-MARKER-7f3a9c";

/// Bodies that are not XML-RPC get a -32700 fault that does not echo them, and both daemons
/// keep serving.
#[test]
fn malformed_requests_get_faults_and_the_daemons_keep_serving() {
    let cluster = Cluster::builder().nodes(1).in_memory().start();
    let garbage = MARKER.repeat(500);

    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("an empty body", b"".to_vec()),
        ("text that is not XML", b"this is not xml at all".to_vec()),
        (
            "truncated XML",
            b"<?xml version=\"1.0\"?><methodCall><methodName>put</methodName><params>".to_vec(),
        ),
        (
            "XML that is no call",
            b"<?xml version=\"1.0\"?><notACall/>".to_vec(),
        ),
        (
            "a call without a method name",
            b"<methodCall><params></params></methodCall>".to_vec(),
        ),
        (
            "bytes that are not UTF-8",
            vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80],
        ),
        (
            "truncated XML full of garbage",
            format!("<methodCall><methodName>put</methodName><params><param><value>{garbage}")
                .into_bytes(),
        ),
        (
            "unbalanced tags full of garbage",
            format!("<methodCall><{garbage}></methodCall>").into_bytes(),
        ),
    ];

    for (daemon, port) in [
        ("balancer", cluster.balancer_port(0)),
        ("storage node", cluster.node_ports()[0]),
    ] {
        for (what, body) in &bodies {
            let response = post_raw(port, body);
            let (code, text) = fault_of(&response);
            assert_eq!(code, -32700, "{daemon}, {what}: fault {text:?}");
            assert!(
                !response.body.contains(MARKER),
                "{daemon}, {what}: the fault echoes the request body: {}",
                response.body
            );
            assert_eq!(health(port), Some(200), "{daemon} after {what}");
        }
    }

    // A well-formed call whose parameters are wrong is not echoed back either.
    let lb_port = cluster.balancer_port(0);
    let response = post_raw(
        lb_port,
        call_xml("put", vec![Value::Integer(7), s(&garbage)]).as_bytes(),
    );
    assert_eq!(fault_of(&response).0, -32602);
    assert!(
        !response.body.contains(MARKER),
        "fault echoes a parameter: {}",
        response.body
    );

    // Both daemons still serve, on both paths, and answer /health and /metrics.
    let lb = cluster.client();
    assert_eq!(lb.put("after", s("garbage")), ok200());
    assert_eq!(lb.get("after"), Ok(s("garbage")));
    assert_eq!(
        Rpc::new(lb_port).with_path("/RPC2").get("after"),
        Ok(s("garbage"))
    );
    assert_eq!(cluster.node_client(0).get("never-written"), Ok(Value::Nil));
    for port in [lb_port, cluster.node_ports()[0]] {
        assert_eq!(health(port), Some(200));
        let metrics = http(port, "GET", "/metrics", b"").expect("GET /metrics");
        assert_eq!(metrics.status, 200, "GET /metrics: {}", metrics.body);
    }
}

/// Unknown methods get -32601, wrong parameters -32602, and nothing refused is stored.
#[test]
fn unknown_methods_and_bad_parameters_are_refused() {
    let cluster = Cluster::builder().nodes(1).in_memory().start();
    let lb = cluster.client();
    let code = |r: RpcResult| r.map_err(|(code, _)| code);

    assert_eq!(code(lb.call("no_such_method", vec![s("k")])), Err(-32601));
    assert_eq!(code(lb.call("PUT", vec![s("k"), s("v")])), Err(-32601));

    let bad_calls: Vec<(&str, &str, Vec<Value>)> = vec![
        ("put with one parameter", "put", vec![s("k")]),
        ("put with no parameters", "put", vec![]),
        (
            "put with four parameters",
            "put",
            vec![s("k"), s("v"), s("ctx"), s("x")],
        ),
        (
            "put with an int key",
            "put",
            vec![Value::Integer(1), s("v")],
        ),
        (
            "put with a base64 key",
            "put",
            vec![Value::Base64(b"k".to_vec()), s("v")],
        ),
        ("put with a nil value", "put", vec![s("k"), Value::Nil]),
        (
            "put with a garbage context",
            "put",
            vec![s("k"), s("v"), s("not a context!")],
        ),
        (
            "put with an int context",
            "put",
            vec![s("k"), s("v"), Value::Integer(3)],
        ),
        ("get with no parameters", "get", vec![]),
        ("get with two parameters", "get", vec![s("k"), s("k")]),
        ("get with an int key", "get", vec![Value::Integer(1)]),
        ("get with a nil key", "get", vec![Value::Nil]),
        ("get_versions with no parameters", "get_versions", vec![]),
        ("delete with no parameters", "delete", vec![]),
        (
            "delete with three parameters",
            "delete",
            vec![s("k"), s(""), s("")],
        ),
        (
            "delete with a garbage context",
            "delete",
            vec![s("k"), s("not a context!")],
        ),
    ];
    for (what, method, params) in bad_calls {
        let result = lb.call(method, params);
        assert!(
            matches!(result, Err((-32602, _))),
            "{what}: expected fault -32602, got {result:?}"
        );
    }

    // None of it was stored, and the balancer still serves.
    assert_eq!(lb.get("k"), Ok(Value::Nil));
    assert_eq!(lb.put("k", s("v")), ok200());
    assert_eq!(lb.get("k"), Ok(s("v")));
}

/// A body over `--max-request-bytes` gets HTTP 413 before it is parsed; one at the limit is
/// served.
#[test]
fn a_body_over_the_limit_gets_413() {
    let cluster = Cluster::builder()
        .nodes(1)
        .in_memory()
        .balancer_arg("--max-request-bytes")
        .balancer_arg("1024")
        .start();
    let port = cluster.balancer_port(0);

    // A well-formed call of exactly 1024 bytes is accepted.
    let base = call_xml("put", vec![s("limit"), s("")]).len();
    let at_limit = call_xml("put", vec![s("limit"), s(&"x".repeat(1024 - base))]);
    assert_eq!(at_limit.len(), 1024);
    let response = post_raw(port, at_limit.as_bytes());
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(parse_response(&response.body), ok200());

    // A well-formed call of 4096 bytes is refused before it is parsed.
    let big_base = call_xml("put", vec![s("big"), s("")]).len();
    let too_big = call_xml("put", vec![s("big"), s(&"x".repeat(4096 - big_base))]);
    assert_eq!(too_big.len(), 4096);
    let response = post_raw(port, too_big.as_bytes());
    assert_eq!(response.status, 413, "body: {}", response.body);

    // The internal batch endpoint is the storage nodes'; a balancer refuses it before
    // reading a body its own limit would not allow.
    let response = http(port, "POST", "/internal/batch", &[0u8; 4096]).expect("batch POST");
    assert_eq!(response.status, 404, "body: {}", response.body);

    let lb = cluster.client();
    assert_eq!(lb.get("big"), Ok(Value::Nil));
    assert_eq!(lb.get("limit"), Ok(s(&"x".repeat(1024 - base))));
    assert_eq!(health(port), Some(200));
}

/// `system.listMethods`, `system.methodHelp` and `system.multicall`, faults in place.
#[test]
fn system_methods_list_help_and_multicall() {
    let cluster = Cluster::builder().nodes(1).in_memory().start();
    let lb = cluster.client();

    let methods = lb
        .call("system.listMethods", vec![])
        .expect("system.listMethods");
    let methods: BTreeSet<&str> = array(&methods).iter().map(string).collect();
    for method in ["put", "get", "delete", "get_versions", "stats"] {
        assert!(
            methods.contains(method),
            "system.listMethods lacks {method}: {methods:?}"
        );
    }
    let help = lb
        .call("system.methodHelp", vec![s("put")])
        .expect("system.methodHelp");
    string(&help);

    let call = |method: &str, params: Vec<Value>| {
        structure(&[("methodName", s(method)), ("params", Value::Array(params))])
    };
    let results = lb.call(
        "system.multicall",
        vec![Value::Array(vec![
            call("put", vec![s("multi"), s("value")]),
            call("get", vec![s("multi")]),
        ])],
    );
    assert_eq!(
        results,
        Ok(Value::Array(vec![
            Value::Array(vec![s("200")]),
            Value::Array(vec![s("value")]),
        ]))
    );

    // A bad call inside a multicall is a fault struct in its place; the others still run.
    let results = lb
        .call(
            "system.multicall",
            vec![Value::Array(vec![
                call("get", vec![s("multi")]),
                call("put", vec![s("only a key")]),
                call("no_such_method", vec![]),
                call("get", vec![s("never-written")]),
            ])],
        )
        .expect("system.multicall");
    let results = array(&results);
    assert_eq!(results.len(), 4, "{results:?}");
    assert_eq!(results[0], Value::Array(vec![s("value")]));
    assert_eq!(
        int(member(&results[1], "faultCode")),
        -32602,
        "{:?}",
        results[1]
    );
    string(member(&results[1], "faultString"));
    assert_eq!(
        int(member(&results[2], "faultCode")),
        -32601,
        "{:?}",
        results[2]
    );
    assert_eq!(results[3], Value::Array(vec![Value::Nil]));
}

// ---------------------------------------------------------------------------------------------
// Refusing to start
// ---------------------------------------------------------------------------------------------

/// Impossible flags make both binaries exit with status 2 and a one-line reason.
#[test]
fn bad_flags_are_refused_with_status_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing listens on these: validation comes before any connection.
    let (a, b, c) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let port = free_port().to_string();
    let lb = |servers: &[&str], flags: &[&str]| {
        let mut args: Vec<&str> = vec!["-p", &port, "--bind", "127.0.0.1"];
        for server in servers {
            args.extend(["-s", server]);
        }
        args.extend(flags);
        run_to_exit(dir.path(), LOAD_BALANCER, &args)
    };

    let without_servers = lb(&[], &[]);
    assert_eq!(
        without_servers.status.code(),
        Some(2),
        "no -s: {without_servers:?}"
    );
    assert!(
        !without_servers.stderr.trim().is_empty(),
        "no -s prints a usage"
    );

    let three = [a.as_str(), b.as_str(), c.as_str()];
    let two_distinct = [a.as_str(), a.as_str(), b.as_str()];
    let refused: Vec<(&str, &[&str], &[&str])> = vec![
        ("-N 0", &three, &["-N", "0"]),
        ("-N 4 over 3 servers", &three, &["-N", "4"]),
        ("-R 0", &three, &["-R", "0"]),
        ("-R 4 over 3 servers", &three, &["-R", "4"]),
        ("-W 0", &three, &["-W", "0"]),
        ("-W 4 over 3 servers", &three, &["-W", "4"]),
        ("-R larger than -N", &three, &["-N", "2", "-R", "3"]),
        ("-W larger than -N", &three, &["-N", "2", "-W", "3"]),
        ("-N 3 over 2 distinct servers", &two_distinct, &["-N", "3"]),
    ];
    for (what, servers, flags) in refused {
        let exited = lb(servers, flags);
        assert_eq!(exited.status.code(), Some(2), "{what}: {exited:?}");
        let reason = exited.stderr.trim();
        assert!(
            !reason.is_empty() && reason.lines().count() == 1,
            "{what}: expected a one-line reason on stderr, got {reason:?}"
        );
    }

    for bad_port in ["notaport", "70000", "-1"] {
        let exited = run_to_exit(
            dir.path(),
            STORAGE_NODE,
            &[
                "-p",
                bad_port,
                "--bind",
                "127.0.0.1",
                "--in-memory",
                "--quiet",
            ],
        );
        assert_eq!(
            exited.status.code(),
            Some(2),
            "storage_node -p {bad_port}: {exited:?}"
        );
    }
}

/// A second node on a data directory another node holds refuses to start, naming the lock;
/// the first one is unharmed.
#[test]
fn a_second_node_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("shared-data");
    let data_dir_arg = data_dir.to_string_lossy().into_owned();
    let first = Daemon::storage_node(
        dir.path(),
        "first",
        free_port(),
        &["--data-dir".to_owned(), data_dir_arg.clone()],
    );

    let second_port = free_port().to_string();
    let second = run_to_exit(
        dir.path(),
        STORAGE_NODE,
        &[
            "-p",
            &second_port,
            "--bind",
            "127.0.0.1",
            "--quiet",
            "--data-dir",
            &data_dir_arg,
        ],
    );
    assert!(
        !second.status.success(),
        "the second node started: {second:?}"
    );
    let stderr = second.stderr.to_lowercase();
    assert!(
        stderr.contains("lock") || second.stderr.contains(&data_dir_arg),
        "stderr names neither the lock nor the directory: {:?}",
        second.stderr
    );

    // The first node is unharmed.
    assert_eq!(health(first.port()), Some(200));
    assert_eq!(first.rpc().local_get("anything"), Ok(Value::Nil));
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// A node frozen with SIGSTOP neither blocks writes nor hangs reads, and counts again once
/// resumed.
#[test]
fn a_hung_node_neither_blocks_writes_nor_hangs_reads() {
    // Speed is the benchmark's business (examples/bench.sh, PARTS=hung); this checks the
    // behaviour: writes go on, and a read that needs the hung node fails instead of hanging
    // (the test client gives up after RPC_TIMEOUT, far beyond the 1 s replica timeout).
    let mut cluster = Cluster::builder()
        .nodes(3)
        .in_memory()
        .replicas(3)
        .write_quorum(2)
        .read_quorum(3)
        .timeout_ms(1000)
        .start();
    let lb = cluster.client();

    // SIGSTOP: the node's sockets still accept connections, but nothing answers.
    cluster.nodes[2].stop();

    // Only a put the node took before it was found hung can have its outcome unknown.
    let unknown = lb.put_keys_with_a_hung_node(0..20, "with a hung node");
    assert!(
        unknown <= 1,
        "{unknown} puts met the hung node as coordinator"
    );

    // R = 3 cannot be met while one replica hangs: a 503 once it timed out, not a hang.
    let get = lb.get(&key(0));
    assert_quorum_fault(
        "get with a hung node",
        get,
        ("R", "read"),
        2,
        &cluster.servers(),
    );

    // Resumed, the node counts again, and every write is readable from all three.
    cluster.nodes[2].cont();
    wait_until(
        FAILURE_DETECTION_TIMEOUT,
        "reads with R = 3 succeed again after SIGCONT",
        || lb.get(&key(0)) == Ok(value(0)),
    );
    for i in 0..20 {
        assert_eq!(
            lb.get(&key(i)),
            Ok(value(i)),
            "get {} after SIGCONT",
            key(i)
        );
    }
}

/// Acknowledged puts and deletes survive SIGKILL of every node and balancer.
#[test]
fn acknowledged_writes_survive_sigkill_of_every_process() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(2)
        .start();
    let lb = cluster.client();
    lb.put_keys(0..300, "");
    // Acknowledged deletes are data too.
    for i in (0..300).step_by(10) {
        assert_eq!(lb.delete(&key(i)), ok200(), "delete {}", key(i));
    }

    cluster.crash_and_restart_all();

    let lb = cluster.client();
    for i in 0..300 {
        let expected = if i % 10 == 0 { Value::Nil } else { value(i) };
        assert_eq!(
            lb.get(&key(i)),
            Ok(expected),
            "get {} after the crash",
            key(i)
        );
    }
}

/// A balancer reaches each node over a few pooled keep-alive connections, not one per call.
#[test]
fn the_balancer_reaches_nodes_over_pooled_connections() {
    // Hundreds of requests through one balancer must reuse a few keep-alive connections per
    // node, not open one per replica call.
    let cluster = Cluster::builder().in_memory().start();
    let client = cluster.client();
    const REQUESTS: usize = 300;
    for i in 0..REQUESTS {
        assert_eq!(client.put(&key(i), value(i)), ok200(), "put {}", key(i));
        assert_eq!(client.get(&key(i)), Ok(value(i)), "get {}", key(i));
    }
    for i in 0..cluster.nodes.len() {
        let stats = cluster.node_client(i).stats();
        let connections = int(member(&stats, "connections"));
        // Each node served ~REQUESTS * 2 internal calls; a handful of connections carry them
        // (the test's own stats connection included).
        assert!(
            connections < 20,
            "node {i} accepted {connections} connections for {} requests",
            REQUESTS * 2
        );
    }
}

/// `GET /metrics` counts requests, servers up and keys, in OpenMetrics text.
#[test]
fn metrics_count_what_happened_in_prometheus_text() {
    let cluster = Cluster::builder().in_memory().start();
    let lb = cluster.client();
    assert_eq!(lb.put("m", s("v")), ok200());
    assert_eq!(lb.get("m"), Ok(s("v")));
    assert_eq!(lb.get("m"), Ok(s("v")));

    let scrape = |port: u16| {
        let response = http(port, "GET", "/metrics", b"").expect("GET /metrics");
        assert_eq!(response.status, 200);
        // Every sample line is `name{labels} value`; comments are HELP or TYPE.
        let mut samples = BTreeMap::new();
        for line in response.body.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                assert!(
                    comment.starts_with("HELP ")
                        || comment.starts_with("TYPE ")
                        || comment == "EOF",
                    "{line}"
                );
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            samples.insert(series.to_owned(), value);
        }
        samples
    };
    let balancer = scrape(cluster.balancer_port(0));
    assert_eq!(
        balancer[r#"dynamite_balancer_requests_total{method="put"}"#],
        1.0
    );
    assert_eq!(
        balancer[r#"dynamite_balancer_requests_total{method="get"}"#],
        2.0
    );
    assert_eq!(balancer["dynamite_balancer_servers_up"], 3.0);
    for port in cluster.node_ports() {
        // W = 2: the third replica's copy may still be on its way when put answers.
        wait_until(Duration::from_secs(10), "every node counts the key", || {
            scrape(port)["dynamite_node_keys"] == 1.0
        });
        assert!(scrape(port)["dynamite_connections_accepted_total"] >= 1.0);
    }
}
