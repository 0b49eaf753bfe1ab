//! Address leases for full-mode DHCP: pools, offers, bindings, and a journal
//! so that a restart loses none and never gives one address to two machines.
//!
//! The table is plain state handed to the decision function. Changes that
//! must survive a restart (a binding, a release, a decline) are returned as
//! [`LeaseChange`]s; the engine appends a batch of them to the journal and
//! syncs it *before* it sends the ACKs of that batch (group commit: one
//! `fdatasync` for every request that arrived together). Offers are not
//! journalled: an offer that a restart forgets is simply made again.
//!
//! The journal (`dhcp-leases.jsonl` in the state directory) is one JSON
//! object per line; on start it is replayed (the last line for an address
//! wins) and rewritten compactly.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub use crate::proto::dhcp::lease::{epoch, Lease, State};
use crate::proto::Mac;

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD: Duration = Duration::from_secs(30);

/// With a shared lease table, how long an offer is safe from being taken
/// back for another client when this server's blocks are all in use.
pub const SHARED_OFFER_GRACE: Duration = Duration::from_secs(5);

/// A range of addresses handed out on one subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
    pub prefix_len: u8,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.first)..=u32::from(self.last)).contains(&u32::from(ip))
    }

    /// Whether `ip` may be given to a host on this pool's subnet: not the
    /// subnet's network or broadcast address (prefixes up to /30).
    pub fn is_host_address(&self, ip: Ipv4Addr) -> bool {
        if self.prefix_len >= 31 {
            return true;
        }
        let host_mask = u32::MAX >> self.prefix_len;
        let host = u32::from(ip) & host_mask;
        host != 0 && host != host_mask
    }

    pub fn size(&self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }

    /// Whether `ip` is on this pool's subnet.
    pub fn same_subnet(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix_len)
        };
        u32::from(ip) & mask == u32::from(self.first) & mask
    }
}

/// A change to write to the journal before answering.
pub type LeaseChange = Lease;

/// Why no address could be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAddress {
    /// Every address of the pools on that subnet is taken.
    PoolExhausted,
    /// This relay already holds its share of the pool.
    RelayQuota,
    /// No pool serves the subnet the request came from.
    NoPool,
}

/// Every lease the server knows.
#[derive(Debug, Default)]
pub struct LeaseTable {
    pub pools: Vec<Pool>,
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, Ipv4Addr>,
    /// Where the next search for a free address starts, per pool.
    next: Vec<u32>,
    /// Share of a pool one relay may hold (0 < share <= 1).
    pub relay_share: f64,
    held_by_relay: HashMap<Ipv4Addr, u32>,
    /// With a lease table shared by several servers: the blocks of the
    /// pools this server may hand new addresses from. `None`: every
    /// address of the pools (one server alone).
    blocks: Option<Blocks>,
}

/// The blocks of addresses this server holds in a shared lease table,
/// each `size` addresses from a multiple of `size`.
#[derive(Debug, Default)]
pub struct Blocks {
    size: u32,
    owned: std::collections::BTreeSet<u32>,
}

impl Blocks {
    fn owns(&self, ip: Ipv4Addr) -> bool {
        let ip = u32::from(ip);
        self.owned.contains(&(ip - ip % self.size))
    }

    /// Every owned address in `first..=last`, from the block of `start`
    /// on, wrapping round.
    fn addresses(&self, first: u32, last: u32, start: u32) -> impl Iterator<Item = u32> + '_ {
        let size = self.size;
        let start_block = start - start % size;
        self.owned
            .range(start_block..)
            .chain(self.owned.range(..start_block))
            .flat_map(move |&block| block..=block.saturating_add(size - 1))
            .filter(move |ip| (first..=last).contains(ip))
    }
}

impl LeaseTable {
    pub fn new(pools: Vec<Pool>, relay_share: f64) -> Self {
        let next = pools.iter().map(|p| u32::from(p.first)).collect();
        Self {
            pools,
            next,
            relay_share,
            ..Self::default()
        }
    }

