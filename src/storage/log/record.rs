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
//! [`replay`] reads records in order. A record that does not hold (short, checksum wrong, or
//! a payload that does not parse) starts a run of bytes that cannot be trusted, and replay
//! then *resynchronises*: it looks byte by byte for the next offset where a whole record
//! holds, and is confirmed ([`resync`]), hands out the records from there on, and reports
//! the run it passed over. Whether a run is a crash's torn tail or damage is not for the codec
//! to say: that depends on where the segment stands in the log ([`super::index`]). A record's
//! ops are handed out only once all of it has been read and checked, which is what makes a
//! multi-op write atomic across a crash.
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

/// A run of bytes in a segment that are not whole records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Unheld {
    /// Offset of its first byte.
    pub offset: u64,
    pub bytes: u64,
    /// How many records it held, as far as can be told: its length fields, followed from its
    /// start, land exactly on its end after this many records; 1 when they do not.
    pub records: u64,
}

/// Where a whole record starts, and its header. The header holds the payload's checksum, so
/// the last record's mark identifies what a segment holds: a hint file is matched to its
/// segment by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub offset: u64,
    pub header: [u8; HEADER_BYTES],
}

/// What [`replay`] found in a segment, besides the ops it handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    /// Every byte read: the segment's length.
    pub len: u64,
    /// Where the last whole record ends: the segment's length once a torn tail is cut.
    pub good_len: u64,
    /// The runs that are not whole records, in order. Each is followed by a whole record,
    /// except the last one when `good_len < len`: that one runs to the end ([`Replayed::tail`]).
    pub unheld: Vec<Unheld>,
    /// Whether a record that holds, though unconfirmed, lies inside the tail: a crash tears
    /// only the last record, so such a tail is not a crash's.
    pub record_in_tail: bool,
    /// The last whole record.
    pub last_record: Option<Mark>,
}

impl Replayed {
    /// The run after the last whole record, to the end, if there is one.
    pub fn tail(&self) -> Option<Unheld> {
        if self.good_len < self.len {
            self.unheld.last().copied()
        } else {
            None
        }
    }

    /// The runs followed by a whole record of the same segment.
    pub fn inner(&self) -> &[Unheld] {
        let inner = self.unheld.len() - usize::from(self.tail().is_some());
        &self.unheld[..inner]
    }
}

/// Reads a segment's records in order and calls `apply` with each op of each whole record:
/// its tree, its key, and where a put's value lies (`None` for a remove). Runs of bytes that
/// are not whole records are passed over (see the module documentation) and reported.
///
/// Records are read as a stream while they hold; from the first run that does not, the rest
/// of the segment is read into memory to be searched.
pub(super) fn replay(
    mut segment: impl Read,
    mut apply: impl FnMut(Tree, &[u8], Option<ValueAt>),
) -> std::io::Result<Replayed> {
    let mut replayed = Replayed::default();
    let mut header = [0u8; HEADER_BYTES];
    let mut payload = Vec::new();
    loop {
        let offset = replayed.good_len;
        let got = read_up_to(&mut segment, &mut header)?;
        if got == 0 {
            replayed.len = offset;
            return Ok(replayed);
        }
        payload.clear();
        if got == HEADER_BYTES {
            let length = u64::from(length_of(&header));
            (&mut segment).take(length).read_to_end(&mut payload)?;
        }
        if got < HEADER_BYTES || !holds(&header, &payload) {
            let mut rest = Vec::with_capacity(got + payload.len());
            rest.extend_from_slice(&header[..got]);
            rest.extend_from_slice(&payload);
            segment.read_to_end(&mut rest)?;
            replay_rest(&rest, offset, &mut replayed, &mut apply);
            return Ok(replayed);
        }
        hand_out(offset, &header, &payload, &mut replayed, &mut apply);
    }
}

/// Fills `buf` as far as the reader goes; answers how many bytes it got.
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match reader.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(error) if error.kind() == ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(got)
}

