//! The fjall engine: the node's durable engine before the log engine, on [fjall] 3 (an LSM
//! tree with a journal). One fjall keyspace per [`Tree`], one database per node; it still
//! opens the directories it wrote (`--engine fjall`).
//!
//! # What fjall guarantees (read in fjall 3.1 source)
//!
//! - **Commit.** `WriteBatch::commit` takes the journal's mutex, appends the whole batch to the
//!   journal (start marker, items, end marker with a checksum), then calls
//!   `persist(PersistMode::Buffer)` itself when the batch's durability is `Buffer`, which
//!   `Database::batch` sets whenever `manual_journal_persist` is off (the default). `Buffer`
//!   flushes fjall's 8 KiB `BufWriter` into the file, i.e. a `write(2)` into the OS page
//!   cache, and no fsync. Only then are the items inserted into the memtables and made
//!   visible. So when `commit` returns `Ok`, the batch survives `SIGKILL` of the process; a
//!   separate `db.persist(Buffer)` afterwards would only take the journal mutex again for
//!   nothing. We still set the durability on each batch explicitly, so that this guarantee does
//!   not hang on a builder default.
//! - **Atomicity.** Recovery replays the journal batch by batch and truncates an unfinished
//!   batch at its end (no end marker: the process died mid-append), so a batch across
//!   keyspaces is all there or absent after a crash. A finished batch whose checksum does not
//!   match (corruption, not a crash) makes recovery fail rather than guess. Readers see a batch
//!   only after all of it is in the memtables, provided they read through a snapshot:
//!   `Keyspace::get` and `range` read at `SeqNo::MAX` and could see half a batch (the suite's
//!   `readers_see_whole_writes` catches that), so this engine reads through `db.snapshot()`.
//! - **Sync.** `db.persist(PersistMode::SyncAll)` fsyncs the active journal (sealed journals
//!   were fsynced when rotated; tables are fsynced when written). It holds the journal mutex
//!   during the fsync, so writers wait for it; so does the fsync fjall makes before each
//!   memtable flush. This engine's [`Engine::sync`] fsyncs the journal files through its own
//!   handles instead, without that mutex (see `sync_journals`), and a frequent sync leaves
//!   fjall's own fsyncs little to write.
//! - **Concurrency.** fjall has no group commit: every commit holds one journal mutex for its
//!   append, its `write(2)` and its memtable inserts, so commits are serialised inside fjall.
//!   With `Buffer` that critical section is a few microseconds (no disk wait), and the costly
//!   part, the fsync, is shared by every write since the previous [`Engine::sync`], which in
//!   effect is group commit at the granularity of the sync interval. This engine adds no lock
//!   of its own on the write path, except for the rare keys described below.
//! - **Lock.** fjall takes an exclusive non-blocking OS lock (`File::try_lock`: `flock(2)` on
//!   Unix, `LockFileEx` on Windows) on `<dir>/lock` for as long as the database or any of its
//!   keyspace handles lives, and answers `Error::Locked` when another holder has it (after
//!   three tries 100 ms apart when the database already exists). An `flock` lock belongs to an
//!   open file description, so a second open inside the same process is refused too, and the
//!   kernel releases it when the process dies, so a node killed by `SIGKILL` restarts without
//!   cleaning up. We map `Error::Locked` to [`StorageError::Locked`].
//! - **Limits.** fjall stores keys of 1 to 65535 bytes (its journal writes key lengths as
//!   `u16` and its memtable panics on an empty key, whatever its documentation says about
//!   65536), so keys are checked before a batch is built.
//!
//! # Keys fjall cannot store directly
//!
//! The engine takes keys of 0 to [`MAX_KEY_BYTES`] bytes (64 KiB and a node's 3-byte
//! prefix); fjall takes 1 to 65535. A
//! key is stored under a *fjall key*: itself, except that the empty key maps to `"\0"` and keys
//! longer than 65535 bytes map to their first 65535 bytes. The map is monotone, so key order is
//! preserved. The fjall keys that several keys share, `"\0"` (for `""` and `"\0"`) and every
//! 65535-byte key (for itself and its extensions of up to four bytes), hold a *bucket* instead of a
//! plain value: a small sorted list of (tail, value) entries, where the key is the bucket's
//! base (`""` for `"\0"`, the fjall key itself otherwise) followed by the tail. A write to a
//! bucket reads, changes and rewrites it under `bucket_lock`; every other write takes no lock
//! here. Such keys are rare, but the protocol allows them, so they work.
//!
//! # Settings, for a write-heavy store of many small values in bounded memory
//!
//! - Memtables (fjall's write buffers): 48 to 80 MiB for `data` (fjall's default is 64; the
//!   spread is explained at `memtable_bytes`), 8 MiB for `hints`, 2 MiB for `meta`. A flush
//!   is a burst: a fjall thread spends a fraction of a second of CPU turning a full memtable
//!   into a table, and on a busy machine the requests of that moment wait for the CPU.
//!   Smaller memtables flush more often, and each burst lengthens the put tail by more than
//!   the larger skip list costs the median (*The put tail* in the performance notes has the
//!   figures). fjall keeps per keyspace one active memtable and
//!   at most four sealed ones waiting for their flush (it halts writes at four), so memtables
//!   could reach 5 × 90 MiB = 450 MiB if flushes fell behind; in practice a flush takes a
//!   fraction of a second and one memtable is active. Hints are written in bursts while a node
//!   is down and deleted once handed off; meta is tiny. Sizes are recorded when a keyspace is
//!   created: changing them later affects only new data directories.
//! - Block cache: 64 MiB (default 32 MiB), so the hot part of the data and the index and filter
//!   blocks stay in memory.
//! - Journals: at most 256 MiB in all (default 512 MiB). Past that, fjall flushes the memtables
//!   that pin old journals, which bounds both disk use and how much a restart has to replay.
//! - Bloom filters on every level of `data` (fjall's default; `expect_point_read_hits` stays
//!   off): a node reads a key before each put to merge versions, and puts of new keys miss,
//!   which the filters answer without touching disk. 4 KiB data blocks (default) suit point
//!   reads of small values; LZ4 on the last level and in the journal above 4 KiB (defaults).
//!
//! [fjall]: https://docs.rs/fjall
//! [`MAX_KEY_BYTES`]: super::MAX_KEY_BYTES

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use super::{Engine, KeyValue, StorageError, Tree, WriteOp, check_key, check_ops};

