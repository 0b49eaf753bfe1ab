//! Boot events: each machine's timeline (DHCP, loader, chain script, its own
//! script, loader configs, kernel, initrds), kept in a bounded in-memory
//! ring, logged as one line each, and fed to subscribers (the panel stores
//! them in the inventory database and streams them to browsers) over a
//! bounded channel that never blocks the data plane: a subscriber that
//! falls behind loses events, and [`EventLog::dropped`] counts them.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::proto::Mac;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A step of the boot chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// A power action through the machine's BMC (on, cycle...).
    Power,
    /// A DHCP decision (offer, ack, proxy answer...).
    Dhcp,
    /// A first-stage loader named in a DHCP boot answer (`undionly.kpxe`,
    /// `ipxe.efi`...), fetched over TFTP or HTTP.
    Loader,
    /// `/boot.ipxe`.
    Chain,
    /// `/boot/{mac}.ipxe`.
    Script,
    /// A generated pxelinux or GRUB config.
    LoaderConfig,
    Kernel,
    Initrd,
    /// The booted OS called the check-in URL of its command line.
    Checkin,
}

impl Phase {
    /// Every phase, in boot order (the index is [`Phase::index`]).
    pub const ALL: [Phase; 9] = [
        Phase::Power,
        Phase::Dhcp,
        Phase::Loader,
        Phase::Chain,
        Phase::Script,
        Phase::LoaderConfig,
        Phase::Kernel,
        Phase::Initrd,
        Phase::Checkin,
    ];

    /// The names used in the API, the panel and metric labels, by index.
    pub const NAMES: [&'static str; 9] = [
        "power",
        "dhcp",
        "loader",
        "chain",
        "script",
        "loader-config",
        "kernel",
        "initrd",
        "checkin",
    ];

