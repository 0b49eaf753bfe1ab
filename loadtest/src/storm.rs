//! `storm`: thousands of simulated machines walking the real boot chain at
//! once — DHCP as PXE firmware (through a relay agent, or as real
//! broadcasts from a namespace the tool creates), the loader over
//! TFTP with the options that firmware sends, DHCP again as iPXE, the chain
//! script and the machine's own script over HTTP (followed as iPXE follows
//! them), then its kernel and initrds over HTTP or TFTP as the script says.
//! Every byte is checked against the boot directory (size and SHA-256, or
//! block by block over TFTP); a fast wrong answer is a failure.
//!
//! The load is bounded: a fixed number of machines, at most `concurrency`
//! booting at once, and a hard time limit after which the machines still
//! booting are counted as cut, by the phase they were in. Failures are
//! counted by phase and cause, never hidden.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dhcp::{self, ClientIdentity, DhcpLink, Stage};
use crate::{http, ipxe, tftp};

/// Firmware the simulated machines run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// BIOS PXE ROM (option 93 = 0): loader with blksize 1432 + tsize.
    Bios,
    /// x64 UEFI (option 93 = 7): loader with blksize 1468 + windowsize 4 + tsize.
    Uefi,
    /// Every other machine BIOS, the rest UEFI.
    Mixed,
}

/// How DHCP reaches the server.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DhcpVia {
    /// A relay agent at `--relay` (giaddr), as a rack behind a router.
    Relay,
    /// Real broadcasts on a boot LAN, from a namespace the tool creates.
    Broadcast,
}

/// When the machines are powered on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// All at the same moment.
    Storm,
    /// Evenly over `--ramp-seconds`.
    Ramp,
    /// In `--waves` groups, `--wave-interval` seconds apart.
    Waves,
}

/// Where a machine's boot ends on purpose.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAfter {
    /// After its first DHCP exchange (DISCOVER, OFFER, REQUEST, ACK).
    Dhcp,
    /// After its own script (no kernel or initrd).
    Script,
    /// After the last initrd: the whole chain.
    Initrd,
}

#[derive(clap::Args, Clone, Debug)]
pub struct StormArgs {
    /// The boot server's address (DHCP on port 67, TFTP on --tftp-port);
    /// loopback, or a test namespace (BOOTFLEET_LOADTEST_NAMESPACE=1).
    #[arg(long)]
    pub server: Ipv4Addr,
    /// Machines to power on.
    #[arg(long)]
    pub machines: usize,
    /// The boot directory being served: every byte received is checked
    /// against the file of the same path in it.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, value_enum, default_value = "storm")]
    pub profile: Profile,
    #[arg(long, default_value_t = 10.0)]
    pub ramp_seconds: f64,
    #[arg(long, default_value_t = 4)]
    pub waves: usize,
    #[arg(long, default_value_t = 5.0)]
    pub wave_interval: f64,
    #[arg(long, value_enum, default_value = "bios")]
    pub firmware: Firmware,
    #[arg(long, value_enum, default_value = "initrd")]
    pub stop_after: StopAfter,
    /// How DHCP reaches the server: through a relay agent (on loopback),
    /// or as real broadcasts from a namespace the tool creates and joins to
    /// `--attach BRIDGE`.
    #[arg(long, value_enum, default_value = "relay")]
    pub dhcp_via: DhcpVia,
    /// With `--dhcp-via broadcast`: the bridge (in this namespace) of the
    /// boot LAN the server listens on; the tool adds its own veth to it.
    #[arg(long)]
    pub attach: Option<String>,
    /// The relay agent's address (giaddr): the machines' subnet must be a
    /// relayed range of the server (e.g. 127.1.0.10-127.1.255.250/16).
    #[arg(long, default_value = "127.1.0.1")]
    pub relay: Ipv4Addr,
    /// Interface the relay socket is bound to ("" for none).
    #[arg(long, default_value = "lo")]
    pub relay_device: String,
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// An HTTP server that sends nothing for this long has failed the
    /// request (iPXE waits on progress, not on the whole transfer).
    #[arg(long, default_value_t = 30.0)]
    pub http_timeout: f64,
    /// A machine whose boot fails starts over from DHCP a second later,
    /// up to this many more times, as one that its BMC power-cycles (or
    /// whose firmware retries) would; 0: a failure is final.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Most machines booting at once (0: all).
    #[arg(long, default_value_t = 0)]
    pub concurrency: usize,
    /// Hard limit of the whole run, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub time_limit: f64,
    /// First machine number (MACs are 02:bf:NN:NN:NN:NN from it).
    #[arg(long, default_value_t = 0)]
    pub first: u32,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Free-form label copied into the report.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML chart here.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Let bootfleet power the machines on: each gets a simulated BMC
    /// (registered with the panel at `--panel`), bootfleet is asked to
    /// power them all on, and each machine boots when its BMC is told to,
    /// then checks in. The run's clock starts at the power-on request.
    #[arg(long, value_enum)]
    pub power_via: Option<PowerVia>,
    /// The bootfleet panel (with `--power-via`).
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub panel: String,
    /// An API token of scope admin (BMCs are set with it).
    #[arg(long, env = "BOOTFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// How bootfleet paces the power-on: `all`, `adaptive`, or
    /// `SIZE/SECONDS` (fixed waves); `operator`: the tool asks for nothing
    /// and waits for someone to power the machines on (the panel, the CLI).
    #[arg(long, default_value = "adaptive")]
    pub power_waves: String,
    /// The first simulated BMC's port on 127.0.0.1 (one port each).
    #[arg(long, default_value_t = 20000)]
    pub bmc_first_port: u16,
    /// Seconds bootfleet gives each machine to check in (default: the run's
    /// time limit).
    #[arg(long)]
    pub power_deadline: Option<u64>,
    /// Ask bootfleet to power-cycle once each machine that misses it.
    #[arg(long)]
    pub retry_by_cycle: bool,
    /// Machines whose OS does not check in on their first boot (an OS
    /// that hung): every Nth machine (0: none).
    #[arg(long, default_value_t = 0)]
    pub hang_every: usize,
}

