//! Behaviour of the durable Raft log: reads across segments, truncate, purge, vote/committed,
//! recovery (torn tails, corruption, holes), the rules openraft's storage suite checks, IO
//! failure, and a crash test that SIGKILLs a child process appending to the log.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use openraft::storage::{RaftLogReaderExt, RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, LogId, RaftLogReader, Vote};
use raft::log::{LogError, LogOptions, LogStore};
use raft::Entry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use state_machine::{Command, Op};

fn lid(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// An entry whose payload names its term and index, so reads can be checked for content.
fn ent(term: u64, index: u64) -> Entry {
    Entry {
        log_id: lid(term, index),
        payload: EntryPayload::Normal(Command::new(
            index,
            Op::Cancel { ids: vec![], reason: format!("payload {term}:{index}") },
        )),
    }
}

fn ents(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range.map(|i| ent(term, i)).collect()
}

fn check_entry(e: &Entry, term: u64, index: u64) -> Result<()> {
    ensure!(e.log_id == lid(term, index), "expected {:?}, got {:?}", lid(term, index), e.log_id);
    match &e.payload {
        EntryPayload::Normal(Command { op: Op::Cancel { reason, .. }, .. })
            if *reason == format!("payload {term}:{index}") => {}
        other => return Err(anyhow!("entry {index} has wrong payload {other:?}")),
    }
    Ok(())
}

/// Checks that `entries` are exactly `range` with the given term.
fn check_run(entries: &[Entry], term: u64, range: std::ops::RangeInclusive<u64>) -> Result<()> {
    let want: Vec<u64> = range.collect();
    let got: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    ensure!(got == want, "expected indexes {want:?}, got {got:?}");
    for e in entries {
        check_entry(e, term, e.log_id.index)?;
    }
    Ok(())
}

fn small(segment_size: u64, cache_bytes: usize) -> LogOptions {
    LogOptions { segment_size, cache_bytes, ..LogOptions::default() }
}

/// Opens a store, waiting out a lock briefly held by someone else. Tests run in parallel
/// threads and the crash test spawns child processes: a child forked while another test
/// still had its store open inherits that store's locked descriptor until it execs, so a
/// reopen right after `drop` can find the lock taken for a moment.
fn open(dir: &Path, opts: &LogOptions) -> Result<LogStore> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match LogStore::open(dir, opts.clone()) {
            Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return Ok(r?),
        }
    }
}

fn segment_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<PathBuf>>>()?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    files.sort();
    Ok(files)
}

fn first_index_of(segment: &Path) -> Result<u64> {
    let name = segment.file_name().and_then(|n| n.to_str()).context("segment name")?;
    Ok(name.trim_start_matches("seg-").trim_end_matches(".wal").parse()?)
}

async fn last_index(store: &mut LogStore) -> Result<Option<u64>> {
    Ok(store.get_log_state().await?.last_log_id.map(|l| l.index))
}

async fn append_in_batches(store: &mut LogStore, term: u64, from: u64, to: u64) -> Result<()> {
    let mut next = from;
    let mut size = 1;
    while next <= to {
        let end = (next + size - 1).min(to);
        store.blocking_append(ents(term, next..=end)).await?;
        next = end + 1;
        size = size % 7 + 1;
    }
    Ok(())
}

#[tokio::test]
async fn append_and_read_across_segments() -> Result<()> {
    for cache in [0usize, 64 << 20] {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("log");
        let opts = LogOptions { max_read_bytes: 700, ..small(250, cache) };
        let mut store = open(&dir, &opts)?;
        append_in_batches(&mut store, 1, 1, 120).await?;
        ensure!(segment_files(&dir)?.len() > 5, "tiny segments must rotate");

        for round in 0..2 {
            check_run(&store.try_get_log_entries(0..500).await?, 1, 1..=120)?;
            check_run(&store.try_get_log_entries(37..83).await?, 1, 37..=82)?;
            check_run(&store.try_get_log_entries(50..=50).await?, 1, 50..=50)?;
            check_run(&store.try_get_log_entries(100..).await?, 1, 100..=120)?;
            ensure!(store.try_get_log_entries(121..130).await?.is_empty());
            ensure!(store.try_get_log_entries(7..7).await?.is_empty());

            // Replication reads are capped in bytes but never empty for a non-empty range.
            let mut reader = store.get_log_reader().await;
            let limited = reader.limited_get_log_entries(10, 121).await?;
            ensure!(!limited.is_empty() && limited.len() < 111, "got {}", limited.len());
            check_run(&limited, 1, 10..=(9 + limited.len() as u64))?;
            ensure!(reader.limited_get_log_entries(10, 11).await?.len() == 1);

            let state = store.get_log_state().await?;
            ensure!(state.last_log_id == Some(lid(1, 120)) && state.last_purged_log_id.is_none());
            if round == 0 {
                drop(store);
                store = open(&dir, &opts)?;
            }
        }

        // The reopened log keeps appending after its last entry.
        append_in_batches(&mut store, 2, 121, 140).await?;
        check_run(&store.try_get_log_entries(121..).await?, 2, 121..=140)?;
        check_run(&store.try_get_log_entries(1..121).await?, 1, 1..=120)?;
    }
    Ok(())
}

