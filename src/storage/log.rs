//! A log-structured engine: every write is appended to a segment file, and an in-memory
//! ordered index maps each key to where its value lies (Bitcask's design, Riak's default
//! backend, with a B-tree index instead of a hash so that scans come in key order).
//!
//! Why it exists: under the put benchmark through the balancer, fjall's memtable costs a skip
//! list insert among every recent version of every key (10% of the whole machine's CPU in a
//! system-wide profile), and each memtable flush walks all of those versions at once, a burst
//! that slows every request in flight. Here an overwrite replaces one index entry in place,
//! and nothing ever walks the versions; the background work is a merge that copies only live
//! values, when at least half of what is on disk is dead (README, *The put tail*).
//!
//! - **Records.** One [`Engine::write`] is one record: `[payload length u32][xxh3 of the
//!   payload u64][payload]`, the payload being the op count and each op (tree, kind, key,
//!   value). It is written with one `pwrite` under the writer's lock, and the index is updated
//!   under the same lock, so the index follows the log's order. When `write` returns, the
//!   record is in the page cache: it survives SIGKILL, as fjall's journal does.
//! - **Atomicity.** Replay reads each segment's records in order; at the first one whose length
//!   or checksum does not hold (a write torn by a crash) it cuts the segment, logs an error
//!   and goes on with the next segment, so a write is replayed whole or not at all. (A
//!   damaged record in the middle of an old segment is cut the same way, with what follows
//!   it in that segment: fjall would refuse to start instead.) Readers see the index change
//!   under one lock: all of a write or none of it.
//! - **Sync.** [`Engine::sync`] fsyncs the segments written since the last sync, and the
//!   directory when files were created or removed; the node calls it every second. Open
//!   fsyncs every segment it replays (writes acknowledged before a crash may still have been
//!   only in the page cache).
//! - **Segments** are named `<id>-<sub>.seg` and replayed in (id, sub) order. A new one is
//!   started at open and whenever the active one passes 64 MiB ([`Limits`]).
//! - **Merge.** Run by `sync`, which waits for it (and keeps fsyncing new writes every
//!   second meanwhile), once the segments hold more than 256-384 MiB ([`Limits`]) and at
//!   least half of it is dead. It seals the active segment, copies every live value found in
//!   the sealed ones into new segments numbered just after them (so they replay before any
//!   later write), and points the index at the copies where it still points at the originals.
//!   Then it fsyncs the copies, records the originals as superseded in a small manifest
//!   (written to a temporary name, fsynced, renamed), and deletes them. A crash before the
//!   manifest leaves both, which replay to the same state: the copies hold the latest values
//!   of their keys as of the copy, and anything later is in a later segment. A crash after it
//!   is finished at the next open, which deletes what the manifest lists before replaying, so
//!   no delete is ever undone by an older put left on disk; so does the next merge, if the
//!   deletion failed. Readers holding a file handle keep reading a deleted segment until they
//!   let go. A merge does not start without free space for its copies, and a failed one
//!   removes the copies nothing points at and waits a minute before the next try.
//! - **Limits.** One write is one record, whose payload must stay under 4 GiB (the node's
//!   requests are far smaller). Each segment is an open file: 64 MiB segments and merges at
//!   half dead keep that to a few hundred per node below about 10 GiB of live data.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{
    Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
};
use std::time::{Duration, Instant};

use super::{Engine, KeyValue, StorageError, Tree, WriteOp, check_key, check_ops, keys_after};

/// Sizes that decide when segments roll over and merges run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A segment is sealed, and a new one started, once it passes this size.
    pub segment_bytes: u64,
    /// No merge below this much on disk: small stores are not worth the copying.
    pub merge_min_bytes: u64,
    /// How often a running merge fsyncs what was written meanwhile: the node's sync interval.
    pub sync_every: Duration,
}

