//! The log engine, the node's default: every write is appended to a segment file, and an
//! in-memory ordered index maps each key to where its value lies (Bitcask's design, Riak's
//! default backend, with a B-tree index instead of a hash so that scans come in key order).
//!
//! Why it exists: fjall, the engine before it, inserts every version of every key into a skip
//! list that each memtable flush then walks whole, and under a steady put load both the
//! inserts and the bursts of the flushes showed in the put tail. Here an overwrite replaces
//! one index entry in place and nothing ever walks the versions; the only background work is
//! a merge that copies the live values once at least half of what is on disk is dead (*The
//! put tail* in the performance notes has the measurements).
//!
//! The pieces, one module each:
//!
//! - [`record`]: one write is one checksummed record, so a crash leaves it whole or absent;
//! - [`segment`]: records are appended to segment files, sealed once they pass
//!   [`Limits::segment_bytes`];
//! - [`index`]: the in-memory map from keys to values on disk, rebuilt at open from hint files
//!   and by replay, which tells a crash's torn tail from damage;
//! - [`hint`]: beside each sealed segment, its keys and where their values lie, so that a
//!   start reads those instead of every value;
//! - [`merge`]: copying the live values out of sealed segments and deleting them, in a
//!   background job of the engine's own;
//! - [`manifest`]: how a merge deletes segments without bringing a deleted key back.
//!
//! # Durability
//!
//! A write is one `pwrite` of its record under the writer's lock, and the index is updated
//! before that lock is let go, so the index follows the log's order. When `write` returns the
//! record is in the page cache: it survives SIGKILL, as fjall's journal does. [`Engine::sync`]
//! fsyncs the segments written since the last sync, and the directory when files were created
//! or removed; the node calls it every second. Open fsyncs every segment it replays.
//!
//! # Damage
//!
//! A crash tears at most the last record written; a record that does not hold anywhere else
//! is damage, and the engine refuses to open over it unless told to salvage
//! ([`Recovery`](crate::storage::Recovery); the rules are in [`index`]).
//!
//! # Limits
//!
//! One write is one record, whose payload must stay under 4 GiB (the node's requests are far
//! smaller). Each segment is an open file: 64 MiB segments and merges at half dead keep that
//! to a few hundred per node below about 10 GiB of live data.

mod hint;
mod index;
mod manifest;
mod merge;
mod record;
mod segment;

#[cfg(test)]
mod tests;

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use self::index::{Index, Loc, Segment};
use self::merge::{MergeSchedule, MergeWorker, Stop};
use self::segment::SegmentId;
use super::{
    Engine, KeyValue, Recovery, Salvaged, StorageError, Tree, WriteOp, check_key, check_ops,
    keys_between,
};

pub(super) use self::segment::SEGMENTS_DIR;

/// Sizes that decide when segments roll over and merges run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A segment is sealed, and a new one started, once it passes this size.
    pub segment_bytes: u64,
    /// No merge below this much on disk: small stores are not worth the copying.
    pub merge_min_bytes: u64,
    /// How often the merge job looks whether a merge is due. As often as the node syncs:
    /// the look is cheap, and a merge then starts within a second of being due.
    pub merge_check_every: Duration,
}

impl Default for Limits {
    /// 64 MiB segments; merges from 256 MiB plus a draw of up to 128 MiB. With N equal to the
    /// cluster's size every node writes the same bytes, so nodes started together would reach
    /// one threshold in the same second and all merge at once, leaving no replica free to take
    /// the puts. Drawn apart, one node merges at a time and the others carry the puts (fjall's
    /// memtable sizes are spread for the same reason, `fjall.rs`).
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Limits {
            segment_bytes: 64 * MIB,
            merge_min_bytes: 256 * MIB + crate::random::random_u64() % (128 * MIB),
            merge_check_every: Duration::from_secs(1),
        }
    }
}

/// The same name fjall locks, so the two engines cannot both hold one directory.
const LOCK_FILE: &str = "lock";

/// The active segment: the one writes are appended to.
struct Writer {
    id: SegmentId,
    file: Arc<File>,
    len: u64,
    /// A failed write left bytes past `len` that could not be cut: they must be before the
    /// next write, or a shorter record would leave some behind, which, once the segment is
    /// sealed, the next start would take for damage.
    unclean_end: bool,
}

/// What the next sync must make durable.
#[derive(Default)]
struct Unsynced {
    files: Vec<Arc<File>>,
    directory: bool,
}

/// The engine: the log, and the merge job that runs beside it for as long as the engine is
/// open. Dropping the engine stops the job (a merge under way stops at the end of its current
/// step) and waits for it, so the directory is free once the drop returns.
pub struct LogEngine {
    log: Arc<Log>,
    /// Held for its drop, which stops the job.
    _merge_job: MergeWorker,
}

