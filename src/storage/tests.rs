//! One test suite for every [`Engine`]: `engine_suite!(fixture)` expands to one `#[test]` per
//! function below, each on a fresh engine from `fixture`. `memory.rs`, `log/` and `fjall.rs`
//! invoke it, so every engine answers to the same contract.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Engine, FjallEngine, MAX_KEY_BYTES, MemoryEngine, StorageError, Tree, WriteOp};

/// Expands to one `#[test]` per suite function, each calling it on `$fixture.engine`.
macro_rules! engine_suite {
    ($fixture:expr) => {
        $crate::storage::tests::engine_suite!($fixture;
            get_missing_is_none,
            write_then_get,
            overwrite_replaces_value,
            remove_deletes_key,
            remove_missing_key_is_ok,
            empty_write_is_ok,
            last_op_on_a_key_wins,
            multi_op_write_spans_trees,
            oversized_write_applies_nothing,
            trees_are_separate,
            scan_returns_keys_in_order,
            scan_after_is_exclusive,
            scan_range_stops_before_its_bound,
            scan_pages_through_a_tree,
            scan_limit_zero_is_empty,
            longest_and_empty_keys,
            keys_around_the_fjall_key_limit,
            binary_keys_and_values,
            concurrent_writers,
            readers_see_whole_writes,
            sync_succeeds,
        );
    };
    ($fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let fixture = $fixture;
                $crate::storage::tests::$name(&fixture.engine);
            }
        )*
    };
}
pub(crate) use engine_suite;

/// An engine under test, with the directory it lives in (removed after the engine is dropped:
/// fields drop in declaration order).
pub(crate) struct Fixture {
    pub engine: Arc<dyn Engine>,
    _dir: Option<TempDir>,
}

impl Fixture {
    pub fn memory() -> Self {
        Fixture {
            engine: Arc::new(MemoryEngine::new()),
            _dir: None,
        }
    }

    pub fn log() -> Self {
        let dir = TempDir::new();
        let engine = super::LogEngine::open(dir.path()).unwrap();
        Fixture {
            engine: Arc::new(engine),
            _dir: Some(dir),
        }
    }

    pub fn fjall() -> Self {
        let dir = TempDir::new();
        let engine = FjallEngine::open(dir.path()).unwrap();
        Fixture {
            engine: Arc::new(engine),
            _dir: Some(dir),
        }
    }
}

/// A fresh directory under the system's temporary directory, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let name = format!(
            "dynamite-storage-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn put(tree: Tree, key: &[u8], value: &[u8]) -> WriteOp {
    WriteOp::put(tree, key, value)
}

fn get(engine: &Arc<dyn Engine>, tree: Tree, key: &[u8]) -> Option<Vec<u8>> {
    engine.get(tree, key).unwrap()
}

fn keys(page: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
    page.iter().map(|(key, _)| key.clone()).collect()
}

pub fn get_missing_is_none(engine: &Arc<dyn Engine>) {
    for tree in Tree::ALL {
        assert_eq!(get(engine, tree, b"nothing here"), None);
        assert_eq!(get(engine, tree, b""), None);
    }
}

pub fn write_then_get(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![put(Tree::Data, b"key", b"value")])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"key"), Some(b"value".to_vec()));
    engine
        .write(vec![put(Tree::Data, b"empty value", b"")])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"empty value"), Some(Vec::new()));
}

pub fn overwrite_replaces_value(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![put(Tree::Data, b"key", b"first")])
        .unwrap();
    engine
        .write(vec![put(Tree::Data, b"key", b"second")])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"key"), Some(b"second".to_vec()));
    assert_eq!(engine.scan(Tree::Data, None, 10).unwrap().len(), 1);
}

pub fn remove_deletes_key(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![
            put(Tree::Data, b"a", b"1"),
            put(Tree::Data, b"b", b"2"),
        ])
        .unwrap();
    engine
        .write(vec![WriteOp::remove(Tree::Data, "a")])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"a"), None);
    assert_eq!(get(engine, Tree::Data, b"b"), Some(b"2".to_vec()));
    assert_eq!(
        keys(&engine.scan(Tree::Data, None, 10).unwrap()),
        vec![b"b".to_vec()]
    );
}

pub fn remove_missing_key_is_ok(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![WriteOp::remove(Tree::Hints, "never written")])
        .unwrap();
    assert_eq!(get(engine, Tree::Hints, b"never written"), None);
}

pub fn empty_write_is_ok(engine: &Arc<dyn Engine>) {
    engine.write(Vec::new()).unwrap();
    assert!(engine.scan(Tree::Data, None, 10).unwrap().is_empty());
}