impl Default for Limits {
    /// 64 MiB segments; merges from 256 MiB plus a draw of up to 128 MiB. With N equal to
    /// the cluster's size every node writes the same bytes, so nodes started together reached
    /// one threshold in the same second and all merged at once: 4323 puts slower than 5 ms in
    /// that second of a 65 s run through the balancer, against 50-1000 in the others. Drawn
    /// apart, one node merges at a time and the others carry the puts (fjall's memtable sizes
    /// are spread for the same reason, `fjall.rs`).
    fn default() -> Self {
        const MIB: u64 = 1024 * 1024;
        Limits {
            segment_bytes: 64 * MIB,
            merge_min_bytes: 256 * MIB + crate::random::random_u64() % (128 * MIB),
            sync_every: Duration::from_secs(1),
        }
    }
}
/// Index entries copied per step of a merge, between two turns of the index lock (each turn
/// holds up this node's writes and reads, so it is kept short); a step
/// also ends once it holds [`MERGE_STEP_BYTES`], so large values do not pile up in memory.
const MERGE_STEP: usize = 512;
const MERGE_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// After a failed merge, the next try waits this long (a full disk does not clear in a second).
const MERGE_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A merge needs room for what it copies: it does not start with less free space than the
/// live bytes plus this margin.
const MERGE_FREE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes each op adds to a record besides its key and value (tree, kind, two lengths).
const OP_OVERHEAD_BYTES: u64 = 10;
/// Largest manifest read at open: far more names than any merge writes.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;
/// Record header: payload length (u32) and checksum (u64).
const HEADER_BYTES: usize = 12;
/// The directory of segments inside the data directory; only this engine makes one.
pub(super) const SEGMENTS_DIR: &str = "segments";
/// The same name fjall locks, so the two engines cannot both hold one directory.
const LOCK_FILE: &str = "lock";
const SUPERSEDED_FILE: &str = "superseded";

/// A segment's place in replay order: segments written by a merge get the id of the last
/// segment they replace and a higher `sub`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct SegmentId {
    id: u64,
    sub: u32,
}

impl SegmentId {
    fn file_name(self) -> String {
        format!("{:020}-{:05}.seg", self.id, self.sub)
    }

    /// The id of a segment file's name; `None` for any other name, including spellings of a
    /// segment's name other than the one [`SegmentId::file_name`] writes.
    fn parse(name: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(".seg")?;
        let (id, sub) = stem.split_once('-')?;
        let id = SegmentId {
            id: id.parse().ok()?,
            sub: sub.parse().ok()?,
        };
        (id.file_name() == name).then_some(id)
    }

    /// The id of the active segment that follows this one.
    fn next(self) -> Result<SegmentId, StorageError> {
        let id = self
            .id
            .checked_add(1)
            .ok_or_else(|| log_error("segment ids are exhausted".into()))?;
        Ok(SegmentId { id, sub: 0 })
    }
}

/// Where a key's value lies: each write gets a location of its own, so comparing locations
/// tells whether a key changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    segment: SegmentId,
    offset: u64,
    len: u32,
}

/// A tree's byte in a record and its index slot; `Tree::ALL[tree_slot(tree)] == tree`, which
/// replay relies on to read the byte back.
fn tree_slot(tree: Tree) -> usize {
    match tree {
        Tree::Data => 0,
        Tree::Hints => 1,
        Tree::Meta => 2,
    }
}

#[derive(Default)]
struct Index {
    trees: [BTreeMap<Vec<u8>, Loc>; 3],
    segments: BTreeMap<SegmentId, Segment>,
    /// Bytes of the records a merge would write for what the index points at.
    live_bytes: u64,
}

#[derive(Clone)]
struct Segment {
    file: Arc<File>,
    len: u64,
}

impl Index {
    /// The file holding `loc`'s segment: every location the index holds has one.
    fn file_of(&self, loc: Loc) -> Result<Arc<File>, StorageError> {
        self.segments
            .get(&loc.segment)
            .map(|segment| segment.file.clone())
            .ok_or_else(|| log_error(format!("no segment {}", loc.segment.file_name())))
    }

    fn total_bytes(&self) -> u64 {
        self.segments.values().map(|segment| segment.len).sum()
    }

