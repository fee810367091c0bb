//! `schedctl cluster ...`: initialise, inspect and change the membership.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use client::pb;
use serde_json::json;

use super::output::{self, out, outln, print_json, Format};
use super::{parse_duration, Ctx};

/// Cluster commands.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Initialise a new cluster with its first voters (safe to repeat with the same members).
    Init {
        /// A voter as ID=HOST:PORT, or ID=HOST:PORT,peer=HOST:PORT for a node with a peer
        /// port (--peer-listen); repeat for each; the node asked must be one of them.
        #[arg(long = "member", required = true, value_parser = parse_member, value_name = "ID=HOST:PORT[,peer=HOST:PORT]")]
        members: Vec<pb::Member>,
    },
    /// Members, leader, term, and log/commit/apply indexes per node.
    Status,
    /// Add a node as a non-voting learner that catches up with the log.
    AddLearner {
        /// The new node's id.
        #[arg(long)]
        id: u64,
        /// The new node's gRPC address (host:port).
        #[arg(long)]
        addr: String,
        /// Its peer address, when it serves peers on a port of their own (--peer-listen).
        #[arg(long, value_name = "HOST:PORT")]
        peer_addr: Option<String>,
        /// Wait up to this long for it to catch up (0s: do not wait).
        #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
        wait: Duration,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner's id.
        #[arg(long)]
        id: u64,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        #[arg(long)]
        id: u64,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        /// The voter that should lead.
        #[arg(long)]
        to: u64,
    },
    /// Make the node asked build a snapshot now (advanced).
    #[command(hide = true)]
    Snapshot,
}

/// Parses `ID=HOST:PORT` or `ID=HOST:PORT,peer=HOST:PORT`.
pub fn parse_member(s: &str) -> Result<pb::Member, String> {
    let (id, rest) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ID=HOST:PORT"))?;
    let id: u64 = id.trim().parse().map_err(|_| format!("{s:?}: {id:?} is not a node id"))?;
    if id == 0 {
        return Err(format!("{s:?}: node ids start at 1"));
    }
    let (addr, peer) = match rest.split_once(',') {
        None => (rest.trim(), ""),
        Some((addr, peer)) => {
            let peer = peer.trim().strip_prefix("peer=").ok_or_else(|| {
                format!("{s:?}: after the address only ,peer=HOST:PORT may follow")
            })?;
            (addr.trim(), peer.trim())
        }
    };
    for a in [addr].into_iter().chain((!peer.is_empty()).then_some(peer)) {
        if !a.contains(':') || a.contains(char::is_whitespace) {
            return Err(format!("{s:?}: {a:?} is not HOST:PORT"));
        }
    }
    Ok(pb::Member { id, addr: addr.to_string(), peer_addr: peer.to_string() })
}

/// Runs a cluster command.
pub async fn run(ctx: &Ctx, cmd: ClusterCmd) -> Result<u8> {
    let client = ctx.client()?;
    match cmd {
        ClusterCmd::Init { members } => {
            let listed: Vec<String> = members
                .iter()
                .map(|m| match m.peer_addr.as_str() {
                    "" => format!("{}={}", m.id, m.addr),
                    p => format!("{}={} (peers: {p})", m.id, m.addr),
                })
                .collect();
            client.init_cluster(members.clone()).await?;
            done(
                ctx,
                json!({ "initialized": true, "members": members.iter().map(|m| json!({"id": m.id, "addr": m.addr, "peer_addr": m.peer_addr})).collect::<Vec<_>>() }),
                &format!("cluster initialised with {}", listed.join(", ")),
            );
        }
        ClusterCmd::Status => {
            let s = client.cluster_status().await?;
            match ctx.format {
                Format::Json => print_json(&output::status_json(&s)),
                Format::Table => out!("{}", output::status_text(&s)),
            }
        }
        ClusterCmd::AddLearner { id, addr, peer_addr, wait } => {
            // The node answers after the learner caught up: give the call that long.
            let client = client.with_call_timeout(client.call_timeout() + wait);
            let peer = peer_addr.as_deref().unwrap_or("");
            let r = client.add_learner(id, &addr, peer, wait.as_millis() as u64).await?;
            done(
                ctx,
                json!({ "id": id, "addr": addr, "peer_addr": peer, "matched_index": r.matched_index }),
                &format!(
                    "node {id} ({addr}) added as a learner; replicated up to index {}",
                    r.matched_index
                ),
            );
        }
        ClusterCmd::Promote { id } => {
            client.promote(id).await?;
            done(ctx, json!({ "id": id, "voter": true }), &format!("node {id} is now a voter"));
        }
        ClusterCmd::Remove { id } => {
            client.remove_node(id).await?;
            done(ctx, json!({ "id": id, "removed": true }), &format!("node {id} removed"));
        }
        ClusterCmd::TransferLeader { to } => {
            let leader = client.transfer_leader(to).await?;
            done(ctx, json!({ "leader_id": leader }), &format!("leader is now node {leader}"));
        }
        ClusterCmd::Snapshot => {
            let index = client.trigger_snapshot().await?;
            done(ctx, json!({ "snapshot_index": index }), &format!("snapshot at index {index}"));
        }
    }
    Ok(0)
}

fn done(ctx: &Ctx, json: serde_json::Value, text: &str) {
    match ctx.format {
        Format::Json => print_json(&json),
        Format::Table => outln!("{text}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse() {
        assert_eq!(
            parse_member("2=127.0.0.1:7002"),
            Ok(pb::Member { id: 2, addr: "127.0.0.1:7002".into(), peer_addr: String::new() })
        );
        assert_eq!(
            parse_member("2=10.0.0.2:7001,peer=10.0.0.2:7101"),
            Ok(pb::Member {
                id: 2,
                addr: "10.0.0.2:7001".into(),
                peer_addr: "10.0.0.2:7101".into()
            })
        );
        assert!(parse_member("2=10.0.0.2:7001,10.0.0.2:7101").is_err());
        assert!(parse_member("2=10.0.0.2:7001,peer=nope").is_err());
        assert!(parse_member("0=127.0.0.1:7002").is_err());
        assert!(parse_member("x=127.0.0.1:7002").is_err());
        assert!(parse_member("2=localhost").is_err());
        assert!(parse_member("2").is_err());
    }
}
