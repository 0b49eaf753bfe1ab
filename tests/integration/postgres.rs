//! The inventory in a real PostgreSQL server (the cluster
//! `tests/postgres.sh` starts; `BOOTFLEET_TEST_POSTGRES` names it, and
//! tests/run-all.sh sets it): a server on it serves what its panel
//! assigns and records the boots there, its users and tokens are made with
//! the command line against the URL, and `bootfleet db copy` moves a whole
//! inventory from the SQLite file to PostgreSQL and back, row for row.

use std::process::Command;
use std::time::Duration;

use bootfleet::proto::Mac;
use bootfleet::store::postgres::PostgresStore;
use bootfleet::store::sqlite::SqliteStore;
use bootfleet::store::{InventoryStore, MachinePatch};
use serde_json::json;

use super::common::{curl, fresh_postgres_database, FullServer};
use super::panel::{
    boot_dir, bootfleet_cli, eventually, eventually_within, register, script, state_dir, Api,
    PASSWORD,
};

/// An admin API token made with `bootfleet tokens add --database URL`.
fn admin_token(url: &str) -> String {
    let args = [
        "tokens",
        "add",
        "ops",
        "--scope",
        "admin",
        "--database",
        url,
    ];
    bootfleet_cli(&args, "").trim().to_string()
}

#[test]
fn a_server_on_postgres_serves_what_its_panel_assigns_and_records_the_boot_there() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let token = admin_token(&url);
    bootfleet_cli(
        &[
            "users",
            "add",
            "alice",
            "--scope",
            "read",
            "--database",
            &url,
        ],
        &format!("{PASSWORD}\n"),
    );
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |config| {
        config.database_url = Some(url.clone());
    });
    let panel = server.panel.expect("a panel");
    let api = Api::with_token(panel, &token);
    register(&api, "debian12");
    let mac = "52:54:00:00:00:31";
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "debian12", "hostname": "pg-node" })),
    );
    let text = eventually("the assignment in the machine's script", || {
        let text = script(&server, mac, "");
        text.contains("debian12/vmlinuz").then_some(text)
    });
    assert!(text.contains("pg-node"), "{text}");
    assert_eq!(curl(&server.url("/debian12/vmlinuz"), &[]).status, 200);

    let store = PostgresStore::connect(&url).unwrap();
    let mac = Mac::parse(mac).unwrap();
    let machine = store
        .machine(mac)
        .unwrap()
        .expect("the machine is in PostgreSQL");
    assert_eq!(machine.image.as_deref(), Some("debian12"));
    eventually("the kernel fetch as a boot event in PostgreSQL", || {
        let events = store.events(Some(mac), 0, 100).ok()?;
        events.iter().any(|e| e.phase == "kernel").then_some(())
    });
    let mut browser = Api::new(panel);
    assert_eq!(
        browser.login("alice", PASSWORD).status,
        200,
        "a CLI-made user logs in"
    );
    assert_eq!(browser.call("GET", "/api/v1/machines", None).status, 200);
}

#[test]
fn db_copy_moves_a_whole_inventory_to_postgres_and_back() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("inventory.db");
    let sqlite = format!("sqlite:{}", original.display());
    bootfleet_cli(
        &["users", "add", "admin", "--database", &sqlite],
        &format!("{PASSWORD}\n"),
    );
    bootfleet_cli(&["tokens", "add", "ci", "--database", &sqlite], "");
    {
        let store = SqliteStore::open(&original).unwrap();
        let facts = [("serial".to_string(), "S-1".to_string())].into();
        store
            .note_seen(Mac([2, 0, 0, 0, 0, 9]), &facts, 1_000)
            .unwrap();
        store
            .put_machine(
                Mac([2, 0, 0, 0, 0, 1]),
                &MachinePatch {
                    hostname: Some(Some("n1".into())),
                    labels: Some(vec!["rack=r1".into()]),
                    ..MachinePatch::default()
                },
                "t",
            )
            .unwrap();
    }
    let out = bootfleet_cli(&["db", "copy", "--from", &sqlite, "--to", &url], "");
    assert!(out.contains("read the copy back identical"), "{out}");
    let source = SqliteStore::open(&original).unwrap().export().unwrap();
    assert_eq!(source.machines.len(), 2);
    assert_eq!(
        PostgresStore::connect(&url).unwrap().export().unwrap(),
        source
    );

    // Never into a database that already holds an inventory.
    let again = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args(["db", "copy", "--from", &sqlite, "--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    let error = String::from_utf8_lossy(&again.stderr);
    assert!(error.contains("already holds"), "{error}");

    let back = dir.path().join("back.db");
    bootfleet_cli(
        &["db", "copy", "--from", &url, "--to", back.to_str().unwrap()],
        "",
    );
    assert_eq!(SqliteStore::open(&back).unwrap().export().unwrap(), source);
    // Tokens made after the copy are numbered after the copied ones.
    bootfleet_cli(&["tokens", "add", "later", "--database", &url], "");
    let tokens = PostgresStore::connect(&url).unwrap().tokens().unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens[1].id > tokens[0].id);
}