pub fn last_op_on_a_key_wins(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![
            put(Tree::Data, b"k", b"1"),
            put(Tree::Data, b"k", b"2"),
            put(Tree::Data, b"gone", b"x"),
            WriteOp::remove(Tree::Data, "gone"),
            WriteOp::remove(Tree::Data, "back"),
            put(Tree::Data, b"back", b"y"),
            put(Tree::Data, b"", b"e1"),
            put(Tree::Data, b"", b"e2"),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"k"), Some(b"2".to_vec()));
    assert_eq!(get(engine, Tree::Data, b"gone"), None);
    assert_eq!(get(engine, Tree::Data, b"back"), Some(b"y".to_vec()));
    assert_eq!(get(engine, Tree::Data, b""), Some(b"e2".to_vec()));
}

pub fn multi_op_write_spans_trees(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![put(Tree::Hints, b"hint-1", b"for node b")])
        .unwrap();
    // Handing off a hint: store the data and drop the hint in one write.
    engine
        .write(vec![
            put(Tree::Data, b"key", b"value"),
            WriteOp::remove(Tree::Hints, "hint-1"),
            put(Tree::Meta, b"handed-off", b"1"),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"key"), Some(b"value".to_vec()));
    assert_eq!(get(engine, Tree::Hints, b"hint-1"), None);
    assert_eq!(get(engine, Tree::Meta, b"handed-off"), Some(b"1".to_vec()));
}

pub fn oversized_write_applies_nothing(engine: &Arc<dyn Engine>) {
    let too_long = vec![b'k'; MAX_KEY_BYTES + 1];
    let error = engine
        .write(vec![
            put(Tree::Data, b"ok", b"1"),
            put(Tree::Meta, &too_long, b"2"),
        ])
        .unwrap_err();
    assert!(
        matches!(error, StorageError::KeyTooLong { len, max: MAX_KEY_BYTES } if len == too_long.len()),
        "{error:?}"
    );
    assert_eq!(get(engine, Tree::Data, b"ok"), None);
    assert!(matches!(
        engine.get(Tree::Meta, &too_long),
        Err(StorageError::KeyTooLong { .. })
    ));
}

pub fn trees_are_separate(engine: &Arc<dyn Engine>) {
    engine
        .write(vec![
            put(Tree::Data, b"same", b"data"),
            put(Tree::Hints, b"same", b"hints"),
            put(Tree::Meta, b"same", b"meta"),
            put(Tree::Data, b"only data", b"x"),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"same"), Some(b"data".to_vec()));
    assert_eq!(get(engine, Tree::Hints, b"same"), Some(b"hints".to_vec()));
    assert_eq!(get(engine, Tree::Meta, b"same"), Some(b"meta".to_vec()));
    assert_eq!(get(engine, Tree::Hints, b"only data"), None);
    assert_eq!(engine.scan(Tree::Hints, None, 10).unwrap().len(), 1);

    engine
        .write(vec![WriteOp::remove(Tree::Hints, "same")])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"same"), Some(b"data".to_vec()));
    assert_eq!(get(engine, Tree::Meta, b"same"), Some(b"meta".to_vec()));
}

pub fn scan_returns_keys_in_order(engine: &Arc<dyn Engine>) {
    // Written out of order, with prefixes of each other and bytes above 0x7f.
    let written: Vec<&[u8]> = vec![b"b", b"a\xff", b"", b"ab", b"a", b"\xff", b"a\x00", b"B"];
    let ops = written
        .iter()
        .map(|key| put(Tree::Data, key, key))
        .collect();
    engine.write(ops).unwrap();
    let mut expected: Vec<Vec<u8>> = written.iter().map(|key| key.to_vec()).collect();
    expected.sort();
    let page = engine.scan(Tree::Data, None, 100).unwrap();
    assert_eq!(keys(&page), expected);
    assert!(page.iter().all(|(key, value)| key == value));
}

