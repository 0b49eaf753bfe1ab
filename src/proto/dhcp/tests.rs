//! Requests as firmware puts them on the wire, byte by byte (header, magic
//! cookie, options in the order and form each firmware sends them), and the
//! RFC 2131 §4.1 destination table.

use super::*;

/// Raw BOOTREQUEST bytes.
pub fn raw_request(
    mac: [u8; 6],
    flags: u16,
    ciaddr: [u8; 4],
    giaddr: [u8; 4],
    options: &[(u8, &[u8])],
) -> Vec<u8> {
    let mut p = vec![1u8, 1, 6, 0]; // op, htype, hlen, hops
    p.extend_from_slice(&0x1234_5678u32.to_be_bytes()); // xid
    p.extend_from_slice(&4u16.to_be_bytes()); // secs
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&ciaddr);
    p.extend_from_slice(&[0; 4]); // yiaddr
    p.extend_from_slice(&[0; 4]); // siaddr
    p.extend_from_slice(&giaddr);
    p.extend_from_slice(&mac);
    p.extend_from_slice(&[0; 10]); // chaddr padding
    p.extend_from_slice(&[0; 64 + 128]); // sname, file
    p.extend_from_slice(&[99, 130, 83, 99]); // magic cookie
    for (code, value) in options {
        p.push(*code);
        p.push(value.len() as u8);
        p.extend_from_slice(value);
    }
    p.push(255);
    p
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUID: [u8; 17] = [
    0, 0x8a, 0x7c, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6,
];
const PXE_PARAMS: &[u8] = &[
    1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54, 58, 59,
    60, 66, 67, 128, 129, 130, 131, 132, 133, 134, 135,
];

/// An Intel UNDI option ROM on a BIOS machine (DHCPDISCOVER).
pub fn bios_pxe_discover() -> Vec<u8> {
    raw_request(
        MAC,
        0x8000,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (57, &[0x04, 0xec]),
            (93, &[0, 0]),
            (94, &[1, 2, 1]),
            (97, &GUID),
            (55, PXE_PARAMS),
            (60, b"PXEClient:Arch:00000:UNDI:002001"),
        ],
    )
}

/// The same BIOS machine's DHCPREQUEST for `ip` offered by `server`.
pub fn bios_pxe_request(ip: std::net::Ipv4Addr, server: std::net::Ipv4Addr) -> Vec<u8> {
    raw_request(
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        0x8000,
        [0; 4],
        [0; 4],
        &[
            (53, &[3]),
            (50, &ip.octets()),
            (54, &server.octets()),
            (60, b"PXEClient:Arch:00000:UNDI:002001"),
            (93, &[0, 0]),
        ],
    )
}

/// OVMF's own PXE client (x64 UEFI).
pub fn uefi_x64_discover() -> Vec<u8> {
    raw_request(
        MAC,
        0x8000,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (57, &[0x05, 0xc0]),
            (
                55,
                &[
                    1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51, 54,
                    58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135,
                ],
            ),
            (97, &GUID),
            (94, &[1, 3, 0]),
            (93, &[0, 7]),
            (60, b"PXEClient:Arch:00007:UNDI:003000"),
        ],
    )
}

/// An arm64 UEFI PXE client.
pub fn arm64_discover() -> Vec<u8> {
    raw_request(
        MAC,
        0,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (57, &[0x05, 0xc0]),
            (93, &[0, 11]),
            (94, &[1, 3, 0]),
            (97, &GUID),
            (60, b"PXEClient:Arch:00011:UNDI:003000"),
        ],
    )
}

