//! bootfleet-loadtest — simulated boot clients.
//!
//! * `storm` ([`storm`]): thousands of simulated machines powered on at once,
//!   each walking the real boot chain — DHCP as PXE firmware and as iPXE
//!   (through a relay agent), the loader over TFTP, the chain script and the
//!   machine's own script over HTTP, its kernel and initrds — with every
//!   byte checked, and a report per phase (table, JSON, HTML chart).
//! * `tftp`: many concurrent TFTP clients fetching one file, each transfer on
//!   its own socket exactly as firmware does; the client of the TFTP
//!   side-by-side benchmark in `benches/`.
//!
//! Load is bounded: a fixed number of machines or transfers, a concurrency
//! limit, and a hard time limit. It goes to loopback or to a test namespace
//! only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

/// Thousands of simulated machines allocate and free small buffers and
/// DHCP option maps on two threads at once; glibc's allocator showed up as
/// 12% of the simulator's CPU in a 5,000-machine storm, mimalloc as far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bmc;
mod chart;
mod dhcp;
mod http;
mod ipxe;
mod panel;
mod storm;
mod tftp;

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
    /// Power on many simulated machines that walk the whole boot chain.
    Storm(storm::StormArgs),
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Storm(args) => {
            let json = args.json.clone();
            let chart = args.chart.clone();
            let report = storm::run(args)?;
            storm::print(&report);
            if let Some(path) = &json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if let Some(path) = &chart {
                std::fs::write(path, chart::html(&report))
                    .with_context(|| format!("cannot write {}", path.display()))?;
            }
            if report.booted < report.machines {
                std::process::exit(2);
            }
            Ok(())
        }
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
pub(crate) fn check_target(addr: &SocketAddr) -> Result<()> {
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
    let request = Rc::new(args.request());
    let args = Rc::new(args);
    let launched = Rc::new(std::cell::Cell::new(0u64));
    let local = tokio::task::LocalSet::new();
    let results = local
        .run_until(async {
            let mut handles = Vec::new();
            for _ in 0..args.clients {
                let args = Rc::clone(&args);
                let request = Rc::clone(&request);
                let expected = Rc::clone(&expected);
                let launched = Rc::clone(&launched);
                handles.push(tokio::task::spawn_local(async move {
                    let mut results = Vec::new();
                    while Instant::now() < deadline && launched.get() < args.max_transfers {
                        launched.set(launched.get() + 1);
                        results.push(tftp::get(&request, &expected, deadline).await);
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
        options: request.options_label(),
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
            tftp::Ending::Complete => {
                report.transfers_completed += 1;
                times.push(result.elapsed.as_secs_f64() * 1000.0);
            }
            tftp::Ending::Failed(why) => {
                report.transfers_failed += 1;
                if report.failures.len() < 10 {
                    report.failures.push(why.clone());
                }
            }
            tftp::Ending::CutByTimeLimit => report.transfers_cut_by_time_limit += 1,
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

impl TftpArgs {
    fn request(&self) -> tftp::Request {
        let local = if self.server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        tftp::Request {
            server: self.server,
            local: local.parse().expect("literal"),
            file: self.file.clone(),
            blksize: self.blksize,
            windowsize: self.windowsize,
            tsize: self.tsize,
            retry: Duration::from_millis(self.retry_ms),
            stall: Duration::from_millis(self.stall_ms),
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