pub fn scan_after_is_exclusive(engine: &Arc<dyn Engine>) {
    let ops = [&b"a"[..], b"b", b"c"]
        .iter()
        .map(|key| put(Tree::Meta, key, b"v"))
        .collect();
    engine.write(ops).unwrap();
    let after = |key: &[u8]| keys(&engine.scan(Tree::Meta, Some(key), 10).unwrap());
    assert_eq!(after(b"a"), vec![b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(after(b"b"), vec![b"c".to_vec()]);
    assert_eq!(after(b"c"), Vec::<Vec<u8>>::new());
    // `after` need not be a stored key.
    assert_eq!(after(b"aa"), vec![b"b".to_vec(), b"c".to_vec()]);
    assert_eq!(
        after(b""),
        vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
    );
    assert_eq!(after(b"z"), Vec::<Vec<u8>>::new());
}

pub fn scan_range_stops_before_its_bound(engine: &Arc<dyn Engine>) {
    let ops = [&b"a"[..], b"b", b"c", b"d"]
        .iter()
        .map(|key| put(Tree::Meta, key, b"v"))
        .collect();
    engine.write(ops).unwrap();
    let range = |after: Option<&[u8]>, before: Option<&[u8]>, limit| {
        keys(&engine.scan_range(Tree::Meta, after, before, limit).unwrap())
    };
    let k = |key: &[u8]| key.to_vec();
    assert_eq!(range(Some(b"a"), Some(b"d"), 10), vec![k(b"b"), k(b"c")]);
    assert_eq!(range(None, Some(b"c"), 10), vec![k(b"a"), k(b"b")]);
    assert_eq!(range(Some(b"b"), None, 10), vec![k(b"c"), k(b"d")]);
    assert_eq!(range(None, Some(b"bb"), 1), vec![k(b"a")]);
    // Empty and inverted ranges are empty, not a panic.
    assert!(range(Some(b"b"), Some(b"b"), 10).is_empty());
    assert!(range(Some(b"c"), Some(b"a"), 10).is_empty());
    assert!(range(None, Some(b""), 10).is_empty());
}

pub fn scan_pages_through_a_tree(engine: &Arc<dyn Engine>) {
    let ops = (0..25u32)
        .map(|i| put(Tree::Hints, &i.to_be_bytes(), &[1; 3]))
        .collect();
    engine.write(ops).unwrap();
    let mut after: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = engine.scan(Tree::Hints, after.as_deref(), 10).unwrap();
        assert!(page.len() <= 10);
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        seen.extend(keys(&page));
        pages += 1;
    }
    assert_eq!(pages, 3);
    let expected: Vec<Vec<u8>> = (0..25u32).map(|i| i.to_be_bytes().to_vec()).collect();
    assert_eq!(seen, expected);
}

pub fn scan_limit_zero_is_empty(engine: &Arc<dyn Engine>) {
    engine.write(vec![put(Tree::Data, b"a", b"1")]).unwrap();
    assert!(engine.scan(Tree::Data, None, 0).unwrap().is_empty());
    assert!(engine.scan(Tree::Data, Some(b""), 0).unwrap().is_empty());
}

pub fn longest_and_empty_keys(engine: &Arc<dyn Engine>) {
    let longest = vec![b'x'; MAX_KEY_BYTES];
    engine
        .write(vec![
            put(Tree::Data, &longest, b"long"),
            put(Tree::Data, b"", b"empty"),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, &longest), Some(b"long".to_vec()));
    assert_eq!(get(engine, Tree::Data, b""), Some(b"empty".to_vec()));
    assert_eq!(get(engine, Tree::Data, &longest[1..]), None);
    let page = engine.scan(Tree::Data, None, 10).unwrap();
    assert_eq!(keys(&page), vec![Vec::new(), longest.clone()]);
    assert_eq!(
        keys(&engine.scan(Tree::Data, Some(b""), 10).unwrap()),
        vec![longest.clone()]
    );

    engine
        .write(vec![
            WriteOp::remove(Tree::Data, ""),
            WriteOp::remove(Tree::Data, longest.clone()),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b""), None);
    assert_eq!(get(engine, Tree::Data, &longest), None);
    assert!(engine.scan(Tree::Data, None, 10).unwrap().is_empty());
}

/// Keys that share a stored form in fjall (see `fjall.rs`): `""` and `"\0"`; a 65535-byte key
/// and its one-byte extensions. Every engine must keep them apart and in order.
pub fn keys_around_the_fjall_key_limit(engine: &Arc<dyn Engine>) {
    let base = vec![b'p'; 65535];
    let ext = |byte: u8| [base.as_slice(), &[byte]].concat();
    let mut written: Vec<Vec<u8>> = vec![
        Vec::new(),
        vec![0],
        vec![0, 0],
        vec![b'p'; 65534],
        base.clone(),
        ext(0),
        ext(b'p'),
        ext(255),
        vec![b'q'],
    ];
    let ops = written
        .iter()
        .map(|key| put(Tree::Data, key, &key.len().to_be_bytes()))
        .collect();
    engine.write(ops).unwrap();
    written.sort();
    for key in &written {
        assert_eq!(
            get(engine, Tree::Data, key),
            Some(key.len().to_be_bytes().to_vec())
        );
    }
    assert_eq!(get(engine, Tree::Data, &ext(1)), None);
    assert_eq!(keys(&engine.scan(Tree::Data, None, 100).unwrap()), written);

    // Paging one key at a time visits every key once, in order.
    let mut after: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    while let Some((key, _)) = engine.scan(Tree::Data, after.as_deref(), 1).unwrap().pop() {
        seen.push(key.clone());
        after = Some(key);
    }
    assert_eq!(seen, written);
    assert_eq!(
        keys(&engine.scan(Tree::Data, Some(&ext(0)), 2).unwrap()),
        vec![ext(b'p'), ext(255)]
    );

    // Removing one key of a shared group leaves the others alone.
    engine
        .write(vec![
            WriteOp::remove(Tree::Data, vec![0]),
            WriteOp::remove(Tree::Data, ext(b'p')),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, &[0]), None);
    assert_eq!(
        get(engine, Tree::Data, b""),
        Some(0usize.to_be_bytes().to_vec())
    );
    assert_eq!(get(engine, Tree::Data, &ext(b'p')), None);
    assert_eq!(
        get(engine, Tree::Data, &base),
        Some(65535usize.to_be_bytes().to_vec())
    );
    assert_eq!(
        get(engine, Tree::Data, &ext(255)),
        Some(65536usize.to_be_bytes().to_vec())
    );
    assert_eq!(
        engine.scan(Tree::Data, None, 100).unwrap().len(),
        written.len() - 2
    );
    // The same keys in another tree are another matter.
    assert_eq!(get(engine, Tree::Hints, b""), None);
}

pub fn binary_keys_and_values(engine: &Arc<dyn Engine>) {
    let all_bytes: Vec<u8> = (0..=255).collect();
    let reversed: Vec<u8> = all_bytes.iter().rev().copied().collect();
    engine
        .write(vec![
            put(Tree::Data, &all_bytes, &reversed),
            put(Tree::Data, b"\x00\x00", b"\x00"),
            put(Tree::Data, b"\xff\xff\xff", &[0xc3, 0x28, 0x00, 0xff]),
        ])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, &all_bytes), Some(reversed));
    assert_eq!(get(engine, Tree::Data, b"\x00\x00"), Some(b"\x00".to_vec()));
    assert_eq!(get(engine, Tree::Data, b"\x00"), None);
    assert_eq!(
        get(engine, Tree::Data, b"\xff\xff\xff"),
        Some(vec![0xc3, 0x28, 0x00, 0xff])
    );
    let large = vec![0xab; 1 << 20];
    engine
        .write(vec![put(Tree::Data, b"large", &large)])
        .unwrap();
    assert_eq!(get(engine, Tree::Data, b"large"), Some(large));
}