/// iPXE (BIOS build) asking again after the chainload.
pub fn ipxe_discover() -> Vec<u8> {
    raw_request(
        MAC,
        0,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (57, &[0x05, 0xc0]),
            (93, &[0, 0]),
            (94, &[1, 2, 1]),
            (60, b"PXEClient:Arch:00000:UNDI:002001"),
            (77, b"iPXE"),
            (
                55,
                &[
                    1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132, 133,
                    134, 135, 175, 203,
                ],
            ),
            (
                175,
                &[
                    0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0x21, 0x01, 0x01, 0x19, 0x01, 0x01,
                    0xeb, 0x03, 0x01, 0x00, 0x00,
                ],
            ),
            (61, &[1, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            (97, &GUID),
        ],
    )
}

/// UEFI HTTP boot (x64).
pub fn uefi_http_discover() -> Vec<u8> {
    raw_request(
        MAC,
        0x8000,
        [0; 4],
        [0; 4],
        &[
            (53, &[1]),
            (57, &[0x05, 0xc0]),
            (93, &[0, 16]),
            (94, &[1, 3, 0]),
            (97, &GUID),
            (60, b"HTTPClient:Arch:00016:UNDI:003001"),
        ],
    )
}

/// A name, a DISCOVER, and what it must be read as: the architecture, and
/// whether it is PXE firmware, iPXE, a UEFI HTTP client.
type FirmwareCase = (&'static str, Vec<u8>, Arch, bool, bool, bool);

#[test]
fn firmware_requests_are_classified() {
    let cases: Vec<FirmwareCase> = vec![
        ("bios", bios_pxe_discover(), Arch::Bios, true, false, false),
        (
            "uefi x64",
            uefi_x64_discover(),
            Arch::UefiX64,
            true,
            false,
            false,
        ),
        (
            "arm64",
            arm64_discover(),
            Arch::UefiArm64,
            true,
            false,
            false,
        ),
        ("ipxe", ipxe_discover(), Arch::Bios, true, true, false),
        (
            "uefi http",
            uefi_http_discover(),
            Arch::HttpX64,
            false,
            false,
            true,
        ),
    ];
    for (name, bytes, arch, pxe, ipxe, http) in cases {
        let (_, info) = parse_request(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.mac, Mac(MAC), "{name}");
        assert_eq!(info.message_type, MessageType::Discover, "{name}");
        assert_eq!(info.arch, arch, "{name}");
        assert_eq!(
            (info.pxe, info.ipxe, info.http_client),
            (pxe, ipxe, http),
            "{name}"
        );
        assert_eq!(info.machine_id.as_deref(), Some(&GUID[..]), "{name}");
    }
}

#[test]
fn architecture_from_the_vendor_class_when_option_93_is_missing() {
    let bytes = raw_request(
        MAC,
        0,
        [0; 4],
        [0; 4],
        &[(53, &[1]), (60, b"PXEClient:Arch:00007:UNDI:003016")],
    );
    assert_eq!(parse_request(&bytes).unwrap().1.arch, Arch::UefiX64);
}

#[test]
fn bad_datagrams_are_refused_not_panicked_on() {
    let good = bios_pxe_discover();
    for len in 0..good.len() {
        let _ = parse_request(&good[..len]);
    }
    assert!(matches!(
        parse_request(&good[..100]),
        Err(RequestError::Malformed(_))
    ));
    let mut reply = good.clone();
    reply[0] = 2;
    assert_eq!(
        parse_request(&reply).unwrap_err(),
        RequestError::NotARequest
    );
    let mut token_ring = good.clone();
    token_ring[1] = 6;
    assert!(matches!(
        parse_request(&token_ring),
        Err(RequestError::NotEthernet { .. })
    ));
    let bootp = raw_request(MAC, 0, [0; 4], [0; 4], &[]);
    assert_eq!(
        parse_request(&bootp).unwrap_err(),
        RequestError::NoMessageType
    );
    let mut wrong_magic = good.clone();
    wrong_magic[236] = 0;
    assert!(parse_request(&wrong_magic).is_err());
    assert!(parse_request(&vec![0u8; 4000]).is_err());
    // Option 94 of the wrong length: dhcproto asserts on it in debug
    // builds (the dhcp_decide fuzz target's first finding).
    for (code, len) in [
        (94u8, 0u8),
        (94, 2),
        (94, 4),
        (80, 1),
        (81, 2),
        (152, 3),
        (155, 5),
    ] {
        let value = vec![1u8; usize::from(len)];
        let wrong = raw_request(MAC, 0, [0; 4], [0; 4], &[(53, &[1]), (code, &value)]);
        assert!(
            matches!(parse_request(&wrong), Err(RequestError::Malformed(ref why)) if why.contains(&format!("option {code}"))),
            "option {code}, length {len}"
        );
    }
    assert!(parse_request(&raw_request(
        MAC,
        0,
        [0; 4],
        [0; 4],
        &[(53, &[1]), (94, &[1, 2, 1])]
    ))
    .is_ok());
    // An option whose length runs past the end.
    let mut overrun = good.clone();
    overrun.truncate(overrun.len() - 1);
    overrun.extend_from_slice(&[12, 200, b'x']);
    let _ = parse_request(&overrun);
}

fn info(giaddr: [u8; 4], ciaddr: [u8; 4], broadcast: bool) -> ClientInfo {
    let bytes = raw_request(
        MAC,
        if broadcast { 0x8000 } else { 0 },
        ciaddr,
        giaddr,
        &[(53, &[3])],
    );
    parse_request(&bytes).unwrap().1
}

#[test]
fn reply_destinations_follow_rfc_2131_section_4_1() {
    let yiaddr = Ipv4Addr::new(10, 0, 0, 50);
    let relay = Ipv4Addr::new(10, 9, 0, 1);
    let table: Vec<(ClientInfo, bool, Destination)> = vec![
        // relayed: always to the relay, NAKs too
        (
            info([10, 9, 0, 1], [0; 4], false),
            false,
            Destination::Relay(relay),
        ),
        (
            info([10, 9, 0, 1], [10, 0, 0, 50], true),
            true,
            Destination::Relay(relay),
        ),
        // NAK without relay: broadcast
        (
            info([0; 4], [10, 0, 0, 50], false),
            true,
            Destination::Broadcast,
        ),
        // renewing client: unicast to ciaddr
        (
            info([0; 4], [10, 0, 0, 50], false),
            false,
            Destination::Unicast(yiaddr, 68),
        ),
        (
            info([0; 4], [10, 0, 0, 50], true),
            false,
            Destination::Unicast(yiaddr, 68),
        ),
        // no address yet: broadcast bit decides
        (info([0; 4], [0; 4], true), false, Destination::Broadcast),
        (
            info([0; 4], [0; 4], false),
            false,
            Destination::Hardware {
                ip: yiaddr,
                mac: Mac(MAC),
            },
        ),
    ];
    for (i, (request, nak, want)) in table.into_iter().enumerate() {
        assert_eq!(reply_destination(&request, yiaddr, nak), want, "row {i}");
    }
    // A proxy answer carries no address: broadcast.
    assert_eq!(
        reply_destination(&info([0; 4], [0; 4], false), Ipv4Addr::UNSPECIFIED, false),
        Destination::Broadcast
    );
}
