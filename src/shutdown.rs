//! The signals both daemons stop on, SIGTERM and SIGINT (Ctrl-C), and what each one means.
//!
//! Signals are listened for from the moment the runtime starts ([`install`], called by
//! [`crate::runtime::block_on`] before it binds the listener), and what one does depends on
//! where the daemon is:
//!
//! - **Starting** (storage being opened, the layout being learnt from seeds): nothing is in
//!   flight and this process has acknowledged nothing yet, so it exits at once, status 0.
//! - **Serving**: the future [`signal`] gave resolves. The daemon stops accepting, finishes
//!   what is in flight (at most [`DRAIN_TIMEOUT`]), syncs its storage and returns; the
//!   runtime then gives leftover background work a bounded time, and the process exits 0.
//! - **Stopping**, a second signal: the process exits at once, with status 128 + the
//!   signal's number (as a shell reports a process killed by it: not a clean stop). Nothing
//!   acknowledged is lost: both storage engines hand every write to the OS (a `write(2)`)
//!   before it is acknowledged, so it outlives the process; what the last periodic sync had
//!   not forced to disk is exposed to a power loss in the next seconds, as after any crash.
//!
//! Once tokio listens for a signal, its default action (death) is gone for the life of the
//! process: without the watcher here, a second signal would do nothing at all.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

/// How long a stopping daemon lets requests in flight finish before it stops waiting (the
/// server's bound, `rpc::server::serve`).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// No signal future has been polled yet: the daemon is starting.
const STARTING: u8 = 0;
/// The daemon serves and waits on the signal future.
const SERVING: u8 = 1;
/// A signal came: the daemon is stopping (or exiting, when it came while starting).
const STOPPING: u8 = 2;

/// What the signal watcher and the daemon share.
struct Shutdown {
    state: AtomicU8,
    /// Woken once, by the first signal while serving.
    stop: Notify,
}

static SHUTDOWN: OnceLock<Arc<Shutdown>> = OnceLock::new();

/// Starts listening for SIGTERM and SIGINT, once per process; later calls do nothing. Must
/// run inside the tokio runtime.
pub fn install() {
    shared();
}

fn shared() -> Arc<Shutdown> {
    SHUTDOWN
        .get_or_init(|| {
            let shutdown = Arc::new(Shutdown {
                state: AtomicU8::new(STARTING),
                stop: Notify::new(),
            });
            match Signals::listen() {
                Ok(signals) => {
                    tokio::spawn(watch(signals, shutdown.clone()));
                }
                Err(error) => tracing::warn!(
                    %error,
                    "cannot listen for SIGTERM and SIGINT: the daemon cannot stop cleanly on them"
                ),
            }
            shutdown
        })
        .clone()
}

/// Resolves when the daemon is asked to stop: the first SIGTERM or SIGINT once it serves.
/// Call it once, inside the runtime, and hand it to the server (`rpc::server::serve`): the
/// daemon counts as serving from the future's first poll or the server's first accepted
/// connection, whichever comes first; a signal before both ends the process at once.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    let shutdown = shared();
    async move {
        // Fails only when a signal came first: the process is exiting then.
        let _ =
            shutdown
                .state
                .compare_exchange(STARTING, SERVING, Ordering::AcqRel, Ordering::Acquire);
        shutdown.stop.notified().await;
    }
}

/// Acts on every signal, for the rest of the process's life (or the runtime's).
async fn watch(mut signals: Signals, shutdown: Arc<Shutdown>) {
    while let Some(received) = signals.recv().await {
        let mut state = shutdown.state.swap(STOPPING, Ordering::AcqRel);
        // A server that accepted a connection serves, even if its loop has not polled the
        // signal future yet (it polls it next): that connection's request must be finished.
        if state == STARTING && crate::rpc::server::CONNECTIONS_ACCEPTED.get() > 0 {
            state = SERVING;
        }
        match state {
            STARTING => {
                tracing::info!(
                    signal = received.name,
                    "stopping before serving anything: exiting now"
                );
                std::process::exit(0);
            }
            SERVING => {
                tracing::info!(
                    signal = received.name,
                    drain_s = DRAIN_TIMEOUT.as_secs(),
                    "stopping: no new connections, finishing what is in flight, then syncing \
                     the storage; a second SIGTERM or SIGINT exits at once"
                );
                // Stored if the daemon is not waiting at this very moment.
                shutdown.stop.notify_one();
            }
            _ => {
                tracing::warn!(
                    signal = received.name,
                    "second signal: exiting now, without waiting for what is in flight or \
                     syncing the storage (acknowledged writes are with the OS already)"
                );
                std::process::exit(128 + received.number);
            }
        }
    }
}

/// A signal received: its name, for the log, and its number, for the exit status.
#[derive(Debug, Clone, Copy)]
struct Received {
    name: &'static str,
    number: i32,
}

#[cfg(unix)]
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn listen() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal; `None` once the runtime is shutting down.
    async fn recv(&mut self) -> Option<Received> {
        const SIGINT: i32 = 2;
        const SIGTERM: i32 = 15;
        tokio::select! {
            received = self.terminate.recv() => received.map(|()| Received {
                name: "SIGTERM",
                number: SIGTERM,
            }),
            received = self.interrupt.recv() => received.map(|()| Received {
                name: "SIGINT",
                number: SIGINT,
            }),
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn listen() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn recv(&mut self) -> Option<Received> {
        tokio::signal::ctrl_c().await.ok()?;
        Some(Received {
            name: "Ctrl-C",
            number: 2,
        })
    }
}
