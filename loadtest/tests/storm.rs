//! The PXE client simulator against a real bootfleet, inside a network
//! namespace the test makes (so that ports 67, 69 and 80 on its loopback
//! are the test's own): a few hundred machines walk the whole chain with
//! every byte verified, and deliberately broken servers (a wrong file,
//! TFTP packets dropped, a script that never comes) are reported as the
//! right failure in the right phase.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MACHINES: usize = 300;

fn is_root() -> bool {
    let output = Command::new("id").arg("-u").output().unwrap();
    let root = String::from_utf8_lossy(&output.stdout).trim() == "0";
    if !root {
        let message = "the storm test needs root (a network namespace, DHCP port 67)";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("\n*** SKIPPED: {message} ***\n");
    }
    root
}

/// A namespace with only its loopback, bootfleet serving in it.
struct Lab {
    ns: String,
    dir: tempfile::TempDir,
    server: Option<Child>,
    /// `--panel-listen` of the server ("off": no panel).
    panel: &'static str,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        Lab::with_machines(tag, MACHINES)
    }

    /// A lab whose inventory lists `machines` simulated machines.
    fn with_machines(tag: &str, machines: usize) -> Lab {
        let ns = format!("bfstorm{tag}{}", std::process::id() % 100_000);
        // A namespace left by an interrupted run goes first.
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        assert!(Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success());
        assert!(Command::new("ip")
            .args(["-n", &ns, "link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        let dir = tempfile::Builder::new()
            .prefix("bootfleet-storm-")
            .tempdir()
            .unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(boot.join("img")).unwrap();
        let pattern = |len: usize, seed: u32| -> Vec<u8> {
            (0..len as u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
                .collect()
        };
        std::fs::write(boot.join("undionly.kpxe"), pattern(70_000, 1)).unwrap();
        std::fs::write(boot.join("ipxe.efi"), pattern(90_000, 2)).unwrap();
        std::fs::write(boot.join("img/vmlinuz"), pattern(1 << 20, 3)).unwrap();
        std::fs::write(boot.join("img/initrd.gz"), pattern(2 << 20, 4)).unwrap();
        std::fs::write(boot.join("img/modules.cpio"), pattern(300_000, 5)).unwrap();
        let mut inventory = String::from(
            "[images.node]\nkernel = \"img/vmlinuz\"\ninitrds = [\"img/initrd.gz\"]\ncmdline = \"console=ttyS0\"\n\n\
             [images.node-tftp]\nkernel = \"img/vmlinuz\"\ninitrds = [\"img/initrd.gz\", \"img/modules.cpio\"]\n\
             cmdline = \"console=ttyS0\"\ntransport = \"tftp\"\n\n",
        );
        for i in 0..machines as u32 {
            let n = i.to_be_bytes();
            // Every tenth machine's image comes over TFTP.
            let image = if i % 10 == 9 { "node-tftp" } else { "node" };
            inventory.push_str(&format!(
                "[machines.\"02:bf:{:02x}:{:02x}:{:02x}:{:02x}\"]\nimage = \"{image}\"\n",
                n[0], n[1], n[2], n[3]
            ));
        }
        std::fs::write(boot.join("inventory.toml"), inventory).unwrap();
        Lab {
            ns,
            dir,
            server: None,
            panel: "off",
        }
    }

    fn boot_dir(&self) -> PathBuf {
        self.dir.path().join("boot")
    }

    /// Stops bootfleet with SIGTERM: it cancels its io_uring operations on
    /// the way out, so the next start can bind the same ports at once
    /// (after SIGKILL the kernel frees them only when the ring is torn down).
    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// bootfleet on the namespace's loopback, the machines' subnet relayed
    /// from 127.1.0.1.
    fn start(&mut self, config: &str) {
        self.start_with(
            config,
            &[
                "--tftp-listen",
                "127.0.0.1:69",
                "--http-listen",
                "127.0.0.1:80",
                "--dhcp-mode",
                "full",
                "--dhcp-interface",
                "lo",
                "--dhcp-range",
                "127.1.0.10-127.1.255.250/16",
            ],
        );
    }

    fn start_with(&mut self, config: &str, serve_args: &[&str]) {
        let bootfleet =
            Path::new(env!("CARGO_BIN_EXE_bootfleet-loadtest")).with_file_name("bootfleet");
        assert!(
            bootfleet.exists(),
            "{} is missing: build the workspace first (cargo build --release --workspace)",
            bootfleet.display()
        );
        let config_path = self.dir.path().join("bootfleet.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = self.dir.path().join("server.log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&bootfleet)
            .args(["serve", "--panel-listen", self.panel, "--config"])
            .arg(&config_path)
            .arg("--root")
            .arg(self.boot_dir())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args(serve_args)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.server = Some(child);
        // With a panel, it listens only after the inventory file was
        // imported into the database.
        let ready: &[&str] = if self.panel == "off" {
            &["DHCP listening"]
        } else {
            &["DHCP listening", "control panel and API listening"]
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.iter().all(|needle| {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(needle)
        }) {
            assert!(
                Instant::now() < deadline,
                "bootfleet did not start: {}",
                std::fs::read_to_string(self.dir.path().join("server.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a storm; returns its exit status and JSON report.
    fn storm(
        &self,
        expected_root: &Path,
        machines: usize,
        extra: &[&str],
    ) -> (bool, serde_json::Value, String) {
        let json = self.dir.path().join("report.json");
        let chart = self.dir.path().join("report.html");
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                env!("CARGO_BIN_EXE_bootfleet-loadtest"),
                "storm",
            ])
            .args([
                "--server",
                "127.0.0.1",
                "--machines",
                &machines.to_string(),
                "--root",
            ])
            .arg(expected_root)
            .args(["--time-limit", "60", "--json"])
            .arg(&json)
            .arg("--chart")
            .arg(&chart)
            .args(extra)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let report = serde_json::from_slice(&std::fs::read(&json).unwrap_or_default())
            .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{text}"));
        (output.status.success(), report, text)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn a_few_hundred_machines_boot_with_every_byte_verified() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new("ok");
    lab.start("");
    let (ok, report, text) = lab.storm(
        &lab.boot_dir(),
        MACHINES,
        &["--firmware", "mixed", "--threads", "2"],
    );
    assert!(ok, "{text}");
    assert_eq!(report["machines"], MACHINES, "{text}");
    assert_eq!(report["booted"], MACHINES, "{text}");
    assert_eq!(report["failed"], 0, "{text}");
    for phase in ["dhcp", "loader", "script", "kernel", "initrd", "total"] {
        assert_eq!(
            report["phases"][phase]["count"], MACHINES,
            "{phase}: {text}"
        );
        assert!(
            report["phases"][phase]["p99_ms"].as_f64().unwrap() > 0.0,
            "{phase}"
        );
    }
    // Every byte: loaders, kernels and initrds of every machine.
    let per_machine = |i: usize| {
        let loader = if i.is_multiple_of(2) { 70_000 } else { 90_000 };
        let initrds = if i % 10 == 9 {
            (2 << 20) + 300_000
        } else {
            2 << 20
        };
        loader + (1 << 20) + initrds
    };
    let file_bytes: u64 = (0..MACHINES).map(per_machine).sum::<usize>() as u64;
    let received = report["bytes_received"].as_u64().unwrap();
    assert!(
        received > file_bytes,
        "{received} received, files alone are {file_bytes}"
    );
    let chart = std::fs::read_to_string(lab.dir.path().join("report.html")).unwrap();
    assert!(
        chart.contains("<svg") && chart.contains("initrd"),
        "chart drawn"
    );
    let booted_per_second: u64 = report["booted_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(booted_per_second, MACHINES as u64);
    // bootfleet saw each machine's whole chain.
    let events = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns,
            "curl",
            "-s",
            "http://127.0.0.1/api/v1/events?mac=02:bf:00:00:00:09",
        ])
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    for phase in [
        "\"dhcp\"",
        "\"loader\"",
        "\"chain\"",
        "\"script\"",
        "\"kernel\"",
        "\"initrd\"",
    ] {
        assert!(events.contains(phase), "{phase} missing: {events}");
    }
}

/// Every machine failed, in `phase`, for a cause that says `cause`.
fn assert_every_failure(report: &serde_json::Value, phase: &str, cause: &str, text: &str) {
    assert_eq!(report["booted"], 0, "{text}");
    let failures = report["failures"].as_object().unwrap();
    assert!(!failures.is_empty(), "{text}");
    assert!(
        failures
            .keys()
            .all(|k| k.starts_with(&format!("{phase}: ")) && k.contains(cause)),
        "every failure should be `{phase}: …{cause}…`:\n{text}"
    );
}

#[test]
fn broken_servers_are_reported_in_the_right_phase() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new("bad");
    lab.start("");

    // 1. The server's initrd differs from the boot directory's: every
    //    machine fails in the initrd phase, on its bytes.
    let expected = lab.dir.path().join("expected");
    std::fs::create_dir_all(expected.join("img")).unwrap();
    for file in [
        "undionly.kpxe",
        "ipxe.efi",
        "img/vmlinuz",
        "img/modules.cpio",
    ] {
        std::fs::copy(lab.boot_dir().join(file), expected.join(file)).unwrap();
    }
    let mut initrd = std::fs::read(lab.boot_dir().join("img/initrd.gz")).unwrap();
    initrd[1_000_000] ^= 0xff;
    std::fs::write(expected.join("img/initrd.gz"), initrd).unwrap();
    let (ok, report, text) = lab.storm(&expected, 40, &[]);
    assert!(!ok, "{text}");
    assert_every_failure(&report, "initrd", "wrong bytes", &text);

    // 2. TFTP packets dropped: machines fail fetching their loader.
    let nft = |rules: &str| {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "nft {rules}");
    };
    nft(
        "table inet storm {\n  chain in {\n    type filter hook input priority 0; policy accept;\n    udp dport 69 drop\n  }\n}\n",
    );
    let (ok, report, text) = lab.storm(&lab.boot_dir(), 20, &[]);
    assert!(!ok, "{text}");
    assert_every_failure(&report, "loader", "no answer", &text);
    nft("delete table inet storm\n");

    // 3. A script server that accepts and never answers: machines fail in
    //    the script phase once iPXE's patience (--http-timeout) is over.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (bound, is_bound) = std::sync::mpsc::channel::<()>();
    let stalled = std::thread::spawn({
        let ns = lab.ns.clone();
        move || {
            // Inside the namespace, a listener that never accepts: the
            // kernel completes each connection and the request waits.
            let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let _listener = std::net::TcpListener::bind("127.0.0.1:8081").unwrap();
            bound.send(()).unwrap();
            let _ = stopped.recv_timeout(Duration::from_secs(60));
        }
    });
    is_bound.recv().unwrap();
    lab.stop();
    lab.start("[dhcp]\nscript_url = \"http://127.0.0.1:8081/boot.ipxe\"\n");
    let (ok, report, text) = lab.storm(&lab.boot_dir(), 20, &["--http-timeout", "2"]);
    assert!(!ok, "{text}");
    assert_every_failure(&report, "script", "timed out", &text);
    let _ = stop.send(());
    let _ = stalled.join();
}

#[test]
fn ramps_and_waves_power_machines_on_over_time() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new("arr");
    lab.start("");
    let booted_per_second = |report: &serde_json::Value| -> Vec<u64> {
        report["booted_per_second"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };

    // A ramp over 2 s: machines keep arriving through the whole ramp.
    let (ok, report, text) = lab.storm(
        &lab.boot_dir(),
        60,
        &[
            "--profile",
            "ramp",
            "--ramp-seconds",
            "2",
            "--stop-after",
            "script",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(report["booted"], 60, "{text}");
    // The last machine is powered on 59/60 of the way through the ramp.
    assert!(report["seconds"].as_f64().unwrap() >= 1.9, "{text}");
    let per_second = booted_per_second(&report);
    assert!(
        per_second[0] > 0 && per_second[1] > 0,
        "machines booted through both seconds of the ramp: {per_second:?}"
    );

    // Three waves 1.5 s apart: three bursts with quiet between them.
    let (ok, report, text) = lab.storm(
        &lab.boot_dir(),
        60,
        &[
            "--profile",
            "waves",
            "--waves",
            "3",
            "--wave-interval",
            "1.5",
            "--stop-after",
            "script",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(report["booted"], 60, "{text}");
    let per_second = booted_per_second(&report);
    assert!(report["seconds"].as_f64().unwrap() >= 3.0, "{text}");
    assert!(
        per_second.iter().filter(|&&n| n > 0).count() >= 3,
        "machines booted in at least three different seconds: {per_second:?}"
    );
}

#[test]
fn machines_broadcast_dhcp_from_their_own_namespace() {
    if !is_root() {
        return;
    }
    // A boot LAN: a bridge in the lab's namespace with bootfleet on it; the
    // load tester adds its own namespace and veth to the bridge.
    let mut lab = Lab::new("bc");
    for args in [
        &["link", "add", "br0", "type", "bridge"][..],
        &["addr", "add", "10.97.0.1/16", "dev", "br0"],
        &["link", "set", "br0", "up"],
    ] {
        let status = Command::new("ip")
            .args(["-n", &lab.ns])
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    }
    lab.start_with(
        "",
        &[
            "--tftp-listen",
            "10.97.0.1:69",
            "--http-listen",
            "10.97.0.1:80",
            "--dhcp-mode",
            "full",
            "--dhcp-interface",
            "br0",
            "--dhcp-range",
            "10.97.1.1-10.97.255.250",
        ],
    );
    let json = lab.dir.path().join("broadcast.json");
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns,
            "env",
            "BOOTFLEET_LOADTEST_NAMESPACE=1",
        ])
        .arg(env!("CARGO_BIN_EXE_bootfleet-loadtest"))
        .args([
            "storm",
            "--server",
            "10.97.0.1",
            "--machines",
            "40",
            "--root",
        ])
        .arg(lab.boot_dir())
        .args([
            "--dhcp-via",
            "broadcast",
            "--attach",
            "br0",
            "--firmware",
            "mixed",
        ])
        .args(["--time-limit", "60", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let text = format!(
        "{}{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(lab.dir.path().join("server.log")).unwrap_or_default()
    );
    assert!(output.status.success(), "{text}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["booted"], 40, "{text}");
    // bootfleet saw broadcasts on its interface, not relayed requests, and
    // gave addresses from the bridge's subnet.
    let leases = std::fs::read_to_string(lab.dir.path().join("state/dhcp-leases.jsonl")).unwrap();
    assert!(leases.contains("\"10.97."), "{leases}");
    assert!(leases.contains("\"relay\":\"0.0.0.0\""), "{leases}");
    // The tool removed its namespace.
    let namespaces = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("bfload"),
        "the load tester's namespace is gone"
    );
}

/// A storm of `machines` that bootfleet powers on through their simulated
/// Redfish BMCs (`extra`: pacing and the like).
fn power_storm(
    lab: &Lab,
    token: &str,
    machines: usize,
    extra: &[&str],
) -> (bool, serde_json::Value, String) {
    let mut args = vec!["--power-via", "redfish", "--threads", "2", "--token", token];
    args.extend_from_slice(extra);
    lab.storm(&lab.boot_dir(), machines, &args)
}

/// `GET /api/v1/PATH` from the lab's panel.
fn panel_get(lab: &Lab, token: &str, path: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns, "curl", "-s", "-H"])
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("http://127.0.0.1:9090/api/v1/{path}"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Power job 1 once it is done (the panel stores check-ins in 0.1 s
/// batches, and the job looks every 0.1 s), or as it is after 20 s.
fn first_job_when_done(lab: &Lab, token: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let job: serde_json::Value =
            serde_json::from_str(&panel_get(lab, token, "power/jobs/1")).unwrap_or_default();
        if job["status"] == "done" || Instant::now() > deadline {
            return job;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A lab of `machines` with bootfleet's panel on (check-ins on its
/// loopback), and an admin token for it.
fn power_lab(tag: &str, machines: usize) -> (Lab, String) {
    let mut lab = Lab::with_machines(tag, machines);
    lab.panel = "127.0.0.1:9090";
    lab.start(
        "[dhcp]\nmax_requests_per_second_per_source = 10000000\n\
         [power]\ncheckin_url = \"http://127.0.0.1:9090\"\n",
    );
    let bootfleet = Path::new(env!("CARGO_BIN_EXE_bootfleet-loadtest")).with_file_name("bootfleet");
    let token = Command::new(&bootfleet)
        .args(["tokens", "add", "storm", "--scope", "admin", "--state-dir"])
        .arg(lab.dir.path().join("state"))
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    (lab, token)
}

#[test]
fn a_thousand_machines_are_powered_on_through_simulated_redfish_bmcs_and_all_check_in() {
    if !is_root() {
        return;
    }
    const FLEET: usize = 1000;
    let (lab, token) = power_lab("p", FLEET);
    let (ok, report, text) = power_storm(&lab, &token, FLEET, &["--power-waves", "adaptive"]);
    eprintln!("{text}");
    assert!(ok, "{text}");
    assert_eq!(report["booted"], FLEET, "every machine checked in: {text}");
    assert_eq!(report["failed"], 0, "{text}");
    assert_eq!(report["cut"], 0, "{text}");
    for phase in ["power", "checkin"] {
        assert_eq!(report["phases"][phase]["count"], FLEET, "{phase}: {text}");
    }
    // No address went to two machines, and the server saw every check-in.
    let mut seen = std::collections::HashMap::new();
    for (mac, addresses) in report["leases"].as_object().unwrap() {
        for address in addresses.as_array().unwrap() {
            if let Some(other) = seen.insert(address.as_str().unwrap().to_string(), mac.clone()) {
                assert_eq!(&other, mac, "{address} leased to two machines");
            }
        }
    }
    // The job sees the last check-ins within its next look (0.1 s) once
    // the panel has stored them (batched every 0.1 s).
    let job = first_job_when_done(&lab, &token);
    if job["status"] != "done" {
        // Which machines the job still waits for, and what the panel knows of them.
        let api = |path: &str| panel_get(&lab, &token, path);
        for m in job["machines"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["stage"] != "up")
        {
            let mac = m["mac"].as_str().unwrap();
            eprintln!(
                "waiting for {m}\n  machine: {}",
                api(&format!("machines/{mac}"))
            );
        }
        panic!("the job did not end: {job}");
    }
    assert_eq!(job["stages"]["up"], FLEET, "{job}");
    assert!(
        job["waves_sent"].as_u64().unwrap() > 1,
        "adaptive waves: {job}"
    );
}

#[test]
fn a_machine_whose_os_hangs_is_power_cycled_once_and_then_checks_in() {
    if !is_root() {
        return;
    }
    const FLEET: usize = 10;
    let (lab, token) = power_lab("c", FLEET);
    // Machines 0 and 5 hang after their first boot; bootfleet gives each
    // 5 s to check in, then cycles it once.
    let (ok, report, text) = power_storm(
        &lab,
        &token,
        FLEET,
        &[
            "--power-waves",
            "all",
            "--power-deadline",
            "5",
            "--retry-by-cycle",
            "--hang-every",
            "5",
        ],
    );
    assert!(ok, "{text}");
    assert_eq!(report["booted"], FLEET, "{text}");
    assert_eq!(
        report["retried"], 2,
        "the two hung machines booted twice: {text}"
    );
    let job = first_job_when_done(&lab, &token);
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["stages"]["up"], FLEET, "{job}");
    let cycled: Vec<&str> = job["machines"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["cycled"] == true)
        .map(|m| m["mac"].as_str().unwrap())
        .collect();
    assert_eq!(cycled, ["02:bf:00:00:00:00", "02:bf:00:00:00:05"], "{job}");
}
