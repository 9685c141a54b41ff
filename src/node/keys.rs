//! How a node's own copies are keyed in its engine: by partition and Merkle leaf first.
//!
//! A key `k` is stored under `0xFF, d0, d1, k`, where `d0 d1` are the first two bytes of
//! MD5(k). `d0` is the key's partition ([`crate::layout`]) and `d0 d1` its anti-entropy
//! leaf ([`crate::merkle::bucket`]), so the engine's key order puts a
//! partition, and within it a leaf, in one contiguous range: listing the keys of a leaf that
//! differs from a peer's is a range scan of that leaf, not a walk over everything stored, and
//! a whole partition can be read out in one scan.
//!
//! The leading `0xFF` tells these keys from those of a data directory written before
//! (the key itself): UTF-8 never contains the byte 0xFF, so no old key starts with it.
//! [`convert`] rewrites an old directory's keys once, at start.

use crate::error::Result;
use crate::merkle::LEAVES;
use crate::storage::{Engine, Tree, WriteOp};

/// Marks a key stored by partition and leaf; no UTF-8 key starts with it.
const MARK: u8 = 0xFF;
/// Bytes before the key itself: the mark and two bytes of MD5(key).
const PREFIX_BYTES: usize = 3;
/// The Meta entry that says a data directory's keys are all in this form.
const FORMAT_KEY: &[u8] = b"data_key_format";
const FORMAT: &[u8] = b"partition-leaf-v1";
/// Old keys rewritten per engine write while converting.
const CONVERT_BATCH: usize = 1024;

/// The engine key of `key`'s own copy.
pub fn data_key(key: &[u8]) -> Vec<u8> {
    let digest = md5::compute(key).0;
    let mut stored = Vec::with_capacity(PREFIX_BYTES + key.len());
    stored.extend_from_slice(&[MARK, digest[0], digest[1]]);
    stored.extend_from_slice(key);
    stored
}

/// The key an engine key stores; `None` for one not in this form.
pub fn user_key(stored: &[u8]) -> Option<&[u8]> {
    match stored {
        [MARK, _, _, key @ ..] => Some(key),
        _ => None,
    }
}

/// Where a leaf's keys lie in the engine's order: the `after` cursor that starts a scan at
/// the leaf's first key, and the key every one of them is below (`None` for the last leaf).
pub fn leaf_range(leaf: usize) -> (Vec<u8>, Option<Vec<u8>>) {
    // A leaf is a run of 16-bit prefixes (the first two bytes of the key's MD5).
    let shift = 16 - LEAVES.trailing_zeros();
    let first = (leaf % LEAVES) << shift;
    let next = first + (1 << shift);
    let after = match first.checked_sub(1) {
        // Keys greater than [MARK, p - 1, 0xFF...]: none of p - 1's keys, since a key never
        // holds 0xFF.
        Some(before) => vec![MARK, (before >> 8) as u8, before as u8, MARK],
        None => vec![MARK],
    };
    let before = (next <= 0xFFFF).then(|| vec![MARK, (next >> 8) as u8, next as u8]);
    (after, before)
}

/// The partition of a key's own copy, from its engine key (the first byte of MD5 follows the
/// mark); `None` for anything else.
pub fn partition_of_stored(stored: &[u8]) -> Option<usize> {
    match stored {
        [MARK, first, _, ..] => Some(usize::from(*first)),
        _ => None,
    }
}

/// Where a partition's keys lie in the engine's order, as [`leaf_range`] gives a leaf's: a
/// partition is the run of leaves that share the first byte of MD5.
pub fn partition_range(partition: usize) -> (Vec<u8>, Option<Vec<u8>>) {
    let per_partition = LEAVES / crate::layout::PARTITIONS;
    let first = partition % crate::layout::PARTITIONS * per_partition;
    (leaf_range(first).0, leaf_range(first + per_partition - 1).1)
}