/// Block cache shared by all keyspaces.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Upper bound on all journal files together.
const MAX_JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// Longest key fjall stores (`u16::MAX`).
const FJALL_MAX_KEY_BYTES: usize = 65535;

/// The fjall key of `""` and `"\0"`.
const NUL: &[u8] = &[0];

/// Memtable size of a tree's keyspace, when it is created.
///
/// `data`'s is drawn between 48 and 80 MiB. When N is the cluster's size every node journals
/// the same writes, so nodes started together would fill their memtables and journals in
/// the same second, and fjall's flush and journal rotation stall a node's writers for up to
/// a few hundred milliseconds while it fsyncs under its locks: on every node at once, so no
/// replica is left to take the puts. Apart, one node stalls at a time and the others
/// coordinate and acknowledge.
fn memtable_bytes(tree: Tree) -> u64 {
    const MIB: u64 = 1024 * 1024;
    match tree {
        Tree::Data => 48 * MIB + crate::random::random_u64() % (32 * MIB),
        Tree::Hints => 8 * MIB,
        Tree::Meta => 2 * MIB,
    }
}

/// Keeps the trees in a fjall database in a directory of their own.
pub struct FjallEngine {
    db: Database,
    data: Keyspace,
    hints: Keyspace,
    meta: Keyspace,
    dir: PathBuf,
    /// Serialises the read-modify-write of buckets (see the module documentation).
    bucket_lock: Mutex<()>,
}

