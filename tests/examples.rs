//! The examples, run as a user runs them, against a real cluster: the Python session of a
//! conflict and its resolution (`examples/conflict_session.py`) and the Rust client on dxr
//! (`examples/rust_client.rs`). Each checks what it prints and must exit 0.
//!
//! The Rust example runs as its own binary. An integration test cannot depend on an
//! example's binary (Cargo offers `CARGO_BIN_EXE_*` for `[[bin]]`s only), and `cargo test
//! --test examples` does not build examples, so the test runs `cargo build --example
//! rust_client` for its own profile and target directory (a no-op after a plain `cargo
//! test`, which builds every example), then runs `target/<profile>/examples/rust_client`,
//! found beside this test's own binary (`target/<profile>/deps/examples-<hash>`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

const CONFLICT_SESSION: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/conflict_session.py");

/// How long an example may run before it counts as hung.
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long building the Rust example may take: the library is built already, but other
/// builds may hold Cargo's lock on the target directory for a while.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// How much of an output a failure prints.
const OUTPUT_TAIL_BYTES: u64 = 16 * 1024;

/// One example at a time: a build or a second cluster beside a running example would only
/// slow it down on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn python_conflict_session_runs_against_a_cluster() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = Cluster::builder().in_memory().start();
    let balancer = format!("http://127.0.0.1:{}", cluster.balancer_port(0));
    let node = format!("http://127.0.0.1:{}", cluster.node_ports()[0]);
    let ran = run_bounded(
        cluster.dir(),
        Command::new("python3").args([CONFLICT_SESSION, &balancer, &node]),
        EXAMPLE_TIMEOUT,
    );
    assert_success("python3 examples/conflict_session.py", &ran);
}

#[test]
fn rust_client_example_runs_against_a_cluster() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let rust_client = build_rust_client();
    let cluster = Cluster::builder().in_memory().start();
    let balancer = format!("http://127.0.0.1:{}", cluster.balancer_port(0));
    let ran = run_bounded(
        cluster.dir(),
        Command::new(&rust_client).arg(&balancer),
        EXAMPLE_TIMEOUT,
    );
    assert_success("examples/rust_client", &ran);
}

/// Builds the `rust_client` example with this test's profile and target directory, and
/// returns the path of its binary.
fn build_rust_client() -> PathBuf {
    // target/<profile>/deps/examples-<hash>
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("the target directory");
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => panic!("no profile directory above {}", exe.display()),
    };

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .args([
            "build",
            "--locked",
            "--example",
            "rust_client",
            "--profile",
            profile,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    let scratch = tempfile::tempdir().expect("a directory for the build's output");
    let built = run_bounded(scratch.path(), &mut build, BUILD_TIMEOUT);
    assert_success("cargo build --example rust_client", &built);

    let binary = profile_dir
        .join("examples")
        .join(format!("rust_client{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.is_file(),
        "cargo built the example, but not at {}",
        binary.display()
    );
    binary
}

/// How a command run to its end went.
struct Ran {
    command: String,
    /// `None`: still running at the deadline, killed.
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs `command` with its output in files under `dir`; kills it once `timeout` has passed.
fn run_bounded(dir: &Path, command: &mut Command, timeout: Duration) -> Ran {
    let name = Path::new(command.get_program())
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stdout_path = dir.join(format!("{name}.stdout.log"));
    let stderr_path = dir.join(format!("{name}.stderr.log"));
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("log file"))
        .stderr(std::fs::File::create(&stderr_path).expect("log file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {description}: {e}"));

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(POLL_INTERVAL);
    };
    Ran {
        command: description,
        status,
        stdout: tail(&stdout_path, OUTPUT_TAIL_BYTES),
        stderr: tail(&stderr_path, OUTPUT_TAIL_BYTES),
    }
}

/// Prints what `what` wrote (shown by the test runner on failure, or with `--nocapture`),
/// and fails unless it exited 0.
fn assert_success(what: &str, ran: &Ran) {
    println!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        ran.command, ran.stdout, ran.stderr
    );
    match ran.status {
        None => panic!("{what} still ran after its time was up; killed"),
        Some(status) => assert!(status.success(), "{what} failed: {status}"),
    }
}