fn length_of(header: &[u8; HEADER_BYTES]) -> u32 {
    u32::from_le_bytes([header[0], header[1], header[2], header[3]])
}

/// Does the record with this header and payload hold: its whole payload there, parsing, and
/// matching its checksum? (Parsing first: it costs a walk over the ops' headers only, so a
/// search through damaged bytes rarely hashes anything.)
fn holds(header: &[u8; HEADER_BYTES], payload: &[u8]) -> bool {
    let mut checksum = [0u8; 8];
    checksum.copy_from_slice(&header[4..]);
    payload.len() == length_of(header) as usize
        && walk(payload, |_, _, _| {})
        && xxhash_rust::xxh3::xxh3_64(payload) == u64::from_le_bytes(checksum)
}

/// Hands out the ops of a record that holds, at `offset`.
fn hand_out(
    offset: u64,
    header: &[u8; HEADER_BYTES],
    payload: &[u8],
    replayed: &mut Replayed,
    apply: &mut impl FnMut(Tree, &[u8], Option<ValueAt>),
) {
    let base = offset + HEADER_BYTES as u64;
    walk(payload, |tree, key, value| {
        let value = value.map(|(at, len)| ValueAt {
            offset: base + at as u64,
            len,
        });
        apply(tree, key, value);
    });
    replayed.last_record = Some(Mark {
        offset,
        header: *header,
    });
    replayed.good_len = base + payload.len() as u64;
}

/// The size of the record at `at` of `bytes` if it holds (whole within `bytes`).
fn record_at(bytes: &[u8], at: usize) -> Option<usize> {
    let (header, payload) = split_record(bytes, at)?;
    holds(header, payload).then_some(HEADER_BYTES + payload.len())
}

/// The header and payload of a record at `at`, if its length stays within `bytes`.
fn split_record(bytes: &[u8], at: usize) -> Option<(&[u8; HEADER_BYTES], &[u8])> {
    let rest = bytes.get(at..)?;
    let header: &[u8; HEADER_BYTES] = rest.get(..HEADER_BYTES)?.try_into().ok()?;
    let end = HEADER_BYTES.checked_add(length_of(header) as usize)?;
    Some((header, rest.get(HEADER_BYTES..end)?))
}

/// Replays `bytes`, the rest of a segment from `base`, where a record did not hold:
/// resynchronising after each run that is not whole records.
fn replay_rest(
    bytes: &[u8],
    base: u64,
    replayed: &mut Replayed,
    apply: &mut impl FnMut(Tree, &[u8], Option<ValueAt>),
) {
    let mut at = 0;
    while at < bytes.len() {
        if let Some((header, payload)) = split_record(bytes, at)
            && holds(header, payload)
        {
            hand_out(base + at as u64, header, payload, replayed, apply);
            at += HEADER_BYTES + payload.len();
            continue;
        }
        let end = match resync(bytes, at) {
            Resync::At(next) => next,
            Resync::End { record_inside } => {
                replayed.record_in_tail = record_inside;
                bytes.len()
            }
        };
        replayed.unheld.push(Unheld {
            offset: base + at as u64,
            bytes: (end - at) as u64,
            records: records_in(&bytes[at..end]),
        });
        at = end;
    }
    replayed.len = base + bytes.len() as u64;
}

/// Where [`resync`] found the next record to trust.
#[derive(Debug, PartialEq, Eq)]
enum Resync {
    At(usize),
    /// Nowhere: the rest is one run. `record_inside`: a record held somewhere in it, though
    /// unconfirmed.
    End {
        record_inside: bool,
    },
}

