//! The inventory store behind the control panel: machines, images, pools,
//! boot events, users, API tokens and the audit log.
//!
//! [`InventoryStore`] is the one seam between the panel and its database:
//! the embedded SQLite file ([`sqlite::SqliteStore`]) is the default, and
//! [`postgres::PostgresStore`] keeps the same inventory in a PostgreSQL
//! server (`[database] url`). Both pass the same tests (`tests.rs`), and
//! `bootfleet db copy` moves an inventory from one to the other. The data plane never reads the store: every change is turned
//! into a fresh [`Snapshot`] by
//! [`snapshot_from_store`] and swapped into the router atomically.

pub mod postgres;
mod rules;
pub mod shared_leases;
pub mod sqlite;
#[cfg(test)]
mod tests;
pub mod unavailable;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::boot::events::BootEvent;
use crate::inventory::bmc::{check_target, BmcTarget};
use crate::inventory::{self, fields, Snapshot, Transport, UnknownPolicy};
use crate::proto::Mac;

/// What a user or API token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read everything except users and tokens.
    Read,
    /// Also assign images to machines and pools, adopt and re-arm machines.
    Assign,
    /// Also manage images, pools, users and tokens, and forget machines.
    Admin,
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Scope::Read),
            "assign" => Ok(Scope::Assign),
            "admin" => Ok(Scope::Admin),
            other => Err(format!("scope {other:?} is not one of read, assign, admin")),
        }
    }
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Assign => "assign",
            Scope::Admin => "admin",
        }
    }
}

/// A machine as the panel knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineRecord {
    pub mac: Mac,
    pub hostname: Option<String>,
    pub ip: Option<Ipv4Addr>,
    /// `key=value` labels (pools select machines by them).
    pub labels: Vec<String>,
    pub image: Option<String>,
    /// Pinned to this revision of its image; `None`: its image's current
    /// revision.
    pub image_revision: Option<u64>,
    pub one_shot: bool,
    pub rearm: u64,
    pub netboot: bool,
    pub cmdline_append: String,
    pub notes: String,
    /// `false`: discovered (it asked for a script) but not adopted yet.
    pub adopted: bool,
    pub first_seen_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    /// The iPXE facts it sent (uuid, manufacturer, product, serial, asset,
    /// buildarch, platform).
    pub facts: BTreeMap<String, String>,
    /// The last boot step seen, when, and its status.
    pub phase: Option<String>,
    pub phase_ms: Option<u64>,
    pub phase_status: Option<u16>,
}

impl MachineRecord {
    /// A machine the store has never seen: adopted, netbooting, nothing set.
    pub fn new(mac: Mac) -> Self {
        Self {
            mac,
            hostname: None,
            ip: None,
            labels: Vec::new(),
            image: None,
            image_revision: None,
            one_shot: false,
            rearm: 0,
            netboot: true,
            cmdline_append: String::new(),
            notes: String::new(),
            adopted: true,
            first_seen_ms: None,
            last_seen_ms: None,
            facts: BTreeMap::new(),
            phase: None,
            phase_ms: None,
            phase_status: None,
        }
    }
}

/// A change to a machine (`PUT /api/v1/machines/{mac}`); absent fields stay.
/// Putting a discovered machine adopts it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachinePatch {
    /// An image name, or `null` to unassign. A new image ends a pin
    /// unless the patch pins too.
    #[serde(default, deserialize_with = "double_option")]
    pub image: Option<Option<String>>,
    /// Pin to this revision of the machine's image, or `null` to follow
    /// its current revision.
    #[serde(default, deserialize_with = "double_option")]
    pub image_revision: Option<Option<u64>>,
    #[serde(default, deserialize_with = "double_option")]
    pub hostname: Option<Option<String>>,
    #[serde(default, deserialize_with = "double_option")]
    pub ip: Option<Option<Ipv4Addr>>,
    pub labels: Option<Vec<String>>,
    pub one_shot: Option<bool>,
    /// `true`: a used one-shot assignment installs once more.
    #[serde(default)]
    pub rearm: bool,
    pub netboot: Option<bool>,
    pub cmdline_append: Option<String>,
    pub notes: Option<String>,
}

