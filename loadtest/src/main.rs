//! bootfleet-loadtest — simulated boot clients.
//!
//! Today: `tftp`, a concurrent TFTP client that fetches one file from many
//! simulated machines at once, each transfer on its own socket exactly as
//! firmware does (RRQ retried after 1 s, RFC 7440 windowed receive, an ACK
//! repeated once per burst of repeats or gaps). Every byte received is
//! compared with the expected file: a fast wrong answer is a failure. It is
//! the client of the side-by-side benchmark in `benches/` and the first piece
//! of the PXE client simulator (DHCP, loader, script, kernel, initrd) that
//! grows here.
//!
//! Load is bounded: a fixed number of concurrent clients, a maximum number of
//! transfers, and a hard time limit after which in-flight transfers stop and
//! their bytes still count towards goodput.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bootfleet::proto::tftp::packet::{self, Mode, Packet};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::net::UdpSocket;

#[derive(Parser)]
#[command(
    name = "bootfleet-loadtest",
    about = "Simulated boot clients for load tests and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Many concurrent TFTP clients fetching one file.
    Tftp(TftpArgs),
}

#[derive(clap::Args, Clone)]
struct TftpArgs {
    /// Server address (loopback or a test namespace only).
    #[arg(long)]
    server: SocketAddr,
    /// File name to request.
    #[arg(long)]
    file: String,
    /// Local copy of the file: every received byte is compared with it.
    #[arg(long)]
    verify: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Stop starting transfers after this many (bounded load).
    #[arg(long, default_value_t = 1000)]
    max_transfers: u64,
    /// Hard time limit of the run, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Ask for this blksize (RFC 2348).
    #[arg(long)]
    blksize: Option<u16>,
    /// Ask for this windowsize (RFC 7440).
    #[arg(long)]
    windowsize: Option<u16>,
    /// Ask for tsize (RFC 2349), as iPXE does.
    #[arg(long)]
    tsize: bool,
    /// Retransmission interval of the client (firmware uses about 1 s).
    #[arg(long, default_value_t = 1000)]
    retry_ms: u64,
    /// A transfer with no progress for this long has failed.
    #[arg(long, default_value_t = 10_000)]
    stall_ms: u64,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct Report {
    label: String,
    server: String,
    file: String,
    file_bytes: u64,
    clients: usize,
    options: String,
    seconds: f64,
    transfers_completed: u64,
    transfers_failed: u64,
    transfers_cut_by_time_limit: u64,
    /// Transfers whose first request had to be sent again (dropped or unanswered).
    first_requests_retried: u64,
    bytes_received: u64,
    goodput_mb_s: f64,
    transfers_per_s: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    failures: Vec<String>,
}

enum Ending {
    Complete,
    Failed(String),
    CutByTimeLimit,
}

struct TransferResult {
    ending: Ending,
    bytes: u64,
    elapsed: Duration,
    rrq_sent: u32,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Tftp(args) => {
            // One thread: the benchmark pins the client to one core.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let report = runtime.block_on(run_tftp(args.clone()))?;
            print_report(&report);
            if let Some(path) = &args.json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if report.transfers_failed > 0 {
                std::process::exit(2);
            }
            Ok(())
        }
    }
}

/// Load goes to loopback, or to a test namespace the caller made (which it
/// vouches for with BOOTFLEET_LOADTEST_NAMESPACE=1); never anywhere else.
fn check_target(addr: &SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() && std::env::var_os("BOOTFLEET_LOADTEST_NAMESPACE").is_none() {
        bail!(
            "refusing to send load to {addr}: use a loopback address, or an address in a test \
             namespace you created, with BOOTFLEET_LOADTEST_NAMESPACE=1"
        );
    }
    Ok(())
}