/// Two servers on one database: an assignment made in one server's panel
/// reaches the other's next script answer (LISTEN/NOTIFY).
#[test]
fn an_assignment_on_one_server_reaches_the_other_servers_scripts() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let token = admin_token(&url);
    let root = boot_dir();
    let a = server_on(&url, "boot-a", root.path());
    let b = server_on(&url, "boot-b", root.path());
    let api = Api::with_token(a.panel.expect("a panel"), &token);
    register(&api, "debian12");
    register(&api, "rocky9");
    let mac = "52:54:00:00:00:41";
    let mut latencies = Vec::new();
    for image in ["debian12", "rocky9", "debian12", "rocky9", "debian12"] {
        let assigned = std::time::Instant::now();
        api.ok(
            "PUT",
            &format!("/api/v1/machines/{mac}"),
            Some(json!({ "image": image })),
        );
        let kernel = format!("{image}/vmlinuz");
        eventually(&format!("{image} in the other server's script"), || {
            script(&b, mac, "").contains(&kernel).then_some(())
        });
        latencies.push(assigned.elapsed());
    }
    eprintln!("assignment on A seen in B's script after {latencies:?}");

    // One timeline: each server's boot events, with its name.
    assert!(script(&a, mac, "").contains("debian12/vmlinuz"));
    let store = PostgresStore::connect(&url).unwrap();
    let mac = Mac::parse(mac).unwrap();
    eventually("script events from both servers in one timeline", || {
        let events = store.events(Some(mac), 0, 1000).ok()?;
        let by = |server: &str| {
            events
                .iter()
                .any(|e| e.phase == "script" && e.server == server)
        };
        (by("boot-a") && by("boot-b")).then_some(())
    });
}

