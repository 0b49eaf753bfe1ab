//! The DHCP engine: one socket per configured interface (bound to it with
//! `SO_BINDTODEVICE`, so a request's interface is the socket it arrived
//! on, and nothing is ever answered on an interface that was not given),
//! plus port 4011 in proxy mode.
//!
//! Each socket's thread reads every datagram that is waiting (up to
//! [`BATCH`]), decides them all under one lock, writes the batch's lease
//! changes to the journal with one `fdatasync`, and only then sends the
//! replies: a power-on storm costs one disk sync per batch, not per lease,
//! and no ACK ever leaves for a lease that a crash could forget. Offers are
//! not journalled at all (a restart forgets promises, not leases). While
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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::SystemTime;

use dhcproto::v4::MessageType;
use tracing::{debug, info, warn};

use super::Shutdown;
use crate::boot::events::Phase;
use crate::boot::Router;
use crate::config::{DhcpConfig, DhcpMode};
use crate::proto::dhcp::{parse_request, Destination, CLIENT_PORT, PXE_PORT, SERVER_PORT};
use crate::proto::Mac;
use crate::server::dhcp::leases::{Journal, LeaseTable, Pool, State as LeaseState};
use crate::server::dhcp::{
    decide, relay_trusted, ClientKey, Context, Interface, Port, RateLimiter,
};

/// Most datagrams decided (and journalled) together.
pub const BATCH: usize = 256;

/// State shared by every DHCP socket.
pub struct DhcpService {
    pub config: DhcpConfig,
    pub router: Arc<Router>,
    pub http_port: u16,
    pub state: Mutex<DhcpState>,
    pub stats: DhcpStats,
}

/// Leases, their journal and the rate limiters.
pub struct DhcpState {
    pub leases: LeaseTable,
    journal: Option<Journal>,
    /// Per sending address (not 0.0.0.0).
    limiter: RateLimiter,
    /// Per client: chaddr, and giaddr when relayed.
    client_limiter: RateLimiter<ClientKey>,
}

/// Counters.
#[derive(Debug, Default)]
pub struct DhcpStats {
    pub received: std::sync::atomic::AtomicU64,
    pub replied: std::sync::atomic::AtomicU64,
    pub dropped: std::sync::atomic::AtomicU64,
}

/// The IPv4 address and prefix length of interface `name`.
pub fn interface(name: &str) -> Result<Interface, String> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list interfaces: {e}"))?;
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
    Err(format!(
        "interface {name} does not exist or has no IPv4 address"
    ))
}

