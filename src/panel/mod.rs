//! The control panel: the REST API under `/api/v1/` and the web panel,
//! on their own listener (`--panel-listen`, loopback by default), never on
//! the boot-LAN listeners.
//!
//! It runs on its own small tokio runtime so that nothing it does — a slow
//! database, a big upload — can hold up the data plane. Every change goes
//! to the [inventory store](crate::store) first, then a fresh snapshot is
//! built from the store and swapped into the router; the data plane never
//! waits on the database. Boot events flow the other way: the router's
//! live feed is written to the database in batches and forwarded to
//! browsers over server-sent events.

mod api;
pub mod auth;
mod extract;
mod image_watch;
pub mod metrics;
pub mod power;
mod replica;
mod tls;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::boot::events::{BootEvent, Phase};
use crate::boot::Router;
use crate::config::PanelConfig;
use crate::store::{
    snapshot_from_store, FileCheck, ImageRecord, InventoryStore, MachineRecord, StoreError,
};

pub use api::{openapi_paths, API_ROUTES};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An API error: a status and a message that says what to fix, sent as
/// `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        let status = match &error {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Database(_) => {
                warn!(%error, "inventory database error");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds),
            );
        }
        response
    }
}

/// Everything the panel's handlers share.
pub struct PanelState {
    pub store: Arc<dyn InventoryStore>,
    pub router: Arc<Router>,
    pub config: PanelConfig,
    /// The canonical boot directory (images and uploads live in it).
    pub root: PathBuf,
    pub limiter: auth::LoginLimiter,
    generation: AtomicU64,
    /// Whether cookies get `Secure` (the panel is served over TLS).
    pub tls: bool,
    /// The services `/metrics` reads and `/readyz` asks after.
    pub data_plane: Arc<metrics::DataPlane>,
    /// A snapshot built from the store has been installed in the router.
    pub snapshot_installed: std::sync::atomic::AtomicBool,
    /// Images whose files are missing, and the watch on their directories.
    pub image_health: Arc<image_watch::ImageHealth>,
    /// This server's name on the boot events it stores.
    pub server_name: String,
    /// BMCs, power jobs and check-ins.
    pub power: power::PowerService,
}

impl PanelState {
    /// Starts adding the check-in URL and tokens to kernel command lines,
    /// if booted machines can reach this panel (listening on `address`):
    /// at `[power] checkin_url`, else at the panel's own address when it is
    /// a specific non-loopback one, else (every address) at the host each
    /// machine booted from, on the panel's port.
    fn start_checkin(&self, address: SocketAddr, tls: bool) {
        use crate::boot::checkin::{Checkin, CheckinUrl};
        let Ok(key) = self.power.key() else {
            return;
        };
        let scheme = if tls { "https" } else { "http" };
        let url = match &self.power.config().checkin_url {
            Some(url) => CheckinUrl::Fixed(url.clone()),
            None if address.ip().is_unspecified() => CheckinUrl::SameHost {
                scheme,
                port: address.port(),
            },
            None if address.ip().is_loopback() => {
                info!("booted machines cannot reach the panel on loopback, so they do not check in and count as booted once their initrd is fetched; set [power] checkin_url (or panel.listen on a boot-LAN address) for check-ins");
                return;
            }
            None => CheckinUrl::Fixed(format!("{scheme}://{address}")),
        };
        info!(url = ?url, "kernel command lines carry a check-in URL and a per-boot token");
        self.router
            .set_checkin(Some(Checkin::new(key.clone(), url)));
    }

    /// How the panel reads machines' states: when a machine is stuck, and
    /// (when machines check in) how long it has to.
    pub fn view_rules(&self) -> ViewRules {
        let image_deadlines = match self.store.images() {
            Ok(images) => images
                .into_iter()
                .filter(|i| i.checkin_deadline_seconds > 0)
                .map(|i| (i.name, Duration::from_secs(i.checkin_deadline_seconds)))
                .collect(),
            Err(error) => {
                warn!(%error, "cannot read the images' check-in deadlines; the server's applies");
                Default::default()
            }
        };
        let pools = self.store.pools().unwrap_or_else(|error| {
            warn!(%error, "cannot read the pools; machines are shown with their own images only");
            Vec::new()
        });
        ViewRules {
            pools,
            stuck_after: self.config.stuck_after,
            checkin_deadline: self
                .router
                .checks_in()
                .then_some(self.power.config().checkin_deadline),
            image_deadlines,
        }
    }