/// Images are replicated between the servers of one database by SHA-256:
/// files uploaded to A and registered there are copied by B and C from A's
/// data plane, checked, and served by them byte for byte; meanwhile their
/// machines are told to wait, never sent a kernel URL that fails; the API
/// shows on which servers each image is. A file changed on A afterwards
/// reaches B and C the same way.
#[test]
fn an_image_uploaded_to_one_server_is_served_by_the_others_byte_for_byte() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let token = admin_token(&url);
    let roots: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers: Vec<FullServer> = ["boot-a", "boot-b", "boot-c"]
        .into_iter()
        .zip(&roots)
        .map(|(name, root)| server_on(&url, name, root.path()))
        .collect();
    let api = Api::with_token(servers[0].panel.expect("a panel"), &token);
    let kernel: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let initrd: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    for (path, bytes) in [("fresh/vmlinuz", &kernel), ("fresh/initrd.img", &initrd)] {
        let reply = api.raw(
            "PUT",
            &format!("/api/v1/files/{path}"),
            Some(bytes.clone()),
            true,
        );
        assert_eq!(reply.status, 201, "{reply:?}");
    }
    api.ok(
        "POST",
        "/api/v1/images",
        Some(json!({
            "name": "fresh",
            "kernel": "fresh/vmlinuz",
            "initrds": ["fresh/initrd.img"],
        })),
    );
    let mac = "52:54:00:00:00:61";
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "fresh" })),
    );
    let started = std::time::Instant::now();
    // Until B holds the files its answer for the machine is to wait, never
    // a kernel it cannot serve.
    let holds = |server: &FullServer, path: &str, bytes: &[u8]| {
        let fetched = curl(&server.url(&format!("/{path}")), &[]);
        fetched.status == 200 && fetched.body == bytes
    };
    let mut waits_seen = 0;
    let deadline = started + std::time::Duration::from_secs(45);
    loop {
        let answer = script(&servers[1], mac, "");
        // Waiting for its image's files, or (for the moment the change
        // takes to reach B) for the assignment itself.
        let waiting = answer.contains("not on this server yet")
            || answer.contains("not assigned an image yet");
        if !waiting {
            assert!(answer.contains("fresh/vmlinuz"), "{answer}");
            assert!(
                holds(&servers[1], "fresh/vmlinuz", &kernel)
                    && holds(&servers[1], "fresh/initrd.img", &initrd),
                "B offered the image before it held its files:\n{answer}"
            );
            break;
        }
        waits_seen += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "B never got the image"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    eventually_within(
        Duration::from_secs(45),
        "C serves the files byte for byte",
        || {
            (holds(&servers[2], "fresh/vmlinuz", &kernel)
                && holds(&servers[2], "fresh/initrd.img", &initrd))
            .then_some(())
        },
    );
    assert!(holds(&servers[1], "fresh/initrd.img", &initrd));
    eprintln!(
        "replicated to B and C within {:.1} s; B told its machine to wait {waits_seen} time(s)",
        started.elapsed().as_secs_f64()
    );
    // The API says where the image is (C's report may lag a round).
    eventually_within(
        Duration::from_secs(30),
        "every server reports the image",
        || {
            let image = api.ok("GET", "/api/v1/images/fresh", None);
            let on: Vec<(String, bool)> = image["servers"]
                .as_array()?
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["holds"] == true,
                    )
                })
                .collect();
            (on == [
                ("boot-a".into(), true),
                ("boot-b".into(), true),
                ("boot-c".into(), true),
            ])
            .then_some(())
        },
    );
    // A changed kernel, uploaded to A again, follows.
    let changed: Vec<u8> = kernel.iter().map(|b| b ^ 0x5a).collect();
    let reply = api.raw(
        "PUT",
        "/api/v1/files/fresh/vmlinuz",
        Some(changed.clone()),
        true,
    );
    assert_eq!(reply.status, 201, "{reply:?}");
    eventually_within(
        Duration::from_secs(45),
        "the changed kernel on B and C",
        || {
            (holds(&servers[1], "fresh/vmlinuz", &changed)
                && holds(&servers[2], "fresh/vmlinuz", &changed))
            .then_some(())
        },
    );
    assert!(
        holds(&servers[0], "fresh/vmlinuz", &changed),
        "A kept its own new kernel"
    );
}

/// A one-shot assignment used up through one server is used up on the
/// others: the machine's next script, from whichever server, boots it
/// locally.
#[test]
fn a_one_shot_used_through_one_server_is_used_on_the_others() {
    let Some(url) = fresh_postgres_database() else {
        return;
    };
    let token = admin_token(&url);
    let root = boot_dir();
    let a = server_on(&url, "boot-a", root.path());
    let b = server_on(&url, "boot-b", root.path());
    let api = Api::with_token(a.panel.expect("a panel"), &token);
    register(&api, "debian12");
    let mac = "52:54:00:00:00:71";
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "debian12", "one_shot": true })),
    );
    eventually("the one-shot assignment on B", || {
        script(&b, mac, "")
            .contains("debian12/vmlinuz")
            .then_some(())
    });
    // The machine boots through A: its script, then its whole kernel.
    assert!(script(&a, mac, "").contains("debian12/vmlinuz"));
    let kernel = curl(&a.url("/debian12/vmlinuz"), &[]);
    assert_eq!(kernel.status, 200);
    let used_at = std::time::Instant::now();
    eventually("B knows the one-shot assignment is used", || {
        script(&b, mac, "")
            .contains("one-shot assignment already used")
            .then_some(())
    });
    eprintln!(
        "one-shot use on A seen in B's script after {:?}",
        used_at.elapsed()
    );
    assert!(script(&a, mac, "").contains("one-shot assignment already used"));
}

