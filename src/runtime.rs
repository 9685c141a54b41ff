//! The tokio runtime both daemons run on, binding their listener, and where their blocking
//! work runs.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::telemetry::LogFormat;

/// How long work still running once the daemon's `run` returned may go on before the process
/// exits without it.
///
/// By then the daemon has stopped serving and synced its storage; what may be left is
/// background work, above all blocking tasks: a storage node's count of its keys and the fill
/// of its anti-entropy trees each read the whole store in one blocking task, which cannot be
/// cancelled and takes minutes on a large store. Dropping the runtime would wait for them
/// however long they take, and the process would miss its deadline (SIGTERM: exit within
/// [`crate::shutdown::DRAIN_TIMEOUT`] and a little); cut, they are only reads, or writes a
/// crash would cut too, which the engines are built to survive.
pub const LEFTOVER_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the runtime, listens for SIGTERM and SIGINT ([`crate::shutdown`]), binds `listen`,
/// and runs `serve` on the listener; then gives what is left [`LEFTOVER_TIMEOUT`]. Failures to
/// start are reported as one line on stderr ([`fatal`]) and exit status 1.
pub fn block_on<F, Fut>(
    daemon: &str,
    log_format: LogFormat,
    listen: SocketAddr,
    serve: F,
) -> ExitCode
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = crate::error::Result<()>>,
{
    refuse_transparent_huge_pages(daemon);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            fatal(
                daemon,
                log_format,
                format_args!("cannot start the runtime: {error}"),
            );
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        crate::shutdown::install();
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                fatal(
                    daemon,
                    log_format,
                    format_args!("cannot listen on {listen}: {error}"),
                );
                return ExitCode::FAILURE;
            }
        };
        match serve(listener).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                fatal(daemon, log_format, &error);
                ExitCode::FAILURE
            }
        }
    });
    runtime.shutdown_timeout(LEFTOVER_TIMEOUT);
    code
}

/// Says, in one line on stderr, why the daemon will not start or stopped on an error: with
/// text logs a plain `DAEMON: REASON` (as scripts and the tests look for it), with JSON logs an
/// error event, so that every line a daemon writes there is JSON (only clap's usage errors,
/// which come before the format is known, are not).
pub fn fatal(daemon: &str, log_format: LogFormat, reason: impl std::fmt::Display) {
    match log_format {
        LogFormat::Text => eprintln!("{daemon}: {reason}"),
        LogFormat::Json => tracing::error!(daemon, "{reason}"),
    }
}

/// Asks Linux for no transparent huge pages in this process.
///
/// mimalloc advises the kernel to back its arenas with 2 MiB pages. A node's memtables grow
/// and are freed all the time, so the kernel kept zeroing fresh huge pages inside request
/// threads and splitting them again when mimalloc returned parts of them, stalling requests;
/// the put p99 was much lower without them (docs/performance.md, third round). Where the call
/// fails (an old kernel), the daemon runs as before.
fn refuse_transparent_huge_pages(daemon: &str) {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(daemon, %error, "transparent huge pages stay allowed");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = daemon;
}

/// Blocking work that failed to finish: it panicked, or its runtime is shutting down.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BlockingFailed(String);

/// Runs blocking work (reading or syncing the store) off the async threads, on tokio's
/// blocking pool; under a simulation ([`crate::simulation`]), at once on the caller's thread,
/// so that when it ends follows from the seed and not from the OS's scheduling.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingFailed> {
    if crate::simulation::hooks().is_some() {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| BlockingFailed(error.to_string()))
}

/// As [`blocking`], for work nobody waits for (under a simulation it runs before this returns).
/// A blocking task cannot be aborted: at a stop, the runtime gives it [`LEFTOVER_TIMEOUT`].
pub fn spawn_blocking(work: impl FnOnce() + Send + 'static) {
    if crate::simulation::hooks().is_some() {
        work();
    } else {
        drop(tokio::task::spawn_blocking(work));
    }
}
