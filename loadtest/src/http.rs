//! The HTTP client of the load tester: GETs from the machine's own address
//! on one kept-alive connection per machine, as iPXE does it (it asks for
//! keep-alive, pools the connection and needs `Content-Length`),
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
use tokio::net::{TcpSocket, TcpStream};

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

/// A step that did not complete.
struct StepError {
    message: String,
    /// The idle timeout or the deadline ended it (not the server).
    timed_out: bool,
}

impl From<StepError> for String {
    fn from(e: StepError) -> String {
        e.message
    }
}

/// Waits for `step`, for at most `idle` and never past `deadline`: the
/// server must make progress, as iPXE needs it to, however long a large
/// body takes in all.
async fn step<T>(
    step: impl std::future::Future<Output = std::io::Result<T>>,
    what: &str,
    idle: Duration,
    deadline: Instant,
) -> Result<T, StepError> {
    let until = (Instant::now() + idle).min(deadline);
    let (message, timed_out) = match tokio::time::timeout_at(until.into(), step).await {
        Ok(Ok(value)) => return Ok(value),
        Ok(Err(e)) => (format!("{what}: {e}"), false),
        Err(_) if until == deadline => ("time limit".to_string(), true),
        Err(_) => (
            format!("{what}: timed out (nothing for {} s)", idle.as_secs_f64()),
            true,
        ),
    };
    Err(StepError { message, timed_out })
}

/// The connection a simulated machine keeps open between requests, as
/// iPXE pools its HTTP connections: it always asks for keep-alive and sends
/// its next request (the machine's script after `boot.ipxe`, then kernel and
/// initrds) on the same connection while the server keeps it open.
#[derive(Default)]
pub struct Pool {
    open: Option<Pooled>,
    /// Connections opened so far (a machine needs one per server that keeps
    /// connections alive).
    pub connections_opened: u32,
}

struct Pooled {
    local: IpAddr,
    server: SocketAddr,
    stream: TcpStream,
}

/// Why a request on a connection ended without a response.
enum Failure {
    /// Nothing of a response arrived: a pooled connection the server had
    /// already closed. Worth one retry on a fresh connection.
    NoResponse(String),
    Other(String),
}

/// GETs `url` (an `http://` URL) from `local`, on the pooled connection when
/// it leads to the same server, keeping the body when `keep_body`; a server
/// silent for `idle`, or the `deadline`, ends it.
pub async fn get(
    pool: &mut Pool,
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
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    };
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: iPXE/1.21.1 (bootfleet-loadtest)\r\nConnection: keep-alive\r\n\r\n",
        url.authority()
    );
    let pooled = pool
        .open
        .take()
        .filter(|p| p.server == server && p.local == local);
    if let Some(mut pooled) = pooled {
        match exchange(&mut pooled.stream, &request, keep_body, idle, deadline).await {
            Ok((fetched, reusable)) => {
                if reusable {
                    pool.open = Some(pooled);
                }
                return Ok(fetched);
            }
            // The server closed the idle connection: iPXE reopens, so do we.
            Err(Failure::NoResponse(_)) => {}
            Err(Failure::Other(e)) => return Err(e),
        }
    }
    let mut stream = connect(local, server, idle, deadline).await?;
    pool.connections_opened += 1;
    match exchange(&mut stream, &request, keep_body, idle, deadline).await {
        Ok((fetched, reusable)) => {
            if reusable {
                pool.open = Some(Pooled {
                    local,
                    server,
                    stream,
                });
            }
            Ok(fetched)
        }
        Err(Failure::NoResponse(e) | Failure::Other(e)) => Err(e),
    }
}

async fn connect(
    local: IpAddr,
    server: SocketAddr,
    idle: Duration,
    deadline: Instant,
) -> Result<TcpStream, String> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(local, 0))
        .map_err(|e| format!("bind {local}: {e}"))?;
    Ok(step(socket.connect(server), "connect", idle, deadline).await?)
}

