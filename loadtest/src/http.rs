//! The HTTP client of the load tester: one GET on its own connection from
//! the machine's own address, as iPXE does it (it needs `Content-Length`),
//! with the body hashed (SHA-256) as it streams in, so that thousands of
//! machines fetching hundreds of megabytes hold only their read buffers.
//!
//! Written on `httparse` rather than with a client crate: the load tester
//! must choose each connection's source address, count bytes as they
//! arrive and never buffer a kernel, which general clients hide.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;

/// A response: status, body length and digest, and the body itself when
/// it was asked for (scripts).
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub bytes: u64,
    pub sha256: [u8; 32],
    pub body: Option<Vec<u8>>,
}

/// Largest response head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Read buffer for large bodies.
const BODY_BUFFER: usize = 64 << 10;

/// Waits for `step`, for at most `idle` and never past `deadline`: the
/// server must make progress, as iPXE needs it to, however long a large
/// body takes in all.
async fn step<T>(
    step: impl std::future::Future<Output = std::io::Result<T>>,
    what: &str,
    idle: Duration,
    deadline: Instant,
) -> Result<T, String> {
    let until = (Instant::now() + idle).min(deadline);
    match tokio::time::timeout_at(until.into(), step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) if until == deadline => Err("time limit".to_string()),
        Err(_) => Err(format!(
            "{what}: timed out (nothing for {} s)",
            idle.as_secs_f64()
        )),
    }
}

/// GETs `url` (an `http://` URL) from `local`, keeping the body when
/// `keep_body`; a server silent for `idle`, or the `deadline`, ends it.
pub async fn get(
    url: &url::Url,
    local: IpAddr,
    keep_body: bool,
    idle: Duration,
    deadline: Instant,
) -> Result<Fetched, String> {
    let host = url.host_str().ok_or("URL without a host")?;
    let ip: IpAddr = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| format!("{host}: the load tester takes addresses, not names"))?;
    let server = SocketAddr::new(ip, url.port().unwrap_or(80));
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(local, 0))
        .map_err(|e| format!("bind {local}: {e}"))?;
    let mut stream = step(socket.connect(server), "connect", idle, deadline).await?;
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: iPXE/1.21.1 (bootfleet-loadtest)\r\nConnection: close\r\n\r\n",
        url.authority()
    );
    step(stream.write_all(request.as_bytes()), "send", idle, deadline).await?;

    // Room for a response head; grown for a large body only, so that a
    // script fetch does not allocate (and zero) a large buffer.
    let mut buf = vec![0u8; 4 << 10];
    let mut filled = 0usize;
    let (status, length, head_len) = loop {
        let n = step(stream.read(&mut buf[filled..]), "receive", idle, deadline).await?;
        if n == 0 {
            return Err("connection closed before the response head".into());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
                    .ok_or_else(|| format!("HTTP {status} without Content-Length"))?;
                break (status, length, head_len);
            }
            Ok(httparse::Status::Partial) if filled < MAX_HEAD => {
                if filled == buf.len() {
                    buf.resize(MAX_HEAD, 0);
                }
                continue;
            }
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad response head: {e}")),
        }
    };

    let mut sink = BodySink {
        hasher: Sha256::new(),
        body: keep_body.then(Vec::new),
        received: 0,
    };
    let first = &buf[head_len..filled];
    sink.take(&first[..first.len().min(length as usize)]);
    if length - sink.received > buf.len() as u64 {
        buf.resize(BODY_BUFFER.min((length - sink.received) as usize), 0);
    }
    while sink.received < length {
        let want = (length - sink.received).min(buf.len() as u64) as usize;
        let n = step(
            stream.read(&mut buf[..want]),
            "receive body",
            idle,
            deadline,
        )
        .await?;
        if n == 0 {
            return Err(format!("body cut at {} of {length} bytes", sink.received));
        }
        sink.take(&buf[..n]);
    }
    Ok(Fetched {
        status,
        bytes: sink.received,
        sha256: sink.hasher.finalize().into(),
        body: sink.body,
    })
}

/// Where a body goes as it arrives.
struct BodySink {
    hasher: Sha256,
    body: Option<Vec<u8>>,
    received: u64,
}

impl BodySink {
    fn take(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        if let Some(body) = self.body.as_mut() {
            body.extend_from_slice(chunk);
        }
        self.received += chunk.len() as u64;
    }
}
