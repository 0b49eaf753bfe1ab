//! Several DHCP servers sharing one lease table in a real PostgreSQL
//! (`BOOTFLEET_TEST_POSTGRES`, as every PostgreSQL test): the DHCP
//! services and their lease keepers as `bootfleet serve` runs them, fed
//! the datagrams a relay agent would forward to every server at once.
//! No address goes to two machines, whichever server answers; a client
//! of a server that died is honoured by another from the shared table;
//! with the database away a server goes on answering from its own blocks
//! and catches the table up when the database is back.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bootfleet::boot::Router;
use bootfleet::config::{Config, DhcpMode};
use bootfleet::engine::Shutdown;
use bootfleet::proto::Mac;
use bootfleet::server::dhcp::service::{decide_batch, DhcpService};
use bootfleet::server::dhcp::{Interface, Port};
use bootfleet::store::shared_leases::{SharedLeases, BLOCK_SIZE};
use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::common::fresh_postgres_database;
use super::panel::eventually;
use super::postgres::OwnCluster;

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// 1,000 addresses: 16 blocks, fewer than two servers would each claim
/// if they could, so the servers run short and must share.
const FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
const LAST: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 250);

/// One DHCP server: its service, its lease keeper, its directories.
struct DhcpServer {
    service: Arc<DhcpService>,
    iface: Interface,
    shutdown: Shutdown,
    _dirs: [tempfile::TempDir; 2],
}

impl DhcpServer {
    fn start(url: &str, name: &str, address: Ipv4Addr) -> Self {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        Self::start_in(url, name, address, dirs, true)
    }

    /// A server on `dirs` (boot directory, state directory), waiting for
    /// its first blocks from the database when `connected`.
    fn start_in(
        url: &str,
        name: &str,
        address: Ipv4Addr,
        [root, state]: [tempfile::TempDir; 2],
        connected: bool,
    ) -> Self {
        let inventory = root.path().join("inventory.toml");
        std::fs::write(&inventory, "").unwrap();
        let router = Arc::new(Router::new(root.path(), &inventory, state.path()).unwrap());
        let mut config = Config::default().dhcp;
        config.mode = DhcpMode::Full;
        config.sync_leases = false;
        config.max_requests_per_second_per_source = 10_000_000;
        config.ranges = vec![(FIRST, LAST, Some(22))];
        let iface = Interface {
            name: "lan0".into(),
            addr: address,
            prefix_len: 24,
        };
        let mut service = DhcpService::new(
            config,
            std::slice::from_ref(&iface),
            router,
            80,
            state.path(),
        )
        .unwrap();
        let requests = service.share_leases(BLOCK_SIZE);
        let service = Arc::new(service);
        let shutdown = Shutdown::new();
        let (_keeper, ready) = bootfleet::engine::dhcp_share::spawn(
            Arc::clone(&service),
            requests,
            SharedLeases::new(url, name),
            shutdown.clone(),
        )
        .unwrap();
        if connected {
            ready
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("server {name} never got its first address blocks"));
        }
        Self {
            service,
            iface,
            shutdown,
            _dirs: [root, state],
        }
    }

    /// The replies to `messages`, decided as one batch.
    fn answer(&self, messages: &[Vec<u8>]) -> Vec<Message> {
        let peer = SocketAddr::from((RELAY, 67));
        let batch: Vec<_> = messages.iter().map(|m| (m.clone(), peer)).collect();
        decide_batch(&batch, &self.iface, Port::Dhcp, &self.service)
            .into_iter()
            .map(|(_, bytes, _)| Message::decode(&mut Decoder::new(&bytes)).unwrap())
            .collect()
    }
}

impl Drop for DhcpServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn mac(n: u32) -> Mac {
    let id = n.to_be_bytes();
    Mac([2, 0x77, id[0], id[1], id[2], id[3]])
}

