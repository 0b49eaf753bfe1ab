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
    /// Power machines on, off, cycle or reset through their BMCs, in
    /// waves, and watch them boot until their OS checks in.
    Power(PowerArgs),
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

/// Where the inventory database is (as `serve` would find it).
#[derive(clap::Args)]
struct DatabaseArgs {
    /// The server's TOML config file (for its state directory and database).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The state directory (default: ./state, or the config's).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The database itself, overriding the two above: an SQLite file, or
    /// a postgres:// URL.
    #[arg(long, value_name = "FILE|URL")]
    database: Option<String>,
}

#[derive(Subcommand)]
enum UsersCommand {
    /// Create a user or set its password and scope; the password is read
    /// from standard input (one line).
    Add {
        name: String,
        /// read, assign or admin.
        #[arg(long, default_value = "admin")]
        scope: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// List users.
    List {
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Copy the inventory database into FILE while the server runs
    /// (SQLite's online backup: one consistent state), check the copy and
    /// print what it holds.
    Backup {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Replace the inventory database with the backup FILE (checked, and
    /// brought to this version's schema first). Stop bootfleet before, start
    /// it after: `systemctl stop bootfleet`.
    Restore {
        file: PathBuf,
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Copy a whole inventory into a new, empty database, and read it back
    /// to check it: from the SQLite file to PostgreSQL (or back). Each side
    /// is `sqlite:FILE` (or a plain path) or a postgres:// URL. Stop the
    /// servers that write the source first.
    Copy {
        #[arg(long, value_name = "FROM")]
        from: String,
        #[arg(long, value_name = "TO")]
        to: String,
    },
}

#[derive(Subcommand)]
enum IpxeCommand {
    /// Build iPXE with a script built in that fetches each machine's own
    /// script from this server by MAC address, needing no boot file from
    /// DHCP: undionly.kpxe, snponly.efi and ipxe.efi for PXE firmware to
    /// chainload (method 4: point dhcp.bios / dhcp.uefi_x64 at them) and
    /// NIC option ROMs to flash (method 2). From an iPXE source tree you
    /// have (`git clone https://github.com/ipxe/ipxe`): nothing is
    /// downloaded. The tree gets the multicast TFTP fix if it lacks it.
    /// Needs gcc, make, binutils, perl, liblzma-dev and mtools; the first
    /// build takes minutes, later ones seconds.
    Build(IpxeBuildArgs),
}

/// `bootfleet ipxe build`.
#[derive(clap::Args)]
struct IpxeBuildArgs {
    /// The iPXE source tree (its top directory or its src).
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// The server's TOML config (for its boot directory and HTTP port).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A server the script fetches from, e.g. http://10.0.0.1:8080;
    /// repeat for fallbacks, tried in order. Default:
    /// http://${next-server} with the config's HTTP port: whichever
    /// bootfleet answered DHCP.
    #[arg(long = "server", value_name = "URL")]
    servers: Vec<String>,
    /// Where the binaries go (default: ipxe/ in the boot directory, where
    /// HTTP and TFTP serve them and the panel's Images page lists them).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// What to build (repeatable): undionly.kpxe, ipxe.efi, snponly.efi,
    /// a NIC ROM by PCI vendor and device (8086100e.rom), or a path under
    /// src such as bin-arm64-efi/snponly.efi. Default: undionly.kpxe
    /// ipxe.efi snponly.efi 1af41000.rom (virtio-net).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
    /// Parallel compile jobs (default: one per core).
    #[arg(long)]
    jobs: Option<usize>,
    /// Leave the tree's tftp.c as it is (the binaries then drop multicast
    /// TFTP data, as every unfixed iPXE does).
    #[arg(long)]
    no_multicast_fix: bool,
    /// A PEM CA certificate the binaries trust for HTTPS, and only it
    /// (repeatable): bootfleet's own is https-ca.crt in its state
    /// directory once [http] tls_listen is set. With it, the default
    /// server is https://${next-server} on the config's HTTPS port, and
    /// BIOS builds get HTTPS too.
    #[arg(long = "trust", value_name = "PEM")]
    trust: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create an API token and print it (shown only this once).
    Add {
        name: String,
        /// read, assign or admin.
        #[arg(long, default_value = "read")]
        scope: String,
        /// The user the token acts for (recorded in the audit log).
        #[arg(long, default_value = "cli")]
        user: String,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// How to reach the running server's API.
#[derive(clap::Args)]
struct ApiArgs {
    /// The panel's URL.
    #[arg(long, env = "BOOTFLEET_URL", default_value = "http://127.0.0.1:9090")]
    url: String,
    /// An API token (`bootfleet tokens add NAME --scope assign`).
    #[arg(long, env = "BOOTFLEET_TOKEN", hide_env_values = true)]
    token: String,
}

#[derive(Subcommand)]
enum MachinesCommand {
    /// List machines with their state.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Assign an image to machines (adopting discovered ones).
    Assign {
        /// The image, or "none" to unassign.
        image: String,
        /// MAC addresses (any spelling).
        #[arg(required = true)]
        macs: Vec<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Forget a machine.
    Forget {
        mac: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Set a machine's BMC (or remove it with `--bmc none`).
    Set {
        mac: String,
        /// `ipmi://USER[:PASS]@HOST[:PORT]` or
        /// `redfish://USER[:PASS]@HOST[:PORT]/redfish/v1/Systems/ID`
        /// (`redfish+http://` without TLS, `?verify=false` for a
        /// self-signed certificate), or `none`.
        #[arg(long, value_name = "URL")]
        bmc: String,
        /// Read the BMC password from this file (first line) instead of
        /// the URL.
        #[arg(long, value_name = "FILE", conflicts_with = "bmc_password_stdin")]
        bmc_password_file: Option<PathBuf>,
        /// Read the BMC password from standard input (one line).
        #[arg(long)]
        bmc_password_stdin: bool,
        /// An IPMI BMC's K_g key (the BMC-wide key of IPMI 2.0 sessions),
        /// from this file (first line): its characters, or `0x` and hex
        /// digits.
        #[arg(long, value_name = "FILE")]
        bmc_kg_file: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `bootfleet power`.
#[derive(clap::Args)]
struct PowerArgs {
    /// on, off (hard), soft-off, cycle, reset or status.
    action: String,
    /// Machines (any MAC spelling).
    macs: Vec<String>,
    /// Every machine of this pool too.
    #[arg(long)]
    pool: Option<String>,
    /// Boot once from this device first (on, cycle, reset): none, pxe,
    /// uefi-pxe or uefi-http.
    #[arg(long, default_value = "pxe")]
    boot: String,
    /// `all` at once, `adaptive` (paced by the boot servers' load), or
    /// `SIZE/SECONDS` (fixed waves).
    #[arg(long, default_value = "adaptive")]
    waves: String,
    /// Seconds from power-on to check-in before a machine is failed
    /// (default: each machine's image's, else the server's).
    #[arg(long)]
    deadline: Option<u64>,
    /// Power-cycle once each machine that misses its deadline.
    #[arg(long)]
    retry_by_cycle: bool,
    /// Start the job and return (default: follow it to the end).
    #[arg(long)]
    no_wait: bool,
    #[command(flatten)]
    api: ApiArgs,
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// List images.
    List {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Register an image from files in the boot directory (or URLs).
    Add {
        name: String,
        #[arg(long)]
        kernel: String,
        /// Repeatable, in boot order.
        #[arg(long = "initrd")]
        initrds: Vec<String>,
        #[arg(long, default_value = "")]
        cmdline: String,
        /// http, tftp or multicast.
        #[arg(long, default_value = "http")]
        transport: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove an image no machine uses.
    Remove {
        name: String,
        #[command(flatten)]
        api: ApiArgs,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Serve(args) => serve(args),
        Command::CheckConfig { config } => check_config(&config),
        Command::Users(command) => cli::users(command),
        Command::Tokens(command) => cli::tokens(command),
        Command::Machines(command) => cli::machines(command),
        Command::Images(command) => cli::images(command),
        Command::Power(args) => cli::power(args),
        Command::Db(command) => cli::db(command),
        Command::Ipxe(IpxeCommand::Build(args)) => cli::ipxe_build(args),
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
