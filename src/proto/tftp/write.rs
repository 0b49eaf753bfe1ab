//! One TFTP write transfer (an upload) as a sans-I/O state machine.
//!
//! RFC 1350 §4 lock-step in the other direction: the server acknowledges
//! each DATA block; a repeated block (our ACK was lost) is acknowledged
//! again; the retransmission timer repeats our last ACK. RFC 7440 windows are
//! not offered for uploads (the option is simply not acknowledged).
//!
//! The machine collects the bytes in memory, bounded by a size limit. When the
//! last block arrives it stops and waits for the driver to store the file
//! ([`WriteTransfer::take_upload`], then [`WriteTransfer::commit`]): only
//! then is the final ACK sent, so a full disk is reported to the client as
//! ERROR 3 instead of being acknowledged as a success. After the final ACK
//! the transfer dallies for one timeout interval to acknowledge a repeated
//! last block, as RFC 1350 §6 recommends.

use std::time::{Duration, Instant};

use super::options::Negotiated;
use super::packet::{self, ErrorCode, Packet};
use super::transfer::{Backoff, Outcome, Retry, TransferConfig, Transmit};

/// Why storing an upload failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitError {
    /// ENOSPC or a quota: RFC 1350 error 3.
    DiskFull,
    /// Permission denied: error 2.
    AccessViolation,
    /// Anything else: error 0.
    Other,
}

#[derive(Debug)]
enum State {
    Receiving,
    /// The last block arrived; the driver must store the bytes.
    AwaitingCommit {
        last: u64,
    },
    /// Final ACK sent; acknowledging a repeated last block until `until`.
    Dallying {
        last: u64,
        until: Instant,
    },
    Done(Outcome),
}

/// An upload in progress.
#[derive(Debug)]
pub struct WriteTransfer {
    state: State,
    blksize: usize,
    /// Next block index expected (1-based).
    next: u64,
    data: Vec<u8>,
    /// Bytes received in order, kept after the data is handed over.
    received: u64,
    max_bytes: u64,
    backoff: Backoff,
    deadline: Instant,
    /// What we said last (OACK or ACK), repeated on timeout.
    last_sent: Vec<u8>,
    pending: Option<Transmit>,
}

impl WriteTransfer {
    /// Starts an upload of at most `max_bytes`. The first transmit is the
    /// OACK when options were acknowledged, else ACK 0.
    pub fn new(
        negotiated: &Negotiated,
        max_bytes: u64,
        config: TransferConfig,
        now: Instant,
    ) -> Self {
        let backoff = Backoff::new(negotiated.timeout, config);
        let mut first = Vec::with_capacity(32);
        if negotiated.oack.is_empty() {
            packet::encode_ack(0, &mut first);
        } else {
            packet::encode_oack(&negotiated.oack, &mut first);
        }
        Self {
            state: State::Receiving,
            blksize: usize::from(negotiated.blksize.max(1)),
            next: 1,
            data: Vec::new(),
            received: 0,
            max_bytes,
            deadline: now + backoff.base(),
            backoff,
            pending: Some(Transmit::Control(first.clone())),
            last_sent: first,
        }
    }

