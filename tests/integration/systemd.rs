//! bootfleet under systemd's protocols, with the real binary: readiness,
//! status and watchdog pings on a notify socket the test listens on (as
//! systemd does for `Type=notify` with `WatchdogSec=`), and socket
//! activation by systemd's own `systemd-socket-activate`, which passes
//! listening sockets exactly as `bootfleet.socket` does.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{have_tool, read_response, scratch, tftp_hpa_get};

/// A loopback port free a moment ago.
fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET path` on `address`, answered within a few seconds.
fn get(address: SocketAddr, path: &str) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: boot\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let response = read_response(&mut stream).expect("an HTTP response");
    (response.status, response.body)
}

/// Stops `child` with SIGTERM (as systemd does) and waits for it.
fn terminate(child: &mut Child) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("bootfleet did not stop within 10 s of SIGTERM");
}

fn boot_root(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("boot");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("undionly.kpxe"), b"a loader").unwrap();
    root
}

#[test]
fn readiness_status_and_watchdog_pings_reach_the_notify_socket() {
    let dir = scratch();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let root = boot_root(dir.path());
    let http: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--tftp-listen", "127.0.0.1:0", "--http-listen"])
        .arg(http.to_string())
        .args(["--panel-listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify_path)
        // One second: pings every half second while the workers live.
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut buffer = [0u8; 4096];
    let mut messages: Vec<String> = Vec::new();
    let mut answered_at_ready = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline
        && messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 4
    {
        let Ok(len) = notify.recv(&mut buffer) else {
            continue;
        };
        let message = String::from_utf8_lossy(&buffer[..len]).to_string();
        if message.contains("READY=1") && answered_at_ready.is_none() {
            // Ready means serving: the HTTP listener answers at once.
            answered_at_ready = Some(get(http, "/undionly.kpxe"));
        }
        messages.push(message);
    }
    let ready = messages
        .iter()
        .position(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {messages:?}"));
    assert!(
        messages[ready].contains("STATUS=0 machines;"),
        "{messages:?}"
    );
    assert_eq!(answered_at_ready.unwrap(), (200, b"a loader".to_vec()));
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 4, "watchdog pings: {messages:?}");

    terminate(&mut child);
    let mut stopping = false;
    while let Ok(len) = notify.recv(&mut buffer) {
        stopping |= String::from_utf8_lossy(&buffer[..len]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
}

#[test]
fn systemd_socket_activation_starts_the_server_on_the_first_request() {
    assert!(
        have_tool("systemd-socket-activate"),
        "systemd-socket-activate is missing: install systemd (tests/run-all.sh does)"
    );
    let dir = scratch();
    let root = boot_root(dir.path());
    let state = dir.path().join("state");
    let log = dir.path().join("log");
    let (http_port, panel_port, tftp_port) = (free_tcp_port(), free_tcp_port(), free_udp_port());
    // The configured address of each passed socket cannot be bound
    // (TEST-NET-1 is on no interface): the server must use what it is given.
    let serve = |activate: &[String], listen: &[&str]| -> Child {
        Command::new("systemd-socket-activate")
            .args(activate)
            .arg(env!("CARGO_BIN_EXE_bootfleet"))
            .args(["serve", "--root"])
            .arg(&root)
            .arg("--state-dir")
            .arg(&state)
            .args(listen)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap()
    };

    // HTTP and the panel: the first connection starts bootfleet, which
    // accepts it from the passed socket.
    let mut child = serve(
        &[
            "-l".into(),
            format!("127.0.0.1:{http_port}"),
            "-l".into(),
            format!("127.0.0.1:{panel_port}"),
            "--fdname=http:panel".into(),
        ],
        &[
            "--http-listen",
            "192.0.2.1:80",
            "--tftp-listen",
            "127.0.0.1:0",
            "--panel-listen",
            &format!("127.0.0.1:{panel_port}"),
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let http: SocketAddr = format!("127.0.0.1:{http_port}").parse().unwrap();
    assert_eq!(get(http, "/undionly.kpxe"), (200, b"a loader".to_vec()));
    let panel: SocketAddr = format!("127.0.0.1:{panel_port}").parse().unwrap();
    assert_eq!(get(panel, "/healthz"), (200, b"ok\n".to_vec()));
    terminate(&mut child);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("HTTP socket passed by systemd")
            && text.contains("panel socket passed by systemd"),
        "{text}"
    );

    // TFTP: the first datagram starts bootfleet, which reads it from the
    // passed socket and answers (tftp-hpa's client, as firmware would).
    let mut child = serve(
        &[
            "--datagram".into(),
            "-l".into(),
            format!("127.0.0.1:{tftp_port}"),
        ],
        &[
            "--tftp-listen",
            "192.0.2.1:69",
            "--http-listen",
            "127.0.0.1:0",
            "--panel-listen",
            "127.0.0.1:0",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = scratch();
    let target = out.path().join("loader");
    let fetched = tftp_hpa_get(tftp_port, "undionly.kpxe", &target);
    terminate(&mut child);
    assert!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"a loader");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("TFTP socket passed by systemd"), "{text}");
}