impl MachinePatch {
    /// Applies this patch to `machine` (adopting it) and says what changed,
    /// one phrase per field, for the audit log. Every store backend merges
    /// a patch through this, so they record changes alike.
    pub fn apply_to(&self, machine: &mut MachineRecord) -> Vec<String> {
        let mut changes = Vec::new();
        if !machine.adopted {
            changes.push("adopted".to_string());
        }
        machine.adopted = true;
        if let Some(image) = &self.image {
            if *image != machine.image {
                changes.push(format!(
                    "image {} -> {}",
                    machine.image.as_deref().unwrap_or("none"),
                    image.as_deref().unwrap_or("none")
                ));
                if machine.image_revision.is_some() && self.image_revision.is_none() {
                    changes.push("unpinned".to_string());
                    machine.image_revision = None;
                }
            }
            machine.image = image.clone();
        }
        if let Some(revision) = self.image_revision {
            if revision != machine.image_revision {
                changes.push(match revision {
                    Some(revision) => format!("pinned to revision {revision}"),
                    None => "unpinned".to_string(),
                });
            }
            machine.image_revision = revision;
        }
        if let Some(hostname) = &self.hostname {
            if *hostname != machine.hostname {
                changes.push(format!(
                    "hostname {}",
                    hostname.as_deref().unwrap_or("none")
                ));
            }
            machine.hostname = hostname.clone();
        }
        if let Some(ip) = self.ip {
            if ip != machine.ip {
                changes.push(format!(
                    "ip {}",
                    ip.map_or("none".into(), |ip| ip.to_string())
                ));
            }
            machine.ip = ip;
        }
        if let Some(labels) = &self.labels {
            if *labels != machine.labels {
                changes.push(format!("labels [{}]", labels.join(", ")));
            }
            machine.labels = labels.clone();
        }
        if let Some(one_shot) = self.one_shot {
            if one_shot != machine.one_shot {
                changes.push(format!("one_shot {one_shot}"));
            }
            machine.one_shot = one_shot;
        }
        if self.rearm {
            machine.rearm += 1;
            changes.push(format!("re-armed (generation {})", machine.rearm));
        }
        if let Some(netboot) = self.netboot {
            if netboot != machine.netboot {
                changes.push(format!("netboot {netboot}"));
            }
            machine.netboot = netboot;
        }
        if let Some(append) = &self.cmdline_append {
            if *append != machine.cmdline_append {
                changes.push(format!("cmdline_append {append:?}"));
            }
            machine.cmdline_append = append.clone();
        }
        if let Some(notes) = &self.notes {
            if *notes != machine.notes {
                changes.push("notes".to_string());
            }
            machine.notes = notes.clone();
        }
        changes
    }
}

fn double_option<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

/// A boot file of an image, as last checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCheck {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub mtime_ms: u64,
}

/// The image files one server holds, as it last reported them: with
/// several servers on one database, a server lacking a file (or holding
/// another version of it) fetches it from one that reports it with the
/// image's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFiles {
    /// The server's name (`panel.server_name`).
    pub name: String,
    /// Where its data plane serves the boot directory (`http://…`), or
    /// empty when other servers cannot reach it.
    pub http_url: String,
    pub files: Vec<HeldFile>,
    /// When it reported.
    pub seen_ms: u64,
}

/// A boot file a server holds, checked against its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

/// An image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub kernel: String,
    #[serde(default)]
    pub initrds: Vec<String>,
    #[serde(default)]
    pub cmdline: String,
    /// `http`, `tftp` or `multicast`.
    #[serde(default = "http")]
    pub transport: String,
    /// e.g. `x86_64`, `arm64`.
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub description: String,
    /// Sizes and SHA-256 of the files in the boot directory (URLs have none).
    #[serde(default)]
    pub files: Vec<FileCheck>,
    #[serde(default)]
    pub created_ms: u64,
    /// How long a machine booting this image has, from its kernel fetch,
    /// to check in; 0: `[power] checkin_deadline_seconds`.
    #[serde(default)]
    pub checkin_deadline_seconds: u64,
    /// Boot it through the Secure Boot chain (signed shim and GRUB) on
    /// UEFI x64 PXE machines.
    #[serde(default)]
    pub secure_boot: bool,
    /// Its current revision: 1 when registered, one more at each edit.
    #[serde(default = "first_revision")]
    pub revision: u64,
}

fn http() -> String {
    "http".into()
}

fn first_revision() -> u64 {
    1
}

/// A change to an image (`PUT /api/v1/images/{name}`); absent fields stay.
/// Each change that changes something makes a new revision.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEdit {
    pub kernel: Option<String>,
    pub initrds: Option<Vec<String>>,
    pub cmdline: Option<String>,
    pub transport: Option<String>,
    pub architecture: Option<String>,
    pub description: Option<String>,
    pub checkin_deadline_seconds: Option<u64>,
    pub secure_boot: Option<bool>,
}

impl ImageEdit {
    /// The edit that gives an image `target`'s content back (a rollback).
    pub fn restoring(target: &ImageRecord) -> Self {
        ImageEdit {
            kernel: Some(target.kernel.clone()),
            initrds: Some(target.initrds.clone()),
            cmdline: Some(target.cmdline.clone()),
            transport: Some(target.transport.clone()),
            architecture: Some(target.architecture.clone()),
            description: Some(target.description.clone()),
            checkin_deadline_seconds: Some(target.checkin_deadline_seconds),
            secure_boot: Some(target.secure_boot),
        }
    }

