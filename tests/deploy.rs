//! What `deploy/` promises, checked as far as this machine can without systemd running or a
//! Docker daemon:
//!
//! - the systemd units pass `systemd-analyze verify` (pointed at the built binaries), keep
//!   their hardening (and `systemd-analyze security` rates them), and their example
//!   environment files hold flags the daemons take;
//! - the daemons serve, stop and sync under the restrictions of those units that the kernel
//!   enforces on a process (no new privileges, memory never writable and executable, the
//!   units' system call filter and address families), with TLS and both storage engines;
//! - the compose file runs three nodes and a balancer with flags the daemons take, and the
//!   Dockerfile has its two stages; the containers' health check tells a serving daemon from
//!   a missing or hung one;
//! - `--help` of every binary and subcommand explains each flag and says its default.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// The admin command under test.
const DYNAMITE: &str = env!("CARGO_BIN_EXE_dynamite");

/// The units and the daemon each runs.
const UNITS: [(&str, &str); 2] = [
    ("dynamite-storage-node.service", "storage_node"),
    ("dynamite-load-balancer.service", "load_balancer"),
];

/// Where the units expect the binaries (`cargo install --root /usr/local`, or a copy).
const INSTALLED_BIN: &str = "/usr/local/bin/";

/// Worst `systemd-analyze security` exposure the units may have, in its tenths (0 to 100;
/// under 20 it says "OK").
const EXPOSURE_THRESHOLD: u32 = 20;

/// A file of the repository.
fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The built binary named `name`.
fn binary(name: &str) -> &'static str {
    match name {
        "storage_node" => STORAGE_NODE,
        "load_balancer" => LOAD_BALANCER,
        "dynamite" => DYNAMITE,
        other => panic!("no binary {other}"),
    }
}

/// Runs `program args`, its output captured (for commands that exit at once).
fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Whether `systemd-analyze` runs here; skips `test` (see [`skip`]) when it does not.
fn systemd_analyze_or_skip(test: &str) -> bool {
    let runs = Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !runs {
        skip(
            test,
            "systemd-analyze (Debian package systemd) is missing; tests/run.sh installs it",
        );
    }
    runs
}

/// A unit file's settings, as `(section, key, value)` in order (repeated keys repeated).
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        settings.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    settings
}

/// The `[Service]` values of `key`.
fn service_values<'a>(settings: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    settings
        .iter()
        .filter(|(section, k, _)| section == "Service" && k == key)
        .map(|(_, _, value)| value.as_str())
        .collect()
}

/// The one `[Service]` value of `key`.
fn service_value<'a>(settings: &'a [(String, String, String)], key: &str, unit: &str) -> &'a str {
    match service_values(settings, key)[..] {
        [value] => value,
        ref values => panic!("{unit}: {key}= set {} times", values.len()),
    }
}

/// An environment file's variables (`KEY=VALUE` lines; comments and blank lines skipped).
fn environment_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
            (key.trim().to_owned(), value.trim().to_owned())
        })
        .collect()
}

/// `ExecStart=` as systemd runs it with `env`: words split on spaces, each unbraced `$VAR`
/// replaced by the words of its value (none when it is empty or missing).
fn exec_start_words(exec_start: &str, env: &BTreeMap<String, String>) -> Vec<String> {
    let mut words = Vec::new();
    for word in exec_start.split_whitespace() {
        match word.strip_prefix('$') {
            Some(name) => {
                assert!(
                    !name.starts_with('{'),
                    "${{VAR}} would pass a whole value as one argument: {word}"
                );
                let value = env.get(name).map(String::as_str).unwrap_or_default();
                words.extend(value.split_whitespace().map(str::to_owned));
            }
            None => words.push(word.to_owned()),
        }
    }
    words
}

