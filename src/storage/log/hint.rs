//! Hint files: what a sealed segment holds, without its values, so that a start rebuilds the
//! index from them instead of reading every value (Bitcask's hint files).
//!
//! Once a segment is sealed (no longer written), a hint file is written beside it,
//! `<id>-<sub>.hint`: for each op of each record, in log order, its tree, its key, whether it
//! puts or removes, and where a put's value lies in the segment. That is all
//! [`Index::load`](super::index::Index::load) needs, and a fraction of the segment's bytes.
//! Who writes them: the open itself, for each segment it had to replay; the engine's job
//! ([`super::merge`]) a moment after the active segment is sealed; a merge, for the
//! segments it writes.
//!
//! # Format
//!
//! Every integer little-endian:
//!
//! ```text
//! magic "DYNHINT1" | segment id u64, sub u32 | segment length u64
//! | last whole record's offset u64 (u64::MAX: none) and its 12-byte header
//! | damaged records u64, damaged bytes u64 (passed over under --salvage when it was written)
//! | op count u64
//! | ops: tree u8, kind u8 (0 remove, 1 put), key length u32, key, [value offset u64, value length u32 for a put]
//! | xxh3-64 of every byte before it
//! ```
//!
//! # When a hint file is trusted
//!
//! Written to a temporary name, fsynced, then renamed over its final name, and only after
//! its segment was fsynced: a hint file that is there was whole when written, about bytes
//! that were on disk. At open it is used only if its checksum holds, it names its segment's
//! id, the segment's length is the one it was written for, and the segment's last whole
//! record has the header it recorded (that header holds the record's checksum, so it is a
//! fingerprint of the segment's end). Anything else, or a hint file missing, and the segment
//! is replayed and the hint file written again.
//!
//! Could a hint file be stale, describing an older segment of the same name? Segment ids are
//! never reused: the active segment always has the largest id, a merge numbers its copies
//! after the last segment it replaces and below the active one, and open starts after the
//! largest id there is. And should one be reused anyway, a segment's creation removes any
//! hint file of its name first, a segment's removal removes its hint file before it, and the
//! length and fingerprint must still match.
//!
//! A segment read through its hint file is not read at all, so its records' checksums are
//! not checked at that start: they were checked when its hint file was written (from a
//! replay of the segment, or by the merge that wrote it from records it had just encoded).

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{HEADER_BYTES as RECORD_HEADER_BYTES, Mark, ValueAt, tree_slot};
use super::segment::{self, SegmentId};
use crate::storage::{Salvaged, StorageError, Tree};

pub(super) const HINT_SUFFIX: &str = ".hint";
pub(super) const TEMPORARY_SUFFIX: &str = ".hint.tmp";
const MAGIC: &[u8; 8] = b"DYNHINT1";
/// magic, id, sub, segment length, last record (offset and header), damage (2), op count.
const HEADER_BYTES: usize = 8 + 8 + 4 + 8 + 8 + RECORD_HEADER_BYTES + 8 + 8 + 8;
const CHECKSUM_BYTES: usize = 8;
const NO_RECORD: u64 = u64::MAX;

/// The hint file of segment `id` in `dir`.
pub(super) fn path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(id.hint_name())
}

fn temporary_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("{}{TEMPORARY_SUFFIX}", id.stem()))
}

/// What a hint file says about its segment besides the ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Seal {
    /// The segment's length when the hint file was written.
    pub len: u64,
    /// Its last whole record.
    pub last_record: Option<Mark>,
    /// What was passed over as damaged when it was written (under `--salvage`).
    pub damaged: Salvaged,
}

/// A hint file being built, op by op, in log order.
pub(super) struct HintBuilder {
    bytes: Vec<u8>,
    ops: u64,
}

impl Default for HintBuilder {
    fn default() -> Self {
        HintBuilder {
            bytes: vec![0; HEADER_BYTES],
            ops: 0,
        }
    }
}

impl HintBuilder {
    /// Adds an op: a put when `value` says where its value lies, a remove otherwise.
    pub fn push(&mut self, tree: Tree, key: &[u8], value: Option<ValueAt>) {
        self.bytes.push(tree_slot(tree) as u8);
        self.bytes.push(u8::from(value.is_some()));
        // Keys are at most 64 KiB (`check_key`), so their length fits.
        self.bytes
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(key);
        if let Some(value) = value {
            self.bytes.extend_from_slice(&value.offset.to_le_bytes());
            self.bytes.extend_from_slice(&value.len.to_le_bytes());
        }
        self.ops += 1;
    }

    /// The whole file, for segment `id`.
    pub fn finish(mut self, id: SegmentId, seal: Seal) -> Vec<u8> {
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&id.id.to_le_bytes());
        header.extend_from_slice(&id.sub.to_le_bytes());
        header.extend_from_slice(&seal.len.to_le_bytes());
        let (offset, record_header) = match seal.last_record {
            Some(mark) => (mark.offset, mark.header),
            None => (NO_RECORD, [0; RECORD_HEADER_BYTES]),
        };
        header.extend_from_slice(&offset.to_le_bytes());
        header.extend_from_slice(&record_header);
        header.extend_from_slice(&seal.damaged.records.to_le_bytes());
        header.extend_from_slice(&seal.damaged.bytes.to_le_bytes());
        header.extend_from_slice(&self.ops.to_le_bytes());
        self.bytes[..HEADER_BYTES].copy_from_slice(&header);
        let checksum = xxhash_rust::xxh3::xxh3_64(&self.bytes);
        self.bytes.extend_from_slice(&checksum.to_le_bytes());
        self.bytes
    }
}