    /// Rebuilds the data plane's snapshot from the store and installs it.
    pub fn publish(&self) -> Result<(), ApiError> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot = snapshot_from_store(&*self.store, generation)?;
        // An image another server registered goes live here only with
        // its files: until the image check copies them, its machines wait.
        image_watch::hold_back_images_not_here(self);
        // One-shot assignments used up through other servers.
        match self.store.one_shots_used() {
            Ok(used) => self.router.merge_used_one_shots(&used),
            Err(error) => warn!(%error, "used one-shot assignments not read from the database"),
        }
        self.router
            .install(snapshot)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        self.snapshot_installed.store(true, Ordering::Release);
        Ok(())
    }
}

/// This machine's host name, or "bootfleet" when it has none.
/// Rebuilds the data plane's snapshot whenever another server changes the
/// shared inventory, on a thread of its own until `shutdown`. A feed that
/// breaks (the database restarted) is opened again, and the snapshot is
/// rebuilt then, since changes may have been missed meanwhile.
fn follow_changes(
    state: Arc<PanelState>,
    mut listener: Box<dyn crate::store::ChangeListener>,
    shutdown: crate::shutdown::Shutdown,
) {
    let spawned = std::thread::Builder::new()
        .name("bootfleet-changes".into())
        .spawn(move || {
            while !shutdown.is_triggered() {
                match listener.wait(Duration::from_millis(500)) {
                    Ok(false) => {}
                    Ok(true) => {
                        if let Err(error) = state.publish() {
                            warn!(error = %error.message, "another server changed the inventory, but no snapshot could be built from it");
                        }
                    }
                    Err(error) => {
                        warn!(%error, "lost the inventory database's change feed; opening it again");
                        let Some(again) = reopen_changes(&state, &shutdown) else {
                            return;
                        };
                        listener = again;
                    }
                }
            }
        });
    if let Err(error) = spawned {
        warn!(%error, "no thread to follow the inventory database's changes");
    }
}

/// A new change feed, once the database answers again (tried every
/// second), with the snapshot rebuilt; `None` at shutdown.
fn reopen_changes(
    state: &PanelState,
    shutdown: &crate::shutdown::Shutdown,
) -> Option<Box<dyn crate::store::ChangeListener>> {
    while !shutdown.is_triggered() {
        std::thread::sleep(Duration::from_secs(1));
        if let Ok(Some(listener)) = state.store.change_listener() {
            match state.publish() {
                Ok(()) => info!("the inventory database's change feed is back; snapshot rebuilt"),
                Err(error) => {
                    warn!(error = %error.message, "change feed back, but no snapshot could be built")
                }
            }
            return Some(listener);
        }
    }
    None
}

/// A machine with the state the panel shows.
#[derive(Debug, Clone, Serialize)]
pub struct MachineView {
    #[serde(flatten)]
    pub machine: MachineRecord,
    /// discovered, local, unassigned, assigned, dhcp, loader, chain,
    /// script, loader-config, kernel, initrd, booted or failed.
    pub state: &'static str,
    /// Not booted, and nothing happened for `stuck_after_seconds`.
    pub stuck: bool,
    /// For a failed machine, where and why: `failed at kernel: 404 (file
    /// not found)`.
    pub failure: Option<String>,
    /// Its BMC's URL, without the password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bmc: Option<String>,
    /// Which rule gives it the `image` it boots: `machine` (its own
    /// assignment, which wins; `machine, pinned to revision N` when pinned)
    /// or `pool NAME` (the first pool by name with an image that contains
    /// it); `None` with no image.
    pub image_from: Option<String>,
}

/// What a machine's state is read by.
#[derive(Debug, Clone, Default)]
pub struct ViewRules {
    /// Not booted, and nothing happened for this long: stuck.
    pub stuck_after: Duration,
    /// `Some`: "booted" means checked in, and a machine past its kernel
    /// fetch has this long to; `None`: booted once its initrd is fetched.
    pub checkin_deadline: Option<Duration>,
    /// Images with a deadline of their own (`checkin_deadline_seconds`).
    pub image_deadlines: std::collections::HashMap<String, Duration>,
    /// The pools, for the machines that boot a pool's image.
    pub pools: Vec<crate::store::PoolRecord>,
}

