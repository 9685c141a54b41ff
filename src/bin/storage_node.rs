//! `storage_node`: parse flags, set up logging, run the node until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
/// mimalloc: the profile showed glibc malloc's locking among the top costs under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use dynamite::cli::NodeArgs;

fn main() -> ExitCode {
    let args = NodeArgs::parse();
    // Logging first, so that what reading the flags warns of is in the chosen format.
    let log_format = args.log_format;
    dynamite::telemetry::init_logging(log_format);
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            dynamite::runtime::fatal("storage_node", log_format, error);
            return ExitCode::from(2);
        }
    };
    dynamite::runtime::block_on("storage_node", log_format, config.listen, |listener| {
        dynamite::node::run(config, listener, dynamite::shutdown::signal())
    })
}
