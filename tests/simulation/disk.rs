//! A storage node's disk in the simulation: it outlives the node, so that a node crashed and
//! started again finds what it had made durable, and loses what it had not.
//!
//! The model follows what the durable engines promise (`src/storage/mod.rs`, *What "durable"
//! means here*): a write the engine returned `Ok` for is in the OS page cache, so it survives
//! the *process* dying ([`Crash::Process`]: SIGKILL, a panic, the OOM killer); it survives
//! *the machine* losing power ([`Crash::Power`]) only once `sync` ran after it. The log engine
//! appends writes in order and drops a torn tail whole at recovery, so a power loss keeps every
//! synced write and some prefix, chosen by the seed, of the writes made since the last sync.

use std::sync::{Mutex, PoisonError};

use dynamite::storage::{Engine, KeyValue, MemoryEngine, StorageError, Tree, WriteOp};

/// How a node's machine went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The process died; the kernel kept every write the engine had returned.
    Process,
    /// The machine lost power; writes since the last sync are lost but for a prefix.
    Power,
}

/// One node's disk: what a running node reads (`live`), and what would survive a power loss
/// (`synced`, plus the writes since the last sync in the order they were made).
pub struct SimDisk {
    /// The node's host, for the trace of writes (`RUST_LOG=sim_disk=trace`).
    name: &'static str,
    state: Mutex<State>,
}

struct State {
    live: MemoryEngine,
    synced: MemoryEngine,
    pending: Vec<Vec<WriteOp>>,
}

impl SimDisk {
    pub fn new(name: &'static str) -> Self {
        SimDisk {
            name,
            state: Mutex::new(State {
                live: MemoryEngine::new(),
                synced: MemoryEngine::new(),
                pending: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node on this disk went down (its tasks are already dropped): what it reads when it
    /// starts again is what survived. `keep` picks how many of the unsynced writes a power
    /// loss keeps (`keep(n)` in `0..=n`). Returns how many writes were lost.
    pub fn crash(&self, crash: Crash, keep: impl FnOnce(usize) -> usize) -> usize {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        let kept = match crash {
            Crash::Process => pending.len(),
            Crash::Power => keep(pending.len()).min(pending.len()),
        };
        let lost = pending.len() - kept;
        for ops in pending.into_iter().take(kept) {
            apply(&state.synced, ops);
        }
        let copy = copy_of(&state.synced);
        state.live = copy;
        lost
    }
}

fn apply(engine: &MemoryEngine, ops: Vec<WriteOp>) {
    // The ops were accepted once by the same kind of engine: they are within its limits.
    if let Err(error) = engine.write(ops) {
        panic!("a write the simulated disk took before is refused now: {error}");
    }
}

fn copy_of(engine: &MemoryEngine) -> MemoryEngine {
    let copy = MemoryEngine::new();
    for tree in Tree::ALL {
        let mut ops = Vec::new();
        let walked = dynamite::storage::for_each(engine, tree, |key, value| {
            ops.push(WriteOp::put(tree, key, value))
        });
        if let Err(error) = walked {
            panic!("an in-memory engine failed a scan: {error}");
        }
        apply(&copy, ops);
    }
    copy
}

impl Engine for SimDisk {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.lock().live.get(tree, key)
    }

    fn write(&self, ops: Vec<WriteOp>) -> Result<(), StorageError> {
        for op in &ops {
            tracing::trace!(
                target: "sim_disk",
                disk = self.name,
                tree = op.tree.name(),
                key = %String::from_utf8_lossy(&op.key),
                removed = op.value.is_none(),
            );
        }
        let mut state = self.lock();
        state.live.write(ops.clone())?;
        state.pending.push(ops);
        Ok(())
    }

    fn scan(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        self.lock().live.scan(tree, after, limit)
    }

    fn scan_range(
        &self,
        tree: Tree,
        after: Option<&[u8]>,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageError> {
        self.lock().live.scan_range(tree, after, before, limit)
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut state = self.lock();
        let pending = std::mem::take(&mut state.pending);
        for ops in pending {
            apply(&state.synced, ops);
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "simulated"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(disk: &SimDisk, key: &str) -> Option<Vec<u8>> {
        disk.get(Tree::Data, key.as_bytes()).expect("a read")
    }

    fn put(disk: &SimDisk, key: &str) {
        disk.write(vec![WriteOp::put(Tree::Data, key, "v")])
            .expect("a write");
    }

    #[test]
    fn a_process_crash_keeps_every_write_and_a_power_loss_keeps_the_synced_and_a_prefix() {
        let disk = SimDisk::new("node");
        put(&disk, "a");
        disk.sync().expect("sync");
        put(&disk, "b");
        put(&disk, "c");
        assert_eq!(disk.crash(Crash::Process, |_| 0), 0);
        assert!(
            read(&disk, "c").is_some(),
            "the page cache survives the process"
        );
        put(&disk, "d");
        put(&disk, "e");
        // b and c are durable now (a process crash leaves them for the kernel to write).
        assert_eq!(disk.crash(Crash::Power, |n| n / 2), 1);
        assert!(read(&disk, "a").is_some() && read(&disk, "c").is_some());
        assert!(read(&disk, "d").is_some(), "the prefix kept");
        assert!(read(&disk, "e").is_none(), "the torn tail lost");
        put(&disk, "f");
        assert_eq!(disk.crash(Crash::Power, |_| 0), 1);
        assert!(read(&disk, "f").is_none() && read(&disk, "d").is_some());
    }
}
