//! A token bucket per key: one sender (a source address, a client, an
//! address making up MACs) is slowed down without affecting anyone else.
//! Shared by the DHCP service and the script router.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

/// Most keys remembered; past this the table starts over (a sender that
/// rotates keys gains a fresh burst at most once per 100,000 keys).
const MAX_KEYS: usize = 100_000;

/// Token buckets by key.
#[derive(Debug)]
pub struct RateLimiter<K = std::net::Ipv4Addr> {
    burst: f64,
    per_second: f64,
    buckets: HashMap<K, (f64, SystemTime)>,
}

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    /// `per_second` requests a second, with a burst of as many.
    pub fn new(per_second: u32) -> Self {
        Self::with_burst(f64::from(per_second), f64::from(per_second))
    }

    /// A burst of `burst`, refilled at `per_second`.
    pub fn with_burst(burst: f64, per_second: f64) -> Self {
        Self {
            burst,
            per_second,
            buckets: HashMap::new(),
        }
    }

    /// Whether a request counted against `key` may be answered now.
    pub fn allow(&mut self, key: K, now: SystemTime) -> bool {
        if self.buckets.len() > MAX_KEYS {
            self.buckets.clear();
        }
        let (tokens, last) = self.buckets.entry(key).or_insert((self.burst, now));
        let elapsed = now
            .duration_since(*last)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