impl ViewRules {
    /// The check-in deadline of a machine booting `image`.
    pub fn deadline_for(&self, image: Option<&str>) -> Option<Duration> {
        let own = image.and_then(|name| self.image_deadlines.get(name));
        self.checkin_deadline
            .map(|default| own.copied().unwrap_or(default))
    }
}

/// The state of a machine at `now_ms`.
pub fn machine_view(mut machine: MachineRecord, now_ms: u64, rules: &ViewRules) -> MachineView {
    let image_from = match crate::store::image_pool(&rules.pools, &machine) {
        Some(pool) => {
            machine.image = pool.image.clone();
            Some(format!("pool {}", pool.name))
        }
        None => machine
            .image
            .is_some()
            .then(|| match machine.image_revision {
                Some(revision) => format!("machine, pinned to revision {revision}"),
                None => "machine".to_string(),
            }),
    };
    let deadline = rules.deadline_for(machine.image.as_deref());
    let quiet_for = now_ms.saturating_sub(machine.phase_ms.unwrap_or(now_ms));
    // Past its kernel fetch, a machine checking in is waiting for its OS:
    // not stuck (a kernel without an initrd, a slow boot) until its
    // deadline, then failed at the phase it was last seen at.
    let waiting_for_os = matches!(machine.phase.as_deref(), Some("kernel" | "initrd"));
    let missed_checkin = deadline
        .filter(|_| waiting_for_os && machine.phase_status.is_none_or(|s| s < 400))
        .is_some_and(|deadline| quiet_for > deadline.as_millis() as u64);
    let (state, in_progress) = if !machine.adopted {
        ("discovered", false)
    } else if !machine.netboot {
        ("local", false)
    } else {
        match (machine.phase.as_deref(), machine.phase_status) {
            (None, _) if machine.image.is_none() => ("unassigned", false),
            (None, _) => ("assigned", false),
            (Some(_), Some(status)) if status >= 400 => ("failed", false),
            (Some("checkin"), _) => ("booted", false),
            (Some("initrd"), _) if deadline.is_none() => ("booted", false),
            _ if missed_checkin => ("failed", false),
            (Some(phase), _) => (
                Phase::NAMES
                    .iter()
                    .find(|p| **p == phase)
                    .copied()
                    .unwrap_or("script"),
                !(waiting_for_os && deadline.is_some()),
            ),
        }
    };
    let stuck =
        (in_progress || state == "failed") && quiet_for > rules.stuck_after.as_millis() as u64;
    let failure = match (state, machine.phase.as_deref(), machine.phase_status) {
        ("failed", Some(phase), _) if missed_checkin => Some(format!(
            "failed at {phase}: its OS did not check in within {} s",
            deadline.unwrap_or_default().as_secs()
        )),
        ("failed", Some("power"), Some(_)) => {
            Some("failed at power: its BMC did not do it (the machine's events say why)".into())
        }
        ("failed", Some(phase), Some(status)) => Some(format!(
            "failed at {phase}: {status} ({})",
            crate::boot::events::failure_cause(status)
        )),
        _ => None,
    };
    MachineView {
        machine,
        state,
        stuck,
        failure,
        bmc: None,
        image_from,
    }
}

/// Size and SHA-256 of an image's local boot files.
pub fn check_files(root: &Path, image: &ImageRecord) -> Result<Vec<FileCheck>, String> {
    let mut checks = Vec::new();
    for path in std::iter::once(&image.kernel).chain(&image.initrds) {
        if crate::inventory::is_url(path) {
            continue;
        }
        // The same resolution as the data plane's: a symbolic link out of
        // the boot directory is refused, not followed and checksummed.
        let full = crate::server::paths::resolve_inside(root, path).map_err(|e| match e {
            crate::server::paths::ResolveError::Outside => format!(
                "boot file {path:?} is a symbolic link that leads outside the boot directory"
            ),
            _ => format!("boot file {path:?}: not found (upload it first, or give a path inside the boot directory)"),
        })?;
        let mut file = std::fs::File::open(&full).map_err(|e| {
            format!("boot file {path:?}: {e} (upload it first, or give a path inside the boot directory)")
        })?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("boot file {path:?} is not a regular file"));
        }
        let sha256 = replica::sha256_of(&mut file).map_err(|e| format!("{path}: {e}"))?;
        checks.push(FileCheck {
            path: path.clone(),
            size: meta.len(),
            sha256,
            mtime_ms: mtime_ms(&meta),
        });
    }
    Ok(checks)
}

