//! The `bootfleet` binary: command line, logging, start-up and shutdown.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{info, warn};

use bootfleet::app;
use bootfleet::config::{Config, EngineChoice};
use bootfleet::engine;
use bootfleet::engine::port_owner::Protocol;

mod cli;
mod systemd;

use cli::args::{
    AuditArgs, DbCommand, EventsArgs, FilesCommand, ImagesCommand, IpxeCommand, JobsCommand,
    MachinesCommand, PoolsCommand, PowerArgs, SettingsCommand, TokensCommand, UsersCommand,
};

/// Every request allocates a little (its parsed head, its response head, a
/// boot event); under a storm of script requests glibc's allocator was
/// about 10% of the HTTP worker's CPU (`perf`, 512 kept-alive connections),
/// mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Check a config file for what `serve` would refuse, and print the
    /// effective configuration (every key, defaults included) as TOML.
    CheckConfig {
        /// The TOML file to check.
        config: PathBuf,
    },
    /// Panel users (written straight into the inventory database).
    #[command(subcommand)]
    Users(UsersCommand),
    /// API tokens (written straight into the inventory database).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Machines, through the running server's API.
    #[command(subcommand)]
    Machines(MachinesCommand),
    /// Images, through the running server's API.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Pools: machines by list and label selector, and the image they
    /// boot, through the running server's API.
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// Boot events, oldest first; `--follow` keeps printing new ones
    /// (scope: read).
    Events(EventsArgs),
    /// The fleet at a glance: machines per state, and each server's
    /// health (scope: read).
    Fleet {
        #[command(flatten)]
        api: cli::args::ApiArgs,
    },
    /// The audit log: who changed what, when (scope: read).
    Audit(AuditArgs),
    /// Files in the boot directory, through the running server's API.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Server-wide settings, through the running server's API.
    #[command(subcommand)]
    Settings(SettingsCommand),
    /// Power machines on, off, cycle or reset through their BMCs, in
    /// waves, and watch them boot until their OS checks in (scope:
    /// assign).
    Power(PowerArgs),
    /// Power jobs: list, show, pause, resume, cancel.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// The inventory database: online backup, and restore.
    #[command(subcommand)]
    Db(DbCommand),
    /// iPXE built for this server (the write-up's methods 2 and 4).
    #[command(subcommand)]
    Ipxe(IpxeCommand),
    /// Print a shell completion script, e.g. `bootfleet completions bash >
    /// /etc/bash_completion.d/bootfleet`.
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (bootfleet.1 and one per subcommand) into DIR
    /// (the Debian package ships them).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
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
    /// HTTP listen address (scripts, kernels, initrds).
    #[arg(long, value_name = "ADDR:PORT")]
    http_listen: Option<SocketAddr>,
    /// How scripts name this server, e.g. http://10.0.0.1 (default: the
    /// Host header of each request).
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// DHCP service: off, proxy (boot answers beside another DHCP server) or full.
    #[arg(long, value_name = "off|proxy|full")]
    dhcp_mode: Option<bootfleet::config::DhcpMode>,
    /// Interface DHCP answers on (repeatable).
    #[arg(long = "dhcp-interface", value_name = "IFACE")]
    dhcp_interfaces: Vec<String>,
    /// Full mode: an address range (repeatable); the subnet is the interface's.
    #[arg(long = "dhcp-range", value_name = "FIRST-LAST")]
    dhcp_ranges: Vec<String>,
    /// Directory for state that survives restarts (one-shot assignments, DHCP leases).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Data-plane backend.
    #[arg(long, value_name = "auto|io-uring|epoll")]
    engine: Option<EngineChoice>,
    /// Data-plane worker threads (0: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, e.g. info or bootfleet=debug (RUST_LOG also works).
    #[arg(long)]
    log_level: Option<String>,
    /// Control panel and API address (default 127.0.0.1:9090), or "off" to
    /// serve the inventory file instead of the database.
    #[arg(long, value_name = "ADDR:PORT|off")]
    panel_listen: Option<String>,
}

/// Runs the command; an error is printed as one line (with its causes)
/// and chooses the exit status (`docs/cli.md`).
fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli.command.unwrap_or(Command::Serve(ServeArgs::default()))) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bootfleet: {error:#}");
            std::process::ExitCode::from(cli::exit_status(&error))
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { config } => check_config(&config),
        Command::Users(command) => cli::users(command),
        Command::Tokens(command) => cli::tokens(command),
        Command::Machines(command) => cli::api::machines(command),
        Command::Images(command) => cli::api::images(command),
        Command::Pools(command) => cli::api::pools(command),
        Command::Events(args) => cli::api::events(args),
        Command::Fleet { api } => cli::api::fleet(&api),
        Command::Audit(args) => cli::api::audit(args),
        Command::Files(command) => cli::api::files(command),
        Command::Settings(command) => cli::api::settings(command),
        Command::Power(args) => cli::api::power(args),
        Command::Jobs(command) => cli::api::jobs(command),
        Command::Db(command) => cli::db(command),
        Command::Ipxe(IpxeCommand::Build(args)) => cli::ipxe_build(args),
        Command::Ipxe(command) => cli::api::ipxe(command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "bootfleet",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpages { dir } => write_man_pages(&dir),
    }
}

