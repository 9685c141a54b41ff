//! A conforming client that is not ours: Python's standard-library `xmlrpc.client` runs the
//! README session and more (`tests/python/seed_session.py`), and deeply nested values
//! (`tests/python/deep_values.py`), against a real cluster.

mod common;

use std::time::Duration;

use common::*;

/// How long the Python session may run before it counts as hung.
const PYTHON_TIMEOUT: Duration = Duration::from_secs(60);

const SEED_SESSION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/seed_session.py");
const DEEP_VALUES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/deep_values.py");

#[test]
fn python_xmlrpc_client_runs_the_seed_session() {
    run_python(SEED_SESSION);
}

/// Values nested 64 and 300 levels deep, past the 40 or so levels dxr's own parser stops at,
/// as Python writes and reads them.
#[test]
fn python_xmlrpc_client_round_trips_deeply_nested_values() {
    run_python(DEEP_VALUES);
}

/// Runs `script` against a fresh three-node cluster: the balancer's port, then the nodes'.
fn run_python(script: &str) {
    let cluster = Cluster::builder().nodes(3).in_memory().start();
    let mut args = vec![script.to_owned(), cluster.balancer_port(0).to_string()];
    args.extend(cluster.node_ports().iter().map(u16::to_string));
    run_python_script(cluster.dir(), &args, PYTHON_TIMEOUT);
}
