//! Power jobs: one action for many machines, sent in waves, each machine's
//! boot watched until its OS checks in.
//!
//! A job sends its action to the BMCs of a wave of machines at a time:
//!
//! * **all at once**: one wave of every machine;
//! * **fixed**: `size` machines every `interval`;
//! * **adaptive**: the first wave is small; the next goes only when every
//!   machine of the last has got past DHCP and its loader (it asked for
//!   its boot script, or failed, or ran out of time), and only while the
//!   data plane has headroom ([`Fleet::load`], [`super::headroom`]: open
//!   TFTP transfers and HTTP connections against their limits, and HTTP
//!   bytes in flight against the rate the server drains them, under one
//!   half). A wave that cleared with the load under a quarter doubles the
//!   next one, up to `max`; a wave that found the load above one half
//!   halves it. The boot LAN never sees more machines in its DHCP and
//!   TFTP phases than the servers were just seen to take, nor more bytes
//!   promised than it carries in a few seconds.
//!
//! After a boot action each machine is watched: DHCP, loader, script,
//! kernel, initrd, then the check-in from its booted OS. One that has not
//! checked in by the deadline is failed at its last phase, and power-cycled
//! once first when the job says so. A job can be paused (no new wave;
//! machines already on go on booting) and cancelled (no new wave, and
//! every machine not yet sent is left alone).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::dispatch::Dispatcher;
use super::{execute, BootOverride, Credentials, Limits, Outcome, PowerAction, PowerError};
use crate::proto::Mac;

/// How a job spaces its waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Pacing {
    AllAtOnce,
    Fixed {
        size: usize,
        interval_ms: u64,
    },
    Adaptive {
        #[serde(default = "first_wave")]
        first: usize,
        #[serde(default = "max_wave")]
        max: usize,
    },
}

fn first_wave() -> usize {
    16
}

fn max_wave() -> usize {
    512
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing::Adaptive {
            first: first_wave(),
            max: max_wave(),
        }
    }
}

/// What a job is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub action: PowerAction,
    #[serde(default)]
    pub boot: BootOverride,
    #[serde(default)]
    pub pacing: Pacing,
    /// Seconds a machine has from its power-on to its check-in; absent:
    /// its image's `checkin_deadline_seconds`, else the server's.
    #[serde(default)]
    pub checkin_deadline: Option<u64>,
    /// Power-cycle a machine once when it misses its deadline.
    #[serde(default)]
    pub retry_by_cycle: bool,
}

/// Where one machine of a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Not sent yet.
    Waiting,
    /// Its BMC is being asked.
    Sending,
    /// The BMC did it; the machine has not been heard from on the LAN yet.
    Powered,
    /// DHCP or its loader.
    Starting,
    /// It asked for its boot script; kernel and initrd follow.
    Loading,
    /// Its OS checked in.
    Up,
    /// A non-boot action (off, status) done.
    Done,
    Failed,
    /// The job was cancelled before it was sent.
    Skipped,
}

impl Stage {
    fn finished(self) -> bool {
        matches!(
            self,
            Stage::Up | Stage::Done | Stage::Failed | Stage::Skipped
        )
    }

    /// Past DHCP and the loader (what an adaptive wave waits for).
    fn past_loader(self) -> bool {
        self.finished() || self == Stage::Loading
    }
}

/// One machine of a job.
#[derive(Debug, Clone, Serialize)]
pub struct MachineProgress {
    pub mac: Mac,
    pub stage: Stage,
    /// The last boot phase seen since it was powered.
    pub phase: Option<String>,
    /// What the BMC did, or why it failed.
    pub detail: String,
    pub wave: Option<usize>,
    pub sent_ms: Option<u64>,
    /// When its OS checked in, or its action was done.
    pub finished_ms: Option<u64>,
    /// Cycled once after it missed its deadline.
    pub cycled: bool,
}

/// A job's state as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobStatus {
    Running,
    Paused,
    Cancelled,
    Done,
}

/// What the job runner needs from the rest of bootfleet.
pub trait Fleet: Send + Sync {
    /// The machine's BMC and its password, or why there is none
    /// ([`PowerError::Setup`]).
    fn credentials(&self, mac: Mac) -> Result<Credentials, PowerError>;
    /// For each of `macs`, the last boot phase seen at or after `since_ms`.
    fn boot_progress(&self, macs: &[Mac], since_ms: u64) -> HashMap<Mac, SeenPhase>;
    /// How busy the data plane is, from 0 (idle) to 1 (at its limits).
    fn load(&self) -> f64;
    /// Each machine's check-in deadline: its image's, or the server's.
    fn checkin_deadlines(&self, macs: &[Mac]) -> HashMap<Mac, Duration>;
    /// Records an action's outcome (a boot event dated `started_ms`, when
    /// the action was sent, and an audit entry).
    fn record(
        &self,
        mac: Mac,
        action: PowerAction,
        result: &Result<Outcome, PowerError>,
        actor: &str,
        started_ms: u64,
    );
}