#[tokio::test]
async fn truncate_inside_a_segment_and_across_boundaries() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let opts = small(250, 500);
    let mut store = open(&dir, &opts)?;
    append_in_batches(&mut store, 1, 1, 60).await?;

    // Inside the last segment: no file disappears.
    let files = segment_files(&dir)?;
    let last_start = first_index_of(files.last().context("no segments")?)?;
    ensure!(last_start < 60, "the last segment holds several entries");
    store.truncate(lid(1, 60)).await?;
    ensure!(segment_files(&dir)? == files);
    ensure!(last_index(&mut store).await? == Some(59));
    store.blocking_append(ents(2, 60..=64)).await?;

    // Across boundaries: truncating in the middle of an early segment deletes later files.
    let files = segment_files(&dir)?;
    let second = first_index_of(&files[1])?;
    let third = first_index_of(&files[2])?;
    ensure!(third > second + 1, "the second segment holds several entries");
    let cut = second + 1;
    store.truncate(lid(1, cut)).await?;
    ensure!(segment_files(&dir)? == files[..2].to_vec(), "later segments must be deleted");
    ensure!(store.get_log_state().await?.last_log_id == Some(lid(1, cut - 1)));
    check_run(&store.try_get_log_entries(0..1000).await?, 1, 1..=cut - 1)?;

    // Exactly at a segment's first entry: the file keeps only its header.
    store.truncate(lid(1, second)).await?;
    ensure!(segment_files(&dir)? == files[..2].to_vec());
    ensure!(last_index(&mut store).await? == Some(second - 1));

    // Re-append with a new term, reopen, and everything is where it belongs.
    store.blocking_append(ents(3, second..=second + 30)).await?;
    store.truncate(lid(3, second + 25)).await?;
    drop(store);
    let mut store = open(&dir, &opts)?;
    let all = store.try_get_log_entries(0..1000).await?;
    check_run(&all[..(second - 1) as usize], 1, 1..=second - 1)?;
    check_run(&all[(second - 1) as usize..], 3, second..=second + 24)?;
    ensure!(store.get_log_state().await?.last_log_id == Some(lid(3, second + 24)));
    Ok(())
}

#[tokio::test]
async fn purge_then_read_and_reopen() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let opts = small(250, 0);
    let mut store = open(&dir, &opts)?;
    append_in_batches(&mut store, 1, 1, 100).await?;
    store.save_committed(Some(lid(1, 90))).await?;
    let before = segment_files(&dir)?.len();

    store.purge(lid(1, 40)).await?;
    let files = segment_files(&dir)?;
    ensure!(files.len() < before, "segments wholly below the purge point are deleted");
    let first = first_index_of(&files[0])?;
    ensure!(first > 1 && first <= 41, "first remaining segment starts at {first}");
    for round in 0..2 {
        let state = store.get_log_state().await?;
        ensure!(state.last_purged_log_id == Some(lid(1, 40)));
        ensure!(state.last_log_id == Some(lid(1, 100)));
        check_run(&store.try_get_log_entries(0..1000).await?, 1, 41..=100)?;
        ensure!(store.try_get_log_entry(40).await?.is_none());
        ensure!(store.get_log_entries(30..50).await.is_err(), "purged entries are gone");
        ensure!(store.get_log_id(41).await? == lid(1, 41));
        ensure!(store.read_committed().await? == Some(lid(1, 90)));
        if round == 0 {
            drop(store);
            store = open(&dir, &opts)?;
        }
    }

    // Purging a prefix again is a no-op, purging beyond the end empties the log.
    store.purge(lid(1, 30)).await?;
    ensure!(store.get_log_state().await?.last_purged_log_id == Some(lid(1, 40)));
    store.purge(lid(2, 150)).await?;
    let state = store.get_log_state().await?;
    ensure!(state.last_purged_log_id == Some(lid(2, 150)));
    ensure!(state.last_log_id == Some(lid(2, 150)));
    ensure!(store.try_get_log_entries(0..).await?.is_empty());
    store.blocking_append(ents(2, 151..=160)).await?;
    drop(store);

    let mut store = open(&dir, &opts)?;
    let state = store.get_log_state().await?;
    ensure!(state.last_purged_log_id == Some(lid(2, 150)));
    ensure!(state.last_log_id == Some(lid(2, 160)));
    check_run(&store.try_get_log_entries(..).await?, 2, 151..=160)?;
    // Another purge reclaims the segments that only held purged entries.
    store.purge(lid(2, 155)).await?;
    ensure!(segment_files(&dir)?.len() == 1, "{:?}", segment_files(&dir)?);
    check_run(&store.try_get_log_entries(..).await?, 2, 156..=160)?;
    Ok(())
}

