//! Decisions from firmware requests (byte vectors as firmware sends them),
//! in full and proxy mode, relayed and not.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::SystemTime;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};

use super::leases::{LeaseTable, Pool, State};
use super::*;
use crate::config::{Config, DhcpMode, Quirk};
use crate::inventory::Snapshot;
use crate::proto::dhcp::parse_request;
use crate::proto::dhcp::tests::*;

const IFACE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn iface() -> Interface {
    Interface {
        name: "veth0".into(),
        addr: IFACE_ADDR,
        prefix_len: 24,
    }
}

fn table() -> LeaseTable {
    LeaseTable::new(
        vec![
            Pool {
                first: Ipv4Addr::new(10, 0, 0, 100),
                last: Ipv4Addr::new(10, 0, 0, 199),
                prefix_len: 24,
            },
            Pool {
                first: Ipv4Addr::new(10, 9, 0, 100),
                last: Ipv4Addr::new(10, 9, 0, 110),
                prefix_len: 24,
            },
        ],
        1.0,
    )
}

fn snapshot(text: &str) -> Snapshot {
    Snapshot::parse(
        text,
        Path::new("inventory.toml"),
        Path::new("/nonexistent"),
        1,
    )
    .unwrap()
}

struct Run {
    config: crate::config::DhcpConfig,
    snapshot: Snapshot,
    leases: LeaseTable,
    port: Port,
}

impl Run {
    fn new(mode: DhcpMode) -> Self {
        let mut config = Config::default().dhcp;
        config.mode = mode;
        config.router = Some(IFACE_ADDR);
        Self {
            config,
            snapshot: Snapshot::default(),
            leases: table(),
            port: Port::Dhcp,
        }
    }

    fn ask(&mut self, bytes: &[u8]) -> (Outcome, Option<Message>) {
        let (request, info) = parse_request(bytes).unwrap();
        let iface = iface();
        let ctx = Context {
            config: &self.config,
            iface: &iface,
            snapshot: &self.snapshot,
            port: self.port,
            peer: "10.0.0.150:68".parse::<SocketAddr>().unwrap(),
            http_port: 8080,
            now: SystemTime::now(),
        };
        let outcome = decide(&request, &info, &ctx, &mut self.leases);
        let reply = outcome
            .reply
            .as_ref()
            .map(|(bytes, _)| Message::decode(&mut Decoder::new(bytes)).unwrap());
        (outcome, reply)
    }
}

fn option_bytes(message: &Message, code: OptionCode) -> Option<Vec<u8>> {
    match message.opts().get(code)? {
        DhcpOption::ClassIdentifier(v)
        | DhcpOption::BootfileName(v)
        | DhcpOption::VendorExtensions(v)
        | DhcpOption::ClientMachineIdentifier(v) => Some(v.clone()),
        _ => None,
    }
}

fn boot_file(message: &Message) -> String {
    String::from_utf8(option_bytes(message, OptionCode::BootfileName).unwrap_or_default()).unwrap()
}

#[test]
fn full_mode_offers_an_address_and_the_loader_for_each_architecture() {
    let cases: [(&str, Vec<u8>, &str, &str); 5] = [
        ("bios", bios_pxe_discover(), "undionly.kpxe", "PXEClient"),
        ("uefi x64", uefi_x64_discover(), "ipxe.efi", "PXEClient"),
        ("arm64", arm64_discover(), "arm64/snponly.efi", "PXEClient"),
        (
            "ipxe",
            ipxe_discover(),
            "http://10.0.0.1:8080/boot.ipxe",
            "PXEClient",
        ),
        (
            "uefi http",
            uefi_http_discover(),
            "http://10.0.0.1:8080/ipxe.efi",
            "HTTPClient",
        ),
    ];
    for (name, bytes, file, class) in cases {
        let mut run = Run::new(DhcpMode::Full);
        let (outcome, reply) = run.ask(&bytes);
        let reply = reply.unwrap_or_else(|| panic!("{name}: no reply"));
        assert_eq!(reply.opts().msg_type(), Some(MessageType::Offer), "{name}");
        assert!(
            run.leases.pools[0].contains(reply.yiaddr()),
            "{name}: {}",
            reply.yiaddr()
        );
        assert_eq!(boot_file(&reply), file, "{name}");
        assert_eq!(reply.siaddr(), IFACE_ADDR, "{name}");
        assert_eq!(
            option_bytes(&reply, OptionCode::ClassIdentifier).unwrap(),
            class.as_bytes(),
            "{name}"
        );
        assert!(
            outcome.change.is_none(),
            "{name}: an offer is not journalled"
        );
        if class == "PXEClient" && name != "ipxe" {
            assert_eq!(
                option_bytes(&reply, OptionCode::VendorExtensions).unwrap(),
                vec![6, 1, 8, 255],
                "{name}"
            );
            assert_eq!(
                option_bytes(&reply, OptionCode::ClientMachineIdentifier)
                    .unwrap()
                    .len(),
                17,
                "{name}"
            );
        }
    }
}

