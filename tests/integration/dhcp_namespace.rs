//! DHCP with real clients on a veth pair between two network namespaces
//! the test makes (and removes): busybox `udhcpc` and ISC `dhclient`
//! obtaining, renewing and releasing leases in full mode, a restart that
//! keeps every lease, a relayed request, and ProxyDHCP beside dnsmasq with a
//! PXE-style client that takes dnsmasq's address and bootfleet's boot file.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::common::*;

const SERVER_IP: &str = "10.77.0.1";

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap();
}

struct Lab {
    server_ns: String,
    client_ns: String,
    server_dev: String,
    client_dev: String,
    server: Option<Child>,
    others: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Self {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let lab = Lab {
            server_ns: format!("bfds{id}"),
            client_ns: format!("bfdc{id}"),
            server_dev: format!("ds{id}"),
            client_dev: format!("dc{id}"),
            server: None,
            others: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix("bootfleet-dhcp-")
                .tempdir()
                .unwrap(),
        };
        let (s, c) = (lab.server_ns.as_str(), lab.client_ns.as_str());
        ip(&["netns", "add", s]);
        ip(&["netns", "add", c]);
        ip(&[
            "link",
            "add",
            &lab.server_dev,
            "type",
            "veth",
            "peer",
            "name",
            &lab.client_dev,
        ]);
        ip(&["link", "set", &lab.server_dev, "netns", s]);
        ip(&["link", "set", &lab.client_dev, "netns", c]);
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &lab.server_dev,
        ]);
        ip(&[
            "-n",
            c,
            "link",
            "set",
            &lab.client_dev,
            "address",
            "52:54:00:aa:00:01",
        ]);
        for (ns, dev) in [(s, &lab.server_dev), (c, &lab.client_dev)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        std::fs::create_dir(lab.dir.path().join("boot")).unwrap();
        lab
    }

    fn start_server(&mut self, args: &[&str]) {
        let log = self.dir.path().join("server.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.server_ns,
                env!("CARGO_BIN_EXE_bootfleet"),
                "serve",
                "--panel-listen",
                "off",
                "--root",
            ])
            .arg(self.dir.path().join("boot"))
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args([
                "--tftp-listen",
                &format!("{SERVER_IP}:69"),
                "--http-listen",
                &format!("{SERVER_IP}:80"),
            ])
            .args(["--dhcp-interface", &self.server_dev])
            .args(args)
            .env("RUST_LOG", "bootfleet=debug")
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.server = Some(child);
        wait_for_log(
            &log,
            &["engine chosen", "DHCP listening"],
            &self.dir.path().join("server.err"),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn stop_server(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn in_client(&self, program: &str) -> Command {
        let mut command = Command::new("timeout");
        command.args(["60", "ip", "netns", "exec", &self.client_ns, program]);
        command
    }

    fn journal(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("state/dhcp-leases.jsonl")).unwrap_or_default()
    }

    /// Runs `body` on a thread inside the client namespace.
    fn in_client_thread<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = PathBuf::from(format!("/var/run/netns/{}", self.client_ns));
        std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            body()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_server();
        for mut child in self.others.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.server_ns, &self.client_ns] {
            // What still runs in it (a udhcpc whose `timeout` wrapper was
            // killed outlives it) goes with it.
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("ip netns pids {ns} 2>/dev/null | xargs -r kill -9"))
                .status();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A udhcpc event script that appends what it was told to `out`.
fn udhcpc_script(dir: &Path) -> (PathBuf, PathBuf) {
    let out = dir.join("udhcpc.out");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 ip=$ip boot_file=$boot_file siaddr=$siaddr serverid=$serverid lease=$lease\" >> {}\n\
             case \"$1\" in bound|renew) ip addr flush dev $interface; ip addr add $ip/24 dev $interface;; deconfig) ip addr flush dev $interface;; esac\n",
            out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (script, out)
}