#[tokio::test]
async fn vote_and_committed_round_trip() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let opts = LogOptions::default();
    let mut store = open(&dir, &opts)?;
    ensure!(store.read_vote().await?.is_none());
    ensure!(store.read_committed().await?.is_none());

    store.save_vote(&Vote::new(3, 2)).await?;
    ensure!(store.read_vote().await? == Some(Vote::new(3, 2)));
    store.blocking_append(ents(3, 0..=9)).await?;
    store.save_committed(Some(lid(3, 5))).await?;
    ensure!(store.read_committed().await? == Some(lid(3, 5)));
    drop(store);

    let mut store = open(&dir, &opts)?;
    ensure!(store.read_vote().await? == Some(Vote::new(3, 2)));
    ensure!(store.read_committed().await? == Some(lid(3, 5)));
    store.save_vote(&Vote::new_committed(4, 1)).await?;
    store.save_committed(Some(lid(3, 9))).await?;
    drop(store);

    let mut store = open(&dir, &opts)?;
    ensure!(store.read_vote().await? == Some(Vote::new_committed(4, 1)));
    ensure!(store.read_committed().await? == Some(lid(3, 9)));
    ensure!(!dir.join("vote.tmp").exists());
    Ok(())
}

/// A vote persisted with an absurd term (by a build that accepted one from a hostile peer)
/// is refused at open with an error naming the remedy, instead of a panic at the next
/// election; a term at the bound still opens.
#[tokio::test]
async fn an_absurd_persisted_term_is_refused_at_open() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let opts = LogOptions::default();
    let mut store = open(&dir, &opts)?;
    store.save_vote(&Vote::new(raft::plausible::MAX_STORED_TERM, 2)).await?;
    drop(store);
    let mut store = open(&dir, &opts)?;
    ensure!(store.read_vote().await? == Some(Vote::new(raft::plausible::MAX_STORED_TERM, 2)));
    store.save_vote(&Vote::new(u64::MAX, 2)).await?;
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    let opened = loop {
        match LogStore::open(&dir, opts.clone()) {
            Err(LogError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            other => break other,
        }
    };
    match opened {
        Err(LogError::ImplausibleVote { term, .. }) => ensure!(term == u64::MAX),
        Err(e) => return Err(anyhow!("wrong error: {e}")),
        Ok(_) => return Err(anyhow!("a vote with term u64::MAX was accepted at open")),
    }
    Ok(())
}

#[tokio::test]
async fn reopen_restores_everything() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let opts = small(2000, 3000);
    let mut store = open(&dir, &opts)?;
    store.save_vote(&Vote::new(1, 1)).await?;
    append_in_batches(&mut store, 1, 0, 80).await?;
    store.purge(lid(1, 25)).await?;
    store.truncate(lid(1, 70)).await?;
    store.save_vote(&Vote::new_committed(2, 1)).await?;
    store.blocking_append(ents(2, 70..=75)).await?;
    store.save_committed(Some(lid(2, 72))).await?;
    let state = store.get_log_state().await?;
    let entries = store.try_get_log_entries(..).await?;
    drop(store);

    let mut store = open(&dir, &opts)?;
    ensure!(store.get_log_state().await? == state);
    ensure!(state.last_purged_log_id == Some(lid(1, 25)) && state.last_log_id == Some(lid(2, 75)));
    ensure!(store.read_vote().await? == Some(Vote::new_committed(2, 1)));
    ensure!(store.read_committed().await? == Some(lid(2, 72)));
    let again = store.try_get_log_entries(..).await?;
    ensure!(again.len() == entries.len() && again.len() == 50);
    for (a, b) in again.iter().zip(&entries) {
        ensure!(a.log_id == b.log_id && a.payload == b.payload);
    }
    check_run(&again[..44], 1, 26..=69)?;
    check_run(&again[44..], 2, 70..=75)?;
    Ok(())
}

