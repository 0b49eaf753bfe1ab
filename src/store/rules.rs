//! What both store backends decide alike, apart from their SQL: the words
//! of a refusal, a change's audit summary, how a machine's facts merge, the
//! unknown-machine settings, and which machines a pool assignment reaches.
//! One copy here keeps SQLite and PostgreSQL answering the same.

use std::collections::BTreeMap;

use super::{
    validate_image, ImageEdit, ImageRecord, ImageRevision, MachinePatch, MachineRecord, PoolRecord,
    StoreError, StoreResult, TokenRecord,
};
use crate::inventory::UnknownPolicy;
use crate::proto::Mac;

pub(super) fn unknown_image(image: &str) -> StoreError {
    StoreError::Invalid(format!(
        "no image named {image:?}; register it first (POST /api/v1/images)"
    ))
}

pub(super) fn image_taken(name: &str) -> StoreError {
    StoreError::Conflict(format!(
        "an image named {name:?} exists; remove it first or pick another name"
    ))
}

pub(super) fn image_in_use(name: &str, machines: &[String]) -> StoreError {
    StoreError::Conflict(format!(
        "image {name:?} is assigned to {}; assign those machines another image first",
        machines.join(", ")
    ))
}

pub(super) fn image_of_pools(name: &str, pools: &[String]) -> StoreError {
    StoreError::Conflict(format!(
        "image {name:?} is the image of pool(s) {}; give them another image (or none) first",
        pools.join(", ")
    ))
}

pub(super) fn no_image(name: &str) -> StoreError {
    StoreError::NotFound(format!("no image named {name:?}"))
}

/// A machine may be pinned only to a revision its own image has had
/// (`current`: that image's current revision).
pub(super) fn check_pin(image: Option<&str>, pin: u64, current: Option<u64>) -> StoreResult<()> {
    match (image, current) {
        (None, _) => Err(StoreError::Invalid(format!(
            "a machine is pinned to a revision of its own image: assign it an image to pin revision {pin}"
        ))),
        (Some(_), Some(current)) if (1..=current).contains(&pin) => Ok(()),
        (Some(image), current) => Err(StoreError::Invalid(format!(
            "image {image:?} has no revision {pin} (its revisions are 1 to {}; GET /api/v1/images/{image}/revisions)",
            current.unwrap_or(0)
        ))),
    }
}

/// An image's first revision: as it was registered.
pub(super) fn first_revision(image: ImageRecord, actor: &str) -> ImageRevision {
    ImageRevision {
        revision: 1,
        changes: "registered".into(),
        actor: actor.into(),
        at_ms: image.created_ms,
        image: ImageRecord {
            revision: 1,
            ..image
        },
    }
}

