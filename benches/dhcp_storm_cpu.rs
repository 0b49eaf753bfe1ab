//! The DHCP thread's CPU for a power-on storm without sockets: `MACHINES`
//! new PXE clients behind one relay agent (as `bootfleet-loadtest storm`
//! sends them), DISCOVER then REQUEST, decided
//! in batches of the engine's size with the journal written but not
//! synced. Prints the median of the rounds, so that two builds can be
//! compared on the decision path alone, without a VM network's noise:
//!
//!     cargo bench --bench dhcp_storm_cpu

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bootfleet::boot::Router;
use bootfleet::config::{Config, DhcpMode};
use bootfleet::server::dhcp::service::{decide_batch, DhcpService};
use bootfleet::server::dhcp::{Interface, Port};
use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

const MACHINES: u32 = 10_000;
const BATCH: usize = 256;
const ROUNDS: usize = 15;
const RELAY: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

fn message(n: u32, kind: MessageType, offer: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let id = n.to_be_bytes();
    let mac = [2, 0xbf, id[0], id[1], id[2], id[3]];
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(n, unspecified, unspecified, unspecified, RELAY, &mac);
    msg.set_hops(1);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::MaxMessageSize(1472));
    opts.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    opts.insert(DhcpOption::ClientSystemArchitecture(0u16.into()));
    let mut guid = vec![0u8];
    guid.extend_from_slice(&[7; 16]);
    opts.insert(DhcpOption::ClientMachineIdentifier(guid));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::TFTPServerName,
        OptionCode::BootfileName,
        OptionCode::ClassIdentifier,
    ]));
    if let Some((ip, server)) = offer {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes)).expect("encodes");
    bytes
}

fn round() -> f64 {
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let inventory = root.path().join("inventory.toml");
    std::fs::write(&inventory, "").unwrap();
    let router = Arc::new(Router::new(root.path(), &inventory, state.path()).unwrap());
    let mut config = Config::default().dhcp;
    config.mode = DhcpMode::Full;
    config.sync_leases = false;
    config.max_requests_per_second_per_source = 10_000_000;
    config.ranges = vec![(
        Ipv4Addr::new(127, 1, 0, 10),
        Ipv4Addr::new(127, 1, 255, 250),
        Some(16),
    )];
    let iface = Interface {
        name: "storm0".into(),
        addr: Ipv4Addr::new(10, 64, 0, 1),
        prefix_len: 10,
    };
    let service = DhcpService::new(
        config,
        std::slice::from_ref(&iface),
        router,
        80,
        state.path(),
    )
    .unwrap();
    let peer = SocketAddr::from((RELAY, 67));
    let discovers: Vec<_> = (0..MACHINES)
        .map(|n| (message(n, MessageType::Discover, None), peer))
        .collect();
    let started = Instant::now();
    let mut offers = Vec::new();
    for chunk in discovers.chunks(BATCH) {
        offers.extend(decide_batch(chunk, &iface, Port::Dhcp, &service));
    }
    let mut spent = started.elapsed();
    assert_eq!(offers.len(), MACHINES as usize, "every DISCOVER is offered");
    let requests: Vec<_> = offers
        .iter()
        .map(|(_, bytes, _)| {
            let offer = Message::decode(&mut Decoder::new(bytes)).unwrap();
            (
                message(
                    offer.xid(),
                    MessageType::Request,
                    Some((offer.yiaddr(), iface.addr)),
                ),
                peer,
            )
        })
        .collect();
    let started = Instant::now();
    let mut acks = 0;
    for chunk in requests.chunks(BATCH) {
        acks += decide_batch(chunk, &iface, Port::Dhcp, &service).len();
    }
    spent += started.elapsed();
    assert_eq!(acks, MACHINES as usize, "every REQUEST is acknowledged");
    spent.as_secs_f64() * 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut times: Vec<f64> = (0..ROUNDS).map(|_| round()).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "dhcp_storm_cpu: {MACHINES} machines DORA, median {:.1} ms ({:.2} us per request), range {:.1}-{:.1} ms",
        times[ROUNDS / 2],
        times[ROUNDS / 2] * 1000.0 / (2.0 * MACHINES as f64),
        times[0],
        times[ROUNDS - 1]
    );
}
