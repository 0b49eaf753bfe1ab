//! The inventory snapshot in use, with its compiled templates: loaded from
//! the inventory file (reloaded when it changes) or installed from the
//! inventory database, and swapped atomically ([`arc_swap`]) so that
//! readers never wait on a reload. A file that fails to load keeps the last
//! good snapshot.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Guard};
use tracing::info;

use super::render::Templates;
use crate::inventory::{InventoryError, Snapshot};
use crate::proto::Mac;

/// A snapshot with its compiled templates.
pub(super) struct Loaded {
    pub(super) snapshot: Snapshot,
    pub(super) templates: Templates,
    /// Scripts of assigned machines rendered with the built-in template,
    /// by MAC, each with the base URL it was rendered for (they depend on
    /// nothing else in this snapshot).
    pub(super) rendered: Mutex<HashMap<Mac, (String, Vec<u8>)>>,
    /// Modification time and length of the file it came from.
    source: Option<(SystemTime, u64)>,
}

impl Loaded {
    fn new(
        snapshot: Snapshot,
        origin: &Path,
        source: Option<(SystemTime, u64)>,
    ) -> Result<Self, InventoryError> {
        let templates =
            Templates::new(&snapshot.templates).map_err(|e| InventoryError::Syntax {
                path: origin.to_path_buf(),
                message: format!("template: {e}"),
            })?;
        Ok(Self {
            snapshot,
            templates,
            rendered: Mutex::new(HashMap::new()),
            source,
        })
    }
}

/// The snapshot in use and where it comes from.
pub(super) struct CurrentInventory {
    /// The canonical boot directory image paths are checked against.
    root: PathBuf,
    inventory_path: PathBuf,
    current: ArcSwap<Loaded>,
    /// The file version that last failed to load.
    failed_source: Mutex<Option<(SystemTime, u64)>>,
    /// Set once the inventory database is the source: the file is then
    /// no longer watched.
    external_source: AtomicBool,
}

impl CurrentInventory {
    /// An empty inventory read from `inventory_path` once
    /// [`Self::reload_if_changed`] runs.
    pub(super) fn new(root: &Path, inventory_path: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            inventory_path: inventory_path.to_path_buf(),
            current: ArcSwap::from_pointee(Loaded {
                snapshot: Snapshot::default(),
                templates: Templates::new(&BTreeMap::new()).expect("built-in templates compile"),
                rendered: Mutex::new(HashMap::new()),
                source: None,
            }),
            failed_source: Mutex::new(None),
            external_source: AtomicBool::new(false),
        }
    }

    /// Forgets the scripts rendered so far (something every script
    /// carries changed, e.g. the check-in URL).
    pub(super) fn forget_rendered(&self) {
        self.load()
            .rendered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The canonical boot directory.
    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn inventory_path(&self) -> &Path {
        &self.inventory_path
    }

    /// The snapshot in use, for a short read (no reference count touched).
    pub(super) fn load(&self) -> Guard<Arc<Loaded>> {
        self.current.load()
    }

    /// The snapshot in use, held for as long as the caller likes.
    pub(super) fn load_full(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Loads the inventory file again if it changed since the last load (or
    /// `force`); a file that fails to load leaves the current snapshot, and
    /// the same failed version is not tried again until it changes.
    /// Returns whether a new snapshot was installed.
    pub(super) fn reload_if_changed(&self, force: bool) -> Result<bool, InventoryError> {
        if self.external_source.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let source = std::fs::metadata(&self.inventory_path)
            .ok()
            .map(|m| (m.modified().unwrap_or(UNIX_EPOCH), m.len()));
        let mut failed = self.failed_source.lock().unwrap_or_else(|p| p.into_inner());
        if !force
            && (source == self.current.load().source || (source.is_some() && source == *failed))
        {
            return Ok(false);
        }
        let generation = self.current.load().snapshot.generation + 1;
        let built = match source {
            None => Ok(Snapshot {
                generation,
                ..Snapshot::default()
            }),
            Some(_) => Snapshot::load(&self.inventory_path, &self.root, generation),
        }
        .and_then(|snapshot| Loaded::new(snapshot, &self.inventory_path, source));
        let loaded = match built {
            Ok(loaded) => loaded,
            Err(error) => {
                *failed = source;
                return Err(error);
            }
        };
        *failed = None;
        let snapshot = &loaded.snapshot;
        if source.is_some() {
            info!(
                inventory = %self.inventory_path.display(),
                generation,
                images = snapshot.images.len(),
                machines = snapshot.machines.len(),
                unknown_policy = ?snapshot.unknown_policy,
                "inventory loaded"
            );
        } else {
            info!(
                inventory = %self.inventory_path.display(),
                unknown_policy = ?snapshot.unknown_policy,
                "no inventory file: no images or machines yet (write that file, or add them in the panel); every machine is unknown"
            );
        }
        self.current.store(Arc::new(loaded));
        Ok(true)
    }

    /// Installs a snapshot built elsewhere (the inventory database) and
    /// stops watching the inventory file: from now on only further calls
    /// change what is served. Readers switch atomically.
    pub(super) fn install(&self, snapshot: Snapshot) -> Result<(), InventoryError> {
        self.external_source.store(true, Ordering::Relaxed);
        let loaded = Loaded::new(snapshot, Path::new("inventory database"), None)?;
        tracing::debug!(
            generation = loaded.snapshot.generation,
            images = loaded.snapshot.images.len(),
            machines = loaded.snapshot.machines.len(),
            "inventory snapshot installed"
        );
        self.current.store(Arc::new(loaded));
        Ok(())
    }
}

/// A snapshot kept alive for its reader.
pub(super) struct SnapshotGuard(pub(super) Arc<Loaded>);

impl std::ops::Deref for SnapshotGuard {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0.snapshot
    }
}