/// The steps of a boot, in order; with `--power-via`, `power` (from the
/// power-on request to the BMC's reset) comes first and `checkin` (the
/// booted OS calling the server) last.
pub const PHASES: [&str; 7] = [
    "dhcp", "loader", "script", "kernel", "initrd", "checkin", "power",
];
/// Indexes of the phases in [`PHASES`] that only `--power-via` has.
const CHECKIN: usize = 5;
const POWER: usize = 6;

/// How simulated machines are powered on by bootfleet.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerVia {
    /// Simulated Redfish BMCs on loopback, one port each.
    Redfish,
}

/// One machine's story.
#[derive(Debug, Clone, Serialize)]
pub struct MachineRecord {
    pub mac: String,
    /// Each stretch spent in a phase: (index in [`PHASES`], from, to), in
    /// seconds after the run started. DHCP appears twice (firmware, iPXE).
    pub intervals: Vec<(usize, f64, f64)>,
    pub powered_on: f64,
    /// When it booted (or failed, or was cut).
    pub ended: f64,
    /// `booted`, `failed` or `cut`.
    pub outcome: &'static str,
    /// The phase it failed or was cut in, and why.
    pub failed_phase: Option<&'static str>,
    pub cause: Option<String>,
    pub bytes: u64,
    /// Boots it started (more than one with `--retries`).
    pub attempts: u32,
    /// Every address an ACK gave it, in order.
    pub addresses: Vec<Ipv4Addr>,
}

/// Latency figures of one phase, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The run's report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub label: String,
    pub server: String,
    pub firmware: String,
    pub profile: String,
    pub machines: usize,
    pub booted: usize,
    pub failed: usize,
    /// Still booting at the time limit.
    pub cut: usize,
    pub seconds: f64,
    pub bytes_received: u64,
    pub goodput_mb_s: f64,
    /// Per phase, and `total` (power-on to booted), over booted machines.
    pub phases: BTreeMap<String, Percentiles>,
    /// `phase: cause` → machines.
    pub failures: BTreeMap<String, usize>,
    /// Machines that needed more than one boot (`--retries`).
    pub retried: usize,
    /// Every address each machine was given (MAC → addresses), so that a
    /// test can check no address went to two machines.
    pub leases: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Machines that finished booting in each second of the run.
    pub booted_per_second: Vec<usize>,
    /// Machines in each phase, sampled every `tick_seconds`.
    pub tick_seconds: f64,
    pub in_phase: BTreeMap<String, Vec<usize>>,
    /// Power-on to booted, per booted machine (for the chart).
    #[serde(skip)]
    pub boot_seconds: Vec<f64>,
}

/// An expected file: its bytes (TFTP compares block by block), length
/// and digest.
struct Expected {
    bytes: Vec<u8>,
    sha256: [u8; 32],
}

/// What every machine shares.
struct Shared {
    args: StormArgs,
    dhcp: Arc<DhcpLink>,
    /// With broadcast DHCP: the tool's own interface, which every leased
    /// address is added to (so that the server's answers reach it).
    lan_interface: Option<String>,
    started: Instant,
    deadline: Instant,
    files: Mutex<HashMap<String, Arc<Expected>>>,
    /// With `--power-via`: each machine's simulated BMC.
    bmcs: Vec<Arc<crate::bmc::Bmc>>,
}

impl Shared {
    fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The file at `path` (relative, from a URL or a boot-file name) in
    /// the boot directory, read once.
    fn expected(&self, path: &str) -> Result<Arc<Expected>, String> {
        if let Some(found) = self
            .files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return Ok(Arc::clone(found));
        }
        let relative = Path::new(path.trim_start_matches('/'));
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(format!("{path}: not a path inside the boot directory"));
        }
        let bytes = std::fs::read(self.args.root.join(relative))
            .map_err(|e| format!("{path}: cannot read the expected file: {e}"))?;
        let expected = Arc::new(Expected {
            sha256: Sha256::digest(&bytes).into(),
            bytes,
        });
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), Arc::clone(&expected));
        Ok(expected)
    }
}