    fn set(&mut self, tree: Tree, key: Vec<u8>, loc: Option<Loc>) {
        let map = &mut self.trees[tree_slot(tree)];
        let entry_bytes = key.len() as u64 + OP_OVERHEAD_BYTES;
        let old = match loc {
            Some(loc) => {
                self.live_bytes += entry_bytes + u64::from(loc.len);
                map.insert(key, loc)
            }
            None => map.remove(&key),
        };
        if let Some(old) = old {
            self.live_bytes = self
                .live_bytes
                .saturating_sub(entry_bytes + u64::from(old.len));
        }
    }
}

struct Writer {
    id: SegmentId,
    file: Arc<File>,
    len: u64,
}

/// What the next sync must make durable.
#[derive(Default)]
struct Unsynced {
    files: Vec<Arc<File>>,
    directory: bool,
}

pub struct LogEngine {
    dir: PathBuf,
    segments_dir: PathBuf,
    index: RwLock<Index>,
    writer: Mutex<Writer>,
    unsynced: Mutex<Unsynced>,
    /// Held while a merge runs: one at a time.
    merging: Mutex<()>,
    /// When the last merge failed, if it did.
    merge_failed_at: Mutex<Option<Instant>>,
    limits: Limits,
    /// Held by the process for as long as the engine is open.
    _lock: File,
}

impl std::fmt::Debug for LogEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogEngine").field("dir", &self.dir).finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An error of this engine's own (a damaged manifest, a write too large for a record).
fn log_error(message: String) -> StorageError {
    StorageError::Engine(message)
}