/// A boot phase a machine reached, when, and its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenPhase {
    pub phase: String,
    pub at_ms: u64,
    pub status: u16,
}

/// A running or finished job.
pub struct Job {
    pub id: u64,
    pub spec: JobSpec,
    pub actor: String,
    pub created_ms: u64,
    state: Mutex<JobState>,
    wake: Condvar,
}

#[derive(Debug, Clone, Serialize)]
struct JobState {
    status: JobStatus,
    machines: Vec<MachineProgress>,
    waves_sent: usize,
    next_wave: usize,
    finished_ms: Option<u64>,
    /// Set by pause/cancel; read by the runner.
    #[serde(skip)]
    requested: Option<JobStatus>,
}

/// A pause, resume or cancel asked of a job that has ended.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("power job {0} has ended")]
pub struct JobEnded(pub u64);

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: u64,
    pub spec: JobSpec,
    pub actor: String,
    pub created_ms: u64,
    pub status: JobStatus,
    pub waves_sent: usize,
    pub finished_ms: Option<u64>,
    /// Machines per stage.
    pub stages: HashMap<Stage, usize>,
    /// Failures by what went wrong (BMC unreachable, no check-in...).
    pub failures: usize,
    /// From the rate so far; `None` until a machine finished.
    pub estimated_seconds_left: Option<u64>,
    pub machines: Vec<MachineProgress>,
}

