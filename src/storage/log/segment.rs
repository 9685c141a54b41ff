//! Segment files: the log on disk is a directory of append-only files, each a run of records
//! ([`super::record`]), named so that sorting their names gives the order to replay them in.
//!
//! The log is cut into segments because a merge gives space back by deleting whole files: the
//! active segment is sealed once it passes [`Limits::segment_bytes`](super::Limits), and a
//! merge copies what is still live out of sealed segments and deletes them. A segment is
//! `<id>-<sub>.seg`: the engine starts `(id + 1, 0)` after the last one at open and whenever
//! the active segment fills; a merge numbers its copies after the last segment it replaces,
//! `(id, sub + 1)`, `(id, sub + 2)`, ..., so they replay after what they copy and before any
//! later write.
//!
//! Beside each sealed segment lies its hint file, `<id>-<sub>.hint` ([`super::hint`]).
//!
//! Also here: the few file-system steps the log's durability rests on (fsync of a directory,
//! removal that tolerates a file already gone).

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{hint, log_error};
use crate::storage::StorageError;

/// The directory of segments inside the data directory; only this engine makes one.
pub(in crate::storage) const SEGMENTS_DIR: &str = "segments";
const SEGMENT_SUFFIX: &str = ".seg";

/// A segment's place in replay order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct SegmentId {
    pub id: u64,
    pub sub: u32,
}

impl SegmentId {
    /// The first segment of an empty log.
    pub const FIRST: SegmentId = SegmentId { id: 1, sub: 0 };

    /// The name of its files without their suffix.
    pub fn stem(self) -> String {
        format!("{:020}-{:05}", self.id, self.sub)
    }

    pub fn file_name(self) -> String {
        format!("{}{SEGMENT_SUFFIX}", self.stem())
    }

    /// The name of its hint file ([`super::hint`]).
    pub fn hint_name(self) -> String {
        format!("{}{}", self.stem(), hint::HINT_SUFFIX)
    }

    /// The id of a segment file's name; `None` for any other name, including spellings of a
    /// segment's name other than the one [`SegmentId::file_name`] writes.
    pub fn parse(name: &str) -> Option<SegmentId> {
        Self::parse_with(name, SEGMENT_SUFFIX)
    }

    /// The id of a hint file's name, as [`SegmentId::parse`].
    pub fn parse_hint(name: &str) -> Option<SegmentId> {
        Self::parse_with(name, hint::HINT_SUFFIX)
    }

    fn parse_with(name: &str, suffix: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(suffix)?;
        let (id, sub) = stem.split_once('-')?;
        let id = SegmentId {
            id: id.parse().ok()?,
            sub: sub.parse().ok()?,
        };
        (id.stem() == stem).then_some(id)
    }

    /// The id of the active segment that follows this one.
    pub fn next(self) -> Result<SegmentId, StorageError> {
        let id = self
            .id
            .checked_add(1)
            .ok_or_else(|| log_error("segment ids are exhausted".into()))?;
        Ok(SegmentId { id, sub: 0 })
    }

    /// The id of a merge's copy that follows this one.
    pub fn next_sub(self) -> Result<SegmentId, StorageError> {
        let sub = self
            .sub
            .checked_add(1)
            .ok_or_else(|| log_error("segment ids are exhausted".into()))?;
        Ok(SegmentId { sub, ..self })
    }
}

/// The segments in `dir`, in replay order; any other file but hint files is logged and left
/// alone.
pub(super) fn list(dir: &Path) -> Result<Vec<SegmentId>, StorageError> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let text = name.to_str().unwrap_or_default();
        match SegmentId::parse(text) {
            Some(id) => ids.push(id),
            None if text.ends_with(hint::HINT_SUFFIX) || text.ends_with(hint::TEMPORARY_SUFFIX) => {
            }
            None => tracing::warn!(file = ?name, "not a segment name; the file is ignored"),
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Opens an existing segment, to replay it and then read from it.
pub(super) fn open(dir: &Path, id: SegmentId) -> Result<File, StorageError> {
    Ok(OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join(id.file_name()))?)
}

/// Creates a new, empty segment; fails if it exists. A hint file of the same name, which
/// could only be left from a segment of that id before (ids are never reused, see
/// [`super::hint`]), is removed first.
pub(super) fn create(dir: &Path, id: SegmentId) -> Result<File, StorageError> {
    hint::remove(dir, id)?;
    Ok(OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(dir.join(id.file_name()))?)
}

/// The `len` bytes at `offset` of a segment.
pub(super) fn read_at(file: &File, offset: u64, len: u32) -> Result<Vec<u8>, StorageError> {
    let mut value = vec![0; len as usize];
    file.read_exact_at(&mut value, offset)?;
    Ok(value)
}

/// Reads a segment from its start with positional reads, leaving the file's shared cursor
/// alone (readers of values share the file).
pub(super) struct Reader<'a> {
    file: &'a File,
    offset: u64,
}

impl<'a> Reader<'a> {
    pub fn new(file: &'a File) -> Self {
        Reader { file, offset: 0 }
    }
}

impl std::io::Read for Reader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.file.read_at(buf, self.offset)?;
        self.offset += read as u64;
        Ok(read)
    }
}

/// Makes the creation, renaming and removal of `dir`'s entries durable.
pub(super) fn sync_directory(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Removes a file; one already gone is no error (a step done before a crash, done again).
pub(super) fn remove_if_present(path: &Path) -> Result<(), StorageError> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}