pub fn run(args: StormArgs) -> Result<Report> {
    crate::check_target(&SocketAddr::from((args.server, 67)))?;
    if args.machines == 0 {
        bail!("--machines must be at least 1");
    }
    if args.machines > 16_000_000 {
        bail!("--machines is at most 16 million (the MAC numbering)");
    }
    // The namespace must be entered before the runtime's threads exist:
    // they inherit it.
    let lan = match (args.dhcp_via, &args.attach) {
        (DhcpVia::Broadcast, Some(bridge)) => Some(ClientLan::create(bridge)?),
        (DhcpVia::Broadcast, None) => bail!("--dhcp-via broadcast needs --attach BRIDGE"),
        (DhcpVia::Relay, _) => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let report = runtime.block_on(storm(args, lan.as_ref().map(|l| l.interface.clone())));
    drop(runtime);
    drop(lan);
    report
}

/// The namespace and veth of `--dhcp-via broadcast`: the tool's machines
/// live in it, on the boot LAN through the bridge; removed when dropped.
struct ClientLan {
    namespace: String,
    interface: String,
}

fn ip(args: &[&str]) -> Result<()> {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .with_context(|| format!("cannot run ip {args:?}"))?;
    if !status.success() {
        bail!("ip {args:?} failed with {status}");
    }
    Ok(())
}

impl ClientLan {
    fn create(bridge: &str) -> Result<ClientLan> {
        let id = std::process::id();
        let namespace = format!("bfload{id}");
        let outer = format!("bfl{id}a");
        let interface = format!("bfl{id}b");
        ip(&["netns", "add", &namespace])?;
        let lan = ClientLan {
            namespace,
            interface,
        };
        ip(&[
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            &lan.interface,
        ])?;
        ip(&["link", "set", &outer, "master", bridge, "up"])?;
        ip(&["link", "set", &lan.interface, "netns", &lan.namespace])?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "set", lan.interface.as_str(), "up"],
            // Every leased address is on this link; the server is reached on it.
            vec!["route", "add", "default", "dev", lan.interface.as_str()],
        ] {
            let mut all = vec!["-n", lan.namespace.as_str()];
            all.extend(args);
            ip(&all)?;
        }
        let file = std::fs::File::open(format!("/var/run/netns/{}", lan.namespace))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("cannot enter the machines' namespace")?;
        Ok(lan)
    }
}

impl Drop for ClientLan {
    fn drop(&mut self) {
        // The veth pair goes with the namespace once this process ends.
        let _ = ip(&["netns", "del", &self.namespace]);
    }
}

async fn storm(args: StormArgs, lan_interface: Option<String>) -> Result<Report> {
    let dhcp = match &lan_interface {
        Some(interface) => DhcpLink::broadcast(interface).with_context(|| {
            format!("cannot bind the DHCP client port on {interface} (needs root)")
        })?,
        None => {
            let device = (!args.relay_device.is_empty()).then_some(args.relay_device.as_str());
            DhcpLink::relay(args.relay, SocketAddr::from((args.server, 67)), device).with_context(
                || {
                    format!(
                        "cannot bind the relay agent to {}:67 (needs root; --relay-device {:?})",
                        args.relay, args.relay_device
                    )
                },
            )?
        }
    };
    let bmcs = match args.power_via {
        Some(PowerVia::Redfish) => register_bmcs(&args).await?,
        None => Vec::new(),
    };
    let started = Instant::now();
    let ctx = Arc::new(Shared {
        deadline: started + Duration::from_secs_f64(args.time_limit),
        args,
        dhcp,
        lan_interface,
        started,
        files: Mutex::new(HashMap::new()),
        bmcs,
    });
    let limit = match ctx.args.concurrency {
        0 => ctx.args.machines,
        n => n,
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(limit));
    let mut handles = Vec::with_capacity(ctx.args.machines);
    for index in 0..ctx.args.machines {
        let ctx = Arc::clone(&ctx);
        let permits = Arc::clone(&permits);
        handles.push(tokio::spawn(async move {
            if let Some(bmc) = ctx.bmcs.get(index) {
                // Off until bootfleet has its BMC power it on.
                let deadline = tokio::time::sleep_until(ctx.deadline.into());
                tokio::select! {
                    () = bmc.power_on.notified() => {}
                    () = deadline => return never_powered(&ctx, index),
                }
            } else {
                let at = ctx.started + power_on_offset(&ctx.args, index);
                tokio::time::sleep_until(at.into()).await;
            }
            let _permit = permits.acquire().await;
            boot(&ctx, index).await
        }));
    }
    if ctx.args.power_via.is_some() && ctx.args.power_waves != "operator" {
        request_power_on(&ctx).await?;
    }
    let mut records = Vec::with_capacity(handles.len());
    for handle in handles {
        if let Ok(record) = handle.await {
            records.push(record);
        }
    }
    Ok(report(&ctx, &records))
}