    /// Applies this edit to `image` and says what changed, one phrase per
    /// field (the revision's and the audit log's description); both store
    /// backends edit through this. A changed kernel or initrd drops the
    /// file checks: the server checks the new files again.
    pub fn apply_to(&self, image: &mut ImageRecord) -> Vec<String> {
        fn set<T: PartialEq + Clone>(
            field: &mut T,
            wanted: &Option<T>,
            name: &str,
            changes: &mut Vec<String>,
            show: impl Fn(&T) -> String,
        ) {
            if let Some(wanted) = wanted.as_ref().filter(|w| *w != field) {
                changes.push(format!("{name} {} -> {}", show(field), show(wanted)));
                *field = wanted.clone();
            }
        }
        let mut changes = Vec::new();
        let quoted = |text: &String| format!("{text:?}");
        set(
            &mut image.kernel,
            &self.kernel,
            "kernel",
            &mut changes,
            quoted,
        );
        set(
            &mut image.initrds,
            &self.initrds,
            "initrds",
            &mut changes,
            |i| format!("{i:?}"),
        );
        if !changes.is_empty() {
            image.files.clear();
        }
        set(
            &mut image.cmdline,
            &self.cmdline,
            "cmdline",
            &mut changes,
            quoted,
        );
        set(
            &mut image.transport,
            &self.transport,
            "transport",
            &mut changes,
            String::clone,
        );
        set(
            &mut image.architecture,
            &self.architecture,
            "architecture",
            &mut changes,
            quoted,
        );
        set(
            &mut image.description,
            &self.description,
            "description",
            &mut changes,
            quoted,
        );
        set(
            &mut image.checkin_deadline_seconds,
            &self.checkin_deadline_seconds,
            "checkin_deadline_seconds",
            &mut changes,
            u64::to_string,
        );
        set(
            &mut image.secure_boot,
            &self.secure_boot,
            "secure_boot",
            &mut changes,
            bool::to_string,
        );
        changes
    }
}

/// One revision of an image: its content then, and what made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageRevision {
    pub revision: u64,
    pub image: ImageRecord,
    /// What changed from the revision before (`registered` for the first,
    /// `rollback to revision N: ...` for a rollback).
    pub changes: String,
    pub actor: String,
    pub at_ms: u64,
}

/// A named set of machines: listed ones plus those whose labels match
/// every `key=value` of the selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRecord {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub members: Vec<Mac>,
    #[serde(default)]
    pub selector: Vec<String>,
    /// The image last assigned to the pool.
    #[serde(default)]
    pub image: Option<String>,
}

/// The pool whose image `machine` boots when it has none of its own: the
/// first pool, by name, that has an image and contains it. A machine's
/// own assignment always wins over every pool's; discovered (not adopted)
/// machines follow no pool.
pub fn image_pool<'a>(pools: &'a [PoolRecord], machine: &MachineRecord) -> Option<&'a PoolRecord> {
    if machine.image.is_some() || !machine.adopted {
        return None;
    }
    pools
        .iter()
        .filter(|pool| pool.image.is_some() && pool.contains(machine))
        .min_by(|a, b| a.name.cmp(&b.name))
}

impl PoolRecord {
    /// Whether `machine` belongs to this pool.
    pub fn contains(&self, machine: &MachineRecord) -> bool {
        self.members.contains(&machine.mac)
            || (!self.selector.is_empty()
                && self
                    .selector
                    .iter()
                    .all(|wanted| machine.labels.iter().any(|label| label == wanted)))
    }
}

/// A user of the panel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRecord {
    pub name: String,
    pub scope: Scope,
    #[serde(skip)]
    pub password_hash: String,
    pub created_ms: u64,
}

/// An API token (the secret itself is only ever shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    pub id: i64,
    pub name: String,
    pub user: String,
    pub scope: Scope,
    pub created_ms: u64,
    pub last_used_ms: Option<u64>,
}

/// A logged-in browser session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub user: String,
    pub scope: Scope,
    pub csrf: String,
    pub expires_ms: u64,
}

/// One change, who made it and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// A machine's BMC as stored: where it is, who to log in as, and the
/// password sealed with the operator's key file (see [`crate::seal`]; the
/// store never sees it in the clear, and no API answer carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BmcRecord {
    pub mac: Mac,
    pub target: BmcTarget,
    /// The password, sealed for this MAC ([`bmc_password_aad`]).
    pub sealed_secret: String,
    /// An IPMI BMC's K_g key as the operator wrote it, sealed for this MAC
    /// ([`bmc_kg_aad`]), when the BMC wants one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed_kg: Option<String>,
    pub updated_ms: u64,
}

/// A machine that asked for a script, with the iPXE facts it sent.
pub type SeenNote = (Mac, BTreeMap<String, String>, u64);

