//! The mmapped file cache every transfer reads from.
//!
//! A file is opened and mapped once and then shared by every transfer of it
//! (`Arc<FileData>`); DATA blocks and HTTP bodies are slices of the mapping,
//! never copies. Entries are keyed by path *and* file identity (device,
//! inode, size, modification time), so a file that was replaced is mapped
//! afresh for new transfers while transfers already running keep the mapping
//! they started with: a transfer never mixes bytes of two versions. The cache
//! is a moka cache weighted by file size, so the mapped bytes it keeps alive
//! stay under a configured budget.
//!
//! Replace boot files by renaming a new file into place (`install`, `rsync`,
//! `cp` to a temporary name then `mv`): that gives the new file a new
//! identity, and running transfers finish with the old one. A file rewritten
//! in place (`cp new old`) cannot be kept whole for running transfers, but it
//! never crashes the server ([`guard`] repairs faults in truncated mappings)
//! and never goes out silently mixed: each mapped version re-checks its file
//! at most every [`CHECK_INTERVAL`] (at once after a fault), and
//! [`FileData::changed`] tells the transfers of a changed version to stop
//! with an error, so that the client's retry gets the new file.

pub mod guard;
pub mod names;

use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::Duration;

use memmap2::Mmap;
use moka::sync::Cache;

/// How often a mapped version looks at its file again.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// The bytes of one file version, shared by all transfers reading it.
#[derive(Debug)]
pub enum FileData {
    /// A mapped file.
    Mapped(MappedFile),
    /// Bytes made in memory: empty files (which cannot be mapped), generated
    /// files and netascii conversions.
    Owned(Vec<u8>),
}

impl Deref for FileData {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileData::Mapped(mapped) => &mapped.map,
            FileData::Owned(bytes) => bytes,
        }
    }
}

impl FileData {
    /// The open file behind a mapped version (for `sendfile`); `None` for
    /// bytes made in memory.
    pub fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            FileData::Mapped(mapped) => Some(mapped.file.as_raw_fd()),
            FileData::Owned(_) => None,
        }
    }

    /// Whether the file this version was mapped from was rewritten in place
    /// since: what the checker thread found (it looks every
    /// [`CHECK_INTERVAL`]), or, after a fault in any mapping, what a file
    /// status call finds now.
    pub fn changed(&self) -> bool {
        match self {
            FileData::Mapped(mapped) => mapped.changed(),
            FileData::Owned(_) => false,
        }
    }
}

/// One mapped file version. Field order matters: the guard registration is
/// dropped before the mapping is unmapped.
pub struct MappedFile {
    _guard: guard::Registration,
    map: Mmap,
    /// Kept open to look at this very inode again.
    file: File,
    size: u64,
    mtime_ns: i128,
    faults_seen: AtomicU64,
    changed: AtomicBool,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("size", &self.size)
            .finish()
    }
}

impl MappedFile {
    fn changed(&self) -> bool {
        if self.changed.load(Ordering::Relaxed) {
            return true;
        }
        let faults = guard::faults();
        if faults == self.faults_seen.load(Ordering::Relaxed) {
            return false;
        }
        // A mapping was read past its file's end somewhere: look now, not
        // at the checker's next round (an error path, taken once).
        self.faults_seen.store(faults, Ordering::Relaxed);
        self.check()
    }

    /// Compares the file's size and modification time with this version's
    /// (one file status call) and remembers a difference.
    fn check(&self) -> bool {
        let Ok(meta) = self.file.metadata() else {
            return false;
        };
        let changed = meta.size() != self.size || mtime_ns(&meta) != self.mtime_ns;
        if changed {
            self.changed.store(true, Ordering::Relaxed);
        }
        changed
    }
}

/// Mapped versions that may still be in use, for the checker thread.
static MAPPED: Mutex<Vec<Weak<FileData>>> = Mutex::new(Vec::new());

/// Has the checker thread look at `data`'s file every [`CHECK_INTERVAL`]
/// for as long as anything holds it (the thread starts with the first).
fn check_for_rewrites(data: &Arc<FileData>) {
    MAPPED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(data));
    static CHECKER: Once = Once::new();
    CHECKER.call_once(|| {
        let started = std::thread::Builder::new()
            .name("bootfleet-file-check".into())
            .stack_size(64 * 1024)
            .spawn(|| loop {
                std::thread::sleep(CHECK_INTERVAL);
                let alive: Vec<Arc<FileData>> = {
                    let mut mapped = MAPPED.lock().unwrap_or_else(|p| p.into_inner());
                    mapped.retain(|version| version.strong_count() > 0);
                    mapped.iter().filter_map(Weak::upgrade).collect()
                };
                for version in alive {
                    if let FileData::Mapped(mapped) = &*version {
                        if !mapped.changed.load(Ordering::Relaxed) {
                            mapped.check();
                        }
                    }
                }
            });
        if let Err(error) = started {
            tracing::warn!(%error, "no thread to check mapped files: a file rewritten in place is noticed only after a fault");
        }
    });
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

impl AsRef<[u8]> for FileData {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

/// What makes one version of a file distinct from another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

/// A cached file version and its identity.
#[derive(Debug, Clone)]
pub struct CachedFile {
    pub key: FileKey,
    pub data: Arc<FileData>,
}

/// Size-weighted cache of mapped files, and optionally of the names that
/// opened them ([`names`]).
#[derive(Clone)]
pub struct FileCache {
    entries: Cache<FileKey, Arc<FileData>>,
    names: Option<Arc<names::NameCache>>,
}

impl FileCache {
    /// A cache keeping at most `max_bytes` of mappings alive (files larger
    /// than that are still served, just not kept once their transfers end).
    pub fn new(max_bytes: u64) -> Self {
        let entries = Cache::builder()
            // Weighted in KiB so that files up to 4 TiB fit moka's u32 weight.
            .weigher(|_key: &FileKey, data: &Arc<FileData>| {
                u32::try_from(data.len() / 1024 + 1).unwrap_or(u32::MAX)
            })
            .max_capacity(max_bytes / 1024 + 1)
            .build();
        Self {
            entries,
            names: None,
        }
    }

