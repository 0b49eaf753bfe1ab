//! The embedded inventory database: one SQLite file in WAL mode, one
//! connection behind a mutex (SQLite allows one writer; the panel's
//! queries are short), schema migrations numbered by `PRAGMA user_version`.
//!
//! Hand-written rather than through a migration crate: the schema is a
//! list of SQL scripts applied in order, which is all such a crate would do.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::*;
use crate::boot::events::BootEvent;

/// Schema versions, in order; version N is `MIGRATIONS[N-1]`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE images (
    name TEXT PRIMARY KEY,
    kernel TEXT NOT NULL,
    initrds TEXT NOT NULL DEFAULT '[]',
    cmdline TEXT NOT NULL DEFAULT '',
    transport TEXT NOT NULL DEFAULT 'http',
    architecture TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '[]',
    created_ms INTEGER NOT NULL
);
CREATE TABLE machines (
    mac TEXT PRIMARY KEY,
    hostname TEXT,
    ip TEXT UNIQUE,
    labels TEXT NOT NULL DEFAULT '[]',
    image TEXT REFERENCES images(name),
    one_shot INTEGER NOT NULL DEFAULT 0,
    rearm INTEGER NOT NULL DEFAULT 0,
    netboot INTEGER NOT NULL DEFAULT 1,
    cmdline_append TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT '',
    adopted INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER,
    last_seen_ms INTEGER,
    facts TEXT NOT NULL DEFAULT '{}',
    phase TEXT,
    phase_ms INTEGER,
    phase_status INTEGER
);
CREATE INDEX machines_image ON machines(image);
CREATE TABLE pools (
    name TEXT PRIMARY KEY,
    members TEXT NOT NULL DEFAULT '[]',
    selector TEXT NOT NULL DEFAULT '[]',
    image TEXT
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    mac TEXT,
    client TEXT NOT NULL,
    phase TEXT NOT NULL,
    transport TEXT NOT NULL,
    detail TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX events_by_time ON events(at_ms);
CREATE INDEX events_by_machine ON events(mac, at_ms);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    user TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    last_used_ms INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE events ADD COLUMN server TEXT NOT NULL DEFAULT '';
"#,
    // Machines' BMCs: one JSON record each, its password sealed.
    r#"
CREATE TABLE bmcs (
    mac TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE images ADD COLUMN checkin_deadline_s INTEGER NOT NULL DEFAULT 0;
"#,
    // One-shot assignments used up (shared between the servers of one
    // database), and the image files each server holds (replication).
    r#"
CREATE TABLE one_shots_used (
    mac TEXT PRIMARY KEY,
    rearm INTEGER NOT NULL
);
CREATE TABLE server_files (
    name TEXT PRIMARY KEY,
    http_url TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '[]',
    seen_ms INTEGER NOT NULL
);
"#,
    // Images booted through the Secure Boot chain.
    r#"
ALTER TABLE images ADD COLUMN secure_boot INTEGER NOT NULL DEFAULT 0;
"#,
    // Editable images: each image's revisions (its whole record as JSON),
    // and machines pinned to one.
    r#"
ALTER TABLE images ADD COLUMN revision INTEGER NOT NULL DEFAULT 1;
ALTER TABLE machines ADD COLUMN image_revision INTEGER;
CREATE TABLE image_revisions (
    image TEXT NOT NULL,
    revision INTEGER NOT NULL,
    record TEXT NOT NULL,
    changes TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (image, revision)
);
"#,
];

/// What a database copy holds, to compare with the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    pub machines: u64,
    pub images: u64,
    pub users: u64,
    pub events: u64,
}

impl std::fmt::Display for BackupSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} machines, {} images, {} users, {} boot events",
            self.machines, self.images, self.users, self.events
        )
    }
}

/// The SQLite inventory store.
///
/// Machines are also kept in memory, updated after each committed change:
/// the fleet view, the machine list and every snapshot rebuild read all
/// machines, and with 10,000 of them reading the table each time costs
/// ~15 ms of CPU per call, while the boot-event writer changes a few rows
/// every 100 ms during a power-on storm.
pub struct SqliteStore {
    connection: Mutex<Connection>,
    /// All machines by MAC; `None` until first read.
    machines: Mutex<Option<BTreeMap<Mac, MachineRecord>>>,
}

