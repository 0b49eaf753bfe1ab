//! Images whose files change or vanish on disk, noticed at once: an inotify
//! watch on every directory that holds an image's kernel or initrd wakes
//! the panel's image check (besides its ten-second round), which updates
//! the image's sizes and SHA-256 sums, or marks the image broken with the
//! reason (shown in the panel and the API as `problem`) until its files are
//! back. Each round also reads each kernel's PE header: whether it carries
//! a signature ([`crate::proto::pe`]), which an image booted through the
//! Secure Boot chain needs (shown as `kernel_signature` and a warning).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tracing::{debug, info, warn};

use super::replica::{self, Settled};
use super::{check_files, PanelState};
use crate::store::{HeldFile, ImageRecord, ServerFiles};

/// Images found broken, by name, with the reason; and the watch.
#[derive(Default)]
pub struct ImageHealth {
    broken: Mutex<BTreeMap<String, String>>,
    /// Each image's kernel signature, by image name (images whose kernel
    /// is a URL or unreadable have none).
    signatures: Mutex<BTreeMap<String, crate::proto::pe::Signature>>,
    /// This server's copies of image files, as last hashed.
    pub hashes: super::replica::LocalHashes,
    watch: Mutex<Option<DirWatch>>,
    /// Woken by the watch thread: something changed in a watched directory.
    pub changed: tokio::sync::Notify,
}

struct DirWatch {
    inotify: Arc<Inotify>,
    dirs: HashSet<PathBuf>,
    descriptors: Vec<WatchDescriptor>,
}

impl Drop for DirWatch {
    /// Taking the watches off wakes the thread (IN_IGNORED), which then
    /// finds the health gone and ends, closing the instance. (With no
    /// watch set the thread never started reading anything that matters,
    /// and ends at the process's end.)
    fn drop(&mut self) {
        for descriptor in self.descriptors.drain(..) {
            let _ = self.inotify.rm_watch(descriptor);
        }
    }
}

impl ImageHealth {
    /// Why `image` cannot boot now, if it cannot.
    pub fn problem(&self, image: &str) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(image)
            .cloned()
    }

    /// Whether `image`'s kernel carries a signature, as last checked.
    pub fn kernel_signature(&self, image: &str) -> Option<crate::proto::pe::Signature> {
        self.signatures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(image)
            .copied()
    }

    /// Reads the kernel signature of each of `images` (local kernels only).
    fn check_signatures(&self, root: &std::path::Path, images: &[ImageRecord]) {
        let found: BTreeMap<String, crate::proto::pe::Signature> = images
            .iter()
            .filter(|image| !crate::inventory::is_url(&image.kernel))
            .filter_map(|image| {
                let signature = kernel_signature(&root.join(&image.kernel)).ok()?;
                if image.secure_boot && signature != crate::proto::pe::Signature::Signed {
                    debug!(image = %image.name, ?signature, "an image booted through the Secure Boot chain has a kernel without a signature");
                }
                Some((image.name.clone(), signature))
            })
            .collect();
        *self.signatures.lock().unwrap_or_else(|p| p.into_inner()) = found;
    }

    fn set(&self, image: &str, problem: Option<String>) -> bool {
        let mut broken = self.broken.lock().unwrap_or_else(|p| p.into_inner());
        match problem {
            Some(problem) => broken.insert(image.to_string(), problem.clone()) != Some(problem),
            None => broken.remove(image).is_some(),
        }
    }

    /// Watches `dirs` too (directories already watched are left alone).
    fn watch(self: &Arc<Self>, dirs: impl IntoIterator<Item = PathBuf>) {
        let dirs: Vec<PathBuf> = dirs.into_iter().collect();
        if dirs.is_empty() {
            // No thread without a watch to wake it when it must end.
            return;
        }
        let mut watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        if watch.is_none() {
            *watch = self.start_watch();
        }
        let Some(watch) = watch.as_mut() else {
            return;
        };
        for dir in dirs {
            if watch.dirs.contains(&dir) {
                continue;
            }
            let flags = AddWatchFlags::IN_CLOSE_WRITE
                | AddWatchFlags::IN_DELETE
                | AddWatchFlags::IN_MOVED_FROM
                | AddWatchFlags::IN_MOVED_TO
                | AddWatchFlags::IN_ATTRIB
                | AddWatchFlags::IN_ONLYDIR;
            match watch.inotify.add_watch(&dir, flags) {
                Ok(descriptor) => {
                    watch.dirs.insert(dir);
                    watch.descriptors.push(descriptor);
                }
                Err(error) => {
                    debug!(dir = %dir.display(), %error, "image directory not watched; checked every 10 s")
                }
            }
        }
    }

    /// The inotify instance and the thread that reads it.
    fn start_watch(self: &Arc<Self>) -> Option<DirWatch> {
        let inotify = match Inotify::init(InitFlags::IN_CLOEXEC) {
            Ok(inotify) => Arc::new(inotify),
            Err(error) => {
                warn!(%error, "no inotify for image files; changes are noticed within 10 s");
                return None;
            }
        };
        let (reader, health) = (Arc::clone(&inotify), Arc::downgrade(self));
        let spawned = std::thread::Builder::new()
            .name("bootfleet-image-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || loop {
                match reader.read_events() {
                    Ok(_) => match health.upgrade() {
                        Some(health) => health.changed.notify_one(),
                        None => return,
                    },
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(error) => {
                        warn!(%error, "the image files' watch failed; changes are noticed within 10 s");
                        return;
                    }
                }
            });
        spawned.ok().map(|_| DirWatch {
            inotify,
            dirs: HashSet::new(),
            descriptors: Vec::new(),
        })
    }
}