pub(crate) fn mtime_ms(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64)
}

/// A running panel.
pub struct Panel {
    pub state: Arc<PanelState>,
    pub address: SocketAddr,
}

/// Why the panel cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PanelStartError {
    #[error("cannot import the inventory file into the empty inventory database")]
    Import(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot start the panel's listener or runtime")]
    Io(#[from] std::io::Error),
}

/// Opens the store, imports `inventory.toml` into an empty database,
/// installs the database's snapshot in `router`, and serves the panel on
/// `listener` until `shutdown`. Returns the thread running it.
// Eight parts the process wires together once; a struct for them would
// only rename the list.
#[allow(clippy::too_many_arguments)]
pub fn start(
    config: &PanelConfig,
    store: Arc<dyn InventoryStore>,
    router: Arc<Router>,
    root: &Path,
    listener: TcpListener,
    data_plane: Arc<metrics::DataPlane>,
    power: power::PowerSetup,
    shutdown: crate::shutdown::Shutdown,
) -> Result<(Panel, std::thread::JoinHandle<()>), PanelStartError> {
    // A database that fails here is reported, not fatal: the data plane
    // keeps the snapshot it has, and every API call says what is wrong.
    let empty = match (store.images(), store.machines()) {
        (Ok(images), Ok(machines)) => images.is_empty() && machines.is_empty(),
        (Err(error), _) | (_, Err(error)) => {
            error!(%error, "cannot read the inventory database; the data plane keeps serving the inventory it has");
            false
        }
    };
    let power = power::PowerService::new(power)?;
    let file_snapshot = router.snapshot();
    if empty && (!file_snapshot.images.is_empty() || !file_snapshot.machines.is_empty()) {
        let (images, machines) = crate::store::import_snapshot(
            &*store,
            &file_snapshot,
            "import:inventory.toml",
            power.key().ok(),
        )?;
        info!(images, machines, file = %router.inventory_path().display(),
            "imported the inventory file into the empty inventory database; edit the inventory in the panel from now on");
    }
    drop(file_snapshot);
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let state = Arc::new(PanelState {
        store,
        router,
        config: config.clone(),
        root: root.to_path_buf(),
        limiter: auth::LoginLimiter::default(),
        generation: AtomicU64::new(1_000_000),
        tls: tls.is_some(),
        data_plane,
        snapshot_installed: std::sync::atomic::AtomicBool::new(false),
        image_health: Arc::default(),
        server_name: config.server_name(),
        power,
    });
    if let Err(error) = state.publish() {
        error!(error = %error.message, "inventory database: no snapshot from it; the data plane keeps serving the inventory it has");
    }
    match state.store.change_listener() {
        Ok(Some(listener)) => follow_changes(Arc::clone(&state), listener, shutdown.clone()),
        Ok(None) => {}
        Err(error) => {
            warn!(%error, "cannot follow the inventory database's changes; changes other servers make reach this one only when it restarts")
        }
    }
    match state.store.users() {
        Ok(users) if users.is_empty() => {
            warn!("the panel has no users yet; create the first administrator with `bootfleet users add NAME` (password on standard input)");
        }
        Ok(_) => {}
        Err(error) => warn!(%error, "cannot read the panel's users"),
    }
    listener.set_nonblocking(true)?;
    let metrics_listener = bind_metrics(config)?;
    let address = listener.local_addr()?;
    state.start_checkin(address, tls.is_some());
    info!(panel = %format!("{}://{address}/", if tls.is_some() { "https" } else { "http" }),
        "control panel and API listening");
    let thread = spawn_panel(
        Arc::clone(&state),
        listener,
        metrics_listener,
        tls,
        shutdown,
    )?;
    Ok((Panel { state, address }, thread))
}

/// `panel.metrics_listen`, bound now so that a bad address stops the start.
fn bind_metrics(config: &PanelConfig) -> std::io::Result<Option<TcpListener>> {
    let Some(address) = config.metrics_listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(address).map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("cannot bind panel.metrics_listen {address}: {error}"),
        )
    })?;
    listener.set_nonblocking(true)?;
    info!(%address, "/metrics, /healthz and /readyz listening");
    Ok(Some(listener))
}

