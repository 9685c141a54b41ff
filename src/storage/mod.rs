//! The storage engine under a storage node: ordered byte maps that survive a crash.
//!
//! A storage node keeps three kinds of records, each in its own key space ([`Tree`]): the
//! versions of every key it replicates ([`Tree::Data`]), writes it holds for a node that was
//! down ([`Tree::Hints`], hinted handoff) and a little bookkeeping of its own ([`Tree::Meta`]).
//! It needs only four things from an engine: read a key, apply several changes across those
//! trees atomically, page through a tree in key order, and force everything to disk.
//!
//! # Why a trait
//!
//! Those four operations are the whole of [`Engine`], so the node logic above it never sees the
//! engine behind it. Three implementations sit beside each other: [`MemoryEngine`], a
//! `BTreeMap` per tree behind a lock, which backs `--in-memory` nodes and makes node tests
//! fast; [`LogEngine`], the durable default; and [`FjallEngine`], the durable engine before it,
//! which still opens the directories it wrote. One test suite (`tests.rs`) runs against all
//! three, so the contract written on the trait is the contract every engine is checked against.
//!
//! # Why a log, and why fjall before it
//!
//! Both are log-structured, for the reason below. What separates them is what a write costs
//! after its append: fjall inserts every version into a skip list that a flush later walks
//! whole; the log engine replaces one entry of an in-memory index and later copies only the
//! live values (*The put tail* in the performance notes has the measurements).
//!
//! A storage node is write-heavy: every client `put` becomes a write on N replicas, and
//! hinted handoff and anti-entropy add more. [fjall] is a log-structured merge tree with a
//! journal: a write is one sequential append to the journal plus an insert into an in-memory
//! table; sorting into files on disk (flushes) and merging those files (compaction) happen
//! later on background threads, in large sequential I/O. Committing a write costs a `write(2)`
//! into the OS page cache, not a disk round trip, so the node can acknowledge at memory speed
//! and still survive its own crash. A B-tree engine such as redb works the other way round:
//! a commit copies the touched pages (copy-on-write) up to a new root and must fsync to be
//! durable at all (its non-durable commits are lost on a crash until a later durable commit),
//! so acknowledging every write would cost at least one fsync each.
//!
//! # What "durable" means here
//!
//! - When [`Engine::write`] returns `Ok`, the write is in the log (or fjall's journal) in the OS
//!   page cache. It
//!   survives the *process* dying in any way (panic, `SIGKILL`, the OOM killer), because the
//!   kernel still writes the page cache out. This is what a node needs before it acknowledges.
//! - It survives *power loss or a kernel crash* only once [`Engine::sync`] (fsync) has run. The
//!   node calls `sync` from a background task every sync interval (`node::SYNC_INTERVAL`, one
//!   second), so a power failure can lose the writes acknowledged during the last interval (at
//!   most) on that machine. Replication
//!   covers that window: a put acknowledged by W replicas is lost only if all W machines lose
//!   power within the same interval. A shorter interval narrows the window and costs more
//!   fsyncs (writers do not wait for this one, though with fjall they still wait for the fsyncs
//!   it makes itself when it flushes a memtable or rotates its journal: see `fjall.rs`).
//! - Either way the data stays consistent: recovery drops an unfinished write at the end of the
//!   log or journal whole, so a multi-op write is all there or absent.
//!
//! # Keys
//!
//! Keys are any byte strings from empty up to [`MAX_KEY_BYTES`] (the protocol's 64 KiB),
//! values any byte strings up to [`MAX_VALUE_BYTES`]. fjall itself refuses empty keys and keys
//! above 65535 bytes; `fjall.rs` explains how it still stores both, in key order.
//!
//! [fjall]: https://github.com/fjall-rs/fjall

mod fjall;
mod log;
mod memory;

#[cfg(test)]
mod tests;

use std::ops::Bound;
use std::path::PathBuf;
use std::sync::Arc;

pub use self::fjall::FjallEngine;
pub use log::LogEngine;
pub use memory::MemoryEngine;

