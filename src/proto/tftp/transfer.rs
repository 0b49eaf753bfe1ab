//! One TFTP read transfer as a sans-I/O state machine.
//!
//! RFC 1350 §4 lock-step, generalised to RFC 7440 windows (lock-step is a
//! window of one): the server sends a window of blocks, then waits for the
//! client's ACK. An ACK that advances moves the window to the block after it
//! (so an ACK inside the window, which a client sends when it saw a gap,
//! restarts from the gap); an ACK that does not advance is ignored, which is
//! what prevents the Sorcerer's Apprentice syndrome (RFC 1123 §4.2.3.1): only
//! the timer retransmits. Retransmissions back off exponentially and the
//! transfer gives up after a bounded number of them.
//!
//! Block numbers on the wire are 16 bits and roll over from 65535 to 0 (as
//! tftp-hpa, dnsmasq, iPXE and curl do); internally blocks are counted with
//! 64-bit indices, so files of any size work.
//!
//! The machine owns no bytes of the file. [`Transmit::Window`] names block
//! indices; the driver turns each into [`data_header`] plus a slice of the
//! cached file ([`ReadTransfer::block_range`]) and sends them without copying.
//! A netascii read ([`ReadTransfer::new_netascii`]) is the exception: its
//! blocks are converted here as each window goes out, and handed over as
//! ready datagrams ([`Transmit::Control`]), one window's worth at a time.
//!
//! How a driver uses it:
//! ```text
//! let mut t = ReadTransfer::new(negotiated, file_len, config, now);
//! loop {
//!     while let Some(tx) = t.poll_transmit() { send(tx) }
//!     if let Some(outcome) = t.outcome() { break }
//!     wait for a datagram (t.handle_datagram(bytes, now))
//!       or for t.poll_timeout() (t.handle_timeout(now))
//! }
//! ```

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::netascii::{self, NetasciiBlocks};
use super::options::Negotiated;
use super::packet::{self, ErrorCode, Packet};

pub use super::packet::data_header;

/// Retransmission policy of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferConfig {
    /// First retransmission interval when the client did not ask for one.
    pub initial_timeout: Duration,
    /// Upper bound of the backed-off interval.
    pub max_timeout: Duration,
    /// Retransmissions without progress before the transfer is given up.
    pub max_retries: u32,
}

impl Default for TransferConfig {
    fn default() -> Self {
        Self {
            initial_timeout: Duration::from_millis(1000),
            max_timeout: Duration::from_secs(5),
            max_retries: 5,
        }
    }
}

/// Retransmission timing, shared by read and write transfers: the first
/// interval, exponential back-off up to a ceiling, and a retry budget that
/// progress restores.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    ceiling: Duration,
    max_retries: u32,
    retries: u32,
}

/// What to do when a retransmission deadline passed without progress.
pub(crate) enum Retry {
    /// Retransmit, and wait this long for progress.
    After(Duration),
    /// The budget is spent: send this ERROR and end the transfer.
    GiveUp(Vec<u8>),
}

impl Backoff {
    /// RFC 2349's `timeout` is the longest the client wants us to wait before
    /// retransmitting. Waiting less than that is harmless (repeats are
    /// expected), and a boot LAN recovers from loss much faster with the
    /// operator's shorter interval; clients asking 6 s (curl) would otherwise
    /// pay 6 s per lost packet. The client's value raises the ceiling.
    pub(crate) fn new(asked: Option<Duration>, config: TransferConfig) -> Self {
        let base = asked.map_or(config.initial_timeout, |asked| {
            asked.min(config.initial_timeout)
        });
        Self {
            base,
            ceiling: config.max_timeout.max(asked.unwrap_or_default()).max(base),
            max_retries: config.max_retries,
            retries: 0,
        }
    }

    /// The interval after a packet that made progress.
    pub(crate) fn base(&self) -> Duration {
        self.base
    }

    /// The peer made progress: the retry budget is whole again.
    pub(crate) fn progress(&mut self) {
        self.retries = 0;
    }

    /// A deadline passed without progress.
    pub(crate) fn expired(&mut self) -> Retry {
        if self.retries >= self.max_retries {
            let mut error = Vec::new();
            packet::encode_error(ErrorCode::NotDefined, "transfer timed out", &mut error);
            return Retry::GiveUp(error);
        }
        self.retries += 1;
        let factor = 1u32 << self.retries.min(16);
        Retry::After(self.base.saturating_mul(factor).min(self.ceiling))
    }
}

