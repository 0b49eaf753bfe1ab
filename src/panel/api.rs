//! The REST API (`/api/v1/…`, JSON) and the panel's embedded assets.
//!
//! [`API_ROUTES`] lists every endpoint; the OpenAPI document served at
//! `/api/v1/openapi.json` must describe exactly these (a unit test checks
//! both ways, and the API test checks each one is answered).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;

use super::auth;
pub(super) use super::extract::{blocking, parse_json, parse_mac, Admin, Assigner, Auth, Reader};
use super::tls::PeerAddr;
use super::{check_files, machine_view, now_ms, ApiError, MachineView, PanelState};
use crate::proto::path::safe_relative_name;
use crate::proto::pe::Signature;
use crate::store::{
    ImageRecord, MachinePatch, PoolRecord, Scope, ServerFiles, SessionRecord, StoredEvent,
};

type Shared = State<Arc<PanelState>>;

/// Wraps an axum extractor so that its rejection is a JSON [`ApiError`]
/// (400 with axum's explanation) like every other refusal.
macro_rules! json_rejection {
    ($(#[$doc:meta])* $name:ident, $inner:ident) => {
        $(#[$doc])*
        struct $name<T>(T);

        impl<T, S> axum::extract::FromRequestParts<S> for $name<T>
        where
            T: serde::de::DeserializeOwned + Send,
            S: Send + Sync,
        {
            type Rejection = ApiError;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                state: &S,
            ) -> Result<Self, ApiError> {
                axum::extract::$inner::<T>::from_request_parts(parts, state)
                    .await
                    .map(|axum::extract::$inner(value)| $name(value))
                    .map_err(|e| ApiError::bad_request(e.body_text()))
            }
        }
    };
}

json_rejection!(
    /// axum's `Query`, with a bad query string answered as a JSON error.
    Query,
    Query
);
json_rejection!(
    /// axum's `Path`, with a bad path answered as a JSON error.
    Path,
    Path
);

type ApiResult<T = Response> = Result<T, ApiError>;

/// Every API endpoint: method and path (axum's `{name}` placeholders).
pub const API_ROUTES: &[(&str, &str)] = &[
    ("post", "/api/v1/login"),
    ("post", "/api/v1/logout"),
    ("get", "/api/v1/session"),
    ("get", "/api/v1/machines"),
    ("post", "/api/v1/machines/assign"),
    ("get", "/api/v1/machines/{mac}"),
    ("put", "/api/v1/machines/{mac}"),
    ("delete", "/api/v1/machines/{mac}"),
    ("get", "/api/v1/discovered"),
    ("get", "/api/v1/images"),
    ("post", "/api/v1/images"),
    ("get", "/api/v1/images/{name}"),
    ("put", "/api/v1/images/{name}"),
    ("delete", "/api/v1/images/{name}"),
    ("get", "/api/v1/images/{name}/revisions"),
    ("post", "/api/v1/images/{name}/rollback"),
    ("get", "/api/v1/files"),
    ("put", "/api/v1/files/{path}"),
    ("get", "/api/v1/ipxe"),
    ("get", "/api/v1/ipxe/{name}"),
    ("get", "/api/v1/pools"),
    ("get", "/api/v1/pools/{name}"),
    ("put", "/api/v1/pools/{name}"),
    ("delete", "/api/v1/pools/{name}"),
    ("post", "/api/v1/pools/{name}/assign"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/events/stream"),
    ("get", "/api/v1/fleet"),
    ("get", "/api/v1/fleet/stream"),
    ("get", "/api/v1/audit"),
    ("get", "/api/v1/users"),
    ("get", "/api/v1/tokens"),
    ("post", "/api/v1/tokens"),
    ("delete", "/api/v1/tokens/{id}"),
    ("get", "/api/v1/settings/unknown"),
    ("put", "/api/v1/settings/unknown"),
    ("put", "/api/v1/machines/{mac}/bmc"),
    ("delete", "/api/v1/machines/{mac}/bmc"),
    ("post", "/api/v1/power"),
    ("get", "/api/v1/power/jobs"),
    ("get", "/api/v1/power/jobs/{id}"),
    ("post", "/api/v1/power/jobs/{id}/{action}"),
    ("post", "/api/v1/checkin"),
    ("get", "/api/v1/openapi.json"),
];

const OPENAPI: &str = include_str!("openapi.json");
const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

/// The (method, path) pairs the OpenAPI document describes.
pub fn openapi_paths() -> Vec<(String, String)> {
    let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
            if method != "parameters" {
                out.push((method.clone(), path.clone()));
            }
        }
    }
    out
}

