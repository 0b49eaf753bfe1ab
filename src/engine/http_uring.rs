//! The HTTP engine on io_uring: the same connections, timeouts and limits
//! as the tokio engine in [`super::http`], driven by one ring per worker.
//!
//! Each worker keeps one multishot `accept` armed on its copy of the
//! listening socket. A connection has at most one operation in the kernel
//! at a time, which makes it a small state machine:
//!
//! * **reading** — a `recv` into the spare room of the connection's buffer;
//!   every complete head in the buffer is answered in order (pipelining)
//!   before the next `recv` is asked for;
//! * **writing** — the response's head and segments in turn: bytes (and
//!   file slices copied from the mapping, where `http.body` chose that when
//!   the response began) by `send`; other file slices by `sendfile(2)` from
//!   this thread, which never blocks (the socket is non-blocking) and, when
//!   the socket is full, waits for a `POLLOUT` completion before going on.
//!   A slice of [`super::CORK_FILE_SLICES_FROM`] or more goes with
//!   `TCP_CORK` on, taken off when the response ends.
//!
//! The common answer on a kept-alive connection — a whole response in
//! memory (a script, a redirect, an error, a `304`), nothing pipelined
//! behind its request — skips a trip through this thread: its `send`
//! (with `MSG_WAITALL`, so it is all sent or fails) is linked to the next
//! `recv` and asks for no completion when it succeeds. The kernel arms the
//! `recv` the moment the answer is out, and the worker handles one
//! completion per request instead of two. Under a storm of script requests
//! that halves the completions and spares every request a wait for the
//! worker's next batch. If that send fails, its completion is the last of
//! the connection: the kernel cancels the `recv` behind it without a
//! completion (a failed request that skips its success completion takes
//! the completions of the rest of its link with it).
//!
//! Completions of every connection are handled in one batch per wake-up,
//! and the sends and receives they lead to go to the kernel together, one
//! `io_uring_enter` per 64 completions handled: under hundreds of
//! kept-alive connections that is where this engine saves system calls
//! over epoll.
//!
//! The timeouts (header, idle, send) and every other decision about the
//! bytes are the sans-I/O [`crate::proto::http::connection::Connection`]'s,
//! which the tokio engine drives too. Here they are checked by a sweep over
//! the connections ten times a second, which cancels the connection's
//! operation; the connection is closed (or answered 408) when the cancelled
//! operation completes, so no memory the kernel may still write is ever
//! freed early.
//! Connections beyond `max_connections` (counted over all workers) get a
//! 503 with `Retry-After` and are closed at once.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, error, warn};

use super::blocking::{BlockingPool, Mailbox};
use super::uring::{
    cancel_in_flight, insert_slot, new_ring, split_user_data, user_data, waiting_ended,
};
use super::{cork_before_sendfile, set_cork, ClientConnections, ClientSlot, Shutdown};
use crate::config::HttpConfig;
use crate::proto::http::connection::{
    AfterResponse, Connection as HttpConnection, Expiry, Polled, Transmit, BUSY_RESPONSE,
};
use crate::proto::http::request::Request;
use crate::server::http::{HttpService, HttpStats, Response};

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_POLL_OUT: u64 = 4;
const KIND_CANCEL: u64 = 5;
/// A `send` linked to the `recv` after it; it completes only on failure.
const KIND_LINKED_SEND: u64 = 6;
/// The `read` on the worker's mailbox: answers from the blocking pool.
const KIND_WAKE: u64 = 7;

/// Threads shared by the workers for answers that need the file system.
const BLOCKING_THREADS: usize = 2;

/// Submission queue entries per worker; a full queue is flushed and reused.
const RING_ENTRIES: u32 = 1024;
/// Completions handled before their answers go to the kernel, within a
/// wake-up that brought more. Handing over 64 at a time instead of all at
/// the end got about 8% more script requests per second at 512
/// connections (10 alternating runs on the benchmark's wrk script; every
/// 16 or 32 was no better). The answers start leaving while later requests
/// are parsed, and, probably, each connection's state is still in cache
/// when its send is issued.
const SUBMIT_EVERY: usize = 64;
/// How often connections are checked against their timeouts.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Room asked for before each `recv`.
const READ_CHUNK: usize = 2048;

