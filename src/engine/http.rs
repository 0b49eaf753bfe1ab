//! The HTTP engine of the epoll backend: accepting connections, reading
//! request heads, keep-alive and pipelining, timeouts, and writing
//! responses whose file bodies go to the socket by `sendfile(2)` (corked
//! for large slices, see [`super::CORK_FILE_SLICES_FROM`]) or from the
//! mapping. [`super::http_uring`] is the same on io_uring.
//!
//! It runs on tokio, one single-threaded runtime per worker. Each
//! connection is one task:
//! it parses every complete head in its buffer in order, so pipelined
//! requests are answered in order, and writes each response before it
//! reads the next one, so a client that does not read its responses only
//! holds its own connection.
//!
//! What to do with the bytes — parsing, pipelining, the header, idle and
//! send timeouts (and the 408), how each piece of a response goes out — is
//! decided by the sans-I/O [`crate::proto::http::connection::Connection`]
//! that the io_uring engine drives too; this engine only reads, writes and
//! waits, with a timer at the connection's next deadline. Connections
//! beyond `max_connections` get a 503 with `Retry-After` and are closed at
//! once.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use super::{cork_before_sendfile, set_cork, ClientConnections, Shutdown};
use crate::config::HttpConfig;
use crate::proto::http::connection::{
    AfterResponse, Connection, Expiry, Limits, Polled, Transmit, BUSY_RESPONSE,
};
use crate::server::http::{HttpService, Response};

/// Starts serving HTTP on `listener` with `workers` runtime threads.
pub fn spawn(
    listener: std::net::TcpListener,
    service: Arc<HttpService>,
    config: HttpConfig,
    workers: usize,
    shutdown: Shutdown,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    listener.set_nonblocking(true)?;
    // One single-threaded runtime per worker, each accepting from the same
    // listening socket: a connection stays on the thread that accepted it,
    // and a thread serves its connections in turn (FIFO), which keeps tail
    // latency low at hundreds of connections per core.
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let clients = ClientConnections::new(config.max_connections_per_client);
    let mut threads = Vec::new();
    for index in 0..workers.max(1) {
        let listener = listener.try_clone()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (service, config, slots, clients, shutdown) = (
            Arc::clone(&service),
            Arc::clone(&config),
            Arc::clone(&slots),
            Arc::clone(&clients),
            shutdown.clone(),
        );
        threads.push(
            std::thread::Builder::new()
                .name(format!("bootfleet-http-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        shutdown.beat_from_runtime(super::worker_name());
                        let listener = match TcpListener::from_std(listener) {
                            Ok(listener) => listener,
                            Err(error) => {
                                warn!(%error, "cannot register the HTTP listener");
                                return;
                            }
                        };
                        accept_loop(listener, service, config, slots, clients, shutdown).await;
                    });
                    runtime.shutdown_timeout(Duration::from_secs(1));
                })?,
        );
    }
    Ok(threads)
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<HttpService>,
    config: Arc<HttpConfig>,
    slots: Arc<Semaphore>,
    clients: Arc<ClientConnections>,
    shutdown: Shutdown,
) {
    let mut warned_fds = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE) | Some(libc::ENFILE)
                ) =>
            {
                if !warned_fds {
                    warn!(%error, "out of file descriptors accepting HTTP connections; raise LimitNOFILE");
                    warned_fds = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(error) => {
                debug!(%error, "accept failed");
                continue;
            }
        };
        let Some(client_slot) = clients.admit(peer.ip()) else {
            debug!(%peer, "HTTP connection limit per client reached (http.max_connections_per_client); answering 503");
            let _ = stream.try_write(BUSY_RESPONSE);
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            debug!(%peer, "HTTP connection limit reached; answering 503");
            let _ = stream.try_write(BUSY_RESPONSE);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| listener.local_addr().expect("bound listener"));
        let service = Arc::clone(&service);
        let config = Arc::clone(&config);
        let shutdown = shutdown.clone();
        let connection_slots = Arc::clone(&slots);
        service.stats.open_connections.inc();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait() => {}
                result = connection(&stream, local, peer, &service, &config, &connection_slots) => {
                    if let Err(error) = result {
                        debug!(%peer, %error, "HTTP connection ended");
                    }
                }
            }
            service.stats.open_connections.dec();
            drop(permit);
            drop(client_slot);
        });
    }
}

