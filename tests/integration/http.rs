//! The HTTP file server with curl and a raw socket: every range form,
//! conditional requests, keep-alive and pipelining, hostile paths and
//! malformed heads, slow clients, files over 4 GiB.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bootfleet::config::BodyMode;
use bootfleet::engine::Backend;

use crate::common::*;

fn want(name: &str) -> Vec<u8> {
    std::fs::read(boot_dir().join(name)).unwrap()
}

#[test]
fn whole_files_ranges_and_conditionals_with_curl() {
    if !have_tool("curl") {
        return;
    }
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        for body in [BodyMode::Sendfile, BodyMode::Mmap] {
            let server = FullServer::start_on(backend, boot_dir(), |c| c.http.body = body);
            let url = server.url("/1m.bin");
            let file = want("1m.bin");
            let context = format!("{body:?}");

            let full = curl(&url, &[]);
            assert_eq!(full.status, 200, "{context}");
            assert!(full.body == file, "{context}: whole file differs");
            assert_eq!(full.header("content-length").as_deref(), Some("1000000"));
            assert_eq!(full.header("accept-ranges").as_deref(), Some("bytes"));
            assert_eq!(
                full.header("content-type").as_deref(),
                Some("application/octet-stream")
            );
            let etag = full.header("etag").expect("ETag");
            let last_modified = full.header("last-modified").expect("Last-Modified");

            let head = curl(&url, &["-I"]);
            assert_eq!(head.status, 200);
            assert_eq!(head.header("content-length").as_deref(), Some("1000000"));
            // No body after a HEAD: the next response on the connection follows at once.
            let mut stream = connect(&server);
            stream
                .write_all(b"HEAD /1m.bin HTTP/1.1\r\nHost: h\r\n\r\nGET /text.txt HTTP/1.1\r\nHost: h\r\n\r\n")
                .unwrap();
            let mut received = vec![0u8; 4096];
            let mut got = 0;
            while !String::from_utf8_lossy(&received[..got]).contains("line one") {
                let n = stream.read(&mut received[got..]).unwrap();
                assert!(n > 0, "connection closed");
                got += n;
            }
            let text = String::from_utf8_lossy(&received[..got]).into_owned();
            let second = text.find("HTTP/1.1 200").and_then(|first| {
                text[first + 1..]
                    .find("HTTP/1.1 200")
                    .map(|i| i + first + 1)
            });
            let second = second.unwrap_or_else(|| panic!("{text}"));
            assert!(
                text[..second].ends_with("\r\n\r\n"),
                "HEAD sent a body: {text}"
            );

            // Single, suffix and open-ended ranges.
            for (range, first, last) in [
                ("100-199", 100usize, 199usize),
                ("-500", 999_500, 999_999),
                ("999000-", 999_000, 999_999),
                ("0-0", 0, 0),
                ("999999-5000000", 999_999, 999_999),
            ] {
                let part = curl(&url, &["-r", range]);
                assert_eq!(part.status, 206, "{context} {range}");
                assert_eq!(
                    part.header("content-range"),
                    Some(format!("bytes {first}-{last}/1000000")),
                    "{context} {range}"
                );
                assert!(
                    part.body == file[first..=last],
                    "{context} {range}: bytes differ"
                );
            }

            // Several ranges: multipart/byteranges.
            let multi = curl(&url, &["-r", "0-9,500-509,-5"]);
            assert_eq!(multi.status, 206);
            let content_type = multi.header("content-type").unwrap();
            let boundary = content_type
                .strip_prefix("multipart/byteranges; boundary=")
                .unwrap_or_else(|| panic!("{content_type}"));
            assert_eq!(
                multi.header("content-length").unwrap(),
                multi.body.len().to_string()
            );
            let mut expected = Vec::new();
            for (first, last) in [(0usize, 9usize), (500, 509), (999_995, 999_999)] {
                expected.extend_from_slice(
                    format!(
                        "\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {first}-{last}/1000000\r\n\r\n"
                    )
                    .as_bytes(),
                );
                expected.extend_from_slice(&file[first..=last]);
            }
            expected.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
            assert!(multi.body == expected, "{context}: multipart body differs");

            // If-Range: a matching validator applies the range, another one does not.
            let matching = curl(&url, &["-r", "10-19", "-H", &format!("If-Range: {etag}")]);
            assert_eq!(matching.status, 206);
            let by_date = curl(
                &url,
                &["-r", "10-19", "-H", &format!("If-Range: {last_modified}")],
            );
            assert_eq!(by_date.status, 206);
            let stale = curl(&url, &["-r", "10-19", "-H", "If-Range: \"other\""]);
            assert_eq!(stale.status, 200);
            assert_eq!(stale.body.len(), 1_000_000);

            // Unsatisfiable.
            let beyond = curl(&url, &["-r", "2000000-"]);
            assert_eq!(beyond.status, 416);
            assert_eq!(
                beyond.header("content-range").as_deref(),
                Some("bytes */1000000")
            );

            // Conditional GETs.
            let cached = curl(&url, &["-H", &format!("If-None-Match: {etag}")]);
            assert_eq!(cached.status, 304);
            assert!(cached.body.is_empty());
            assert_eq!(cached.header("etag"), Some(etag.clone()));
            assert_eq!(curl(&url, &["-H", "If-None-Match: \"x\", *"]).status, 304);
            assert_eq!(curl(&url, &["-H", "If-None-Match: \"x\""]).status, 200);
            assert_eq!(
                curl(
                    &url,
                    &["-H", &format!("If-Modified-Since: {last_modified}")]
                )
                .status,
                304
            );
            assert_eq!(
                curl(
                    &url,
                    &["-H", "If-Modified-Since: Sun, 06 Nov 1994 08:49:37 GMT"]
                )
                .status,
                200
            );

            // Empty file, text file, missing file.
            let empty = curl(&server.url("/empty.bin"), &[]);
            assert_eq!((empty.status, empty.body.len()), (200, 0));
            assert_eq!(empty.header("content-length").as_deref(), Some("0"));
            let text = curl(&server.url("/text.txt"), &[]);
            assert_eq!(
                text.header("content-type").as_deref(),
                Some("text/plain; charset=utf-8")
            );
            assert!(text.body == want("text.txt"));
            assert_eq!(curl(&server.url("/no-such-file"), &[]).status, 404);
        }
    }
}