/// The panel's own runtime on its own thread: the API and web panel on
/// `listener`, the metrics listener, the event writer and housekeeping.
fn spawn_panel(
    state: Arc<PanelState>,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: crate::shutdown::Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bootfleet-panel")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("bootfleet-panel".into())
        .spawn(move || {
            runtime.block_on(async move {
                tokio::spawn(write_events(Arc::clone(&state)));
                tokio::spawn(housekeeping(Arc::clone(&state)));
                if let Some(listener) = metrics_listener {
                    let stopping = shutdown.clone();
                    tokio::spawn(metrics::serve(Arc::clone(&state), listener, async move {
                        stopping.wait().await
                    }));
                }
                let app = api::routes(Arc::clone(&state));
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        warn!(%error, "panel listener unusable");
                        return;
                    }
                };
                let stop = async move {
                    while !shutdown.is_triggered() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                let service = app.into_make_service_with_connect_info::<tls::PeerAddr>();
                let served = match tls {
                    Some(acceptor) => {
                        axum::serve(tls::TlsListener::new(listener, acceptor), service)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                    None => {
                        axum::serve(listener, service)
                            .with_graceful_shutdown(stop)
                            .await
                    }
                };
                if let Err(error) = served {
                    warn!(%error, "panel stopped");
                }
            });
            runtime.shutdown_timeout(Duration::from_secs(1));
        })?;
    Ok(thread)
}

/// Writes the router's boot events to the database in batches, and
/// remembers every machine that asked for its script (discovery).
async fn write_events(state: Arc<PanelState>) {
    let mut feed = state.router.events.subscribe();
    // A database that keeps failing (a full disk, a database server that
    // went away) is said once a minute, not every 100 ms.
    let mut failures = FailureLog::default();
    // Events not written yet: they go first with the next batch, so that
    // the database catches up when it is back.
    let mut backlog: Vec<BootEvent> = Vec::new();
    loop {
        let mut batch: Vec<BootEvent> = std::mem::take(&mut backlog);
        if batch.is_empty() {
            match feed.recv().await {
                Some(event) => batch.push(event),
                None => return,
            }
        } else {
            // Events wait for the database: try again every few seconds
            // even when nothing new happens.
            match tokio::time::timeout(EVENT_RETRY, feed.recv()).await {
                Ok(Some(event)) => batch.push(event),
                Ok(None) => return,
                Err(_) => {}
            }
        }
        // Gather what else arrives within 100 ms into one transaction.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(100);
        while batch.len() < 2000 {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Some(event)) => batch.push(event),
                _ => break,
            }
        }
        // Machines that asked for a script (latest per machine), with the
        // facts the router remembers.
        let mut seen: std::collections::HashMap<crate::proto::Mac, u64> = Default::default();
        for event in &batch {
            if let (Phase::Script | Phase::Chain, Some(mac)) = (event.phase, event.mac) {
                seen.insert(mac, event.at_ms);
            }
        }
        let state = Arc::clone(&state);
        let batch = Arc::new(batch);
        let attempt = Arc::clone(&batch);
        let written = tokio::task::spawn_blocking(move || {
            let batch = attempt;
            // Only machines the router remembers: it refuses new MACs from
            // an address that makes them up faster than machines boot.
            let seen: Vec<crate::store::SeenNote> = seen
                .into_iter()
                .filter_map(|(mac, at_ms)| {
                    let facts = state.router.seen_machine(mac)?.facts;
                    Some((mac, facts, at_ms))
                })
                .collect();
            state.store.note_events(&batch, &seen, &state.server_name)?;
            // One-shot assignments used up here (a kernel fetch, so with
            // this batch's events): the other servers are told.
            let used = state.router.take_newly_used_one_shots();
            if !used.is_empty() {
                if let Err(error) = state.store.note_one_shots_used(&used) {
                    warn!(%error, "used one-shot assignments not stored yet; tried again with the next events");
                    state.router.keep_newly_used_one_shots(used);
                }
            }
            // The events are stored: a failure from here on must not keep
            // them for another try (they would be stored twice).
            if !seen.is_empty() {
                match state.store.prune_discovered(state.config.max_discovered) {
                    Ok(0) => {}
                    Ok(forgotten) => info!(forgotten, keep = state.config.max_discovered,
                        "discovered machines over panel.max_discovered; the least recently seen were forgotten"),
                    Err(error) => warn!(%error, "discovered machines not pruned; tried again with the next batch"),
                }
            }
            Ok::<(), crate::store::StoreError>(())
        })
        .await;
        let failed = match written {
            Ok(Err(error)) => Some(error.to_string()),
            Err(error) => Some(error.to_string()),
            Ok(Ok(())) => None,
        };
        match failed {
            None => failures.succeeded(),
            Some(error) => {
                backlog = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
                let lost = backlog.len().saturating_sub(MAX_EVENT_BACKLOG);
                backlog.drain(..lost);
                failures.failed(&error, backlog.len(), lost);
            }
        }
    }
}

