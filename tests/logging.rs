//! The daemons' logs, as an operator reads them, with the real binaries: `--log-format json`
//! writes one JSON object per line and nothing else, `RUST_LOG` sets the level in either
//! format, and a storage node's line per request (an info event with the method and the key,
//! to watch the keys spread) is silenced by `--quiet` and by nothing else.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value as Json;

/// A key longer than the request line shows: 100 two-byte characters and a tail.
fn long_key() -> String {
    format!("{}tail", "é".repeat(100))
}

/// A key that would split a log line in two, were it written raw.
const TWO_LINES: &str = "two\nlines \u{1b}[31m";

/// Starts a storage node in memory on 127.0.0.1, printing its line per request (no
/// `--quiet` unless `extra` has it), with `extra` flags and `env` set.
fn node(dir: &Path, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
    let port = free_port();
    let mut args: Vec<String> = [
        "-p",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--in-memory",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    Daemon::start_with_env(dir, name, STORAGE_NODE, port, args, owned(env))
}

/// Starts a balancer over the one storage node on `node_port` (N = 1), with `extra` flags.
fn balancer(dir: &Path, name: &str, node_port: u16, extra: &[&str]) -> Daemon {
    let port = free_port();
    let mut args: Vec<String> = [
        "-s",
        &addr(node_port),
        "-p",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "-N",
        "1",
    ]
    .iter()
    .map(|arg| (*arg).to_owned())
    .collect();
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    Daemon::start_with_env(dir, name, LOAD_BALANCER, port, args, Vec::new())
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

/// Everything the daemon's latest start wrote on stderr, whole; its stdout must be empty
/// (logs go to stderr).
fn stderr_of(daemon: &Daemon) -> String {
    let stdout = std::fs::read_to_string(daemon.log_file("stdout")).unwrap_or_default();
    assert_eq!(stdout, "", "a daemon writes nothing on stdout");
    std::fs::read_to_string(daemon.log_file("stderr")).expect("read the daemon's stderr")
}

/// Every line of `text` as a JSON event; fails on the first line that is not a JSON object
/// with a timestamp, a level, a target and fields holding a message.
fn json_events(text: &str, whose: &str) -> Vec<Json> {
    let mut events = Vec::new();
    for line in text.lines() {
        let event: Json = serde_json::from_str(line)
            .unwrap_or_else(|error| panic!("{whose}: not JSON ({error}): {line:?}\n{text}"));
        assert!(
            event["timestamp"].is_string(),
            "{whose}: no timestamp: {line}"
        );
        assert!(event["target"].is_string(), "{whose}: no target: {line}");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&event["level"].as_str().unwrap_or("")),
            "{whose}: no level: {line}"
        );
        assert!(
            event["fields"]["message"].is_string(),
            "{whose}: no message among the fields: {line}"
        );
        events.push(event);
    }
    assert!(!events.is_empty(), "{whose} logged nothing");
    events
}

fn level(event: &Json) -> &str {
    event["level"].as_str().unwrap_or_default()
}

fn message(event: &Json) -> &str {
    event["fields"]["message"].as_str().unwrap_or_default()
}

