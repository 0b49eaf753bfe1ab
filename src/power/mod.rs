//! Power control through machines' BMCs: Redfish and IPMI 2.0 over LAN.
//!
//! [`execute`] runs one action against one BMC, bounded by a timeout, and
//! says what happened in words an operator can act on ([`PowerError`]).
//! [`dispatch::Dispatcher`] runs many at once on a bounded set of threads
//! (a dead or hanging BMC holds one thread until its timeout, never the
//! others), and [`waves`] powers a whole selection on in waves paced by
//! what the boot servers can take.
//!
//! * Redfish ([`redfish`]): `ureq` with rustls, the HTTP client the
//!   project already uses, blocking, on the dispatcher's threads.
//! * IPMI ([`ipmi`]): runs `ipmitool -I lanplus`. The Rust IPMI crates
//!   were weighed against it: `ipmi-rs` 0.4 has RMCP+ but says itself that
//!   its implementation is not security-vetted and must not be relied on,
//!   and documents 4% of its API; `ipmitool` is what every distribution
//!   ships, what operators already script, and knows decades of vendor
//!   quirks (cipher suite negotiation, retries). The password reaches it
//!   in its environment (`-E`), never on a command line others can read.

pub mod dispatch;
pub mod headroom;
pub mod ipmi;
pub mod redfish;
pub mod waves;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::inventory::bmc::{BmcProtocol, BmcTarget};

/// What to do to a machine's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PowerAction {
    On,
    /// Ask the OS to shut down (ACPI power button).
    SoftOff,
    /// Cut the power.
    Off,
    /// Off, then on (on when it was off).
    Cycle,
    /// A hard reset (the power stays on).
    Reset,
    /// Only read the power state.
    Status,
}

impl PowerAction {
    pub const ALL: [PowerAction; 6] = [
        PowerAction::On,
        PowerAction::SoftOff,
        PowerAction::Off,
        PowerAction::Cycle,
        PowerAction::Reset,
        PowerAction::Status,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::On => "on",
            PowerAction::SoftOff => "soft-off",
            PowerAction::Off => "off",
            PowerAction::Cycle => "cycle",
            PowerAction::Reset => "reset",
            PowerAction::Status => "status",
        }
    }

    /// Whether the machine boots after this action (so a one-time network
    /// boot is set first, and its boot is watched).
    pub fn boots(self) -> bool {
        matches!(
            self,
            PowerAction::On | PowerAction::Cycle | PowerAction::Reset
        )
    }
}

impl std::str::FromStr for PowerAction {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "power action {text:?} is not one of on, soft-off, off, cycle, reset, status"
                )
            })
    }
}

/// Which device the machine boots from next, once, before a boot action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootOverride {
    /// Leave the BMC's boot order as it is.
    #[default]
    None,
    /// PXE (legacy BIOS or UEFI, as the firmware is set up).
    Pxe,
    /// PXE in UEFI mode (IPMI `options=efiboot`).
    UefiPxe,
    /// UEFI HTTP boot (Redfish `UefiHttp`; IPMI has no such device and
    /// falls back to UEFI PXE).
    UefiHttp,
}

impl std::str::FromStr for BootOverride {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(BootOverride::None),
            "pxe" => Ok(BootOverride::Pxe),
            "uefi-pxe" => Ok(BootOverride::UefiPxe),
            "uefi-http" => Ok(BootOverride::UefiHttp),
            _ => Err(format!(
                "boot device {text:?} is not one of none, pxe, uefi-pxe, uefi-http"
            )),
        }
    }
}

/// A machine's power as its BMC reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    On,
    Off,
}

/// Why a power action failed, per machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PowerError {
    #[error("BMC {0} is unreachable ({1}); check its address and the management network")]
    Unreachable(String, String),
    #[error("BMC {0} did not answer within {1} s")]
    Timeout(String, u64),
    #[error("BMC {0} refused the user name or password; set them again with `bootfleet machines set MAC --bmc URL`")]
    Credentials(String),
    #[error("BMC {0} took the password but the session keys did not match: it wants a K_g key, or another one; set it with `bootfleet machines set MAC --bmc URL --bmc-kg-file FILE`")]
    KgKey(String),
    #[error("BMC {0} refused the request: {1}")]
    Refused(String, String),
    #[error("BMC {0} answered something bootfleet does not understand: {1}")]
    Protocol(String, String),
    #[error("{0}")]
    Setup(String),
}

impl PowerError {
    /// A short name for metrics and the panel's failure counts.
    pub fn kind(&self) -> &'static str {
        match self {
            PowerError::Unreachable(..) => "unreachable",
            PowerError::Timeout(..) => "timeout",
            PowerError::Credentials(..) | PowerError::KgKey(..) => "credentials",
            PowerError::Refused(..) => "refused",
            PowerError::Protocol(..) => "protocol",
            PowerError::Setup(..) => "setup",
        }
    }
}

/// A BMC and its password, opened from the store for one action. `Debug`
/// leaves the password out.
#[derive(Clone)]
pub struct Credentials {
    pub target: BmcTarget,
    pub password: String,
    /// IPMI: the BMC's K_g key, as bytes (see
    /// [`crate::inventory::bmc::parse_kg_key`]).
    pub kg_key: Option<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kg = if self.kg_key.is_some() {
            ", kg: ***"
        } else {
            ""
        };
        write!(f, "Credentials({}, password: ***{kg})", self.target)
    }
}

/// How long one BMC may take, and TLS trust for Redfish.
#[derive(Debug, Clone)]
pub struct Limits {
    /// For each request to a BMC (an action is one to three of them).
    pub timeout: Duration,
    /// PEM certificates that Redfish BMCs' certificates must chain to;
    /// empty: the public web roots.
    pub ca_certificates: Vec<Vec<u8>>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(20),
            ca_certificates: Vec::new(),
        }
    }
}

/// What an action did: the power state after it, when the BMC said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub state: Option<PowerState>,
    /// What was done, e.g. `"boot once from pxe, then on"`.
    pub done: String,
}

/// Runs `action` (after setting the one-time `boot` device when the
/// action boots the machine) against the BMC in `credentials`.
pub fn execute(
    credentials: &Credentials,
    action: PowerAction,
    boot: BootOverride,
    limits: &Limits,
) -> Result<Outcome, PowerError> {
    let boot = if action.boots() {
        boot
    } else {
        BootOverride::None
    };
    match credentials.target.protocol {
        BmcProtocol::Ipmi => ipmi::execute(credentials, action, boot, limits),
        BmcProtocol::Redfish | BmcProtocol::RedfishHttp => {
            redfish::execute(credentials, action, boot, limits)
        }
    }
}

/// The words of an outcome: `"boot once from pxe, then on"`.
fn describe(action: PowerAction, boot: BootOverride) -> String {
    let device = match boot {
        BootOverride::None => return action.as_str().to_string(),
        BootOverride::Pxe => "pxe",
        BootOverride::UefiPxe => "uefi-pxe",
        BootOverride::UefiHttp => "uefi-http",
    };
    format!("boot once from {device}, then {}", action.as_str())
}