#[test]
fn the_whole_lease_cycle() {
    let mut run = Run::new(DhcpMode::Full);
    let (_, offer) = run.ask(&bios_pxe_discover());
    let ip = offer.unwrap().yiaddr();

    // Another server's offer chosen: silence, and our offer is freed.
    let (outcome, _) = run.ask(&bios_pxe_request(ip, Ipv4Addr::new(10, 0, 0, 2)));
    assert!(outcome.reply.is_none());
    assert_eq!(run.leases.get(ip).unwrap().state, State::Released);

    let (outcome, ack) = run.ask(&bios_pxe_request(ip, IFACE_ADDR));
    let ack = ack.unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), ip);
    assert_eq!(boot_file(&ack), "undionly.kpxe");
    assert!(matches!(
        ack.opts().get(OptionCode::AddressLeaseTime),
        Some(DhcpOption::AddressLeaseTime(3600))
    ));
    assert_eq!(outcome.change.unwrap().state, State::Bound);

    // RENEW: ciaddr, no option 50 or 54 → ACK unicast to ciaddr.
    let renew = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        ip.octets(),
        [0; 4],
        &[(53, &[3])],
    );
    let (outcome, ack) = run.ask(&renew);
    assert_eq!(ack.unwrap().opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(outcome.reply.unwrap().1, Destination::Unicast(ip, 68));

    // Someone else asking for that address is refused.
    let thief = raw_request(
        [2, 0, 0, 0, 0, 7],
        0x8000,
        [0; 4],
        [0; 4],
        &[(53, &[3]), (50, &ip.octets())],
    );
    let (_, nak) = run.ask(&thief);
    assert_eq!(nak.unwrap().opts().msg_type(), Some(MessageType::Nak));
    // INIT-REBOOT on the wrong subnet is refused too.
    let (_, nak) = run.ask(&raw_request(
        [2, 0, 0, 0, 0, 8],
        0x8000,
        [0; 4],
        [0; 4],
        &[(53, &[3]), (50, &[192, 168, 1, 5])],
    ));
    assert_eq!(nak.unwrap().opts().msg_type(), Some(MessageType::Nak));

    // INFORM: options, no address.
    let (outcome, ack) = run.ask(&raw_request(
        [2, 0, 0, 0, 0, 9],
        0,
        [10, 0, 0, 77],
        [0; 4],
        &[(53, &[8])],
    ));
    let ack = ack.unwrap();
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert_eq!(
        outcome.reply.unwrap().1,
        Destination::Unicast(Ipv4Addr::new(10, 0, 0, 77), 68)
    );

    // DECLINE: the address is kept from everyone for a lease time.
    let decline = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        [0; 4],
        [0; 4],
        &[(53, &[4]), (50, &ip.octets()), (54, &IFACE_ADDR.octets())],
    );
    let (outcome, _) = run.ask(&decline);
    assert_eq!(outcome.change.unwrap().state, State::Declined);
    let (_, offer) = run.ask(&bios_pxe_discover());
    assert_ne!(offer.unwrap().yiaddr(), ip);

    // RELEASE of the new address.
    let (_, offer) = run.ask(&bios_pxe_discover());
    let second = offer.unwrap().yiaddr();
    run.ask(&bios_pxe_request(second, IFACE_ADDR));
    let release = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        second.octets(),
        [0; 4],
        &[(53, &[7]), (54, &IFACE_ADDR.octets())],
    );
    let (outcome, reply) = run.ask(&release);
    assert!(reply.is_none());
    assert_eq!(outcome.change.unwrap().state, State::Released);
}

