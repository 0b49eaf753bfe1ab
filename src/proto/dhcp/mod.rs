//! DHCP for network boot, sans-I/O: what a request says about its client
//! ([`ClientInfo`]), and where a reply must go ([`reply_destination`],
//! RFC 2131 §4.1). `dhcproto` is the codec; what is here is the reading of
//! PXE, UEFI, iPXE and relay conventions that the codec leaves to us.

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};

use crate::proto::Mac;

pub mod lease;

/// The DHCP server port and the client port.
pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot-server port (ProxyDHCP requests after the first exchange).
pub const PXE_PORT: u16 = 4011;

/// The pre-boot environment a client says it runs (option 93, RFC 4578 and
/// the IANA "Processor Architecture Types" registry), after quirks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    Bios,
    UefiIa32,
    UefiX64,
    UefiArm32,
    UefiArm64,
    /// UEFI HTTP boot (x64), vendor class `HTTPClient`.
    HttpX64,
    HttpArm64,
    /// A value the server has no loader for.
    Other(u16),
}

impl Arch {
    /// From the option-93 value.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Arch::Bios,
            6 => Arch::UefiIa32,
            // 7 is "EFI BC" in RFC 4578 but x64 UEFI in every firmware;
            // 9 is "EFI x86-64" and also sent by x64 firmware.
            7 | 9 => Arch::UefiX64,
            10 => Arch::UefiArm32,
            11 => Arch::UefiArm64,
            16 => Arch::HttpX64,
            19 => Arch::HttpArm64,
            other => Arch::Other(other),
        }
    }

    /// Whether the client boots by HTTP URL (UEFI HTTP boot).
    pub fn is_http_boot(self) -> bool {
        matches!(self, Arch::HttpX64 | Arch::HttpArm64)
    }
}

/// What a request tells about its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    pub mac: Mac,
    pub message_type: MessageType,
    /// Option 93, if sent (first entry).
    pub arch_code: Option<u16>,
    pub arch: Arch,
    /// Vendor class (option 60) as text, if sent.
    pub vendor_class: Option<String>,
    /// Vendor class starts with `PXEClient`.
    pub pxe: bool,
    /// Vendor class starts with `HTTPClient` (UEFI HTTP boot).
    pub http_client: bool,
    /// iPXE (user class `iPXE` or option 175) or gPXE (user class `gPXE`).
    pub ipxe: bool,
    /// An iPXE that carries its own script and needs no boot file: its
    /// user class is [`OWN_SCRIPT_USER_CLASS`] (set by the script that
    /// `bootfleet ipxe build` embeds).
    pub own_script: bool,
    /// Option 97, the machine's UUID/GUID, echoed in PXE replies.
    pub machine_id: Option<Vec<u8>>,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub broadcast: bool,
    pub hostname: Option<String>,
}

/// Why a datagram is not a request this server answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a DHCP message: {0}")]
    Malformed(String),
    #[error("a BOOTREPLY sent to the server port")]
    NotARequest,
    #[error("hardware type {htype} / length {hlen} is not Ethernet")]
    NotEthernet { htype: u8, hlen: u8 },
    #[error("no DHCP message type (plain BOOTP is not served)")]
    NoMessageType,
}

/// Most bytes of a request this server reads (RFC 2131 allows 576 by
/// default; option 57 lets clients send more; 1500 covers Ethernet).
pub const MAX_REQUEST: usize = 1500;

/// Decodes and classifies a datagram.
pub fn parse_request(bytes: &[u8]) -> Result<(Message, ClientInfo), RequestError> {
    use dhcproto::{Decodable, Decoder};
    if bytes.len() > MAX_REQUEST {
        return Err(RequestError::Malformed(format!(
            "{} bytes is more than {MAX_REQUEST}",
            bytes.len()
        )));
    }
    // The codec does not insist on the magic cookie (RFC 2131 §3); a
    // datagram without it is BOOTP or noise, not a DHCP request.
    if bytes.len() < 240 || bytes[236..240] != [99, 130, 83, 99] {
        return Err(RequestError::Malformed("no DHCP magic cookie".into()));
    }
    check_fixed_lengths(&bytes[240..])?;
    let message = Message::decode(&mut Decoder::new(bytes))
        .map_err(|e| RequestError::Malformed(e.to_string()))?;
    let info = classify(&message)?;
    Ok((message, info))
}

