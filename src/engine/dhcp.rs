//! The DHCP engine: one socket per configured interface (bound to it with
//! `SO_BINDTODEVICE`, so a request's interface is the socket it arrived
//! on, and nothing is ever answered on an interface that was not given),
//! plus port 4011 in proxy mode.
//!
//! Each socket's thread reads every datagram that is waiting (up to
//! [`BATCH`]) and hands them to the service's
//! [`crate::server::dhcp::service::decide_batch`], which
//! decides them all under one lock and journals the batch's lease changes
//! with one `fdatasync`; only then are the replies sent. A power-on storm
//! costs one disk sync per batch, not per lease, and no ACK ever leaves
//! for a lease that a crash could forget. While
//! requests keep coming, the thread sleeps `dhcp.gather_ms` between batches
//! so that each wake-up (and each disk sync) serves many requests.
//!
//! Replies to clients without an address go out as broadcasts, or as
//! unicasts to the offered address after adding the client's hardware
//! address to the neighbour table (`SIOCSARP`, needs `CAP_NET_ADMIN`; the
//! broadcast is the fallback). IPv6 router solicitations on the same
//! interfaces are answered by [`super::ndp`]. Each DHCP socket has its own
//! plain thread for both engines (`serve` says why not an async task);
//! per exchange, the cost is the kernel's wake-ups, UDP path and disk
//! syncs, which batching reduces and io_uring would not.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::{debug, info, warn};

use super::Shutdown;
use crate::config::DhcpMode;
use crate::proto::dhcp::{Destination, CLIENT_PORT, PXE_PORT, SERVER_PORT};
use crate::proto::Mac;
use crate::server::dhcp::service::{decide_batch, DhcpService};
use crate::server::dhcp::{Interface, Port};

/// Most datagrams decided (and journalled) together.
pub const BATCH: usize = 256;

/// Why a DHCP interface cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("cannot list interfaces: {0}")]
    List(nix::Error),
    #[error("interface {0} does not exist or has no IPv4 address")]
    NoAddress(String),
}

/// The IPv4 address and prefix length of interface `name`.
pub fn interface(name: &str) -> Result<Interface, InterfaceError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(InterfaceError::List)?;
    for addr in addrs.filter(|a| a.interface_name == name) {
        let (Some(ip), Some(mask)) = (
            addr.address
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
            addr.netmask
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.ip()),
        ) else {
            continue;
        };
        return Ok(Interface {
            name: name.to_string(),
            addr: ip,
            prefix_len: u32::from(mask).count_ones() as u8,
        });
    }
    Err(InterfaceError::NoAddress(name.to_string()))
}

/// A UDP socket on `port` bound to interface `name`.
pub fn interface_socket(name: &str, port: u16) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::IPV4,
        Type::DGRAM.nonblocking().cloexec(),
        Some(Protocol::UDP),
    )?;
    // Beside another DHCP server on the same host (ProxyDHCP next to
    // dnsmasq), both sockets must be allowed on port 67.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(name.as_bytes())).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind a socket to interface {name}: {e} (needs root or CAP_NET_RAW)"),
        )
    })?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot bind DHCP port {port} on {name}: {e} (another DHCP server running? ports below 1024 need CAP_NET_BIND_SERVICE)"))
    })?;
    let socket: UdpSocket = socket.into();
    super::deepen_receive_queue(&socket);
    Ok(socket)
}

/// Binds every socket the configuration needs and starts serving.
pub fn spawn(
    service: Arc<DhcpService>,
    interfaces: Vec<Interface>,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    let mut sockets = Vec::new();
    for iface in &interfaces {
        sockets.push((
            iface.clone(),
            Port::Dhcp,
            interface_socket(&iface.name, SERVER_PORT)?,
        ));
        if service.config.mode == DhcpMode::Proxy {
            sockets.push((
                iface.clone(),
                Port::Pxe,
                interface_socket(&iface.name, PXE_PORT)?,
            ));
        }
        info!(interface = %iface.name, addr = %iface.addr, prefix = iface.prefix_len, mode = ?service.config.mode, "DHCP listening");
    }
    warn_if_neighbour_table_is_small(&service.config);
    let mut responders = Vec::new();
    if service.config.answers_router_solicitations() {
        for iface in &interfaces {
            match super::ndp::responder(&iface.name) {
                Ok(responder) => responders.push(responder),
                Err(error) => warn!(
                    interface = %iface.name,
                    %error,
                    "cannot answer IPv6 router solicitations, so iPXE will wait about 15 s for IPv6 on every boot; \
                     grant CAP_NET_RAW, or set dhcp.answer_router_solicitations = false to silence this"
                ),
            }
        }
    }
    std::thread::Builder::new()
        .name("bootfleet-dhcp".into())
        .spawn(move || {
            std::thread::scope(|scope| {
                for (iface, port, socket) in &sockets {
                    let (service, shutdown) = (&service, &shutdown);
                    let spawned = std::thread::Builder::new()
                        .name(format!("bootfleet-dhcp-{}", iface.name))
                        .spawn_scoped(scope, move || serve(socket, iface, *port, service, shutdown));
                    if let Err(error) = spawned {
                        warn!(interface = %iface.name, %error, "cannot start a DHCP thread; that interface is not answered");
                    }
                }
                if responders.is_empty() {
                    return;
                }
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => return warn!(%error, "cannot start the router solicitation responder"),
                };
                runtime.block_on(async {
                    let mut tasks = Vec::new();
                    for responder in responders {
                        let shutdown = shutdown.clone();
                        tasks.push(tokio::spawn(async move {
                            tokio::select! {
                                _ = shutdown.wait() => {}
                                _ = responder.serve() => {}
                            }
                        }));
                    }
                    for task in tasks {
                        let _ = task.await;
                    }
                });
            })
        })
}

