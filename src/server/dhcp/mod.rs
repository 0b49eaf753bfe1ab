//! The DHCP service: every decision is [`decide`], a function of the
//! request, the interface it arrived on, the configuration, the inventory
//! snapshot and the time, with the lease table handed in as state.
//!
//! * **Full mode** gives addresses from the pools (a machine's reserved
//!   `ip` from the inventory first), with RENEW/REBIND/RELEASE/DECLINE/
//!   INFORM; bindings are journalled before the ACK leaves ([`leases`]).
//! * **Proxy mode** (ProxyDHCP, PXE specification §2.2.5) answers only PXE,
//!   UEFI HTTP and iPXE clients, never with an address: on port 67 an OFFER
//!   with the boot file, PXE vendor options and the client's UUID echoed,
//!   and on port 4011 an ACK to the boot-server request.
//! * **The boot answer** (both modes): iPXE and gPXE get the script URL
//!   (which breaks the chainload loop); UEFI HTTP boot gets an `http://`
//!   URL with vendor class `HTTPClient`; PXE firmware gets its loader by
//!   architecture, after the configured quirks; a UEFI x64 PXE client
//!   whose image is marked `secure_boot` (or that a quirk marks so) gets
//!   the Secure Boot chain's signed shim instead. A machine the inventory
//!   marks `netboot = false` gets no boot answer (in full mode still an
//!   address). An iPXE that carries its own script (user class
//!   [`OWN_SCRIPT_USER_CLASS`], from `bootfleet ipxe build`) gets no boot
//!   file either, and in full mode this server as next server (siaddr), for
//!   a script that fetches from `${next-server}`.
//! * Relayed requests are answered through the relay (giaddr) with option 82
//!   echoed; [`reply_destination`] is RFC 2131 §4.1.

pub mod leases;
pub mod service;
pub mod shared;

pub use crate::limit::RateLimiter;

use std::net::{Ipv4Addr, SocketAddr};
use std::time::SystemTime;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Encodable, Encoder};

use crate::config::{DhcpConfig, DhcpMode};
use crate::inventory::Snapshot;
#[cfg(doc)]
use crate::proto::dhcp::OWN_SCRIPT_USER_CLASS;
use crate::proto::dhcp::{reply_destination, Arch, ClientInfo, Destination};
use leases::{epoch, Lease, LeaseTable, NoAddress, State, OFFER_HOLD};

/// The interface a request arrived on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Interface {
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len)
        };
        Ipv4Addr::from(bits)
    }
}

/// Which port the request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 67: DHCP.
    Dhcp,
    /// 4011: PXE boot-server requests (ProxyDHCP).
    Pxe,
}

/// Everything besides the request and the leases that a decision reads.
pub struct Context<'a> {
    pub config: &'a DhcpConfig,
    pub iface: &'a Interface,
    pub snapshot: &'a Snapshot,
    pub port: Port,
    /// Where the request came from (for port-4011 answers).
    pub peer: SocketAddr,
    /// This server's HTTP port (for the script URL and UEFI HTTP boot).
    pub http_port: u16,
    pub now: SystemTime,
}

/// What to do about one request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The encoded reply and where it goes.
    pub reply: Option<(Vec<u8>, Destination)>,
    /// A lease change to journal before the reply is sent.
    pub change: Option<Lease>,
    /// One line for the log and the boot events, when something was decided.
    pub summary: Option<String>,
    /// What a lease table shared with other servers should fetch so that
    /// the client's next try is answered.
    pub need: Option<Need>,
}

/// What a decision lacked that only the shared lease table has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The shared table's lease of this address (a REQUEST for an address
    /// this server has no record of: another server's lease).
    Lease(Ipv4Addr, crate::proto::Mac),
    /// More blocks of addresses: this server's ran out.
    Addresses,
}

/// What the client is told to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAnswer {
    pub file: String,
    /// `PXEClient` or `HTTPClient`, echoed in option 60.
    pub vendor_class: Option<&'static str>,
    pub arch: Arch,
}