/// The panel's router.
pub fn routes(state: Arc<PanelState>) -> axum::Router {
    axum::Router::new()
        .route("/", get(|| asset(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/assets/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/assets/app.css",
            get(|| asset(APP_CSS, "text/css; charset=utf-8")),
        )
        .route("/api/v1/login", post(login))
        .route("/api/v1/logout", post(logout))
        .route("/api/v1/session", get(session))
        .route("/api/v1/machines", get(list_machines))
        .route("/api/v1/machines/assign", post(assign_machines))
        .route(
            "/api/v1/machines/{mac}",
            get(get_machine).put(put_machine).delete(forget_machine),
        )
        .route(
            "/api/v1/machines/{mac}/bmc",
            axum::routing::put(super::power::put_bmc).delete(super::power::delete_bmc),
        )
        .route("/api/v1/power", post(super::power::start_job))
        .route("/api/v1/power/jobs", get(super::power::list_jobs))
        .route("/api/v1/power/jobs/{id}", get(super::power::get_job))
        .route(
            "/api/v1/power/jobs/{id}/{action}",
            post(super::power::control_job),
        )
        .route("/api/v1/checkin", post(super::power::checkin))
        .route("/api/v1/discovered", get(discovered))
        .route("/api/v1/images", get(list_images).post(add_image))
        .route(
            "/api/v1/images/{name}",
            get(get_image).put(edit_image).delete(remove_image),
        )
        .route("/api/v1/images/{name}/revisions", get(image_revisions))
        .route("/api/v1/images/{name}/rollback", post(rollback_image))
        .route("/api/v1/files", get(list_files))
        .route(
            "/api/v1/files/{*path}",
            put(upload_file).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/ipxe", get(ipxe_builds))
        .route("/api/v1/ipxe/{name}", get(ipxe_build_file))
        .route("/api/v1/pools", get(list_pools))
        .route(
            "/api/v1/pools/{name}",
            get(get_pool).put(put_pool).delete(delete_pool),
        )
        .route("/api/v1/pools/{name}/assign", post(assign_pool))
        .route("/api/v1/events", get(events))
        .route("/api/v1/events/stream", get(event_stream))
        .route("/api/v1/fleet", get(fleet))
        .route("/api/v1/fleet/stream", get(fleet_stream))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/users", get(users))
        .route("/api/v1/tokens", get(list_tokens).post(add_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route(
            "/api/v1/settings/unknown",
            get(get_unknown).put(put_unknown),
        )
        .route(
            "/api/v1/openapi.json",
            get(|| asset(OPENAPI, "application/json")),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such page or API endpoint; see /api/v1/openapi.json",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method; see /api/v1/openapi.json",
            )
        })
        .merge(super::metrics::routes())
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    crate::inventory::fields::check_name(kind, name)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))
}

// ---- sessions ----

#[derive(Deserialize)]
struct Login {
    user: String,
    password: String,
}

async fn login(
    State(state): Shared,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    body: axum::body::Bytes,
) -> ApiResult {
    let body: Login = parse_json(&body)?;
    if let Some(seconds) = state.limiter.retry_after(peer.ip(), &body.user) {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed logins; try again in {seconds} s"),
        );
        error.retry_after = Some(seconds);
        return Err(error);
    }
    let worker = Arc::clone(&state);
    let user = body.user.clone();
    let verified = blocking(move || {
        let record = worker.store.user(&user)?;
        // Verify against a dummy hash for unknown users, so that timing
        // does not tell which names exist.
        let hash = record
            .as_ref()
            .map_or(dummy_hash(), |r| r.password_hash.as_str());
        let ok = auth::verify_password(&body.password, hash) && record.is_some();
        Ok(record.filter(|_| ok))
    })
    .await?;
    let Some(user) = verified else {
        state.limiter.failed(peer.ip(), &body.user);
        let name = auth::login_name_for_records(&body.user);
        info!(user = %name, client = %peer, "panel login failed");
        let _ = state
            .store
            .record_audit(&name, "login.failed", &peer.ip().to_string(), "");
        return Err(ApiError::unauthorized("wrong user name or password"));
    };
    state.limiter.succeeded(peer.ip(), &user.name);
    let session_id = auth::random_hex(32);
    let csrf = auth::random_hex(24);
    let record = SessionRecord {
        user: user.name.clone(),
        scope: user.scope,
        csrf: csrf.clone(),
        expires_ms: now_ms() + auth::SESSION_LIFETIME.as_millis() as u64,
    };
    let worker = Arc::clone(&state);
    let hash = auth::secret_hash(&session_id);
    let name = user.name.clone();
    let client = peer.ip().to_string();
    blocking(move || {
        worker.store.create_session(&hash, &record)?;
        worker.store.record_audit(&name, "login", &client, "")?;
        Ok(())
    })
    .await?;
    let cookie = format!(
        "{}={session_id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        auth::SESSION_COOKIE,
        auth::SESSION_LIFETIME.as_secs(),
        if state.tls { "; Secure" } else { "" }
    );
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(json!({ "user": user.name, "scope": user.scope, "csrf": csrf })),
    )
        .into_response())
}

/// An argon2 hash of a random password, verified for unknown user names
/// so that the time a failed login takes does not tell which names exist.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| auth::hash_password(&auth::random_hex(16)).unwrap_or_default())
}

