//! One HTTP/1.1 server connection, sans-I/O: what both HTTP engines
//! ([`crate::engine::http`] on tokio, [`crate::engine::http_uring`] on
//! io_uring) decide alike, with the bytes and the clock passed in.
//!
//! The engine appends what it receives to [`Connection::input`] and calls
//! [`Connection::received`]; [`Connection::poll_request`] hands out every
//! complete head in order (pipelining), and what cannot be parsed, with the
//! status to answer before closing. While a response is written the engine
//! asks [`Connection::poll_transmit`] what goes next (head, bytes, or a
//! file slice by copy or by `sendfile`) and reports what the socket took
//! with [`Connection::sent`]; [`Connection::finish_response`] says whether
//! the connection stays open.
//!
//! The three timeouts live here, so they are tested under virtual time
//! (see the tests) and both engines keep them alike:
//! * **header**: a request head must be complete within `header_timeout`
//!   of its first byte, however slowly the rest trickles in (slowloris);
//!   then the client is answered `408` and the connection closed;
//! * **idle**: a kept-alive connection with no request begun for
//!   `idle_timeout` is closed without an answer;
//! * **send**: a client that takes no bytes of its response for
//!   `send_timeout` is dropped.
//!
//! [`Connection::deadline`] says when the next one falls due and
//! [`Connection::expired`] which one has; the engine arms a timer or sweeps.

use std::time::{Duration, Instant};

use super::request::{parse, Parsed, Request};

