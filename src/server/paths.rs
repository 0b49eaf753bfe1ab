//! Path safety shared by every server: a requested name becomes a path
//! inside the boot root or is refused.
//!
//! A leading `/` is taken as the root itself (as `in.tftpd --secure` does,
//! because GRUB and some firmware ask for `/grub/...`), so no name can name
//! a file outside it; `..` components, backslashes, NUL and control bytes
//! are refused outright, and symbolic links whose target lies outside the
//! root are refused when the name is resolved.

use std::path::{Component, Path, PathBuf};

/// Checks a requested name and returns it relative to the root.
pub fn safe_relative_name(raw: &[u8]) -> Result<String, &'static str> {
    let name = std::str::from_utf8(raw).map_err(|_| "file name is not UTF-8")?;
    if name.bytes().any(|b| b == 0 || b.is_ascii_control()) {
        return Err("control character in file name");
    }
    if name.contains('\\') {
        return Err("backslash in file name");
    }
    let trimmed = name.trim_start_matches('/');
    let mut parts = Vec::new();
    for component in Path::new(trimmed).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or("file name is not UTF-8")?),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in file name"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute file name"),
        }
    }
    if parts.is_empty() {
        return Err("empty file name");
    }
    Ok(parts.join("/"))
}

/// Why a safe name could not be served from the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NotFound,
    PermissionDenied,
    /// A symbolic link leads outside the root.
    Outside,
}

/// The canonical path of `name` (already checked by [`safe_relative_name`])
/// inside the canonical `root`.
pub fn resolve_inside(root: &Path, name: &str) -> Result<PathBuf, ResolveError> {
    let canonical = root.join(name).canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => ResolveError::PermissionDenied,
        _ => ResolveError::NotFound,
    })?;
    if !canonical.starts_with(root) {
        tracing::warn!(file = %name, target = %canonical.display(),
            "refused: symbolic link leads outside the boot directory");
        return Err(ResolveError::Outside);
    }
    Ok(canonical)
}