    pub fn blksize(&self) -> u16 {
        self.blksize as u16
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.pending.take()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due. While the driver
    /// stores the file there is no deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Receiving => Some(self.deadline),
            State::Dallying { until, .. } => Some(until),
            State::AwaitingCommit { .. } | State::Done(_) => None,
        }
    }

    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            State::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Whether the client sent any DATA yet.
    pub fn progressed(&self) -> bool {
        self.next > 1
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The complete upload, once the last block arrived; the driver stores
    /// it and then calls [`commit`](Self::commit). Returns `None` otherwise.
    pub fn take_upload(&mut self) -> Option<Vec<u8>> {
        match self.state {
            State::AwaitingCommit { .. } => Some(std::mem::take(&mut self.data)),
            _ => None,
        }
    }

    /// The driver stored the upload (or could not).
    pub fn commit(&mut self, result: Result<(), CommitError>, now: Instant) {
        let State::AwaitingCommit { last } = self.state else {
            return;
        };
        match result {
            Ok(()) => {
                self.send_ack(last);
                self.state = State::Dallying {
                    last,
                    until: now + self.backoff.base().max(Duration::from_millis(100)),
                };
            }
            Err(error) => {
                let (code, message) = match error {
                    CommitError::DiskFull => (ErrorCode::DiskFull, "disk full or quota exceeded"),
                    CommitError::AccessViolation => {
                        (ErrorCode::AccessViolation, "cannot write the file")
                    }
                    CommitError::Other => (ErrorCode::NotDefined, "cannot store the file"),
                };
                self.fail(
                    code,
                    message,
                    Outcome::ProtocolViolation("upload could not be stored"),
                );
            }
        }
    }

    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) {
        let Ok(packet) = Packet::parse(datagram) else {
            return; // dropped; the timer recovers
        };
        match (&self.state, packet) {
            (State::Done(_), _) => {}
            (_, Packet::Error { code, message }) => {
                self.pending = None;
                self.state = State::Done(Outcome::ClientError {
                    code,
                    message: message.chars().take(200).collect(),
                });
            }
            (State::Receiving, Packet::Data { block, payload }) => {
                if block == wire(self.next) {
                    if self.data.len() as u64 + payload.len() as u64 > self.max_bytes {
                        self.fail(
                            ErrorCode::DiskFull,
                            "upload exceeds the size limit",
                            Outcome::ProtocolViolation("upload too large"),
                        );
                        return;
                    }
                    self.data.extend_from_slice(payload);
                    self.received += payload.len() as u64;
                    let index = self.next;
                    self.next += 1;
                    self.backoff.progress();
                    if payload.len() < self.blksize {
                        self.state = State::AwaitingCommit { last: index };
                    } else {
                        self.send_ack(index);
                        self.deadline = now + self.backoff.base();
                    }
                } else if block == wire(self.next - 1) {
                    // Our ACK was lost: acknowledge again (one ACK per DATA,
                    // so no Sorcerer's Apprentice).
                    self.pending = Some(Transmit::Control(self.last_sent.clone()));
                }
            }
            (State::Dallying { last, .. }, Packet::Data { block, .. }) if block == wire(*last) => {
                self.pending = Some(Transmit::Control(self.last_sent.clone()));
            }
            (State::AwaitingCommit { .. } | State::Dallying { .. }, Packet::Data { .. }) => {}
            (_, _) => self.fail(
                ErrorCode::IllegalOperation,
                "only DATA or ERROR may be sent to a write transfer",
                Outcome::ProtocolViolation("unexpected packet on a write transfer"),
            ),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Dallying { until, .. } if now >= until => {
                self.state = State::Done(Outcome::Complete);
            }
            State::Receiving if now >= self.deadline => match self.backoff.expired() {
                Retry::After(interval) => {
                    self.pending = Some(Transmit::Control(self.last_sent.clone()));
                    self.deadline = now + interval;
                }
                Retry::GiveUp(error) => {
                    self.pending = Some(Transmit::Control(error));
                    self.state = State::Done(Outcome::TimedOut);
                }
            },
            _ => {}
        }
    }

    fn send_ack(&mut self, index: u64) {
        self.last_sent.clear();
        packet::encode_ack(wire(index), &mut self.last_sent);
        self.pending = Some(Transmit::Control(self.last_sent.clone()));
    }

    fn fail(&mut self, code: ErrorCode, message: &str, outcome: Outcome) {
        let mut error = Vec::new();
        packet::encode_error(code, message, &mut error);
        self.pending = Some(Transmit::Control(error));
        self.data = Vec::new();
        self.state = State::Done(outcome);
    }
}

fn wire(index: u64) -> u16 {
    (index & 0xFFFF) as u16
}