    pub fn as_str(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Failure statuses counted apart in the metrics (HTTP statuses; TFTP
/// failures are mapped onto them, see [`failure_cause`]); the last is
/// every other status.
pub const FAILURE_STATUSES: &[&str] = &[
    "400", "403", "404", "408", "416", "499", "500", "503", "other",
];

/// What a failed fetch's status means, in the words the panel and the
/// troubleshooting guide use. TFTP outcomes are given HTTP statuses when
/// they are recorded: a file not found 404, access refused 403, the
/// client's silence 408, an ERROR from the client 499, a protocol
/// violation 400, a transfer the server ended (its file changed) 500, a
/// full server 503.
pub fn failure_cause(status: u16) -> &'static str {
    match status {
        400 => "bad request or protocol violation",
        403 => "forbidden (permissions, a link out of the boot directory, or a kernel the Secure Boot chain refused)",
        404 => "file not found",
        405 => "method not allowed",
        408 => "timed out (the client went silent)",
        416 => "range not satisfiable",
        499 => "client gone (it closed or aborted the transfer)",
        500 => "aborted by the server (the file changed during the transfer)",
        503 => "server busy (limits reached), retry later",
        _ => "failed",
    }
}

/// The index of `status` in [`FAILURE_STATUSES`], without formatting it.
fn failure_status_index(status: u16) -> usize {
    const COUNTED: [u16; 8] = [400, 403, 404, 408, 416, 499, 500, 503];
    COUNTED
        .iter()
        .position(|s| *s == status)
        .unwrap_or(COUNTED.len())
}

/// What the events say in numbers, for `/metrics`: events and failures per
/// phase, and how long each phase's fetches took.
#[derive(Debug)]
pub struct BootMetrics {
    /// Events per phase.
    pub events: crate::metrics::Labelled,
    /// Per phase, failures by status ([`FAILURE_STATUSES`]).
    pub failures: Vec<crate::metrics::Labelled>,
    /// Per phase, the duration of its successful fetches (loaders, kernels
    /// and initrds: the timed ones).
    pub durations: Vec<crate::metrics::Histogram>,
}

impl Default for BootMetrics {
    fn default() -> Self {
        use crate::metrics::{Histogram, Labelled, PHASE_SECONDS};
        Self {
            events: Labelled::new("phase", &Phase::NAMES),
            failures: Phase::ALL
                .iter()
                .map(|_| Labelled::new("status", FAILURE_STATUSES))
                .collect(),
            durations: Phase::ALL
                .iter()
                .map(|_| Histogram::new(PHASE_SECONDS))
                .collect(),
        }
    }
}

impl BootMetrics {
    fn count(&self, event: &BootEvent) {
        let phase = event.phase.index();
        self.events.inc(phase);
        if event.failed() {
            self.failures[phase].inc(failure_status_index(event.status));
        } else if matches!(event.phase, Phase::Loader | Phase::Kernel | Phase::Initrd) {
            // The phases whose fetches are timed (scripts and DHCP answers
            // are events without a duration).
            self.durations[phase].observe(Duration::from_millis(event.duration_ms));
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootEvent {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The machine, where known.
    pub mac: Option<Mac>,
    pub client: IpAddr,
    pub phase: Phase,
    /// `http` or `tftp`.
    pub transport: &'static str,
    /// The path served, or for scripts what was decided.
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    /// HTTP status; for TFTP 200 (complete) or 500 (failed).
    pub status: u16,
}

impl BootEvent {
    /// An event of `phase` happening now: 0 bytes, no duration, status 200
    /// until the builder methods say otherwise.
    pub fn new(
        mac: Option<Mac>,
        client: IpAddr,
        phase: Phase,
        transport: &'static str,
        detail: String,
    ) -> Self {
        Self {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            mac,
            client,
            phase,
            transport,
            detail,
            bytes: 0,
            duration_ms: 0,
            status: 200,
        }
    }

    /// How many bytes were sent.
    pub fn bytes(self, bytes: u64) -> Self {
        Self { bytes, ..self }
    }

    /// How long it took.
    pub fn took(self, duration: Duration) -> Self {
        Self {
            duration_ms: duration.as_millis() as u64,
            ..self
        }
    }

    /// The HTTP status (TFTP: see [`failure_cause`]).
    pub fn status(self, status: u16) -> Self {
        Self { status, ..self }
    }

    /// A refused or failed fetch.
    pub fn failed(&self) -> bool {
        self.status >= 400
    }
}

/// How many events the live feed holds for a subscriber that falls behind.
const FEED_CAPACITY: usize = 65_536;

/// A bounded ring of the most recent events, and the live feed.
pub struct EventLog {
    ring: Mutex<VecDeque<BootEvent>>,
    capacity: usize,
    /// Where events also go (the inventory database and the panel's live
    /// views): a bounded channel of [`FEED_CAPACITY`]. Sending never
    /// blocks; a subscriber that lags loses the oldest events.
    sink: std::sync::OnceLock<tokio::sync::broadcast::Sender<BootEvent>>,
    /// Events subscribers lost by lagging, over all subscribers.
    dropped: Arc<AtomicU64>,
    pub metrics: BootMetrics,
}

/// One subscriber's live feed of events; see [`EventLog::subscribe`].
pub struct EventFeed {
    receiver: tokio::sync::broadcast::Receiver<BootEvent>,
    dropped: Arc<AtomicU64>,
}

impl EventFeed {
    /// The next event, or `None` once the log is gone. Events lost because
    /// this subscriber fell behind are counted in [`EventLog::dropped`] and
    /// logged once per gap.
    pub async fn recv(&mut self) -> Option<BootEvent> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(RecvError::Lagged(lost)) => {
                    self.dropped.fetch_add(lost, Ordering::Relaxed);
                    tracing::warn!(
                        lost,
                        "boot events arrived faster than a subscriber took them (the inventory database or a live view); those are not stored or shown"
                    );
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            // Reserved whole: until events fill it this is address space,
            // not memory, while growing it later would copy megabytes
            // (100,000 events are about 10 MB) with every worker waiting
            // on the lock, in the first storm after a start.
            ring: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            sink: std::sync::OnceLock::new(),
            dropped: Arc::new(AtomicU64::new(0)),
            metrics: BootMetrics::default(),
        }
    }

    /// Events that subscribers lost by falling behind, since start-up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// A live feed of every event recorded from now on.
    pub fn subscribe(&self) -> EventFeed {
        EventFeed {
            receiver: self
                .sink
                .get_or_init(|| tokio::sync::broadcast::channel(FEED_CAPACITY).0)
                .subscribe(),
            dropped: Arc::clone(&self.dropped),
        }
    }

    /// Records an event (and logs it: a failure once at `warn`, with its
    /// cause).
    pub fn record(&self, event: BootEvent) {
        self.metrics.count(&event);
        if event.failed() {
            tracing::warn!(
                mac = %event.mac.map_or_else(|| "-".to_string(), |m| m.to_string()),
                client = %event.client,
                phase = event.phase.as_str(),
                transport = event.transport,
                detail = %event.detail,
                status = event.status,
                cause = failure_cause(event.status),
                "boot fetch failed"
            );
        } else {
            tracing::info!(
                mac = %event.mac.map_or_else(|| "-".to_string(), |m| m.to_string()),
                client = %event.client,
                phase = ?event.phase,
                transport = event.transport,
                detail = %event.detail,
                bytes = event.bytes,
                ms = event.duration_ms,
                status = event.status,
                "boot event"
            );
        }
        if let Some(sink) = self.sink.get() {
            let _ = sink.send(event.clone());
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// The most recent events, oldest first, optionally of one machine.
    pub fn recent(&self, mac: Option<Mac>, limit: usize) -> Vec<BootEvent> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<BootEvent> = ring
            .iter()
            .rev()
            .filter(|e| mac.is_none() || e.mac == mac)
            .take(limit)
            .cloned()
            .collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counted_failure_status_lands_on_its_own_label() {
        for (index, label) in FAILURE_STATUSES.iter().enumerate() {
            assert_eq!(
                failure_status_index(label.parse().unwrap_or(599)),
                index,
                "{label}"
            );
        }
    }

    #[test]
    fn the_ring_keeps_the_newest_and_filters_by_machine() {
        let log = EventLog::new(3);
        let a = Mac([1, 2, 3, 4, 5, 6]);
        let client: IpAddr = "10.0.0.5".parse().unwrap();
        for i in 0..5u64 {
            let mac = if i % 2 == 0 { Some(a) } else { None };
            log.record(
                BootEvent::new(mac, client, Phase::Kernel, "http", format!("k{i}")).bytes(i),
            );
        }
        let all: Vec<String> = log.recent(None, 10).into_iter().map(|e| e.detail).collect();
        assert_eq!(all, ["k2", "k3", "k4"]);
        let mine: Vec<String> = log
            .recent(Some(a), 10)
            .into_iter()
            .map(|e| e.detail)
            .collect();
        assert_eq!(mine, ["k2", "k4"]);
        let json = serde_json::to_string(&log.recent(Some(a), 1)[0]).unwrap();
        assert!(json.contains("\"mac\":\"01:02:03:04:05:06\""), "{json}");
        assert!(json.contains("\"phase\":\"kernel\""), "{json}");
    }
}
