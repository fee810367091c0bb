//! `schedctl queue ...`: pause, resume and list queues.
//!
//! A paused queue's tasks stay queued and none is given to a worker until it is resumed; tasks
//! already assigned or running carry on. Pausing and resuming need the admin role.

use anyhow::Result;
use clap::Subcommand;
use client::pb;
use serde_json::{json, Value};

use super::output::{outln, print_json, Format};
use super::Ctx;

/// Queue commands.
#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    /// Stop giving the queue's tasks to workers (running ones continue). Admin role.
    Pause {
        /// Queue name.
        queue: String,
    },
    /// Give the queue's tasks to workers again. Admin role.
    Resume {
        /// Queue name.
        queue: String,
    },
    /// Queues with queued tasks, serving workers or a pause.
    List,
}

fn queue_json(q: &pb::QueueInfo) -> Value {
    json!({
        "name": q.name,
        "paused": q.paused,
        "paused_since_ms": (q.paused_since_ms > 0).then_some(q.paused_since_ms),
        "queued": q.queued,
        "workers": q.workers,
    })
}

/// Runs a queue command.
pub async fn run(ctx: &Ctx, cmd: QueueCmd) -> Result<u8> {
    let client = ctx.client()?;
    let (q, changed, pause) = match cmd {
        QueueCmd::Pause { queue } => {
            let r = client.pause_queue(&queue).await?;
            (r.queue.unwrap_or_default(), r.changed, true)
        }
        QueueCmd::Resume { queue } => {
            let r = client.resume_queue(&queue).await?;
            (r.queue.unwrap_or_default(), r.changed, false)
        }
        QueueCmd::List => {
            let list = client.list_queues().await?;
            match ctx.format {
                Format::Json => {
                    let v: Vec<Value> = list.queues.iter().map(queue_json).collect();
                    print_json(&json!({ "queues": v }));
                }
                Format::Table if list.queues.is_empty() => outln!("no queues"),
                Format::Table => {
                    outln!("{:<24} {:<8} {:>8} {:>8}", "QUEUE", "STATE", "QUEUED", "WORKERS");
                    for q in &list.queues {
                        let state = if q.paused { "paused" } else { "active" };
                        outln!("{:<24} {:<8} {:>8} {:>8}", q.name, state, q.queued, q.workers);
                    }
                }
            }
            return Ok(0);
        }
    };
    match ctx.format {
        Format::Json => {
            let mut v = queue_json(&q);
            v["changed"] = json!(changed);
            print_json(&v);
        }
        Format::Table => {
            let what = match (pause, changed) {
                (true, true) => "paused: its tasks wait until `schedctl queue resume`",
                (true, false) => "was already paused",
                (false, true) => "resumed",
                (false, false) => "was not paused",
            };
            outln!("queue {} {what} ({} queued)", q.name, q.queued);
        }
    }
    Ok(0)
}