/// Writes entries 1..=10 one batch each into a single segment and returns its path.
async fn ten_entries(dir: &Path) -> Result<PathBuf> {
    let mut store = open(dir, &LogOptions::default())?;
    for i in 1..=10 {
        store.blocking_append([ent(1, i)]).await?;
    }
    drop(store);
    let files = segment_files(dir)?;
    ensure!(files.len() == 1);
    Ok(files[0].clone())
}

async fn expect_first_nine_then_append(dir: &Path) -> Result<()> {
    let mut store = open(dir, &LogOptions::default())?;
    ensure!(last_index(&mut store).await? == Some(9), "the torn entry must be gone");
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=9)?;
    store.blocking_append([ent(2, 10), ent(2, 11)]).await?;
    drop(store);
    let mut store = open(dir, &LogOptions::default())?;
    check_run(&store.try_get_log_entries(1..10).await?, 1, 1..=9)?;
    check_run(&store.try_get_log_entries(10..).await?, 2, 10..=11)?;
    Ok(())
}

#[tokio::test]
async fn torn_tail_is_cut_away() -> Result<()> {
    // Bytes missing at the end of the last record.
    let tmp = tempfile::tempdir()?;
    let seg = ten_entries(tmp.path()).await?;
    let len = fs::metadata(&seg)?.len();
    fs::OpenOptions::new().write(true).open(&seg)?.set_len(len - 3)?;
    expect_first_nine_then_append(tmp.path()).await?;

    // A garbled byte inside the last record.
    let tmp = tempfile::tempdir()?;
    let seg = ten_entries(tmp.path()).await?;
    let mut data = fs::read(&seg)?;
    let at = data.len() - 5;
    data[at] ^= 0xff;
    fs::write(&seg, &data)?;
    expect_first_nine_then_append(tmp.path()).await?;

    // Zeroes after the last record (size grew, data never landed): all ten survive.
    let tmp = tempfile::tempdir()?;
    let seg = ten_entries(tmp.path()).await?;
    fs::OpenOptions::new().append(true).open(&seg)?.write_all(&[0u8; 100])?;
    let mut store = open(tmp.path(), &LogOptions::default())?;
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=10)?;
    store.blocking_append([ent(1, 11)]).await?;
    drop(store);
    let mut store = open(tmp.path(), &LogOptions::default())?;
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=11)?;
    Ok(())
}

/// Four flipped bytes in the middle of the newest segment: valid records follow, so this is
/// damage, not a torn write. Open refuses, naming the file, the offset and the recovery, and
/// cuts nothing (the entries after the damage are still on disk for whoever investigates).
#[tokio::test]
async fn damage_in_the_middle_of_the_last_segment_fails_open_and_cuts_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let seg = ten_entries(tmp.path()).await?;
    let mut data = fs::read(&seg)?;
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 4] {
        *b ^= 0xA5;
    }
    fs::write(&seg, &data)?;
    let name = seg.file_name().and_then(|n| n.to_str()).context("name")?.to_string();
    match LogStore::open(tmp.path(), LogOptions::default()) {
        Err(e @ LogError::Corrupt { .. }) => {
            let msg = e.to_string();
            ensure!(msg.contains(&name), "names the file: {msg}");
            ensure!(msg.contains("valid record follows"), "says why it is not torn: {msg}");
            ensure!(msg.contains("data directory"), "says how to recover: {msg}");
        }
        Err(e) => return Err(anyhow!("expected a corruption error, got {e}")),
        Ok(_) => return Err(anyhow!("open must refuse damage followed by valid records")),
    }
    ensure!(fs::read(&seg)? == data, "nothing was cut");
    Ok(())
}

#[tokio::test]
async fn incomplete_new_segment_is_removed() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let opts = small(1000, 0);
    let mut store = open(dir, &opts)?;
    append_in_batches(&mut store, 1, 1, 40).await?;
    drop(store);
    // A crash right after creating the next segment leaves an empty or headerless file.
    let empty = dir.join("seg-00000000000000000041.wal");
    fs::write(&empty, [7u8, 0, 0])?;
    let mut store = open(dir, &opts)?;
    ensure!(!empty.exists());
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=40)?;
    append_in_batches(&mut store, 1, 41, 45).await?;
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=45)?;
    Ok(())
}

