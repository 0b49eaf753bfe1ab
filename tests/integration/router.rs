//! The MAC router through the running server: scripts for every MAC
//! spelling, the unknown-machine policies and discovery, the classic
//! per-MAC `.gpxe` layout served unchanged, inventory reloads (a broken
//! file keeps the last good snapshot), one-shot assignments, and
//! pxelinux/GRUB configs over TFTP with a real tftp-hpa client.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;

const INVENTORY: &str = r#"
[unknown]
policy = "menu"

[images.alpha]
kernel = "images/alpha/vmlinuz"
initrds = ["images/alpha/initrd.img"]
cmdline = "console=ttyS0 image=alpha"

[images.beta]
kernel = "images/beta/vmlinuz"
initrds = ["images/beta/initrd.img", "images/beta/extra.cpio"]
cmdline = "console=ttyS0 image=beta"
transport = "tftp"

[machines."52:54:00:00:00:01"]
image = "alpha"
hostname = "node01"
cmdline_append = "node=01"

[machines."52-54-00-00-00-02"]
image = "beta"
ip = "127.0.0.1"

[machines.525400000003]
image = "alpha"
one_shot = true
"#;

fn boot_root() -> tempfile::TempDir {
    let root = tempfile::Builder::new()
        .prefix("bootfleet-router-")
        .tempdir()
        .unwrap();
    for image in ["alpha", "beta"] {
        let dir = root.path().join("images").join(image);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), pattern(300_000, image.len() as u64)).unwrap();
        std::fs::write(dir.join("initrd.img"), pattern(200_000, 7)).unwrap();
    }
    std::fs::write(root.path().join("images/beta/extra.cpio"), b"cpio").unwrap();
    std::fs::write(root.path().join("inventory.toml"), INVENTORY).unwrap();
    root
}

fn text(fetched: &Fetched) -> String {
    String::from_utf8_lossy(&fetched.body).into_owned()
}

#[test]
fn every_mac_spelling_gets_the_same_rendered_script() {
    if !have_tool("curl") {
        return;
    }
    let root = boot_root();
    let server = FullServer::start(root.path(), |_| {});
    let host = server.http;
    let mut bodies = Vec::new();
    for spelling in [
        "52:54:00:00:00:01",
        "52%3A54%3A00%3A00%3A00%3A01",
        "52%3a54%3a00%3a00%3a00%3a01",
        "52-54-00-00-00-01",
        "525400000001",
        "52:54:00:00:00:01".to_uppercase().as_str(),
        "5254.0000.0001",
    ] {
        let fetched = curl(&server.url(&format!("/boot/{spelling}.ipxe")), &[]);
        assert_eq!(fetched.status, 200, "{spelling}");
        assert_eq!(
            fetched.header("content-type").as_deref(),
            Some("text/plain; charset=utf-8")
        );
        bodies.push(text(&fetched));
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "{bodies:#?}");
    assert_eq!(
        bodies[0],
        format!(
            "#!ipxe\n\
             # bootfleet: 52:54:00:00:00:01 (node01) boots image alpha\n\
             kernel http://{host}/images/alpha/vmlinuz initrd=initrd.img console=ttyS0 image=alpha node=01\n\
             initrd --name initrd.img http://{host}/images/alpha/initrd.img\n\
             boot\n"
        )
    );

    // The TFTP image renders tftp:// URLs; the script names the server by
    // the Host the client used, or the configured public URL.
    let beta = text(&curl(
        &server.url("/boot/52:54:00:00:00:02.ipxe"),
        &["-H", "Host: 10.9.8.7:8080"],
    ));
    assert!(
        beta.contains(
            "kernel tftp://10.9.8.7/images/beta/vmlinuz initrd=initrd.img initrd=extra.cpio"
        ),
        "{beta}"
    );
    assert!(
        beta.contains("initrd --name extra.cpio tftp://10.9.8.7/images/beta/extra.cpio\n"),
        "{beta}"
    );

    // The chain script chains to the per-MAC URL with the facts.
    let chain = text(&curl(&server.url("/boot.ipxe"), &[]));
    assert!(
        chain.contains(&format!(
            "chain --autofree http://{host}/boot/${{net0/mac}}.ipxe?${{bootfleet-facts}}"
        )),
        "{chain}"
    );

    // Not a MAC: falls through to the files (and is not found).
    assert_eq!(curl(&server.url("/boot/not-a-mac.ipxe"), &[]).status, 404);
}

