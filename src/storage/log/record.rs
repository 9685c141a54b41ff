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
    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_tree_reads_back_from_its_byte() {
        for tree in Tree::ALL {
            assert_eq!(Tree::ALL[tree_slot(tree)], tree);
        }
    }

    /// An op as replay hands it back: tree, key, and the value read where replay says it lies.
    type Replayed = (Tree, Vec<u8>, Option<Vec<u8>>);

    fn arb_op() -> impl Strategy<Value = WriteOp> {
        (
            prop::sample::select(Tree::ALL.to_vec()),
            vec(any::<u8>(), 0..40),
            prop::option::of(vec(any::<u8>(), 0..80)),
        )
            .prop_map(|(tree, key, value)| WriteOp { tree, key, value })
    }

    /// One write: a record's ops (an empty write is a valid record too).
    fn arb_write() -> impl Strategy<Value = Vec<WriteOp>> {
        vec(arb_op(), 0..6)
    }

    fn as_replayed(ops: &[WriteOp]) -> Vec<Replayed> {
        ops.iter()
            .map(|op| (op.tree, op.key.clone(), op.value.clone()))
            .collect()
    }

    /// The records of `writes` one after another, as a segment holds them, with where each
    /// record ends.
    fn segment_of(writes: &[Vec<WriteOp>]) -> (Vec<u8>, Vec<u64>) {
        let mut bytes = Vec::new();
        let mut ends = Vec::new();
        for ops in writes {
            bytes.extend(encode(ops).expect("encode").bytes);
            ends.push(bytes.len() as u64);
        }
        (bytes, ends)
    }

    /// Replays `bytes`: the ops handed out, each value read back from `bytes` where replay
    /// says it lies, and the length of the good part.
    fn replay_all(bytes: &[u8]) -> (Vec<Replayed>, u64) {
        let mut ops = Vec::new();
        let good = replay(bytes, |tree, key, value| {
            let value = value.map(|at| {
                let start = usize::try_from(at.offset).expect("offset");
                bytes[start..start + at.len as usize].to_vec()
            });
            ops.push((tree, key.to_vec(), value));
        })
        .expect("replay from memory");
        (ops, good)
    }

    /// The ops of the first `records` writes.
    fn ops_of(writes: &[Vec<WriteOp>], records: usize) -> Vec<Replayed> {
        writes[..records]
            .iter()
            .flat_map(|ops| as_replayed(ops))
            .collect()
    }

    proptest! {
        /// The header holds the payload's length and checksum, the payload decodes to the
        /// ops in order, and each put's value lies where `encode` says it starts.
        #[test]
        fn a_record_decodes_to_the_write_it_encodes(ops in arb_write()) {
            let record = encode(&ops).expect("encode");
            let payload = &record.bytes[HEADER_BYTES..];
            let length = u32::from_le_bytes(record.bytes[..4].try_into().expect("4 bytes"));
            prop_assert_eq!(length as usize, payload.len());
            let checksum = record.bytes[4..HEADER_BYTES].try_into().expect("8 bytes");
            prop_assert_eq!(u64::from_le_bytes(checksum), xxhash_rust::xxh3::xxh3_64(payload));
            let decoded = decode(payload).expect("a record encode wrote parses");
            prop_assert_eq!(decoded.len(), ops.len());
            prop_assert_eq!(record.values.len(), ops.len());
            for ((op, (tree, key, value)), start) in ops.iter().zip(decoded).zip(&record.values) {
                prop_assert_eq!(tree, op.tree);
                prop_assert_eq!(key, op.key.as_slice());
                let start = usize::try_from(*start).expect("offset");
                match (&op.value, value) {
                    (Some(written), Some((at, len))) => {
                        prop_assert_eq!(HEADER_BYTES + at, start);
                        prop_assert_eq!(len as usize, written.len());
                        let stored = &record.bytes[start..start + written.len()];
                        prop_assert_eq!(stored, written.as_slice());
                    }
                    (None, None) => {}
                    (written, decoded) => {
                        prop_assert!(false, "{written:?} came back as {decoded:?}")
                    }
                }
            }
        }

        /// A segment of whole records replays to every op of every record, in order, and
        /// all of it is good.
        #[test]
        fn replay_reads_back_every_record_in_order(writes in vec(arb_write(), 0..8)) {
            let (bytes, _) = segment_of(&writes);
            let (ops, good) = replay_all(&bytes);
            prop_assert_eq!(ops, ops_of(&writes, writes.len()));
            prop_assert_eq!(good, bytes.len() as u64);
        }

        /// A segment cut at any byte (a crash in the middle of a `pwrite`) replays to the
        /// records that lie wholly before the cut, and its good part ends after the last of
        /// them: the torn record is dropped whole.
        #[test]
        fn a_torn_tail_is_cut_after_the_last_whole_record(
            writes in vec(arb_write(), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let (bytes, ends) = segment_of(&writes);
            let cut = cut.index(bytes.len() + 1);
            let whole = ends.iter().filter(|end| **end <= cut as u64).count();
            let (ops, good) = replay_all(&bytes[..cut]);
            prop_assert_eq!(ops, ops_of(&writes, whole));
            prop_assert_eq!(good, if whole == 0 { 0 } else { ends[whole - 1] });
        }

        /// A byte changed anywhere in a record (header or payload) stops replay at that
        /// record: nothing from it or after it is handed out.
        #[test]
        fn a_damaged_byte_stops_replay_at_its_record(
            writes in vec(arb_write(), 1..8),
            position in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, ends) = segment_of(&writes);
            let position = position.index(bytes.len());
            bytes[position] ^= flip;
            let damaged = ends.iter().filter(|end| **end <= position as u64).count();
            let (ops, good) = replay_all(&bytes);
            prop_assert_eq!(ops, ops_of(&writes, damaged));
            prop_assert_eq!(good, if damaged == 0 { 0 } else { ends[damaged - 1] });
        }
    }

    /// A payload whose checksum holds but which does not parse (here an op kind that does
    /// not exist) is cut like a torn one.
    #[test]
    fn a_record_that_does_not_parse_is_cut_though_its_checksum_holds() {
        let good = encode(&[WriteOp::put(Tree::Data, "k", "v")]).expect("encode");
        let mut bad = encode(&[WriteOp::put(Tree::Meta, "k", "v")]).expect("encode");
        bad.bytes[HEADER_BYTES + 5] = 2;
        let checksum = xxhash_rust::xxh3::xxh3_64(&bad.bytes[HEADER_BYTES..]);
        bad.bytes[4..HEADER_BYTES].copy_from_slice(&checksum.to_le_bytes());
        let bytes = [good.bytes.as_slice(), &bad.bytes].concat();
        let (ops, length) = replay_all(&bytes);
        assert_eq!(ops, vec![(Tree::Data, b"k".to_vec(), Some(b"v".to_vec()))]);
        assert_eq!(length, good.bytes.len() as u64);
    }

    /// A length that runs past the end of the segment makes a torn record, whatever it says.
    #[test]
    fn a_length_past_the_end_is_a_torn_record() {
        let mut record = encode(&[WriteOp::remove(Tree::Hints, "k")]).expect("encode");
        record.bytes[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(replay_all(&record.bytes), (Vec::new(), 0));
    }
}