/// The request events among `events`, as `(method, key)`.
fn requests(events: &[Json]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|event| event["fields"]["method"].is_string())
        .map(|event| {
            let fields = &event["fields"];
            (
                fields["method"].as_str().unwrap_or_default().to_owned(),
                fields["key"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Writes and reads `john` on the node itself (`local.put`, `local.get`): two request lines.
fn put_and_get_locally(node: &Daemon) {
    let rpc = node.rpc();
    assert_eq!(rpc.local_put("john", s("novatnack")), ok200());
    assert_eq!(rpc.local_get("john"), Ok(s("novatnack")));
}

/// Stops the daemon with SIGTERM (so that its stop is logged too) and checks it exited 0.
fn stop(daemon: &mut Daemon) {
    let status = daemon.terminate();
    assert!(status.success(), "{status}\n{}", daemon.logs());
}

/// With `--log-format json`, both daemons write nothing but JSON objects, one a line, each
/// with its level, message and fields; the node's request line is a structured event:
/// `method` and `key` (cut to 80 characters, `key_bytes` saying how long it was), which a
/// newline or an escape sequence in a key cannot break.
#[test]
fn json_logs_are_one_object_per_line_with_level_message_and_fields() {
    let dir = tempfile::tempdir().expect("temp dir");
    // --vnodes is ignored with a warning: a WARN event from the flags.
    let mut node = node(
        dir.path(),
        "node",
        &["--log-format", "json", "--vnodes", "8"],
        &[],
    );
    let mut lb = balancer(dir.path(), "lb", node.port(), &["--log-format", "json"]);
    let client = lb.rpc();
    let long = long_key();
    assert_eq!(client.put("john", s("novatnack")), ok200());
    assert_eq!(client.get("john"), Ok(s("novatnack")));
    assert_eq!(client.put(&long, s("long")), ok200());
    assert_eq!(client.put(TWO_LINES, s("two")), ok200());
    assert_eq!(client.delete("john"), ok200());
    stop(&mut lb);
    stop(&mut node);

    let events = json_events(&stderr_of(&node), "storage_node");
    let seen = requests(&events);
    for (method, key) in [
        ("put", "john"),
        ("get", "john"),
        ("delete", "john"),
        ("put", TWO_LINES),
    ] {
        assert!(
            seen.contains(&(method.to_owned(), key.to_owned())),
            "no request event {method} {key:?} in {seen:?}"
        );
    }
    let request = events
        .iter()
        .find(|event| event["fields"]["key"] == "john")
        .expect("a request event for john");
    assert_eq!(level(request), "INFO", "{request}");
    assert_eq!(
        message(request),
        "request",
        "the key is a field, not in the message: {request}"
    );
    assert!(request["fields"]["port"].is_u64(), "{request}");
    assert!(
        request["fields"].get("key_bytes").is_none(),
        "a whole key has no key_bytes: {request}"
    );
    let cut = events
        .iter()
        .find(|event| {
            event["fields"]["key"]
                .as_str()
                .is_some_and(|key| key.starts_with('é'))
        })
        .expect("a request event for the long key");
    assert_eq!(cut["fields"]["key"], "é".repeat(80), "{cut}");
    assert_eq!(cut["fields"]["key_bytes"], long.len(), "{cut}");
    assert!(
        events
            .iter()
            .any(|event| level(event) == "WARN" && message(event).contains("--vnodes is ignored")),
        "the flags' warning is a JSON event too"
    );
    assert!(
        events
            .iter()
            .any(|event| level(event) == "INFO" && message(event).starts_with("stopping")),
        "the stop is logged"
    );

    let events = json_events(&stderr_of(&lb), "load_balancer");
    assert!(
        events
            .iter()
            .any(|event| level(event) == "INFO" && message(event) == "load balancer serving"),
        "the balancer's start is logged"
    );
    assert!(requests(&events).is_empty(), "only nodes log requests");
}

/// `RUST_LOG=warn` leaves the warnings and drops every info line, the request lines
/// included, in both formats.
#[test]
fn rust_log_warn_silences_the_info_lines_in_both_formats() {
    let dir = tempfile::tempdir().expect("temp dir");
    for format in ["text", "json"] {
        let mut node = node(
            dir.path(),
            &format!("node-{format}"),
            &["--log-format", format, "--vnodes", "8"],
            &[("RUST_LOG", "warn")],
        );
        put_and_get_locally(&node);
        stop(&mut node);
        let text = stderr_of(&node);
        match format {
            "json" => {
                let events = json_events(&text, "storage_node");
                let levels: Vec<&str> = events.iter().map(level).collect();
                assert_eq!(levels, ["WARN"], "{text}");
                assert!(message(&events[0]).contains("--vnodes"), "{text}");
            }
            _ => {
                let lines: Vec<&str> = text.lines().collect();
                assert_eq!(lines.len(), 1, "only the warning: {text}");
                assert!(
                    lines[0].contains(" WARN ") && lines[0].contains("--vnodes"),
                    "{text}"
                );
            }
        }
    }
}

/// `--quiet` drops the request lines and nothing else: the node still says it serves and
/// that it stops. Without it, the text format shows each request as `method=... key="..."`,
/// the key quoted and escaped, with no colour codes in a file.
#[test]
fn quiet_silences_the_request_line_and_nothing_else() {
    let dir = tempfile::tempdir().expect("temp dir");

    let mut quiet = node(
        dir.path(),
        "quiet",
        &["--log-format", "json", "--quiet"],
        &[],
    );
    put_and_get_locally(&quiet);
    stop(&mut quiet);
    let events = json_events(&stderr_of(&quiet), "storage_node --quiet");
    assert_eq!(requests(&events), [], "--quiet logs no request");
    for said in ["storage node serving", "stopping"] {
        assert!(
            events
                .iter()
                .any(|event| level(event) == "INFO" && message(event).starts_with(said)),
            "--quiet keeps the other info lines: {said:?} missing"
        );
    }

    let mut chatty = node(dir.path(), "chatty", &[], &[]);
    put_and_get_locally(&chatty);
    chatty.rpc().local_put(TWO_LINES, s("two")).expect("put");
    stop(&mut chatty);
    let text = stderr_of(&chatty);
    assert!(
        !text.contains('\u{1b}'),
        "no escape codes in a file: {text:?}"
    );
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(" request "))
        .collect();
    for wanted in [
        "method=put key=\"john\"",
        "method=get key=\"john\"",
        "method=put key=\"two\\nlines \\u{1b}[31m\"",
    ] {
        assert!(
            lines
                .iter()
                .any(|line| line.contains(" INFO ") && line.contains(wanted)),
            "no request line with {wanted:?}:\n{text}"
        );
    }
    assert!(text.contains("storage node serving"), "{text}");
}

/// A daemon that cannot start still writes JSON with `--log-format json`: a flag refused
/// (exit 2) and a port it cannot listen on (exit 1) are error events.
#[test]
fn json_logs_stay_json_when_a_daemon_cannot_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = held.local_addr().expect("address").port().to_string();
    let cases: [(&[&str], i32, &str); 2] = [
        (&["--max-request-bytes", "10"], 2, "--max-request-bytes"),
        (&["-p", &port, "--bind", "127.0.0.1"], 1, "cannot listen"),
    ];
    for (flags, code, said) in cases {
        let mut args = vec!["--in-memory", "--log-format", "json"];
        args.extend_from_slice(flags);
        let exited = run_to_exit(dir.path(), STORAGE_NODE, &args);
        assert_eq!(exited.status.code(), Some(code), "{flags:?}: {exited:?}");
        assert_eq!(exited.stdout, "", "{flags:?}");
        let events = json_events(&exited.stderr, "storage_node");
        assert!(
            events
                .iter()
                .any(|event| level(event) == "ERROR" && message(event).contains(said)),
            "{flags:?}: no error event saying {said:?}: {}",
            exited.stderr
        );
    }
}
