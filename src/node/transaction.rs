//! Read-modify-writes of several keys, committed to the engine as one write.
//!
//! Replica operations reach a node in batches, and each is a read-modify-write of one key.
//! Committing each on its own costs a journal append, a `write(2)` and a turn of the engine's
//! journal lock per operation, and on a busy machine a thread preempted while it holds that
//! lock stalls every writer of the node for a scheduler slice: the put tail the benchmark
//! showed. A transaction locks every key the batch touches up front (in one global order, so
//! two transactions never wait for each other in a cycle), applies the operations in order to
//! its own view of those keys, and commits whatever changed as one engine write: group
//! commit, with the group being the batch the balancer already formed.
//!
//! Nothing is visible to readers, other replicas or the counters until the commit succeeded.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use crate::error::{Error, Result};
use crate::storage::{Tree, WriteOp};
use crate::version::{Dot, Siblings};

use super::StorageNode;
use super::hints::{self, HintRecord};

/// Where a replica operation lands: the node's own copy of a key, or the hint it holds for
/// another node (sloppy quorum).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Place {
    key: String,
    hint_for: Option<String>,
    /// The engine key: the key itself, or the hint's slot.
    storage_key: Vec<u8>,
}

impl Place {
    pub fn new(key: &str, hint_for: Option<&str>) -> Place {
        let storage_key = match hint_for {
            None => super::keys::data_key(key.as_bytes()),
            Some(owner) => hints::slot(owner, key),
        };
        Place {
            key: key.to_owned(),
            hint_for: hint_for.map(str::to_owned),
            storage_key,
        }
    }

    pub fn own(key: &str) -> Place {
        Place::new(key, None)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn is_hint(&self) -> bool {
        self.hint_for.is_some()
    }

    fn tree(&self) -> Tree {
        if self.is_hint() {
            Tree::Hints
        } else {
            Tree::Data
        }
    }
}

/// A place as the transaction found it, and as the operations so far left it.
struct Staged {
    /// The stored bytes of an own copy (anti-entropy hashes them); `None` for hints.
    stored: Option<Arc<[u8]>>,
    existed: bool,
    dots_before: Vec<Dot>,
    was_live: bool,
    was_tombstoned: bool,
    siblings: Siblings,
}

impl Staged {
    /// A version is identified by its dot, so comparing dots tells whether the set changed
    /// without comparing values.
    fn changed(&self) -> bool {
        !self.siblings.dots().eq(self.dots_before.iter().copied())
    }
}

pub struct Transaction<'n> {
    node: &'n StorageNode,
    staged: HashMap<Place, Staged>,
    _guards: Vec<MutexGuard<'n, ()>>,
}