/// Checks that the binary `program` takes `args`: clap reads every flag and value before it
/// acts on a trailing `--help`, so an unknown flag or a bad value fails, and the rest exits 0
/// without starting anything.
fn assert_flags_accepted(program: &str, args: &[String], whose: &str) {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.push("--help");
    let output = run(binary(program), &all);
    assert!(
        output.status.success(),
        "{whose}: {program} refuses {args:?}:\n{}",
        text(&output)
    );
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

/// The units, their binaries replaced by the ones just built, pass `systemd-analyze verify`
/// with nothing to say about them (an unknown or misplaced key is only a warning there, so
/// any line naming them fails the test), and `systemd-analyze security` rates them OK.
#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if !systemd_analyze_or_skip("the_systemd_units_pass_systemd_analyze_verify") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut paths = Vec::new();
    for (unit, program) in UNITS {
        let installed = format!("{INSTALLED_BIN}{program}");
        let text = read(&format!("deploy/systemd/{unit}"));
        assert!(
            text.contains(&format!("ExecStart={installed} ")),
            "{unit} runs {installed}"
        );
        let path = dir.path().join(unit);
        std::fs::write(&path, text.replace(&installed, binary(program))).expect("write unit");
        paths.push(path.to_string_lossy().into_owned());
    }

    let mut args = vec!["verify"];
    args.extend(paths.iter().map(String::as_str));
    let verified = run("systemd-analyze", &args);
    let said = text(&verified);
    assert!(verified.status.success(), "systemd-analyze verify:\n{said}");
    let about_ours: Vec<&str> = said
        .lines()
        .filter(|line| UNITS.iter().any(|(unit, _)| line.contains(unit)))
        .collect();
    assert!(
        about_ours.is_empty(),
        "systemd-analyze verify has something to say:\n{}",
        about_ours.join("\n")
    );

    for path in &paths {
        let threshold = format!("--threshold={EXPOSURE_THRESHOLD}");
        let rated = run(
            "systemd-analyze",
            &["security", "--offline=true", &threshold, "--no-pager", path],
        );
        let said = text(&rated);
        let overall = said
            .lines()
            .find(|line| line.contains("Overall exposure level"))
            .unwrap_or("no overall exposure level")
            .trim();
        eprintln!("{overall}");
        assert!(
            rated.status.success(),
            "exposure over {EXPOSURE_THRESHOLD}/100: {overall}\n{said}"
        );
    }
}

