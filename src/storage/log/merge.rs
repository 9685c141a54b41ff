//! Merge: how the log gives back the space that overwritten and removed values take.
//!
//! Every write appends, so the segments hold every version ever written until something
//! copies the live ones elsewhere and deletes the rest. A merge runs once the segments hold
//! more than [`Limits::merge_min_bytes`] and at least half of it is dead: copying then costs
//! at most as much as it frees, and small stores are not worth it.
//!
//! A merge seals the active segment, copies every live value found in the sealed ones into
//! new segments numbered just after them (so they replay before any later write), and points
//! the index at the copies where it still points at the originals; a key written meanwhile
//! keeps its newer location. It copies a step of keys at a time and lets go of the index
//! between steps, since each turn of the index lock holds up this node's reads and writes.
//! Then it fsyncs the copies, records the originals as superseded in the manifest
//! ([`super::manifest`]) and deletes them. Readers holding a file handle keep reading a
//! deleted segment until they let go.
//!
//! A merge does not start without free space for its copies, and a failed one removes the
//! copies nothing points at and waits [`MERGE_RETRY_AFTER`] before the next try (a full disk
//! does not clear in a second).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::index::{Loc, Segment};
use super::record::{self, tree_slot};
use super::segment::{self, SegmentId};
use super::{LogEngine, lock, manifest};
use crate::storage::{StorageError, Tree, WriteOp, keys_after};

/// Index entries copied per step of a merge, between two turns of the index lock (each turn
/// holds up this node's writes and reads, so it is kept short); a step also ends once it
/// holds [`MERGE_STEP_BYTES`], so large values do not pile up in memory.
const MERGE_STEP: usize = 512;
const MERGE_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// After a failed merge, the next try waits this long.
const MERGE_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);
/// A merge needs room for what it copies: it does not start with less free space than the
/// live bytes plus this margin.
const MERGE_FREE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;

impl LogEngine {
    /// Is a merge worth it (see [`LogEngine::needs_merge`]), not too soon after a failed one,
    /// and is there room for its copies?
    pub(super) fn merge_due(&self) -> bool {
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

    /// Over [`Limits::merge_min_bytes`](super::Limits) on disk, and at least half of it dead.
    pub(super) fn needs_merge(&self) -> bool {
        let index = self.read_index();
        let total = index.total_bytes();
        total > self.limits.merge_min_bytes && index.live_bytes.saturating_mul(2) < total
    }

    /// Copies the live values of every sealed segment into new ones and deletes the old (see
    /// the module documentation).
    pub(super) fn merge(&self) -> Result<(), StorageError> {
        // What an earlier merge failed to delete goes first: its manifest is about to be
        // replaced.
        manifest::finish(&self.dir, &self.segments_dir)?;
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
                    && segment::remove_if_present(&self.segments_dir.join(id.file_name())).is_err()
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
        segment::sync_directory(&self.segments_dir)?;
        manifest::write(&self.dir, &sealed)?;
        {
            let mut index = self.write_index();
            for id in &sealed {
                index.segments.remove(id);
            }
        }
        for id in &sealed {
            segment::remove_if_present(&self.segments_dir.join(id.file_name()))?;
        }
        segment::sync_directory(&self.segments_dir)?;
        manifest::clear(&self.dir)?;
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
                    ops.push(WriteOp::put(tree, key.clone(), loc.read(file)?));
                }
                let record = record::encode(&ops)?;
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

/// One step of a merge: the live entries to copy, and where the next step starts.
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
        use std::os::unix::fs::FileExt;
        let full = self.len > 0 && self.len + record.len() as u64 > self.segment_bytes;
        let file = match &self.file {
            Some(file) if !full => file.clone(),
            _ => {
                self.last = self.last.next_sub()?;
                let file = Arc::new(segment::create(dir, self.last)?);
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

/// Bytes an unprivileged process may still write on `dir`'s file system.
fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    let stats = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
