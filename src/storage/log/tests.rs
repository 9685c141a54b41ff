//! The log engine's own tests: the shared engine suite, then the stories only a log tells
//! (reopen, a torn last write, merges, an interrupted merge).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::manifest::SUPERSEDED_FILE;
use super::{Limits, LogEngine, SEGMENTS_DIR};
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
    sync_every: Duration::from_secs(1),
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

/// Overwrites and deletes pile up dead bytes; a sync then merges: the disk shrinks, every
/// live value stays, and no deleted key comes back, then or after a reopen.
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
        assert!(engine.needs_merge(), "the test must reach a merge");
        engine.sync().expect("sync and merge");
        assert!(!engine.needs_merge());
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

/// A merge that fsyncs between its steps while other threads write must finish: one that
/// still held the index when it went for the writer's lock (to fsync) deadlocked with any
/// write holding the writer's lock and waiting for the index.
#[test]
fn a_merge_finishes_while_writers_write() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new();
    let limits = Limits {
        sync_every: Duration::ZERO,
        ..SMALL
    };
    let engine = Arc::new(LogEngine::open_with(dir.path(), limits).expect("open"));
    for round in 0..6 {
        for key in 0..2000 {
            let value = format!("{round}-{}", "v".repeat(20));
            engine
                .write(vec![put(Tree::Data, &format!("k{key:04}"), &value)])
                .expect("write");
        }
    }
    assert!(engine.needs_merge());
    let stop = Arc::new(AtomicBool::new(false));
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
        let _ = done.send(merger.merge().is_ok());
    });
    let outcome = finished.recv_timeout(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    assert_eq!(outcome, Ok(true), "the merge did not finish within 30 s");
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
