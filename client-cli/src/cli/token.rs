//! `schedctl token ...`: credentials for clusters that run with `--auth-tokens FILE`.
//!
//! `token generate` makes a random secret and prints the `[[token]]` entry to add to the
//! token file (which records only the secret's SHA-256) together with the secret itself,
//! shown once, for whoever will use the token. Nothing is sent to the cluster.

use anyhow::{bail, Result};
use clap::Subcommand;

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

const ROLES: [&str; 4] = ["admin", "submitter", "worker", "reader"];

/// Runs a token command.
pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> Result<u8> {
    let TokenCmd::Generate { name, role, worker_id_prefix } = cmd;
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
    {
        bail!("--name {name:?}: use 1-64 of A-Z a-z 0-9 . _ - @");
    }
    if !ROLES.contains(&role.as_str()) {
        bail!("--role {role:?}: expected one of {}", ROLES.join(", "));
    }
    if worker_id_prefix.is_some() && role != "worker" {
        bail!("--worker-id-prefix is only for --role worker");
    }
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let digest = proto::auth::secret_digest_hex(&secret);
    let mut entry = format!(
        "[[token]]\nname = {}\nrole = {}\nsecret_sha256 = \"{digest}\"\n",
        toml_string(&name),
        toml_string(&role)
    );
    if let Some(p) = &worker_id_prefix {
        entry.push_str(&format!("worker_id_prefix = {}\n", toml_string(p)));
    }
    match ctx.format {
        Format::Json => print_json(&serde_json::json!({
            "name": name,
            "role": role,
            "worker_id_prefix": worker_id_prefix,
            "secret": secret,
            "secret_sha256": digest,
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

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
