//! Counters the data plane bumps on its hot paths, read on a scrape.
//!
//! Every worker thread adds to its own cache line of a [`Counter`] (one of
//! [`SHARDS`] slots, chosen once per thread), so a storm of requests on
//! sixteen workers never bounces one line between cores and never takes a
//! lock; a scrape sums the slots. The panel turns these into Prometheus
//! text at `GET /metrics` (`panel::metrics`); nothing here knows that
//! format. Written by hand rather than with a metrics crate because the
//! crates of the field (`metrics`, `prometheus-client`) keep one shared
//! atomic per counter, which is the contention this avoids, or a lock per
//! labelled family.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Slots per counter: more than the worker threads of a 16-core machine
/// would rarely help, since threads beyond it share slots round-robin.
pub const SHARDS: usize = 16;

/// One slot on its own cache line (128 bytes: adjacent-line prefetch
/// pairs lines on x86).
#[derive(Default)]
#[repr(align(128))]
struct Slot(AtomicU64);

/// The slot this thread adds to.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// A monotonically increasing count, sharded by thread.
pub struct Counter {
    slots: Box<[Slot]>,
}

impl Default for Counter {
    fn default() -> Self {
        Self {
            slots: (0..SHARDS).map(|_| Slot::default()).collect(),
        }
    }
}

impl Counter {
    pub fn add(&self, n: u64) {
        self.slots[shard()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    /// Takes back an earlier [`Counter::add`] (something counted as started
    /// that never did); the sum wraps back, and never goes below zero as
    /// long as every `sub` follows its `add`.
    pub fn sub(&self, n: u64) {
        self.slots[shard()].0.fetch_sub(n, Ordering::Relaxed);
    }

    /// The sum over all threads (a scrape; not for hot paths).
    pub fn get(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counter({})", self.get())
    }
}

/// A value that goes up and down (open connections); one atomic, changed
/// per connection rather than per packet.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters told apart by one label whose values are known in advance
/// (an enum's variants), indexed by position in `values`.
#[derive(Debug)]
pub struct Labelled {
    pub label: &'static str,
    pub values: &'static [&'static str],
    counters: Box<[Counter]>,
}

impl Labelled {
    pub fn new(label: &'static str, values: &'static [&'static str]) -> Self {
        Self {
            label,
            values,
            counters: values.iter().map(|_| Counter::default()).collect(),
        }
    }

    /// Adds `n` to the counter of `values[index]` (an index out of range
    /// counts on the last value, which callers make "other").
    pub fn add(&self, index: usize, n: u64) {
        self.counters[index.min(self.counters.len() - 1)].add(n);
    }

    pub fn inc(&self, index: usize) {
        self.add(index, 1);
    }

    /// Each label value with its count.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.values
            .iter()
            .zip(self.counters.iter())
            .map(|(value, counter)| (*value, counter.get()))
    }

    pub fn get(&self, index: usize) -> u64 {
        self.counters[index].get()
    }
}

/// A histogram of durations with fixed bucket bounds, sharded like
/// [`Counter`].
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending; `+Inf` is implied.
    pub bounds: &'static [f64],
    /// Per bound (not cumulative), then the overflow bucket.
    buckets: Box<[Counter]>,
    sum_micros: Counter,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound, observations above the previous bound and at or below
    /// this one), ending with `+Inf`: not cumulative (the encoder sums).
    pub buckets: Vec<(f64, u64)>,
}

/// Bounds for boot phases: a script takes milliseconds, an initrd over a
/// busy LAN a minute.
pub const PHASE_SECONDS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| Counter::default()).collect(),
            sum_micros: Counter::default(),
        }
    }

    pub fn observe(&self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let index = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        self.buckets[index].inc();
        self.sum_micros.add(duration.as_micros() as u64);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(index, counter)| {
                let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
                (bound, counter.get())
            })
            .collect();
        HistogramSnapshot {
            sum_seconds: self.sum_micros.get() as f64 / 1e6,
            count: buckets.iter().map(|(_, count)| count).sum(),
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let counter = std::sync::Arc::new(Counter::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let counter = std::sync::Arc::clone(&counter);
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        counter.inc();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.get(), 20_000);
    }

    #[test]
    fn labelled_counters_keep_their_values_apart_and_overflow_to_the_last() {
        let by_kind = Labelled::new("kind", &["a", "b", "other"]);
        by_kind.inc(0);
        by_kind.add(1, 5);
        by_kind.inc(99);
        let values: Vec<_> = by_kind.iter().collect();
        assert_eq!(values, [("a", 1), ("b", 5), ("other", 1)]);
    }

    #[test]
    fn a_histogram_sorts_observations_into_buckets_ending_at_infinity() {
        let histogram = Histogram::new(&[0.1, 1.0]);
        histogram.observe(Duration::from_millis(50));
        histogram.observe(Duration::from_millis(100));
        histogram.observe(Duration::from_millis(500));
        histogram.observe(Duration::from_secs(3));
        let snapshot = histogram.snapshot();
        assert_eq!(snapshot.count, 4);
        assert_eq!(snapshot.buckets, [(0.1, 2), (1.0, 1), (f64::INFINITY, 1)]);
        assert!((snapshot.sum_seconds - 3.65).abs() < 1e-9);
    }
}
