//! `schedctl token ...`: credentials for clusters that run with `--auth-tokens FILE`.
//!
//! `token generate` makes a random secret and prints the `[[token]]` entry to add to the
//! token file (which records only the secret's SHA-256) together with the secret itself,
//! shown once, for whoever will use the token. Nothing is sent to the cluster.

use anyhow::Result;
use clap::Subcommand;
use client::pki::TokenSpec;

use super::output::{outln, print_json, Format};
use super::Ctx;

/// Token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Make a new secret and print its token-file entry and the secret (shown once).
    Generate {
        /// The token's name (1-64 of A-Z a-z 0-9 . _ - @), shown in refusals and logs.
        #[arg(long)]
        name: String,
        /// admin, submitter, worker or reader.
        #[arg(long)]
        role: String,
        /// For worker tokens: the worker ids it may use must start with this.
        #[arg(long, value_name = "PREFIX")]
        worker_id_prefix: Option<String>,
    },
}

/// Runs a token command.
pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> Result<u8> {
    let TokenCmd::Generate { name, role, worker_id_prefix } = cmd;
    let spec = TokenSpec { name, role, worker_id_prefix };
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