async fn logout(State(state): Shared, Auth(who): Reader, headers: HeaderMap) -> ApiResult {
    if let Some(id) = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| {
            c.split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| *k == auth::SESSION_COOKIE)
                .map(|(_, v)| v.to_string())
        })
    {
        state.store.delete_session(&auth::secret_hash(&id))?;
    }
    state.store.record_audit(&who.actor, "logout", "", "")?;
    let cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        auth::SESSION_COOKIE
    );
    Ok(([(header::SET_COOKIE, cookie)], Json(json!({ "ok": true }))).into_response())
}

async fn session(Auth(who): Reader) -> ApiResult {
    Ok(Json(json!({ "user": who.actor, "scope": who.scope, "csrf": who.csrf })).into_response())
}

// ---- machines ----

/// Machines in one answer when the caller names no `limit`, and the most it
/// may name: a list of every discovered machine could be megabytes.
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

#[derive(Deserialize, Default)]
struct MachineFilter {
    /// Text found in the MAC, hostname, IP, image, labels, notes or facts.
    q: Option<String>,
    state: Option<String>,
    image: Option<String>,
    label: Option<String>,
    stuck: Option<bool>,
    /// At most this many, after skipping `offset`; the whole count is in
    /// the `X-Total-Count` header.
    limit: Option<usize>,
    offset: Option<usize>,
}

fn all_views(state: &PanelState) -> ApiResult<Vec<MachineView>> {
    let now = now_ms();
    let mut bmcs = super::power::bmc_urls(state)?;
    let rules = state.view_rules();
    Ok(state
        .store
        .machines()?
        .into_iter()
        .map(|m| {
            let bmc = bmcs.remove(&m.mac);
            MachineView {
                bmc,
                ..machine_view(m, now, &rules)
            }
        })
        .collect())
}

fn matches(view: &MachineView, filter: &MachineFilter) -> bool {
    let m = &view.machine;
    if filter
        .state
        .as_deref()
        .is_some_and(|s| !s.is_empty() && s != view.state)
    {
        return false;
    }
    if filter
        .image
        .as_deref()
        .is_some_and(|i| !i.is_empty() && m.image.as_deref() != Some(i))
    {
        return false;
    }
    if filter
        .label
        .as_deref()
        .is_some_and(|l| !l.is_empty() && !m.labels.iter().any(|x| x == l))
    {
        return false;
    }
    if filter.stuck.is_some_and(|s| s != view.stuck) {
        return false;
    }
    match filter.q.as_deref().map(str::to_lowercase) {
        Some(q) if !q.is_empty() => {
            let haystack = format!(
                "{} {} {} {} {} {} {}",
                m.mac,
                m.hostname.as_deref().unwrap_or(""),
                m.ip.map(|ip| ip.to_string()).unwrap_or_default(),
                m.image.as_deref().unwrap_or(""),
                m.labels.join(" "),
                m.notes,
                m.facts.values().cloned().collect::<Vec<_>>().join(" ")
            )
            .to_lowercase();
            haystack.contains(&q)
        }
        _ => true,
    }
}

async fn list_machines(
    State(state): Shared,
    _: Reader,
    Query(filter): Query<MachineFilter>,
) -> ApiResult {
    let (total, views) = blocking(move || {
        let matching: Vec<MachineView> = all_views(&state)?
            .into_iter()
            .filter(|v| matches(v, &filter))
            .collect();
        let total = matching.len();
        let page = matching
            .into_iter()
            .skip(filter.offset.unwrap_or(0))
            .take(filter.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE))
            .collect::<Vec<_>>();
        Ok((total, page))
    })
    .await?;
    Ok(([("x-total-count", total.to_string())], Json(views)).into_response())
}

async fn get_machine(State(state): Shared, _: Reader, Path(mac): Path<String>) -> ApiResult {
    let mac = parse_mac(&mac)?;
    let machine = state
        .store
        .machine(mac)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no machine {mac}")))?;
    // The database has the history; the router's ring has what the
    // event writer may not have stored yet (it batches for 100 ms).
    let recent: Vec<StoredEvent> = state
        .router
        .events
        .recent(Some(mac), 200)
        .iter()
        .map(StoredEvent::from)
        .collect();
    let cutoff = recent.first().map_or(u64::MAX, |e| e.at_ms);
    let mut events: Vec<StoredEvent> = state
        .store
        .events(Some(mac), 0, 200)?
        .into_iter()
        .filter(|e| e.at_ms < cutoff)
        .collect();
    events.extend(recent);
    let bmc = super::power::bmc_urls(&state)?.remove(&mac);
    let view = MachineView {
        bmc,
        ..machine_view(machine, now_ms(), &state.view_rules())
    };
    let mut value = serde_json::to_value(view).expect("plain data");
    value["events"] = serde_json::to_value(events).expect("plain data");
    Ok(Json(value).into_response())
}

