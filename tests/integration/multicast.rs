//! RFC 2090 multicast TFTP with real `atftp` clients (`--option
//! multicast`), several at once, each in its own network namespace joined
//! to bootfleet's by a bridge the test makes and removes: every client gets
//! the file byte for byte, and the session sends it far less than once per
//! client.

use std::process::{Command, Stdio};

use crate::common::*;

const CLIENTS: usize = 4;

/// bootfleet's namespace with a bridge, and one namespace per client
/// machine on it (an atftp client binds the group's port, as one per host).
struct Lab {
    server_ns: String,
    client_ns: Vec<String>,
    dir: tempfile::TempDir,
    server: Option<std::process::Child>,
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args)).unwrap();
}

impl Lab {
    fn new() -> Lab {
        // Unique per lab: the tests of this file run at once.
        static LABS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let lab_index = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let id = format!("{lab_index}{}", std::process::id() % 100_000);
        let lab = Lab {
            server_ns: format!("bfmcs{id}"),
            client_ns: (0..CLIENTS).map(|i| format!("bfmc{i}c{id}")).collect(),
            dir: tempfile::Builder::new()
                .prefix("bootfleet-mtftp-")
                .tempdir()
                .unwrap(),
            server: None,
        };
        let s = lab.server_ns.as_str();
        ip(&["netns", "add", s]);
        ip(&[
            "-n",
            s,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", s, "addr", "add", "10.95.0.1/24", "dev", "br0"]);
        ip(&["-n", s, "link", "set", "br0", "up"]);
        ip(&["-n", s, "link", "set", "lo", "up"]);
        // Groups are reached over the bridge.
        ip(&["-n", s, "route", "add", "224.0.0.0/4", "dev", "br0"]);
        for (i, c) in lab.client_ns.iter().enumerate() {
            let (port, nic) = (format!("mcp{i}x{id}"), format!("mcn{i}x{id}"));
            let address = format!("10.95.0.{}/24", 10 + i);
            ip(&["netns", "add", c]);
            ip(&["link", "add", &port, "type", "veth", "peer", "name", &nic]);
            ip(&["link", "set", &port, "netns", s]);
            ip(&["link", "set", &nic, "netns", c]);
            ip(&["-n", s, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", c, "addr", "add", &address, "dev", &nic]);
            ip(&["-n", c, "link", "set", &nic, "up"]);
            ip(&["-n", c, "link", "set", "lo", "up"]);
            ip(&["-n", c, "route", "add", "224.0.0.0/4", "dev", &nic]);
        }
        lab
    }

    /// Starts bootfleet in the server namespace over `root` with the
    /// configuration `config`; returns its log and its error output once it
    /// listens.
    fn start_server(
        &mut self,
        root: &std::path::Path,
        config: &str,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let config_path = self.dir.path().join("bootfleet.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = self.dir.path().join("server.log");
        let errors = self.dir.path().join("server.err");
        self.server = Some(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.server_ns,
                    env!("CARGO_BIN_EXE_bootfleet"),
                    "serve",
                    "--panel-listen",
                    "off",
                    "--config",
                ])
                .arg(&config_path)
                .arg("--root")
                .arg(root)
                .arg("--state-dir")
                .arg(self.dir.path().join("state"))
                .args([
                    "--tftp-listen",
                    "10.95.0.1:69",
                    "--http-listen",
                    "10.95.0.1:80",
                ])
                .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
                .stderr(Stdio::from(std::fs::File::create(&errors).unwrap()))
                .spawn()
                .unwrap(),
        );
        wait_for_log(&log, &["TFTP listening"], &errors);
        (log, errors)
    }

    /// Client `i` fetches `name` by multicast into `out` (atftp, at most
    /// 60 s).
    fn fetch(&self, i: usize, name: &str, out: &std::path::Path) -> std::process::Child {
        Command::new("timeout")
            .args(["60", "ip", "netns", "exec", &self.client_ns[i], "atftp"])
            .args([
                "--option",
                "multicast",
                "--option",
                "blksize 1428",
                "-g",
                "-r",
                name,
                "-l",
            ])
            .arg(out)
            .arg("10.95.0.1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        for ns in std::iter::once(&self.server_ns).chain(&self.client_ns) {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("ip netns pids {ns} 2>/dev/null | xargs -r kill -9"))
                .status();
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn atftp_clients_share_one_multicast_stream() {
    if !can_make_namespaces() || !have_tool("atftp") {
        return;
    }
    let mut lab = Lab::new();
    let root = lab.dir.path().join("boot");
    std::fs::create_dir_all(&root).unwrap();
    let image: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("image.bin"), &image).unwrap();
    // An image whose kernel it is: each member's fetch becomes a boot event.
    std::fs::write(
        root.join("inventory.toml"),
        "[images.mc]\nkernel = \"image.bin\"\ntransport = \"multicast\"\n",
    )
    .unwrap();
    let (log, errors) = lab.start_server(
        &root,
        "[tftp]\nmulticast_groups = \"239.255.66.1-239.255.66.8\"\n",
    );

    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let out = lab.dir.path().join(format!("out{i}.bin"));
            let child = lab.fetch(i, "image.bin", &out);
            (out, child)
        })
        .collect();
    for (out, child) in clients {
        let output = child.wait_with_output().unwrap();
        let got = std::fs::read(&out).unwrap_or_default();
        assert!(
            got == image,
            "{} got {} of {} bytes ({}):\n{}{}\nserver:\n{}",
            out.display(),
            got.len(),
            image.len(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    wait_for_log(&log, &["multicast session ended"], &errors);
    let text = std::fs::read_to_string(&log).unwrap();
    let ended = text
        .lines()
        .find(|l| l.contains("multicast session ended"))
        .unwrap();
    let field = |name: &str| -> u64 {
        ended
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {ended}"))
    };
    eprintln!("mtftp: {ended}");
    let file_blocks = field("file_blocks");
    assert!(
        field("blocks_sent") < 2 * file_blocks,
        "one stream for {CLIENTS} clients, not {CLIENTS}: {ended}"
    );
    assert!(
        text.matches("multicast session started").count() >= 1,
        "{text}"
    );
    // One boot event per client: its kernel, complete, by multicast.
    let events = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.server_ns,
            "curl",
            "-s",
            "http://10.95.0.1/api/v1/events",
        ])
        .output()
        .unwrap();
    let events: Vec<serde_json::Value> = serde_json::from_slice(&events.stdout).unwrap();
    for i in 0..CLIENTS {
        let client = format!("10.95.0.{}", 10 + i);
        assert!(
            events.iter().any(|e| e["client"] == client.as_str()
                && e["phase"] == "kernel"
                && e["status"] == 200
                && e["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains("multicast 239.255.66.")),
            "no multicast kernel event for {client}: {events:?}"
        );
    }
}

#[test]
fn a_file_rewritten_during_a_multicast_session_ends_it_and_a_retry_gets_the_new_file() {
    if !can_make_namespaces() || !have_tool("atftp") {
        return;
    }
    let mut lab = Lab::new();
    let root = lab.dir.path().join("boot");
    std::fs::create_dir_all(&root).unwrap();
    let old: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let new: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    std::fs::write(root.join("image.bin"), &old).unwrap();
    // The session waits 3 s for members before its first block: time to
    // rewrite the file under it.
    let (log, errors) = lab.start_server(
        &root,
        "[tftp]\nmulticast_groups = \"239.255.66.1-239.255.66.8\"\nmulticast_gather_ms = 3000\n",
    );
    let first_out = lab.dir.path().join("first.bin");
    let first = lab.fetch(0, "image.bin", &first_out);
    wait_for_log(&log, &["multicast session started"], &errors);
    {
        // In place, as `cp` over an existing file does: same inode.
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("image.bin"))
            .unwrap();
        file.write_all(&new).unwrap();
        file.sync_all().unwrap();
    }
    wait_for_log(
        &log,
        &["file changed on disk during the multicast session"],
        &errors,
    );
    let first = first.wait_with_output().unwrap();
    let got = std::fs::read(&first_out).unwrap_or_default();
    assert!(
        got != old && got != new,
        "the client of the ended session must not get a whole file ({} bytes, {}): {}",
        got.len(),
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    let retry_out = lab.dir.path().join("retry.bin");
    let retry = lab
        .fetch(1, "image.bin", &retry_out)
        .wait_with_output()
        .unwrap();
    assert!(
        std::fs::read(&retry_out).unwrap_or_default() == new,
        "the retry gets the new file ({}): {}\nserver:\n{}",
        retry.status,
        String::from_utf8_lossy(&retry.stderr),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