#[test]
fn curl_reuses_the_connection_and_gets_every_file() {
    if !have_tool("curl") {
        return;
    }
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |_| {});
        let out = scratch();
        let output = Command::new("curl")
            .args(["-s", "-v", "--max-time", "30"])
            .args([
                "-o",
                out.path().join("a").to_str().unwrap(),
                &server.url("/10m.bin"),
            ])
            .args([
                "-o",
                out.path().join("b").to_str().unwrap(),
                &server.url("/70k.bin"),
            ])
            .args([
                "-o",
                out.path().join("c").to_str().unwrap(),
                &server.url("/one-block.bin"),
            ])
            .output()
            .unwrap();
        assert!(output.status.success());
        let log = String::from_utf8_lossy(&output.stderr);
        assert!(
            log.matches("Re-using existing connection").count()
                + log.matches("Reusing existing").count()
                >= 2,
            "curl did not keep the connection alive:\n{log}"
        );
        assert_same_file("10m.bin", &out.path().join("a"), "keep-alive 1");
        assert_same_file("70k.bin", &out.path().join("b"), "keep-alive 2");
        assert_same_file("one-block.bin", &out.path().join("c"), "keep-alive 3");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |_| {});
        let mut stream = connect(&server);
        stream
            .write_all(
                b"GET /text.txt HTTP/1.1\r\nHost: t\r\n\r\n\
                  GET /1m.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=5-9\r\n\r\n\
                  GET /missing HTTP/1.1\r\nHost: t\r\n\r\n\
                  GET /70k.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let first = read_response(&mut stream).unwrap();
        assert_eq!(first.status, 200);
        assert!(first.body == want("text.txt"));
        let second = read_response(&mut stream).unwrap();
        assert_eq!(second.status, 206);
        assert!(second.body == want("1m.bin")[5..10]);
        let third = read_response(&mut stream).unwrap();
        assert_eq!(third.status, 404);
        let fourth = read_response(&mut stream).unwrap();
        assert_eq!(fourth.status, 200);
        assert!(fourth.body == want("70k.bin"));
        assert_eq!(fourth.header("connection").as_deref(), Some("close"));
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after Connection: close");
    }
}

/// A fresh connection to the server, reads bounded to 10 s.
fn connect(server: &FullServer) -> TcpStream {
    let stream = TcpStream::connect(server.http).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A connection whose receive buffer is 4 KiB, set before connecting so
/// the window the server sees stays small: a client that reads slowly.
fn connect_with_a_small_window(server: &FullServer) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.http.into()).unwrap();
    socket.into()
}