async fn put_machine(
    State(state): Shared,
    Auth(who): Assigner,
    Path(mac): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let mac = parse_mac(&mac)?;
    let patch: MachinePatch = parse_json(&body)?;
    let machine = blocking(move || {
        let machine = state.store.put_machine(mac, &patch, &who.actor)?;
        state.publish()?;
        Ok(machine)
    })
    .await?;
    Ok(Json(machine).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignMany {
    macs: Vec<String>,
    /// An image for all of them (`null` unassigns).
    #[serde(default, deserialize_with = "some")]
    image: Option<Option<String>>,
    /// Add them to this pool (created if missing).
    pool: Option<String>,
}

fn some<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

async fn assign_machines(
    State(state): Shared,
    Auth(who): Assigner,
    body: axum::body::Bytes,
) -> ApiResult {
    let request: AssignMany = parse_json(&body)?;
    let macs = request
        .macs
        .iter()
        .map(|m| parse_mac(m))
        .collect::<ApiResult<Vec<_>>>()?;
    if request.image.is_none() && request.pool.is_none() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "give \"image\" (a name or null) and/or \"pool\"",
        ));
    }
    if let Some(pool) = &request.pool {
        check_name("pool", pool)?;
    }
    let changed = blocking(move || {
        let mut changed = 0;
        if let Some(image) = &request.image {
            let patch = MachinePatch {
                image: Some(image.clone()),
                ..MachinePatch::default()
            };
            changed = state.store.put_machines(&macs, &patch, &who.actor)?;
        } else {
            // Adding to a pool adopts discovered machines.
            state
                .store
                .put_machines(&macs, &MachinePatch::default(), &who.actor)?;
        }
        if let Some(name) = &request.pool {
            let mut pool = state
                .store
                .pools()?
                .into_iter()
                .find(|p| &p.name == name)
                .unwrap_or(PoolRecord {
                    name: name.clone(),
                    members: Vec::new(),
                    selector: Vec::new(),
                    image: None,
                });
            for mac in &macs {
                if !pool.members.contains(mac) {
                    pool.members.push(*mac);
                }
            }
            state.store.put_pool(&pool, &who.actor)?;
            changed = macs.len();
        }
        state.publish()?;
        Ok(changed)
    })
    .await?;
    Ok(Json(json!({ "changed": changed })).into_response())
}