/// `bootfleet.1`, and `bootfleet-SUB.1` for every subcommand (and theirs).
fn write_man_pages(dir: &std::path::Path) -> Result<()> {
    use clap::CommandFactory;
    fn write(command: clap::Command, name: String, dir: &std::path::Path) -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(command.clone().name(name.clone())).render(&mut page)?;
        std::fs::write(&path, page).with_context(|| format!("cannot write {}", path.display()))?;
        for sub in command.get_subcommands().filter(|c| !c.is_hide_set()) {
            write(sub.clone(), format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write(Cli::command(), "bootfleet".to_string(), dir)
}

/// `bootfleet check-config FILE`: the file must parse, and what `serve`
/// would fail on at start is reported too; the effective configuration
/// goes to standard output as TOML, the problems to standard error.
fn check_config(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path)?;
    print!("{}", config.to_toml());
    let problems = startup_problems(&config);
    if problems.is_empty() {
        return Ok(());
    }
    for problem in &problems {
        eprintln!("problem: {problem}");
    }
    bail!(
        "{} problem(s) in {} that `bootfleet serve` would fail on",
        problems.len(),
        path.display()
    )
}

/// What `serve` would fail on with `config`, beyond the file's syntax.
fn startup_problems(config: &Config) -> Vec<String> {
    use bootfleet::config::DhcpMode;
    let mut problems = Vec::new();
    if !config.root.is_dir() {
        problems.push(format!(
            "the boot directory {} does not exist (create it, or set root)",
            config.root.display()
        ));
    }
    if config.dhcp.mode != DhcpMode::Off {
        if config.dhcp.interfaces.is_empty() {
            let mode = if config.dhcp.mode == DhcpMode::Full {
                "full"
            } else {
                "proxy"
            };
            problems.push(format!(
                "dhcp.mode = \"{mode}\" needs dhcp.interfaces = [\"eth1\"] (the boot LAN's interfaces)"
            ));
        }
        for name in &config.dhcp.interfaces {
            if let Err(error) = bootfleet::engine::dhcp::interface(name) {
                problems.push(format!("dhcp.interfaces: {error}"));
            }
        }
    }
    if config.dhcp.mode == DhcpMode::Full && config.dhcp.ranges.is_empty() {
        problems.push("dhcp.mode = \"full\" needs dhcp.ranges = [\"FIRST-LAST\"]".to_string());
    }
    match (&config.panel.tls_cert, &config.panel.tls_key) {
        (Some(_), None) | (None, Some(_)) => problems
            .push("panel.tls_cert and panel.tls_key go together: set both, or neither".to_string()),
        (Some(cert), Some(key)) => {
            for (what, file) in [("panel.tls_cert", cert), ("panel.tls_key", key)] {
                if let Err(error) = std::fs::File::open(file) {
                    problems.push(format!("{what} {}: {error}", file.display()));
                }
            }
        }
        (None, None) => {}
    }
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        problems.push(format!("log.level {:?}: {error}", config.log_level));
    }
    problems
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
        config.http.listen = addr;
    }
    if let Some(url) = &args.public_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("--public-url {url:?} must start with http:// or https://");
        }
        config.http.public_url = Some(url.trim_end_matches('/').to_string());
    }
    if let Some(mode) = args.dhcp_mode {
        config.dhcp.mode = mode;
    }
    if !args.dhcp_interfaces.is_empty() {
        config.dhcp.interfaces = args.dhcp_interfaces.clone();
    }
    if !args.dhcp_ranges.is_empty() {
        config.dhcp.ranges = args
            .dhcp_ranges
            .iter()
            .map(|r| {
                bootfleet::config::parse_range(r).map_err(|e| anyhow::anyhow!("--dhcp-range: {e}"))
            })
            .collect::<Result<_>>()?;
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
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
    if let Some(listen) = &args.panel_listen {
        config.panel.listen = bootfleet::config::parse_panel_listen(listen)
            .map_err(|e| anyhow::anyhow!("--panel-listen: {e}"))?;
    }
    Ok(config)
}

