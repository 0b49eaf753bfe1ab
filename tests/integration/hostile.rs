//! Hostile names, malformed packets of every kind, limits and protocol abuse,
//! sent as raw datagrams over real sockets to both backends. After each
//! barrage the server must still serve an ordinary request.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use bootfleet::boot::hooks::FileGenerator;
use bootfleet::proto::tftp::packet::{self, Packet};

use crate::common::*;

fn client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    socket
}

fn rrq(name: &[u8], options: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0, 1];
    out.extend_from_slice(name);
    out.push(0);
    out.extend_from_slice(b"octet\0");
    for (n, v) in options {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Sends `datagram` to `to` and returns the reply and where it came from.
fn exchange(socket: &UdpSocket, to: SocketAddr, datagram: &[u8]) -> Option<(Vec<u8>, SocketAddr)> {
    socket.send_to(datagram, to).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (len, from) = socket.recv_from(&mut buf).ok()?;
    buf.truncate(len);
    Some((buf, from))
}

fn error_code(reply: &[u8]) -> Option<u16> {
    match Packet::parse(reply) {
        Ok(Packet::Error { code, .. }) => Some(code),
        _ => None,
    }
}

/// Fetches a file lock-step with a raw client; returns its bytes.
fn fetch(server: SocketAddr, name: &str) -> Vec<u8> {
    let socket = client();
    let (mut reply, from) =
        exchange(&socket, server, &rrq(name.as_bytes(), &[])).expect("no reply");
    let mut data = Vec::new();
    loop {
        let Ok(Packet::Data { block, payload }) = Packet::parse(&reply) else {
            panic!("expected DATA, got {reply:?}");
        };
        data.extend_from_slice(payload);
        let last = payload.len() < 512;
        let mut ack = Vec::new();
        packet::encode_ack(block, &mut ack);
        if last {
            socket.send_to(&ack, from).unwrap();
            return data;
        }
        reply = exchange(&socket, from, &ack).expect("transfer stalled").0;
    }
}

#[test]
fn hostile_file_names_are_refused() {
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("ok.bin"), b"fine").unwrap();
    std::os::unix::fs::symlink("/etc", root.path().join("etc-link")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.path().join("host-link")).unwrap();
    std::os::unix::fs::symlink("ok.bin", root.path().join("inside-link")).unwrap();
    for backend in BACKENDS {
        let server = TestServer::start(backend, root.path(), tftp_config(|_| {}));
        let socket = client();
        for (name, want) in [
            (&b"../etc/passwd"[..], 2),
            (b"/../../etc/passwd", 2),
            (b"sub/../../etc/passwd", 2),
            (b"..\\..\\windows\\system.ini", 2),
            (b"ok.bin\\..", 2),
            (b"etc-link/passwd", 2),
            (b"host-link", 2),
            (b"bad\x01name", 2),
            (b"\xff\xfe", 2),
            (b"/etc/passwd", 1), // taken relative to the root: not there
            (b"/", 2),
        ] {
            let (reply, _) = exchange(&socket, server.addr, &rrq(name, &[]))
                .unwrap_or_else(|| panic!("{backend}: no answer to {name:?}"));
            assert_eq!(
                error_code(&reply),
                Some(want),
                "{backend}: {:?}",
                String::from_utf8_lossy(name)
            );
        }
        assert_eq!(fetch(server.addr, "inside-link"), b"fine");
        assert_eq!(fetch(server.addr, "/ok.bin"), b"fine");
    }
}