async fn forget_machine(
    State(state): Shared,
    Auth(who): Admin,
    Path(mac): Path<String>,
) -> ApiResult {
    let mac = parse_mac(&mac)?;
    blocking(move || {
        state.store.forget_machine(mac, &who.actor)?;
        state.publish()
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn discovered(State(state): Shared, _: Reader) -> ApiResult {
    let views = blocking(move || {
        Ok(all_views(&state)?
            .into_iter()
            .filter(|v| !v.machine.adopted)
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(views).into_response())
}

// ---- images and files ----

/// An image as the API shows it: the record, and `problem` when its files
/// are missing or unreadable now (it cannot boot).
/// An image as the API shows it: its record, why it cannot boot here (if
/// it cannot), and on which of the database's servers its files are, as
/// each last reported (`holds`; `running`: it reported in the last minute).
fn image_view(state: &PanelState, image: ImageRecord, servers: &[ServerFiles]) -> Value {
    let problem = state.image_health.problem(&image.name);
    let now = now_ms();
    let availability: Vec<Value> = servers
        .iter()
        .map(|server| {
            let holds = image.files.iter().all(|want| {
                server
                    .files
                    .iter()
                    .any(|f| f.path == want.path && f.sha256 == want.sha256)
            });
            json!({
                "name": server.name,
                "holds": holds,
                "running": super::replica::is_running(server, now),
            })
        })
        .collect();
    let signature = state.image_health.kernel_signature(&image.name);
    let warning = secure_boot_warning(&image, signature);
    let mut value = serde_json::to_value(image).unwrap_or(Value::Null);
    value["problem"] = problem.map_or(Value::Null, Value::String);
    value["kernel_signature"] = serde_json::to_value(signature).unwrap_or(Value::Null);
    value["warning"] = warning.map_or(Value::Null, Value::String);
    value["servers"] = Value::Array(availability);
    value
}

/// What the Images page warns about an image booted through the Secure
/// Boot chain whose kernel the firmware will refuse.
fn secure_boot_warning(image: &ImageRecord, signature: Option<Signature>) -> Option<String> {
    if !image.secure_boot {
        return None;
    }
    match signature {
        Some(Signature::Signed) => None,
        Some(Signature::Unsigned) => Some(format!(
            "Secure Boot: the kernel {} has no signature, so Secure Boot machines will refuse it; \
             use a signed kernel (Debian's linux-image-amd64 is) or sign it with a key your machines trust (sbsign)",
            image.kernel
        )),
        Some(Signature::NotEfi) => Some(format!(
            "Secure Boot: the kernel {} is not an EFI image and cannot boot under Secure Boot",
            image.kernel
        )),
        None if crate::inventory::is_url(&image.kernel) => Some(
            "Secure Boot: the kernel is a URL, which the Secure Boot chain (GRUB over TFTP from this server) cannot fetch".to_string(),
        ),
        None => None,
    }
}

async fn list_images(State(state): Shared, _: Reader) -> ApiResult {
    let servers = state.store.server_files().unwrap_or_default();
    let images: Vec<Value> = state
        .store
        .images()?
        .into_iter()
        .map(|image| image_view(&state, image, &servers))
        .collect();
    Ok(Json(images).into_response())
}

async fn get_image(State(state): Shared, _: Reader, Path(name): Path<String>) -> ApiResult {
    let image = state
        .store
        .image(&name)?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no image named {name:?}")))?;
    let servers = state.store.server_files().unwrap_or_default();
    Ok(Json(image_view(&state, image, &servers)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewImage {
    name: String,
    kernel: String,
    #[serde(default)]
    initrds: Vec<String>,
    #[serde(default)]
    cmdline: String,
    #[serde(default = "http")]
    transport: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    description: String,
    /// Seconds from the kernel fetch to the OS's check-in (0: the server's).
    #[serde(default)]
    checkin_deadline_seconds: u64,
    /// Boot it through the Secure Boot chain on UEFI x64 PXE machines.
    #[serde(default)]
    secure_boot: bool,
}

fn http() -> String {
    "http".into()
}

/// A boot path: a URL, or a safe path inside the boot directory.
fn check_boot_path(raw: &str) -> ApiResult<String> {
    crate::inventory::fields::check_boot_path("boot file", raw)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))
}

async fn add_image(State(state): Shared, Auth(who): Admin, body: axum::body::Bytes) -> ApiResult {
    let new: NewImage = parse_json(&body)?;
    check_name("image", &new.name)?;
    crate::store::parse_transport(&new.transport)?;
    let mut image = ImageRecord {
        name: new.name,
        kernel: check_boot_path(&new.kernel)?,
        initrds: new
            .initrds
            .iter()
            .map(|i| check_boot_path(i))
            .collect::<ApiResult<_>>()?,
        cmdline: new.cmdline,
        transport: new.transport,
        architecture: new.architecture,
        description: new.description,
        files: Vec::new(),
        created_ms: now_ms(),
        checkin_deadline_seconds: new.checkin_deadline_seconds,
        secure_boot: new.secure_boot,
        revision: 1,
    };
    let image = blocking(move || {
        image.files = check_files(&state.root, &image)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
        state.store.add_image(&image, &who.actor)?;
        state.publish()?;
        // Watch its files' directories now, not at the next round.
        state.image_health.changed.notify_one();
        Ok(image)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(image)).into_response())
}

/// `PUT /api/v1/images/{name}`: changes what is given and makes a new
/// revision, which every machine not pinned boots from its next script.
async fn edit_image(
    State(state): Shared,
    Auth(who): Admin,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let mut edit: crate::store::ImageEdit = parse_json(&body)?;
    if let Some(kernel) = &edit.kernel {
        edit.kernel = Some(check_boot_path(kernel)?);
    }
    if let Some(initrds) = &edit.initrds {
        edit.initrds = Some(
            initrds
                .iter()
                .map(|i| check_boot_path(i))
                .collect::<ApiResult<_>>()?,
        );
    }
    let view = blocking(move || save_revision(&state, &name, &edit, "", &who.actor)).await?;
    Ok(Json(view).into_response())
}

/// Applies an edit (or a rollback), checks new files, publishes, and
/// answers the image as `GET /api/v1/images/{name}` shows it.
fn save_revision(
    state: &PanelState,
    name: &str,
    edit: &crate::store::ImageEdit,
    note: &str,
    actor: &str,
) -> ApiResult<Value> {
    // Files are checked before the change: a kernel or initrd that is not
    // in the boot directory is refused, as at registration.
    let mut checked = None;
    if let Some(mut preview) = state.store.image(name)? {
        if !edit.apply_to(&mut preview).is_empty() && preview.files.is_empty() {
            checked = Some(
                check_files(&state.root, &preview)
                    .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?,
            );
        }
    }
    let mut image = state.store.edit_image(name, edit, note, actor)?;
    if let Some(files) = checked.filter(|_| image.files.is_empty()) {
        state.store.update_image_files(name, &files)?;
        image.files = files;
    }
    state.publish()?;
    state.image_health.changed.notify_one();
    let servers = state.store.server_files().unwrap_or_default();
    Ok(image_view(state, image, &servers))
}

async fn image_revisions(State(state): Shared, _: Reader, Path(name): Path<String>) -> ApiResult {
    let revisions = blocking(move || Ok(state.store.image_revisions(&name)?)).await?;
    Ok(Json(revisions).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rollback {
    revision: u64,
}

/// `POST /api/v1/images/{name}/rollback`: one action makes a new revision
/// with an earlier one's content.
async fn rollback_image(
    State(state): Shared,
    Auth(who): Admin,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let Rollback { revision } = parse_json(&body)?;
    let view = blocking(move || {
        let old = state
            .store
            .image_revisions(&name)?
            .into_iter()
            .find(|r| r.revision == revision)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("image {name:?} has no revision {revision}"),
                )
            })?;
        let edit = crate::store::ImageEdit::restoring(&old.image);
        save_revision(
            &state,
            &name,
            &edit,
            &format!("rollback to revision {revision}"),
            &who.actor,
        )
    })
    .await?;
    Ok(Json(view).into_response())
}

async fn remove_image(
    State(state): Shared,
    Auth(who): Admin,
    Path(name): Path<String>,
) -> ApiResult {
    blocking(move || {
        state.store.remove_image(&name, &who.actor)?;
        state.publish()
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Regular files in the boot directory, for registering images.
async fn list_files(State(state): Shared, _: Reader) -> ApiResult {
    let files = blocking(move || {
        let mut files = Vec::new();
        let mut stack = vec![state.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                let path = entry.path();
                if kind.is_dir() {
                    stack.push(path);
                } else if kind.is_file() && files.len() < 10_000 {
                    let relative = path
                        .strip_prefix(&state.root)
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                    files.push(json!({ "path": relative, "size": size }));
                }
            }
        }
        files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        Ok(files)
    })
    .await?;
    Ok(Json(files).into_response())
}

/// The iPXE binaries `bootfleet ipxe build` left in the boot directory's
/// `ipxe/`: each with its SHA-256, size and the path the boot services
/// serve it at, and the script built into them.
async fn ipxe_builds(State(state): Shared, _: Reader) -> ApiResult {
    let view = blocking(move || {
        let dir = state.root.join("ipxe");
        let files: Vec<Value> = crate::ipxe::list_builds(&dir)
            .into_iter()
            .map(|file| {
                json!({
                    "name": file.name,
                    "sha256": file.sha256,
                    "size": file.bytes,
                    "boot_path": format!("ipxe/{}", file.name),
                })
            })
            .collect();
        let script = std::fs::read_to_string(dir.join(crate::ipxe::SCRIPT_NAME)).ok();
        Ok(json!({ "files": files, "script": script }))
    })
    .await?;
    Ok(Json(view).into_response())
}

/// One file of the iPXE build, for download from the panel.
async fn ipxe_build_file(State(state): Shared, _: Reader, Path(name): Path<String>) -> ApiResult {
    let bytes = blocking(move || {
        let dir = state.root.join("ipxe");
        let listed = crate::ipxe::list_builds(&dir)
            .into_iter()
            .any(|file| file.name == name);
        if !listed {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no iPXE build file named {name:?}; `bootfleet ipxe build` makes them"),
            ));
        }
        std::fs::read(dir.join(&name)).map_err(|error| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("iPXE build file {name}: {error}"),
            )
        })
    })
    .await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// Stores an upload under the boot directory: streamed into a temporary
/// file next to the target, renamed over it once complete, so a boot in
/// progress never reads half a file.
async fn upload_file(
    State(state): Shared,
    Auth(who): Admin,
    Path(path): Path<String>,
    body: Body,
) -> ApiResult {
    let relative = upload_name(&path)?;
    let target = upload_target(&state, &relative).await?;
    let temp = target.with_file_name(format!(
        ".{}.upload-{}",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        auth::random_hex(6)
    ));
    let written = match write_upload(&temp, body, state.config.max_upload_bytes, &relative).await {
        Ok(written) => written,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
    };
    if let Err(e) = tokio::fs::rename(&temp, &target).await {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store {relative}: {e}"),
        ));
    }
    if let Err(e) = crate::durable::sync_parent_dir(&target) {
        tracing::warn!(file = %relative, error = %e, "cannot sync the boot directory after an upload");
    }
    let detail = format!("{written} bytes");
    state
        .store
        .record_audit(&who.actor, "file.upload", &relative, &detail)?;
    info!(file = %relative, bytes = written, by = %who.actor, "file uploaded through the panel");
    Ok((
        StatusCode::CREATED,
        Json(json!({ "path": relative, "size": written })),
    )
        .into_response())
}

/// The boot-directory name an upload to `path` is stored under, or why it
/// cannot be uploaded at all.
fn upload_name(path: &str) -> Result<String, ApiError> {
    let relative = safe_relative_name(path.as_bytes()).map_err(|why| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("file {path:?}: {why}"),
        )
    })?;
    if relative.is_empty() || relative == crate::inventory::FILE_NAME {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{relative:?} cannot be uploaded"),
        ));
    }
    if crate::server::paths::is_private_name(&relative) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{relative:?} cannot be uploaded: names starting with '.' are never served"),
        ));
    }
    Ok(relative)
}