/// The boot answer for `info`, or `None` for clients that do not netboot.
pub fn boot_answer(info: &ClientInfo, ctx: &Context<'_>) -> Option<BootAnswer> {
    if info.own_script {
        return None; // it knows its script's URL; a boot file would be ignored
    }
    if let Some(machine) = ctx.snapshot.machines.get(&info.mac) {
        if !machine.netboot {
            return None;
        }
    }
    let mut arch = info.arch;
    let mut file_override = None;
    let mut ipxe_file_override = None;
    let mut secure_boot = ctx
        .snapshot
        .assigned_image(info.mac)
        .is_some_and(|(_, image)| image.secure_boot);
    for quirk in &ctx.config.quirks {
        let mac_ok = quirk.mac_prefix.as_deref().is_none_or(|prefix| {
            info.mac
                .to_string()
                .starts_with(&prefix.to_ascii_lowercase().replace('-', ":"))
        });
        let class_ok = quirk.vendor_class.as_deref().is_none_or(|prefix| {
            info.vendor_class
                .as_deref()
                .is_some_and(|v| v.starts_with(prefix))
        });
        if mac_ok && class_ok {
            arch = quirk.arch.unwrap_or(arch);
            file_override = quirk.boot_file.clone().or(file_override);
            if quirk.also_ipxe {
                ipxe_file_override = quirk.boot_file.clone().or(ipxe_file_override);
            }
            secure_boot |= quirk.secure_boot;
        }
    }
    // Built only for the answers that carry a URL: most requests in a
    // storm do not, and this was a tenth of a decision's cost.
    let http_base = || {
        if ctx.http_port == 80 {
            format!("http://{}", ctx.iface.addr)
        } else {
            format!("http://{}:{}", ctx.iface.addr, ctx.http_port)
        }
    };
    if info.ipxe {
        let url = ipxe_file_override.unwrap_or_else(|| {
            ctx.config
                .boot
                .script_url
                .clone()
                .unwrap_or_else(|| format!("{}/boot.ipxe", http_base()))
        });
        let vendor_class = info.pxe.then_some("PXEClient");
        return Some(BootAnswer {
            file: url,
            vendor_class,
            arch,
        });
    }
    if !(info.pxe || info.http_client || file_override.is_some()) {
        return None; // an ordinary DHCP client: an address, no boot file
    }
    let boot = &ctx.config.boot;
    let (file, vendor_class) = match arch {
        Arch::Bios => (boot.bios.clone(), "PXEClient"),
        Arch::UefiIa32 => (boot.uefi_ia32.clone(), "PXEClient"),
        // Secure Boot firmware runs only signed code: shim, then signed
        // GRUB, which reads the per-MAC GRUB config over TFTP.
        Arch::UefiX64 if secure_boot => (boot.secure_boot_x64.clone(), "PXEClient"),
        Arch::UefiX64 => (boot.uefi_x64.clone(), "PXEClient"),
        Arch::UefiArm64 => (boot.uefi_arm64.clone(), "PXEClient"),
        Arch::HttpX64 => (format!("{}/{}", http_base(), boot.http_x64), "HTTPClient"),
        Arch::HttpArm64 => (format!("{}/{}", http_base(), boot.http_arm64), "HTTPClient"),
        Arch::UefiArm32 | Arch::Other(_) if file_override.is_none() => return None,
        _ => (String::new(), "PXEClient"),
    };
    Some(BootAnswer {
        file: file_override.unwrap_or(file),
        vendor_class: Some(vendor_class),
        arch,
    })
}

/// `offer 10.0.0.5 boot undionly.kpxe (Bios)`, or `ack 10.0.0.5 own
/// script` for an iPXE with an embedded script, written in one allocation.
fn lease_summary(what: &str, ip: Ipv4Addr, boot: Option<&BootAnswer>, info: &ClientInfo) -> String {
    use std::fmt::Write;
    let mut summary = String::with_capacity(64);
    let _ = write!(summary, "{what} {ip}");
    if let Some(boot) = boot {
        let _ = write!(summary, " boot {} ({:?})", boot.file, boot.arch);
    } else if info.own_script {
        summary.push_str(" own script");
    }
    summary
}

