//! The DHCP lease table that several bootfleet servers share in one
//! PostgreSQL database (active/active DHCP on one LAN).
//!
//! Two tables (schema version 3, `postgres.rs`):
//! - `dhcp_blocks`: blocks of [`BLOCK_SIZE`] addresses, aligned on
//!   multiples of the size, each claimed by one server (`INSERT … ON
//!   CONFLICT DO NOTHING`: of two servers claiming one block, one wins). A
//!   server hands out new addresses only from its own blocks, so the
//!   DISCOVER → OFFER path never asks the database, and two servers never
//!   offer one address.
//! - `dhcp_leases`: every binding, release and decline any server made,
//!   written before the ACK. The write is conditional: it replaces a row
//!   only when the row is the same machine's, has expired, or was
//!   released, so whatever the blocks say (a block taken over by hand, a
//!   reservation, a lease honoured for a server that died), the database
//!   never lets two MACs hold one address; a refused row is reported back
//!   and its ACK is not sent.
//!
//! One connection per server, held by the DHCP service's lease keeper
//! (`engine/dhcp_share.rs`), never by a thread that answers DHCP. While
//! the keeper is connected it holds a session advisory lock on its server
//! name, so a second live server configured with the same name is refused
//! blocks instead of silently sharing them.

use std::net::Ipv4Addr;

use ::postgres::Client;

use super::postgres::{connect, database_message, migrate, now_ms, redact};
use super::{StoreError, StoreResult};
use crate::proto::dhcp::lease::{Lease, State};
use crate::proto::Mac;

/// Addresses per block: small enough that a /24 is split between several
/// servers, large enough that a storm of thousands needs only a few
/// dozen claims (each one statement).
pub const BLOCK_SIZE: u32 = 64;

/// The first address of the block holding `ip`.
pub fn block_of(ip: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) / BLOCK_SIZE * BLOCK_SIZE)
}

/// One server's connection to the shared lease table.
pub struct SharedLeases {
    url: String,
    server: String,
    client: Option<Client>,
}

impl SharedLeases {
    /// The table at `url`, for the server called `server`; nothing is
    /// connected until the first call.
    pub fn new(url: &str, server: &str) -> Self {
        Self {
            url: url.to_string(),
            server: server.to_string(),
            client: None,
        }
    }

    /// This server's name in the tables.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether a connection is open.
    pub fn connected(&self) -> bool {
        self.client.as_ref().is_some_and(|c| !c.is_closed())
    }

    /// Drops the connection (after an error), so the next call connects
    /// afresh and takes the server's name lock again.
    pub fn disconnect(&mut self) {
        self.client = None;
    }

