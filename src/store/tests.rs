//! The store's behaviour, checked on every backend: the embedded SQLite
//! file always, and PostgreSQL on the cluster `tests/postgres.sh` starts
//! (`BOOTFLEET_TEST_POSTGRES` names it; tests/run-all.sh sets it). Without
//! that cluster the PostgreSQL half says loudly that it did not run, and in
//! CI it fails.

use std::collections::BTreeMap;

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::*;

/// A store under test, and how to open the same database again.
pub(super) struct Backend {
    pub name: &'static str,
    pub store: Box<dyn InventoryStore>,
    reopen: Box<dyn Fn() -> Box<dyn InventoryStore>>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A second store on the same database, as a restarted server (or
    /// another server) opens it.
    pub fn reopen(&self) -> Box<dyn InventoryStore> {
        (self.reopen)()
    }
}

fn sqlite() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inventory.db");
    let store = SqliteStore::open(&path).unwrap();
    Backend {
        name: "sqlite",
        store: Box::new(store),
        reopen: Box::new(move || Box::new(SqliteStore::open(&path).unwrap())),
        _dir: Some(dir),
    }
}

/// A new, empty database on the test cluster, as a URL; `None` when no
/// cluster was started (said loudly, and a failure in CI).
pub(crate) fn fresh_postgres_database() -> Option<String> {
    let Some(admin) = std::env::var("BOOTFLEET_TEST_POSTGRES").ok() else {
        let message = "BOOTFLEET_TEST_POSTGRES is not set, so the PostgreSQL store is not tested; \
                       tests/run-all.sh starts a cluster (tests/postgres.sh) and sets it";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("\n*** SKIPPED: {message} ***\n");
        if let Some(path) = std::env::var_os("BOOTFLEET_SKIPPED") {
            use std::io::Write;
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let test = std::thread::current()
                    .name()
                    .unwrap_or("a store test")
                    .to_string();
                let _ = writeln!(file, "{test}: {message}");
            }
        }
        return None;
    };
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "bootfleet_unit_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut client = ::postgres::Client::connect(&admin, ::postgres::NoTls)
        .unwrap_or_else(|e| panic!("the test cluster at {admin} does not answer: {e}"));
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("a URL that names its database");
    Some(format!("{base}/{name}"))
}

fn postgres() -> Option<Backend> {
    let url = fresh_postgres_database()?;
    let store = PostgresStore::connect(&url).unwrap();
    Some(Backend {
        name: "postgres",
        store: Box::new(store),
        reopen: Box::new(move || Box::new(PostgresStore::connect(&url).unwrap())),
        _dir: None,
    })
}

pub(super) fn image(name: &str) -> ImageRecord {
    ImageRecord {
        checkin_deadline_seconds: 0,
        secure_boot: false,
        name: name.into(),
        kernel: format!("{name}/vmlinuz"),
        initrds: vec![format!("{name}/initrd")],
        cmdline: "console=ttyS0".into(),
        transport: "http".into(),
        architecture: "x86_64".into(),
        description: String::new(),
        files: Vec::new(),
        created_ms: 0,
        revision: 1,
    }
}

/// One `#[test]` per body, run on each backend in turn.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                for backend in std::iter::once(sqlite()).chain(postgres()) {
                    eprintln!("backend: {}", backend.name);
                    bodies::$name(&backend);
                }
            }
        )*
    };
}

on_every_backend!(
    machines_are_adopted_assigned_and_audited,
    pools_assign_by_list_and_by_label,
    the_machines_in_memory_match_the_database_after_every_change,
    reserved_addresses_and_fields_are_checked,
    discovered_machines_are_capped_least_recently_seen_first,
    users_sessions_and_tokens,
    schema_is_migrated_once_and_reopens,
    bmcs_are_stored_sealed_audited_and_forgotten_with_their_machine,
    a_late_event_never_moves_a_machine_back_and_a_check_in_stays,
    each_servers_files_are_its_last_report,
    used_one_shots_keep_the_latest_generation,
    a_pools_image_reaches_every_machine_it_catches_now_and_later,
    images_are_edited_into_revisions_rolled_back_and_pinned,
);

