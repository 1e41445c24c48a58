//! `flotilla completion` and `flotilla man`: shell completions and man pages
//! generated from the command line's own definition, so they never disagree
//! with it.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// Writes the completion script for `shell` to stdout.
pub fn completion(shell: clap_complete::Shell) {
    let mut cmd = super::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "flotilla", &mut script);
    flotilla_proto::exit::print(format_args!("{}", String::from_utf8_lossy(&script)));
}

/// Writes `flotilla.1` and a page per command (`flotilla-patch-build.1`...)
/// into `dir`.
pub fn man(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let pages = std::fs::read_dir(dir)?.count();
    eprintln!("{pages} man page(s) in {}", dir.display());
    Ok(())
}