/// Calls `visit` with each key of `leaf` (the key itself, not its engine key) and its stored
/// bytes, in pages of [`SCAN_PAGE`]: a range scan of the leaf, reading nothing outside it.
pub fn scan_leaf(
    engine: &dyn Engine,
    leaf: usize,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> Result<()> {
    let (mut after, before) = leaf_range(leaf);
    loop {
        let page = engine.scan_range(Tree::Data, Some(&after), before.as_deref(), SCAN_PAGE)?;
        let full = page.len() == SCAN_PAGE;
        for (stored, value) in &page {
            if let Some(key) = user_key(stored) {
                visit(key, value);
            }
        }
        match page.into_iter().last() {
            Some((stored, _)) if full => after = stored,
            _ => return Ok(()),
        }
    }
}

/// Entries read per engine scan of a leaf.
const SCAN_PAGE: usize = 256;

/// Rewrites the keys of a data directory written before keys were stored by partition (the
/// key itself as the engine key), once: each batch puts keys in the new form and removes the
/// old ones in one engine write, so a crash midway leaves every key in one form or the other,
/// and the next start goes on where it stopped. Returns how many keys it rewrote.
pub fn convert(engine: &dyn Engine) -> Result<usize> {
    if engine.get(Tree::Meta, FORMAT_KEY)?.as_deref() == Some(FORMAT) {
        return Ok(0);
    }
    let mut converted = 0;
    loop {
        // Old keys sort before every new one (UTF-8 never starts with 0xFF): the first page
        // is old keys while any are left.
        let page = engine.scan(Tree::Data, None, CONVERT_BATCH)?;
        let old: Vec<_> = page
            .into_iter()
            .take_while(|(key, _)| user_key(key).is_none())
            .collect();
        if old.is_empty() {
            break;
        }
        let mut writes = Vec::with_capacity(old.len() * 2);
        for (key, value) in old {
            writes.push(WriteOp::put(Tree::Data, data_key(&key), value));
            writes.push(WriteOp::remove(Tree::Data, key));
        }
        converted += writes.len() / 2;
        engine.write(writes)?;
    }
    engine.write(vec![WriteOp::put(Tree::Meta, FORMAT_KEY, FORMAT.to_vec())])?;
    if converted > 0 {
        tracing::info!(
            converted,
            "rewrote the keys of a data directory from before partitions"
        );
    }
    Ok(converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle;
    use crate::storage::StorageConfig;

    fn engine() -> std::sync::Arc<dyn Engine> {
        crate::storage::open(&StorageConfig::InMemory).expect("an in-memory engine")
    }

    #[test]
    fn a_key_is_stored_under_its_partition_and_leaf() {
        for key in ["", "k", "ключ", "a much longer key with spaces"] {
            let stored = data_key(key.as_bytes());
            assert_eq!(user_key(&stored), Some(key.as_bytes()));
            assert_eq!(
                usize::from(stored[1]),
                crate::layout::Layout::partition_of(key.as_bytes())
            );
            let leaf = merkle::bucket(key.as_bytes());
            let (after, before) = leaf_range(leaf);
            assert!(stored[..] > after[..], "{key:?} after its leaf's start");
            assert!(
                before.is_none_or(|before| stored < before),
                "{key:?} within its leaf"
            );
        }
        assert_eq!(user_key(b"plain"), None);
        assert_eq!(user_key(&[MARK, 1]), None);
    }

    /// Scanning one leaf's range yields exactly the keys of that leaf.
    #[test]
    fn a_leaf_is_one_contiguous_range() {
        let engine = engine();
        let keys: Vec<String> = (0..3000).map(|i| format!("key-{i}")).collect();
        let writes = keys
            .iter()
            .map(|key| WriteOp::put(Tree::Data, data_key(key.as_bytes()), b"v".to_vec()))
            .collect();
        engine.write(writes).expect("write");
        for leaf in [0, 1, 7, 100, 2048, LEAVES - 1] {
            let mut scanned = Vec::new();
            scan_leaf(&*engine, leaf, |key, _| {
                scanned.push(String::from_utf8(key.to_vec()).expect("utf-8"));
            })
            .expect("scan");
            let mut expected: Vec<String> = keys
                .iter()
                .filter(|key| merkle::bucket(key.as_bytes()) == leaf)
                .cloned()
                .collect();
            let mut got = scanned.clone();
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "leaf {leaf}");
        }
    }

    #[test]
    fn an_old_directory_is_converted_once() {
        let engine = engine();
        let old: Vec<WriteOp> = (0..2500)
            .map(|i| WriteOp::put(Tree::Data, format!("key-{i}").into_bytes(), vec![i as u8]))
            .collect();
        engine.write(old).expect("write");
        // A key already in the new form (a conversion stopped midway) is left alone.
        engine
            .write(vec![WriteOp::put(
                Tree::Data,
                data_key(b"new"),
                b"n".to_vec(),
            )])
            .expect("write");
        assert_eq!(convert(&*engine).expect("converts"), 2500);
        assert_eq!(convert(&*engine).expect("once"), 0);
        for i in [0usize, 1234, 2499] {
            let key = format!("key-{i}");
            assert_eq!(engine.get(Tree::Data, key.as_bytes()).expect("get"), None);
            assert_eq!(
                engine
                    .get(Tree::Data, &data_key(key.as_bytes()))
                    .expect("get"),
                Some(vec![i as u8])
            );
        }
        assert_eq!(
            engine.get(Tree::Data, &data_key(b"new")).expect("get"),
            Some(b"n".to_vec())
        );
    }
}
