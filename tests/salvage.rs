//! Damaged storage, told as stories against the real `storage_node`: a byte flipped in an old
//! segment makes the node refuse to start, naming the file and the offset; with `--salvage`
//! it starts, keeps everything else, counts what it skipped, and its peers refill it; a
//! crash's torn tail is cut with no flag at all.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

/// How long anti-entropy may take to refill a salvaged node.
const REFILL_TIMEOUT: Duration = Duration::from_secs(30);

/// A record of a segment file, as the log engine writes it (`src/storage/log/record.rs`):
/// where it starts, its size with its header, and the keys of its ops.
#[derive(Debug)]
struct Record {
    offset: u64,
    size: u64,
    keys: Vec<String>,
}

/// The records of a segment's bytes, up to the first that does not parse.
fn records(bytes: &[u8]) -> Vec<Record> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(length) = u32_at(at) {
        let end = at + 12 + length;
        if end > bytes.len() {
            break;
        }
        let mut keys = Vec::new();
        let mut op = at + 16;
        for _ in 0..u32_at(at + 12).unwrap_or(0) {
            let key_len = u32_at(op + 2).expect("key length");
            let key = &bytes[op + 6..op + 6 + key_len];
            // A client key is stored after 0xFF and two bytes of its MD5 (`node::keys`).
            let key = match key {
                [0xFF, _, _, rest @ ..] => rest,
                other => other,
            };
            keys.push(String::from_utf8_lossy(key).into_owned());
            op += 6 + key_len + 4 + u32_at(op + 6 + key_len).expect("value length");
        }
        found.push(Record {
            offset: at as u64,
            size: (end - at) as u64,
            keys,
        });
        at = end;
    }
    found
}

/// The segment files of a data directory, in log order.
fn segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(data_dir.join("segments"))
        .expect("segments")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .collect();
    files.sort();
    files
}

/// The data directory a storage node was started with.
fn data_dir_of(node: &Daemon) -> PathBuf {
    let args = node.args();
    let at = args
        .iter()
        .position(|arg| arg == "--data-dir")
        .expect("a durable node");
    PathBuf::from(&args[at + 1])
}

/// Flips a byte near the end of the middle record (of those holding test keys) of the data
/// directory's first segment,
/// a sealed one, and removes that segment's hint file, so the next start replays the segment
/// (a hint file is trusted without reading its segment: the records were checked when it was
/// written; a data directory from before hint files, or one whose hint file is lost, is
/// replayed). Answers the segment, the damaged record, and the keys that were in it.
fn damage_a_sealed_segment(data_dir: &Path) -> (PathBuf, Record) {
    let all = segments(data_dir);
    assert!(all.len() >= 2, "the first segment must be sealed: {all:?}");
    let segment = all[0].clone();
    let _ = fs::remove_file(segment.with_extension("hint"));
    let mut bytes = fs::read(&segment).expect("read the segment");
    let mut found: Vec<Record> = records(&bytes)
        .into_iter()
        .filter(|record| record.keys.iter().any(|key| key.starts_with("key-")))
        .collect();
    assert!(found.len() >= 10, "{} records of keys", found.len());
    let record = found.remove(found.len() / 2);
    bytes[(record.offset + record.size - 3) as usize] ^= 0x20;
    fs::write(&segment, bytes).expect("write the segment");
    (segment, record)
}

/// Starts `node`'s command line again, expecting it to refuse: answers its stderr.
fn refused_start(dir: &Path, node: &Daemon) -> String {
    let args: Vec<&str> = node.args().iter().map(String::as_str).collect();
    let exited = run_to_exit(dir, STORAGE_NODE, &args);
    assert!(
        !exited.status.success(),
        "a node over damaged storage started: {exited:?}"
    );
    exited.stderr
}

/// A durable storage node on a data directory in `dir`, holding `key(i) = value(i)` for
/// `i` below `keys`; answers it and its data directory.
fn durable_node_with_keys(dir: &Path, keys: usize) -> (Daemon, PathBuf) {
    let data_dir = dir.join("node");
    let data_dir_arg = data_dir.to_string_lossy().into_owned();
    let node = Daemon::storage_node(
        dir,
        "node",
        free_port(),
        &["--data-dir".to_owned(), data_dir_arg],
    );
    let rpc = node.rpc();
    for i in 0..keys {
        assert_eq!(rpc.local_put(&key(i), value(i)), ok200(), "put {i}");
    }
    (node, data_dir)
}