impl DhcpService {
    /// The service for `config`, with pools placed on the interfaces'
    /// subnets and the lease journal replayed from `state_dir`.
    pub fn new(
        config: DhcpConfig,
        interfaces: &[Interface],
        router: Arc<Router>,
        http_port: u16,
        state_dir: &std::path::Path,
    ) -> Result<Self, String> {
        let mut pools = Vec::new();
        for &(first, last, prefix) in &config.ranges {
            let prefix_len = match prefix {
                Some(prefix) => prefix,
                None => interfaces
                    .iter()
                    .find(|i| Pool { first: i.addr, last: i.addr, prefix_len: i.prefix_len }.same_subnet(first))
                    .map(|i| i.prefix_len)
                    .ok_or_else(|| {
                        format!(
                            "dhcp range {first}-{last} is on no interface's subnet; for a relayed subnet write it as {first}-{last}/PREFIX"
                        )
                    })?,
            };
            pools.push(Pool {
                first,
                last,
                prefix_len,
            });
        }
        if config.mode == DhcpMode::Full && pools.is_empty() {
            return Err("full DHCP mode needs at least one address range (dhcp.ranges or --dhcp-range FIRST-LAST)".into());
        }
        let mut leases = LeaseTable::new(pools, config.relay_pool_share);
        let journal = if config.mode == DhcpMode::Full {
            let (mut journal, count) = Journal::open(state_dir, &mut leases, SystemTime::now())
                .map_err(|e| {
                    format!(
                        "cannot open the lease journal in {}: {e}",
                        state_dir.display()
                    )
                })?;
            journal.sync = config.sync_leases;
            info!(journal = %journal.path().display(), leases = count, synced = journal.sync, "DHCP leases restored");
            Some(journal)
        } else {
            None
        };
        let limiter = RateLimiter::new(config.max_requests_per_second_per_source);
        let client_limiter = RateLimiter::new(config.max_requests_per_second_per_client);
        Ok(Self {
            config,
            router,
            http_port,
            state: Mutex::new(DhcpState {
                leases,
                journal,
                limiter,
                client_limiter,
            }),
            stats: DhcpStats::default(),
        })
    }
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
    use std::sync::atomic::Ordering::Relaxed;
    let mut buf = vec![0u8; 2048];
    let mut batch: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    let mut busy = false;
    while !shutdown.is_triggered() {
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
        service
            .stats
            .received
            .fetch_add(batch.len() as u64, Relaxed);
        let replies = decide_batch(&batch, iface, port, service);
        for (mac, bytes, destination) in replies {
            match send(socket, iface, &bytes, destination) {
                Ok(()) => {
                    service.stats.replied.fetch_add(1, Relaxed);
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

/// Decides a batch, journals its changes, and returns the replies to send.
/// Public for `benches/dhcp_decide.rs`.
pub fn decide_batch(
    batch: &[(Vec<u8>, SocketAddr)],
    iface: &Interface,
    port: Port,
    service: &DhcpService,
) -> Vec<(Mac, Vec<u8>, Destination)> {
    use std::sync::atomic::Ordering::Relaxed;
    let now = SystemTime::now();
    let snapshot = service.router.snapshot();
    let mut replies = Vec::with_capacity(batch.len());
    let mut changes = Vec::new();
    let mut events = Vec::new();
    let mut known_clients = Vec::new();
    let mut state = service.state.lock().unwrap_or_else(|p| p.into_inner());
    for (bytes, peer) in batch {
        let (request, info) = match parse_request(bytes) {
            Ok(parsed) => parsed,
            Err(error) => {
                service.stats.dropped.fetch_add(1, Relaxed);
                debug!(%peer, %error, "DHCP datagram dropped");
                continue;
            }
        };
        let source = match peer {
            SocketAddr::V4(v4) => *v4.ip(),
            SocketAddr::V6(_) => continue,
        };
        if !relay_trusted(source, info.giaddr, &service.config.relays) {
            service.stats.dropped.fetch_add(1, Relaxed);
            debug!(%source, giaddr = %info.giaddr, mac = %info.mac,
                "relayed DHCP request not from its relay nor a listed one (dhcp.relays); dropped");
            continue;
        }
        // All unconfigured clients send from 0.0.0.0: they are told apart
        // by their MAC (and relay), never put in one bucket.
        if !source.is_unspecified() && !state.limiter.allow(source, now) {
            service.stats.dropped.fetch_add(1, Relaxed);
            debug!(%source, mac = %info.mac, "DHCP request over the per-source rate; dropped");
            continue;
        }
        if !state.client_limiter.allow((info.giaddr, info.mac), now) {
            service.stats.dropped.fetch_add(1, Relaxed);
            debug!(%source, mac = %info.mac, "DHCP request over the per-client rate; dropped");
            continue;
        }
        let ctx = Context {
            config: &service.config,
            iface,
            snapshot: &snapshot,
            port,
            peer: *peer,
            http_port: service.http_port,
            now,
        };
        let outcome = decide(&request, &info, &ctx, &mut state.leases);
        // The address this machine will fetch its loader from: the lease
        // it was given, its own (ProxyDHCP on port 4011, INFORM), or, beside
        // another DHCP server, the one it asks that server for.
        let bound = outcome
            .change
            .as_ref()
            .filter(|lease| lease.mac == info.mac && lease.state == LeaseState::Bound);
        if let Some(lease) = bound {
            known_clients.push((lease.ip, info.mac, true));
        } else if !info.giaddr.is_unspecified() {
            // Relayed: the source is the relay.
        } else if !source.is_unspecified() {
            known_clients.push((source, info.mac, false));
        } else if let (DhcpMode::Proxy, MessageType::Request, Some(ip)) =
            (service.config.mode, info.message_type, info.requested_ip)
        {
            known_clients.push((ip, info.mac, false));
        }
        // Offers are promises, not leases (RFC 2131 §4.3.1): the lease
        // table holds them in memory, and the journal, which a restart
        // replays for bound and declined addresses only, never needs them.
        // A batch of DISCOVERs therefore costs no disk write at all.
        if let Some(change) = outcome.change.filter(|c| c.state != LeaseState::Offered) {
            changes.push(change);
        }
        if let Some(summary) = outcome.summary {
            events.push((
                info.mac,
                source,
                format!("{:?}: {summary}", info.message_type),
            ));
        }
        if let Some((bytes, destination)) = outcome.reply {
            replies.push((info.mac, bytes, destination));
        }
    }
    if let Some(journal) = state.journal.as_mut() {
        if let Err(error) = journal.commit(&changes) {
            // Without the journal a restart could hand these addresses out
            // twice: answer nobody in this batch; clients retry.
            warn!(%error, leases = changes.len(), "cannot write the lease journal; this batch is not answered");
            return Vec::new();
        }
    }
    drop(state);
    for (ip, mac, leased) in known_clients {
        let client = std::net::IpAddr::V4(ip);
        if leased {
            service.router.note_lease(client, mac);
        } else {
            service.router.note_client(client, mac);
        }
    }
    for (mac, source, detail) in events {
        service.router.events.record(
            Some(mac),
            std::net::IpAddr::V4(source),
            Phase::Dhcp,
            "dhcp",
            detail,
            0,
            std::time::Duration::ZERO,
            200,
        );
    }
    replies
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::proto::dhcp::tests::{bios_pxe_discover, bios_pxe_request};
    use dhcproto::Decodable;

    fn service(sync_leases: bool, state: &std::path::Path, root: &std::path::Path) -> DhcpService {
        let mut config = Config::default().dhcp;
        config.mode = DhcpMode::Full;
        config.sync_leases = sync_leases;
        config.ranges = vec![(
            Ipv4Addr::new(10, 0, 0, 100),
            Ipv4Addr::new(10, 0, 0, 199),
            Some(24),
        )];
        let inventory = root.join(crate::inventory::FILE_NAME);
        std::fs::write(&inventory, "").unwrap();
        let router = Arc::new(Router::new(root, &inventory, state).unwrap());
        DhcpService::new(config, &[], router, 80, state).unwrap()
    }

    #[test]
    fn offers_cost_no_journal_line_and_sync_leases_is_obeyed() {
        let root = tempfile::tempdir().unwrap();
        for sync in [true, false] {
            let state = tempfile::tempdir().unwrap();
            let service = service(sync, state.path(), root.path());
            let journal = state.path().join("dhcp-leases.jsonl");
            let iface = Interface {
                name: "veth0".into(),
                addr: Ipv4Addr::new(10, 0, 0, 1),
                prefix_len: 24,
            };
            let peer = SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT));
            assert_eq!(
                service.state.lock().unwrap().journal.as_ref().unwrap().sync,
                sync
            );

            let offers = decide_batch(&[(bios_pxe_discover(), peer)], &iface, Port::Dhcp, &service);
            assert_eq!(offers.len(), 1, "one OFFER");
            assert_eq!(
                std::fs::read_to_string(&journal).unwrap(),
                "",
                "an offer is not journalled"
            );

            let offered = dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&offers[0].1))
                .unwrap()
                .yiaddr();
            let acks = decide_batch(
                &[(bios_pxe_request(offered, iface.addr), peer)],
                &iface,
                Port::Dhcp,
                &service,
            );
            assert_eq!(acks.len(), 1, "one ACK");
            let lines = std::fs::read_to_string(&journal).unwrap();
            assert_eq!(
                lines.lines().count(),
                1,
                "the bound lease is journalled: {lines}"
            );
            assert!(
                lines.contains(&offered.to_string()) && lines.contains("\"bound\""),
                "{lines}"
            );
        }
    }

    fn iface() -> Interface {
        Interface {
            name: "veth0".into(),
            addr: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 24,
        }
    }

    /// Security review finding 4: the rate limit keyed on the source
    /// address, and every unconfigured client sends from 0.0.0.0, so one
    /// noisy MAC put every booting machine over the limit. Now each client
    /// (chaddr, and giaddr when relayed) has its own budget.
    #[test]
    fn one_noisy_mac_does_not_slow_the_others() {
        use crate::proto::dhcp::tests::raw_request;
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let service = service(false, state.path(), root.path());
        let peer = SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT));
        let noisy: Vec<_> = (0..1000).map(|_| (bios_pxe_discover(), peer)).collect();
        let answered = decide_batch(&noisy, &iface(), Port::Dhcp, &service).len();
        let budget = service.config.max_requests_per_second_per_client as usize;
        assert!(
            answered <= budget + 1,
            "the noisy MAC got {answered} answers"
        );
        let others: Vec<_> = (0..200u8)
            .map(|n| {
                let discover =
                    raw_request([2, 0, 0, 0, 7, n], 0x8000, [0; 4], [0; 4], &[(53, &[1])]);
                (discover, peer)
            })
            .collect();
        let answered = decide_batch(&others, &iface(), Port::Dhcp, &service).len();
        assert_eq!(answered, 200, "every other machine is answered");
    }

    /// Security review finding 14: a relayed packet from 0.0.0.0 with a
    /// forged giaddr made the server unicast a reply to any address, and
    /// rotating giaddr dodged `relay_pool_share`. Relayed packets are now
    /// answered only from the relay they name or one listed in
    /// `dhcp.relays`.
    #[test]
    fn relayed_packets_are_answered_only_from_their_relay() {
        use crate::proto::dhcp::tests::raw_request;
        let root = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let mut service = service(false, state.path(), root.path());
        service.config.relays = vec![Ipv4Addr::new(10, 0, 0, 250)];
        let relayed = |n: u8, giaddr: [u8; 4]| {
            raw_request([2, 0, 0, 0, 8, n], 0, [0; 4], giaddr, &[(53, &[1])])
        };
        let from =
            |ip: [u8; 4]| SocketAddr::from((Ipv4Addr::from(ip), crate::proto::dhcp::SERVER_PORT));
        let forged: Vec<_> = (0..50u8)
            .map(|n| (relayed(n, [10, 0, 0, 100 + n]), from([0, 0, 0, 0])))
            .chain((0..50u8).map(|n| (relayed(100 + n, [10, 0, 0, 9]), from([10, 0, 0, 7]))))
            .collect();
        assert!(decide_batch(&forged, &iface(), Port::Dhcp, &service).is_empty());
        let genuine = [
            (relayed(200, [10, 0, 0, 9]), from([10, 0, 0, 9])),
            (relayed(201, [10, 0, 0, 9]), from([10, 0, 0, 250])),
        ];
        assert_eq!(
            decide_batch(&genuine, &iface(), Port::Dhcp, &service).len(),
            2
        );
    }
}
