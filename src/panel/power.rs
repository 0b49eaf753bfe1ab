//! The panel's side of power control: machines' BMCs set and shown (never
//! their passwords), power jobs started, watched, paused and cancelled, and
//! the check-in endpoint booted machines call.
//!
//! `PUT /api/v1/machines/{mac}/bmc` (admin) takes `{"url": "redfish://…",
//! "password": "…"}`; the password is sealed with the key file before it
//! reaches the store. `POST /api/v1/power` (assign) takes machines or a
//! pool, an action, a one-time boot device and a pacing, and answers with
//! the job; `GET /api/v1/power/jobs/{id}` follows it, and
//! `POST /api/v1/power/jobs/{id}/{pause,resume,cancel}` steers it.
//! `POST /api/v1/checkin` needs no login: the per-boot token is the proof.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use serde::Deserialize;
use serde_json::json;
use tracing::{info, warn};

use super::extract::{blocking, parse_json, parse_mac, Admin, Assigner, Auth, Reader};
use super::{ApiError, PanelState};
use crate::boot::events::{BootEvent, Phase};
use crate::inventory::bmc::{check_kg_for, check_secret, parse_bmc_url, parse_kg_key};
use crate::power::dispatch::Dispatcher;
use crate::power::headroom::{DataPlaneSample, Headroom};
use crate::power::waves::{self, Fleet, Job, JobSpec, JobStatus, SeenPhase};
use crate::power::{Credentials, Limits, Outcome, PowerAction, PowerError};
use crate::proto::Mac;
use crate::seal::SealKey;
use crate::store::{bmc_kg_aad, bmc_password_aad, BmcRecord};

type Shared = State<Arc<PanelState>>;
type ApiResult = Result<Response, ApiError>;

/// What power control needs from the server's configuration.
#[derive(Debug, Clone)]
pub struct PowerSetup {
    pub config: crate::config::PowerConfig,
    pub state_dir: std::path::PathBuf,
    /// The data plane's limits the load is measured against.
    pub max_transfers: usize,
    pub max_connections: usize,
}

/// Power control as the panel runs it.
pub struct PowerService {
    /// `Err`: why BMC passwords cannot be sealed or opened (no key file).
    key: Result<SealKey, String>,
    dispatcher: Arc<Dispatcher>,
    limits: Limits,
    jobs: Mutex<Vec<Arc<Job>>>,
    next_job: AtomicU64,
    setup: PowerSetup,
}

/// Jobs kept for the panel to show (the oldest ended ones go first).
const KEPT_JOBS: usize = 50;

impl PowerService {
    /// Loads (or creates) the key file and starts the BMC threads; a key
    /// that cannot be loaded is logged, and every BMC call then says why.
    pub fn new(setup: PowerSetup) -> std::io::Result<Self> {
        let path = if setup.config.key_file.is_relative() {
            setup.state_dir.join(&setup.config.key_file)
        } else {
            setup.config.key_file.clone()
        };
        let key = SealKey::load_or_create(&path).map_err(|error| {
            warn!(%error, "BMC passwords cannot be sealed or opened, and machines cannot check in");
            error.to_string()
        });
        let ca_certificates = match &setup.config.ca_file {
            Some(file) => match std::fs::read(file) {
                Ok(pem) => vec![pem],
                Err(error) => {
                    warn!(file = %file.display(), %error, "cannot read [power] ca_file; Redfish BMCs are checked against the public roots");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        Ok(Self {
            key,
            dispatcher: Arc::new(Dispatcher::new(setup.config.concurrency)?),
            limits: Limits {
                timeout: setup.config.timeout,
                ca_certificates,
            },
            jobs: Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            setup,
        })
    }

    /// The key, or why there is none.
    pub fn key(&self) -> Result<&SealKey, ApiError> {
        self.key.as_ref().map_err(|why| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("power control: {why}"),
            )
        })
    }

    fn job(&self, id: u64) -> Result<Arc<Job>, ApiError> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|job| job.id == id)
            .cloned()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no power job {id}")))
    }

    /// Every job kept, newest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        jobs.reverse();
        jobs
    }

    /// The `[power]` settings.
    pub fn config(&self) -> &crate::config::PowerConfig {
        &self.setup.config
    }

    fn keep(&self, job: Arc<Job>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.push(job);
        while jobs.len() > KEPT_JOBS {
            match jobs.iter().position(|job| job.ended()) {
                Some(oldest) => drop(jobs.remove(oldest)),
                None => break,
            }
        }
    }
}