/// The answer to a connection over `http.max_connections` (or the
/// per-client limit): written once, then the connection is closed.
pub const BUSY_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The limits a connection keeps (from `[http]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub send_timeout: Duration,
}

/// A request head, or why there is none yet.
#[derive(Debug)]
pub enum Polled {
    /// A whole head, taken out of the input.
    Request(Box<Request>),
    /// The input cannot be a request: answer this status and reason (with
    /// [`Connection::start_response`], `close_after` set), then close.
    Invalid(u16, &'static str),
    /// More bytes are needed: receive into [`Connection::input`].
    NeedMore,
}

/// Which timeout fell due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No request began within `idle_timeout`: close, no answer.
    Idle,
    /// A request head began but was not complete within `header_timeout`:
    /// answer `408`, then close.
    HeadTimeout,
    /// The client took no bytes of its response within `send_timeout`:
    /// drop the connection.
    SendTimeout,
}

/// One piece of a response after its head, as the engine holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Bytes in memory, this long.
    Bytes(u64),
    /// A slice of the response's file, this long; `sendfile` is possible
    /// when the engine holds the file's descriptor.
    File { len: u64, has_descriptor: bool },
}

/// How the next bytes of a response go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// Send the bytes of piece `piece` (0 is the head, `n` is the response's
    /// piece `n - 1`) from byte `from` on; a file piece is copied from its
    /// mapping. `more`: another piece follows at once (`MSG_MORE`).
    Send { piece: usize, from: u64, more: bool },
    /// `sendfile(2)` of piece `piece`'s file slice from byte `from` of the
    /// slice on.
    SendFile { piece: usize, from: u64 },
    /// All of the response is out.
    Done,
}

/// What follows a finished response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterResponse {
    /// Read (or parse, when pipelined) the next request.
    KeepAlive,
    Close,
}

/// The progress of the response being written.
#[derive(Debug)]
struct Sending {
    head_len: u64,
    /// Length of each piece after the head, and whether it goes by
    /// `sendfile`. Empty (no allocation) for a response all in its head,
    /// the common case of scripts and errors.
    body: Vec<(u64, bool)>,
    piece: usize,
    /// Bytes of the current piece already sent.
    done: u64,
    body_sent: u64,
    started: Instant,
    last_progress: Instant,
    keep_alive: bool,
}

impl Sending {
    /// Pieces in all, the head included.
    fn pieces(&self) -> usize {
        self.body.len() + 1
    }

    /// Length of piece `piece` (0 is the head).
    fn len(&self, piece: usize) -> u64 {
        match piece {
            0 => self.head_len,
            n => self.body[n - 1].0,
        }
    }
}

/// The state of one connection; see the module docs.
#[derive(Debug)]
pub struct Connection {
    limits: Limits,
    /// Received bytes not yet parsed.
    input: Vec<u8>,
    /// When the first byte of the head now being read arrived.
    head_started: Option<Instant>,
    /// When the connection was accepted or last finished a response.
    idle_since: Instant,
    sending: Option<Sending>,
}

impl Connection {
    /// A connection accepted at `now`.
    pub fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            input: Vec::with_capacity(2048),
            head_started: None,
            idle_since: now,
            sending: None,
        }
    }

    /// The receive buffer: the engine appends what it receives (into its
    /// spare capacity), then calls [`Connection::received`].
    pub fn input(&mut self) -> &mut Vec<u8> {
        &mut self.input
    }

    /// Whether received bytes wait to be parsed (a pipelined request).
    pub fn has_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// Bytes were appended to the input at `now`.
    pub fn received(&mut self, now: Instant) {
        if !self.input.is_empty() {
            self.head_started.get_or_insert(now);
        }
    }

    /// The next request head in the input, if it is all there.
    pub fn poll_request(&mut self, now: Instant) -> Polled {
        match parse(&self.input, self.limits.max_header_bytes) {
            Parsed::Complete(request, used) => {
                self.input.drain(..used);
                // A pipelined request behind this one has begun already.
                self.head_started = (!self.input.is_empty()).then_some(now);
                Polled::Request(request)
            }
            Parsed::Invalid(status, why) => Polled::Invalid(status, why),
            Parsed::Partial => Polled::NeedMore,
        }
    }

    /// A response begins at `now`: its head of `head_len` bytes, then
    /// `pieces`. File pieces go by `sendfile` when `by_sendfile` (as
    /// `http.body` decided for this response) and the engine holds the
    /// file's descriptor, otherwise they are copied. `keep_alive` is false
    /// when the response or the request closes the connection (always so
    /// for an answer to an invalid request or a timeout).
    pub fn start_response(
        &mut self,
        head_len: usize,
        pieces: impl IntoIterator<Item = Piece>,
        by_sendfile: bool,
        keep_alive: bool,
        now: Instant,
    ) {
        let body = pieces
            .into_iter()
            .map(|piece| match piece {
                Piece::Bytes(len) => (len, false),
                Piece::File {
                    len,
                    has_descriptor,
                } => (len, by_sendfile && has_descriptor),
            })
            .collect();
        self.sending = Some(Sending {
            head_len: head_len as u64,
            body,
            piece: 0,
            done: 0,
            body_sent: 0,
            started: now,
            last_progress: now,
            keep_alive,
        });
    }

    /// Whether a response is being written.
    pub fn is_sending(&self) -> bool {
        self.sending.is_some()
    }

    /// Whether the response being written has not begun to go out yet.
    pub fn response_untouched(&self) -> bool {
        self.sending
            .as_ref()
            .is_some_and(|s| s.piece == 0 && s.done == 0)
    }

    /// What of the response goes out next.
    pub fn poll_transmit(&mut self) -> Transmit {
        let Some(sending) = self.sending.as_mut() else {
            return Transmit::Done;
        };
        // Empty pieces are skipped: there is nothing to send of them.
        while sending.piece < sending.pieces() && sending.done >= sending.len(sending.piece) {
            sending.piece += 1;
            sending.done = 0;
        }
        let piece = sending.piece;
        if piece >= sending.pieces() {
            return Transmit::Done;
        }
        if piece > 0 && sending.body[piece - 1].1 {
            Transmit::SendFile {
                piece,
                from: sending.done,
            }
        } else {
            Transmit::Send {
                piece,
                from: sending.done,
                more: piece + 1 < sending.pieces(),
            }
        }
    }

    /// The socket took `bytes` more of the response at `now`; returns how
    /// many of them were body bytes (the head is not counted).
    pub fn sent(&mut self, bytes: u64, now: Instant) -> u64 {
        let Some(sending) = self.sending.as_mut() else {
            return 0;
        };
        let body_before = sending.body_sent;
        if bytes > 0 {
            sending.last_progress = now;
        }
        // Bytes past the end of a piece belong to the pieces after it.
        let mut left = bytes;
        while left > 0 && sending.piece < sending.pieces() {
            let taken = left.min(sending.len(sending.piece) - sending.done);
            sending.done += taken;
            left -= taken;
            if sending.piece > 0 {
                sending.body_sent += taken;
            }
            if sending.done == sending.len(sending.piece) {
                sending.piece += 1;
                sending.done = 0;
            }
        }
        sending.body_sent - body_before
    }

    /// Body bytes of the current response sent so far, and when it began.
    pub fn response_progress(&self) -> Option<(u64, Instant)> {
        self.sending.as_ref().map(|s| (s.body_sent, s.started))
    }

    /// The response ended at `now` (all sent, or given up): whether the
    /// connection goes on. The idle timeout starts again from `now`.
    pub fn finish_response(&mut self, now: Instant) -> AfterResponse {
        let keep_alive = self.sending.take().is_some_and(|s| s.keep_alive);
        self.idle_since = now;
        if keep_alive {
            AfterResponse::KeepAlive
        } else {
            AfterResponse::Close
        }
    }

    /// When the next timeout falls due, and which.
    pub fn deadline(&self) -> (Instant, Expiry) {
        match (&self.sending, self.head_started) {
            (Some(sending), _) => (
                sending.last_progress + self.limits.send_timeout,
                Expiry::SendTimeout,
            ),
            (None, Some(started)) => (started + self.limits.header_timeout, Expiry::HeadTimeout),
            (None, None) => (self.idle_since + self.limits.idle_timeout, Expiry::Idle),
        }
    }

    /// The timeout that has fallen due by `now`, if any.
    pub fn expired(&self, now: Instant) -> Option<Expiry> {
        let (at, expiry) = self.deadline();
        (now >= at).then_some(expiry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 8192,
            header_timeout: 10 * SECOND,
            idle_timeout: 60 * SECOND,
            send_timeout: 30 * SECOND,
        }
    }

    fn receive(connection: &mut Connection, bytes: &[u8], now: Instant) {
        connection.input().extend_from_slice(bytes);
        connection.received(now);
    }

    fn expect_request(connection: &mut Connection, now: Instant) -> Box<Request> {
        match connection.poll_request(now) {
            Polled::Request(request) => request,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn an_idle_connection_closes_after_the_idle_timeout_without_an_answer() {
        let t0 = Instant::now();
        let connection = Connection::new(limits(), t0);
        assert_eq!(connection.deadline(), (t0 + 60 * SECOND, Expiry::Idle));
        assert_eq!(connection.expired(t0 + 59 * SECOND), None);
        assert_eq!(connection.expired(t0 + 60 * SECOND), Some(Expiry::Idle));
    }

    #[test]
    fn a_head_that_trickles_in_is_timed_from_its_first_byte_and_answered_408() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        // The first byte 50 s into the idle period: the header clock starts.
        receive(&mut connection, b"GET /a HTTP/1.1\r\n", t0 + 50 * SECOND);
        assert!(matches!(
            connection.poll_request(t0 + 50 * SECOND),
            Polled::NeedMore
        ));
        // A byte every few seconds does not move the deadline (slowloris).
        for second in [53, 56, 59] {
            receive(&mut connection, b"X", t0 + second * SECOND);
            assert!(matches!(
                connection.poll_request(t0 + second * SECOND),
                Polled::NeedMore
            ));
        }
        assert_eq!(
            connection.deadline(),
            (t0 + 60 * SECOND, Expiry::HeadTimeout)
        );
        assert_eq!(connection.expired(t0 + 59 * SECOND), None);
        assert_eq!(
            connection.expired(t0 + 60 * SECOND),
            Some(Expiry::HeadTimeout)
        );
    }

    #[test]
    fn a_client_that_takes_no_bytes_is_dropped_after_the_send_timeout() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        receive(&mut connection, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n", t0);
        expect_request(&mut connection, t0);
        connection.start_response(100, [Piece::Bytes(1_000_000)], true, true, t0);
        // Progress moves the deadline; a send of nothing does not.
        connection.sent(100, t0 + 20 * SECOND);
        connection.sent(4096, t0 + 40 * SECOND);
        connection.sent(0, t0 + 60 * SECOND);
        assert_eq!(
            connection.deadline(),
            (t0 + 70 * SECOND, Expiry::SendTimeout)
        );
        assert_eq!(connection.expired(t0 + 69 * SECOND), None);
        assert_eq!(
            connection.expired(t0 + 70 * SECOND),
            Some(Expiry::SendTimeout)
        );
        assert_eq!(connection.response_progress(), Some((4096, t0)));
    }

    #[test]
    fn after_a_kept_alive_response_the_idle_clock_starts_again() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        receive(&mut connection, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", t0);
        expect_request(&mut connection, t0 + SECOND);
        connection.start_response(10, [], false, true, t0 + SECOND);
        connection.sent(10, t0 + 2 * SECOND);
        assert_eq!(connection.poll_transmit(), Transmit::Done);
        assert_eq!(
            connection.finish_response(t0 + 2 * SECOND),
            AfterResponse::KeepAlive
        );
        assert_eq!(connection.deadline(), (t0 + 62 * SECOND, Expiry::Idle));
    }

    #[test]
    fn a_pipelined_request_starts_its_header_clock_when_the_one_before_is_parsed() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        receive(
            &mut connection,
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\n",
            t0,
        );
        let first = expect_request(&mut connection, t0 + SECOND);
        assert_eq!(first.path, "/1");
        connection.start_response(10, [], false, true, t0 + SECOND);
        connection.sent(10, t0 + SECOND);
        connection.finish_response(t0 + SECOND);
        assert!(connection.has_input());
        assert!(matches!(
            connection.poll_request(t0 + SECOND),
            Polled::NeedMore
        ));
        assert_eq!(
            connection.deadline(),
            (t0 + 11 * SECOND, Expiry::HeadTimeout)
        );
        receive(&mut connection, b"Host: x\r\n\r\n", t0 + 2 * SECOND);
        assert_eq!(expect_request(&mut connection, t0 + 2 * SECOND).path, "/2");
    }

    #[test]
    fn an_oversized_head_is_refused_with_431() {
        let t0 = Instant::now();
        let mut connection = Connection::new(
            Limits {
                max_header_bytes: 64,
                ..limits()
            },
            t0,
        );
        receive(&mut connection, b"GET /", t0);
        receive(&mut connection, &[b'a'; 100], t0);
        assert!(matches!(
            connection.poll_request(t0),
            Polled::Invalid(431, _)
        ));
    }

    #[test]
    fn an_answer_to_a_bad_request_closes_the_connection() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        connection.start_response(50, [], false, false, t0);
        connection.sent(50, t0);
        assert_eq!(connection.poll_transmit(), Transmit::Done);
        assert_eq!(connection.finish_response(t0), AfterResponse::Close);
    }

    #[test]
    fn file_pieces_go_by_sendfile_only_when_chosen_and_possible() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        let pieces = [
            Piece::Bytes(5),
            Piece::File {
                len: 1000,
                has_descriptor: true,
            },
            Piece::Bytes(0),
            Piece::File {
                len: 10,
                has_descriptor: false,
            },
        ];
        connection.start_response(20, pieces, true, true, t0);
        let mut order = Vec::new();
        loop {
            let transmit = connection.poll_transmit();
            order.push(transmit);
            let wrote = match transmit {
                Transmit::Done => break,
                // Partial writes: the piece is asked for again from where
                // it stopped.
                Transmit::Send {
                    piece: 0, from: 0, ..
                } => 15,
                Transmit::SendFile { from: 0, .. } => 600,
                Transmit::Send { piece: 0, from, .. } => 20 - from,
                Transmit::SendFile { from, .. } => 1000 - from,
                Transmit::Send { piece, .. } => [20, 5, 1000, 0, 10][piece],
            };
            connection.sent(wrote, t0);
        }
        assert_eq!(
            order,
            [
                Transmit::Send {
                    piece: 0,
                    from: 0,
                    more: true
                },
                Transmit::Send {
                    piece: 0,
                    from: 15,
                    more: true
                },
                Transmit::Send {
                    piece: 1,
                    from: 0,
                    more: true
                },
                Transmit::SendFile { piece: 2, from: 0 },
                Transmit::SendFile {
                    piece: 2,
                    from: 600
                },
                // The empty piece 3 is skipped; the file piece without a
                // descriptor is copied.
                Transmit::Send {
                    piece: 4,
                    from: 0,
                    more: false
                },
                Transmit::Done,
            ]
        );
        assert_eq!(connection.response_progress(), Some((1015, t0)));
    }

    #[test]
    fn copying_is_used_for_every_file_piece_when_sendfile_is_not_chosen() {
        let t0 = Instant::now();
        let mut connection = Connection::new(limits(), t0);
        connection.start_response(
            1,
            [Piece::File {
                len: 10,
                has_descriptor: true,
            }],
            false,
            true,
            t0,
        );
        connection.sent(1, t0);
        assert_eq!(
            connection.poll_transmit(),
            Transmit::Send {
                piece: 1,
                from: 0,
                more: false
            }
        );
    }
}
