//! Redfish power control (DMTF DSP0266): the system resource's
//! `PowerState`, `ComputerSystem.Reset`, and a one-time boot override
//! (`Boot.BootSourceOverrideTarget` with `BootSourceOverrideEnabled:
//! Once`), over HTTPS with HTTP Basic authentication.
//!
//! Cycle is done as ForceOff then On, not `PowerCycle`: every Redfish
//! service (and the sushy-tools emulator) has those two, while
//! `PowerCycle` is optional.

use std::sync::Arc;

use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    describe, BootOverride, Credentials, Limits, Outcome, PowerAction, PowerError, PowerState,
};
use crate::inventory::bmc::BmcProtocol;

/// Runs `action` against a Redfish BMC.
pub fn execute(
    credentials: &Credentials,
    action: PowerAction,
    boot: BootOverride,
    limits: &Limits,
) -> Result<Outcome, PowerError> {
    let bmc = Bmc::new(credentials, limits)?;
    if boot != BootOverride::None {
        bmc.boot_once(boot)?;
    }
    let before = bmc.power_state()?;
    let reset = |kind: &str| bmc.reset(kind);
    match action {
        PowerAction::Status => {}
        PowerAction::On if before == PowerState::On => {}
        PowerAction::On => reset("On")?,
        PowerAction::Off if before == PowerState::Off => {}
        PowerAction::Off => reset("ForceOff")?,
        PowerAction::SoftOff if before == PowerState::Off => {}
        PowerAction::SoftOff => reset("GracefulShutdown")?,
        PowerAction::Reset if before == PowerState::Off => reset("On")?,
        PowerAction::Reset => reset("ForceRestart")?,
        PowerAction::Cycle => {
            if before == PowerState::On {
                reset("ForceOff")?;
            }
            reset("On")?;
        }
    }
    let state = match action {
        PowerAction::Status => Some(before),
        // A soft off takes the OS its time: the state is read later.
        PowerAction::SoftOff => None,
        _ => Some(bmc.power_state()?),
    };
    Ok(Outcome {
        state,
        done: describe(action, boot),
    })
}

/// One BMC's system resource, with a client set up for it.
struct Bmc<'a> {
    agent: ureq::Agent,
    system_url: String,
    authorization: String,
    name: String,
    limits: &'a Limits,
}

impl<'a> Bmc<'a> {
    fn new(credentials: &Credentials, limits: &'a Limits) -> Result<Self, PowerError> {
        let target = &credentials.target;
        let scheme = match target.protocol {
            BmcProtocol::RedfishHttp => "http",
            _ => "https",
        };
        let host = if target.host.contains(':') {
            format!("[{}]", target.host)
        } else {
            target.host.clone()
        };
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{}:{}", target.user, credentials.password))
        );
        Ok(Self {
            agent: agent(target.verify_tls, limits)?,
            system_url: format!("{scheme}://{host}:{}{}", target.port, target.system),
            authorization,
            name: format!("{}:{}", target.host, target.port),
            limits,
        })
    }

    fn power_state(&self) -> Result<PowerState, PowerError> {
        let system = self.call("GET", &self.system_url, None)?;
        match system.get("PowerState").and_then(Value::as_str) {
            Some("On" | "PoweringOn") => Ok(PowerState::On),
            Some("Off" | "PoweringOff") => Ok(PowerState::Off),
            other => Err(PowerError::Protocol(
                self.name.clone(),
                format!("the system's PowerState is {other:?}"),
            )),
        }
    }

    fn reset(&self, kind: &str) -> Result<(), PowerError> {
        let url = format!("{}/Actions/ComputerSystem.Reset", self.system_url);
        self.call("POST", &url, Some(json!({ "ResetType": kind })))
            .map(drop)
    }

    fn boot_once(&self, boot: BootOverride) -> Result<(), PowerError> {
        let (target, mode) = match boot {
            BootOverride::None => return Ok(()),
            BootOverride::Pxe => ("Pxe", None),
            BootOverride::UefiPxe => ("Pxe", Some("UEFI")),
            BootOverride::UefiHttp => ("UefiHttp", Some("UEFI")),
        };
        let mut settings = json!({
            "BootSourceOverrideEnabled": "Once",
            "BootSourceOverrideTarget": target,
        });
        if let Some(mode) = mode {
            settings["BootSourceOverrideMode"] = json!(mode);
        }
        self.call("PATCH", &self.system_url, Some(json!({ "Boot": settings })))
            .map(drop)
    }

    /// One request; the JSON body of a 2xx answer (`Null` when empty).
    fn call(&self, method: &str, url: &str, body: Option<Value>) -> Result<Value, PowerError> {
        let result = match (method, body) {
            ("GET", _) => self
                .agent
                .get(url)
                .header("Authorization", &self.authorization)
                .header("Accept", "application/json")
                .call(),
            ("PATCH", Some(body)) => self
                .agent
                .patch(url)
                .header("Authorization", &self.authorization)
                .send_json(body),
            (_, body) => self
                .agent
                .post(url)
                .header("Authorization", &self.authorization)
                .send_json(body.unwrap_or(Value::Null)),
        };
        let mut response = result.map_err(|error| self.transport_error(error))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(1 << 20)
            .read_to_string()
            .unwrap_or_default();
        match status {
            200..=299 if text.trim().is_empty() => Ok(Value::Null),
            200..=299 => serde_json::from_str(&text).map_err(|_| {
                PowerError::Protocol(self.name.clone(), format!("{method} {url}: not JSON"))
            }),
            401 | 403 => Err(PowerError::Credentials(self.name.clone())),
            _ => Err(PowerError::Refused(
                self.name.clone(),
                format!("{method} {}: HTTP {status}{}", url, redfish_message(&text)),
            )),
        }
    }

    fn transport_error(&self, error: ureq::Error) -> PowerError {
        match error {
            ureq::Error::Timeout(_) => {
                PowerError::Timeout(self.name.clone(), self.limits.timeout.as_secs())
            }
            ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => {
                PowerError::Timeout(self.name.clone(), self.limits.timeout.as_secs())
            }
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) => PowerError::Unreachable(
                self.name.clone(),
                format!(
                    "TLS: {error}; give its CA in [power] ca_file, or add ?verify=false to its URL"
                ),
            ),
            other => PowerError::Unreachable(self.name.clone(), other.to_string()),
        }
    }
}

/// `: message` from a Redfish error body (`error.@Message.ExtendedInfo`),
/// or a short piece of a plain one.
fn redfish_message(text: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| {
            v.pointer("/error/@Message.ExtendedInfo/0/Message")
                .or_else(|| v.pointer("/error/message"))
        })
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| text.trim().chars().take(160).collect());
    let message: String = message.chars().filter(|c| !c.is_control()).collect();
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A client for one BMC: its timeout, and its TLS trust (the configured
/// CA certificates, or the public roots, or none when the operator turned
/// verification off for this BMC).
fn agent(verify: bool, limits: &Limits) -> Result<ureq::Agent, PowerError> {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let mut tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .unversioned_rustls_crypto_provider(Arc::new(
            tokio_rustls::rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .disable_verification(!verify);
    if !limits.ca_certificates.is_empty() {
        let certificates = limits
            .ca_certificates
            .iter()
            .map(|pem| Certificate::from_pem(pem).map(|c| c.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| PowerError::Setup(format!("[power] ca_file: {error}")))?;
        tls = tls.root_certs(RootCerts::Specific(Arc::new(certificates)));
    }
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(limits.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls.build())
        .build();
    Ok(config.into())
}