/// A boot event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredEvent {
    pub at_ms: u64,
    pub mac: Option<String>,
    pub client: String,
    pub phase: String,
    pub transport: String,
    pub detail: String,
    pub bytes: u64,
    pub duration_ms: u64,
    pub status: u16,
    /// The bootfleet server that served it (`panel.server_name`): several
    /// servers on one database share one timeline.
    pub server: String,
}

impl From<&BootEvent> for StoredEvent {
    fn from(event: &BootEvent) -> Self {
        StoredEvent {
            at_ms: event.at_ms,
            mac: event.mac.map(|m| m.to_string()),
            client: event.client.to_string(),
            phase: serde_json::to_value(event.phase)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            transport: event.transport.to_string(),
            detail: event.detail.clone(),
            bytes: event.bytes,
            duration_ms: event.duration_ms,
            status: event.status,
            server: String::new(),
        }
    }
}

/// An API token as stored: its record, the hash of its secret, and
/// whether it was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub record: TokenRecord,
    pub secret_hash: String,
    pub revoked: bool,
}

/// Every row of an inventory, as `bootfleet db copy` moves it from one
/// store to another (SQLite to PostgreSQL and back). Browser sessions are
/// left out: their users log in again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryDump {
    pub images: Vec<ImageRecord>,
    pub machines: Vec<MachineRecord>,
    pub pools: Vec<PoolRecord>,
    /// With their password hashes.
    pub users: Vec<UserRecord>,
    pub tokens: Vec<TokenRow>,
    /// Oldest first.
    pub events: Vec<StoredEvent>,
    /// Oldest first.
    pub audit: Vec<AuditEntry>,
    /// Key and value (the unknown-machine policy).
    pub settings: Vec<(String, String)>,
    /// Machines' BMCs, their passwords still sealed (the copy needs the
    /// same key file).
    pub bmcs: Vec<BmcRecord>,
    /// Every image's recorded revisions, by image then revision.
    pub image_revisions: Vec<ImageRevision>,
}

impl std::fmt::Display for InventoryDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images, {} machines, {} pools, {} users, {} tokens, {} boot events, {} audit entries, {} settings, {} BMCs",
            self.images.len(),
            self.machines.len(),
            self.pools.len(),
            self.users.len(),
            self.tokens.len(),
            self.events.len(),
            self.audit.len(),
            self.settings.len(),
            self.bmcs.len()
        )
    }
}

/// Copies every row of `from` into `to`, which must hold no image,
/// machine or user yet, then reads `to` back: the copy must hold exactly
/// what `from` held, row for row. Returns what was copied.
pub fn copy(from: &dyn InventoryStore, to: &dyn InventoryStore) -> StoreResult<InventoryDump> {
    let dump = from.export()?;
    to.import(&dump)?;
    let copied = to.export()?;
    if copied != dump {
        return Err(StoreError::Database(format!(
            "the copy does not read back as the original (it holds {copied}; the original {dump})"
        )));
    }
    Ok(dump)
}

/// Where an inventory is: an SQLite file or a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Sqlite(std::path::PathBuf),
    /// A `postgres://` or `postgresql://` URL.
    Postgres(String),
}

impl From<&str> for StoreLocation {
    /// `postgres://…` or `postgresql://…` is PostgreSQL; `sqlite:PATH`
    /// or any other text is the path of an SQLite file.
    fn from(text: &str) -> Self {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StoreLocation::Postgres(text.to_string())
        } else {
            StoreLocation::Sqlite(text.strip_prefix("sqlite:").unwrap_or(text).into())
        }
    }
}

impl std::fmt::Display for StoreLocation {
    /// The location, any password left out.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => write!(f, "{}", path.display()),
            StoreLocation::Postgres(url) => f.write_str(&self::postgres::redact(url)),
        }
    }
}

impl StoreLocation {
    /// Opens (creating or migrating as needed) the store there.
    pub fn open(&self) -> StoreResult<Box<dyn InventoryStore>> {
        Ok(match self {
            StoreLocation::Sqlite(path) => Box::new(sqlite::SqliteStore::open(path)?),
            StoreLocation::Postgres(url) => Box::new(self::postgres::PostgresStore::connect(url)?),
        })
    }
}