/// Where an upload of `relative` lands: its directories made one by one
/// under the canonical root, never through a symbolic link that leads
/// outside it, and never onto a symbolic link.
async fn upload_target(state: &PanelState, relative: &str) -> Result<std::path::PathBuf, ApiError> {
    let (root, parent, name) = (
        state.root.clone(),
        relative.rsplit_once('/').map(|(dir, _)| dir.to_string()),
        relative.to_string(),
    );
    let dir = blocking(move || {
        crate::server::paths::create_dirs_inside(&root, parent.as_deref().unwrap_or("")).map_err(
            |e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("cannot store {name}: {e}"),
                )
            },
        )
    })
    .await?;
    let target = dir.join(relative.rsplit('/').next().unwrap_or(relative));
    if std::fs::symlink_metadata(&target).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{relative:?} is a symbolic link; remove it on the server first"),
        ));
    }
    Ok(target)
}

/// Streams an upload's body into `temp` and syncs it, refusing more than
/// `limit` bytes; returns how many bytes were written. The caller removes
/// `temp` when this fails.
async fn write_upload(
    temp: &std::path::Path,
    body: Body,
    limit: u64,
    relative: &str,
) -> Result<u64, ApiError> {
    use tokio::io::AsyncWriteExt;
    let cannot_store = |status: StatusCode, e: std::io::Error| {
        ApiError::new(status, format!("cannot store {relative}: {e}"))
    };
    let mut file = tokio::fs::File::create(temp).await.map_err(|e| {
        let directory = temp.parent().unwrap_or(temp).display();
        let hint = match e.raw_os_error() {
            Some(libc::EROFS) => format!(
                "; {directory} is read-only to bootfleet: under systemd, list it in ReadWritePaths= of bootfleet.service (`systemctl edit bootfleet`)"
            ),
            Some(libc::EACCES | libc::EPERM) => format!(
                "; the bootfleet user cannot write into {directory}: `chown -R bootfleet:bootfleet {directory}` (the package's tmpfiles.d entry does this for /srv/bootfleet)"
            ),
            _ => String::new(),
        };
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot store {relative}: {e}{hint}"),
        )
    })?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("upload interrupted: {e}"))
        })?;
        written += chunk.len() as u64;
        if written > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the file is larger than panel.max_upload_mib ({} MiB)",
                    limit >> 20
                ),
            ));
        }
        file.write_all(&chunk).await.map_err(|e| {
            let status = if e.raw_os_error() == Some(libc::ENOSPC) {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            cannot_store(status, e)
        })?;
    }
    file.sync_all()
        .await
        .map_err(|e| cannot_store(StatusCode::INSUFFICIENT_STORAGE, e))?;
    Ok(written)
}