/// Something the driver must send to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// A complete control datagram: OACK, or the ERROR that ends a transfer.
    Control(Vec<u8>),
    /// DATA blocks `first ..first + count` (1-based block indices).
    Window { first: u64, count: u32 },
}

/// How a transfer ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The client acknowledged the last block.
    Complete,
    /// The client sent an ERROR (code and message as sent).
    ClientError { code: u16, message: String },
    /// The client answered the OACK with an ERROR (RFC 2347 §2): it
    /// declined the options, or, as UEFI firmware does before every
    /// download, asked only for `tsize` to learn the file's size. Not a
    /// failure; the real download follows as a new request.
    OptionsDeclined { code: u16 },
    /// No progress after the retry budget.
    TimedOut,
    /// The client broke the protocol; an ERROR was sent to it.
    ProtocolViolation(&'static str),
    /// The driver ended the transfer (e.g. its file changed); an ERROR was sent.
    Aborted(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// OACK sent; waiting for ACK 0 (RFC 2347 §2).
    AwaitingOackAck {
        oack: Vec<u8>,
    },
    /// Sending windows; all blocks up to `acked` are confirmed.
    Sending,
    Done(Outcome),
}

/// A read transfer.
#[derive(Debug, Clone)]
pub struct ReadTransfer {
    state: State,
    len: u64,
    blksize: u64,
    windowsize: u64,
    /// Index of the last block: the one shorter than `blksize` (possibly empty).
    last_block: u64,
    /// Highest block index the client acknowledged (0: none yet).
    acked: u64,
    /// Highest block index sent in the current window.
    sent_upto: u64,
    backoff: Backoff,
    deadline: Instant,
    pending: Option<Transmit>,
    /// Blocks sent again after a timeout or a gap, for statistics.
    retransmitted_blocks: u64,
    /// An ACK of the client moved the transfer forward at least once.
    client_acked: bool,
    /// A netascii read: its windows are converted here, block by block, and
    /// go out as ready datagrams instead of [`Transmit::Window`] slices.
    netascii: Option<Netascii>,
}

/// The conversion state of a netascii read, and the DATA datagrams of the
/// window being handed to the driver.
#[derive(Debug, Clone)]
struct Netascii {
    blocks: NetasciiBlocks,
    ready: VecDeque<Vec<u8>>,
}

impl ReadTransfer {
    /// Starts a transfer of `len` bytes with the negotiated parameters. The
    /// first transmit is the OACK when options were acknowledged, else DATA 1.
    pub fn new(negotiated: &Negotiated, len: u64, config: TransferConfig, now: Instant) -> Self {
        Self::starting(negotiated, len, None, config, now)
    }

    /// Starts a netascii read of `source` (RFC 1350: CR LF line ends, CR
    /// NUL for a bare CR). Blocks are converted as they go out; the end is
    /// found when a converted block comes out short. `negotiated` must not
    /// carry `tsize`: the converted length is not known in advance.
    pub fn new_netascii(
        negotiated: &Negotiated,
        source: netascii::Source,
        config: TransferConfig,
        now: Instant,
    ) -> Self {
        let text = Netascii {
            blocks: NetasciiBlocks::new(source, negotiated.windowsize),
            ready: VecDeque::new(),
        };
        // The length is unknown until the last block is converted.
        Self::starting(negotiated, u64::MAX / 2, Some(text), config, now)
    }

    fn starting(
        negotiated: &Negotiated,
        len: u64,
        netascii: Option<Netascii>,
        config: TransferConfig,
        now: Instant,
    ) -> Self {
        let blksize = u64::from(negotiated.blksize.max(1));
        let backoff = Backoff::new(negotiated.timeout, config);
        let mut transfer = Self {
            state: State::Sending,
            len,
            blksize,
            windowsize: u64::from(negotiated.windowsize.max(1)),
            last_block: len / blksize + 1,
            acked: 0,
            sent_upto: 0,
            deadline: now + backoff.base(),
            backoff,
            pending: None,
            retransmitted_blocks: 0,
            client_acked: false,
            netascii,
        };
        transfer.start(negotiated, now);
        transfer
    }

    /// The first transmit: the OACK when options were acknowledged, else
    /// the first window.
    fn start(&mut self, negotiated: &Negotiated, now: Instant) {
        let transfer = self;
        if negotiated.oack.is_empty() {
            transfer.send_window_from(1, now);
        } else {
            let mut oack = Vec::with_capacity(64);
            packet::encode_oack(&negotiated.oack, &mut oack);
            transfer.pending = Some(Transmit::Control(oack.clone()));
            transfer.state = State::AwaitingOackAck { oack };
        }
    }

    /// Block size of this transfer.
    pub fn blksize(&self) -> u16 {
        self.blksize as u16
    }

    /// Blocks sent before waiting for an ACK (RFC 7440; 1 is lock-step).
    pub fn windowsize(&self) -> u16 {
        self.windowsize as u16
    }

    /// Number of DATA blocks the whole file takes.
    pub fn block_count(&self) -> u64 {
        self.last_block
    }

    /// Whether the client acknowledged anything yet (the OACK or a block):
    /// after that, a new request from its port is a new transfer, not a
    /// retransmitted request.
    pub fn progressed(&self) -> bool {
        self.client_acked
    }

    /// Blocks sent more than once so far.
    pub fn retransmitted_blocks(&self) -> u64 {
        self.retransmitted_blocks
    }

    /// The wire block number of block index `index`.
    pub fn wire_block(index: u64) -> u16 {
        (index & 0xFFFF) as u16
    }

    /// Byte range of the file carried by block `index` (1-based).
    pub fn block_range(&self, index: u64) -> Range<usize> {
        let start = (index.saturating_sub(1) * self.blksize).min(self.len);
        let end = (start + self.blksize).min(self.len);
        start as usize..end as usize
    }

    /// The next datagram(s) to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let Some(text) = &mut self.netascii else {
            return self.pending.take();
        };
        if let Some(datagram) = text.ready.pop_front() {
            return Some(Transmit::Control(datagram));
        }
        let (first, count) = match self.pending.take()? {
            Transmit::Window { first, count } => (first, count),
            control => return Some(control),
        };
        for index in first..first + u64::from(count) {
            let mut datagram = Vec::with_capacity(self.blksize as usize + packet::DATA_HEADER_LEN);
            datagram.extend_from_slice(&packet::data_header(Self::wire_block(index)));
            let Some(last) = text
                .blocks
                .block(index, self.blksize as usize, &mut datagram)
            else {
                // Never asked for: windows start right after the last ACK.
                break;
            };
            text.ready.push_back(datagram);
            if last {
                self.last_block = index;
                self.sent_upto = self.sent_upto.min(index);
                break;
            }
        }
        text.ready.pop_front().map(Transmit::Control)
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due; `None` once done.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Done(_) => None,
            _ => Some(self.deadline),
        }
    }

    /// How the transfer ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.state {
            State::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Feeds one datagram received on this transfer's port.
    pub fn handle_datagram(&mut self, datagram: &[u8], now: Instant) {
        if matches!(self.state, State::Done(_)) {
            return;
        }
        match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.handle_ack(block, now),
            Ok(Packet::Error { code, message }) => {
                self.pending = None;
                self.state = State::Done(if matches!(self.state, State::AwaitingOackAck { .. }) {
                    Outcome::OptionsDeclined { code }
                } else {
                    Outcome::ClientError {
                        code,
                        message: message.chars().take(200).collect(),
                    }
                });
            }
            Ok(_) => self.violation("only ACK or ERROR may be sent to a read transfer"),
            // A malformed datagram is dropped: it may be a corrupted ACK, and
            // the retransmission timer recovers from that.
            Err(_) => {}
        }
    }

    /// Called when [`poll_timeout`](Self::poll_timeout) has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.state, State::Done(_)) || now < self.deadline {
            return;
        }
        let interval = match self.backoff.expired() {
            Retry::After(interval) => interval,
            Retry::GiveUp(error) => {
                self.pending = Some(Transmit::Control(error));
                self.state = State::Done(Outcome::TimedOut);
                return;
            }
        };
        match &self.state {
            State::AwaitingOackAck { oack } => {
                self.pending = Some(Transmit::Control(oack.clone()));
            }
            State::Sending => {
                let first = self.acked + 1;
                self.retransmitted_blocks += self.sent_upto.saturating_sub(self.acked);
                self.pending = Some(self.window_from(first));
            }
            State::Done(_) => {}
        }
        self.deadline = now + interval;
    }

    fn handle_ack(&mut self, block: u16, now: Instant) {
        match self.state {
            State::AwaitingOackAck { .. } => {
                if block == 0 {
                    self.state = State::Sending;
                    self.client_acked = true;
                    self.backoff.progress();
                    self.send_window_from(1, now);
                }
                // Any other block number is stale or stray: ignore.
            }
            State::Sending => {
                // Map the 16-bit number onto the blocks in flight.
                let offset = u64::from(block.wrapping_sub(Self::wire_block(self.acked)));
                if offset == 0 || offset > self.sent_upto - self.acked {
                    // A duplicate, or not a block in flight: never answered
                    // with a burst (Sorcerer's Apprentice).
                    return;
                }
                let acked = self.acked + offset;
                if acked < self.sent_upto {
                    // The client saw a gap; the rest of the window goes again.
                    self.retransmitted_blocks += self.sent_upto - acked;
                }
                self.acked = acked;
                self.client_acked = true;
                self.backoff.progress();
                if self.acked >= self.last_block {
                    self.pending = None;
                    self.state = State::Done(Outcome::Complete);
                } else {
                    self.send_window_from(self.acked + 1, now);
                }
            }
            State::Done(_) => {}
        }
    }

    fn window_from(&mut self, first: u64) -> Transmit {
        let last = (first + self.windowsize - 1).min(self.last_block);
        self.sent_upto = last;
        Transmit::Window {
            first,
            count: (last - first + 1) as u32,
        }
    }

    fn send_window_from(&mut self, first: u64, now: Instant) {
        self.pending = Some(self.window_from(first));
        self.deadline = now + self.backoff.base();
    }

    /// Ends the transfer with an ERROR saying `why` (e.g. the file changed
    /// on disk); nothing more is sent after it.
    pub fn abort(&mut self, why: &'static str) {
        if matches!(self.state, State::Done(_)) {
            return;
        }
        let mut error = Vec::new();
        packet::encode_error(ErrorCode::NotDefined, why, &mut error);
        self.pending = Some(Transmit::Control(error));
        self.state = State::Done(Outcome::Aborted(why));
    }

    fn violation(&mut self, why: &'static str) {
        let mut error = Vec::new();
        packet::encode_error(ErrorCode::IllegalOperation, why, &mut error);
        self.pending = Some(Transmit::Control(error));
        self.state = State::Done(Outcome::ProtocolViolation(why));
    }
}

