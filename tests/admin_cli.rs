//! The `dynamite` admin command as a person runs it: its help, its usage errors, and what it
//! says when nobody answers. Each run is bounded ([`common::run_to_exit`]).
//!
//! Its rendering of answers is tested in `src/admin.rs`; runs against real daemons come once
//! the daemons answer `cluster.*`.

mod common;

use common::{Exited, run_to_exit};

/// Path of the `dynamite` binary under test.
const DYNAMITE: &str = env!("CARGO_BIN_EXE_dynamite");

fn dynamite(args: &[&str]) -> Exited {
    let dir = tempfile::tempdir().expect("temporary directory");
    run_to_exit(dir.path(), DYNAMITE, args)
}

#[test]
fn every_subcommand_has_help() {
    let cases: &[(&[&str], &str)] = &[
        (&["--help"], "Usage: dynamite"),
        (&["status", "--help"], "Usage: dynamite status"),
        (&["layout", "--help"], "Usage: dynamite layout"),
        (&["layout", "show", "--help"], "Usage: dynamite layout show"),
        (&["layout", "add", "--help"], "Usage: dynamite layout add"),
        (
            &["layout", "remove", "--help"],
            "Usage: dynamite layout remove",
        ),
        (
            &["layout", "revert", "--help"],
            "Usage: dynamite layout revert",
        ),
        (
            &["layout", "apply", "--help"],
            "Usage: dynamite layout apply",
        ),
        (&["explain", "--help"], "Usage: dynamite explain"),
        (&["help", "layout", "add"], "Usage: dynamite layout add"),
    ];
    for (args, usage) in cases {
        let run = dynamite(args);
        assert_eq!(run.status.code(), Some(0), "{args:?}: {run:?}");
        assert!(run.stdout.contains(usage), "{args:?}: {}", run.stdout);
        assert!(
            run.stdout.contains("--server <HOST:PORT>"),
            "{args:?}: -s is global: {}",
            run.stdout
        );
    }
    let add = dynamite(&["layout", "add", "--help"]);
    for flag in ["--zone <Z>", "--weight <W>", "<ADDRESS>"] {
        assert!(add.stdout.contains(flag), "{flag}: {}", add.stdout);
    }
    let apply = dynamite(&["layout", "apply", "--help"]);
    assert!(apply.stdout.contains("--version <V>"), "{}", apply.stdout);
    let top = dynamite(&["--help"]);
    for subcommand in ["status", "layout", "explain"] {
        assert!(
            top.stdout.contains(subcommand),
            "{subcommand}: {}",
            top.stdout
        );
    }
    assert!(top.stdout.contains("127.0.0.1:30000"), "{}", top.stdout);
}

#[test]
fn a_server_nobody_listens_on_cannot_be_reached() {
    // Free a moment ago and handed out to nobody else: nothing listens there.
    let server = format!("127.0.0.1:{}", common::free_port());
    for args in [
        &["-s", server.as_str(), "status"][..],
        &["-s", server.as_str(), "--json", "layout", "show"],
        &["-s", server.as_str(), "layout", "apply"],
        &[
            "-s",
            server.as_str(),
            "--timeout-ms",
            "2000",
            "explain",
            "k",
        ],
    ] {
        let run = dynamite(args);
        assert_eq!(run.status.code(), Some(1), "{args:?}: {run:?}");
        assert!(
            run.stderr
                .starts_with(&format!("error: cannot reach {server}: ")),
            "{args:?}: {}",
            run.stderr
        );
        assert_eq!(run.stdout, "", "{args:?}");
    }
}

#[test]
fn usage_errors_exit_with_status_2() {
    for args in [
        &[][..],
        &["frobnicate"],
        &["layout"],
        &["layout", "add"],
        &["layout", "add", "not-an-address"],
        &["layout", "add", "h:1", "--weight", "heavy"],
        &["layout", "apply", "--version", "-1"],
        &["-s", "no-port", "status"],
        &["status", "--no-such-flag"],
        &["explain"],
    ] {
        let run = dynamite(args);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {run:?}");
        assert!(!run.stderr.is_empty(), "{args:?}: says why");
    }
}
