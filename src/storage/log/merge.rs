//! Merge: how the log gives back the space that overwritten and removed values take.
//!
//! Every write appends, so the segments hold every version ever written until something
//! copies the live ones elsewhere and deletes the rest. A merge runs once the segments hold
//! more than [`Limits::merge_min_bytes`](super::Limits) and at least half of it is dead:
//! copying then costs at most as much as it frees, and small stores are not worth it.
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
//!
//! A merge writes the hint file of each segment it writes ([`super::hint`]), from the records
//! it encoded, once they are fsynced.
//!
//! # The engine's job
//!
//! Merges run in a job of their own, [`MergeWorker`]: a thread the engine starts at open,
//! which looks every [`Limits::merge_check_every`](super::Limits) whether a merge is due and
//! runs it. A merge takes seconds on a large store; on its own thread it holds up neither the
//! node's periodic sync (which keeps bounding what a power loss can take) nor anything else.
//! The same thread writes the hint files of sealed segments: a rotation wakes it, and it
//! replays each sealed segment that has none (checking every record), fsyncs it and writes
//! its hint file; it holds `hinting` for that, which a merge takes to remove the segments it
//! replaced, so that no hint file is written for a segment being removed.
//! Dropping the engine stops the job: a merge under way stops at the end of its current step,
//! leaving the sealed segments and the copies made so far, a state replay handles as it
//! handles a crash before the manifest.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::hint::{self, HintBuilder, Seal};
use super::index::{Loc, Segment};
use super::record::{self, Mark, Record, ValueAt, tree_slot};
use super::segment::{self, SegmentId};
use super::{Log, lock, manifest};
use crate::storage::{Salvaged, StorageError, Tree, WriteOp, keys_after};

/// Index entries copied per step of a merge, between two turns of the index lock (each turn
/// holds up this node's writes and reads, so it is kept short); a step also ends once it
/// holds [`MERGE_STEP_BYTES`], so large values do not pile up in memory.
const MERGE_STEP: usize = 512;
const MERGE_STEP_BYTES: u64 = 16 * 1024 * 1024;
/// After a failed merge, the next try waits this long.
const MERGE_RETRY_AFTER: Duration = Duration::from_secs(60);
/// A merge needs room for what it copies: it does not start with less free space than the
/// live bytes plus this margin.
const MERGE_FREE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;

/// What the merge job remembers between two looks; guarded by the `merging` lock.
#[derive(Debug, Default)]
pub(super) struct MergeSchedule {
    /// When the last merge failed, or was refused for want of space, if it was.
    failed_at: Option<Instant>,
}

