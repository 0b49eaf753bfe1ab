//! The io_uring workers make no file-system call, not even for a file
//! never served before: resolving and opening it, listing the per-MAC
//! script directory and reading an operator's script happen on the
//! blocking pool (`engine/blocking.rs`), a file served before is answered
//! from memory, and whether a file in use was rewritten in place is looked
//! at by the cache's checker thread. Checked on the real server under
//! strace, thread by thread.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{curl, have_tool, pattern, scratch, tftp_hpa_get};

/// Thread names as the kernel keeps them (15 bytes): the HTTP and TFTP
/// io_uring workers, and the blocking pool's threads.
const WORKER_PREFIXES: [&str; 2] = ["bootfleet-http-", "bootfleet-uring"];
const POOL_PREFIX: &str = "bootfleet-fs-";
const CHECKER_PREFIX: &str = "bootfleet-file-";

pub fn free_port(udp: bool) -> u16 {
    if udp {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    } else {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }
}

/// The names of the threads of process `pid`, by thread id.
fn thread_names(pid: u32) -> HashMap<u32, String> {
    let mut names = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(name) = std::fs::read_to_string(entry.path().join("comm")) {
            names.insert(tid, name.trim().to_string());
        }
    }
    names
}

fn write_boot_dir(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    for (name, len, seed) in [
        ("a.bin", 70_000, 1),
        ("sub/b.bin", 5_000, 2),
        ("c.bin", 3_000, 3),
    ] {
        std::fs::write(root.join(name), pattern(len, seed)).unwrap();
    }
    std::fs::write(root.join("k.bin"), pattern(1_000, 4)).unwrap();
    // Long enough over TFTP's 512-byte lock step (a second or more) for
    // the file check, every 250 ms, to come round several times.
    std::fs::write(root.join("big.bin"), pattern(4 << 20, 5)).unwrap();
    std::fs::write(
        root.join("52:54:00:aa:bb:cc.ipxe"),
        "#!ipxe\nkernel http://${next-server}/c.bin\nboot\n",
    )
    .unwrap();
    std::fs::write(
        root.join("inventory.toml"),
        "[images.linux]\nkernel = \"k.bin\"\n\n[machines.\"52:54:00:00:00:02\"]\nimage = \"linux\"\n",
    )
    .unwrap();
}

#[test]
fn io_uring_workers_make_no_file_system_call_even_for_a_file_never_served() {
    if !have_tool("strace") || !have_tool("curl") || !have_tool("tftp") {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("boot");
    write_boot_dir(&root);
    let (http, tftp) = (free_port(false), free_port(true));
    let trace = dir.path().join("trace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args(["-e", "trace=%file,fstat,getdents64", "--"])
        .arg(env!("CARGO_BIN_EXE_bootfleet"))
        .args(["serve", "--root"])
        .arg(&root)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args([
            "--tftp-listen",
            &format!("127.0.0.1:{tftp}"),
            "--http-listen",
            &format!("127.0.0.1:{http}"),
            "--panel-listen",
            "off",
            "--engine",
            "io-uring",
            "--workers",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace runs");
    let url = |path: &str| format!("http://127.0.0.1:{http}/{path}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the server did not start under strace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Files never served before, a file served again, a refusal, the
    // operator's per-MAC script, an unknown machine's script, and over
    // TFTP a new file, a missing one and a generated pxelinux config.
    for path in ["a.bin", "sub/b.bin", "sub/b.bin"] {
        let fetched = curl(&url(path), &[]);
        assert_eq!(fetched.status, 200, "{path}");
        assert_eq!(
            fetched.body,
            std::fs::read(root.join(path)).unwrap(),
            "{path}"
        );
    }
    assert_eq!(curl(&url("missing.bin"), &[]).status, 404);
    let operators = curl(&url("boot/52:54:00:aa:bb:cc.ipxe"), &[]);
    assert!(
        String::from_utf8_lossy(&operators.body).contains("kernel http://${next-server}/c.bin"),
        "the operator's script, unchanged"
    );
    let unknown = curl(&url("boot/52:54:00:00:00:09.ipxe"), &[]);
    assert!(String::from_utf8_lossy(&unknown.body).starts_with("#!ipxe"));
    let target = dir.path().join("got-c.bin");
    let got = tftp_hpa_get(tftp, "c.bin", &target);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(root.join("c.bin")).unwrap()
    );
    let _ = tftp_hpa_get(tftp, "missing.bin", &dir.path().join("got-missing"));
    let started = Instant::now();
    let got = tftp_hpa_get(tftp, "big.bin", &dir.path().join("got-big"));
    assert!(got.status.success(), "{got:?}");
    let long = started.elapsed();
    assert_eq!(
        std::fs::read(dir.path().join("got-big")).unwrap(),
        std::fs::read(root.join("big.bin")).unwrap()
    );
    let config = dir.path().join("got-config");
    let got = tftp_hpa_get(tftp, "pxelinux.cfg/01-52-54-00-00-00-02", &config);
    assert!(got.status.success(), "{got:?}");
    assert!(String::from_utf8_lossy(&std::fs::read(&config).unwrap()).contains("KERNEL /k.bin"));

    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", strace.id()))
        .unwrap_or_default();
    let server: u32 = children
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("strace's child is the server");
    let names = thread_names(server);
    let _ = Command::new("kill").arg(server.to_string()).status();
    let _ = strace.wait();

    let trace = std::fs::read_to_string(&trace).unwrap();
    let mut by_workers = Vec::new();
    let mut by_pool = 0;
    let mut by_checker = 0;
    for line in trace.lines() {
        let Some((tid, call)) = line.split_once(' ') else {
            continue;
        };
        let Some(name) = tid.parse::<u32>().ok().and_then(|tid| names.get(&tid)) else {
            continue;
        };
        if call.starts_with("<...") || call.starts_with("+++") || call.starts_with("---") {
            continue; // the rest of a call logged before, or an exit or signal
        }
        if WORKER_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            by_workers.push(format!("{name}: {call}"));
        }
        if name.starts_with(POOL_PREFIX) && (call.contains("a.bin") || call.contains("c.bin")) {
            by_pool += 1;
        }
        if name.starts_with(CHECKER_PREFIX) {
            by_checker += 1;
        }
    }
    assert!(
        by_workers.is_empty(),
        "io_uring workers made file-system calls:\n{}",
        by_workers.join("\n")
    );
    assert!(
        by_checker >= 2,
        "the checker thread looked at the files in use ({by_checker} calls during a {long:?} transfer)"
    );
    assert!(
        by_pool >= 2,
        "the blocking pool opened the new files (strace saw {by_pool} of its calls name them); \
         threads: {names:?}"
    );
}
