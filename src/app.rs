//! Assembling a running server from a [`Config`] and bound sockets: the
//! inventory router, the TFTP and HTTP services, their engines and the
//! inventory watcher. `main` and the integration tests both start servers
//! through [`start`], so tests run exactly what operators run.

use std::net::{TcpListener, UdpSocket};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::info;

use crate::boot::Router;
use crate::cache::FileCache;
use crate::config::Config;
use crate::engine::multicast::MulticastHub;
use crate::engine::{self, Backend, ServerHandle, Shutdown};
use crate::server::http::{HttpService, HttpServiceConfig};
use crate::server::tftp::TftpService;

/// How often the inventory file is looked at for changes.
pub const INVENTORY_POLL: Duration = Duration::from_secs(1);

/// Why a server cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("boot directory {}", path.display())]
    Root {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the inventory must load at start-up; fix it or move it aside")]
    Inventory(#[source] crate::inventory::InventoryError),
    #[error(
        "DHCP mode {0:?} needs at least one interface (dhcp.interfaces or --dhcp-interface IFACE)"
    )]
    NoDhcpInterface(crate::config::DhcpMode),
    #[error(transparent)]
    DhcpInterface(#[from] engine::dhcp::InterfaceError),
    #[error(transparent)]
    Dhcp(#[from] crate::server::dhcp::service::DhcpSetupError),
    #[error("the control panel cannot start")]
    Panel(#[from] crate::panel::PanelStartError),
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[error("HTTPS cannot start")]
    Https(#[from] engine::https::HttpsError),
    /// A socket, ring or thread of the data plane.
    #[error("cannot start serving")]
    Io(#[from] std::io::Error),
}

/// A running server.
pub struct Running {
    pub backend: Backend,
    pub router: Arc<Router>,
    pub tftp: Arc<TftpService>,
    pub http: Arc<HttpService>,
    /// The DHCP service, unless DHCP is off.
    pub dhcp: Option<Arc<crate::server::dhcp::service::DhcpService>>,
    /// The control panel, when it was given a listener.
    pub panel: Option<crate::panel::Panel>,
    shutdown: Shutdown,
    tftp_handle: Option<ServerHandle>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts serving TFTP on `tftp` and HTTP on `http` with `backend`, and
/// the control panel on `panel` if given: the inventory then comes from the
/// database (`panel.database`), otherwise from the inventory file.
pub fn start(
    config: &Config,
    backend: Backend,
    tftp: UdpSocket,
    http: TcpListener,
    panel: Option<TcpListener>,
) -> Result<Running, StartError> {
    let root = canonical_root(config)?;
    let inventory_path = root.join(&config.inventory_file);
    let mut router =
        Router::new(&root, &inventory_path, &config.state_dir).map_err(StartError::Inventory)?;
    router.set_loader_files(config.dhcp.loader_files());
    let router = Arc::new(router);
    let mut cache = FileCache::new(config.cache_max_bytes);
    cache.remember_names_under(&root);
    // What the data plane never serves, even when the operator keeps it
    // under the boot directory; and no interrupted upload is left there.
    let private = crate::server::paths::private_paths([
        inventory_path.as_path(),
        config.state_dir.as_path(),
        database_path(config).as_path(),
    ]);
    crate::server::paths::remove_upload_leftovers(&root);
    let fallbacks = loader_fallbacks(config, &root);
    let (cache_for_ahead, private_for_ahead) = (cache.clone(), private.clone());
    let mut tftp_service = TftpService::new(&root, &config.tftp, cache.clone())?;
    tftp_service.set_private_paths(private.clone());
    tftp_service.set_loader_fallbacks(fallbacks.clone());
    tftp_service.add_generator(router.clone());
    tftp_service.add_observer(router.clone());
    let shutdown = Shutdown::new();
    let mut threads = Vec::new();
    if let Some(thread) = start_multicast(config, &tftp, &router, &mut tftp_service, &shutdown)? {
        threads.push(thread);
    }
    let tftp_service = Arc::new(tftp_service);
    let http_service = Arc::new(HttpService::new(
        &root,
        cache,
        Arc::clone(&router),
        HttpServiceConfig {
            public_url: config.http.public_url.clone(),
            serve_api: panel.is_none(),
            private,
            fallbacks,
            tls_port: config.http.tls.as_ref().map(|t| t.listen.port()),
        },
    ));

    let workers = engine::worker_count(config.workers);
    let tftp_handle = engine::spawn_tftp(
        backend,
        tftp,
        Arc::clone(&tftp_service),
        workers,
        shutdown.clone(),
    )?;
    let spawn_http = match backend {
        engine::Backend::IoUring => engine::http_uring::spawn,
        engine::Backend::Epoll => engine::http::spawn,
    };
    let http_address = http.local_addr()?;
    threads.extend(spawn_http(
        http,
        Arc::clone(&http_service),
        config.http.clone(),
        workers,
        shutdown.clone(),
    )?);

    threads.extend(start_https(config, &http_service, &shutdown)?);
    let dhcp = start_dhcp(config, &router, &shutdown, &mut threads)?;

    let data_plane = Arc::new(crate::panel::metrics::DataPlane {
        tftp: Some(Arc::clone(&tftp_service)),
        http: Some(Arc::clone(&http_service)),
        dhcp: dhcp.clone(),
        started: Default::default(),
    });
    let panel = match panel {
        Some(listener) => {
            let started = (listener, http_address);
            let (panel, thread) =
                start_panel(config, started, &router, &root, &data_plane, &shutdown)?;
            threads.push(thread);
            Some(panel)
        }
        None => None,
    };

    threads.push(watch_inventory(
        Arc::clone(&router),
        OpenAhead {
            root: root.clone(),
            private: private_for_ahead,
            cache: cache_for_ahead,
            loaders: config.dhcp.loader_files(),
        },
        shutdown.clone(),
    )?);
    if panel.is_none() {
        info!(inventory = %inventory_path.display(), "inventory watched for changes (or send SIGHUP)");
    }
    data_plane
        .started
        .store(true, std::sync::atomic::Ordering::Release);

    Ok(Running {
        backend,
        router,
        tftp: tftp_service,
        http: http_service,
        dhcp,
        panel,
        shutdown,
        tftp_handle: Some(tftp_handle),
        threads,
    })
}

/// Starts the RFC 2090 multicast sessions' thread when groups are
/// configured, and hands the hub to the TFTP service.
fn start_multicast(
    config: &Config,
    tftp: &UdpSocket,
    router: &Arc<Router>,
    tftp_service: &mut TftpService,
    shutdown: &Shutdown,
) -> std::io::Result<Option<JoinHandle<()>>> {
    let Some(multicast) = &config.tftp.multicast else {
        return Ok(None);
    };
    let local = match tftp.local_addr()?.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
    };
    let (hub, thread) = MulticastHub::start(
        multicast.clone(),
        local,
        config.tftp.timeout,
        config.tftp.max_retries,
        vec![router.clone()],
        shutdown.clone(),
    )?;
    tftp_service.set_multicast(hub);
    Ok(Some(thread))
}

/// The loaders served from the system (Debian's `ipxe`, and `shim-signed`
/// and `grub-efi-amd64-signed` for the Secure Boot chain) because the boot
/// directory has none of that name; each is said once at start.
fn loader_fallbacks(
    config: &Config,
    root: &std::path::Path,
) -> crate::server::paths::LoaderFallbacks {
    let mut fallbacks = crate::server::paths::LoaderFallbacks::find(
        root,
        &config.dhcp.loader_files(),
        &config.dhcp.boot.loader_dirs,
    );
    fallbacks.add_system_files(root, config.dhcp.boot.secure_boot_system_files());
    for (name, path) in fallbacks.iter() {
        info!(loader = %name, from = %path.display(),
            "the boot directory has no such loader; serving the system's copy (put a file of that name in the boot directory to override)");
    }
    fallbacks
}

/// Starts HTTPS beside HTTP when `[http] tls_listen` asks for it.
fn start_https(
    config: &Config,
    http_service: &Arc<HttpService>,
    shutdown: &Shutdown,
) -> Result<Option<JoinHandle<()>>, StartError> {
    let Some(tls) = &config.http.tls else {
        return Ok(None);
    };
    let server = engine::https::server_config(tls, &config.state_dir)?;
    let thread = engine::https::spawn(
        tls,
        &config.http,
        server,
        Arc::clone(http_service),
        shutdown.clone(),
    )?;
    Ok(Some(thread))
}

/// How long start-up waits for the shared lease table's first blocks.
const SHARED_LEASES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Starts the DHCP service and its engine thread, unless DHCP is off.
fn start_dhcp(
    config: &Config,
    router: &Arc<Router>,
    shutdown: &Shutdown,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Option<Arc<crate::server::dhcp::service::DhcpService>>, StartError> {
    if config.dhcp.mode == crate::config::DhcpMode::Off {
        return Ok(None);
    }
    if config.dhcp.interfaces.is_empty() {
        return Err(StartError::NoDhcpInterface(config.dhcp.mode));
    }
    let interfaces = config
        .dhcp
        .interfaces
        .iter()
        .map(|name| engine::dhcp::interface(name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut service = crate::server::dhcp::service::DhcpService::new(
        config.dhcp.clone(),
        &interfaces,
        Arc::clone(router),
        config.http.listen.port(),
        &config.state_dir,
    )?;
    // Several servers on one PostgreSQL database share one lease table.
    let shared = match (&config.database_url, config.dhcp.mode) {
        (Some(url), crate::config::DhcpMode::Full) => Some((
            service.share_leases(crate::store::shared_leases::BLOCK_SIZE),
            crate::store::shared_leases::SharedLeases::new(url, &config.panel.server_name()),
        )),
        _ => None,
    };
    let service = Arc::new(service);
    if let Some((requests, database)) = shared {
        let (keeper, ready) =
            engine::dhcp_share::spawn(Arc::clone(&service), requests, database, shutdown.clone())?;
        threads.push(keeper);
        match ready.recv_timeout(SHARED_LEASES_WAIT) {
            Ok(()) => info!(server = %config.panel.server_name(), "DHCP leases shared through the database"),
            Err(_) => tracing::warn!(
                "the shared DHCP lease table is not reachable yet; until it is, this server answers only for addresses in the blocks it held last time (its state directory's dhcp-blocks.json)"
            ),
        }
    }
    threads.push(engine::dhcp::spawn(
        Arc::clone(&service),
        interfaces,
        shutdown.clone(),
    )?);
    Ok(Some(service))
}

/// The boot directory, canonical (every path check compares with it).
fn canonical_root(config: &Config) -> Result<std::path::PathBuf, StartError> {
    config
        .root
        .canonicalize()
        .map_err(|source| StartError::Root {
            path: config.root.clone(),
            source,
        })
}

/// Opens the inventory database and starts the control panel on `listener`;
/// `http_address` is where this server's data plane listens (other servers
/// on the database copy image files from it).
fn start_panel(
    config: &Config,
    (listener, http_address): (TcpListener, std::net::SocketAddr),
    router: &Arc<Router>,
    root: &std::path::Path,
    data_plane: &Arc<crate::panel::metrics::DataPlane>,
    shutdown: &Shutdown,
) -> Result<(crate::panel::Panel, JoinHandle<()>), crate::panel::PanelStartError> {
    let database = database_location(config);
    // A database that cannot be opened (corrupt, unreadable, a server that
    // does not answer) takes the panel down, not the boot LAN: DHCP, TFTP
    // and HTTP go on with the inventory they have, and the panel says why.
    let store: Arc<dyn crate::store::InventoryStore> = match database.open() {
        Ok(store) => {
            info!(%database, "inventory database opened");
            Arc::from(store)
        }
        Err(error) => {
            let reason = format!(
                "inventory database {database} cannot be used: {error}; the data plane serves the inventory file's machines until it is repaired or restored from a backup and bootfleet restarted"
            );
            tracing::error!("{reason}");
            Arc::new(crate::store::unavailable::UnavailableStore::new(reason))
        }
    };
    // Where other servers on the database fetch image files from this one.
    let mut panel = config.panel.clone();
    panel.data_plane_url = config.http.public_url.clone().or_else(|| {
        (!http_address.ip().is_unspecified()).then(|| format!("http://{http_address}"))
    });
    crate::panel::start(
        &panel,
        store,
        Arc::clone(router),
        root,
        listener,
        Arc::clone(data_plane),
        crate::panel::power::PowerSetup {
            config: config.power.clone(),
            state_dir: config.state_dir.clone(),
            max_transfers: config.tftp.max_transfers,
            max_connections: config.http.max_connections,
        },
        shutdown.clone(),
    )
}

/// What the inventory watcher opens ahead of requests.
struct OpenAhead {
    root: std::path::PathBuf,
    private: Vec<std::path::PathBuf>,
    cache: FileCache,
    loaders: Vec<String>,
}

/// Looks at the inventory for changes until `shutdown`; each new snapshot
/// (from the file or the panel) has its boot files opened ahead of time
/// ([`crate::server::paths::open_ahead`]).
fn watch_inventory(
    router: Arc<Router>,
    ahead: OpenAhead,
    shutdown: Shutdown,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("bootfleet-inventory".into())
        .spawn(move || {
            let mut opened_for = None;
            while !shutdown.is_triggered() {
                let generation = router.snapshot().generation;
                if opened_for != Some(generation) {
                    opened_for = Some(generation);
                    let names: Vec<String> = router
                        .snapshot()
                        .boot_files
                        .keys()
                        .chain(&ahead.loaders)
                        .cloned()
                        .collect();
                    let opened = crate::server::paths::open_ahead(
                        &ahead.root,
                        &ahead.private,
                        &ahead.cache,
                        names,
                    );
                    tracing::debug!(opened, generation, "boot files opened ahead of requests");
                }
                std::thread::sleep(INVENTORY_POLL / 4);
                router.refresh(false);
            }
        })
}

impl Running {
    /// What a supervisor (the systemd watchdog and status thread) watches.
    pub fn monitor(&self) -> Monitor {
        Monitor {
            router: Arc::clone(&self.router),
            tftp: Arc::clone(&self.tftp),
            http: Arc::clone(&self.http),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Stops every engine and waits for them.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shutdown.trigger();
        if let Some(handle) = self.tftp_handle.take() {
            handle.join();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.router.sync_state();
    }
}

/// A running server's vital signs, for a supervisor thread.
pub struct Monitor {
    router: Arc<Router>,
    tftp: Arc<TftpService>,
    http: Arc<HttpService>,
    shutdown: Shutdown,
}

impl Monitor {
    /// Data-plane workers that have not shown a sign of life for longer
    /// than `allowed` (the systemd watchdog withholds its ping for them).
    pub fn silent_workers(&self, allowed: Duration) -> Vec<(String, Duration)> {
        self.shutdown.silent_workers(allowed)
    }

    /// The server is stopping.
    pub fn stopping(&self) -> bool {
        self.shutdown.is_triggered()
    }

    /// One line for `systemctl status`: machines, transfers, connections.
    pub fn status_line(&self) -> String {
        let machines = self.router.snapshot().machines.len();
        let tftp = self.tftp.stats();
        format!(
            "{machines} machines; {} TFTP transfers and {} HTTP connections open; {} TFTP transfers completed",
            tftp.active,
            self.http.stats.open_connections.get(),
            tftp.completed
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

/// The inventory database file of `config`.
pub fn database_path(config: &Config) -> std::path::PathBuf {
    config.state_dir.join(&config.panel.database)
}

/// Where the inventory is: `[database] url` when set, else the SQLite file.
pub fn database_location(config: &Config) -> crate::store::StoreLocation {
    match &config.database_url {
        Some(url) => crate::store::StoreLocation::Postgres(url.clone()),
        None => crate::store::StoreLocation::Sqlite(database_path(config)),
    }
}

/// A TCP listener with a deep accept queue (a power-on storm connects
/// hundreds of clients within milliseconds).
pub fn http_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