fn field<'a>(line: &'a str, name: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{name}=")))
        .unwrap_or("")
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn full_mode_with_udhcpc_and_dhclient_and_a_restart_that_keeps_every_lease() {
    if !can_make_namespaces() || !have_tool("busybox") || !have_tool("dhclient") {
        return;
    }
    let mut lab = Lab::new("f");
    lab.start_server(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100-10.77.0.150",
    ]);
    let (script, out) = udhcpc_script(lab.dir.path());

    // Obtain, as a PXE client (vendor class), in the background.
    let udhcpc = lab
        .in_client("busybox")
        .args(["udhcpc", "-f", "-i", &lab.client_dev, "-s"])
        .arg(&script)
        .args([
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-t",
            "5",
            "-T",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.others.push(udhcpc);
    // Signals go to udhcpc itself, not to the `timeout` wrapping it.
    let signal = |name: &str| {
        let _ = Command::new("pkill")
            .args([
                &format!("-{name}"),
                "-f",
                &format!("udhcpc -f -i {}", lab.client_dev),
            ])
            .status();
    };
    wait_for("a bound lease", || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("bound ")
    });
    let text = std::fs::read_to_string(&out).unwrap();
    let bound = text
        .lines()
        .find(|l| l.starts_with("bound "))
        .unwrap()
        .to_string();
    let first_ip: Ipv4Addr = field(&bound, "ip").parse().unwrap();
    assert!((100..=150).contains(&first_ip.octets()[3]), "{bound}");
    assert_eq!(field(&bound, "boot_file"), "undionly.kpxe", "{bound}");
    assert_eq!(field(&bound, "siaddr"), SERVER_IP, "{bound}");
    assert_eq!(field(&bound, "lease"), "3600", "{bound}");
    assert!(
        lab.journal().contains(&first_ip.to_string()),
        "ACKed lease is journalled"
    );

    // Renew (SIGUSR1): a unicast REQUEST from the bound address.
    signal("USR1");
    wait_for("a renewal", || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("renew ")
    });
    let renew = std::fs::read_to_string(&out).unwrap();
    let renew = renew
        .lines()
        .find(|l| l.starts_with("renew "))
        .unwrap()
        .to_string();
    assert_eq!(field(&renew, "ip"), first_ip.to_string());

    // Release (SIGUSR2): the journal records it.
    signal("USR2");
    wait_for("a released lease", || {
        lab.journal().contains("\"released\"")
    });
    for mut child in lab.others.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }

    // Bind again, restart the server, and check that nothing is lost.
    let (script2, out2) = {
        let dir = lab.dir.path().join("second");
        std::fs::create_dir_all(&dir).unwrap();
        udhcpc_script(&dir)
    };
    run(lab
        .in_client("busybox")
        .args(["udhcpc", "-q", "-n", "-i", &lab.client_dev, "-s"])
        .arg(&script2)
        .args(["-t", "5", "-T", "1"]))
    .unwrap();
    let held: Ipv4Addr = field(
        std::fs::read_to_string(&out2)
            .unwrap()
            .lines()
            .find(|l| l.starts_with("bound "))
            .unwrap(),
        "ip",
    )
    .parse()
    .unwrap();
    lab.stop_server();
    lab.start_server(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100-10.77.0.150",
    ]);
    assert!(lab.log().contains("leases=1"), "{}", lab.log());

    // Another machine (dhclient, other MAC) gets another address...
    ip(&[
        "-n",
        &lab.client_ns,
        "addr",
        "flush",
        "dev",
        &lab.client_dev,
    ]);
    ip(&[
        "-n",
        &lab.client_ns,
        "link",
        "set",
        &lab.client_dev,
        "address",
        "52:54:00:aa:00:02",
    ]);
    let lease_file = lab.dir.path().join("dhclient.leases");
    run(lab
        .in_client("dhclient")
        .args(["-1", "-v", "-sf", "/bin/true", "-lf"])
        .arg(&lease_file)
        .arg("-pf")
        .arg(lab.dir.path().join("dhclient.pid"))
        .arg(&lab.client_dev))
    .unwrap();
    let leases = std::fs::read_to_string(&lease_file).unwrap();
    let other: Ipv4Addr = leases
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("fixed-address ")
                .map(|a| a.trim_end_matches(';').to_string())
        })
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(
        other, held,
        "a restart gave a held address to another machine"
    );
    let _ = lab
        .in_client("dhclient")
        .args(["-x", "-pf"])
        .arg(lab.dir.path().join("dhclient.pid"))
        .status();

    // ...and the first machine gets its own back.
    ip(&[
        "-n",
        &lab.client_ns,
        "link",
        "set",
        &lab.client_dev,
        "address",
        "52:54:00:aa:00:01",
    ]);
    std::fs::remove_file(&out2).unwrap();
    run(lab
        .in_client("busybox")
        .args(["udhcpc", "-q", "-n", "-i", &lab.client_dev, "-s"])
        .arg(&script2)
        .args(["-t", "5", "-T", "1"]))
    .unwrap();
    let again = std::fs::read_to_string(&out2).unwrap();
    assert_eq!(
        field(
            again.lines().find(|l| l.starts_with("bound ")).unwrap(),
            "ip"
        ),
        held.to_string()
    );
}

