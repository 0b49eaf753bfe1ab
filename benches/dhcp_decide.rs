//! The CPU cost of bootfleet's DHCP decisions without the sockets: new
//! clients through a relay agent in full mode, DISCOVER → OFFER and
//! REQUEST → ACK, in batches as the engine reads them, leases journalled
//! (written, not synced) and boot events recorded. This is the user-space
//! share of what `benches/dhcp_compare.py` measures end to end against Kea;
//! it exists to compare changes to the decision path without the noise of
//! a VM's network stack.
//!
//!     cargo bench --bench dhcp_decide

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bootfleet::boot::Router;
use bootfleet::config::{Config, DhcpMode};
use bootfleet::server::dhcp::service::{decide_batch, DhcpService};
use bootfleet::server::dhcp::{Interface, Port};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Encodable, Encoder};

/// Clients per batch: what a 5 ms gathering window holds at 5,000 DORA/s.
const CLIENTS: usize = 25;
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 2);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 1);

/// A relayed PXE client's message, as perfdhcp sends it in relay mode.
fn message(mac: [u8; 6], kind: MessageType, requested: Option<Ipv4Addr>) -> Vec<u8> {
    let mut msg = Message::new(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        RELAY,
        &mac,
    );
    msg.set_opcode(Opcode::BootRequest).set_hops(1);
    let options = msg.opts_mut();
    options.insert(DhcpOption::MessageType(kind));
    options.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
    ]));
    if let Some(ip) = requested {
        options.insert(DhcpOption::RequestedIpAddress(ip));
        options.insert(DhcpOption::ServerIdentifier(SERVER));
    }
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes)).expect("encodes");
    bytes
}

struct Setup {
    service: DhcpService,
    discovers: Vec<Vec<u8>>,
    _dirs: [tempfile::TempDir; 2],
}

fn setup(round: u32) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let inventory = root.path().join("inventory.toml");
    std::fs::write(&inventory, "").unwrap();
    let router = Arc::new(Router::new(root.path(), &inventory, state.path()).unwrap());
    let mut config = Config::default().dhcp;
    config.mode = DhcpMode::Full;
    config.sync_leases = false;
    config.ranges = vec![(
        Ipv4Addr::new(10, 65, 0, 0),
        Ipv4Addr::new(10, 127, 255, 254),
        Some(10),
    )];
    let service = DhcpService::new(config, &[], router, 80, state.path()).unwrap();
    let discovers = (0..CLIENTS as u32)
        .map(|n| {
            let id = (round.wrapping_mul(CLIENTS as u32) + n).to_be_bytes();
            message(
                [2, 0xbf, id[0], id[1], id[2], id[3]],
                MessageType::Discover,
                None,
            )
        })
        .collect();
    Setup {
        service,
        discovers,
        _dirs: [root, state],
    }
}

fn decisions(c: &mut Criterion) {
    let iface = Interface {
        name: "bench0".into(),
        addr: SERVER,
        prefix_len: 10,
    };
    let relay = SocketAddr::from((RELAY, 67));
    let mut group = c.benchmark_group("dhcp");
    group.throughput(Throughput::Elements(CLIENTS as u64));
    let mut round = 0u32;
    group.bench_function("dora_relayed_new_clients", |b| {
        b.iter_batched(
            || {
                round += 1;
                setup(round)
            },
            |setup| {
                // As the engine reads them: each datagram copied out of the socket.
                let batch: Vec<(Vec<u8>, SocketAddr)> =
                    setup.discovers.iter().map(|d| (d.clone(), relay)).collect();
                let offers = decide_batch(&batch, &iface, Port::Dhcp, &setup.service);
                assert_eq!(offers.len(), CLIENTS, "{:?}", setup.service.stats);
                let batch: Vec<(Vec<u8>, SocketAddr)> = offers
                    .iter()
                    .map(|(mac, reply, _)| {
                        let yiaddr = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
                        (message(mac.0, MessageType::Request, Some(yiaddr)), relay)
                    })
                    .collect();
                let acks = decide_batch(&batch, &iface, Port::Dhcp, &setup.service);
                assert_eq!(acks.len(), CLIENTS);
                setup
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, decisions);
criterion_main!(benches);