/// Why a connection stopped reading.
enum ReadEnd {
    Closed,
    TimedOut,
}

/// The connection's limits, from `[http]`.
pub(super) fn limits(config: &HttpConfig) -> Limits {
    Limits {
        max_header_bytes: config.max_header_bytes,
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        send_timeout: config.send_timeout,
    }
}

/// Serves one connection: the state machine of
/// [`crate::proto::http::connection`] decides, this task reads and writes.
async fn connection(
    stream: &TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    service: &Arc<HttpService>,
    config: &HttpConfig,
    slots: &Semaphore,
) -> std::io::Result<()> {
    // Whether a file body that starts now goes by `sendfile`, as
    // `http.body` decides for the connections open now.
    let by_sendfile = || {
        let open = config
            .max_connections
            .saturating_sub(slots.available_permits());
        config.body.uses_sendfile(open)
    };
    let mut state = Connection::new(limits(config), Instant::now());
    loop {
        let (response, close_after) = match state.poll_request(Instant::now()) {
            Polled::Request(request) => {
                match service.respond_without_blocking(&request, local, peer) {
                    Some(response) => (response, false),
                    // The file system is for the runtime's blocking pool:
                    // this thread serves every connection.
                    None => {
                        let service = Arc::clone(service);
                        let answered = tokio::task::spawn_blocking(move || {
                            service.respond(&request, local, peer)
                        });
                        match answered.await {
                            Ok(response) => (response, false),
                            Err(error) => {
                                warn!(%peer, %error, "HTTP answer not made; connection closed");
                                return Ok(());
                            }
                        }
                    }
                }
            }
            Polled::Invalid(status, why) => {
                debug!(%peer, status, why, "bad request");
                (service.invalid(status, why), true)
            }
            Polled::NeedMore => {
                let (deadline, expiry) = state.deadline();
                match read_more(stream, state.input(), deadline).await {
                    Ok(()) => state.received(Instant::now()),
                    Err(ReadEnd::Closed) => return Ok(()),
                    Err(ReadEnd::TimedOut) => {
                        if expiry == Expiry::HeadTimeout {
                            debug!(%peer, "request head not complete in time; 408");
                            let response =
                                service.invalid(408, "request head not received in time");
                            let _ = write_response(
                                stream,
                                &mut state,
                                &response,
                                true,
                                peer,
                                service,
                                by_sendfile(),
                            )
                            .await;
                        }
                        return Ok(());
                    }
                }
                continue;
            }
        };
        write_response(
            stream,
            &mut state,
            &response,
            close_after,
            peer,
            service,
            by_sendfile(),
        )
        .await?;
        if state.finish_response(Instant::now()) == AfterResponse::Close {
            return Ok(());
        }
    }
}

