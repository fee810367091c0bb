//! `schedulerd`: parse flags, load the configuration, start logging, run the node until
//! SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.

use std::process::ExitCode;

use clap::Parser;
use node::config::{Args, Config, LogFormat};

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("schedulerd: {e}");
            return ExitCode::from(2);
        }
    };
    // `cfg.log` already resolved `--log` > `RUST_LOG` > file > default.
    let filter = match tracing_subscriber::EnvFilter::try_new(&cfg.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("schedulerd: invalid log filter {:?}: {e}", cfg.log);
            return ExitCode::from(2);
        }
    };
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match cfg.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("schedulerd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(node::server::run(cfg, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "schedulerd failed");
            eprintln!("schedulerd: {e}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
