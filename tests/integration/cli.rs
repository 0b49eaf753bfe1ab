//! The command line against a running server whose panel serves TLS: every
//! API command with `--json` (its answer parsed and checked), its text
//! output, the users and tokens commands on the database, and the
//! documented exit statuses (untrusted certificate, token refused, scope
//! too small, not found, refused as invalid).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{have_tool, self_signed_certificate, FullServer};
use crate::panel::{add_token, add_user, boot_dir, eventually, script, state_dir, PASSWORD};

/// `bootfleet` with the panel's URL, a token and the panel's certificate.
struct Cli {
    url: String,
    token: String,
    ca: PathBuf,
}

/// What a command did: its exit status and its two outputs.
struct Ran {
    code: i32,
    out: String,
    err: String,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bootfleet"));
        command
            .args(args)
            .env("BOOTFLEET_URL", &self.url)
            .env("BOOTFLEET_TOKEN", &self.token)
            .env("BOOTFLEET_CA", &self.ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn run(&self, args: &[&str]) -> Ran {
        let output = self.command(args).output().unwrap();
        let ran = Ran {
            code: output.status.code().unwrap_or(-1),
            out: String::from_utf8_lossy(&output.stdout).into_owned(),
            err: String::from_utf8_lossy(&output.stderr).into_owned(),
        };
        eprintln!(
            "$ bootfleet {} -> {}\n{}{}",
            args.join(" "),
            ran.code,
            ran.out,
            ran.err
        );
        ran
    }

    /// Runs a read or change with `--json` and parses its answer.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let ran = self.run(&all);
        assert_eq!(ran.code, 0, "bootfleet {args:?} failed: {}", ran.err);
        serde_json::from_str(&ran.out).unwrap_or_else(|e| {
            panic!(
                "bootfleet {args:?} --json printed no JSON ({e}): {}",
                ran.out
            )
        })
    }

    fn text(&self, args: &[&str]) -> String {
        let ran = self.run(args);
        assert_eq!(ran.code, 0, "bootfleet {args:?} failed: {}", ran.err);
        ran.out
    }

    /// Runs a command that must fail with `code`, and answers its error.
    fn fails(&self, code: i32, args: &[&str]) -> String {
        let ran = self.run(args);
        assert_eq!(ran.code, code, "bootfleet {args:?}: {}{}", ran.out, ran.err);
        assert!(
            ran.err.starts_with("bootfleet: "),
            "one clear line: {}",
            ran.err
        );
        ran.err
    }

    fn with_token(&self, token: &str) -> Cli {
        Cli {
            url: self.url.clone(),
            token: token.to_string(),
            ca: self.ca.clone(),
        }
    }
}

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|item| item[key].as_str().unwrap_or_default().to_string())
        .collect()
}