/// A DHCP message from a PXE client with MAC `mac`.
fn pxe_message(message_type: MessageType, mac: [u8; 6], options: Vec<DhcpOption>) -> Vec<u8> {
    let mut message = Message::new_with_id(
        0x0bad_cafe,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    message.set_flags(Flags::default().set_broadcast());
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(message_type));
    opts.insert(DhcpOption::ClassIdentifier(
        b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
    ));
    opts.insert(DhcpOption::ClientSystemArchitecture(0u16.into()));
    opts.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
    for option in options {
        opts.insert(option);
    }
    let mut bytes = Vec::new();
    message.encode(&mut Encoder::new(&mut bytes)).unwrap();
    bytes
}

fn receive_all(socket: &UdpSocket, within: Duration) -> Vec<(Message, SocketAddr)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                if let Ok(message) = Message::decode(&mut Decoder::new(&buf[..n])) {
                    if message.opcode() == Opcode::BootReply && message.xid() == 0x0bad_cafe {
                        out.push((message, from));
                    }
                }
            }
            Err(_) => break,
        }
    }
    out
}

fn boot_file(message: &Message) -> String {
    match message.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(name)) => String::from_utf8_lossy(name).into_owned(),
        _ => String::new(),
    }
}

fn client_socket(dev: &str, port: u16) -> UdpSocket {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_broadcast(true).unwrap();
    socket.bind_device(Some(dev.as_bytes())).unwrap();
    socket
        .bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
        .unwrap();
    socket.into()
}

