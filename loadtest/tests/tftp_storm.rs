//! The load tester against a real bootfleet server on loopback: it must
//! complete and verify every transfer, and must call a wrong byte a failure.

use std::net::UdpSocket;
use std::process::Command;
use std::sync::Arc;

use bootfleet::cache::FileCache;
use bootfleet::config::Config;
use bootfleet::engine::{self, Backend, Shutdown};
use bootfleet::server::tftp::TftpService;

fn serve(root: &std::path::Path) -> (std::net::SocketAddr, Shutdown, engine::ServerHandle) {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = Config::default().tftp;
    config.max_transfers_per_client = 1000;
    let service = Arc::new(TftpService::new(root, &config, FileCache::new(1 << 26)).unwrap());
    let shutdown = Shutdown::new();
    let handle =
        engine::spawn_tftp(Backend::Epoll, listener, service, 1, shutdown.clone()).unwrap();
    (addr, shutdown, handle)
}

fn loadtest(
    addr: std::net::SocketAddr,
    verify: &std::path::Path,
    json: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bootfleet-loadtest"))
        .args([
            "tftp",
            "--server",
            &addr.to_string(),
            "--file",
            "image.bin",
            "--verify",
        ])
        .arg(verify)
        .args([
            "--clients",
            "32",
            "--max-transfers",
            "64",
            "--seconds",
            "60",
            "--json",
        ])
        .arg(json)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn storm_completes_and_verifies_every_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let image: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(dir.path().join("image.bin"), &image).unwrap();
    let (addr, shutdown, handle) = serve(dir.path());
    let json = dir.path().join("report.json");
    for options in [
        &[][..],
        &["--blksize", "1468", "--windowsize", "8", "--tsize"][..],
    ] {
        let output = loadtest(addr, &dir.path().join("image.bin"), &json, options);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(report["transfers_completed"], 64, "{report}");
        assert_eq!(report["transfers_failed"], 0, "{report}");
        assert_eq!(report["bytes_received"], 64 * 300_000, "{report}");
        assert!(report["p99_ms"].as_f64().is_some(), "{report}");
    }

    // A local copy that differs from what the server sends: every transfer fails.
    let mut wrong = image.clone();
    wrong[100_000] ^= 1;
    std::fs::write(dir.path().join("wrong.bin"), &wrong).unwrap();
    let output = loadtest(addr, &dir.path().join("wrong.bin"), &json, &[]);
    assert!(!output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["transfers_completed"], 0, "{report}");
    assert!(
        report["failures"][0]
            .as_str()
            .unwrap()
            .contains("wrong bytes"),
        "{report}"
    );

    shutdown.trigger();
    handle.join();
}

#[test]
fn refuses_to_send_load_off_this_machine() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("image.bin"), b"x").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_bootfleet-loadtest"))
        .args([
            "tftp",
            "--server",
            "192.0.2.1:69",
            "--file",
            "image.bin",
            "--verify",
        ])
        .arg(dir.path().join("image.bin"))
        .env_remove("BOOTFLEET_LOADTEST_NAMESPACE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("refusing to send load"));
}