#[test]
fn malformed_packets_are_answered_or_ignored_as_the_rfcs_say() {
    for backend in BACKENDS {
        let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
        let socket = client();
        let mut too_many = rrq(b"70k.bin", &[]);
        for i in 0..20 {
            too_many.extend_from_slice(format!("opt{i}\0v\0").as_bytes());
        }
        let answered: Vec<(&str, Vec<u8>, u16)> = vec![
            ("empty datagram", vec![], 4),
            ("one byte", vec![0], 4),
            ("unknown opcode", vec![0, 9, 1, 2], 4),
            ("opcode 0xffff", vec![0xff, 0xff], 4),
            ("unterminated name", b"\x00\x01pxelinux.0".to_vec(), 4),
            (
                "unterminated mode",
                b"\x00\x01pxelinux.0\x00octet".to_vec(),
                4,
            ),
            ("empty name", b"\x00\x01\x00octet\x00".to_vec(), 4),
            ("mail mode", b"\x00\x01a\x00mail\x00".to_vec(), 4),
            (
                "option without value",
                b"\x00\x01a\x00octet\x00blksize\x00".to_vec(),
                4,
            ),
            ("too many options", too_many, 4),
            ("DATA to port 69", b"\x00\x03\x00\x01abc".to_vec(), 5),
            ("ACK to port 69", b"\x00\x04\x00\x01".to_vec(), 5),
            ("OACK to port 69", b"\x00\x06tsize\x000\x00".to_vec(), 5),
            (
                "write request",
                b"\x00\x02upload.bin\x00octet\x00".to_vec(),
                2,
            ),
        ];
        for (what, datagram, want) in answered {
            let (reply, _) = exchange(&socket, server.addr, &datagram)
                .unwrap_or_else(|| panic!("{backend}: no answer to {what}"));
            assert_eq!(error_code(&reply), Some(want), "{backend}: {what}");
        }
        // An ERROR sent to the listening port is never answered.
        socket
            .send_to(b"\x00\x05\x00\x00bye\x00", server.addr)
            .unwrap();
        let mut buf = [0u8; 100];
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "{backend}: answered an ERROR"
        );
        // A datagram larger than any request, and invalid values of options.
        let _ = exchange(&socket, server.addr, &vec![0x41; 60_000]);
        let odd = rrq(
            b"70k.bin",
            &[
                ("blksize", "3"),
                ("windowsize", "0"),
                ("timeout", "999"),
                ("tsize", "-1"),
            ],
        );
        let (reply, _) = exchange(&socket, server.addr, &odd).expect("no answer");
        assert!(
            matches!(Packet::parse(&reply), Ok(Packet::Data { block: 1, .. })),
            "{backend}: {reply:?}"
        );
        // Still serving.
        assert_eq!(fetch(server.addr, "70k.bin"), pattern(70_000, 3));
    }
}

#[test]
fn transfer_port_abuse_and_duplicate_acks() {
    for backend in BACKENDS {
        let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
        let socket = client();
        let (first, tid) = exchange(&socket, server.addr, &rrq(b"70k.bin", &[])).unwrap();
        assert!(
            tid != server.addr,
            "{backend}: the transfer must use its own port"
        );
        assert!(matches!(
            Packet::parse(&first),
            Ok(Packet::Data { block: 1, .. })
        ));
        // Garbage on the transfer port is dropped; the transfer goes on.
        socket.send_to(b"\x00", tid).unwrap();
        socket.send_to(b"\x00\x04\x00", tid).unwrap();
        // ACK 1 three times: exactly one DATA 2 comes back (no Sorcerer's Apprentice).
        for _ in 0..3 {
            socket.send_to(b"\x00\x04\x00\x01", tid).unwrap();
        }
        let mut buf = [0u8; 1000];
        socket
            .set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        let (len, _) = socket.recv_from(&mut buf).unwrap();
        assert!(matches!(
            Packet::parse(&buf[..len]),
            Ok(Packet::Data { block: 2, .. })
        ));
        assert!(
            socket.recv_from(&mut buf).is_err(),
            "{backend}: duplicate ACK caused a duplicate burst"
        );
        // A DATA packet on a read transfer is an illegal operation and ends it.
        let (reply, _) = exchange(&socket, tid, b"\x00\x03\x00\x01zz").unwrap();
        assert_eq!(error_code(&reply), Some(4), "{backend}");
        std::thread::sleep(Duration::from_millis(100));
        let stats = server.service.stats();
        assert_eq!((stats.failed, stats.active), (1, 0), "{backend}: {stats:?}");
    }
}

