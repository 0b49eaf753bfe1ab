//! Path safety shared by every server: a requested name becomes a path
//! inside the boot root or is refused.
//!
//! A leading `/` is taken as the root itself (as `in.tftpd --secure` does,
//! because GRUB and some firmware ask for `/grub/...`), so no name can name
//! a file outside it; `..` components, backslashes, NUL and control bytes
//! are refused outright, and symbolic links whose target lies outside the
//! root are refused when the name is resolved.
//!
//! Some files inside the root are never served, whatever their spelling
//! ([`is_private_name`], [`resolve_served`]): the inventory file (every MAC,
//! reserved address and variable), dotfiles and dot-directories (among them
//! the temporary files of uploads in progress, `.NAME.upload-*`), and the
//! state directory, database and lease journal when an operator put them
//! under the boot directory.

use std::path::{Path, PathBuf};

/// Why a safe name could not be served from the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolveError {
    NotFound,
    PermissionDenied,
    /// A symbolic link leads outside the root.
    Outside,
    /// The inventory, a dotfile, an upload in progress or server state.
    Private,
}

/// Whether `name` (relative, from [`crate::proto::path::safe_relative_name`]) is never served:
/// a component starting with `.` (dotfiles, upload temporaries) or the
/// inventory file.
pub fn is_private_name(name: &str) -> bool {
    name == crate::inventory::FILE_NAME || name.split('/').any(|part| part.starts_with('.'))
}

/// Resolves `name` for the data plane: [`resolve_inside`], after refusing
/// private names, and refusing any path at or under one of `private`
/// (canonical paths: the inventory file, the state directory, the
/// database), so no spelling or symbolic link inside the root reaches them.
pub fn resolve_served(
    root: &Path,
    private: &[PathBuf],
    name: &str,
) -> Result<PathBuf, ResolveError> {
    if is_private_name(name) {
        return Err(ResolveError::Private);
    }
    let canonical = resolve_inside(root, name)?;
    if private.iter().any(|p| canonical.starts_with(p))
        || canonical
            .strip_prefix(root)
            .is_ok_and(|inside| is_private_name(&inside.to_string_lossy()))
    {
        return Err(ResolveError::Private);
    }
    Ok(canonical)
}

/// Resolves and opens `names` (boot files: the images' kernels and
/// initrds, the loaders) ahead of the first request for them, off the data
/// plane, and remembers each name's version in `cache`, so that even the
/// first fetch of a storm costs its io_uring worker no file-system call.
/// Names that are missing or refused are skipped (their requests get the
/// usual answer). Returns how many were opened.
pub fn open_ahead(
    root: &Path,
    private: &[PathBuf],
    cache: &crate::cache::FileCache,
    names: impl IntoIterator<Item = String>,
) -> usize {
    let mut opened = 0;
    for name in names {
        let ticket = cache.prepare_name(&name);
        let Ok(path) = resolve_served(root, private, &name) else {
            continue;
        };
        if let Ok(file) = cache.open(&path) {
            cache.remember_name(ticket, &name, &path, &file);
            opened += 1;
        }
    }
    opened
}

/// First-stage loaders served from outside the boot directory when it has
/// no file of that name: Debian's `ipxe` package installs
/// `/usr/lib/ipxe/undionly.kpxe`, `ipxe.efi` and `snponly.efi`, so a fresh
/// install boots machines with nothing copied. Looked up once at start, by
/// the loader's exact relative path in each directory (never by base name:
/// `arm64/snponly.efi` must not find the x86 `snponly.efi`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoaderFallbacks(std::collections::BTreeMap<String, PathBuf>);

impl LoaderFallbacks {
    /// For each of `loaders` missing from `root`, the first of `dirs`
    /// that has it.
    pub fn find(root: &Path, loaders: &[String], dirs: &[PathBuf]) -> Self {
        let mut found = std::collections::BTreeMap::new();
        for name in loaders {
            if resolve_inside(root, name).is_ok() || found.contains_key(name) {
                continue;
            }
            let candidate = dirs
                .iter()
                .filter_map(|dir| dir.join(name).canonicalize().ok())
                .find(|path| path.is_file());
            if let Some(path) = candidate {
                found.insert(name.clone(), path);
            }
        }
        Self(found)
    }

