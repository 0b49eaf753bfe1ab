//! The TFTP client of the load tester, as firmware behaves: one socket per
//! transfer, the request retried every `retry` until the server answers,
//! RFC 7440 windowed receive, and one ACK per burst of repeats or gaps.
//! Every block is compared with the expected bytes as it arrives: a fast
//! wrong answer is a failure. Once the server's transfer port is known the
//! socket is connected to it, so that the kernel routes each ACK once per
//! transfer instead of once per datagram and drops strays from other ports.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bootfleet::proto::tftp::packet::{self, Mode, Packet};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// What to ask for, and how patiently.
#[derive(Debug, Clone)]
pub struct Request {
    pub server: SocketAddr,
    /// Where the client's socket is bound (its own address, port 0).
    pub local: SocketAddr,
    pub file: String,
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    /// Ask for tsize (RFC 2349), as iPXE and UEFI do.
    pub tsize: bool,
    /// Retransmission interval (firmware uses about 1 s).
    pub retry: Duration,
    /// No progress for this long is a failure.
    pub stall: Duration,
}

impl Request {
    /// The options as a label, e.g. `blksize 1468 + windowsize 4 + tsize`.
    pub fn options_label(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = self.blksize {
            parts.push(format!("blksize {b}"));
        }
        if let Some(w) = self.windowsize {
            parts.push(format!("windowsize {w}"));
        }
        if self.tsize {
            parts.push("tsize".into());
        }
        if parts.is_empty() {
            "plain".into()
        } else {
            parts.join(" + ")
        }
    }
}

/// How a transfer ended.
#[derive(Debug)]
pub enum Ending {
    Complete,
    Failed(String),
    CutByTimeLimit,
}

/// One transfer's result.
#[derive(Debug)]
pub struct Transfer {
    pub ending: Ending,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Requests sent (more than one: the first was dropped or unanswered).
    pub rrq_sent: u32,
}

/// Fetches `request.file`, checking it against `expected`, until done or
/// `deadline`.
pub async fn get(request: &Request, expected: &[u8], deadline: Instant) -> Transfer {
    let started = Instant::now();
    let mut transfer = Transfer {
        ending: Ending::Failed(String::new()),
        bytes: 0,
        elapsed: Duration::ZERO,
        rrq_sent: 0,
    };
    transfer.ending = receive(request, expected, deadline, &mut transfer).await;
    transfer.elapsed = started.elapsed();
    transfer
}