    /// Remembers which version each name under the canonical `root` opened,
    /// so that [`FileCache::by_name`] answers repeated requests without a
    /// system call.
    pub fn remember_names_under(&mut self, root: &Path) {
        self.names = Some(Arc::new(names::NameCache::new(root)));
    }

    /// The version `name` (relative to the root) opened last time, if
    /// nothing changed on its way since and it is still mapped: no system
    /// call.
    pub fn by_name(&self, name: &str) -> Option<CachedFile> {
        let key = self.names.as_ref()?.get(name)?;
        let data = self.entries.get(&key)?;
        Some(CachedFile { key, data })
    }

    /// Before resolving `name`: watches the directories on its way (see
    /// [`names::NameCache::prepare`]).
    pub fn prepare_name(&self, name: &str) -> Option<names::Ticket> {
        self.names.as_ref()?.prepare(name)
    }

    /// After `name` resolved to `path` and opened `file`.
    pub fn remember_name(
        &self,
        ticket: Option<names::Ticket>,
        name: &str,
        path: &Path,
        file: &CachedFile,
    ) {
        if let Some(names) = &self.names {
            names.remember(ticket, name, path, &file.key);
        }
    }

    /// Opens `path` (which the caller has already resolved inside the boot
    /// root) and returns its current version, mapping it on first use.
    pub fn open(&self, path: &Path) -> io::Result<CachedFile> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            ));
        }
        let key = FileKey {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: mtime_ns(&meta),
        };
        if let Some(data) = self.entries.get(&key) {
            return Ok(CachedFile { key, data });
        }
        let data = if meta.size() == 0 {
            Arc::new(FileData::Owned(Vec::new()))
        } else {
            // SAFETY: the mapping is read-only and private to this process.
            // See the module documentation for files rewritten in place.
            let map = unsafe { Mmap::map(&file)? };
            // Transfers read sequentially; let the kernel read ahead.
            let _ = map.advise(memmap2::Advice::Sequential);
            Arc::new(FileData::Mapped(MappedFile {
                _guard: guard::register(map.as_ptr(), map.len()),
                map,
                file,
                size: key.size,
                mtime_ns: key.mtime_ns,
                faults_seen: AtomicU64::new(guard::faults()),
                changed: AtomicBool::new(false),
            }))
        };
        if matches!(*data, FileData::Mapped(_)) {
            check_for_rewrites(&data);
        }
        self.entries.insert(key.clone(), data.clone());
        Ok(CachedFile { key, data })
    }

    /// Number of file versions currently cached.
    pub fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn same_version_is_shared_and_a_replaced_file_is_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel");
        std::fs::write(&path, b"version one").unwrap();
        let cache = FileCache::new(1 << 20);
        let a = cache.open(&path).unwrap();
        let b = cache.open(&path).unwrap();
        assert!(Arc::ptr_eq(&a.data, &b.data));
        assert_eq!(&a.data[..], b"version one");

        // Replace by rename, as operators should.
        let tmp = dir.path().join("kernel.new");
        let mut f = File::create(&tmp).unwrap();
        f.write_all(b"version two, longer").unwrap();
        drop(f);
        std::fs::rename(&tmp, &path).unwrap();
        let c = cache.open(&path).unwrap();
        assert_ne!(a.key, c.key);
        assert_eq!(&c.data[..], b"version two, longer");
        // The running transfer still sees its own version, whole.
        assert_eq!(&a.data[..], b"version one");
    }

    #[test]
    fn a_file_truncated_in_place_does_not_crash_and_is_reported_changed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
        let cache = FileCache::new(1 << 20);
        let old = cache.open(&path).unwrap();
        assert!(!old.data.changed());
        // `cp new image` truncates the file it overwrites.
        std::fs::write(&path, b"short").unwrap();
        // Reading past the new end would raise SIGBUS; the guard repairs it.
        let before = guard::faults();
        let tail: u64 = old.data[32 * 1024..].iter().map(|&b| u64::from(b)).sum();
        assert_eq!(tail, 0, "the truncated part reads as zeros");
        assert!(guard::faults() > before);
        // The fault makes the next check immediate.
        assert!(old.data.changed());
        assert_eq!(&cache.open(&path).unwrap().data[..], b"short");
    }

    #[test]
    fn a_file_rewritten_in_place_is_noticed_off_the_reading_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let cache = FileCache::new(1 << 20);
        let old = cache.open(&path).unwrap();
        assert!(!old.data.changed());
        // Same size, new bytes and time: no fault, only the checker sees it.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, vec![2u8; 4096]).unwrap();
        let deadline = std::time::Instant::now() + CHECK_INTERVAL * 8;
        while !old.data.changed() {
            assert!(
                std::time::Instant::now() < deadline,
                "not noticed within {:?}",
                CHECK_INTERVAL * 8
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn empty_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        let cache = FileCache::new(1 << 20);
        assert_eq!(cache.open(&path).unwrap().data.len(), 0);
        assert!(cache.open(dir.path()).is_err());
        assert!(cache.open(&dir.path().join("missing")).is_err());
    }
}