#[cfg(test)]
mod tests {
    use super::super::options::{negotiate, NegotiationLimits};
    use super::*;
    use proptest::prelude::*;

    fn ack(block: u16) -> Vec<u8> {
        let mut out = Vec::new();
        packet::encode_ack(block, &mut out);
        out
    }

    fn start(options: &[(&str, &str)], len: u64, now: Instant) -> ReadTransfer {
        let limits = NegotiationLimits {
            max_blksize: 65464,
            max_windowsize: 64,
        };
        ReadTransfer::new(
            &negotiate(options, len, limits),
            len,
            TransferConfig::default(),
            now,
        )
    }

    #[test]
    fn lock_step_transfer_of_exactly_one_block_sends_an_empty_last_block() {
        let now = Instant::now();
        let mut t = start(&[], 512, now);
        assert_eq!(t.block_count(), 2);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 1, count: 1 })
        );
        assert_eq!(t.block_range(1), 0..512);
        t.handle_datagram(&ack(1), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 2, count: 1 })
        );
        assert_eq!(t.block_range(2), 512..512);
        t.handle_datagram(&ack(2), now);
        assert_eq!(t.outcome(), Some(&Outcome::Complete));
        assert_eq!(t.poll_timeout(), None);
    }

    #[test]
    fn empty_file_is_one_empty_block() {
        let now = Instant::now();
        let mut t = start(&[], 0, now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 1, count: 1 })
        );
        assert_eq!(t.block_range(1), 0..0);
        t.handle_datagram(&ack(1), now);
        assert_eq!(t.outcome(), Some(&Outcome::Complete));
    }

    #[test]
    fn oack_then_ack_zero_then_windows() {
        let now = Instant::now();
        let mut t = start(&[("blksize", "1000"), ("windowsize", "4")], 10_000, now);
        let Some(Transmit::Control(oack)) = t.poll_transmit() else {
            panic!("expected OACK")
        };
        assert_eq!(oack, b"\x00\x06blksize\x001000\x00windowsize\x004\x00");
        t.handle_datagram(&ack(3), now); // stray: ignored
        assert_eq!(t.poll_transmit(), None);
        t.handle_datagram(&ack(0), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 1, count: 4 })
        );
        t.handle_datagram(&ack(4), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 5, count: 4 })
        );
        // A gap: client saw 5 and 6 only.
        t.handle_datagram(&ack(6), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 7, count: 4 })
        );
        assert_eq!(t.retransmitted_blocks(), 2);
        t.handle_datagram(&ack(10), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window {
                first: 11,
                count: 1
            })
        );
        t.handle_datagram(&ack(11), now);
        assert_eq!(t.outcome(), Some(&Outcome::Complete));
    }

    #[test]
    fn duplicate_acks_never_trigger_a_burst() {
        let now = Instant::now();
        let mut t = start(&[], 5000, now);
        t.poll_transmit();
        t.handle_datagram(&ack(1), now);
        assert!(t.poll_transmit().is_some());
        for _ in 0..10 {
            t.handle_datagram(&ack(1), now);
            assert_eq!(t.poll_transmit(), None);
        }
    }

    #[test]
    fn timeout_retransmits_with_backoff_then_gives_up() {
        let t0 = Instant::now();
        let mut t = start(&[], 5000, t0);
        t.poll_transmit();
        let mut deadlines = Vec::new();
        let mut now;
        for _ in 0..5 {
            now = t.poll_timeout().unwrap();
            deadlines.push(now - t0);
            t.handle_timeout(now);
            assert_eq!(
                t.poll_transmit(),
                Some(Transmit::Window { first: 1, count: 1 })
            );
        }
        let secs: Vec<u64> = deadlines.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![1, 3, 7, 12, 17]);
        now = t.poll_timeout().unwrap();
        t.handle_timeout(now);
        assert!(matches!(t.poll_transmit(), Some(Transmit::Control(_))));
        assert_eq!(t.outcome(), Some(&Outcome::TimedOut));
    }

    #[test]
    fn client_timeout_caps_the_first_retransmission_and_raises_the_ceiling() {
        let t0 = Instant::now();
        // Asked 6 s, configured 1 s: retransmit after 1 s, back off up to 6 s.
        let mut t = start(&[("timeout", "6")], 5000, t0);
        t.poll_transmit();
        t.handle_datagram(&ack(0), t0);
        t.poll_transmit();
        let mut at = Vec::new();
        for _ in 0..5 {
            let now = t.poll_timeout().unwrap();
            at.push((now - t0).as_secs());
            t.handle_timeout(now);
            t.poll_transmit();
        }
        assert_eq!(at, vec![1, 3, 7, 13, 19]);
    }

    #[test]
    fn early_timeout_call_does_nothing() {
        let now = Instant::now();
        let mut t = start(&[], 5000, now);
        t.poll_transmit();
        t.handle_timeout(now);
        assert_eq!(t.poll_transmit(), None);
    }

    #[test]
    fn client_error_ends_the_transfer_silently() {
        let now = Instant::now();
        // Answering the OACK with an ERROR declines the options (UEFI's
        // size query): no failure.
        let mut t = start(&[("tsize", "0")], 5000, now);
        t.poll_transmit();
        t.handle_datagram(b"\x00\x05\x00\x08tsize too big\x00", now);
        assert_eq!(t.poll_transmit(), None);
        assert_eq!(t.outcome(), Some(&Outcome::OptionsDeclined { code: 8 }));
        // An ERROR once data flows is the client giving up.
        let mut t = start(&[("tsize", "0")], 5000, now);
        t.poll_transmit();
        t.handle_datagram(b"\x00\x04\x00\x00", now);
        t.poll_transmit();
        t.handle_datagram(b"\x00\x05\x00\x00disk full\x00", now);
        assert_eq!(t.poll_transmit(), None);
        assert_eq!(
            t.outcome(),
            Some(&Outcome::ClientError {
                code: 0,
                message: "disk full".into()
            })
        );
    }

    #[test]
    fn wrong_opcode_is_answered_with_illegal_operation() {
        let now = Instant::now();
        let mut t = start(&[], 5000, now);
        t.poll_transmit();
        t.handle_datagram(b"\x00\x03\x00\x01hello", now);
        let Some(Transmit::Control(error)) = t.poll_transmit() else {
            panic!()
        };
        assert_eq!(&error[..4], b"\x00\x05\x00\x04");
        assert!(matches!(t.outcome(), Some(Outcome::ProtocolViolation(_))));
    }

    #[test]
    fn garbage_is_ignored() {
        let now = Instant::now();
        let mut t = start(&[], 5000, now);
        t.poll_transmit();
        t.handle_datagram(b"\x00", now);
        t.handle_datagram(b"\x00\x04\x00", now);
        assert_eq!(t.poll_transmit(), None);
        assert_eq!(t.outcome(), None);
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let now = Instant::now();
        let blocks = 70_000u64;
        let mut t = start(&[("blksize", "8")], blocks * 8 - 3, now);
        assert!(matches!(t.poll_transmit(), Some(Transmit::Control(_))));
        t.handle_datagram(&ack(0), now);
        assert_eq!(
            t.poll_transmit(),
            Some(Transmit::Window { first: 1, count: 1 })
        );
        for index in 1..=blocks {
            t.handle_datagram(&ack(ReadTransfer::wire_block(index)), now);
            if index < blocks {
                assert_eq!(
                    t.poll_transmit(),
                    Some(Transmit::Window {
                        first: index + 1,
                        count: 1
                    })
                );
            }
        }
        assert_eq!(ReadTransfer::wire_block(65536), 0);
        assert_eq!(t.outcome(), Some(&Outcome::Complete));
    }

    /// A deterministic lossy channel between the machine and a model client
    /// (RFC 7440 receiver: accepts in-order blocks, ACKs at the end of a
    /// window or on a gap). Returns the bytes the client assembled.
    fn simulate(
        len: u64,
        blksize: u16,
        window: u16,
        seed: u64,
        loss_pct: u64,
    ) -> (Vec<u8>, Outcome) {
        let file: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        let b = blksize.to_string();
        let w = window.to_string();
        let mut now = Instant::now();
        let mut t = start(&[("blksize", &b), ("windowsize", &w)], len, now);
        let mut rng = seed | 1;
        let mut lose = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % 100 < loss_pct
        };
        let mut received: Vec<u8> = Vec::new();
        let mut expected: u64 = 1;
        let mut client_done = false;
        for _ in 0..1_000_000 {
            if let Some(outcome) = t.outcome() {
                return (received, outcome.clone());
            }
            let mut acks: Vec<u16> = Vec::new();
            match t.poll_transmit() {
                Some(Transmit::Control(bytes)) => {
                    if bytes[1] == 6 && !lose() {
                        acks.push(0);
                    }
                }
                Some(Transmit::Window { first, count }) => {
                    let mut gap = false;
                    for index in first..first + u64::from(count) {
                        if lose() {
                            continue;
                        }
                        // Duplicate every fifth datagram, to exercise duplicates.
                        let copies = if index % 5 == 0 { 2 } else { 1 };
                        for _ in 0..copies {
                            if index == expected && !client_done {
                                let range = t.block_range(index);
                                received.extend_from_slice(&file[range.clone()]);
                                expected += 1;
                                if range.len() < usize::from(blksize) {
                                    client_done = true;
                                    acks.push(ReadTransfer::wire_block(index));
                                }
                            } else if client_done && index == expected - 1 {
                                // The final ACK was lost: a dallying client acks again.
                                acks.push(ReadTransfer::wire_block(index));
                            } else if index > expected && !gap {
                                gap = true;
                                acks.push(ReadTransfer::wire_block(expected - 1));
                            }
                        }
                    }
                    let last = first + u64::from(count) - 1;
                    if !gap && !client_done && expected == last + 1 {
                        acks.push(ReadTransfer::wire_block(last));
                    }
                }
                None => {
                    now = t.poll_timeout().unwrap();
                    t.handle_timeout(now);
                    continue;
                }
            }
            // Reorder: deliver ACKs last-first.
            for a in acks.into_iter().rev() {
                if !lose() {
                    t.handle_datagram(&ack(a), now);
                }
            }
        }
        panic!("simulation did not finish")
    }

    #[test]
    fn lossy_windowed_transfers_deliver_every_byte() {
        for (seed, window) in [(1, 1), (2, 4), (3, 8), (4, 16)] {
            let (bytes, outcome) = simulate(100_000, 512, window, seed, 10);
            assert_eq!(outcome, Outcome::Complete, "window {window}");
            let file: Vec<u8> = (0..100_000u64).map(|i| (i * 7 + 3) as u8).collect();
            assert_eq!(bytes, file, "window {window}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_size_blksize_window_and_moderate_loss_completes(
            len in 0u64..40_000,
            blksize in 8u16..2000,
            window in 1u16..16,
            seed in any::<u64>(),
            loss in 0u64..25,
        ) {
            let (bytes, outcome) = simulate(len, blksize, window, seed, loss);
            let file: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            if outcome == Outcome::Complete {
                prop_assert_eq!(bytes, file);
            } else {
                // Only an unlucky run of losses may end a transfer, and then
                // by timing out, never by a wrong byte.
                prop_assert_eq!(outcome, Outcome::TimedOut);
            }
        }
    }
}
