//! The lease keeper: the one thread of a DHCP service that talks to the
//! lease table shared with other servers in PostgreSQL
//! ([`crate::store::shared_leases`]), so that no thread answering DHCP
//! ever waits on a database connection. It
//! - claims blocks of the pools ahead of need, and more when a burst uses
//!   them up (at least [`LOW_WATER`] free addresses, or a quarter of what
//!   the server holds, whichever is more, so claims grow with demand);
//! - writes every batch's lease changes (the DHCP thread waits for the
//!   answer, up to `server::dhcp::shared::WRITE_WAIT`), and queues them
//!   while the database is away;
//! - loads another server's lease into this server's table when its
//!   client asks this server for it;
//! - on every (re)connection loads its blocks and writes every lease its
//!   table holds, so whatever was queued or dropped meanwhile is caught up.

use std::net::Ipv4Addr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, info, warn};

use super::Shutdown;
use crate::proto::dhcp::lease::{epoch, Lease, State};
use crate::proto::Mac;
use crate::server::dhcp::service::DhcpService;
use crate::server::dhcp::shared::ShareRequest;
use crate::store::shared_leases::{SharedLeases, BLOCK_SIZE};
use crate::store::StoreError;

/// Fewest free addresses a server keeps in its blocks, per pool.
pub const LOW_WATER: usize = 256;

/// Most blocks claimed in one go.
const MOST_BLOCKS_PER_CLAIM: usize = 64;

/// How often the keeper looks at its free addresses and queued writes
/// when nothing asks it to.
const TICK: Duration = Duration::from_millis(200);

/// How long after a failed connection the next is tried.
const RETRY: Duration = Duration::from_secs(1);

/// Queued lease writes kept while the database is away; the table's own
/// leases are written again on reconnection in any case.
const MOST_QUEUED: usize = 1_000_000;

/// Starts the keeper for `service` (made with
/// [`DhcpService::share_leases`]); the returned receiver hears once the
/// first blocks are held.
pub fn spawn(
    service: Arc<DhcpService>,
    requests: Receiver<ShareRequest>,
    database: SharedLeases,
    shutdown: Shutdown,
) -> std::io::Result<(JoinHandle<()>, Receiver<()>)> {
    let (ready, ready_receiver) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name("bootfleet-leases".into())
        .spawn(move || {
            let mut keeper = Keeper {
                service,
                database,
                queued: Vec::new(),
                last_failure: None,
                failing: false,
                last_look: None,
                ready: Some(ready),
            };
            keeper.run(&requests, &shutdown);
        })?;
    Ok((thread, ready_receiver))
}

struct Keeper {
    service: Arc<DhcpService>,
    database: SharedLeases,
    /// Lease changes not written yet.
    queued: Vec<Lease>,
    last_failure: Option<Instant>,
    /// The last attempt failed (logged once until one succeeds).
    failing: bool,
    /// When the free addresses were last counted.
    last_look: Option<Instant>,
    ready: Option<std::sync::mpsc::SyncSender<()>>,
}