impl std::fmt::Debug for LogEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogEngine")
            .field("dir", &self.log.dir)
            .finish_non_exhaustive()
    }
}

/// The log's state, shared by the engine's callers and its merge job.
///
/// # Locks, and the order they are taken in
///
/// A thread holding one of these locks takes another only if it comes later in this list;
/// never the other way round:
///
/// 1. `merging`: held by whoever merges, for the whole merge, so merges run one at a time;
///    it guards the merge schedule ([`MergeSchedule`]).
/// 2. `hinting`: held by the job while it writes the hint files of sealed segments, and by a
///    merge while it removes the segments it replaced, so that no hint file is written for a
///    segment being removed.
/// 3. `writer`: the active segment; held for one append, and for a rotation.
/// 4. `index`: read for a lookup, a scan or a merge step's choice of keys; written to publish
///    a write, a new segment or a merge step's copies. Writes publish under `writer`, so the
///    index follows the log's order.
/// 5. `unsynced`: the sealed segments the next sync must fsync; taken by a rotation (under
///    `writer`) and by a sync (alone).
///
/// The job's signal ([`merge::Stop`]: stop, or a segment was sealed) comes after all of
/// them: it is taken alone, under `writer` by a rotation, or under `merging` between two
/// merge steps. The order is what keeps a merge from
/// deadlocking with writes: every write holds `writer` while it waits for `index`, so
/// nothing may wait for `writer` while it holds `index`.
struct Log {
    dir: PathBuf,
    segments_dir: PathBuf,
    merging: Mutex<MergeSchedule>,
    hinting: Mutex<()>,
    writer: Mutex<Writer>,
    index: RwLock<Index>,
    unsynced: Mutex<Unsynced>,
    /// Held through a sync: one at a time, so that a sync returns only once everything
    /// written before it is on disk, segments a concurrent sync took from `unsynced` too.
    syncing: Mutex<()>,
    limits: Limits,
    /// Wakes the engine's job (a segment was sealed), or stops it.
    job: Arc<Stop>,
    /// What the open passed over as damaged.
    salvaged: Salvaged,
    /// Held by the process for as long as the log is open.
    _lock: File,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error of this engine's own (a damaged manifest, a write too large for a record).
fn log_error(message: String) -> StorageError {
    StorageError::Engine(message)
}

impl LogEngine {
    /// Opens (or creates) the engine in `dir`, rebuilding the index from the segments (their
    /// hint files where it can), and starts its job (hint files and merges). Refuses damaged
    /// records ([`Recovery::Refuse`]).
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(dir, Limits::default())
    }

    /// [`LogEngine::open`] with other sizes (tests use small ones).
    pub fn open_with(dir: &Path, limits: Limits) -> Result<Self, StorageError> {
        Self::open_recovering(dir, limits, Recovery::Refuse)
    }

    /// [`LogEngine::open_with`], saying what to do with damaged records.
    pub fn open_recovering(
        dir: &Path,
        limits: Limits,
        recovery: Recovery,
    ) -> Result<Self, StorageError> {
        let log = Arc::new(Log::open(dir, limits, recovery)?);
        let merge_job = MergeWorker::start(log.clone())?;
        Ok(LogEngine {
            log,
            _merge_job: merge_job,
        })
    }
}

