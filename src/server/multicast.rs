//! What the TFTP service hands to RFC 2090 multicast sessions: a read
//! request that asked for the `multicast` option, checked and opened like
//! any other ([`Join`]), and the sessions that take it
//! ([`MulticastSessions`]). The sessions' sockets and their driver are the
//! engine's ([`crate::engine::multicast`]); their protocol core is
//! [`crate::proto::tftp::multicast`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cache::FileData;

/// A read request that asked for multicast.
#[derive(Debug)]
pub struct Join {
    pub name: String,
    pub data: Arc<FileData>,
    pub peer: SocketAddr,
    pub blksize: u16,
    pub windowsize: u16,
    /// Options granted besides `multicast` (blksize, tsize...), for its OACK.
    pub options: Vec<(&'static str, String)>,
}

/// The multicast sessions a read request can join.
pub trait MulticastSessions: Send + Sync {
    /// Adds `join` to its file's session, starting one if needed. Gives the
    /// request back when it cannot be served by multicast (no group free,
    /// no socket): the caller then serves it by unicast.
    fn join(&self, join: Join) -> Result<(), Box<Join>>;
}

/// One RFC 2090 session as the engine drives it, the same contract as a
/// unicast [`crate::server::tftp::Session`]: datagrams and timeouts in,
/// [`GroupSession::poll_transmit`] out, [`GroupSession::poll_timeout`] to
/// wake it. The policy the driver used to apply itself lives here: a file
/// rewritten in place ends the session before another block goes out, and
/// each member that completes or leaves is told to the observers (its boot
/// event).
pub struct GroupSession {
    session: crate::proto::tftp::multicast::Session,
    data: Arc<FileData>,
    name: String,
    group: SocketAddr,
    blksize: u16,
    windowsize: u16,
}

impl GroupSession {
    /// A session for `first`'s file, which `first` joins.
    pub fn new(
        first: Join,
        config: crate::proto::tftp::multicast::SessionConfig,
        now: std::time::Instant,
    ) -> Self {
        let group = config.group;
        let (blksize, windowsize) = (config.blksize, config.windowsize);
        let mut session =
            crate::proto::tftp::multicast::Session::new(first.data.len() as u64, config);
        session.join(first.peer, first.options, now);
        Self {
            session,
            data: first.data,
            name: first.name,
            group,
            blksize,
            windowsize,
        }
    }

    pub fn join(&mut self, join: Join, now: std::time::Instant) {
        self.session.join(join.peer, join.options, now);
    }

    /// The next thing to send; a file changed on disk ends the session
    /// first (an atomic load, see [`FileData::changed`]).
    pub fn poll_transmit(&mut self) -> Option<crate::proto::tftp::multicast::Transmit> {
        if !self.session.is_done() && self.data.changed() {
            tracing::info!(file = %self.name, "file changed on disk during the multicast session; ending it");
            self.session
                .abort("file changed on disk during the transfer; retry");
        }
        self.session.poll_transmit()
    }

    /// DATA block `index`'s payload.
    pub fn block(&self, index: u64) -> &[u8] {
        &self.data[self.session.block_range(index)]
    }

    /// A datagram from a member (its ACKs and ERRORs; anything else is
    /// ignored).
    pub fn handle_datagram(&mut self, from: SocketAddr, datagram: &[u8], now: std::time::Instant) {
        use crate::proto::tftp::packet::Packet;
        match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.session.handle_ack(from, block, now),
            Ok(Packet::Error { .. }) => self.session.handle_error(from, now),
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: std::time::Instant) {
        self.session.handle_timeout(now);
    }

    pub fn poll_timeout(&self) -> Option<std::time::Instant> {
        self.session.poll_timeout()
    }

    pub fn is_done(&self) -> bool {
        self.session.is_done()
    }

    /// Tells `observers` of every member that completed or left since the
    /// last call.
    pub fn report_members(&mut self, observers: &[Arc<dyn crate::boot::hooks::TransferObserver>]) {
        while let Some(outcome) = self.session.poll_outcome() {
            let finished = crate::boot::hooks::FinishedRead {
                name: &self.name,
                peer: outcome.addr,
                bytes: if outcome.completed {
                    self.data.len() as u64
                } else {
                    0
                },
                elapsed: outcome.joined.elapsed(),
                complete: outcome.completed,
                // A member that left or was dropped for silence.
                status: if outcome.completed { 200 } else { 408 },
                blksize: self.blksize,
                windowsize: self.windowsize,
                multicast: Some(crate::boot::hooks::MulticastPart {
                    group: self.group,
                    master_after: outcome.master_after,
                }),
            };
            for observer in observers {
                observer.read_finished(&finished);
            }
        }
    }

    /// The session's counters and its file's block count, for its log line.
    pub fn summary(&self) -> (crate::proto::tftp::multicast::SessionStats, u64) {
        (self.session.stats().clone(), self.session.block_count())
    }
}
