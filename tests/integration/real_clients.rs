//! The clients users really run — tftp-hpa's `tftp`, `atftp` and `curl` —
//! fetch every test file with each option set, over both engine backends,
//! and every byte is compared.

use std::process::Command;

use bootfleet::engine::Backend;

use crate::common::*;

const ATFTP_OPTION_SETS: [&[&str]; 3] = [
    &[],
    &["blksize 1468", "tsize 0"],
    &["blksize 1468", "windowsize 8", "tsize 0"],
];

fn tftp_hpa(backend: Backend) {
    if !have_tool("tftp") {
        return;
    }
    let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
    let out = scratch();
    for (name, _) in SIZES {
        let local = out_path(&out, name);
        let result = run(Command::new("timeout")
            .args(["300", "tftp", "-m", "binary"])
            .arg("127.0.0.1")
            .arg(server.addr.port().to_string())
            .args(["-c", "get", name])
            .arg(&local));
        result.unwrap();
        assert_same_file(name, &local, &format!("tftp-hpa over {backend}"));
    }
    // netascii: the client turns CR LF back into LF, so the file comes back as it is on disk.
    let local = out_path(&out, "text.txt");
    run(Command::new("timeout")
        .args(["30", "tftp", "-m", "netascii"])
        .arg("127.0.0.1")
        .arg(server.addr.port().to_string())
        .args(["-c", "get", "text.txt"])
        .arg(&local))
    .unwrap();
    assert_same_file(
        "text.txt",
        &local,
        &format!("tftp-hpa netascii over {backend}"),
    );
}

fn atftp(backend: Backend) {
    if !have_tool("atftp") {
        return;
    }
    let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
    let out = scratch();
    for options in ATFTP_OPTION_SETS {
        for (name, _) in SIZES {
            let local = out_path(&out, name);
            let _ = std::fs::remove_file(&local);
            let mut command = Command::new("timeout");
            command
                .args(["300", "atftp", "-g", "-r", name, "-l"])
                .arg(&local);
            for option in options {
                command.args(["--option", option]);
            }
            command.arg("127.0.0.1").arg(server.addr.port().to_string());
            run(&mut command).unwrap();
            assert_same_file(name, &local, &format!("atftp {options:?} over {backend}"));
        }
    }
    let stats = server.service.stats();
    assert_eq!(stats.completed, 15, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
}

fn curl(backend: Backend) {
    if !have_tool("curl") {
        return;
    }
    let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
    let out = scratch();
    let option_sets: [&[&str]; 3] = [&["--tftp-no-options"], &[], &["--tftp-blksize", "1468"]];
    for options in option_sets {
        // curl 7.88 fails with "getpeername() failed with errno 107" when the
        // server's first packet also ends the transfer (an empty file's only
        // DATA block), against in.tftpd exactly as against bootfleet; the
        // empty file is fetched by the other two clients.
        for (name, _) in SIZES.iter().filter(|(_, size)| *size > 0) {
            let local = out_path(&out, name);
            let _ = std::fs::remove_file(&local);
            let url = format!("tftp://127.0.0.1:{}/{name}", server.addr.port());
            run(Command::new("timeout")
                .args(["300", "curl", "-sS", "--fail", "-o"])
                .arg(&local)
                .args(options)
                .arg(&url))
            .unwrap();
            assert_same_file(name, &local, &format!("curl {options:?} over {backend}"));
        }
    }
}

#[test]
fn tftp_hpa_client_over_io_uring() {
    tftp_hpa(Backend::IoUring)
}

#[test]
fn tftp_hpa_client_over_epoll() {
    tftp_hpa(Backend::Epoll)
}

#[test]
fn atftp_client_over_io_uring() {
    atftp(Backend::IoUring)
}

#[test]
fn atftp_client_over_epoll() {
    atftp(Backend::Epoll)
}

#[test]
fn curl_client_over_io_uring() {
    curl(Backend::IoUring)
}

#[test]
fn curl_client_over_epoll() {
    curl(Backend::Epoll)
}

#[test]
fn missing_file_is_reported_to_a_real_client() {
    if !have_tool("tftp") {
        return;
    }
    for backend in BACKENDS {
        let server = TestServer::start(backend, boot_dir(), tftp_config(|_| {}));
        let out = scratch();
        let output = Command::new("tftp")
            .arg("127.0.0.1")
            .arg(server.addr.port().to_string())
            .args(["-c", "get", "no-such-file"])
            .arg(out_path(&out, "x"))
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            said.contains("Error code 1") && said.contains("not found"),
            "{backend}: {said}"
        );
    }
}
