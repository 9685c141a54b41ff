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
