//! Uploads (write requests): refused unless the directory is an upload
//! directory; real clients (tftp-hpa `put`, `atftp -p`, `curl -T`) store
//! byte-identical files over both backends; a full disk is reported to the
//! client as "disk full" and leaves no partial file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn upload_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("incoming/nodes")).unwrap();
    std::fs::create_dir(root.path().join("images")).unwrap();
    root
}

/// tftp-hpa's client uploading `local` as `remote`.
fn tftp_put(port: &str, local: &Path, remote: &str) -> Command {
    let mut command = Command::new("timeout");
    command
        .args(["60", "tftp", "-m", "binary", "127.0.0.1", port, "-c", "put"])
        .arg(local)
        .arg(remote);
    command
}

fn config_with_uploads() -> bootfleet::config::TftpConfig {
    tftp_config(|c| c.upload_dirs = vec!["incoming".into()])
}

#[test]
fn real_clients_upload_into_upload_directories_only() {
    if !have_tool("tftp") || !have_tool("atftp") || !have_tool("curl") {
        return;
    }
    let source = scratch();
    let payload = pattern(300_000, 42);
    let local = source.path().join("dump.bin");
    std::fs::write(&local, &payload).unwrap();
    for backend in BACKENDS {
        let root = upload_root();
        let server = TestServer::start(backend, root.path(), config_with_uploads());
        let port = server.addr.port().to_string();

        run(&mut tftp_put(&port, &local, "incoming/from-tftp.bin")).unwrap();
        run(Command::new("timeout")
            .args(["60", "atftp", "-p", "-l"])
            .arg(&local)
            .args([
                "-r",
                "incoming/nodes/from-atftp.bin",
                "--option",
                "blksize 1468",
                "--option",
                "tsize 300000",
                "127.0.0.1",
                &port,
            ]))
        .unwrap();
        run(Command::new("timeout")
            .args(["60", "curl", "-sS", "--fail", "-T"])
            .arg(&local)
            .arg(format!("tftp://127.0.0.1:{port}/incoming/from-curl.bin")))
        .unwrap();
        for stored in [
            "incoming/from-tftp.bin",
            "incoming/nodes/from-atftp.bin",
            "incoming/from-curl.bin",
        ] {
            let got = std::fs::read(root.path().join(stored))
                .unwrap_or_else(|e| panic!("{backend}: {stored}: {e}"));
            assert!(
                got == payload,
                "{backend}: {stored} differs ({} bytes)",
                got.len()
            );
        }

        // Outside the upload directories: refused, nothing written.
        for target in [
            "images/evil.bin",
            "evil.bin",
            "incoming/../evil.bin",
            "incoming/missing-dir/x.bin",
        ] {
            let output = tftp_put(&port, &local, target).output().unwrap();
            let said = String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr);
            assert!(said.contains("Error code 2"), "{backend}: {target}: {said}");
        }
        assert!(!root.path().join("images/evil.bin").exists());
        assert!(!root.path().join("evil.bin").exists());
        // Each upload dallies one timeout interval after its final ACK.
        let deadline = Instant::now() + Duration::from_secs(3);
        while server.service.stats().completed < 3 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let stats = server.service.stats();
        assert_eq!(
            (stats.completed, stats.failed, stats.active),
            (3, 0, 0),
            "{backend}: {stats:?}"
        );
    }
}

#[test]
fn uploads_are_refused_when_not_enabled() {
    if !have_tool("tftp") {
        return;
    }
    let root = upload_root();
    let server = TestServer::start(
        bootfleet::engine::Backend::IoUring,
        root.path(),
        tftp_config(|_| {}),
    );
    let local = scratch();
    std::fs::write(local.path().join("f"), b"data").unwrap();
    let output = Command::new("tftp")
        .args(["127.0.0.1", &server.addr.port().to_string(), "-c", "put"])
        .arg(local.path().join("f"))
        .arg("incoming/f")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("Error code 2") && said.contains("uploads are disabled"),
        "{said}"
    );
    assert!(!root.path().join("incoming/f").exists());
}