/// Decides the answer to one request.
pub fn decide(
    request: &Message,
    info: &ClientInfo,
    ctx: &Context<'_>,
    leases: &mut LeaseTable,
) -> Outcome {
    match ctx.config.mode {
        DhcpMode::Off => Outcome::default(),
        DhcpMode::Proxy => decide_proxy(request, info, ctx),
        DhcpMode::Full if ctx.port == Port::Pxe => decide_proxy(request, info, ctx),
        DhcpMode::Full => decide_full(request, info, ctx, leases),
    }
}

fn decide_proxy(request: &Message, info: &ClientInfo, ctx: &Context<'_>) -> Outcome {
    let Some(boot) = boot_answer(info, ctx) else {
        return Outcome::default();
    };
    let (reply_type, destination) = match (ctx.port, info.message_type) {
        (Port::Dhcp, MessageType::Discover) => (
            MessageType::Offer,
            reply_destination(info, Ipv4Addr::UNSPECIFIED, false),
        ),
        (Port::Pxe, MessageType::Request) | (Port::Pxe, MessageType::Inform) => {
            let SocketAddr::V4(peer) = ctx.peer else {
                return Outcome::default();
            };
            (
                MessageType::Ack,
                Destination::Unicast(*peer.ip(), peer.port()),
            )
        }
        _ => return Outcome::default(),
    };
    let mut reply = base_reply(request, reply_type, ctx);
    add_boot(&mut reply, info, &boot, ctx);
    Outcome {
        summary: Some(format!(
            "proxy {reply_type:?}: {} ({:?})",
            boot.file, boot.arch
        )),
        reply: Some((encode(&reply), destination)),
        change: None,
        need: None,
    }
}

fn decide_full(
    request: &Message,
    info: &ClientInfo,
    ctx: &Context<'_>,
    leases: &mut LeaseTable,
) -> Outcome {
    let scope = FullScope::new(request, info, ctx, leases);
    match info.message_type {
        MessageType::Discover => full_discover(&scope, leases),
        MessageType::Request => full_request(&scope, leases),
        MessageType::Release => full_release(&scope, leases),
        MessageType::Decline => full_decline(&scope, leases),
        MessageType::Inform => full_inform(&scope),
        _ => Outcome::default(),
    }
}

/// What every full-mode answer to one message shares: the request, where it
/// came from (directly or through a relay), the machine's usable
/// reservation, and the lease terms of the subnet it is on.
struct FullScope<'a> {
    request: &'a Message,
    info: &'a ClientInfo,
    ctx: &'a Context<'a>,
    now: SystemTime,
    /// The relay agent's address, or unspecified when the client is on our
    /// own link.
    relay: Ipv4Addr,
    /// An address on the client's subnet: the relay's, or our interface's.
    subnet_hint: Ipv4Addr,
    /// The machine's reserved address, when it is on the client's subnet
    /// and usable as a host address.
    reservation: Option<Ipv4Addr>,
    lease_secs: u64,
    prefix: u8,
}

impl<'a> FullScope<'a> {
    fn new(
        request: &'a Message,
        info: &'a ClientInfo,
        ctx: &'a Context<'a>,
        leases: &LeaseTable,
    ) -> Self {
        let now = ctx.now;
        let relay = info.giaddr;
        let subnet_hint = if relay.is_unspecified() {
            ctx.iface.addr
        } else {
            relay
        };
        let reservation = ctx
            .snapshot
            .machines
            .get(&info.mac)
            .and_then(|m| m.ip)
            .filter(|ip| {
                leases
                    .pools
                    .iter()
                    .any(|p| p.same_subnet(*ip) && p.same_subnet(subnet_hint))
            })
            .filter(|&ip| {
                // A reservation of this server's own address, or of the
                // subnet's network or broadcast address, is never handed out.
                let usable = ip != ctx.iface.addr
                    && leases
                        .pools
                        .iter()
                        .filter(|p| p.same_subnet(ip))
                        .all(|p| p.is_host_address(ip));
                if !usable {
                    tracing::warn!(mac = %info.mac, %ip, "ignoring a reservation of this server's own, the network or the broadcast address; fix the machine's ip in the inventory");
                }
                usable
            });
        let lease_secs = ctx.config.lease_time.as_secs();
        let prefix = leases
            .pools
            .iter()
            .find(|p| p.same_subnet(subnet_hint))
            .map_or(ctx.iface.prefix_len, |p| p.prefix_len);
        FullScope {
            request,
            info,
            ctx,
            now,
            relay,
            subnet_hint,
            reservation,
            lease_secs,
            prefix,
        }
    }
}