#[cfg(test)]
mod tests {
    use super::super::options::{negotiate, NegotiationLimits};
    use super::*;

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        packet::encode_data(block, payload, &mut out);
        out
    }

    fn control(t: &mut WriteTransfer) -> Vec<u8> {
        match t.poll_transmit() {
            Some(Transmit::Control(bytes)) => bytes,
            other => panic!("expected a control packet, got {other:?}"),
        }
    }

    fn start(options: &[(&str, &str)], max: u64, now: Instant) -> WriteTransfer {
        let n = negotiate(options, 0, NegotiationLimits::default());
        WriteTransfer::new(&n, max, TransferConfig::default(), now)
    }

    #[test]
    fn upload_is_acknowledged_block_by_block_and_committed_before_the_last_ack() {
        let now = Instant::now();
        let mut t = start(&[], 10_000, now);
        assert_eq!(control(&mut t), b"\x00\x04\x00\x00");
        t.handle_datagram(&data(1, &[7; 512]), now);
        assert_eq!(control(&mut t), b"\x00\x04\x00\x01");
        // Our ACK 1 was lost: the client repeats DATA 1, we repeat ACK 1.
        t.handle_datagram(&data(1, &[7; 512]), now);
        assert_eq!(control(&mut t), b"\x00\x04\x00\x01");
        t.handle_datagram(&data(2, b"end"), now);
        assert_eq!(
            t.poll_transmit(),
            None,
            "no final ACK before the file is stored"
        );
        assert_eq!(t.poll_timeout(), None);
        let upload = t.take_upload().unwrap();
        assert_eq!(upload.len(), 515);
        t.commit(Ok(()), now);
        assert_eq!(control(&mut t), b"\x00\x04\x00\x02");
        // Dallying: a repeated last block is acknowledged again.
        t.handle_datagram(&data(2, b"end"), now);
        assert_eq!(control(&mut t), b"\x00\x04\x00\x02");
        let until = t.poll_timeout().unwrap();
        t.handle_timeout(until);
        assert_eq!(t.outcome(), Some(&Outcome::Complete));
    }

    #[test]
    fn full_disk_is_reported_as_error_3() {
        let now = Instant::now();
        let mut t = start(&[("blksize", "1000"), ("tsize", "5")], 10_000, now);
        assert_eq!(&control(&mut t)[..2], b"\x00\x06");
        t.handle_datagram(&data(1, b"hello"), now);
        t.take_upload().unwrap();
        t.commit(Err(CommitError::DiskFull), now);
        assert_eq!(&control(&mut t)[..4], b"\x00\x05\x00\x03");
        assert!(t.outcome().is_some());
    }

    #[test]
    fn size_limit_and_timeouts() {
        let now = Instant::now();
        let mut t = start(&[], 600, now);
        control(&mut t);
        t.handle_datagram(&data(1, &[0; 512]), now);
        control(&mut t);
        t.handle_datagram(&data(2, &[0; 512]), now);
        assert_eq!(&control(&mut t)[..4], b"\x00\x05\x00\x03");

        let mut t = start(&[], 600, now);
        control(&mut t);
        for _ in 0..5 {
            let at = t.poll_timeout().unwrap();
            t.handle_timeout(at);
            assert_eq!(control(&mut t), b"\x00\x04\x00\x00");
        }
        let at = t.poll_timeout().unwrap();
        t.handle_timeout(at);
        assert_eq!(&control(&mut t)[..2], b"\x00\x05");
        assert_eq!(t.outcome(), Some(&Outcome::TimedOut));
    }

    #[test]
    fn stray_packets() {
        let now = Instant::now();
        let mut t = start(&[], 600, now);
        control(&mut t);
        t.handle_datagram(&data(5, b"far ahead"), now);
        t.handle_datagram(b"\x00", now);
        assert_eq!(t.poll_transmit(), None);
        t.handle_datagram(b"\x00\x04\x00\x00", now);
        assert_eq!(&control(&mut t)[..4], b"\x00\x05\x00\x04");
    }
}
