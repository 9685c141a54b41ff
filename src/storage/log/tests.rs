//! The log engine's own tests: the shared engine suite, then the stories only a log tells
//! (reopen, a torn last write, merges, an interrupted merge, damage refused and salvaged,
//! hint files trusted or not).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::manifest::SUPERSEDED_FILE;
use super::merge::Stop;
use super::{Limits, LogEngine, SEGMENTS_DIR, lock};
use crate::storage::tests::{Fixture, TempDir, engine_suite};
use crate::storage::{Engine, Recovery, Salvaged, StorageError, Tree, WriteOp};

engine_suite!(Fixture::log());

fn put(tree: Tree, key: &str, value: &str) -> WriteOp {
    WriteOp::put(tree, key.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn value(engine: &LogEngine, tree: Tree, key: &str) -> Option<String> {
    let bytes = engine.get(tree, key.as_bytes()).expect("get")?;
    Some(String::from_utf8(bytes).expect("text"))
}

/// The segment files (hint files left out), in replay order.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(SEGMENTS_DIR))
        .expect("segments")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "seg"))
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
                // Bounded: with 4 KB segments, writers left free while a slow merge runs
                // would open segments by the thousand and run out of file descriptors.
                while !stop.load(Ordering::Relaxed) && written < 20_000 {
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
        recovery: Default::default(),
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
        recovery: Default::default(),
    })
    .map(|_| ());
    assert!(
        matches!(refused, Err(StorageError::Engine(_))),
        "{refused:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Damage: refused, or salvaged
// ---------------------------------------------------------------------------------------------

/// Bytes of the record [`write_keys`] writes for each key.
const KEY_RECORD: u64 = 51;
/// Records of [`write_keys`] in a [`SMALL`] segment.
const KEYS_PER_SEGMENT: usize = 80;

fn key_name(i: usize) -> String {
    format!("k{i:04}")
}

fn key_value(i: usize) -> String {
    format!("value-{i:04}-abcdefghi")
}

/// Puts `keys` one write each: [`KEY_RECORD`] bytes per record, [`KEYS_PER_SEGMENT`] per
/// segment.
fn write_keys(engine: &LogEngine, keys: std::ops::Range<usize>) {
    for i in keys {
        engine
            .write(vec![put(Tree::Data, &key_name(i), &key_value(i))])
            .expect("write");
    }
}

/// A closed log of 200 keys in three segments (80, 80 and 40 records), without hint files,
/// so that the next open replays every segment.
fn three_segments() -> (TempDir, Vec<PathBuf>) {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        write_keys(&engine, 0..200);
    }
    remove_hint_files(dir.path());
    let segments = segment_files(dir.path());
    assert_eq!(segments.len(), 3);
    (dir, segments)
}

fn hint_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(SEGMENTS_DIR))
        .expect("segments")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "hint")
        })
        .collect();
    files.sort();
    files
}

fn remove_hint_files(dir: &Path) {
    for file in hint_files(dir) {
        fs::remove_file(file).expect("remove a hint file");
    }
}

/// The hint file beside a segment file.
fn hint_of(segment: &Path) -> PathBuf {
    segment.with_extension("hint")
}

/// Flips the byte at `offset` of `path`.
fn flip(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).expect("read");
    bytes[offset as usize] ^= 0x41;
    fs::write(path, bytes).expect("write");
}

fn open_salvaging(dir: &Path) -> LogEngine {
    LogEngine::open_recovering(dir, SMALL, Recovery::Salvage).expect("a salvaging open")
}

/// Every key of `keys` but those of `lost` reads back its value; those read nothing.
fn assert_keys(engine: &LogEngine, keys: std::ops::Range<usize>, lost: &[usize]) {
    for i in keys {
        let expected = (!lost.contains(&i)).then(|| key_value(i));
        assert_eq!(value(engine, Tree::Data, &key_name(i)), expected, "key {i}");
    }
}