/// A relayed PXE client's message: `requested` and `server` for a REQUEST.
fn message(
    n: u32,
    kind: MessageType,
    requested: Option<Ipv4Addr>,
    server: Option<Ipv4Addr>,
) -> Vec<u8> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(n, unspecified, unspecified, unspecified, RELAY, &mac(n).0);
    msg.set_hops(1);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::BootfileName,
    ]));
    if let Some(ip) = requested {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
    }
    if let Some(server) = server {
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes)).unwrap();
    bytes
}

fn message_type(reply: &Message) -> Option<MessageType> {
    match reply.opts().get(OptionCode::MessageType) {
        Some(DhcpOption::MessageType(kind)) => Some(*kind),
        _ => None,
    }
}

/// Every client in `clients` through DISCOVER and REQUEST, each message
/// going to every server (as a relay agent forwards a broadcast to each
/// server it knows), in batches of 64; a client takes the first offer,
/// alternating which server's batch is decided first. Returns the ACKs:
/// client → (address, server that acknowledged it).
fn dora_round(
    servers: &[&DhcpServer],
    clients: &[u32],
    round: u32,
) -> HashMap<u32, (Ipv4Addr, usize)> {
    let mut acked = HashMap::new();
    for (chunk_index, chunk) in clients.chunks(64).enumerate() {
        let mut order: Vec<usize> = (0..servers.len()).collect();
        order.rotate_left(chunk_index % servers.len());
        let mut chosen: BTreeMap<u32, (Ipv4Addr, usize)> = BTreeMap::new();
        for &s in &order {
            // One DISCOVER in seven does not reach one of the servers (UDP
            // is lossy), so the servers' tables do not move in step: a
            // server that allocated from the whole pool would then offer
            // addresses another server gave away.
            let discovers: Vec<_> = chunk
                .iter()
                .filter(|&&n| servers.len() == 1 || (n + round) % 7 != s as u32)
                .map(|&n| message(n, MessageType::Discover, None, None))
                .collect();
            for offer in servers[s].answer(&discovers) {
                assert_eq!(message_type(&offer), Some(MessageType::Offer));
                chosen.entry(offer.xid()).or_insert((offer.yiaddr(), s));
            }
        }
        let requests: Vec<_> = chosen
            .iter()
            .map(|(&n, &(ip, s))| {
                message(
                    n,
                    MessageType::Request,
                    Some(ip),
                    Some(servers[s].iface.addr),
                )
            })
            .collect();
        for &s in &order {
            for reply in servers[s].answer(&requests) {
                if message_type(&reply) == Some(MessageType::Ack) {
                    let previous = acked.insert(reply.xid(), (reply.yiaddr(), s));
                    assert!(previous.is_none(), "two ACKs for client {}", reply.xid());
                }
            }
        }
    }
    acked
}

fn assert_no_address_twice(leases: &HashMap<u32, (Ipv4Addr, usize)>) {
    let mut holders: HashMap<Ipv4Addr, u32> = HashMap::new();
    for (&client, &(ip, _)) in leases {
        if let Some(other) = holders.insert(ip, client) {
            panic!("{ip} was given to clients {other} and {client}");
        }
    }
}

