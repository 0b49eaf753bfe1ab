//! The inventory in PostgreSQL: the same [`InventoryStore`] as the embedded
//! SQLite file, for sites that keep their inventory in a database server
//! they already run, and several boot servers sharing one (their DHCP
//! leases too: [`super::shared_leases`]).
//!
//! Through the `postgres` crate (the synchronous face of `tokio-postgres`,
//! the most used PostgreSQL client in Rust): the store trait is
//! synchronous, and the panel already calls it off its async threads, so
//! an async driver would only add a runtime hop per call. One connection
//! behind a mutex, as the SQLite store has; a connection found closed (the
//! server restarted, the network dropped it) is opened again on the next
//! call, and the call that found it says so.
//!
//! Machines are read from the table on each call, not kept in memory as
//! the SQLite store does: another writer may change them at any time.
//! Schema migrations are numbered in `bootfleet_schema` and applied under
//! an advisory lock, so servers starting together migrate once.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use ::postgres::{Client, GenericClient, NoTls, Row};

use super::*;
use crate::boot::events::BootEvent;

/// Schema versions, in order; version N is `MIGRATIONS[N-1]`. The same
/// tables as the SQLite store's, in PostgreSQL's types (`user` is a
/// reserved word here: those columns are `user_name`).
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
    created_ms BIGINT NOT NULL
);
CREATE TABLE machines (
    mac TEXT PRIMARY KEY,
    hostname TEXT,
    ip TEXT UNIQUE,
    labels TEXT NOT NULL DEFAULT '[]',
    image TEXT REFERENCES images(name),
    one_shot BOOLEAN NOT NULL DEFAULT FALSE,
    rearm BIGINT NOT NULL DEFAULT 0,
    netboot BOOLEAN NOT NULL DEFAULT TRUE,
    cmdline_append TEXT NOT NULL DEFAULT '',
    notes TEXT NOT NULL DEFAULT '',
    adopted BOOLEAN NOT NULL DEFAULT FALSE,
    first_seen_ms BIGINT,
    last_seen_ms BIGINT,
    facts TEXT NOT NULL DEFAULT '{}',
    phase TEXT,
    phase_ms BIGINT,
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
    id BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    mac TEXT,
    client TEXT NOT NULL,
    phase TEXT NOT NULL,
    transport TEXT NOT NULL,
    detail TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX events_by_time ON events(at_ms);
CREATE INDEX events_by_machine ON events(mac, at_ms);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    scope TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE TABLE sessions (
    id_hash TEXT PRIMARY KEY,
    user_name TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    scope TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE TABLE tokens (
    id BIGSERIAL PRIMARY KEY,
    name TEXT NOT NULL,
    user_name TEXT NOT NULL,
    scope TEXT NOT NULL,
    secret_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    last_used_ms BIGINT,
    revoked BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
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
    // The DHCP lease table several servers share (see `shared_leases.rs`):
    // blocks of the pools each server allocates from, and every lease any
    // server wrote. Addresses are stored as numbers (u32 in a BIGINT).
    r#"
CREATE TABLE dhcp_blocks (
    first BIGINT PRIMARY KEY,
    size INTEGER NOT NULL,
    server TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL
);
CREATE TABLE dhcp_leases (
    ip BIGINT PRIMARY KEY,
    mac TEXT NOT NULL,
    state TEXT NOT NULL,
    expires BIGINT NOT NULL,
    relay BIGINT NOT NULL,
    server TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX dhcp_leases_server ON dhcp_leases (server);
"#,
    // Machines' BMCs: one JSON record each, its password sealed.
    r#"
CREATE TABLE bmcs (
    mac TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
"#,
    r#"
ALTER TABLE images ADD COLUMN checkin_deadline_s BIGINT NOT NULL DEFAULT 0;
"#,
    // One-shot assignments used up (shared between the servers of one
    // database), and the image files each server holds (replication).
    r#"
CREATE TABLE one_shots_used (
    mac TEXT PRIMARY KEY,
    rearm BIGINT NOT NULL
);
CREATE TABLE server_files (
    name TEXT PRIMARY KEY,
    http_url TEXT NOT NULL DEFAULT '',
    files TEXT NOT NULL DEFAULT '[]',
    seen_ms BIGINT NOT NULL
);
"#,
    // Images booted through the Secure Boot chain.
    r#"
ALTER TABLE images ADD COLUMN secure_boot BOOLEAN NOT NULL DEFAULT FALSE;
"#,
    // Editable images: each image's revisions (its whole record as JSON),
    // and machines pinned to one.
    r#"
ALTER TABLE images ADD COLUMN revision BIGINT NOT NULL DEFAULT 1;
ALTER TABLE machines ADD COLUMN image_revision BIGINT;
CREATE TABLE image_revisions (
    image TEXT NOT NULL,
    revision BIGINT NOT NULL,
    record TEXT NOT NULL,
    changes TEXT NOT NULL,
    actor TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (image, revision)
);
"#,
];

/// The advisory lock key migrations run under (any fixed number: "bfsc").
const MIGRATION_LOCK: i64 = 0x6266_7363;

/// The channel every inventory change is announced on; the payload is the
/// writing store's id, so that a server ignores its own changes.
const CHANGES: &str = "bootfleet_inventory";

impl From<::postgres::Error> for StoreError {
    fn from(error: ::postgres::Error) -> Self {
        // The server's own message says what is wrong; the crate's
        // Display alone is often just "db error".
        match error.as_db_error() {
            Some(db) => StoreError::Database(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Database(error.to_string()),
        }
    }
}

/// What PostgreSQL (or the connection to it) said, without the
/// "inventory database:" prefix of [`StoreError::Database`], for messages
/// that already say where they come from.
pub(super) fn database_message(error: ::postgres::Error) -> String {
    match StoreError::from(error) {
        StoreError::Database(message) => message,
        other => other.to_string(),
    }
}

/// The PostgreSQL inventory store.
pub struct PostgresStore {
    url: String,
    client: Mutex<Option<Client>>,
    /// Names this store in its change announcements.
    id: String,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`,
    /// or any form `tokio-postgres` reads) and brings the schema up to
    /// date.
    pub fn connect(url: &str) -> StoreResult<Self> {
        let store = Self {
            url: url.to_string(),
            client: Mutex::new(None),
            id: format!("{}-{:x}", std::process::id(), now_ms()),
        };
        store.with_client(migrate)?;
        Ok(store)
    }

    /// The URL without its password, for logs and messages.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }

    /// Runs `f` on the connection, opening it first if it is not open.
    ///
    /// The `postgres` client blocks on a runtime of its own, which tokio
    /// refuses on a thread that drives another runtime's tasks (it
    /// panicked when an async panel handler, an upload, wrote its audit
    /// entry): such a caller hands its worker over to the runtime's other
    /// threads for the call (`block_in_place`).
    fn with_client<T>(&self, f: impl FnOnce(&mut Client) -> StoreResult<T>) -> StoreResult<T> {
        let on_a_worker = tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        });
        if on_a_worker {
            return tokio::task::block_in_place(|| self.with_client_here(f));
        }
        self.with_client_here(f)
    }

    fn with_client_here<T>(&self, f: impl FnOnce(&mut Client) -> StoreResult<T>) -> StoreResult<T> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_none_or(Client::is_closed) {
            let client = connect(&self.url).map_err(|e| {
                StoreError::Database(format!(
                    "cannot connect to PostgreSQL at {}: {}",
                    redact(&self.url),
                    database_message(e)
                ))
            })?;
            *slot = Some(client);
        }
        f(slot.as_mut().expect("connected above"))
    }

    /// [`Self::write`] for a change of what the data plane serves
    /// (machines, images, pools, settings): other servers on the database
    /// are told when it commits.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut ::postgres::Transaction<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.write(|tx| {
            let value = f(tx)?;
            tx.execute("SELECT pg_notify($1, $2)", &[&CHANGES, &self.id])?;
            Ok(value)
        })
    }

    /// Runs `f` in one transaction, committed when it returns `Ok`.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut ::postgres::Transaction<'_>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        self.with_client(|client| {
            let mut tx = client.transaction()?;
            let value = f(&mut tx)?;
            tx.commit()?;
            Ok(value)
        })
    }
}

/// How long a connection attempt may take unless the URL says
/// (`connect_timeout`): a database host that does not answer must not hold
/// the panel's calls for the system's TCP timeout of minutes.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection to `url`, within [`CONNECT_TIMEOUT`] unless it says.
pub(super) fn connect(url: &str) -> Result<Client, ::postgres::Error> {
    let mut config: ::postgres::Config = url.parse()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.connect(NoTls)
}

/// `url` with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => match credentials.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

pub(super) fn migrate(client: &mut Client) -> StoreResult<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS bootfleet_schema (version INTEGER NOT NULL)")?;
    let version: i32 = match tx.query_opt("SELECT version FROM bootfleet_schema", &[])? {
        Some(row) => row.get(0),
        None => {
            tx.execute("INSERT INTO bootfleet_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    let version = version as usize;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "the database has schema version {version}, newer than this bootfleet knows ({}); upgrade bootfleet",
            MIGRATIONS.len()
        )));
    }
    for (index, script) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(script)?;
        tx.execute(
            "UPDATE bootfleet_schema SET version = $1",
            &[&((index + 1) as i32)],
        )?;
        tracing::info!(version = index + 1, "PostgreSQL inventory schema migrated");
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serializes")
}

fn from_json<T: serde::de::DeserializeOwned + Default>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_default()
}

fn audit(
    tx: &mut impl GenericClient,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO audit (at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
        &[&now_ms(), &actor, &action, &target, &detail],
    )?;
    Ok(())
}

const MACHINE_COLUMNS: &str = "mac, hostname, ip, labels, image, one_shot, rearm, netboot, \
     cmdline_append, notes, adopted, first_seen_ms, last_seen_ms, facts, phase, phase_ms, phase_status, \
     image_revision";

fn machine_from_row(row: &Row) -> MachineRecord {
    let mac: String = row.get(0);
    let ip: Option<String> = row.get(2);
    MachineRecord {
        mac: Mac::parse(&mac).unwrap_or(Mac([0; 6])),
        hostname: row.get(1),
        ip: ip.and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
        labels: from_json(row.get::<_, &str>(3)),
        image: row.get(4),
        one_shot: row.get(5),
        rearm: row.get::<_, i64>(6) as u64,
        netboot: row.get(7),
        cmdline_append: row.get(8),
        notes: row.get(9),
        adopted: row.get(10),
        first_seen_ms: row.get::<_, Option<i64>>(11).map(|v| v as u64),
        last_seen_ms: row.get::<_, Option<i64>>(12).map(|v| v as u64),
        facts: from_json(row.get::<_, &str>(13)),
        phase: row.get(14),
        phase_ms: row.get::<_, Option<i64>>(15).map(|v| v as u64),
        phase_status: row.get::<_, Option<i32>>(16).map(|v| v as u16),
        image_revision: row.get::<_, Option<i64>>(17).map(|v| v as u64),
    }
}

const IMAGE_COLUMNS: &str =
    "name, kernel, initrds, cmdline, transport, architecture, description, \
     files, created_ms, checkin_deadline_s, secure_boot, revision";

fn image_from_row(row: &Row) -> ImageRecord {
    ImageRecord {
        name: row.get(0),
        kernel: row.get(1),
        initrds: from_json(row.get::<_, &str>(2)),
        cmdline: row.get(3),
        transport: row.get(4),
        architecture: row.get(5),
        description: row.get(6),
        files: from_json(row.get::<_, &str>(7)),
        created_ms: row.get::<_, i64>(8) as u64,
        checkin_deadline_seconds: row.get::<_, i64>(9) as u64,
        secure_boot: row.get(10),
        revision: row.get::<_, i64>(11) as u64,
    }
}

fn get_image(client: &mut impl GenericClient, name: &str) -> StoreResult<Option<ImageRecord>> {
    let row = client.query_opt(
        &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = $1"),
        &[&name],
    )?;
    Ok(row.as_ref().map(image_from_row))
}

/// Records `revision` of an image (kept if already there).
fn insert_revision(client: &mut impl GenericClient, revision: &ImageRevision) -> StoreResult<()> {
    client.execute(
        "INSERT INTO image_revisions (image, revision, record, changes, actor, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        &[
            &revision.image.name,
            &(revision.revision as i64),
            &json(&revision.image),
            &revision.changes,
            &revision.actor,
            &(revision.at_ms as i64),
        ],
    )?;
    Ok(())
}

const REVISION_COLUMNS: &str = "revision, record, changes, actor, at_ms";

fn revision_from_row(row: &Row) -> ImageRevision {
    ImageRevision {
        revision: row.get::<_, i64>(0) as u64,
        image: from_json(row.get::<_, &str>(1)),
        changes: row.get(2),
        actor: row.get(3),
        at_ms: row.get::<_, i64>(4) as u64,
    }
}

fn token_from_row(row: &Row) -> TokenRecord {
    TokenRecord {
        id: row.get(0),
        name: row.get(1),
        user: row.get(2),
        scope: row.get::<_, &str>(3).parse().unwrap_or(Scope::Read),
        created_ms: row.get::<_, i64>(4) as u64,
        last_used_ms: row.get::<_, Option<i64>>(5).map(|v| v as u64),
    }
}

fn get_machine(client: &mut impl GenericClient, mac: Mac) -> StoreResult<Option<MachineRecord>> {
    let row = client.query_opt(
        &format!("SELECT {MACHINE_COLUMNS} FROM machines WHERE mac = $1"),
        &[&mac.to_string()],
    )?;
    Ok(row.as_ref().map(machine_from_row))
}

fn image_exists(client: &mut impl GenericClient, name: &str) -> StoreResult<bool> {
    Ok(client
        .query_opt("SELECT 1 FROM images WHERE name = $1", &[&name])?
        .is_some())
}

/// Applies `patch` to `mac` inside `tx` and returns the machine and a
/// one-line description of what changed (for the audit log); the same
/// rules as the SQLite store's.
fn apply_patch(
    tx: &mut impl GenericClient,
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
        let holder = tx.query_opt(
            "SELECT mac FROM machines WHERE ip = $1 AND mac <> $2",
            &[&ip.to_string(), &mac.to_string()],
        )?;
        if let Some(holder) = holder {
            let holder: String = holder.get(0);
            return Err(rules::address_taken(ip, &holder));
        }
    }
    tx.execute(
        "INSERT INTO machines (mac, hostname, ip, labels, image, one_shot, rearm, netboot, \
         cmdline_append, notes, adopted, image_revision) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, TRUE, $11) \
         ON CONFLICT (mac) DO UPDATE SET hostname = $2, ip = $3, labels = $4, image = $5, \
         one_shot = $6, rearm = $7, netboot = $8, cmdline_append = $9, notes = $10, adopted = TRUE, \
         image_revision = $11",
        &[
            &mac.to_string(),
            &machine.hostname,
            &machine.ip.map(|ip| ip.to_string()),
            &json(&machine.labels),
            &machine.image,
            &machine.one_shot,
            &(machine.rearm as i64),
            &machine.netboot,
            &machine.cmdline_append,
            &machine.notes,
            &machine.image_revision.map(|r| r as i64),
        ],
    )?;
    Ok((machine, rules::patch_summary(existing.is_none(), &changes)))
}

/// Records that `mac` asked for a script; returns whether it is new.
fn seen(
    tx: &mut impl GenericClient,
    mac: Mac,
    facts: &BTreeMap<String, String>,
    at_ms: u64,
) -> StoreResult<bool> {
    let existing = get_machine(tx, mac)?;
    let new = existing.is_none();
    let mut machine = existing.unwrap_or_else(|| MachineRecord::new(mac));
    let changed = rules::merge_facts(&mut machine, facts) || new;
    let facts_json = changed.then(|| json(&machine.facts));
    tx.execute(
        "INSERT INTO machines (mac, adopted, first_seen_ms, last_seen_ms, facts) \
         VALUES ($1, FALSE, $2, $2, COALESCE($3, '{}')) ON CONFLICT (mac) DO UPDATE SET \
         first_seen_ms = COALESCE(machines.first_seen_ms, $2), last_seen_ms = $2, \
         facts = COALESCE($3, machines.facts)",
        &[&mac.to_string(), &(at_ms as i64), &facts_json],
    )?;
    Ok(new)
}

impl InventoryStore for PostgresStore {
    fn machines(&self) -> StoreResult<Vec<MachineRecord>> {
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {MACHINE_COLUMNS} FROM machines ORDER BY mac"),
                &[],
            )?;
            Ok(rows.iter().map(machine_from_row).collect())
        })
    }

    fn machines_brief(&self) -> StoreResult<Vec<MachineRecord>> {
        // Labels, facts and notes are left empty, as the SQLite store does.
        Ok(self
            .machines()?
            .into_iter()
            .map(|m| MachineRecord {
                labels: Vec::new(),
                notes: String::new(),
                facts: BTreeMap::new(),
                ..m
            })
            .collect())
    }

    fn machine(&self, mac: Mac) -> StoreResult<Option<MachineRecord>> {
        self.with_client(|client| get_machine(client, mac))
    }

    fn put_machine(
        &self,
        mac: Mac,
        patch: &MachinePatch,
        actor: &str,
    ) -> StoreResult<MachineRecord> {
        self.change(|tx| {
            let (machine, summary) = apply_patch(tx, mac, patch)?;
            audit(tx, actor, "machine.put", &mac.to_string(), &summary)?;
            Ok(machine)
        })
    }

    fn put_machines(&self, macs: &[Mac], patch: &MachinePatch, actor: &str) -> StoreResult<usize> {
        self.change(|tx| {
            for &mac in macs {
                let (_, summary) = apply_patch(tx, mac, patch)?;
                audit(tx, actor, "machine.put", &mac.to_string(), &summary)?;
            }
            Ok(macs.len())
        })
    }

    fn forget_machine(&self, mac: Mac, actor: &str) -> StoreResult<()> {
        self.change(|tx| {
            let removed = tx.execute("DELETE FROM machines WHERE mac = $1", &[&mac.to_string()])?;
            if removed == 0 {
                return Err(rules::no_machine(mac));
            }
            tx.execute("DELETE FROM bmcs WHERE mac = $1", &[&mac.to_string()])?;
            audit(tx, actor, "machine.forget", &mac.to_string(), "")
        })
    }

    fn note_seen(
        &self,
        mac: Mac,
        facts: &BTreeMap<String, String>,
        at_ms: u64,
    ) -> StoreResult<bool> {
        self.write(|tx| seen(tx, mac, facts, at_ms))
    }

    fn note_events(
        &self,
        events: &[BootEvent],
        seen_now: &[SeenNote],
        server: &str,
    ) -> StoreResult<()> {
        self.write(|tx| {
            let insert = tx.prepare(&format!(
                "INSERT INTO events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))?;
            // The machines' rows are touched after the inserts, each once
            // and in the order of their MACs: servers writing overlapping
            // batches at once then wait for each other instead of
            // deadlocking.
            let mut rows: BTreeMap<String, (Option<&SeenNote>, Option<&BootEvent>)> =
                BTreeMap::new();
            for note in seen_now {
                rows.entry(note.0.to_string()).or_default().0 = Some(note);
            }
            for event in events {
                let stored = StoredEvent::from(event);
                tx.execute(
                    &insert,
                    &[
                        &(event.at_ms as i64),
                        &stored.mac,
                        &stored.client,
                        &stored.phase,
                        &stored.transport,
                        &stored.detail,
                        &(event.bytes as i64),
                        &(event.duration_ms as i64),
                        &i32::from(event.status),
                        &server,
                    ],
                )?;
                if let Some(mac) = stored.mac {
                    let latest = &mut rows.entry(mac).or_default().1;
                    let current = latest.map(|l: &BootEvent| (l.phase.as_str(), l.at_ms));
                    if rules::supersedes(event.phase.as_str(), event.at_ms, current) {
                        *latest = Some(event);
                    }
                }
            }
            let phase = tx.prepare(
                "UPDATE machines SET phase = $2, phase_ms = $3, phase_status = $4, \
                 last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $3) \
                 WHERE mac = $1 AND COALESCE(phase_ms, 0) <= $3 \
                 AND NOT (COALESCE(phase, '') = 'checkin' AND $2 IN ('kernel', 'initrd') \
                 AND $3 < COALESCE(phase_ms, 0) + $5)",
            )?;
            for (mac, (note, latest)) in rows {
                if let Some((seen_mac, facts, at_ms)) = note {
                    seen(tx, *seen_mac, facts, *at_ms)?;
                }
                if let Some(event) = latest {
                    tx.execute(
                        &phase,
                        &[
                            &mac,
                            &event.phase.as_str(),
                            &(event.at_ms as i64),
                            &i32::from(event.status),
                            &(rules::CHECKIN_SLACK_MS as i64),
                        ],
                    )?;
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
        self.with_client(|client| {
            let rows = client.query(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE ($1::TEXT IS NULL OR mac = $1) \
                     AND at_ms >= $2 ORDER BY at_ms DESC, id DESC LIMIT $3"
                ),
                &[
                    &mac.map(|m| m.to_string()),
                    &(since_ms as i64),
                    &(limit.min(i64::MAX as usize) as i64),
                ],
            )?;
            let mut events: Vec<StoredEvent> = rows.iter().map(event_from_row).collect();
            events.reverse();
            Ok(events)
        })
    }

    fn prune_discovered(&self, keep: usize) -> StoreResult<usize> {
        self.write(|tx| {
            let discovered: i64 = tx
                .query_one("SELECT COUNT(*) FROM machines WHERE NOT adopted", &[])?
                .get(0);
            let excess = (discovered as usize).saturating_sub(keep);
            if excess == 0 {
                return Ok(0);
            }
            let removed = tx.execute(
                "DELETE FROM machines WHERE mac IN (SELECT mac FROM machines WHERE NOT adopted \
                 ORDER BY COALESCE(last_seen_ms, 0), mac LIMIT $1)",
                &[&(excess as i64)],
            )?;
            Ok(removed as usize)
        })
    }

    fn prune_events(&self, before_ms: u64) -> StoreResult<usize> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM events WHERE at_ms < $1",
                &[&(before_ms as i64)],
            )? as usize)
        })
    }

    fn images(&self) -> StoreResult<Vec<ImageRecord>> {
        self.with_client(|client| {
            let rows = client.query(
                &format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"),
                &[],
            )?;
            Ok(rows.iter().map(image_from_row).collect())
        })
    }

    fn image(&self, name: &str) -> StoreResult<Option<ImageRecord>> {
        self.with_client(|client| {
            let row = client.query_opt(
                &format!("SELECT {IMAGE_COLUMNS} FROM images WHERE name = $1"),
                &[&name],
            )?;
            Ok(row.as_ref().map(image_from_row))
        })
    }

    fn add_image(&self, image: &ImageRecord, actor: &str) -> StoreResult<()> {
        validate_image(image)?;
        self.change(|tx| {
            if image_exists(tx, &image.name)? {
                return Err(rules::image_taken(&image.name));
            }
            tx.execute(
                &format!(
                    "INSERT INTO images ({IMAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1)"
                ),
                &[
                    &image.name,
                    &image.kernel,
                    &json(&image.initrds),
                    &image.cmdline,
                    &image.transport,
                    &image.architecture,
                    &image.description,
                    &json(&image.files),
                    &now_ms(),
                    &(image.checkin_deadline_seconds as i64),
                    &image.secure_boot,
                ],
            )?;
            let registered = get_image(tx, &image.name)?.ok_or_else(|| rules::no_image(&image.name))?;
            insert_revision(tx, &rules::first_revision(registered, actor))?;
            audit(tx, actor, "image.add", &image.name, &format!("kernel {}", image.kernel))
        })
    }

    fn remove_image(&self, name: &str, actor: &str) -> StoreResult<()> {
        self.change(|tx| {
            let users: Vec<String> = tx
                .query(
                    "SELECT mac FROM machines WHERE image = $1 ORDER BY mac LIMIT 6",
                    &[&name],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if !users.is_empty() {
                return Err(rules::image_in_use(name, &users));
            }
            let pools: Vec<String> = tx
                .query(
                    "SELECT name FROM pools WHERE image = $1 ORDER BY name LIMIT 6",
                    &[&name],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if !pools.is_empty() {
                return Err(rules::image_of_pools(name, &pools));
            }
            if tx.execute("DELETE FROM images WHERE name = $1", &[&name])? == 0 {
                return Err(rules::no_image(name));
            }
            tx.execute("DELETE FROM image_revisions WHERE image = $1", &[&name])?;
            audit(tx, actor, "image.remove", name, "")
        })
    }

    fn update_image_files(&self, name: &str, files: &[FileCheck]) -> StoreResult<()> {
        self.change(|tx| {
            tx.execute(
                "UPDATE images SET files = $2 WHERE name = $1",
                &[&name, &json(&files)],
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
        self.change(|tx| {
            let before = get_image(tx, name)?.ok_or_else(|| rules::no_image(name))?;
            let Some((image, revision)) = rules::edited(&before, edit, note, actor)? else {
                return Ok(before);
            };
            // An image registered before revisions were kept gets its
            // first revision recorded now.
            insert_revision(tx, &rules::first_revision(before, ""))?;
            insert_revision(tx, &revision)?;
            tx.execute(
                "UPDATE images SET kernel = $2, initrds = $3, cmdline = $4, transport = $5, \
                 architecture = $6, description = $7, files = $8, checkin_deadline_s = $9, \
                 secure_boot = $10, revision = $11 WHERE name = $1",
                &[
                    &name,
                    &image.kernel,
                    &json(&image.initrds),
                    &image.cmdline,
                    &image.transport,
                    &image.architecture,
                    &image.description,
                    &json(&image.files),
                    &(image.checkin_deadline_seconds as i64),
                    &image.secure_boot,
                    &(image.revision as i64),
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
        self.with_client(|client| {
            let current = get_image(client, name)?.ok_or_else(|| rules::no_image(name))?;
            let stored = client
                .query(
                    &format!(
                        "SELECT {REVISION_COLUMNS} FROM image_revisions WHERE image = $1 ORDER BY revision DESC"
                    ),
                    &[&name],
                )?
                .iter()
                .map(revision_from_row)
                .collect();
            Ok(rules::with_current(current, stored))
        })
    }

    fn pools(&self) -> StoreResult<Vec<PoolRecord>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT name, members, selector, image FROM pools ORDER BY name",
                &[],
            )?;
            Ok(rows.iter().map(pool_from_row).collect())
        })
    }

    fn put_pool(&self, pool: &PoolRecord, actor: &str) -> StoreResult<()> {
        validate_pool(pool)?;
        self.change(|tx| {
            let members: Vec<String> = pool.members.iter().map(Mac::to_string).collect();
            if let Some(image) = &pool.image {
                if tx
                    .query_opt("SELECT 1 FROM images WHERE name = $1", &[image])?
                    .is_none()
                {
                    return Err(rules::no_image(image));
                }
            }
            tx.execute(
                "INSERT INTO pools (name, members, selector, image) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET members = $2, selector = $3, image = $4",
                &[
                    &pool.name,
                    &json(&members),
                    &json(&pool.selector),
                    &pool.image,
                ],
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
        self.change(|tx| {
            if tx.execute("DELETE FROM pools WHERE name = $1", &[&name])? == 0 {
                return Err(rules::no_pool(name));
            }
            audit(tx, actor, "pool.delete", name, "")
        })
    }

    fn assign_pool(&self, name: &str, image: Option<&str>, actor: &str) -> StoreResult<usize> {
        let (members, patch) =
            rules::pool_assignment(self.pools()?, &self.machines()?, name, image)?;
        self.change(|tx| {
            for &mac in &members {
                let (_, summary) = apply_patch(tx, mac, &patch)?;
                audit(
                    tx,
                    actor,
                    "machine.put",
                    &mac.to_string(),
                    &format!("{summary} (pool {name})"),
                )?;
            }
            tx.execute(
                "UPDATE pools SET image = $2 WHERE name = $1",
                &[&name, &image],
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
        self.with_client(|client| {
            let mut get = |key: &str| -> StoreResult<Option<String>> {
                Ok(client
                    .query_opt("SELECT value FROM settings WHERE key = $1", &[&key])?
                    .map(|row| row.get(0)))
            };
            let (policy, poll) = (get("unknown.policy")?, get("unknown.poll_seconds")?);
            Ok(rules::unknown_policy_from(
                policy.as_deref(),
                poll.as_deref(),
            ))
        })
    }

    fn set_unknown_policy(
        &self,
        policy: UnknownPolicy,
        poll_seconds: u32,
        actor: &str,
    ) -> StoreResult<()> {
        let settings = rules::unknown_policy_settings(policy, poll_seconds)?;
        let name = policy.as_str();
        self.change(|tx| {
            for (key, value) in settings {
                tx.execute(
                    "INSERT INTO settings (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = $2",
                    &[&key, &value],
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
                "INSERT INTO users (name, password_hash, scope, created_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET password_hash = $2, scope = $3",
                &[&name, &password_hash, &scope.as_str(), &now_ms()],
            )?;
            tx.execute("DELETE FROM sessions WHERE user_name = $1", &[&name])?;
            audit(tx, actor, "user.set", name, scope.as_str())
        })
    }

    fn remove_user(&self, name: &str, actor: &str) -> StoreResult<usize> {
        self.write(|tx| {
            if tx.execute("DELETE FROM users WHERE name = $1", &[&name])? == 0 {
                return Err(rules::no_user(name));
            }
            tx.execute("DELETE FROM sessions WHERE user_name = $1", &[&name])?;
            let revoked = tx.execute(
                "UPDATE tokens SET revoked = TRUE WHERE user_name = $1 AND NOT revoked",
                &[&name],
            )?;
            audit(
                tx,
                actor,
                "user.remove",
                name,
                &format!("{revoked} token(s) revoked"),
            )?;
            Ok(revoked as usize)
        })
    }

    fn user(&self, name: &str) -> StoreResult<Option<UserRecord>> {
        self.with_client(|client| {
            let row = client.query_opt(
                "SELECT name, password_hash, scope, created_ms FROM users WHERE name = $1",
                &[&name],
            )?;
            Ok(row.map(|r| UserRecord {
                name: r.get(0),
                password_hash: r.get(1),
                scope: r.get::<_, &str>(2).parse().unwrap_or(Scope::Read),
                created_ms: r.get::<_, i64>(3) as u64,
            }))
        })
    }

    fn users(&self) -> StoreResult<Vec<UserRecord>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT name, scope, created_ms FROM users ORDER BY name",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|r| UserRecord {
                    name: r.get(0),
                    password_hash: String::new(),
                    scope: r.get::<_, &str>(1).parse().unwrap_or(Scope::Read),
                    created_ms: r.get::<_, i64>(2) as u64,
                })
                .collect())
        })
    }

    fn create_session(&self, id_hash: &str, session: &SessionRecord) -> StoreResult<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM sessions WHERE expires_ms < $1", &[&now_ms()])?;
            tx.execute(
                "INSERT INTO sessions (id_hash, user_name, scope, csrf, expires_ms) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &id_hash,
                    &session.user,
                    &session.scope.as_str(),
                    &session.csrf,
                    &(session.expires_ms as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn session(&self, id_hash: &str, now_ms: u64) -> StoreResult<Option<SessionRecord>> {
        self.with_client(|client| {
            let row = client.query_opt(
                "SELECT user_name, scope, csrf, expires_ms FROM sessions \
                 WHERE id_hash = $1 AND expires_ms > $2",
                &[&id_hash, &(now_ms as i64)],
            )?;
            Ok(row.map(|r| SessionRecord {
                user: r.get(0),
                scope: r.get::<_, &str>(1).parse().unwrap_or(Scope::Read),
                csrf: r.get(2),
                expires_ms: r.get::<_, i64>(3) as u64,
            }))
        })
    }

    fn delete_session(&self, id_hash: &str) -> StoreResult<()> {
        self.with_client(|client| {
            client.execute("DELETE FROM sessions WHERE id_hash = $1", &[&id_hash])?;
            Ok(())
        })
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
            let id: i64 = tx
                .query_one(
                    "INSERT INTO tokens (name, user_name, scope, secret_hash, created_ms) \
                     VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    &[&name, &user, &scope.as_str(), &secret_hash, &now_ms()],
                )?
                .get(0);
            audit(
                tx,
                actor,
                "token.add",
                name,
                &format!("scope {} for {user}", scope.as_str()),
            )?;
            Ok(id)
        })
    }

    fn token(&self, secret_hash: &str, now_ms: u64) -> StoreResult<Option<TokenRecord>> {
        self.with_client(|client| {
            let token = client
                .query_opt(
                    "SELECT id, name, user_name, scope, created_ms, last_used_ms FROM tokens \
                     WHERE secret_hash = $1 AND NOT revoked",
                    &[&secret_hash],
                )?
                .as_ref()
                .map(token_from_row);
            if let Some(token) = &token {
                // Coarse (once a minute), and best effort, as in the
                // SQLite store.
                if rules::token_use_due(token, now_ms) {
                    if let Err(error) = client.execute(
                        "UPDATE tokens SET last_used_ms = $2 WHERE id = $1",
                        &[&token.id, &(now_ms as i64)],
                    ) {
                        tracing::debug!(%error, token = %token.name, "token use not recorded");
                    }
                }
            }
            Ok(token)
        })
    }

    fn tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT id, name, user_name, scope, created_ms, last_used_ms FROM tokens \
                 WHERE NOT revoked ORDER BY id",
                &[],
            )?;
            Ok(rows.iter().map(token_from_row).collect())
        })
    }

    fn revoke_token(&self, id: i64, actor: &str) -> StoreResult<()> {
        self.write(|tx| {
            if tx.execute(
                "UPDATE tokens SET revoked = TRUE WHERE id = $1 AND NOT revoked",
                &[&id],
            )? == 0
            {
                return Err(rules::no_token(id));
            }
            audit(tx, actor, "token.revoke", &id.to_string(), "")
        })
    }

    fn bmcs(&self) -> StoreResult<Vec<BmcRecord>> {
        self.with_client(bmcs)
    }

    fn set_bmc(&self, mac: Mac, bmc: Option<&BmcRecord>, actor: &str) -> StoreResult<()> {
        let detail = bmc.map(|bmc| validate_bmc(mac, bmc)).transpose()?;
        let key = mac.to_string();
        self.change(|tx| {
            let known: i64 = tx
                .query_one("SELECT count(*) FROM machines WHERE mac = $1", &[&key])?
                .get(0);
            if known == 0 {
                return Err(rules::no_machine(mac));
            }
            match bmc {
                Some(bmc) => tx.execute(
                    "INSERT INTO bmcs (mac, record) VALUES ($1, $2) \
                     ON CONFLICT (mac) DO UPDATE SET record = $2",
                    &[&key, &json(bmc)],
                )?,
                None => tx.execute("DELETE FROM bmcs WHERE mac = $1", &[&key])?,
            };
            let action = if bmc.is_some() {
                "machine.bmc"
            } else {
                "machine.bmc.remove"
            };
            audit(tx, actor, action, &key, detail.as_deref().unwrap_or(""))
        })
    }

    fn audit(&self, limit: usize) -> StoreResult<Vec<AuditEntry>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT id, at_ms, actor, action, target, detail FROM audit ORDER BY id DESC LIMIT $1",
                &[&(limit.min(i64::MAX as usize) as i64)],
            )?;
            Ok(rows.iter().map(audit_from_row).collect())
        })
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

    fn change_listener(&self) -> StoreResult<Option<Box<dyn ChangeListener>>> {
        Ok(Some(Box::new(self.listener()?)))
    }

    fn note_one_shots_used(&self, used: &[(Mac, u64)]) -> StoreResult<()> {
        self.change(|tx| {
            for (mac, rearm) in used {
                tx.execute(
                    "INSERT INTO one_shots_used (mac, rearm) VALUES ($1, $2) \
                     ON CONFLICT (mac) DO UPDATE SET rearm = GREATEST(one_shots_used.rearm, $2)",
                    &[&mac.to_string(), &(*rearm as i64)],
                )?;
            }
            Ok(())
        })
    }

    fn one_shots_used(&self) -> StoreResult<Vec<(Mac, u64)>> {
        self.with_client(|client| {
            let rows = client.query("SELECT mac, rearm FROM one_shots_used", &[])?;
            Ok(rows
                .iter()
                .filter_map(|row| {
                    let mac = Mac::parse(&row.get::<_, String>(0)).ok()?;
                    Some((mac, row.get::<_, i64>(1) as u64))
                })
                .collect())
        })
    }

    fn note_server_files(&self, report: &ServerFiles) -> StoreResult<()> {
        self.with_client(|client| {
            client.execute(
                "INSERT INTO server_files (name, http_url, files, seen_ms) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET http_url = $2, files = $3, seen_ms = $4",
                &[
                    &report.name,
                    &report.http_url,
                    &json(&report.files),
                    &(report.seen_ms as i64),
                ],
            )?;
            Ok(())
        })
    }

    fn server_files(&self) -> StoreResult<Vec<ServerFiles>> {
        self.with_client(|client| {
            let rows = client.query(
                "SELECT name, http_url, files, seen_ms FROM server_files ORDER BY name",
                &[],
            )?;
            Ok(rows
                .iter()
                .map(|row| ServerFiles {
                    name: row.get(0),
                    http_url: row.get(1),
                    files: from_json(&row.get::<_, String>(2)),
                    seen_ms: row.get::<_, i64>(3) as u64,
                })
                .collect())
        })
    }

    fn export(&self) -> StoreResult<InventoryDump> {
        self.with_client(|client| {
            let mut tx = client
                .build_transaction()
                .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()?;
            let dump = export_all(&mut tx)?;
            tx.commit()?;
            Ok(dump)
        })
    }

    fn import(&self, dump: &InventoryDump) -> StoreResult<()> {
        self.change(|tx| import_all(tx, dump))
    }
}

fn pool_from_row(row: &Row) -> PoolRecord {
    PoolRecord {
        name: row.get(0),
        members: from_json::<Vec<String>>(row.get::<_, &str>(1))
            .iter()
            .filter_map(|m| Mac::parse(m).ok())
            .collect(),
        selector: from_json(row.get::<_, &str>(2)),
        image: row.get(3),
    }
}

const EVENT_COLUMNS: &str =
    "at_ms, mac, client, phase, transport, detail, bytes, duration_ms, status, server";

fn event_from_row(row: &Row) -> StoredEvent {
    StoredEvent {
        at_ms: row.get::<_, i64>(0) as u64,
        mac: row.get(1),
        client: row.get(2),
        phase: row.get(3),
        transport: row.get(4),
        detail: row.get(5),
        bytes: row.get::<_, i64>(6) as u64,
        duration_ms: row.get::<_, i64>(7) as u64,
        status: row.get::<_, i32>(8) as u16,
        server: row.get(9),
    }
}

fn audit_from_row(r: &Row) -> AuditEntry {
    AuditEntry {
        id: r.get(0),
        at_ms: r.get::<_, i64>(1) as u64,
        actor: r.get(2),
        action: r.get(3),
        target: r.get(4),
        detail: r.get(5),
    }
}

/// Every row `sql` reads, through `from_row`.
fn all<T>(
    tx: &mut impl GenericClient,
    sql: &str,
    from_row: impl FnMut(&Row) -> T,
) -> StoreResult<Vec<T>> {
    Ok(tx.query(sql, &[])?.iter().map(from_row).collect())
}

/// [`InventoryStore::export`] inside one transaction.
fn export_all(tx: &mut impl GenericClient) -> StoreResult<InventoryDump> {
    Ok(InventoryDump {
        images: all(
            tx,
            &format!("SELECT {IMAGE_COLUMNS} FROM images ORDER BY name"),
            image_from_row,
        )?,
        machines: all(
            tx,
            &format!("SELECT {MACHINE_COLUMNS} FROM machines ORDER BY mac"),
            machine_from_row,
        )?,
        pools: all(
            tx,
            "SELECT name, members, selector, image FROM pools ORDER BY name",
            pool_from_row,
        )?,
        users: all(
            tx,
            "SELECT name, password_hash, scope, created_ms FROM users ORDER BY name",
            |r| UserRecord {
                name: r.get(0),
                password_hash: r.get(1),
                scope: r.get::<_, &str>(2).parse().unwrap_or(Scope::Read),
                created_ms: r.get::<_, i64>(3) as u64,
            },
        )?,
        tokens: all(
            tx,
            "SELECT id, name, user_name, scope, created_ms, last_used_ms, secret_hash, revoked \
             FROM tokens ORDER BY id",
            |r| TokenRow {
                record: token_from_row(r),
                secret_hash: r.get(6),
                revoked: r.get(7),
            },
        )?,
        events: all(
            tx,
            &format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY at_ms, id"),
            event_from_row,
        )?,
        audit: all(
            tx,
            "SELECT id, at_ms, actor, action, target, detail FROM audit ORDER BY id",
            audit_from_row,
        )?,
        settings: all(tx, "SELECT key, value FROM settings ORDER BY key", |r| {
            (r.get(0), r.get(1))
        })?,
        bmcs: bmcs(tx)?,
        image_revisions: all(
            tx,
            &format!("SELECT {REVISION_COLUMNS} FROM image_revisions ORDER BY image, revision"),
            revision_from_row,
        )?,
    })
}

/// Every BMC, by MAC; a row that does not parse is logged and left out.
fn bmcs(tx: &mut impl GenericClient) -> StoreResult<Vec<BmcRecord>> {
    let rows = all(tx, "SELECT mac, record FROM bmcs ORDER BY mac", |r| {
        (r.get(0), r.get(1))
    })?;
    Ok(rules::parse_bmc_rows(rows))
}

/// [`InventoryStore::import`] inside one transaction.
fn import_all(tx: &mut ::postgres::Transaction<'_>, dump: &InventoryDump) -> StoreResult<()> {
    let rows: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM images) + (SELECT count(*) FROM machines) + (SELECT count(*) FROM users)",
            &[],
        )?
        .get(0);
    if rows > 0 {
        return Err(not_empty(rows));
    }
    for i in &dump.images {
        tx.execute(
            &format!(
                "INSERT INTO images ({IMAGE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &i.name,
                &i.kernel,
                &json(&i.initrds),
                &i.cmdline,
                &i.transport,
                &i.architecture,
                &i.description,
                &json(&i.files),
                &(i.created_ms as i64),
                &(i.checkin_deadline_seconds as i64),
                &i.secure_boot,
                &(i.revision as i64),
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
                      ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            ),
            &[
                &m.mac.to_string(),
                &m.hostname,
                &m.ip.map(|ip| ip.to_string()),
                &json(&m.labels),
                &m.image,
                &m.one_shot,
                &(m.rearm as i64),
                &m.netboot,
                &m.cmdline_append,
                &m.notes,
                &m.adopted,
                &m.first_seen_ms.map(|v| v as i64),
                &m.last_seen_ms.map(|v| v as i64),
                &json(&m.facts),
                &m.phase,
                &m.phase_ms.map(|v| v as i64),
                &m.phase_status.map(i32::from),
                &m.image_revision.map(|v| v as i64),
            ],
        )?;
    }
    for p in &dump.pools {
        let members: Vec<String> = p.members.iter().map(Mac::to_string).collect();
        tx.execute(
            "INSERT INTO pools (name, members, selector, image) VALUES ($1, $2, $3, $4)",
            &[&p.name, &json(&members), &json(&p.selector), &p.image],
        )?;
    }
    import_accounts_and_history(tx, dump)
}

/// The users, tokens, boot events, audit entries and settings of
/// [`import_all`].
fn import_accounts_and_history(
    tx: &mut ::postgres::Transaction<'_>,
    dump: &InventoryDump,
) -> StoreResult<()> {
    for u in &dump.users {
        tx.execute(
            "INSERT INTO users (name, password_hash, scope, created_ms) VALUES ($1, $2, $3, $4)",
            &[
                &u.name,
                &u.password_hash,
                &u.scope.as_str(),
                &(u.created_ms as i64),
            ],
        )?;
    }
    for t in &dump.tokens {
        let r = &t.record;
        tx.execute(
            "INSERT INTO tokens (id, name, user_name, scope, secret_hash, created_ms, last_used_ms, revoked) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[&r.id, &r.name, &r.user, &r.scope.as_str(), &t.secret_hash, &(r.created_ms as i64),
                &r.last_used_ms.map(|v| v as i64), &t.revoked],
        )?;
    }
    let event = tx.prepare(&format!(
        "INSERT INTO events ({EVENT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    ))?;
    for e in &dump.events {
        tx.execute(
            &event,
            &[
                &(e.at_ms as i64),
                &e.mac,
                &e.client,
                &e.phase,
                &e.transport,
                &e.detail,
                &(e.bytes as i64),
                &(e.duration_ms as i64),
                &i32::from(e.status),
                &e.server,
            ],
        )?;
    }
    for a in &dump.audit {
        tx.execute(
            "INSERT INTO audit (id, at_ms, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&a.id, &(a.at_ms as i64), &a.actor, &a.action, &a.target, &a.detail],
        )?;
    }
    for (key, value) in &dump.settings {
        tx.execute(
            "INSERT INTO settings (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
            &[key, value],
        )?;
    }
    for bmc in &dump.bmcs {
        tx.execute(
            "INSERT INTO bmcs (mac, record) VALUES ($1, $2)",
            &[&bmc.mac.to_string(), &json(bmc)],
        )?;
    }
    // Rows given their ids: new ones must be numbered after them.
    for table in ["tokens", "audit"] {
        tx.batch_execute(&format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
             COALESCE((SELECT max(id) FROM {table}), 0) + 1, false)"
        ))?;
    }
    Ok(())
}

/// A connection of its own that `LISTEN`s on [`CHANGES`].
struct PostgresListener {
    client: Client,
    /// The listening store's id: its own announcements are not changes.
    own: String,
}

impl ChangeListener for PostgresListener {
    fn wait(&mut self, timeout: std::time::Duration) -> StoreResult<bool> {
        use ::postgres::fallible_iterator::FallibleIterator;
        let mut changed = false;
        let mut notifications = self.client.notifications();
        // The first waits up to `timeout`; any queued behind it are taken
        // with it.
        let mut wait = timeout;
        while let Some(notification) = notifications.timeout_iter(wait).next()? {
            changed |= notification.payload() != self.own;
            wait = std::time::Duration::ZERO;
        }
        Ok(changed)
    }
}

impl PostgresStore {
    fn listener(&self) -> StoreResult<PostgresListener> {
        let mut client = connect(&self.url)?;
        client.batch_execute(&format!("LISTEN {CHANGES}"))?;
        Ok(PostgresListener {
            client,
            own: self.id.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redact("postgres://boot:s3cret@db.example:5432/bootfleet"),
            "postgres://boot:***@db.example:5432/bootfleet"
        );
        assert_eq!(redact("postgres://boot@db/x"), "postgres://boot@db/x");
        assert_eq!(redact("host=/run/postgresql"), "host=/run/postgresql");
    }
}
