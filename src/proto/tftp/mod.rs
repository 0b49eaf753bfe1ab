//! TFTP, read side, as a sans-I/O core.
//!
//! * [`packet`] — the wire codec (RFC 1350 §5, RFC 2347 OACK), borrowing on
//!   decode and appending on encode.
//! * [`options`] — option negotiation: RFC 2347 (framework), RFC 2348
//!   (blksize), RFC 2349 (timeout, tsize), RFC 7440 (windowsize).
//! * [`transfer`] — one read transfer as a state machine (RFC 1350 §4
//!   lock-step, RFC 7440 windows, retransmission with back-off).
//! * [`netascii`] — the RFC 1350 / RFC 764 netascii transform.
//!
//! Multicast (RFC 2090) will be a sibling of [`transfer`]: a session that many
//! clients join; the request parser already hands unknown options through so
//! that the negotiation can learn `multicast` without touching the codec.

pub mod netascii;
pub mod options;
pub mod packet;
pub mod transfer;

pub use options::{negotiate, Negotiated, NegotiationLimits};
pub use packet::{ErrorCode, Mode, Packet, PacketError, Request};
pub use transfer::{Outcome, ReadTransfer, TransferConfig, Transmit};