/// The MAC of machine `index`, as the server sees it.
fn mac_text(args: &StormArgs, index: usize) -> String {
    identity(args, index)
        .0
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Starts a simulated BMC per machine and sets each as its machine's BMC
/// in the panel (before the clock starts), 16 requests at a time.
async fn register_bmcs(args: &StormArgs) -> Result<Vec<Arc<crate::bmc::Bmc>>> {
    let token = args
        .token
        .as_deref()
        .context("--power-via needs --token (or BOOTFLEET_TOKEN), an admin API token")?;
    let started =
        crate::bmc::start(args.machines, Ipv4Addr::LOCALHOST, args.bmc_first_port).await?;
    let panel = args.panel.trim_end_matches('/').to_string();
    let mut pending = Vec::new();
    for (index, (_, address)) in started.iter().enumerate() {
        let url = format!("{panel}/api/v1/machines/{}/bmc", mac_text(args, index));
        let body = serde_json::json!({
            "url": format!("redfish+http://{}@{address}{}", crate::bmc::USER, crate::bmc::SYSTEM),
            "password": crate::bmc::PASSWORD,
        });
        let token = token.to_string();
        pending.push(tokio::spawn(async move {
            crate::panel::call(&url, "PUT", Some(&token), Some(&body)).await
        }));
        if pending.len() == 16 || index + 1 == started.len() {
            for call in pending.drain(..) {
                let (status, answer) = call.await??;
                if status != 200 {
                    bail!("setting a simulated BMC: HTTP {status} {answer}");
                }
            }
        }
    }
    eprintln!("{} simulated Redfish BMCs set in the panel", started.len());
    Ok(started.into_iter().map(|(bmc, _)| bmc).collect())
}

/// Asks bootfleet to power every machine on (`--power-waves`).
async fn request_power_on(ctx: &Shared) -> Result<()> {
    let args = &ctx.args;
    let pacing = match args.power_waves.as_str() {
        "all" => serde_json::json!({ "mode": "all-at-once" }),
        "adaptive" => serde_json::json!({ "mode": "adaptive" }),
        fixed => {
            let (size, seconds) = fixed
                .split_once('/')
                .and_then(|(n, s)| Some((n.parse::<usize>().ok()?, s.parse::<f64>().ok()?)))
                .with_context(|| {
                    format!("--power-waves {fixed:?}: write all, adaptive or SIZE/SECONDS")
                })?;
            serde_json::json!({ "mode": "fixed", "size": size, "interval_ms": (seconds * 1000.0) as u64 })
        }
    };
    let macs: Vec<String> = (0..args.machines).map(|i| mac_text(args, i)).collect();
    let body = serde_json::json!({
        "macs": macs,
        "action": "on",
        "boot": "pxe",
        "pacing": pacing,
        "checkin_deadline": args.power_deadline.unwrap_or(args.time_limit.ceil() as u64),
        "retry_by_cycle": args.retry_by_cycle,
    });
    let url = format!("{}/api/v1/power", args.panel.trim_end_matches('/'));
    let (status, answer) =
        crate::panel::call(&url, "POST", args.token.as_deref(), Some(&body)).await?;
    if status != 202 {
        bail!("the power-on request was refused: HTTP {status} {answer}");
    }
    Ok(())
}

/// A machine whose BMC was never told to power it on by the time limit.
fn never_powered(ctx: &Shared, index: usize) -> MachineRecord {
    MachineRecord {
        mac: mac_text(&ctx.args, index),
        intervals: vec![(POWER, 0.0, ctx.since_start())],
        powered_on: 0.0,
        ended: ctx.since_start(),
        outcome: "cut",
        failed_phase: Some("power"),
        cause: Some("never powered on".into()),
        bytes: 0,
        attempts: 0,
        addresses: Vec::new(),
    }
}

fn power_on_offset(args: &StormArgs, index: usize) -> Duration {
    let seconds = match args.profile {
        Profile::Storm => 0.0,
        Profile::Ramp => args.ramp_seconds * index as f64 / args.machines as f64,
        Profile::Waves => {
            let per_wave = args.machines.div_ceil(args.waves.max(1));
            (index / per_wave) as f64 * args.wave_interval
        }
    };
    Duration::from_secs_f64(seconds)
}

/// A machine's progress through the phases.
struct Tracker<'a> {
    ctx: &'a Shared,
    record: MachineRecord,
    /// The phase it is in, since when.
    current: Option<(usize, f64)>,
}

impl Tracker<'_> {
    fn enter(&mut self, phase: usize) {
        self.leave();
        self.current = Some((phase, self.ctx.since_start()));
    }

    fn leave(&mut self) {
        if let Some((phase, since)) = self.current.take() {
            self.record
                .intervals
                .push((phase, since, self.ctx.since_start()));
        }
    }

    fn finish(mut self, result: Result<(), String>) -> MachineRecord {
        let phase = self.current.map(|(p, _)| PHASES[p]);
        self.leave();
        self.record.ended = self.ctx.since_start();
        match result {
            Ok(()) => self.record.outcome = "booted",
            Err(cause) => {
                let cut = Instant::now() >= self.ctx.deadline;
                self.record.outcome = if cut { "cut" } else { "failed" };
                self.record.failed_phase = phase;
                self.record.cause = Some(if cut { "time limit".to_string() } else { cause });
            }
        }
        self.record
    }
}