impl std::fmt::Debug for FjallEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallEngine")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FjallEngine {
    /// Opens (or creates) the database in `dir`, creating the directory if missing.
    ///
    /// Fails with [`StorageError::Locked`] while another process (or another engine in this
    /// process) has `dir` open.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir)?;
        let db = Database::builder(dir)
            .cache_size(CACHE_BYTES)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .manual_journal_persist(false)
            .open()
            .map_err(|error| match error {
                fjall::Error::Locked => StorageError::Locked {
                    dir: dir.to_path_buf(),
                },
                other => engine_error(other),
            })?;
        let keyspace = |tree: Tree| {
            db.keyspace(tree.name(), || {
                KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes(tree))
            })
            .map_err(engine_error)
        };
        let engine = FjallEngine {
            data: keyspace(Tree::Data)?,
            hints: keyspace(Tree::Hints)?,
            meta: keyspace(Tree::Meta)?,
            db,
            dir: dir.to_path_buf(),
            bucket_lock: Mutex::new(()),
        };
        tracing::info!(dir = %dir.display(), "opened fjall storage");
        Ok(engine)
    }

    fn keyspace(&self, tree: Tree) -> &Keyspace {
        match tree {
            Tree::Data => &self.data,
            Tree::Hints => &self.hints,
            Tree::Meta => &self.meta,
        }
    }

    /// Fsyncs the journal files (`<dir>/<id>.jnl`) through handles of our own, and answers how
    /// many it found.
    ///
    /// fjall's `persist(SyncAll)` holds the journal mutex through the fsync, so every writer of
    /// the node waits for the disk once a second, on all nodes at once: the largest share of
    /// the put tail. An fsync flushes the *file*, whichever
    /// descriptor asks, and our commits already put their bytes in the page cache (`Buffer`
    /// durability), so syncing the files ourselves gives the same guarantee without the lock.
    /// Every byte written before this call is in a journal that exists now (fjall creates a
    /// journal before writing to it), or in a journal fjall deleted after flushing it into
    /// tables, which it fsynced when it wrote them; a journal sealed meanwhile was fsynced by
    /// fjall's rotation, and a new one's name by its directory fsync.
    fn sync_journals(&self) -> Result<usize, StorageError> {
        let mut synced = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|extension| extension != "jnl") {
                continue;
            }
            // Linux fsyncs through a read-only handle; the node runs on Linux.
            match std::fs::File::open(&path) {
                Ok(journal) => journal.sync_data()?,
                // Flushed into tables and deleted since the listing.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error.into()),
            }
            synced += 1;
        }
        Ok(synced)
    }

    /// Reads a bucket as it is now; called under `bucket_lock`, so nobody else changes it.
    fn load_bucket(&self, tree: Tree, fjall_key: &[u8]) -> Result<Bucket, StorageError> {
        match self.keyspace(tree).get(fjall_key).map_err(engine_error)? {
            Some(bytes) => decode_bucket(&bytes),
            None => Ok(Bucket::new()),
        }
    }
}