/// The first offset after `start` where a record holds and is confirmed: it ends the segment,
/// or another record holds right after it, or it starts exactly where the record that did
/// not hold at `start` says it ends (its length field intact, its payload damaged).
///
/// A false match needs a payload that parses to exactly its length and a 64-bit xxh3 that
/// agrees, and then the confirmation too. The search is linear in the bytes searched: a
/// candidate whose length field runs past the end, or whose payload does not parse, is
/// passed over without hashing.
fn resync(bytes: &[u8], start: usize) -> Resync {
    let claimed_end =
        split_record(bytes, start).map(|(_, payload)| start + HEADER_BYTES + payload.len());
    // The damaged record's own length first: where it says it ends, a record that holds (or
    // the end of the segment) is where the log goes on. Searching byte by byte before it
    // could take records that lie inside its value (a client may store anything, a copy of
    // a segment included) for the log's own.
    if let Some(end) = claimed_end
        && end > start
        && (end == bytes.len() || record_at(bytes, end).is_some())
    {
        return Resync::At(end);
    }
    let mut record_inside = false;
    for candidate in start + 1..bytes.len() {
        let Some(size) = record_at(bytes, candidate) else {
            continue;
        };
        record_inside = true;
        let end = candidate + size;
        if end == bytes.len() || claimed_end == Some(candidate) || record_at(bytes, end).is_some() {
            return Resync::At(candidate);
        }
    }
    Resync::End { record_inside }
}

/// How many records a run held: its length fields, followed from its start, land on its end
/// after this many (each at least a payload's 4 bytes long); 1 when they do not.
fn records_in(run: &[u8]) -> u64 {
    let mut at = 0usize;
    let mut records = 0;
    while at < run.len() {
        let Some(length) = run.get(at..at + 4) else {
            return 1;
        };
        let length = u32::from_le_bytes([length[0], length[1], length[2], length[3]]);
        if length < 4 {
            return 1;
        }
        at = at.saturating_add(HEADER_BYTES + length as usize);
        records += 1;
    }
    if at == run.len() { records } else { 1 }
}

/// Walks the ops of a payload, calling `each` with each op's tree, key, and where its value
/// lies (offset in the payload, length) for a put; answers whether the whole payload parses.
/// `each` may have been called for the ops before a payload stops parsing: call it with
/// effects only on a payload known to parse.
fn walk<'a>(payload: &'a [u8], mut each: impl FnMut(Tree, &'a [u8], Option<(usize, u32)>)) -> bool {
    fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
        let bytes: [u8; 4] = payload.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(u32::from_le_bytes(bytes))
    }
    let mut ops = || -> Option<usize> {
        let count = u32_at(payload, 0)?;
        let mut at = 4;
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
            each(tree, key, is_put.then_some((value_start, value_len)));
            at = value_end;
        }
        Some(at)
    };
    ops() == Some(payload.len())
}

#[cfg(test)]
type DecodedOp<'a> = (Tree, &'a [u8], Option<(usize, u32)>);