/// A byte flipped in the middle of a sealed segment: the open is refused, naming the segment
/// and the record's offset; salvaged, every other record comes back and the damaged one is
/// counted; later opens read the salvaged segment's hint file and start without --salvage.
#[test]
fn damage_in_a_sealed_segment_is_refused_then_salvaged() {
    let (dir, segments) = three_segments();
    let damaged_at = 5 * KEY_RECORD;
    flip(&segments[0], damaged_at + 30);
    let refused = LogEngine::open_with(dir.path(), SMALL).map(|_| ());
    let Err(StorageError::Damaged {
        segment,
        offset,
        bytes,
        ranges,
    }) = &refused
    else {
        panic!("expected the open to be refused as damaged, got {refused:?}");
    };
    assert_eq!(
        (segment, *offset, *bytes, *ranges),
        (&segments[0], damaged_at, KEY_RECORD, 1)
    );
    let line = refused.expect_err("refused").to_string();
    assert!(
        line.contains(&segments[0].display().to_string())
            && line.contains(&format!("offset {damaged_at} "))
            && line.contains("--salvage")
            && !line.contains('\n'),
        "{line}"
    );
    assert!(
        hint_files(dir.path()).is_empty(),
        "a refused open writes nothing"
    );
    {
        let engine = open_salvaging(dir.path());
        assert_eq!(
            engine.salvaged(),
            Salvaged {
                records: 1,
                bytes: KEY_RECORD
            }
        );
        assert_keys(&engine, 0..200, &[5]);
    }
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("the salvaged segment's hint file");
    // What was passed over stays counted: the hint file recorded it.
    assert_eq!(
        engine.salvaged(),
        Salvaged {
            records: 1,
            bytes: KEY_RECORD
        }
    );
    assert_keys(&engine, 0..200, &[5]);
}

/// Damage in the last segment with whole records after it is damage too, not a torn tail.
#[test]
fn damage_in_the_last_segment_before_whole_records_is_refused() {
    let (dir, segments) = three_segments();
    let record = 170 - 2 * KEYS_PER_SEGMENT;
    flip(&segments[2], record as u64 * KEY_RECORD + 8);
    let refused = LogEngine::open_with(dir.path(), SMALL).map(|_| ());
    assert!(
        matches!(&refused, Err(StorageError::Damaged { segment, offset, .. })
            if segment == &segments[2] && *offset == record as u64 * KEY_RECORD),
        "{refused:?}"
    );
    let engine = open_salvaging(dir.path());
    assert_eq!(engine.salvaged().records, 1);
    assert_keys(&engine, 0..200, &[170]);
}

/// A segment before the last that ends in a record cut short (no crash could have done that:
/// later segments were written after it) is damage.
#[test]
fn a_torn_tail_in_an_earlier_segment_is_damage() {
    let (dir, segments) = three_segments();
    let len = fs::metadata(&segments[0]).expect("metadata").len();
    OpenOptions::new()
        .write(true)
        .open(&segments[0])
        .expect("segment")
        .set_len(len - 10)
        .expect("cut");
    let refused = LogEngine::open_with(dir.path(), SMALL).map(|_| ());
    assert!(
        matches!(&refused, Err(StorageError::Damaged { segment, offset, bytes, .. })
            if segment == &segments[0] && *offset == len - KEY_RECORD && *bytes == KEY_RECORD - 10),
        "{refused:?}"
    );
    let engine = open_salvaging(dir.path());
    assert_eq!(
        engine.salvaged(),
        Salvaged {
            records: 1,
            bytes: KEY_RECORD - 10
        }
    );
    assert_keys(&engine, 0..200, &[KEYS_PER_SEGMENT - 1]);
}

/// Garbage after the last segment's last record (a crash while the file grew) is a torn
/// tail: cut, with every whole record kept, and no --salvage needed.
#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let (dir, segments) = three_segments();
    let whole = fs::metadata(&segments[2]).expect("metadata").len();
    let mut bytes = fs::read(&segments[2]).expect("read");
    bytes.extend((0..100u32).map(|i| (i * 37 + 5) as u8));
    fs::write(&segments[2], bytes).expect("write");
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("a torn tail is no damage");
    assert_eq!(engine.salvaged(), Salvaged::default());
    assert_keys(&engine, 0..200, &[]);
    assert_eq!(fs::metadata(&segments[2]).expect("metadata").len(), whole);
}

/// Two damaged ranges in two segments: the refusal names the first and counts both; the
/// salvage skips both.
#[test]
fn two_damaged_ranges_are_both_reported() {
    let (dir, segments) = three_segments();
    flip(&segments[0], 3 * KEY_RECORD + 20);
    flip(&segments[1], 40 * KEY_RECORD + 20);
    let refused = LogEngine::open_with(dir.path(), SMALL).map(|_| ());
    assert!(
        matches!(&refused, Err(StorageError::Damaged { segment, offset, ranges: 2, .. })
            if segment == &segments[0] && *offset == 3 * KEY_RECORD),
        "{refused:?}"
    );
    assert!(
        refused
            .expect_err("refused")
            .to_string()
            .contains("1 more damaged ranges")
    );
    let engine = open_salvaging(dir.path());
    assert_eq!(engine.salvaged().records, 2);
    assert_keys(&engine, 0..200, &[3, KEYS_PER_SEGMENT + 40]);
}

