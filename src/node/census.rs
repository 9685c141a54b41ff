//! The node's count of what it holds (live keys, tombstones) and its anti-entropy trees, built
//! by reading every stored value once: at start, in the background, while the node serves.
//!
//! A start that read every value before answering would cost what is stored (seconds for a
//! million keys) after the storage engine took care to read only keys (its hint files). So
//! the count runs after the node is up, a page of keys at a time in key order, and a cursor
//! says how far it got. A commit that changes a key the count already passed adjusts the
//! figures and the trees itself; a change to a key further on is left to the count, which
//! will read the key as the commit left it. What makes that exact is one lock: a commit holds
//! it shared across its engine write and that decision, and the count holds it exclusively
//! while it reads a page and moves the cursor past it, so a key is counted once, either by the
//! count (in its state at that moment) or as the commits' changes since.
//!
//! Until the count is done the figures are low, and anti-entropy waits: half-built trees
//! would differ from every peer's and make exchanges list keys that do not differ.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Instant;

use crate::error::Result;
use crate::storage::Tree;
use crate::version::Siblings;

use super::StorageNode;

/// Keys read per page, under the exclusive lock: a commit waits at most one page.
const PAGE: usize = 256;

/// How far the count got.
#[derive(Debug)]
enum Cursor {
    /// Every engine key up to and including `through` is counted (none yet when `None`).
    Counting {
        through: Option<Vec<u8>>,
    },
    Done,
}

#[derive(Debug)]
pub struct Census {
    cursor: RwLock<Cursor>,
    /// `cursor` is `Done`; read without the lock.
    done: AtomicBool,
}

/// Held by a commit across its engine write and its accounting; `None` once the count is
/// done, which it stays, so that commits then take no lock at all.
pub struct Held<'c>(Option<RwLockReadGuard<'c, Cursor>>);

impl Held<'_> {
    /// Whether the count already passed `stored_key`: a change to it is the commit's to count.
    pub fn covers(&self, stored_key: &[u8]) -> bool {
        match self.0.as_deref() {
            None | Some(Cursor::Done) => true,
            Some(Cursor::Counting { through }) => through
                .as_deref()
                .is_some_and(|through| stored_key <= through),
        }
    }
}

impl Census {
    /// A count still to be made.
    pub fn pending() -> Census {
        Census {
            cursor: RwLock::new(Cursor::Counting { through: None }),
            done: AtomicBool::new(false),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// For a commit: hold across the engine write and the accounting.
    pub fn hold(&self) -> Held<'_> {
        if self.is_done() {
            return Held(None);
        }
        Held(Some(
            self.cursor
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ))
    }

    /// Counts one page after the cursor; answers whether the count is done.
    pub(super) fn step(&self, node: &StorageNode, corrupt: &mut u64) -> Result<bool> {
        let (mut live, mut tombstoned) = (0, 0);
        let done = self.step_with(&*node.engine, |_, bytes| match Siblings::decode(bytes) {
            Some(siblings) => {
                live += i64::from(siblings.is_live());
                tombstoned += i64::from(siblings.is_tombstoned());
            }
            None => *corrupt += 1,
        })?;
        node.live_keys.fetch_add(live, Ordering::Relaxed);
        node.tombstone_keys.fetch_add(tombstoned, Ordering::Relaxed);
        Ok(done)
    }

    /// Visits one page after the cursor (each key and its stored bytes) and moves the cursor
    /// past it, holding out commits meanwhile; answers whether the walk is done. The same walk
    /// fills an anti-entropy tree built while the node serves (see `anti_entropy.rs`).
    pub(super) fn step_with(
        &self,
        engine: &dyn crate::storage::Engine,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<bool> {
        let mut cursor = self
            .cursor
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Cursor::Counting { through } = &mut *cursor else {
            return Ok(true);
        };
        let page = engine.scan(Tree::Data, through.as_deref(), PAGE)?;
        for (stored_key, bytes) in &page {
            let Some(key) = super::keys::user_key(stored_key) else {
                continue; // converted at open: every key has the form
            };
            visit(key, bytes);
        }
        if page.len() < PAGE {
            *cursor = Cursor::Done;
            self.done.store(true, Ordering::Release);
            return Ok(true);
        }
        *through = page.into_iter().last().map(|(key, _)| key);
        Ok(false)
    }

    /// Counts everything, a page at a time, letting commits through between pages.
    pub fn run(&self, node: &StorageNode) -> Result<()> {
        let started = Instant::now();
        let mut corrupt = 0;
        while !self.step(node, &mut corrupt)? {}
        if corrupt > 0 {
            // Reads and writes of these keys fail with "corrupt"; say so once.
            tracing::error!(corrupt, "stored sibling sets that cannot be decoded");
        }
        tracing::info!(
            keys = node.live_keys.load(Ordering::Relaxed),
            tombstones = node.tombstone_keys.load(Ordering::Relaxed),
            ms = started.elapsed().as_millis() as u64,
            "stored keys counted"
        );
        Ok(())
    }
}
