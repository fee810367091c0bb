//! The chaos runs of the test suite: a smoke-sized schedule by default, the long one with
//! `CHAOS_LONG=1`, and a rolling upgrade from the previous release's command version under
//! load. `CHAOS_SEED=N` reruns a given seed; the seed and the reproduce command are printed
//! first. History, logs, data dirs and the report are kept under
//! `target/chaos/<name>-<seed>/` when the run fails (set `CHAOS_KEEP=1` to keep them always).

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use chaos_tests::scenario::{self, ChaosConfig};

/// One chaos cluster at a time: two would starve each other's elections on a small machine.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn chaos_run_has_no_violations() {
    let long = std::env::var("CHAOS_LONG").is_ok_and(|v| v == "1");
    if long {
        checked_run("long", "CHAOS_LONG=1 ", "chaos_run", ChaosConfig::long);
    } else {
        checked_run("smoke", "", "chaos_run", ChaosConfig::smoke);
    }
}

#[test]
fn a_rolling_upgrade_under_load_has_no_violations() {
    checked_run("upgrade", "", "rolling_upgrade", ChaosConfig::upgrade);
}

/// Run one seeded scenario and assert the checker's verdict.
fn checked_run(name: &str, mode: &str, filter: &str, make: fn(u64, PathBuf) -> ChaosConfig) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    let seed = std::env::var("CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
    });
    let target = std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().nth(3).map(|p| p.to_path_buf()))
        .unwrap_or_else(std::env::temp_dir);
    let dir = target.join("chaos").join(format!("{name}-{seed}"));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = make(seed, dir.clone());
    let rerun = format!(
        "{mode}CHAOS_SEED={seed} cargo test --release -p chaos-tests --test smoke {filter} -- \
         --nocapture"
    );
    println!("chaos seed {seed} ({name}); rerun with: {rerun}");

    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let outcome = rt.block_on(scenario::run(cfg));
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            panic!("chaos harness failed: {e:#}\nartifacts: {}\nrerun: {rerun}", dir.display())
        }
    };
    println!("{}", outcome.report);
    let valid = outcome.report.is_valid();
    if valid && std::env::var("CHAOS_KEEP").is_err() {
        let _ = std::fs::remove_dir_all(&outcome.dir);
    }
    assert!(
        valid,
        "chaos run failed (seed {seed}); artifacts in {}\nrerun: {rerun}",
        outcome.dir.display()
    );
}
