//! `schedctl snapshot save FILE` and `schedctl snapshot inspect FILE`: backups of the whole
//! replicated state.
//!
//! `save` asks the leader for a fresh snapshot and streams its file (the same format nodes
//! send each other: a header with index, term and membership, every state record, and a
//! trailer with the record count and a CRC32 of everything before it). It writes to
//! `FILE.partial`, verifies the whole file as a node would before installing it, fsyncs it,
//! then renames it to `FILE`: a `FILE` that exists is complete and sound. `inspect` verifies a
//! file the same way and summarises it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use state_machine::{TaskStateKind, WorkerStatus};

use super::output::{outln, print_json, Format};
use super::Ctx;

/// Snapshot commands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Stream a fresh, consistent snapshot from the leader into FILE (admin token).
    Save {
        /// Where to write it (replaced only once the new file is complete and verified).
        file: PathBuf,
    },
    /// Verify a snapshot file and show what it holds: index, term, membership, tasks per
    /// state, workers, tokens and the state digest.
    Inspect {
        /// The snapshot file.
        file: PathBuf,
    },
}

/// Runs a snapshot command.
pub async fn run(ctx: &Ctx, cmd: SnapshotCmd) -> Result<u8> {
    match cmd {
        SnapshotCmd::Save { file } => save(ctx, &file).await,
        SnapshotCmd::Inspect { file } => {
            let summary = tokio::task::spawn_blocking(move || summarise(&file)).await??;
            match ctx.format {
                Format::Json => print_json(&summary),
                Format::Table => outln!("{}", summary_text(&summary)),
            }
            Ok(0)
        }
    }
}

async fn save(ctx: &Ctx, file: &Path) -> Result<u8> {
    let client = ctx.client()?;
    let mut partial = file.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let mut out = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let written = async {
        let mut stream = client.save_snapshot().await?;
        let (mut size, mut got) = (None, 0u64);
        while let Some(chunk) = stream.message().await.context("the snapshot stream broke")? {
            if size.is_none() {
                size = Some(chunk.size);
            }
            out.write_all(&chunk.data).with_context(|| format!("writing {}", partial.display()))?;
            got += chunk.data.len() as u64;
        }
        match size {
            Some(s) if s == got => {}
            Some(s) => bail!("the stream ended after {got} of {s} bytes"),
            None => bail!("the leader sent no snapshot"),
        }
        out.sync_all().with_context(|| format!("syncing {}", partial.display()))?;
        let checked = partial.clone();
        tokio::task::spawn_blocking(move || summarise(&checked)).await?
    }
    .await;
    let summary = match written {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, file)
        .with_context(|| format!("renaming {} to {}", partial.display(), file.display()))?;
    let mut summary = summary;
    summary["file"] = json!(file.display().to_string());
    match ctx.format {
        Format::Json => print_json(&summary),
        Format::Table => outln!(
            "saved snapshot at index {} (term {}) to {}: {} bytes, sha256 {}",
            summary["index"],
            summary["term"],
            file.display(),
            summary["bytes"],
            summary["sha256"].as_str().unwrap_or_default()
        ),
    }
    Ok(0)
}

/// Verifies `file` in full and describes it as JSON.
pub fn summarise(file: &Path) -> Result<Value> {
    let (meta, state) = raft::snapshot::verify(file)
        .with_context(|| format!("{} is not a sound snapshot", file.display()))?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let last = meta.last_log_id;
    let membership = meta.last_membership.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let members: Vec<Value> = membership
        .nodes()
        .map(|(id, n)| {
            json!({
                "id": id,
                "addr": n.addr,
                "peer_addr": n.peer_addr,
                "voter": voters.contains(id),
            })
        })
        .collect();
    let tasks: serde_json::Map<String, Value> = TaskStateKind::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), json!(state.count(*k))))
        .collect();
    let (mut alive, mut draining, mut dead) = (0u64, 0u64, 0u64);
    for w in state.workers() {
        match w.status {
            WorkerStatus::Dead { .. } => dead += 1,
            WorkerStatus::Draining { .. } => draining += 1,
            WorkerStatus::Alive => alive += 1,
        }
    }
    Ok(json!({
        "file": file.display().to_string(),
        "bytes": bytes.len(),
        "sha256": sha256,
        "snapshot_id": meta.snapshot_id,
        "index": last.map_or(0, |l| l.index),
        "term": last.map_or(0, |l| l.leader_id.term),
        "members": members,
        "tasks_total": state.task_count(),
        "tasks": tasks,
        "workers": { "alive": alive, "draining": draining, "dead": dead },
        "tokens": state.tokens().count(),
        "digest": format!("{:016x}", state.digest()),
    }))
}

fn summary_text(s: &Value) -> String {
    let mut out = format!(
        "snapshot {} ({} bytes, sha256 {})\nindex {}  term {}  digest {}\n",
        s["file"].as_str().unwrap_or_default(),
        s["bytes"],
        s["sha256"].as_str().unwrap_or_default(),
        s["index"],
        s["term"],
        s["digest"].as_str().unwrap_or_default(),
    );
    for m in s["members"].as_array().into_iter().flatten() {
        let peer = m["peer_addr"].as_str().map(|p| format!(" (peers {p})")).unwrap_or_default();
        let role = if m["voter"].as_bool() == Some(true) { "voter" } else { "learner" };
        out += &format!(
            "member {} {}{peer} {role}\n",
            m["id"],
            m["addr"].as_str().unwrap_or_default()
        );
    }
    out += &format!("tasks {}:", s["tasks_total"]);
    for (k, v) in s["tasks"].as_object().into_iter().flatten() {
        out += &format!(" {k} {v}");
    }
    let w = &s["workers"];
    out += &format!(
        "\nworkers: {} alive, {} draining, {} dead\ntokens: {}",
        w["alive"], w["draining"], w["dead"], s["tokens"]
    );
    out
}