#[tokio::test]
async fn corruption_before_the_tail_fails_open() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let opts = small(250, 0);
    let mut store = open(dir, &opts)?;
    append_in_batches(&mut store, 1, 1, 50).await?;
    drop(store);

    let files = segment_files(dir)?;
    let victim = &files[1];
    let original = fs::read(victim)?;
    let mut data = original.clone();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    fs::write(victim, &data)?;
    let name = victim.file_name().and_then(|n| n.to_str()).context("name")?.to_string();
    match LogStore::open(dir, opts.clone()) {
        Err(e @ LogError::Corrupt { .. }) => {
            ensure!(e.to_string().contains(&name), "error must name the file: {e}");
        }
        Err(e) => return Err(anyhow!("expected a corruption error, got {e}")),
        Ok(_) => return Err(anyhow!("open must fail on a damaged non-last segment")),
    }

    // A missing middle segment is a hole, never silently skipped.
    fs::write(victim, &original)?;
    fs::remove_file(&files[2])?;
    let next = files[3].file_name().and_then(|n| n.to_str()).context("name")?.to_string();
    match LogStore::open(dir, opts) {
        Err(e @ LogError::Corrupt { .. }) => {
            let msg = e.to_string();
            ensure!(msg.contains(&next) && msg.contains("hole"), "unexpected message: {msg}");
        }
        Err(e) => return Err(anyhow!("expected a corruption error, got {e}")),
        Ok(_) => return Err(anyhow!("open must fail on a hole")),
    }
    Ok(())
}

/// The rules openraft's storage `Suite` checks for the log side, exercised directly.
#[tokio::test]
async fn follows_openraft_storage_rules() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let opts = small(700, 1000);

    // get_log_state: empty, then after purges (including past the end).
    let mut store = open(&tmp.path().join("a"), &opts)?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id.is_none() && st.last_log_id.is_none());
    ensure!(store.try_get_log_entry(0).await?.is_none());
    store.blocking_append([ent(0, 0), ent(1, 1), ent(1, 2)]).await?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id.is_none() && st.last_log_id == Some(lid(1, 2)));
    store.purge(lid(0, 0)).await?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id == Some(lid(0, 0)) && st.last_log_id == Some(lid(1, 2)));
    store.purge(lid(1, 2)).await?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id == Some(lid(1, 2)) && st.last_log_id == Some(lid(1, 2)));
    store.purge(lid(2, 3)).await?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id == Some(lid(2, 3)) && st.last_log_id == Some(lid(2, 3)));
    // Entries at or below the purge point are already covered: they are skipped, the rest of
    // the batch is kept (the suite appends below the point `get_initial_state` purged to).
    store.blocking_append([ent(1, 1)]).await?;
    ensure!(store.get_log_state().await? == st);
    store.blocking_append([ent(2, 3), ent(2, 4)]).await?;
    check_run(&store.try_get_log_entries(..).await?, 2, 4..=4)?;
    drop(store);

    // Ten logs + vote, as the suite feeds them.
    async fn feed(dir: &Path, opts: &LogOptions) -> Result<LogStore> {
        let mut store = open(dir, opts)?;
        store.blocking_append([ent(0, 0)]).await?;
        for i in 1..=10 {
            store.blocking_append([ent(1, i)]).await?;
        }
        store.save_vote(&Vote::new(1, 0)).await?;
        Ok(store)
    }

    let mut store = feed(&tmp.path().join("b"), &opts).await?;
    ensure!(store.get_log_entries(3..3).await?.is_empty());
    check_run(&store.get_log_entries(5..7).await?, 1, 5..=6)?;
    let limited = store.limited_get_log_entries(5, 7).await?;
    ensure!(!limited.is_empty() && limited.len() <= 2 && limited[0].log_id == lid(1, 5));
    ensure!(store.limited_get_log_entries(3, 3).await?.is_empty());
    store.purge(lid(1, 3)).await?;
    ensure!(store.get_log_id(0).await.is_err() && store.get_log_id(3).await.is_err());
    ensure!(store.get_log_id(4).await? == lid(1, 4) && store.get_log_id(10).await? == lid(1, 10));
    ensure!(store.get_log_id(11).await.is_err());
    drop(store);

    // purge_logs_upto_0 / 5 / 20.
    for (upto, left) in [(lid(0, 0), 10usize), (lid(1, 5), 5), (lid(1, 20), 0)] {
        let mut store = feed(&tmp.path().join(format!("purge-{}", upto.index)), &opts).await?;
        store.purge(upto).await?;
        let logs = store.try_get_log_entries(0..100).await?;
        ensure!(logs.len() == left);
        if let Some(first) = logs.first() {
            ensure!(first.log_id.index == upto.index + 1);
        }
        let st = store.get_log_state().await?;
        let last = if left == 0 { upto } else { lid(1, 10) };
        ensure!(st.last_purged_log_id == Some(upto) && st.last_log_id == Some(last));
    }

    // delete_logs_since_11 is a no-op; delete_logs_since_0 empties the log.
    let mut store = feed(&tmp.path().join("c"), &opts).await?;
    store.truncate(lid(1, 11)).await?;
    ensure!(store.try_get_log_entries(0..100).await?.len() == 11);
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id.is_none() && st.last_log_id == Some(lid(1, 10)));
    store.truncate(lid(0, 0)).await?;
    ensure!(store.try_get_log_entries(0..100).await?.is_empty());
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id.is_none() && st.last_log_id.is_none());
    drop(store);
    let mut store = open(&tmp.path().join("c"), &opts)?;
    let st = store.get_log_state().await?;
    ensure!(st.last_purged_log_id.is_none() && st.last_log_id.is_none());
    store.blocking_append([ent(2, 0)]).await?;
    drop(store);

    // append_to_log after a purge.
    let mut store = feed(&tmp.path().join("d"), &opts).await?;
    store.purge(lid(0, 0)).await?;
    store.blocking_append([ent(2, 11)]).await?;
    let all = store.try_get_log_entries(0..).await?;
    ensure!(all.len() == 11 && all.last().map(|e| e.log_id) == Some(lid(2, 11)));
    drop(store);

    // A fresh log may start at any index (the suite appends at 2 first); after that, appends
    // that would leave a hole are refused, and the callback reports the error.
    let mut store = open(&tmp.path().join("e"), &opts)?;
    store.blocking_append(ents(1, 2..=5)).await?;
    store.purge(lid(1, 1)).await?;
    ensure!(store.get_log_state().await?.last_purged_log_id == Some(lid(1, 1)));
    ensure!(store.blocking_append([ent(1, 7)]).await.is_err(), "a hole must be refused");
    ensure!(store.blocking_append([ent(1, 6), ent(1, 8)]).await.is_err());
    ensure!(last_index(&mut store).await? == Some(5), "a refused append writes nothing");
    store.blocking_append([ent(1, 6)]).await?;
    drop(store);
    let mut store = open(&tmp.path().join("e"), &opts)?;
    check_run(&store.try_get_log_entries(..).await?, 1, 2..=6)?;
    Ok(())
}