    /// Adds each of `files` (a name and the system file that stands for
    /// it, such as Debian's signed shim for the Secure Boot chain) that the
    /// boot directory lacks and the system has.
    pub fn add_system_files(
        &mut self,
        root: &Path,
        files: impl IntoIterator<Item = (String, PathBuf)>,
    ) {
        for (name, path) in files {
            if resolve_inside(root, &name).is_ok() || self.0.contains_key(&name) {
                continue;
            }
            if let Ok(path) = path.canonicalize() {
                if path.is_file() {
                    self.0.insert(name, path);
                }
            }
        }
    }

    /// Each loader served from elsewhere, and from where.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &PathBuf)> {
        self.0.iter()
    }

    /// `name`'s fallback when the boot directory has no such file;
    /// otherwise `error` as it was.
    pub fn instead_of(&self, error: ResolveError, name: &str) -> Result<PathBuf, ResolveError> {
        match (&error, self.0.get(name)) {
            (ResolveError::NotFound, Some(path)) => Ok(path.clone()),
            _ => Err(error),
        }
    }
}

/// The canonical forms of `paths` that exist (a path that does not exist
/// yet is taken as it is, made absolute), for [`resolve_served`].
pub fn private_paths<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Vec<PathBuf> {
    paths
        .into_iter()
        .map(|p| {
            p.canonicalize()
                .unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
        })
        .collect()
}

/// Creates the directories of `relative` (a safe name's parent) under the
/// canonical `root` one by one, refusing to pass through a symbolic link
/// that leads outside it, and returns the canonical directory. Used by
/// uploads, which must never write outside the boot directory.
pub fn create_dirs_inside(root: &Path, relative: &str) -> Result<PathBuf, CreateDirsError> {
    let mut dir = root.to_path_buf();
    for part in relative.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => return Err(CreateDirsError::Io { dir, source }),
        }
        dir = match dir.canonicalize() {
            Ok(canonical) => canonical,
            Err(source) => return Err(CreateDirsError::Io { dir, source }),
        };
        if !dir.starts_with(root) {
            return Err(CreateDirsError::Outside(relative.to_string()));
        }
        if !dir.is_dir() {
            return Err(CreateDirsError::NotADirectory(dir));
        }
    }
    Ok(dir)
}

/// Why [`create_dirs_inside`] made no directory.
#[derive(Debug, thiserror::Error)]
pub enum CreateDirsError {
    #[error("{}: {source}", dir.display())]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0:?} leads outside the boot directory through a symbolic link")]
    Outside(String),
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
}

/// Whether `file_name` is an upload's temporary file (`.NAME.upload-*`).
pub fn is_upload_temporary(file_name: &str) -> bool {
    file_name.starts_with('.') && file_name.contains(".upload-")
}

/// Removes uploads' temporary files that a crash (kill -9, power loss) left
/// in the boot directory; returns how many. Walks at most 16 levels and
/// 100,000 entries, so a huge tree cannot hold up the start.
pub fn remove_upload_leftovers(root: &Path) -> usize {
    let mut removed = 0;
    let mut budget = 100_000usize;
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            budget = budget.saturating_sub(1);
            if budget == 0 {
                return removed;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            if kind.is_dir() && depth < 16 {
                stack.push((entry.path(), depth + 1));
            } else if kind.is_file() && is_upload_temporary(&name.to_string_lossy()) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => {
                        tracing::info!(file = %entry.path().display(), "removed an interrupted upload's temporary file");
                        removed += 1;
                    }
                    Err(e) => {
                        tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an interrupted upload's temporary file")
                    }
                }
            }
        }
    }
    removed
}