impl FullScope<'_> {
    fn nak(&self, why: &str) -> Outcome {
        nak(self.request, self.info, self.ctx, why)
    }

    /// An OFFER or ACK of `ip` with the lease and boot options; `change`
    /// is the lease to journal before it is sent.
    fn lease_answer(
        &self,
        message_type: MessageType,
        ip: Ipv4Addr,
        change: Option<Lease>,
    ) -> Outcome {
        let mut reply = base_reply(self.request, message_type, self.ctx);
        reply.set_yiaddr(ip);
        add_lease_options(
            &mut reply,
            self.info,
            self.ctx,
            self.prefix,
            self.lease_secs,
            true,
        );
        let boot = boot_answer(self.info, self.ctx);
        add_boot_or_next_server(&mut reply, self.info, boot.as_ref(), self.ctx);
        let what = if message_type == MessageType::Offer {
            "offer"
        } else {
            "ack"
        };
        Outcome {
            summary: Some(lease_summary(what, ip, boot.as_ref(), self.info)),
            reply: Some((encode(&reply), reply_destination(self.info, ip, false))),
            change,
            need: None,
        }
    }
}

/// DISCOVER: hold an address for the client (its reservation, its last
/// lease, the one it asks for, or a free one) and offer it.
fn full_discover(scope: &FullScope<'_>, leases: &mut LeaseTable) -> Outcome {
    let chosen = match scope.reservation {
        Some(ip) if leases.available_for(ip, scope.info.mac, scope.now) => Ok(ip),
        Some(_) => Err(NoAddress::PoolExhausted),
        None => leases.choose(
            scope.info.mac,
            scope.subnet_hint,
            scope.info.requested_ip,
            scope.relay,
            scope.now,
        ),
    };
    let ip = match chosen {
        Ok(ip) => ip,
        Err(why) => {
            return Outcome {
                summary: Some(format!("no offer for {}: {why:?}", scope.info.mac)),
                need: (why == NoAddress::PoolExhausted && leases.is_shared())
                    .then_some(Need::Addresses),
                ..Outcome::default()
            }
        }
    };
    // Hold it for this client while it decides; not journalled.
    if leases
        .get(ip)
        .is_none_or(|l| l.state != State::Bound || l.mac != scope.info.mac)
    {
        leases.apply(Lease {
            ip,
            mac: scope.info.mac,
            state: State::Offered,
            expires: epoch(scope.now + OFFER_HOLD),
            relay: scope.relay,
        });
    }
    scope.lease_answer(MessageType::Offer, ip, None)
}

/// REQUEST: bind what this server offered or leased to the client, or its
/// reservation; NAK or stay silent otherwise, as RFC 2131 §4.3.2 says.
fn full_request(scope: &FullScope<'_>, leases: &mut LeaseTable) -> Outcome {
    if let Some(server) = scope.info.server_id {
        if server != scope.ctx.iface.addr {
            // The client took another server's offer: free ours.
            if let Some(lease) = leases.of_mac(scope.info.mac).copied() {
                if lease.state == State::Offered {
                    leases.apply(Lease {
                        state: State::Released,
                        expires: 0,
                        ..lease
                    });
                }
            }
            return Outcome::default();
        }
    }
    let wanted = scope
        .info
        .requested_ip
        .or((!scope.info.ciaddr.is_unspecified()).then_some(scope.info.ciaddr));
    let Some(ip) = wanted else {
        return scope.nak("REQUEST without an address");
    };
    let on_subnet = leases
        .pools
        .iter()
        .any(|p| p.same_subnet(scope.subnet_hint) && p.contains(ip))
        || scope.reservation == Some(ip);
    if !on_subnet {
        return scope.nak("address not on this subnet");
    }
    if !leases.available_for(ip, scope.info.mac, scope.now) {
        return scope.nak("address belongs to another machine");
    }
    // Only an address this server offered or leased to this MAC, or
    // its scope.reservation, is bound: a REQUEST out of the blue must not
    // take free addresses (one host could bind the whole pool under
    // made-up MACs). RFC 2131 §4.3.2: a client in SELECTING names
    // our offer and gets a NAK when there is none; in INIT-REBOOT,
    // RENEWING or REBINDING, with no record of the client, the
    // server remains silent.
    let known = scope.reservation == Some(ip)
        || leases
            .get(ip)
            .is_some_and(|lease| lease.mac == scope.info.mac);
    if !known {
        if scope.info.server_id.is_some() {
            return scope.nak("no offer of this address to this machine");
        }
        return Outcome {
            summary: Some(format!(
                "silent: REQUEST for {ip} from {} without a record of it (RFC 2131 4.3.2)",
                scope.info.mac
            )),
            need: leases
                .is_shared()
                .then_some(Need::Lease(ip, scope.info.mac)),
            ..Outcome::default()
        };
    }
    if let Some(reserved) = scope.reservation {
        if reserved != ip {
            return scope.nak("machine has another reserved address");
        }
    }
    let lease = Lease {
        ip,
        mac: scope.info.mac,
        state: State::Bound,
        expires: epoch(scope.now) + scope.lease_secs,
        relay: scope.relay,
    };
    leases.apply(lease);
    scope.lease_answer(MessageType::Ack, ip, Some(lease))
}

