//! A hash summary of a set of keys, compared level by level: the anti-entropy tree.
//!
//! Dynamo's replicas find what differs between them with Merkle trees, exchanging hashes top
//! down and descending only where they differ, so replicas in sync exchange a single hash.
//! A classic Merkle tree must be rehashed along a path on every write and rebuilt when keys
//! move; this one, like Riak's "tictac" trees, makes every node the XOR of the hashes of the
//! entries below it. XOR is its own inverse, so a write updates the tree in place — remove the
//! old entry hash, add the new one, one XOR per level — and the tree never needs a rebuild
//! while the node runs. The shape is fixed: [`LEVELS`] levels of fan-out [`FANOUT`] over
//! [`LEAVES`] leaf buckets, a key's bucket taken from the MD5 of the key.
//!
//! An entry's hash covers the key and its stored sibling set, so two replicas holding the same
//! versions of a key contribute the same hash, whatever order the versions arrived in.

/// Children per tree node.
pub const FANOUT: usize = 16;
/// Levels below the root; the leaves are the last.
pub const LEVELS: usize = 4;
/// Leaf buckets: `FANOUT ^ LEVELS`, the first two bytes of a key's MD5. A leaf holds about
/// 1/65536 of a node's keys (15 of a million), which is what an exchange reads for each leaf
/// that differs; the tree costs 1.1 MB per peer.
pub const LEAVES: usize = FANOUT * FANOUT * FANOUT * FANOUT;

/// The XOR-combinable hash of one entry.
pub type EntryHash = u128;

/// The leaf bucket a key falls in: the top 16 bits of MD5(key), so that a leaf is a range of
/// the key's partition (its first byte; see `crate::layout`), and a contiguous range of a
/// node's storage (`crate::node::keys`).
pub fn bucket(key: &[u8]) -> usize {
    bucket_of_digest(&md5::compute(key).0)
}

/// [`bucket`] from the key's MD5, for a caller that has it already.
pub fn bucket_of_digest(digest: &[u8; 16]) -> usize {
    (usize::from(digest[0]) << 8 | usize::from(digest[1])) % LEAVES
}

/// The partition (`crate::layout`) whose keys a leaf holds: a leaf is a range of one
/// partition, the partition being the MD5's first byte.
pub fn partition_of_leaf(leaf: usize) -> usize {
    (leaf % LEAVES) / (LEAVES / crate::layout::PARTITIONS)
}

/// The hash an entry contributes: the 128-bit xxh3 of the key's length, the key and the
/// stored bytes. Every write computes it twice on every replica with peers (the old entry
/// out, the new one in), so it is a fast hash rather than a cryptographic one: replicas are
/// not adversaries, and 128 bits make an accidental collision negligible.
pub fn entry_hash(key: &[u8], stored: &[u8]) -> EntryHash {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&(key.len() as u64).to_be_bytes());
    hasher.update(key);
    hasher.update(stored);
    hasher.digest128()
}

/// The name of [`entry_hash`], part of what two nodes must agree on to compare trees.
pub const ENTRY_HASH: &str = "xxh3-128";