/// Sends raw bytes on a fresh connection; returns the first response.
fn raw(server: &FullServer, bytes: &[u8]) -> Fetched {
    let mut stream = connect(server);
    stream.write_all(bytes).unwrap();
    read_response(&mut stream)
        .unwrap_or_else(|| panic!("no response to {:?}", String::from_utf8_lossy(bytes)))
}

#[test]
fn hostile_paths_and_malformed_heads_get_clear_errors() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("ok.txt"), b"fine").unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::os::unix::fs::symlink("/etc", root.path().join("etc-link")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.path().join("host-link")).unwrap();
        let server = FullServer::start_on(backend, root.path(), |c| c.http.max_header_bytes = 4096);

        let get = |path: &str| {
            raw(
                &server,
                format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            )
        };
        for (path, status) in [
            ("/../etc/passwd", 400),
            ("/%2e%2e/etc/passwd", 400),
            ("/dir/..%2f..%2fetc/passwd", 400),
            ("/a%5cb", 400),
            ("/%00", 400),
            ("/%0a", 400),
            ("/%ff%fe", 400),
            ("/etc-link/passwd", 403),
            ("/host-link", 403),
            ("/dir", 404),
            ("/", 404),
            ("//ok.txt", 200),
            ("/./ok.txt", 200),
        ] {
            let response = get(path);
            assert_eq!(response.status, status, "{path}: {}", response.head);
        }

        let cases: &[(&[u8], u16)] = &[
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /ok.txt HTTP/2.0\r\nHost: h\r\n\r\n", 505),
            (b"GET /ok.txt HTTP/1.1\r\n\r\n", 400),
            (
                b"POST /ok.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
                413,
            ),
            (b"PUT /ok.txt HTTP/1.1\r\nHost: h\r\n\r\n", 405),
            (
                b"GET /ok.txt HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                411,
            ),
            (
                b"GET /ok.txt HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n",
                400,
            ),
        ];
        for (bytes, status) in cases {
            let response = raw(&server, bytes);
            assert_eq!(
                response.status,
                *status,
                "{:?}: {}",
                String::from_utf8_lossy(bytes),
                response.head
            );
        }
        let put = raw(&server, b"PUT /ok.txt HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(put.header("allow").as_deref(), Some("GET, HEAD"));
        let big = format!(
            "GET /ok.txt HTTP/1.1\r\nHost: h\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(5000)
        );
        assert_eq!(raw(&server, big.as_bytes()).status, 431);
        let endless = format!(
            "GET /ok.txt HTTP/1.1\r\nHost: h\r\nX-Pad: {}",
            "a".repeat(8000)
        );
        assert_eq!(raw(&server, endless.as_bytes()).status, 431);

        // A client that connects and vanishes, or resets mid-response.
        for _ in 0..20 {
            drop(TcpStream::connect(server.http).unwrap());
            let mut s = TcpStream::connect(server.http).unwrap();
            let _ = s.write_all(b"GET /ok.txt HTTP/1.1\r\nHo");
        }
        // The server still answers everyone else.
        let fine = get("/ok.txt");
        assert_eq!((fine.status, fine.body.as_slice()), (200, &b"fine"[..]));
        let client_errors = server.running.http.stats.client_errors.get();
        assert!(client_errors > 0, "bad requests are counted");
    }
}