#[test]
fn relayed_requests_use_the_relay_subnet_and_echo_option_82() {
    let mut run = Run::new(DhcpMode::Full);
    let agent: &[u8] = &[1, 4, b'p', b'o', b'r', b't', 2, 3, b'r', b'i', b'd'];
    let bytes = raw_request(
        [2, 0, 0, 0, 1, 1],
        0,
        [0; 4],
        [10, 9, 0, 1],
        &[
            (53, &[1]),
            (82, agent),
            (60, b"PXEClient:Arch:00000:UNDI:002001"),
        ],
    );
    let (outcome, reply) = run.ask(&bytes);
    let reply = reply.unwrap();
    assert!(
        run.leases.pools[1].contains(reply.yiaddr()),
        "{}",
        reply.yiaddr()
    );
    assert_eq!(reply.giaddr(), Ipv4Addr::new(10, 9, 0, 1));
    assert_eq!(
        outcome.reply.unwrap().1,
        Destination::Relay(Ipv4Addr::new(10, 9, 0, 1))
    );
    assert!(
        reply
            .opts()
            .get(OptionCode::RelayAgentInformation)
            .is_some(),
        "option 82 echoed"
    );
    assert!(
        matches!(reply.opts().get(OptionCode::Router), Some(DhcpOption::Router(r)) if r == &vec![IFACE_ADDR])
    );
}

#[test]
fn proxy_mode_answers_boot_clients_only_and_never_with_an_address() {
    let mut run = Run::new(DhcpMode::Proxy);
    let (outcome, offer) = run.ask(&bios_pxe_discover());
    let offer = offer.unwrap();
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(boot_file(&offer), "undionly.kpxe");
    assert_eq!(
        option_bytes(&offer, OptionCode::ClassIdentifier).unwrap(),
        b"PXEClient"
    );
    assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert_eq!(outcome.reply.unwrap().1, Destination::Broadcast);

    // An ordinary client: nothing.
    let plain = raw_request([2, 0, 0, 0, 0, 1], 0, [0; 4], [0; 4], &[(53, &[1])]);
    assert!(run.ask(&plain).0.reply.is_none());
    // Its REQUEST on port 67: nothing (the real DHCP server answers it).
    assert!(run
        .ask(&bios_pxe_request(
            Ipv4Addr::new(10, 0, 0, 150),
            Ipv4Addr::new(10, 0, 0, 2)
        ))
        .0
        .reply
        .is_none());

    // Port 4011: the boot-server request gets an ACK back to its sender.
    run.port = Port::Pxe;
    let pxe_request = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        [10, 0, 0, 150],
        [0; 4],
        &[
            (53, &[3]),
            (60, b"PXEClient:Arch:00007:UNDI:003000"),
            (93, &[0, 7]),
        ],
    );
    let (outcome, ack) = run.ask(&pxe_request);
    assert_eq!(boot_file(&ack.unwrap()), "ipxe.efi");
    assert_eq!(
        outcome.reply.unwrap().1,
        Destination::Unicast(Ipv4Addr::new(10, 0, 0, 150), 68)
    );
}

#[test]
fn inventory_reservations_do_not_netboot_and_quirks() {
    let mut run = Run::new(DhcpMode::Full);
    run.snapshot = snapshot(
        "[images.a]\nkernel = \"k\"\n[machines.\"52:54:00:12:34:56\"]\nimage = \"a\"\nip = \"10.0.0.150\"\nhostname = \"node1\"\n\
         [machines.\"02:00:00:00:00:05\"]\nnetboot = false\n",
    );
    let (_, offer) = run.ask(&bios_pxe_discover());
    let offer = offer.unwrap();
    assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 150));
    assert!(
        matches!(offer.opts().get(OptionCode::Hostname), Some(DhcpOption::Hostname(h)) if h == "node1")
    );

    let blocked = raw_request(
        [2, 0, 0, 0, 0, 5],
        0x8000,
        [0; 4],
        [0; 4],
        &[(53, &[1]), (60, b"PXEClient:Arch:00000:UNDI:002001")],
    );
    let (_, offer) = run.ask(&blocked);
    let offer = offer.unwrap();
    assert!(!offer.yiaddr().is_unspecified(), "still an address");
    assert!(
        offer.opts().get(OptionCode::BootfileName).is_none(),
        "but no boot file"
    );
    run.config.mode = DhcpMode::Proxy;
    assert!(run.ask(&blocked).0.reply.is_none());

    // A board that claims BIOS but is arm64.
    run.config.mode = DhcpMode::Full;
    run.config.quirks = vec![Quirk {
        mac_prefix: Some("B8-27-EB".into()),
        vendor_class: None,
        arch: Some(Arch::UefiArm64),
        boot_file: None,
        also_ipxe: false,
        secure_boot: false,
    }];
    let pi = raw_request(
        [0xb8, 0x27, 0xeb, 0, 0, 1],
        0x8000,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (93, &[0, 0]),
            (60, b"PXEClient:Arch:00000:UNDI:002001"),
        ],
    );
    assert_eq!(boot_file(&run.ask(&pi).1.unwrap()), "arm64/snponly.efi");
}