fn database(state: &Path, args: &[&str]) -> Ran {
    let output = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args(args)
        .args(["--state-dir", state.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            // Commands that read no password may be gone before it is written.
            let _ = child
                .stdin
                .take()
                .unwrap()
                .write_all(format!("{PASSWORD} again\n").as_bytes());
            child.wait_with_output()
        })
        .unwrap();
    Ran {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn every_api_command_works_against_a_tls_panel_with_json_and_exit_statuses() {
    if !have_tool("openssl") {
        return;
    }
    let root = boot_dir();
    let state = state_dir();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_certificate(
        certs.path(),
        "/CN=localhost",
        &[
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ],
    );
    let admin = add_token(state.path(), "ops", "admin");
    let reader_token = add_token(state.path(), "viewer", "read");
    let server = FullServer::start_with_panel(root.path(), state, |c| {
        c.panel.tls_cert = Some(cert.clone());
        c.panel.tls_key = Some(key.clone());
    });
    let cli = Cli {
        url: format!("https://127.0.0.1:{}", server.panel.unwrap().port()),
        token: admin,
        ca: cert.clone(),
    };
    let reader = cli.with_token(&reader_token);

    // TLS: the panel's certificate is trusted only when given.
    let untrusted = cli
        .command(&["images", "list"])
        .env_remove("BOOTFLEET_CA")
        .output()
        .unwrap();
    assert_eq!(untrusted.status.code(), Some(3));
    let said = String::from_utf8_lossy(&untrusted.stderr);
    assert!(said.contains("--ca"), "says how to trust the panel: {said}");
    let other_ca = tempfile::tempdir().unwrap();
    let (stranger, _) = self_signed_certificate(other_ca.path(), "/CN=localhost", &[]);
    let wrong = Cli {
        ca: stranger,
        ..cli.with_token(&cli.token)
    };
    wrong.fails(3, &["images", "list"]);
    cli.fails(1, &["images", "list", "--url", "ftp://127.0.0.1"]);

    // Images.
    let added = cli.json(&[
        "images",
        "add",
        "debian12",
        "--kernel",
        "debian12/vmlinuz",
        "--initrd",
        "debian12/initrd.img",
        "--cmdline",
        "console=ttyS0",
        "--description",
        "Debian 12",
    ]);
    assert_eq!(added["files"].as_array().unwrap().len(), 2, "{added}");
    assert_eq!(added["files"][0]["size"], 13);
    cli.json(&[
        "images",
        "add",
        "rocky9",
        "--kernel",
        "rocky9/vmlinuz",
        "--transport",
        "tftp",
    ]);
    assert_eq!(
        names(&cli.json(&["images", "list"]), "name"),
        ["debian12", "rocky9"]
    );
    let shown = cli.json(&["images", "show", "debian12"]);
    assert_eq!(shown["description"], "Debian 12");
    assert!(cli
        .text(&["images", "show", "debian12"])
        .contains("cmdline\tconsole=ttyS0"));
    let refused = cli.fails(
        6,
        &[
            "images",
            "add",
            "bad",
            "--kernel",
            "x/vmlinuz",
            "--transport",
            "carrier-pigeon",
        ],
    );
    assert!(refused.contains("transport"), "{refused}");
    cli.fails(5, &["images", "show", "nothing-here"]);

    // Machines: assign, set every field, list with filters, show, rearm.
    let mac1 = "52:54:00:ce:00:01";
    let mac2 = "52-54-00-ce-00-02";
    let assigned = cli.json(&["machines", "assign", "debian12", mac1, mac2]);
    assert_eq!(assigned["changed"], 2);
    let set = cli.json(&[
        "machines",
        "set",
        mac1,
        "--hostname",
        "node1",
        "--label",
        "rack=a",
        "--label",
        "role=db",
        "--cmdline-append",
        "quiet",
        "--notes",
        "row 3",
        "--ip",
        "10.0.0.91",
    ]);
    assert_eq!(set["hostname"], "node1");
    assert_eq!(set["labels"], serde_json::json!(["rack=a", "role=db"]));
    assert_eq!(set["ip"], "10.0.0.91");
    assert_eq!(set["image_from"], "machine");
    let rack_a = cli.json(&["machines", "list", "--label", "rack=a"]);
    assert_eq!(names(&rack_a, "mac"), [mac1]);
    let all = cli.json(&["machines", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    let table = cli.text(&["machines", "list", "--search", "node1"]);
    assert!(
        table.contains("52:54:00:ce:00:01\tnode1\tdebian12\tassigned"),
        "{table}"
    );
    cli.json(&[
        "machines",
        "set",
        mac1,
        "--clear-labels",
        "--hostname",
        "none",
    ]);
    let cleared = cli.json(&["machines", "show", mac1]);
    assert_eq!(cleared["labels"], serde_json::json!([]));
    assert!(cleared["hostname"].is_null());
    cli.fails(1, &["machines", "set", mac1]);
    cli.json(&["machines", "set", mac2, "--one-shot", "true"]);
    let rearmed = cli.json(&["machines", "rearm", mac2]);
    assert_eq!(rearmed["one_shot"], true);
    assert!(rearmed["rearm"].as_u64().unwrap() > 0, "{rearmed}");
    let refused = cli.fails(
        6,
        &[
            "machines",
            "set",
            mac1,
            "--cmdline-append",
            "quiet\nchain http://x/",
        ],
    );
    assert!(refused.contains("control"), "{refused}");

    // Editing an image: the next script follows; a pinned machine keeps
    // its revision until unpinned; a rollback is one action.
    assert!(script(&server, mac2, "").contains("console=ttyS0"));
    let edited = cli.json(&[
        "images",
        "edit",
        "debian12",
        "--cmdline",
        "console=ttyS1 edited",
        "--no-initrds",
    ]);
    assert_eq!(edited["revision"], 2, "{edited}");
    let next = script(&server, mac2, "");
    assert!(
        next.contains("console=ttyS1 edited") && !next.contains("initrd.img"),
        "{next}"
    );
    cli.fails(1, &["images", "edit", "debian12"]);
    cli.fails(
        6,
        &["images", "edit", "debian12", "--kernel", "debian12/missing"],
    );
    let pinned = cli.json(&["machines", "set", mac1, "--pin", "1"]);
    assert_eq!(pinned["image_from"], "machine, pinned to revision 1");
    let old = script(&server, mac1, "");
    assert!(
        old.contains("console=ttyS0") && old.contains("initrd.img"),
        "{old}"
    );
    cli.fails(6, &["machines", "set", mac1, "--pin", "9"]);
    let revisions = cli.json(&["images", "revisions", "debian12"]);
    assert_eq!(revisions[0]["revision"], 2);
    assert_eq!(revisions[0]["actor"], "token:ops");
    assert!(
        revisions[0]["changes"]
            .as_str()
            .unwrap()
            .contains("cmdline"),
        "{revisions}"
    );
    assert!(cli
        .text(&["images", "revisions", "debian12"])
        .contains("\ttoken:ops\tinitrds"));
    let back = cli.json(&["images", "rollback", "debian12", "1"]);
    assert_eq!(back["revision"], 3);
    assert!(script(&server, mac2, "").contains("initrd.img"));
    cli.fails(5, &["images", "rollback", "debian12", "7"]);
    cli.json(&["machines", "set", mac1, "--pin", "none"]);

    // Boot events, and following them as they happen.
    assert!(script(&server, mac1, "").contains("debian12/vmlinuz"));
    let events = eventually("the script event", || {
        let events = cli.json(&["events", "--mac", mac1]);
        (!events.as_array().unwrap().is_empty()).then_some(events)
    });
    assert_eq!(events[0]["phase"], "script", "{events}");
    let mut follow = cli
        .command(&[
            "events", "--follow", "--json", "--limit", "0", "--mac", mac2,
        ])
        .spawn()
        .unwrap();
    let (lines, followed) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let started = Instant::now();
    let event = loop {
        // The stream may open after a fetch: fetch until a line comes.
        script(&server, mac2, "");
        if let Ok(line) = followed.recv_timeout(Duration::from_millis(500)) {
            break line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no event followed"
        );
    };
    follow.kill().unwrap();
    let _ = follow.wait();
    let event: Value = serde_json::from_str(&event).unwrap();
    assert_eq!(event["mac"], "52:54:00:ce:00:02");
    assert!(cli
        .text(&["events", "--mac", mac1])
        .contains("\t52:54:00:ce:00:01\tscript\thttp\t200\t"));

    // Pools.
    cli.json(&[
        "machines", "set", mac2, "--label", "rack=b", "--image", "none",
    ]);
    let pool = cli.json(&[
        "pools", "set", "rack-b", "--select", "rack=b", "--image", "rocky9",
    ]);
    assert_eq!(pool["machines"], serde_json::json!(["52:54:00:ce:00:02"]));
    let via_pool = cli.json(&["machines", "show", mac2]);
    assert_eq!(via_pool["image_from"], "pool rack-b", "{via_pool}");
    assert_eq!(names(&cli.json(&["pools", "list"]), "name"), ["rack-b"]);
    assert_eq!(cli.json(&["pools", "show", "rack-b"])["image"], "rocky9");
    assert_eq!(
        cli.json(&["pools", "assign", "rack-b", "debian12"])["changed"],
        1
    );
    cli.json(&["pools", "remove", "rack-b"]);
    cli.fails(5, &["pools", "show", "rack-b"]);

    // Fleet, audit, files, settings, jobs, iPXE builds.
    let fleet = cli.json(&["fleet"]);
    assert_eq!(fleet["machines"], 2);
    let audit = cli.json(&["audit", "--limit", "3"]);
    assert_eq!(audit.as_array().unwrap().len(), 3);
    assert!(
        names(&audit, "actor").iter().all(|a| a.contains("ops")),
        "{audit}"
    );
    let upload = certs.path().join("payload.bin");
    std::fs::write(&upload, b"twelve bytes").unwrap();
    let uploaded = cli.json(&[
        "files",
        "upload",
        upload.to_str().unwrap(),
        "--as",
        "extra/payload.bin",
    ]);
    assert_eq!(uploaded["size"], 12);
    assert_eq!(
        std::fs::read(root.path().join("extra/payload.bin")).unwrap(),
        b"twelve bytes"
    );
    assert!(names(&cli.json(&["files", "list"]), "path").contains(&"extra/payload.bin".to_string()));
    assert_eq!(
        cli.json(&["settings", "unknown", "--policy", "local"])["policy"],
        "local"
    );
    assert_eq!(cli.json(&["settings", "unknown"])["policy"], "local");
    assert_eq!(cli.json(&["jobs", "list"]), serde_json::json!([]));
    cli.fails(5, &["jobs", "show", "99"]);
    assert!(cli.json(&["ipxe", "list"])["files"].is_array());

    // Scopes: a read token reads, and is refused every change (status 4).
    assert_eq!(
        reader.json(&["machines", "list"]).as_array().unwrap().len(),
        2
    );
    let scope = reader.fails(4, &["machines", "set", mac1, "--notes", "x"]);
    assert!(scope.contains("403"), "{scope}");
    reader.fails(4, &["pools", "set", "p", "--select", "a=b"]);
    cli.with_token("bft_made_up")
        .fails(4, &["machines", "list"]);

    // Conflicts and forgetting.
    let in_use = cli.fails(6, &["images", "remove", "debian12"]);
    assert!(in_use.contains("409"), "{in_use}");
    cli.json(&["images", "remove", "rocky9"]);
    cli.json(&["machines", "forget", mac2]);
    cli.fails(5, &["machines", "show", mac2]);

    // Users and tokens on the database (the server keeps running).
    let state = server.state.path();
    add_user(state, "carol", "assign");
    let users = database(state, &["users", "list", "--json"]);
    let users: Value = serde_json::from_str(&users.out).unwrap();
    assert_eq!(users[0]["name"], "carol");
    assert_eq!(users[0]["scope"], "assign");
    assert_eq!(database(state, &["users", "passwd", "carol"]).code, 0);
    assert_eq!(database(state, &["users", "passwd", "nobody"]).code, 1);
    let tokens: Value =
        serde_json::from_str(&database(state, &["tokens", "list", "--json"]).out).unwrap();
    assert_eq!(names(&tokens, "name"), ["ops", "viewer"]);
    let viewer = tokens[1]["id"].to_string();
    assert_eq!(database(state, &["tokens", "revoke", &viewer]).code, 0);
    reader.fails(4, &["machines", "list"]);
    let carol = database(
        state,
        &[
            "tokens", "add", "carols", "--scope", "assign", "--user", "carol",
        ],
    );
    let carol = carol.out.trim();
    let carol_cli = cli.with_token(carol);
    carol_cli.json(&["machines", "set", mac1, "--notes", "by carol"]);
    let removed = database(state, &["users", "remove", "carol"]);
    assert!(removed.out.contains("1 token(s)"), "{}", removed.out);
    assert_eq!(database(state, &["users", "remove", "carol"]).code, 1);
    carol_cli.fails(4, &["machines", "list"]);
}