    /// Hands out new addresses only from blocks given to
    /// [`Self::add_blocks`] (a lease table shared with other servers).
    pub fn share(&mut self, block_size: u32) {
        self.blocks = Some(Blocks {
            size: block_size.max(1),
            owned: Default::default(),
        });
    }

    /// Whether new addresses come only from owned blocks.
    pub fn is_shared(&self) -> bool {
        self.blocks.is_some()
    }

    /// The first address of every block this server holds.
    pub fn owned_blocks(&self) -> Vec<Ipv4Addr> {
        self.blocks
            .as_ref()
            .map(|b| b.owned.iter().map(|&first| Ipv4Addr::from(first)).collect())
            .unwrap_or_default()
    }

    /// Replaces the blocks this server holds (with what the shared table
    /// says, which wins over a local copy).
    pub fn set_blocks(&mut self, blocks: &[Ipv4Addr]) {
        if let Some(owned) = self.blocks.as_mut() {
            owned.owned = blocks.iter().map(|&b| u32::from(b)).collect();
        }
    }

    /// Adds blocks (by first address) this server now holds.
    pub fn add_blocks(&mut self, blocks: &[Ipv4Addr]) {
        if let Some(owned) = self.blocks.as_mut() {
            owned.owned.extend(blocks.iter().map(|&b| u32::from(b)));
        }
    }

    /// Whether this server may hand `ip` to a machine that has no record
    /// of it: always when alone, only in its own blocks when shared.
    pub fn owns(&self, ip: Ipv4Addr) -> bool {
        self.blocks.as_ref().is_none_or(|b| b.owns(ip))
    }

    /// Per pool: (first, last, owned addresses, of those free now). Only
    /// meaningful when shared; walks every owned address.
    pub fn owned_per_pool(&self, now: SystemTime) -> Vec<(Ipv4Addr, Ipv4Addr, usize, usize)> {
        let Some(blocks) = &self.blocks else {
            return Vec::new();
        };
        let nobody = Mac([0; 6]);
        self.pools
            .iter()
            .map(|pool| {
                let (first, last) = (u32::from(pool.first), u32::from(pool.last));
                let (mut owned, mut free) = (0, 0);
                for ip in blocks.addresses(first, last, first) {
                    owned += 1;
                    if self.available_for(Ipv4Addr::from(ip), nobody, now) {
                        free += 1;
                    }
                }
                (pool.first, pool.last, owned, free)
            })
            .collect()
    }

    /// Every binding and decline that has not expired: what a shared
    /// table must hold of this server's.
    pub fn held(&self, now: SystemTime) -> Vec<Lease> {
        let now = epoch(now);
        self.by_ip
            .values()
            .filter(|l| matches!(l.state, State::Bound | State::Declined) && l.expires > now)
            .copied()
            .collect()
    }

    /// The lease of `ip`, if any.
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The address last given to `mac`, if any.
    pub fn of_mac(&self, mac: Mac) -> Option<&Lease> {
        self.by_ip.get(self.by_mac.get(&mac)?)
    }

    /// Bound leases that have not expired.
    pub fn bound(&self, now: SystemTime) -> usize {
        let now = epoch(now);
        self.by_ip
            .values()
            .filter(|l| l.state == State::Bound && l.expires > now)
            .count()
    }

    /// Bound leases that have not expired, per pool: (first, last, count).
    pub fn bound_per_pool(&self, now: SystemTime) -> Vec<(Ipv4Addr, Ipv4Addr, usize)> {
        let now = epoch(now);
        let mut counts = vec![0; self.pools.len()];
        for lease in self.by_ip.values() {
            if lease.state == State::Bound && lease.expires > now {
                if let Some(pool) = self.pools.iter().position(|p| p.contains(lease.ip)) {
                    counts[pool] += 1;
                }
            }
        }
        self.pools
            .iter()
            .zip(counts)
            .map(|(pool, count)| (pool.first, pool.last, count))
            .collect()
    }

