//! The status page (`GET /`) in a real browser: headless Chromium keeps the balancer's page
//! open while a node is killed, and the page, refreshing by itself, shows it down within
//! seconds. A second story: a daemon with a password asks the browser for it, and the page's
//! own requests then carry it.
//!
//! Chromium is driven through the DevTools protocol by `tests/python/cdp.py` (Python's
//! websocket-client), which answers one JSON line per command; the test reads the page's
//! state from the rows' `data-address` and `data-state` attributes, not from their text.
//! Both tests skip, saying why, where Chromium or websocket-client is missing (tests/run.sh
//! installs them), except under `DYNAMITE_REQUIRE_ALL`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value as Json, json};

const CDP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/cdp.py");
/// How long the page may take to show a killed node down: gossip calls it down 3 s after it
/// last answered, and the page asks every 2 s.
const DOWN_WITHIN: Duration = Duration::from_secs(15);
/// How long the page may take to load and show every node up.
const LOAD_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn the_status_page_shows_a_killed_node_down_within_seconds() {
    let Some(chromium) = browser_or_skip("the_status_page_shows_a_killed_node_down_within_seconds")
    else {
        return;
    };
    let mut cluster = Cluster::builder().start();
    let lb = cluster.balancer_port(0);
    cluster
        .client()
        .put_keys(0..200, "before the page is opened");
    let nodes: Vec<String> = cluster.node_ports().iter().map(|&p| addr(p)).collect();

    let mut page = Page::open(
        &chromium,
        cluster.dir(),
        &format!("http://127.0.0.1:{lb}/"),
        None,
    );
    let all_up: Vec<(String, String)> = nodes.iter().map(|n| (n.clone(), "up".into())).collect();
    page.wait_for_rows(LOAD_WITHIN, "every node shows up", |rows| *rows == all_up);
    // Marks this document: were the page to reload, the mark would be gone.
    page.eval("window.loadedOnce = true");

    // Served by the daemon alone: its own type and policy, nothing fetched from elsewhere.
    let headers = page.eval(
        "fetch('/').then(r => [r.headers.get('content-type'), r.headers.get('content-security-policy')])",
    );
    assert_eq!(headers[0], "text/html; charset=utf-8");
    assert!(
        headers[1]
            .as_str()
            .is_some_and(|p| p.starts_with("default-src 'none'")),
        "{headers}"
    );
    let foreign = page.eval(
        "performance.getEntriesByType('resource').map(e => e.name)\
         .filter(n => !n.startsWith(location.origin))",
    );
    assert_eq!(foreign, json!([]), "the page fetched from another origin");

    // Requests keep coming, so the charts have something to draw and the balancer meets the
    // dead node on its way too.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        std::thread::spawn(move || {
            let client = Rpc::new(lb);
            let mut i = 200;
            while writing.load(Ordering::Relaxed) {
                let _ = client.try_call("put", vec![s(&key(i)), value(i)]);
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let victim = nodes[1].clone();
    cluster.nodes[1].kill();
    let killed = Instant::now();
    let expected: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (n.clone(), if *n == victim { "down" } else { "up" }.into()))
        .collect();
    page.wait_for_rows(DOWN_WITHIN, "the killed node shows down", |rows| {
        *rows == expected
    });
    println!(
        "the page showed {victim} down {:.1} s after its SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(
        page.eval("window.loadedOnce === true"),
        json!(true),
        "the page reloaded instead of refreshing itself"
    );
    // As cluster.status() says: the page shows its view.
    let status = cluster
        .client()
        .call("cluster.status", vec![])
        .expect("cluster.status");
    let states: Vec<(String, String)> = array(member(&status, "nodes"))
        .iter()
        .map(|n| {
            (
                string(member(n, "address")).to_owned(),
                string(member(n, "state")).to_owned(),
            )
        })
        .collect();
    assert_eq!(states, expected);

    writing.store(false, Ordering::Relaxed);
    writer.join().expect("writer");
    // Once more data reached the charts: a picture to look at.
    let shot = screenshot_dir().join("killed-node.png");
    page.screenshot(&shot);
    println!("screenshot: {}", shot.display());
}

