//! The `bootfleet` binary: command line, logging, start-up and shutdown.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use bootfleet::cache::FileCache;
use bootfleet::config::{Config, EngineChoice};
use bootfleet::engine::{self, Shutdown};
use bootfleet::server::tftp::TftpService;

#[derive(Parser)]
#[command(
    name = "bootfleet",
    version,
    about = "Network-boot server for fleets of diskless machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the boot LAN (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate a config file and print the resulting settings.
    CheckConfig {
        /// The TOML file to check.
        config: PathBuf,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML config file; flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Boot directory served over TFTP (default: ./boot, created if missing).
    #[arg(long)]
    root: Option<PathBuf>,
    /// TFTP listen address.
    #[arg(long, value_name = "ADDR:PORT")]
    tftp_listen: Option<SocketAddr>,
    /// HTTP listen address (reserved: the HTTP server is not built yet).
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<SocketAddr>,
    /// Data-plane backend.
    #[arg(long, value_name = "auto|io-uring|epoll")]
    engine: Option<EngineChoice>,
    /// Data-plane worker threads (0: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, e.g. info or bootfleet=debug (RUST_LOG also works).
    #[arg(long)]
    log_level: Option<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!("{config:#?}");
            Ok(())
        }
    }
}

fn build_config(args: &ServeArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(root) = &args.root {
        config.root = root.clone();
        config.root_is_default = false;
    }
    if let Some(addr) = args.tftp_listen {
        config.tftp.listen = addr;
    }
    if let Some(addr) = args.http_listen {
        config.http_listen = addr;
    }
    if let Some(engine) = args.engine {
        config.engine = engine;
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    if let Some(level) = &args.log_level {
        config.log_level = level.clone();
    }
    Ok(config)
}

fn init_logging(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn serve(args: ServeArgs) -> Result<()> {
    let config = build_config(&args)?;
    init_logging(&config.log_level);

    if config.root_is_default && !config.root.exists() {
        std::fs::create_dir_all(&config.root).with_context(|| {
            format!(
                "cannot create the default boot directory {}",
                config.root.display()
            )
        })?;
    }
    if !config.root.is_dir() {
        bail!(
            "boot directory {} does not exist or is not a directory; create it or pass --root DIR",
            config.root.display()
        );
    }

    let listener = tftp_socket(&config)?;
    let cache = FileCache::new(config.cache_max_bytes);
    let service = Arc::new(TftpService::new(&config.root, &config.tftp, cache)?);
    let (backend, fallback_reason) = engine::choose(config.engine)?;
    let workers = engine::worker_count(config.workers);

    info!(
        version = env!("CARGO_PKG_VERSION"),
        root = %service.root().display(),
        files = count_files(service.root()),
        "bootfleet serving boot files"
    );
    info!(listen = %listener.local_addr()?, "TFTP listening (RFC 1350, 2347-2349, 7440)");
    info!(listen = %config.http_listen, "HTTP reserved: the HTTP server is not part of this build yet");
    match &fallback_reason {
        Some(why) => {
            warn!(engine = %backend, workers, reason = %why, "io_uring unavailable, using the epoll fallback")
        }
        None => info!(engine = %backend, workers, "data-plane engine chosen"),
    }

    let shutdown = Shutdown::new();
    let handle = engine::spawn_tftp(
        backend,
        listener,
        Arc::clone(&service),
        workers,
        shutdown.clone(),
    )?;

    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    info!("shutting down");
    shutdown.trigger();
    handle.join();
    let stats = service.stats();
    info!(
        completed = stats.completed,
        failed = stats.failed,
        refused = stats.refused,
        bytes = stats.bytes_completed,
        "TFTP totals"
    );
    Ok(())
}

/// The TFTP socket: handed in by systemd socket activation (first fd), or bound here.
fn tftp_socket(config: &Config) -> Result<UdpSocket> {
    if let Some(socket) = systemd_socket() {
        return Ok(socket);
    }
    UdpSocket::bind(config.tftp.listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "cannot bind TFTP to {}: {e}. Ports below 1024 need root or CAP_NET_BIND_SERVICE: \
                 run as root, use systemd/bootfleet.service, or pass --tftp-listen 0.0.0.0:6969",
                config.tftp.listen
            )
        } else {
            anyhow::anyhow!("cannot bind TFTP to {}: {e}", config.tftp.listen)
        }
    })
}

/// sd_listen_fds(3): the first passed socket, if systemd passed any to us.
fn systemd_socket() -> Option<UdpSocket> {
    use std::os::fd::FromRawFd;
    let pid: u32 = std::env::var("LISTEN_PID").ok()?.parse().ok()?;
    let fds: u32 = std::env::var("LISTEN_FDS").ok()?.parse().ok()?;
    if pid != std::process::id() || fds < 1 {
        return None;
    }
    // SAFETY: systemd guarantees fd 3 is an open socket owned by us.
    Some(unsafe { UdpSocket::from_raw_fd(3) })
}

fn count_files(root: &std::path::Path) -> usize {
    fn walk(dir: &std::path::Path, depth: usize) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.file_type() {
                Ok(t) if t.is_dir() && depth < 8 => walk(&e.path(), depth + 1),
                Ok(t) if t.is_file() => 1,
                _ => 0,
            })
            .sum()
    }
    walk(root, 0)
}