async fn run_tftp(args: TftpArgs) -> Result<Report> {
    check_target(&args.server)?;
    let expected = Rc::new(
        std::fs::read(&args.verify)
            .with_context(|| format!("cannot read {}", args.verify.display()))?,
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let args = Rc::new(args);
    let launched = Rc::new(std::cell::Cell::new(0u64));
    let local = tokio::task::LocalSet::new();
    let results = local
        .run_until(async {
            let mut handles = Vec::new();
            for _ in 0..args.clients {
                let args = Rc::clone(&args);
                let expected = Rc::clone(&expected);
                let launched = Rc::clone(&launched);
                handles.push(tokio::task::spawn_local(async move {
                    let mut results = Vec::new();
                    while Instant::now() < deadline && launched.get() < args.max_transfers {
                        launched.set(launched.get() + 1);
                        results.push(fetch(&args, &expected, deadline).await);
                    }
                    results
                }));
            }
            let mut all = Vec::new();
            for handle in handles {
                all.extend(handle.await.unwrap_or_default());
            }
            all
        })
        .await;
    let wall = started.elapsed().as_secs_f64();

    let mut report = Report {
        label: args.label.clone(),
        server: args.server.to_string(),
        file: args.file.clone(),
        file_bytes: expected.len() as u64,
        clients: args.clients,
        options: options_label(&args),
        seconds: wall,
        ..Report::default()
    };
    let mut times: Vec<f64> = Vec::new();
    for result in &results {
        report.bytes_received += result.bytes;
        if result.rrq_sent > 1 {
            report.first_requests_retried += 1;
        }
        match &result.ending {
            Ending::Complete => {
                report.transfers_completed += 1;
                times.push(result.elapsed.as_secs_f64() * 1000.0);
            }
            Ending::Failed(why) => {
                report.transfers_failed += 1;
                if report.failures.len() < 10 {
                    report.failures.push(why.clone());
                }
            }
            Ending::CutByTimeLimit => report.transfers_cut_by_time_limit += 1,
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| -> Option<f64> {
        if times.is_empty() {
            None
        } else {
            let index = ((times.len() as f64 - 1.0) * q).round() as usize;
            Some((times[index] * 100.0).round() / 100.0)
        }
    };
    report.p50_ms = pick(0.5);
    report.p99_ms = pick(0.99);
    report.max_ms = times.last().copied();
    report.goodput_mb_s = report.bytes_received as f64 / wall / 1e6;
    report.transfers_per_s = report.transfers_completed as f64 / wall;
    Ok(report)
}

fn options_label(args: &TftpArgs) -> String {
    let mut parts = Vec::new();
    if let Some(b) = args.blksize {
        parts.push(format!("blksize {b}"));
    }
    if let Some(w) = args.windowsize {
        parts.push(format!("windowsize {w}"));
    }
    if args.tsize {
        parts.push("tsize".into());
    }
    if parts.is_empty() {
        "plain".into()
    } else {
        parts.join(" + ")
    }
}

/// One transfer, as a firmware client does it.
async fn fetch(args: &TftpArgs, expected: &[u8], deadline: Instant) -> TransferResult {
    let started = Instant::now();
    let mut result = TransferResult {
        ending: Ending::Failed(String::new()),
        bytes: 0,
        elapsed: Duration::ZERO,
        rrq_sent: 0,
    };
    let outcome = receive(args, expected, deadline, &mut result).await;
    result.elapsed = started.elapsed();
    result.ending = outcome;
    result
}

async fn receive(
    args: &TftpArgs,
    expected: &[u8],
    deadline: Instant,
    result: &mut TransferResult,
) -> Ending {
    let bind: SocketAddr = if args.server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .expect("literal");
    let socket = match UdpSocket::bind(bind).await {
        Ok(socket) => socket,
        Err(e) => return Ending::Failed(format!("bind: {e}")),
    };
    let mut options: Vec<(&str, String)> = Vec::new();
    if let Some(b) = args.blksize {
        options.push(("blksize", b.to_string()));
    }
    if let Some(w) = args.windowsize {
        options.push(("windowsize", w.to_string()));
    }
    if args.tsize {
        options.push(("tsize", "0".into()));
    }
    let option_refs: Vec<(&str, &str)> = options.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let mut rrq = Vec::new();
    packet::encode_rrq(&args.file, Mode::Octet, &option_refs, &mut rrq);

    let retry = Duration::from_millis(args.retry_ms);
    let stall = Duration::from_millis(args.stall_ms);
    let mut blksize = 512usize;
    let mut windowsize = 1u64;
    let mut tid: Option<SocketAddr> = None;
    let mut next: u64 = 1; // next block index expected
    let mut in_window = 0u64;
    let mut repeat_acked = false; // one ACK per burst of repeats or gaps
    let mut last_progress = Instant::now();
    let mut buf = vec![0u8; 65536 + 4];
    let mut ack = Vec::with_capacity(4);

    if let Err(e) = socket.send_to(&rrq, args.server).await {
        return Ending::Failed(format!("send RRQ: {e}"));
    }
    result.rrq_sent = 1;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ending::CutByTimeLimit;
        }
        if now.duration_since(last_progress) >= stall {
            return Ending::Failed(format!("stalled at block {next} ({} bytes)", result.bytes));
        }
        let wait = retry.min(deadline - now);
        let received = tokio::time::timeout(wait, socket.recv_from(&mut buf)).await;
        let (len, from) = match received {
            Err(_) => {
                // Our timeout: repeat the last thing we said.
                let sent = match tid {
                    None => {
                        result.rrq_sent += 1;
                        socket.send_to(&rrq, args.server).await
                    }
                    Some(tid) => {
                        ack.clear();
                        packet::encode_ack(((next - 1) & 0xFFFF) as u16, &mut ack);
                        socket.send_to(&ack, tid).await
                    }
                };
                if let Err(e) = sent {
                    return Ending::Failed(format!("send: {e}"));
                }
                continue;
            }
            Ok(Err(e)) => return Ending::Failed(format!("receive: {e}")),
            Ok(Ok(received)) => received,
        };
        if from.ip() != args.server.ip() || tid.is_some_and(|t| t != from) {
            continue; // not our transfer
        }
        match Packet::parse(&buf[..len]) {
            Ok(Packet::Oack { options }) if tid.is_none() => {
                tid = Some(from);
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
                ack.clear();
                packet::encode_ack(0, &mut ack);
                if let Err(e) = socket.send_to(&ack, from).await {
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
                }
                let tid = tid.expect("set above");
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
                        ack.clear();
                        packet::encode_ack(block, &mut ack);
                        if let Err(e) = socket.send_to(&ack, tid).await {
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
                    if let Err(e) = socket.send_to(&ack, tid).await {
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

fn print_report(r: &Report) {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{label:<12} {file:<10} {clients:>5} clients {options:<26} {mb:>8.1} MB/s {tps:>9.1} xfer/s p50 {p50:>8} ms p99 {p99:>8} ms  ok {ok} failed {failed} cut {cut} rrq-retried {retried}",
        label = r.label,
        file = r.file,
        clients = r.clients,
        options = r.options,
        mb = r.goodput_mb_s,
        tps = r.transfers_per_s,
        p50 = ms(r.p50_ms),
        p99 = ms(r.p99_ms),
        ok = r.transfers_completed,
        failed = r.transfers_failed,
        cut = r.transfers_cut_by_time_limit,
        retried = r.first_requests_retried,
    );
    for failure in &r.failures {
        println!("    failure: {failure}");
    }
}
