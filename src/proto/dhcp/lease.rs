//! The lease record: which address a machine holds, in what state, until
//! when. Plain data shared by the DHCP service's lease table, its journal
//! and the lease table that several servers share in PostgreSQL.

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::proto::Mac;

/// What an address is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Offered,
    Bound,
    /// A client said the address is in use by someone else (DHCPDECLINE).
    Declined,
    Released,
}

/// One address's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: Mac,
    pub state: State,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    /// The relay that asked for it (0.0.0.0 when not relayed).
    #[serde(default = "unspecified")]
    pub relay: Ipv4Addr,
}

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

/// Seconds since the Unix epoch, the unit of [`Lease::expires`].
pub fn epoch(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