/// Separate key spaces of one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tree {
    /// The versions of each key this node replicates.
    Data,
    /// Writes held for another node that was unreachable (hinted handoff).
    Hints,
    /// The node's own bookkeeping.
    Meta,
}

impl Tree {
    /// Every tree, in a fixed order.
    pub const ALL: [Tree; 3] = [Tree::Data, Tree::Hints, Tree::Meta];

    /// Lower-case name, for logs and for fjall's keyspace names.
    pub fn name(self) -> &'static str {
        match self {
            Tree::Data => "data",
            Tree::Hints => "hints",
            Tree::Meta => "meta",
        }
    }
}

/// One change in a write; `value: None` removes the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOp {
    /// The tree the key lives in.
    pub tree: Tree,
    /// The key, at most [`MAX_KEY_BYTES`] long; empty is allowed.
    pub key: Vec<u8>,
    /// The new value, or `None` to remove the key.
    pub value: Option<Vec<u8>>,
}

impl WriteOp {
    /// Sets `key` to `value` in `tree`.
    pub fn put(tree: Tree, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        WriteOp {
            tree,
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// Removes `key` from `tree` (no error when it is absent).
    pub fn remove(tree: Tree, key: impl Into<Vec<u8>>) -> Self {
        WriteOp {
            tree,
            key: key.into(),
            value: None,
        }
    }
}

/// A key and its value, as [`Engine::scan`] returns them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// What can go wrong in the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another process holds the data directory.
    #[error(
        "data directory {} is locked: another storage_node is using it",
        dir.display()
    )]
    Locked {
        /// The directory that was asked for.
        dir: PathBuf,
    },
    /// An I/O error from the engine or while preparing the directory.
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else the engine reports, as text.
    #[error("storage engine error: {0}")]
    Engine(String),
    /// A key longer than [`MAX_KEY_BYTES`].
    #[error("key of {len} bytes is longer than the limit of {max} bytes")]
    KeyTooLong {
        /// Length of the refused key in bytes.
        len: usize,
        /// [`MAX_KEY_BYTES`].
        max: usize,
    },
    /// Stored records are damaged where no crash could have torn them, and the engine was not
    /// told to salvage ([`Recovery::Refuse`]). `offset` is the first damaged range's, in
    /// `segment`; `ranges` counts them all (each is logged).
    #[error(
        "{}",
        damaged_line(segment, *offset, *bytes, *ranges)
    )]
    Damaged {
        /// The segment file holding the first damaged range.
        segment: PathBuf,
        /// Where that range starts in it.
        offset: u64,
        /// Its length.
        bytes: u64,
        /// Damaged ranges in all.
        ranges: usize,
    },
    /// A value longer than [`MAX_VALUE_BYTES`].
    #[error("value of {len} bytes is larger than the limit of {max} bytes")]
    ValueTooLarge {
        /// Length of the refused value in bytes.
        len: usize,
        /// [`MAX_VALUE_BYTES`].
        max: usize,
    },
}

/// The one line a node refusing damaged storage says: where, why it is not a crash's torn
/// tail, and what `--salvage` would cost.
fn damaged_line(segment: &std::path::Path, offset: u64, bytes: u64, ranges: usize) -> String {
    let more = match ranges {
        0 | 1 => String::new(),
        n => format!(" ({} more damaged ranges are logged)", n - 1),
    };
    format!(
        "damaged record in segment {} at offset {offset} ({bytes} bytes that are not whole \
         records, with whole records written after them: not a torn tail from a crash){more}; \
         refusing to start. Start with --salvage to skip the damaged records and keep every \
         other: the writes they held are missing on this node until anti-entropy or read \
         repair brings them back from a peer, and until then this node may answer an older \
         value, or a deleted one",
        segment.display()
    )
}

/// What an engine passed over as damaged to open at all ([`Recovery::Salvage`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Salvaged {
    /// Damaged records skipped (a run of damaged bytes counts the records its length fields
    /// account for, at least one).
    pub records: u64,
    /// Bytes skipped.
    pub bytes: u64,
}

