//! The in-memory index: for every key of every tree, where its latest value lies on disk.
//!
//! Keeping every key in memory is Bitcask's trade: a read is one lookup and one `pread`, an
//! overwrite replaces one entry, and nothing on the write path ever walks old versions. It is
//! an ordered map (a B-tree per tree, where Bitcask has a hash) because the node pages through
//! trees in key order. The index is not stored: [`Index::load`] rebuilds it at open, from each
//! sealed segment's hint file ([`super::hint`]) where one can be trusted, by replaying the
//! segment otherwise.
//!
//! # Torn tails and damage
//!
//! Replay tells apart what a crash leaves from damage. A crash can tear only the last record
//! written, so only the tail of the last segment: bytes after its last whole record with no
//! whole record among them. Such a tail is cut, with a line in the log, and the node starts.
//! Any other run of bytes that are not whole records (one followed by a whole record of the
//! same segment, or in any segment but the last) is damage: the open is refused with
//! [`StorageError::Damaged`], naming the segment and the offset, unless told to salvage
//! ([`Recovery::Salvage`]). Then each damaged run is logged and counted and passed over; every
//! whole record is kept, and the damaged bytes stay on disk, dead, until a merge copies the
//! segment's live values out (a merge copies only what the index points at, so it drops
//! nothing the open did not already report). A salvaged segment's hint file records what was
//! passed over, so that later starts, which read the hint file, say so in the log.
//!
//! The index also owns the open segment files, so that a location it hands out always comes
//! with a file to read it from, and it counts the live bytes a merge would copy, which is how
//! the engine tells that half of the disk is dead.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::hint::{self, HintBuilder, Seal};
use super::log_error;
use super::record::{self, OP_OVERHEAD_BYTES, Replayed, Unheld, tree_slot};
use super::segment::{self, SegmentId};
use crate::storage::{Recovery, Salvaged, StorageError, Tree};

/// Where a key's value lies: each write gets a location of its own, so comparing locations
/// tells whether a key changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub segment: SegmentId,
    pub offset: u64,
    pub len: u32,
}

impl Loc {
    /// Reads the value from its segment's file.
    pub fn read(self, file: &File) -> Result<Vec<u8>, StorageError> {
        segment::read_at(file, self.offset, self.len)
    }
}

/// A segment the index may point into.
#[derive(Clone)]
pub(super) struct Segment {
    pub file: Arc<File>,
    /// Its length: whole records, and any damage passed over under `--salvage`.
    pub len: u64,
    /// Whether it still wants a hint file once sealed (the engine's job writes it).
    pub needs_hint: bool,
}

impl Segment {
    /// A segment being written, which will want a hint file once sealed.
    pub fn new(file: Arc<File>, len: u64) -> Self {
        Segment {
            file,
            len,
            needs_hint: true,
        }
    }
}

#[derive(Default)]
pub(super) struct Index {
    /// One map per tree, at [`tree_slot`].
    pub trees: [BTreeMap<Vec<u8>, Loc>; 3],
    pub segments: BTreeMap<SegmentId, Segment>,
    /// Bytes of the records a merge would write for what the index points at.
    pub live_bytes: u64,
}