/// `before` edited as `edit` says, checked, and its new revision; `None`
/// when the edit changes nothing. The first revision recorded for an
/// image registered before revisions were kept is its content now.
pub(super) fn edited(
    before: &ImageRecord,
    edit: &ImageEdit,
    note: &str,
    actor: &str,
) -> StoreResult<Option<(ImageRecord, ImageRevision)>> {
    let mut image = before.clone();
    let changes = edit.apply_to(&mut image);
    if changes.is_empty() {
        return Ok(None);
    }
    validate_image(&image)?;
    image.revision = before.revision + 1;
    let changes = changes.join(", ");
    let revision = ImageRevision {
        revision: image.revision,
        image: image.clone(),
        changes: if note.is_empty() {
            changes
        } else {
            format!("{note}: {changes}")
        },
        actor: actor.into(),
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    Ok(Some((image, revision)))
}

/// The audit log's line for a new revision.
pub(super) fn revision_line(revision: &ImageRevision) -> String {
    format!("revision {}: {}", revision.revision, revision.changes)
}

/// The stored revisions, newest first, with the current one first even
/// when it was never recorded (an image registered before revisions were
/// kept and never edited since).
pub(super) fn with_current(
    current: ImageRecord,
    mut stored: Vec<ImageRevision>,
) -> Vec<ImageRevision> {
    if stored
        .first()
        .is_none_or(|newest| newest.revision < current.revision)
    {
        stored.insert(0, first_revision(current, ""));
    }
    stored
}

pub(super) fn no_pool(name: &str) -> StoreError {
    StoreError::NotFound(format!("no pool named {name:?}"))
}

pub(super) fn no_machine(mac: Mac) -> StoreError {
    StoreError::NotFound(format!("no machine {mac}"))
}

pub(super) fn no_user(name: &str) -> StoreError {
    StoreError::NotFound(format!("no user {name:?}"))
}

pub(super) fn no_token(id: i64) -> StoreError {
    StoreError::NotFound(format!("no token with id {id}"))
}

pub(super) fn address_taken(ip: std::net::Ipv4Addr, holder: &str) -> StoreError {
    StoreError::Conflict(format!("{ip} is already reserved for {holder}"))
}

/// The audit line of a patch: what `changes` did to a machine, which was
/// `created` by it or existed.
pub(super) fn patch_summary(created: bool, changes: &[String]) -> String {
    if created {
        format!("created; {}", changes.join("; "))
    } else if changes.is_empty() {
        "no change".to_string()
    } else {
        changes.join("; ")
    }
}

/// Adds the facts a machine's iPXE sent (empty values ignored, keys cut at
/// 32 characters and values at 200); returns whether any changed.
pub(super) fn merge_facts(machine: &mut MachineRecord, facts: &BTreeMap<String, String>) -> bool {
    let mut changed = false;
    for (key, value) in facts {
        if !value.is_empty() {
            let key: String = key.chars().take(32).collect();
            let value: String = value.chars().take(200).collect();
            changed |= machine.facts.get(&key) != Some(&value);
            machine.facts.insert(key, value);
        }
    }
    changed
}

/// The unknown-machine policy from its two stored settings (the menu
/// every 30 s when unset).
pub(super) fn unknown_policy_from(
    policy: Option<&str>,
    poll: Option<&str>,
) -> (UnknownPolicy, u32) {
    let policy = [UnknownPolicy::Local, UnknownPolicy::Wait]
        .into_iter()
        .find(|p| Some(p.as_str()) == policy)
        .unwrap_or(UnknownPolicy::Menu);
    (policy, poll.and_then(|v| v.parse().ok()).unwrap_or(30))
}

/// The settings rows that store `policy` and `poll_seconds`, checked.
pub(super) fn unknown_policy_settings(
    policy: UnknownPolicy,
    poll_seconds: u32,
) -> StoreResult<[(&'static str, String); 2]> {
    if !(1..=3600).contains(&poll_seconds) {
        return Err(StoreError::Invalid(
            "poll_seconds must be between 1 and 3600".into(),
        ));
    }
    Ok([
        ("unknown.policy", policy.as_str().to_string()),
        ("unknown.poll_seconds", poll_seconds.to_string()),
    ])
}

/// The audit line of a pool written.
pub(super) fn pool_summary(pool: &PoolRecord) -> String {
    format!(
        "{} listed, selector [{}], image {}",
        pool.members.len(),
        pool.selector.join(", "),
        pool.image.as_deref().unwrap_or("none")
    )
}

/// The machines pool `name` holds now, and the patch that gives them
/// `image`.
pub(super) fn pool_assignment(
    pools: Vec<PoolRecord>,
    machines: &[MachineRecord],
    name: &str,
    image: Option<&str>,
) -> StoreResult<(Vec<Mac>, MachinePatch)> {
    let pool = pools
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(|| no_pool(name))?;
    let members = machines
        .iter()
        .filter(|m| pool.contains(m))
        .map(|m| m.mac)
        .collect();
    let patch = MachinePatch {
        image: Some(image.map(str::to_string)),
        ..MachinePatch::default()
    };
    Ok((members, patch))
}

/// The audit line of a pool assignment.
pub(super) fn pool_assignment_summary(image: Option<&str>, machines: usize) -> String {
    format!("image {} to {machines} machines", image.unwrap_or("none"))
}

/// Whether a token's use at `now_ms` is worth recording: coarse (once a
/// minute), so that a busy script does not write on every call.
pub(super) fn token_use_due(token: &TokenRecord, now_ms: u64) -> bool {
    token
        .last_used_ms
        .is_none_or(|t| now_ms.saturating_sub(t) > 60_000)
}

/// BMC rows (MAC, JSON record) as records; a row that does not parse, or
/// whose record names another MAC, is logged and left out rather than
/// failing every listing.
pub(super) fn parse_bmc_rows(rows: Vec<(String, String)>) -> Vec<super::BmcRecord> {
    rows.into_iter()
        .filter_map(|(mac, record)| {
            match serde_json::from_str::<super::BmcRecord>(&record) {
                Ok(bmc) if bmc.mac.to_string() == mac => Some(bmc),
                Ok(_) => {
                    tracing::warn!(%mac, "BMC row names another machine; set this machine's BMC again");
                    None
                }
                Err(error) => {
                    tracing::warn!(%mac, %error, "BMC row does not parse; set this machine's BMC again");
                    None
                }
            }
        })
        .collect()
}

/// How long after a check-in the data plane may still report the same
/// boot's last file (its completion is recorded a moment after the client
/// has the bytes, and the OS may check in first).
pub(super) const CHECKIN_SLACK_MS: u64 = 10_000;

/// Whether an event of `phase` at `at_ms` becomes a machine's last phase
/// over the one it has (`current`, when): a newer event does, except the
/// kernel or initrd fetch of the boot that just checked in (the SQL of
/// both stores says the same).
pub(super) fn supersedes(phase: &str, at_ms: u64, current: Option<(&str, u64)>) -> bool {
    match current {
        None => true,
        Some((current, since)) => {
            at_ms >= since
                && !(current == "checkin"
                    && matches!(phase, "kernel" | "initrd")
                    && at_ms < since + CHECKIN_SLACK_MS)
        }
    }
}