impl Log {
    fn open(dir: &Path, limits: Limits, recovery: Recovery) -> Result<Self, StorageError> {
        let segments_dir = dir.join(SEGMENTS_DIR);
        fs::create_dir_all(&segments_dir)?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))?;
        if lock_file.try_lock().is_err() {
            return Err(StorageError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        manifest::finish(dir, &segments_dir)?;
        let ids = segment::list(&segments_dir)?;
        hint::remove_orphans(&segments_dir, &ids)?;
        let (mut index, salvaged) = Index::load(&segments_dir, &ids, recovery)?;
        let next = match ids.last() {
            Some(last) => last.next()?,
            None => SegmentId::FIRST,
        };
        let file = Arc::new(segment::create(&segments_dir, next)?);
        segment::sync_directory(&segments_dir)?;
        index.segments.insert(next, Segment::new(file.clone(), 0));
        Ok(Log {
            dir: dir.to_path_buf(),
            segments_dir,
            merging: Mutex::new(MergeSchedule::default()),
            hinting: Mutex::new(()),
            writer: Mutex::new(Writer {
                id: next,
                file,
                len: 0,
                unclean_end: false,
            }),
            index: RwLock::new(index),
            unsynced: Mutex::new(Unsynced::default()),
            syncing: Mutex::new(()),
            limits,
            job: Arc::new(Stop::default()),
            salvaged,
            _lock: lock_file,
        })
    }

    fn read_index(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a new active segment; the caller holds the writer. The old one stays readable
    /// and is fsynced by the next sync.
    fn rotate(&self, writer: &mut Writer, next: SegmentId) -> Result<(), StorageError> {
        let file = Arc::new(segment::create(&self.segments_dir, next)?);
        self.write_index()
            .segments
            .insert(next, Segment::new(file.clone(), 0));
        let old = std::mem::replace(&mut writer.file, file);
        writer.id = next;
        writer.len = 0;
        let mut unsynced = lock(&self.unsynced);
        unsynced.files.push(old);
        unsynced.directory = true;
        drop(unsynced);
        self.job.sealed();
        Ok(())
    }

    /// Fsyncs the segments written since the last time, and the directory if files came or
    /// went. What fails to sync is kept for the next try.
    fn sync_files(&self) -> Result<(), StorageError> {
        let _one_at_a_time = lock(&self.syncing);
        let active = lock(&self.writer).file.clone();
        let pending = std::mem::take(&mut *lock(&self.unsynced));
        let synced = pending
            .files
            .iter()
            .chain(std::iter::once(&active))
            .try_for_each(|file| file.sync_data())
            .map_err(StorageError::from)
            .and_then(|()| {
                if pending.directory {
                    segment::sync_directory(&self.segments_dir)
                } else {
                    Ok(())
                }
            });
        if synced.is_err() {
            let mut unsynced = lock(&self.unsynced);
            unsynced.files.extend(pending.files);
            unsynced.directory |= pending.directory;
        }
        synced
    }
}

impl Engine for LogEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.log.get(tree, key)
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        self.log.write(ops)
    }

    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        self.log.scan(tree, after, None, limit)
    }

    fn scan_range(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        self.log.scan(tree, after, before, limit)
    }

    /// Fsyncs what was written since the last sync. Merges are the merge job's: a sync never
    /// waits for one.
    fn sync(&self) -> Result<(), StorageError> {
        self.log.sync_files()
    }

    fn name(&self) -> &'static str {
        "log"
    }

    fn salvaged(&self) -> Salvaged {
        self.log.salvaged
    }
}

impl Log {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_key(key)?;
        let found = {
            let index = self.read_index();
            match index.trees[record::tree_slot(tree)].get(key) {
                Some(loc) => Some((*loc, index.file_of(*loc)?)),
                None => None,
            }
        };
        match found {
            Some((loc, file)) => Ok(Some(loc.read(&file)?)),
            None => Ok(None),
        }
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        check_ops(&ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        let record = record::encode(&ops)?;
        let len = record.bytes.len() as u64;
        let mut writer = lock(&self.writer);
        if writer.unclean_end {
            writer.file.set_len(writer.len)?;
            writer.unclean_end = false;
        }
        if writer.len > 0 && writer.len + len > self.limits.segment_bytes {
            let next = writer.id.next()?;
            self.rotate(&mut writer, next)?;
        }
        let offset = writer.len;
        if let Err(error) = writer.file.write_all_at(&record.bytes, offset) {
            // A partial record past the end is cut off, so the next one follows the last
            // whole record and replay reaches it.
            if let Err(truncate) = writer.file.set_len(offset) {
                // Cut before the next write goes in, or that write fails too.
                writer.unclean_end = true;
                tracing::warn!(%truncate, "cannot cut a partial record");
            }
            return Err(error.into());
        }
        writer.len += len;
        let segment = writer.id;
        let mut index = self.write_index();
        if let Some(entry) = index.segments.get_mut(&segment) {
            entry.len = writer.len;
        }
        for (op, value_offset) in ops.into_iter().zip(&record.values) {
            let loc = op.value.as_ref().map(|value| Loc {
                segment,
                offset: offset + value_offset,
                len: value.len() as u32,
            });
            index.set(op.tree, op.key, loc);
        }
        Ok(())
    }

    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let Some(bounds) = keys_between(after, before) else {
            return Ok(Vec::new());
        };
        let found: Vec<(Vec<u8>, Loc, Arc<File>)> = {
            let index = self.read_index();
            index.trees[record::tree_slot(tree)]
                .range::<[u8], _>(bounds)
                .take(limit)
                .map(|(key, loc)| Ok((key.clone(), *loc, index.file_of(*loc)?)))
                .collect::<Result<_, StorageError>>()?
        };
        found
            .into_iter()
            .map(|(key, loc, file)| Ok((key, loc.read(&file)?)))
            .collect()
    }
}
