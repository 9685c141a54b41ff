//! `storage_node`: parse flags, set up logging, run the node until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
/// mimalloc: the profile showed glibc malloc's locking among the top costs under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use dynamite::cli::NodeArgs;

fn main() -> ExitCode {
    let config = match NodeArgs::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("storage_node: {error}");
            return ExitCode::from(2);
        }
    };
    dynamite::telemetry::init_logging();
    dynamite::runtime::block_on("storage_node", config.listen, |listener| {
        dynamite::node::run(config, listener, dynamite::shutdown::signal())
    })
}
