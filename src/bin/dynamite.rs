//! `dynamite`: the admin command. Parse flags, call the server once or twice, print; the
//! logic and the rendering live in [`dynamite::admin`].

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use dynamite::admin::{self, AdminArgs};

fn main() -> ExitCode {
    // A usage error exits with status 2, `--help` and `--version` with 0.
    let args = AdminArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(admin::run(&args)) {
        Ok(output) => {
            for warning in &output.warnings {
                eprintln!("warning: {warning}");
            }
            // A closed pipe (`dynamite status | head -1`) is not an error worth a panic.
            let _ = std::io::stdout().lock().write_all(output.text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
