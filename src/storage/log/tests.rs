//! The log engine's own tests: the shared engine suite, then the stories only a log tells
//! (reopen, a torn last write, merges, an interrupted merge).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::manifest::SUPERSEDED_FILE;
use super::merge::Stop;
use super::{Limits, LogEngine, SEGMENTS_DIR, lock};
use crate::storage::tests::{Fixture, TempDir, engine_suite};
use crate::storage::{Engine, StorageError, Tree, WriteOp};

engine_suite!(Fixture::log());

fn put(tree: Tree, key: &str, value: &str) -> WriteOp {
    WriteOp::put(tree, key.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn value(engine: &LogEngine, tree: Tree, key: &str) -> Option<String> {
    let bytes = engine.get(tree, key.as_bytes()).expect("get")?;
    Some(String::from_utf8(bytes).expect("text"))
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(SEGMENTS_DIR))
        .expect("segments")
        .map(|entry| entry.expect("entry").path())
        .collect();
    files.sort();
    files
}

/// Small segments and merges, so a test reaches both with a few kilobytes.
const SMALL: Limits = Limits {
    segment_bytes: 4096,
    merge_min_bytes: 16 * 1024,
    // The tests run merges themselves, except those that start the job's looks.
    merge_check_every: Duration::from_secs(3600),
};

#[test]
fn what_was_written_is_there_after_a_reopen() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open(dir.path()).expect("open");
        engine
            .write(vec![put(Tree::Data, "a", "1"), put(Tree::Hints, "h", "x")])
            .expect("write");
        engine
            .write(vec![put(Tree::Data, "a", "2")])
            .expect("write");
        engine
            .write(vec![put(Tree::Data, "b", "3")])
            .expect("write");
        engine
            .write(vec![WriteOp::remove(Tree::Data, b"b".to_vec())])
            .expect("write");
        assert!(matches!(
            LogEngine::open(dir.path()),
            Err(StorageError::Locked { .. })
        ));
    }
    let engine = LogEngine::open(dir.path()).expect("reopen");
    assert_eq!(value(&engine, Tree::Data, "a").as_deref(), Some("2"));
    assert_eq!(value(&engine, Tree::Data, "b"), None);
    assert_eq!(value(&engine, Tree::Hints, "h").as_deref(), Some("x"));
    assert_eq!(value(&engine, Tree::Meta, "h"), None);
}

/// A write cut short (the process died inside `pwrite`) is dropped whole at the next
/// open; what came before stays, and later writes follow it.
#[test]
fn a_torn_last_write_is_dropped_whole() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open(dir.path()).expect("open");
        engine
            .write(vec![put(Tree::Data, "a", "1")])
            .expect("write");
        engine
            .write(vec![put(Tree::Data, "b", "2"), put(Tree::Data, "c", "3")])
            .expect("write");
    }
    let files = segment_files(dir.path());
    let last = files.last().expect("a segment");
    let len = fs::metadata(last).expect("metadata").len();
    let file = OpenOptions::new().write(true).open(last).expect("segment");
    file.set_len(len - 3).expect("cut");
    drop(file);
    {
        let engine = LogEngine::open(dir.path()).expect("reopen");
        assert_eq!(value(&engine, Tree::Data, "a").as_deref(), Some("1"));
        assert_eq!(value(&engine, Tree::Data, "b"), None);
        assert_eq!(value(&engine, Tree::Data, "c"), None);
        engine
            .write(vec![put(Tree::Data, "d", "4")])
            .expect("write");
    }
    let engine = LogEngine::open(dir.path()).expect("reopen");
    assert_eq!(value(&engine, Tree::Data, "a").as_deref(), Some("1"));
    assert_eq!(value(&engine, Tree::Data, "d").as_deref(), Some("4"));
    assert_eq!(value(&engine, Tree::Data, "b"), None);
}