/// Options whose length `dhcproto` takes on trust (it asserts it in debug
/// builds and reads past a shorter option otherwise): code, the lengths
/// allowed, and the RFC. Found by the `dhcp_decide` fuzz target.
const FIXED_LENGTHS: [(u8, std::ops::RangeInclusive<u8>, &str); 7] = [
    (80, 0..=0, "RFC 4039"),
    (81, 3..=255, "RFC 4702"),
    (94, 3..=3, "RFC 4578"),
    (152, 4..=4, "RFC 6926"),
    (153, 4..=4, "RFC 6926"),
    (154, 4..=4, "RFC 6926"),
    (155, 4..=4, "RFC 6926"),
];

/// Refuses a request carrying one of [`FIXED_LENGTHS`] at another length.
/// Every part of an option sent more than once must have an allowed length,
/// and so must all its parts together, as the codec joins adjacent parts
/// (RFC 3396).
fn check_fixed_lengths(options: &[u8]) -> Result<(), RequestError> {
    // Total length of each fixed option seen, `None` while absent.
    let mut totals: [Option<usize>; FIXED_LENGTHS.len()] = [None; FIXED_LENGTHS.len()];
    let mut at = 0;
    while let Some(&code) = options.get(at) {
        match code {
            0 => at += 1,
            255 => break,
            _ => {
                let Some(&len) = options.get(at + 1) else {
                    break;
                };
                if let Some(index) = FIXED_LENGTHS.iter().position(|(fixed, ..)| *fixed == code) {
                    // Each part on its own (the codec decodes parts that
                    // are not adjacent one by one) and all parts together.
                    let (_, allowed, rfc) = &FIXED_LENGTHS[index];
                    if !allowed.contains(&len) {
                        return Err(RequestError::Malformed(format!(
                            "option {code} is {len} bytes; {rfc} allows {allowed:?}"
                        )));
                    }
                    *totals[index].get_or_insert(0) += usize::from(len);
                }
                at += 2 + usize::from(len);
            }
        }
    }
    for ((code, allowed, rfc), total) in FIXED_LENGTHS.iter().zip(totals) {
        let Some(total) = total else { continue };
        if !(usize::from(*allowed.start())..=usize::from(*allowed.end())).contains(&total) {
            return Err(RequestError::Malformed(format!(
                "option {code} is {total} bytes in all; {rfc} allows {allowed:?}"
            )));
        }
    }
    Ok(())
}

