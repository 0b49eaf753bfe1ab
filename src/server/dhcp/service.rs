//! The DHCP service over all of one server's DHCP sockets: the lease
//! table and its journal, the rate limits, and [`decide_batch`], which the
//! engine ([`crate::engine::dhcp`]) calls with every datagram it read in
//! one wake-up. A batch is decided under one lock and its lease changes
//! are journalled with one `fdatasync` before any reply is handed back,
//! so no ACK ever leaves for a lease that a crash could forget; offers are
//! not journalled at all (a restart forgets promises, not leases).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use dhcproto::v4::MessageType;
use tracing::{debug, info, warn};

use super::leases::{Journal, Lease, LeaseTable, Pool, State as LeaseState};
use super::shared::{Confirmation, LeaseSharing, ShareRequest};
use super::{decide, relay_trusted, ClientKey, Context, Interface, Need, Port, RateLimiter};
use crate::boot::events::{BootEvent, Phase};
use crate::boot::Router;
use crate::config::{DhcpConfig, DhcpMode};
use crate::metrics::{Counter, Labelled};
use crate::proto::dhcp::{parse_request, Destination};
use crate::proto::Mac;

/// State shared by every DHCP socket.
pub struct DhcpService {
    pub config: DhcpConfig,
    pub router: Arc<Router>,
    pub http_port: u16,
    pub state: Mutex<DhcpState>,
    pub stats: DhcpStats,
    /// The lease table shared with other servers, when there is one.
    pub sharing: Option<LeaseSharing>,
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

/// Counters (sharded per thread).
#[derive(Debug)]
pub struct DhcpStats {
    pub received: Counter,
    pub replied: Counter,
    /// Malformed, from an untrusted relay, or over a rate limit.
    pub dropped: Counter,
    /// Parsed messages by type ([`MESSAGE_TYPES`]).
    pub by_type: Labelled,
}

/// DHCP message types counted apart; the last is every other.
pub const MESSAGE_TYPES: &[&str] = &[
    "discover", "request", "decline", "release", "inform", "other",
];

impl Default for DhcpStats {
    fn default() -> Self {
        Self {
            received: Counter::default(),
            replied: Counter::default(),
            dropped: Counter::default(),
            by_type: Labelled::new("type", MESSAGE_TYPES),
        }
    }
}

fn message_type_index(message_type: MessageType) -> usize {
    match message_type {
        MessageType::Discover => 0,
        MessageType::Request => 1,
        MessageType::Decline => 2,
        MessageType::Release => 3,
        MessageType::Inform => 4,
        _ => 5,
    }
}

impl DhcpService {
    /// Shares the lease table with other servers: new addresses come only
    /// from blocks of `block_size` that the returned channel's keeper
    /// claims, and lease changes are written through before replies go.
    ///
    /// The blocks last held are read from [`Self::blocks_file`], so that a
    /// server that starts while the database is away still renews its
    /// leases and hands out addresses from its own blocks.
    pub fn share_leases(&mut self, block_size: u32) -> std::sync::mpsc::Receiver<ShareRequest> {
        let (sharing, requests) = LeaseSharing::new();
        let saved: Vec<Ipv4Addr> = self
            .blocks_file()
            .and_then(|file| std::fs::read(file).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        state.leases.share(block_size);
        state.leases.add_blocks(&saved);
        self.sharing = Some(sharing);
        requests
    }

    /// Where the blocks this server holds in a shared lease table are kept
    /// (`dhcp-blocks.json` beside the lease journal), for starts without
    /// the database.
    pub fn blocks_file(&self) -> Option<std::path::PathBuf> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let journal = state.journal.as_ref()?;
        Some(journal.path().with_file_name("dhcp-blocks.json"))
    }

    /// Leases bound now, per pool (first and last address).
    pub fn bound_per_pool(&self) -> Vec<(Ipv4Addr, Ipv4Addr, usize)> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.leases.bound_per_pool(SystemTime::now())
    }
}