/// Checks every image's files: a file changed on disk updates its size
/// and SHA-256 (audited); with other servers on the database, a file this
/// server lacks is copied from one that holds the image's version
/// ([`super::replica`]); a file nobody has marks the image broken until it
/// is back. Reports the files this server holds, tells the router which
/// images are not here, and watches the directories the files are in.
pub fn recheck_image_files(state: &PanelState) {
    let Ok(images) = state.store.images() else {
        return;
    };
    let now = super::now_ms();
    let peers: Vec<ServerFiles> = match state.store.server_files() {
        Ok(servers) => servers
            .into_iter()
            .filter(|s| s.name != state.server_name)
            .collect(),
        Err(error) => {
            debug!(%error, "other servers' image files not read; none copied this round");
            Vec::new()
        }
    };
    state.image_health.check_signatures(&state.root, &images);
    let mut dirs = Vec::new();
    let mut held = Vec::new();
    let mut not_here = BTreeMap::new();
    for image in images {
        for path in std::iter::once(&image.kernel).chain(&image.initrds) {
            if !crate::inventory::is_url(path) {
                if let Some(dir) = state.root.join(path).parent() {
                    dirs.push(dir.to_path_buf());
                }
            }
        }
        match replica::settle(&state.root, &state.image_health.hashes, &image, &peers, now) {
            Settled::Here(files) => {
                if state.image_health.set(&image.name, None) {
                    info!(image = %image.name, "an image's boot files are here again; it boots again");
                }
                held.extend(files);
            }
            Settled::Adopt => held.extend(adopt_local_files(state, &image)),
            Settled::NotHere { why, copying } => {
                if state.image_health.set(&image.name, Some(why.clone())) {
                    if copying {
                        warn!(image = %image.name, %why, "an image's boot files are not on this server yet; its machines are told to wait");
                    } else {
                        warn!(image = %image.name, error = %why, "an image's boot file is missing or unreadable; machines assigned to it will fail at that file");
                    }
                    let action = if copying {
                        "image.not-here"
                    } else {
                        "image.broken"
                    };
                    let _ = state
                        .store
                        .record_audit("bootfleet", action, &image.name, &why);
                }
                if copying {
                    not_here.insert(image.name.clone(), why);
                }
            }
        }
    }
    let report = ServerFiles {
        name: state.server_name.clone(),
        http_url: state.config.data_plane_url.clone().unwrap_or_default(),
        files: held,
        seen_ms: now,
    };
    if let Err(error) = state.store.note_server_files(&report) {
        debug!(%error, "this server's image files not reported to the database");
    }
    state.router.set_images_not_here(not_here);
    state
        .image_health
        .watch(dirs.into_iter().filter(|dir| dir.is_dir()));
}

