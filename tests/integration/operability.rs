//! What an operator sees: failed fetches as boot events with their cause
//! (in the machine's state, the fleet view and the log), Prometheus
//! metrics that move as machines boot, and the health endpoints.

use std::io::Write;
use std::time::Duration;

use serde_json::json;

use crate::common::{curl, read_response, scratch, tftp_hpa_get, FullServer};
use crate::panel::{add_token, boot_dir, eventually, register, script, state_dir, Api};

/// The value of the sample `series` (name with its labels, exactly as
/// written) in a Prometheus text scrape.
fn sample(text: &str, series: &str) -> f64 {
    find_sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

fn find_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

fn scrape(server: &FullServer) -> String {
    let fetched = curl(&format!("http://{}/metrics", server.panel.unwrap()), &[]);
    assert_eq!(fetched.status, 200);
    String::from_utf8(fetched.body).unwrap()
}

#[test]
fn a_missing_kernel_or_initrd_shows_where_the_machine_failed_and_why() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let panel = server.panel.unwrap();
    let api = Api::with_token(panel, &add_token(server.state.path(), "ops", "admin"));
    register(&api, "debian12");
    register(&api, "rocky9");
    let (over_http, over_tftp) = ("52:54:00:fa:11:01", "52:54:00:fa:11:02");
    for (mac, image) in [(over_http, "debian12"), (over_tftp, "rocky9")] {
        api.ok(
            "POST",
            "/api/v1/machines/assign",
            Some(json!({ "macs": [mac], "image": image })),
        );
    }
    let before = scrape(&server);

    // The operator deletes the kernel; the machine's script still names it.
    std::fs::remove_file(root.path().join("debian12/vmlinuz")).unwrap();
    assert!(script(&server, over_http, "").contains("debian12/vmlinuz"));
    assert_eq!(curl(&server.url("/debian12/vmlinuz"), &[]).status, 404);
    let machine = eventually("the failed kernel fetch", || {
        let m = api.ok("GET", &format!("/api/v1/machines/{over_http}"), None);
        (m["state"] == "failed").then_some(m)
    });
    assert_eq!(
        machine["failure"], "failed at kernel: 404 (file not found)",
        "{machine}"
    );
    let last = machine["events"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(
        (&last["phase"], &last["status"]),
        (&json!("kernel"), &json!(404))
    );

    // The same over TFTP, with tftp-hpa's client, for a missing initrd.
    std::fs::remove_file(root.path().join("rocky9/initrd.img")).unwrap();
    assert!(script(&server, over_tftp, "").contains("rocky9/vmlinuz"));
    let out = scratch();
    let status = tftp_hpa_get(
        server.tftp.port(),
        "rocky9/initrd.img",
        &out.path().join("initrd"),
    );
    let said = String::from_utf8_lossy(&status.stdout).to_string()
        + &String::from_utf8_lossy(&status.stderr);
    assert!(said.contains("not found"), "tftp said: {said}");
    let machine = eventually("the refused TFTP read", || {
        let m = api.ok("GET", &format!("/api/v1/machines/{over_tftp}"), None);
        (m["state"] == "failed").then_some(m)
    });
    assert_eq!(machine["failure"], "failed at initrd: 404 (file not found)");

    // The fleet view counts failures by where and why.
    let fleet = api.ok("GET", "/api/v1/fleet", None);
    assert_eq!(fleet["states"]["failed"], 2, "{fleet}");
    assert_eq!(
        fleet["failures"]["kernel: 404 (file not found)"], 1,
        "{fleet}"
    );
    assert_eq!(
        fleet["failures"]["initrd: 404 (file not found)"], 1,
        "{fleet}"
    );

    // And /metrics counts them.
    let after = scrape(&server);
    for series in [
        r#"bootfleet_boot_failures_total{phase="kernel",status="404"}"#,
        r#"bootfleet_boot_failures_total{phase="initrd",status="404"}"#,
        r#"bootfleet_http_responses_total{status="404"}"#,
    ] {
        assert_eq!(
            sample(&after, series) - sample(&before, series),
            1.0,
            "{series}"
        );
    }
    let errors_sent = "bootfleet_tftp_errors_sent_total";
    assert!(sample(&after, errors_sent) > sample(&before, errors_sent));
    assert_eq!(sample(&after, r#"bootfleet_machines{state="failed"}"#), 2.0);
}

#[test]
fn the_metrics_move_as_machines_boot_and_the_health_endpoints_answer() {
    let root = boot_dir();
    let metrics_only: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let server = FullServer::start_with_panel(root.path(), state_dir(), |c| {
        c.panel.metrics_listen = Some(metrics_only);
    });
    let panel = server.panel.unwrap();
    let api = Api::with_token(panel, &add_token(server.state.path(), "ops", "admin"));
    register(&api, "debian12");

    // Health: no authentication, plain answers, on the panel's listener
    // and on the metrics listener of its own (which serves nothing else).
    for listener in [panel, metrics_only] {
        let health = curl(&format!("http://{listener}/healthz"), &[]);
        assert_eq!((health.status, health.body.as_slice()), (200, &b"ok\n"[..]));
        let ready = curl(&format!("http://{listener}/readyz"), &[]);
        assert_eq!(
            ready.status,
            200,
            "{}",
            String::from_utf8_lossy(&ready.body)
        );
        let scraped = curl(&format!("http://{listener}/metrics"), &[]);
        assert!(String::from_utf8_lossy(&scraped.body).contains("bootfleet_tftp_bytes_total"));
    }
    assert_eq!(
        curl(&format!("http://{metrics_only}/api/v1/machines"), &[]).status,
        404
    );

    // A small storm: 8 machines on 8 threads, each from its own loopback
    // address (the router knows a machine by the address that asked for its
    // script), asking for its script, kernel and initrd 10 times over one
    // kept-alive connection.
    let macs: Vec<String> = (0..8).map(|i| format!("52:54:00:fb:00:{i:02x}")).collect();
    api.ok(
        "POST",
        "/api/v1/machines/assign",
        Some(json!({ "macs": macs, "image": "debian12" })),
    );
    let before = scrape(&server);
    std::thread::scope(|scope| {
        for (index, mac) in macs.iter().enumerate() {
            let http = server.http;
            scope.spawn(move || {
                let source: std::net::SocketAddr =
                    format!("127.0.0.{}:0", 10 + index).parse().unwrap();
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                        .unwrap();
                socket.bind(&source.into()).unwrap();
                socket.connect(&http.into()).unwrap();
                let mut stream: std::net::TcpStream = socket.into();
                for _ in 0..10 {
                    for path in [
                        format!("/boot/{mac}.ipxe"),
                        "/debian12/vmlinuz".to_string(),
                        "/debian12/initrd.img".to_string(),
                    ] {
                        write!(stream, "GET {path} HTTP/1.1\r\nHost: boot\r\n\r\n").unwrap();
                        let response = read_response(&mut stream).expect("a response");
                        assert_eq!(response.status, 200, "{path}");
                    }
                }
            });
        }
    });
    // Five TFTP reads of the initrd with tftp-hpa's client.
    let out = scratch();
    for _ in 0..5 {
        let fetched = tftp_hpa_get(
            server.tftp.port(),
            "debian12/initrd.img",
            &out.path().join("initrd"),
        );
        assert!(fetched.status.success());
    }
    // The machines' states reach the database in batches, and the server
    // sees the clients' connections close a moment after they do.
    let after = eventually("every machine booted and every connection closed", || {
        let after = scrape(&server);
        (find_sample(&after, r#"bootfleet_machines{state="booted"}"#) == Some(8.0)
            && sample(&after, "bootfleet_http_open_connections") == 0.0)
            .then_some(after)
    });
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        moved(r#"bootfleet_http_responses_total{status="200"}"#),
        240.0
    );
    assert_eq!(
        moved(r#"bootfleet_scripts_rendered_total{decision="image"}"#),
        80.0
    );
    assert_eq!(
        moved(r#"bootfleet_boot_events_total{phase="script"}"#),
        80.0
    );
    assert_eq!(
        moved(r#"bootfleet_boot_events_total{phase="kernel"}"#),
        80.0
    );
    assert_eq!(
        moved(r#"bootfleet_boot_events_total{phase="initrd"}"#),
        85.0
    );
    assert_eq!(moved("bootfleet_tftp_transfers_completed_total"), 5.0);
    assert_eq!(
        moved("bootfleet_tftp_bytes_total"),
        5.0 * b"debian kernel".len() as f64
    );
    let body_bytes = 80.0 * (b"debian kernel".len() + b"debian initrd".len()) as f64;
    // File bodies only: a script's text goes out with its head.
    assert_eq!(moved("bootfleet_http_body_bytes_total"), body_bytes);
    // Every initrd fetch lands in the phase's histogram (+Inf holds all).
    assert_eq!(
        moved(r#"bootfleet_boot_phase_duration_seconds_bucket{le="+Inf",phase="initrd"}"#),
        85.0
    );
    assert_eq!(sample(&after, "bootfleet_tftp_open_transfers"), 0.0);
    assert_eq!(sample(&after, "bootfleet_events_dropped_total"), 0.0);
}

/// `bootfleet_http_body_bytes_in_flight` (what adaptive power-on waves
/// measure the LAN's backlog by) holds, at every moment, what was promised
/// and not yet sent: with a slow reader part-way through a large file,
/// bytes in flight and bytes sent add up to the file exactly; when the
/// file is read to its end, or the reader hangs up half-way, it is back to
/// zero. On both engines.
#[test]
fn http_bytes_in_flight_follow_a_slow_download_to_its_end_or_its_abandonment() {
    use std::io::Read;
    const SIZE: usize = 32 << 20;
    for backend in crate::common::BACKENDS {
        let root = boot_dir();
        std::fs::write(root.path().join("big.img"), vec![7u8; SIZE]).unwrap();
        let server = FullServer::start_with_panel_on(backend, root.path(), state_dir(), |_| {});
        let at_rest = |why: &str| {
            eventually(why, || {
                let now = scrape(&server);
                (sample(&now, "bootfleet_http_body_bytes_in_flight") == 0.0
                    && sample(&now, "bootfleet_http_open_connections") == 0.0)
                    .then_some(now)
            })
        };
        let sent = |text: &str| sample(text, "bootfleet_http_body_bytes_total");
        let before = at_rest("nothing in flight at the start");

        // A reader that takes the head and 1 MB, then waits: the socket
        // buffers fill and the rest waits in the server.
        let get = || {
            let mut stream = std::net::TcpStream::connect(server.http).unwrap();
            stream
                .write_all(b"GET /big.img HTTP/1.1\r\nHost: boot\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut first = vec![0u8; 1 << 20];
            stream.read_exact(&mut first).unwrap();
            stream
        };
        let mut stream = get();
        let stalled = eventually("the server stalls on the full socket", || {
            let one = scrape(&server);
            std::thread::sleep(Duration::from_millis(200));
            let two = scrape(&server);
            (sent(&one) == sent(&two)).then_some(two)
        });
        let in_flight = sample(&stalled, "bootfleet_http_body_bytes_in_flight");
        assert!(
            in_flight > 0.0,
            "{backend:?}: nothing in flight while stalled"
        );
        assert_eq!(
            in_flight + sent(&stalled) - sent(&before),
            SIZE as f64,
            "{backend:?}: in flight and sent must add up to the file"
        );
        std::io::copy(&mut (&mut stream).take(u64::MAX), &mut std::io::sink()).ok();
        drop(stream);
        let read_through = at_rest("nothing in flight once the file is read");
        assert_eq!(
            sent(&read_through) - sent(&before),
            SIZE as f64,
            "{backend:?}"
        );

        // A reader that hangs up half-way: what was never sent leaves too.
        drop(get());
        let abandoned = at_rest("nothing in flight once the reader is gone");
        assert!(
            sent(&abandoned) - sent(&read_through) < SIZE as f64,
            "{backend:?}"
        );
    }
}

#[test]
fn a_boot_directory_without_loaders_serves_debians_ipxe_builds() {
    let debian = std::path::Path::new("/usr/lib/ipxe");
    assert!(
        debian.join("undionly.kpxe").is_file() && debian.join("ipxe.efi").is_file(),
        "Debian's ipxe package is missing: install ipxe (tests/run-all.sh does)"
    );
    let root = boot_dir();
    let server = FullServer::start(root.path(), |_| {});
    for loader in ["undionly.kpxe", "ipxe.efi"] {
        let expected = std::fs::read(debian.join(loader)).unwrap();
        let over_http = curl(&server.url(&format!("/{loader}")), &[]);
        assert_eq!(over_http.status, 200, "{loader}");
        assert!(over_http.body == expected, "{loader} over HTTP differs");
        let out = scratch();
        let target = out.path().join(loader);
        let fetched = tftp_hpa_get(server.tftp.port(), loader, &target);
        assert!(fetched.status.success(), "{loader} over TFTP: {fetched:?}");
        assert!(
            std::fs::read(&target).unwrap() == expected,
            "{loader} over TFTP differs"
        );
    }
    // arm64's loader is looked for by its own path, never as the x86 file.
    assert_eq!(curl(&server.url("/arm64/snponly.efi"), &[]).status, 404);

    // A loader in the boot directory wins.
    let mine = boot_dir();
    std::fs::write(mine.path().join("undionly.kpxe"), b"the operator's build").unwrap();
    let server = FullServer::start(mine.path(), |_| {});
    assert_eq!(
        curl(&server.url("/undionly.kpxe"), &[]).body,
        b"the operator's build"
    );
}

#[test]
fn check_config_reports_what_serve_would_fail_on_and_prints_the_effective_toml() {
    let dir = scratch();
    let check = |text: &str| {
        let file = dir.path().join("bootfleet.toml");
        std::fs::write(&file, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_bootfleet"))
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let root = dir.path().join("boot");
    std::fs::create_dir(&root).unwrap();
    let (ok, toml, _) = check(&format!(
        "root = {:?}\n[http]\nidle_timeout_ms = 5000\n",
        root
    ));
    assert!(ok);
    let effective: toml::Table = toml.parse().expect("the effective configuration is TOML");
    assert_eq!(
        effective["http"]["idle_timeout_ms"].as_integer(),
        Some(5000)
    );
    assert_eq!(
        effective["tftp"]["max_retries"].as_integer(),
        Some(5),
        "defaults are shown"
    );

    let (ok, _, problems) = check(
        "root = \"/nonexistent-boot-dir\"\n[dhcp]\nmode = \"full\"\n\
         [panel]\ntls_cert = \"/nonexistent.crt\"\ntls_key = \"/nonexistent.key\"\n\
         [log]\nlevel = \"bootfleet=loud\"\n",
    );
    assert!(!ok, "{problems}");
    for expected in [
        "boot directory /nonexistent-boot-dir does not exist",
        "needs dhcp.interfaces",
        "needs dhcp.ranges",
        "panel.tls_cert /nonexistent.crt",
        "panel.tls_key /nonexistent.key",
        "log.level \"bootfleet=loud\"",
    ] {
        assert!(problems.contains(expected), "{expected}: {problems}");
    }
}

#[test]
fn the_database_is_backed_up_online_and_restored_after_a_mistake() {
    use crate::panel::bootfleet_cli;
    let root = boot_dir();
    let state = state_dir();
    let state_path = state.path().to_path_buf();
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(&state_path, "ops", "admin"),
    );
    register(&api, "debian12");
    let mac = "52:54:00:bc:00:01";
    api.ok(
        "POST",
        "/api/v1/machines/assign",
        Some(json!({ "macs": [mac], "image": "debian12" })),
    );

    // While the server runs and serves.
    let backups = scratch();
    let backup = backups.path().join("inventory.backup");
    let said = bootfleet_cli(
        &[
            "db",
            "backup",
            backup.to_str().unwrap(),
            "--state-dir",
            state_path.to_str().unwrap(),
        ],
        "",
    );
    assert!(said.contains("1 machines, 1 images"), "{said}");

    // The mistake, then the restore with the server stopped.
    api.ok("DELETE", &format!("/api/v1/machines/{mac}"), None);
    let FullServer { running, state, .. } = server;
    running.stop();
    let said = bootfleet_cli(
        &[
            "db",
            "restore",
            backup.to_str().unwrap(),
            "--state-dir",
            state_path.to_str().unwrap(),
        ],
        "",
    );
    assert!(said.contains("1 machines, 1 images"), "{said}");
    let server = FullServer::start_with_panel(root.path(), state, |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(&state_path, "ops2", "admin"),
    );
    let machine = api.ok("GET", &format!("/api/v1/machines/{mac}"), None);
    assert_eq!(machine["image"], "debian12", "{machine}");
    assert!(script(&server, mac, "").contains("debian12/vmlinuz"));
}

#[test]
fn an_image_whose_file_vanishes_is_marked_broken_at_once_and_healed_when_it_returns() {
    let root = boot_dir();
    let server = FullServer::start_with_panel(root.path(), state_dir(), |_| {});
    let api = Api::with_token(
        server.panel.unwrap(),
        &add_token(server.state.path(), "ops", "admin"),
    );
    register(&api, "debian12");
    let image = || api.ok("GET", "/api/v1/images/debian12", None);
    assert_eq!(image()["problem"], serde_json::Value::Null);
    // Let the watch on the image's directory be set.
    std::thread::sleep(Duration::from_millis(500));

    let kernel = root.path().join("debian12/vmlinuz");
    std::fs::remove_file(&kernel).unwrap();
    let started = std::time::Instant::now();
    let broken = eventually("the image marked broken", || {
        let image = image();
        image["problem"].as_str().map(|p| p.to_string())
    });
    // Well inside the ten-second round: the watch woke the check.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(broken.contains("debian12/vmlinuz"), "{broken}");
    let listed = api.ok("GET", "/api/v1/images", None);
    assert_eq!(listed[0]["problem"], broken.as_str());

    // A new kernel: healed, with its new size and checksum.
    std::fs::write(&kernel, b"a newer debian kernel").unwrap();
    let healed = eventually("the image healed", || {
        let image = image();
        (image["problem"].is_null() && image["files"][0]["size"] == 21).then_some(image)
    });
    assert_eq!(healed["files"][0]["path"], "debian12/vmlinuz");
}

#[test]
fn kernels_and_initrds_of_an_operators_own_per_mac_script_are_boot_events() {
    let root = boot_dir();
    let mac = "52:54:00:cc:00:01";
    // The write-up's classic layout: a script per MAC, written by hand.
    std::fs::write(
        root.path().join(format!("{mac}.ipxe")),
        "#!ipxe\nkernel http://${next-server}/rocky9/vmlinuz console=ttyS0\n\
         initrd --name initrd.img http://${next-server}/rocky9/initrd.img\nboot\n",
    )
    .unwrap();
    let server = FullServer::start(root.path(), |_| {});
    let fetched = curl(&server.url(&format!("/boot/{mac}.ipxe")), &[]);
    assert!(String::from_utf8_lossy(&fetched.body).contains("rocky9/vmlinuz"));
    for path in ["/rocky9/vmlinuz", "/rocky9/initrd.img"] {
        assert_eq!(curl(&server.url(path), &[]).status, 200);
    }
    let machine: bootfleet::proto::Mac = mac.parse().unwrap();
    let phases: Vec<(String, u16)> = server
        .running
        .router
        .events
        .recent(Some(machine), 10)
        .into_iter()
        .map(|e| (format!("{:?}", e.phase), e.status))
        .collect();
    assert_eq!(
        phases,
        [
            ("Script".to_string(), 200),
            ("Kernel".to_string(), 200),
            ("Initrd".to_string(), 200)
        ]
    );
}