impl<'n> Transaction<'n> {
    /// Locks every place the transaction may touch; it must touch no other.
    pub fn begin<'p>(node: &'n StorageNode, places: impl IntoIterator<Item = &'p Place>) -> Self {
        let guards = node
            .locks
            .lock_all(places.into_iter().map(|place| place.storage_key.as_slice()));
        Transaction {
            node,
            staged: HashMap::new(),
            _guards: guards,
        }
    }

    /// The place's sibling set as the operations so far left it, read from the engine the
    /// first time.
    pub fn siblings(&mut self, place: &Place) -> Result<&mut Siblings> {
        // The place is copied into the map only the first time (most places are staged once
        // and then read again for the reply).
        if !self.staged.contains_key(place) {
            let loaded = load(self.node, place)?;
            self.staged.insert(place.clone(), loaded);
        }
        self.staged
            .get_mut(place)
            .map(|staged| &mut staged.siblings)
            .ok_or_else(|| Error::Internal("a staged key went missing".into()))
    }

    /// Writes every changed place in one engine write, then updates what depends on it (the
    /// anti-entropy trees, the key and hint counts). On error nothing was stored.
    pub fn commit(self) -> Result<Committed> {
        let node = self.node;
        let mut writes = Vec::new();
        let mut finals = HashMap::with_capacity(self.staged.len());
        let mut counts = Counts::default();
        // (key, bytes before, bytes after) of changed own copies, for the row cache and the
        // anti-entropy trees.
        let mut own_changes = Vec::new();
        for (place, staged) in self.staged {
            if !staged.changed() {
                finals.insert(place, staged.siblings);
                continue;
            }
            let Staged {
                stored,
                existed,
                was_live,
                was_tombstoned,
                siblings,
                ..
            } = staged;
            let (value, siblings) = encode(&place, siblings)?;
            if place.is_hint() {
                counts.hints += i64::from(value.is_some()) - i64::from(existed);
            } else {
                let change = Counts {
                    live: i64::from(siblings.is_live()) - i64::from(was_live),
                    tombstones: i64::from(siblings.is_tombstoned()) - i64::from(was_tombstoned),
                    hints: 0,
                };
                let new_bytes: Option<Arc<[u8]>> = value.as_deref().map(Arc::from);
                own_changes.push((place.clone(), stored, new_bytes, change));
            }
            writes.push(WriteOp {
                tree: place.tree(),
                key: place.storage_key.clone(),
                value,
            });
            finals.insert(place, siblings);
        }
        if writes.is_empty() {
            return Ok(Committed { finals });
        }
        // A change to a key the start's count has not reached yet is the count's to see
        // (`census`); held across the write so that the count cannot pass the key meanwhile.
        let census = node.census.hold();
        // Likewise for the anti-entropy trees, filled by a walk of their own.
        let aae = node.aae();
        let filled = aae.as_ref().map(|aae| aae.filled.hold());
        if let Err(error) = node.engine.write(writes) {
            // The engine may hold some of it or none: what it holds is known no more.
            for (place, _, _, _) in &own_changes {
                node.cache.forget(&place.storage_key);
            }
            return Err(error.into());
        }
        // Before any layout is known nothing is a stray. One snapshot for the whole commit.
        let routing = node.membership.routing();
        let stray = routing.as_deref().is_some_and(|routing| {
            own_changes.iter().any(|(place, _, new, _)| {
                new.is_some()
                    && super::keys::partition_of_stored(&place.storage_key)
                        .is_some_and(|partition| !node.replicates_partition(routing, partition))
            })
        });
        drop(routing);
        if stray {
            node.strays.notify_one();
        }
        for (place, old, new, change) in own_changes {
            if let (Some(aae), Some(filled)) = (&aae, &filled)
                && filled.covers(&place.storage_key)
            {
                aae.record(place.key.as_bytes(), old.as_deref(), new.as_deref());
            }
            if census.covers(&place.storage_key) {
                counts.live += change.live;
                counts.tombstones += change.tombstones;
            }
            node.cache.set(&place.storage_key, new);
        }
        drop(filled);
        drop(census);
        node.live_keys.fetch_add(counts.live, Ordering::Relaxed);
        node.tombstone_keys
            .fetch_add(counts.tombstones, Ordering::Relaxed);
        node.hints.fetch_add(counts.hints, Ordering::Relaxed);
        Ok(Committed { finals })
    }
}

#[derive(Default)]
struct Counts {
    live: i64,
    tombstones: i64,
    hints: i64,
}

/// The sibling sets a committed transaction left, for the replies.
pub struct Committed {
    finals: HashMap<Place, Siblings>,
}

impl Committed {
    /// The place's sibling set after the transaction; empty if the transaction never read it.
    pub fn take(&mut self, place: &Place) -> Siblings {
        self.finals.remove(place).unwrap_or_default()
    }
}

fn load(node: &StorageNode, place: &Place) -> Result<Staged> {
    let (stored, existed, siblings) = match &place.hint_for {
        None => {
            // Under the key's lock: what is read here may fill the cache.
            let stored = match node.cache.get(&place.storage_key) {
                Some(bytes) => Some(bytes),
                None => {
                    let stored: Option<Arc<[u8]>> = node
                        .engine
                        .get(Tree::Data, &place.storage_key)?
                        .map(Arc::from);
                    node.cache.set(&place.storage_key, stored.clone());
                    stored
                }
            };
            let siblings = match &stored {
                None => Siblings::new(),
                Some(bytes) => Siblings::decode(bytes)
                    .ok_or_else(|| Error::Internal("stored sibling set is corrupt".into()))?,
            };
            let existed = stored.is_some();
            (stored, existed, siblings)
        }
        Some(owner) => match node.load_hint(&place.storage_key, owner, &place.key)? {
            None => (None, false, Siblings::new()),
            Some(record) => (None, true, record.siblings),
        },
    };
    Ok(Staged {
        stored,
        existed,
        dots_before: siblings.dots().collect(),
        was_live: siblings.is_live(),
        was_tombstoned: siblings.is_tombstoned(),
        siblings,
    })
}

/// The bytes to store for a place (`None` deletes it), and the sibling set back.
fn encode(place: &Place, siblings: Siblings) -> Result<(Option<Vec<u8>>, Siblings)> {
    if siblings.is_empty() {
        return Ok((None, siblings));
    }
    let Some(owner) = &place.hint_for else {
        return Ok((Some(siblings.encode()), siblings));
    };
    let record = HintRecord {
        owner: owner.clone(),
        key: place.key.clone(),
        siblings,
    };
    let bytes = postcard::to_allocvec(&record)
        .map_err(|_| Error::Internal("hint could not be encoded".into()))?;
    Ok((Some(bytes), record.siblings))
}