/// Every kind of row, in `store`.
fn fill(store: &dyn InventoryStore) {
    use crate::boot::events::{BootEvent, Phase};
    store.add_image(&image("a"), "t").unwrap();
    store.add_image(&image("b"), "t").unwrap();
    let (one, two, seen) = (
        Mac([2, 0, 0, 0, 0, 1]),
        Mac([2, 0, 0, 0, 0, 2]),
        Mac([2, 0, 0, 0, 0, 3]),
    );
    let patch = MachinePatch {
        image: Some(Some("a".into())),
        hostname: Some(Some("n1".into())),
        ip: Some(Some("10.0.0.7".parse().unwrap())),
        labels: Some(vec!["rack=r1".into()]),
        one_shot: Some(true),
        ..Default::default()
    };
    store.put_machine(one, &patch, "t").unwrap();
    store
        .put_machine(two, &MachinePatch::default(), "t")
        .unwrap();
    let facts = BTreeMap::from([("serial".to_string(), "S-3".to_string())]);
    let event = BootEvent {
        at_ms: 50,
        mac: Some(one),
        client: "10.0.0.7".parse().unwrap(),
        phase: Phase::Kernel,
        transport: "http",
        detail: "a/vmlinuz".into(),
        bytes: 9,
        duration_ms: 2,
        status: 200,
    };
    store
        .note_events(&[event], &[(seen, facts, 40)], "boot-a")
        .unwrap();
    store
        .put_pool(
            &PoolRecord {
                name: "p".into(),
                members: vec![two],
                selector: vec!["rack=r1".into()],
                image: None,
            },
            "t",
        )
        .unwrap();
    store.assign_pool("p", Some("b"), "t").unwrap();
    store.add_user("alice", "hash", Scope::Admin, "t").unwrap();
    let revoked = store
        .add_token("old", "alice", Scope::Read, "h1", "t")
        .unwrap();
    store
        .add_token("ci", "alice", Scope::Assign, "h2", "t")
        .unwrap();
    store.revoke_token(revoked, "t").unwrap();
    store
        .set_unknown_policy(UnknownPolicy::Local, 9, "t")
        .unwrap();
    store.set_bmc(one, Some(&bmc(one)), "t").unwrap();
}

