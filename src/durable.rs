//! Durable file writes: what makes a rename survive a power loss.
//!
//! Used by every layer that writes state (the lease journal, the one-shot
//! ledger, TFTP uploads), so it sits below all of them.

use std::path::Path;

/// Makes a rename or a new file durable: `fsync` on the directory that
/// holds it (without this, a power loss can forget the rename).
pub fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}
