//! One-shot assignments: the ledger of which machines have used theirs,
//! kept in memory for the data plane and in `one-shot.json` in the state
//! directory, written by a thread of its own; and, for each assignment
//! still armed, the address that first asked for its script.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::MAX_SEEN;
use crate::inventory::Machine;
use crate::proto::Mac;

/// The one-shot state of the fleet: what is used up, and who may use up
/// what is still armed.
pub(super) struct OneShots {
    ledger: OneShotLedger,
    /// For each one-shot machine whose assignment is armed, the address
    /// that first asked for its script: only a kernel fetch from there uses
    /// the assignment up when no lease vouches for the address.
    claimants: Mutex<HashMap<Mac, IpAddr>>,
    /// Assignments used up here and not yet shared with the other servers
    /// of the database ([`Self::take_newly_used`]).
    newly_used: Mutex<Vec<(Mac, u64)>>,
}

impl OneShots {
    /// The ledger kept in `state_dir`.
    pub(super) fn open(state_dir: &Path) -> Self {
        Self {
            ledger: OneShotLedger::open(state_dir),
            claimants: Mutex::new(HashMap::new()),
            newly_used: Mutex::new(Vec::new()),
        }
    }

    /// The assignments used up here since the last call, to be shared.
    pub(super) fn take_newly_used(&self) -> Vec<(Mac, u64)> {
        std::mem::take(&mut *self.newly_used.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Puts back what [`Self::take_newly_used`] gave, when it could not be
    /// shared (the database is away): tried again with the next.
    pub(super) fn keep_newly_used(&self, used: Vec<(Mac, u64)>) {
        let mut pending = self.newly_used.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() < MAX_SEEN {
            pending.extend(used);
        }
    }

    /// Assignments other servers used up: marked here too (the later
    /// `rearm` generation wins), so the machine boots locally whichever
    /// server it asks next.
    pub(super) fn merge_used_elsewhere(&self, used: &[(Mac, u64)]) {
        for &(mac, rearm) in used {
            if !self.used(mac, rearm) {
                self.ledger.mark_used(mac, rearm);
            }
        }
    }

    /// Whether `machine` (a one-shot machine at its current `rearm`) has
    /// used its assignment; [`super::policy::decide`] asks this.
    pub(super) fn used(&self, mac: Mac, rearm: u64) -> bool {
        self.ledger.used(mac, rearm)
    }

    /// Notes that `client`, which may act for `machine`, asked for its
    /// script; the first such address of an armed one-shot machine is the
    /// one whose kernel fetch uses the assignment up.
    pub(super) fn script_asked(&self, machine: &Machine, client: IpAddr) {
        if !machine.one_shot || self.used(machine.mac, machine.rearm) {
            return;
        }
        let mut claimants = self.claimants.lock().unwrap_or_else(|p| p.into_inner());
        if claimants.len() >= MAX_SEEN {
            claimants.clear();
        }
        claimants.entry(machine.mac).or_insert(client);
    }

    /// `client` fetched the kernel of `machine`'s one-shot image whole:
    /// the assignment is used up when the address is leased to the machine
    /// (`leased`) or first asked for its script. Returns whether it was.
    pub(super) fn kernel_fetched(&self, machine: &Machine, client: IpAddr, leased: bool) -> bool {
        let mac = machine.mac;
        if !machine.one_shot || self.used(mac, machine.rearm) {
            return false;
        }
        // Without a lease that vouches for the address (ProxyDHCP,
        // another DHCP server), only the address that first asked for
        // the script uses the assignment up.
        let mut claimants = self.claimants.lock().unwrap_or_else(|p| p.into_inner());
        if !leased && claimants.get(&mac) != Some(&client) {
            info!(%mac, %client, first = ?claimants.get(&mac),
                "kernel fetched by an address that did not first ask for this one-shot machine's script; assignment kept");
            return false;
        }
        claimants.remove(&mac);
        drop(claimants);
        self.ledger.mark_used(mac, machine.rearm);
        self.keep_newly_used(vec![(mac, machine.rearm)]);
        true
    }

    /// Waits until the assignments used so far are on disk.
    pub(super) fn sync(&self) {
        self.ledger.sync();
    }
}

/// Which machines have used their one-shot assignment (MAC → the `rearm`
/// generation used), kept in memory and in `one-shot.json` in the state
/// directory.
///
/// The data plane only updates the map: the file is written (to a
/// temporary file, synced, renamed, the directory synced) by a thread of
/// its own, so a storm of one-shot installs never waits on a disk sync on
/// an engine worker. Marks that arrive while a write is under way are
/// written together next. Dropping the ledger writes what is pending.
pub(super) struct OneShotLedger {
    used: Arc<Mutex<BTreeMap<Mac, u64>>>,
    writer: Option<LedgerWriter>,
}

/// The ledger's writer thread and what it has written.
struct LedgerWriter {
    progress: Arc<(Mutex<LedgerProgress>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct LedgerProgress {
    /// Marks made so far, and how many of them are on disk.
    marked: u64,
    written: u64,
    stop: bool,
}

impl OneShotLedger {
    pub(super) fn open(state_dir: &Path) -> Self {
        let path = state_dir.join("one-shot.json");
        let used = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<BTreeMap<String, u64>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(mac, rearm)| Some((Mac::parse(&mac).ok()?, rearm)))
            .collect();
        let used = Arc::new(Mutex::new(used));
        let writable = std::fs::create_dir_all(state_dir).is_ok();
        if !writable {
            warn!(dir = %state_dir.display(), "state directory cannot be created; one-shot assignments will not survive a restart");
        }
        let writer = writable
            .then(|| LedgerWriter::start(path, Arc::clone(&used)))
            .transpose()
            .unwrap_or_else(|error| {
                warn!(%error, "cannot start the one-shot ledger's writer; one-shot assignments will not survive a restart");
                None
            });
        Self { used, writer }
    }

    pub(super) fn used(&self, mac: Mac, rearm: u64) -> bool {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        used.get(&mac)
            .is_some_and(|&generation| generation >= rearm)
    }

    pub(super) fn mark_used(&self, mac: Mac, rearm: u64) {
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(mac, rearm);
        if let Some(writer) = &self.writer {
            writer.marked();
        }
    }

    /// Waits until every mark made so far is on disk (or failed to be).
    pub(super) fn sync(&self) {
        if let Some(writer) = &self.writer {
            writer.sync();
        }
    }
}

impl LedgerWriter {
    fn start(path: PathBuf, used: Arc<Mutex<BTreeMap<Mac, u64>>>) -> std::io::Result<Self> {
        let progress = Arc::new((
            Mutex::new(LedgerProgress::default()),
            std::sync::Condvar::new(),
        ));
        let shared = Arc::clone(&progress);
        let thread = std::thread::Builder::new()
            .name("bootfleet-ledger".into())
            .spawn(move || {
                let (state, changed) = &*shared;
                loop {
                    let target = {
                        let mut progress = state.lock().unwrap_or_else(|p| p.into_inner());
                        while progress.marked == progress.written && !progress.stop {
                            progress = changed.wait(progress).unwrap_or_else(|p| p.into_inner());
                        }
                        if progress.marked == progress.written {
                            return; // stopping, nothing pending
                        }
                        progress.marked
                    };
                    write_ledger(&path, &used);
                    let mut progress = state.lock().unwrap_or_else(|p| p.into_inner());
                    progress.written = target;
                    changed.notify_all();
                }
            })?;
        Ok(Self {
            progress,
            thread: Some(thread),
        })
    }

    fn marked(&self) {
        let (state, changed) = &*self.progress;
        state.lock().unwrap_or_else(|p| p.into_inner()).marked += 1;
        changed.notify_all();
    }

    fn sync(&self) {
        let (state, changed) = &*self.progress;
        let mut progress = state.lock().unwrap_or_else(|p| p.into_inner());
        let target = progress.marked;
        while progress.written < target {
            progress = changed.wait(progress).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for LedgerWriter {
    fn drop(&mut self) {
        let (state, changed) = &*self.progress;
        state.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes the ledger to `path` durably: a temporary file, synced, renamed
/// over the old one, and the directory synced.
fn write_ledger(path: &Path, used: &Mutex<BTreeMap<Mac, u64>>) {
    let as_text: BTreeMap<String, u64> = used
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(m, r)| (m.to_string(), *r))
        .collect();
    let tmp = path.with_extension("json.tmp");
    let result = serde_json::to_vec_pretty(&as_text)
        .map_err(std::io::Error::other)
        .and_then(|bytes| {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| crate::durable::sync_parent_dir(path));
    if let Err(error) = result {
        warn!(file = %path.display(), %error, "cannot save one-shot state; it holds until restart");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    #[test]
    fn the_one_shot_ledger_writes_on_its_own_thread_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = OneShotLedger::open(dir.path());
        ledger.mark_used(MAC, 3);
        ledger.sync();
        let written = std::fs::read_to_string(dir.path().join("one-shot.json")).unwrap();
        assert!(written.contains(&MAC.to_string()), "{written}");
        // A mark not yet synced is written when the ledger is dropped.
        ledger.mark_used(MAC, 4);
        drop(ledger);
        let again = OneShotLedger::open(dir.path());
        assert!(again.used(MAC, 4));
        assert!(!again.used(MAC, 5));
    }
}