#[test]
fn slow_and_idle_clients_time_out_without_blocking_others() {
    if !have_tool("curl") {
        return;
    }
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| {
            c.http.header_timeout = Duration::from_millis(800);
            c.http.idle_timeout = Duration::from_millis(1500);
        });
        // 200 slowloris connections, each one byte at a time.
        let mut slow: Vec<TcpStream> = (0..200)
            .map(|_| {
                let mut s = TcpStream::connect(server.http).unwrap();
                s.write_all(b"GET /1m.bin HTTP/1.1\r\nHo").unwrap();
                s
            })
            .collect();
        let started = Instant::now();
        let fast = curl(&server.url("/10m.bin"), &[]);
        assert_eq!(fast.status, 200);
        assert!(fast.body == want("10m.bin"));
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "a normal client waited behind slow ones"
        );
        // Dribbling bytes does not extend the deadline for a head.
        for s in slow.iter_mut().take(10) {
            let _ = s.write_all(b"s");
        }
        for mut s in slow {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let response = read_response(&mut s).expect("a 408 before the connection closes");
            assert_eq!(response.status, 408);
        }

        // A keep-alive connection left idle is closed without a response:
        // after a file, and after answers made whole in memory (which the
        // io_uring engine sends linked to the next receive), each asked
        // twice so the second is read by that linked receive.
        for (path, status) in [("/text.txt", 200), ("/no-such-file", 404)] {
            let mut idle = TcpStream::connect(server.http).unwrap();
            idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            for _ in 0..2 {
                write!(idle, "GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
                assert_eq!(read_response(&mut idle).unwrap().status, status, "{path}");
            }
            let idle_since = Instant::now();
            let mut rest = Vec::new();
            idle.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{path}");
            let waited = idle_since.elapsed();
            assert!(
                waited >= Duration::from_millis(1200) && waited < Duration::from_secs(4),
                "{path}: {waited:?}"
            );
        }
    }
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| {
            c.http.send_timeout = Duration::from_millis(700)
        });
        let mut stalled = connect_with_a_small_window(&server);
        stalled
            .write_all(b"GET /100m.bin HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        // Reading now ends well before 100 MB: the server gave up.
        stalled
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stalled.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
        assert!(
            total < 100_000_000,
            "all {total} bytes arrived; the stalled client was not dropped"
        );
        let ok = raw(&server, b"GET /text.txt HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(ok.status, 200);
    }
}

#[test]
fn files_over_4_gib_with_ranges_near_the_end() {
    if !have_tool("curl") {
        return;
    }
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("huge.img");
        let size: u64 = 5 << 30;
        {
            use std::os::unix::fs::FileExt;
            let file = std::fs::File::create(&path).unwrap();
            file.set_len(size).unwrap();
            file.write_all_at(b"FOUR-GIB", 4 << 30).unwrap();
            file.write_all_at(b"THE-END!", size - 8).unwrap();
        }
        for body in [BodyMode::Sendfile, BodyMode::Mmap] {
            let server = FullServer::start_on(backend, root.path(), |c| c.http.body = body);
            let url = server.url("/huge.img");
            let head = curl(&url, &["-I"]);
            assert_eq!(head.header("content-length"), Some(size.to_string()));
            let end = curl(&url, &["-r", "-8"]);
            assert_eq!(end.status, 206);
            assert_eq!(
                end.header("content-range"),
                Some(format!("bytes {}-{}/{size}", size - 8, size - 1))
            );
            assert_eq!(end.body, b"THE-END!");
            let across = curl(
                &url,
                &["-r", &format!("{}-{}", (4u64 << 30) - 4, (4u64 << 30) + 7)],
            );
            assert_eq!(across.body, b"\0\0\0\0FOUR-GIB", "{body:?}");
            let multi = curl(&url, &["-r", &format!("0-1,{}-{}", size - 2, size - 1)]);
            assert_eq!(multi.status, 206);
            assert!(multi.body.windows(2).any(|w| w == b"D!"));
            let beyond = curl(&url, &["-r", &format!("{size}-")]);
            assert_eq!(beyond.status, 416);
            assert_eq!(
                beyond.header("content-range"),
                Some(format!("bytes */{size}"))
            );
        }
    }
}

/// `http.body = "auto"` (the default) copies file bodies from the mapping
/// while few connections are open and uses `sendfile` once more than
/// `AUTO_COPIES_UP_TO_CONNECTIONS` are; the bytes are the file's either way.
#[test]
fn auto_body_copies_for_a_few_clients_and_uses_sendfile_for_many() {
    if !have_tool("curl") {
        return;
    }
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |_| {});
        let stats = &server.running.http.stats;
        let count = |counter: &bootfleet::metrics::Counter| counter.get();
        let url = server.url("/1m.bin");
        let file = want("1m.bin");

        let alone = curl(&url, &[]);
        assert!(alone.body == file, "copied body differs from the file");
        assert_eq!(count(&stats.file_bodies_copied), 1);
        assert_eq!(count(&stats.file_bodies_by_sendfile), 0);

        // Connections that are surely open on the server: each has been
        // answered a script (not a file) and is kept alive.
        let held: Vec<TcpStream> = (0..BodyMode::AUTO_COPIES_UP_TO_CONNECTIONS)
            .map(|_| {
                let mut stream = connect(&server);
                stream
                    .write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: h\r\n\r\n")
                    .unwrap();
                let mut received = Vec::new();
                let mut chunk = [0u8; 4096];
                while !String::from_utf8_lossy(&received).contains("chain ") {
                    let n = stream.read(&mut chunk).unwrap();
                    assert!(n > 0, "connection closed");
                    received.extend_from_slice(&chunk[..n]);
                }
                stream
            })
            .collect();
        let crowded = curl(&url, &[]);
        assert!(crowded.body == file, "sendfile body differs from the file");
        let range = curl(&url, &["-r", "999990-"]);
        assert_eq!(range.body, &file[999_990..]);
        assert_eq!(count(&stats.file_bodies_by_sendfile), 2);
        assert_eq!(count(&stats.file_bodies_copied), 1);

        // Once they close, bodies are copied again (the server learns of
        // each close when it reads the end of its connection).
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(5);
        while count(&stats.file_bodies_copied) == 1 && Instant::now() < deadline {
            assert!(curl(&url, &["-r", "0-9"]).body == file[..10]);
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(count(&stats.file_bodies_copied), 2);
    }
}

