//! An engine that keeps everything in memory: one `BTreeMap` per tree behind one lock.
//!
//! It backs `--in-memory` nodes and tests. A single `RwLock` over all three trees makes a
//! multi-tree write atomic for readers (they take the read lock and see all of it or none);
//! writers are serialised, which costs little since each holds the lock for a few map inserts.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::{Engine, KeyValue, StorageError, Tree, WriteOp, check_key, check_ops, keys_between};

/// Keeps every tree in a `BTreeMap`; loses everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryEngine {
    trees: RwLock<Trees>,
}

/// One ordered map per [`Tree`].
#[derive(Debug, Default)]
struct Trees {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    hints: BTreeMap<Vec<u8>, Vec<u8>>,
    meta: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Trees {
    fn tree(&self, tree: Tree) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        match tree {
            Tree::Data => &self.data,
            Tree::Hints => &self.hints,
            Tree::Meta => &self.meta,
        }
    }

    fn tree_mut(&mut self, tree: Tree) -> &mut BTreeMap<Vec<u8>, Vec<u8>> {
        match tree {
            Tree::Data => &mut self.data,
            Tree::Hints => &mut self.hints,
            Tree::Meta => &mut self.meta,
        }
    }
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    // A poisoned lock would mean a thread panicked while holding it. `write` checks every op
    // before touching the maps, and map inserts and removals do not panic (an allocation
    // failure aborts the process), so the maps are never left half-written: carry on.
    fn read(&self) -> RwLockReadGuard<'_, Trees> {
        self.trees.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_lock(&self) -> RwLockWriteGuard<'_, Trees> {
        self.trees.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Engine for MemoryEngine {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        check_key(key)?;
        Ok(self.read().tree(tree).get(key).cloned())
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        check_ops(&ops)?;
        let mut trees = self.write_lock();
        for op in ops {
            let map = trees.tree_mut(op.tree);
            match op.value {
                Some(value) => {
                    map.insert(op.key, value);
                }
                None => {
                    map.remove(&op.key);
                }
            }
        }
        Ok(())
    }

    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        self.scan_range(tree, after, None, limit)
    }

    fn scan_range(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let Some(bounds) = keys_between(after, before) else {
            return Ok(Vec::new());
        };
        let trees = self.read();
        let page = trees
            .tree(tree)
            .range::<[u8], _>(bounds)
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        Ok(page)
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    crate::storage::tests::engine_suite!(crate::storage::tests::Fixture::memory());
}
