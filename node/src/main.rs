//! `schedulerd`: parse flags, load the configuration, start logging, run the node until
//! SIGTERM/SIGINT. Exit codes: 0 clean stop, 1 runtime failure (a storage error, a full disk,
//! a server failure, a forced stop), 2 bad configuration.
//!
//! Stopping is always bounded. A runtime failure exits at once after the message, without
//! running destructors: sled's last handle flushes when dropped, and after an IO error that
//! flush never returns. After the first SIGTERM/SIGINT a second one, or a shutdown still
//! running after [`SHUTDOWN_LIMIT`], ends the process at once (exit 1).

use std::process::ExitCode;
use std::time::Duration;

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
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    runtime.spawn(signals(first_tx));
    let stop = async {
        let _ = first_rx.await;
    };
    match runtime.block_on(node::server::run(cfg, stop)) {
        Ok(()) => {
            runtime.shutdown_timeout(Duration::from_secs(5));
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "schedulerd failed");
            eprintln!("schedulerd: {e}");
            // No destructors (see the module docs): the message is out, the data that was
            // acknowledged is durable, and the rest of the cluster carries on.
            std::process::exit(1)
        }
    }
}

/// How long a shutdown may take after the first signal before the process ends anyway.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(30);

/// The first SIGTERM/SIGINT asks for a clean stop; from then on a second one, or the
/// shutdown outliving [`SHUTDOWN_LIMIT`], ends the process at once.
async fn signals(first: tokio::sync::oneshot::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    next_signal(&mut term).await;
    let _ = first.send(());
    // A plain thread: it must fire even if every runtime worker is stuck.
    std::thread::spawn(|| {
        std::thread::sleep(SHUTDOWN_LIMIT);
        eprintln!("schedulerd: shutdown did not finish within {SHUTDOWN_LIMIT:?}; exiting");
        std::process::exit(1);
    });
    next_signal(&mut term).await;
    eprintln!("schedulerd: second stop signal; exiting now");
    std::process::exit(1);
}

async fn next_signal(term: &mut Option<tokio::signal::unix::Signal>) {
    match term {
        Some(t) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
