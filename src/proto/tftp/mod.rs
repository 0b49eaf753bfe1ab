//! TFTP as a sans-I/O core: reads, writes (uploads) and RFC 2090 multicast.
//!
//! * [`packet`] — the wire codec (RFC 1350 §5, RFC 2347 OACK), borrowing on
//!   decode and appending on encode.
//! * [`options`] — option negotiation: RFC 2347 (framework), RFC 2348
//!   (blksize), RFC 2349 (timeout, tsize), RFC 7440 (windowsize).
//! * [`transfer`] — one read transfer as a state machine (RFC 1350 §4
//!   lock-step, RFC 7440 windows, retransmission with back-off).
//! * [`write`](mod@write) — one write transfer (upload), lock-step, committed by the
//!   driver before the final ACK.
//! * [`Transfer`] — either of them, as the engines drive it.
//! * [`netascii`] — the RFC 1350 / RFC 764 netascii transform.
//!
//! * [`multicast`] — RFC 2090: one session that many clients join, the
//!   master client pacing it, the others listening; driven by
//!   [`crate::engine::multicast`] when `tftp.multicast_groups` is set.

pub mod multicast;
pub mod netascii;
pub mod options;
pub mod packet;
pub mod transfer;
pub mod write;

pub use options::{negotiate, Negotiated, NegotiationLimits};
pub use packet::{ErrorCode, Mode, Packet, PacketError, Request};
pub use transfer::{Outcome, ReadTransfer, TransferConfig, Transmit};
pub use write::{CommitError, WriteTransfer};

use std::ops::Range;
use std::time::Instant;

/// A transfer of either direction. Engines drive it without caring which:
/// send what [`poll_transmit`](Self::poll_transmit) gives, feed datagrams and
/// timeouts, stop at [`outcome`](Self::outcome).
#[derive(Debug)]
pub enum Transfer {
    Read(ReadTransfer),
    Write(WriteTransfer),
}

impl Transfer {
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        match self {
            Transfer::Read(t) => t.poll_transmit(),
            Transfer::Write(t) => t.poll_transmit(),
        }
    }

    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) {
        match self {
            Transfer::Read(t) => t.handle_datagram(datagram, now),
            Transfer::Write(t) => t.handle_datagram(datagram, now),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self {
            Transfer::Read(t) => t.handle_timeout(now),
            Transfer::Write(t) => t.handle_timeout(now),
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Transfer::Read(t) => t.poll_timeout(),
            Transfer::Write(t) => t.poll_timeout(),
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        match self {
            Transfer::Read(t) => t.outcome(),
            Transfer::Write(t) => t.outcome(),
        }
    }

    pub fn blksize(&self) -> u16 {
        match self {
            Transfer::Read(t) => t.blksize(),
            Transfer::Write(t) => t.blksize(),
        }
    }

    /// Byte range of the file in read block `index`; empty for uploads,
    /// which never produce [`Transmit::Window`].
    pub fn block_range(&self, index: u64) -> Range<usize> {
        match self {
            Transfer::Read(t) => t.block_range(index),
            Transfer::Write(_) => 0..0,
        }
    }

    /// Whether the client acknowledged or sent anything yet.
    pub fn progressed(&self) -> bool {
        match self {
            Transfer::Read(t) => t.progressed(),
            Transfer::Write(t) => t.progressed(),
        }
    }

    pub fn retransmitted_blocks(&self) -> u64 {
        match self {
            Transfer::Read(t) => t.retransmitted_blocks(),
            Transfer::Write(_) => 0,
        }
    }
}
