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

/// Writes a new file at `path` (failing if one is there) with permission
/// bits `mode`, and makes it durable.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    sync_parent_dir(path)
}