/// The hardening and the running conditions each unit promises (docs/deploy.md): a user of
/// its own, a read-only system, no capabilities, IP and Unix sockets only, memory never
/// writable and executable, its flags from /etc/dynamite, and time to stop cleanly.
#[test]
fn the_units_keep_their_hardening() {
    for (unit, program) in UNITS {
        let settings = unit_settings(&read(&format!("deploy/systemd/{unit}")));
        for (key, wanted) in [
            ("User", "dynamite"),
            ("Group", "dynamite"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("CapabilityBoundingSet", ""),
            ("AmbientCapabilities", ""),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("SystemCallArchitectures", "native"),
            ("LockPersonality", "yes"),
            ("MemoryDenyWriteExecute", "yes"),
            ("Restart", "on-failure"),
            ("KillSignal", "SIGTERM"),
            ("ConfigurationDirectory", "dynamite"),
        ] {
            assert_eq!(
                service_value(&settings, key, unit),
                wanted,
                "{unit}: {key}="
            );
        }
        assert_eq!(
            service_value(&settings, "EnvironmentFile", unit),
            format!("/etc/dynamite/{program}.env"),
            "{unit}"
        );
        let stop_s: u64 = service_value(&settings, "TimeoutStopSec", unit)
            .parse()
            .expect("TimeoutStopSec in seconds");
        let stop_needs = dynamite::shutdown::DRAIN_TIMEOUT + dynamite::runtime::LEFTOVER_TIMEOUT;
        assert!(
            Duration::from_secs(stop_s) > stop_needs * 2,
            "{unit}: TimeoutStopSec={stop_s} leaves no room past the {stop_needs:?} a stop takes"
        );
        let exec_start = service_value(&settings, "ExecStart", unit);
        if program == "storage_node" {
            assert_eq!(service_value(&settings, "StateDirectory", unit), "dynamite");
            assert!(
                exec_start.contains(" --data-dir /var/lib/dynamite/"),
                "{unit}: the data in the state directory: {exec_start}"
            );
        }
    }
}

/// The example environment files set every variable their unit's `ExecStart=` uses, to flags
/// the daemon takes, naming secret files under /etc/dynamite only.
#[test]
fn the_example_environment_files_hold_the_daemons_own_flags() {
    for (unit, program) in UNITS {
        let settings = unit_settings(&read(&format!("deploy/systemd/{unit}")));
        let env = environment_file(&read(&format!("deploy/systemd/{program}.env")));
        let exec_start = service_value(&settings, "ExecStart", unit);
        for word in exec_start.split_whitespace() {
            if let Some(name) = word.strip_prefix('$') {
                assert!(env.contains_key(name), "{program}.env does not set {name}");
            }
        }
        let words = exec_start_words(exec_start, &env);
        assert_eq!(words[0], format!("{INSTALLED_BIN}{program}"));
        let args = &words[1..];
        for pair in args.windows(2) {
            if pair[0].ends_with("-file") || pair[0].starts_with("--tls-") {
                assert!(
                    pair[1].starts_with("/etc/dynamite/"),
                    "{program}.env: {} {} is not under /etc/dynamite",
                    pair[0],
                    pair[1]
                );
            }
        }
        assert_flags_accepted(program, args, &format!("{program}.env"));
    }
}

/// A CA and a certificate for 127.0.0.1 signed by it, written into `dir` as `ca.pem`,
/// `node.pem` and `node.key` (mode 600).
fn write_certificates(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Dynamite deploy test CA");
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("CA");
    let node_key = rcgen::KeyPair::generate().expect("node key");
    let mut node = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    node.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let node_cert = node
        .signed_by(&node_key, &issuer)
        .expect("node certificate");
    std::fs::write(dir.join("ca.pem"), issuer.pem()).expect("write ca.pem");
    std::fs::write(dir.join("node.pem"), node_cert.pem()).expect("write node.pem");
    let key = dir.join("node.key");
    std::fs::write(&key, node_key.serialize_pem()).expect("write node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// tests/python/unit_sandbox.py: runs a program under the units' kernel-enforced limits.
fn sandbox_script() -> String {
    repo("tests/python/unit_sandbox.py")
        .to_string_lossy()
        .into_owned()
}

/// Starts `program args` on `port` inside the sandbox (same pid: the script execs it).
fn sandboxed(dir: &Path, name: &str, program: &str, port: u16, args: Vec<String>) -> Daemon {
    let mut all = vec![sandbox_script(), binary(program).to_owned()];
    all.extend(args);
    Daemon::start(dir, name, "python3", port, all)
}

/// The daemons as the units confine them: no new privileges, no memory both writable and
/// executable (mimalloc, aws-lc), only the system calls of `@system-service` less
/// `@privileged` and `@resources`, sockets of AF_INET, AF_INET6 and AF_UNIX only. Two nodes,
/// one per storage engine, serve HTTPS to a balancer that finds them by name and checks
/// their certificates; writes and reads go through; every daemon stops on SIGTERM with
/// status 0, its storage synced.
#[test]
fn the_daemons_serve_under_the_units_restrictions() {
    const TEST: &str = "the_daemons_serve_under_the_units_restrictions";
    let probe = run("python3", &[&sandbox_script(), "/bin/true"]);
    match probe.status.code() {
        Some(0) => {}
        Some(77) => {
            skip(TEST, text(&probe).trim());
            return;
        }
        _ => panic!("the sandbox failed: {}", text(&probe)),
    }
    let dir = tempfile::tempdir().expect("temp dir");
    write_certificates(dir.path());
    let file = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let mut nodes = Vec::new();
    for engine in ["log", "fjall"] {
        let port = free_port();
        let args = [
            "-p",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            // Named as hosts are (db1:20050), so that calls to it resolve a name.
            "--advertise",
            &format!("localhost:{port}"),
            "--data-dir",
            &file(&format!("data-{engine}")),
            "--engine",
            engine,
            "--tls-cert",
            &file("node.pem"),
            "--tls-key",
            &file("node.key"),
            "--tls-ca",
            &file("ca.pem"),
        ]
        .map(str::to_owned)
        .to_vec();
        nodes.push(sandboxed(
            dir.path(),
            &format!("node-{engine}"),
            "storage_node",
            port,
            args,
        ));
    }
    let lb_port = free_port();
    let mut args = Vec::new();
    for node in &nodes {
        args.extend(["-s".to_owned(), format!("localhost:{}", node.port())]);
    }
    args.extend(
        [
            "-p",
            &lb_port.to_string(),
            "--bind",
            "127.0.0.1",
            "-N",
            "2",
            "-W",
            "2",
            "-R",
            "2",
            "--tls-ca",
            &file("ca.pem"),
        ]
        .map(str::to_owned),
    );
    let mut lb = sandboxed(dir.path(), "lb", "load_balancer", lb_port, args);

    let client = lb.rpc();
    wait_until_ok(
        Duration::from_secs(30),
        "a write through the balancer",
        || {
            client
                .put("john", s("novatnack"))
                .map(|_| ())
                .map_err(|fault| format!("{fault:?}"))
        },
    );
    for i in 0..50 {
        assert_eq!(client.put(&key(i), value(i)), ok200(), "put {i}");
    }
    for i in 0..50 {
        assert_eq!(client.get(&key(i)), Ok(value(i)), "get {i}");
    }
    assert_eq!(client.get("john"), Ok(s("novatnack")));

    for daemon in std::iter::once(&mut lb).chain(nodes.iter_mut()) {
        let status = daemon.terminate();
        let logs = daemon.logs();
        assert!(status.success(), "{status}\n{logs}");
        assert!(logs.contains("sandbox: "), "ran in the sandbox: {logs}");
        assert!(
            !logs.contains(" ERROR ") && !logs.contains("Operation not permitted"),
            "something was refused:\n{logs}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Containers
// ---------------------------------------------------------------------------------------------

/// deploy/compose.yaml as JSON, read by Python's PyYAML; `None` (the test skipped) where
/// PyYAML is missing.
fn compose_file(test: &str) -> Option<serde_json::Value> {
    let output = run(
        "python3",
        &[
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            &repo("deploy/compose.yaml").to_string_lossy(),
        ],
    );
    let said = text(&output);
    if said.contains("No module named 'yaml'") {
        skip(
            test,
            "Python's PyYAML is missing (pip install PyYAML); tests/run.sh installs it",
        );
        return None;
    }
    assert!(output.status.success(), "compose.yaml is not YAML: {said}");
    Some(serde_json::from_slice(&output.stdout).expect("JSON from Python"))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|item| match item {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
        .collect()
}

/// The value after `flag` in `args` (the last one, as clap takes it).
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .filter(|pair| pair[0] == flag)
        .map(|pair| pair[1].as_str())
        .next_back()
}

/// The values of a repeated `flag` in `args`.
fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|pair| pair[0] == flag)
        .map(|pair| pair[1].as_str())
        .collect()
}

/// Three nodes and a balancer from the Dockerfile's image, with flags the daemons take:
/// each node advertises its service name, all share the same seeds, keep their data in a
/// volume of their own and have the cluster secret as a compose secret; the balancer is
/// published on loopback only; the health check asks each daemon's own port; a stop leaves
/// more than the daemons' drain.
#[test]
fn the_compose_file_runs_three_nodes_and_a_balancer() {
    let Some(compose) = compose_file("the_compose_file_runs_three_nodes_and_a_balancer") else {
        return;
    };
    let services = compose["services"].as_object().expect("services");
    let mut names: Vec<&str> = services.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["balancer", "node1", "node2", "node3"]);
    let secrets = compose["secrets"].as_object().expect("top-level secrets");
    let volumes = compose["volumes"].as_object().expect("top-level volumes");
    let seeds: Vec<String> = ["node1", "node2", "node3"]
        .iter()
        .map(|node| {
            let args = strings(&services[*node]["command"]);
            flag_value(&args, "--advertise")
                .expect("--advertise")
                .to_owned()
        })
        .collect();

    for (name, service) in services {
        let command = strings(&service["command"]);
        let program = command[0].as_str();
        let args = &command[1..];
        assert_eq!(
            service["build"]["dockerfile"], "deploy/Dockerfile",
            "{name}: {service}"
        );
        assert!(
            std::fs::metadata(
                repo("deploy").join(service["build"]["context"].as_str().expect("context"))
            )
            .is_ok_and(|m| m.is_dir()),
            "{name}: the build context is a directory"
        );
        assert_eq!(
            service["stop_signal"], "SIGTERM",
            "{name}: stops on SIGTERM"
        );
        let grace = service["stop_grace_period"]
            .as_str()
            .and_then(|period| period.strip_suffix('s'))
            .and_then(|seconds| seconds.parse::<u64>().ok())
            .expect("stop_grace_period in seconds");
        assert!(
            Duration::from_secs(grace) > dynamite::shutdown::DRAIN_TIMEOUT * 2,
            "{name}: stop_grace_period {grace}s"
        );
        let secret_file = flag_value(args, "--cluster-secret-file").expect("--cluster-secret-file");
        let secret = secret_file
            .strip_prefix("/run/secrets/")
            .expect("the secret from compose's /run/secrets");
        assert!(
            strings(&service["secrets"]).iter().any(|s| s == secret),
            "{name} is given the secret {secret}"
        );
        assert!(
            secrets[secret]["file"].is_string(),
            "secret {secret} from a file"
        );
        let port = flag_value(args, "--port").expect("--port");
        assert_eq!(
            service["environment"]["DYNAMITE_HEALTH_PORT"], port,
            "{name}: the health check asks the daemon's own port"
        );
        let servers = flag_values(args, "-s");
        assert_eq!(servers, seeds, "{name}: seeded with every node");
        match program {
            "storage_node" => {
                assert_eq!(
                    flag_value(args, "--advertise"),
                    Some(format!("{name}:{port}").as_str()),
                    "{name} advertises its service name"
                );
                let data_dir = flag_value(args, "--data-dir").expect("--data-dir");
                let mounts = strings(&service["volumes"]);
                let volume = mounts
                    .iter()
                    .find_map(|mount| {
                        let (volume, target) = mount.split_once(':')?;
                        data_dir.starts_with(target).then_some(volume)
                    })
                    .unwrap_or_else(|| panic!("{name}: {data_dir} is in no volume: {mounts:?}"));
                assert!(volumes.contains_key(volume), "volume {volume} declared");
                assert!(
                    !service.as_object().unwrap().contains_key("ports"),
                    "{name} is not published"
                );
            }
            "load_balancer" => {
                let ports = strings(&service["ports"]);
                assert!(
                    ports
                        .iter()
                        .all(|published| published.starts_with("127.0.0.1:")),
                    "the balancer is published on loopback only: {ports:?}"
                );
                let waits_for: Vec<&String> = service["depends_on"]
                    .as_object()
                    .expect("depends_on")
                    .keys()
                    .collect();
                assert_eq!(waits_for, ["node1", "node2", "node3"]);
            }
            other => panic!("{name} runs {other}"),
        }
        assert_flags_accepted(program, args, &format!("compose service {name}"));
    }
}

/// deploy/Dockerfile as instructions: `(INSTRUCTION, arguments)`, continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let mut instructions = Vec::new();
    let mut pending = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let trimmed = line.trim();
        if pending.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                let (instruction, arguments) =
                    pending.split_once(' ').unwrap_or((pending.as_str(), ""));
                instructions.push((instruction.to_uppercase(), arguments.trim().to_owned()));
                pending.clear();
            }
        }
    }
    instructions
}