fn identity(args: &StormArgs, index: usize) -> (ClientIdentity, Firmware) {
    let number = args.first.wrapping_add(index as u32);
    let n = number.to_be_bytes();
    let firmware = match args.firmware {
        Firmware::Mixed if index.is_multiple_of(2) => Firmware::Bios,
        Firmware::Mixed => Firmware::Uefi,
        other => other,
    };
    let mut uuid = [0u8; 16];
    uuid[..4].copy_from_slice(b"bflt");
    uuid[12..].copy_from_slice(&n);
    (
        ClientIdentity {
            mac: [0x02, 0xbf, n[0], n[1], n[2], n[3]],
            arch: if firmware == Firmware::Uefi { 7 } else { 0 },
            uuid,
        },
        firmware,
    )
}

async fn boot(ctx: &Shared, index: usize) -> MachineRecord {
    let (client, firmware) = identity(&ctx.args, index);
    let mac = client
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    // Powered on by bootfleet: its clock starts at the power-on request,
    // and the wait for its BMC's reset is its power phase.
    let powered = ctx.bmcs.get(index).map(|_| ctx.since_start());
    let mut tracker = Tracker {
        ctx,
        record: MachineRecord {
            mac: mac.clone(),
            intervals: powered.map_or_else(|| Vec::with_capacity(6), |at| vec![(POWER, 0.0, at)]),
            powered_on: if powered.is_some() {
                0.0
            } else {
                ctx.since_start()
            },
            ended: 0.0,
            outcome: "failed",
            failed_phase: None,
            cause: None,
            bytes: 0,
            attempts: 0,
            addresses: Vec::new(),
        },
        current: None,
    };
    loop {
        let attempt = tracker.record.attempts;
        tracker.record.attempts += 1;
        let mut result = walk(ctx, &client, firmware, &mac, index, attempt, &mut tracker).await;
        let whole_boot = ctx.args.stop_after == StopAfter::Initrd;
        if let (Ok(cmdline), Some(bmc), true) = (&result, ctx.bmcs.get(index), whole_boot) {
            tracker.enter(CHECKIN);
            let hangs = ctx.args.hang_every > 0
                && index.is_multiple_of(ctx.args.hang_every)
                && attempt == 0;
            if hangs {
                // This boot's OS hangs: only its BMC (a power cycle) brings
                // the machine back.
                let until = tokio::time::sleep_until(ctx.deadline.into());
                tokio::select! {
                    () = bmc.power_on.notified() => {}
                    () = until => {}
                }
                result = Err("its OS hung and it was never power-cycled".into());
                tracker.record.attempts += 1;
                let second = walk(
                    ctx,
                    &client,
                    firmware,
                    &mac,
                    index,
                    attempt + 1,
                    &mut tracker,
                );
                if Instant::now() < ctx.deadline {
                    if let Ok(cmdline) = second.await {
                        tracker.enter(CHECKIN);
                        result = check_in(&cmdline).await.map(|()| Vec::new());
                    }
                }
            } else {
                result = check_in(cmdline).await.map(|()| Vec::new());
            }
            bmc.powered_off();
        }
        let result = result.map(drop);
        let retry_at = Instant::now() + RETRY_DELAY;
        if result.is_ok() || attempt >= ctx.args.retries || retry_at >= ctx.deadline {
            return tracker.finish(result);
        }
        tracker.leave();
        tokio::time::sleep_until(retry_at.into()).await;
    }
}

/// How long a failed machine is off before it boots again (`--retries`).
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// What the booted OS does first: calls the check-in URL on its kernel
/// command line with its MAC and token, as `contrib/checkin` does.
async fn check_in(cmdline: &[String]) -> Result<(), String> {
    let word = |name: &str| {
        cmdline
            .iter()
            .find_map(|w| w.strip_prefix(name))
            .map(str::to_string)
            .ok_or_else(|| format!("no {name} on the kernel command line"))
    };
    let url = word("bootfleet.checkin=")?;
    let body =
        serde_json::json!({ "mac": word("bootfleet.mac=")?, "token": word("bootfleet.token=")? });
    match crate::panel::call(&url, "POST", None, Some(&body)).await {
        Ok((200, _)) => Ok(()),
        Ok((status, answer)) => Err(format!("check-in refused: HTTP {status} {answer}")),
        Err(error) => Err(format!("check-in: {error:#}")),
    }
}