/// Overwrites and deletes pile up dead bytes; the merge job's next look then merges: the disk
/// shrinks, every live value stays, and no deleted key comes back, then or after a reopen.
#[test]
fn a_merge_keeps_the_live_values_and_drops_the_dead() {
    let dir = TempDir::new();
    let expected: BTreeMap<String, String> = {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        let mut expected = BTreeMap::new();
        for round in 0..40 {
            for key in 0..20 {
                let (key, value) = (format!("k{key:02}"), format!("{round}-{}", "v".repeat(40)));
                engine
                    .write(vec![put(Tree::Data, &key, &value)])
                    .expect("write");
                expected.insert(key, value);
            }
        }
        for key in 0..10 {
            let key = format!("k{key:02}");
            engine
                .write(vec![WriteOp::remove(Tree::Data, key.as_bytes().to_vec())])
                .expect("write");
            expected.remove(&key);
        }
        engine
            .write(vec![put(Tree::Meta, "m", "kept")])
            .expect("write");
        let before = segment_files(dir.path()).len();
        assert!(engine.log.needs_merge(), "the test must reach a merge");
        engine.sync().expect("sync");
        let merged = engine.log.merge_if_due(&Stop::default()).expect("merge");
        assert!(merged, "a merge was due");
        assert!(!engine.log.needs_merge());
        assert!(
            segment_files(dir.path()).len() < before / 4,
            "{before} segments before"
        );
        assert!(!dir.path().join(SUPERSEDED_FILE).exists());
        for key in 0..20 {
            let key = format!("k{key:02}");
            assert_eq!(
                value(&engine, Tree::Data, &key),
                expected.get(&key).cloned()
            );
        }
        // Writes after a merge land after its copies.
        engine
            .write(vec![put(Tree::Data, "k19", "last")])
            .expect("write");
        expected.insert("k19".into(), "last".into());
        expected
    };
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    let scanned: Vec<(String, String)> = engine
        .scan(Tree::Data, None, 100)
        .expect("scan")
        .into_iter()
        .map(|(key, value)| {
            (
                String::from_utf8(key).expect("key"),
                String::from_utf8(value).expect("value"),
            )
        })
        .collect();
    assert_eq!(scanned, expected.into_iter().collect::<Vec<_>>());
    assert_eq!(value(&engine, Tree::Meta, "m").as_deref(), Some("kept"));
}

/// A merge while other threads write and sync must finish: a merge step that still held the
/// index when something of its own or another thread's went for the writer's lock would
/// deadlock with any write holding the writer's lock and waiting for the index (the lock
/// order at `Log`).
#[test]
fn a_merge_finishes_while_writers_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new();
    let engine = Arc::new(LogEngine::open_with(dir.path(), SMALL).expect("open"));
    for round in 0..6 {
        for key in 0..2000 {
            let value = format!("{round}-{}", "v".repeat(20));
            engine
                .write(vec![put(Tree::Data, &format!("k{key:04}"), &value)])
                .expect("write");
        }
    }
    assert!(engine.log.needs_merge());
    let stop = Arc::new(AtomicBool::new(false));
    let syncer = {
        let (engine, stop) = (engine.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                engine.sync().expect("sync");
            }
        })
    };
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (engine, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut written = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{writer}");
                    engine
                        .write(vec![put(Tree::Data, &key, &written.to_string())])
                        .expect("write");
                    written += 1;
                }
                written
            })
        })
        .collect();
    let (done, finished) = std::sync::mpsc::channel();
    let merger = engine.clone();
    std::thread::spawn(move || {
        let _merging = lock(&merger.log.merging);
        let _ = done.send(merger.log.merge(&Stop::default()).is_ok());
    });
    let outcome = finished.recv_timeout(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(outcome, Ok(true), "the merge did not finish within 30 s");
    syncer.join().expect("syncer");
    for (writer, handle) in writers.into_iter().enumerate() {
        let written = handle.join().expect("writer");
        let last = value(&engine, Tree::Data, &format!("w{writer}"));
        assert_eq!(last, written.checked_sub(1).map(|n| n.to_string()));
    }
    let expected = format!("5-{}", "v".repeat(20));
    for key in 0..2000 {
        let found = value(&engine, Tree::Data, &format!("k{key:04}"));
        assert_eq!(found.as_deref(), Some(expected.as_str()));
    }
}

/// Writes `rounds` versions of `keys` keys in `Tree::Data`, all but the last of each dead;
/// answers the live values.
fn overwrite(engine: &LogEngine, keys: usize, rounds: usize) -> BTreeMap<String, String> {
    let mut live = BTreeMap::new();
    for round in 0..rounds {
        for key in 0..keys {
            let (key, value) = (format!("k{key:04}"), format!("{round}-{}", "v".repeat(20)));
            engine
                .write(vec![put(Tree::Data, &key, &value)])
                .expect("write");
            live.insert(key, value);
        }
    }
    live
}

/// Every value of `Tree::Data`, as text.
fn data(engine: &LogEngine) -> BTreeMap<String, String> {
    engine
        .scan(Tree::Data, None, usize::MAX)
        .expect("scan")
        .into_iter()
        .map(|(key, value)| {
            (
                String::from_utf8(key).expect("key"),
                String::from_utf8(value).expect("value"),
            )
        })
        .collect()
}