#[test]
fn three_servers_on_one_table_never_give_an_address_twice_and_honour_each_others_leases() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let servers = [
        DhcpServer::start(&url, "dhcp-a", Ipv4Addr::new(192, 168, 77, 1)),
        DhcpServer::start(&url, "dhcp-b", Ipv4Addr::new(192, 168, 77, 2)),
        DhcpServer::start(&url, "dhcp-c", Ipv4Addr::new(192, 168, 77, 3)),
    ];
    let all: Vec<&DhcpServer> = servers.iter().collect();
    // 900 machines on a pool of about 1,000: the servers' first blocks
    // do not cover the burst, so they claim more while it runs, and
    // clients that got no offer try again as real ones do.
    let clients: Vec<u32> = (1..=900).collect();
    let mut leases = HashMap::new();
    for round in 0..10 {
        let waiting: Vec<u32> = clients
            .iter()
            .copied()
            .filter(|n| !leases.contains_key(n))
            .collect();
        if waiting.is_empty() {
            break;
        }
        leases.extend(dora_round(&all, &waiting, round));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(leases.len(), clients.len(), "every machine got an address");
    assert_no_address_twice(&leases);
    let refused: u64 = servers
        .iter()
        .map(|s| {
            let sharing = s.service.sharing.as_ref().unwrap();
            sharing.refused.load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert_eq!(
        refused, 0,
        "each server kept to its own blocks: the table never had to refuse an ACK"
    );
    let by_server = |s: usize| leases.values().filter(|(_, by)| *by == s).count();
    assert!(
        (0..3).all(|s| by_server(s) > 0),
        "every server answered some: {:?}",
        (0..3).map(by_server).collect::<Vec<_>>()
    );

    // The shared table has every lease, for the machine that got it.
    let mut table = SharedLeases::new(&url, "checker");
    let rows: HashMap<Ipv4Addr, Mac> = eventually("every ACKed lease in the table", || {
        let rows: HashMap<_, _> = table
            .all()
            .unwrap()
            .into_iter()
            .map(|(lease, _)| (lease.ip, lease.mac))
            .collect();
        (rows.len() >= leases.len()).then_some(rows)
    });
    for (&client, &(ip, _)) in &leases {
        assert_eq!(rows.get(&ip), Some(&mac(client)), "{ip}");
    }

    // Server A goes away; one of its clients asks server B for its lease
    // again (INIT-REBOOT: no server identifier). B has no record of it:
    // silent first, then, once it has loaded the lease from the table,
    // the same address.
    let (&client, &(ip, _)) = leases
        .iter()
        .find(|(_, (_, by))| *by == 0)
        .expect("a client of A");
    let [a, b, c] = servers;
    drop(a);
    let reboot = message(client, MessageType::Request, Some(ip), None);
    let ack = eventually("B honours A's lease from the shared table", || {
        b.answer(std::slice::from_ref(&reboot))
            .into_iter()
            .find(|r| message_type(r) == Some(MessageType::Ack))
    });
    assert_eq!(ack.yiaddr(), ip);
    // C, asked for an address it never offered to a machine that holds
    // another, refuses (NAK).
    let (&other, _) = leases.iter().find(|(&n, _)| n != client).unwrap();
    let stolen = message(other, MessageType::Request, Some(ip), Some(c.iface.addr));
    assert!(c
        .answer(&[stolen])
        .iter()
        .all(|r| message_type(r) != Some(MessageType::Ack)));
}

#[test]
fn the_table_refuses_a_second_machine_and_a_second_server_of_the_same_name() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    use bootfleet::proto::dhcp::lease::{Lease, State};
    let now = 1_900_000_000;
    let lease = |n: u32, ip: Ipv4Addr| Lease {
        ip,
        mac: mac(n),
        state: State::Bound,
        expires: now + 3600,
        relay: RELAY,
    };
    let (mut a, mut b) = (SharedLeases::new(&url, "a"), SharedLeases::new(&url, "b"));
    let ip = Ipv4Addr::new(10, 77, 0, 20);
    assert_eq!(
        a.write(&[lease(1, ip)], now).unwrap(),
        Vec::<Ipv4Addr>::new()
    );
    assert_eq!(
        b.write(&[lease(2, ip)], now).unwrap(),
        vec![ip],
        "another machine's unexpired lease is refused"
    );
    assert_eq!(
        b.write(&[lease(1, ip)], now).unwrap(),
        Vec::<Ipv4Addr>::new(),
        "the same machine's renewal through another server is taken"
    );
    assert_eq!(
        b.write(&[lease(2, ip)], now + 7200).unwrap(),
        Vec::<Ipv4Addr>::new(),
        "an expired lease may go to another machine"
    );

    let blocks_a = a.claim_blocks(FIRST, LAST, 5).unwrap();
    let blocks_b = b.claim_blocks(FIRST, LAST, 100).unwrap();
    assert_eq!(blocks_a.len(), 5);
    assert_eq!(
        blocks_b.len(),
        (16 - 5) / 2,
        "half of the pool's unclaimed blocks"
    );
    let mut rest = b.claim_blocks(FIRST, LAST, 100).unwrap();
    while let Ok(more) = b.claim_blocks(FIRST, LAST, 100) {
        if more.is_empty() {
            break;
        }
        rest.extend(more);
    }
    assert_eq!(
        blocks_a.len() + blocks_b.len() + rest.len(),
        16,
        "and in the end all of them"
    );
    let blocks_b: Vec<_> = blocks_b.into_iter().chain(rest).collect();
    assert!(
        blocks_a.iter().all(|x| !blocks_b.contains(x)),
        "no block claimed twice"
    );
    assert_eq!(a.owned_blocks().unwrap(), blocks_a);

    let mut twin = SharedLeases::new(&url, "a");
    let error = twin.owned_blocks().unwrap_err().to_string();
    assert!(error.contains("server name"), "{error}");
}

#[test]
fn with_the_database_away_a_server_answers_from_its_own_blocks_and_catches_up() {
    if fresh_postgres_database().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let server = DhcpServer::start(&cluster.url, "dhcp-a", Ipv4Addr::new(192, 168, 77, 1));
    let all = [&server];
    let before = dora_round(&all, &(1..=10).collect::<Vec<_>>(), 0);
    assert_eq!(before.len(), 10);

    cluster.pause();
    // Renewals of held leases (RENEWING: ciaddr set, unicast) and new
    // machines from the blocks the server holds are still answered.
    let (&client, &(ip, _)) = before.iter().next().unwrap();
    let mut renew = Message::decode(&mut Decoder::new(&message(
        client,
        MessageType::Request,
        None,
        None,
    )))
    .unwrap();
    renew.set_ciaddr(ip);
    let mut bytes = Vec::new();
    renew.encode(&mut Encoder::new(&mut bytes)).unwrap();
    let replies = server.answer(&[bytes]);
    assert!(
        replies
            .iter()
            .any(|r| message_type(r) == Some(MessageType::Ack) && r.yiaddr() == ip),
        "the renewal is answered with the database away"
    );
    let during = dora_round(&all, &(11..=20).collect::<Vec<_>>(), 0);
    assert_eq!(
        during.len(),
        10,
        "new machines get addresses from the server's own blocks"
    );

    cluster.resume();
    let mut table = SharedLeases::new(&cluster.url, "checker");
    eventually(
        "the leases made while the database was away, in the table",
        || {
            let rows: HashMap<Ipv4Addr, Mac> = table
                .all()
                .ok()?
                .into_iter()
                .map(|(lease, _)| (lease.ip, lease.mac))
                .collect();
            during
                .iter()
                .all(|(&n, &(ip, _))| rows.get(&ip) == Some(&mac(n)))
                .then_some(())
        },
    );
}

/// A server that restarts while the database is away knows its blocks from
/// its state directory: its clients renew and new machines get addresses.
#[test]
fn a_server_restarting_with_the_database_away_answers_from_the_blocks_it_kept() {
    if fresh_postgres_database().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let address = Ipv4Addr::new(192, 168, 77, 1);
    let mut server = DhcpServer::start(&cluster.url, "dhcp-a", address);
    let before = dora_round(&[&server], &(1..=5).collect::<Vec<_>>(), 0);
    assert_eq!(before.len(), 5);
    let dirs = std::mem::replace(
        &mut server._dirs,
        [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()],
    );
    drop(server);
    cluster.pause();
    let restarted = DhcpServer::start_in(&cluster.url, "dhcp-a", address, dirs, false);
    let after = dora_round(&[&restarted], &(1..=10).collect::<Vec<_>>(), 0);
    assert_eq!(after.len(), 10, "old clients and new machines are answered");
    for (client, (ip, _)) in &before {
        assert_eq!(after[client].0, *ip, "client {client} keeps its address");
    }
    cluster.resume();
}