/// The server's end of `client`'s connection (the server runs in this
/// process), found among this process's descriptors by its addresses.
fn server_side_corked(server: &FullServer, client: &TcpStream) -> Option<bool> {
    use std::os::fd::BorrowedFd;
    let client_addr = client.local_addr().unwrap();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: only getsockopt/getsockname/getpeername on it; a descriptor
        // closed or reused meanwhile makes them fail, which is skipped.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let addresses = (socket.local_addr(), socket.peer_addr());
        if let (Ok(local), Ok(peer)) = addresses {
            if local.as_socket() == Some(server.http) && peer.as_socket() == Some(client_addr) {
                return socket.cork().ok();
            }
        }
    }
    None
}

/// A file slice of `CORK_FILE_SLICES_FROM` or more sent by `sendfile` goes
/// out with `TCP_CORK` on, and the cork comes off when the response ends:
/// the body arrives whole, and the next answer on the connection is not
/// held back.
#[test]
fn a_large_sendfile_body_goes_out_corked_and_the_cork_comes_off_after_it() {
    let root = tempfile::tempdir().unwrap();
    let size = bootfleet::engine::CORK_FILE_SLICES_FROM as usize + 12_345;
    let big: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.path().join("big.img"), &big).unwrap();
    std::fs::write(root.path().join("small.txt"), b"small").unwrap();
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server =
            FullServer::start_on(backend, root.path(), |c| c.http.body = BodyMode::Sendfile);
        let mut client = connect(&server);
        client
            .write_all(b"GET /big.img HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        // While the client reads nothing the socket fills, mid-body.
        let deadline = Instant::now() + Duration::from_secs(5);
        while server_side_corked(&server, &client) != Some(true) {
            assert!(Instant::now() < deadline, "the body never went out corked");
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = read_response(&mut client).expect("the big file");
        assert_eq!(got.status, 200);
        assert!(got.body == big, "corked body differs from the file");
        let deadline = Instant::now() + Duration::from_secs(5);
        while server_side_corked(&server, &client) != Some(false) {
            assert!(
                Instant::now() < deadline,
                "the cork stayed on after the body"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        client
            .write_all(b"GET /small.txt HTTP/1.1\r\nHost: h\r\n\r\n")
            .unwrap();
        let small = read_response(&mut client).expect("the next answer");
        assert_eq!((small.status, small.body.as_slice()), (200, &b"small"[..]));
        assert_eq!(server_side_corked(&server, &client), Some(false));
    }
}

#[test]
fn symlink_into_the_root_is_served() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("images")).unwrap();
        std::fs::write(root.path().join("images/k-1.0"), b"kernel").unwrap();
        std::os::unix::fs::symlink("images/k-1.0", root.path().join("vmlinuz")).unwrap();
        let server = FullServer::start_on(backend, root.path(), |_| {});
        let got = raw(&server, b"GET /vmlinuz HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((got.status, got.body.as_slice()), (200, &b"kernel"[..]));
        assert!(Path::new(&root.path().join("vmlinuz")).exists());
    }
}