/// What salvage costs: a remove in a damaged record is lost, so the value it removed is back
/// on this node (until a peer's copy of the delete repairs it).
#[test]
fn a_salvaged_remove_brings_the_old_value_back() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        engine
            .write(vec![put(Tree::Data, "gone", "old")])
            .expect("write");
        engine
            .write(vec![WriteOp::remove(Tree::Data, b"gone".to_vec())])
            .expect("write");
        engine
            .write(vec![put(Tree::Data, "kept", "1")])
            .expect("write");
    }
    let segment = segment_files(dir.path()).remove(0);
    // The put of "gone" is 33 bytes; the remove follows it.
    flip(&segment, 33 + 20);
    let engine = open_salvaging(dir.path());
    assert_eq!(engine.salvaged().records, 1);
    assert_eq!(value(&engine, Tree::Data, "gone").as_deref(), Some("old"));
    assert_eq!(value(&engine, Tree::Data, "kept").as_deref(), Some("1"));
}

// ---------------------------------------------------------------------------------------------
// Hint files
// ---------------------------------------------------------------------------------------------

/// Seals the active segment, as its filling up would.
fn seal(engine: &LogEngine) {
    let mut writer = lock(&engine.log.writer);
    let next = writer.id.next().expect("an id");
    engine.log.rotate(&mut writer, next).expect("rotate");
}

/// Runs the job's hint files now.
fn write_hints(engine: &LogEngine) {
    engine
        .log
        .write_missing_hints(&Stop::default())
        .expect("hint files");
}

/// What the index says: every tree's keys and locations, and the live bytes.
type IndexView = (Vec<Vec<(Vec<u8>, super::index::Loc)>>, u64);

fn index_view(engine: &LogEngine) -> IndexView {
    let index = engine.log.read_index();
    let trees = index
        .trees
        .iter()
        .map(|tree| tree.iter().map(|(key, loc)| (key.clone(), *loc)).collect())
        .collect();
    (trees, index.live_bytes)
}

/// A sealed segment gets its hint file from the job; an open then reads the hint file and
/// not the segment (shown by a value the segment no longer holds where the hint file says:
/// the open does not read values at all).
#[test]
fn a_sealed_segment_gets_a_hint_file_and_opens_from_it() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        write_keys(&engine, 0..100);
        seal(&engine);
        write_hints(&engine);
        assert_eq!(hint_files(dir.path()).len(), 2, "both sealed segments");
    }
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_keys(&engine, 0..100, &[]);
    drop(engine);
    // A value's bytes changed behind the hint file's back: opening from the hint file, the
    // change goes unseen (the checksum would have caught it on replay).
    let first = segment_files(dir.path()).remove(0);
    flip(&first, 5 * KEY_RECORD + 40);
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("opens from the hint file");
    assert_ne!(value(&engine, Tree::Data, &key_name(5)), Some(key_value(5)));
}

/// A hint file whose checksum fails, or no hint file, and the segment is replayed, and the
/// hint file written again.
#[test]
fn a_damaged_or_missing_hint_file_falls_back_to_replay() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        write_keys(&engine, 0..200);
        write_hints(&engine);
    }
    let segments = segment_files(dir.path());
    let damaged = hint_of(&segments[0]);
    let good = fs::read(&damaged).expect("a hint file");
    flip(&damaged, 100);
    fs::remove_file(hint_of(&segments[1])).expect("remove");
    let expected = {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
        assert_keys(&engine, 0..200, &[]);
        index_view(&engine)
    };
    assert_eq!(fs::read(&damaged).expect("rewritten"), good);
    assert!(hint_of(&segments[1]).exists(), "written again");
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(index_view(&engine), expected);
}