impl Index {
    /// Rebuilds the index from the segments `ids` of `dir`, in order: from a segment's hint
    /// file where it can be trusted, by replay otherwise. A torn tail of the last segment is
    /// cut; damage is refused or, under [`Recovery::Salvage`], passed over (see the module
    /// documentation). Every replayed segment is fsynced, since writes acknowledged before a
    /// crash may still have been only in the page cache, and gets its hint file. Answers the
    /// index and what was passed over as damaged.
    pub fn load(
        dir: &Path,
        ids: &[SegmentId],
        recovery: Recovery,
    ) -> Result<(Index, Salvaged), StorageError> {
        let started = Instant::now();
        let mut index = Index::default();
        let mut loading = Loading::default();
        let mut replayed = Vec::new();
        // Damage passed over by an earlier start, as the hint files recorded it: still
        // counted, so that the figures do not read 0 after a restart.
        let mut salvaged_before = Salvaged::default();
        for &id in ids {
            let file = segment::open(dir, id)?;
            if let Some(hint) = hint::load(dir, id, &file) {
                hint.for_each(|tree, key, value| loading.push(id, tree, key, value));
                salvaged_before.records += hint.seal.damaged.records;
                salvaged_before.bytes += hint.seal.damaged.bytes;
                if hint.seal.damaged != Salvaged::default() {
                    tracing::warn!(
                        segment = %dir.join(id.file_name()).display(),
                        records = hint.seal.damaged.records,
                        bytes = hint.seal.damaged.bytes,
                        "this segment holds damaged records passed over by an earlier start \
                         with --salvage"
                    );
                }
                let segment = Segment {
                    file: Arc::new(file),
                    len: hint.seal.len,
                    needs_hint: false,
                };
                index.segments.insert(id, segment);
                continue;
            }
            let mut hint = HintBuilder::default();
            let reader = std::io::BufReader::with_capacity(1 << 20, segment::Reader::new(&file));
            let found = record::replay(reader, |tree, key, value| {
                hint.push(tree, key, value);
                loading.push(id, tree, key, value);
            })?;
            replayed.push(Replay {
                id,
                file,
                found,
                hint,
            });
        }
        loading.into(&mut index);
        let last = ids.last().copied();
        let damage: Vec<(SegmentId, Unheld)> = replayed
            .iter()
            .flat_map(|replay| {
                let id = replay.id;
                let inner = replay.found.inner().iter().map(move |run| (id, *run));
                inner.chain(replay.damaged_tail(last).map(|run| (id, run)))
            })
            .collect();
        for (id, run) in &damage {
            let segment = dir.join(id.file_name());
            match recovery {
                Recovery::Refuse => tracing::error!(
                    segment = %segment.display(),
                    offset = run.offset,
                    bytes = run.bytes,
                    records = run.records,
                    "damaged records, with whole records written after them"
                ),
                Recovery::Salvage => tracing::warn!(
                    segment = %segment.display(),
                    offset = run.offset,
                    bytes = run.bytes,
                    records = run.records,
                    "damaged records passed over (--salvage); every other record is kept, and \
                     peers refill what they held"
                ),
            }
        }
        if let (Recovery::Refuse, Some((id, run))) = (recovery, damage.first()) {
            return Err(StorageError::Damaged {
                segment: dir.join(id.file_name()),
                offset: run.offset,
                bytes: run.bytes,
                ranges: damage.len(),
            });
        }
        let mut salvaged = total(damage.iter().map(|(_, run)| run));
        salvaged.records += salvaged_before.records;
        salvaged.bytes += salvaged_before.bytes;
        let replays = replayed.len();
        for replay in replayed {
            let (id, segment) = replay.seal(dir, last, &damage)?;
            index.segments.insert(id, segment);
        }
        tracing::info!(
            segments = ids.len(),
            from_hint_files = ids.len() - replays,
            replayed = replays,
            ms = started.elapsed().as_millis() as u64,
            "the log's index is rebuilt"
        );
        Ok((index, salvaged))
    }

    /// The file holding `loc`'s segment: every location the index holds has one.
    pub fn file_of(&self, loc: Loc) -> Result<Arc<File>, StorageError> {
        self.segments
            .get(&loc.segment)
            .map(|segment| segment.file.clone())
            .ok_or_else(|| log_error(format!("no segment {}", loc.segment.file_name())))
    }

    /// Bytes in every segment, live or dead.
    pub fn total_bytes(&self) -> u64 {
        self.segments.values().map(|segment| segment.len).sum()
    }