/// A builder stage on rust:bookworm that builds the locked release binaries, and a runtime
/// stage on debian:bookworm-slim with the three binaries, a non-root user, SIGTERM to stop
/// and a health check; every file it copies from the build context is let through by its
/// .dockerignore.
#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_in_a_slim_one() {
    let instructions = dockerfile();
    let stages: Vec<&str> = instructions
        .iter()
        .filter(|(instruction, _)| instruction == "FROM")
        .map(|(_, arguments)| arguments.as_str())
        .collect();
    assert_eq!(
        stages,
        [
            "rust:bookworm AS builder",
            "debian:bookworm-slim AS runtime"
        ]
    );
    let runtime_starts = instructions
        .iter()
        .rposition(|(instruction, _)| instruction == "FROM")
        .expect("stages");
    let (build, runtime) = instructions.split_at(runtime_starts);
    assert!(
        build
            .iter()
            .any(|(instruction, arguments)| instruction == "RUN"
                && arguments.contains("cargo build --release --locked")),
        "the builder builds the locked release: {build:?}"
    );
    let has = |instruction: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, arguments)| arguments.as_str())
            .collect()
    };
    let copied_binaries: Vec<&str> = has("COPY")
        .iter()
        .filter(|arguments| arguments.contains("--from=builder "))
        .flat_map(|arguments| arguments.split_whitespace())
        .filter_map(|word| word.strip_prefix("/src/target/release/"))
        .collect();
    assert_eq!(
        copied_binaries,
        ["storage_node", "load_balancer", "dynamite"]
    );
    for program in copied_binaries {
        assert!(
            repo(&format!("src/bin/{program}.rs")).exists(),
            "{program} is a binary of the crate"
        );
    }
    let user = has("USER");
    assert!(
        user.len() == 1 && !user[0].starts_with("root") && !user[0].starts_with('0'),
        "runs as a user of its own: {user:?}"
    );
    assert_eq!(has("STOPSIGNAL"), ["SIGTERM"]);
    let health = has("HEALTHCHECK");
    assert!(
        health.len() == 1 && health[0].contains("/usr/local/bin/dynamite-healthcheck"),
        "{health:?}"
    );

    // What it copies from the build context must be let through by its .dockerignore,
    // which leaves out everything else (target/ above all).
    let ignore = read("deploy/Dockerfile.dockerignore");
    let let_through: Vec<&str> = ignore
        .lines()
        .filter_map(|line| line.trim().strip_prefix('!'))
        .map(|path| path.trim_end_matches('/'))
        .collect();
    assert!(ignore.lines().any(|line| line.trim() == "*"), "{ignore}");
    for (_, arguments) in instructions
        .iter()
        .filter(|(instruction, arguments)| instruction == "COPY" && !arguments.contains("--from="))
    {
        let words: Vec<&str> = arguments
            .split_whitespace()
            .filter(|word| !word.starts_with("--"))
            .collect();
        for source in &words[..words.len() - 1] {
            assert!(repo(source).exists(), "COPY {source}: no such file");
            assert!(
                let_through.contains(source),
                "COPY {source}: left out by Dockerfile.dockerignore"
            );
        }
    }
}