/// The fleet as a power job sees it: BMCs from the store, boot phases
/// from the machines' records, load from the data plane.
struct PanelFleet {
    state: Weak<PanelState>,
    /// The BMC table as last read, and when: a wave of a thousand machines
    /// reads it once, not once per machine; a change is seen within
    /// [`BMCS_FRESH_FOR`].
    bmcs: Mutex<Option<(std::time::Instant, Arc<BmcsByMac>)>>,
    /// The data plane's limits and the drain rate this job has measured.
    headroom: Headroom,
}

type BmcsByMac = HashMap<Mac, BmcRecord>;

/// How long a job reuses the BMC table it read.
const BMCS_FRESH_FOR: Duration = Duration::from_secs(5);

impl PanelFleet {
    /// Every BMC by MAC, read again when older than [`BMCS_FRESH_FOR`].
    fn bmcs(&self, state: &PanelState) -> Result<Arc<BmcsByMac>, PowerError> {
        let mut cached = self.bmcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bmcs)) = cached
            .as_ref()
            .filter(|(at, _)| at.elapsed() < BMCS_FRESH_FOR)
        {
            return Ok(Arc::clone(bmcs));
        }
        let bmcs: Arc<BmcsByMac> = Arc::new(
            state
                .store
                .bmcs()
                .map_err(|error| PowerError::Setup(error.to_string()))?
                .into_iter()
                .map(|bmc| (bmc.mac, bmc))
                .collect(),
        );
        *cached = Some((std::time::Instant::now(), Arc::clone(&bmcs)));
        Ok(bmcs)
    }

    fn state(&self) -> Result<Arc<PanelState>, PowerError> {
        self.state
            .upgrade()
            .ok_or_else(|| PowerError::Setup("the panel is shutting down".into()))
    }
}

impl Fleet for PanelFleet {
    fn credentials(&self, mac: Mac) -> Result<Credentials, PowerError> {
        let state = self.state()?;
        let setup = PowerError::Setup;
        let bmc = self.bmcs(&state)?.get(&mac).cloned().ok_or_else(|| {
            setup(format!(
                "{mac} has no BMC; set one with `bootfleet machines set {mac} --bmc URL`"
            ))
        })?;
        let key = state.power.key().map_err(|error| setup(error.message))?;
        let password = key
            .open(&bmc_password_aad(mac), &bmc.sealed_secret)
            .map_err(|error| setup(format!("{mac}: {error}")))?;
        let kg_key = bmc
            .sealed_kg
            .as_ref()
            .map(|sealed| {
                let text = key
                    .open(&bmc_kg_aad(mac), sealed)
                    .map_err(|error| setup(format!("{mac}: K_g key: {error}")))?;
                parse_kg_key(&text).map_err(|why| setup(format!("{mac}: {why}")))
            })
            .transpose()?;
        Ok(Credentials {
            target: bmc.target,
            password,
            kg_key,
        })
    }

    fn boot_progress(&self, macs: &[Mac], since_ms: u64) -> HashMap<Mac, SeenPhase> {
        let Ok(state) = self.state() else {
            return HashMap::new();
        };
        let wanted: std::collections::HashSet<Mac> = macs.iter().copied().collect();
        let machines = match state.store.machines_brief() {
            Ok(machines) => machines,
            Err(error) => {
                warn!(%error, "power job: cannot read the machines' boot phases");
                return HashMap::new();
            }
        };
        machines
            .into_iter()
            .filter(|m| wanted.contains(&m.mac))
            .filter_map(|m| {
                let at_ms = m.phase_ms.filter(|at| *at >= since_ms)?;
                Some((
                    m.mac,
                    SeenPhase {
                        phase: m.phase?,
                        at_ms,
                        status: m.phase_status.unwrap_or(200),
                    },
                ))
            })
            .collect()
    }

