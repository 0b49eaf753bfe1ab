//! A file name as a client asks for it (a TFTP RRQ/WRQ name, an HTTP path,
//! a template name in the inventory), checked and made relative to the boot
//! root. Pure string work; resolving it on the disk is `server::paths`.
//!
//! A leading `/` is taken as the root itself (as `in.tftpd --secure` does,
//! because GRUB and some firmware ask for `/grub/...`); `..` components,
//! backslashes, NUL and control bytes are refused outright.

use std::path::{Component, Path};

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
