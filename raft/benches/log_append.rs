//! Durable append cost of the Raft log on the real disk.
//!
//! Measures, in a fresh log directory under the cargo target directory (not `/tmp`, which may
//! be a tmpfs where fdatasync costs nothing):
//!
//! * latency of one durable append of a single ~200-byte entry (append + wait for the flush
//!   callback), p50/p99 over 1000 iterations;
//! * throughput in entries/s of durable appends in batches of 16, 64 and 256 entries.
//!
//! Run with `cargo bench -p raft --bench log_append`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use raft::log::{LogOptions, LogStats, LogStore};
use raft::Entry;
use state_machine::{Command, Op};

/// Padding that makes one encoded entry record about 200 bytes.
const PAYLOAD_PAD: usize = 170;

fn entry(index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Command::new(
            1_700_000_000_000 + index,
            Op::Cancel { ids: vec![], reason: "r".repeat(PAYLOAD_PAD) },
        )),
    }
}

struct Row {
    case: String,
    batch: usize,
    ops: usize,
    p50: Duration,
    p99: Duration,
    entries_per_sec: f64,
    avg_sync: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn sync_delta(before: LogStats, after: LogStats) -> Duration {
    let syncs = after.syncs - before.syncs;
    if syncs == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros((after.sync_micros - before.sync_micros) / syncs)
}

async fn measure(
    store: &mut LogStore,
    next: &mut u64,
    case: &str,
    batch: usize,
    ops: usize,
) -> Result<Row> {
    let before = store.stats();
    let mut latencies = Vec::with_capacity(ops);
    let started = Instant::now();
    for _ in 0..ops {
        let entries: Vec<Entry> = (0..batch as u64).map(|i| entry(*next + i)).collect();
        let t = Instant::now();
        store.blocking_append(entries).await?;
        latencies.push(t.elapsed());
        *next += batch as u64;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok(Row {
        case: case.to_string(),
        batch,
        ops,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        entries_per_sec: (batch * ops) as f64 / elapsed.as_secs_f64(),
        avg_sync: sync_delta(before, store.stats()),
    })
}

async fn run(dir: &Path) -> Result<()> {
    let mut store = LogStore::open(dir, LogOptions::default())?;
    let mut next = 1u64;

    // Warm up: create the segment, fault in the page cache.
    measure(&mut store, &mut next, "warm-up", 1, 50).await?;
    let stats = store.stats();
    let record_bytes = stats.bytes / stats.entries.max(1);

    let mut rows = vec![measure(&mut store, &mut next, "single entry", 1, 1000).await?];
    for (batch, ops) in [(16, 300), (64, 150), (256, 60)] {
        rows.push(measure(&mut store, &mut next, &format!("batch of {batch}"), batch, ops).await?);
    }
    let state = store.get_log_state().await?;
    ensure!(state.last_log_id.map(|l| l.index) == Some(next - 1), "log state after the runs");

    println!();
    println!(
        "raft log durable append ({record_bytes} bytes per entry record, dir {})",
        dir.display()
    );
    println!(
        "{:<14} {:>7} {:>6} {:>11} {:>11} {:>13} {:>16}",
        "case", "entries", "ops", "p50 (us)", "p99 (us)", "entries/s", "avg fsync (us)"
    );
    for r in &rows {
        println!(
            "{:<14} {:>7} {:>6} {:>11.1} {:>11.1} {:>13.0} {:>16.1}",
            r.case,
            r.batch,
            r.ops,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.entries_per_sec,
            r.avg_sync.as_secs_f64() * 1e6,
        );
    }
    let stats = store.stats();
    println!(
        "totals: {} appends, {} entries, {} bytes, {} syncs, {:.1} ms in sync",
        stats.appends,
        stats.entries,
        stats.bytes,
        stats.syncs,
        stats.sync_micros as f64 / 1000.0
    );
    Ok(())
}

fn main() -> Result<()> {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base)?;
    let tmp = tempfile::Builder::new().prefix("log-append-bench-").tempdir_in(base)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run(&tmp.path().join("log")))
}
