//! Image files replicated between the servers of one database, addressed
//! by their SHA-256.
//!
//! An image's record holds each of its files' SHA-256 (set where it was
//! registered or uploaded, or where the file was changed on disk while that
//! server ran). Every image check round, each server works out which of
//! those files it holds, by hashing what changed on its disk since it last
//! looked ([`LocalHashes`]), and reports them with its data-plane URL
//! ([`crate::store::ServerFiles`]). A file it lacks, or holds in another
//! version, it fetches over HTTP from a server that reports the wanted
//! SHA-256, into a hidden temporary file beside the target (never served),
//! checks size and SHA-256, and only then renames into place. Until then
//! the image is "not here yet": its machines are told to wait and ask again
//! ([`crate::boot::router::Router::set_images_not_here`]).
//!
//! Which version wins: the record's, except that a server that saw its own
//! copy of a file change while it ran (it had checked the old copy against
//! the record) makes the new copy the record's; and a server alone on the
//! database (no other reported in the last minute) takes its own copy when
//! no server holds the record's version. A single server therefore behaves
//! as before: files changed on disk update their image's checksums.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::store::{FileCheck, HeldFile, ImageRecord, ServerFiles};

/// A server that has not reported for this long is not asked for files.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// What this server knows of its own copies: by path, the size and
/// modification time it hashed, and the SHA-256 it found.
#[derive(Default)]
pub struct LocalHashes {
    known: Mutex<HashMap<String, Hashed>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Hashed {
    size: u64,
    mtime_ms: u64,
    sha256: String,
}

/// This server's copy of one file, against what the record wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalCopy {
    /// No file there (or not a readable regular file inside the root).
    Missing,
    /// The record's version.
    Wanted,
    /// Another version; `changed_here` when this server had seen the
    /// record's version there and the file changed since (an operator's
    /// change on this server, which the record should follow).
    Other { sha256: String, changed_here: bool },
}

impl LocalHashes {
    /// How this server's copy of `want` compares, hashing it only when its
    /// size or modification time changed since it was last hashed.
    pub fn compare(&self, root: &Path, want: &FileCheck) -> LocalCopy {
        let Ok(full) = crate::server::paths::resolve_inside(root, &want.path) else {
            return LocalCopy::Missing;
        };
        let Ok(meta) = std::fs::metadata(&full) else {
            return LocalCopy::Missing;
        };
        if !meta.is_file() {
            return LocalCopy::Missing;
        }
        let (size, mtime_ms) = (meta.len(), super::mtime_ms(&meta));
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let before = known.get(&want.path).cloned();
        let sha256 = match &before {
            Some(hashed) if hashed.size == size && hashed.mtime_ms == mtime_ms => {
                hashed.sha256.clone()
            }
            // Not hashed by this process yet, but the size and time the
            // record was checked at: trusted, as before replication (a
            // restart does not hash every image again).
            None if size == want.size && mtime_ms == want.mtime_ms => {
                known.insert(
                    want.path.clone(),
                    Hashed {
                        size,
                        mtime_ms,
                        sha256: want.sha256.clone(),
                    },
                );
                want.sha256.clone()
            }
            _ => {
                drop(known);
                let Ok(sha256) = hash_file(&full) else {
                    return LocalCopy::Missing;
                };
                known = self.known.lock().unwrap_or_else(|p| p.into_inner());
                known.insert(
                    want.path.clone(),
                    Hashed {
                        size,
                        mtime_ms,
                        sha256: sha256.clone(),
                    },
                );
                sha256
            }
        };
        if sha256 == want.sha256 {
            return LocalCopy::Wanted;
        }
        let changed_here = before.is_some_and(|b| b.sha256 == want.sha256);
        LocalCopy::Other {
            sha256,
            changed_here,
        }
    }