impl Job {
    /// The job as it is now; `with_machines: false` leaves the per-machine
    /// list out (the fleet's job list).
    pub fn view(&self, with_machines: bool) -> JobView {
        let state = self.lock();
        let mut stages = HashMap::new();
        for machine in &state.machines {
            *stages.entry(machine.stage).or_insert(0) += 1;
        }
        let finished = state.machines.iter().filter(|m| m.stage.finished()).count();
        let left = state.machines.len() - finished;
        let elapsed = now_ms().saturating_sub(self.created_ms) as f64 / 1000.0;
        let estimated_seconds_left =
            (finished > 0 && left > 0 && state.status == JobStatus::Running)
                .then(|| (elapsed / finished as f64 * left as f64).ceil() as u64);
        JobView {
            id: self.id,
            spec: self.spec.clone(),
            actor: self.actor.clone(),
            created_ms: self.created_ms,
            status: state.status,
            waves_sent: state.waves_sent,
            finished_ms: state.finished_ms,
            failures: stages.get(&Stage::Failed).copied().unwrap_or(0),
            stages,
            estimated_seconds_left,
            machines: if with_machines {
                state.machines.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// Asks the runner to pause, resume or cancel; refused once the job
    /// is done or cancelled.
    pub fn control(&self, wanted: JobStatus) -> Result<(), JobEnded> {
        let mut state = self.lock();
        if matches!(state.status, JobStatus::Done | JobStatus::Cancelled) {
            return Err(JobEnded(self.id));
        }
        state.requested = Some(wanted);
        self.wake.notify_all();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the job has ended (done or cancelled, nothing in flight).
    pub fn ended(&self) -> bool {
        self.lock().finished_ms.is_some()
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Starts `spec` for `macs` on a thread of its own; the job is returned
/// at once, to be watched with [`Job::view`].
pub fn start(
    id: u64,
    macs: Vec<Mac>,
    spec: JobSpec,
    actor: &str,
    fleet: Arc<dyn Fleet>,
    dispatcher: Arc<Dispatcher>,
    limits: Limits,
) -> std::io::Result<Arc<Job>> {
    let first = match spec.pacing {
        Pacing::AllAtOnce => macs.len().max(1),
        Pacing::Fixed { size, .. } => size.max(1),
        Pacing::Adaptive { first, .. } => first.max(1),
    };
    let job = Arc::new(Job {
        id,
        actor: actor.to_string(),
        created_ms: now_ms(),
        state: Mutex::new(JobState {
            status: JobStatus::Running,
            machines: macs
                .into_iter()
                .map(|mac| MachineProgress {
                    mac,
                    stage: Stage::Waiting,
                    phase: None,
                    detail: String::new(),
                    wave: None,
                    sent_ms: None,
                    finished_ms: None,
                    cycled: false,
                })
                .collect(),
            waves_sent: 0,
            next_wave: first,
            finished_ms: None,
            requested: None,
        }),
        wake: Condvar::new(),
        spec,
    });
    let deadlines = match job.spec.checkin_deadline {
        Some(_) => HashMap::new(),
        None => {
            let macs: Vec<Mac> = job.lock().machines.iter().map(|m| m.mac).collect();
            fleet.checkin_deadlines(&macs)
        }
    };
    let runner = Runner {
        job: Arc::clone(&job),
        deadlines,
        fleet,
        dispatcher,
        limits: Arc::new(limits),
        last_wave_at: None,
    };
    std::thread::Builder::new()
        .name(format!("bootfleet-power-{id}"))
        .spawn(move || runner.run())?;
    Ok(job)
}

/// How often the runner looks at the machines' progress.
const TICK: Duration = Duration::from_millis(100);

/// Milliseconds a machine has to check in when nothing else says.
const DEFAULT_DEADLINE: u64 = 600_000;

/// The longest an adaptive wave waits for the last one to get past DHCP
/// and the loader.
const WAVE_PATIENCE: Duration = Duration::from_secs(120);

struct Runner {
    job: Arc<Job>,
    /// Each machine's check-in deadline when the job names none.
    deadlines: HashMap<Mac, Duration>,
    fleet: Arc<dyn Fleet>,
    dispatcher: Arc<Dispatcher>,
    limits: Arc<Limits>,
    last_wave_at: Option<Instant>,
}

impl Runner {
    fn run(mut self) {
        loop {
            self.follow_requests();
            self.watch_boots();
            let status = self.job.lock().status;
            if status == JobStatus::Running && self.wave_due() {
                self.send_wave();
            }
            let mut state = self.job.lock();
            let in_flight = state
                .machines
                .iter()
                .any(|m| !m.stage.finished() && m.stage != Stage::Waiting);
            let waiting = state.machines.iter().any(|m| m.stage == Stage::Waiting);
            if !in_flight && (!waiting || state.status == JobStatus::Cancelled) {
                if state.status != JobStatus::Cancelled {
                    state.status = JobStatus::Done;
                }
                state.finished_ms = Some(now_ms());
                return;
            }
            let _ = self.job.wake.wait_timeout(state, TICK);
        }
    }

    /// Applies a pause, resume or cancel asked for since the last tick.
    fn follow_requests(&self) {
        let mut state = self.job.lock();
        match state.requested.take() {
            Some(JobStatus::Cancelled) => {
                state.status = JobStatus::Cancelled;
                for machine in &mut state.machines {
                    if machine.stage == Stage::Waiting {
                        machine.stage = Stage::Skipped;
                        machine.detail = "the job was cancelled before this machine's wave".into();
                    }
                }
            }
            Some(JobStatus::Paused) => state.status = JobStatus::Paused,
            Some(JobStatus::Running) => state.status = JobStatus::Running,
            Some(JobStatus::Done) | None => {}
        }
    }

    /// Whether the next wave may go now.
    fn wave_due(&self) -> bool {
        let state = self.job.lock();
        if !state.machines.iter().any(|m| m.stage == Stage::Waiting) {
            return false;
        }
        let Some(last_at) = self.last_wave_at else {
            return true;
        };
        match self.job.spec.pacing {
            Pacing::AllAtOnce => true,
            Pacing::Fixed { interval_ms, .. } => {
                last_at.elapsed() >= Duration::from_millis(interval_ms)
            }
            Pacing::Adaptive { .. } => {
                let last = state.waves_sent.checked_sub(1);
                let cleared = state
                    .machines
                    .iter()
                    .filter(|m| m.wave == last)
                    .all(|m| m.stage.past_loader());
                // A machine that never shows up on the LAN (a dead NIC, a
                // BMC that lied) must not hold the rest until its deadline.
                let patient = last_at.elapsed() < WAVE_PATIENCE;
                (cleared || !patient) && self.fleet.load() < 0.5
            }
        }
    }

    /// Sends the next wave's machines to the dispatcher, and sizes the
    /// one after (adaptive pacing).
    fn send_wave(&mut self) {
        let mut state = self.job.lock();
        let wave = state.waves_sent;
        let size = state.next_wave;
        if let Pacing::Adaptive { max, .. } = self.job.spec.pacing {
            let load = self.fleet.load();
            state.next_wave = if load < 0.25 {
                (size * 2).min(max.max(1))
            } else {
                (size / 2).max(1)
            };
        }
        let now = now_ms();
        let mut sent = Vec::new();
        for machine in state
            .machines
            .iter_mut()
            .filter(|m| m.stage == Stage::Waiting)
            .take(size)
        {
            machine.stage = Stage::Sending;
            machine.wave = Some(wave);
            machine.sent_ms = Some(now);
            sent.push(machine.mac);
        }
        state.waves_sent += 1;
        drop(state);
        self.last_wave_at = Some(Instant::now());
        for mac in sent {
            self.send(mac, self.job.spec.action);
        }
    }

    /// Runs `action` on `mac`'s BMC on a dispatcher thread; the outcome
    /// lands in the job's state.
    fn send(&self, mac: Mac, action: PowerAction) {
        let job = Arc::clone(&self.job);
        let fleet = Arc::clone(&self.fleet);
        let limits = Arc::clone(&self.limits);
        self.dispatcher.submit(move || {
            let started = now_ms();
            let result = fleet
                .credentials(mac)
                .and_then(|credentials| execute(&credentials, action, job.spec.boot, &limits));
            fleet.record(mac, action, &result, &job.actor, started);
            let mut state = job.lock();
            if let Some(machine) = state.machines.iter_mut().find(|m| m.mac == mac) {
                match result {
                    Ok(outcome) if action.boots() => {
                        machine.stage = Stage::Powered;
                        machine.detail = outcome.done;
                    }
                    Ok(outcome) => {
                        machine.stage = Stage::Done;
                        machine.finished_ms = Some(now_ms());
                        machine.detail = match outcome.state {
                            Some(state) => {
                                format!("{}: power is {state:?}", outcome.done).to_lowercase()
                            }
                            None => outcome.done,
                        };
                    }
                    Err(error) => {
                        machine.stage = Stage::Failed;
                        machine.finished_ms = Some(now_ms());
                        machine.detail = error.to_string();
                    }
                }
            }
            job.wake.notify_all();
        });
    }

    /// Moves powered machines along by the boot phases seen since their
    /// power-on; fails (or cycles once) those past their deadline.
    fn watch_boots(&self) {
        let watched: Vec<(Mac, u64)> = {
            let state = self.job.lock();
            state
                .machines
                .iter()
                .filter(|m| matches!(m.stage, Stage::Powered | Stage::Starting | Stage::Loading))
                .filter_map(|m| Some((m.mac, m.sent_ms?)))
                .collect()
        };
        if watched.is_empty() {
            return;
        }
        let since = watched.iter().map(|(_, at)| *at).min().unwrap_or(0);
        let macs: Vec<Mac> = watched.iter().map(|(mac, _)| *mac).collect();
        let seen = self.fleet.boot_progress(&macs, since);
        let now = now_ms();
        let deadline_of = |mac: Mac| -> u64 {
            match self.job.spec.checkin_deadline {
                Some(seconds) => seconds * 1000,
                None => self
                    .deadlines
                    .get(&mac)
                    .map_or(DEFAULT_DEADLINE, |d| d.as_millis() as u64),
            }
        };
        let mut cycle = Vec::new();
        let mut state = self.job.lock();
        for machine in state.machines.iter_mut() {
            let Some(sent) = machine.sent_ms.filter(|_| {
                matches!(
                    machine.stage,
                    Stage::Powered | Stage::Starting | Stage::Loading
                )
            }) else {
                continue;
            };
            if let Some(phase) = seen.get(&machine.mac).filter(|p| p.at_ms >= sent) {
                machine.phase = Some(phase.phase.clone());
                machine.stage = stage_of(&phase.phase);
                if machine.stage == Stage::Up {
                    machine.finished_ms = Some(phase.at_ms);
                    machine.detail = "checked in".into();
                    continue;
                }
            }
            let deadline = deadline_of(machine.mac);
            if now.saturating_sub(sent) > deadline {
                let at = machine.phase.as_deref().unwrap_or("power-on");
                if self.job.spec.retry_by_cycle && !machine.cycled {
                    machine.cycled = true;
                    machine.stage = Stage::Sending;
                    machine.sent_ms = Some(now);
                    cycle.push(machine.mac);
                } else {
                    machine.stage = Stage::Failed;
                    machine.finished_ms = Some(now);
                    machine.detail = format!(
                        "did not check in within {} s; last seen at {at}",
                        deadline / 1000
                    );
                }
            }
        }
        drop(state);
        for mac in cycle {
            self.send(mac, PowerAction::Cycle);
        }
    }
}

/// A job's stage from the last boot phase seen.
fn stage_of(phase: &str) -> Stage {
    match phase {
        "checkin" => Stage::Up,
        "dhcp" | "loader" => Stage::Starting,
        "power" => Stage::Powered,
        _ => Stage::Loading,
    }
}