/// Starts serving HTTP on `listener` with `workers` threads, each with its
/// own ring.
pub fn spawn(
    listener: TcpListener,
    service: Arc<HttpService>,
    config: HttpConfig,
    workers: usize,
    shutdown: Shutdown,
) -> io::Result<Vec<JoinHandle<()>>> {
    listener.set_nonblocking(true)?;
    let config = Arc::new(config);
    let open = Arc::new(AtomicUsize::new(0));
    let clients = ClientConnections::new(config.max_connections_per_client);
    let blocking = BlockingPool::new("bootfleet-fs-http", BLOCKING_THREADS)?;
    let mut threads = Vec::new();
    for index in 0..workers.max(1) {
        let listener = listener.try_clone()?;
        let (service, config, open, clients, blocking) = (
            Arc::clone(&service),
            Arc::clone(&config),
            Arc::clone(&open),
            Arc::clone(&clients),
            Arc::clone(&blocking),
        );
        let answers = Mailbox::new()?;
        let shutdown = shutdown.clone();
        // The ring is made on the thread that uses it: with
        // SINGLE_ISSUER only its creator may submit.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        threads.push(
            std::thread::Builder::new()
                .name(format!("bootfleet-http-{index}"))
                .spawn(move || {
                    let ring = match new_ring(RING_ENTRIES) {
                        Ok(ring) => {
                            let _ = ready_tx.send(Ok(()));
                            ring
                        }
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                            return;
                        }
                    };
                    // Sends retried until all is sent, or else failed (and
                    // so safe to link: io_uring_prep_send(3)), came with
                    // MSG_WAITALL support in 5.19 (Linux commit
                    // 4c3c09439c08); SINGLE_ISSUER (6.0) is only set when
                    // the ring was built on a kernel that new.
                    let link_send_to_recv = ring.params().is_setup_single_issuer()
                        && ring.params().is_feature_skip_cqe_on_success();
                    let mut worker = Worker {
                        link_send_to_recv,
                        ring,
                        listener,
                        service,
                        config,
                        open,
                        clients,
                        connections: Vec::new(),
                        free: Vec::new(),
                        next_generation: 1,
                        warned_fds: false,
                        accept_paused: false,
                        blocking,
                        answers,
                        wake_count: Box::new(0),
                    };
                    if let Err(error) = worker.run(&shutdown) {
                        error!(%error, "HTTP worker stopped");
                    }
                })?,
        );
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("HTTP worker ended before its ring was made"))??;
    }
    Ok(threads)
}

/// Why a connection's operation was cancelled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cancelled {
    /// Close once the operation has completed.
    Close,
    /// The request head did not arrive in time: answer 408, then close.
    HeadTimeout,
}

struct Connection {
    socket: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    generation: u32,
    /// What the connection has received, what it is sending, and its
    /// timeouts: the state machine both HTTP engines drive.
    state: HttpConnection,
    writing: Option<Writing>,
    /// An operation of this connection is in the kernel; its buffers must
    /// stay untouched until it completes.
    in_flight: bool,
    cancelled: Option<Cancelled>,
    /// The answer whose linked `send` may still be in the kernel ahead of
    /// the `recv` in flight; freed when that `recv` completes, or when the
    /// send fails (then the `recv` never starts, and never completes).
    linked_answer: Option<Vec<u8>>,
    /// This connection's place in the per-client count; given back when
    /// the connection is dropped.
    _client_slot: ClientSlot,
}

/// The response being written; its progress is in the connection's state.
struct Writing {
    response: Response,
    /// Close after this response whatever it says (a bad request).
    close_after: bool,
    /// The connection waits for `POLLOUT` to go on with `sendfile`.
    waiting_writable: bool,
    /// `TCP_CORK` is on for a large `sendfile` slice of this response;
    /// it comes off when the response ends.
    corked: bool,
}

/// What to do after a step of a connection's state machine.
enum Next {
    /// An operation is in the kernel; wait for its completion.
    Wait,
    Close,
}