#[test]
fn the_status_page_asks_for_the_password_and_its_requests_carry_it() {
    let test = "the_status_page_asks_for_the_password_and_its_requests_carry_it";
    let Some(chromium) = browser_or_skip(test) else {
        return;
    };
    let secrets = tempfile::tempdir().expect("temp dir");
    let password_file = secrets.path().join("password");
    std::fs::write(&password_file, "status-page-password\n").expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }
    let password_path = password_file.to_string_lossy().into_owned();
    let flags = [
        "--auth-user",
        "operator",
        "--auth-password-file",
        &password_path,
    ];
    let mut builder = Cluster::builder().nodes(2).in_memory();
    for flag in flags {
        builder = builder.node_arg(flag).balancer_arg(flag);
    }
    let cluster = builder.start();
    let lb = cluster.balancer_port(0);
    for path in ["/", "/status.json"] {
        let answer = http(lb, "GET", path, b"").expect("GET");
        assert_eq!(answer.status, 401, "GET {path} without the password");
    }

    let mut page = Page::open(
        &chromium,
        cluster.dir(),
        &format!("http://127.0.0.1:{lb}/"),
        Some(("operator", "status-page-password")),
    );
    let nodes: Vec<(String, String)> = cluster
        .node_ports()
        .iter()
        .map(|&p| (addr(p), "up".to_owned()))
        .collect();
    page.wait_for_rows(LOAD_WITHIN, "every node shows up", |rows| *rows == nodes);
    // Refreshes keep working on the credentials the browser was given once.
    std::thread::sleep(Duration::from_millis(2500));
    let refreshed = page.eval("document.getElementById('refreshed').textContent");
    assert!(
        refreshed
            .as_str()
            .is_some_and(|t| t.starts_with("refreshed ") && !t.contains("HTTP")),
        "{refreshed}"
    );
}

/// Where the screenshots go: kept after the test for a person to look at.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

/// Chromium's path, if it and Python's websocket-client are here; otherwise skips `test`.
fn browser_or_skip(test: &str) -> Option<PathBuf> {
    let chromium = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    let Some(chromium) = chromium else {
        skip(
            test,
            "chromium is missing (Debian package chromium; tests/run.sh installs it)",
        );
        return None;
    };
    let websocket = Command::new("python3")
        .args(["-c", "import websocket"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !websocket {
        skip(
            test,
            "Python's websocket-client is missing (pip install websocket-client; tests/run.sh installs it)",
        );
        return None;
    }
    Some(chromium)
}

/// A page kept open in headless Chromium, through `cdp.py`.
struct Page {
    bridge: Child,
    commands: Option<ChildStdin>,
    answers: BufReader<ChildStdout>,
    log: PathBuf,
}

impl Page {
    /// Opens `url` (answering password prompts with `credentials`) in a Chromium with its
    /// profile under `dir`.
    fn open(chromium: &Path, dir: &Path, url: &str, credentials: Option<(&str, &str)>) -> Page {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).expect("profile dir");
        let log = dir.join("cdp.stderr.log");
        let mut args = vec![
            CDP.to_owned(),
            chromium.to_string_lossy().into_owned(),
            profile.to_string_lossy().into_owned(),
            url.to_owned(),
        ];
        if let Some((user, password)) = credentials {
            args.extend([user.to_owned(), password.to_owned()]);
        }
        let mut bridge = Command::new("python3")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("python3 runs cdp.py");
        let commands = bridge.stdin.take();
        let answers = BufReader::new(bridge.stdout.take().expect("stdout"));
        Page {
            bridge,
            commands,
            answers,
            log,
        }
    }

    /// Sends one command, returns its answer; panics, with the bridge's log, on an error.
    fn ask(&mut self, command: Json) -> Json {
        let commands = self.commands.as_mut().expect("open");
        writeln!(commands, "{command}").expect("write to cdp.py");
        commands.flush().expect("flush");
        let mut line = String::new();
        let read = self.answers.read_line(&mut line).expect("read from cdp.py");
        let answer: Json = serde_json::from_str(&line).unwrap_or(Json::Null);
        if read == 0 || answer.get("error").is_some() || answer.is_null() {
            panic!(
                "cdp.py answered {line:?} to {command}\n--- its log ---\n{}",
                tail(&self.log, 8192)
            );
        }
        answer
    }

    /// The value of a JavaScript expression in the page (a promise's, once it settles).
    fn eval(&mut self, expression: &str) -> Json {
        self.ask(json!({ "eval": expression }))["value"].clone()
    }

    fn screenshot(&mut self, path: &Path) {
        self.ask(json!({ "screenshot": path }));
        let png = std::fs::read(path).expect("screenshot written");
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "a blank screenshot?"
        );
    }

    /// The node rows as the page shows them now: (data-address, data-state).
    fn rows(&mut self) -> Vec<(String, String)> {
        let rows = self.eval(
            "[...document.querySelectorAll('tr[data-address]')]\
             .map(r => [r.dataset.address, r.dataset.state])",
        );
        serde_json::from_value(rows).unwrap_or_default()
    }

    /// Polls the rows until `condition` holds; panics with what they were after `timeout`.
    fn wait_for_rows(
        &mut self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&Vec<(String, String)>) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        loop {
            let rows = self.rows();
            if condition(&rows) {
                return;
            }
            if Instant::now() >= deadline {
                let status = self.eval("document.getElementById('refreshed').textContent");
                panic!("timed out after {timeout:?} waiting until {what}: rows {rows:?}, {status}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Page {
    /// Closes stdin, so that cdp.py closes Chromium; kills it if it takes too long.
    fn drop(&mut self) {
        drop(self.commands.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.bridge.try_wait() {
                return;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = self.bridge.kill();
        let _ = self.bridge.wait();
    }
}