/// With other servers running on the database, marks not here, at once,
/// every image with a file this server lacks (at a glance,
/// [`replica::LocalHashes::looks_different`]): called before a new
/// snapshot goes live, so that an image registered on another server is
/// never offered here before the image check (which copies its files) ran.
pub fn hold_back_images_not_here(state: &PanelState) {
    let (Ok(images), Ok(servers)) = (state.store.images(), state.store.server_files()) else {
        return;
    };
    let now = super::now_ms();
    if !servers
        .iter()
        .any(|s| s.name != state.server_name && replica::is_running(s, now))
    {
        return;
    }
    let mut not_here = state.router.images_not_here();
    let held_back_before = not_here.len();
    for image in &images {
        let lacking = image
            .files
            .iter()
            .find(|want| state.image_health.hashes.looks_different(&state.root, want));
        if let Some(want) = lacking {
            not_here
                .entry(image.name.clone())
                .or_insert_with(|| format!("{} is to be copied from another server", want.path));
        }
    }
    // Something newly held back: the image check copies it now, not at
    // its next round.
    let newly_held_back = not_here.len() > held_back_before;
    state.router.set_images_not_here(not_here);
    if newly_held_back {
        state.image_health.changed.notify_one();
    }
}

/// The image's files as they are on this server's disk become its record's
/// (sizes and SHA-256, audited): they were changed here, or no server holds
/// the version the record named any more.
/// Logs and audits a file that cannot be read, and then holds none.
fn adopt_local_files(state: &PanelState, image: &ImageRecord) -> Vec<HeldFile> {
    match check_files(&state.root, image) {
        Ok(files) => {
            state.image_health.set(&image.name, None);
            info!(image = %image.name, "an image's boot file changed on disk; size and checksum updated");
            let detail = files
                .iter()
                .map(|f| format!("{} {} bytes sha256 {}", f.path, f.size, &f.sha256[..16]))
                .collect::<Vec<_>>()
                .join("; ");
            let _ = state.store.update_image_files(&image.name, &files);
            let _ =
                state
                    .store
                    .record_audit("bootfleet", "image.files-changed", &image.name, &detail);
            files
                .into_iter()
                .map(|f| HeldFile {
                    path: f.path,
                    sha256: f.sha256,
                    size: f.size,
                })
                .collect()
        }
        Err(error) => {
            if state.image_health.set(&image.name, Some(error.clone())) {
                warn!(image = %image.name, %error, "an image's boot file is missing or unreadable; machines assigned to it will fail at that file");
                let _ = state
                    .store
                    .record_audit("bootfleet", "image.broken", &image.name, &error);
            }
            Vec::new()
        }
    }
}

/// [`crate::proto::pe::signature`] of the file at `path`, reading only its
/// header.
fn kernel_signature(path: &std::path::Path) -> std::io::Result<crate::proto::pe::Signature> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut header = Vec::with_capacity(crate::proto::pe::HEADER_BYTES);
    file.take(crate::proto::pe::HEADER_BYTES as u64)
        .read_to_end(&mut header)?;
    Ok(crate::proto::pe::signature(&header, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::pe::Signature;

    #[test]
    fn debians_signed_kernel_is_signed_and_unsigned_once_its_table_is_cleared() {
        // The test machines boot Debian's linux-image-amd64, which is signed.
        let mut kernels: Vec<_> = std::fs::read_dir("/boot")
            .expect("/boot (linux-image-amd64)")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .collect();
        kernels.sort();
        let kernel = kernels
            .pop()
            .expect("a kernel in /boot (linux-image-amd64)");
        assert_eq!(
            kernel_signature(&kernel).unwrap(),
            Signature::Signed,
            "{}",
            kernel.display()
        );
        let mut image = std::fs::read(&kernel).unwrap();
        let pe = u32::from_le_bytes(image[0x3c..0x40].try_into().unwrap()) as usize;
        let entry = pe + 24 + 112 + 4 * 8;
        image[entry..entry + 8].fill(0);
        assert_eq!(
            crate::proto::pe::signature(&image[..4096], image.len() as u64),
            Signature::Unsigned
        );
    }
}