/// What went wrong in the store, in words an API client can act on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("inventory database: {0}")]
    Database(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::Database(error.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The inventory database. Every method is one transaction; writes record
/// their audit entry in the same transaction.
pub trait InventoryStore: Send + Sync {
    fn machines(&self) -> StoreResult<Vec<MachineRecord>>;
    /// Every machine without its labels, facts and notes (left empty):
    /// what the data plane's snapshot and the fleet view need, read without
    /// decoding JSON (the cost of every change with 10,000 machines).
    fn machines_brief(&self) -> StoreResult<Vec<MachineRecord>>;
    fn machine(&self, mac: Mac) -> StoreResult<Option<MachineRecord>>;
    /// Creates or changes a machine (adopting it), as `actor`.
    fn put_machine(
        &self,
        mac: Mac,
        patch: &MachinePatch,
        actor: &str,
    ) -> StoreResult<MachineRecord>;
    /// Puts the same change to many machines in one transaction.
    fn put_machines(&self, macs: &[Mac], patch: &MachinePatch, actor: &str) -> StoreResult<usize>;
    fn forget_machine(&self, mac: Mac, actor: &str) -> StoreResult<()>;
    /// A machine asked for a script: remember it (discovered if new).
    fn note_seen(
        &self,
        mac: Mac,
        facts: &BTreeMap<String, String>,
        at_ms: u64,
    ) -> StoreResult<bool>;
    /// Stores boot events, moves each machine's last phase, and remembers
    /// machines that asked for a script (`seen`: MAC, iPXE facts, when),
    /// all in one transaction.
    /// Stores `events`, served by the server named `server`, and the
    /// machines `seen` asking for scripts.
    fn note_events(&self, events: &[BootEvent], seen: &[SeenNote], server: &str)
        -> StoreResult<()>;
    fn events(
        &self,
        mac: Option<Mac>,
        since_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Deletes events older than `before_ms`; returns how many.
    fn prune_events(&self, before_ms: u64) -> StoreResult<usize>;
    /// Keeps at most `keep` discovered (not adopted) machines, forgetting
    /// the least recently seen; returns how many were forgotten.
    fn prune_discovered(&self, keep: usize) -> StoreResult<usize>;

    fn images(&self) -> StoreResult<Vec<ImageRecord>>;
    fn image(&self, name: &str) -> StoreResult<Option<ImageRecord>>;
    fn add_image(&self, image: &ImageRecord, actor: &str) -> StoreResult<()>;
    fn remove_image(&self, name: &str, actor: &str) -> StoreResult<()>;
    /// Records new sizes and checksums (a file changed on disk).
    fn update_image_files(&self, name: &str, files: &[FileCheck]) -> StoreResult<()>;
    /// Changes an image as `edit` says and makes that its new revision,
    /// recorded with `note` (e.g. `rollback to revision 2`) before what
    /// changed; an edit that changes nothing makes no revision. Machines
    /// not pinned boot the new revision at once.
    fn edit_image(
        &self,
        name: &str,
        edit: &ImageEdit,
        note: &str,
        actor: &str,
    ) -> StoreResult<ImageRecord>;
    /// An image's revisions, newest first (the current one included).
    fn image_revisions(&self, name: &str) -> StoreResult<Vec<ImageRevision>>;

    fn pools(&self) -> StoreResult<Vec<PoolRecord>>;
    fn put_pool(&self, pool: &PoolRecord, actor: &str) -> StoreResult<()>;
    fn delete_pool(&self, name: &str, actor: &str) -> StoreResult<()>;
    /// Assigns `image` to every machine of the pool; returns how many.
    fn assign_pool(&self, name: &str, image: Option<&str>, actor: &str) -> StoreResult<usize>;

    fn unknown_policy(&self) -> StoreResult<(UnknownPolicy, u32)>;
    fn set_unknown_policy(
        &self,
        policy: UnknownPolicy,
        poll_seconds: u32,
        actor: &str,
    ) -> StoreResult<()>;

    fn add_user(
        &self,
        name: &str,
        password_hash: &str,
        scope: Scope,
        actor: &str,
    ) -> StoreResult<()>;
    fn user(&self, name: &str) -> StoreResult<Option<UserRecord>>;
    fn users(&self) -> StoreResult<Vec<UserRecord>>;
    /// Removes a user, ends its sessions and revokes the tokens that act
    /// for it; answers how many tokens it revoked.
    fn remove_user(&self, name: &str, actor: &str) -> StoreResult<usize>;
    fn create_session(&self, id_hash: &str, session: &SessionRecord) -> StoreResult<()>;
    fn session(&self, id_hash: &str, now_ms: u64) -> StoreResult<Option<SessionRecord>>;
    fn delete_session(&self, id_hash: &str) -> StoreResult<()>;
    fn add_token(
        &self,
        name: &str,
        user: &str,
        scope: Scope,
        secret_hash: &str,
        actor: &str,
    ) -> StoreResult<i64>;
    /// The token with this hash, marking it used.
    fn token(&self, secret_hash: &str, now_ms: u64) -> StoreResult<Option<TokenRecord>>;
    fn tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    fn revoke_token(&self, id: i64, actor: &str) -> StoreResult<()>;

    /// Every machine's BMC, by MAC.
    fn bmcs(&self) -> StoreResult<Vec<BmcRecord>>;
    /// Sets (`Some`) or removes (`None`) the BMC of the machine `mac`,
    /// which must be in the inventory. A machine forgotten loses its BMC.
    fn set_bmc(&self, mac: Mac, bmc: Option<&BmcRecord>, actor: &str) -> StoreResult<()>;

    fn audit(&self, limit: usize) -> StoreResult<Vec<AuditEntry>>;
    /// An audit entry for something that is not a store change (a login).
    fn record_audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> StoreResult<()>;

    /// Records one-shot assignments used up (MAC, the machine's `rearm`
    /// generation; a later generation replaces an earlier one) and tells
    /// the other servers, so that the machine boots locally whichever
    /// server it asks next.
    fn note_one_shots_used(&self, used: &[(Mac, u64)]) -> StoreResult<()>;
    /// Every one-shot assignment used up, through any server.
    fn one_shots_used(&self) -> StoreResult<Vec<(Mac, u64)>>;

    /// Records which image files server `report.name` holds, verified
    /// by SHA-256, and where it serves them (replacing its last report).
    /// Not an inventory change: no other server is told.
    fn note_server_files(&self, report: &ServerFiles) -> StoreResult<()>;
    /// Every server's last report, by name.
    fn server_files(&self) -> StoreResult<Vec<ServerFiles>>;

    /// A listener for inventory changes other writers make (other
    /// servers on the same database), or `None` when every write goes
    /// through this process (the SQLite file).
    fn change_listener(&self) -> StoreResult<Option<Box<dyn ChangeListener>>> {
        Ok(None)
    }

    /// Every row, read in one transaction, for a copy into another store.
    fn export(&self) -> StoreResult<InventoryDump>;
    /// Writes `dump` in one transaction; refused when this store already
    /// holds an image, a machine or a user.
    fn import(&self, dump: &InventoryDump) -> StoreResult<()>;
}

/// Waits for inventory changes (machines, images, pools, settings) that
/// another writer committed: the panel rebuilds the data plane's snapshot
/// when one comes.
pub trait ChangeListener: Send {
    /// Waits up to `timeout`; `Ok(true)` when another writer changed the
    /// inventory since the last call. An error means the listener is gone:
    /// make a new one, and rebuild the snapshot, since changes may have
    /// been missed meanwhile.
    fn wait(&mut self, timeout: std::time::Duration) -> StoreResult<bool>;
}

/// The refusal of an import into a store that is not empty.
fn not_empty(rows: i64) -> StoreError {
    StoreError::Conflict(format!(
        "the target inventory already holds {rows} images, machines or users; copy into a new, empty database"
    ))
}

/// Checks every field of a machine change that reaches a boot config (see
/// [`inventory::fields`]); every store calls this before it writes, so the
/// API, the panel, the CLI and the inventory import share one gate.
pub fn validate_patch(patch: &MachinePatch) -> StoreResult<()> {
    let checked = patch
        .labels
        .as_deref()
        .map_or(Ok(()), fields::check_labels)
        .and_then(|()| match &patch.hostname {
            Some(Some(hostname)) => fields::check_hostname(hostname),
            _ => Ok(()),
        })
        .and_then(|()| match &patch.image {
            Some(Some(image)) => fields::check_name("image", image),
            _ => Ok(()),
        })
        .and_then(|()| match patch.ip {
            Some(Some(ip)) => fields::check_host_address(ip),
            _ => Ok(()),
        })
        .and_then(|()| {
            patch.cmdline_append.as_deref().map_or(Ok(()), |append| {
                fields::check_words("cmdline_append", append, fields::MAX_COMMAND_LINE)
            })
        })
        .and_then(|()| {
            // Notes never reach a boot config, but they are one field of a
            // row every listing returns: bounded, and free of terminal
            // escapes for the CLI's table.
            patch.notes.as_deref().map_or(Ok(()), |notes| {
                match notes
                    .chars()
                    .find(|&c| c.is_control() && c != '\n' && c != '\t')
                {
                    Some(bad) => Err(format!("notes contain the control character {bad:?}")),
                    None if notes.len() > 16 * fields::MAX_TEXT => Err(format!(
                        "notes are longer than {} bytes",
                        16 * fields::MAX_TEXT
                    )),
                    None => Ok(()),
                }
            })
        });
    checked.map_err(StoreError::Invalid)
}

/// Checks an image before it is stored: its name, boot paths (which must
/// already be relative to the boot directory, or URLs), command line,
/// description, architecture and transport.
pub fn validate_image(image: &ImageRecord) -> StoreResult<()> {
    parse_transport(&image.transport)?;
    let name = &image.name;
    let path = |role: &str, raw: &String| {
        let checked = fields::check_boot_path(&format!("image {name}: {role}"), raw)?;
        if checked == *raw {
            Ok(())
        } else {
            Err(format!(
                "image {name}: {role} {raw:?} must be written as {checked:?}"
            ))
        }
    };
    let checked = fields::check_name("image", name)
        .and_then(|()| path("kernel", &image.kernel))
        .and_then(|()| image.initrds.iter().try_for_each(|i| path("initrd", i)))
        .and_then(|()| {
            fields::check_words(
                &format!("image {name}: cmdline"),
                &image.cmdline,
                fields::MAX_COMMAND_LINE,
            )
        })
        .and_then(|()| {
            fields::check_words(
                &format!("image {name}: description"),
                &image.description,
                fields::MAX_TEXT,
            )
        })
        .and_then(|()| {
            fields::check_line(
                &format!("image {name}: architecture"),
                &image.architecture,
                64,
            )
        })
        .and_then(|()| match image.checkin_deadline_seconds {
            0 | 10..=86_400 => Ok(()),
            other => Err(format!(
                "image {name}: checkin_deadline_seconds {other} is outside 10..=86400 (0: the server's default)"
            )),
        });
    checked.map_err(StoreError::Invalid)
}

/// What a BMC password is sealed for: its machine, so that a sealed value
/// copied to another machine's record does not open.
pub fn bmc_password_aad(mac: Mac) -> String {
    mac.to_string()
}

/// What a BMC's K_g key is sealed for: its machine, told apart from the
/// password (a sealed password moved into the key's place does not open).
pub fn bmc_kg_aad(mac: Mac) -> String {
    format!("{mac} kg")
}

/// Checks a BMC before it is stored: its target (see
/// [`crate::inventory::bmc::check_target`]) and that its password is sealed,
/// and says what the audit log records of it (never the password).
pub fn validate_bmc(mac: Mac, bmc: &BmcRecord) -> StoreResult<String> {
    if bmc.mac != mac {
        return Err(StoreError::Invalid(format!(
            "the BMC record is for {}, not {mac}",
            bmc.mac
        )));
    }
    check_target(&bmc.target).map_err(|why| StoreError::Invalid(format!("BMC: {why}")))?;
    if !bmc.sealed_secret.starts_with("v1.") {
        return Err(StoreError::Invalid(
            "BMC: the password must be sealed before it is stored".into(),
        ));
    }
    if let Some(kg) = &bmc.sealed_kg {
        if bmc.target.protocol != crate::inventory::bmc::BmcProtocol::Ipmi {
            return Err(StoreError::Invalid(
                "BMC: a K_g key is for IPMI BMCs only".into(),
            ));
        }
        if !kg.starts_with("v1.") {
            return Err(StoreError::Invalid(
                "BMC: the K_g key must be sealed before it is stored".into(),
            ));
        }
    }
    Ok(format!("bmc {}", bmc.target))
}

/// A user name: letters, digits, '-', '_', '.', '@', 1 to 64 of them.
pub fn validate_user_name(name: &str) -> StoreResult<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(StoreError::Invalid(format!(
            "user name {name:?} may only use letters, digits, '-', '_', '.', '@' (1 to 64)"
        )));
    }
    Ok(())
}

/// Checks a pool's name, members' image and selector.
pub fn validate_pool(pool: &PoolRecord) -> StoreResult<()> {
    fields::check_name("pool", &pool.name)
        .and_then(|()| fields::check_labels(&pool.selector))
        .and_then(|()| {
            pool.image
                .as_deref()
                .map_or(Ok(()), |image| fields::check_name("image", image))
        })
        .map_err(StoreError::Invalid)
}

/// Builds the data plane's snapshot from the store: every image, and every
/// adopted machine (discovered ones stay unknown to the router, so the
/// unknown-machine policy answers them until an operator adopts them).
pub fn snapshot_from_store(store: &dyn InventoryStore, generation: u64) -> StoreResult<Snapshot> {
    let (policy, poll) = store.unknown_policy()?;
    let records = store.images()?;
    let current: HashMap<String, u64> = records
        .iter()
        .map(|image| (image.name.clone(), image.revision))
        .collect();
    let mut images: Vec<inventory::Image> = records.into_iter().map(data_plane_image).collect();
    let pools = store.pools()?;
    // Labels only when a pool with an image selects by them (reading them
    // costs the JSON decoding the brief listing avoids).
    let by_labels = pools
        .iter()
        .any(|pool| pool.image.is_some() && !pool.selector.is_empty());
    let records = if by_labels {
        store.machines()?
    } else {
        store.machines_brief()?
    };
    // A machine pinned to an older revision boots that revision, held in
    // the snapshot as an image of its own, `NAME@REVISION`.
    let mut revisions: HashMap<String, Vec<ImageRevision>> = HashMap::new();
    let mut pinned: HashMap<(String, u64), String> = HashMap::new();
    let mut machines = Vec::with_capacity(records.len());
    for m in records.into_iter().filter(|m| m.adopted) {
        let mut image = m.image.clone();
        if let (Some(name), Some(pin)) = (&m.image, m.image_revision) {
            if current.get(name).is_some_and(|&now| now != pin) {
                let key = (name.clone(), pin);
                if !pinned.contains_key(&key) {
                    if !revisions.contains_key(name) {
                        revisions.insert(name.clone(), store.image_revisions(name)?);
                    }
                    let old = revisions[name]
                        .iter()
                        .find(|r| r.revision == pin)
                        .ok_or_else(|| {
                            StoreError::Invalid(format!("image {name:?} has no revision {pin}"))
                        })?;
                    let alias = format!("{name}@{pin}");
                    images.push(data_plane_image(ImageRecord {
                        name: alias.clone(),
                        ..old.image.clone()
                    }));
                    pinned.insert(key.clone(), alias);
                }
                image = pinned.get(&key).cloned();
            }
        }
        machines.push(inventory::Machine {
            // A pool's image for a machine without one of its own, now and
            // whenever one is adopted or relabelled into the pool.
            image: image.or_else(|| image_pool(&pools, &m).and_then(|pool| pool.image.clone())),
            mac: m.mac,
            hostname: m.hostname,
            ip: m.ip,
            cmdline_append: m.cmdline_append,
            script_append: String::new(),
            one_shot: m.one_shot,
            rearm: m.rearm,
            netboot: m.netboot,
            vars: BTreeMap::new(),
        });
    }
    Snapshot::from_records(generation, policy, poll, images, machines).map_err(StoreError::Invalid)
}

/// An image as the data plane boots it.
fn data_plane_image(image: ImageRecord) -> inventory::Image {
    inventory::Image {
        transport: parse_transport(&image.transport).unwrap_or_default(),
        name: image.name,
        kernel: image.kernel,
        initrds: image.initrds,
        cmdline: image.cmdline,
        description: image.description,
        template: inventory::DEFAULT_TEMPLATE.to_string(),
        secure_boot: image.secure_boot,
    }
}

/// `http`, `tftp` or `multicast`.
pub fn parse_transport(text: &str) -> Result<Transport, StoreError> {
    [Transport::Http, Transport::Tftp, Transport::Multicast]
        .into_iter()
        .find(|t| t.as_str() == text)
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "transport {text:?} is not one of http, tftp, multicast"
            ))
        })
}