/// Why the DHCP service cannot start with its configuration.
#[derive(Debug, thiserror::Error)]
pub enum DhcpSetupError {
    #[error("dhcp range {first}-{last} is on no interface's subnet; for a relayed subnet write it as {first}-{last}/PREFIX")]
    RangeOffSubnet { first: Ipv4Addr, last: Ipv4Addr },
    #[error(
        "full DHCP mode needs at least one address range (dhcp.ranges or --dhcp-range FIRST-LAST)"
    )]
    NoRange,
    #[error("cannot open the lease journal in {dir}: {source}")]
    Journal {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
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
    ) -> Result<Self, DhcpSetupError> {
        let mut pools = Vec::new();
        for &(first, last, prefix) in &config.ranges {
            let prefix_len = match prefix {
                Some(prefix) => prefix,
                None => interfaces
                    .iter()
                    .find(|i| {
                        Pool {
                            first: i.addr,
                            last: i.addr,
                            prefix_len: i.prefix_len,
                        }
                        .same_subnet(first)
                    })
                    .map(|i| i.prefix_len)
                    .ok_or(DhcpSetupError::RangeOffSubnet { first, last })?,
            };
            pools.push(Pool {
                first,
                last,
                prefix_len,
            });
        }
        if config.mode == DhcpMode::Full && pools.is_empty() {
            return Err(DhcpSetupError::NoRange);
        }
        let mut leases = LeaseTable::new(pools, config.relay_pool_share);
        let journal = if config.mode == DhcpMode::Full {
            let (mut journal, count) = Journal::open(state_dir, &mut leases, SystemTime::now())
                .map_err(|source| DhcpSetupError::Journal {
                    dir: state_dir.to_path_buf(),
                    source,
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
            sharing: None,
        })
    }
}

/// One reply of a batch, with what deciding whether it may go needs.
struct PendingReply {
    mac: Mac,
    bytes: Vec<u8>,
    destination: Destination,
    /// The address it binds (an ACK), which a shared table must confirm.
    binds: Option<Ipv4Addr>,
    /// Whether that address is in this server's own blocks (or no table
    /// is shared): such an ACK goes even while the database is away.
    ours: bool,
}

/// Everything a batch decided, gathered while the lease lock is held and
/// acted on after it is let go.
#[derive(Default)]
struct Decided {
    replies: Vec<PendingReply>,
    /// Lease changes to journal (and write through) before replying.
    changes: Vec<Lease>,
    /// (address, MAC, leased by us) for the router's client map.
    known_clients: Vec<(Ipv4Addr, Mac, bool)>,
    events: Vec<(Mac, Ipv4Addr, String)>,
    needs: Vec<Need>,
}

/// Decides a batch, journals its changes (and writes them through to a
/// shared lease table), and returns the replies to send. Public for
/// `benches/dhcp_decide.rs`.
pub fn decide_batch(
    batch: &[(Vec<u8>, SocketAddr)],
    iface: &Interface,
    port: Port,
    service: &DhcpService,
) -> Vec<(Mac, Vec<u8>, Destination)> {
    let now = SystemTime::now();
    let snapshot = service.router.snapshot();
    let mut decided = Decided {
        replies: Vec::with_capacity(batch.len()),
        ..Decided::default()
    };
    let mut state = service.state.lock().unwrap_or_else(|p| p.into_inner());
    for (bytes, peer) in batch {
        let ctx = Context {
            config: &service.config,
            iface,
            snapshot: &snapshot,
            port,
            peer: *peer,
            http_port: service.http_port,
            now,
        };
        decide_one(bytes, &ctx, service, &mut state, &mut decided);
    }
    if let Some(journal) = state.journal.as_mut() {
        if let Err(error) = journal.commit(&decided.changes) {
            // Without the journal a restart could hand these addresses out
            // twice: answer nobody in this batch; clients retry.
            warn!(%error, leases = decided.changes.len(), "cannot write the lease journal; this batch is not answered");
            return Vec::new();
        }
    }
    drop(state);
    let replies = confirm_shared(service, &mut decided);
    for (ip, mac, leased) in decided.known_clients {
        let client = std::net::IpAddr::V4(ip);
        if leased {
            service.router.note_lease(client, mac);
        } else {
            service.router.note_client(client, mac);
        }
        service
            .router
            .note_answered_from(client, std::net::IpAddr::V4(iface.addr));
    }
    for (mac, source, detail) in decided.events {
        service.router.events.record(BootEvent::new(
            Some(mac),
            std::net::IpAddr::V4(source),
            Phase::Dhcp,
            "dhcp",
            detail,
        ));
    }
    replies
}

