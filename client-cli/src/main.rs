//! `schedctl`: the raftsched command-line tool. The commands live in [`cli`]; this file only
//! parses the arguments, runs the command on a tokio runtime and turns the outcome into the
//! exit code (0 ok, 1 the operation failed, 2 usage error, 3 cluster unavailable).

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(cli::run(args));
    // Workers and dev clusters may leave detached tasks (a job being killed); do not wait for
    // them forever.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    ExitCode::from(code)
}
