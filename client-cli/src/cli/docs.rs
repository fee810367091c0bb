//! `schedctl completion SHELL` and `schedctl man DIR`: shell completions and man pages,
//! generated from the same clap definitions that parse the command line, so they cannot
//! drift from it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

/// Print a completion script.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell: bash, zsh, fish, elvish or powershell. Install e.g. with
    /// `schedctl completion bash > /etc/bash_completion.d/schedctl`.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// Write man pages.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// Directory to write `schedctl.1` and one page per subcommand (`schedctl-task-submit.1`,
    /// ...) into; created if missing. View with `man -l DIR/schedctl.1`.
    pub dir: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completion(args: &CompletionArgs) -> Result<u8> {
    use std::io::Write;
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "schedctl", &mut script);
    // A closed pipe (`| head`) is the reader's choice, not a failure.
    match std::io::stdout().write_all(&script) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write the completion script")
        }
        _ => Ok(0),
    }
}

/// Writes the man pages; prints how many.
pub fn man(args: &ManArgs) -> Result<u8> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let written = write_pages(&cmd, "schedctl", &args.dir)?;
    println!("wrote {written} man pages to {}", args.dir.display());
    Ok(0)
}

/// One page for `cmd` (named `name`), then one per visible subcommand, recursively.
fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out).with_context(|| format!("cannot write {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        n += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_naming_the_commands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "schedctl", &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["add-learner", "submit", "--endpoints"] {
                assert!(text.contains(word), "{shell:?} script lacks {word}");
            }
        }
    }

    #[test]
    fn man_pages_cover_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        man(&ManArgs { dir: dir.path().to_path_buf() }).unwrap();
        let top = std::fs::read_to_string(dir.path().join("schedctl.1")).unwrap();
        assert!(top.contains(".TH schedctl"), "{}", &top[..top.len().min(200)]);
        let submit = std::fs::read_to_string(dir.path().join("schedctl-task-submit.1")).unwrap();
        assert!(submit.contains("priority"), "the submit page documents its flags");
        assert!(dir.path().join("schedctl-cluster-add-learner.1").exists());
    }
}
