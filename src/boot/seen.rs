//! The machines that asked for a script: when each was first and last
//! seen, from which address, with the facts its iPXE sent, and whether the
//! inventory lists it. Memory is bounded: at most `MAX_SEEN` machines,
//! and one client address may introduce new unknown MACs only as fast as
//! machines boot.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{debug, info};

use super::MAX_SEEN;
use crate::inventory::Snapshot;
use crate::limit::RateLimiter;
use crate::proto::Mac;

/// New unknown MACs one client address may introduce at once, and then per
/// second: a booting machine asks for one MAC (its own); 145,000 made-up
/// MACs in 20 s from one host once filled the inventory.
pub(super) const NEW_MACS_BURST: f64 = 16.0;
const NEW_MACS_PER_SECOND: f64 = 1.0;

/// A machine that asked for its script.
#[derive(Debug, Clone, Serialize)]
pub struct SeenMachine {
    pub mac: Mac,
    pub client: IpAddr,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub facts: BTreeMap<String, String>,
    /// Not listed in the inventory.
    pub discovered: bool,
}

/// Every machine seen, by MAC.
pub(super) struct SeenMachines {
    seen: Mutex<HashMap<Mac, SeenMachine>>,
    /// New unknown MACs each client address may still introduce (a token
    /// bucket): a machine brings one, a host making them up is held to
    /// [`NEW_MACS_PER_SECOND`].
    discovery_budget: Mutex<RateLimiter<IpAddr>>,
}

impl Default for SeenMachines {
    fn default() -> Self {
        Self {
            seen: Mutex::new(HashMap::new()),
            discovery_budget: Mutex::new(RateLimiter::with_burst(
                NEW_MACS_BURST,
                NEW_MACS_PER_SECOND,
            )),
        }
    }
}

impl SeenMachines {
    /// Records that `mac` asked from `client` with `facts`; `discovered`
    /// when the inventory does not list it (such a MAC is remembered only
    /// within the address's discovery budget).
    pub(super) fn remember(
        &self,
        mac: Mac,
        client: IpAddr,
        facts: &BTreeMap<String, String>,
        discovered: bool,
    ) {
        let now = now_ms();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains_key(&mac) {
            if seen.len() >= MAX_SEEN {
                return;
            }
            let may_discover = || {
                self.discovery_budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .allow(client, SystemTime::now())
            };
            if discovered && !may_discover() {
                debug!(%mac, %client, "new unknown MACs from this address faster than machines boot; not remembered");
                return;
            }
        }
        let entry = seen.entry(mac).or_insert_with(|| {
            if discovered {
                info!(%mac, %client, ?facts, "discovered a machine the inventory does not list");
            }
            SeenMachine {
                mac,
                client,
                first_seen_ms: now,
                last_seen_ms: now,
                facts: BTreeMap::new(),
                discovered,
            }
        });
        entry.client = client;
        entry.last_seen_ms = now;
        entry.discovered = discovered;
        for (name, value) in facts {
            if !value.is_empty() {
                entry.facts.insert(name.clone(), value.clone());
            }
        }
    }

    /// Machines seen, most recently seen first, each `discovered` only if
    /// `snapshot` still does not list it; `discovered_only` keeps those.
    pub(super) fn list(&self, snapshot: &Snapshot, discovered_only: bool) -> Vec<SeenMachine> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<SeenMachine> = seen
            .values()
            .map(|m| SeenMachine {
                discovered: m.discovered && !snapshot.machines.contains_key(&m.mac),
                ..m.clone()
            })
            .filter(|m| !discovered_only || m.discovered)
            .collect();
        out.sort_by_key(|m| std::cmp::Reverse(m.last_seen_ms));
        out
    }

    pub(super) fn get(&self, mac: Mac) -> Option<SeenMachine> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(&mac).cloned()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