    /// Whether this server's copy of `want` is not the record's version, at
    /// a glance: missing, of another size, or hashed before to another
    /// SHA-256 at its present size and time. No hashing: `compare` decides.
    pub fn looks_different(&self, root: &Path, want: &FileCheck) -> bool {
        let meta = crate::server::paths::resolve_inside(root, &want.path).and_then(|full| {
            std::fs::metadata(full).map_err(|_| crate::server::paths::ResolveError::NotFound)
        });
        let Ok(meta) = meta else {
            return true;
        };
        if !meta.is_file() || meta.len() != want.size {
            return true;
        }
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.get(&want.path).is_some_and(|hashed| {
            hashed.size == meta.len()
                && hashed.mtime_ms == super::mtime_ms(&meta)
                && hashed.sha256 != want.sha256
        })
    }

    /// Notes a copy this server just wrote and checked.
    fn note(&self, path: &str, full: &Path, sha256: &str) {
        if let Ok(meta) = std::fs::metadata(full) {
            self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(
                path.to_string(),
                Hashed {
                    size: meta.len(),
                    mtime_ms: super::mtime_ms(&meta),
                    sha256: sha256.to_string(),
                },
            );
        }
    }
}

fn hash_file(path: &Path) -> std::io::Result<String> {
    sha256_of(std::fs::File::open(path)?)
}

/// The SHA-256 of everything `reader` yields, as lower-case hex, read a
/// megabyte at a time.
pub(super) fn sha256_of(mut reader: impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = reader.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(crate::proto::lower_hex(&hasher.finalize()))
}

/// What became of one image this round.
#[derive(Debug)]
pub enum Settled {
    /// Every file is here in the record's version.
    Here(Vec<HeldFile>),
    /// The files here are the image's now (changed on this server, or the
    /// only copies left): the record should be updated from them.
    Adopt,
    /// Not here, and why: `copying` when another server holds it (the copy
    /// is under way or failed and is tried again), otherwise it is broken.
    NotHere { why: String, copying: bool },
}

/// Whether `server` reported within [`STALE_AFTER`] of `now_ms`.
pub fn is_running(server: &ServerFiles, now_ms: u64) -> bool {
    now_ms.saturating_sub(server.seen_ms) < STALE_AFTER.as_millis() as u64
}

