//! Tells tasks that the layout history changed: what tokio's `watch` channel does for a
//! counter, with every waiter woken in the order it began to wait.
//!
//! `tokio::sync::watch` spreads its waiters over eight lists chosen by the runtime's random
//! numbers, so after a change the tasks waiting on it (sync, rehoming, anti-entropy's rebuild)
//! woke in an order that differed from run to run, and so did what they sent. A simulation
//! replays a seed only if every order is fixed (docs/simulation.md); `Notify` keeps its waiters
//! in one list.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// The sending side, one per membership; dropping it closes every receiver.
#[derive(Debug, Default)]
pub struct Changes {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    version: AtomicU64,
    closed: AtomicBool,
    notify: Notify,
}

/// One task's view: which change it saw last.
#[derive(Debug)]
pub struct ChangesReceiver {
    shared: Arc<Shared>,
    seen: u64,
}

/// The membership is gone: no change will come.
#[derive(Debug, PartialEq, Eq)]
pub struct Closed;

impl Changes {
    /// Records a change and wakes every waiter.
    pub fn bump(&self) {
        self.shared.version.fetch_add(1, Ordering::SeqCst);
        self.shared.notify.notify_waiters();
    }

    /// A receiver that has seen every change so far.
    pub fn subscribe(&self) -> ChangesReceiver {
        ChangesReceiver {
            shared: self.shared.clone(),
            seen: self.shared.version.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.notify.notify_waiters();
    }
}

impl ChangesReceiver {
    /// Waits for a change this receiver has not seen (returns at once if one happened since
    /// the last call), or for the sender to go. Cancel-safe: a change is marked seen only when
    /// this returns it.
    pub async fn changed(&mut self) -> Result<(), Closed> {
        loop {
            let notified = self.shared.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the version is read: a change made after the read wakes it.
            notified.as_mut().enable();
            let now = self.shared.version.load(Ordering::SeqCst);
            if now != self.seen {
                self.seen = now;
                return Ok(());
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                return Err(Closed);
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_wakes_every_receiver_once_and_a_drop_closes_them() {
        let changes = Changes::default();
        let mut early = changes.subscribe();
        changes.bump();
        let mut late = changes.subscribe();
        // A change made before the call is seen at once, and only once.
        assert_eq!(early.changed().await, Ok(()));
        let waited = tokio::time::timeout(Duration::from_millis(20), early.changed()).await;
        assert!(waited.is_err(), "no second change");
        let waiter = tokio::spawn(async move { late.changed().await });
        tokio::task::yield_now().await;
        changes.bump();
        changes.bump();
        assert_eq!(waiter.await.expect("the waiter"), Ok(()));
        assert_eq!(early.changed().await, Ok(()), "two changes are seen as one");
        drop(changes);
        assert_eq!(early.changed().await, Err(Closed));
    }
}