async fn receive(
    request: &Request,
    expected: &[u8],
    deadline: Instant,
    result: &mut Transfer,
) -> Ending {
    let socket = match UdpSocket::bind(request.local).await {
        Ok(socket) => socket,
        Err(e) => return Ending::Failed(format!("bind {}: {e}", request.local)),
    };
    let mut options: Vec<(&str, String)> = Vec::new();
    if let Some(b) = request.blksize {
        options.push(("blksize", b.to_string()));
    }
    if let Some(w) = request.windowsize {
        options.push(("windowsize", w.to_string()));
    }
    if request.tsize {
        options.push(("tsize", "0".into()));
    }
    let option_refs: Vec<(&str, &str)> = options.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut rrq = Vec::new();
    packet::encode_rrq(&request.file, Mode::Octet, &option_refs, &mut rrq);

    let mut blksize = 512usize;
    let mut windowsize = 1u64;
    let mut tid: Option<SocketAddr> = None;
    let mut next: u64 = 1; // next block index expected
    let mut in_window = 0u64;
    let mut repeat_acked = false; // one ACK per burst of repeats or gaps
    let mut last_progress = Instant::now();
    let mut buf = vec![0u8; usize::from(request.blksize.unwrap_or(512).max(512)) + 4];
    let mut ack = Vec::with_capacity(4);

    if let Err(e) = socket.send_to(&rrq, request.server).await {
        return Ending::Failed(format!("send RRQ: {e}"));
    }
    result.rrq_sent = 1;
    // One retransmission timer for the whole transfer, moved only when it
    // fires early: resetting a timer for every block costs the simulator
    // more than the block itself at thousands of transfers.
    let mut quiet_since = Instant::now();
    let retry_at = |quiet_since: Instant| (quiet_since + request.retry).min(deadline);
    let retry = tokio::time::sleep_until(retry_at(quiet_since).into());
    tokio::pin!(retry);
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ending::CutByTimeLimit;
        }
        if now.duration_since(last_progress) >= request.stall {
            return Ending::Failed(if tid.is_none() {
                "no answer to the read request".to_string()
            } else {
                format!("stalled at block {next} ({} bytes)", result.bytes)
            });
        }
        tokio::select! {
            biased;
            ready = socket.readable() => {
                if let Err(e) = ready {
                    return Ending::Failed(format!("receive: {e}"));
                }
            }
            () = &mut retry => {
                let due = retry_at(quiet_since);
                if Instant::now() >= due {
                    // Silence for a whole retry interval: repeat the last
                    // thing we said.
                    let sent = match tid {
                        None => {
                            result.rrq_sent += 1;
                            socket.send_to(&rrq, request.server).await
                        }
                        Some(_) => {
                            ack.clear();
                            packet::encode_ack(((next - 1) & 0xFFFF) as u16, &mut ack);
                            socket.send(&ack).await
                        }
                    };
                    if let Err(e) = sent {
                        return Ending::Failed(format!("send: {e}"));
                    }
                    quiet_since = Instant::now();
                }
                retry.as_mut().reset(retry_at(quiet_since).into());
                continue;
            }
        }
        let (len, from) = match socket.try_recv_from(&mut buf) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Ending::Failed(format!("receive: {e}")),
        };
        quiet_since = Instant::now();
        if from.ip() != request.server.ip() || tid.is_some_and(|t| t != from) {
            continue; // not our transfer
        }
        match Packet::parse(&buf[..len]) {
            Ok(Packet::Oack { options }) if tid.is_none() => {
                tid = Some(from);
                if let Err(e) = socket.connect(from).await {
                    return Ending::Failed(format!("connect to the transfer port: {e}"));
                }
                for (name, value) in options {
                    if name.eq_ignore_ascii_case("blksize") {
                        blksize = value.parse().unwrap_or(512);
                    } else if name.eq_ignore_ascii_case("windowsize") {
                        windowsize = value.parse().unwrap_or(1);
                    } else if name.eq_ignore_ascii_case("tsize")
                        && value.parse::<usize>().ok() != Some(expected.len())
                    {
                        return Ending::Failed(format!(
                            "tsize {value} but the file has {} bytes",
                            expected.len()
                        ));
                    }
                }
                if buf.len() < blksize + 4 {
                    buf.resize(blksize + 4, 0);
                }
                ack.clear();
                packet::encode_ack(0, &mut ack);
                if let Err(e) = socket.send(&ack).await {
                    return Ending::Failed(format!("send ACK 0: {e}"));
                }
                last_progress = Instant::now();
            }
            Ok(Packet::Data { block, payload }) => {
                if tid.is_none() {
                    if !(options.is_empty() || block == 1) {
                        continue;
                    }
                    tid = Some(from);
                    if let Err(e) = socket.connect(from).await {
                        return Ending::Failed(format!("connect to the transfer port: {e}"));
                    }
                }
                if block == (next & 0xFFFF) as u16 {
                    let start = ((next - 1) as usize) * blksize;
                    let end = start + payload.len();
                    if end > expected.len() || expected[start..end] != *payload {
                        return Ending::Failed(format!("wrong bytes in block {next}"));
                    }
                    result.bytes += payload.len() as u64;
                    next += 1;
                    in_window += 1;
                    repeat_acked = false;
                    last_progress = Instant::now();
                    let last = payload.len() < blksize;
                    if last || in_window == windowsize {
                        in_window = 0;
                        if !last {
                            // Nothing more comes before this ACK: forget the
                            // readiness now rather than learn it from a
                            // receive that finds the queue empty, which
                            // saves a system call per window. A datagram
                            // that does arrive raises readiness again.
                            let _ = socket.try_io(Interest::READABLE, || {
                                Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
                            });
                        }
                        ack.clear();
                        packet::encode_ack(block, &mut ack);
                        if let Err(e) = socket.send(&ack).await {
                            return Ending::Failed(format!("send ACK: {e}"));
                        }
                    }
                    if last {
                        if end != expected.len() {
                            return Ending::Failed(format!(
                                "short file: {end} of {} bytes",
                                expected.len()
                            ));
                        }
                        return Ending::Complete;
                    }
                } else if !repeat_acked {
                    // A repeat (our ACK was lost) or a gap: say where we are, once.
                    repeat_acked = true;
                    in_window = 0;
                    ack.clear();
                    packet::encode_ack(((next - 1) & 0xFFFF) as u16, &mut ack);
                    if let Err(e) = socket.send(&ack).await {
                        return Ending::Failed(format!("send ACK: {e}"));
                    }
                }
            }
            Ok(Packet::Error { code, message }) => {
                return Ending::Failed(format!("server error {code}: {message}"));
            }
            _ => {}
        }
    }
}