/// Makes this server hold `image`'s files in the record's version, copying
/// them from `peers` (the other servers' reports) where needed. A file
/// nobody holds breaks the image on a server of its own; with other
/// servers running it is waited for (it may be reported any moment by the
/// server where it was registered).
pub fn settle(
    root: &Path,
    hashes: &LocalHashes,
    image: &ImageRecord,
    peers: &[ServerFiles],
    now_ms: u64,
) -> Settled {
    let mut held = Vec::new();
    for want in &image.files {
        let holders: Vec<&ServerFiles> = peers
            .iter()
            .filter(|peer| {
                peer.files
                    .iter()
                    .any(|f| f.path == want.path && f.sha256 == want.sha256)
            })
            .collect();
        match hashes.compare(root, want) {
            LocalCopy::Wanted => {}
            LocalCopy::Other {
                changed_here: true, ..
            } => return Settled::Adopt,
            copy if holders.is_empty() => {
                let others_running = peers.iter().any(|peer| is_running(peer, now_ms));
                return match copy {
                    // Alone, and nobody has the record's version: what is
                    // here is it now. (With others running, the version
                    // may be reported any moment by the server where it
                    // changed; adopting an old copy here would undo that.)
                    LocalCopy::Other { .. } if !others_running => Settled::Adopt,
                    _ if others_running => Settled::NotHere {
                        why: format!(
                            "boot file {:?} is not here and no server reports it yet",
                            want.path
                        ),
                        copying: true,
                    },
                    _ => Settled::NotHere {
                        why: format!(
                            "boot file {:?}: not found (upload it first, or give a path inside the boot directory)",
                            want.path
                        ),
                        copying: false,
                    },
                };
            }
            _ => {
                let fresh = holders
                    .iter()
                    .find(|peer| !peer.http_url.is_empty() && is_running(peer, now_ms));
                let Some(peer) = fresh else {
                    return Settled::NotHere {
                        why: format!(
                            "{} is held only by servers not running now ({})",
                            want.path,
                            holders
                                .iter()
                                .map(|p| p.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        copying: true,
                    };
                };
                if let Err(error) = fetch(root, hashes, want, peer) {
                    return Settled::NotHere {
                        why: format!(
                            "copying {} from {} failed: {error}; trying again",
                            want.path, peer.name
                        ),
                        copying: true,
                    };
                }
                tracing::info!(image = %image.name, file = %want.path, from = %peer.name,
                    bytes = want.size, "image file copied from another server and checked");
            }
        }
        held.push(HeldFile {
            path: want.path.clone(),
            sha256: want.sha256.clone(),
            size: want.size,
        });
    }
    Settled::Here(held)
}

/// Why a file could not be copied from another server.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{0:?} is not a file name inside the boot directory")]
    NotInside(String),
    #[error(transparent)]
    Directory(#[from] crate::server::paths::CreateDirsError),
    #[error("GET {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} gave {size} bytes with SHA-256 {sha256}, not the {wanted_size} bytes with {wanted_sha256} the image names")]
    NotTheFile {
        url: String,
        size: u64,
        sha256: String,
        wanted_size: u64,
        wanted_sha256: String,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CopyError + '_ {
    move |source| CopyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `want` from `peer`'s data plane into the boot directory: into a
/// hidden file beside it first, checked, then renamed over it.
fn fetch(
    root: &Path,
    hashes: &LocalHashes,
    want: &FileCheck,
    peer: &ServerFiles,
) -> Result<(), CopyError> {
    let not_inside = || CopyError::NotInside(want.path.clone());
    let relative =
        crate::proto::path::safe_relative_name(want.path.as_bytes()).map_err(|_| not_inside())?;
    if crate::server::paths::is_private_name(&relative) {
        return Err(not_inside());
    }
    let (parent, name) = relative.rsplit_once('/').unwrap_or(("", relative.as_str()));
    let dir = crate::server::paths::create_dirs_inside(root, parent)?;
    let target = dir.join(name);
    // Named as an upload's temporary file: never served, and removed at
    // start if a crash left it.
    let temporary = dir.join(format!(".{name}.upload-replica"));
    let result = download(&peer.http_url, want, &temporary)
        .and_then(|()| std::fs::rename(&temporary, &target).map_err(io_error(&target)));
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    } else {
        let _ = crate::durable::sync_parent_dir(&target);
        hashes.note(&want.path, &target, &want.sha256);
    }
    result
}

/// GETs `base/path` into `into`, refusing more bytes than `want.size` and
/// anything whose size or SHA-256 is not `want`'s; synced before it returns.
fn download(base: &str, want: &FileCheck, into: &Path) -> Result<(), CopyError> {
    let encoded: Vec<String> = want
        .path
        .split('/')
        .map(|part| {
            percent_encoding::utf8_percent_encode(part, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        })
        .collect();
    let url = format!("{}/{}", base.trim_end_matches('/'), encoded.join("/"));
    let http_error = |reason: String| CopyError::Http {
        url: url.clone(),
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(5)))
        .timeout_global(Some(Duration::from_secs(600)))
        .http_status_as_error(true)
        .build()
        .into();
    let response = agent
        .get(&url)
        .call()
        .map_err(|e| http_error(e.to_string()))?;
    let mut body = response.into_body().into_reader().take(want.size + 1);
    let mut file = std::fs::File::create(into).map_err(io_error(into))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let read = body
            .read(&mut buffer)
            .map_err(|e| http_error(e.to_string()))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
        file.write_all(&buffer[..read]).map_err(io_error(into))?;
    }
    let sha256 = crate::proto::lower_hex(&hasher.finalize());
    if size != want.size || sha256 != want.sha256 {
        return Err(CopyError::NotTheFile {
            url,
            size,
            sha256,
            wanted_size: want.size,
            wanted_sha256: want.sha256.clone(),
        });
    }
    file.sync_all().map_err(io_error(into))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        crate::proto::lower_hex(&Sha256::digest(bytes))
    }

    fn image(path: &str, bytes: &[u8]) -> ImageRecord {
        ImageRecord {
            name: "i".into(),
            kernel: path.into(),
            initrds: Vec::new(),
            cmdline: String::new(),
            transport: "http".into(),
            architecture: String::new(),
            description: String::new(),
            files: vec![FileCheck {
                path: path.into(),
                size: bytes.len() as u64,
                sha256: sha(bytes),
                mtime_ms: 0,
            }],
            created_ms: 0,
            checkin_deadline_seconds: 0,
            secure_boot: false,
            revision: 1,
        }
    }

    fn peer(name: &str, seen_ms: u64, files: &[(&str, &[u8])]) -> ServerFiles {
        ServerFiles {
            name: name.into(),
            http_url: String::new(),
            files: files
                .iter()
                .map(|(path, bytes)| HeldFile {
                    path: path.to_string(),
                    sha256: sha(bytes),
                    size: bytes.len() as u64,
                })
                .collect(),
            seen_ms,
        }
    }

    #[test]
    fn which_copy_wins() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path().canonicalize().unwrap();
        std::fs::write(root.join("k"), b"old").unwrap();
        let hashes = LocalHashes::default();
        let now = 1_000_000;
        let running = peer("b", now, &[]);
        let gone = peer("b", now - 120_000, &[]);
        // The record's version here: held.
        assert!(matches!(
            settle(&root, &hashes, &image("k", b"old"), std::slice::from_ref(&running), now),
            Settled::Here(files) if files.len() == 1
        ));
        // Changed on this server while it ran: the record follows it.
        std::fs::write(root.join("k"), b"new!").unwrap();
        assert!(matches!(
            settle(
                &root,
                &hashes,
                &image("k", b"old"),
                std::slice::from_ref(&running),
                now
            ),
            Settled::Adopt
        ));
        // Another version nobody holds: alone, this copy is it; with
        // another server running, it waits for the record's version.
        let fresh = LocalHashes::default();
        assert!(matches!(
            settle(&root, &fresh, &image("k", b"other"), &[gone], now),
            Settled::Adopt
        ));
        assert!(matches!(
            settle(
                &root,
                &fresh,
                &image("k", b"other"),
                std::slice::from_ref(&running),
                now
            ),
            Settled::NotHere { copying: true, .. }
        ));
        // Missing, alone: broken; held by a server that is not running:
        // waited for; held by a running one it cannot reach: tried again.
        assert!(matches!(
            settle(&root, &fresh, &image("missing", b"x"), &[], now),
            Settled::NotHere { copying: false, .. }
        ));
        let holder_gone = peer("c", now - 120_000, &[("missing", b"x")]);
        assert!(matches!(
            settle(&root, &fresh, &image("missing", b"x"), &[holder_gone], now),
            Settled::NotHere { copying: true, why } if why.contains("not running")
        ));
        // A file at the size and time its record was checked at is taken
        // as checked (no hashing after a restart); a changed time is not.
        let path = root.join("k");
        let meta = std::fs::metadata(&path).unwrap();
        let mut recorded = image("k", b"new!");
        recorded.files[0].sha256 = "recorded".into();
        recorded.files[0].mtime_ms = crate::panel::mtime_ms(&meta);
        assert_eq!(
            LocalHashes::default().compare(&root, &recorded.files[0]),
            LocalCopy::Wanted
        );
        recorded.files[0].mtime_ms += 1;
        assert!(matches!(
            LocalHashes::default().compare(&root, &recorded.files[0]),
            LocalCopy::Other { .. }
        ));
        // At a glance: another size, or a known other hash at this size.
        assert!(fresh.looks_different(&root, &image("missing", b"x").files[0]));
        assert!(fresh.looks_different(&root, &image("k", b"a").files[0]));
        assert!(fresh.looks_different(&root, &image("k", b"othe").files[0]));
        assert!(!fresh.looks_different(&root, &image("k", b"new!").files[0]));
    }
}