/// A 256 KiB tmpfs mounted over the upload directory in a private mount
/// namespace (gone when the server exits): a 1 MB upload must fail with
/// "disk full", leave no file, and the server must go on serving.
#[test]
fn full_disk_is_reported_as_disk_full() {
    if !can_make_namespaces() || !have_tool("unshare") || !have_tool("tftp") {
        return;
    }
    let root = upload_root();
    std::fs::write(root.path().join("images/kernel"), pattern(10_000, 5)).unwrap();
    let work = scratch();
    let config = work.path().join("bootfleet.toml");
    let port = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    std::fs::write(
        &config,
        format!(
            "root = {:?}\n[tftp]\nlisten = \"127.0.0.1:{port}\"\nupload_dirs = [\"incoming\"]\n",
            root.path()
        ),
    )
    .unwrap();
    let incoming = root.path().join("incoming");
    let log = work.path().join("server.log");
    let mut server = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=256k bootfleet-test {incoming:?} && exec {:?} serve --config {config:?}",
            env!("CARGO_BIN_EXE_bootfleet")
        ))
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("engine")
    {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let local = work.path().join("big.bin");
    std::fs::write(&local, pattern(1_000_000, 6)).unwrap();
    let output = tftp_put(&port.to_string(), &local, "incoming/big.bin")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    // Still serving.
    let fetched = work.path().join("kernel");
    let fetch = Command::new("tftp")
        .args([
            "-m",
            "binary",
            "127.0.0.1",
            &port.to_string(),
            "-c",
            "get",
            "images/kernel",
        ])
        .arg(&fetched)
        .output();
    let _ = Command::new("kill").arg(server.id().to_string()).status();
    let _ = server.wait();
    assert!(
        said.contains("Error code 3"),
        "expected disk full, got: {said}"
    );
    assert!(fetch.is_ok());
    assert_eq!(std::fs::read(&fetched).unwrap(), pattern(10_000, 5));
    // The tmpfs is gone with the namespace; nothing leaked into the real directory.
    assert!(std::fs::read_dir(Path::new(&incoming))
        .unwrap()
        .filter_map(Result::ok)
        .all(|e| e.file_name() == "nodes"));
}

/// The durability protocol of finding 18 (issue 19), watched with strace
/// on a real server: after renaming an upload into place, the server
/// fsyncs the directory the new name is in, so a power loss cannot forget
/// the rename after the data was synced. A TFTP upload (`tftp put`) and a
/// panel upload (`curl -T`) are each checked: every successful rename
/// into the boot directory is followed by an fsync of that directory.
#[test]
fn every_rename_into_place_is_followed_by_an_fsync_of_its_directory() {
    if !have_tool("strace") || !have_tool("tftp") || !have_tool("curl") {
        return;
    }
    let dir = scratch();
    let root = dir.path().join("boot");
    let state = dir.path().join("state");
    std::fs::create_dir_all(root.join("incoming")).unwrap();
    std::fs::create_dir_all(root.join("images/deb")).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let token = crate::panel::add_token(&state, "ops", "admin");
    let (tftp, http, panel) = (
        crate::workers::free_port(true),
        crate::workers::free_port(false),
        crate::workers::free_port(false),
    );
    let config = dir.path().join("bootfleet.toml");
    std::fs::write(
        &config,
        format!(
            "root = {root:?}\n\n[inventory]\nstate_dir = {state:?}\n\n[tftp]\nlisten = \"127.0.0.1:{tftp}\"\n\
             upload_dirs = [\"incoming\"]\n\n[http]\nlisten = \"127.0.0.1:{http}\"\n\n\
             [panel]\nlisten = \"127.0.0.1:{panel}\"\n"
        ),
    )
    .unwrap();
    let trace = dir.path().join("trace.txt");
    let mut strace = Command::new("strace")
        .args(["-f", "-qq", "-y", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_bootfleet"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("strace runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", panel)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the server did not start under strace"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let payload = pattern(70_000, 18);
    let local = dir.path().join("payload.bin");
    std::fs::write(&local, &payload).unwrap();
    let put = tftp_put(&tftp.to_string(), &local, "incoming/node1.dump")
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let uploaded = curl(
        &format!("http://127.0.0.1:{panel}/api/v1/files/images/deb/vmlinuz"),
        &[
            "-T",
            local.to_str().unwrap(),
            "-H",
            &format!("Authorization: Bearer {token}"),
            // No "100 Continue" before the answer.
            "-H",
            "Expect:",
        ],
    );
    assert_eq!(
        uploaded.status,
        201,
        "{}",
        String::from_utf8_lossy(&uploaded.body)
    );
    for name in ["incoming/node1.dump", "images/deb/vmlinuz"] {
        assert_eq!(std::fs::read(root.join(name)).unwrap(), payload, "{name}");
    }
    // Stop the server (strace's child); strace ends with it.
    let _ = Command::new("pkill")
        .args(["-TERM", "-P", &strace.id().to_string()])
        .status();
    let _ = strace.wait();

    let trace = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = trace.lines().collect();
    let mut checked = Vec::new();
    for (at, line) in lines.iter().enumerate() {
        if !line.contains("rename") || !line.trim_end().ends_with("= 0") {
            continue;
        }
        // The new name is the last quoted argument, absolute.
        let new_name = line.rsplit('"').nth(1).expect("a quoted new name");
        let Ok(relative) = Path::new(new_name).strip_prefix(&root) else {
            continue;
        };
        let parent = Path::new(new_name)
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let synced = lines[at + 1..].iter().any(|later| {
            later.contains(&format!("fsync({}", "")) && later.contains(&format!("<{parent}>)"))
        });
        assert!(
            synced,
            "the rename to {new_name} was not followed by an fsync of {parent}:\n{trace}"
        );
        checked.push(relative.to_path_buf());
    }
    checked.sort();
    assert_eq!(
        checked,
        [
            Path::new("images/deb/vmlinuz"),
            Path::new("incoming/node1.dump")
        ],
        "both uploads were renamed into place:\n{trace}"
    );
}