struct Worker {
    ring: IoUring,
    /// Whether whole answers in memory go out as a `send` linked to the
    /// next `recv` (see the module docs); needs a kernel of 6.0 or later.
    link_send_to_recv: bool,
    listener: TcpListener,
    service: Arc<HttpService>,
    config: Arc<HttpConfig>,
    /// Open connections over all workers, against `max_connections`.
    open: Arc<AtomicUsize>,
    /// Open connections per client address, over all workers.
    clients: Arc<ClientConnections>,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
    next_generation: u32,
    warned_fds: bool,
    /// Accepting stopped for want of file descriptors; the next sweep
    /// starts it again.
    accept_paused: bool,
    /// Where requests that need the file system are answered.
    blocking: Arc<BlockingPool>,
    /// Their answers, for this worker.
    answers: Arc<Mailbox<PoolAnswer>>,
    /// What the `read` on the mailbox's eventfd writes.
    wake_count: Box<u64>,
}

/// A response the blocking pool made for connection `index`.
struct PoolAnswer {
    index: usize,
    generation: u32,
    response: Response,
}

impl Worker {
    fn run(&mut self, shutdown: &Shutdown) -> io::Result<()> {
        let served = self.serve(shutdown);
        // Also after an error: no connection's memory may be freed while
        // the kernel can still write into it.
        self.cancel_everything();
        served
    }