#[test]
fn a_quirk_gives_ipxe_clients_its_file_only_when_it_says_also_ipxe() {
    let mut run = Run::new(DhcpMode::Full);
    let mut quirk = Quirk {
        mac_prefix: Some("52:54:00".into()),
        vendor_class: None,
        arch: None,
        boot_file: Some("ipxe/undionly.kpxe".into()),
        also_ipxe: false,
        secure_boot: false,
    };
    run.config.quirks = vec![quirk.clone()];
    let (_, offer) = run.ask(&ipxe_discover());
    assert_eq!(boot_file(&offer.unwrap()), "http://10.0.0.1:8080/boot.ipxe");
    quirk.also_ipxe = true;
    run.config.quirks = vec![quirk];
    let (_, offer) = run.ask(&ipxe_discover());
    assert_eq!(boot_file(&offer.unwrap()), "ipxe/undionly.kpxe");
}

#[test]
fn the_rate_limiter_holds_one_source_and_not_another() {
    let mut limiter = RateLimiter::new(10);
    let now = SystemTime::now();
    let spray = Ipv4Addr::new(10, 0, 0, 66);
    let allowed = (0..100).filter(|_| limiter.allow(spray, now)).count();
    assert_eq!(allowed, 10);
    assert!(limiter.allow(Ipv4Addr::new(10, 0, 0, 67), now));
    assert!(limiter.allow(spray, now + std::time::Duration::from_millis(200)));
}

/// Security review finding 3: a REQUEST without a DISCOVER (INIT-REBOOT)
/// bound any free address to any MAC, so one host could take the pool
/// under made-up MACs. Now an address is bound only after this server
/// offered or leased it to that MAC (or it is its reservation); otherwise
/// INIT-REBOOT gets silence and SELECTING a NAK (RFC 2131 §4.3.2). And an
/// offer cannot be declined into quarantine, only a bound address.
#[test]
fn a_request_out_of_the_blue_binds_nothing() {
    let mut run = Run::new(DhcpMode::Full);
    for n in 0..50u8 {
        let mac = [0x02, 0, 0, 0, 0x99, n];
        let wanted = Ipv4Addr::new(10, 0, 0, 100 + n);
        let init_reboot = raw_request(
            mac,
            0,
            [0; 4],
            [0; 4],
            &[(53, &[3]), (50, &wanted.octets())],
        );
        let (outcome, reply) = run.ask(&init_reboot);
        assert!(
            reply.is_none(),
            "INIT-REBOOT without a record is answered silently"
        );
        assert!(outcome.change.is_none());
        let selecting = raw_request(
            mac,
            0,
            [0; 4],
            [0; 4],
            &[
                (53, &[3]),
                (50, &wanted.octets()),
                (54, &IFACE_ADDR.octets()),
            ],
        );
        let (outcome, reply) = run.ask(&selecting);
        assert_eq!(reply.unwrap().opts().msg_type(), Some(MessageType::Nak));
        assert!(outcome.change.is_none());
        let renewing = raw_request(mac, 0, wanted.octets(), [0; 4], &[(53, &[3])]);
        assert!(run.ask(&renewing).1.is_none());
        assert!(run
            .leases
            .get(wanted)
            .is_none_or(|l| l.state != State::Bound));
    }
    // An offered address declined before it is bound stays in the pool.
    let (_, offer) = run.ask(&bios_pxe_discover());
    let offered = offer.unwrap().yiaddr();
    let decline = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        [0; 4],
        [0; 4],
        &[
            (53, &[4]),
            (50, &offered.octets()),
            (54, &IFACE_ADDR.octets()),
        ],
    );
    assert!(run.ask(&decline).0.change.is_none());
    // The usual DORA still binds, and the client may come back to it.
    let (_, ack) = run.ask(&bios_pxe_request(offered, IFACE_ADDR));
    assert_eq!(ack.unwrap().opts().msg_type(), Some(MessageType::Ack));
    let again = raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0,
        [0; 4],
        [0; 4],
        &[(53, &[3]), (50, &offered.octets())],
    );
    assert_eq!(
        run.ask(&again).1.unwrap().opts().msg_type(),
        Some(MessageType::Ack)
    );
}

