//! Fuzzes the DHCP decision path end to end: any bytes, split into
//! datagrams at each `0xFE 0xFE` pair, parsed and decided against a small
//! inventory (a reservation, a do-not-netboot machine) in full mode, then
//! proxy mode, direct and relayed, on both ports. Whatever arrives, nothing
//! panics, every reply decodes, and no address is ever bound to two MACs
//! or handed out outside the pools and reservations.
#![no_main]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bootfleet::config::{Config, DhcpMode};
use bootfleet::inventory::Snapshot;
use bootfleet::proto::dhcp::parse_request;
use bootfleet::server::dhcp::leases::{LeaseTable, Pool, State};
use bootfleet::server::dhcp::{decide, Context, Interface, Port};
use dhcproto::v4::Message;
use dhcproto::{Decodable, Decoder};
use libfuzzer_sys::fuzz_target;

const INVENTORY: &str = r#"
[images.debian]
kernel = "debian/vmlinuz"

[machines."52:54:00:12:34:56"]
image = "debian"
ip = "10.0.0.150"

[machines."52:54:00:00:00:03"]
netboot = false
"#;

fn pools() -> Vec<Pool> {
    vec![
        Pool { first: Ipv4Addr::new(10, 0, 0, 100), last: Ipv4Addr::new(10, 0, 0, 107), prefix_len: 24 },
        Pool { first: Ipv4Addr::new(10, 9, 0, 100), last: Ipv4Addr::new(10, 9, 0, 103), prefix_len: 24 },
    ]
}

fn allowed(ip: Ipv4Addr) -> bool {
    ip.is_unspecified()
        || ip == Ipv4Addr::new(10, 0, 0, 150)
        || pools().iter().any(|p| p.contains(ip))
}

/// The inventory, parsed once: parsing TOML on every input made it most
/// of each execution's time.
fn snapshot() -> &'static Snapshot {
    static SNAPSHOT: OnceLock<Snapshot> = OnceLock::new();
    SNAPSHOT.get_or_init(|| {
        Snapshot::parse(INVENTORY, Path::new("inventory.toml"), Path::new("/nonexistent"), 1)
            .expect("the fuzz inventory is valid")
    })
}

fuzz_target!(|data: &[u8]| {
    let snapshot = snapshot();
    let iface = Interface { name: "veth0".into(), addr: Ipv4Addr::new(10, 0, 0, 1), prefix_len: 24 };
    let datagrams: Vec<&[u8]> = {
        let mut out = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i + 1 < data.len() {
            if data[i] == 0xFE && data[i + 1] == 0xFE {
                out.push(&data[start..i]);
                start = i + 2;
                i += 2;
            } else {
                i += 1;
            }
        }
        out.push(&data[start..]);
        out
    };
    for mode in [DhcpMode::Full, DhcpMode::Proxy] {
        let mut config = Config::default().dhcp;
        config.mode = mode;
        config.router = Some(iface.addr);
        let mut leases = LeaseTable::new(pools(), 0.75);
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        for (n, datagram) in datagrams.iter().enumerate() {
            let Ok((request, info)) = parse_request(datagram) else { continue };
            let port = if n % 3 == 2 { Port::Pxe } else { Port::Dhcp };
            let peer = if n % 2 == 0 {
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68))
            } else {
                SocketAddr::from((Ipv4Addr::new(10, 9, 0, 1), 67))
            };
            let ctx = Context {
                config: &config,
                iface: &iface,
                snapshot,
                port,
                peer,
                http_port: 8080,
                now: start + Duration::from_secs(n as u64 * 7),
            };
            let outcome = decide(&request, &info, &ctx, &mut leases);
            if let Some((bytes, _)) = &outcome.reply {
                let reply = Message::decode(&mut Decoder::new(bytes)).expect("replies decode");
                assert!(allowed(reply.yiaddr()), "handed out {}", reply.yiaddr());
                if mode == DhcpMode::Proxy {
                    assert!(reply.yiaddr().is_unspecified(), "proxy mode gives no address");
                }
            }
            if let Some(change) = outcome.change {
                assert!(allowed(change.ip), "leased {}", change.ip);
            }
        }
        // No machine holds two bound addresses (a leak that empties the
        // pool), and each bound address is where the table says it is.
        let mut bound = HashMap::new();
        for pool in pools() {
            for raw in u32::from(pool.first)..=u32::from(pool.last) {
                let ip = Ipv4Addr::from(raw);
                if let Some(lease) = leases.get(ip).filter(|l| l.state == State::Bound) {
                    assert_eq!(lease.ip, ip);
                    if let Some(other) = bound.insert(lease.mac, ip) {
                        panic!("{} holds {other} and {ip}", lease.mac);
                    }
                }
            }
        }
    }
});