/// The boot chain; `Err` carries the cause, the tracker the phase. A
/// whole boot returns its kernel's command line.
async fn walk(
    ctx: &Shared,
    client: &ClientIdentity,
    firmware: Firmware,
    mac: &str,
    index: usize,
    attempt: u32,
    tracker: &mut Tracker<'_>,
) -> Result<Vec<String>, String> {
    let xid = 0x5000_0000u32
        .wrapping_add((index as u32).wrapping_mul(2))
        .wrapping_add(attempt << 24);
    // The machine's HTTP connection, kept alive across its requests.
    let mut pool = http::Pool::default();
    tracker.enter(0);
    let lease = dhcp::obtain(&ctx.dhcp, client, xid, Stage::Firmware, ctx.deadline).await?;
    tracker.record.addresses.push(lease.address);
    if ctx.args.stop_after == StopAfter::Dhcp {
        return Ok(Vec::new());
    }
    let local = IpAddr::V4(lease.address);
    if let Some(interface) = &ctx.lan_interface {
        // The machine now owns its address on the LAN: answers to it (ARP,
        // TFTP, HTTP) must reach the tool.
        take_address(interface, lease.address).await?;
    }

    tracker.enter(1);
    let next_server = if lease.next_server.is_unspecified() {
        ctx.args.server
    } else {
        lease.next_server
    };
    if lease.boot_file.starts_with("http://") {
        fetch_url(ctx, &mut pool, &lease.boot_file, local, tracker).await?;
    } else {
        let (blksize, windowsize) = match firmware {
            Firmware::Uefi => (1468, Some(4)),
            _ => (1432, None),
        };
        fetch_tftp(
            ctx,
            SocketAddr::from((next_server, ctx.args.tftp_port)),
            &lease.boot_file,
            local,
            Some(blksize),
            windowsize,
            tracker,
        )
        .await?;
    }

    tracker.enter(0);
    let lease = dhcp::obtain(&ctx.dhcp, client, xid + 1, Stage::Ipxe, ctx.deadline).await?;
    tracker.record.addresses.push(lease.address);
    let local = IpAddr::V4(lease.address);
    if let Some(interface) = &ctx.lan_interface {
        // Usually the same address again; with several servers on the
        // LAN, another server may have answered with one of its own.
        take_address(interface, lease.address).await?;
    }

    tracker.enter(2);
    let mut settings = ipxe::Settings::default();
    for (name, value) in [
        ("mac", mac.to_string()),
        ("uuid", uuid_text(&client.uuid)),
        ("manufacturer", "bootfleet-loadtest".to_string()),
        ("product", "simulated machine".to_string()),
        ("serial", format!("SIM-{index}")),
        (
            "buildarch",
            if firmware == Firmware::Uefi {
                "x86_64"
            } else {
                "i386"
            }
            .to_string(),
        ),
        (
            "platform",
            if firmware == Firmware::Uefi {
                "efi"
            } else {
                "pcbios"
            }
            .to_string(),
        ),
        ("ip", lease.address.to_string()),
        ("next-server", lease.next_server.to_string()),
        ("filename", lease.boot_file.clone()),
    ] {
        settings.0.insert(name.to_string(), value);
    }
    let mut url = parse_url(&lease.boot_file, None)?;
    let (kernel, initrds, cmdline) = loop {
        let fetched = http_get(ctx, &mut pool, &url, local, true).await?;
        tracker.record.bytes += fetched.bytes;
        let body =
            String::from_utf8_lossy(fetched.body.as_deref().unwrap_or_default()).into_owned();
        let outcome = ipxe::run(&body, &mut settings).map_err(|e| format!("{url}: {e}"))?;
        if outcome.sleep_seconds > 0 {
            let until = Instant::now() + Duration::from_secs(outcome.sleep_seconds);
            if until >= ctx.deadline {
                return Err(format!(
                    "told to wait {} s for an operator",
                    outcome.sleep_seconds
                ));
            }
            tokio::time::sleep_until(until.into()).await;
        }
        match outcome.ending {
            ipxe::Ending::Chain(next) => url = parse_url(&next, Some(&url))?,
            ipxe::Ending::Boot {
                kernel,
                initrds,
                cmdline,
            } => break (kernel, initrds, cmdline),
            ipxe::Ending::Exit => return Err("the script exits to the local disk".into()),
        }
    };
    if ctx.args.stop_after == StopAfter::Script {
        return Ok(Vec::new());
    }
    let base = url;
    tracker.enter(3);
    fetch_url(ctx, &mut pool, &resolve(&kernel, &base)?, local, tracker).await?;
    tracker.enter(4);
    for initrd in &initrds {
        fetch_url(ctx, &mut pool, &resolve(initrd, &base)?, local, tracker).await?;
    }
    Ok(cmdline)
}

