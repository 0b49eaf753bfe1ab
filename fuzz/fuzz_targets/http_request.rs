//! Fuzzes what the HTTP server does with bytes off the network: the request
//! parser on any input, then the whole answer (files, ranges, conditionals,
//! per-MAC scripts, the chain script, the read-only API) for every head it
//! accepts, against a small boot directory with an inventory.
//!
//! Checked for every answer: a well-formed status line that agrees with
//! the status, a `Content-Length` equal to the body that follows (a `304`
//! has neither), file slices inside the file, and a served path that stays
//! in the root.
#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bootfleet::boot::router::Router;
use bootfleet::cache::FileCache;
use bootfleet::proto::http::request::{parse, Parsed};
use bootfleet::server::http::{HttpService, HttpServiceConfig, Segment};
use libfuzzer_sys::fuzz_target;

const MAX_HEAD: usize = 8192;

fn service() -> &'static HttpService {
    static SERVICE: OnceLock<HttpService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        // Under the fuzz crate's own (ignored) build directory, not /tmp,
        // so that the runs in every CI build leave nothing behind there.
        let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
        // Roots of earlier runs whose process is gone are removed.
        for entry in std::fs::read_dir(&target).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("http-root-") {
                if !PathBuf::from(format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        let root = target.join(format!("http-root-{}", std::process::id()));
        std::fs::create_dir_all(root.join("images")).unwrap();
        std::fs::write(root.join("images/vmlinuz"), vec![7u8; 100_000]).unwrap();
        std::fs::write(root.join("images/initrd.img"), b"initrd").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(
            root.join("52:54:00:00:00:02.gpxe"),
            b"#!gpxe\nkernel x\nboot\n",
        )
        .unwrap();
        std::fs::write(
            root.join("inventory.toml"),
            "[images.i]\nkernel = \"images/vmlinuz\"\ninitrds = [\"images/initrd.img\"]\n\
             [machines.\"52:54:00:00:00:01\"]\nimage = \"i\"\n",
        )
        .unwrap();
        let router = Router::new(&root, &root.join("inventory.toml"), &root.join("state")).unwrap();
        HttpService::new(
            &root,
            FileCache::new(64 << 20),
            Arc::new(router),
            HttpServiceConfig {
                private: Vec::new(),
                fallbacks: Default::default(),
                public_url: None,
                serve_api: true,
                tls_port: None,
            },
        )
    })
}

fn header(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_string())
    })
}

fuzz_target!(|data: &[u8]| {
    let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
    let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let mut rest = data;
    // Pipelined heads, answered one after another as the engines do.
    for _ in 0..4 {
        let (request, used) = match parse(rest, MAX_HEAD) {
            Parsed::Complete(request, used) => (request, used),
            Parsed::Partial => {
                assert!(rest.len() <= MAX_HEAD, "a partial head past the limit");
                return;
            }
            Parsed::Invalid(status, why) => {
                assert!((400..600).contains(&status), "{status} {why}");
                let response = service().invalid(status, why);
                assert!(response
                    .head
                    .starts_with(format!("HTTP/1.1 {status} ").as_bytes()));
                return;
            }
        };
        assert!(used > 0 && used <= rest.len());
        let response = service().respond(&request, local, peer);
        let head_end = response
            .head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("the head ends with an empty line");
        let head = String::from_utf8_lossy(&response.head[..head_end]).into_owned();
        assert!(
            head.starts_with(&format!("HTTP/1.1 {} ", response.status)),
            "{head}"
        );
        let in_head = (response.head.len() - head_end - 4) as u64;
        if response.status == 304 {
            // No content, and (RFC 9110 §8.6) no Content-Length needed.
            assert_eq!(in_head + response.body_len(), 0, "a 304 with a body");
        } else {
            let length: u64 = header(&head, "content-length")
                .unwrap_or_else(|| panic!("no Content-Length: {head}"))
                .parse()
                .expect("a number");
            if request.method != bootfleet::proto::http::request::Method::Head {
                assert_eq!(length, in_head + response.body_len(), "{head}");
            }
        }
        if let Some(file) = &response.file {
            for segment in &response.segments {
                if let Segment::File { offset, len } = segment {
                    assert!(offset + len <= file.len() as u64, "slice outside the file");
                }
            }
        }
        if let Some(path) = &response.served_path {
            assert!(!path.split('/').any(|part| part == ".."), "served {path}");
        }
        service().finished(&response, peer, response.body_len(), Duration::ZERO);
        rest = &rest[used..];
    }
});