/// Decides one datagram of a batch into `decided`.
fn decide_one(
    bytes: &[u8],
    ctx: &Context<'_>,
    service: &DhcpService,
    state: &mut DhcpState,
    decided: &mut Decided,
) {
    let (request, info) = match parse_request(bytes) {
        Ok(parsed) => {
            service
                .stats
                .by_type
                .inc(message_type_index(parsed.1.message_type));
            parsed
        }
        Err(error) => {
            service.stats.dropped.add(1);
            debug!(peer = %ctx.peer, %error, "DHCP datagram dropped");
            return;
        }
    };
    let source = match ctx.peer {
        SocketAddr::V4(v4) => *v4.ip(),
        SocketAddr::V6(_) => return,
    };
    if !relay_trusted(source, info.giaddr, &service.config.relays) {
        service.stats.dropped.add(1);
        debug!(%source, giaddr = %info.giaddr, mac = %info.mac,
            "relayed DHCP request not from its relay nor a listed one (dhcp.relays); dropped");
        return;
    }
    // All unconfigured clients send from 0.0.0.0: they are told apart
    // by their MAC (and relay), never put in one bucket.
    if !source.is_unspecified() && !state.limiter.allow(source, ctx.now) {
        service.stats.dropped.add(1);
        debug!(%source, mac = %info.mac, "DHCP request over the per-source rate; dropped");
        return;
    }
    if !state.client_limiter.allow((info.giaddr, info.mac), ctx.now) {
        service.stats.dropped.add(1);
        debug!(%source, mac = %info.mac, "DHCP request over the per-client rate; dropped");
        return;
    }
    let outcome = decide(&request, &info, ctx, &mut state.leases);
    // The address this machine will fetch its loader from: the lease
    // it was given, its own (ProxyDHCP on port 4011, INFORM), or, beside
    // another DHCP server, the one it asks that server for.
    let bound = outcome
        .change
        .as_ref()
        .filter(|lease| lease.mac == info.mac && lease.state == LeaseState::Bound)
        .map(|lease| lease.ip);
    if let Some(ip) = bound {
        decided.known_clients.push((ip, info.mac, true));
    } else if !info.giaddr.is_unspecified() {
        // Relayed: the source is the relay.
    } else if !source.is_unspecified() {
        decided.known_clients.push((source, info.mac, false));
    } else if let (DhcpMode::Proxy, MessageType::Request, Some(ip)) =
        (service.config.mode, info.message_type, info.requested_ip)
    {
        decided.known_clients.push((ip, info.mac, false));
    }
    // Offers are promises, not leases (RFC 2131 §4.3.1): the lease
    // table holds them in memory, and the journal, which a restart
    // replays for bound and declined addresses only, never needs them.
    // A batch of DISCOVERs therefore costs no disk write at all.
    if let Some(change) = outcome.change.filter(|c| c.state != LeaseState::Offered) {
        decided.changes.push(change);
    }
    if let Some(summary) = outcome.summary {
        decided.events.push((
            info.mac,
            source,
            format!("{:?}: {summary}", info.message_type),
        ));
    }
    decided.needs.extend(outcome.need);
    if let Some((bytes, destination)) = outcome.reply {
        decided.replies.push(PendingReply {
            mac: info.mac,
            bytes,
            destination,
            binds: bound,
            ours: bound.is_none_or(|ip| state.leases.owns(ip)),
        });
    }
}

/// With a shared lease table: writes the batch's changes through, drops
/// the ACKs it did not confirm, and hands the keeper what the batch
/// lacked. Alone: every reply goes.
fn confirm_shared(
    service: &DhcpService,
    decided: &mut Decided,
) -> Vec<(Mac, Vec<u8>, Destination)> {
    let replies = std::mem::take(&mut decided.replies);
    let Some(sharing) = &service.sharing else {
        return replies
            .into_iter()
            .map(|r| (r.mac, r.bytes, r.destination))
            .collect();
    };
    let confirmation = sharing.write_through(std::mem::take(&mut decided.changes));
    let mut asked_for_addresses = false;
    for need in decided.needs.drain(..) {
        match need {
            Need::Addresses if asked_for_addresses => {}
            Need::Addresses => {
                asked_for_addresses = true;
                sharing.ask(ShareRequest::Addresses);
            }
            Need::Lease(ip, mac) => {
                sharing.ask(ShareRequest::Lookup(ip, mac));
            }
        }
    }
    replies
        .into_iter()
        .filter(|reply| {
            let Some(ip) = reply.binds else { return true };
            match &confirmation {
                Confirmation::Written(refused) if refused.contains(&ip) => {
                    warn!(%ip, mac = %reply.mac, "the shared lease table has this address for another machine; ACK not sent");
                    sharing.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    sharing.ask(ShareRequest::Lookup(ip, reply.mac));
                    false
                }
                Confirmation::Written(_) => true,
                Confirmation::Unconfirmed => reply.ours,
            }
        })
        .map(|r| (r.mac, r.bytes, r.destination))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::proto::dhcp::tests::{bios_pxe_discover, bios_pxe_request};
    use crate::proto::dhcp::CLIENT_PORT;
    use dhcproto::Decodable;
    use std::net::Ipv4Addr;

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