/// The merge job: a thread that looks every [`Limits::merge_check_every`](super::Limits)
/// whether a merge is due, and runs it. Dropping it stops the thread and waits for it.
pub(super) struct MergeWorker {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

impl MergeWorker {
    pub fn start(log: Arc<Log>) -> Result<MergeWorker, StorageError> {
        let stop = log.job.clone();
        let thread = std::thread::Builder::new()
            .name("log-merge".into())
            .spawn({
                let stop = stop.clone();
                move || run(&log, &stop)
            })?;
        Ok(MergeWorker {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MergeWorker {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the log's merge job panicked");
        }
    }
}

/// The job's loop, until it is stopped: hint files whenever a segment is sealed, a look for
/// a merge every [`Limits::merge_check_every`](super::Limits).
fn run(log: &Log, stop: &Stop) {
    let every = log.limits.merge_check_every;
    let mut next_look = Instant::now() + every;
    while !stop.wait_until(next_look) {
        if let Err(error) = log.write_missing_hints(stop) {
            tracing::error!(%error, "writing the hint files of sealed segments failed");
        }
        if Instant::now() >= next_look {
            if let Err(error) = log.merge_if_due(stop) {
                tracing::error!(%error, "a merge of the log failed; it is tried again in a minute");
            }
            next_look = Instant::now() + every;
        }
    }
}

/// Tells the engine's job to stop, or that a segment was sealed; and wakes it.
#[derive(Debug, Default)]
pub(super) struct Stop {
    state: Mutex<JobState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct JobState {
    stopped: bool,
    sealed: bool,
}

impl Stop {
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.wake.notify_all();
    }

    pub fn is_stopped(&self) -> bool {
        lock(&self.state).stopped
    }

    /// A segment was sealed: its hint file is due.
    pub fn sealed(&self) {
        lock(&self.state).sealed = true;
        self.wake.notify_all();
    }

    /// Waits until `deadline`, or less once stopped or a segment is sealed; answers whether it
    /// is stopped.
    fn wait_until(&self, deadline: Instant) -> bool {
        let state = lock(&self.state);
        let timeout = deadline.saturating_duration_since(Instant::now());
        let (mut state, _) = self
            .wake
            .wait_timeout_while(state, timeout, |state| !state.stopped && !state.sealed)
            .unwrap_or_else(PoisonError::into_inner);
        state.sealed = false;
        state.stopped
    }
}

impl Log {
    /// The merge job's look: merges if a merge is due and none is running. Answers whether a
    /// merge ran to its end.
    pub(super) fn merge_if_due(&self, stop: &Stop) -> Result<bool, StorageError> {
        let mut schedule = match self.merging.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        if !self.merge_due(&mut schedule) {
            return Ok(false);
        }
        self.merge(stop)
            .inspect_err(|_| schedule.failed_at = Some(Instant::now()))
    }

    /// Is a merge worth it (see [`Log::needs_merge`]), not too soon after a failed one, and
    /// is there room for its copies?
    fn merge_due(&self, schedule: &mut MergeSchedule) -> bool {
        if !self.needs_merge() {
            return false;
        }
        if let Some(failed) = schedule.failed_at
            && failed.elapsed() < MERGE_RETRY_AFTER
        {
            return false;
        }
        let live = self.read_index().live_bytes;
        match free_bytes(&self.segments_dir) {
            Ok(free) if free >= live.saturating_add(MERGE_FREE_MARGIN_BYTES) => true,
            Ok(free) => {
                tracing::warn!(free, live, "too little free space to merge the log");
                schedule.failed_at = Some(Instant::now());
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
    /// the module documentation). The caller holds `merging`. Answers whether it got to the
    /// end (`false`: stopped between two steps).
    pub(super) fn merge(&self, stop: &Stop) -> Result<bool, StorageError> {
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
            return Ok(true);
        };
        let mut output = MergeOutput::new(last, self.limits.segment_bytes);
        match self.copy_live(&sealed, &mut output, stop) {
            Ok(true) => {}
            Ok(false) => {
                self.discard_unused_copies(&output);
                tracing::info!(
                    copies = output.files.len(),
                    "a merge of the log stopped for shutdown; its sealed segments stay"
                );
                return Ok(false);
            }
            Err(error) => {
                self.discard_unused_copies(&output);
                return Err(error);
            }
        }
        if let Err(error) = output.files.iter().try_for_each(|file| file.sync_all()) {
            self.leave_hints_to_the_job(&output.ids);
            return Err(error.into());
        }
        let copies = output.files.len();
        self.write_copies_hints(output);
        segment::sync_directory(&self.segments_dir)?;
        let _hinting = lock(&self.hinting);
        manifest::write(&self.dir, &sealed)?;
        {
            let mut index = self.write_index();
            for id in &sealed {
                index.segments.remove(id);
            }
        }
        for id in &sealed {
            hint::remove(&self.segments_dir, *id)?;
            segment::remove_if_present(&self.segments_dir.join(id.file_name()))?;
        }
        segment::sync_directory(&self.segments_dir)?;
        manifest::clear(&self.dir)?;
        tracing::info!(
            segments = sealed.len(),
            copies = copies,
            "merged the log's sealed segments"
        );
        Ok(true)
    }

    /// Writes the hint files of a merge's copies, fsynced already; one that cannot be written
    /// is left to the job.
    fn write_copies_hints(&self, output: MergeOutput) {
        let failed: Vec<SegmentId> = output
            .into_hints()
            .filter_map(|(id, bytes)| match hint::write(&self.segments_dir, id, &bytes) {
                Ok(()) => None,
                Err(error) => {
                    tracing::warn!(%error, copy = id.file_name(), "cannot write a merge copy's hint file; the job tries again");
                    Some(id)
                }
            })
            .collect();
        self.leave_hints_to_the_job(&failed);
    }

    /// Marks segments as wanting a hint file from the job.
    fn leave_hints_to_the_job(&self, ids: &[SegmentId]) {
        let mut index = self.write_index();
        for id in ids {
            if let Some(segment) = index.segments.get_mut(id) {
                segment.needs_hint = true;
            }
        }
    }

    /// The job's hint files: replays each sealed segment that wants one (checking every
    /// record), fsyncs it and writes its hint file. A segment that does not read back whole
    /// gets none, with an error in the log: the next start replays it and finds the damage.
    pub(super) fn write_missing_hints(&self, stop: &Stop) -> Result<(), StorageError> {
        let _hinting = lock(&self.hinting);
        let active = lock(&self.writer).id;
        let wanting: Vec<(SegmentId, Arc<File>, u64)> = self
            .read_index()
            .segments
            .iter()
            .filter(|(id, segment)| **id < active && segment.needs_hint)
            .map(|(id, segment)| (*id, segment.file.clone(), segment.len))
            .collect();
        for (id, file, len) in wanting {
            if stop.is_stopped() {
                break;
            }
            let mut hint = HintBuilder::default();
            let reader = std::io::BufReader::with_capacity(1 << 20, segment::Reader::new(&file));
            let found = record::replay(reader, |tree, key, value| hint.push(tree, key, value))?;
            if found.unheld.is_empty() && found.len == len {
                file.sync_data()?;
                let seal = Seal {
                    len,
                    last_record: found.last_record,
                    damaged: Salvaged::default(),
                };
                hint::write(&self.segments_dir, id, &hint.finish(id, seal))?;
            } else {
                tracing::error!(
                    segment = %self.segments_dir.join(id.file_name()).display(),
                    expected = len,
                    found = found.len,
                    damaged = ?found.unheld,
                    "a sealed segment does not read back whole (damaged since it was written, \
                     or damage passed over at open with --salvage); it gets no hint file, and \
                     the next start replays it"
                );
            }
            if let Some(segment) = self.write_index().segments.get_mut(&id) {
                segment.needs_hint = false;
            }
        }
        Ok(())
    }

    /// After a merge that did not get to its end: removes the copies nothing points at yet;
    /// the others are live segments now, whose hint files are left to the job. One that
    /// cannot be removed is kept as an empty segment, so that the next merge replaces it (and
    /// lists it in its manifest) rather than leaving it to be replayed.
    fn discard_unused_copies(&self, output: &MergeOutput) {
        self.leave_hints_to_the_job(&output.ids);
        let mut index = self.write_index();
        for (id, file) in output.ids.iter().zip(&output.files) {
            if !index.segments.contains_key(id)
                && segment::remove_if_present(&self.segments_dir.join(id.file_name())).is_err()
            {
                index.segments.insert(*id, Segment::new(file.clone(), 0));
            }
        }
    }

    /// Copies the live values of the `sealed` segments into `output`, pointing the index at
    /// each copy where it still points at the original. Answers whether it copied them all
    /// (`false`: stopped between two steps).
    fn copy_live(
        &self,
        sealed: &[SegmentId],
        output: &mut MergeOutput,
        stop: &Stop,
    ) -> Result<bool, StorageError> {
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
                let (segment, file, base) = output.append(&self.segments_dir, &record, &ops)?;
                let mut index = self.write_index();
                // The merge writes its copies' hint files itself, once they are whole.
                let copy = Segment {
                    needs_hint: false,
                    ..Segment::new(file, output.len)
                };
                index.segments.insert(segment, copy);
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
                // The index is let go between steps (see the lock order at `Log`).
                drop(index);
                if stop.is_stopped() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
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
/// each created when the first record goes into it, with their hint files being built.
struct MergeOutput {
    segment_bytes: u64,
    last: SegmentId,
    file: Option<Arc<File>>,
    len: u64,
    ids: Vec<SegmentId>,
    files: Vec<Arc<File>>,
    /// Per copy: its hint file so far, its length and its last record.
    hints: Vec<(HintBuilder, Seal)>,
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
            hints: Vec::new(),
        }
    }

    /// Appends the record of `ops`; the segment it went to, its file, and the record's offset
    /// there. A record that fails to go in whole is cut off, so the copy stays whole records.
    fn append(
        &mut self,
        dir: &Path,
        record: &Record,
        ops: &[WriteOp],
    ) -> Result<(SegmentId, Arc<File>, u64), StorageError> {
        use std::os::unix::fs::FileExt;
        let size = record.bytes.len() as u64;
        let full = self.len > 0 && self.len + size > self.segment_bytes;
        let file = match &self.file {
            Some(file) if !full => file.clone(),
            _ => {
                self.last = self.last.next_sub()?;
                let file = Arc::new(segment::create(dir, self.last)?);
                self.ids.push(self.last);
                self.files.push(file.clone());
                self.hints.push(Default::default());
                self.file = Some(file.clone());
                self.len = 0;
                file
            }
        };
        let offset = self.len;
        if let Err(error) = file.write_all_at(&record.bytes, offset) {
            if let Err(truncate) = file.set_len(offset) {
                tracing::warn!(%truncate, "cannot cut a partial record off a merge's copy");
            }
            return Err(error.into());
        }
        self.len += size;
        if let Some((hint, seal)) = self.hints.last_mut() {
            for (op, value_offset) in ops.iter().zip(&record.values) {
                let value = op.value.as_ref().map(|value| ValueAt {
                    offset: offset + value_offset,
                    len: value.len() as u32,
                });
                hint.push(op.tree, &op.key, value);
            }
            let mut header = [0; record::HEADER_BYTES];
            header.copy_from_slice(&record.bytes[..record::HEADER_BYTES]);
            seal.last_record = Some(Mark { offset, header });
            seal.len = self.len;
        }
        Ok((self.last, file, offset))
    }

    /// Each copy's id and hint file.
    fn into_hints(self) -> impl Iterator<Item = (SegmentId, Vec<u8>)> {
        self.ids
            .into_iter()
            .zip(self.hints)
            .map(|(id, (hint, seal))| (id, hint.finish(id, seal)))
    }
}

/// Bytes an unprivileged process may still write on `dir`'s file system.
fn free_bytes(dir: &Path) -> Result<u64, StorageError> {
    let stats = rustix::fs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}