#[test]
fn proxy_dhcp_beside_dnsmasq_gives_the_boot_file_and_no_address() {
    if !can_make_namespaces() || !have_tool("dnsmasq") {
        return;
    }
    let mut lab = Lab::new("p");
    // The site's own DHCP server, in the same namespace, on the same link.
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server_ns,
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            "--port=0",
            "--no-ping",
            "--bind-interfaces",
        ])
        .arg(format!("--interface={}", lab.server_dev))
        .args([
            "--dhcp-range=10.77.0.50,10.77.0.60,1h",
            "--user=root",
            "--pid-file=",
            "--dhcp-leasefile=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lab.others.push(dnsmasq);
    std::thread::sleep(Duration::from_millis(500));
    lab.start_server(&["--dhcp-mode", "proxy"]);

    let dev = lab.client_dev.clone();
    let mac = [0x52, 0x54, 0x00, 0xaa, 0x00, 0x01];
    let (offers, ack, proxy_ack) = lab.in_client_thread(move || {
        let socket = client_socket(&dev, 68);
        let broadcast: SocketAddr = "255.255.255.255:67".parse().unwrap();
        socket
            .send_to(&pxe_message(MessageType::Discover, mac, vec![]), broadcast)
            .unwrap();
        let offers = receive_all(&socket, Duration::from_secs(3));
        // Take the offer with an address (dnsmasq's), as PXE firmware does.
        let with_address = offers
            .iter()
            .find(|(m, _)| !m.yiaddr().is_unspecified())
            .cloned();
        let ack = with_address.map(|(offer, _)| {
            let server = match offer.opts().get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(ip)) => *ip,
                _ => panic!("offer without server id"),
            };
            let request = pxe_message(
                MessageType::Request,
                mac,
                vec![
                    DhcpOption::RequestedIpAddress(offer.yiaddr()),
                    DhcpOption::ServerIdentifier(server),
                ],
            );
            socket.send_to(&request, broadcast).unwrap();
            receive_all(&socket, Duration::from_secs(2))
                .into_iter()
                .find(|(m, _)| m.opts().msg_type() == Some(MessageType::Ack))
                .map(|(m, _)| m)
        });
        // Then ask the proxy on port 4011, from the address just obtained.
        let proxy_ack = ack.clone().flatten().map(|ack| {
            Command::new("ip")
                .args(["addr", "add", &format!("{}/24", ack.yiaddr()), "dev", &dev])
                .status()
                .unwrap();
            let mut message = Message::decode(&mut Decoder::new(&pxe_message(
                MessageType::Request,
                mac,
                vec![],
            )))
            .unwrap();
            message.set_ciaddr(ack.yiaddr());
            message.set_flags(Flags::default());
            let mut bytes = Vec::new();
            message.encode(&mut Encoder::new(&mut bytes)).unwrap();
            socket
                .send_to(&bytes, (SERVER_IP.parse::<Ipv4Addr>().unwrap(), 4011))
                .unwrap();
            receive_all(&socket, Duration::from_secs(2))
                .into_iter()
                .next()
                .map(|(m, _)| m)
        });
        (offers, ack.flatten(), proxy_ack.flatten())
    });

    let proxy: Vec<&Message> = offers
        .iter()
        .map(|(m, _)| m)
        .filter(|m| m.yiaddr().is_unspecified())
        .collect();
    let real: Vec<&Message> = offers
        .iter()
        .map(|(m, _)| m)
        .filter(|m| !m.yiaddr().is_unspecified())
        .collect();
    assert_eq!(
        proxy.len(),
        1,
        "one ProxyDHCP offer: {offers:?}\n{}",
        lab.log()
    );
    assert_eq!(boot_file(proxy[0]), "undionly.kpxe");
    assert!(
        matches!(proxy[0].opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(c)) if c == b"PXEClient")
    );
    assert!(proxy[0].opts().get(OptionCode::AddressLeaseTime).is_none());
    assert_eq!(real.len(), 1, "dnsmasq's offer: {offers:?}");
    let ack = ack.expect("dnsmasq acknowledged");
    assert!(
        (50..=60).contains(&ack.yiaddr().octets()[3]),
        "address from dnsmasq: {}",
        ack.yiaddr()
    );
    let proxy_ack = proxy_ack.expect("the proxy answered on port 4011");
    assert_eq!(proxy_ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(boot_file(&proxy_ack), "undionly.kpxe");
    assert_eq!(proxy_ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
}

#[test]
fn relayed_requests_are_answered_through_the_relay() {
    if !can_make_namespaces() {
        return;
    }
    let mut lab = Lab::new("r");
    // The client namespace plays the relay agent for subnet 10.88.0.0/24.
    ip(&[
        "-n",
        &lab.client_ns,
        "addr",
        "add",
        "10.77.0.2/24",
        "dev",
        &lab.client_dev,
    ]);
    ip(&[
        "-n",
        &lab.client_ns,
        "addr",
        "add",
        "10.88.0.1/24",
        "dev",
        &lab.client_dev,
    ]);
    ip(&[
        "-n",
        &lab.server_ns,
        "route",
        "add",
        "10.88.0.0/24",
        "via",
        "10.77.0.2",
    ]);
    lab.start_server(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100-10.77.0.150",
        "--dhcp-range",
        "10.88.0.100-10.88.0.150/24",
    ]);

    let (offer, ack) = lab.in_client_thread(|| {
        let relay = UdpSocket::bind(("10.88.0.1", 67)).unwrap();
        let server: SocketAddr = format!("{SERVER_IP}:67").parse().unwrap();
        let relayed = |message_type, extra: Vec<DhcpOption>| {
            let mut message = Message::decode(&mut Decoder::new(&pxe_message(
                message_type,
                [2, 0, 0, 0, 8, 8],
                extra,
            )))
            .unwrap();
            message.set_giaddr(Ipv4Addr::new(10, 88, 0, 1));
            message.set_hops(1);
            message.set_flags(Flags::default());
            message
                .opts_mut()
                .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(
                    OptionCode::RelayAgentInformation,
                    vec![1, 3, b'p', b'7', b'1'],
                )));
            let mut bytes = Vec::new();
            message.encode(&mut Encoder::new(&mut bytes)).unwrap();
            bytes
        };
        relay
            .send_to(&relayed(MessageType::Discover, vec![]), server)
            .unwrap();
        let offer = receive_all(&relay, Duration::from_secs(2))
            .into_iter()
            .next()
            .map(|(m, _)| m);
        let ack = offer.clone().and_then(|offer| {
            relay
                .send_to(
                    &relayed(
                        MessageType::Request,
                        vec![
                            DhcpOption::RequestedIpAddress(offer.yiaddr()),
                            DhcpOption::ServerIdentifier(SERVER_IP.parse().unwrap()),
                        ],
                    ),
                    server,
                )
                .unwrap();
            receive_all(&relay, Duration::from_secs(2))
                .into_iter()
                .next()
                .map(|(m, _)| m)
        });
        (offer, ack)
    });
    let offer = offer.unwrap_or_else(|| panic!("no relayed offer\n{}", lab.log()));
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(&offer.yiaddr().octets()[..3], &[10, 88, 0]);
    assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 88, 0, 1));
    assert!(
        offer
            .opts()
            .get(OptionCode::RelayAgentInformation)
            .is_some(),
        "option 82 echoed"
    );
    let ack = ack.expect("relayed ACK");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), offer.yiaddr());
}

