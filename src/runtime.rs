//! The tokio runtime both daemons run on, and binding their listener.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::net::TcpListener;

/// Builds the runtime, binds `listen`, and runs `serve` on the listener. Failures to start are
/// reported as one line on stderr and exit status 1.
pub fn block_on<F, Fut>(daemon: &str, listen: SocketAddr, serve: F) -> ExitCode
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
            eprintln!("{daemon}: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("{daemon}: cannot listen on {listen}: {error}");
                return ExitCode::FAILURE;
            }
        };
        match serve(listener).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{daemon}: {error}");
                ExitCode::FAILURE
            }
        }
    })
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