/// The canonical path of `name` (already checked by
/// [`crate::proto::path::safe_relative_name`])
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::path::safe_relative_name;

    #[test]
    fn private_files_are_never_served_in_any_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("inventory.toml"), "x").unwrap();
        std::fs::write(root.join(".secret"), "x").unwrap();
        std::fs::create_dir_all(root.join("state")).unwrap();
        std::fs::write(root.join("state/bootfleet.db"), "x").unwrap();
        std::fs::write(root.join("ok"), "x").unwrap();
        std::os::unix::fs::symlink("state/bootfleet.db", root.join("db-link")).unwrap();
        std::os::unix::fs::symlink("inventory.toml", root.join("inv-link")).unwrap();
        let private = private_paths([root.join("state").as_path()]);
        for name in [
            "inventory.toml",
            ".secret",
            "sub/.x.upload-abc",
            "state/bootfleet.db",
            "db-link",
            "inv-link",
        ] {
            let relative = safe_relative_name(name.as_bytes()).unwrap();
            assert_eq!(
                resolve_served(&root, &private, &relative),
                Err(ResolveError::Private),
                "{name}"
            );
        }
        assert!(resolve_served(&root, &private, "ok").is_ok());
    }

    #[test]
    fn boot_files_opened_ahead_are_answered_by_name_and_refused_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("debian")).unwrap();
        std::fs::write(root.join("debian/vmlinuz"), "kernel").unwrap();
        std::fs::write(root.join(".hidden"), "secret").unwrap();
        let mut cache = crate::cache::FileCache::new(1 << 20);
        cache.remember_names_under(&root);
        let names = ["debian/vmlinuz", "debian/missing", ".hidden"].map(String::from);
        assert_eq!(open_ahead(&root, &[], &cache, names), 1);
        let found = cache.by_name("debian/vmlinuz").expect("opened ahead");
        assert_eq!(&found.data[..], b"kernel");
        assert!(cache.by_name("debian/missing").is_none());
        assert!(cache.by_name(".hidden").is_none());
    }

    #[test]
    fn missing_loaders_are_found_by_their_exact_path_in_the_search_directories() {
        let root = tempfile::tempdir().unwrap();
        let system = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("ipxe.efi"), "the operator's").unwrap();
        for name in ["ipxe.efi", "undionly.kpxe", "snponly.efi"] {
            std::fs::write(system.path().join(name), "debian's").unwrap();
        }
        let root = root.path().canonicalize().unwrap();
        let loaders: Vec<String> = ["ipxe.efi", "undionly.kpxe", "arm64/snponly.efi"]
            .map(String::from)
            .into();
        let fallbacks = LoaderFallbacks::find(&root, &loaders, &[system.path().to_path_buf()]);
        let found: Vec<&str> = fallbacks.iter().map(|(name, _)| name.as_str()).collect();
        // The operator's file wins; arm64 never gets the x86 snponly.efi.
        assert_eq!(found, ["undionly.kpxe"]);
        assert_eq!(
            fallbacks.instead_of(ResolveError::NotFound, "undionly.kpxe"),
            Ok(system.path().canonicalize().unwrap().join("undionly.kpxe"))
        );
        assert_eq!(
            fallbacks.instead_of(ResolveError::Private, "undionly.kpxe"),
            Err(ResolveError::Private)
        );
        assert_eq!(
            fallbacks.instead_of(ResolveError::NotFound, "ipxe.efi"),
            Err(ResolveError::NotFound)
        );
    }

    #[test]
    fn upload_directories_never_pass_a_link_outside_the_root() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("evil")).unwrap();
        assert!(create_dirs_inside(&root, "evil/new").is_err());
        assert!(!outside.path().join("new").exists());
        assert_eq!(create_dirs_inside(&root, "a/b").unwrap(), root.join("a/b"));
        std::fs::write(root.join("a/.k.upload-1"), "x").unwrap();
        assert_eq!(remove_upload_leftovers(&root), 1);
    }
}
