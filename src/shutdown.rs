//! The handle every long-running part of the server holds: the data-plane
//! workers, the multicast sessions, the DHCP service and the panel. Its
//! stop signal tells them to end; its heartbeats tell the systemd watchdog
//! they are alive ([`Shutdown::heartbeat`], [`Shutdown::silent_workers`]).
//! It lives in its own module, below every layer, so that a service can
//! use it without importing the engine that runs it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Asks a running server to stop; cheap to clone.
#[derive(Clone, Default)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

struct ShutdownInner {
    requested: AtomicBool,
    notify: tokio::sync::Notify,
    /// Heartbeats are milliseconds since this instant.
    epoch: Instant,
    heartbeats: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Default for ShutdownInner {
    fn default() -> Self {
        Self {
            requested: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            epoch: Instant::now(),
            heartbeats: Mutex::new(Vec::new()),
        }
    }
}

/// One worker's proof of life: [`Heartbeat::beat`] at least once a second
/// (every pass of its event loop, or a timer on its runtime).
pub struct Heartbeat {
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// How often a worker whose loop may sleep indefinitely (a tokio runtime
/// waiting for connections) beats from a timer.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests shutdown; data-plane workers notice it within their idle poll
    /// (`server::tftp::IDLE_POLL`, 100 ms).
    pub fn trigger(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// A heartbeat for the worker `name`, beaten once now. Its worker must
    /// beat at least every [`HEARTBEAT_EVERY`] while it runs.
    pub fn heartbeat(&self, name: impl Into<String>) -> Heartbeat {
        let heartbeat = Heartbeat {
            last_ms: Arc::new(AtomicU64::new(0)),
            epoch: self.inner.epoch,
        };
        heartbeat.beat();
        self.inner
            .heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.into(), Arc::clone(&heartbeat.last_ms)));
        heartbeat
    }

    /// Beats `name`'s heartbeat every [`HEARTBEAT_EVERY`] from a task on
    /// the current tokio runtime, until shutdown: a runtime whose threads
    /// are all blocked stops beating.
    pub fn beat_from_runtime(&self, name: impl Into<String>) {
        let heartbeat = self.heartbeat(name);
        let shutdown = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(HEARTBEAT_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = every.tick() => heartbeat.beat(),
                }
            }
        });
    }

    /// Workers that have not beaten for longer than `allowed`, with how long
    /// they have been silent (none once shutdown was requested).
    pub fn silent_workers(&self, allowed: Duration) -> Vec<(String, Duration)> {
        if self.is_triggered() {
            return Vec::new();
        }
        let now_ms = self.inner.epoch.elapsed().as_millis() as u64;
        self.inner
            .heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(name, last)| {
                let silent =
                    Duration::from_millis(now_ms.saturating_sub(last.load(Ordering::Relaxed)));
                (silent > allowed).then(|| (name.clone(), silent))
            })
            .collect()
    }

    /// Resolves once shutdown was requested.
    pub async fn wait(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_stops_beating_is_named_until_it_beats_again() {
        let shutdown = Shutdown::new();
        let lively = shutdown.heartbeat("tftp-0");
        let stuck = shutdown.heartbeat("http-1");
        std::thread::sleep(Duration::from_millis(60));
        lively.beat();
        let silent = shutdown.silent_workers(Duration::from_millis(30));
        assert_eq!(silent.len(), 1, "{silent:?}");
        assert_eq!(silent[0].0, "http-1");
        stuck.beat();
        assert!(shutdown
            .silent_workers(Duration::from_millis(30))
            .is_empty());
        std::thread::sleep(Duration::from_millis(60));
        shutdown.trigger();
        assert!(shutdown
            .silent_workers(Duration::from_millis(30))
            .is_empty());
    }
}