impl LogEngine {
    /// Opens (or creates) the engine in `dir`, replaying every segment into the index.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        Self::open_with(dir, Limits::default())
    }

    /// [`LogEngine::open`] with other sizes (tests use small ones).
    pub fn open_with(dir: &Path, limits: Limits) -> Result<Self, StorageError> {
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
        finish_merge(dir, &segments_dir)?;
        let mut index = Index::default();
        let mut ids = Vec::new();
        for entry in fs::read_dir(&segments_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            match name.to_str().and_then(SegmentId::parse) {
                Some(id) => ids.push(id),
                None => tracing::warn!(file = ?name, "not a segment name; the file is ignored"),
            }
        }
        ids.sort_unstable();
        for &id in &ids {
            let path = segments_dir.join(id.file_name());
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let len = replay(&file, id, &mut index)?;
            let found = file.metadata()?.len();
            if len < found {
                tracing::error!(
                    segment = %path.display(),
                    kept = len,
                    cut = found - len,
                    "a record that does not hold (torn by a crash, or damaged) was cut off with \
                     everything after it in this segment"
                );
                file.set_len(len)?;
            }
            // Writes acknowledged before a crash may still be only in the page cache.
            file.sync_all()?;
            index.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    len,
                },
            );
        }
        let next = match ids.last() {
            Some(last) => last.next()?,
            None => SegmentId { id: 1, sub: 0 },
        };
        let file = Arc::new(create_segment(&segments_dir, next)?);
        sync_directory(&segments_dir)?;
        index.segments.insert(
            next,
            Segment {
                file: file.clone(),
                len: 0,
            },
        );
        Ok(LogEngine {
            dir: dir.to_path_buf(),
            segments_dir,
            index: RwLock::new(index),
            writer: Mutex::new(Writer {
                id: next,
                file,
                len: 0,
            }),
            unsynced: Mutex::new(Unsynced::default()),
            merging: Mutex::new(()),
            merge_failed_at: Mutex::new(None),
            limits,
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
        let file = Arc::new(create_segment(&self.segments_dir, next)?);
        self.write_index().segments.insert(
            next,
            Segment {
                file: file.clone(),
                len: 0,
            },
        );
        let old = std::mem::replace(&mut writer.file, file);
        writer.id = next;
        writer.len = 0;
        let mut unsynced = lock(&self.unsynced);
        unsynced.files.push(old);
        unsynced.directory = true;
        Ok(())
    }

    /// Fsyncs the segments written since the last time, and the directory if files came or
    /// went. What fails to sync is kept for the next try.
    fn sync_files(&self) -> Result<(), StorageError> {
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
                    sync_directory(&self.segments_dir)
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

    /// Is a merge worth it (see [`LogEngine::needs_merge`]), not too soon after a failed one,
    /// and is there room for its copies?
    fn merge_due(&self) -> bool {
        if !self.needs_merge() {
            return false;
        }
        if let Some(failed) = *lock(&self.merge_failed_at)
            && failed.elapsed() < MERGE_RETRY_AFTER
        {
            return false;
        }
        let live = self.read_index().live_bytes;
        match free_bytes(&self.segments_dir) {
            Ok(free) if free >= live.saturating_add(MERGE_FREE_MARGIN_BYTES) => true,
            Ok(free) => {
                tracing::warn!(free, live, "too little free space to merge the log");
                *lock(&self.merge_failed_at) = Some(Instant::now());
                false
            }
            Err(error) => {
                tracing::warn!(%error, "cannot tell the free space; the log is not merged");
                false
            }
        }
    }

    /// Over [`Limits::merge_min_bytes`] on disk, and at least half of it dead.
    fn needs_merge(&self) -> bool {
        let index = self.read_index();
        let total = index.total_bytes();
        total > self.limits.merge_min_bytes && index.live_bytes.saturating_mul(2) < total
    }

    /// Copies the live values of every sealed segment into new ones and deletes the old (see
    /// the module documentation).
    fn merge(&self) -> Result<(), StorageError> {
        // What an earlier merge failed to delete goes first: its manifest is about to be
        // replaced.
        finish_merge(&self.dir, &self.segments_dir)?;
        // Seal the active segment, so that everything written so far is merged.
        let sealed: Vec<SegmentId> = {
            let mut writer = lock(&self.writer);
            let next = writer.id.next()?;
            self.rotate(&mut writer, next)?;
            let index = self.read_index();
            index
                .segments
                .keys()
                .copied()
                .filter(|id| *id < next)
                .collect()
        };
        let Some(&last) = sealed.last() else {
            return Ok(());
        };
        let mut output = MergeOutput::new(last, self.limits.segment_bytes);
        let copied = self.copy_live(&sealed, &mut output);
        if let Err(error) = copied {
            // Copies nothing points at yet are removed; the others are live segments now. One
            // that cannot be removed is kept as an empty segment, so that the next merge
            // replaces it (and lists it in its manifest) rather than leaving it to be replayed.
            let mut index = self.write_index();
            for (id, file) in output.ids.iter().zip(&output.files) {
                if !index.segments.contains_key(id)
                    && remove_if_present(&self.segments_dir.join(id.file_name())).is_err()
                {
                    let file = file.clone();
                    index.segments.insert(*id, Segment { file, len: 0 });
                }
            }
            return Err(error);
        }
        for file in &output.files {
            file.sync_all()?;
        }
        sync_directory(&self.segments_dir)?;
        write_superseded(&self.dir, &sealed)?;
        {
            let mut index = self.write_index();
            for id in &sealed {
                index.segments.remove(id);
            }
        }
        for id in &sealed {
            remove_if_present(&self.segments_dir.join(id.file_name()))?;
        }
        sync_directory(&self.segments_dir)?;
        remove_if_present(&self.dir.join(SUPERSEDED_FILE))?;
        sync_directory(&self.dir)?;
        tracing::info!(
            segments = sealed.len(),
            copies = output.files.len(),
            "merged the log's sealed segments"
        );
        Ok(())
    }

    /// Copies the live values of the `sealed` segments into `output`, pointing the index at
    /// each copy where it still points at the original. Keeps the one-second sync going
    /// meanwhile, since the sync that runs a merge waits for it.
    fn copy_live(
        &self,
        sealed: &[SegmentId],
        output: &mut MergeOutput,
    ) -> Result<(), StorageError> {
        let mut synced_at = Instant::now();
        for tree in Tree::ALL {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let step = self.live_in(tree, after.as_deref(), sealed);
                let Some(step) = step else { break };
                after = step.next_after;
                if step.entries.is_empty() {
                    continue;
                }
                let mut ops = Vec::with_capacity(step.entries.len());
                for (key, loc, file) in &step.entries {
                    ops.push(WriteOp::put(tree, key.clone(), read_value(file, *loc)?));
                }
                let record = encode(&ops)?;
                let (segment, file, base) = output.append(&self.segments_dir, &record.bytes)?;
                let mut index = self.write_index();
                index.segments.insert(
                    segment,
                    Segment {
                        file,
                        len: output.len,
                    },
                );
                for ((key, old, _), value_offset) in step.entries.into_iter().zip(&record.values) {
                    let slot = tree_slot(tree);
                    if index.trees[slot].get(&key) == Some(&old) {
                        let new = Loc {
                            segment,
                            offset: base + value_offset,
                            len: old.len,
                        };
                        index.trees[slot].insert(key, new);
                    }
                }
                // Writers take the writer's lock and then the index's; `sync_files` takes
                // the writer's, so the index must be let go first.
                drop(index);
                if synced_at.elapsed() >= self.limits.sync_every {
                    self.sync_files()?;
                    synced_at = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// The next keys of `tree` after `after` (up to [`MERGE_STEP`] of them, or fewer once
    /// [`MERGE_STEP_BYTES`] are to be copied), with those whose value lies in a `sealed`
    /// segment; `None` once the tree is done.
    fn live_in(&self, tree: Tree, after: Option<&[u8]>, sealed: &[SegmentId]) -> Option<MergeStep> {
        let index = self.read_index();
        let mut next_after = None;
        let mut entries = Vec::new();
        let mut bytes = 0u64;
        for (key, loc) in index.trees[tree_slot(tree)]
            .range::<[u8], _>(keys_after(after))
            .take(MERGE_STEP)
        {
            next_after = Some(key.clone());
            if sealed.binary_search(&loc.segment).is_ok()
                && let Some(segment) = index.segments.get(&loc.segment)
            {
                entries.push((key.clone(), *loc, segment.file.clone()));
                bytes += key.len() as u64 + u64::from(loc.len);
                if bytes >= MERGE_STEP_BYTES {
                    break;
                }
            }
        }
        next_after.as_ref()?;
        Some(MergeStep {
            entries,
            next_after,
        })
    }
}

struct MergeStep {
    entries: Vec<(Vec<u8>, Loc, Arc<File>)>,
    next_after: Option<Vec<u8>>,
}

/// The segments a merge writes: `(last.id, last.sub + 1)`, `(last.id, last.sub + 2)`, …,
/// each created when the first record goes into it.
struct MergeOutput {
    segment_bytes: u64,
    last: SegmentId,
    file: Option<Arc<File>>,
    len: u64,
    ids: Vec<SegmentId>,
    files: Vec<Arc<File>>,
}

impl MergeOutput {
    fn new(last: SegmentId, segment_bytes: u64) -> Self {
        MergeOutput {
            segment_bytes,
            last,
            file: None,
            len: 0,
            ids: Vec::new(),
            files: Vec::new(),
        }
    }

    /// Appends a record; the segment it went to, its file, and the record's offset there.
    fn append(
        &mut self,
        dir: &Path,
        record: &[u8],
    ) -> Result<(SegmentId, Arc<File>, u64), StorageError> {
        let full = self.len > 0 && self.len + record.len() as u64 > self.segment_bytes;
        let file = match &self.file {
            Some(file) if !full => file.clone(),
            _ => {
                let sub = self
                    .last
                    .sub
                    .checked_add(1)
                    .ok_or_else(|| log_error("segment ids are exhausted".into()))?;
                self.last = SegmentId { sub, ..self.last };
                let file = Arc::new(create_segment(dir, self.last)?);
                self.ids.push(self.last);
                self.files.push(file.clone());
                self.file = Some(file.clone());
                self.len = 0;
                file
            }
        };
        let offset = self.len;
        file.write_all_at(record, offset)?;
        self.len += record.len() as u64;
        Ok((self.last, file, offset))
    }
}

impl Engine for LogEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_key(key)?;
        let found = {
            let index = self.read_index();
            match index.trees[tree_slot(tree)].get(key) {
                Some(loc) => Some((*loc, index.file_of(*loc)?)),
                None => None,
            }
        };
        match found {
            Some((loc, file)) => Ok(Some(read_value(&file, loc)?)),
            None => Ok(None),
        }
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        check_ops(&ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        let record = encode(&ops)?;
        let len = record.bytes.len() as u64;
        let mut writer = lock(&self.writer);
        if writer.len > 0 && writer.len + len > self.limits.segment_bytes {
            let next = writer.id.next()?;
            self.rotate(&mut writer, next)?;
        }
        let offset = writer.len;
        if let Err(error) = writer.file.write_all_at(&record.bytes, offset) {
            // A partial record past the end is cut off, so the next one follows the last
            // whole record and replay reaches it.
            if let Err(truncate) = writer.file.set_len(offset) {
                // The next record is written at `offset` anyway; what is left past it is cut
                // at the next open as a torn tail.
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
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let found: Vec<(Vec<u8>, Loc, Arc<File>)> = {
            let index = self.read_index();
            index.trees[tree_slot(tree)]
                .range::<[u8], _>(keys_after(after))
                .take(limit)
                .map(|(key, loc)| Ok((key.clone(), *loc, index.file_of(*loc)?)))
                .collect::<Result<_, StorageError>>()?
        };
        found
            .into_iter()
            .map(|(key, loc, file)| Ok((key, read_value(&file, loc)?)))
            .collect()
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.sync_files()?;
        let _merging = match self.merging.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        if self.merge_due()
            && let Err(error) = self.merge()
        {
            // The sync itself succeeded; the merge is tried again later.
            *lock(&self.merge_failed_at) = Some(Instant::now());
            tracing::error!(%error, "a merge of the log failed; it is tried again in a minute");
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "log"
    }
}

/// An encoded write, with where each op's value starts within it.
struct Record {
    bytes: Vec<u8>,
    values: Vec<u64>,
}

fn encode(ops: &[WriteOp]) -> Result<Record, StorageError> {
    let payload_len: usize = 4 + ops
        .iter()
        .map(|op| OP_OVERHEAD_BYTES as usize + op.key.len() + op.value.as_ref().map_or(0, Vec::len))
        .sum::<usize>();
    let too_large = || {
        log_error(format!(
            "a write of {payload_len} bytes is too large for one record"
        ))
    };
    let length = u32::try_from(payload_len).map_err(|_| too_large())?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload_len);
    bytes.extend_from_slice(&length.to_le_bytes());
    bytes.extend_from_slice(&[0; 8]);
    let count = u32::try_from(ops.len()).map_err(|_| too_large())?;
    bytes.extend_from_slice(&count.to_le_bytes());
    let mut values = Vec::with_capacity(ops.len());
    for op in ops {
        bytes.push(tree_slot(op.tree) as u8);
        bytes.push(u8::from(op.value.is_some()));
        let key_len = u32::try_from(op.key.len()).map_err(|_| too_large())?;
        bytes.extend_from_slice(&key_len.to_le_bytes());
        bytes.extend_from_slice(&op.key);
        let value = op.value.as_deref().unwrap_or_default();
        let value_len = u32::try_from(value.len()).map_err(|_| too_large())?;
        bytes.extend_from_slice(&value_len.to_le_bytes());
        values.push(bytes.len() as u64);
        bytes.extend_from_slice(value);
    }
    let checksum = xxhash_rust::xxh3::xxh3_64(&bytes[HEADER_BYTES..]);
    bytes[4..HEADER_BYTES].copy_from_slice(&checksum.to_le_bytes());
    Ok(Record { bytes, values })
}

/// Applies a segment's whole records to `index`, in order; the length of the good part (the
/// first record that does not hold ends it).
fn replay(file: &File, id: SegmentId, index: &mut Index) -> Result<u64, StorageError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    let mut header = [0u8; HEADER_BYTES];
    let mut payload = Vec::new();
    loop {
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(offset),
            Err(error) => return Err(error.into()),
        }
        let mut length = [0u8; 4];
        length.copy_from_slice(&header[..4]);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&header[4..]);
        let length = u32::from_le_bytes(length) as usize;
        payload.clear();
        if (&mut reader)
            .take(length as u64)
            .read_to_end(&mut payload)?
            != length
            || xxhash_rust::xxh3::xxh3_64(&payload) != u64::from_le_bytes(checksum)
        {
            return Ok(offset);
        }
        let base = offset + HEADER_BYTES as u64;
        let Some(ops) = decode(&payload) else {
            return Ok(offset);
        };
        for (tree, key, value) in ops {
            let loc = value.map(|(at, len)| Loc {
                segment: id,
                offset: base + at as u64,
                len,
            });
            index.set(tree, key.to_vec(), loc);
        }
        offset = base + length as u64;
    }
}

type DecodedOp<'a> = (Tree, &'a [u8], Option<(usize, u32)>);

/// The ops of a payload whose checksum held: tree, key, and where the value lies (offset in
/// the payload, length) for a put. `None` if it does not parse.
fn decode(payload: &[u8]) -> Option<Vec<DecodedOp<'_>>> {
    fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
        let bytes: [u8; 4] = payload.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    }
    let count = u32_at(payload, 0)? as usize;
    let mut at = 4;
    let mut ops = Vec::with_capacity(count.min(payload.len() / 10));
    for _ in 0..count {
        let tree = *Tree::ALL.get(*payload.get(at)? as usize)?;
        let is_put = match payload.get(at + 1)? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let key_len = u32_at(payload, at + 2)? as usize;
        let key_start = at + 6;
        let key = payload.get(key_start..key_start.checked_add(key_len)?)?;
        let value_len = u32_at(payload, key_start + key_len)?;
        let value_start = key_start + key_len + 4;
        let value_end = value_start.checked_add(value_len as usize)?;
        if value_end > payload.len() {
            return None;
        }
        ops.push((tree, key, is_put.then_some((value_start, value_len))));
        at = value_end;
    }
    (at == payload.len()).then_some(ops)
}