    /// Whether `ip` may be given to `mac` now.
    pub fn available_for(&self, ip: Ipv4Addr, mac: Mac, now: SystemTime) -> bool {
        match self.by_ip.get(&ip) {
            None => true,
            Some(lease) if lease.mac == mac => {
                lease.state != State::Declined || lease.expires <= epoch(now)
            }
            Some(lease) => lease.expires <= epoch(now) || lease.state == State::Released,
        }
    }

    /// Applies a lease (from the decision or the journal).
    pub fn apply(&mut self, lease: Lease) {
        if let Some(old) = self.by_ip.get(&lease.ip).copied() {
            if old.mac != lease.mac && self.by_mac.get(&old.mac) == Some(&lease.ip) {
                self.by_mac.remove(&old.mac);
            }
            if !old.relay.is_unspecified() && old.state != State::Released {
                if let Some(n) = self.held_by_relay.get_mut(&old.relay) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        if let Some(previous) = self.by_mac.get(&lease.mac).copied() {
            if previous != lease.ip && lease.state != State::Declined {
                // A client holds one address; its old one becomes free.
                if let Some(old) = self.by_ip.get_mut(&previous) {
                    if old.mac == lease.mac && old.state != State::Bound {
                        old.state = State::Released;
                        old.expires = 0;
                    }
                }
            }
        }
        if !lease.relay.is_unspecified() && lease.state != State::Released {
            *self.held_by_relay.entry(lease.relay).or_insert(0) += 1;
        }
        if lease.state != State::Declined {
            self.by_mac.insert(lease.mac, lease.ip);
        }
        self.by_ip.insert(lease.ip, lease);
    }

    /// An address for `mac` on the subnet of `subnet_hint` (the interface
    /// or relay address): its reservation, its current or last address, the
    /// address it asks for, or the next free one.
    pub fn choose(
        &mut self,
        mac: Mac,
        subnet_hint: Ipv4Addr,
        requested: Option<Ipv4Addr>,
        relay: Ipv4Addr,
        now: SystemTime,
    ) -> Result<Ipv4Addr, NoAddress> {
        let pool_index = self
            .pools
            .iter()
            .position(|p| p.same_subnet(subnet_hint))
            .ok_or(NoAddress::NoPool)?;
        let pool = self.pools[pool_index].clone();
        if let Some(lease) = self.of_mac(mac) {
            if pool.contains(lease.ip) && lease.state != State::Declined {
                return Ok(lease.ip);
            }
        }
        if let Some(ip) = requested {
            // Shared: an address outside this server's blocks only when the
            // table already has it for this machine (another server's lease
            // that the shared table confirmed).
            let ours = self.owns(ip) || self.get(ip).is_some_and(|l| l.mac == mac);
            if pool.contains(ip) && ours && self.available_for(ip, mac, now) {
                return Ok(ip);
            }
        }
        if !relay.is_unspecified() {
            let held = self.held_by_relay.get(&relay).copied().unwrap_or(0);
            if f64::from(held) >= f64::from(pool.size()) * self.relay_share {
                return Err(NoAddress::RelayQuota);
            }
        }
        let (first, last, size) = (u32::from(pool.first), u32::from(pool.last), pool.size());
        let start = self.next[pool_index].clamp(first, last);
        let free = match &self.blocks {
            None => (0..size)
                .map(|step| first + (start - first + step) % size)
                .find(|&candidate| self.available_for(Ipv4Addr::from(candidate), mac, now)),
            Some(blocks) => blocks
                .addresses(first, last, start)
                .find(|&candidate| self.available_for(Ipv4Addr::from(candidate), mac, now)),
        };
        if let Some(candidate) = free {
            self.next[pool_index] = candidate + 1;
            return Ok(Ipv4Addr::from(candidate));
        }
        // Every address is bound or offered. Offers are tentative: take the
        // oldest one back, so that DISCOVERs alone (a sender spraying random
        // MACs) can never starve the pool; if both clients then REQUEST it,
        // the first binds and the second gets a NAK and starts over.
        // Sharing a table, running out of this server's blocks is the
        // usual moment before its keeper claims more, not an exhausted
        // pool: an offer is then taken back only once its client has had
        // [`SHARED_OFFER_GRACE`] to ask for it, or a burst would NAK its
        // own clients.
        let taken_back_before = match self.blocks {
            Some(_) => epoch(now + OFFER_HOLD).saturating_sub(SHARED_OFFER_GRACE.as_secs()),
            None => u64::MAX,
        };
        let oldest_offer = self
            .by_ip
            .values()
            .filter(|l| {
                l.state == State::Offered
                    && l.mac != mac
                    && pool.contains(l.ip)
                    && self.owns(l.ip)
                    && l.expires <= taken_back_before
            })
            .min_by_key(|l| l.expires)
            .map(|l| l.ip);
        oldest_offer.ok_or(NoAddress::PoolExhausted)
    }
}

/// The journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
    /// `fdatasync` each batch (survives power loss) or only write it
    /// (survives a restart of bootfleet, as Kea's memfile does).
    pub sync: bool,
}

/// How long the address of an unreadable journal record stays out of the
/// pool: a day, longer than any usual lease, so the machine that may hold it
/// has renewed or gone by then.
pub const DAMAGED_QUARANTINE_SECS: u64 = 24 * 3600;

/// Creates (truncating) a file only its owner can read: leases name every
/// machine of the fleet.
fn private_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The `"ip":"a.b.c.d"` of a damaged journal line, if it can still be read.
fn address_in_damaged_record(line: &[u8]) -> Option<Ipv4Addr> {
    const KEY: &[u8] = b"\"ip\":\"";
    let start = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = &line[start..];
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

impl Journal {
    /// Opens (creating) the journal in `state_dir`, replays it into
    /// `table`, and rewrites it compactly. Returns how many leases it held.
    pub fn open(
        state_dir: &Path,
        table: &mut LeaseTable,
        now: SystemTime,
    ) -> std::io::Result<(Self, usize)> {
        std::fs::create_dir_all(state_dir)?;
        let path = state_dir.join("dhcp-leases.jsonl");
        let mut latest: HashMap<Ipv4Addr, Lease> = HashMap::new();
        // Read as bytes: one line that is not UTF-8 (a torn write, a bad
        // disk block) must not keep the server from starting.
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let (mut unreadable, mut quarantined) = (0usize, 0usize);
        for (number, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match std::str::from_utf8(line)
                .map_err(|e| e.to_string())
                .and_then(|text| serde_json::from_str::<Lease>(text).map_err(|e| e.to_string()))
            {
                Ok(lease) => {
                    latest.insert(lease.ip, lease);
                }
                // The address of a record that cannot be read is kept out
                // of the pool (as if declined) until the quarantine ends:
                // it may be bound to a machine, and a second MAC must not
                // get it.
                Err(error) => {
                    unreadable += 1;
                    let ip = address_in_damaged_record(line);
                    tracing::warn!(file = %path.display(), line = number + 1, %error,
                        quarantined = ?ip, "skipping an unreadable lease record");
                    if let Some(ip) = ip {
                        quarantined += 1;
                        latest.insert(
                            ip,
                            Lease {
                                ip,
                                mac: Mac([0; 6]),
                                state: State::Declined,
                                expires: epoch(now) + DAMAGED_QUARANTINE_SECS,
                                relay: Ipv4Addr::UNSPECIFIED,
                            },
                        );
                    }
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(file = %path.display(), unreadable, quarantined,
                hours = DAMAGED_QUARANTINE_SECS / 3600,
                "the lease journal had unreadable records; their addresses are kept out of the pool");
        }
        let keep: Vec<Lease> = latest
            .into_values()
            .filter(|l| matches!(l.state, State::Bound | State::Declined) && l.expires > epoch(now))
            .collect();
        let tmp = path.with_extension("jsonl.tmp");
        {
            let mut out = std::io::BufWriter::new(private_file(&tmp)?);
            for lease in &keep {
                serde_json::to_writer(&mut out, lease)?;
                out.write_all(b"\n")?;
            }
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        crate::durable::sync_parent_dir(&path)?;
        for lease in &keep {
            table.apply(*lease);
        }
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        Ok((
            Self {
                path,
                file,
                sync: true,
            },
            keep.len(),
        ))
    }

    /// Appends `changes` and, with `sync`, waits until they are on disk.
    pub fn commit(&mut self, changes: &[LeaseChange]) -> std::io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(changes.len() * 100);
        for change in changes {
            serde_json::to_writer(&mut buf, change).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        if self.sync {
            self.file.sync_data()?;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Pool {
        Pool {
            first: Ipv4Addr::new(10, 0, 0, 10),
            last: Ipv4Addr::new(10, 0, 0, 13),
            prefix_len: 24,
        }
    }

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    fn bind(table: &mut LeaseTable, ip: Ipv4Addr, mac: Mac, now: SystemTime) -> Lease {
        let lease = Lease {
            ip,
            mac,
            state: State::Bound,
            expires: epoch(now) + 3600,
            relay: Ipv4Addr::UNSPECIFIED,
        };
        table.apply(lease);
        lease
    }

    /// Found by `benches/dhcp_compare.py` (bootfleet-postgres dropped 9% of
    /// REQUESTs): a server sharing a table ran out of its blocks in a
    /// burst and took back offers made milliseconds before, so their
    /// clients were NAKed. Sharing, only offers older than the grace are
    /// taken back; alone, any (the pool really is full).
    #[test]
    fn a_shared_table_takes_back_only_offers_past_their_grace() {
        let now = SystemTime::now();
        for shared in [true, false] {
            let mut table = LeaseTable::new(vec![pool()], 1.0);
            if shared {
                table.share(64);
                table.add_blocks(&[Ipv4Addr::new(10, 0, 0, 0)]);
            }
            let offer = |table: &mut LeaseTable, n: u8, at: SystemTime| {
                let ip = table
                    .choose(mac(n), pool().first, None, Ipv4Addr::UNSPECIFIED, at)
                    .unwrap();
                table.apply(Lease {
                    ip,
                    mac: mac(n),
                    state: State::Offered,
                    expires: epoch(at + OFFER_HOLD),
                    relay: Ipv4Addr::UNSPECIFIED,
                });
            };
            for n in 1..=4 {
                offer(&mut table, n, now);
            }
            let fresh = table.choose(mac(9), pool().first, None, Ipv4Addr::UNSPECIFIED, now);
            if shared {
                assert_eq!(
                    fresh,
                    Err(NoAddress::PoolExhausted),
                    "fresh offers are kept"
                );
                let later = now + SHARED_OFFER_GRACE + Duration::from_secs(1);
                assert!(
                    table
                        .choose(mac(9), pool().first, None, Ipv4Addr::UNSPECIFIED, later)
                        .is_ok(),
                    "an offer past its grace is taken back"
                );
            } else {
                assert!(
                    fresh.is_ok(),
                    "alone, the oldest offer is taken back at once"
                );
            }
        }
    }

    #[test]
    fn addresses_are_never_given_twice_and_the_pool_runs_out_cleanly() {
        let now = SystemTime::now();
        let mut table = LeaseTable::new(vec![pool()], 1.0);
        let iface = Ipv4Addr::new(10, 0, 0, 1);
        let mut given = Vec::new();
        for n in 0..4 {
            let ip = table
                .choose(mac(n), iface, None, Ipv4Addr::UNSPECIFIED, now)
                .unwrap();
            assert!(!given.contains(&ip));
            bind(&mut table, ip, mac(n), now);
            given.push(ip);
        }
        assert_eq!(
            table.choose(mac(9), iface, None, Ipv4Addr::UNSPECIFIED, now),
            Err(NoAddress::PoolExhausted)
        );
        // A known client gets its own address again.
        assert_eq!(
            table.choose(mac(2), iface, None, Ipv4Addr::UNSPECIFIED, now),
            Ok(given[2])
        );
        // Expired leases are reused.
        let later = now + Duration::from_secs(7200);
        assert!(table
            .choose(mac(9), iface, None, Ipv4Addr::UNSPECIFIED, later)
            .is_ok());
        assert_eq!(
            table.choose(
                mac(1),
                Ipv4Addr::new(192, 168, 1, 1),
                None,
                Ipv4Addr::UNSPECIFIED,
                now
            ),
            Err(NoAddress::NoPool)
        );
    }

    #[test]
    fn a_flood_of_discovers_cannot_starve_the_pool() {
        let now = SystemTime::now();
        let mut table = LeaseTable::new(vec![pool()], 1.0);
        let iface = Ipv4Addr::new(10, 0, 0, 1);
        for n in 0..200u8 {
            let ip = table
                .choose(mac(n), iface, None, Ipv4Addr::UNSPECIFIED, now)
                .unwrap();
            table.apply(Lease {
                ip,
                mac: mac(n),
                state: State::Offered,
                expires: epoch(now) + 30,
                relay: Ipv4Addr::UNSPECIFIED,
            });
        }
        let ip = table
            .choose(mac(250), iface, None, Ipv4Addr::UNSPECIFIED, now)
            .expect("an offer for a real client");
        bind(&mut table, ip, mac(250), now);
        assert_eq!(table.of_mac(mac(250)).unwrap().state, State::Bound);
    }

    #[test]
    fn requested_and_declined_addresses() {
        let now = SystemTime::now();
        let mut table = LeaseTable::new(vec![pool()], 1.0);
        let iface = Ipv4Addr::new(10, 0, 0, 1);
        let want = Ipv4Addr::new(10, 0, 0, 12);
        assert_eq!(
            table.choose(mac(1), iface, Some(want), Ipv4Addr::UNSPECIFIED, now),
            Ok(want)
        );
        bind(&mut table, want, mac(1), now);
        // Someone else asking for it gets another.
        assert_ne!(
            table.choose(mac(2), iface, Some(want), Ipv4Addr::UNSPECIFIED, now),
            Ok(want)
        );
        // Declined: nobody gets it until it expires.
        table.apply(Lease {
            ip: want,
            mac: mac(1),
            state: State::Declined,
            expires: epoch(now) + 600,
            relay: Ipv4Addr::UNSPECIFIED,
        });
        for n in 3..6 {
            let ip = table
                .choose(mac(n), iface, None, Ipv4Addr::UNSPECIFIED, now)
                .unwrap();
            assert_ne!(ip, want);
            bind(&mut table, ip, mac(n), now);
        }
    }

    #[test]
    fn a_relay_holds_at_most_its_share() {
        let now = SystemTime::now();
        let mut table = LeaseTable::new(vec![pool()], 0.5);
        let relay = Ipv4Addr::new(10, 0, 0, 1);
        for n in 0..2 {
            let ip = table.choose(mac(n), relay, None, relay, now).unwrap();
            table.apply(Lease {
                ip,
                mac: mac(n),
                state: State::Bound,
                expires: epoch(now) + 60,
                relay,
            });
        }
        assert_eq!(
            table.choose(mac(7), relay, None, relay, now),
            Err(NoAddress::RelayQuota)
        );
    }

    #[test]
    fn the_journal_survives_a_restart_and_skips_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let mut table = LeaseTable::new(vec![pool()], 1.0);
        let (mut journal, count) = Journal::open(dir.path(), &mut table, now).unwrap();
        assert_eq!(count, 0);
        let a = bind(&mut table, Ipv4Addr::new(10, 0, 0, 10), mac(1), now);
        let b = bind(&mut table, Ipv4Addr::new(10, 0, 0, 11), mac(2), now);
        journal.commit(&[a, b]).unwrap();
        let released = Lease {
            state: State::Released,
            expires: 0,
            ..b
        };
        journal.commit(&[released]).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(journal.path())
            .unwrap()
            .write_all(b"{\"ip\":\"10.0.0.12\",\"ma")
            .unwrap();
        drop(journal);

        let mut again = LeaseTable::new(vec![pool()], 1.0);
        let (_, count) = Journal::open(dir.path(), &mut again, now).unwrap();
        // Machine 1's lease, and the torn record's address in quarantine.
        assert_eq!(count, 2);
        assert_eq!(again.of_mac(mac(1)).map(|l| l.ip), Some(a.ip));
        assert!(again.of_mac(mac(2)).is_none());
        // Machine 1's lease survived, so its address is not handed out again.
        let third = again
            .choose(
                mac(3),
                Ipv4Addr::new(10, 0, 0, 1),
                Some(a.ip),
                Ipv4Addr::UNSPECIFIED,
                now,
            )
            .unwrap();
        assert_ne!(third, a.ip);
    }

    /// Security review finding 9: one non-UTF-8 byte kept the server from
    /// starting, and a corrupt line silently freed its address for a second
    /// MAC. Now bad records are skipped and reported, their addresses kept
    /// out of the pool, and the journal is private to its owner.
    #[test]
    fn damaged_journal_records_are_skipped_and_their_addresses_quarantined() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let good = Lease {
            ip: Ipv4Addr::new(10, 0, 0, 10),
            mac: mac(1),
            state: State::Bound,
            expires: epoch(now) + 3600,
            relay: Ipv4Addr::UNSPECIFIED,
        };
        let mut text = serde_json::to_vec(&good).unwrap();
        text.extend_from_slice(
            b"\n{\"ip\":\"10.0.0.11\",\"mac\":\"02:00:00:00:00:02\",\"state\":\"bo\xffund\"}\n",
        );
        text.extend_from_slice(
            b"{\"ip\":\"10.0.0.12\",\"mac\":\"zz\",\"state\":\"bound\",\"expires\":1}\n",
        );
        text.extend_from_slice(b"\xfe\xfe garbage without an address\n");
        std::fs::write(dir.path().join("dhcp-leases.jsonl"), &text).unwrap();

        let mut table = LeaseTable::new(vec![pool()], 1.0);
        let (journal, count) = Journal::open(dir.path(), &mut table, now).expect("starts anyway");
        assert_eq!(count, 3, "one lease, two quarantined addresses");
        assert_eq!(table.of_mac(mac(1)).map(|l| l.ip), Some(good.ip));
        let hint = Ipv4Addr::new(10, 0, 0, 1);
        let free = table.choose(mac(3), hint, None, Ipv4Addr::UNSPECIFIED, now);
        assert_eq!(
            free,
            Ok(Ipv4Addr::new(10, 0, 0, 13)),
            "the only address not held or quarantined"
        );
        bind(&mut table, Ipv4Addr::new(10, 0, 0, 13), mac(3), now);
        for asked in [11, 12] {
            let ip = Ipv4Addr::new(10, 0, 0, asked);
            let got = table.choose(mac(4), hint, Some(ip), Ipv4Addr::UNSPECIFIED, now);
            assert_eq!(got, Err(NoAddress::PoolExhausted), "{ip} is quarantined");
        }
        let mode = std::fs::metadata(journal.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the journal is private: {mode:o}");
    }
}