    fn checkin_deadlines(&self, macs: &[Mac]) -> HashMap<Mac, Duration> {
        let Ok(state) = self.state() else {
            return HashMap::new();
        };
        let rules = state.view_rules();
        let wanted: std::collections::HashSet<Mac> = macs.iter().copied().collect();
        let default = state.power.config().checkin_deadline;
        match state.store.machines_brief() {
            Ok(machines) => machines
                .into_iter()
                .filter(|m| wanted.contains(&m.mac))
                .map(|m| {
                    let own = m
                        .image
                        .as_deref()
                        .and_then(|i| rules.image_deadlines.get(i));
                    (m.mac, own.copied().unwrap_or(default))
                })
                .collect(),
            Err(error) => {
                warn!(%error, "power job: cannot read the machines' images; the server's check-in deadline applies");
                HashMap::new()
            }
        }
    }

    fn load(&self) -> f64 {
        let Ok(state) = self.state() else {
            return 0.0;
        };
        let mut sample = DataPlaneSample::default();
        if let Some(tftp) = &state.data_plane.tftp {
            sample.tftp_transfers = tftp.stats().active as u64;
        }
        if let Some(http) = &state.data_plane.http {
            sample.http_connections = http.stats.open_connections.get().max(0) as u64;
            sample.http_bytes_in_flight = http.stats.body_bytes_in_flight();
            sample.http_bytes_sent = http.stats.body_bytes.get();
        }
        self.headroom.load(sample, std::time::Instant::now())
    }

    fn record(
        &self,
        mac: Mac,
        action: PowerAction,
        result: &Result<Outcome, PowerError>,
        actor: &str,
        started_ms: u64,
    ) {
        let Ok(state) = self.state() else {
            return;
        };
        record_power(&state, mac, action, result, actor, started_ms);
    }
}

/// A power action's boot event and audit entry (never a password: the
/// outcome and errors name the BMC by address only). The event is dated
/// when the action was sent: the machine may already be asking for DHCP
/// when its BMC answers.
fn record_power(
    state: &PanelState,
    mac: Mac,
    action: PowerAction,
    result: &Result<Outcome, PowerError>,
    actor: &str,
    started_ms: u64,
) {
    let (detail, status) = match result {
        Ok(outcome) => (
            match outcome.state {
                Some(power) => format!(
                    "{}; power is {}",
                    outcome.done,
                    json!(power).as_str().unwrap_or("")
                ),
                None => outcome.done.clone(),
            },
            200,
        ),
        Err(error) => (error.to_string(), error_status(error)),
    };
    let mut event = BootEvent::new(
        Some(mac),
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Phase::Power,
        "bmc",
        format!("{}: {detail}", action.as_str()),
    );
    event.status = status;
    event.duration_ms = event.at_ms.saturating_sub(started_ms);
    event.at_ms = started_ms;
    state.router.events.record(event);
    if let Err(error) = state.store.record_audit(
        actor,
        &format!("power.{}", action.as_str()),
        &mac.to_string(),
        &detail,
    ) {
        warn!(%error, %mac, "cannot record a power action in the audit log");
    }
}

/// The status a failed power action's event carries (as the boot events'
/// failure causes read it).
fn error_status(error: &PowerError) -> u16 {
    match error {
        PowerError::Timeout(..) => 408,
        PowerError::Credentials(..) | PowerError::KgKey(..) => 403,
        PowerError::Unreachable(..) => 503,
        PowerError::Refused(..) => 400,
        PowerError::Protocol(..) | PowerError::Setup(..) => 500,
    }
}