    fn serve(&mut self, shutdown: &Shutdown) -> io::Result<()> {
        self.arm_accept()?;
        self.arm_wake()?;
        let mut next_sweep = Instant::now() + SWEEP_EVERY;
        let mut completions: Vec<(u64, i32, u32)> = Vec::new();
        let heartbeat = shutdown.heartbeat(super::worker_name());
        while !shutdown.is_triggered() {
            heartbeat.beat();
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now)?;
                next_sweep = now + SWEEP_EVERY;
            }
            let ts = types::Timespec::from(next_sweep.saturating_duration_since(now));
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if waiting_ended(&e) => {}
                Err(e) => return Err(e),
            }
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            let now = Instant::now();
            for (handled, &(data, result, flags)) in completions.iter().enumerate() {
                self.handle_completion(data, result, flags, now)?;
                if handled % SUBMIT_EVERY == SUBMIT_EVERY - 1 {
                    self.ring.submit()?;
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY (for every caller): each entry refers to a socket and to
        // memory owned by a connection (its buffer or its response) that
        // is neither touched nor dropped until the entry's completion.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        }
        Ok(())
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        // Accepted sockets come non-blocking (sendfile must never block
        // this thread) and close-on-exec, without a system call each.
        let entry = opcode::AcceptMulti::new(types::Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(KIND_ACCEPT, 0, 0));
        self.push(entry)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = self
            .answers
            .wake_read(&mut self.wake_count)
            .user_data(user_data(KIND_WAKE, 0, 0));
        self.push(entry)
    }

    /// Hands `request` of connection `index` to the blocking pool; the
    /// connection waits, with nothing in the kernel, until the answer
    /// comes back ([`Self::pool_answered`]).
    fn answer_in_pool(&mut self, index: usize, request: Box<Request>) {
        let connection = self.connections[index].as_mut().expect("live connection");
        let (local, peer, generation) = (connection.local, connection.peer, connection.generation);
        let service = Arc::clone(&self.service);
        let answers = Arc::clone(&self.answers);
        self.blocking.run(move || {
            let response = service.respond(&request, local, peer);
            answers.post(PoolAnswer {
                index,
                generation,
                response,
            });
        });
    }

    /// The blocking pool answered: each connection still open goes on
    /// with its response.
    fn pool_answered(&mut self, now: Instant) -> io::Result<()> {
        for answer in self.answers.take() {
            let index = answer.index;
            let Some(connection) = live_connection(&mut self.connections, index, answer.generation)
            else {
                continue;
            };
            let by_sendfile = body_by_sendfile(&self.config, &self.open);
            self.service
                .stats
                .response_started(&answer.response, by_sendfile);
            connection.begin(answer.response, false, by_sendfile, now);
            if let Next::Close = self.advance(index, now)? {
                self.close(index);
            }
        }
        self.arm_wake()
    }

    fn handle_completion(
        &mut self,
        data: u64,
        result: i32,
        flags: u32,
        now: Instant,
    ) -> io::Result<()> {
        let (kind, index, generation) = split_user_data(data);
        match kind {
            KIND_ACCEPT => {
                if result >= 0 {
                    // SAFETY: a successful accept hands us a new descriptor
                    // that nothing else owns.
                    let socket = unsafe { TcpStream::from_raw_fd(result) };
                    self.accepted(socket, now)?;
                } else {
                    self.accept_failed(io::Error::from_raw_os_error(-result));
                }
                if !cqueue::more(flags) {
                    if matches!(-result, libc::EMFILE | libc::ENFILE) {
                        // Re-armed now it would fail again at once, in a
                        // busy loop: the next sweep re-arms it instead.
                        self.accept_paused = true;
                    } else {
                        self.arm_accept()?;
                    }
                }
            }
            KIND_LINKED_SEND => {
                // Only a failed linked send completes (the client reset the
                // connection, a timeout cancelled the send, or it was cut
                // short, which MSG_WAITALL makes a failure). The `recv`
                // linked behind it is then cancelled before it starts and,
                // because the send asked to skip its completion on success,
                // without a completion of its own: the kernel drops the
                // completions of the rest of the link with it. So nothing of
                // this connection is left in the kernel; close it now.
                if let Some(connection) = live_connection(&mut self.connections, index, generation)
                {
                    debug!(peer = %connection.peer, result, "HTTP answer not sent; connection closed");
                    connection.in_flight = false;
                    self.close(index);
                }
            }
            KIND_RECV | KIND_SEND | KIND_POLL_OUT => {
                let Some(connection) = live_connection(&mut self.connections, index, generation)
                else {
                    return Ok(()); // a completion of a connection closed since
                };
                connection.in_flight = false;
                // The linked send, if any, is over: it ran before this recv.
                connection.linked_answer = None;
                let next = match connection.cancelled {
                    Some(Cancelled::Close) => Next::Close,
                    Some(Cancelled::HeadTimeout) => {
                        connection.cancelled = None;
                        debug!(peer = %connection.peer, "request head not complete in time; 408");
                        let response = self
                            .service
                            .invalid(408, "request head not received in time");
                        let by_sendfile = body_by_sendfile(&self.config, &self.open);
                        self.service.stats.response_started(&response, by_sendfile);
                        connection.begin(response, true, by_sendfile, now);
                        self.advance(index, now)?
                    }
                    None => self.completed(index, kind, result, now)?,
                };
                if let Next::Close = next {
                    self.close(index);
                }
            }
            KIND_WAKE if result != -libc::ECANCELED => self.pool_answered(now)?,
            _ => {} // cancellations report nothing we act on
        }
        Ok(())
    }

    fn accept_failed(&mut self, error: io::Error) {
        if matches!(
            error.raw_os_error(),
            Some(libc::EMFILE) | Some(libc::ENFILE)
        ) {
            if !self.warned_fds {
                warn!(%error, "out of file descriptors accepting HTTP connections; raise LimitNOFILE");
                self.warned_fds = true;
            }
        } else {
            debug!(%error, "accept failed");
        }
    }

    fn accepted(&mut self, socket: TcpStream, now: Instant) -> io::Result<()> {
        let (Ok(peer), Ok(local)) = (socket.peer_addr(), socket.local_addr()) else {
            return Ok(()); // gone already
        };
        let over_total = self.open.fetch_add(1, Ordering::Relaxed) >= self.config.max_connections;
        self.service.stats.open_connections.inc();
        let client_slot = match self.clients.admit(peer.ip()) {
            Some(slot) if !over_total => slot,
            admitted => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                self.service.stats.open_connections.dec();
                if admitted.is_some() {
                    debug!(%peer, "HTTP connection limit reached; answering 503");
                } else {
                    debug!(%peer, "HTTP connection limit per client reached (http.max_connections_per_client); answering 503");
                }
                // SAFETY: a send from a static slice on a socket we own.
                let _ = unsafe {
                    libc::send(
                        socket.as_raw_fd(),
                        BUSY_RESPONSE.as_ptr().cast(),
                        BUSY_RESPONSE.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                };
                return Ok(());
            }
        };
        let _ = socket.set_nodelay(true);
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & 0x00ff_ffff;
        let connection = Connection {
            socket,
            local,
            peer,
            generation,
            state: HttpConnection::new(super::http::limits(&self.config), now),
            writing: None,
            in_flight: false,
            cancelled: None,
            linked_answer: None,
            _client_slot: client_slot,
        };
        let index = insert_slot(&mut self.connections, &mut self.free, connection);
        if let Next::Close = self.advance(index, now)? {
            self.close(index);
        }
        Ok(())
    }

    /// The connection's operation of `kind` completed with `result`.
    fn completed(
        &mut self,
        index: usize,
        kind: u64,
        result: i32,
        now: Instant,
    ) -> io::Result<Next> {
        let Some(connection) = self.connections[index].as_mut() else {
            return Ok(Next::Close);
        };
        match kind {
            KIND_RECV => {
                if result <= 0 {
                    return Ok(Next::Close); // closed by the client, or reset
                }
                // SAFETY: the kernel wrote `result` bytes into the spare
                // room the `recv` was given.
                let input = connection.state.input();
                unsafe { input.set_len(input.len() + result as usize) };
                connection.state.received(now);
            }
            KIND_SEND => {
                if result < 0 {
                    return Ok(Next::Close);
                }
                let body = connection.state.sent(result as u64, now);
                self.service.stats.body_written(body);
            }
            _ => {} // POLLOUT: the socket has room again
        }
        self.advance(index, now)
    }

    /// Hands `entry`, an operation of connection `index`, to the kernel.
    fn start(&mut self, index: usize, kind: u64, entry: squeue::Entry) -> io::Result<Next> {
        let connection = self.connections[index].as_mut().expect("live connection");
        connection.in_flight = true;
        let entry = entry.user_data(user_data(kind, index, connection.generation));
        self.push(entry)?;
        Ok(Next::Wait)
    }

    /// Sends the connection's answer, all of it in memory, linked to the
    /// `recv` of its next request; the answer counts as sent from here.
    fn answer_and_receive(&mut self, index: usize, now: Instant) -> io::Result<Next> {
        let connection = self.connections[index].as_mut().expect("live connection");
        let writing = connection.writing.take().expect("an answer to send");
        report(
            &self.service,
            connection.peer,
            &writing.response,
            &connection.state,
        );
        connection.state.finish_response(now);
        let answer = writing.response.head;
        let fd = types::Fd(connection.socket.as_raw_fd());
        let send = opcode::Send::new(fd, answer.as_ptr(), answer.len() as u32)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
            .build()
            .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data(KIND_LINKED_SEND, index, connection.generation));
        // The answer's heap buffer stays put while the Vec is moved.
        connection.linked_answer = Some(answer);
        let input = connection.state.input();
        input.reserve(READ_CHUNK);
        let spare = input.spare_capacity_mut();
        let recv = opcode::Recv::new(fd, spare.as_mut_ptr().cast(), spare.len() as u32).build();
        // Both entries must land in the same submission, in order: make
        // room for the pair first.
        let room = {
            let queue = self.ring.submission();
            queue.capacity() - queue.len()
        };
        if room < 2 {
            self.ring.submit()?;
        }
        self.push(send)?;
        self.start(index, KIND_RECV, recv)
    }

    /// Runs the connection's state machine until it needs the kernel.
    fn advance(&mut self, index: usize, now: Instant) -> io::Result<Next> {
        loop {
            let connection = self.connections[index].as_mut().expect("live connection");
            if let Some(writing) = connection.writing.as_mut() {
                if self.link_send_to_recv
                    && !connection.state.has_input()
                    && connection.state.response_untouched()
                    && writing.is_whole_answer_in_memory()
                {
                    return self.answer_and_receive(index, now);
                }
                match step_writing(
                    connection.socket.as_raw_fd(),
                    writing,
                    &mut connection.state,
                    &self.service.stats,
                ) {
                    Step::Done => {
                        let writing = connection.writing.take().expect("writing");
                        report(
                            &self.service,
                            connection.peer,
                            &writing.response,
                            &connection.state,
                        );
                        if connection.state.finish_response(now) == AfterResponse::Close {
                            return Ok(Next::Close);
                        }
                        continue;
                    }
                    Step::Send(entry) => return self.start(index, KIND_SEND, entry),
                    Step::WaitWritable => {
                        let socket = types::Fd(connection.socket.as_raw_fd());
                        let entry = opcode::PollAdd::new(socket, libc::POLLOUT as u32).build();
                        return self.start(index, KIND_POLL_OUT, entry);
                    }
                    Step::Failed(error) => {
                        debug!(peer = %connection.peer, %error, "HTTP response not sent");
                        let writing = connection.writing.take().expect("writing");
                        report(
                            &self.service,
                            connection.peer,
                            &writing.response,
                            &connection.state,
                        );
                        return Ok(Next::Close);
                    }
                }
            }
            match connection.state.poll_request(now) {
                Polled::Request(request) => {
                    let Some(response) = self.service.respond_without_blocking(
                        &request,
                        connection.local,
                        connection.peer,
                    ) else {
                        self.answer_in_pool(index, request);
                        return Ok(Next::Wait);
                    };
                    let by_sendfile = body_by_sendfile(&self.config, &self.open);
                    self.service.stats.response_started(&response, by_sendfile);
                    connection.begin(response, false, by_sendfile, now);
                }
                Polled::Invalid(status, why) => {
                    debug!(peer = %connection.peer, status, why, "bad request");
                    let response = self.service.invalid(status, why);
                    let by_sendfile = body_by_sendfile(&self.config, &self.open);
                    self.service.stats.response_started(&response, by_sendfile);
                    connection.begin(response, true, by_sendfile, now);
                }
                Polled::NeedMore => {
                    let input = connection.state.input();
                    if input.capacity() - input.len() < READ_CHUNK / 2 {
                        input.reserve(READ_CHUNK);
                    }
                    let spare = input.spare_capacity_mut();
                    let entry = opcode::Recv::new(
                        types::Fd(connection.socket.as_raw_fd()),
                        spare.as_mut_ptr().cast(),
                        spare.len() as u32,
                    )
                    .build();
                    return self.start(index, KIND_RECV, entry);
                }
            }
        }
    }

    /// Cancels the operations of connections past their timeouts.
    fn sweep(&mut self, now: Instant) -> io::Result<()> {
        if std::mem::take(&mut self.accept_paused) {
            self.arm_accept()?;
        }
        for index in 0..self.connections.len() {
            let Some(connection) = self.connections[index].as_mut() else {
                continue;
            };
            if !connection.in_flight || connection.cancelled.is_some() {
                continue;
            }
            let why = match connection.state.expired(now) {
                None => continue,
                Some(Expiry::HeadTimeout) => Cancelled::HeadTimeout,
                Some(Expiry::Idle) => Cancelled::Close,
                Some(Expiry::SendTimeout) => {
                    debug!(peer = %connection.peer, "client took no bytes within send_timeout; dropped");
                    Cancelled::Close
                }
            };
            connection.cancelled = Some(why);
            let kind = match connection.writing.as_ref() {
                Some(w) if w.waiting_writable => KIND_POLL_OUT,
                Some(_) => KIND_SEND,
                None => KIND_RECV,
            };
            // A client that has not taken a linked answer yet: the recv
            // behind it is not armed until the send is cancelled.
            let linked_send = connection
                .linked_answer
                .is_some()
                .then(|| user_data(KIND_LINKED_SEND, index, connection.generation));
            let own = user_data(kind, index, connection.generation);
            for target in std::iter::once(own).chain(linked_send) {
                let entry = opcode::AsyncCancel::new(target)
                    .build()
                    .user_data(user_data(KIND_CANCEL, index, 0));
                self.push(entry)?;
            }
        }
        Ok(())
    }

    /// Closes the connection (it has nothing in the kernel).
    fn close(&mut self, index: usize) {
        if let Some(connection) = self.connections[index].take() {
            debug_assert!(!connection.in_flight);
            if let Some(writing) = connection.writing {
                // A response cut short still counts as served (status 499).
                report(
                    &self.service,
                    connection.peer,
                    &writing.response,
                    &connection.state,
                );
            }
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.service.stats.open_connections.dec();
            self.free.push(index);
        }
    }

    /// Cancels everything still in the kernel and waits for it, so no
    /// connection's memory is freed under an operation.
    fn cancel_everything(&mut self) {
        cancel_in_flight(&mut self.ring);
        let open = self.connections.iter().flatten().count();
        self.open.fetch_sub(open, Ordering::Relaxed);
        self.service.stats.open_connections.add(-(open as i64));
    }
}