#[test]
fn limits_answer_with_an_error_instead_of_dropping() {
    for backend in BACKENDS {
        let server = TestServer::start(
            backend,
            boot_dir(),
            tftp_config(|c| {
                c.max_transfers_per_client = 2;
                c.max_transfers = 3;
            }),
        );
        // Three ports of one client address: two transfers, then the per-client limit.
        let ports: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
        for port in &ports[..2] {
            let (reply, _) = exchange(port, server.addr, &rrq(b"70k.bin", &[])).unwrap();
            assert!(matches!(Packet::parse(&reply), Ok(Packet::Data { .. })));
        }
        let (reply, _) = exchange(&ports[2], server.addr, &rrq(b"70k.bin", &[])).unwrap();
        assert_eq!(error_code(&reply), Some(0), "{backend}: per-client limit");
        // The same port asking again is a retransmitted request: no second transfer, no error.
        ports[0]
            .send_to(&rrq(b"70k.bin", &[]), server.addr)
            .unwrap();
        let mut buf = [0u8; 1000];
        ports[0]
            .set_read_timeout(Some(Duration::from_millis(2500)))
            .unwrap();
        let (len, _) = ports[0].recv_from(&mut buf).unwrap();
        assert!(
            matches!(
                Packet::parse(&buf[..len]),
                Ok(Packet::Data { block: 1, .. })
            ),
            "{backend}: retransmission of DATA 1"
        );
        assert_eq!(server.service.stats().started, 2, "{backend}");
        let b = client();
        // Another client address (127.0.0.2) still gets one more, then the global limit.
        let other = UdpSocket::bind("127.0.0.2:0").unwrap();
        other
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let (reply, _) = exchange(&other, server.addr, &rrq(b"70k.bin", &[])).unwrap();
        assert!(
            matches!(Packet::parse(&reply), Ok(Packet::Data { .. })),
            "{backend}"
        );
        let (reply, _) = exchange(&b, server.addr, &rrq(b"70k.bin", &[])).unwrap();
        assert_eq!(error_code(&reply), Some(0), "{backend}: global limit");
    }
}

#[test]
fn abandoned_transfers_time_out_and_free_their_slot() {
    for backend in BACKENDS {
        let server = TestServer::start(
            backend,
            boot_dir(),
            tftp_config(|c| {
                c.timeout = Duration::from_millis(50);
                c.max_timeout = Duration::from_millis(100);
                c.max_retries = 3;
            }),
        );
        let socket = client();
        let (reply, _) = exchange(&socket, server.addr, &rrq(b"70k.bin", &[])).unwrap();
        assert!(matches!(
            Packet::parse(&reply),
            Ok(Packet::Data { block: 1, .. })
        ));
        // Retransmissions of DATA 1, then the final ERROR.
        let mut buf = [0u8; 1000];
        let mut data = 0;
        let mut saw_error = false;
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            match Packet::parse(&buf[..len]) {
                Ok(Packet::Data { block: 1, .. }) => data += 1,
                Ok(Packet::Error { .. }) => {
                    saw_error = true;
                    break;
                }
                other => panic!("{backend}: unexpected {other:?}"),
            }
        }
        assert_eq!((data, saw_error), (3, true), "{backend}");
        std::thread::sleep(Duration::from_millis(50));
        let stats = server.service.stats();
        assert_eq!((stats.failed, stats.active), (1, 0), "{backend}: {stats:?}");
    }
}

#[test]
fn generated_files_are_served_through_the_seam() {
    struct PerClient;
    impl FileGenerator for PerClient {
        fn generate(&self, name: &str, client: SocketAddr) -> Option<Vec<u8>> {
            name.strip_prefix("pxelinux.cfg/01-")
                .map(|mac| format!("DEFAULT boot-{mac}\n# for {}\n", client.ip()).into_bytes())
        }
    }
    for backend in BACKENDS {
        let server = TestServer::start_with(backend, boot_dir(), tftp_config(|_| {}), |s| {
            s.add_generator(Arc::new(PerClient))
        });
        let got = fetch(server.addr, "pxelinux.cfg/01-52-54-00-12-34-56");
        assert_eq!(got, b"DEFAULT boot-52-54-00-12-34-56\n# for 127.0.0.1\n");
        // Names the generator does not claim fall through to the disk.
        assert_eq!(
            fetch(server.addr, "pxelinux.cfg/default"),
            b"DEFAULT local\n"
        );
    }
}

#[test]
fn oack_is_sent_and_tsize_reports_the_size() {
    for backend in BACKENDS {
        let server = TestServer::start(backend, boot_dir(), tftp_config(|c| c.max_blksize = 1468));
        let socket = client();
        let (reply, _) = exchange(
            &socket,
            server.addr,
            &rrq(
                b"70k.bin",
                &[("blksize", "1432"), ("tsize", "0"), ("windowsize", "4")],
            ),
        )
        .unwrap();
        let mut want = Vec::new();
        packet::encode_oack(
            &[("blksize", "1432"), ("tsize", "70000"), ("windowsize", "4")],
            &mut want,
        );
        assert_eq!(reply, want, "{backend}");
    }
}

