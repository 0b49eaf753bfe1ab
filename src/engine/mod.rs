//! The data-plane engine: the only place with socket syscalls.
//!
//! Two backends run the same [`TftpService`] and the same
//! [`HttpService`](crate::server::http::HttpService):
//!
//! * io_uring — one thread per core for each protocol, each driving its
//!   own ring: [`uring`] for TFTP (multishot receive into a provided buffer
//!   ring, batched submissions, UDP GSO for windowed bursts) and
//!   [`http_uring`] for HTTP (multishot accept, one receive or send per
//!   connection in the kernel, `sendfile` for file bodies).
//! * epoll — tokio runtimes: [`epoll`] for TFTP and [`http`] for HTTP;
//!   always available.
//!
//! Beside them, for both backends: [`dhcp`] (one socket and thread per
//! interface), [`ndp`] (router advertisements) and [`multicast`] (RFC 2090
//! TFTP sessions, one tokio thread). Windows of TFTP blocks leave by UDP
//! GSO on every path ([`gso`]).
//!
//! [`choose`] probes the kernel at start-up: `auto` takes io_uring when the
//! kernel offers everything the worker needs (a ring, multishot receive,
//! provided buffer rings) and otherwise falls back to epoll, saying why.
//! Servers take already-bound sockets and a [`Shutdown`] token, so tests bind
//! port 0 and a service manager can hand sockets in.

use std::net::UdpSocket;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::config::EngineChoice;
use crate::server::tftp::TftpService;
pub use crate::shutdown::Shutdown;

pub mod blocking;
pub mod dhcp;
pub mod dhcp_share;
pub mod epoll;
pub mod gso;
pub mod http;
pub mod http_uring;
pub mod https;
pub mod multicast;
pub mod ndp;
pub mod port_owner;
pub mod uring;

/// The backend actually running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    IoUring,
    Epoll,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io-uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// Why the engine could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("io_uring was requested but is not usable here: {0} (use --engine epoll or auto)")]
    IoUringUnavailable(String),
    #[error("cannot start data-plane worker: {0}")]
    Spawn(#[from] std::io::Error),
}

/// Picks the backend for `choice`; returns it and, for a fallback, why.
pub fn choose(choice: EngineChoice) -> Result<(Backend, Option<String>), EngineError> {
    match choice {
        EngineChoice::Epoll => Ok((Backend::Epoll, None)),
        EngineChoice::IoUring => uring::probe()
            .map(|()| (Backend::IoUring, None))
            .map_err(EngineError::IoUringUnavailable),
        EngineChoice::Auto => match uring::probe() {
            Ok(()) => Ok((Backend::IoUring, None)),
            Err(why) => Ok((Backend::Epoll, Some(why))),
        },
    }
}

/// A running TFTP server: its worker threads.
pub struct ServerHandle {
    pub backend: Backend,
    threads: Vec<JoinHandle<()>>,
}

