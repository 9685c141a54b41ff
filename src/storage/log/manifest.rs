//! The manifest of superseded segments: how a merge deletes the segments it replaced without
//! ever bringing a deleted key back.
//!
//! A merge's copies hold only the latest value of each live key, and a remove leaves no copy.
//! Were a crash to delete some of the replaced segments and not others, replay could find an
//! old put with the segment holding its later remove already gone, and the key would come
//! back. So before deleting anything, a merge writes the names of every segment it replaced
//! to the manifest (a temporary name, fsynced, renamed over `superseded`, then the directory
//! fsynced), and [`finish`] deletes what the manifest lists (each segment's hint file first,
//! then the segment), at every open before replay and before every merge. A crash before the manifest leaves the originals and their copies side
//! by side, which replay to the same state.

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::Path;

use super::segment::{self, SegmentId};
use super::{hint, log_error};
use crate::storage::StorageError;

/// The manifest's name in the data directory.
pub(super) const SUPERSEDED_FILE: &str = "superseded";
/// Largest manifest read at open: far more names than any merge writes.
const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// Records, durably, that `sealed` are replaced, before any of them is deleted.
pub(super) fn write(dir: &Path, sealed: &[SegmentId]) -> Result<(), StorageError> {
    let text: String = sealed.iter().map(|id| id.file_name() + "\n").collect();
    let temporary = dir.join(format!("{SUPERSEDED_FILE}.tmp"));
    fs::write(&temporary, text)?;
    File::open(&temporary)?.sync_all()?;
    fs::rename(&temporary, dir.join(SUPERSEDED_FILE))?;
    segment::sync_directory(dir)
}

/// Deletes what an interrupted merge had already replaced, then the manifest itself; nothing
/// to do without one.
pub(super) fn finish(dir: &Path, segments_dir: &Path) -> Result<(), StorageError> {
    segment::remove_if_present(&dir.join(format!("{SUPERSEDED_FILE}.tmp")))?;
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
        let Some(id) = SegmentId::parse(name) else {
            return Err(log_error(format!(
                "{} names {name:?}, which is not a segment",
                manifest.display()
            )));
        };
        hint::remove(segments_dir, id)?;
        segment::remove_if_present(&segments_dir.join(name))?;
    }
    segment::sync_directory(segments_dir)?;
    segment::remove_if_present(&manifest)?;
    segment::sync_directory(dir)
}

/// Removes the manifest once every segment it lists is deleted.
pub(super) fn clear(dir: &Path) -> Result<(), StorageError> {
    segment::remove_if_present(&dir.join(SUPERSEDED_FILE))?;
    segment::sync_directory(dir)
}