/// A committed change to apply to the in-memory machines.
enum CacheChange {
    /// Boxed: a record is far larger than the other changes.
    Put(Box<MachineRecord>),
    Remove(Mac),
    Phase {
        mac: Mac,
        phase: String,
        at_ms: u64,
        status: u16,
    },
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

fn from_json<T: serde::de::DeserializeOwned + Default>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its
    /// schema up to date.
    /// Copies the whole database into `target` (created or replaced) while
    /// the server keeps running: SQLite's online backup API copies it in
    /// steps, and writers in between are picked up, so the copy is one
    /// consistent state. Returns what the copy holds.
    pub fn backup_to(&self, target: &Path) -> StoreResult<BackupSummary> {
        let connection = self.connection.lock().unwrap_or_else(|p| p.into_inner());
        let mut copy = Connection::open(target).map_err(|e| {
            StoreError::Database(format!("cannot create {}: {e}", target.display()))
        })?;
        {
            let backup = rusqlite::backup::Backup::new(&connection, &mut copy)?;
            backup.run_to_completion(256, std::time::Duration::from_millis(5), None)?;
        }
        drop(connection);
        let integrity: String = copy.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        if integrity != "ok" {
            return Err(StoreError::Database(format!(
                "the copy in {} fails SQLite's integrity check: {integrity}",
                target.display()
            )));
        }
        let count = |table: &str| -> StoreResult<u64> {
            Ok(
                copy.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get::<_, i64>(0)
                })? as u64,
            )
        };
        Ok(BackupSummary {
            machines: count("machines")?,
            images: count("images")?,
            users: count("users")?,
            events: count("events")?,
        })
    }

    pub fn open(path: &Path) -> StoreResult<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Database(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        // Created readable by its owner only (it holds password hashes and
        // every machine); SQLite gives its -wal and -shm files the same mode.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    StoreError::Database(format!("cannot create {}: {e}", path.display()))
                })?;
        }
        let connection = Connection::open(path)
            .map_err(|e| StoreError::Database(format!("cannot open {}: {e}", path.display())))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "NORMAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        let store = Self {
            connection: Mutex::new(connection),
            machines: Mutex::new(None),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> StoreResult<()> {
        let mut connection = self.lock();
        let version =
            connection.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Database(format!(
                "the database has schema version {version}, newer than this bootfleet knows ({}); upgrade bootfleet",
                MIGRATIONS.len()
            )));
        }
        for (index, script) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = connection.transaction()?;
            tx.execute_batch(script)?;
            tx.pragma_update(None, "user_version", (index + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = index + 1, "inventory database schema migrated");
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` in one write transaction.
    fn write<T>(&self, f: impl FnOnce(&Transaction<'_>) -> StoreResult<T>) -> StoreResult<T> {
        self.write_machines(|tx, _| f(tx))
    }

    /// Runs `f` in one write transaction; the machine changes it lists are
    /// applied to the in-memory machines once the transaction committed.
    fn write_machines<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>, &mut Vec<CacheChange>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut changes = Vec::new();
        let value = {
            let mut connection = self.lock();
            let tx = connection.transaction()?;
            let value = f(&tx, &mut changes)?;
            tx.commit()?;
            value
        };
        if !changes.is_empty() {
            let mut cache = self.machines.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(machines) = cache.as_mut() {
                for change in changes {
                    match change {
                        CacheChange::Put(machine) => {
                            machines.insert(machine.mac, *machine);
                        }
                        CacheChange::Remove(mac) => {
                            machines.remove(&mac);
                        }
                        CacheChange::Phase {
                            mac,
                            phase,
                            at_ms,
                            status,
                        } => {
                            // An event stored late (a power action's, which is
                            // dated when it was sent) never moves a machine back.
                            if let Some(machine) = machines.get_mut(&mac).filter(|m| {
                                let current = m.phase.as_deref().zip(m.phase_ms);
                                rules::supersedes(&phase, at_ms, current)
                            }) {
                                machine.phase = Some(phase);
                                machine.phase_ms = Some(at_ms);
                                machine.phase_status = Some(status);
                                machine.last_seen_ms = machine.last_seen_ms.max(Some(at_ms));
                            }
                        }
                    }
                }
            }
        }
        Ok(value)
    }

    /// Runs `f` over all machines, loading them on first use.
    fn with_machines<T>(
        &self,
        f: impl FnOnce(&BTreeMap<Mac, MachineRecord>) -> T,
    ) -> StoreResult<T> {
        let mut cache = self.machines.lock().unwrap_or_else(|p| p.into_inner());
        if cache.is_none() {
            let connection = self.lock();
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {MACHINE_COLUMNS} FROM machines ORDER BY mac"
            ))?;
            let rows = statement.query_map([], machine_from_row)?;
            let mut machines = BTreeMap::new();
            for row in rows {
                let machine = row?;
                machines.insert(machine.mac, machine);
            }
            *cache = Some(machines);
        }
        Ok(f(cache.as_ref().expect("loaded above")))
    }
}

fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now_ms() as i64, actor, action, target, detail],
    )?;
    Ok(())
}

const MACHINE_COLUMNS: &str = "mac, hostname, ip, labels, image, one_shot, rearm, netboot, \
     cmdline_append, notes, adopted, first_seen_ms, last_seen_ms, facts, phase, phase_ms, phase_status, \
     image_revision";

fn machine_from_row(row: &Row<'_>) -> rusqlite::Result<MachineRecord> {
    let mac: String = row.get(0)?;
    let ip: Option<String> = row.get(2)?;
    Ok(MachineRecord {
        mac: Mac::parse(&mac).unwrap_or(Mac([0; 6])),
        hostname: row.get(1)?,
        ip: ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
        labels: from_json(&row.get::<_, String>(3)?),
        image: row.get(4)?,
        one_shot: row.get(5)?,
        rearm: row.get::<_, i64>(6)? as u64,
        netboot: row.get(7)?,
        cmdline_append: row.get(8)?,
        notes: row.get(9)?,
        adopted: row.get(10)?,
        first_seen_ms: row.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        last_seen_ms: row.get::<_, Option<i64>>(12)?.map(|v| v as u64),
        facts: from_json(&row.get::<_, String>(13)?),
        phase: row.get(14)?,
        phase_ms: row.get::<_, Option<i64>>(15)?.map(|v| v as u64),
        phase_status: row.get::<_, Option<i64>>(16)?.map(|v| v as u16),
        image_revision: row.get::<_, Option<i64>>(17)?.map(|v| v as u64),
    })
}

fn image_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    Ok(ImageRecord {
        name: row.get(0)?,
        kernel: row.get(1)?,
        initrds: from_json(&row.get::<_, String>(2)?),
        cmdline: row.get(3)?,
        transport: row.get(4)?,
        architecture: row.get(5)?,
        description: row.get(6)?,
        files: from_json(&row.get::<_, String>(7)?),
        created_ms: row.get::<_, i64>(8)? as u64,
        checkin_deadline_seconds: row.get::<_, i64>(9)? as u64,
        secure_boot: row.get(10)?,
        revision: row.get::<_, i64>(11)? as u64,
    })
}

const IMAGE_COLUMNS: &str =
    "name, kernel, initrds, cmdline, transport, architecture, description, \
     files, created_ms, checkin_deadline_s, secure_boot, revision";

fn get_image(tx: &Connection, name: &str) -> StoreResult<Option<ImageRecord>> {
    Ok(tx
        .query_row(
            &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
            [name],
            image_from_row,
        )
        .optional()?)
}

/// Records `revision` of an image (kept if already there).
fn insert_revision(tx: &Connection, revision: &ImageRevision) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO image_revisions (image, revision, record, changes, actor, at_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
        params![
            revision.image.name,
            revision.revision as i64,
            json(&revision.image),
            revision.changes,
            revision.actor,
            revision.at_ms as i64
        ],
    )?;
    Ok(())
}

fn revision_from_row(row: &Row<'_>) -> rusqlite::Result<ImageRevision> {
    Ok(ImageRevision {
        revision: row.get::<_, i64>(0)? as u64,
        image: from_json(&row.get::<_, String>(1)?),
        changes: row.get(2)?,
        actor: row.get(3)?,
        at_ms: row.get::<_, i64>(4)? as u64,
    })
}

fn get_machine(tx: &Connection, mac: Mac) -> StoreResult<Option<MachineRecord>> {
    Ok(tx
        .query_row(
            &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE mac = ?1"),
            [mac.to_string()],
            machine_from_row,
        )
        .optional()?)
}

fn image_exists(tx: &Connection, name: &str) -> StoreResult<bool> {
    Ok(tx
        .query_row("SELECT 1 FROM images WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Applies `patch` to `mac` inside `tx` and returns the machine and a
/// one-line description of what changed (for the audit log).
fn apply_patch(
    tx: &Transaction<'_>,
    mac: Mac,
    patch: &MachinePatch,
) -> StoreResult<(MachineRecord, String)> {
    if let Some(Some(image)) = &patch.image {
        if !image_exists(tx, image)? {
            return Err(rules::unknown_image(image));
        }
    }
    validate_patch(patch)?;
    let existing = get_machine(tx, mac)?;
    let mut machine = existing.clone().unwrap_or_else(|| MachineRecord::new(mac));
    let changes = patch.apply_to(&mut machine);
    if let (image, Some(pin)) = (&machine.image, machine.image_revision) {
        let current = match image {
            Some(image) => get_image(tx, image)?.map(|i| i.revision),
            None => None,
        };
        rules::check_pin(image.as_deref(), pin, current)?;
    }
    if let Some(ip) = machine.ip {
        let holder: Option<String> = tx
            .query_row(
                "SELECT mac FROM machines WHERE ip = ?1 AND mac != ?2",
                params![ip.to_string(), mac.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(holder) = holder {
            return Err(rules::address_taken(ip, &holder));
        }
    }
    tx.execute(
        "INSERT INTO machines (mac, hostname, ip, labels, image, one_shot, rearm, netboot, \
         cmdline_append, notes, adopted, image_revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 1, ?11) \
         ON CONFLICT(mac) DO UPDATE SET hostname = ?2, ip = ?3, labels = ?4, image = ?5, \
         one_shot = ?6, rearm = ?7, netboot = ?8, cmdline_append = ?9, notes = ?10, adopted = 1, \
         image_revision = ?11",
        params![
            mac.to_string(),
            machine.hostname,
            machine.ip.map(|ip| ip.to_string()),
            json(&machine.labels),
            machine.image,
            machine.one_shot,
            machine.rearm as i64,
            machine.netboot,
            machine.cmdline_append,
            machine.notes,
            machine.image_revision.map(|r| r as i64),
        ],
    )?;
    Ok((machine, rules::patch_summary(existing.is_none(), &changes)))
}

impl InventoryStore for SqliteStore {
    fn machines(&self) -> StoreResult<Vec<MachineRecord>> {
        self.with_machines(|machines| machines.values().cloned().collect())
    }

    fn machines_brief(&self) -> StoreResult<Vec<MachineRecord>> {
        self.with_machines(|machines| {
            machines
                .values()
                // Labels, facts and notes are left empty, not cloned.
                .map(|m| MachineRecord {
                    mac: m.mac,
                    hostname: m.hostname.clone(),
                    ip: m.ip,
                    labels: Vec::new(),
                    image: m.image.clone(),
                    image_revision: m.image_revision,
                    one_shot: m.one_shot,
                    rearm: m.rearm,
                    netboot: m.netboot,
                    cmdline_append: m.cmdline_append.clone(),
                    notes: String::new(),
                    adopted: m.adopted,
                    first_seen_ms: m.first_seen_ms,
                    last_seen_ms: m.last_seen_ms,
                    facts: BTreeMap::new(),
                    phase: m.phase.clone(),
                    phase_ms: m.phase_ms,
                    phase_status: m.phase_status,
                })
                .collect()
        })
    }

    fn machine(&self, mac: Mac) -> StoreResult<Option<MachineRecord>> {
        get_machine(&self.lock(), mac)
    }

    fn put_machine(
        &self,
        mac: Mac,
        patch: &MachinePatch,
        actor: &str,
    ) -> StoreResult<MachineRecord> {
        self.write_machines(|tx, changes| {
            let (machine, summary) = apply_patch(tx, mac, patch)?;
            audit(tx, actor, "machine.put", &mac.to_string(), &summary)?;
            changes.push(CacheChange::Put(Box::new(machine.clone())));
            Ok(machine)
        })
    }

    fn put_machines(&self, macs: &[Mac], patch: &MachinePatch, actor: &str) -> StoreResult<usize> {
        self.write_machines(|tx, changes| {
            for &mac in macs {
                let (machine, summary) = apply_patch(tx, mac, patch)?;
                audit(tx, actor, "machine.put", &mac.to_string(), &summary)?;
                changes.push(CacheChange::Put(Box::new(machine)));
            }
            Ok(macs.len())
        })
    }

    fn forget_machine(&self, mac: Mac, actor: &str) -> StoreResult<()> {
        self.write_machines(|tx, changes| {
            let removed = tx.execute("DELETE FROM machines WHERE mac = ?1", [mac.to_string()])?;
            if removed == 0 {
                return Err(rules::no_machine(mac));
            }
            tx.execute("DELETE FROM bmcs WHERE mac = ?1", [mac.to_string()])?;
            changes.push(CacheChange::Remove(mac));
            audit(tx, actor, "machine.forget", &mac.to_string(), "")
        })
    }

    fn note_seen(
        &self,
        mac: Mac,
        facts: &BTreeMap<String, String>,
        at_ms: u64,
    ) -> StoreResult<bool> {
        self.write_machines(|tx, changes| seen(tx, mac, facts, at_ms, changes))
    }

    fn note_events(
        &self,
        events: &[BootEvent],
        seen_now: &[SeenNote],
        server: &str,
    ) -> StoreResult<()> {
        self.write_machines(|tx, changes| {
            for (mac, facts, at_ms) in seen_now {
                seen(tx, *mac, facts, *at_ms, changes)?;
            }
            let mut insert = tx.prepare_cached(&format!(
                "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
            ))?;
            let mut phase = tx.prepare_cached(
                "UPDATE machines SET phase = ?2, phase_ms = ?3, phase_status = ?4, \
                 last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?3) \
                 WHERE mac = ?1 AND COALESCE(phase_ms, 0) <= ?3 \
                 AND NOT (COALESCE(phase, '') = 'checkin' AND ?2 IN ('kernel', 'initrd') \
                 AND ?3 < COALESCE(phase_ms, 0) + ?5)",
            )?;
            for event in events {
                let StoredEvent {
                    phase: phase_name,
                    mac,
                    ..
                } = StoredEvent::from(event);
                insert.execute(params![
                    event.at_ms as i64,
                    mac,
                    event.client.to_string(),
                    phase_name,
                    event.transport,
                    event.detail,
                    event.bytes as i64,
                    event.duration_ms as i64,
                    event.status,
                    server,
                ])?;
                if let Some(mac) = mac {
                    phase.execute(params![
                        mac,
                        phase_name,
                        event.at_ms as i64,
                        event.status,
                        rules::CHECKIN_SLACK_MS as i64
                    ])?;
                    if let Some(mac) = event.mac {
                        changes.push(CacheChange::Phase {
                            mac,
                            phase: phase_name,
                            at_ms: event.at_ms,
                            status: event.status,
                        });
                    }
                }
            }
            Ok(())
        })
    }

    fn events(
        &self,
        mac: Option<Mac>,
        since_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE (?1 IS NULL OR mac = ?1) AND at_ms >= ?2 \
             ORDER BY at_ms DESC, id DESC LIMIT ?3"
        ))?;
        let rows = statement.query_map(
            params![
                mac.map(|m| m.to_string()),
                since_ms as i64,
                limit.min(i64::MAX as usize) as i64
            ],
            event_from_row,
        )?;
        let mut events: Vec<StoredEvent> = rows.collect::<Result<_, _>>()?;
        events.reverse();
        Ok(events)
    }

    fn prune_discovered(&self, keep: usize) -> StoreResult<usize> {
        self.write_machines(|tx, changes| {
            let discovered: i64 =
                tx.query_row("SELECT COUNT(*) FROM machines WHERE adopted = 0", [], |r| {
                    r.get(0)
                })?;
            let excess = (discovered as usize).saturating_sub(keep);
            if excess == 0 {
                return Ok(0);
            }
            let oldest: Vec<String> = tx
                .prepare(
                    "SELECT mac FROM machines WHERE adopted = 0 \
                     ORDER BY COALESCE(last_seen_ms, 0), mac LIMIT ?1",
                )?
                .query_map(params![excess as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            let mut delete =
                tx.prepare_cached("DELETE FROM machines WHERE mac = ?1 AND adopted = 0")?;
            for mac in &oldest {
                delete.execute(params![mac])?;
                if let Ok(mac) = Mac::parse(mac) {
                    changes.push(CacheChange::Remove(mac));
                }
            }
            Ok(oldest.len())
        })
    }

    fn prune_events(&self, before_ms: u64) -> StoreResult<usize> {
        self.write(|tx| Ok(tx.execute("DELETE FROM events WHERE at_ms < ?1", [before_ms as i64])?))
    }

    fn images(&self) -> StoreResult<Vec<ImageRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(&format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"))?;
        let rows = statement.query_map([], image_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn image(&self, name: &str) -> StoreResult<Option<ImageRecord>> {
        Ok(self
            .lock()
            .query_row(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = ?1"),
                [name],
                image_from_row,
            )
            .optional()?)
    }

    fn add_image(&self, image: &ImageRecord, actor: &str) -> StoreResult<()> {
        validate_image(image)?;
        self.write(|tx| {
            if image_exists(tx, &image.name)? {
                return Err(rules::image_taken(&image.name));
            }
            tx.execute(
                &format!("INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, 1)"),
                params![
                    image.name,
                    image.kernel,
                    json(&image.initrds),
                    image.cmdline,
                    image.transport,
                    image.architecture,
                    image.description,
                    json(&image.files),
                    now_ms() as i64,
                    image.checkin_deadline_seconds as i64,
                    image.secure_boot,
                ],
            )?;
            let registered = get_image(tx, &image.name)?.ok_or_else(|| rules::no_image(&image.name))?;
            insert_revision(tx, &rules::first_revision(registered, actor))?;
            audit(tx, actor, "image.add", &image.name, &format!("kernel {}", image.kernel))
        })
    }

    fn remove_image(&self, name: &str, actor: &str) -> StoreResult<()> {
        self.write(|tx| {
            let users: Vec<String> = tx
                .prepare("SELECT mac FROM machines WHERE image = ?1 ORDER BY mac LIMIT 6")?
                .query_map([name], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if !users.is_empty() {
                return Err(rules::image_in_use(name, &users));
            }
            let pools: Vec<String> = tx
                .prepare("SELECT name FROM pools WHERE image = ?1 ORDER BY name LIMIT 6")?
                .query_map([name], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if !pools.is_empty() {
                return Err(rules::image_of_pools(name, &pools));
            }
            if tx.execute("DELETE FROM images WHERE name = ?1", [name])? == 0 {
                return Err(rules::no_image(name));
            }
            tx.execute("DELETE FROM image_revisions WHERE image = ?1", [name])?;
            audit(tx, actor, "image.remove", name, "")
        })
    }

    fn update_image_files(&self, name: &str, files: &[FileCheck]) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute(
                "UPDATE images SET files = ?2 WHERE name = ?1",
                params![name, json(&files)],
            )?;
            Ok(())
        })
    }

    fn edit_image(
        &self,
        name: &str,
        edit: &ImageEdit,
        note: &str,
        actor: &str,
    ) -> StoreResult<ImageRecord> {
        self.write(|tx| {
            let before = get_image(tx, name)?.ok_or_else(|| rules::no_image(name))?;
            let Some((image, revision)) = rules::edited(&before, edit, note, actor)? else {
                return Ok(before);
            };
            // An image registered before revisions were kept gets its
            // first revision recorded now.
            insert_revision(tx, &rules::first_revision(before, ""))?;
            insert_revision(tx, &revision)?;
            tx.execute(
                "UPDATE images SET kernel = ?2, initrds = ?3, cmdline = ?4, transport = ?5, \
                 architecture = ?6, description = ?7, files = ?8, checkin_deadline_s = ?9, \
                 secure_boot = ?10, revision = ?11 WHERE name = ?1",
                params![
                    name,
                    image.kernel,
                    json(&image.initrds),
                    image.cmdline,
                    image.transport,
                    image.architecture,
                    image.description,
                    json(&image.files),
                    image.checkin_deadline_seconds as i64,
                    image.secure_boot,
                    image.revision as i64
                ],
            )?;
            audit(
                tx,
                actor,
                "image.edit",
                name,
                &rules::revision_line(&revision),
            )?;
            Ok(image)
        })
    }

    fn image_revisions(&self, name: &str) -> StoreResult<Vec<ImageRevision>> {
        let connection = self.lock();
        let current = get_image(&connection, name)?.ok_or_else(|| rules::no_image(name))?;
        let stored = connection
            .prepare_cached(
                "SELECT revision, record, changes, actor, at_ms FROM image_revisions \
                 WHERE image = ?1 ORDER BY revision DESC",
            )?
            .query_map([name], revision_from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rules::with_current(current, stored))
    }

    fn pools(&self) -> StoreResult<Vec<PoolRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT name, members, selector, image FROM pools ORDER BY name")?;
        let rows = statement.query_map([], pool_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn put_pool(&self, pool: &PoolRecord, actor: &str) -> StoreResult<()> {
        validate_pool(pool)?;
        self.write(|tx| {
            let members: Vec<String> = pool.members.iter().map(Mac::to_string).collect();
            if let Some(image) = &pool.image {
                let known: Option<i64> = tx
                    .query_row("SELECT 1 FROM images WHERE name = ?1", [image], |r| {
                        r.get(0)
                    })
                    .optional()?;
                if known.is_none() {
                    return Err(rules::no_image(image));
                }
            }
            tx.execute(
                "INSERT INTO pools (name, members, selector, image) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(name) DO UPDATE SET members = ?2, selector = ?3, image = ?4",
                params![pool.name, json(&members), json(&pool.selector), pool.image],
            )?;
            audit(
                tx,
                actor,
                "pool.put",
                &pool.name,
                &rules::pool_summary(pool),
            )
        })
    }

    fn delete_pool(&self, name: &str, actor: &str) -> StoreResult<()> {
        self.write(|tx| {
            if tx.execute("DELETE FROM pools WHERE name = ?1", [name])? == 0 {
                return Err(rules::no_pool(name));
            }
            audit(tx, actor, "pool.delete", name, "")
        })
    }

    fn assign_pool(&self, name: &str, image: Option<&str>, actor: &str) -> StoreResult<usize> {
        let (members, patch) =
            rules::pool_assignment(self.pools()?, &self.machines()?, name, image)?;
        self.write_machines(|tx, changes| {
            for &mac in &members {
                let (machine, summary) = apply_patch(tx, mac, &patch)?;
                changes.push(CacheChange::Put(Box::new(machine)));
                audit(
                    tx,
                    actor,
                    "machine.put",
                    &mac.to_string(),
                    &format!("{summary} (pool {name})"),
                )?;
            }
            tx.execute(
                "UPDATE pools SET image = ?2 WHERE name = ?1",
                params![name, image],
            )?;
            audit(
                tx,
                actor,
                "pool.assign",
                name,
                &rules::pool_assignment_summary(image, members.len()),
            )?;
            Ok(members.len())
        })
    }

    fn unknown_policy(&self) -> StoreResult<(UnknownPolicy, u32)> {
        let connection = self.lock();
        let get = |key: &str| -> StoreResult<Option<String>> {
            Ok(connection
                .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()?)
        };
        let (policy, poll) = (get("unknown.policy")?, get("unknown.poll_seconds")?);
        Ok(rules::unknown_policy_from(
            policy.as_deref(),
            poll.as_deref(),
        ))
    }

    fn set_unknown_policy(
        &self,
        policy: UnknownPolicy,
        poll_seconds: u32,
        actor: &str,
    ) -> StoreResult<()> {
        let settings = rules::unknown_policy_settings(policy, poll_seconds)?;
        let name = policy.as_str();
        self.write(|tx| {
            for (key, value) in settings {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES (?1, ?2) \
                     ON CONFLICT(key) DO UPDATE SET value = ?2",
                    params![key, value],
                )?;
            }
            audit(
                tx,
                actor,
                "settings.unknown",
                name,
                &format!("poll {poll_seconds} s"),
            )
        })
    }

    fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        scope: Scope,
        actor: &str,
    ) -> StoreResult<()> {
        validate_user_name(name)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO users (name, password_hash, scope, created_ms) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT(name) DO UPDATE SET password_hash = ?2, scope = ?3",
                params![name, password_hash, scope.as_str(), now_ms() as i64],
            )?;
            tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
            audit(tx, actor, "user.set", name, scope.as_str())
        })
    }

    fn remove_user(&self, name: &str, actor: &str) -> StoreResult<usize> {
        self.write(|tx| {
            if tx.execute("DELETE FROM users WHERE name = ?1", [name])? == 0 {
                return Err(rules::no_user(name));
            }
            tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
            let revoked = tx.execute(
                "UPDATE tokens SET revoked = 1 WHERE user = ?1 AND revoked = 0",
                [name],
            )?;
            audit(
                tx,
                actor,
                "user.remove",
                name,
                &format!("{revoked} token(s) revoked"),
            )?;
            Ok(revoked)
        })
    }

    fn user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT name, password_hash, scope, created_ms FROM users WHERE name = ?1",
                [name],
                |r| {
                    Ok(UserRecord {
                        name: r.get(0)?,
                        password_hash: r.get(1)?,
                        scope: r.get::<_, String>(2)?.parse().unwrap_or(Scope::Read),
                        created_ms: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()?)
    }

    fn users(&self) -> StoreResult<Vec<UserRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare("SELECT name, password_hash, scope, created_ms FROM users ORDER BY name")?;
        let rows = statement.query_map([], |r| {
            Ok(UserRecord {
                name: r.get(0)?,
                password_hash: String::new(),
                scope: r.get::<_, String>(2)?.parse().unwrap_or(Scope::Read),
                created_ms: r.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_session(&self, id_hash: &str, session: &SessionRecord) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM sessions WHERE expires_ms < ?1", [now_ms() as i64])?;
            tx.execute(
                "INSERT INTO sessions (id_hash, user, scope, csrf, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id_hash, session.user, session.scope.as_str(), session.csrf, session.expires_ms as i64],
            )?;
            Ok(())
        })
    }

    fn session(&self, id_hash: &str, now_ms: u64) -> StoreResult<Option<SessionRecord>> {
        Ok(self
            .lock()
            .query_row(
                "SELECT user, scope, csrf, expires_ms FROM sessions WHERE id_hash = ?1 AND expires_ms > ?2",
                params![id_hash, now_ms as i64],
                |r| {
                    Ok(SessionRecord {
                        user: r.get(0)?,
                        scope: r.get::<_, String>(1)?.parse().unwrap_or(Scope::Read),
                        csrf: r.get(2)?,
                        expires_ms: r.get::<_, i64>(3)? as u64,
                    })
                },
            )
            .optional()?)
    }

    fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        self.lock()
            .execute("DELETE FROM sessions WHERE id_hash = ?1", [id_hash])?;
        Ok(())
    }

    fn add_token(
        &self,
        name: &str,
        user: &str,
        scope: Scope,
        secret_hash: &str,
        actor: &str,
    ) -> StoreResult<i64> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (name, user, scope, secret_hash, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, user, scope.as_str(), secret_hash, now_ms() as i64],
            )?;
            let id = tx.last_insert_rowid();
            audit(tx, actor, "token.add", name, &format!("scope {} for {user}", scope.as_str()))?;
            Ok(id)
        })
    }

    fn token(&self, secret_hash: &str, now_ms: u64) -> StoreResult<Option<TokenRecord>> {
        let connection = self.lock();
        let token = connection
            .query_row(
                "SELECT id, name, user, scope, created_ms, last_used_ms FROM tokens \
                 WHERE secret_hash = ?1 AND revoked = 0",
                [secret_hash],
                token_from_row,
            )
            .optional()?;
        if let Some(token) = &token {
            // Coarse (once a minute) so a busy script does not write per call.
            if rules::token_use_due(token, now_ms) {
                // Best effort: a token must keep working for reads when
                // the database cannot be written (a full disk).
                if let Err(error) = connection.execute(
                    "UPDATE tokens SET last_used_ms = ?2 WHERE id = ?1",
                    params![token.id, now_ms as i64],
                ) {
                    tracing::debug!(%error, token = %token.name, "token use not recorded");
                }
            }
        }
        Ok(token)
    }

    fn tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let connection = self.lock();
        let mut statement = connection.prepare(
            "SELECT id, name, user, scope, created_ms, last_used_ms FROM tokens WHERE revoked = 0 ORDER BY id",
        )?;
        let rows = statement.query_map([], token_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_token(&self, id: i64, actor: &str) -> StoreResult<()> {
        self.write(|tx| {
            if tx.execute(
                "UPDATE tokens SET revoked = 1 WHERE id = ?1 AND revoked = 0",
                [id],
            )? == 0
            {
                return Err(rules::no_token(id));
            }
            audit(tx, actor, "token.revoke", &id.to_string(), "")
        })
    }

    fn bmcs(&self) -> StoreResult<Vec<BmcRecord>> {
        bmcs(&self.lock())
    }

    fn set_bmc(&self, mac: Mac, bmc: Option<&BmcRecord>, actor: &str) -> StoreResult<()> {
        let detail = bmc.map(|bmc| validate_bmc(mac, bmc)).transpose()?;
        self.write(|tx| {
            let known: i64 = tx.query_row(
                "SELECT count(*) FROM machines WHERE mac = ?1",
                [mac.to_string()],
                |r| r.get(0),
            )?;
            if known == 0 {
                return Err(rules::no_machine(mac));
            }
            match bmc {
                Some(bmc) => tx.execute(
                    "INSERT INTO bmcs (mac, record) VALUES (?1, ?2) \
                     ON CONFLICT(mac) DO UPDATE SET record = ?2",
                    params![mac.to_string(), json(bmc)],
                )?,
                None => tx.execute("DELETE FROM bmcs WHERE mac = ?1", [mac.to_string()])?,
            };
            let action = if bmc.is_some() {
                "machine.bmc"
            } else {
                "machine.bmc.remove"
            };
            audit(
                tx,
                actor,
                action,
                &mac.to_string(),
                detail.as_deref().unwrap_or(""),
            )
        })
    }

    fn audit(&self, limit: usize) -> StoreResult<Vec<AuditEntry>> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT id, at_ms, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = statement.query_map([limit.min(i64::MAX as usize) as i64], audit_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> StoreResult<()> {
        self.write(|tx| audit(tx, actor, action, target, detail))
    }

    fn note_one_shots_used(&self, used: &[(Mac, u64)]) -> StoreResult<()> {
        self.write(|tx| {
            for (mac, rearm) in used {
                tx.execute(
                    "INSERT INTO one_shots_used (mac, rearm) VALUES (?1, ?2) \
                     ON CONFLICT (mac) DO UPDATE SET rearm = MAX(rearm, ?2)",
                    params![mac.to_string(), *rearm as i64],
                )?;
            }
            Ok(())
        })
    }

    fn one_shots_used(&self) -> StoreResult<Vec<(Mac, u64)>> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached("SELECT mac, rearm FROM one_shots_used")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })?;
        Ok(rows
            .filter_map(Result::ok)
            .filter_map(|(mac, rearm)| Some((Mac::parse(&mac).ok()?, rearm as u64)))
            .collect())
    }

    fn note_server_files(&self, report: &ServerFiles) -> StoreResult<()> {
        let connection = self.lock();
        connection.execute(
            "INSERT INTO server_files (name, http_url, files, seen_ms) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET http_url = ?2, files = ?3, seen_ms = ?4",
            params![
                report.name,
                report.http_url,
                json(&report.files),
                report.seen_ms as i64
            ],
        )?;
        Ok(())
    }

    fn server_files(&self) -> StoreResult<Vec<ServerFiles>> {
        let connection = self.lock();
        let mut statement = connection.prepare_cached(
            "SELECT name, http_url, files, seen_ms FROM server_files ORDER BY name",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(ServerFiles {
                name: row.get(0)?,
                http_url: row.get(1)?,
                files: from_json(&row.get::<_, String>(2)?),
                seen_ms: row.get::<_, i64>(3)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn export(&self) -> StoreResult<InventoryDump> {
        let mut connection = self.lock();
        let tx = connection.transaction()?;
        export_all(&tx)
    }

    fn import(&self, dump: &InventoryDump) -> StoreResult<()> {
        self.write_machines(|tx, changes| {
            import_all(tx, dump)?;
            changes.extend(
                dump.machines
                    .iter()
                    .map(|m| CacheChange::Put(Box::new(m.clone()))),
            );
            Ok(())
        })
    }
}

fn pool_from_row(row: &Row<'_>) -> rusqlite::Result<PoolRecord> {
    Ok(PoolRecord {
        name: row.get(0)?,
        members: from_json::<Vec<String>>(&row.get::<_, String>(1)?)
            .iter()
            .filter_map(|m| Mac::parse(m).ok())
            .collect(),
        selector: from_json(&row.get::<_, String>(2)?),
        image: row.get(3)?,
    })
}

const EVENT_COLUMNS: &str =
    "at_ms, mac, client, phase, transport, detail, bytes, duration_ms, status, server";

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent {
        at_ms: row.get::<_, i64>(0)? as u64,
        mac: row.get(1)?,
        client: row.get(2)?,
        phase: row.get(3)?,
        transport: row.get(4)?,
        detail: row.get(5)?,
        bytes: row.get::<_, i64>(6)? as u64,
        duration_ms: row.get::<_, i64>(7)? as u64,
        status: row.get::<_, i64>(8)? as u16,
        server: row.get(9)?,
    })
}

fn audit_from_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.get(0)?,
        at_ms: r.get::<_, i64>(1)? as u64,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        detail: r.get(5)?,
    })
}

/// Every row of `table` read with `sql`, through `from_row`.
fn all<T>(
    tx: &Connection,
    sql: &str,
    from_row: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = tx.prepare(sql)?;
    let rows = statement.query_map([], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// [`InventoryStore::export`] inside one read transaction.
fn export_all(tx: &Connection) -> StoreResult<InventoryDump> {
    Ok(InventoryDump {
        images: all(tx, &format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"), image_from_row)?,
        machines: all(tx, &format!("SELECT {MACHINE_COLUMNS} FROM machines ORDER BY mac"), machine_from_row)?,
        pools: all(tx, "SELECT name, members, selector, image FROM pools ORDER BY name", pool_from_row)?,
        users: all(tx, "SELECT name, password_hash, scope, created_ms FROM users ORDER BY name", |r| {
            Ok(UserRecord {
                name: r.get(0)?,
                password_hash: r.get(1)?,
                scope: r.get::<_, String>(2)?.parse().unwrap_or(Scope::Read),
                created_ms: r.get::<_, i64>(3)? as u64,
            })
        })?,
        tokens: all(
            tx,
            "SELECT id, name, user, scope, created_ms, last_used_ms, secret_hash, revoked FROM tokens ORDER BY id",
            |r| {
                Ok(TokenRow {
                    record: token_from_row(r)?,
                    secret_hash: r.get(6)?,
                    revoked: r.get(7)?,
                })
            },
        )?,
        events: all(tx, &format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY at_ms, id"), event_from_row)?,
        audit: all(tx, "SELECT id, at_ms, actor, action, target, detail FROM audit ORDER BY id", audit_from_row)?,
        settings: all(tx, "SELECT key, value FROM settings ORDER BY key", |r| Ok((r.get(0)?, r.get(1)?)))?,
        bmcs: bmcs(tx)?,
        image_revisions: all(
            tx,
            "SELECT revision, record, changes, actor, at_ms FROM image_revisions ORDER BY image, revision",
            revision_from_row,
        )?,
    })
}

/// Every BMC, by MAC; a row that does not parse is logged and left out.
fn bmcs(connection: &Connection) -> StoreResult<Vec<BmcRecord>> {
    let rows: Vec<(String, String)> = all(
        connection,
        "SELECT mac, record FROM bmcs ORDER BY mac",
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(rules::parse_bmc_rows(rows))
}

/// [`InventoryStore::import`] inside one write transaction.
fn import_all(tx: &Transaction<'_>, dump: &InventoryDump) -> StoreResult<()> {
    let rows: i64 = tx.query_row(
        "SELECT (SELECT count(*) FROM images) + (SELECT count(*) FROM machines) + (SELECT count(*) FROM users)",
        [],
        |r| r.get(0),
    )?;
    if rows > 0 {
        return Err(not_empty(rows));
    }
    for i in &dump.images {
        tx.execute(
            &format!(
                "INSERT INTO images ({IMAGE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                i.name,
                i.kernel,
                json(&i.initrds),
                i.cmdline,
                i.transport,
                i.architecture,
                i.description,
                json(&i.files),
                i.created_ms as i64,
                i.checkin_deadline_seconds as i64,
                i.secure_boot,
                i.revision as i64
            ],
        )?;
    }
    for revision in &dump.image_revisions {
        insert_revision(tx, revision)?;
    }
    for m in &dump.machines {
        tx.execute(
            &format!(
                "INSERT INTO machines ({MACHINE_COLUMNS}) VALUES \
                      (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
            ),
            params![
                m.mac.to_string(),
                m.hostname,
                m.ip.map(|ip| ip.to_string()),
                json(&m.labels),
                m.image,
                m.one_shot,
                m.rearm as i64,
                m.netboot,
                m.cmdline_append,
                m.notes,
                m.adopted,
                m.first_seen_ms.map(|v| v as i64),
                m.last_seen_ms.map(|v| v as i64),
                json(&m.facts),
                m.phase,
                m.phase_ms.map(|v| v as i64),
                m.phase_status,
                m.image_revision.map(|v| v as i64)
            ],
        )?;
    }
    for p in &dump.pools {
        let members: Vec<String> = p.members.iter().map(Mac::to_string).collect();
        tx.execute(
            "INSERT INTO pools (name, members, selector, image) VALUES (?1, ?2, ?3, ?4)",
            params![p.name, json(&members), json(&p.selector), p.image],
        )?;
    }
    import_accounts_and_history(tx, dump)
}

/// The users, tokens, boot events, audit entries and settings of
/// [`import_all`].
fn import_accounts_and_history(tx: &Transaction<'_>, dump: &InventoryDump) -> StoreResult<()> {
    for u in &dump.users {
        tx.execute(
            "INSERT INTO users (name, password_hash, scope, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                u.name,
                u.password_hash,
                u.scope.as_str(),
                u.created_ms as i64
            ],
        )?;
    }
    for t in &dump.tokens {
        let r = &t.record;
        tx.execute(
            "INSERT INTO tokens (id, name, user, scope, secret_hash, created_ms, last_used_ms, revoked) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![r.id, r.name, r.user, r.scope.as_str(), t.secret_hash, r.created_ms as i64,
                r.last_used_ms.map(|v| v as i64), t.revoked],
        )?;
    }
    let mut event = tx.prepare(&format!(
        "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
    ))?;
    for e in &dump.events {
        event.execute(params![
            e.at_ms as i64,
            e.mac,
            e.client,
            e.phase,
            e.transport,
            e.detail,
            e.bytes as i64,
            e.duration_ms as i64,
            e.status,
            e.server
        ])?;
    }
    for a in &dump.audit {
        tx.execute(
            "INSERT INTO audit (id, at_ms, actor, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![a.id, a.at_ms as i64, a.actor, a.action, a.target, a.detail],
        )?;
    }
    for (key, value) in &dump.settings {
        tx.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![key, value],
        )?;
    }
    for bmc in &dump.bmcs {
        tx.execute(
            "INSERT INTO bmcs (mac, record) VALUES (?1, ?2)",
            params![bmc.mac.to_string(), json(bmc)],
        )?;
    }
    Ok(())
}

/// Records that `mac` asked for a script; returns whether it is new.
fn seen(
    tx: &Transaction<'_>,
    mac: Mac,
    facts: &BTreeMap<String, String>,
    at_ms: u64,
    changes: &mut Vec<CacheChange>,
) -> StoreResult<bool> {
    let existing = get_machine(tx, mac)?;
    let new = existing.is_none();
    let mut machine = existing.unwrap_or_else(|| MachineRecord {
        adopted: false,
        ..MachineRecord::new(mac)
    });
    let changed = rules::merge_facts(&mut machine, facts) || new;
    // Facts are re-encoded only when they changed.
    let facts_json = changed.then(|| json(&machine.facts));
    tx.prepare_cached(
        "INSERT INTO machines (mac, adopted, first_seen_ms, last_seen_ms, facts) \
         VALUES (?1, 0, ?2, ?2, COALESCE(?3, '{}')) ON CONFLICT(mac) DO UPDATE SET \
         first_seen_ms = COALESCE(first_seen_ms, ?2), last_seen_ms = ?2, \
         facts = COALESCE(?3, facts)",
    )?
    .execute(params![mac.to_string(), at_ms as i64, facts_json])?;
    machine.first_seen_ms = machine.first_seen_ms.or(Some(at_ms));
    machine.last_seen_ms = Some(at_ms);
    changes.push(CacheChange::Put(Box::new(machine)));
    Ok(new)
}

fn token_from_row(r: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        user: r.get(2)?,
        scope: r.get::<_, String>(3)?.parse().unwrap_or(Scope::Read),
        created_ms: r.get::<_, i64>(4)? as u64,
        last_used_ms: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::image;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("inventory.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn schema_is_migrated_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store.add_image(&image("x"), "t").unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.images().unwrap().len(), 1);
        let version = store
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .unwrap() as usize;
        assert_eq!(version, MIGRATIONS.len());
    }

    /// Security review finding 17: the database (argon2 hashes, every
    /// machine) was created 0644 outside systemd.
    #[test]
    fn the_database_is_created_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _store) = store();
        for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: {mode:o}", entry.path().display());
        }
    }
}