/// Boot events kept for a database that is away, newest kept: enough for
/// a storm of 10,000 machines, each with its half-dozen phases.
const MAX_EVENT_BACKLOG: usize = 100_000;

/// How often kept events are offered to a database that was away.
const EVENT_RETRY: Duration = Duration::from_secs(2);

/// Logs a repeating failure once a minute instead of every time.
#[derive(Default)]
struct FailureLog {
    last_logged: Option<std::time::Instant>,
    /// Events dropped from the backlog since the last report.
    lost: usize,
    /// The last attempt failed.
    failing: bool,
}

impl FailureLog {
    /// A write failed; `waiting` events are kept for the next attempt and
    /// `lost` more were dropped (the backlog was full).
    fn failed(&mut self, error: &str, waiting: usize, lost: usize) {
        self.failing = true;
        self.lost += lost;
        // Due once a minute, also across brief recoveries (a nearly full
        // disk lets a small batch through now and then).
        let due = self
            .last_logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            warn!(%error, waiting, lost_since_last_report = self.lost,
                "boot events not stored in the inventory database yet (kept, and written when it answers; the data plane goes on serving)");
            self.last_logged = Some(std::time::Instant::now());
            self.lost = 0;
        }
    }

    fn succeeded(&mut self) {
        if std::mem::take(&mut self.failing) {
            info!(
                lost_unreported = self.lost,
                "boot events are stored again, those kept meanwhile included"
            );
            self.lost = 0;
        }
    }
}

/// Periodic work: re-checking image files that changed on disk, and
/// dropping events older than the retention.
async fn housekeeping(state: Arc<PanelState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.image_health.changed.notified() => {
                // A file written in pieces settles first.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let state = Arc::clone(&state);
        let _ = tokio::task::spawn_blocking(move || {
            let retention = state.config.event_retention.as_millis() as u64;
            if let Err(error) = state.store.prune_events(now_ms().saturating_sub(retention)) {
                warn!(%error, "old boot events not pruned");
            }
            image_watch::recheck_image_files(&state);
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Mac;

    fn machine(image: &str, phase: &str, phase_ms: u64) -> MachineRecord {
        MachineRecord {
            image: Some(image.into()),
            phase: Some(phase.into()),
            phase_ms: Some(phase_ms),
            phase_status: Some(200),
            ..MachineRecord::new(Mac([2, 0, 0, 0, 0, 1]))
        }
    }

    #[test]
    fn booted_means_checked_in_within_the_images_deadline() {
        let rules = ViewRules {
            stuck_after: Duration::from_secs(120),
            checkin_deadline: Some(Duration::from_secs(600)),
            image_deadlines: [("slow".to_string(), Duration::from_secs(3600))].into(),
            pools: Vec::new(),
        };
        let minute = 60_000;
        // Past its kernel or initrd, a machine waits for its OS: not stuck.
        let waiting = machine_view(machine("fast", "kernel", 0), 5 * minute, &rules);
        assert_eq!((waiting.state, waiting.stuck), ("kernel", false));
        // Past the server's deadline: failed at its last phase.
        let late = machine_view(machine("fast", "initrd", 0), 11 * minute, &rules);
        assert_eq!(late.state, "failed");
        assert_eq!(
            late.failure.as_deref(),
            Some("failed at initrd: its OS did not check in within 600 s")
        );
        // An image with a longer deadline of its own is still waited for.
        let slow = machine_view(machine("slow", "initrd", 0), 11 * minute, &rules);
        assert_eq!((slow.state, slow.stuck), ("initrd", false));
        let checked = machine_view(machine("fast", "checkin", 0), 11 * minute, &rules);
        assert_eq!(checked.state, "booted");
        // Without check-ins (a panel machines cannot reach), the initrd is booted.
        let old = ViewRules {
            checkin_deadline: None,
            ..rules
        };
        assert_eq!(
            machine_view(machine("fast", "initrd", 0), 11 * minute, &old).state,
            "booted"
        );
    }
}