#[test]
fn a_client_that_vanishes_frees_its_transfer() {
    for backend in BACKENDS {
        // A retry budget of 10 s: only noticing the closed port can free
        // the transfer within the 1.5 s this test waits.
        let server = TestServer::start(
            backend,
            boot_dir(),
            tftp_config(|c| {
                c.timeout = Duration::from_millis(100);
                c.max_timeout = Duration::from_millis(100);
                c.max_retries = 100;
            }),
        );
        {
            let socket = client();
            let (reply, tid) = exchange(&socket, server.addr, &rrq(b"70k.bin", &[])).unwrap();
            assert!(matches!(
                Packet::parse(&reply),
                Ok(Packet::Data { block: 1, .. })
            ));
            socket.send_to(b"\x00\x04\x00\x01", tid).unwrap();
        } // the client's socket closes: DATA 2 and its repeats meet a closed port
        let deadline = std::time::Instant::now() + Duration::from_millis(1500);
        while server.service.stats().active > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats = server.service.stats();
        assert_eq!((stats.active, stats.failed), (0, 1), "{backend}: {stats:?}");
    }
}

#[test]
fn a_file_rewritten_in_place_mid_transfer_ends_that_transfer_and_nothing_else() {
    for backend in BACKENDS {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("kernel");
        std::fs::write(&path, pattern(2_000_000, 8)).unwrap();
        let server = TestServer::start(backend, root.path(), tftp_config(|_| {}));
        let socket = client();
        let (first, tid) = exchange(&socket, server.addr, &rrq(b"kernel", &[])).unwrap();
        assert!(matches!(
            Packet::parse(&first),
            Ok(Packet::Data { block: 1, .. })
        ));
        let mut block = 1u16;
        let mut ack = Vec::new();
        for _ in 0..3 {
            ack.clear();
            packet::encode_ack(block, &mut ack);
            let (reply, _) = exchange(&socket, tid, &ack).unwrap();
            block += 1;
            assert!(
                matches!(Packet::parse(&reply), Ok(Packet::Data { block: b, .. }) if b == block)
            );
        }
        // `cp new kernel`: the file is truncated and rewritten in place.
        std::fs::write(&path, pattern(1000, 9)).unwrap();
        let mut ended = None;
        for _ in 0..20 {
            ack.clear();
            packet::encode_ack(block, &mut ack);
            let Some((reply, _)) = exchange(&socket, tid, &ack) else {
                continue;
            };
            match Packet::parse(&reply) {
                Ok(Packet::Data { block: b, .. }) => block = b,
                Ok(Packet::Error { message, .. }) => {
                    ended = Some(message.to_string());
                    break;
                }
                other => panic!("{backend}: unexpected {other:?}"),
            }
        }
        let message =
            ended.unwrap_or_else(|| panic!("{backend}: the transfer of a rewritten file went on"));
        assert!(message.contains("changed"), "{backend}: {message}");
        // The server is alive and the client's retry gets the new file.
        assert_eq!(fetch(server.addr, "kernel"), pattern(1000, 9), "{backend}");
    }
}

/// Out of file descriptors (a power-on storm against a low `ulimit -n`):
/// every request still gets an answer, DATA or an ERROR saying to retry.
#[test]
fn running_out_of_file_descriptors_is_answered_not_silent() {
    for engine in ["io-uring", "epoll"] {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let mut server = serve_with_fd_limit(
            32,
            &format!(
                "--root {:?} --tftp-listen 127.0.0.1:{port} --engine {engine} --workers 1",
                boot_dir()
            ),
        );
        std::thread::sleep(Duration::from_millis(500));
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let clients: Vec<UdpSocket> = (0..60).map(|_| client()).collect();
        let (mut data, mut busy) = (0, 0);
        for socket in &clients {
            let (reply, _) = exchange(socket, addr, &rrq(b"70k.bin", &[]))
                .unwrap_or_else(|| panic!("{engine}: a request got no answer"));
            match Packet::parse(&reply) {
                Ok(Packet::Data { .. }) => data += 1,
                Ok(Packet::Error { code: 0, message }) if message.contains("retry later") => {
                    busy += 1
                }
                other => panic!("{engine}: unexpected {other:?}"),
            }
        }
        let _ = std::process::Command::new("kill")
            .arg(server.id().to_string())
            .status();
        let _ = server.wait();
        assert!(
            data > 0 && busy > 0,
            "{engine}: {data} transfers, {busy} told to retry"
        );
    }
}