/// One tree: `levels[0]` is the root (one hash), `levels[LEVELS]` the leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    levels: Vec<Vec<EntryHash>>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        let levels = (0..=LEVELS)
            .map(|level| vec![0; FANOUT.pow(level as u32)])
            .collect();
        Tree { levels }
    }

    /// Adds an entry to, or removes it from, the tree (the same operation: XOR).
    pub fn toggle(&mut self, bucket: usize, hash: EntryHash) {
        let mut index = bucket % LEAVES;
        for level in (0..=LEVELS).rev() {
            self.levels[level][index] ^= hash;
            index /= FANOUT;
        }
    }

    /// Replaces an entry's old hash with its new one; `None` where it was or is absent.
    pub fn update(&mut self, bucket: usize, old: Option<EntryHash>, new: Option<EntryHash>) {
        if old == new {
            return;
        }
        self.toggle(bucket, old.unwrap_or(0) ^ new.unwrap_or(0));
    }

    pub fn root(&self) -> EntryHash {
        self.levels[0][0]
    }

    /// The hashes of the children of `parents` (nodes of `level`), in order, `FANOUT` each.
    /// Out-of-range levels and parents yield nothing: they come from a peer, so any number
    /// may arrive, and none may overflow.
    pub fn children(&self, level: usize, parents: &[usize]) -> Vec<EntryHash> {
        let Some(below) = level.checked_add(1).and_then(|next| self.levels.get(next)) else {
            return Vec::new();
        };
        let mut hashes = Vec::with_capacity(parents.len().saturating_mul(FANOUT));
        for &parent in parents {
            let Some(start) = parent.checked_mul(FANOUT) else {
                continue;
            };
            if let Some(slice) = below.get(start..start.saturating_add(FANOUT)) {
                hashes.extend_from_slice(slice);
            }
        }
        hashes
    }

    /// Which children of `parents` at `level` differ from `theirs` (as [`Self::children`]
    /// returned them on the other side): the nodes to descend into next.
    pub fn differing_children(
        &self,
        level: usize,
        parents: &[usize],
        theirs: &[EntryHash],
    ) -> Vec<usize> {
        let ours = self.children(level, parents);
        let mut differing = Vec::new();
        let pairs = ours.chunks(FANOUT).zip(theirs.chunks(FANOUT));
        for (&parent, (mine, other)) in parents.iter().zip(pairs) {
            for (child, (a, b)) in mine.iter().zip(other).enumerate() {
                if a != b {
                    differing.push(parent * FANOUT + child);
                }
            }
        }
        differing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Builds a tree from key → stored bytes.
    fn tree_of(entries: &BTreeMap<String, String>) -> Tree {
        let mut tree = Tree::new();
        for (key, stored) in entries {
            tree.toggle(
                bucket(key.as_bytes()),
                entry_hash(key.as_bytes(), stored.as_bytes()),
            );
        }
        tree
    }

    /// The full top-down comparison two replicas run, returning the differing leaves.
    fn differing_leaves(ours: &Tree, theirs: &Tree) -> Vec<usize> {
        if ours.root() == theirs.root() {
            return Vec::new();
        }
        let mut frontier = vec![0];
        for level in 0..LEVELS {
            let their_children = theirs.children(level, &frontier);
            frontier = ours.differing_children(level, &frontier, &their_children);
        }
        frontier
    }

    /// The keys of `a` and `b` in the given leaves that are missing or different on the other side.
    fn differing_keys(
        a: &BTreeMap<String, String>,
        b: &BTreeMap<String, String>,
        leaves: &[usize],
    ) -> Vec<String> {
        let mut keys: Vec<String> = a
            .keys()
            .chain(b.keys())
            .filter(|k| leaves.contains(&bucket(k.as_bytes())))
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    fn replica(n: usize) -> BTreeMap<String, String> {
        (0..n)
            .map(|i| (format!("key-{i}"), format!("value-{i}")))
            .collect()
    }

    #[test]
    fn equal_sets_have_equal_trees_whatever_the_insertion_order() {
        let entries = replica(1000);
        let mut reversed = Tree::new();
        for (key, stored) in entries.iter().rev() {
            reversed.toggle(
                bucket(key.as_bytes()),
                entry_hash(key.as_bytes(), stored.as_bytes()),
            );
        }
        assert_eq!(tree_of(&entries), reversed);
        assert!(differing_leaves(&tree_of(&entries), &reversed).is_empty());
    }

    #[test]
    fn a_leaf_lies_in_its_keys_partition() {
        for i in 0..2000 {
            let key = format!("key-{i}");
            assert_eq!(
                partition_of_leaf(bucket(key.as_bytes())),
                crate::layout::Layout::partition_of(key.as_bytes()),
                "{key}"
            );
        }
    }

    #[test]
    fn removing_what_was_added_restores_the_empty_tree() {
        let mut tree = Tree::new();
        let hash = entry_hash(b"k", b"v");
        tree.update(bucket(b"k"), None, Some(hash));
        assert_ne!(tree.root(), 0);
        tree.update(bucket(b"k"), Some(hash), None);
        assert_eq!(tree, Tree::new());
    }

    #[test]
    fn a_peer_asking_for_nodes_that_do_not_exist_gets_nothing() {
        let tree = tree_of(&replica(100));
        assert!(tree.children(usize::MAX, &[0]).is_empty());
        assert!(tree.children(LEVELS, &[0]).is_empty());
        assert!(
            tree.children(0, &[usize::MAX, usize::MAX / FANOUT, 1])
                .is_empty()
        );
        assert_eq!(tree.children(0, &[0]).len(), FANOUT);
    }

    #[test]
    fn a_diff_finds_exactly_the_keys_that_differ() {
        let ours = replica(5000);
        let mut theirs = ours.clone();
        theirs.insert("key-17".into(), "changed".into()); // a different version
        theirs.remove("key-4242"); // missing on their side
        theirs.insert("only-theirs".into(), "x".into()); // missing on ours
        let leaves = differing_leaves(&tree_of(&ours), &tree_of(&theirs));
        assert!(leaves.len() <= 3, "{leaves:?}");
        let keys = differing_keys(&ours, &theirs, &leaves);
        assert_eq!(keys, vec!["key-17", "key-4242", "only-theirs"]);
    }

    #[test]
    fn an_empty_replica_differs_in_every_occupied_leaf() {
        let full = replica(2000);
        let leaves = differing_leaves(&tree_of(&full), &Tree::new());
        let occupied: std::collections::BTreeSet<usize> =
            full.keys().map(|k| bucket(k.as_bytes())).collect();
        assert_eq!(leaves, occupied.into_iter().collect::<Vec<_>>());
        assert_eq!(differing_keys(&full, &BTreeMap::new(), &leaves).len(), 2000);
    }

    #[test]
    fn out_of_range_requests_yield_nothing() {
        let tree = Tree::new();
        assert!(tree.children(LEVELS, &[0]).is_empty());
        assert!(tree.children(0, &[5]).is_empty());
        assert_eq!(tree.children(0, &[0]).len(), FANOUT);
    }
}