/// Reads a decoded request.
pub fn classify(message: &Message) -> Result<ClientInfo, RequestError> {
    if message.opcode() != dhcproto::v4::Opcode::BootRequest {
        return Err(RequestError::NotARequest);
    }
    let htype = u8::from(message.htype());
    if htype != 1 || message.hlen() != 6 {
        return Err(RequestError::NotEthernet {
            htype,
            hlen: message.hlen(),
        });
    }
    let chaddr = message.chaddr();
    let mac = Mac([
        chaddr[0], chaddr[1], chaddr[2], chaddr[3], chaddr[4], chaddr[5],
    ]);
    let opts = message.opts();
    let message_type = opts.msg_type().ok_or(RequestError::NoMessageType)?;
    let bytes_of = |code: OptionCode| -> Option<Vec<u8>> {
        match opts.get(code)? {
            DhcpOption::ClassIdentifier(v)
            | DhcpOption::UserClass(v)
            | DhcpOption::ClientMachineIdentifier(v) => Some(v.clone()),
            DhcpOption::Unknown(u) => Some(u.data().to_vec()),
            _ => None,
        }
    };
    let vendor_class =
        bytes_of(OptionCode::ClassIdentifier).map(|v| String::from_utf8_lossy(&v).into_owned());
    let pxe = vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with("PXEClient"));
    let http_client = vendor_class
        .as_deref()
        .is_some_and(|v| v.starts_with("HTTPClient"));
    let user_class = bytes_of(OptionCode::UserClass).unwrap_or_default();
    let own_script = contains(&user_class, OWN_SCRIPT_USER_CLASS.as_bytes());
    let ipxe = contains(&user_class, b"iPXE")
        || contains(&user_class, b"gPXE")
        || opts.get(OptionCode::Unknown(175)).is_some();
    let arch_code = match opts.get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Some(u16::from(*arch)),
        _ => None,
    };
    // Some firmware only says its architecture in the vendor class
    // (`PXEClient:Arch:00007:UNDI:003016`).
    let arch_code = arch_code.or_else(|| {
        let class = vendor_class.as_deref()?;
        let start = class.find("Arch:")? + 5;
        class.get(start..start + 5)?.parse().ok()
    });
    let mut arch = Arch::from_code(arch_code.unwrap_or(0));
    if http_client {
        arch = match arch {
            Arch::UefiArm64 | Arch::HttpArm64 => Arch::HttpArm64,
            _ => Arch::HttpX64,
        };
    }
    let ip = |code: OptionCode| match opts.get(code) {
        Some(DhcpOption::RequestedIpAddress(ip)) | Some(DhcpOption::ServerIdentifier(ip)) => {
            Some(*ip)
        }
        _ => None,
    };
    Ok(ClientInfo {
        mac,
        message_type,
        arch_code,
        arch,
        vendor_class,
        pxe,
        http_client,
        ipxe,
        own_script,
        machine_id: bytes_of(OptionCode::ClientMachineIdentifier),
        requested_ip: ip(OptionCode::RequestedIpAddress),
        server_id: ip(OptionCode::ServerIdentifier),
        ciaddr: message.ciaddr(),
        giaddr: message.giaddr(),
        broadcast: message.flags().broadcast(),
        hostname: match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(name)) => Some(name.clone()),
            _ => None,
        },
    })
}

/// The DHCP user class (option 77) of an iPXE built with an embedded
/// script by `bootfleet ipxe build` (the write-up's methods 2 and 4): the
/// script already knows where the machine's own script is, so the server
/// answers it an address and itself as next server, no boot file.
pub const OWN_SCRIPT_USER_CLASS: &str = "bootfleet-embedded";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To the relay agent, on the server port.
    Relay(Ipv4Addr),
    /// Unicast to an address the client already has.
    Unicast(Ipv4Addr, u16),
    /// To 255.255.255.255 on the client port, out of the receiving interface.
    Broadcast,
    /// Unicast to `ip` at hardware address `mac` (the client cannot answer
    /// ARP yet); falls back to broadcast when the kernel does not let us
    /// add the neighbour entry.
    Hardware { ip: Ipv4Addr, mac: Mac },
}

/// RFC 2131 §4.1, as one function:
/// * `giaddr` set: to the relay, port 67 (a NAK too; the relay broadcasts it);
/// * otherwise a NAK: broadcast;
/// * otherwise `ciaddr` set: unicast to it, port 68;
/// * otherwise the broadcast bit set, or no address offered: broadcast;
/// * otherwise unicast to `yiaddr` at `chaddr`.
pub fn reply_destination(request: &ClientInfo, yiaddr: Ipv4Addr, nak: bool) -> Destination {
    if !request.giaddr.is_unspecified() {
        return Destination::Relay(request.giaddr);
    }
    if nak {
        return Destination::Broadcast;
    }
    if !request.ciaddr.is_unspecified() {
        return Destination::Unicast(request.ciaddr, CLIENT_PORT);
    }
    if request.broadcast || yiaddr.is_unspecified() {
        return Destination::Broadcast;
    }
    Destination::Hardware {
        ip: yiaddr,
        mac: request.mac,
    }
}

#[cfg(test)]
pub(crate) mod tests;