#[test]
fn serves_over_ipv6() {
    let Ok(probe) = UdpSocket::bind("[::1]:0") else {
        panic!("IPv6 loopback is not available on this machine");
    };
    drop(probe);
    for backend in BACKENDS {
        let server = TestServer::start_on(backend, "[::1]:0", boot_dir(), tftp_config(|_| {}));
        let socket = UdpSocket::bind("[::1]:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let (mut reply, from) =
            exchange(&socket, server.addr, &rrq(b"70k.bin", &[])).expect("no answer over IPv6");
        let mut got = Vec::new();
        loop {
            let Ok(Packet::Data { block, payload }) = Packet::parse(&reply) else {
                panic!("{backend}: expected DATA, got {reply:?}")
            };
            got.extend_from_slice(payload);
            let mut ack = Vec::new();
            packet::encode_ack(block, &mut ack);
            if payload.len() < 512 {
                socket.send_to(&ack, from).unwrap();
                break;
            }
            reply = exchange(&socket, from, &ack)
                .expect("IPv6 transfer stalled")
                .0;
        }
        assert_eq!(got, pattern(70_000, 3), "{backend}");
    }
}

/// Security review finding 6 (and 13): `inventory.toml` (every MAC,
/// reserved address and variable) was served over HTTP and TFTP. What each
/// protocol refuses, on both engines: the inventory file, dotfiles and
/// dot-directories, an upload's temporary file left by a crash, and the
/// state directory and database kept under the boot directory, also by a
/// symbolic link inside it. The ordinary file next to them is still served.
#[test]
fn the_inventory_state_and_hidden_files_are_never_served() {
    use bootfleet::engine::Backend;
    for backend in [Backend::IoUring, Backend::Epoll] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path();
        std::fs::write(
            dir.join("inventory.toml"),
            "[machines.\"52:54:00:00:00:01\"]\nhostname = \"secret-node\"\n",
        )
        .unwrap();
        std::fs::write(dir.join(".htpasswd"), b"secret").unwrap();
        std::fs::create_dir_all(dir.join(".git")).unwrap();
        std::fs::write(dir.join(".git/config"), b"secret").unwrap();
        std::fs::create_dir_all(dir.join("debian")).unwrap();
        std::fs::write(dir.join("debian/.vmlinuz.upload-1a2b3c"), b"partial").unwrap();
        std::fs::write(dir.join("debian/vmlinuz"), b"kernel").unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        std::os::unix::fs::symlink("state/bootfleet.db", dir.join("db")).unwrap();
        let state = dir.join("state");
        let server = FullServer::start_on(backend, dir, |c| {
            c.state_dir = state.clone();
            c.panel.database = "bootfleet.db".into();
        });
        std::fs::write(state.join("bootfleet.db"), b"secret").unwrap();
        // Restarted servers remove what a crash left; this one started
        // after the file was made, so it is gone already.
        assert!(
            !dir.join("debian/.vmlinuz.upload-1a2b3c").exists(),
            "{backend:?}: an interrupted upload's temporary file is removed at start"
        );
        std::fs::write(dir.join("debian/.vmlinuz.upload-1a2b3c"), b"partial").unwrap();
        for name in [
            "inventory.toml",
            "/inventory.toml",
            "./inventory.toml",
            ".htpasswd",
            ".git/config",
            "debian/.vmlinuz.upload-1a2b3c",
            "state/bootfleet.db",
            "db",
        ] {
            let fetched = curl(
                &server.url(&format!("/{}", name.trim_start_matches('/'))),
                &[],
            );
            assert_eq!(fetched.status, 404, "{backend:?}: HTTP served {name}");
            let socket = client();
            let (reply, _) =
                exchange(&socket, server.tftp, &rrq(name.as_bytes(), &[])).expect("an answer");
            assert_eq!(
                error_code(&reply),
                Some(1),
                "{backend:?}: TFTP served {name}"
            );
        }
        assert_eq!(curl(&server.url("/debian/vmlinuz"), &[]).body, b"kernel");
        assert_eq!(fetch(server.tftp, "debian/vmlinuz"), b"kernel");
    }
}
