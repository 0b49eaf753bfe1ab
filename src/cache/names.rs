//! Requested names remembered with the file version they opened, so that a
//! request for a file served before costs no system call: no
//! `canonicalize` (a `lstat` per path component), no `open`, no `fstat`.
//! On the io_uring engines these calls would otherwise block a worker
//! thread on every request, cache hit or not.
//!
//! A remembered name stays valid until anything changes in a directory on
//! its way: an inotify watch on the boot directory and on each directory
//! the name passes through (set before the name is resolved, so no change
//! can slip in between) bumps a generation counter on every event, and an
//! entry made at an older generation is not used. Only names that resolve
//! to themselves are remembered; a name that passes through a symbolic
//! link is resolved every time. A file rewritten in place is an event in
//! its directory like any other. Where inotify is not available (no
//! instances or watches left), nothing is remembered and every request
//! resolves as before.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use super::FileKey;

/// Most names remembered (each is a short string and a key).
const MAX_NAMES: u64 = 100_000;

/// Names and the file versions they opened; see the module documentation.
pub struct NameCache {
    root: PathBuf,
    names: moka::sync::Cache<String, (u64, FileKey)>,
    watch: Option<Arc<Watch>>,
}

struct Watch {
    inotify: Arc<Inotify>,
    /// Bumped by the watch thread on every event it reads.
    generation: Arc<AtomicU64>,
    /// The watch thread ended (the instance failed): trust nothing.
    broken: Arc<AtomicBool>,
    /// Set when the cache is dropped: the thread ends at the next event.
    closed: Arc<AtomicBool>,
    watched: Mutex<HashSet<PathBuf>>,
    descriptors: Mutex<Vec<WatchDescriptor>>,
}

impl Drop for NameCache {
    fn drop(&mut self) {
        if let Some(watch) = &self.watch {
            watch.close();
        }
    }
}

/// What [`NameCache::prepare`] learnt before a name was resolved.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    generation: u64,
}

impl NameCache {
    /// Remembers names under the canonical `root`; without inotify, none.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            names: moka::sync::Cache::new(MAX_NAMES),
            watch: Watch::start(root),
        }
    }

    /// The version `name` opened last time, if nothing changed on its way
    /// since. No system call.
    pub fn get(&self, name: &str) -> Option<FileKey> {
        let watch = self.watch.as_ref()?;
        let (generation, key) = self.names.get(name)?;
        (generation == watch.generation() && !watch.broken.load(Ordering::Acquire)).then_some(key)
    }

    /// Watches every directory `name` passes through, then returns the
    /// generation to remember the name at once it is resolved; `None` when
    /// the name cannot be remembered (no inotify, a watch refused).
    pub fn prepare(&self, name: &str) -> Option<Ticket> {
        let watch = self.watch.as_ref()?;
        let mut dir = self.root.clone();
        watch.add(&dir)?;
        let mut parts = name.split('/').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                break;
            }
            dir.push(part);
            watch.add(&dir)?;
        }
        Some(Ticket {
            generation: watch.generation(),
        })
    }

    /// Remembers that `name` resolved to `path` and opened `key`, if it
    /// resolved to itself (no link on the way) and nothing changed since
    /// `ticket` was taken.
    pub fn remember(&self, ticket: Option<Ticket>, name: &str, path: &Path, key: &FileKey) {
        let (Some(ticket), Some(watch)) = (ticket, self.watch.as_ref()) else {
            return;
        };
        if path != self.root.join(name) || ticket.generation != watch.generation() {
            return;
        }
        self.names
            .insert(name.to_string(), (ticket.generation, key.clone()));
    }
}