fn init_logging(level: &str) {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter {filter:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    // Under systemd, lines go to journald with their priorities (warn is
    // 4, error 3: `journalctl -p warning -u bootfleet` shows failures).
    if systemd::logging_to_journal() {
        match tracing_journald::layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journald.with_syslog_identifier("bootfleet".into()))
                    .init();
                return;
            }
            Err(error) => eprintln!("cannot log to journald ({error}); logging to standard error"),
        }
    }
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: log files get plain text.
        .with_ansi(std::io::stdout().is_terminal())
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

    let passed = systemd::passed_sockets(config.panel.listen);
    let listener = match passed.tftp {
        Some(socket) => socket,
        None => tftp_socket(&config)?,
    };
    let http = match passed.http {
        Some(socket) => socket,
        None => bind_http(&config)?,
    };
    let (backend, fallback_reason) = engine::choose(config.engine)?;
    let workers = engine::worker_count(config.workers);
    let tftp_addr = listener.local_addr()?;
    let http_addr = http.local_addr()?;
    let panel = match (config.panel.listen, passed.panel) {
        (Some(_), Some(socket)) => Some(socket),
        (Some(addr), None) => Some(TcpListener::bind(addr).map_err(|e| {
            anyhow::anyhow!(
                "cannot bind the panel to {addr}: {e}{}; pass --panel-listen ADDR:PORT or --panel-listen off",
                held_by(&e, addr, Protocol::Tcp)
            )
        })?),
        (None, _) => None,
    };
    let running = app::start(&config, backend, listener, http, panel)?;
    let service = Arc::clone(&running.tftp);

    info!(
        version = env!("CARGO_PKG_VERSION"),
        root = %service.root().display(),
        files = count_files(service.root()),
        "bootfleet serving boot files"
    );
    info!(listen = %tftp_addr, "TFTP listening (RFC 1350, 2347-2349, 7440)");
    let chain = chain_urls(&config, http_addr).join(" ");
    if config.panel.listen.is_some() {
        info!(listen = %http_addr, %chain,
            "HTTP listening: files, /boot.ipxe, /boot/{{mac}}.ipxe (the API is on the panel's listener)");
    } else {
        info!(listen = %http_addr, %chain,
            "HTTP listening: files, /boot.ipxe, /boot/{{mac}}.ipxe, read-only /api/v1/events and /api/v1/discovered");
    }
    match &fallback_reason {
        Some(why) => {
            warn!(engine = %backend, workers, reason = %why, "io_uring unavailable, using the epoll fallback")
        }
        None => {
            info!(engine = %backend, workers, http_body = ?config.http.body, "data-plane engine chosen (TFTP and HTTP run on it)")
        }
    }

    systemd::ready(running.monitor());

    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    signals.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading the inventory");
                    running.router.refresh(true);
                }
            }
        }
        anyhow::Ok(())
    })?;
    info!("shutting down");
    systemd::stopping();
    running.stop();
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

/// The TFTP socket, bound here.
fn tftp_socket(config: &Config) -> Result<UdpSocket> {
    UdpSocket::bind(config.tftp.listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "cannot bind TFTP to {}: {e}. Ports below 1024 need root or CAP_NET_BIND_SERVICE: \
                 run as root, use systemd/bootfleet.service, or pass --tftp-listen 0.0.0.0:6969",
                config.tftp.listen
            )
        } else {
            anyhow::anyhow!(
                "cannot bind TFTP to {}: {e}{}",
                config.tftp.listen,
                held_by(&e, config.tftp.listen, Protocol::Udp)
            )
        }
    })
}

/// For an address in use, who holds it (another TFTP or DHCP server...).
fn held_by(error: &std::io::Error, address: SocketAddr, protocol: Protocol) -> String {
    if error.kind() != std::io::ErrorKind::AddrInUse {
        return String::new();
    }
    match bootfleet::engine::port_owner::port_owner(address, protocol) {
        Some(owner) => format!(" (held by {owner}: stop it, or give bootfleet another address)"),
        None => " (by a process this user cannot see; `ss -lntup` as root names it)".to_string(),
    }
}

/// The HTTP listener, bound here.
fn bind_http(config: &Config) -> Result<TcpListener> {
    app::http_listener(config.http.listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow::anyhow!(
                "cannot bind HTTP to {}: {e}. Ports below 1024 need root or CAP_NET_BIND_SERVICE: \
                 run as root, use systemd/bootfleet.service, or pass --http-listen 0.0.0.0:8080",
                config.http.listen
            )
        } else {
            anyhow::anyhow!(
                "cannot bind HTTP to {}: {e}{}",
                config.http.listen,
                held_by(&e, config.http.listen, Protocol::Tcp)
            )
        }
    })
}

/// The chain script's URL as machines will reach it: `public_url`, or the
/// listener's address, or for a wildcard listener one URL per address of
/// this host (loopback aside), since `http://0.0.0.0/` reaches nothing.
fn chain_urls(config: &Config, http: SocketAddr) -> Vec<String> {
    if let Some(url) = &config.http.public_url {
        return vec![format!("{url}/boot.ipxe")];
    }
    let port = match http.port() {
        80 => String::new(),
        port => format!(":{port}"),
    };
    let url = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V6(v6) => format!("http://[{v6}]{port}/boot.ipxe"),
        v4 => format!("http://{v4}{port}/boot.ipxe"),
    };
    if !http.ip().is_unspecified() {
        return vec![url(http.ip())];
    }
    let addresses: Vec<String> = nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter_map(|interface| {
                let address = interface.address?;
                let ip = std::net::IpAddr::V4(address.as_sockaddr_in()?.ip());
                (!ip.is_loopback()).then(|| url(ip))
            })
            .collect()
        })
        .unwrap_or_default();
    if addresses.is_empty() {
        vec![url(std::net::Ipv4Addr::LOCALHOST.into())]
    } else {
        addresses
    }
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