impl Connection {
    /// Begins writing `response` at `now`; see [`Response::start_on`].
    fn begin(&mut self, response: Response, close_after: bool, by_sendfile: bool, now: Instant) {
        response.start_on(&mut self.state, by_sendfile, close_after, now);
        self.writing = Some(Writing {
            response,
            close_after,
            waiting_writable: false,
            corked: false,
        });
    }
}

impl Writing {
    /// A response that is nothing but its head (a script or any small
    /// body is written into the head), on a connection that stays open,
    /// and not a served file (whose boot event must say how many bytes
    /// really went out).
    fn is_whole_answer_in_memory(&self) -> bool {
        self.response.segments.is_empty()
            && self.response.keep_alive
            && !self.close_after
            && self.response.served_path.is_none()
    }
}

/// Tells the service a response has ended, sent in full or not.
fn report(service: &HttpService, peer: SocketAddr, response: &Response, state: &HttpConnection) {
    let (sent_body, started) = state.response_progress().unwrap_or((0, Instant::now()));
    service.finished(response, peer, sent_body, started.elapsed());
}

/// The next thing a response needs.
enum Step {
    Done,
    /// Submit this `send` (its user data is set by the caller).
    Send(squeue::Entry),
    /// The socket is full; wait for `POLLOUT`, then go on.
    WaitWritable,
    Failed(io::Error),
}