/// Sends one request and reads its response; says whether the connection
/// may carry the next request (HTTP/1.1, no `Connection: close`, nothing
/// read past the body).
async fn exchange(
    stream: &mut TcpStream,
    request: &str,
    keep_body: bool,
    idle: Duration,
    deadline: Instant,
) -> Result<(Fetched, bool), Failure> {
    // A pooled connection the server has closed fails here or at the first
    // read; a server that is merely slow does not get the request twice.
    let unanswered = |e: StepError| {
        if e.timed_out {
            Failure::Other(e.message)
        } else {
            Failure::NoResponse(e.message)
        }
    };
    step(stream.write_all(request.as_bytes()), "send", idle, deadline)
        .await
        .map_err(unanswered)?;

    // Room for a response head; grown for a large body only, so that a
    // script fetch does not allocate (and zero) a large buffer.
    let mut buf = vec![0u8; 4 << 10];
    let mut filled = 0usize;
    let (status, length, head_len, close) = loop {
        let n = match step(stream.read(&mut buf[filled..]), "receive", idle, deadline).await {
            Ok(n) => n,
            Err(e) if filled == 0 => return Err(unanswered(e)),
            Err(e) => return Err(Failure::Other(e.message)),
        };
        if n == 0 {
            let e = "connection closed before the response head".to_string();
            return Err(if filled == 0 {
                Failure::NoResponse(e)
            } else {
                Failure::Other(e)
            });
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .and_then(|h| std::str::from_utf8(h.value).ok())
                        .map(str::trim)
                };
                let length = header("content-length")
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| {
                        Failure::Other(format!("HTTP {status} without Content-Length"))
                    })?;
                let close = response.version != Some(1)
                    || header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
                break (status, length, head_len, close);
            }
            Ok(httparse::Status::Partial) if filled < MAX_HEAD => {
                if filled == buf.len() {
                    buf.resize(MAX_HEAD, 0);
                }
                continue;
            }
            Ok(httparse::Status::Partial) => {
                return Err(Failure::Other("response head too large".into()))
            }
            Err(e) => return Err(Failure::Other(format!("bad response head: {e}"))),
        }
    };

    let mut sink = BodySink {
        hasher: Sha256::new(),
        body: keep_body.then(Vec::new),
        received: 0,
    };
    let first = &buf[head_len..filled];
    let overrun = first.len() as u64 > length;
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
        .await
        .map_err(|e| Failure::Other(e.message))?;
        if n == 0 {
            return Err(Failure::Other(format!(
                "body cut at {} of {length} bytes",
                sink.received
            )));
        }
        sink.take(&buf[..n]);
        // Hashing a chunk costs tens of microseconds, and tokio lets a task
        // whose reads are always ready run for up to 128 of them. Yielding
        // after each chunk keeps one machine's download from holding back
        // the TFTP blocks and DHCP answers of the machines behind it, which
        // on real hardware would not share a CPU with it.
        tokio::task::yield_now().await;
    }
    let fetched = Fetched {
        status,
        bytes: sink.received,
        sha256: sink.hasher.finalize().into(),
        body: sink.body,
    };
    Ok((fetched, !close && !overrun))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use tokio::net::TcpListener;

    #[derive(Clone, Copy)]
    enum Server {
        /// Answers every request and keeps the connection.
        KeepAlive,
        /// Answers with `Connection: close` and closes.
        Close,
        /// Answers one request with keep-alive, then closes anyway (an idle
        /// timeout on the server's side).
        DropsAfterOne,
    }

    /// A server on loopback answering "hello"; counts its connections.
    async fn serve(kind: Server) -> (url::Url, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = url::Url::parse(&format!("http://{}/x", listener.local_addr().unwrap())).unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut filled = 0;
                    loop {
                        let Ok(n) = stream.read(&mut buf[filled..]).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        filled += n;
                        if !buf[..filled].windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        filled = 0;
                        let connection = match kind {
                            Server::Close => "close",
                            _ => "keep-alive",
                        };
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: {connection}\r\n\r\nhello"
                        );
                        if stream.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                        if !matches!(kind, Server::KeepAlive) {
                            return;
                        }
                    }
                });
            }
        });
        (url, accepted)
    }

    async fn two_gets(kind: Server) -> (Pool, u32) {
        let (url, accepted) = serve(kind).await;
        let mut pool = Pool::default();
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        for _ in 0..2 {
            let fetched = get(
                &mut pool,
                &url,
                local,
                true,
                Duration::from_secs(5),
                deadline,
            )
            .await
            .unwrap();
            assert_eq!(fetched.body.as_deref(), Some(&b"hello"[..]));
        }
        (pool, accepted.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_the_next_request() {
        let (pool, accepted) = two_gets(Server::KeepAlive).await;
        assert_eq!((pool.connections_opened, accepted), (1, 1));
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let (pool, accepted) = two_gets(Server::Close).await;
        assert_eq!((pool.connections_opened, accepted), (2, 2));
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_reopened() {
        let (pool, accepted) = two_gets(Server::DropsAfterOne).await;
        assert_eq!((pool.connections_opened, accepted), (2, 2));
    }
}
