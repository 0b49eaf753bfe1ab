//! DHCP as PXE firmware and then iPXE speak it, reaching the server one of
//! two ways ([`DhcpLink`]):
//! * through a relay agent: one socket at `giaddr:67` that every simulated
//!   machine's exchanges go through (as a real relay carries a whole
//!   rack), the server answering the relay;
//! * with real broadcasts on a boot LAN: one socket at `0.0.0.0:68` on the
//!   interface, requests to `255.255.255.255:67` with the broadcast flag
//!   set (as PXE firmware sets it), answers broadcast back.
//!
//! Either way the server's answers are handed to the machine that waits for
//! them by transaction id. `dhcproto` is the codec. Retransmissions follow
//! the clients: PXE firmware waits 4 s before it asks again (PXE 2.1
//! §2.2.1: 4, 8, 16, 32 s), iPXE 1 s, doubling.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// The way every machine's DHCP reaches the server.
pub struct DhcpLink {
    socket: UdpSocket,
    /// Relayed: the relay's address, put in `giaddr`. Broadcast: none.
    giaddr: Option<Ipv4Addr>,
    /// Where requests go: the server's port 67, or the broadcast address.
    target: SocketAddr,
    waiting: Mutex<HashMap<u32, mpsc::Sender<Message>>>,
}

impl DhcpLink {
    /// A relay agent at `giaddr:67` (bound to `device` when given, so that
    /// the server's own wildcard socket on that device does not take the
    /// answers), handing answers to the machines that wait for them.
    pub fn relay(
        giaddr: Ipv4Addr,
        server: SocketAddr,
        device: Option<&str>,
    ) -> std::io::Result<Arc<DhcpLink>> {
        Self::start(SocketAddrV4::new(giaddr, 67), device, Some(giaddr), server)
    }

    /// Real broadcasts on `device`, from the client port.
    pub fn broadcast(device: &str) -> std::io::Result<Arc<DhcpLink>> {
        Self::start(
            SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
            Some(device),
            None,
            SocketAddr::from((Ipv4Addr::BROADCAST, 67)),
        )
    }

    fn start(
        bind: SocketAddrV4,
        device: Option<&str>,
        giaddr: Option<Ipv4Addr>,
        target: SocketAddr,
    ) -> std::io::Result<Arc<DhcpLink>> {
        use socket2::{Domain, Protocol, Socket, Type};
        let socket = Socket::new(
            Domain::IPV4,
            Type::DGRAM.nonblocking().cloexec(),
            Some(Protocol::UDP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_broadcast(true)?;
        if let Some(device) = device {
            socket.bind_device(Some(device.as_bytes()))?;
        }
        socket.bind(&SocketAddr::from(bind).into())?;
        let _ = socket.set_send_buffer_size(8 << 20);
        let socket: std::net::UdpSocket = socket.into();
        // Ten thousand answers can arrive at once; the tester must not be
        // where they are dropped.
        bootfleet::engine::deepen_receive_queue(&socket);
        let link = Arc::new(DhcpLink {
            socket: UdpSocket::from_std(socket)?,
            giaddr,
            target,
            waiting: Mutex::new(HashMap::new()),
        });
        let receiver = Arc::clone(&link);
        tokio::spawn(async move { receiver.hand_out().await });
        Ok(link)
    }

    async fn hand_out(&self) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((len, _)) = self.socket.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(message) = Message::decode(&mut Decoder::new(&buf[..len])) else {
                continue;
            };
            let sender = self
                .waiting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&message.xid())
                .cloned();
            if let Some(sender) = sender {
                let _ = sender.try_send(message);
            }
        }
    }

    /// Sends `request` and waits for an answer of type `expect` (a NAK
    /// ends the exchange too), retransmitting from `first_retry` on,
    /// doubling, until `deadline`.
    pub async fn exchange(
        &self,
        request: &Message,
        expect: MessageType,
        first_retry: Duration,
        deadline: Instant,
    ) -> Result<Message, String> {
        let (sender, mut answers) = mpsc::channel(8);
        let xid = request.xid();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(xid, sender);
        let result = self
            .exchange_registered(request, expect, first_retry, deadline, &mut answers)
            .await;
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&xid);
        result
    }

    async fn exchange_registered(
        &self,
        request: &Message,
        expect: MessageType,
        first_retry: Duration,
        deadline: Instant,
        answers: &mut mpsc::Receiver<Message>,
    ) -> Result<Message, String> {
        let mut sent_as = request.clone();
        match self.giaddr {
            Some(giaddr) => {
                sent_as.set_giaddr(giaddr).set_hops(1);
            }
            None => {
                sent_as.set_flags(Flags::default().set_broadcast());
            }
        }
        let mut bytes = Vec::new();
        sent_as
            .encode(&mut Encoder::new(&mut bytes))
            .map_err(|e| format!("encode: {e}"))?;
        let mut retry = first_retry;
        let mut sent = 0u32;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no {expect:?} after {sent} requests"));
            }
            self.socket
                .send_to(&bytes, self.target)
                .await
                .map_err(|e| format!("send: {e}"))?;
            sent += 1;
            let wait_until = (now + retry).min(deadline);
            loop {
                match tokio::time::timeout_at(wait_until.into(), answers.recv()).await {
                    Ok(Some(answer)) => match message_type(&answer) {
                        Some(t) if t == expect => return Ok(answer),
                        Some(MessageType::Nak) => return Err(NAK.into()),
                        _ => continue,
                    },
                    Ok(None) => return Err("DHCP link closed".into()),
                    Err(_) => break,
                }
            }
            retry = (retry * 2).min(Duration::from_secs(32));
        }
    }
}

