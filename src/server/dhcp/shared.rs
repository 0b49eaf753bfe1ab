//! The DHCP service's side of a lease table shared with other servers
//! (several bootfleet servers on one LAN and one PostgreSQL database).
//!
//! The threads that answer DHCP never talk to the database. They hand
//! what they need to the lease keeper (`engine/dhcp_share.rs`, which
//! holds the connection) as [`ShareRequest`]s on a bounded channel:
//! - every batch's lease changes, written through before the batch's
//!   replies go ([`LeaseSharing::write_through`] waits at most
//!   [`WRITE_WAIT`]); an ACK whose address the shared table refused
//!   (another machine holds it) is not sent;
//! - the shared table's lease of an address a client asks for that this
//!   server has no record of (another server's lease, e.g. after that
//!   server died): the keeper loads it, and the client's next try is
//!   answered;
//! - more blocks of addresses when this server's ran out.
//!
//! While the database does not confirm writes ("away"), a server keeps
//! answering for addresses in its own blocks (no other server hands
//! those out, and its journal keeps them across a restart) and queues the
//! writes; addresses outside its blocks are not confirmed, so not given.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

use super::leases::Lease;
use crate::proto::Mac;

/// Longest a batch's replies wait for the database to confirm its lease
/// writes; past it the database counts as away until a write succeeds.
pub const WRITE_WAIT: Duration = Duration::from_millis(500);

/// Requests waiting for the keeper; past this, requests are dropped (the
/// keeper writes every lease the table holds again when it reconnects).
const QUEUE: usize = 65_536;

/// What the DHCP threads ask of the lease keeper.
#[derive(Debug)]
pub enum ShareRequest {
    /// Lease changes to write; `done` hears the addresses the table
    /// refused, or `Err` when the database could not be written.
    Write {
        leases: Vec<Lease>,
        done: Option<SyncSender<Result<Vec<Ipv4Addr>, ()>>>,
    },
    /// Load the shared table's lease of this address, asked for by this
    /// machine.
    Lookup(Ipv4Addr, Mac),
    /// This server ran out of addresses in its blocks.
    Addresses,
}

/// What the database said about a batch's lease changes.
#[derive(Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// Written, except these addresses (another machine holds them).
    Written(Vec<Ipv4Addr>),
    /// Not confirmed (the database is away or slow): queued.
    Unconfirmed,
}

/// The DHCP service's handle on the lease keeper.
pub struct LeaseSharing {
    requests: SyncSender<ShareRequest>,
    away: AtomicBool,
    /// Requests dropped because the keeper's queue was full.
    pub dropped: AtomicU64,
    /// ACKs not sent because the shared table had the address for another
    /// machine (zero while every server keeps to its own blocks).
    pub refused: AtomicU64,
}

impl LeaseSharing {
    /// The handle, and the receiving end for the keeper.
    pub fn new() -> (Self, Receiver<ShareRequest>) {
        let (requests, receiver) = std::sync::mpsc::sync_channel(QUEUE);
        (
            Self {
                requests,
                away: AtomicBool::new(false),
                dropped: AtomicU64::new(0),
                refused: AtomicU64::new(0),
            },
            receiver,
        )
    }

    /// Whether the database failed to confirm the last write.
    pub fn is_away(&self) -> bool {
        self.away.load(Ordering::Relaxed)
    }

    /// The keeper's verdict after each attempt to write.
    pub fn set_away(&self, away: bool) {
        self.away.store(away, Ordering::Relaxed);
    }

    /// Hands `request` to the keeper without waiting; false when its queue
    /// is full (counted, dropped).
    pub fn ask(&self, request: ShareRequest) -> bool {
        match self.requests.try_send(request) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Writes `leases` through to the shared table, waiting at most
    /// [`WRITE_WAIT`] (not at all while the database is away).
    pub fn write_through(&self, leases: Vec<Lease>) -> Confirmation {
        if leases.is_empty() {
            return Confirmation::Written(Vec::new());
        }
        if self.is_away() {
            self.ask(ShareRequest::Write { leases, done: None });
            return Confirmation::Unconfirmed;
        }
        let (done, result) = std::sync::mpsc::sync_channel(1);
        if !self.ask(ShareRequest::Write {
            leases,
            done: Some(done),
        }) {
            return Confirmation::Unconfirmed;
        }
        match result.recv_timeout(WRITE_WAIT) {
            Ok(Ok(refused)) => Confirmation::Written(refused),
            Ok(Err(())) => Confirmation::Unconfirmed,
            Err(_) => {
                tracing::warn!(
                    wait_ms = WRITE_WAIT.as_millis() as u64,
                    "the shared lease database did not confirm a write in time; \
                     answering only for addresses in this server's own blocks until it does"
                );
                self.set_away(true);
                Confirmation::Unconfirmed
            }
        }
    }
}