impl Engine for FjallEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_key(key)?;
        let fkey = fjall_key(key);
        let snapshot = self.db.snapshot();
        let Some(stored) = snapshot
            .get(self.keyspace(tree), fkey)
            .map_err(engine_error)?
        else {
            return Ok(None);
        };
        if !is_bucket(fkey) {
            return Ok(Some(stored.to_vec()));
        }
        let tail = key.get(bucket_base(fkey).len()..).unwrap_or_default();
        Ok(decode_bucket(&stored)?.remove(tail))
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        check_ops(&ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        // Only buckets need our lock; a write without them goes straight to fjall.
        let _bucket_guard = ops.iter().any(|op| is_bucket(fjall_key(&op.key))).then(|| {
            self.bucket_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        });

        // The last op on a key wins. fjall gives every item of a batch the same sequence
        // number, so two items with one key would leave the outcome to its memtable.
        let mut plain: BTreeMap<(Tree, Vec<u8>), Option<Vec<u8>>> = BTreeMap::new();
        let mut buckets: BTreeMap<(Tree, Vec<u8>), Bucket> = BTreeMap::new();
        for op in ops {
            let fkey = fjall_key(&op.key);
            if !is_bucket(fkey) {
                plain.insert((op.tree, op.key), op.value);
                continue;
            }
            let tail = op
                .key
                .get(bucket_base(fkey).len()..)
                .unwrap_or_default()
                .to_vec();
            let bucket = match buckets.entry((op.tree, fkey.to_vec())) {
                Entry::Occupied(entry) => entry.into_mut(),
                Entry::Vacant(entry) => {
                    let current = self.load_bucket(op.tree, entry.key().1.as_slice())?;
                    entry.insert(current)
                }
            };
            match op.value {
                Some(value) => bucket.insert(tail, value),
                None => bucket.remove(&tail),
            };
        }

        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for ((tree, key), value) in plain {
            match value {
                Some(value) => batch.insert(self.keyspace(tree), key, value),
                None => batch.remove(self.keyspace(tree), key),
            }
        }
        for ((tree, fkey), bucket) in buckets {
            if bucket.is_empty() {
                batch.remove(self.keyspace(tree), fkey);
            } else {
                batch.insert(self.keyspace(tree), fkey, encode_bucket(&bucket)?);
            }
        }
        batch.commit().map_err(engine_error)
    }

    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let mut page = Vec::new();
        if limit == 0 {
            return Ok(page);
        }
        let is_wanted = |key: &[u8]| after.is_none_or(|after| key > after);
        let snapshot = self.db.snapshot();
        let keyspace = self.keyspace(tree);
        // Start at the fjall key of `after` itself: it may be a bucket holding later keys.
        let entries = match after {
            None => snapshot.iter(keyspace),
            Some(after) => {
                let start = fjall_key(after).to_vec();
                snapshot.range(keyspace, (Bound::Included(start), Bound::Unbounded))
            }
        };
        for entry in entries {
            let (fkey, stored) = entry.into_inner().map_err(engine_error)?;
            if !is_bucket(&fkey) {
                if is_wanted(&fkey) {
                    page.push((fkey.to_vec(), stored.to_vec()));
                }
            } else {
                let base = bucket_base(&fkey);
                for (tail, value) in decode_bucket(&stored)? {
                    let key = [base, tail.as_slice()].concat();
                    if is_wanted(&key) {
                        page.push((key, value));
                        if page.len() == limit {
                            break;
                        }
                    }
                }
            }
            if page.len() == limit {
                break;
            }
        }
        Ok(page)
    }

    fn sync(&self) -> Result<(), StorageError> {
        match self.sync_journals() {
            Ok(synced) if synced > 0 => Ok(()),
            // No journal where fjall 3 keeps them: let fjall sync, lock and all.
            Ok(_) => self.db.persist(PersistMode::SyncAll).map_err(engine_error),
            // A failed fsync may have dropped journal pages, and a handle opened later would
            // not hear of it again. fjall's own handle does: its fsync fails too and poisons
            // the database, so the node refuses writes from now on instead of acknowledging
            // what it may not keep.
            Err(error) => {
                tracing::error!(%error, "journal fsync failed; asking fjall to sync");
                self.db.persist(PersistMode::SyncAll).map_err(engine_error)
            }
        }
    }

    fn name(&self) -> &'static str {
        "fjall"
    }
}

/// Maps a fjall error to ours; `Locked` is handled where the directory is known.
fn engine_error(error: fjall::Error) -> StorageError {
    match error {
        fjall::Error::Io(error) => StorageError::Io(error),
        fjall::Error::Poisoned => StorageError::Engine(
            "fjall refuses writes after a failed journal write or fsync; \
             restart the storage_node"
                .to_owned(),
        ),
        other => StorageError::Engine(other.to_string()),
    }
}

/// The fjall key a key is stored under: itself, `"\0"` for `""`, the first 65535 bytes of a
/// longer key. Monotone: `a <= b` implies `fjall_key(a) <= fjall_key(b)`.
fn fjall_key(key: &[u8]) -> &[u8] {
    if key.is_empty() {
        NUL
    } else {
        &key[..key.len().min(FJALL_MAX_KEY_BYTES)]
    }
}

/// Whether a fjall key holds a bucket rather than a plain value.
fn is_bucket(fjall_key: &[u8]) -> bool {
    fjall_key == NUL || fjall_key.len() == FJALL_MAX_KEY_BYTES
}

/// What every key in a bucket starts with; the rest of the key is the entry's tail.
fn bucket_base(fjall_key: &[u8]) -> &[u8] {
    if fjall_key == NUL { &[] } else { fjall_key }
}

/// The entries of a bucket, tail → value, in key order.
type Bucket = BTreeMap<Vec<u8>, Vec<u8>>;