    /// Points `key` at `loc`, or removes it for `None`, keeping the live bytes counted.
    pub fn set(&mut self, tree: Tree, key: Vec<u8>, loc: Option<Loc>) {
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

/// The ops read at open, in log order, made into the maps once all are read: sorted once,
/// then inserted in key order, which costs a fraction of inserting a million keys one by one
/// in the order of their hashes (how a node's keys lie), each a walk to a random leaf.
#[derive(Default)]
struct Loading {
    /// Per tree, at [`tree_slot`]: each op's key and location (`None`: removed).
    ops: [Vec<(Vec<u8>, Option<Loc>)>; 3],
}

impl Loading {
    /// What an op of segment `id` says, as replay or a hint file hands it out.
    fn push(&mut self, id: SegmentId, tree: Tree, key: &[u8], value: Option<record::ValueAt>) {
        let loc = value.map(|value| Loc {
            segment: id,
            offset: value.offset,
            len: value.len,
        });
        self.ops[tree_slot(tree)].push((key.to_vec(), loc));
    }

    /// Sets each key to its last op.
    fn into(self, index: &mut Index) {
        for (slot, mut ops) in self.ops.into_iter().enumerate() {
            // Stable: a key's ops stay in log order, the last one last.
            ops.sort_by(|a, b| a.0.cmp(&b.0));
            let mut ops = ops.into_iter().peekable();
            while let Some((key, loc)) = ops.next() {
                if ops.peek().is_some_and(|(next, _)| *next == key) {
                    continue; // a later op of the same key decides
                }
                index.set(Tree::ALL[slot], key, loc);
            }
        }
    }
}

/// A segment replayed at open, with its hint file being built.
struct Replay {
    id: SegmentId,
    file: File,
    found: Replayed,
    hint: HintBuilder,
}

impl Replay {
    /// The run that ends the segment, if it is damage rather than a torn tail: in a segment
    /// before the last, or with a whole record inside it.
    fn damaged_tail(&self, last: Option<SegmentId>) -> Option<Unheld> {
        let tail = self.found.tail()?;
        (Some(self.id) != last || self.found.record_in_tail).then_some(tail)
    }

    /// Once the open goes on: cuts a torn tail, fsyncs the segment and writes its hint file.
    /// Answers the segment for the index.
    fn seal(
        self,
        dir: &Path,
        last: Option<SegmentId>,
        damage: &[(SegmentId, Unheld)],
    ) -> Result<(SegmentId, Segment), StorageError> {
        let Replay {
            id,
            file,
            found,
            hint,
        } = self;
        let torn = found
            .tail()
            .filter(|_| Some(id) == last && !found.record_in_tail);
        let len = match torn {
            Some(tail) => {
                tracing::warn!(
                    segment = %dir.join(id.file_name()).display(),
                    offset = tail.offset,
                    cut = tail.bytes,
                    "the last segment's tail, torn by a crash, is cut: it held no whole record"
                );
                file.set_len(found.good_len)?;
                found.good_len
            }
            None => found.len,
        };
        file.sync_all()?;
        let damaged = total(
            damage
                .iter()
                .filter(|(of, _)| *of == id)
                .map(|(_, run)| run),
        );
        let seal = Seal {
            len,
            last_record: found.last_record,
            damaged,
        };
        let needs_hint = match hint::write(dir, id, &hint.finish(id, seal)) {
            Ok(()) => false,
            Err(error) => {
                tracing::warn!(segment = %dir.join(id.file_name()).display(), %error, "cannot write a hint file; the engine's job tries again");
                true
            }
        };
        let segment = Segment {
            file: Arc::new(file),
            len,
            needs_hint,
        };
        Ok((id, segment))
    }
}

/// What damaged runs add up to.
fn total<'a>(runs: impl Iterator<Item = &'a Unheld>) -> Salvaged {
    runs.fold(Salvaged::default(), |sum, run| Salvaged {
        records: sum.records + run.records,
        bytes: sum.bytes + run.bytes,
    })
}