/// RELEASE: free the client's own lease; anything else is ignored.
fn full_release(scope: &FullScope<'_>, leases: &mut LeaseTable) -> Outcome {
    let ip = scope.info.ciaddr;
    match leases.get(ip).copied() {
        Some(lease) if lease.mac == scope.info.mac => {
            let released = Lease {
                state: State::Released,
                expires: 0,
                ..lease
            };
            leases.apply(released);
            Outcome {
                summary: Some(format!("release {ip}")),
                change: Some(released),
                reply: None,
                need: None,
            }
        }
        _ => Outcome::default(),
    }
}

/// DECLINE: take a bound address the client found in use out of service.
fn full_decline(scope: &FullScope<'_>, leases: &mut LeaseTable) -> Outcome {
    let Some(ip) = scope.info.requested_ip else {
        return Outcome::default();
    };
    match leases.get(ip).copied() {
        // Only a bound address can be declined (RFC 2131 §4.4.1:
        // the client checks it after the ACK); declining offers
        // would let made-up MACs take the pool out of service.
        Some(lease) if lease.mac == scope.info.mac && lease.state == State::Bound => {
            let declined = Lease {
                state: State::Declined,
                expires: epoch(scope.now) + scope.lease_secs,
                ..lease
            };
            leases.apply(declined);
            Outcome {
                summary: Some(format!("decline {ip}: in use by another host")),
                change: Some(declined),
                reply: None,
                need: None,
            }
        }
        _ => Outcome::default(),
    }
}

/// INFORM: configuration and boot options, no address.
fn full_inform(scope: &FullScope<'_>) -> Outcome {
    let mut reply = base_reply(scope.request, MessageType::Ack, scope.ctx);
    add_lease_options(
        &mut reply,
        scope.info,
        scope.ctx,
        scope.prefix,
        scope.lease_secs,
        false,
    );
    let boot = boot_answer(scope.info, scope.ctx);
    add_boot_or_next_server(&mut reply, scope.info, boot.as_ref(), scope.ctx);
    let destination = reply_destination(scope.info, Ipv4Addr::UNSPECIFIED, false);
    Outcome {
        summary: Some("inform".into()),
        reply: Some((encode(&reply), destination)),
        change: None,
        need: None,
    }
}

fn nak(request: &Message, info: &ClientInfo, ctx: &Context<'_>, why: &str) -> Outcome {
    let mut reply = base_reply(request, MessageType::Nak, ctx);
    reply
        .opts_mut()
        .insert(DhcpOption::Message(why.to_string()));
    Outcome {
        summary: Some(format!("nak: {why}")),
        reply: Some((
            encode(&reply),
            reply_destination(info, Ipv4Addr::UNSPECIFIED, true),
        )),
        change: None,
        need: None,
    }
}