pub fn concurrent_writers(engine: &Arc<dyn Engine>) {
    const THREADS: u32 = 8;
    const KEYS_PER_THREAD: u32 = 500;
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            scope.spawn(move || {
                for i in 0..KEYS_PER_THREAD {
                    let key = format!("t{thread}-k{i:04}");
                    engine
                        .write(vec![put(Tree::Data, key.as_bytes(), &i.to_be_bytes())])
                        .unwrap();
                }
            });
        }
    });
    for thread in 0..THREADS {
        for i in 0..KEYS_PER_THREAD {
            let key = format!("t{thread}-k{i:04}");
            assert_eq!(
                get(engine, Tree::Data, key.as_bytes()),
                Some(i.to_be_bytes().to_vec())
            );
        }
    }
    let all = engine.scan(Tree::Data, None, usize::MAX).unwrap();
    assert_eq!(
        all.len(),
        usize::try_from(THREADS * KEYS_PER_THREAD).unwrap()
    );
}

/// A reader never sees part of a multi-op write: each write sets the same counter under two
/// keys (and a third in another tree), and readers check that every scan sees both keys agree.
pub fn readers_see_whole_writes(engine: &Arc<dyn Engine>) {
    const ROUNDS: u32 = 500;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for round in 0..ROUNDS {
                let value = round.to_be_bytes();
                engine
                    .write(vec![
                        put(Tree::Data, b"x", &value),
                        put(Tree::Data, b"y", &value),
                        put(Tree::Meta, b"z", &value),
                    ])
                    .unwrap();
            }
        });
        for after in [None, Some(&b"a"[..])] {
            scope.spawn(move || {
                for _ in 0..ROUNDS {
                    let page = engine.scan(Tree::Data, after, 10).unwrap();
                    if let [(_, x), (_, y)] = page.as_slice() {
                        assert_eq!(x, y, "a scan saw half of a write");
                    } else {
                        assert!(page.is_empty(), "a scan saw half of a write: {page:?}");
                    }
                }
            });
        }
    });
    assert_eq!(
        get(engine, Tree::Meta, b"z"),
        Some((ROUNDS - 1).to_be_bytes().to_vec())
    );
}

pub fn sync_succeeds(engine: &Arc<dyn Engine>) {
    engine.sync().unwrap();
    engine.write(vec![put(Tree::Data, b"k", b"v")]).unwrap();
    engine.sync().unwrap();
    assert_eq!(get(engine, Tree::Data, b"k"), Some(b"v".to_vec()));
    assert!(["memory", "fjall", "log"].contains(&engine.name()));
}
