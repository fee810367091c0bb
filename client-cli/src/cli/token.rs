//! `schedctl token ...`: credentials for clusters that run with `--auth-tokens FILE`.
//!
//! `token generate` makes a random secret and prints the `[[token]]` entry to add to the
//! token file (which records only the secret's SHA-256) together with the secret itself,
//! shown once, for whoever will use the token. Nothing is sent to the cluster.
//!
//! `token create` does the same for a replicated token: the secret is made here and only its
//! digest is sent (an admin token is needed), so a retried create is the same token and the
//! secret never reaches the cluster's log. `token list` shows names, roles and expiry (never
//! secrets); `token revoke` ends a replicated token everywhere.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use client::pki::TokenSpec;
use proto::pb;

use super::output::{outln, print_json, time_from_now, Format};
use super::{parse_duration, Ctx};

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a new secret and print its token-file entry and the secret (shown once).
    Generate(#[command(flatten)] NewToken),
    /// Create a replicated token on the cluster and print its secret (shown once).
    Create {
        #[command(flatten)]
        token: NewToken,
        /// Lifetime (30d, 12h, ...); without it the token lasts until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// List tokens: the node's token file and the replicated ones (never secrets).
    List,
    /// Revoke a replicated token: every node refuses it from then on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// A token's name, role and prefix (for both the token file and the cluster).
#[derive(Debug, clap::Args)]
pub struct NewToken {
    /// The token's name (1-64 of A-Z a-z 0-9 . _ - @), unique, shown in refusals and logs.
    #[arg(long)]
    name: String,
    /// admin, submitter, worker or reader.
    #[arg(long)]
    role: String,
    /// For worker tokens: the worker ids it may use must start with this.
    #[arg(long, value_name = "PREFIX")]
    worker_id_prefix: Option<String>,
}

impl From<NewToken> for TokenSpec {
    fn from(t: NewToken) -> TokenSpec {
        TokenSpec { name: t.name, role: t.role, worker_id_prefix: t.worker_id_prefix }
    }
}

/// Runs a token command.
pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> Result<u8> {
    let spec: TokenSpec = match cmd {
        TokenCmd::Generate(t) => t.into(),
        TokenCmd::Create { token, ttl } => return create(ctx, token.into(), ttl).await,
        TokenCmd::List => return list(ctx).await,
        TokenCmd::Revoke { name } => {
            ctx.client()?.revoke_token(&name).await?;
            match ctx.format {
                Format::Json => print_json(&serde_json::json!({ "revoked": name })),
                Format::Table => outln!("token {name:?} revoked"),
            }
            return Ok(0);
        }
    };
    let (secret, entry) = spec.generate()?;
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "name": spec.name,
            "role": spec.role,
            "worker_id_prefix": spec.worker_id_prefix,
            "secret": secret,
            "secret_sha256": proto::auth::secret_digest_hex(&secret),
            "token_file_entry": entry,
        })),
        Format::Table => {
            outln!("# Add to the token file (--auth-tokens); it holds only the digest:");
            outln!("{entry}");
            outln!("# The secret, shown once; give it to the token's user:");
            outln!("export SCHED_TOKEN={secret}");
        }
    }
    Ok(0)
}

async fn create(ctx: &Ctx, spec: TokenSpec, ttl: Option<Duration>) -> Result<u8> {
    // The same checks as a token file entry, before anything is sent.
    let (secret, _) = spec.generate()?;
    let ttl_ms = ttl.map_or(0, |d| d.as_millis() as u64);
    if ttl.is_some() && ttl_ms == 0 {
        bail!("--ttl must be at least 1ms; leave it out for a token that lasts until revoked");
    }
    let req = pb::CreateTokenRequest {
        name: spec.name.clone(),
        role: spec.role.clone(),
        secret_sha256: proto::auth::secret_digest_hex(&secret),
        worker_id_prefix: spec.worker_id_prefix.clone().unwrap_or_default(),
        ttl_ms,
    };
    let r = ctx.client()?.create_token(req).await?;
    let info = r.token.unwrap_or_default();
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "token": token_json(&info),
            "created": r.created,
            "secret": secret,
        })),
        Format::Table => {
            let expires = match info.expires_at_ms {
                0 => "never expires".to_string(),
                ms => format!("expires {}", time_from_now(ms)),
            };
            outln!("# token {:?} ({}) created; {expires}", info.name, info.role);
            outln!("# The secret, shown once; give it to the token's user:");
            outln!("export SCHED_TOKEN={secret}");
        }
    }
    Ok(0)
}

async fn list(ctx: &Ctx) -> Result<u8> {
    let tokens = ctx.client()?.list_tokens().await?;
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "tokens": tokens.iter().map(token_json).collect::<Vec<_>>(),
        })),
        Format::Table => {
            outln!(
                "{:<24} {:<10} {:<12} {:<16} EXPIRES",
                "NAME",
                "ROLE",
                "SOURCE",
                "WORKER PREFIX"
            );
            for t in &tokens {
                let expires = match (t.expires_at_ms, t.expired) {
                    (0, _) => "never".to_string(),
                    (ms, true) => format!("expired {}", time_from_now(ms)),
                    (ms, false) => time_from_now(ms),
                };
                let prefix = if t.worker_id_prefix.is_empty() { "-" } else { &t.worker_id_prefix };
                outln!("{:<24} {:<10} {:<12} {:<16} {expires}", t.name, t.role, t.source, prefix);
            }
        }
    }
    Ok(0)
}

fn token_json(t: &pb::TokenInfo) -> serde_json::Value {
    serde_json::json!({
        "name": t.name,
        "role": t.role,
        "source": t.source,
        "worker_id_prefix": (!t.worker_id_prefix.is_empty()).then_some(&t.worker_id_prefix),
        "created_at_ms": t.created_at_ms,
        "expires_at_ms": (t.expires_at_ms > 0).then_some(t.expires_at_ms),
        "expired": t.expired,
    })
}