/// Whether a file body that starts now goes by `sendfile`, as `http.body`
/// decides for the connections `open` now (asked once per response).
fn body_by_sendfile(config: &HttpConfig, open: &AtomicUsize) -> bool {
    config.body.uses_sendfile(open.load(Ordering::Relaxed))
}

/// The connection in slot `index`, if it is still the one of `generation`
/// (a completion may outlive its connection).
fn live_connection(
    connections: &mut [Option<Connection>],
    index: usize,
    generation: u32,
) -> Option<&mut Connection> {
    connections
        .get_mut(index)
        .and_then(Option::as_mut)
        .filter(|c| c.generation == generation)
}

/// Moves a response on, as the connection's state machine directs: sends
/// file slices by `sendfile` until the socket is full, and returns the
/// `send` for a piece of bytes. The entry points into `writing.response`,
/// which stays in place until the completion. Every error is the
/// connection's own ([`Step::Failed`]): none ends the worker. Body bytes
/// sent here are taken off `stats`' bytes in flight.
fn step_writing(
    socket: libc::c_int,
    writing: &mut Writing,
    state: &mut HttpConnection,
    stats: &HttpStats,
) -> Step {
    writing.waiting_writable = false;
    loop {
        match state.poll_transmit() {
            Transmit::Done => {
                if writing.corked {
                    writing.corked = false;
                    if let Err(error) = set_cork(socket, false) {
                        return Step::Failed(error);
                    }
                }
                return Step::Done;
            }
            Transmit::SendFile { piece, from } => {
                let (file_fd, offset, len) = writing
                    .response
                    .file_piece(piece)
                    .expect("sendfile is only chosen for an open file's slice");
                // A socket error ends this connection only, like every
                // other error of its response.
                if let Err(error) = cork_before_sendfile(socket, len, &mut writing.corked) {
                    return Step::Failed(error);
                }
                match send_file(socket, file_fd, offset + from, len - from, state, stats) {
                    Ok(true) => continue,
                    Ok(false) => {
                        writing.waiting_writable = true;
                        return Step::WaitWritable;
                    }
                    Err(error) => return Step::Failed(error),
                }
            }
            Transmit::Send { piece, from, more } => {
                let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
                let rest = &writing.response.piece_bytes(piece)[from as usize..];
                let len = rest.len().min(u32::MAX as usize) as u32;
                let entry = opcode::Send::new(types::Fd(socket), rest.as_ptr(), len)
                    .flags(flags)
                    .build();
                return Step::Send(entry);
            }
        }
    }
}

/// `sendfile(2)` of `len` bytes at `offset` until they are all sent (true)
/// or the socket is full (false), each step reported to `state` and
/// `stats`.
fn send_file(
    socket: libc::c_int,
    file_fd: libc::c_int,
    offset: u64,
    len: u64,
    state: &mut HttpConnection,
    stats: &HttpStats,
) -> io::Result<bool> {
    let mut done = 0;
    while done < len {
        let mut position = (offset + done) as libc::off_t;
        let chunk = ((len - done) as usize).min(1 << 30);
        // SAFETY: both descriptors are open; the kernel advances `position`.
        let n = unsafe { libc::sendfile(socket, file_fd, &mut position, chunk) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::WouldBlock {
                return Ok(false);
            }
            return Err(error);
        }
        if n == 0 {
            // The file shrank under us: the promised length cannot be met.
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being sent",
            ));
        }
        done += n as u64;
        stats.body_written(state.sent(n as u64, Instant::now()));
    }
    Ok(true)
}