#[test]
fn hostile_datagrams_do_not_stop_service() {
    if !can_make_namespaces() || !have_tool("busybox") {
        return;
    }
    let mut lab = Lab::new("h");
    lab.start_server(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100-10.77.0.150",
    ]);
    let dev = lab.client_dev.clone();
    lab.in_client_thread(move || {
        let socket = client_socket(&dev, 68);
        let target: SocketAddr = "255.255.255.255:67".parse().unwrap();
        let good = pxe_message(MessageType::Discover, [2, 0, 0, 0, 0, 1], vec![]);
        let mut junk: Vec<Vec<u8>> = vec![vec![], vec![1], vec![0xff; 1400], good[..200].to_vec()];
        let mut bad_magic = good.clone();
        bad_magic[236] ^= 0xff;
        junk.push(bad_magic);
        let mut looping = good.clone();
        looping.truncate(looping.len() - 1);
        looping.extend_from_slice(&[52, 1, 3, 255]); // option overload: file and sname hold options
        junk.push(looping);
        let mut overrun = good.clone();
        overrun.truncate(overrun.len() - 1);
        overrun.extend_from_slice(&[12, 250, b'x']);
        junk.push(overrun);
        for datagram in &junk {
            socket.send_to(datagram, target).unwrap();
        }
        // 2,000 random MACs from one source within a moment.
        for n in 0..2000u32 {
            let b = n.to_be_bytes();
            socket
                .send_to(
                    &pxe_message(
                        MessageType::Discover,
                        [2, 0xee, b[0], b[1], b[2], b[3]],
                        vec![],
                    ),
                    target,
                )
                .unwrap();
        }
    });
    // Everyone else is still served.
    let (script, out) = udhcpc_script(lab.dir.path());
    run(lab
        .in_client("busybox")
        .args(["udhcpc", "-q", "-n", "-i", &lab.client_dev, "-s"])
        .arg(&script)
        .args(["-t", "5", "-T", "1"]))
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.log()));
    assert!(std::fs::read_to_string(&out).unwrap().contains("bound "));
    assert!(
        lab.server.as_mut().unwrap().try_wait().unwrap().is_none(),
        "server still running"
    );
    assert!(
        lab.log().contains("DHCP datagram dropped"),
        "bad datagrams were logged"
    );
}

/// `rdisc6` (ndisc6) solicits a router on the client end, `tries` times one
/// second apart, and prints the advertisement it got, if any.
fn solicit_router(lab: &Lab, tries: &str) -> (bool, String) {
    // Both ends need their link-local address, which is usable once
    // duplicate address detection is done (about a second after link-up).
    for (ns, dev) in [
        (&lab.server_ns, &lab.server_dev),
        (&lab.client_ns, &lab.client_dev),
    ] {
        wait_for("IPv6 duplicate address detection", || {
            let output = Command::new("ip")
                .args(["-n", ns, "-6", "addr", "show", "dev", dev])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&output.stdout);
            text.contains("fe80::") && !text.contains("tentative")
        });
    }
    let output = lab
        .in_client("rdisc6")
        .args(["-1", "-r", tries, "-w", "1000", &lab.client_dev])
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn router_solicitations_get_an_advertisement_that_configures_nothing() {
    if !can_make_namespaces() || !have_tool("rdisc6") {
        return;
    }
    // Full mode: bootfleet owns the boot LAN and answers, so that iPXE
    // need not wait out its IPv6 timeout.
    let mut lab = Lab::new("r");
    lab.start_server(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.77.0.100-10.77.0.150",
    ]);
    let (answered, advertisement) = solicit_router(&lab, "3");
    assert!(
        answered,
        "no advertisement:\n{advertisement}\n{}",
        lab.log()
    );
    for line in [
        "Stateful address conf.    :           No",
        "Stateful other conf.      :           No",
        "Router lifetime           :            0",
    ] {
        assert!(advertisement.contains(line), "{line}:\n{advertisement}");
    }
    assert!(
        !advertisement.contains("Prefix"),
        "no prefix offered:\n{advertisement}"
    );
    assert!(lab.log().contains("answering IPv6 router solicitations"));

    // Proxy mode: the network has an owner; bootfleet stays silent.
    lab.stop_server();
    lab.start_server(&["--dhcp-mode", "proxy"]);
    let (answered, advertisement) = solicit_router(&lab, "2");
    assert!(!answered, "proxy mode answered:\n{advertisement}");
    assert!(!lab.log().contains("answering IPv6 router solicitations"));
}