    /// The open connection, or a new one: schema brought up to date and
    /// the server name's lock taken.
    fn client(&mut self) -> StoreResult<&mut Client> {
        if !self.connected() {
            let mut client = connect(&self.url).map_err(|e| {
                StoreError::Database(format!(
                    "cannot connect to PostgreSQL at {} for the shared DHCP leases: {}",
                    redact(&self.url),
                    database_message(e)
                ))
            })?;
            migrate(&mut client)?;
            let locked: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock(hashtext('bootfleet-dhcp:' || $1))",
                    &[&self.server],
                )?
                .get(0);
            if !locked {
                return Err(StoreError::Conflict(format!(
                    "another running bootfleet uses the server name {:?} on this database; \
                     give each server its own name (panel.server_name) or they would hand out the same addresses",
                    self.server
                )));
            }
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    /// The first address of every block this server holds.
    pub fn owned_blocks(&mut self) -> StoreResult<Vec<Ipv4Addr>> {
        let server = self.server.clone();
        let rows = self.client()?.query(
            "SELECT first FROM dhcp_blocks WHERE server = $1 ORDER BY first",
            &[&server],
        )?;
        Ok(rows.iter().map(|r| address(r.get(0))).collect())
    }

    /// Claims up to `count` free blocks overlapping `first..=last` for this
    /// server, lowest first, but never more than half of those still
    /// unclaimed (at least one), so that a small pool is split between
    /// the servers that need it instead of going to the first to ask.
    /// Returns those it got (fewer when another server took some first).
    pub fn claim_blocks(
        &mut self,
        first: Ipv4Addr,
        last: Ipv4Addr,
        count: usize,
    ) -> StoreResult<Vec<Ipv4Addr>> {
        let server = self.server.clone();
        let (low, high) = (
            i64::from(u32::from(block_of(first))),
            i64::from(u32::from(last)),
        );
        let client = self.client()?;
        let taken: std::collections::HashSet<i64> = client
            .query(
                "SELECT first FROM dhcp_blocks WHERE first BETWEEN $1 AND $2",
                &[&low, &high],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let unclaimed: Vec<i64> = (low..=high)
            .step_by(BLOCK_SIZE as usize)
            .filter(|b| !taken.contains(b))
            .collect();
        let count = count.min((unclaimed.len() / 2).max(1));
        let mut claimed = Vec::new();
        let mut candidates = unclaimed.into_iter();
        // Another server may claim some of the same blocks between the
        // read and the insert: ask again for what is still missing.
        while claimed.len() < count {
            let wanted: Vec<i64> = candidates.by_ref().take(count - claimed.len()).collect();
            if wanted.is_empty() {
                break;
            }
            let rows = client.query(
                "INSERT INTO dhcp_blocks (first, size, server, claimed_ms) \
                 SELECT b, $2, $3, $4 FROM unnest($1::BIGINT[]) AS b \
                 ON CONFLICT (first) DO NOTHING RETURNING first",
                &[&wanted, &(BLOCK_SIZE as i32), &server, &now_ms()],
            )?;
            claimed.extend(rows.iter().map(|r| address(r.get(0))));
        }
        claimed.sort();
        Ok(claimed)
    }

    /// Writes `leases` (bindings, releases, declines) as this server's;
    /// returns the addresses the table refused because another machine
    /// holds them. One statement for the whole batch.
    pub fn write(&mut self, leases: &[Lease], now_secs: u64) -> StoreResult<Vec<Ipv4Addr>> {
        // One row per address (the last change wins): a statement may not
        // update a row twice.
        let mut latest = std::collections::BTreeMap::new();
        for lease in leases {
            latest.insert(lease.ip, *lease);
        }
        if latest.is_empty() {
            return Ok(Vec::new());
        }
        // Column by column, for one `unnest` of arrays.
        let ips: Vec<i64> = latest.keys().map(|&ip| i64::from(u32::from(ip))).collect();
        let macs: Vec<String> = latest.values().map(|l| l.mac.to_string()).collect();
        let states: Vec<&str> = latest.values().map(|l| state_name(l.state)).collect();
        let expires: Vec<i64> = latest.values().map(|l| l.expires as i64).collect();
        let relays: Vec<i64> = latest
            .values()
            .map(|l| i64::from(u32::from(l.relay)))
            .collect();
        let server = self.server.clone();
        let rows = self.client()?.query(
            "INSERT INTO dhcp_leases AS l (ip, mac, state, expires, relay, server, updated_ms) \
             SELECT u.ip, u.mac, u.state, u.expires, u.relay, $6, $7 \
             FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::BIGINT[]) \
                  AS u(ip, mac, state, expires, relay) \
             ON CONFLICT (ip) DO UPDATE SET mac = EXCLUDED.mac, state = EXCLUDED.state, \
                expires = EXCLUDED.expires, relay = EXCLUDED.relay, server = EXCLUDED.server, \
                updated_ms = EXCLUDED.updated_ms \
             WHERE l.mac = EXCLUDED.mac OR l.expires <= $8 OR l.state = 'released' \
             RETURNING ip",
            &[
                &ips,
                &macs,
                &states,
                &expires,
                &relays,
                &server,
                &now_ms(),
                &(now_secs as i64),
            ],
        )?;
        let written: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        Ok(ips
            .iter()
            .filter(|ip| !written.contains(ip))
            .map(|&ip| address(ip))
            .collect())
    }

    /// The lease of `ip` as the shared table has it, whichever server
    /// wrote it.
    pub fn lease(&mut self, ip: Ipv4Addr) -> StoreResult<Option<Lease>> {
        let row = self.client()?.query_opt(
            "SELECT mac, state, expires, relay FROM dhcp_leases WHERE ip = $1",
            &[&i64::from(u32::from(ip))],
        )?;
        Ok(row.and_then(|row| {
            Some(Lease {
                ip,
                mac: Mac::parse(row.get::<_, &str>(0)).ok()?,
                state: state_from_name(row.get(1))?,
                expires: row.get::<_, i64>(2).max(0) as u64,
                relay: address(row.get(3)),
            })
        }))
    }

    /// Every lease row, for tests and `bootfleet db` checks: (lease,
    /// server that wrote it).
    pub fn all(&mut self) -> StoreResult<Vec<(Lease, String)>> {
        let rows = self.client()?.query(
            "SELECT ip, mac, state, expires, relay, server FROM dhcp_leases ORDER BY ip",
            &[],
        )?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let lease = Lease {
                    ip: address(row.get(0)),
                    mac: Mac::parse(row.get::<_, &str>(1)).ok()?,
                    state: state_from_name(row.get(2))?,
                    expires: row.get::<_, i64>(3).max(0) as u64,
                    relay: address(row.get(4)),
                };
                Some((lease, row.get(5)))
            })
            .collect())
    }
}

fn address(number: i64) -> Ipv4Addr {
    Ipv4Addr::from(number as u32)
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Offered => "offered",
        State::Bound => "bound",
        State::Declined => "declined",
        State::Released => "released",
    }
}

fn state_from_name(name: &str) -> Option<State> {
    Some(match name {
        "offered" => State::Offered,
        "bound" => State::Bound,
        "declined" => State::Declined,
        "released" => State::Released,
        _ => return None,
    })
}