/// Connections beyond `max_connections` are answered 503 with `Retry-After`
/// at once and closed; those within the limit go on being served, and a
/// closed one makes room for the next.
#[test]
fn connections_beyond_the_limit_get_503_and_the_others_are_served() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| c.http.max_connections = 2);
        let request = b"GET /text.txt HTTP/1.1\r\nHost: t\r\n\r\n";
        let mut held: Vec<TcpStream> = (0..2)
            .map(|_| TcpStream::connect(server.http).unwrap())
            .collect();
        for stream in &mut held {
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(request).unwrap();
            assert_eq!(read_response(stream).unwrap().status, 200);
        }
        // The third is told to come back, without having to ask.
        let mut third = connect(&server);
        let busy = read_response(&mut third).expect("an answer, not silence");
        assert_eq!(busy.status, 503);
        assert_eq!(busy.header("retry-after").as_deref(), Some("1"));
        let mut rest = Vec::new();
        let _ = third.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the refused connection is closed");
        // The held connections are still served.
        for stream in &mut held {
            stream.write_all(request).unwrap();
            assert_eq!(read_response(stream).unwrap().status, 200);
        }
        // Closing one makes room (once the server has seen the close).
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut stream = connect(&server);
            let _ = stream.write_all(request);
            match read_response(&mut stream) {
                Some(fetched) if fetched.status == 200 => break,
                other => {
                    let status = other.map(|f| f.status);
                    assert!(
                        Instant::now() < deadline,
                        "no room after a connection closed: {status:?}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Security review finding 11: one host holding `max_connections` idle
/// sockets got everyone else a 503. Now a client address holds at most
/// `max_connections_per_client`; another address is still served.
#[test]
fn one_client_cannot_hold_every_connection() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| {
            c.http.max_connections = 100;
            c.http.max_connections_per_client = 2;
        });
        let request = b"GET /text.txt HTTP/1.1\r\nHost: t\r\n\r\n";
        let from = |source: &str| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
            socket.bind(&source.into()).unwrap();
            socket.connect(&server.http.into()).unwrap();
            let stream: TcpStream = socket.into();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
        };
        let mut held: Vec<TcpStream> = (0..2).map(|_| from("127.0.0.1")).collect();
        for stream in &mut held {
            stream.write_all(request).unwrap();
            assert_eq!(read_response(stream).unwrap().status, 200);
        }
        let mut third = from("127.0.0.1");
        let busy = read_response(&mut third).expect("an answer, not silence");
        assert_eq!(busy.status, 503, "{backend}: over the per-client limit");
        let mut other = from("127.0.0.2");
        other.write_all(request).unwrap();
        assert_eq!(
            read_response(&mut other).unwrap().status,
            200,
            "{backend}: another client"
        );
        // A closed connection gives its place back.
        drop(held.pop());
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut stream = from("127.0.0.1");
            let _ = stream.write_all(request);
            match read_response(&mut stream).map(|f| f.status) {
                Some(200) => break,
                status => {
                    assert!(
                        Instant::now() < deadline,
                        "{backend}: no place given back: {status:?}"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
}

/// Out of file descriptors (a storm against a low `ulimit -n`): the
/// connections already open are still answered (the file, or a 503 that
/// says to retry), and once descriptors are free new connections are
/// accepted again.
#[test]
fn running_out_of_file_descriptors_is_answered_and_recovered_from() {
    for engine in ["io-uring", "epoll"] {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let mut server = serve_with_fd_limit(
            40,
            &format!(
                "--root {:?} --tftp-listen 127.0.0.1:0 --http-listen 127.0.0.1:{port} --panel-listen off --engine {engine} --workers 1",
                boot_dir()
            ),
        );
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut first = loop {
            match TcpStream::connect(addr) {
                Ok(stream) => break stream,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("{engine}: the server did not start: {e}"),
            }
        };
        // More connections than the server has descriptors for.
        let crowd: Vec<TcpStream> = (0..60)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        first
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        first
            .write_all(b"GET /70k.bin HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let answer = read_response(&mut first)
            .unwrap_or_else(|| panic!("{engine}: an open connection got no answer"));
        match answer.status {
            200 => assert!(answer.body == want("70k.bin"), "{engine}"),
            503 => assert_eq!(
                answer.header("retry-after").as_deref(),
                Some("1"),
                "{engine}"
            ),
            other => panic!("{engine}: status {other}"),
        }
        drop(crowd);
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let fetched = TcpStream::connect(addr).ok().and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
                stream
                    .write_all(b"GET /70k.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .ok()?;
                read_response(&mut stream)
            });
            if fetched.as_ref().is_some_and(|f| f.status == 200) {
                assert!(fetched.unwrap().body == want("70k.bin"), "{engine}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{engine}: no new connection served after descriptors were freed: {:?}",
                fetched.map(|f| f.status)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// A burst of pipelined requests far larger than one read (heads padded to
/// 500 bytes, 21 of them): every one is answered, in order, with its file.
#[test]
fn a_pipelined_burst_larger_than_a_read_is_answered_in_full() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |_| {});
        let mut stream = connect(&server);
        let pad = "p".repeat(500);
        let mut burst = String::new();
        for i in 0..20 {
            let name = if i % 2 == 0 { "70k.bin" } else { "text.txt" };
            burst.push_str(&format!(
                "GET /{name} HTTP/1.1\r\nHost: t\r\nX-Pad-{i}: {pad}\r\n\r\n"
            ));
        }
        burst.push_str("GET /one-block.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream.write_all(burst.as_bytes()).unwrap();
        for i in 0..20 {
            let name = if i % 2 == 0 { "70k.bin" } else { "text.txt" };
            let fetched = read_response(&mut stream)
                .unwrap_or_else(|| panic!("{backend}: response {i} missing"));
            assert_eq!(fetched.status, 200, "{backend}: response {i}");
            assert!(
                fetched.body == want(name),
                "{backend}: response {i} is not {name}"
            );
        }
        let last = read_response(&mut stream).expect("the last response");
        assert!(last.body == want("one-block.bin"), "{backend}");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{backend}: bytes after Connection: close");
    }
}

/// Clients that reset their connection right after asking free their
/// connection on the server, whether the reset comes before the answer is
/// sent or makes it fail (on the io_uring engine an answer made in memory
/// is a send linked to the next receive, and a failed send must close the
/// connection once the receive behind it is cancelled): with a limit of 4
/// connections, after 300 such clients, 4 connections at once are served.
#[test]
fn clients_that_reset_after_asking_free_their_connection() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| c.http.max_connections = 4);
        for n in 0..300 {
            let socket = socket2::Socket::from(TcpStream::connect(server.http).unwrap());
            // A 404 and a script: both answers are made in memory.
            let path = if n % 2 == 0 {
                format!("/no-such-file-{n}")
            } else {
                "/boot/52:54:00:00:00:01.ipxe".to_string()
            };
            let _ = socket.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes());
            if n % 3 == 0 {
                // Some wait for the answer first, so the reset meets the
                // receive armed behind it.
                let mut stream = TcpStream::from(socket.try_clone().unwrap());
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                assert!(
                    read_response(&mut stream).is_some(),
                    "{backend}: no answer to {path}"
                );
            }
            socket.set_linger(Some(Duration::ZERO)).unwrap();
            drop(socket); // closed with a reset
        }
        let request = b"GET /text.txt HTTP/1.1\r\nHost: h\r\n\r\n";
        let deadline = Instant::now() + Duration::from_secs(6);
        loop {
            let mut held: Vec<TcpStream> = (0..4).map(|_| connect(&server)).collect();
            let statuses: Vec<Option<u16>> = held
                .iter_mut()
                .map(|stream| {
                    let _ = stream.write_all(request);
                    read_response(stream).map(|f| f.status)
                })
                .collect();
            if statuses.iter().all(|s| *s == Some(200)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}: connections not freed after resets: {statuses:?}"
            );
            drop(held);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A client that keeps asking and reads none of the answers, which are made
/// in memory, is closed once the server's buffers for it are full and its
/// timeouts pass, and its connection is freed (on the io_uring engine the
/// stuck answer is a send linked to the next receive, which the sweep
/// cancels).
#[test]
fn a_client_that_asks_without_reading_is_closed_and_freed() {
    for backend in BACKENDS {
        eprintln!("backend {backend}");
        let server = FullServer::start_on(backend, boot_dir(), |c| {
            c.http.max_connections = 1;
            c.http.idle_timeout = Duration::from_millis(1000);
            c.http.send_timeout = Duration::from_millis(700);
        });
        // 1,000 boot events, so that the events list is a large answer
        // (about 250 KB), made whole in memory.
        let mut filler = connect(&server);
        for _ in 0..1000 {
            filler
                .write_all(b"GET /boot.ipxe HTTP/1.1\r\nHost: h\r\n\r\n")
                .unwrap();
            assert_eq!(read_response(&mut filler).unwrap().status, 200);
        }
        drop(filler);
        let request = b"GET /api/v1/events?limit=1000 HTTP/1.1\r\nHost: h\r\n\r\n";
        // Connected once the server has seen the filler close (until then
        // it answers 503); only the first answer's status line is read.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stalled = loop {
            let mut stream = connect_with_a_small_window(&server);
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(request).unwrap();
            let mut status_line = [0u8; 12];
            stream.read_exact(&mut status_line).unwrap();
            if &status_line == b"HTTP/1.1 200" {
                break stream;
            }
            assert!(Instant::now() < deadline, "{backend}: no free connection");
            std::thread::sleep(Duration::from_millis(50));
        };
        stalled
            .set_write_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        // One request at a time, so none is pipelined behind another: 40
        // answers, 10 MB, more than the socket buffers on both sides hold.
        let mut asked = 1;
        while asked < 40 {
            if stalled.write_all(request).is_err() {
                break; // closed by the server already
            }
            asked += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        // The one connection allowed is free again within the timeouts.
        wait_for_a_free_slot(&server, backend);
        // And it was closed before all its answers went out.
        let mut answers = b"HTTP/1.1 200".to_vec();
        let _ = stalled.read_to_end(&mut answers);
        let answered = answers.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
        assert!(
            answered < asked,
            "{backend}: all {asked} answers arrived; the server never gave up"
        );
    }
}

/// Waits until a new connection is served (200), not refused (503): the
/// server has closed the connections it held.
fn wait_for_a_free_slot(server: &FullServer, backend: Backend) {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let mut stream = connect(server);
        let _ = stream.write_all(b"GET /text.txt HTTP/1.1\r\nHost: h\r\n\r\n");
        match read_response(&mut stream).map(|f| f.status) {
            Some(200) => return,
            status => {
                assert!(
                    Instant::now() < deadline,
                    "{backend}: connections are still held: {status:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Issue 24: HTTPS beside HTTP serves the same files and scripts (which
/// then name the server with `https://`), with a certificate signed by a
/// CA bootfleet keeps in its state directory across restarts; a client
/// that does not trust that CA is refused at the handshake.
#[test]
fn https_serves_the_same_files_and_scripts_under_a_ca_the_server_keeps() {
    if !have_tool("curl") {
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tls = bootfleet::config::HttpsConfig {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        cert_and_key: None,
        names: Vec::new(),
    };
    let state = tempfile::tempdir().unwrap();
    let server =
        FullServer::start_with_panel(boot_dir(), state, |c| c.http.tls = Some(tls.clone()));
    let ca = server.state.path().join("https-ca.crt");
    let ca_text =
        std::fs::read_to_string(&ca).expect("the CA certificate is kept in the state directory");
    let key_mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(server.state.path().join("https-ca.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(key_mode & 0o777, 0o600, "the CA key is private");
    let base = format!("https://127.0.0.1:{port}");
    let trusted = ["--cacert", ca.to_str().unwrap()];
    let file = curl(&format!("{base}/1m.bin"), &trusted);
    assert_eq!(file.status, 200);
    assert!(file.body == want("1m.bin"), "the same bytes over HTTPS");
    let range = curl(
        &format!("{base}/1m.bin"),
        &["--cacert", ca.to_str().unwrap(), "-r", "10-19"],
    );
    assert_eq!(
        (range.status, range.body.as_slice()),
        (206, &want("1m.bin")[10..20])
    );
    let chain = String::from_utf8(curl(&format!("{base}/boot.ipxe"), &trusted).body).unwrap();
    assert!(
        chain.contains(&format!("{base}/boot/")),
        "scripts name the server by https: {chain}"
    );
    let plain = String::from_utf8(curl(&server.url("/boot.ipxe"), &[]).body).unwrap();
    assert!(
        plain.contains(&format!("http://{}/boot/", server.http)),
        "and by http over HTTP: {plain}"
    );
    // A client without the CA refuses the server.
    let untrusted = std::process::Command::new("curl")
        .args(["-s", "-S", "--max-time", "10", "-o", "/dev/null"])
        .arg(format!("{base}/1m.bin"))
        .output()
        .unwrap();
    assert!(
        !untrusted.status.success(),
        "an untrusted certificate is refused"
    );
    assert!(
        String::from_utf8_lossy(&untrusted.stderr).contains("certificate"),
        "{}",
        String::from_utf8_lossy(&untrusted.stderr)
    );
    // A restart signs a new certificate with the same CA.
    let state = {
        let FullServer { running, state, .. } = server;
        running.stop();
        state
    };
    let server = FullServer::start_with_panel(boot_dir(), state, |c| c.http.tls = Some(tls));
    assert_eq!(
        std::fs::read_to_string(&ca).unwrap(),
        ca_text,
        "the CA is kept"
    );
    assert_eq!(curl(&format!("{base}/1m.bin"), &trusted).status, 200);
    drop(server);
}