/// What an engine does at open with stored records damaged where no crash could have torn
/// them. A crash's torn tail is cut either way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Recovery {
    /// Refuse to open ([`StorageError::Damaged`]).
    #[default]
    Refuse,
    /// Skip the damaged records, keep every other, log and count what was skipped
    /// ([`Engine::salvaged`]); the node's peers refill what is missing.
    Salvage,
}

/// The storage layer's operations, implemented by every engine.
///
/// All methods take `&self` and are called from many threads at once.
pub trait Engine: Send + Sync + 'static {
    /// The value of `key` in `tree`, or `None` when it has none.
    ///
    /// A key longer than [`MAX_KEY_BYTES`] is refused with [`StorageError::KeyTooLong`].
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Applies every op atomically (all or none, across trees). When it returns Ok, the write
    /// survives SIGKILL of the process (it is at least in the OS page cache through the engine's
    /// journal), so a caller may acknowledge it.
    ///
    /// Ops apply in order: when several touch the same key, the last one wins. Keys and values
    /// over the limits are refused before anything is written. Readers see all of a write or
    /// none of it.
    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError>;

    /// Up to `limit` entries of `tree` with key strictly greater than `after` (from the first key
    /// when None), in ascending key order. Used for paging through a tree without holding it all.
    ///
    /// Each page is a consistent snapshot; pages taken at different times may reflect writes
    /// made in between.
    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError>;

    /// As [`Engine::scan`], and only keys strictly below `before` (no bound when `None`): a
    /// range read without reading a value past it, which is what a small range (one
    /// anti-entropy leaf holds a handful of keys) needs to cost what it holds.
    fn scan_range(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        let mut page = self.scan(tree, after, limit)?;
        if let Some(before) = before {
            let end = page.partition_point(|(key, _)| key.as_slice() < before);
            page.truncate(end);
        }
        Ok(page)
    }

    /// Forces everything written so far to stable storage (fsync); a background task calls it
    /// periodically.
    fn sync(&self) -> Result<(), StorageError>;

    /// Short name for logs/metrics: "memory", "log" or "fjall".
    fn name(&self) -> &'static str;

    /// What the engine passed over as damaged when it opened ([`Recovery::Salvage`]).
    fn salvaged(&self) -> Salvaged {
        Salvaged::default()
    }
}

/// Largest key the engine accepts in any tree: the protocol's 64 KiB, and the three bytes a
/// node puts before a key to store it by partition (`crate::node::keys`).
pub const MAX_KEY_BYTES: usize = 65536 + 3;

/// Largest value the engine accepts: far above any request the node accepts (32 MiB by
/// default) and safely below fjall's limit of 4 GiB per stored value (the log engine's limit
/// is 4 GiB per write, all its values together).
pub const MAX_VALUE_BYTES: usize = 1 << 30;

/// Which engine to open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// Keep nothing on disk ([`MemoryEngine`]).
    InMemory,
    /// Keep the data in `dir` ([`FjallEngine`]).
    Fjall {
        /// The data directory; created if missing.
        dir: PathBuf,
    },
    /// Keep the data in `dir` as a log and an in-memory index ([`LogEngine`]).
    Log {
        /// The data directory; created if missing.
        dir: PathBuf,
        /// What to do with damaged records found at open.
        recovery: Recovery,
    },
    /// An engine the caller opened and keeps: a simulated disk, which outlives the node that a
    /// simulation crashes and restarts on it (`tests/simulation`). No flag chooses it.
    Provided(ProvidedEngine),
}

/// An engine handed to [`open`] as it is (see [`StorageConfig::Provided`]). Two are equal
/// when they are the same engine.
#[derive(Clone)]
pub struct ProvidedEngine(pub Arc<dyn Engine>);

impl std::fmt::Debug for ProvidedEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProvidedEngine({})", self.0.name())
    }
}