/// A reply with the request's xid, chaddr, flags, giaddr and option 82.
fn base_reply(request: &Message, message_type: MessageType, ctx: &Context<'_>) -> Message {
    let mut reply = Message::new_with_id(
        request.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        request.giaddr(),
        &request.chaddr()[..6],
    );
    reply.set_opcode(Opcode::BootReply);
    reply.set_flags(if request.flags().broadcast() {
        Flags::default().set_broadcast()
    } else {
        Flags::default()
    });
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::MessageType(message_type));
    opts.insert(DhcpOption::ServerIdentifier(ctx.iface.addr));
    if let Some(agent) = request.opts().get(OptionCode::RelayAgentInformation) {
        opts.insert(agent.clone());
    }
    reply
}

fn add_lease_options(
    reply: &mut Message,
    info: &ClientInfo,
    ctx: &Context<'_>,
    prefix: u8,
    lease_secs: u64,
    with_lease: bool,
) {
    let config = ctx.config;
    let relayed = !info.giaddr.is_unspecified();
    let opts = reply.opts_mut();
    if with_lease {
        let secs = lease_secs.min(u64::from(u32::MAX)) as u32;
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    opts.insert(DhcpOption::SubnetMask(Ipv4Addr::from(mask)));
    match (config.router, relayed) {
        (Some(router), _) => {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        (None, true) => {
            opts.insert(DhcpOption::Router(vec![info.giaddr]));
        }
        (None, false) => {}
    }
    if !config.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(config.dns.clone()));
    }
    if let Some(domain) = &config.domain {
        opts.insert(DhcpOption::DomainName(domain.clone()));
    }
    if let Some(hostname) = ctx
        .snapshot
        .machines
        .get(&info.mac)
        .and_then(|m| m.hostname.clone())
    {
        opts.insert(DhcpOption::Hostname(hostname));
    }
}

/// siaddr, `file`, options 66/67, 60, 97 and the PXE vendor options.
/// The boot answer's fields and options, or for an iPXE with its own
/// script only this server as next server (siaddr), which such a script
/// may fetch from as `${next-server}`.
fn add_boot_or_next_server(
    reply: &mut Message,
    info: &ClientInfo,
    boot: Option<&BootAnswer>,
    ctx: &Context<'_>,
) {
    match boot {
        Some(boot) => add_boot(reply, info, boot, ctx),
        None if info.own_script => {
            reply.set_siaddr(ctx.iface.addr);
        }
        None => {}
    }
}

fn add_boot(reply: &mut Message, info: &ClientInfo, boot: &BootAnswer, ctx: &Context<'_>) {
    reply.set_siaddr(ctx.iface.addr);
    reply.set_sname_str(ctx.iface.addr.to_string());
    if boot.file.len() < 128 {
        reply.set_fname_str(&boot.file);
    }
    let opts = reply.opts_mut();
    opts.insert(DhcpOption::TFTPServerName(
        ctx.iface.addr.to_string().into_bytes(),
    ));
    opts.insert(DhcpOption::BootfileName(boot.file.clone().into_bytes()));
    if let Some(class) = boot.vendor_class {
        opts.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    }
    if info.pxe {
        // PXE_DISCOVERY_CONTROL (6) = 8: the boot file is in this answer;
        // no boot-server discovery, no multicast discovery.
        opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    }
    if let Some(id) = &info.machine_id {
        opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
    }
}

fn encode(message: &Message) -> Vec<u8> {
    let mut out = Vec::with_capacity(400);
    // Encoding a message we built ourselves cannot fail short of a bug;
    // an empty reply is then dropped by the engine with a log line.
    let _ = message.encode(&mut Encoder::new(&mut out));
    out
}

/// Whom a DHCP request counts against: its client hardware address, and
/// the relay it came through (0.0.0.0 when not relayed).
pub type ClientKey = (Ipv4Addr, crate::proto::Mac);

/// Whether a relayed request (non-zero giaddr) may be answered: it must
/// come from the relay it names, or from one the operator listed. A packet
/// from anywhere else (0.0.0.0 with a forged giaddr) would make the server
/// unicast to any address on port 67, and rotating giaddr would dodge the
/// per-relay share of the pool.
pub fn relay_trusted(source: Ipv4Addr, giaddr: Ipv4Addr, relays: &[Ipv4Addr]) -> bool {
    giaddr.is_unspecified() || source == giaddr || relays.contains(&source)
}

#[cfg(test)]
mod tests;
