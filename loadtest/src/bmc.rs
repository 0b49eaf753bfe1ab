//! Simulated BMCs: each simulated machine answers Redfish on a loopback
//! port of its own, as a rack of real BMCs would, and starts its boot
//! chain when it is powered on (`ComputerSystem.Reset` with `On`,
//! `ForceOn`, `ForceRestart` or `PowerCycle`).
//!
//! Only what bootfleet's Redfish driver uses is answered: the system
//! resource (`PowerState`), its `PATCH` (boot override) and the reset
//! action, behind HTTP Basic authentication. The server is axum, the one
//! the bootfleet panel already uses.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// The user and password every simulated BMC takes.
pub const USER: &str = "admin";
pub const PASSWORD: &str = "bmc-secret";
/// The Redfish system each simulated BMC manages.
pub const SYSTEM: &str = "/redfish/v1/Systems/1";

/// One simulated BMC's machine.
#[derive(Default)]
pub struct Bmc {
    on: AtomicBool,
    /// Signalled at each power-on or reset (a permit is kept when the
    /// machine is not waiting yet, so none is lost).
    pub power_on: Notify,
    /// One-time boot overrides set (`PATCH`).
    pub overrides: AtomicU32,
    /// Requests refused for bad credentials.
    pub refused: AtomicU32,
}

impl Bmc {
    /// The machine's boot ended (it powers itself off, as the test
    /// image does, so that a later power-on boots it again).
    pub fn powered_off(&self) {
        self.on.store(false, Ordering::Release);
    }
}

/// Starts `count` BMCs on `host`, ports `first_port`.. (one each); they
/// serve until the runtime ends.
pub async fn start(
    count: usize,
    host: Ipv4Addr,
    first_port: u16,
) -> Result<Vec<(Arc<Bmc>, SocketAddr)>> {
    let mut bmcs = Vec::with_capacity(count);
    for index in 0..count {
        let port = u16::try_from(first_port as usize + index)
            .ok()
            .filter(|p| *p > 0)
            .context("--bmc-first-port + --machines passes port 65535")?;
        let address = SocketAddr::from((host, port));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on {address} for a simulated BMC"))?;
        let bmc = Arc::new(Bmc::default());
        let app = axum::Router::new()
            .route(SYSTEM, get(system).patch(boot_override))
            .route(
                &format!("{SYSTEM}/Actions/ComputerSystem.Reset"),
                post(reset),
            )
            .with_state(Arc::clone(&bmc));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        bmcs.push((bmc, address));
    }
    Ok(bmcs)
}

/// Whether the request carries the BMC's user and password.
fn authorized(bmc: &Bmc, headers: &HeaderMap) -> bool {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    );
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == expected);
    if !ok {
        bmc.refused.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

fn refused() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": {"message": "authentication required"}})),
    )
        .into_response()
}

/// A request's JSON body (null when it is not JSON) once its credentials
/// are checked; `None` when they are wrong (answer [`refused`]).
fn authorized_body(bmc: &Bmc, headers: &HeaderMap, body: &[u8]) -> Option<Value> {
    authorized(bmc, headers).then(|| serde_json::from_slice(body).unwrap_or(Value::Null))
}

async fn system(State(bmc): State<Arc<Bmc>>, headers: HeaderMap) -> Response {
    if !authorized(&bmc, &headers) {
        return refused();
    }
    let state = if bmc.on.load(Ordering::Acquire) {
        "On"
    } else {
        "Off"
    };
    axum::Json(json!({
        "@odata.id": SYSTEM,
        "Id": "1",
        "PowerState": state,
        "Boot": {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None"},
    }))
    .into_response()
}

async fn boot_override(
    State(bmc): State<Arc<Bmc>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(body) = authorized_body(&bmc, &headers, &body) else {
        return refused();
    };
    if body.pointer("/Boot/BootSourceOverrideTarget").is_none() {
        return (StatusCode::BAD_REQUEST, "PATCH only works for Boot").into_response();
    }
    bmc.overrides.fetch_add(1, Ordering::Relaxed);
    StatusCode::NO_CONTENT.into_response()
}

async fn reset(
    State(bmc): State<Arc<Bmc>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(body) = authorized_body(&bmc, &headers, &body) else {
        return refused();
    };
    match body["ResetType"].as_str() {
        Some("On" | "ForceOn") => {
            if !bmc.on.swap(true, Ordering::AcqRel) {
                bmc.power_on.notify_one();
            }
        }
        Some("ForceRestart" | "PowerCycle" | "GracefulRestart") => {
            bmc.on.store(true, Ordering::Release);
            bmc.power_on.notify_one();
        }
        Some("ForceOff" | "GracefulShutdown") => bmc.on.store(false, Ordering::Release),
        other => {
            return (
                StatusCode::BAD_REQUEST,
                format!("ResetType {other:?} is not supported"),
            )
                .into_response()
        }
    }
    StatusCode::NO_CONTENT.into_response()
}