#[test]
fn unknown_machines_are_discovered_and_get_the_configured_policy() {
    if !have_tool("curl") {
        return;
    }
    let root = boot_root();
    let server = FullServer::start(root.path(), |_| {});
    let stranger = "/boot/02:00:00:00:be:ef.ipxe?uuid=1234-5678&manufacturer=QEMU&product=Standard%20PC&serial=SN42&asset=&buildarch=x86_64&platform=pcbios";

    let menu = text(&curl(&server.url(stranger), &[]));
    assert!(
        menu.contains("item alpha alpha\n") && menu.contains("item beta beta\n"),
        "{menu}"
    );
    assert!(menu.contains("choose --default local"), "{menu}");

    let discovered = text(&curl(&server.url("/api/v1/discovered"), &[]));
    let list: serde_json::Value = serde_json::from_str(&discovered).unwrap();
    let entry = &list.as_array().unwrap()[0];
    assert_eq!(entry["mac"], "02:00:00:00:be:ef");
    assert_eq!(entry["facts"]["product"], "Standard PC");
    assert_eq!(entry["facts"]["serial"], "SN42");
    assert_eq!(entry["facts"]["platform"], "pcbios");
    assert!(
        entry["facts"].get("asset").is_none(),
        "empty facts are not recorded"
    );

    // A choice from the menu renders that image for this machine.
    let chosen = text(&curl(
        &server.url("/boot/02:00:00:00:be:ef.ipxe?image=beta"),
        &[],
    ));
    assert!(chosen.contains("boots image beta"), "{chosen}");

    for (policy, needle) in [
        ("wait", "sleep 5\nchain --replace --autofree"),
        ("local", "exit\n"),
    ] {
        std::fs::write(
            root.path().join("inventory.toml"),
            INVENTORY.replace(
                "policy = \"menu\"",
                &format!("policy = \"{policy}\"\npoll_seconds = 5"),
            ),
        )
        .unwrap();
        server.running.router.reload().unwrap();
        let script = text(&curl(&server.url(stranger), &[]));
        assert!(script.contains(needle), "{policy}: {script}");
        if policy == "wait" {
            assert!(
                script.contains("serial=SN42"),
                "the poll loop keeps the facts: {script}"
            );
        }
    }

    // Assigned later: it boots its image without a restart (the watcher
    // picks the file up), and is no longer "discovered".
    std::fs::write(
        root.path().join("inventory.toml"),
        format!("{INVENTORY}\n[machines.\"02:00:00:00:be:ef\"]\nimage = \"alpha\"\n"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let script = text(&curl(&server.url(stranger), &[]));
        if script.contains("boots image alpha") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "assignment not picked up: {script}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let discovered = text(&curl(&server.url("/api/v1/discovered"), &[]));
    assert_eq!(discovered.trim(), "[]");
}

#[test]
fn the_classic_per_mac_gpxe_layout_is_served_unchanged() {
    if !have_tool("curl") {
        return;
    }
    // Exactly the layout of the write-up: a web root with bootdirectory/,
    // boot.gpxe, one xx:xx:xx:xx:xx:xx.gpxe per machine and images/.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("bootdirectory");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    let boot = "#!gpxe\nchain http://${next-server}/bootdirectory/${net0/mac}.gpxe\n";
    let first = "#!gpxe\nkernel http://${next-server}/bootdirectory/images/bzImage1\ninitrd http://${next-server}/bootdirectory/images/initrd1.gz\nboot\n";
    let second = "#!gpxe\nkernel http://${next-server}/bootdirectory/images/bzImage2\ninitrd http://${next-server}/bootdirectory/images/initrd2.gz\nboot\n";
    std::fs::write(dir.join("boot.gpxe"), boot).unwrap();
    std::fs::write(dir.join("52:54:00:aa:00:01.gpxe"), first).unwrap();
    std::fs::write(dir.join("52:54:00:aa:00:02.gpxe"), second).unwrap();
    for (name, seed) in [
        ("bzImage1", 1),
        ("initrd1.gz", 2),
        ("bzImage2", 3),
        ("initrd2.gz", 4),
    ] {
        std::fs::write(dir.join("images").join(name), pattern(150_000, seed)).unwrap();
    }
    // The same per-MAC file at the root answers bootfleet's own route too.
    std::fs::write(root.path().join("52:54:00:aa:00:01.gpxe"), first).unwrap();

    let server = FullServer::start(root.path(), |_| {});
    assert_eq!(
        curl(&server.url("/bootdirectory/boot.gpxe"), &[]).body,
        boot.as_bytes()
    );
    // iPXE escapes the colons of ${net0/mac}; both forms reach the file.
    for path in [
        "/bootdirectory/52%3A54%3A00%3Aaa%3A00%3A01.gpxe",
        "/bootdirectory/52:54:00:aa:00:01.gpxe",
    ] {
        assert_eq!(
            curl(&server.url(path), &[]).body,
            first.as_bytes(),
            "{path}"
        );
    }
    assert_eq!(
        curl(
            &server.url("/bootdirectory/52%3A54%3A00%3Aaa%3A00%3A02.gpxe"),
            &[]
        )
        .body,
        second.as_bytes()
    );
    for name in ["bzImage1", "initrd1.gz", "bzImage2", "initrd2.gz"] {
        let got = curl(&server.url(&format!("/bootdirectory/images/{name}")), &[]);
        assert_eq!(
            got.body,
            std::fs::read(dir.join("images").join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        curl(&server.url("/boot/52-54-00-AA-00-01.ipxe"), &[]).body,
        first.as_bytes()
    );
}

#[test]
fn a_broken_inventory_keeps_the_last_good_snapshot() {
    if !have_tool("curl") {
        return;
    }
    let root = boot_root();
    let server = FullServer::start(root.path(), |_| {});
    let url = server.url("/boot/52:54:00:00:00:01.ipxe");
    assert!(text(&curl(&url, &[])).contains("node=01"));
    let generation = server.running.router.snapshot().generation;

    for broken in [
        INVENTORY.replace("[images.beta]", "[images.beta"),
        INVENTORY.replace("image = \"beta\"", "image = \"gamma\""),
        INVENTORY.replace(
            "cmdline = \"console=ttyS0 image=alpha\"",
            "cmdline = \"console=ttyS0\"\nkernal = \"x\"",
        ),
    ] {
        std::fs::write(root.path().join("inventory.toml"), &broken).unwrap();
        let error = server.running.router.reload().unwrap_err().to_string();
        assert!(error.contains("line"), "{error}");
        std::thread::sleep(Duration::from_millis(600)); // the watcher sees it too
        assert_eq!(server.running.router.snapshot().generation, generation);
        assert!(
            text(&curl(&url, &[])).contains("node=01"),
            "old snapshot still serves"
        );
    }

    std::fs::write(
        root.path().join("inventory.toml"),
        INVENTORY.replace("node=01", "node=one"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text(&curl(&url, &[])).contains("node=one") {
        assert!(Instant::now() < deadline, "fixed inventory not picked up");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn one_shot_boots_once_and_every_step_is_an_event() {
    if !have_tool("curl") {
        return;
    }
    let root = boot_root();
    let server = FullServer::start(root.path(), |_| {});
    let url = server.url("/boot/52:54:00:00:00:03.ipxe");
    assert!(text(&curl(&url, &[])).contains("boots image alpha"));
    // A range request for the kernel does not use the assignment up.
    curl(&server.url("/images/alpha/vmlinuz"), &["-r", "0-99"]);
    assert!(text(&curl(&url, &[])).contains("boots image alpha"));
    curl(&server.url("/images/alpha/vmlinuz"), &[]);
    curl(&server.url("/images/alpha/initrd.img"), &[]);
    let after = text(&curl(&url, &[]));
    assert!(
        after.contains("one-shot assignment already used") && after.contains("exit\n"),
        "{after}"
    );

    let events: serde_json::Value = serde_json::from_slice(
        &curl(&server.url("/api/v1/events?mac=52-54-00-00-00-03"), &[]).body,
    )
    .unwrap();
    let phases: Vec<(String, u64)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["phase"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    let expect: Vec<(String, u64)> = [
        ("script", 200),
        ("kernel", 206),
        ("script", 200),
        ("kernel", 200),
        ("initrd", 200),
        ("script", 200),
    ]
    .iter()
    .map(|(p, s)| (p.to_string(), *s))
    .collect();
    assert_eq!(phases, expect);
    let kernel = &events.as_array().unwrap()[3];
    assert_eq!(kernel["bytes"], 300_000);
    assert_eq!(kernel["detail"], "images/alpha/vmlinuz");

    // The state survives a restart of the server.
    let FullServer {
        running,
        state: state_dir,
        ..
    } = server;
    running.stop();
    let state = state_dir.path().to_path_buf();
    let again = FullServer::start(root.path(), |c| c.state_dir = state.clone());
    let script = text(&curl(&again.url("/boot/52:54:00:00:00:03.ipxe"), &[]));
    assert!(
        script.contains("one-shot assignment already used"),
        "{script}"
    );
}

#[test]
fn pxelinux_and_grub_configs_over_tftp() {
    if !have_tool("tftp") {
        return;
    }
    let root = boot_root();
    std::fs::create_dir(root.path().join("pxelinux.cfg")).unwrap();
    std::fs::write(root.path().join("pxelinux.cfg/default"), "DEFAULT local\n").unwrap();
    let server = FullServer::start(root.path(), |_| {});
    let out = scratch();
    let get = |name: &str| -> Option<String> {
        let target = out.path().join(name.replace('/', "_"));
        let _ = std::fs::remove_file(&target);
        let status = tftp_hpa_get(server.tftp.port(), name, &target);
        let body = std::fs::read_to_string(&target).ok()?;
        (status.status.success() && !body.is_empty()).then_some(body)
    };
    let by_mac = get("pxelinux.cfg/01-52-54-00-00-00-01").expect("pxelinux config by MAC");
    assert!(by_mac.contains("KERNEL /images/alpha/vmlinuz"), "{by_mac}");
    assert!(
        by_mac.contains("INITRD /images/alpha/initrd.img"),
        "{by_mac}"
    );
    assert!(
        by_mac.contains("APPEND console=ttyS0 image=alpha node=01"),
        "{by_mac}"
    );
    // pxelinux's fallback by hex IP: machine 02 reserves 127.0.0.1.
    let by_ip = get("pxelinux.cfg/7F000001").expect("pxelinux config by hex IP");
    assert!(
        by_ip.contains("INITRD /images/beta/initrd.img,/images/beta/extra.cpio"),
        "{by_ip}"
    );
    assert_eq!(
        get("pxelinux.cfg/default").as_deref(),
        Some("DEFAULT local\n")
    );
    assert_eq!(
        get("pxelinux.cfg/01-02-00-00-00-00-09"),
        None,
        "unknown MACs fall back"
    );
    let grub = get("grub/grub.cfg-01-52-54-00-00-00-01").expect("GRUB config by MAC");
    assert!(
        grub.contains("linux /images/alpha/vmlinuz console=ttyS0 image=alpha node=01"),
        "{grub}"
    );

    // A kernel fetched over TFTP is a boot event of the machine whose
    // script was last asked for from that address.
    server.running.router.machine_script(
        bootfleet::proto::Mac::parse("52:54:00:00:00:02").unwrap(),
        &[],
        "http://127.0.0.1",
        "127.0.0.1".parse().unwrap(),
    );
    let kernel = out.path().join("kernel");
    run(Command::new("tftp")
        .args([
            "127.0.0.1",
            &server.tftp.port().to_string(),
            "-m",
            "binary",
            "-c",
            "get",
            "images/beta/vmlinuz",
        ])
        .arg(&kernel))
    .unwrap();
    assert_eq!(
        std::fs::read(&kernel).unwrap(),
        std::fs::read(root.path().join("images/beta/vmlinuz")).unwrap()
    );
    let events = server.running.router.events.recent(
        Some(bootfleet::proto::Mac::parse("52:54:00:00:00:02").unwrap()),
        10,
    );
    assert!(
        events.iter().any(|e| e.transport == "tftp"
            && e.detail == "images/beta/vmlinuz (blksize 512, windowsize 1)"
            && e.status == 200),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.detail.contains("pxelinux.cfg/7F000001")),
        "{events:?}"
    );
    assert!(Path::new(&root.path().join("pxelinux.cfg/default")).exists());
}