/// Runs deploy/healthcheck.sh as the container would, asking `port`, with `tls` or not.
fn health_check(port: u16, tls: bool) -> (Option<i32>, Duration) {
    let began = std::time::Instant::now();
    let status = Command::new("bash")
        .arg(repo("deploy/healthcheck.sh"))
        .env("DYNAMITE_HEALTH_PORT", port.to_string())
        .env("DYNAMITE_HEALTH_TLS", if tls { "1" } else { "" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run bash");
    (status.code(), began.elapsed())
}

/// The containers' health check (bash's /dev/tcp, no curl): 0 for a daemon answering
/// `GET /health` with 200; 1 for a port nobody listens on, for something that is not a
/// daemon, and for a daemon that hangs (within its own read timeout, before Docker's).
#[test]
fn the_containers_health_check_tells_a_serving_daemon_from_none() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut node =
        Daemon::storage_node(dir.path(), "node", free_port(), &["--in-memory".to_owned()]);
    assert_eq!(
        health_check(node.port(), false).0,
        Some(0),
        "a serving node"
    );
    assert_eq!(
        health_check(node.port(), true).0,
        Some(0),
        "TLS: its port is open"
    );
    assert_eq!(
        health_check(free_port(), false).0,
        Some(1),
        "nobody listens"
    );
    assert_eq!(
        health_check(free_port(), true).0,
        Some(1),
        "TLS: nobody listens"
    );

    let impostor = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let impostor_port = impostor.local_addr().expect("address").port();
    let answering = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        let (mut stream, _) = impostor.accept().expect("accept");
        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        // Read the request before closing, so that the check's write meets an open socket.
        let _ = stream.read(&mut [0; 256]);
    });
    assert_eq!(
        health_check(impostor_port, false).0,
        Some(1),
        "not a daemon"
    );
    answering.join().expect("impostor");

    node.stop();
    let (code, took) = health_check(node.port(), false);
    node.cont();
    assert_eq!(code, Some(1), "a hung daemon");
    assert!(
        took < Duration::from_secs(3),
        "within Docker's 3 s timeout: {took:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// --help
// ---------------------------------------------------------------------------------------------

/// Every flag of `help` (clap's `--help` text), each with its description: the text after
/// the flag on its line and the lines under it, up to the next flag or section.
fn flags_in_help(help: &str) -> Vec<(String, String)> {
    let mut flags: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent > 0 && indent <= 6 && trimmed.starts_with('-') {
            let (spec, rest) = split_flag_spec(trimmed);
            flags.push((spec.to_owned(), rest.trim().to_owned()));
        } else if indent == 0 && !line.is_empty() {
            // A section heading ("Options:", "Commands:") or the text after the options.
            if let Some(last) = flags.last_mut() {
                last.1.push_str("\n<end>");
            }
        } else if let Some((_, description)) = flags.last_mut()
            && !description.ends_with("<end>")
        {
            description.push(' ');
            description.push_str(trimmed);
        }
    }
    flags
        .into_iter()
        .map(|(spec, description)| {
            let description = description.trim_end_matches("<end>").trim().to_owned();
            (spec, description)
        })
        .collect()
}