/// A hint file for a shorter segment, or for other last bytes, is not trusted: the segment
/// is replayed, and what the hint file does not know about is there.
#[test]
fn a_stale_hint_file_is_not_trusted() {
    let dir = TempDir::new();
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
        write_keys(&engine, 0..10);
        seal(&engine);
        write_hints(&engine);
    }
    let segment = segment_files(dir.path()).remove(0);
    let hint = hint_of(&segment);
    assert!(hint.exists());
    // The segment grew after its hint file was written.
    let stale = fs::read(&hint).expect("hint");
    let mut bytes = fs::read(&segment).expect("segment");
    let late = super::record::encode(&[put(Tree::Data, "late", "1")]).expect("encode");
    bytes.extend(&late.bytes);
    fs::write(&segment, &bytes).expect("write");
    {
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
        assert_eq!(value(&engine, Tree::Data, "late").as_deref(), Some("1"));
        assert_keys(&engine, 0..10, &[]);
    }
    // Same length, another last record (its value changed, its checksum with it).
    fs::write(&hint, &stale).expect("the stale hint file back");
    bytes.truncate(bytes.len() - late.bytes.len());
    let other =
        super::record::encode(&[put(Tree::Data, "k0009", "value-0009-OTHERONES")]).expect("encode");
    let at = bytes.len() - other.bytes.len();
    bytes[at..].copy_from_slice(&other.bytes);
    fs::write(&segment, &bytes).expect("write");
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(
        value(&engine, Tree::Data, "k0009").as_deref(),
        Some("value-0009-OTHERONES")
    );
    assert_eq!(value(&engine, Tree::Data, "late"), None);
}

/// A merge writes the hint files of its copies, and removes those of what it replaced.
#[test]
fn a_merge_writes_its_copies_hint_files() {
    let dir = TempDir::new();
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("open");
    let live = overwrite(&engine, 20, 40);
    {
        let _merging = lock(&engine.log.merging);
        assert!(engine.log.merge(&Stop::default()).expect("merge"));
    }
    let segments = segment_files(dir.path());
    let hints = hint_files(dir.path());
    // Every segment but the active one has its hint file, and no hint file is left over.
    assert_eq!(
        hints,
        segments[..segments.len() - 1]
            .iter()
            .map(|segment| hint_of(segment))
            .collect::<Vec<_>>()
    );
    drop(engine);
    let engine = LogEngine::open_with(dir.path(), SMALL).expect("reopen");
    assert_eq!(data(&engine), live);
}

/// One step of [`hint_files_rebuild_the_index_replay_rebuilds`].
#[derive(Debug, Clone)]
enum Step {
    Put(u8, usize),
    Remove(u8),
    Seal,
    Merge,
    Hints,
    Reopen,
}

fn arb_step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        6 => (0..24u8, 0..200usize).prop_map(|(key, len)| Step::Put(key, len)),
        2 => (0..24u8).prop_map(Step::Remove),
        1 => Just(Step::Seal),
        1 => Just(Step::Merge),
        1 => Just(Step::Hints),
        1 => Just(Step::Reopen),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// Whatever the writes, seals, merges and reopens, an open from the hint files there are
    /// builds the same index (keys, locations, live bytes) as an open that replays every
    /// segment, and both hold what was written.
    #[test]
    fn hint_files_rebuild_the_index_replay_rebuilds(
        steps in proptest::collection::vec(arb_step(), 1..80),
    ) {
        let dir = TempDir::new();
        let mut expected = BTreeMap::new();
        let mut engine = Some(LogEngine::open_with(dir.path(), SMALL).expect("open"));
        for (n, step) in steps.into_iter().enumerate() {
            let open = engine.as_ref().expect("open");
            match step {
                Step::Put(key, len) => {
                    let (key, value) = (format!("key{key}"), format!("{n}-{}", "v".repeat(len)));
                    open.write(vec![put(Tree::Data, &key, &value)]).expect("write");
                    expected.insert(key, value);
                }
                Step::Remove(key) => {
                    let key = format!("key{key}");
                    open.write(vec![WriteOp::remove(Tree::Data, key.as_bytes().to_vec())])
                        .expect("write");
                    expected.remove(&key);
                }
                Step::Seal => seal(open),
                Step::Merge => {
                    let _merging = lock(&open.log.merging);
                    open.log.merge(&Stop::default()).expect("merge");
                }
                Step::Hints => write_hints(open),
                Step::Reopen => {
                    drop(engine.take());
                    engine = Some(LogEngine::open_with(dir.path(), SMALL).expect("reopen"));
                }
            }
        }
        drop(engine);
        let from_hints = {
            let engine = LogEngine::open_with(dir.path(), SMALL).expect("open from hint files");
            proptest::prop_assert_eq!(&data(&engine), &expected);
            index_view(&engine)
        };
        remove_hint_files(dir.path());
        let engine = LogEngine::open_with(dir.path(), SMALL).expect("open by replay");
        proptest::prop_assert_eq!(index_view(&engine), from_hints);
        proptest::prop_assert_eq!(&data(&engine), &expected);
    }
}
