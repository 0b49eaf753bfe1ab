//! IPMI 2.0 power control over LAN, by running `ipmitool -I lanplus`
//! (see the module above for why not a Rust IPMI crate).
//!
//! The password goes to `ipmitool` in `IPMI_PASSWORD` (`-E`) and a K_g key
//! in `IPMI_KGKEY` (`-K`), never on its command line; each run is killed
//! when it outlives the timeout.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    describe, BootOverride, Credentials, Limits, Outcome, PowerAction, PowerError, PowerState,
};

/// The `ipmitool` to run: `BOOTFLEET_IPMITOOL` if set (tests, a build of
/// one's own), else the one on `PATH`.
fn ipmitool() -> String {
    std::env::var("BOOTFLEET_IPMITOOL").unwrap_or_else(|_| "ipmitool".into())
}

/// Runs `action` against an IPMI BMC.
pub fn execute(
    credentials: &Credentials,
    action: PowerAction,
    boot: BootOverride,
    limits: &Limits,
) -> Result<Outcome, PowerError> {
    let run = |arguments: &[&str]| run(credentials, arguments, limits.timeout);
    match boot {
        BootOverride::None => {}
        BootOverride::Pxe => drop(run(&["chassis", "bootdev", "pxe"])?),
        BootOverride::UefiPxe | BootOverride::UefiHttp => {
            drop(run(&["chassis", "bootdev", "pxe", "options=efiboot"])?)
        }
    }
    let before = parse_state(credentials, &run(&["chassis", "power", "status"])?)?;
    let command = match (action, before) {
        (PowerAction::Status, _)
        | (PowerAction::On, PowerState::On)
        | (PowerAction::Off | PowerAction::SoftOff, PowerState::Off) => None,
        (PowerAction::On, PowerState::Off)
        | (PowerAction::Cycle | PowerAction::Reset, PowerState::Off) => Some("on"),
        (PowerAction::Off, PowerState::On) => Some("off"),
        (PowerAction::SoftOff, PowerState::On) => Some("soft"),
        (PowerAction::Cycle, PowerState::On) => Some("cycle"),
        (PowerAction::Reset, PowerState::On) => Some("reset"),
    };
    if let Some(command) = command {
        run(&["chassis", "power", command])?;
    }
    let state = match (action, command) {
        (PowerAction::SoftOff, Some(_)) => None,
        (_, None) => Some(before),
        // The BMC answers the command before the power has changed;
        // the state is asked once more, as the operator would.
        _ => run(&["chassis", "power", "status"])
            .ok()
            .and_then(|out| parse_state(credentials, &out).ok()),
    };
    Ok(Outcome {
        state,
        done: describe(action, boot),
    })
}

/// `Chassis Power is on` / `off`.
fn parse_state(credentials: &Credentials, output: &str) -> Result<PowerState, PowerError> {
    let text = output.to_ascii_lowercase();
    if text.contains("power is on") {
        Ok(PowerState::On)
    } else if text.contains("power is off") {
        Ok(PowerState::Off)
    } else {
        Err(PowerError::Protocol(
            name(credentials),
            format!("ipmitool said {:?}", output.trim()),
        ))
    }
}

fn name(credentials: &Credentials) -> String {
    format!("{}:{}", credentials.target.host, credentials.target.port)
}

/// Runs one `ipmitool` command against the BMC; its standard output.
fn run(
    credentials: &Credentials,
    arguments: &[&str],
    timeout: Duration,
) -> Result<String, PowerError> {
    let target = &credentials.target;
    let port = target.port.to_string();
    let mut command = Command::new(ipmitool());
    command.args([
        "-I",
        "lanplus",
        "-H",
        &target.host,
        "-p",
        &port,
        "-U",
        &target.user,
        "-E",
    ]);
    if let Some(kg) = &credentials.kg_key {
        // From the environment, like the password: `-k`/`-y` would put the
        // key on a command line any local user can read.
        use std::os::unix::ffi::OsStrExt;
        command
            .arg("-K")
            .env("IPMI_KGKEY", std::ffi::OsStr::from_bytes(kg));
    }
    let mut child = command
        // One retry, a few seconds each: the timeout below bounds the whole.
        // `-v` makes it say why a session failed (a wrong password and a
        // silent BMC both end in "Unable to establish" without it).
        .args(["-N", "2", "-R", "2", "-v"])
        .args(arguments)
        .env("IPMI_PASSWORD", &credentials.password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| {
            PowerError::Setup(format!(
                "cannot run {}: {error}; install ipmitool (Debian: apt install ipmitool) to drive IPMI BMCs",
                ipmitool()
            ))
        })?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PowerError::Timeout(name(credentials), timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(error) => return Err(PowerError::Setup(format!("waiting for ipmitool: {error}"))),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    if status.success() {
        return Ok(stdout);
    }
    Err(classify_failure(credentials, &stderr))
}

/// What `ipmitool`'s complaint means.
fn classify_failure(credentials: &Credentials, stderr: &str) -> PowerError {
    let said: String = stderr
        .lines()
        .map(str::trim)
        // `-v` chatter that says nothing about the failure.
        .filter(|l| !l.is_empty() && !l.starts_with("Loading IANA"))
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .filter(|c| !c.is_control())
        .take(300)
        .collect();
    let lower = said.to_ascii_lowercase();
    if lower.contains("unauthorized name")
        || lower.contains("rakp 2 hmac is invalid")
        || lower.contains("rakp 2 message indicates an error")
        || lower.contains("invalid user name")
    {
        PowerError::Credentials(name(credentials))
    } else if lower.contains("rakp 4 message has invalid integrity") {
        // The BMC proved it knows the password, but its session key came
        // out different: it mixed in a K_g key this side lacks, or another.
        PowerError::KgKey(name(credentials))
    } else if lower.contains("unable to establish")
        || lower.contains("get auth capabilities error")
        || lower.contains("no response")
        || lower.contains("address lookup")
        || lower.contains("connection refused")
    {
        PowerError::Unreachable(name(credentials), said)
    } else {
        PowerError::Refused(name(credentials), said)
    }
}
