//! A file name as a client asks for it (a TFTP RRQ/WRQ name, an HTTP path,
//! a template name in the inventory), checked and made relative to the boot
//! root. Pure string work; resolving it on the disk is `server::paths`.
//!
//! A leading `/` is taken as the root itself (as `in.tftpd --secure` does,
//! because GRUB and some firmware ask for `/grub/...`); `..` components,
//! backslashes, NUL and control bytes are refused outright.

use std::path::{Component, Path};

/// Why a requested name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("file name is not UTF-8")]
    NotUtf8,
    #[error("control character in file name")]
    ControlCharacter,
    #[error("backslash in file name")]
    Backslash,
    #[error("`..` in file name")]
    ParentDirectory,
    #[error("absolute file name")]
    Absolute,
    /// Nothing is left once leading `/` and `.` are taken away: the root.
    #[error("empty file name")]
    Empty,
}

/// Checks a requested name and returns it relative to the root.
pub fn safe_relative_name(raw: &[u8]) -> Result<String, NameError> {
    let name = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8)?;
    if name.bytes().any(|b| b == 0 || b.is_ascii_control()) {
        return Err(NameError::ControlCharacter);
    }
    if name.contains('\\') {
        return Err(NameError::Backslash);
    }
    let trimmed = name.trim_start_matches('/');
    let mut parts = Vec::new();
    for component in Path::new(trimmed).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str().ok_or(NameError::NotUtf8)?),
            Component::CurDir => {}
            Component::ParentDir => return Err(NameError::ParentDirectory),
            Component::RootDir | Component::Prefix(_) => return Err(NameError::Absolute),
        }
    }
    if parts.is_empty() {
        return Err(NameError::Empty);
    }
    Ok(parts.join("/"))
}
