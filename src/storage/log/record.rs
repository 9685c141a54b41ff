//! The record: how one write is laid out in a segment, and how a segment's bytes are read
//! back into writes.
//!
//! One [`Engine::write`](crate::storage::Engine::write) is one record, so that a crash leaves
//! each write on disk whole or not at all: `[payload length u32][xxh3 of the payload
//! u64][payload]`, the payload being the op count (u32) and each op in order: tree byte, kind
//! byte (0 remove, 1 put), key length (u32), key, value length (u32), value; every integer is
//! little-endian. The checksum covers the whole payload, so a record torn by a crash, or
//! damaged on disk later, never passes for a whole one.
//!
//! [`replay`] reads records in order and stops at the first one that does not hold (short,
//! checksum wrong, or a payload that does not parse): nothing after it can be trusted to start
//! on a record's boundary, so the caller cuts the segment there. A record's ops are handed out
//! only once all of it has been read and checked, which is what makes a multi-op write atomic
//! across a crash.
//!
//! Nothing here touches the file system: the codec is tested on plain bytes.

use std::io::{ErrorKind, Read};

use super::log_error;
use crate::storage::{StorageError, Tree, WriteOp};

/// Record header: payload length (u32) and checksum (u64).
pub(super) const HEADER_BYTES: usize = 12;
/// Bytes each op adds to a record besides its key and value (tree, kind, two lengths).
pub(super) const OP_OVERHEAD_BYTES: u64 = 10;

/// A tree's byte in a record and its index slot; `Tree::ALL[tree_slot(tree)] == tree`, which
/// replay relies on to read the byte back.
pub(super) fn tree_slot(tree: Tree) -> usize {
    match tree {
        Tree::Data => 0,
        Tree::Hints => 1,
        Tree::Meta => 2,
    }
}

/// An encoded write, with where each op's value starts within it.
pub(super) struct Record {
    /// The whole record, header included.
    pub bytes: Vec<u8>,
    /// Per op, the offset of its value from the record's start (for a remove, where an empty
    /// value would start).
    pub values: Vec<u64>,
}

/// Encodes `ops` as one record; refuses a write too large for the record's u32 lengths.
pub(super) fn encode(ops: &[WriteOp]) -> Result<Record, StorageError> {
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

/// Where a replayed put's value lies in its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ValueAt {
    /// Offset from the segment's start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Reads a segment's records in order and calls `apply` with each op of each whole record:
/// its tree, its key, and where a put's value lies (`None` for a remove). Answers the length
/// of the good part, the end of the last record that holds; the caller cuts anything after it.
pub(super) fn replay(
    mut segment: impl Read,
    mut apply: impl FnMut(Tree, &[u8], Option<ValueAt>),
) -> std::io::Result<u64> {
    let mut offset = 0u64;
    let mut header = [0u8; HEADER_BYTES];
    let mut payload = Vec::new();
    loop {
        match segment.read_exact(&mut header) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::UnexpectedEof => return Ok(offset),
            Err(error) => return Err(error),
        }
        let mut length = [0u8; 4];
        length.copy_from_slice(&header[..4]);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&header[4..]);
        let length = u32::from_le_bytes(length) as usize;
        payload.clear();
        if (&mut segment)
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
            let value = value.map(|(at, len)| ValueAt {
                offset: base + at as u64,
                len,
            });
            apply(tree, key, value);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tree_reads_back_from_its_byte() {
        for tree in Tree::ALL {
            assert_eq!(Tree::ALL[tree_slot(tree)], tree);
        }
    }
}