/// Adds `address` to `interface` (a lease renewed as iPXE is already there).
async fn take_address(interface: &str, address: Ipv4Addr) -> Result<(), String> {
    let output = tokio::process::Command::new("ip")
        .args(["addr", "add", &format!("{address}/32"), "dev", interface])
        .output()
        .await
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Already there (EEXIST: "File exists", or "Address already assigned"
    // from newer iproute2): the same machine's lease again.
    if output.status.success()
        || stderr.contains("File exists")
        || stderr.contains("already assigned")
    {
        Ok(())
    } else {
        Err(format!("cannot take address {address}: {}", stderr.trim()))
    }
}

fn uuid_text(uuid: &[u8; 16]) -> String {
    let hex: String = uuid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn parse_url(text: &str, base: Option<&url::Url>) -> Result<url::Url, String> {
    match base {
        Some(base) => base.join(text),
        None => url::Url::parse(text),
    }
    .map_err(|e| format!("{text}: not a URL ({e})"))
}

fn resolve(text: &str, base: &url::Url) -> Result<String, String> {
    Ok(parse_url(text, Some(base))?.to_string())
}

/// The file a URL names, relative to the boot directory.
fn url_path(url: &url::Url) -> String {
    percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
        .decode_utf8_lossy()
        .into_owned()
}

async fn http_get(
    ctx: &Shared,
    pool: &mut http::Pool,
    url: &url::Url,
    local: IpAddr,
    keep_body: bool,
) -> Result<http::Fetched, String> {
    if url.scheme() != "http" {
        return Err(format!("{url}: only http:// and tftp:// are simulated"));
    }
    let idle = Duration::from_secs_f64(ctx.args.http_timeout);
    let fetched = http::get(pool, url, local, keep_body, idle, ctx.deadline)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if fetched.status != 200 {
        return Err(format!("{url}: HTTP {}", fetched.status));
    }
    Ok(fetched)
}

/// Fetches a loader, kernel or initrd by URL and checks it.
async fn fetch_url(
    ctx: &Shared,
    pool: &mut http::Pool,
    text: &str,
    local: IpAddr,
    tracker: &mut Tracker<'_>,
) -> Result<(), String> {
    let url = parse_url(text, None)?;
    match url.scheme() {
        "tftp" => {
            let host: Ipv4Addr = url
                .host_str()
                .and_then(|h| h.parse().ok())
                .ok_or_else(|| format!("{url}: the load tester takes addresses, not names"))?;
            let port = url.port().unwrap_or(ctx.args.tftp_port);
            fetch_tftp(
                ctx,
                SocketAddr::from((host, port)),
                &url_path(&url),
                local,
                Some(1432),
                None,
                tracker,
            )
            .await
        }
        _ => {
            let expected = ctx.expected(&url_path(&url))?;
            let fetched = http_get(ctx, pool, &url, local, false).await?;
            tracker.record.bytes += fetched.bytes;
            if fetched.bytes != expected.bytes.len() as u64 || fetched.sha256 != expected.sha256 {
                return Err(format!(
                    "{url}: wrong bytes ({} bytes, SHA-256 differs from the boot directory's {} bytes)",
                    fetched.bytes,
                    expected.bytes.len()
                ));
            }
            Ok(())
        }
    }
}

async fn fetch_tftp(
    ctx: &Shared,
    server: SocketAddr,
    file: &str,
    local: IpAddr,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    tracker: &mut Tracker<'_>,
) -> Result<(), String> {
    let expected = ctx.expected(file)?;
    let request = tftp::Request {
        server,
        local: SocketAddr::new(local, 0),
        file: file.to_string(),
        blksize,
        windowsize,
        tsize: true,
        retry: Duration::from_secs(1),
        stall: Duration::from_secs(10),
    };
    let transfer = tftp::get(&request, &expected.bytes, ctx.deadline).await;
    tracker.record.bytes += transfer.bytes;
    match transfer.ending {
        tftp::Ending::Complete => Ok(()),
        tftp::Ending::Failed(why) => Err(format!("tftp {file}: {why}")),
        tftp::Ending::CutByTimeLimit => Err("time limit".into()),
    }
}

fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        let index = ((values.len() as f64 - 1.0) * q).round() as usize;
        (values[index] * 1000.0 * 10.0).round() / 10.0
    };
    Some(Percentiles {
        count: values.len(),
        p50_ms: pick(0.5),
        p90_ms: pick(0.9),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
    })
}

/// A failure's cause as a group: URLs without their query and with a MAC
/// address as `{mac}`, numbers (block numbers, sizes, addresses) as `N`,
/// so that a thousand machines failing alike count as one cause.
fn cause_key(cause: &str) -> String {
    let words: Vec<String> = cause
        .split(' ')
        .map(|word| {
            let trimmed = word.trim_end_matches(':');
            match url::Url::parse(trimmed) {
                Ok(url) if word.contains("://") => {
                    let path: Vec<String> = url
                        .path()
                        .split('/')
                        .map(|segment| {
                            let stem = segment.split('.').next().unwrap_or("");
                            if stem.split(':').count() == 6 {
                                format!("{{mac}}{}", &segment[stem.len()..])
                            } else {
                                segment.to_string()
                            }
                        })
                        .collect();
                    let suffix = if word.ends_with(':') { ":" } else { "" };
                    let path = path.join("/");
                    format!(
                        "{}://{}{path}{suffix}",
                        url.scheme(),
                        url.host_str().unwrap_or("")
                    )
                }
                _ => word.to_string(),
            }
        })
        .collect();
    words
        .join(" ")
        .chars()
        .map(|c| if c.is_ascii_digit() { 'N' } else { c })
        .collect()
}

/// How often the machines-per-phase series is sampled.
const TICK: f64 = 0.25;

