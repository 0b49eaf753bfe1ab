//! The epoll fallback: a tokio runtime serving TFTP.
//!
//! One task reads the listening socket; each admitted transfer runs as its
//! own task on its own connected socket, driving the sans-I/O
//! [`Transfer`](crate::proto::tftp::Transfer): send what it asks for,
//! then wait for a datagram or its deadline. A window of blocks leaves in
//! one GSO `sendmsg` straight from the mmapped file ([`super::gso`]), or
//! datagram by datagram where the kernel refuses GSO. It is the
//! always-works path; the io_uring backend is the fast one.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::net::UdpSocket as TokioUdp;
use tracing::{debug, error};

use super::{transfer_socket, Shutdown};
use crate::proto::tftp::{packet, ReadTransfer, Transmit};
use crate::server::tftp::{Admission, Session, TftpService, IDLE_POLL};

/// Starts the runtime on its own thread.
pub fn spawn(
    listener: UdpSocket,
    service: Arc<TftpService>,
    workers: usize,
    shutdown: Shutdown,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("bootfleet-epoll")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("bootfleet-epoll-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                shutdown.beat_from_runtime("bootfleet-epoll-tftp");
                match TokioUdp::from_std(listener) {
                    Ok(listener) => serve(listener, service, shutdown).await,
                    Err(e) => error!(error = %e, "cannot register the TFTP socket with epoll"),
                }
            });
            // Transfers still running are dropped with the runtime.
            runtime.shutdown_timeout(IDLE_POLL);
        })?;
    Ok(vec![thread])
}

async fn serve(listener: TokioUdp, service: Arc<TftpService>, shutdown: Shutdown) {
    let listener = Arc::new(listener);
    let local = match listener.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            error!(error = %e, "TFTP socket has no local address");
            return;
        }
    };
    let mut buf = vec![0u8; 65536];
    loop {
        let (len, peer) = tokio::select! {
            _ = shutdown.wait() => return,
            received = listener.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    // ICMP errors surface here on some kernels; keep serving.
                    debug!(error = %e, "receive on the TFTP port failed");
                    continue;
                }
            },
        };
        let admission =
            match service.handle_request_without_blocking(&buf[..len], peer, Instant::now()) {
                Ok(admission) => admission,
                Err(request) => {
                    // The file system is for the runtime's blocking pool, not
                    // this task, which receives every request.
                    let (service, shutdown, listener) = (
                        Arc::clone(&service),
                        shutdown.clone(),
                        Arc::clone(&listener),
                    );
                    tokio::spawn(async move {
                        let decided = tokio::task::spawn_blocking({
                            let service = Arc::clone(&service);
                            move || service.handle_blocking_request(request, Instant::now())
                        });
                        if let Ok(admission) = decided.await {
                            admit(admission, peer, local, &service, &listener, &shutdown).await;
                        }
                    });
                    continue;
                }
            };
        admit(admission, peer, local, &service, &listener, &shutdown).await;
    }
}

/// Acts on what the service decided about a request from `peer`.
async fn admit(
    admission: Admission,
    peer: SocketAddr,
    local: SocketAddr,
    service: &Arc<TftpService>,
    listener: &Arc<TokioUdp>,
    shutdown: &Shutdown,
) {
    match admission {
        Admission::Start(started) => {
            let service = Arc::clone(service);
            let shutdown = shutdown.clone();
            let listener = Arc::clone(listener);
            tokio::spawn(async move {
                run_transfer(local, *started, service, listener, shutdown).await
            });
        }
        Admission::Reply(reply) => {
            if let Err(e) = listener.send_to(&reply, peer).await {
                debug!(%peer, error = %e, "cannot send TFTP error");
            }
        }
        Admission::Ignore => {}
    }
}

async fn run_transfer(
    local: SocketAddr,
    mut started: Session,
    service: Arc<TftpService>,
    listener: Arc<TokioUdp>,
    shutdown: Shutdown,
) {
    let socket =
        match transfer_socket(local, started.peer).and_then(|s| TokioUdp::from_std(s.into())) {
            Ok(socket) => socket,
            Err(e) => {
                let peer = started.peer;
                let reply = service.transfer_port_failed(started, &e);
                let _ = listener.send_to(&reply, peer).await;
                return;
            }
        };
    let mut data = super::gso::DataSender::default();
    let mut incoming = vec![0u8; 2048];
    'transfer: loop {
        if started.superseded() {
            break;
        }
        while let Some(transmit) = started.poll_transmit() {
            match send(&socket, &started, transmit, &mut data).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    debug!(peer = %started.peer, "client port closed, abandoning transfer");
                    break 'transfer;
                }
                // A firewall drop (EPERM), a full queue (ENOBUFS): the
                // retransmission timer recovers, as from any loss.
                Err(e) => debug!(peer = %started.peer, error = %e, "send failed"),
            }
        }
        if started.is_over() {
            break;
        }
        let Some(deadline) = started.poll_timeout() else {
            break;
        };
        tokio::select! {
            _ = shutdown.wait() => break,
            _ = tokio::time::sleep_until(deadline.into()) => {
                started.handle_timeout(Instant::now());
            }
            received = socket.recv(&mut incoming) => match received {
                Ok(len) => {
                    let now = Instant::now();
                    started.handle_datagram(&incoming[..len], now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    debug!(peer = %started.peer, "client port closed, abandoning transfer");
                    break;
                }
                Err(e) => debug!(peer = %started.peer, error = %e, "receive failed"),
            },
        }
    }
    service.finish(&started, Instant::now());
}

async fn send(
    socket: &TokioUdp,
    started: &Session,
    transmit: Transmit,
    data: &mut super::gso::DataSender,
) -> std::io::Result<()> {
    match transmit {
        Transmit::Control(bytes) => {
            socket.send(&bytes).await?;
        }
        Transmit::Window { first, count } => {
            let blocks: Vec<(u16, &[u8])> = (first..first + u64::from(count))
                .map(|index| (ReadTransfer::wire_block(index), started.block(index)))
                .collect();
            let segment = usize::from(started.transfer().blksize()) + packet::DATA_HEADER_LEN;
            data.send_all(socket, None, &blocks, segment).await?;
        }
    }
    Ok(())
}