pub fn message_type(message: &Message) -> Option<MessageType> {
    match message.opts().get(OptionCode::MessageType) {
        Some(DhcpOption::MessageType(t)) => Some(*t),
        _ => None,
    }
}

/// Who a simulated machine says it is.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub mac: [u8; 6],
    /// Option 93: 0 BIOS, 7 x64 UEFI.
    pub arch: u16,
    /// Option 97's GUID.
    pub uuid: [u8; 16],
}

/// The firmware stage that is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Firmware,
    Ipxe,
}

impl Stage {
    /// How long the client waits before it first asks again.
    pub fn first_retry(self) -> Duration {
        match self {
            Stage::Firmware => Duration::from_secs(4),
            Stage::Ipxe => Duration::from_secs(1),
        }
    }
}

impl ClientIdentity {
    fn message(&self, xid: u32, kind: MessageType, stage: Stage) -> Message {
        let mut message = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &self.mac,
        );
        let opts = message.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::MaxMessageSize(1472));
        opts.insert(DhcpOption::ClassIdentifier(
            format!("PXEClient:Arch:{:05}:UNDI:002001", self.arch).into_bytes(),
        ));
        opts.insert(DhcpOption::ClientSystemArchitecture(self.arch.into()));
        let mut guid = vec![0u8];
        guid.extend_from_slice(&self.uuid);
        opts.insert(DhcpOption::ClientMachineIdentifier(guid));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::TFTPServerName,
            OptionCode::BootfileName,
            OptionCode::ClassIdentifier,
        ]));
        if stage == Stage::Ipxe {
            // iPXE sends its user class as the bare string (not RFC 3004 framed).
            opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        message
    }

    /// DHCPDISCOVER.
    pub fn discover(&self, xid: u32, stage: Stage) -> Message {
        self.message(xid, MessageType::Discover, stage)
    }

    /// DHCPREQUEST for `offer`.
    pub fn request(&self, xid: u32, stage: Stage, offer: &Message) -> Message {
        let mut message = self.message(xid, MessageType::Request, stage);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        if let Some(DhcpOption::ServerIdentifier(server)) =
            offer.opts().get(OptionCode::ServerIdentifier)
        {
            opts.insert(DhcpOption::ServerIdentifier(*server));
        }
        message
    }
}

/// What an ACK told the machine.
#[derive(Debug, Clone)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub next_server: Ipv4Addr,
    /// Option 67, or the `file` field.
    pub boot_file: String,
}

impl Lease {
    pub fn from_ack(ack: &Message) -> Result<Lease, String> {
        let boot_file = match ack.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(name)) => name.clone(),
            _ => ack.fname().unwrap_or_default().to_vec(),
        };
        let boot_file = String::from_utf8_lossy(&boot_file)
            .trim_end_matches('\0')
            .to_string();
        if boot_file.is_empty() {
            return Err("ACK without a boot file".into());
        }
        if ack.yiaddr().is_unspecified() {
            return Err("ACK without an address".into());
        }
        Ok(Lease {
            address: ack.yiaddr(),
            next_server: ack.siaddr(),
            boot_file,
        })
    }
}

/// A whole DORA exchange for `stage`: the lease, or why there is none. A
/// NAK starts over from DISCOVER, as RFC 2131 §3.1 has clients do.
pub async fn obtain(
    link: &DhcpLink,
    client: &ClientIdentity,
    xid: u32,
    stage: Stage,
    deadline: Instant,
) -> Result<Lease, String> {
    let mut naks = 0;
    loop {
        let offer = link
            .exchange(
                &client.discover(xid, stage),
                MessageType::Offer,
                stage.first_retry(),
                deadline,
            )
            .await?;
        // A REQUEST is retransmitted three times (1, 2 and 4 times the
        // first wait); with no ACK by then the client starts over from
        // DISCOVER, as RFC 2131 §4.4.1 and PXE firmware do, so a server
        // that died after its OFFER does not hold the machine forever.
        let give_up = (Instant::now() + stage.first_retry() * 7).min(deadline);
        match link
            .exchange(
                &client.request(xid, stage, &offer),
                MessageType::Ack,
                stage.first_retry(),
                give_up,
            )
            .await
        {
            Ok(ack) => return Lease::from_ack(&ack),
            Err(why) if why == NAK => {
                naks += 1;
                if Instant::now() >= deadline {
                    return Err(format!("NAK ({naks} times)"));
                }
            }
            Err(_) if Instant::now() < deadline => {}
            Err(why) => return Err(why),
        }
    }
}

/// What [`DhcpLink::exchange`] says of a DHCPNAK.
const NAK: &str = "NAK";