fn report(ctx: &Shared, records: &[MachineRecord]) -> Report {
    let seconds = ctx.since_start();
    let booted: Vec<&MachineRecord> = records.iter().filter(|r| r.outcome == "booted").collect();
    let mut phases = BTreeMap::new();
    for (i, phase) in PHASES.iter().enumerate() {
        let values = booted
            .iter()
            .filter(|r| r.intervals.iter().any(|&(p, _, _)| p == i))
            .map(|r| {
                r.intervals
                    .iter()
                    .filter(|&&(p, _, _)| p == i)
                    .map(|&(_, from, to)| to - from)
                    .sum()
            })
            .collect();
        if let Some(p) = percentiles(values) {
            phases.insert(phase.to_string(), p);
        }
    }
    if let Some(p) = percentiles(booted.iter().map(|r| r.ended - r.powered_on).collect()) {
        phases.insert("total".to_string(), p);
    }
    let mut failures = BTreeMap::new();
    for record in records.iter().filter(|r| r.outcome != "booted") {
        let cause = cause_key(record.cause.as_deref().unwrap_or_default());
        *failures
            .entry(format!(
                "{}: {cause}",
                record.failed_phase.unwrap_or("start")
            ))
            .or_insert(0) += 1;
    }
    let mut booted_per_second = vec![0usize; seconds.ceil() as usize + 1];
    for record in &booted {
        booted_per_second[record.ended as usize] += 1;
    }
    let ticks = (seconds / TICK).ceil() as usize + 1;
    let mut in_phase: BTreeMap<String, Vec<usize>> = PHASES
        .iter()
        .chain(["booted"].iter())
        .map(|p| (p.to_string(), vec![0; ticks]))
        .collect();
    for record in records {
        for &(phase, from, to) in &record.intervals {
            let series = in_phase
                .get_mut(PHASES[phase])
                .expect("every phase has a series");
            let first = (from / TICK).ceil() as usize;
            let last = ((to / TICK) as usize).min(ticks - 1);
            for count in series.iter_mut().take(last + 1).skip(first) {
                *count += 1;
            }
        }
        if record.outcome == "booted" {
            let series = in_phase.get_mut("booted").expect("booted series");
            for count in series
                .iter_mut()
                .skip((record.ended / TICK).ceil() as usize)
            {
                *count += 1;
            }
        }
    }
    let bytes_received = records.iter().map(|r| r.bytes).sum();
    Report {
        label: ctx.args.label.clone(),
        server: ctx.args.server.to_string(),
        firmware: format!("{:?}", ctx.args.firmware).to_lowercase(),
        profile: format!("{:?}", ctx.args.profile).to_lowercase(),
        machines: ctx.args.machines,
        booted: booted.len(),
        failed: records.iter().filter(|r| r.outcome == "failed").count(),
        cut: records.iter().filter(|r| r.outcome == "cut").count(),
        seconds,
        bytes_received,
        goodput_mb_s: bytes_received as f64 / seconds / 1e6,
        phases,
        failures,
        retried: records.iter().filter(|r| r.attempts > 1).count(),
        leases: records
            .iter()
            .map(|r| (r.mac.clone(), r.addresses.clone()))
            .collect(),
        booted_per_second,
        tick_seconds: TICK,
        in_phase,
        boot_seconds: booted.iter().map(|r| r.ended - r.powered_on).collect(),
    }
}

/// The report as a table on standard output (a closed pipe ends it
/// quietly).
pub fn print(report: &Report) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} machines ({}, {}): {} booted, {} failed, {} cut by the time limit, in {:.2} s ({:.1} MB/s)",
        report.machines,
        report.firmware,
        report.profile,
        report.booted,
        report.failed,
        report.cut,
        report.seconds,
        report.goodput_mb_s
    );
    let _ = writeln!(
        out,
        "{:<8} {:>7} {:>10} {:>10} {:>10} {:>10}",
        "phase", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for phase in PHASES.iter().chain(["total"].iter()) {
        if let Some(p) = report.phases.get(*phase) {
            let _ = writeln!(
                out,
                "{phase:<8} {:>7} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.max_ms
            );
        }
    }
    for (cause, count) in &report.failures {
        let _ = writeln!(out, "failure: {count} × {cause}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_group_without_queries_macs_and_numbers() {
        let a = cause_key("http://127.0.0.1/boot/02:bf:00:00:4e:20.ipxe?from=ipxe&serial=SIM-1: `menu` is not simulated");
        let b = cause_key("http://127.0.0.1/boot/02:bf:00:00:4e:2a.ipxe?from=ipxe&serial=SIM-22: `menu` is not simulated");
        assert_eq!(a, b);
        assert_eq!(
            a,
            "http://NNN.N.N.N/boot/{mac}.ipxe: `menu` is not simulated"
        );
        assert_eq!(
            cause_key("tftp undionly.kpxe: stalled at block 17 (24000 bytes)"),
            "tftp undionly.kpxe: stalled at block NN (NNNNN bytes)"
        );
    }
}
