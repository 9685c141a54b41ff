//! `load_balancer`: parse flags, set up logging, run the coordinator until Ctrl-C or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
/// mimalloc: the profile showed glibc malloc's locking among the top costs under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use dynamite::cli::BalancerArgs;

fn main() -> ExitCode {
    let config = match BalancerArgs::parse().into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("load_balancer: {error}");
            return ExitCode::from(2);
        }
    };
    dynamite::telemetry::init_logging();
    dynamite::runtime::block_on("load_balancer", config.listen, |listener| {
        dynamite::balancer::run(config, listener, dynamite::shutdown::signal())
    })
}