#[tokio::test]
async fn io_error_poisons_the_store() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let mut store = open(&dir, &small(100, 0))?;
    store.blocking_append(ents(1, 1..=10)).await?;
    ensure!(segment_files(&dir)?.len() == 1);
    // The segment is full, so the next batch needs a new file, which cannot be created.
    fs::remove_dir_all(&dir)?;
    ensure!(store.blocking_append(ents(1, 11..=19)).await.is_err());
    ensure!(store.blocking_append([ent(1, 11)]).await.is_err(), "later appends fail too");
    ensure!(store.get_log_state().await.is_err());
    ensure!(store.try_get_log_entries(..).await.is_err());
    ensure!(store.save_vote(&Vote::new(2, 1)).await.is_err());
    ensure!(store.read_vote().await.is_err());
    ensure!(store.truncate(lid(1, 2)).await.is_err());
    ensure!(store.purge(lid(1, 1)).await.is_err());
    let mut reader = store.get_log_reader().await;
    ensure!(reader.try_get_log_entries(..).await.is_err());
    Ok(())
}

#[tokio::test]
async fn a_directory_is_opened_once() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let store = open(tmp.path(), &LogOptions::default())?;
    match LogStore::open(tmp.path(), LogOptions::default()) {
        Err(LogError::Locked { .. }) => {}
        Err(e) => return Err(anyhow!("expected Locked, got {e}")),
        Ok(_) => return Err(anyhow!("a second open must fail while the first is alive")),
    }
    drop(store);
    let _store = open(tmp.path(), &LogOptions::default())?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_run_concurrently_with_appends() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut store = open(tmp.path(), &small(4000, 3000))?;
    let mut readers = Vec::new();
    for seed in 0..2u64 {
        let mut reader = store.get_log_reader().await;
        readers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut reads = 0;
            for _ in 0..400 {
                let start = rng.random_range(1..1200u64);
                let len = rng.random_range(1..80u64);
                let got = reader.try_get_log_entries(start..start + len).await?;
                for (k, e) in got.iter().enumerate() {
                    check_entry(e, 1, start + k as u64)?;
                }
                reads += 1;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(reads)
        }));
    }
    for i in 0..300u64 {
        store.blocking_append(ents(1, i * 4 + 1..=i * 4 + 4)).await?;
    }
    for r in readers {
        ensure!(r.await?? == 400);
    }
    check_run(&store.try_get_log_entries(..).await?, 1, 1..=1200)?;
    let stats = store.stats();
    ensure!(stats.appends == 300 && stats.entries == 1200, "{stats:?}");
    ensure!(stats.bytes > 1200 * 20 && stats.syncs >= 1, "{stats:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Crash test: a child process appends (and truncates, purges, votes) in a loop and reports each
// operation once it returned; the parent SIGKILLs it at a random moment and checks the log.
// ---------------------------------------------------------------------------------------------

const CHILD_DIR_ENV: &str = "RAFTSCHED_LOG_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "RAFTSCHED_LOG_CRASH_CHILD_SEED";
const SEED_ENV: &str = "RAFTSCHED_LOG_CRASH_SEED";

fn child_opts() -> LogOptions {
    small(4 << 10, 16 << 10)
}

/// The child side of `crash_recovery_keeps_acknowledged_entries`; does nothing when run
/// normally.
#[test]
fn crash_child() -> Result<()> {
    let (Ok(dir), Ok(seed)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_SEED_ENV)) else {
        return Ok(());
    };
    let seed: u64 = seed.parse()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(child_main(PathBuf::from(dir), seed))
}