// ---- pools ----

async fn list_pools(State(state): Shared, _: Reader) -> ApiResult {
    Ok(Json(pools_with_members(&state)?).into_response())
}

fn pools_with_members(state: &PanelState) -> ApiResult<Vec<Value>> {
    let machines = state.store.machines()?;
    Ok(state
        .store
        .pools()?
        .into_iter()
        .map(|pool| {
            let matched: Vec<String> = machines
                .iter()
                .filter(|m| pool.contains(m))
                .map(|m| m.mac.to_string())
                .collect();
            let mut value = serde_json::to_value(&pool).expect("plain data");
            value["machines"] = json!(matched);
            value
        })
        .collect())
}

async fn get_pool(State(state): Shared, _: Reader, Path(name): Path<String>) -> ApiResult {
    pools_with_members(&state)?
        .into_iter()
        .find(|p| p["name"] == name.as_str())
        .map(|p| Json(p).into_response())
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no pool named {name:?}")))
}

async fn put_pool(
    State(state): Shared,
    Auth(who): Admin,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    check_name("pool", &name)?;
    let mut pool: PoolRecord = parse_json(&body)?;
    pool.name = name;
    blocking(move || {
        state.store.put_pool(&pool, &who.actor)?;
        // A pool's image is what its machines without one of their own boot.
        state.publish()?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn delete_pool(
    State(state): Shared,
    Auth(who): Admin,
    Path(name): Path<String>,
) -> ApiResult {
    blocking(move || {
        state.store.delete_pool(&name, &who.actor)?;
        state.publish()?;
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolAssign {
    image: Option<String>,
}

async fn assign_pool(
    State(state): Shared,
    Auth(who): Assigner,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let request: PoolAssign = parse_json(&body)?;
    let changed = blocking(move || {
        let changed = state
            .store
            .assign_pool(&name, request.image.as_deref(), &who.actor)?;
        state.publish()?;
        Ok(changed)
    })
    .await?;
    Ok(Json(json!({ "changed": changed })).into_response())
}

// ---- events and the fleet ----

#[derive(Deserialize)]
struct EventQuery {
    mac: Option<String>,
    since_ms: Option<u64>,
    limit: Option<usize>,
}

async fn events(State(state): Shared, _: Reader, Query(query): Query<EventQuery>) -> ApiResult {
    let mac = query.mac.as_deref().map(parse_mac).transpose()?;
    let events = blocking(move || {
        Ok(state.store.events(
            mac,
            query.since_ms.unwrap_or(0),
            query.limit.unwrap_or(500).min(10_000),
        )?)
    })
    .await?;
    Ok(Json(events).into_response())
}

/// Boot events as they happen (server-sent events), optionally of one machine.
async fn event_stream(
    State(state): Shared,
    _: Reader,
    Query(query): Query<EventQuery>,
) -> ApiResult {
    let mac = query.mac.as_deref().map(parse_mac).transpose()?;
    let feed = state.router.events.subscribe();
    let stream = futures_util::stream::unfold(feed, move |mut feed| async move {
        loop {
            match feed.recv().await {
                Some(event) if mac.is_none() || event.mac == mac => {
                    let data = serde_json::to_string(&event).expect("plain data");
                    return Some((
                        Ok::<_, std::convert::Infallible>(
                            Event::default().event("boot").data(data),
                        ),
                        feed,
                    ));
                }
                Some(_) => continue,
                None => return None,
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// How many machines are in each state, and which are stuck where.
fn fleet_summary(state: &PanelState) -> ApiResult<Value> {
    let now = now_ms();
    let rules = state.view_rules();
    let views: Vec<MachineView> = state
        .store
        .machines_brief()?
        .into_iter()
        .map(|m| machine_view(m, now, &rules))
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut stuck = Vec::new();
    for view in &views {
        *counts.entry(view.state).or_default() += 1;
        if let Some(failure) = &view.failure {
            let cause = failure.strip_prefix("failed at ").unwrap_or(failure);
            *failures.entry(cause.to_string()).or_default() += 1;
        }
        if view.stuck && stuck.len() < 500 {
            stuck.push(json!({
                "mac": view.machine.mac,
                "hostname": view.machine.hostname,
                "state": view.state,
                "since_ms": view.machine.phase_ms,
                "status": view.machine.phase_status,
            }));
        }
    }
    Ok(json!({
        "at_ms": now_ms(),
        "machines": views.len(),
        "states": counts,
        // Failed machines by where and why ("kernel: 404 (file not found)").
        "failures": failures,
        "stuck": stuck,
        "stuck_after_seconds": state.config.stuck_after.as_secs(),
        // Boot events the database or a live view lost by falling behind.
        "events_dropped": state.router.events.dropped(),
    }))
}

async fn fleet(State(state): Shared, _: Reader) -> ApiResult {
    let summary = blocking(move || fleet_summary(&state)).await?;
    Ok(Json(summary).into_response())
}

/// The fleet summary once a second while anything changes.
async fn fleet_stream(State(state): Shared, _: Reader) -> ApiResult {
    let stream = futures_util::stream::unfold(
        (state, String::new(), true),
        |(state, last, first)| async move {
            loop {
                if !first {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let worker = Arc::clone(&state);
                let Ok(Ok(mut summary)) =
                    tokio::task::spawn_blocking(move || fleet_summary(&worker)).await
                else {
                    return None;
                };
                let at = summary["at_ms"].take();
                let key = summary.to_string();
                if key != last || first {
                    summary["at_ms"] = at;
                    let event = Event::default().event("fleet").data(summary.to_string());
                    return Some((
                        Ok::<_, std::convert::Infallible>(event),
                        (state, key, false),
                    ));
                }
            }
        },
    );
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

// ---- audit, users, tokens, settings ----

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn audit(State(state): Shared, _: Reader, Query(limit): Query<Limit>) -> ApiResult {
    Ok(Json(state.store.audit(limit.limit.unwrap_or(200).min(5000))?).into_response())
}

async fn users(State(state): Shared, _: Admin) -> ApiResult {
    Ok(Json(state.store.users()?).into_response())
}

async fn list_tokens(State(state): Shared, _: Admin) -> ApiResult {
    Ok(Json(state.store.tokens()?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    scope: Scope,
}

async fn add_token(State(state): Shared, Auth(who): Admin, body: axum::body::Bytes) -> ApiResult {
    let request: NewToken = parse_json(&body)?;
    check_name("token", &request.name)?;
    let secret = format!("bft_{}", auth::random_hex(32));
    let id = state.store.add_token(
        &request.name,
        &who.actor,
        request.scope,
        &auth::secret_hash(&secret),
        &who.actor,
    )?;
    Ok((
        StatusCode::CREATED,
        Json(
            json!({ "id": id, "name": request.name, "scope": request.scope, "token": secret,
            "note": "this is the only time the token is shown" }),
        ),
    )
        .into_response())
}

async fn revoke_token(State(state): Shared, Auth(who): Admin, Path(id): Path<String>) -> ApiResult {
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("token id {id:?} is not a number")))?;
    state.store.revoke_token(id, &who.actor)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_unknown(State(state): Shared, _: Reader) -> ApiResult {
    let (policy, poll) = state.store.unknown_policy()?;
    Ok(Json(json!({ "policy": policy.as_str(), "poll_seconds": poll })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnknownSetting {
    policy: crate::inventory::UnknownPolicy,
    #[serde(default = "thirty")]
    poll_seconds: u32,
}

fn thirty() -> u32 {
    30
}

async fn put_unknown(State(state): Shared, Auth(who): Admin, body: axum::body::Bytes) -> ApiResult {
    let setting: UnknownSetting = parse_json(&body)?;
    blocking(move || {
        state
            .store
            .set_unknown_policy(setting.policy, setting.poll_seconds, &who.actor)?;
        state.publish()
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_openapi_document_describes_exactly_the_routes() {
        let documented: HashSet<(String, String)> = openapi_paths().into_iter().collect();
        let served: HashSet<(String, String)> = API_ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from openapi.json: {undocumented:?}"
        );
        assert!(
            unserved.is_empty(),
            "openapi.json documents routes not served: {unserved:?}"
        );
    }
}