async fn read_more(
    stream: &TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<(), ReadEnd> {
    buf.reserve(2048);
    let read = tokio::time::timeout_at(deadline.into(), async {
        loop {
            stream.readable().await?;
            if let Some(result) = read_once(stream, buf) {
                return result;
            }
        }
    })
    .await;
    match read {
        Err(_) => Err(ReadEnd::TimedOut),
        Ok(Ok(0)) | Ok(Err(_)) => Err(ReadEnd::Closed),
        Ok(Ok(_)) => Ok(()),
    }
}

/// One `recv` into the spare capacity of `buf`; `None` when nothing was
/// waiting after all.
///
/// A read that leaves room in the buffer has drained the socket, so it also
/// drops the socket's readiness (by answering `WouldBlock` to `try_io`);
/// otherwise the next request would begin with a `recv` that can only say
/// `EAGAIN` — one wasted system call per request on a kept-alive connection.
/// Data that arrives after the `recv` raises a new readiness event, so
/// nothing is missed.
fn read_once(stream: &TcpStream, buf: &mut Vec<u8>) -> Option<std::io::Result<usize>> {
    let mut outcome = None;
    let _ = stream.try_io(Interest::READABLE, || {
        let spare = buf.spare_capacity_mut();
        // SAFETY: receives into the vector's spare capacity, whose length is
        // passed; `set_len` below covers only the bytes the kernel wrote.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                return Err(error);
            }
            outcome = Some(Err(error));
            return Ok(());
        }
        let n = n as usize;
        let drained = n > 0 && n < spare.len();
        // SAFETY: the kernel initialised `n` bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        outcome = Some(Ok(n));
        if drained {
            Err(std::io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    outcome
}

/// Writes `response` as the connection's state machine directs, within
/// its send timeout, and reports it to the service however it ended.
async fn write_response(
    stream: &TcpStream,
    state: &mut Connection,
    response: &Response,
    close_after: bool,
    peer: SocketAddr,
    service: &HttpService,
    by_sendfile: bool,
) -> std::io::Result<()> {
    service.stats.response_started(response, by_sendfile);
    response.start_on(state, by_sendfile, close_after, Instant::now());
    let mut corked = false;
    let result = async {
        loop {
            let deadline = state.deadline().0;
            let sent = match state.poll_transmit() {
                Transmit::Done => break,
                Transmit::Send { piece, from, more } => {
                    let bytes = &response.piece_bytes(piece)[from as usize..];
                    send_some(stream, bytes, more, deadline).await?
                }
                Transmit::SendFile { piece, from } => {
                    let (file_fd, offset, len) = response
                        .file_piece(piece)
                        .expect("sendfile is only chosen for an open file's slice");
                    cork_before_sendfile(stream.as_raw_fd(), len, &mut corked)?;
                    send_file(stream, file_fd, offset + from, len - from, deadline).await?
                }
            };
            service.stats.body_written(state.sent(sent, Instant::now()));
        }
        if corked {
            // Pushes the last short segment out.
            set_cork(stream.as_raw_fd(), false)?;
        }
        Ok::<(), std::io::Error>(())
    }
    .await;
    let (sent_body, started) = state
        .response_progress()
        .expect("the response was started above");
    service.finished(response, peer, sent_body, started.elapsed());
    result
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "client took no bytes within send_timeout",
    )
}

/// One `send` of (part of) `bytes` once the socket has room, by
/// `deadline`; `more` tells the kernel more follows at once (MSG_MORE), so
/// a head and a small body share segments.
async fn send_some(
    stream: &TcpStream,
    bytes: &[u8],
    more: bool,
    deadline: Instant,
) -> std::io::Result<u64> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    // SAFETY: sends from a valid slice on a valid socket.
    write_when_ready(stream, deadline, || unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            flags,
        )
    })
    .await
}

/// One `sendfile(2)` of up to `len` bytes at `offset` of `file_fd` once
/// the socket has room, by `deadline`.
async fn send_file(
    stream: &TcpStream,
    file_fd: std::os::fd::RawFd,
    offset: u64,
    len: u64,
    deadline: Instant,
) -> std::io::Result<u64> {
    let mut position = offset as libc::off_t;
    let chunk = (len as usize).min(1 << 30);
    // SAFETY: both descriptors are open; the kernel advances `position`.
    let n = write_when_ready(stream, deadline, || unsafe {
        libc::sendfile(stream.as_raw_fd(), file_fd, &mut position, chunk)
    })
    .await?;
    if n == 0 {
        // The file shrank under us: the promised length cannot be met.
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "file shrank while being sent",
        ));
    }
    Ok(n)
}

/// Runs `write` (a `send` or `sendfile` returning bytes written or -1) each
/// time the socket has room until it does not fail with `EAGAIN`, by
/// `deadline`.
async fn write_when_ready(
    stream: &TcpStream,
    deadline: Instant,
    mut write: impl FnMut() -> isize,
) -> std::io::Result<u64> {
    tokio::time::timeout_at(
        deadline.into(),
        stream.async_io(Interest::WRITABLE, || match write() {
            n if n < 0 => Err(std::io::Error::last_os_error()),
            n => Ok(n as u64),
        }),
    )
    .await
    .map_err(|_| timed_out())?
}