impl PartialEq for ProvidedEngine {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ProvidedEngine {}

/// Entries read per page by [`for_each`].
const SCAN_PAGE: usize = 1024;

/// Calls `visit` with every entry of `tree`, in key order, a page at a time, so a whole tree
/// is walked without being held in memory.
pub fn for_each(
    engine: &dyn Engine,
    tree: Tree,
    mut visit: impl FnMut(&[u8], &[u8]),
) -> Result<(), StorageError> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = engine.scan(tree, after.as_deref(), SCAN_PAGE)?;
        for (key, value) in &page {
            visit(key, value);
        }
        if page.len() < SCAN_PAGE {
            return Ok(());
        }
        after = page.into_iter().last().map(|(key, _)| key);
    }
}

/// Opens the engine: creates the directory if missing, refuses with StorageError::Locked when
/// another process has it open.
pub fn open(config: &StorageConfig) -> Result<Arc<dyn Engine>, StorageError> {
    match config {
        StorageConfig::InMemory => Ok(Arc::new(MemoryEngine::new())),
        StorageConfig::Provided(engine) => Ok(engine.0.clone()),
        StorageConfig::Fjall { dir } => {
            refuse_other_layout(dir, LOG_MARKER, "fjall")?;
            Ok(Arc::new(FjallEngine::open(dir)?))
        }
        StorageConfig::Log { dir, recovery } => {
            refuse_other_layout(dir, FJALL_MARKER, "log")?;
            Ok(Arc::new(LogEngine::open_recovering(
                dir,
                log::Limits::default(),
                *recovery,
            )?))
        }
    }
}

/// Did fjall write `dir`? (It alone makes a `keyspaces` directory there.)
pub fn written_by_fjall(dir: &std::path::Path) -> bool {
    dir.join(FJALL_MARKER).is_dir()
}

/// A directory only fjall makes in a data directory.
const FJALL_MARKER: &str = "keyspaces";
const LOG_MARKER: &str = log::SEGMENTS_DIR;

/// Refuses to open a directory the other engine wrote (`marker` is a directory only it
/// makes): the engine would start empty beside data it cannot read, and the node would answer
/// as if it held nothing.
fn refuse_other_layout(
    dir: &std::path::Path,
    marker: &str,
    engine: &str,
) -> Result<(), StorageError> {
    if dir.join(marker).is_dir() {
        return Err(StorageError::Engine(format!(
            "{} holds another engine's data; it cannot be opened with --engine {engine}",
            dir.display()
        )));
    }
    Ok(())
}

/// The bounds of the keys [`Engine::scan`] pages through: all of them, or those strictly after
/// `after`.
fn keys_after(after: Option<&[u8]>) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (
        after.map_or(Bound::Unbounded, Bound::Excluded),
        Bound::Unbounded,
    )
}

/// The two ends of a range of keys.
type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// The bounds of keys strictly between `after` and `before` (either open when `None`); `None`
/// when that range is empty (a `BTreeMap` panics on a range whose start passes its end).
fn keys_between<'a>(after: Option<&'a [u8]>, before: Option<&'a [u8]>) -> Option<KeyBounds<'a>> {
    if let (Some(after), Some(before)) = (after, before)
        && after >= before
    {
        return None;
    }
    Some((
        after.map_or(Bound::Unbounded, Bound::Excluded),
        before.map_or(Bound::Unbounded, Bound::Excluded),
    ))
}

/// Refuses a write whose keys or values exceed the limits, before any of it is applied.
fn check_ops(ops: &[WriteOp]) -> Result<(), StorageError> {
    for op in ops {
        check_key(&op.key)?;
        if let Some(value) = &op.value
            && value.len() > MAX_VALUE_BYTES
        {
            return Err(StorageError::ValueTooLarge {
                len: value.len(),
                max: MAX_VALUE_BYTES,
            });
        }
    }
    Ok(())
}

/// Refuses a key longer than [`MAX_KEY_BYTES`].
fn check_key(key: &[u8]) -> Result<(), StorageError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StorageError::KeyTooLong {
            len: key.len(),
            max: MAX_KEY_BYTES,
        });
    }
    Ok(())
}
