//! The IPv6 Router Solicitation responder on the DHCP interfaces: one raw
//! ICMPv6 socket per interface (bound to it, joined to all-routers
//! `ff02::2`, kernel-filtered to solicitations), answering with the
//! advertisement of [`crate::proto::ndp`] to all-nodes `ff02::1`, paced by
//! its [`Pacer`]. It runs as tasks of the DHCP runtime.
//!
//! A raw socket needs `CAP_NET_RAW`. Without it the responder logs one line
//! saying so and the rest of bootfleet serves on; machines then wait out
//! iPXE's IPv6 timeout as they would with any other server.

use std::io::Read;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::Instant;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::{debug, info, warn};

use crate::proto::ndp::{
    is_router_solicitation, router_advertisement, Pacer, NDP_HOP_LIMIT, ROUTER_SOLICITATION,
};

const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// `ICMP6_FILTER` (RFC 3542 §3.2) at level `IPPROTO_ICMPV6`; the libc crate
/// does not export it for Linux.
const ICMP6_FILTER: libc::c_int = 1;

/// One interface's responder socket.
pub struct Responder {
    name: String,
    index: u32,
    advertisement: Vec<u8>,
    socket: Socket,
}

/// Opens the responder socket for interface `name`.
pub fn responder(name: &str) -> std::io::Result<Responder> {
    let index = nix::net::if_::if_nametoindex(name).map_err(std::io::Error::from)?;
    let socket = Socket::new(
        Domain::IPV6,
        Type::RAW.nonblocking().cloexec(),
        Some(Protocol::ICMPV6),
    )?;
    socket.bind_device(Some(name.as_bytes()))?;
    pass_only(&socket, ROUTER_SOLICITATION)?;
    socket.join_multicast_v6(&ALL_ROUTERS, index)?;
    socket.set_multicast_if_v6(index)?;
    socket.set_multicast_hops_v6(NDP_HOP_LIMIT)?;
    socket.set_unicast_hops_v6(NDP_HOP_LIMIT)?;
    socket.set_multicast_loop_v6(false)?;
    Ok(Responder {
        name: name.to_string(),
        index,
        advertisement: router_advertisement(link_address(name)),
        socket,
    })
}

/// Lets only ICMPv6 messages of `icmp_type` reach `socket`: a boot LAN's
/// neighbour traffic is not ours to read. (In Linux's filter a set bit
/// blocks.)
fn pass_only(socket: &Socket, icmp_type: u8) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut filter = [u32::MAX; 8];
    filter[usize::from(icmp_type >> 5)] &= !(1u32 << (icmp_type & 31));
    // SAFETY: `filter` is the 32-byte `struct icmp6_filter` the option
    // takes, alive for the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMP6_FILTER,
            filter.as_ptr().cast(),
            std::mem::size_of_val(&filter) as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The interface's hardware address, for the advertisement's
/// source link-layer address option.
fn link_address(name: &str) -> Option<[u8; 6]> {
    nix::ifaddrs::getifaddrs()
        .ok()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address.as_ref()?.as_link_addr()?.addr())
}

impl Responder {
    /// Answers solicitations until the task is dropped.
    pub async fn serve(self) {
        let Responder {
            name,
            index,
            advertisement,
            socket,
        } = self;
        // SAFETY: the `Socket` owns its descriptor and is moved into the
        // `AsyncFd`, so the descriptor stays open and the same until the
        // `AsyncFd` is dropped.
        let socket = match unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) } {
            Ok(socket) => socket,
            Err(error) => {
                return warn!(interface = %name, %error, "cannot register the router-solicitation socket")
            }
        };
        info!(interface = %name, "answering IPv6 router solicitations (ends iPXE's IPv6 wait)");
        let all_nodes = SocketAddrV6::new(ALL_NODES, 0, 0, index).into();
        let mut pacer = Pacer::default();
        let mut buffer = [0u8; 1500];
        loop {
            let deadline = pacer.poll_timeout();
            tokio::select! {
                ready = socket.readable() => {
                    let Ok(mut guard) = ready else { return };
                    loop {
                        match guard.try_io(|inner| (&mut inner.get_ref()).read(&mut buffer)) {
                            Ok(Ok(length)) => {
                                if is_router_solicitation(&buffer[..length]) {
                                    pacer.solicited();
                                } else {
                                    debug!(interface = %name, length, "malformed router solicitation ignored");
                                }
                            }
                            Ok(Err(error)) => {
                                debug!(interface = %name, %error, "router-solicitation socket read failed");
                                break;
                            }
                            Err(_would_block) => break,
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
            if pacer.poll_transmit(Instant::now()) {
                match socket.get_ref().send_to(&advertisement, &all_nodes) {
                    Ok(_) => debug!(interface = %name, "router advertisement sent"),
                    Err(error) => {
                        debug!(interface = %name, %error, "router advertisement not sent")
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
}