/// The ops of a payload: tree, key, and where the value lies (offset in the payload, length)
/// for a put. `None` if it does not parse.
#[cfg(test)]
fn decode(payload: &[u8]) -> Option<Vec<DecodedOp<'_>>> {
    let mut ops = Vec::new();
    walk(payload, |tree, key, value| ops.push((tree, key, value))).then_some(ops)
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
    type ReplayedOp = (Tree, Vec<u8>, Option<Vec<u8>>);

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

    fn as_replayed(ops: &[WriteOp]) -> Vec<ReplayedOp> {
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
    fn replay_all(bytes: &[u8]) -> (Vec<ReplayedOp>, u64) {
        let (ops, replayed) = replay_report(bytes);
        (ops, replayed.good_len)
    }

    /// Replays `bytes`: the ops handed out, as [`replay_all`], and the whole report.
    fn replay_report(bytes: &[u8]) -> (Vec<ReplayedOp>, Replayed) {
        let mut ops = Vec::new();
        let replayed = replay(bytes, |tree, key, value| {
            let value = value.map(|at| {
                let start = usize::try_from(at.offset).expect("offset");
                bytes[start..start + at.len as usize].to_vec()
            });
            ops.push((tree, key.to_vec(), value));
        })
        .expect("replay from memory");
        assert_eq!(replayed.len, bytes.len() as u64, "replay reads every byte");
        (ops, replayed)
    }

    /// The ops of the first `records` writes.
    fn ops_of(writes: &[Vec<WriteOp>], records: usize) -> Vec<ReplayedOp> {
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

        /// A byte changed anywhere in a record (header or payload) loses that record only:
        /// replay passes over it, reports it as one run, and hands out every other record.
        /// (Before replay resynchronised, it stopped at the damaged record and the caller cut
        /// everything after it.)
        #[test]
        fn a_damaged_byte_loses_its_record_only(
            writes in vec(arb_write(), 1..8),
            position in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let (mut bytes, ends) = segment_of(&writes);
            let position = position.index(bytes.len());
            bytes[position] ^= flip;
            let damaged = ends.iter().filter(|end| **end <= position as u64).count();
            let start = if damaged == 0 { 0 } else { ends[damaged - 1] };
            let (ops, replayed) = replay_report(&bytes);
            let mut expected = ops_of(&writes, damaged);
            expected.extend(writes[damaged + 1..].iter().flat_map(|ops| as_replayed(ops)));
            prop_assert_eq!(ops, expected);
            prop_assert_eq!(replayed.unheld.len(), 1);
            let run = replayed.unheld[0];
            prop_assert_eq!((run.offset, run.bytes), (start, ends[damaged] - start));
            prop_assert!(run.records >= 1);
            let last = damaged + 1 == writes.len();
            prop_assert_eq!(replayed.tail().is_some(), last);
            prop_assert_eq!(replayed.good_len, if last { start } else { bytes.len() as u64 });
            prop_assert!(!replayed.record_in_tail);
        }

        /// Whatever the bytes, replay reads them all, and its runs and records tile the
        /// segment: runs in order, none overlapping, the tail (if any) after the last record.
        #[test]
        fn runs_tile_any_bytes(bytes in vec(any::<u8>(), 0..300)) {
            let (_, replayed) = replay_report(&bytes);
            let mut at = 0;
            for run in &replayed.unheld {
                prop_assert!(run.offset >= at && run.bytes > 0 && run.records >= 1);
                at = run.offset + run.bytes;
            }
            prop_assert!(at <= bytes.len() as u64);
            prop_assert!(replayed.good_len <= replayed.len);
            if let Some(tail) = replayed.tail() {
                prop_assert_eq!(tail.offset, replayed.good_len);
                prop_assert_eq!(tail.offset + tail.bytes, replayed.len);
            }
        }
    }

    /// A piece of a segment made up for a table test.
    #[derive(Debug, Clone, Copy)]
    enum Piece {
        /// The `i`-th record, whole.
        Whole(usize),
        /// The `i`-th record with its byte at `at` flipped.
        Flipped(usize, usize),
        /// The `i`-th record with its length field set to `len`.
        Length(usize, u32),
        /// The first `keep` bytes of the `i`-th record.
        Cut(usize, usize),
        /// `n` zero bytes.
        Zeros(usize),
        /// `n` bytes of garbage.
        Garbage(usize),
    }

    /// The `i`-th record of the table tests: one put, 47 bytes.
    fn table_record(i: usize) -> Vec<u8> {
        let op = WriteOp::put(
            Tree::Data,
            format!("key-{i}"),
            format!("value-{i}-abcdefghi"),
        );
        encode(&[op]).expect("encode").bytes
    }

    impl Piece {
        fn bytes(self) -> Vec<u8> {
            match self {
                Piece::Whole(i) => table_record(i),
                Piece::Flipped(i, at) => {
                    let mut bytes = table_record(i);
                    bytes[at] ^= 0x5a;
                    bytes
                }
                Piece::Length(i, len) => {
                    let mut bytes = table_record(i);
                    bytes[..4].copy_from_slice(&len.to_le_bytes());
                    bytes
                }
                Piece::Cut(i, keep) => table_record(i)[..keep].to_vec(),
                Piece::Zeros(n) => vec![0; n],
                Piece::Garbage(n) => (0..n).map(|i| (i * 37 + 0xab) as u8).collect(),
            }
        }
    }

    /// Damage of every shape, at the start, middle and end of a segment: which records come
    /// back, and which runs of pieces are reported (first piece, end piece, records in it).
    #[test]
    fn damage_of_every_shape_loses_only_the_damaged_records() {
        use Piece::*;
        const PAYLOAD: usize = 40;
        const CHECKSUM: usize = 6;
        type Case = (
            &'static str,
            Vec<Piece>,
            Vec<(usize, usize, u64)>,
            bool,
            bool,
        );
        let cases: Vec<Case> = vec![
            // (what, pieces, runs, a tail run, a record inside the tail)
            (
                "first record's payload",
                vec![Flipped(0, PAYLOAD), Whole(1), Whole(2)],
                vec![(0, 1, 1)],
                false,
                false,
            ),
            (
                "middle record's checksum",
                vec![Whole(0), Flipped(1, CHECKSUM), Whole(2), Whole(3)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "last record's payload",
                vec![Whole(0), Whole(1), Flipped(2, PAYLOAD)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "length field past the end",
                vec![Whole(0), Length(1, u32::MAX), Whole(2), Whole(3)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "length field shortened",
                vec![Whole(0), Length(1, 4), Whole(2), Whole(3)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "length field of the last record",
                vec![Whole(0), Whole(1), Length(2, 1000)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "two damaged ranges",
                vec![
                    Whole(0),
                    Flipped(1, PAYLOAD),
                    Whole(2),
                    Whole(3),
                    Flipped(4, CHECKSUM),
                    Whole(5),
                ],
                vec![(1, 2, 1), (4, 5, 1)],
                false,
                false,
            ),
            (
                "two damaged records side by side",
                vec![
                    Whole(0),
                    Flipped(1, PAYLOAD),
                    Flipped(2, PAYLOAD),
                    Whole(3),
                    Whole(4),
                ],
                vec![(1, 3, 2)],
                false,
                false,
            ),
            (
                "one whole record between two damaged ones",
                vec![
                    Whole(0),
                    Flipped(1, PAYLOAD),
                    Whole(2),
                    Flipped(3, PAYLOAD),
                    Whole(4),
                ],
                vec![(1, 2, 1), (3, 4, 1)],
                false,
                false,
            ),
            (
                "a record cut short in the middle",
                vec![Whole(0), Cut(1, 37), Whole(2), Whole(3)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "zeros in the middle",
                vec![Whole(0), Zeros(4096), Whole(1), Whole(2)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "zeros at the start",
                vec![Zeros(100), Whole(0), Whole(1)],
                vec![(0, 1, 1)],
                false,
                false,
            ),
            (
                "a torn last record",
                vec![Whole(0), Whole(1), Cut(2, 30)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "a torn header",
                vec![Whole(0), Whole(1), Cut(2, 5)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "garbage appended",
                vec![Whole(0), Whole(1), Garbage(100)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "zeros appended",
                vec![Whole(0), Whole(1), Zeros(4096)],
                vec![(2, 3, 1)],
                true,
                false,
            ),
            (
                "garbage, then a last whole record",
                vec![Whole(0), Garbage(50), Whole(1)],
                vec![(1, 2, 1)],
                false,
                false,
            ),
            (
                "garbage around a lone whole record at the end",
                vec![Whole(0), Garbage(30), Whole(1), Garbage(30)],
                vec![(1, 4, 1)],
                true,
                true,
            ),
        ];
        for (what, pieces, runs, tail, record_in_tail) in cases {
            let mut bytes = Vec::new();
            let mut starts = Vec::new();
            let mut expected = Vec::new();
            for (j, piece) in pieces.iter().enumerate() {
                starts.push(bytes.len() as u64);
                bytes.extend(piece.bytes());
                let in_a_run = runs
                    .iter()
                    .any(|&(first, end, _)| (first..end).contains(&j));
                if let (Whole(i), false) = (piece, in_a_run) {
                    let op = WriteOp::put(
                        Tree::Data,
                        format!("key-{i}"),
                        format!("value-{i}-abcdefghi"),
                    );
                    expected.extend(as_replayed(&[op]));
                }
            }
            starts.push(bytes.len() as u64);
            let (ops, replayed) = replay_report(&bytes);
            assert_eq!(ops, expected, "{what}: the records handed out");
            let found: Vec<(u64, u64, u64)> = replayed
                .unheld
                .iter()
                .map(|run| (run.offset, run.offset + run.bytes, run.records))
                .collect();
            let runs: Vec<(u64, u64, u64)> = runs
                .iter()
                .map(|&(first, end, records)| (starts[first], starts[end], records))
                .collect();
            assert_eq!(found, runs, "{what}: the runs");
            assert_eq!(replayed.tail().is_some(), tail, "{what}: a tail");
            assert_eq!(
                replayed.inner().len(),
                runs.len() - usize::from(tail),
                "{what}"
            );
            assert_eq!(
                replayed.record_in_tail, record_in_tail,
                "{what}: a record in the tail"
            );
            let good = if tail {
                runs.last().expect("a run").0
            } else {
                bytes.len() as u64
            };
            assert_eq!(replayed.good_len, good, "{what}: the good part");
        }
    }

    /// The search after damage stays linear: a megabyte of garbage before a record is passed
    /// over quickly, however its length fields read.
    /// A value may hold anything, records of a segment included: damage to the record
    /// holding it loses that record, and the records inside its value are not taken for the
    /// log's own.
    #[test]
    fn records_inside_a_damaged_value_are_not_replayed() {
        let inner = vec![
            vec![WriteOp::put(
                Tree::Data,
                b"old".to_vec(),
                b"resurrected".to_vec(),
            )],
            vec![WriteOp::put(
                Tree::Data,
                b"old2".to_vec(),
                b"resurrected".to_vec(),
            )],
        ];
        let (embedded, _) = segment_of(&inner);
        let writes = vec![
            vec![WriteOp::put(Tree::Data, b"a".to_vec(), b"1".to_vec())],
            vec![WriteOp::put(
                Tree::Data,
                b"backup".to_vec(),
                embedded.clone(),
            )],
            vec![WriteOp::put(Tree::Data, b"b".to_vec(), b"2".to_vec())],
        ];
        let (mut bytes, ends) = segment_of(&writes);
        // A byte of the value before the embedded records: the length field is intact.
        let value_start = ends[1] as usize - embedded.len();
        bytes[value_start - 1] ^= 0x01;
        let (ops, replayed) = replay_report(&bytes);
        let mut expected = ops_of(&writes, 1);
        expected.extend(as_replayed(&writes[2]));
        assert_eq!(ops, expected, "only the damaged record is lost");
        assert_eq!(replayed.unheld.len(), 1);
        assert_eq!(
            (replayed.unheld[0].offset, replayed.unheld[0].bytes),
            (ends[0], ends[1] - ends[0])
        );
    }

    #[test]
    fn resynchronising_over_a_megabyte_is_quick() {
        let mut bytes: Vec<u8> = (0..1 << 20).map(|i: usize| (i * 131 + 7) as u8).collect();
        for (at, len) in [(0usize, 900_000u32), (4096, 2_000_000), (65_536, 5)] {
            bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
        }
        bytes.extend(table_record(0));
        bytes.extend(table_record(1));
        let started = std::time::Instant::now();
        let (ops, replayed) = replay_report(&bytes);
        assert_eq!(ops.len(), 2);
        assert_eq!(replayed.unheld.len(), 1);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
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