/// A byte flipped in a sealed segment: the node refuses to start, with one line naming the
/// file and the offset and saying what --salvage does; with --salvage it starts, every key
/// outside the damaged record reads back, and stats() and /metrics count the skipped record.
#[test]
fn a_damaged_sealed_segment_is_refused_then_salvaged() {
    const KEYS: usize = 40;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut node, data_dir) = durable_node_with_keys(dir.path(), KEYS);
    // A stop and a start seal the segment those writes went to; another stop, cleanly.
    assert!(node.terminate().success());
    node.restart();
    assert!(node.terminate().success());

    let (segment, record) = damage_a_sealed_segment(&data_dir);
    let stderr = refused_start(dir.path(), &node);
    let refusal: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("storage_node: "))
        .collect();
    assert_eq!(refusal.len(), 1, "one line of refusal: {stderr}");
    let line = refusal[0];
    for needed in [
        segment.display().to_string(),
        format!("offset {} ", record.offset),
        "--salvage".to_owned(),
    ] {
        assert!(line.contains(&needed), "{needed:?} missing from {line:?}");
    }

    node.restart_with(&["--salvage"]);
    let rpc = node.rpc();
    let stats = rpc.stats();
    assert_eq!(int_member(&stats, "salvaged_records"), 1, "{stats:?}");
    assert_eq!(
        int_member(&stats, "salvaged_bytes"),
        record.size as i64,
        "{stats:?}"
    );
    let metrics = http(node.port(), "GET", "/metrics", b"").expect("GET /metrics");
    assert!(
        metrics.body.contains("dynamite_node_salvaged_records 1"),
        "{}",
        metrics.body
    );
    for i in 0..KEYS {
        let expected = if record.keys.contains(&key(i)) {
            Ok(Value::Nil)
        } else {
            Ok(value(i))
        };
        assert_eq!(rpc.local_get(&key(i)), expected, "key {i}");
    }
    assert!(!record.keys.is_empty());
    assert!(
        node.logs().contains("--salvage"),
        "the skipped range is logged"
    );
}

/// A crash tears the last record: the next start cuts it, with no flag, and every whole record
/// is there. Garbage after the last record is cut the same way.
#[test]
fn a_torn_tail_is_cut_and_every_whole_record_kept() {
    const KEYS: usize = 30;
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut node, data_dir) = durable_node_with_keys(dir.path(), KEYS);
    node.kill();

    // Cut in the middle of the last record of the last segment.
    let last = segments(&data_dir).pop().expect("a segment");
    let bytes = fs::read(&last).expect("read");
    let torn = records(&bytes).pop().expect("a record");
    assert_eq!(torn.keys, vec![key(KEYS - 1)]);
    fs::write(&last, &bytes[..(torn.offset + torn.size / 2) as usize]).expect("cut");
    node.restart();
    let rpc = node.rpc();
    assert_eq!(int_member(&rpc.stats(), "salvaged_records"), 0);
    for i in 0..KEYS - 1 {
        assert_eq!(rpc.local_get(&key(i)), Ok(value(i)), "key {i}");
    }
    assert_eq!(rpc.local_get(&key(KEYS - 1)), Ok(Value::Nil));
    assert_eq!(rpc.local_put(&key(KEYS), value(KEYS)), ok200());
    node.kill();

    // Garbage after the last record of the (new) last segment.
    let last = segments(&data_dir).pop().expect("a segment");
    let mut bytes = fs::read(&last).expect("read");
    let whole = bytes.len();
    bytes.extend((0..200u32).map(|i| (i * 37 + 11) as u8));
    fs::write(&last, bytes).expect("append");
    node.restart();
    let rpc = node.rpc();
    assert_eq!(rpc.local_get(&key(KEYS)), Ok(value(KEYS)));
    assert_eq!(rpc.local_get(&key(0)), Ok(value(0)));
    assert_eq!(fs::metadata(&last).expect("metadata").len(), whole as u64);
}

/// In a cluster, the salvaged node's peers refill what the damaged record held, with no
/// client read: anti-entropy brings the keys back.
#[test]
fn peers_refill_a_salvaged_node() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .replicas(3)
        .write_quorum(3)
        .aae_interval_ms(300)
        .start();
    let lb = cluster.client();
    const KEYS: usize = 60;
    lb.put_keys(0..KEYS, "");
    let dir = cluster.dir().to_path_buf();
    let node = &mut cluster.nodes[0];
    assert!(node.terminate().success());
    node.restart();
    assert!(node.terminate().success());
    let data_dir = data_dir_of(node);
    let (_, record) = damage_a_sealed_segment(&data_dir);
    let stderr = refused_start(&dir, node);
    assert!(stderr.contains("--salvage"), "{stderr}");

    node.restart_with(&["--salvage"]);
    let rpc = node.rpc();
    assert_eq!(int_member(&rpc.stats(), "salvaged_records"), 1);
    let lost: Vec<&String> = record
        .keys
        .iter()
        .filter(|k| k.starts_with("key-"))
        .collect();
    assert!(!lost.is_empty(), "the damaged record held keys: {record:?}");
    wait_until(REFILL_TIMEOUT, "anti-entropy refills the lost keys", || {
        lost.iter().all(|lost| {
            let i: usize = lost["key-".len()..].parse().expect("a key number");
            rpc.get(lost) == Ok(value(i))
        })
    });
    assert_no_client_reads(&cluster.client());
}