/// Stored form of a bucket: per entry, in tail order, `tail length (u8) | tail |
/// value length (u32, little-endian) | value`. Tails are 0 or 1 bytes long.
fn encode_bucket(bucket: &Bucket) -> Result<Vec<u8>, StorageError> {
    let len = bucket
        .iter()
        .map(|(tail, value)| 1 + tail.len() + 4 + value.len())
        .sum();
    let too_large = || StorageError::ValueTooLarge {
        len,
        max: u32::MAX as usize,
    };
    if u32::try_from(len).is_err() {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(len);
    for (tail, value) in bucket {
        bytes.push(u8::try_from(tail.len()).map_err(|_| too_large())?);
        bytes.extend_from_slice(tail);
        let value_len = u32::try_from(value.len()).map_err(|_| too_large())?;
        bytes.extend_from_slice(&value_len.to_le_bytes());
        bytes.extend_from_slice(value);
    }
    Ok(bytes)
}

/// Reads what [`encode_bucket`] wrote.
fn decode_bucket(mut bytes: &[u8]) -> Result<Bucket, StorageError> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], StorageError> {
        if bytes.len() < n {
            return Err(StorageError::Engine(
                "corrupt bucket: entry cut short".to_owned(),
            ));
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    let mut bucket = Bucket::new();
    while !bytes.is_empty() {
        let tail_len = take(&mut bytes, 1)?.first().copied().unwrap_or_default();
        let tail = take(&mut bytes, usize::from(tail_len))?.to_vec();
        let mut value_len = [0; 4];
        value_len.copy_from_slice(take(&mut bytes, 4)?);
        let value_len = usize::try_from(u32::from_le_bytes(value_len))
            .map_err(|_| StorageError::Engine("corrupt bucket: value too long".to_owned()))?;
        let value = take(&mut bytes, value_len)?.to_vec();
        bucket.insert(tail, value);
    }
    Ok(bucket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MAX_KEY_BYTES;
    use crate::storage::tests::{Fixture, TempDir};
    use std::io::{BufRead, BufReader};
    use std::process::{Child, Command, Stdio};

    crate::storage::tests::engine_suite!(Fixture::fjall());

    #[test]
    fn data_survives_drop_and_reopen() {
        let dir = TempDir::new();
        let engine = FjallEngine::open(dir.path()).unwrap();
        engine
            .write(vec![
                WriteOp::put(Tree::Data, "k", "v"),
                WriteOp::put(Tree::Hints, "h", "hint"),
                WriteOp::put(Tree::Data, "", "empty key"),
                WriteOp::put(Tree::Data, vec![7; MAX_KEY_BYTES], "longest key"),
            ])
            .unwrap();
        engine
            .write(vec![WriteOp::put(Tree::Meta, "gone", "x")])
            .unwrap();
        engine
            .write(vec![WriteOp::remove(Tree::Meta, "gone")])
            .unwrap();
        drop(engine);

        let engine = FjallEngine::open(dir.path()).unwrap();
        assert_eq!(engine.get(Tree::Data, b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(
            engine.get(Tree::Hints, b"h").unwrap(),
            Some(b"hint".to_vec())
        );
        assert_eq!(
            engine.get(Tree::Data, b"").unwrap(),
            Some(b"empty key".to_vec())
        );
        assert_eq!(
            engine.get(Tree::Data, &[7; MAX_KEY_BYTES]).unwrap(),
            Some(b"longest key".to_vec())
        );
        assert_eq!(engine.get(Tree::Meta, b"gone").unwrap(), None);
    }

    #[test]
    fn open_creates_missing_directories() {
        let dir = TempDir::new();
        let nested = dir.path().join("a/b/node-25000");
        let engine = super::super::open(&super::super::StorageConfig::Fjall {
            dir: nested.clone(),
        })
        .unwrap();
        assert_eq!(engine.name(), "fjall");
        assert!(nested.is_dir());
    }

    #[test]
    fn second_open_of_an_open_dir_is_locked() {
        let dir = TempDir::new();
        let engine = engine_holding_one_key(&dir);

        let error = FjallEngine::open(dir.path()).unwrap_err();
        assert!(
            matches!(&error, StorageError::Locked { dir: locked } if locked == dir.path()),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        assert!(
            message.contains("another storage_node is using it"),
            "{message}"
        );

        // The refused open must not disturb the engine that holds the directory.
        assert_eq!(engine.get(Tree::Data, b"k").unwrap(), Some(b"v".to_vec()));
        engine
            .write(vec![WriteOp::put(Tree::Data, "k2", "v2")])
            .unwrap();
        drop(engine);
        let engine = FjallEngine::open(dir.path()).unwrap();
        assert_eq!(engine.get(Tree::Data, b"k2").unwrap(), Some(b"v2".to_vec()));
    }

    #[test]
    fn sync_then_reopen_keeps_everything() {
        let dir = TempDir::new();
        let engine = FjallEngine::open(dir.path()).unwrap();
        for i in 0..100u32 {
            engine
                .write(vec![WriteOp::put(
                    Tree::Data,
                    i.to_be_bytes(),
                    i.to_le_bytes(),
                )])
                .unwrap();
        }
        engine.sync().unwrap();
        drop(engine);
        let engine = FjallEngine::open(dir.path()).unwrap();
        assert_eq!(engine.scan(Tree::Data, None, 1000).unwrap().len(), 100);
    }

    /// The sync finds fjall's journals itself; if a fjall upgrade moved them, this says so
    /// (the sync would still be done, by fjall under its lock).
    #[test]
    fn sync_finds_the_journal() {
        let dir = TempDir::new();
        let engine = engine_holding_one_key(&dir);
        assert!(engine.sync_journals().unwrap() >= 1);
    }

    fn engine_holding_one_key(dir: &TempDir) -> FjallEngine {
        let engine = FjallEngine::open(dir.path()).unwrap();
        engine
            .write(vec![WriteOp::put(Tree::Data, "k", "v")])
            .unwrap();
        engine
    }

    #[test]
    fn buckets_round_trip() {
        let bucket: Bucket = [
            (vec![], b"a".to_vec()),
            (vec![0], vec![]),
            (vec![255], vec![9; 300]),
        ]
        .into();
        assert_eq!(
            decode_bucket(&encode_bucket(&bucket).unwrap()).unwrap(),
            bucket
        );
        assert!(decode_bucket(&[1, 0, 5, 0, 0, 0, 1]).is_err());
        assert!(decode_bucket(&[2]).is_err());
    }

    #[test]
    fn fjall_keys_keep_key_order() {
        let long = |fill: u8, len: usize| vec![fill; len];
        let mut keys = vec![
            vec![],
            vec![0],
            vec![0, 0],
            vec![1],
            long(5, 65534),
            long(5, 65535),
            long(5, 65536),
            [long(5, 65535), vec![9]].concat(),
            long(6, 1),
        ];
        keys.sort();
        for pair in keys.windows(2) {
            assert!(fjall_key(&pair[0]) <= fjall_key(&pair[1]));
        }
    }

    // A write acknowledged by `write` must survive SIGKILL. This cannot be shown inside one
    // process: forgetting the engine keeps fjall's lock and its in-process buffers alive, and
    // dropping it runs fjall's fsync on drop. So the test runs the `crash_child` test below in a
    // child process (this same test binary), which writes and reports each acknowledged write
    // on stdout, kills it with SIGKILL mid-stream and reopens the directory.

    /// Environment variable that makes `crash_child` write into the directory it names.
    const CRASH_DIR_ENV: &str = "DYNAMITE_STORAGE_CRASH_DIR";
    /// Environment variable naming the engine `crash_child` writes with: "fjall" or "log".
    const CRASH_ENGINE_ENV: &str = "DYNAMITE_STORAGE_CRASH_ENGINE";

    /// Opens `dir` with the engine named `fjall` or `log`.
    fn open_engine(name: &str, dir: &Path) -> Box<dyn Engine> {
        match name {
            "log" => Box::new(crate::storage::LogEngine::open(dir).unwrap()),
            _ => Box::new(FjallEngine::open(dir).unwrap()),
        }
    }
    /// Writes the child makes before it idles (bounds its disk use).
    const CHILD_WRITES: u32 = 3000;

    fn crash_key(i: u32) -> Vec<u8> {
        format!("key-{i:06}").into_bytes()
    }

    /// 6 KiB, so that a two-op batch (12 KiB) exceeds fjall's 8 KiB journal buffer and goes
    /// out in more than one `write(2)`: a kill can land in the middle of a batch.
    fn crash_value(i: u32) -> Vec<u8> {
        let mut value = vec![u8::try_from(i % 251).unwrap(); 6 * 1024];
        value[..4].copy_from_slice(&i.to_be_bytes());
        value
    }

    /// Not a test of its own: the body of the child process (does nothing without the env var).
    #[test]
    #[ignore = "run as a child process by acknowledged_writes_survive_sigkill"]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
            return;
        };
        let name = std::env::var(CRASH_ENGINE_ENV).unwrap_or_default();
        let engine = open_engine(&name, Path::new(&dir));
        println!("OPENED");
        for i in 0..CHILD_WRITES {
            engine
                .write(vec![
                    WriteOp::put(Tree::Data, crash_key(i), crash_value(i)),
                    WriteOp::put(Tree::Meta, crash_key(i), i.to_be_bytes()),
                ])
                .unwrap();
            println!("ACKED {i}");
        }
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }

    /// Starts `crash_child` writing into `dir` with `engine`; returns it with a reader of its
    /// stdout.
    fn spawn_writer(engine: &str, dir: &Path) -> (Child, impl Iterator<Item = String>) {
        let test_path = format!("{}::crash_child", module_path!());
        let test_name = test_path
            .split_once("::")
            .map_or(test_path.as_str(), |(_, name)| name);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                test_name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_DIR_ENV, dir)
            .env(CRASH_ENGINE_ENV, engine)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok);
        (child, lines)
    }

    /// Reads the child's stdout until it acknowledged write `target`; returns the highest ack.
    fn wait_for_ack(lines: &mut impl Iterator<Item = String>, target: u32) -> u32 {
        for line in lines {
            if let Some(i) = line.strip_prefix("ACKED ") {
                let i: u32 = i.parse().unwrap();
                if i >= target {
                    return i;
                }
            }
        }
        panic!("child exited before acknowledging write {target}");
    }

    #[test]
    fn acknowledged_writes_survive_sigkill() {
        writes_survive_sigkill("fjall");
    }

    #[test]
    fn acknowledged_writes_survive_sigkill_of_the_log_engine() {
        writes_survive_sigkill("log");
    }

    fn writes_survive_sigkill(name: &str) {
        let dir = TempDir::new();
        let (mut child, mut lines) = spawn_writer(name, dir.path());
        let acked = wait_for_ack(&mut lines, 500);
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();

        let engine = open_engine(name, dir.path());
        for i in 0..=acked {
            let data = engine.get(Tree::Data, &crash_key(i)).unwrap();
            assert!(
                data == Some(crash_value(i)),
                "acknowledged write {i} lost from data"
            );
            let meta = engine.get(Tree::Meta, &crash_key(i)).unwrap();
            assert_eq!(
                meta,
                Some(i.to_be_bytes().to_vec()),
                "acknowledged write {i} lost from meta"
            );
        }
        // Writes after the last ack may or may not be there, but each batch is whole, and they
        // form a prefix (the child wrote them one after another).
        let data = engine.scan(Tree::Data, None, usize::MAX).unwrap();
        let meta = engine.scan(Tree::Meta, None, usize::MAX).unwrap();
        assert_eq!(data.len(), meta.len(), "a batch was torn apart");
        assert!(data.len() > usize::try_from(acked).unwrap());
        for (i, ((data_key, value), (meta_key, _))) in data.iter().zip(&meta).enumerate() {
            let i = u32::try_from(i).unwrap();
            assert_eq!(data_key, &crash_key(i));
            assert_eq!(meta_key, &crash_key(i));
            assert!(value == &crash_value(i), "write {i} has a wrong value");
        }
        eprintln!(
            "{name}: acknowledged {} writes, found {} after SIGKILL",
            acked + 1,
            data.len()
        );
    }

    #[test]
    fn open_while_another_process_holds_the_dir_is_locked() {
        let dir = TempDir::new();
        let (mut child, mut lines) = spawn_writer("fjall", dir.path());
        wait_for_ack(&mut lines, 0);

        let error = FjallEngine::open(dir.path()).unwrap_err();
        assert!(matches!(error, StorageError::Locked { .. }), "{error:?}");

        child.kill().unwrap();
        child.wait().unwrap();
        // The kernel dropped the dead process's lock: a restart needs no cleanup.
        let engine = FjallEngine::open(dir.path()).unwrap();
        assert_eq!(
            engine.get(Tree::Meta, &crash_key(0)).unwrap(),
            Some(0u32.to_be_bytes().to_vec())
        );
    }
}