/// A server answers every machine of its LAN directly (unicast DHCP,
/// TFTP, HTTP), and the kernel keeps one neighbour entry per machine; past
/// `gc_thresh3` (1,024 by default) it drops packets to the rest, which
/// looks like a storm that stalls at random. Said once at start when the
/// pools hold more addresses than that.
fn warn_if_neighbour_table_is_small(config: &crate::config::DhcpConfig) {
    let addresses: u64 = config
        .ranges
        .iter()
        .map(|&(first, last, _)| u64::from(u32::from(last).saturating_sub(u32::from(first))) + 1)
        .sum();
    let limit = std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok());
    if let Some(limit) = limit.filter(|&limit| addresses > limit) {
        warn!(addresses, neighbour_limit = limit,
            "the DHCP pools hold more addresses than the kernel keeps neighbour entries for; with that many machines \
             booting at once, packets to some are dropped: raise net.ipv4.neigh.default.gc_thresh1/2/3 \
             (e.g. 8192/16384/32768 in /etc/sysctl.d/)");
    }
}

/// How long an idle DHCP thread waits for a datagram before it looks at
/// the shutdown flag again.
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// One socket's loop, on its own thread.
///
/// Every wake-up of the thread costs more than deciding a request (on a VM,
/// several times more), so while requests keep arriving it sleeps `gather`
/// between batches and takes all that arrived in one go, as a NIC
/// moderates its interrupts. A plain thread, not an async task, because a
/// sleeping thread that waits on nothing is not woken by arrivals, whereas
/// an event loop's socket would wake it for every datagram. An idle socket
/// is waited on with `poll`, so the first request of a burst is answered
/// at once.
fn serve(
    socket: &UdpSocket,
    iface: &Interface,
    port: Port,
    service: &DhcpService,
    shutdown: &Shutdown,
) {
    let mut buf = vec![0u8; 2048];
    let mut batch: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut busy = false;
    let heartbeat = shutdown.heartbeat(super::worker_name());
    while !shutdown.is_triggered() {
        heartbeat.beat();
        if busy {
            // Requests arrived during the last batch: let more gather.
            std::thread::sleep(service.config.gather);
        } else if !wait_readable(socket, IDLE_POLL) {
            continue;
        }
        batch.clear();
        while batch.len() < BATCH {
            match socket.recv_from(&mut buf) {
                Ok((n, peer)) => batch.push((buf[..n].to_vec(), peer)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    debug!(%error, "DHCP receive error");
                    break;
                }
            }
        }
        // A full batch means more are queued: read on without sleeping.
        busy = !batch.is_empty() && batch.len() < BATCH && !service.config.gather.is_zero();
        if batch.is_empty() {
            continue;
        }
        service.stats.received.add(batch.len() as u64);
        let replies = decide_batch(&batch, iface, port, service);
        for (mac, bytes, destination) in replies {
            match send(socket, iface, &bytes, destination) {
                Ok(()) => {
                    service.stats.replied.add(1);
                }
                Err(error) => debug!(%mac, ?destination, %error, "DHCP reply not sent"),
            }
        }
    }
}

/// Whether `socket` has a datagram waiting, after waiting up to `timeout`.
fn wait_readable(socket: &UdpSocket, timeout: std::time::Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    matches!(poll(&mut fds, timeout), Ok(ready) if ready > 0)
}

fn send(
    socket: &UdpSocket,
    iface: &Interface,
    bytes: &[u8],
    destination: Destination,
) -> std::io::Result<()> {
    if bytes.is_empty() {
        return Err(std::io::Error::other("reply could not be encoded"));
    }
    let target = match destination {
        Destination::Relay(relay) => SocketAddrV4::new(relay, SERVER_PORT),
        Destination::Unicast(ip, port) => SocketAddrV4::new(ip, port),
        Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        Destination::Hardware { ip, mac } => {
            if add_neighbour(socket, iface, ip, mac).is_ok() {
                SocketAddrV4::new(ip, CLIENT_PORT)
            } else {
                SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT)
            }
        }
    };
    socket.send_to(bytes, SocketAddr::V4(target)).map(|_| ())
}

/// Tells the kernel `ip` is at `mac` on `iface`, so a unicast reaches a
/// client that cannot answer ARP yet (what RFC 2131 §4.1 asks for).
fn add_neighbour(
    socket: &UdpSocket,
    iface: &Interface,
    ip: Ipv4Addr,
    mac: Mac,
) -> std::io::Result<()> {
    // SAFETY: arpreq is plain old data; zeroed is a valid value.
    let mut request: libc::arpreq = unsafe { std::mem::zeroed() };
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes).
    request.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(address) };
    request.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (slot, byte) in request.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *slot = byte as libc::c_char;
    }
    request.arp_flags = libc::ATF_COM;
    for (slot, byte) in request.arp_dev.iter_mut().zip(iface.name.bytes().take(15)) {
        *slot = byte as libc::c_char;
    }
    // SAFETY: SIOCSARP with a fully initialised arpreq on a valid socket.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSARP, &request) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