/// `-s, --server <HOST:PORT>   Any storage node` → (`-s, --server <HOST:PORT>`, `Any ...`):
/// the spec ends at the first run of two spaces.
fn split_flag_spec(line: &str) -> (&str, &str) {
    match line.find("  ") {
        Some(end) => (&line[..end], &line[end..]),
        None => (line, ""),
    }
}

/// Each binary's `--help`, and each of `dynamite`'s subcommands': every flag has a line of
/// explanation and says its default (`[default: ...]`, clap's or in words) or that it is
/// required; only `--help` and `--version` need not.
#[test]
fn every_flag_of_every_binary_is_explained_with_its_default() {
    let commands: [(&str, &[&str]); 11] = [
        ("storage_node", &[]),
        ("load_balancer", &[]),
        ("dynamite", &[]),
        ("dynamite", &["status"]),
        ("dynamite", &["explain"]),
        ("dynamite", &["layout"]),
        ("dynamite", &["layout", "show"]),
        ("dynamite", &["layout", "add"]),
        ("dynamite", &["layout", "remove"]),
        ("dynamite", &["layout", "apply"]),
        ("dynamite", &["layout", "revert"]),
    ];
    let mut checked = 0;
    for (program, subcommand) in commands {
        for help_flag in ["--help", "-h"] {
            let mut args = subcommand.to_vec();
            args.push(help_flag);
            let output = run(binary(program), &args);
            let help = String::from_utf8_lossy(&output.stdout);
            let whose = format!("{program} {}", args.join(" "));
            assert!(output.status.success(), "{whose}: {}", text(&output));
            let flags = flags_in_help(&help);
            assert!(flags.len() > 2, "{whose}: no flags found in\n{help}");
            for (spec, description) in flags {
                assert!(
                    !description.is_empty(),
                    "{whose}: {spec} has no explanation\n{help}"
                );
                if spec.contains("--help") || spec.contains("--version") {
                    continue;
                }
                assert!(
                    description.contains("[default: ") || description.contains("[required"),
                    "{whose}: {spec} does not say its default: {description:?}"
                );
                checked += 1;
            }
        }
    }
    eprintln!("{checked} flag explanations checked");
}