impl ServerHandle {
    /// Waits for every worker to end (after [`Shutdown::trigger`]).
    pub fn join(self) {
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Open HTTP connections per client address, over all workers, against
/// `http.max_connections_per_client`. A slot is taken when a connection is
/// accepted and given back when its [`ClientSlot`] drops.
#[derive(Debug)]
pub struct ClientConnections {
    max_per_client: usize,
    open: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// One admitted connection's place in [`ClientConnections`].
#[derive(Debug)]
pub struct ClientSlot {
    table: Arc<ClientConnections>,
    client: std::net::IpAddr,
}

impl ClientConnections {
    pub fn new(max_per_client: usize) -> Arc<Self> {
        Arc::new(Self {
            max_per_client: max_per_client.max(1),
            open: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// A slot for a new connection from `client`, or `None` when it holds
    /// its share already.
    pub fn admit(self: &Arc<Self>, client: std::net::IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client).or_insert(0);
        if *count >= self.max_per_client {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            table: Arc::clone(self),
            client,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Number of workers for a configured value (0: one per core).
/// The current thread's name, which names its heartbeat.
pub(crate) fn worker_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("bootfleet-worker")
        .to_string()
}

pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        configured
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Starts serving TFTP on `listener` with `backend`.
pub fn spawn_tftp(
    backend: Backend,
    listener: UdpSocket,
    service: Arc<TftpService>,
    workers: usize,
    shutdown: Shutdown,
) -> Result<ServerHandle, EngineError> {
    deepen_receive_queue(&listener);
    let workers = worker_count(workers);
    let threads = match backend {
        Backend::IoUring => uring::spawn(listener, service, workers, shutdown)?,
        Backend::Epoll => epoll::spawn(listener, service, workers, shutdown)?,
    };
    Ok(ServerHandle { backend, threads })
}

/// A deep receive queue on a listening socket (TFTP, DHCP): at cluster
/// power-on thousands of requests arrive within milliseconds, and a
/// request dropped here costs its client a whole retry interval (1 s for
/// iPXE, 4 s for PXE firmware).
pub fn deepen_receive_queue(listener: &UdpSocket) {
    let socket = socket2::SockRef::from(listener);
    const WANT: usize = 16 << 20;
    // SO_RCVBUFFORCE works for root/CAP_NET_ADMIN past rmem_max; otherwise
    // the ordinary option gives what the system allows.
    if socket.set_recv_buffer_size(WANT).is_ok() {
        let _ = force_recv_buffer(listener, WANT);
    }
}

fn force_recv_buffer(listener: &UdpSocket, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = bytes as libc::c_int;
    // SAFETY: a plain setsockopt on a valid fd with a correctly sized value.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// File slices from this size up go out corked (`TCP_CORK`) when they go
/// by `sendfile`, as with nginx's `tcp_nopush`: while the cork is on only
/// full segments leave, not a short one at the end of every `sendfile`
/// call, and taking it off when the response ends pushes the last one.
///
/// Measured on the HTTP benchmark's points (`wrk -t1`, server on one core,
/// alternating runs): 100 MB bodies to 512 connections, which go out in
/// hundreds of `sendfile` calls each, cost 0.19-0.25 CPU-s/GB corked
/// against 0.23-0.27 not; 1 MiB ranges to 64 connections, one or two
/// calls each, cost 0.50 corked against 0.44 not, and 10 MB bodies were no
/// better corked. So only bodies that need many calls are corked.
pub const CORK_FILE_SLICES_FROM: u64 = 32 << 20;

/// Before a `sendfile` slice of `len` bytes: puts the cork on if the
/// slice is large enough and the response is not corked yet (`corked`
/// says so, and is set). The response takes it off with [`set_cork`] when
/// it ends.
pub fn cork_before_sendfile(
    socket: std::os::fd::RawFd,
    len: u64,
    corked: &mut bool,
) -> std::io::Result<()> {
    if !*corked && len >= CORK_FILE_SLICES_FROM {
        set_cork(socket, true)?;
        *corked = true;
    }
    Ok(())
}

/// Sets or clears `TCP_CORK` on a connection's socket (see
/// [`CORK_FILE_SLICES_FROM`]).
pub fn set_cork(socket: std::os::fd::RawFd, cork: bool) -> std::io::Result<()> {
    // SAFETY: the caller's connection owns the open socket for the length
    // of this call.
    let socket = unsafe { std::os::fd::BorrowedFd::borrow_raw(socket) };
    socket2::SockRef::from(&socket).set_cork(cork)
}

/// A UDP socket for one transfer: bound to the listener's address on a fresh
/// port (the server's TID, RFC 1350 §4) and connected to the client, so the
/// kernel only delivers the client's datagrams to it.
pub fn transfer_socket(
    listener_addr: std::net::SocketAddr,
    peer: std::net::SocketAddr,
) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let local = std::net::SocketAddr::new(listener_addr.ip(), 0);
    let socket = Socket::new(
        Domain::for_address(local),
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    Ok(socket)
}