/// A server with its panel named `name`, on the database `url`, serving
/// `root`.
fn server_on(url: &str, name: &str, root: &std::path::Path) -> FullServer {
    let (url, name) = (url.to_string(), name.to_string());
    FullServer::start_with_panel(root, state_dir(), move |config| {
        config.database_url = Some(url);
        config.panel.server_name = Some(name);
    })
}

/// A PostgreSQL cluster of the test's own (tests/postgres.sh), stopped and
/// removed when dropped.
pub struct OwnCluster {
    dir: tempfile::TempDir,
    pub url: String,
}

impl OwnCluster {
    pub fn start() -> Self {
        Self::start_listening_also(None)
    }

    /// A cluster that also listens on `address` (a test bridge's, for
    /// servers in namespaces), trusting every client.
    pub fn start_listening_also(address: Option<std::net::Ipv4Addr>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("bootfleet-pg-own-")
            .tempdir()
            .unwrap();
        let url = Self::run_script("start", dir.path(), address);
        Self { dir, url }
    }

    fn script(command: &str, dir: &std::path::Path) -> String {
        Self::run_script(command, dir, None)
    }

    fn run_script(
        command: &str,
        dir: &std::path::Path,
        also_listen: Option<std::net::Ipv4Addr>,
    ) -> String {
        let mut script = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postgres.sh"));
        if let Some(address) = also_listen {
            script.env("BOOTFLEET_PG_ALSO_LISTEN", address.to_string());
        }
        let output = script
            .arg(command)
            .arg(dir.join("cluster"))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "tests/postgres.sh {command}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    pub fn pause(&self) {
        Self::script("pause", self.dir.path());
    }

    pub fn resume(&self) {
        Self::script("resume", self.dir.path());
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/postgres.sh"))
            .arg("stop")
            .arg(self.dir.path().join("cluster"))
            .output();
    }
}

/// The database goes away while machines boot: the data plane goes on
/// serving scripts and files from its snapshot, the API says what is
/// wrong, and the boot events made meanwhile are in the database once it
/// is back.
#[test]
fn machines_boot_while_the_database_is_away_and_their_events_arrive_after() {
    // Gated like every PostgreSQL test (CI sets it; this test starts a
    // cluster of its own, which it stops and starts).
    if fresh_postgres_database().is_none() {
        return;
    }
    let cluster = OwnCluster::start();
    let token = admin_token(&cluster.url);
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |config| {
        config.database_url = Some(cluster.url.clone());
    });
    let api = Api::with_token(server.panel.expect("a panel"), &token);
    register(&api, "debian12");
    let mac = "52:54:00:00:00:51";
    api.ok(
        "PUT",
        &format!("/api/v1/machines/{mac}"),
        Some(json!({ "image": "debian12" })),
    );
    eventually("the assignment in the script", || {
        script(&server, mac, "")
            .contains("debian12/vmlinuz")
            .then_some(())
    });

    cluster.pause();
    for _ in 0..3 {
        assert!(script(&server, mac, "").contains("debian12/vmlinuz"));
        assert_eq!(curl(&server.url("/debian12/vmlinuz"), &[]).status, 200);
    }
    let refused = api.call("GET", "/api/v1/machines", None);
    assert!(refused.status >= 500, "{refused:?}");
    assert!(
        refused.body.to_string().contains("PostgreSQL")
            || refused.body.to_string().contains("database"),
        "the API says what is wrong: {refused:?}"
    );

    cluster.resume();
    let store = PostgresStore::connect(&cluster.url).unwrap();
    let mac = Mac::parse(mac).unwrap();
    eventually(
        "the kernel fetches made while the database was away",
        || {
            let events = store.events(Some(mac), 0, 1000).ok()?;
            let kernels = events.iter().filter(|e| e.phase == "kernel").count();
            (kernels >= 3).then_some(())
        },
    );
    assert_eq!(api.call("GET", "/api/v1/machines", None).status, 200);
}
