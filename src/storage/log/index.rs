//! The in-memory index: for every key of every tree, where its latest value lies on disk.
//!
//! Keeping every key in memory is Bitcask's trade: a read is one lookup and one `pread`, an
//! overwrite replaces one entry, and nothing on the write path ever walks old versions. It is
//! an ordered map (a B-tree per tree, where Bitcask has a hash) because the node pages through
//! trees in key order. The index is not stored: [`Index::load`] rebuilds it at open by
//! replaying every segment, which also finds and cuts a record torn by a crash.
//!
//! The index also owns the open segment files, so that a location it hands out always comes
//! with a file to read it from, and it counts the live bytes a merge would copy, which is how
//! the engine tells that half of the disk is dead.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::log_error;
use super::record::{self, OP_OVERHEAD_BYTES, tree_slot};
use super::segment::{self, SegmentId};
use crate::storage::{StorageError, Tree};

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
    /// Bytes of whole records in it.
    pub len: u64,
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
    /// Rebuilds the index from the segments `ids` of `dir`, replayed in order. A segment whose
    /// records stop holding (a write torn by a crash, or damaged later) is cut after its last
    /// whole record, with an error in the log; every segment is fsynced, since writes
    /// acknowledged before a crash may still have been only in the page cache.
    pub fn load(dir: &Path, ids: &[SegmentId]) -> Result<Index, StorageError> {
        let mut index = Index::default();
        for &id in ids {
            let file = segment::open(dir, id)?;
            let reader = std::io::BufReader::with_capacity(1 << 20, &file);
            let len = record::replay(reader, |tree, key, value| {
                let loc = value.map(|value| Loc {
                    segment: id,
                    offset: value.offset,
                    len: value.len,
                });
                index.set(tree, key.to_vec(), loc);
            })?;
            let found = file.metadata()?.len();
            if len < found {
                tracing::error!(
                    segment = %dir.join(id.file_name()).display(),
                    kept = len,
                    cut = found - len,
                    "a record that does not hold (torn by a crash, or damaged) was cut off with \
                     everything after it in this segment"
                );
                file.set_len(len)?;
            }
            file.sync_all()?;
            index.segments.insert(
                id,
                Segment {
                    file: Arc::new(file),
                    len,
                },
            );
        }
        Ok(index)
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