/// Imports an inventory file's images, machines and BMCs into an empty
/// store; BMC passwords are sealed with `key` (without one, a file that
/// gives BMCs is refused: they would be lost).
pub fn import_snapshot(
    store: &dyn InventoryStore,
    snapshot: &Snapshot,
    actor: &str,
    key: Option<&crate::seal::SealKey>,
) -> StoreResult<(usize, usize)> {
    for image in snapshot.images.values() {
        store.add_image(
            &ImageRecord {
                name: image.name.clone(),
                kernel: image.kernel.clone(),
                initrds: image.initrds.clone(),
                cmdline: image.cmdline.clone(),
                transport: image.transport.as_str().into(),
                architecture: String::new(),
                description: image.description.clone(),
                files: Vec::new(),
                created_ms: 0,
                checkin_deadline_seconds: 0,
                secure_boot: image.secure_boot,
                revision: 1,
            },
            actor,
        )?;
    }
    let mut machines = 0;
    for machine in snapshot.machines.values() {
        store.put_machine(
            machine.mac,
            &MachinePatch {
                image: Some(machine.image.clone()),
                image_revision: None,
                hostname: Some(machine.hostname.clone()),
                ip: Some(machine.ip),
                labels: None,
                one_shot: Some(machine.one_shot),
                rearm: false,
                netboot: Some(machine.netboot),
                cmdline_append: Some(machine.cmdline_append.clone()),
                notes: None,
            },
            actor,
        )?;
        machines += 1;
    }
    store.set_unknown_policy(snapshot.unknown_policy, snapshot.poll_seconds, actor)?;
    let mut bmcs: Vec<_> = snapshot.bmcs.iter().collect();
    bmcs.sort_by_key(|(mac, _)| **mac);
    for (mac, bmc) in bmcs {
        let (Some(key), Some(password)) = (key, &bmc.password) else {
            return Err(StoreError::Invalid(format!(
                "machine {mac}: its BMC cannot be imported without the key file ([power] key_file) to seal its password"
            )));
        };
        let record = BmcRecord {
            mac: *mac,
            target: bmc.target.clone(),
            sealed_secret: key.seal(&bmc_password_aad(*mac), password),
            sealed_kg: bmc
                .kg_key
                .as_ref()
                .map(|kg| key.seal(&bmc_kg_aad(*mac), kg)),
            updated_ms: 0,
        };
        store.set_bmc(*mac, Some(&record), actor)?;
    }
    Ok((snapshot.images.len(), machines))
}
