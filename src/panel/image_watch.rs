//! Images whose files change or vanish on disk, noticed at once: an inotify
//! watch on every directory that holds an image's kernel or initrd wakes
//! the panel's image check (besides its ten-second round), which updates
//! the image's sizes and SHA-256 sums, or marks the image broken with the
//! reason (shown in the panel and the API as `problem`) until its files are
//! back.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tracing::{debug, info, warn};

use super::{check_files, mtime_ms, PanelState};

/// Images found broken, by name, with the reason; and the watch.
#[derive(Default)]
pub struct ImageHealth {
    broken: Mutex<BTreeMap<String, String>>,
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

/// Checks every image's files: a changed file updates its size and SHA-256
/// (audited); a missing or unreadable one marks the image broken until it
/// is back. Watches the directories the files are in.
pub fn recheck_image_files(state: &PanelState) {
    let Ok(images) = state.store.images() else {
        return;
    };
    let mut dirs = Vec::new();
    for image in images {
        for path in std::iter::once(&image.kernel).chain(&image.initrds) {
            if !crate::inventory::is_url(path) {
                if let Some(dir) = state.root.join(path).parent() {
                    dirs.push(dir.to_path_buf());
                }
            }
        }
        let changed = image.files.iter().any(|file| {
            std::fs::metadata(state.root.join(&file.path))
                .map(|meta| meta.len() != file.size || mtime_ms(&meta) != file.mtime_ms)
                .unwrap_or(true)
        });
        if !changed {
            if state.image_health.set(&image.name, None) {
                info!(image = %image.name, "an image's boot files are back; it boots again");
            }
            continue;
        }
        match check_files(&state.root, &image) {
            Ok(files) => {
                state.image_health.set(&image.name, None);
                info!(image = %image.name, "an image's boot file changed on disk; size and checksum updated");
                let detail = files
                    .iter()
                    .map(|f| format!("{} {} bytes sha256 {}", f.path, f.size, &f.sha256[..16]))
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = state.store.update_image_files(&image.name, &files);
                let _ = state.store.record_audit(
                    "bootfleet",
                    "image.files-changed",
                    &image.name,
                    &detail,
                );
            }
            Err(error) => {
                if state.image_health.set(&image.name, Some(error.clone())) {
                    warn!(image = %image.name, %error, "an image's boot file is missing or unreadable; machines assigned to it will fail at that file");
                    let _ =
                        state
                            .store
                            .record_audit("bootfleet", "image.broken", &image.name, &error);
                }
            }
        }
    }
    state
        .image_health
        .watch(dirs.into_iter().filter(|dir| dir.is_dir()));
}