impl Watch {
    /// The instance, its thread, and a first watch on `root` (so that
    /// taking the watches off at [`Watch::close`] always wakes the thread).
    fn start(root: &Path) -> Option<Arc<Self>> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)
            .map_err(|error| {
                tracing::info!(%error, "no inotify for the boot directory: every request resolves its file name");
            })
            .ok()?;
        let watch = Arc::new(Self {
            inotify: Arc::new(inotify),
            generation: Arc::new(AtomicU64::new(0)),
            broken: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
            watched: Mutex::new(HashSet::new()),
            descriptors: Mutex::new(Vec::new()),
        });
        watch.add(root)?;
        let (inotify, generation, broken, closed) = (
            Arc::clone(&watch.inotify),
            Arc::clone(&watch.generation),
            Arc::clone(&watch.broken),
            Arc::clone(&watch.closed),
        );
        std::thread::Builder::new()
            .name("bootfleet-names-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || loop {
                match inotify.read_events() {
                    Ok(_) if closed.load(Ordering::Acquire) => return,
                    Ok(_) => {
                        generation.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "the boot directory's watch failed: every request resolves its file name from now on");
                        broken.store(true, Ordering::Release);
                        return;
                    }
                }
            })
            .ok()?;
        Some(watch)
    }

    /// Ends the thread: taking the watches off queues IN_IGNORED, which
    /// wakes it to find `closed`; the instance closes with its last
    /// reference.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for descriptor in self
            .descriptors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = self.inotify.rm_watch(descriptor);
        }
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Watches `dir` (once); `None` when it cannot be watched.
    fn add(&self, dir: &Path) -> Option<()> {
        let mut watched = self.watched.lock().unwrap_or_else(|p| p.into_inner());
        if watched.contains(dir) {
            return Some(());
        }
        let flags = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_DONT_FOLLOW
            | AddWatchFlags::IN_ONLYDIR;
        let descriptor = self.inotify.add_watch(dir, flags).ok()?;
        self.descriptors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(descriptor);
        watched.insert(dir.to_path_buf());
        // A watch set now may have missed a change just before it.
        self.generation.fetch_add(1, Ordering::AcqRel);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::FileCache;
    use std::time::{Duration, Instant};

    fn key_of(cache: &FileCache, path: &Path) -> FileKey {
        cache.open(path).unwrap().key
    }

    /// Waits until `names` no longer holds `name` (the watch thread has
    /// seen the change), at most a second.
    fn forgotten(names: &NameCache, name: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if names.get(name).is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn a_name_is_remembered_until_its_file_or_a_directory_on_its_way_changes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("images/debian")).unwrap();
        let kernel = root.join("images/debian/vmlinuz");
        std::fs::write(&kernel, b"one").unwrap();
        let cache = FileCache::new(1 << 20);
        let names = NameCache::new(&root);
        let name = "images/debian/vmlinuz";
        let remember = |names: &NameCache| {
            let ticket = names.prepare(name);
            let key = key_of(&cache, &kernel);
            names.remember(ticket, name, &kernel, &key);
            key
        };

        let key = remember(&names);
        assert_eq!(names.get(name), Some(key));

        // Rewritten in place.
        std::fs::write(&kernel, b"two!").unwrap();
        assert!(forgotten(&names, name));
        let key = remember(&names);
        assert_eq!(names.get(name).map(|k| k.size), Some(4));
        drop(key);

        // A directory on the way renamed.
        std::fs::rename(root.join("images"), root.join("old-images")).unwrap();
        assert!(forgotten(&names, name));
    }

    #[test]
    fn a_name_through_a_link_or_resolved_during_a_change_is_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::write(root.join("real"), b"x").unwrap();
        std::os::unix::fs::symlink("real", root.join("link")).unwrap();
        let cache = FileCache::new(1 << 20);
        let names = NameCache::new(&root);

        let ticket = names.prepare("link");
        let key = key_of(&cache, &root.join("real"));
        names.remember(ticket, "link", &root.join("real"), &key);
        assert_eq!(names.get("link"), None);

        let ticket = names.prepare("real");
        std::fs::write(root.join("other"), b"y").unwrap();
        // Let the watch thread see the write before remembering.
        std::thread::sleep(Duration::from_millis(50));
        names.remember(ticket, "real", &root.join("real"), &key);
        assert_eq!(names.get("real"), None);
    }

    #[test]
    fn a_dropped_name_cache_ends_its_thread_and_closes_its_instance() {
        let dir = tempfile::tempdir().unwrap();
        let names = NameCache::new(&dir.path().canonicalize().unwrap());
        let instance = Arc::downgrade(
            &names
                .watch
                .as_ref()
                .expect("this machine has inotify; the cache must use it")
                .inotify,
        );
        drop(names);
        let deadline = Instant::now() + Duration::from_secs(2);
        while instance.upgrade().is_some() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            instance.upgrade().is_none(),
            "the watch thread still holds the inotify instance"
        );
    }
}