/// Nobody calls for a merge: the engine's merge job sees the dead bytes and merges on its own.
#[test]
fn the_merge_job_merges_on_its_own() {
    let dir = TempDir::new();
    let limits = Limits {
        merge_check_every: Duration::from_millis(10),
        ..SMALL
    };
    let engine = LogEngine::open_with(dir.path(), limits).expect("open");
    let live = overwrite(&engine, 20, 40);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while engine.log.needs_merge() {
        assert!(std::time::Instant::now() < deadline, "no merge within 30 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(data(&engine), live);
    drop(engine);
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(data(&engine), live);
}

/// Dropping the engine stops its merge job and waits for it: the directory is free at once.
#[test]
fn dropping_the_engine_stops_its_merge_job() {
    let dir = TempDir::new();
    let limits = Limits {
        merge_check_every: Duration::from_millis(1),
        ..SMALL
    };
    for round in 0..20 {
        let engine = LogEngine::open_with(dir.path(), limits).expect("the directory is free");
        engine
            .write(vec![put(Tree::Meta, "round", &round.to_string())])
            .expect("write");
    }
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(value(&engine, Tree::Meta, "round").as_deref(), Some("19"));
}

/// A merge told to stop (the engine is being dropped) stops after its current step: what
/// it copied stays beside the sealed segments, nothing is lost then or after a reopen, and
/// the next merge gets to its end.
#[test]
fn a_merge_stopped_between_steps_loses_nothing() {
    let dir = TempDir::new();
    let live = {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        let live = overwrite(&engine, 2000, 6);
        let before = segment_files(dir.path()).len();
        let stop = Stop::default();
        stop.stop();
        let finished = {
            let _merging = lock(&engine.log.merging);
            engine.log.merge(&stop).expect("merge")
        };
        assert!(!finished, "the merge stops after its first step");
        // The sealed segments, a new active one, and the first step's copies.
        assert!(
            segment_files(dir.path()).len() >= before + 2,
            "a step was copied"
        );
        assert!(!dir.path().join(SUPERSEDED_FILE).exists());
        assert!(engine.log.needs_merge());
        assert_eq!(data(&engine), live);
        live
    };
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(data(&engine), live);
    let merged = engine.log.merge_if_due(&Stop::default()).expect("merge");
    assert!(merged && !engine.log.needs_merge());
    assert_eq!(data(&engine), live);
}

/// A merge interrupted after its manifest, with the segment holding a delete already
/// gone and the older one holding the put still there: the next open deletes what the
/// manifest lists before replaying, so the put cannot outlive the delete.
#[test]
fn an_interrupted_merge_is_finished_at_open() {
    let dir = TempDir::new();
    let mut segments = Vec::new();
    let writes = [
        put(Tree::Data, "gone", "1"),
        WriteOp::remove(Tree::Data, b"gone".to_vec()),
        put(Tree::Data, "kept", "2"),
    ];
    for write in writes {
        let engine = LogEngine::open(dir.path()).expect("open");
        engine.write(vec![write]).expect("write");
        drop(engine);
        let files = segment_files(dir.path());
        segments.push(files.last().expect("a segment").clone());
    }
    let (put_segment, delete_segment) = (&segments[0], &segments[1]);
    fs::remove_file(delete_segment).expect("the merge deleted this one");
    let names: Vec<String> = [put_segment, delete_segment]
        .iter()
        .map(|path| {
            path.file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    fs::write(dir.path().join(SUPERSEDED_FILE), names.join("\n")).expect("manifest");
    let engine = LogEngine::open(dir.path()).expect("reopen");
    assert_eq!(value(&engine, Tree::Data, "gone"), None);
    assert_eq!(value(&engine, Tree::Data, "kept").as_deref(), Some("2"));
    assert!(!put_segment.exists());
    assert!(!dir.path().join(SUPERSEDED_FILE).exists());
}

#[test]
fn neither_engine_opens_the_others_directory() {
    let dir = TempDir::new();
    let log = crate::storage::StorageConfig::Log {
        dir: dir.path().to_path_buf(),
    };
    let fjall = crate::storage::StorageConfig::Fjall {
        dir: dir.path().to_path_buf(),
    };
    drop(crate::storage::open(&log).expect("a log directory"));
    let refused = crate::storage::open(&fjall).map(|_| ());
    assert!(
        matches!(&refused, Err(StorageError::Engine(message)) if message.contains("another engine")),
        "{refused:?}"
    );
    let other = TempDir::new();
    drop(
        crate::storage::open(&crate::storage::StorageConfig::Fjall {
            dir: other.path().to_path_buf(),
        })
        .expect("a fjall directory"),
    );
    let refused = crate::storage::open(&crate::storage::StorageConfig::Log {
        dir: other.path().to_path_buf(),
    })
    .map(|_| ());
    assert!(
        matches!(refused, Err(StorageError::Engine(_))),
        "{refused:?}"
    );
}