/// A Redfish BMC for `mac`, its password sealed with a throwaway key.
fn bmc(mac: Mac) -> BmcRecord {
    let url = crate::inventory::bmc::parse_bmc_url(
        "redfish://admin:pw@10.9.0.1:8443/redfish/v1/Systems/1?verify=false",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = crate::seal::SealKey::load_or_create(&dir.path().join("k")).unwrap();
    BmcRecord {
        mac,
        target: url.target,
        sealed_secret: key.seal(&mac.to_string(), "pw"),
        sealed_kg: None,
        updated_ms: 7,
    }
}

#[test]
fn an_inventory_files_bmcs_are_imported_sealed_and_never_without_the_key() {
    let text = "[machines.\"52:54:00:00:00:01\"]\nbmc = \"ipmi://admin:s3cret@10.0.9.1\"\n";
    let mut snapshot = crate::inventory::Snapshot::parse(
        text,
        std::path::Path::new("inventory.toml"),
        std::path::Path::new("/nonexistent"),
        1,
    )
    .unwrap();
    let mac = Mac::parse("52:54:00:00:00:01").unwrap();
    snapshot.bmcs.get_mut(&mac).unwrap().kg_key = Some("rack-kg".into());
    let without = sqlite();
    let error = import_snapshot(without.store.as_ref(), &snapshot, "import", None).unwrap_err();
    assert!(error.to_string().contains("key file"), "{error}");
    let backend = sqlite();
    let dir = tempfile::tempdir().unwrap();
    let key = crate::seal::SealKey::load_or_create(&dir.path().join("k")).unwrap();
    import_snapshot(backend.store.as_ref(), &snapshot, "import", Some(&key)).unwrap();
    let bmcs = backend.store.bmcs().unwrap();
    assert_eq!(bmcs.len(), 1);
    assert_eq!(bmcs[0].target.to_string(), "ipmi://admin@10.0.9.1:623");
    assert!(!bmcs[0].sealed_secret.contains("s3cret"));
    assert_eq!(
        key.open(&super::bmc_password_aad(mac), &bmcs[0].sealed_secret)
            .unwrap(),
        "s3cret"
    );
    let sealed_kg = bmcs[0]
        .sealed_kg
        .as_deref()
        .expect("the K_g key is imported");
    assert!(!sealed_kg.contains("rack-kg"));
    assert_eq!(
        key.open(&super::bmc_kg_aad(mac), sealed_kg).unwrap(),
        "rack-kg"
    );
    // Each secret opens only in its own place.
    assert!(key
        .open(&super::bmc_kg_aad(mac), &bmcs[0].sealed_secret)
        .is_err());
}

#[test]
fn an_inventory_copies_from_sqlite_to_postgres_and_back_row_for_row() {
    let Some(postgres) = postgres() else {
        return;
    };
    let sqlite = sqlite();
    fill(sqlite.store.as_ref());
    let copied = copy(sqlite.store.as_ref(), postgres.store.as_ref()).unwrap();
    assert_eq!(copied, sqlite.store.export().unwrap());
    assert_eq!(
        (
            copied.machines.len(),
            copied.tokens.len(),
            copied.events.len(),
            copied.settings.len(),
            copied.bmcs.len()
        ),
        (3, 2, 1, 2, 1)
    );
    assert!(copied.tokens[0].revoked && !copied.tokens[1].revoked);
    assert_eq!(copied.machines[0].phase.as_deref(), Some("kernel"));
    assert_eq!(
        copied.events[0].server, "boot-a",
        "the serving server is kept"
    );
    // The copy is what the server would read: the same snapshot.
    let (from, to) = (
        snapshot_from_store(sqlite.store.as_ref(), 1).unwrap(),
        snapshot_from_store(postgres.store.as_ref(), 1).unwrap(),
    );
    let listed = |snapshot: &crate::inventory::Snapshot| -> BTreeMap<String, String> {
        snapshot
            .machines
            .iter()
            .map(|(mac, machine)| (mac.to_string(), format!("{machine:?}")))
            .collect()
    };
    assert_eq!(listed(&from), listed(&to));
    // Never into a store that holds an inventory already.
    let error = copy(sqlite.store.as_ref(), postgres.store.as_ref()).unwrap_err();
    assert!(matches!(error, StoreError::Conflict(_)), "{error}");
    // New rows are numbered after the copied ones.
    let id = postgres
        .store
        .add_token("new", "alice", Scope::Read, "h3", "t")
        .unwrap();
    assert!(id > copied.tokens[1].record.id);
    let back = super::tests::sqlite();
    let again = copy(postgres.store.as_ref(), back.store.as_ref()).unwrap();
    assert_eq!(again.tokens.len(), 3);
    assert_eq!(again.machines, copied.machines);
}

#[test]
fn other_writers_changes_are_announced_and_a_stores_own_are_not() {
    let Some(postgres) = postgres() else {
        return;
    };
    assert!(
        sqlite().store.change_listener().unwrap().is_none(),
        "one writer"
    );
    let this = postgres.store.as_ref();
    let other = postgres.reopen();
    let mut listener = this
        .change_listener()
        .unwrap()
        .expect("PostgreSQL announces changes");
    let wait = std::time::Duration::from_millis(300);
    assert!(!listener.wait(wait).unwrap(), "nothing changed yet");
    this.add_image(&image("own"), "t").unwrap();
    assert!(!listener.wait(wait).unwrap(), "its own change is not news");
    other.add_image(&image("theirs"), "t").unwrap();
    assert!(listener.wait(wait).unwrap(), "another writer's change is");
    // Boot events and sightings change no snapshot: not announced.
    other
        .note_seen(Mac([2, 0, 0, 0, 0, 7]), &BTreeMap::new(), 1)
        .unwrap();
    assert!(!listener.wait(wait).unwrap());
}

mod bodies {
    use super::*;
    use crate::boot::events::BootEvent;

    pub(super) fn machines_are_adopted_assigned_and_audited(backend: &Backend) {
        let store = &*backend.store;
        let mac = Mac::parse("52:54:00:00:00:01").unwrap();
        assert!(store
            .note_seen(mac, &BTreeMap::from([("serial".into(), "S1".into())]), 5)
            .unwrap());
        let seen = store.machine(mac).unwrap().unwrap();
        assert!(!seen.adopted);
        assert_eq!(seen.facts["serial"], "S1");
        // A discovered machine is not in the data plane's snapshot.
        assert!(snapshot_from_store(store, 1).unwrap().machines.is_empty());

        let patch = MachinePatch {
            image: Some(Some("debian".into())),
            ..Default::default()
        };
        let error = store.put_machine(mac, &patch, "alice").unwrap_err();
        assert!(error.to_string().contains("register it first"), "{error}");
        store.add_image(&image("debian"), "alice").unwrap();
        let machine = store.put_machine(mac, &patch, "alice").unwrap();
        assert!(machine.adopted);
        assert_eq!(machine.facts["serial"], "S1", "facts survive adoption");
        let snapshot = snapshot_from_store(store, 2).unwrap();
        assert_eq!(snapshot.assigned_image(mac).unwrap().1.name, "debian");

        let audit = store.audit(10).unwrap();
        assert_eq!(audit[0].actor, "alice");
        assert_eq!(audit[0].action, "machine.put");
        assert!(
            audit[0].detail.contains("adopted; image none -> debian"),
            "{:?}",
            audit[0]
        );
        let error = store.remove_image("debian", "alice").unwrap_err();
        assert!(matches!(error, StoreError::Conflict(_)), "{error}");
    }

    pub(super) fn pools_assign_by_list_and_by_label(backend: &Backend) {
        let store = &*backend.store;
        store.add_image(&image("a"), "t").unwrap();
        let macs: Vec<Mac> = (1..=4).map(|i| Mac([0x52, 0x54, 0, 0, 0, i])).collect();
        for (i, &mac) in macs.iter().enumerate() {
            let labels = vec![format!("rack={}", if i < 2 { "r1" } else { "r2" })];
            store
                .put_machine(
                    mac,
                    &MachinePatch {
                        labels: Some(labels),
                        ..Default::default()
                    },
                    "t",
                )
                .unwrap();
        }
        store
            .put_pool(
                &PoolRecord {
                    name: "p".into(),
                    members: vec![macs[3]],
                    selector: vec!["rack=r1".into()],
                    image: None,
                },
                "t",
            )
            .unwrap();
        assert_eq!(store.assign_pool("p", Some("a"), "t").unwrap(), 3);
        let images: Vec<Option<String>> = store
            .machines()
            .unwrap()
            .into_iter()
            .map(|m| m.image)
            .collect();
        assert_eq!(
            images,
            [Some("a".into()), Some("a".into()), None, Some("a".into())]
        );
    }

    pub(super) fn the_machines_in_memory_match_the_database_after_every_change(backend: &Backend) {
        let store = &*backend.store;
        store.add_image(&image("a"), "t").unwrap();
        let (one, two, three) = (
            Mac([2, 0, 0, 0, 0, 1]),
            Mac([2, 0, 0, 0, 0, 2]),
            Mac([2, 0, 0, 0, 0, 3]),
        );
        assert!(
            store.machines().unwrap().is_empty(),
            "loaded before the changes"
        );
        let facts = BTreeMap::from([("serial".to_string(), "S".to_string())]);
        store.note_seen(one, &facts, 10).unwrap();
        store
            .put_machines(
                &[two, three],
                &MachinePatch {
                    image: Some(Some("a".into())),
                    ..Default::default()
                },
                "t",
            )
            .unwrap();
        let event = BootEvent {
            at_ms: 20,
            mac: Some(two),
            client: "10.0.0.2".parse().unwrap(),
            phase: crate::boot::events::Phase::Kernel,
            transport: "http",
            detail: "a/vmlinuz".into(),
            bytes: 5,
            duration_ms: 1,
            status: 200,
        };
        store
            .note_events(&[event], &[(three, facts.clone(), 30)], "boot-a")
            .unwrap();
        store.forget_machine(one, "t").unwrap();
        store
            .put_pool(
                &PoolRecord {
                    name: "p".into(),
                    members: vec![three],
                    selector: vec![],
                    image: None,
                },
                "t",
            )
            .unwrap();
        store.assign_pool("p", None, "t").unwrap();
        let fresh = backend.reopen();
        assert_eq!(store.machines().unwrap(), fresh.machines().unwrap());
        let machines = store.machines().unwrap();
        assert_eq!(machines.len(), 2);
        assert_eq!(machines[0].phase.as_deref(), Some("kernel"));
        assert_eq!(machines[1].facts["serial"], "S");
        assert_eq!(machines[1].image, None);
    }

    pub(super) fn reserved_addresses_and_fields_are_checked(backend: &Backend) {
        let store = &*backend.store;
        let ip = Some(Some("10.0.0.5".parse().unwrap()));
        store
            .put_machine(
                Mac([2; 6]),
                &MachinePatch {
                    ip,
                    ..Default::default()
                },
                "t",
            )
            .unwrap();
        let error = store
            .put_machine(
                Mac([3; 6]),
                &MachinePatch {
                    ip,
                    ..Default::default()
                },
                "t",
            )
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("already reserved for 02:02:02:02:02:02"),
            "{error}"
        );
        for bad in [vec!["norack".to_string()], vec!["a b=c".to_string()]] {
            let patch = MachinePatch {
                labels: Some(bad),
                ..Default::default()
            };
            assert!(store.put_machine(Mac([4; 6]), &patch, "t").is_err());
        }
        let patch = MachinePatch {
            hostname: Some(Some("../x".into())),
            ..Default::default()
        };
        assert!(store.put_machine(Mac([4; 6]), &patch, "t").is_err());
    }

    pub(super) fn discovered_machines_are_capped_least_recently_seen_first(backend: &Backend) {
        let store = &*backend.store;
        for n in 0..10u8 {
            store
                .note_seen(
                    Mac([2, 0, 0, 0, 0, n]),
                    &BTreeMap::new(),
                    100 + u64::from(n),
                )
                .unwrap();
        }
        store
            .put_machine(Mac([2, 0, 0, 0, 0, 0]), &MachinePatch::default(), "t")
            .unwrap();
        assert_eq!(store.prune_discovered(4).unwrap(), 5);
        let left: Vec<Mac> = store.machines().unwrap().iter().map(|m| m.mac).collect();
        assert_eq!(
            left.len(),
            5,
            "the adopted machine and the 4 seen last: {left:?}"
        );
        assert!(
            left.contains(&Mac([2, 0, 0, 0, 0, 0])),
            "adopted machines stay"
        );
        assert!(left.contains(&Mac([2, 0, 0, 0, 0, 9])));
        assert!(!left.contains(&Mac([2, 0, 0, 0, 0, 5])));
        assert_eq!(store.prune_discovered(4).unwrap(), 0);
    }

    pub(super) fn users_sessions_and_tokens(backend: &Backend) {
        let store = &*backend.store;
        store
            .add_user("alice", "hash-1", Scope::Admin, "setup")
            .unwrap();
        assert!(store
            .add_user("bad name", "h", Scope::Read, "setup")
            .is_err());
        let session = SessionRecord {
            user: "alice".into(),
            scope: Scope::Admin,
            csrf: "c".into(),
            expires_ms: 10_000,
        };
        store.create_session("s1", &session).unwrap();
        assert_eq!(store.session("s1", 5_000).unwrap(), Some(session.clone()));
        assert_eq!(store.session("s1", 20_000).unwrap(), None, "expired");
        // A new password ends the user's sessions.
        store
            .add_user("alice", "hash-2", Scope::Admin, "setup")
            .unwrap();
        assert_eq!(store.session("s1", 5_000).unwrap(), None);
        assert_eq!(
            store.user("alice").unwrap().unwrap().password_hash,
            "hash-2"
        );
        assert!(
            store.users().unwrap()[0].password_hash.is_empty(),
            "never listed"
        );

        let id = store
            .add_token("ci", "alice", Scope::Assign, "secret-hash", "alice")
            .unwrap();
        let second = store
            .add_token("other", "alice", Scope::Read, "secret-2", "alice")
            .unwrap();
        assert!(second > id, "ids grow");
        let token = store.token("secret-hash", 1_000_000).unwrap().unwrap();
        assert_eq!((token.id, token.scope), (id, Scope::Assign));
        assert_eq!(
            store.tokens().unwrap()[0].last_used_ms,
            Some(1_000_000),
            "first use recorded"
        );
        store.revoke_token(id, "alice").unwrap();
        assert!(store.token("secret-hash", 1_000_001).unwrap().is_none());
        assert!(matches!(
            store.revoke_token(id, "alice"),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.tokens().unwrap().len(), 1);

        store
            .set_unknown_policy(UnknownPolicy::Wait, 7, "alice")
            .unwrap();
        assert_eq!(store.unknown_policy().unwrap(), (UnknownPolicy::Wait, 7));
        assert!(store
            .set_unknown_policy(UnknownPolicy::Wait, 0, "alice")
            .is_err());
        let actions: Vec<String> = store
            .audit(3)
            .unwrap()
            .into_iter()
            .map(|a| a.action)
            .collect();
        assert_eq!(actions, ["settings.unknown", "token.revoke", "token.add"]);

        // Removing a user ends its sessions and revokes its tokens, and
        // only its own.
        store
            .add_user("bob", "hash-3", Scope::Read, "setup")
            .unwrap();
        store.create_session("s2", &session).unwrap();
        store
            .add_token("bobs", "bob", Scope::Read, "secret-3", "bob")
            .unwrap();
        assert_eq!(store.remove_user("alice", "setup").unwrap(), 1);
        assert!(store.user("alice").unwrap().is_none());
        assert_eq!(store.session("s2", 5_000).unwrap(), None);
        assert!(store.token("secret-2", 1_000_002).unwrap().is_none());
        assert!(store.token("secret-3", 1_000_002).unwrap().is_some());
        assert!(matches!(
            store.remove_user("alice", "setup"),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.audit(1).unwrap()[0].action, "user.remove");
    }

    pub(super) fn schema_is_migrated_once_and_reopens(backend: &Backend) {
        backend.store.add_image(&image("x"), "t").unwrap();
        let again = backend.reopen();
        assert_eq!(again.images().unwrap().len(), 1);
        assert_eq!(again.image("x").unwrap().unwrap().kernel, "x/vmlinuz");
    }

    pub(super) fn bmcs_are_stored_sealed_audited_and_forgotten_with_their_machine(
        backend: &Backend,
    ) {
        let store = &*backend.store;
        let mac = Mac([2, 0, 0, 0, 0, 9]);
        let record = bmc(mac);
        let error = store.set_bmc(mac, Some(&record), "alice").unwrap_err();
        assert!(matches!(error, StoreError::NotFound(_)), "{error}");
        store
            .put_machine(mac, &MachinePatch::default(), "alice")
            .unwrap();
        let mut plain = record.clone();
        plain.sealed_secret = "pw".into();
        let error = store.set_bmc(mac, Some(&plain), "alice").unwrap_err();
        assert!(error.to_string().contains("sealed"), "{error}");
        let mut hostile = record.clone();
        hostile.target.user = "root\nchain http://evil/".into();
        let error = store.set_bmc(mac, Some(&hostile), "alice").unwrap_err();
        assert!(error.to_string().contains("control character"), "{error}");
        let mut elsewhere = record.clone();
        elsewhere.mac = Mac([2, 0, 0, 0, 0, 8]);
        assert!(store.set_bmc(mac, Some(&elsewhere), "alice").is_err());
        let mut redfish_kg = record.clone();
        redfish_kg.sealed_kg = Some(record.sealed_secret.clone());
        let error = store.set_bmc(mac, Some(&redfish_kg), "alice").unwrap_err();
        assert!(error.to_string().contains("IPMI BMCs only"), "{error}");
        let mut ipmi = redfish_kg.clone();
        ipmi.target = crate::inventory::bmc::parse_bmc_url("ipmi://admin@10.9.0.2")
            .unwrap()
            .target;
        ipmi.sealed_kg = Some("kg".into());
        let error = store.set_bmc(mac, Some(&ipmi), "alice").unwrap_err();
        assert!(
            error.to_string().contains("K_g key must be sealed"),
            "{error}"
        );
        ipmi.sealed_kg = Some(record.sealed_secret.clone());
        store.set_bmc(mac, Some(&ipmi), "alice").unwrap();
        assert_eq!(backend.reopen().bmcs().unwrap(), vec![ipmi]);

        store.set_bmc(mac, Some(&record), "alice").unwrap();
        assert_eq!(backend.reopen().bmcs().unwrap(), vec![record.clone()]);
        let audit = store.audit(1).unwrap();
        assert_eq!(audit[0].action, "machine.bmc");
        assert_eq!(
            audit[0].detail,
            "bmc redfish://admin@10.9.0.1:8443/redfish/v1/Systems/1?verify=false"
        );
        assert!(!audit[0].detail.contains("pw"));

        store.set_bmc(mac, None, "alice").unwrap();
        assert!(store.bmcs().unwrap().is_empty());
        store.set_bmc(mac, Some(&record), "alice").unwrap();
        store.forget_machine(mac, "alice").unwrap();
        assert!(
            store.bmcs().unwrap().is_empty(),
            "forgotten with the machine"
        );
    }

    pub(super) fn a_late_event_never_moves_a_machine_back_and_a_check_in_stays(backend: &Backend) {
        use crate::boot::events::Phase;
        let store = &*backend.store;
        let mac = Mac([2, 0, 0, 0, 0, 7]);
        store
            .put_machine(mac, &MachinePatch::default(), "t")
            .unwrap();
        let event = |phase: Phase, at_ms: u64| BootEvent {
            at_ms,
            mac: Some(mac),
            client: "10.0.0.7".parse().unwrap(),
            phase,
            transport: "http",
            detail: String::new(),
            bytes: 0,
            duration_ms: 0,
            status: 200,
        };
        let phase = |store: &dyn InventoryStore| {
            let m = store.machine(mac).unwrap().unwrap();
            (m.phase.unwrap_or_default(), m.phase_ms.unwrap_or_default())
        };
        // A power action dated when it was sent, stored after the DHCP
        // exchange it caused; then the OS checks in a moment before the
        // data plane records the initrd it had already received.
        store
            .note_events(&[event(Phase::Dhcp, 200)], &[], "a")
            .unwrap();
        store
            .note_events(&[event(Phase::Power, 100)], &[], "a")
            .unwrap();
        assert_eq!(phase(store), ("dhcp".into(), 200));
        store
            .note_events(
                &[event(Phase::Checkin, 1000), event(Phase::Initrd, 1003)],
                &[],
                "a",
            )
            .unwrap();
        assert_eq!(phase(store), ("checkin".into(), 1000));
        store
            .note_events(&[event(Phase::Kernel, 1004)], &[], "a")
            .unwrap();
        assert_eq!(phase(store), ("checkin".into(), 1000));
        assert_eq!(phase(&*backend.reopen()), ("checkin".into(), 1000));
        // The next boot moves it on.
        store
            .note_events(&[event(Phase::Dhcp, 60_000)], &[], "a")
            .unwrap();
        assert_eq!(phase(store), ("dhcp".into(), 60_000));
    }

    pub(super) fn each_servers_files_are_its_last_report(backend: &Backend) {
        let store = &*backend.store;
        assert_eq!(store.server_files().unwrap(), []);
        let held = |path: &str, sha: &str| HeldFile {
            path: path.into(),
            sha256: sha.into(),
            size: 7,
        };
        let report = |name: &str, files: Vec<HeldFile>, seen_ms: u64| ServerFiles {
            name: name.into(),
            http_url: format!("http://{name}"),
            files,
            seen_ms,
        };
        store
            .note_server_files(&report("b", vec![held("k", "1")], 10))
            .unwrap();
        store
            .note_server_files(&report("a", vec![held("k", "1"), held("i", "2")], 11))
            .unwrap();
        store
            .note_server_files(&report("b", vec![held("k", "3")], 12))
            .unwrap();
        assert_eq!(
            backend.reopen().server_files().unwrap(),
            [
                report("a", vec![held("k", "1"), held("i", "2")], 11),
                report("b", vec![held("k", "3")], 12),
            ]
        );
    }

    pub(super) fn used_one_shots_keep_the_latest_generation(backend: &Backend) {
        let store = &*backend.store;
        let (a, b) = (
            Mac::parse("52:54:00:00:0a:01").unwrap(),
            Mac::parse("52:54:00:00:0a:02").unwrap(),
        );
        assert_eq!(store.one_shots_used().unwrap(), []);
        store.note_one_shots_used(&[(a, 2), (b, 0)]).unwrap();
        store.note_one_shots_used(&[(a, 1)]).unwrap();
        let mut used = backend.reopen().one_shots_used().unwrap();
        used.sort();
        assert_eq!(used, [(a, 2), (b, 0)]);
    }

    pub(super) fn images_are_edited_into_revisions_rolled_back_and_pinned(backend: &Backend) {
        let store = &*backend.store;
        store.add_image(&image("deb"), "alice").unwrap();
        let (follows, pinned) = (
            Mac::parse("52:54:00:00:0b:01").unwrap(),
            Mac::parse("52:54:00:00:0b:02").unwrap(),
        );
        for mac in [follows, pinned] {
            let patch = MachinePatch {
                image: Some(Some("deb".into())),
                ..Default::default()
            };
            store.put_machine(mac, &patch, "t").unwrap();
        }
        let edit = ImageEdit {
            cmdline: Some("console=ttyS0 quiet".into()),
            initrds: Some(vec![]),
            ..Default::default()
        };
        let edited = store.edit_image("deb", &edit, "", "bob").unwrap();
        assert_eq!((edited.revision, edited.initrds.len()), (2, 0));
        // The same edit again changes nothing and makes no revision.
        assert_eq!(
            store.edit_image("deb", &edit, "", "bob").unwrap().revision,
            2
        );
        let bad = ImageEdit {
            cmdline: Some("quiet\nchain http://elsewhere/x".into()),
            ..Default::default()
        };
        assert!(matches!(
            store.edit_image("deb", &bad, "", "bob"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.edit_image("nope", &edit, "", "bob"),
            Err(StoreError::NotFound(_))
        ));
        let revisions = store.image_revisions("deb").unwrap();
        let summary: Vec<(u64, &str, &str)> = revisions
            .iter()
            .map(|r| (r.revision, r.changes.as_str(), r.actor.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    2,
                    "initrds [\"deb/initrd\"] -> [], cmdline \"console=ttyS0\" -> \"console=ttyS0 quiet\"",
                    "bob"
                ),
                (1, "registered", "alice"),
            ]
        );
        assert_eq!(revisions[1].image.cmdline, "console=ttyS0");
        assert_eq!(store.audit(1).unwrap()[0].action, "image.edit");

        // A pin names a revision the machine's own image has had.
        let pin = |revision: Option<u64>| MachinePatch {
            image_revision: Some(revision),
            ..Default::default()
        };
        assert!(matches!(
            store.put_machine(pinned, &pin(Some(3)), "t"),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            store.put_machine(pinned, &pin(Some(0)), "t"),
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(
            store
                .put_machine(pinned, &pin(Some(1)), "t")
                .unwrap()
                .image_revision,
            Some(1)
        );
        assert_eq!(
            backend
                .reopen()
                .machine(pinned)
                .unwrap()
                .unwrap()
                .image_revision,
            Some(1)
        );
        let snapshot = snapshot_from_store(store, 7).unwrap();
        let booted = |mac: Mac| {
            let name = snapshot.machines[&mac].image.clone().unwrap();
            (
                name.clone(),
                snapshot.images[&name].cmdline.clone(),
                snapshot.images[&name].initrds.len(),
            )
        };
        assert_eq!(
            booted(follows),
            ("deb".into(), "console=ttyS0 quiet".into(), 0)
        );
        assert_eq!(booted(pinned), ("deb@1".into(), "console=ttyS0".into(), 1));

        // A rollback is a new revision with the old content.
        let old = &revisions[1].image;
        let back = store
            .edit_image(
                "deb",
                &ImageEdit::restoring(old),
                "rollback to revision 1",
                "carol",
            )
            .unwrap();
        assert_eq!((back.revision, back.cmdline.as_str()), (3, "console=ttyS0"));
        let newest = &store.image_revisions("deb").unwrap()[0];
        assert!(
            newest.changes.starts_with("rollback to revision 1: "),
            "{}",
            newest.changes
        );
        // A new image ends the pin; without a pin the machine follows.
        let other = image("other");
        store.add_image(&other, "t").unwrap();
        let moved = MachinePatch {
            image: Some(Some("other".into())),
            ..Default::default()
        };
        assert_eq!(
            store
                .put_machine(pinned, &moved, "t")
                .unwrap()
                .image_revision,
            None
        );
        assert!(matches!(
            store.put_machine(
                follows,
                &MachinePatch {
                    image: Some(None),
                    image_revision: Some(Some(1)),
                    ..Default::default()
                },
                "t"
            ),
            Err(StoreError::Invalid(_))
        ));
        // Removing an image removes its history.
        store
            .put_machine(
                follows,
                &MachinePatch {
                    image: Some(None),
                    ..Default::default()
                },
                "t",
            )
            .unwrap();
        store.remove_image("deb", "t").unwrap();
        store.add_image(&image("deb"), "t").unwrap();
        assert_eq!(store.image_revisions("deb").unwrap().len(), 1);
    }

    pub(super) fn a_pools_image_reaches_every_machine_it_catches_now_and_later(backend: &Backend) {
        let store = &*backend.store;
        store.add_image(&image("a"), "t").unwrap();
        store.add_image(&image("b"), "t").unwrap();
        let label = |mac: Mac, labels: &[&str]| {
            store
                .put_machine(
                    mac,
                    &MachinePatch {
                        labels: Some(labels.iter().map(|l| l.to_string()).collect()),
                        ..Default::default()
                    },
                    "t",
                )
                .unwrap();
        };
        let (one, two, own) = (
            Mac::parse("52:54:00:00:0b:01").unwrap(),
            Mac::parse("52:54:00:00:0b:02").unwrap(),
            Mac::parse("52:54:00:00:0b:03").unwrap(),
        );
        label(one, &["rack=r1"]);
        label(own, &["rack=r1"]);
        store
            .put_machine(
                own,
                &MachinePatch {
                    image: Some(Some("b".into())),
                    ..Default::default()
                },
                "t",
            )
            .unwrap();
        let pool = PoolRecord {
            name: "r1".into(),
            members: Vec::new(),
            selector: vec!["rack=r1".into()],
            image: Some("a".into()),
        };
        store.put_pool(&pool, "t").unwrap();
        let booted = |mac: Mac| {
            snapshot_from_store(store, 1)
                .unwrap()
                .machines
                .get(&mac)
                .and_then(|m| m.image.clone())
        };
        // Now: a machine without an image of its own boots the pool's; a
        // machine's own assignment wins.
        assert_eq!(booted(one).as_deref(), Some("a"));
        assert_eq!(booted(own).as_deref(), Some("b"));
        // Later: relabelled into the pool, it boots the pool's image too.
        label(two, &["rack=r2"]);
        assert_eq!(booted(two), None);
        label(two, &["rack=r1"]);
        assert_eq!(booted(two).as_deref(), Some("a"));
        // The pool's own record keeps its image, an unknown one is refused,
        // and an image a pool boots cannot be removed.
        assert_eq!(store.pools().unwrap()[0].image.as_deref(), Some("a"));
        let unknown = PoolRecord {
            image: Some("nope".into()),
            ..pool.clone()
        };
        assert!(matches!(
            store.put_pool(&unknown, "t"),
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.remove_image("a", "t"),
            Err(StoreError::Conflict(_))
        ));
        // No image on the pool: its machines have none again.
        store
            .put_pool(
                &PoolRecord {
                    image: None,
                    ..pool
                },
                "t",
            )
            .unwrap();
        assert_eq!(booted(one), None);
    }
}