/// Writes segment `id`'s hint file: to a temporary name, fsynced, renamed. The caller has
/// fsynced the segment. The directory is not fsynced here: a rename lost to a crash leaves
/// the hint file missing, and the segment is replayed.
pub(super) fn write(dir: &Path, id: SegmentId, bytes: &[u8]) -> Result<(), StorageError> {
    let temporary = temporary_path(dir, id);
    let mut file = File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path(dir, id))?;
    Ok(())
}

/// Removes segment `id`'s hint file, if there is one.
pub(super) fn remove(dir: &Path, id: SegmentId) -> Result<(), StorageError> {
    segment::remove_if_present(&path(dir, id))
}

/// Removes what no segment owns: temporary files of hint files being written, and hint files
/// whose segment is gone (a crash between removing the one and the other).
pub(super) fn remove_orphans(dir: &Path, ids: &[SegmentId]) -> Result<(), StorageError> {
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let orphan = name.ends_with(TEMPORARY_SUFFIX)
            || SegmentId::parse_hint(name).is_some_and(|id| ids.binary_search(&id).is_err());
        if orphan {
            segment::remove_if_present(&dir.join(name))?;
        }
    }
    Ok(())
}

/// A hint file that can be trusted for its segment.
pub(super) struct Hint {
    bytes: Vec<u8>,
    pub seal: Seal,
}

impl Hint {
    /// Calls `apply` with each op, in log order.
    pub fn for_each(&self, apply: impl FnMut(Tree, &[u8], Option<ValueAt>)) {
        let parsed = walk(&self.bytes, apply);
        debug_assert!(parsed, "a hint file is walked once before it is trusted");
    }
}

/// Segment `id`'s hint file, if there is one and it can be trusted for `segment` (see the
/// module documentation); when one is there and cannot, says why in the log.
pub(super) fn load(dir: &Path, id: SegmentId, segment: &File) -> Option<Hint> {
    let path = path(dir, id);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == ErrorKind::NotFound => return None,
        Err(error) => {
            tracing::warn!(hint = %path.display(), %error, "cannot read a hint file; its segment is replayed");
            return None;
        }
    };
    match trust(id, bytes, segment) {
        Ok(hint) => Some(hint),
        Err(reason) => {
            tracing::warn!(hint = %path.display(), reason, "a hint file is not trusted; its segment is replayed and the hint file written again");
            None
        }
    }
}

fn trust(id: SegmentId, mut bytes: Vec<u8>, segment: &File) -> Result<Hint, &'static str> {
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES {
        return Err("too short");
    }
    let body = bytes.len() - CHECKSUM_BYTES;
    if xxhash_rust::xxh3::xxh3_64(&bytes[..body]) != u64_at(&bytes, body) {
        return Err("its checksum does not hold");
    }
    bytes.truncate(body);
    if &bytes[..8] != MAGIC {
        return Err("not a hint file of this version");
    }
    let named = SegmentId {
        id: u64_at(&bytes, 8),
        sub: u32::from_le_bytes(bytes[16..20].try_into().map_err(|_| "short")?),
    };
    if named != id {
        return Err("it names another segment");
    }
    let offset = u64_at(&bytes, 28);
    let mut header = [0u8; RECORD_HEADER_BYTES];
    header.copy_from_slice(&bytes[36..36 + RECORD_HEADER_BYTES]);
    let seal = Seal {
        len: u64_at(&bytes, 20),
        last_record: (offset != NO_RECORD).then_some(Mark { offset, header }),
        damaged: Salvaged {
            records: u64_at(&bytes, 48),
            bytes: u64_at(&bytes, 56),
        },
    };
    let ops = u64_at(&bytes, 64);
    let segment_len = segment
        .metadata()
        .map_err(|_| "its segment cannot be read")?
        .len();
    if segment_len != seal.len {
        return Err("its segment's length differs from the one it was written for");
    }
    if let Some(mark) = seal.last_record {
        let mut found = [0u8; RECORD_HEADER_BYTES];
        segment
            .read_exact_at(&mut found, mark.offset)
            .map_err(|_| "its segment's last record cannot be read")?;
        if found != mark.header {
            return Err("its segment's last record differs from the one it was written for");
        }
    }
    let mut counted = 0u64;
    if !walk(&bytes, |_, _, _| counted += 1) || counted != ops {
        return Err("its ops do not parse");
    }
    Ok(Hint { bytes, seal })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Walks the ops of a hint file's body (header included, checksum not); answers whether
/// they all parse.
fn walk(body: &[u8], mut apply: impl FnMut(Tree, &[u8], Option<ValueAt>)) -> bool {
    let mut ops = || -> Option<()> {
        let mut at = HEADER_BYTES;
        while at < body.len() {
            let tree = *Tree::ALL.get(usize::from(*body.get(at)?))?;
            let is_put = match body.get(at + 1)? {
                0 => false,
                1 => true,
                _ => return None,
            };
            let key_len = u32::from_le_bytes(body.get(at + 2..at + 6)?.try_into().ok()?);
            let key_start = at + 6;
            let key = body.get(key_start..key_start.checked_add(key_len as usize)?)?;
            at = key_start + key.len();
            let value = if is_put {
                let offset = u64::from_le_bytes(body.get(at..at + 8)?.try_into().ok()?);
                let len = u32::from_le_bytes(body.get(at + 8..at + 12)?.try_into().ok()?);
                at += 12;
                Some(ValueAt { offset, len })
            } else {
                None
            };
            apply(tree, key, value);
        }
        Some(())
    };
    ops().is_some()
}