/// Security review finding 15: a machine reserved this server's own
/// address, or the subnet's network or broadcast address, was given it.
#[test]
fn a_reservation_of_the_servers_own_network_or_broadcast_address_is_not_handed_out() {
    for reserved in ["10.0.0.1", "10.0.0.0", "10.0.0.255"] {
        let mut run = Run::new(DhcpMode::Full);
        run.snapshot = snapshot(&format!(
            "[machines.\"52:54:00:12:34:56\"]\nip = \"{reserved}\"\n"
        ));
        let (_, offer) = run.ask(&bios_pxe_discover());
        let ip = offer.unwrap().yiaddr();
        assert_ne!(ip.to_string(), reserved);
        assert!(
            (100..=199).contains(&ip.octets()[3]),
            "{ip} comes from the pool"
        );
    }
    for never in ["0.0.0.0", "255.255.255.255", "224.0.0.1", "239.255.0.1"] {
        let text = format!("[machines.\"52:54:00:12:34:56\"]\nip = \"{never}\"\n");
        let error = Snapshot::parse(&text, Path::new("i.toml"), Path::new("/x"), 1).unwrap_err();
        assert!(error.to_string().contains("cannot be reserved"), "{error}");
    }
}

#[test]
fn an_ipxe_with_its_own_script_gets_an_address_and_next_server_but_no_boot_file() {
    // What the script `bootfleet ipxe build` embeds makes iPXE send: its
    // own user class, and iPXE's option 175 as always.
    let own_script = |message_type: u8| {
        raw_request(
            [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            0,
            [0; 4],
            [0; 4],
            &[
                (53, &[message_type]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (77, b"bootfleet-embedded"),
                (175, &[0xeb, 0x03, 0x01, 0x00, 0x00]),
            ],
        )
    };
    let mut run = Run::new(DhcpMode::Full);
    let (outcome, offer) = run.ask(&own_script(1));
    let offer = offer.expect("an own-script iPXE gets an offer");
    assert!(run.leases.pools[0].contains(offer.yiaddr()));
    assert_eq!(boot_file(&offer), "", "no boot file");
    assert!(offer.fname().is_none_or(|f| f.iter().all(|&b| b == 0)));
    assert_eq!(offer.siaddr(), IFACE_ADDR, "this server as next server");
    assert!(
        outcome.summary.as_deref().unwrap().ends_with(" own script"),
        "{:?}",
        outcome.summary
    );
    // Even a quirk that gives iPXE clients a file does not apply: the
    // script would ignore it (and this is what ends an iPXE ROM's
    // chainload of it).
    run.config.quirks = vec![crate::config::Quirk {
        mac_prefix: Some("52:54:00".into()),
        vendor_class: None,
        arch: None,
        boot_file: Some("other.kpxe".into()),
        also_ipxe: true,
        secure_boot: false,
    }];
    let (_, offer) = run.ask(&own_script(1));
    assert_eq!(boot_file(&offer.unwrap()), "");
    // Proxy mode has no address to give and nothing to boot: silence.
    let mut proxy = Run::new(DhcpMode::Proxy);
    assert!(proxy.ask(&own_script(1)).0.reply.is_none());
}

#[test]
fn secure_boot_images_and_quirks_give_uefi_x64_pxe_clients_signed_shim() {
    let mut run = Run::new(DhcpMode::Full);
    let inventory = |secure_boot: bool| {
        snapshot(&format!(
            "[images.a]\nkernel = \"k\"\nsecure_boot = {secure_boot}\n\
             [machines.\"52:54:00:12:34:56\"]\nimage = \"a\"\n"
        ))
    };
    run.snapshot = inventory(true);
    let (_, offer) = run.ask(&uefi_x64_discover());
    assert_eq!(boot_file(&offer.unwrap()), "secureboot/shimx64.efi");
    // Only UEFI x64 PXE: a BIOS machine and an iPXE get their usual answer.
    assert_eq!(
        boot_file(&run.ask(&bios_pxe_discover()).1.unwrap()),
        "undionly.kpxe"
    );
    assert_eq!(
        boot_file(&run.ask(&ipxe_discover()).1.unwrap()),
        "http://10.0.0.1:8080/boot.ipxe"
    );
    // The image not marked: iPXE as always; a quirk marks machines by MAC.
    run.snapshot = inventory(false);
    assert_eq!(
        boot_file(&run.ask(&uefi_x64_discover()).1.unwrap()),
        "ipxe.efi"
    );
    run.config.quirks = vec![Quirk {
        mac_prefix: Some("52:54:00:12:34:56".into()),
        vendor_class: None,
        arch: None,
        boot_file: None,
        also_ipxe: false,
        secure_boot: true,
    }];
    run.config.boot.secure_boot_x64 = "sb/shimx64.efi".into();
    assert_eq!(
        boot_file(&run.ask(&uefi_x64_discover()).1.unwrap()),
        "sb/shimx64.efi"
    );
    // shim's GRUB beside it counts as a loader.
    let loaders = run.config.loader_files();
    assert!(
        loaders.contains(&"sb/grubx64.efi".to_string()),
        "{loaders:?}"
    );
}