// ---- BMCs ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BmcBody {
    /// `ipmi://USER[:PASS]@HOST[:PORT]` or `redfish://…/redfish/v1/Systems/ID`.
    url: String,
    /// The password, when the URL does not carry it.
    password: Option<String>,
    /// An IPMI BMC's K_g key: its characters, or `0x` and hex digits.
    kg_key: Option<String>,
}

pub(super) async fn put_bmc(
    State(state): Shared,
    Auth(who): Admin,
    axum::extract::Path(mac): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let mac = parse_mac(&mac)?;
    let body: BmcBody = parse_json(&body)?;
    let url = parse_bmc_url(&body.url)
        .map_err(|why| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why))?;
    let password = match (url.password, body.password) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "give the password in the URL or in \"password\", not both",
            ))
        }
        (Some(password), None) | (None, Some(password)) => password,
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "the BMC's password is missing: put it in \"password\"",
            ))
        }
    };
    let invalid =
        |why: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("BMC: {why}"));
    check_secret(&password).map_err(invalid)?;
    let kg_key = body.kg_key.filter(|kg| !kg.is_empty());
    if let Some(kg) = &kg_key {
        check_kg_for(&url.target, kg).map_err(invalid)?;
    }
    let key = state.power.key()?;
    let record = BmcRecord {
        mac,
        target: url.target,
        sealed_secret: key.seal(&bmc_password_aad(mac), &password),
        sealed_kg: kg_key.map(|kg| key.seal(&bmc_kg_aad(mac), &kg)),
        updated_ms: super::now_ms(),
    };
    let shown = record.target.to_string();
    blocking(move || Ok(state.store.set_bmc(mac, Some(&record), &who.actor)?)).await?;
    info!(%mac, bmc = %shown, "BMC set");
    Ok(Json(json!({ "mac": mac, "bmc": shown })).into_response())
}

pub(super) async fn delete_bmc(
    State(state): Shared,
    Auth(who): Admin,
    axum::extract::Path(mac): axum::extract::Path<String>,
) -> ApiResult {
    let mac = parse_mac(&mac)?;
    blocking(move || Ok(state.store.set_bmc(mac, None, &who.actor)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Each machine's BMC as the API shows it: its URL without the password.
pub(super) fn bmc_urls(state: &PanelState) -> Result<HashMap<Mac, String>, ApiError> {
    Ok(state
        .store
        .bmcs()?
        .into_iter()
        .map(|bmc| (bmc.mac, bmc.target.to_string()))
        .collect())
}

// ---- power jobs ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerRequest {
    #[serde(default)]
    macs: Vec<String>,
    pool: Option<String>,
    #[serde(flatten)]
    spec: JobSpec,
}

pub(super) async fn start_job(
    State(state): Shared,
    Auth(who): Assigner,
    body: axum::body::Bytes,
) -> ApiResult {
    let request: PowerRequest = parse_json(&body)?;
    let mut macs = request
        .macs
        .iter()
        .map(|m| parse_mac(m))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = request.spec;
    check_pacing(&spec)?;
    let pool = request.pool;
    let state2 = Arc::clone(&state);
    let macs = blocking(move || {
        if let Some(pool) = pool {
            let pools = state2.store.pools()?;
            let pool = pools.iter().find(|p| p.name == pool).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, format!("no pool named {pool:?}"))
            })?;
            macs.extend(
                state2
                    .store
                    .machines_brief()?
                    .iter()
                    .filter(|m| pool.contains(m))
                    .map(|m| m.mac),
            );
        }
        macs.sort();
        macs.dedup();
        Ok(macs)
    })
    .await?;
    if macs.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no machines: give \"macs\" or a \"pool\" with members",
        ));
    }
    state.power.key()?;
    let id = state.power.next_job.fetch_add(1, Ordering::Relaxed);
    let fleet = Arc::new(PanelFleet {
        state: Arc::downgrade(&state),
        bmcs: Mutex::new(None),
        headroom: Headroom::new(
            state.power.setup.max_transfers,
            state.power.setup.max_connections,
        ),
    });
    let count = macs.len();
    let job = waves::start(
        id,
        macs,
        spec,
        &who.actor,
        fleet,
        Arc::clone(&state.power.dispatcher),
        state.power.limits.clone(),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot start the power job: {e}"),
        )
    })?;
    info!(job = id, machines = count, action = job.spec.action.as_str(), actor = %who.actor, "power job started");
    state.power.keep(Arc::clone(&job));
    Ok((StatusCode::ACCEPTED, Json(job.view(true))).into_response())
}

