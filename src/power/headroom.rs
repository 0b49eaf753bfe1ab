//! How much more the data plane can take: the load an adaptive power job
//! reads before each wave.
//!
//! Three measures, each from 0 (idle) to 1 (full); the load is the
//! largest:
//!
//! * open TFTP transfers against `tftp.max_transfers`;
//! * open HTTP connections against `http.max_connections`;
//! * **HTTP bytes in flight**: body bytes of responses under way that the
//!   sockets have not yet taken, in seconds of sending at the rate the
//!   server was seen to drain them, against [`FULL_BACKLOG`]. A thousand
//!   machines each half-way through a 60 MB initrd is a backlog the LAN
//!   needs time to carry, however few the connections are.
//!
//! The drain rate is measured, not configured: over windows of at least
//! [`WINDOW`], the bytes sent while the server had bytes waiting both at
//! the start and at the end of the window (so it was sending, not idle).
//! The best such window is the server's capacity as far as anyone has
//! seen; until one is seen, [`ASSUMED_RATE`] (a gigabit link) stands in.
//! A measured rate replaces the assumption even when lower: a 100 Mb/s
//! boot LAN is paced as one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A backlog that takes this long to send counts as a full data plane.
/// Waves go while the load is under one half: while what is already
/// promised would be sent within 5 s.
pub const FULL_BACKLOG: Duration = Duration::from_secs(10);

/// The drain rate assumed before one is measured, bytes per second.
pub const ASSUMED_RATE: f64 = 125_000_000.0;

/// The shortest window a drain rate is measured over.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The data plane as seen at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataPlaneSample {
    pub tftp_transfers: u64,
    pub http_connections: u64,
    /// Body bytes promised and not yet sent.
    pub http_bytes_in_flight: u64,
    /// Body bytes sent since the server started (a counter).
    pub http_bytes_sent: u64,
}

/// The data plane's limits, and the drain rate measured so far.
#[derive(Debug)]
pub struct Headroom {
    max_transfers: u64,
    max_connections: u64,
    meter: Mutex<DrainMeter>,
}

impl Headroom {
    pub fn new(max_transfers: usize, max_connections: usize) -> Self {
        Self {
            max_transfers: max_transfers.max(1) as u64,
            max_connections: max_connections.max(1) as u64,
            meter: Mutex::new(DrainMeter::default()),
        }
    }

    /// The load at `now`, from 0 to 1 (more than 1 when over a limit).
    pub fn load(&self, sample: DataPlaneSample, now: Instant) -> f64 {
        let rate = self
            .meter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(sample, now);
        let tftp = sample.tftp_transfers as f64 / self.max_transfers as f64;
        let connections = sample.http_connections as f64 / self.max_connections as f64;
        let backlog_seconds = sample.http_bytes_in_flight as f64 / rate;
        let backlog = backlog_seconds / FULL_BACKLOG.as_secs_f64();
        tftp.max(connections).max(backlog)
    }

    /// The drain rate the load is computed with now, bytes per second.
    pub fn drain_rate(&self) -> f64 {
        self.meter.lock().unwrap_or_else(|p| p.into_inner()).rate()
    }
}

/// The best drain rate seen over a busy window.
#[derive(Debug, Default)]
struct DrainMeter {
    /// When the current window began, with the counters then.
    window: Option<(Instant, DataPlaneSample)>,
    best: Option<f64>,
}

impl DrainMeter {
    /// Takes in `sample` and returns the drain rate to use.
    fn observe(&mut self, sample: DataPlaneSample, now: Instant) -> f64 {
        match self.window {
            None => self.window = Some((now, sample)),
            Some((began, start)) => {
                let elapsed = now.saturating_duration_since(began);
                if elapsed >= WINDOW {
                    let busy = start.http_bytes_in_flight > 0 && sample.http_bytes_in_flight > 0;
                    let sent = sample.http_bytes_sent.saturating_sub(start.http_bytes_sent);
                    if busy && sent > 0 {
                        let rate = sent as f64 / elapsed.as_secs_f64();
                        self.best = Some(self.best.map_or(rate, |best| best.max(rate)));
                    }
                    self.window = Some((now, sample));
                }
            }
        }
        self.rate()
    }

    fn rate(&self) -> f64 {
        self.best.unwrap_or(ASSUMED_RATE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn sample(in_flight: u64, sent: u64) -> DataPlaneSample {
        DataPlaneSample {
            http_bytes_in_flight: in_flight,
            http_bytes_sent: sent,
            ..DataPlaneSample::default()
        }
    }

    #[test]
    fn the_largest_measure_is_the_load() {
        let headroom = Headroom::new(100, 1000);
        let now = Instant::now();
        let load = |s| headroom.load(s, now);
        assert_eq!(load(DataPlaneSample::default()), 0.0);
        let transfers = DataPlaneSample {
            tftp_transfers: 50,
            http_connections: 100,
            ..DataPlaneSample::default()
        };
        assert_eq!(load(transfers), 0.5);
        let connections = DataPlaneSample {
            tftp_transfers: 10,
            http_connections: 900,
            ..DataPlaneSample::default()
        };
        assert_eq!(load(connections), 0.9);
    }

    #[test]
    fn before_any_measurement_a_gigabit_link_is_assumed() {
        let headroom = Headroom::new(100, 1000);
        // 625 MB at 125 MB/s: 5 s of a 10 s full backlog.
        let load = headroom.load(sample(625 * MB, 0), Instant::now());
        assert!((load - 0.5).abs() < 1e-9, "{load}");
    }

    #[test]
    fn a_busy_window_measures_the_rate_even_below_the_assumption() {
        let headroom = Headroom::new(100, 1000);
        let t0 = Instant::now();
        headroom.load(sample(500 * MB, 0), t0);
        // 25 MB/s over two busy seconds: a slow LAN.
        let load = headroom.load(sample(450 * MB, 50 * MB), t0 + 2 * WINDOW);
        assert_eq!(headroom.drain_rate(), 25.0 * MB as f64);
        // 450 MB at 25 MB/s is 18 s: more than full.
        assert!((load - 1.8).abs() < 1e-9, "{load}");
    }

    #[test]
    fn the_best_busy_window_is_kept() {
        let headroom = Headroom::new(100, 1000);
        let t0 = Instant::now();
        headroom.load(sample(900 * MB, 0), t0);
        headroom.load(sample(600 * MB, 300 * MB), t0 + WINDOW);
        headroom.load(sample(500 * MB, 400 * MB), t0 + 2 * WINDOW);
        assert_eq!(headroom.drain_rate(), 300.0 * MB as f64);
    }

    #[test]
    fn idle_and_short_windows_measure_nothing() {
        let headroom = Headroom::new(100, 1000);
        let t0 = Instant::now();
        // Nothing waiting at the start: the server may have been idle.
        headroom.load(sample(0, 0), t0);
        headroom.load(sample(10 * MB, MB), t0 + WINDOW);
        assert_eq!(headroom.drain_rate(), ASSUMED_RATE);
        // Busy, but shorter than a window: not yet measured.
        headroom.load(sample(9 * MB, 2 * MB), t0 + WINDOW + WINDOW / 2);
        assert_eq!(headroom.drain_rate(), ASSUMED_RATE);
        // Drained to nothing by the end: not a measure of capacity.
        headroom.load(sample(0, 11 * MB), t0 + 3 * WINDOW);
        assert_eq!(headroom.drain_rate(), ASSUMED_RATE);
    }
}