fn report(line: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

async fn child_main(dir: PathBuf, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut store = open(&dir, &child_opts())?;
    let state = store.get_log_state().await?;
    let vote_term = store.read_vote().await?.map_or(0, |v| v.leader_id.term);
    let mut term = vote_term.max(state.last_log_id.map_or(0, |l| l.leader_id.term)) + 1;
    let mut purged = state.last_purged_log_id.map(|p| p.index);
    let mut last = state.last_log_id.map(|l| l.index);
    report(&format!("V? {term}"))?;
    store.save_vote(&Vote::new(term, 1)).await?;
    report(&format!("V {term}"))?;

    let started = Instant::now();
    for _ in 0..50_000 {
        if started.elapsed() > Duration::from_secs(20) {
            break;
        }
        let roll: f64 = rng.random();
        let floor = purged.map_or(0, |p| p + 1);
        if roll < 0.85 || last.is_none_or(|l| l < floor + 40) {
            let from = last.map_or(1, |l| l + 1);
            let to = from + rng.random_range(0..32u64);
            store.blocking_append(ents(term, from..=to)).await?;
            last = Some(to);
            report(&format!("A {from} {to} {term}"))?;
        } else if roll < 0.92 {
            // A new leader overwrites an uncommitted tail.
            let l = last.unwrap_or(0);
            let since = l - rng.random_range(0..8u64);
            term += 1;
            report(&format!("V? {term}"))?;
            store.save_vote(&Vote::new(term, 1)).await?;
            report(&format!("V {term}"))?;
            report(&format!("T? {since}"))?;
            store.truncate(lid(term, since)).await?;
            report(&format!("T {since}"))?;
            last = Some(since - 1);
        } else if roll < 0.97 {
            let l = last.unwrap_or(0);
            let upto = l - 20 - rng.random_range(0..10u64);
            let leader = store.get_log_id(upto).await?.leader_id;
            report(&format!("P? {upto}"))?;
            store.purge(LogId::new(leader, upto)).await?;
            report(&format!("P {upto}"))?;
            purged = Some(upto);
        } else {
            let l = last.unwrap_or(0);
            let committed = store.get_log_id(l).await?;
            store.save_committed(Some(committed)).await?;
        }
    }
    report("DONE")?;
    Ok(())
}

/// What the parent knows the child got acknowledged.
#[derive(Default)]
struct Model {
    /// index -> term of every acknowledged entry still expected.
    entries: BTreeMap<u64, u64>,
    purged: Option<u64>,
    vote_term: u64,
    /// An operation that was issued but whose return was not reported.
    truncate_in_flight: Option<u64>,
    purge_in_flight: Option<u64>,
    vote_in_flight: Option<u64>,
}

impl Model {
    fn apply(&mut self, line: &str) -> Result<()> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> Result<u64> {
            words.get(i).context("missing field")?.parse::<u64>().context("bad number")
        };
        match words.first().copied() {
            Some("A") => {
                let (from, to, term) = (num(1)?, num(2)?, num(3)?);
                for i in from..=to {
                    self.entries.insert(i, term);
                }
            }
            Some("T?") => self.truncate_in_flight = Some(num(1)?),
            Some("T") => {
                self.entries.split_off(&num(1)?);
                self.truncate_in_flight = None;
            }
            Some("P?") => self.purge_in_flight = Some(num(1)?),
            Some("P") => {
                let upto = num(1)?;
                self.entries = self.entries.split_off(&(upto + 1));
                self.purged = Some(upto);
                self.purge_in_flight = None;
            }
            Some("V?") => self.vote_in_flight = Some(num(1)?),
            Some("V") => {
                self.vote_term = num(1)?;
                self.vote_in_flight = None;
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reopens the log after a crash, checks it against the model, appends to it, and resets the
/// model to what is now on disk.
async fn verify_after_crash(dir: &Path, model: &mut Model) -> Result<()> {
    let mut store = open(dir, &child_opts())?;
    let state = store.get_log_state().await?;
    let purged = state.last_purged_log_id.map(|p| p.index);
    if let Some(acked) = model.purged {
        ensure!(purged >= Some(acked), "acknowledged purge {acked} lost: now {purged:?}");
    }
    if let Some(p) = purged {
        let allowed = model.purge_in_flight.max(model.purged);
        ensure!(Some(p) <= allowed, "purged {p} beyond anything issued ({allowed:?})");
    }

    // No holes: everything between the purge point (or index 1, where the child starts) and
    // the last entry is readable.
    let first = purged.map_or(1, |p| p + 1);
    let entries = store.try_get_log_entries(..).await?;
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    let want: Vec<u64> = match state.last_log_id {
        Some(last) => (first..=last.index).collect(),
        None => Vec::new(),
    };
    ensure!(indexes == want, "log is not {first}..={:?} without holes", state.last_log_id);
    let present: BTreeMap<u64, u64> =
        entries.iter().map(|e| (e.log_id.index, e.log_id.leader_id.term)).collect();
    for e in &entries {
        check_entry(e, e.log_id.leader_id.term, e.log_id.index)?;
    }

    // No acknowledged entry lost, unless a truncate covering it was in flight.
    for (&index, &term) in &model.entries {
        if purged.is_some_and(|p| index <= p) {
            continue;
        }
        if model.truncate_in_flight.is_some_and(|t| index >= t) {
            continue;
        }
        ensure!(
            present.get(&index) == Some(&term),
            "acknowledged entry {index} (term {term}) lost; found {:?}",
            present.get(&index)
        );
    }

    let vote = store.read_vote().await?.map_or(0, |v| v.leader_id.term);
    ensure!(vote >= model.vote_term, "acknowledged vote {} lost: now {vote}", model.vote_term);
    ensure!(vote <= model.vote_in_flight.unwrap_or(0).max(model.vote_term));

    // The log keeps working: append, read back.
    let next = state.last_log_id.map_or(1, |l| l.index + 1);
    let term = vote.max(state.last_log_id.map_or(0, |l| l.leader_id.term));
    store.blocking_append(ents(term, next..=next + 4)).await?;
    check_run(&store.try_get_log_entries(next..).await?, term, next..=next + 4)?;

    model.entries = present;
    for i in next..=next + 4 {
        model.entries.insert(i, term);
    }
    model.purged = purged;
    model.vote_term = vote;
    model.truncate_in_flight = None;
    model.purge_in_flight = None;
    model.vote_in_flight = None;
    Ok(())
}

#[tokio::test]
async fn crash_recovery_keeps_acknowledged_entries() -> Result<()> {
    let seed: u64 = match std::env::var(SEED_ENV) {
        Ok(s) => s.parse()?,
        Err(_) => rand::rng().random(),
    };
    println!("crash test seed {seed}; reproduce with {SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("log");
    let exe = std::env::current_exe()?;
    let mut model = Model::default();
    let mut acked_total = 0usize;

    for round in 0..12 {
        let mut child = Process::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, &dir)
            .env(CHILD_SEED_ENV, rng.random::<u64>().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, rx) = mpsc::channel::<String>();
        let pump = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(std::result::Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        // Let it acknowledge something, then kill it at a random moment.
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !lines.iter().any(|l: &String| l.starts_with("A ")) && Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..250)));
        child.kill()?;
        let status = child.wait()?;
        pump.join().map_err(|_| anyhow!("stdout pump panicked"))?;
        lines.extend(rx.try_iter());
        ensure!(
            lines.iter().any(|l| l.starts_with("A ")),
            "round {round}: the child acknowledged nothing (status {status}); output: {lines:?}"
        );

        for line in &lines {
            model.apply(line)?;
        }
        let count = |prefix: &str| lines.iter().filter(|l| l.starts_with(prefix)).count();
        acked_total += count("A ");
        println!(
            "round {round}: {} appends, {} truncates, {} purges acknowledged; in flight: truncate {:?}, purge {:?}",
            count("A "),
            count("T "),
            count("P "),
            model.truncate_in_flight,
            model.purge_in_flight
        );
        verify_after_crash(&dir, &mut model)
            .await
            .with_context(|| format!("round {round} (seed {seed})"))?;
    }
    ensure!(acked_total >= 8);
    Ok(())
}