/// Refuses pacings that could never finish.
fn check_pacing(spec: &JobSpec) -> Result<(), ApiError> {
    use crate::power::waves::Pacing;
    let bad = match spec.pacing {
        Pacing::AllAtOnce => None,
        Pacing::Fixed { size, interval_ms } if size == 0 || interval_ms > 3_600_000 => {
            Some("fixed waves need a size of at least 1 and an interval of at most an hour")
        }
        Pacing::Adaptive { first, max } if first == 0 || max < first => {
            Some("adaptive waves need 1 <= first <= max")
        }
        _ => None,
    };
    match bad {
        Some(why) => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, why)),
        None => Ok(()),
    }
}

pub(super) async fn list_jobs(State(state): Shared, _: Reader) -> ApiResult {
    let jobs: Vec<_> = state
        .power
        .jobs()
        .iter()
        .map(|job| job.view(false))
        .collect();
    Ok(Json(jobs).into_response())
}

pub(super) async fn get_job(
    State(state): Shared,
    _: Reader,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult {
    let job = state.power.job(parse_id(&id)?)?;
    Ok(Json(job.view(true)).into_response())
}

pub(super) async fn control_job(
    State(state): Shared,
    Auth(who): Assigner,
    axum::extract::Path((id, verb)): axum::extract::Path<(String, String)>,
) -> ApiResult {
    let job = state.power.job(parse_id(&id)?)?;
    let wanted = match verb.as_str() {
        "pause" => JobStatus::Paused,
        "resume" => JobStatus::Running,
        "cancel" => JobStatus::Cancelled,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("power jobs can be paused, resumed or cancelled, not {verb:?}"),
            ))
        }
    };
    job.control(wanted)
        .map_err(|ended| ApiError::new(StatusCode::CONFLICT, ended.to_string()))?;
    let detail = format!("{verb} by {}", who.actor);
    let _ = state.store.record_audit(
        &who.actor,
        &format!("power.job.{verb}"),
        &format!("job {}", job.id),
        &detail,
    );
    Ok(Json(job.view(false)).into_response())
}

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("power job id {text:?} is not a number")))
}

// ---- check-in ----

#[derive(Deserialize)]
struct CheckinBody {
    mac: String,
    token: String,
}

/// A booted OS says it is up. The token it carries was minted for its
/// boot; the event marks the machine booted.
pub(super) async fn checkin(
    State(state): Shared,
    axum::extract::ConnectInfo(super::tls::PeerAddr(peer)): axum::extract::ConnectInfo<
        super::tls::PeerAddr,
    >,
    body: axum::body::Bytes,
) -> ApiResult {
    let body: CheckinBody = parse_json(&body)?;
    let mac = parse_mac(&body.mac)?;
    let now = super::now_ms();
    let client = peer.ip();
    let issued = state
        .router
        .verify_checkin(mac, &body.token, now)
        .map_err(|error| {
            warn!(%mac, %client, %error, "check-in refused");
            ApiError::new(StatusCode::FORBIDDEN, format!("check-in refused: {error}"))
        })?;
    let mut event = BootEvent::new(
        Some(mac),
        client,
        Phase::Checkin,
        "http",
        format!(
            "checked in {} s after its boot config was served",
            now.saturating_sub(issued) / 1000
        ),
    );
    event.duration_ms = now.saturating_sub(issued);
    state.router.events.record(event);
    Ok(Json(json!({ "mac": mac, "checked_in": true })).into_response())
}