impl Keeper {
    fn run(&mut self, requests: &Receiver<ShareRequest>, shutdown: &Shutdown) {
        let heartbeat = shutdown.heartbeat("bootfleet-leases");
        while !shutdown.is_triggered() {
            heartbeat.beat();
            self.connect_if_due();
            match requests.recv_timeout(TICK) {
                Ok(ShareRequest::Write { leases, done }) => {
                    self.queue(leases);
                    let result = self.flush();
                    if let Some(done) = done {
                        let _ = done.send(result);
                    }
                    // Under steady load the tick never comes: look at the
                    // free addresses between writes too.
                    if self.last_look.is_none_or(|at| at.elapsed() >= TICK) {
                        self.keep_addresses();
                    }
                }
                Ok(ShareRequest::Lookup(ip, mac)) => self.load_lease(ip, mac),
                Ok(ShareRequest::Addresses) => self.keep_addresses(),
                Err(RecvTimeoutError::Timeout) => {
                    if !self.queued.is_empty() {
                        let _ = self.flush();
                    }
                    self.keep_addresses();
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    fn sharing(&self) -> &crate::server::dhcp::shared::LeaseSharing {
        self.service
            .sharing
            .as_ref()
            .expect("the keeper runs only for a service that shares its leases")
    }

    /// Whether the database may be tried now: connected, or the last
    /// failure is [`RETRY`] old.
    fn may_try(&self) -> bool {
        self.database.connected() || self.last_failure.is_none_or(|at| at.elapsed() >= RETRY)
    }

    /// Connected, through [`Self::connect_if_due`] when not: every new
    /// connection loads the blocks and writes every held lease again,
    /// whichever call found the database back.
    fn ensure_connected(&mut self) -> bool {
        if !self.database.connected() {
            self.connect_if_due();
        }
        self.database.connected()
    }

    fn failed(&mut self, what: &str, error: &StoreError) {
        self.database.disconnect();
        self.last_failure = Some(Instant::now());
        self.sharing().set_away(true);
        if !self.failing {
            self.failing = true;
            warn!(%error, queued = self.queued.len(),
                "shared DHCP leases: cannot {what}; answering only for addresses in this server's own blocks, \
                 queueing lease writes, retrying every second");
        } else {
            debug!(%error, "shared DHCP leases: {what} failed again");
        }
    }

    /// On a new connection: this server's blocks, every lease it holds
    /// written, and addresses claimed up to the low-water mark.
    fn connect_if_due(&mut self) {
        if self.database.connected() || !self.may_try() {
            return;
        }
        let blocks = match self.database.owned_blocks() {
            Ok(blocks) => blocks,
            Err(error) => return self.failed("connect", &error),
        };
        let held = {
            let mut state = self.service.state.lock().unwrap_or_else(|p| p.into_inner());
            state.leases.set_blocks(&blocks);
            state.leases.held(SystemTime::now())
        };
        self.save_blocks();
        self.queue(held);
        if self.flush().is_err() {
            return;
        }
        self.keep_addresses();
        if self.failing {
            info!("shared DHCP leases: the database is back; every held lease written again");
            self.failing = false;
        }
        info!(
            server = self.database.server(),
            blocks = blocks.len(),
            "shared DHCP leases: connected"
        );
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(());
        }
    }

    /// Keeps the blocks this server holds in its state directory, for a
    /// start while the database is away (written aside, then renamed).
    fn save_blocks(&self) {
        let Some(file) = self.service.blocks_file() else {
            return;
        };
        let blocks = {
            let state = self.service.state.lock().unwrap_or_else(|p| p.into_inner());
            state.leases.owned_blocks()
        };
        let aside = file.with_extension("json.tmp");
        let written = serde_json::to_vec(&blocks)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&aside, bytes))
            .and_then(|()| std::fs::rename(&aside, &file));
        if let Err(error) = written {
            warn!(file = %file.display(), %error,
                "cannot keep this server's address blocks on disk; a start without the database would hand out no new addresses");
        }
    }

    fn queue(&mut self, leases: Vec<Lease>) {
        self.queued.extend(leases);
        if self.queued.len() > MOST_QUEUED {
            let excess = self.queued.len() - MOST_QUEUED;
            self.queued.drain(..excess);
        }
    }

    /// Writes what is queued; the addresses the table refused (another
    /// machine holds them) are reloaded from it.
    fn flush(&mut self) -> Result<Vec<Ipv4Addr>, ()> {
        if self.queued.is_empty() {
            return Ok(Vec::new());
        }
        if !self.ensure_connected() {
            return Err(());
        }
        match self.database.write(&self.queued, epoch(SystemTime::now())) {
            Ok(refused) => {
                self.queued.clear();
                self.sharing().set_away(false);
                for &ip in &refused {
                    self.reload(ip);
                }
                Ok(refused)
            }
            Err(error) => {
                self.failed("write leases", &error);
                Err(())
            }
        }
    }

    /// Puts the shared table's lease of `ip` into this server's table, so
    /// that it is honoured (the same machine asks) or never offered (it is
    /// another's).
    fn reload(&mut self, ip: Ipv4Addr) {
        match self.database.lease(ip) {
            Ok(Some(lease)) if lease.state == State::Bound || lease.state == State::Declined => {
                let mut state = self.service.state.lock().unwrap_or_else(|p| p.into_inner());
                state.leases.apply(lease);
            }
            Ok(_) => {}
            Err(error) => self.failed("read a lease", &error),
        }
    }

    /// A client asked for `ip`, which this server has no record of.
    fn load_lease(&mut self, ip: Ipv4Addr, mac: Mac) {
        if !self.ensure_connected() {
            return;
        }
        match self.database.lease(ip) {
            Ok(Some(lease))
                if lease.mac == mac
                    && lease.state == State::Bound
                    && lease.expires > epoch(SystemTime::now()) =>
            {
                let mut state = self.service.state.lock().unwrap_or_else(|p| p.into_inner());
                if state
                    .leases
                    .get(ip)
                    .is_none_or(|held| held.mac == mac || held.state != State::Bound)
                {
                    debug!(%ip, %mac, "shared DHCP leases: another server's lease loaded; the client's next REQUEST is answered");
                    state.leases.apply(lease);
                }
            }
            Ok(_) => {}
            Err(error) => self.failed("read a lease", &error),
        }
    }

    /// Claims blocks for every pool whose free addresses fell below the
    /// low-water mark.
    fn keep_addresses(&mut self) {
        if !self.ensure_connected() {
            return;
        }
        self.last_look = Some(Instant::now());
        let pools = {
            let state = self.service.state.lock().unwrap_or_else(|p| p.into_inner());
            state.leases.owned_per_pool(SystemTime::now())
        };
        for (first, last, owned, free) in pools {
            let target = LOW_WATER.max(owned / 4);
            if free >= target {
                continue;
            }
            let blocks = (2 * target - free)
                .div_ceil(BLOCK_SIZE as usize)
                .clamp(1, MOST_BLOCKS_PER_CLAIM);
            match self.database.claim_blocks(first, last, blocks) {
                Ok(claimed) if claimed.is_empty() => {
                    debug!(%first, %last, free, "shared DHCP leases: no unclaimed block left in this pool");
                }
                Ok(claimed) => {
                    debug!(%first, %last, claimed = claimed.len(), free, "shared DHCP leases: blocks claimed");
                    self.service
                        .state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .leases
                        .add_blocks(&claimed);
                    self.save_blocks();
                }
                Err(error) => return self.failed("claim address blocks", &error),
            }
        }
    }
}