fn read_value(file: &File, loc: Loc) -> Result<Vec<u8>, StorageError> {
    let mut value = vec![0; loc.len as usize];
    file.read_exact_at(&mut value, loc.offset)?;
    Ok(value)
}

fn create_segment(dir: &Path, id: SegmentId) -> Result<File, StorageError> {
    Ok(OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(dir.join(id.file_name()))?)
}

/// Bytes an unprivileged process may still write on `dir`'s file system.
fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    let stats = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

fn sync_directory(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}

/// Records the segments a merge replaced, durably, before any of them is deleted.
fn write_superseded(dir: &Path, sealed: &[SegmentId]) -> Result<(), StorageError> {
    let text: String = sealed.iter().map(|id| id.file_name() + "\n").collect();
    let temporary = dir.join(format!("{SUPERSEDED_FILE}.tmp"));
    fs::write(&temporary, text)?;
    File::open(&temporary)?.sync_all()?;
    fs::rename(&temporary, dir.join(SUPERSEDED_FILE))?;
    sync_directory(dir)
}

/// Deletes what an interrupted merge had already replaced (see the module documentation).
fn finish_merge(dir: &Path, segments_dir: &Path) -> Result<(), StorageError> {
    remove_if_present(&dir.join(format!("{SUPERSEDED_FILE}.tmp")))?;
    let manifest = dir.join(SUPERSEDED_FILE);
    let file = match File::open(&manifest) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error.into()),
    };
    let mut text = String::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(log_error(format!("{} is too large", manifest.display())));
    }
    for name in text.lines() {
        if SegmentId::parse(name).is_none() {
            return Err(log_error(format!(
                "{} names {name:?}, which is not a segment",
                manifest.display()
            )));
        }
        remove_if_present(&segments_dir.join(name))?;
    }
    sync_directory(segments_dir)?;
    remove_if_present(&manifest)?;
    sync_directory(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::tests::{Fixture, TempDir, engine_suite};

    engine_suite!(Fixture::log());

    #[test]
    fn a_tree_reads_back_from_its_byte() {
        for tree in Tree::ALL {
            assert_eq!(Tree::ALL[tree_slot(tree)], tree);
        }
    }

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
                    let (key, value) =
                        (format!("k{key:02}"), format!("{round}-{}", "v".repeat(40)));
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
}
