//! The agent's private state directory.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) if missing and makes it private to the agent's user:
/// it holds the node's private key.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // An existing directory keeps its old mode with create(); tighten it.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}
