//! Real machines boot end to end: QEMU virtual machines with SeaBIOS and
//! the iPXE NIC ROM (`ipxe-qemu`), and with UEFI (OVMF) and its own PXE
//! client fetching Debian's `ipxe.efi` over TFTP, against bootfleet alone
//! (DHCP, TFTP, HTTP), on a bridge with one tap per machine inside a network
//! namespace the test makes and removes.
//!
//! The image is built here: Debian's kernel (`linux-image-amd64`) and a
//! busybox initramfs whose init loads the NIC driver, prints one marker
//! line with the MAC address read from the NIC and `/proc/cmdline`, and
//! powers off. Each machine is checked for its own MAC and its own
//! per-machine command line.
//!
//! KVM is used when it actually works and software emulation otherwise:
//! `/dev/kvm` can open and still not run a guest (nested virtualisation
//! without the CPU features, as on this project's CI machines), so the test
//! boots its image directly (`-kernel`) under KVM once and keeps KVM only if
//! the marker line appears within 20 seconds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

const NS: &str = "bfqemu";
const SERVER_IP: &str = "10.99.0.1";
const MARKER: &str = "BOOTFLEET-BOOTED";

/// The kernel and the marker initramfs, built once per run.
struct TestImage {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn newest_kernel() -> Option<(PathBuf, String)> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels.pop()?;
    let version = kernel
        .file_name()?
        .to_str()?
        .trim_start_matches("vmlinuz-")
        .to_string();
    Some((kernel, version))
}

/// `names` and everything they depend on, in load order.
fn modules_in_order(version: &str, names: &[&str]) -> Vec<PathBuf> {
    fn visit(version: &str, name: &str, out: &mut Vec<(String, PathBuf)>) {
        if out.iter().any(|(n, _)| n == name) {
            return;
        }
        let info = |field: &str| {
            let output = Command::new("modinfo")
                .args(["-k", version, "-F", field, name])
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).trim().to_string()
        };
        for dependency in info("depends").split(',').filter(|d| !d.is_empty()) {
            visit(version, dependency, out);
        }
        let file = info("filename");
        if file.starts_with('/') {
            out.push((name.to_string(), PathBuf::from(file)));
        }
    }
    let mut out = Vec::new();
    for name in names {
        visit(version, name, &mut out);
    }
    out.into_iter().map(|(_, path)| path).collect()
}

fn test_image() -> &'static TestImage {
    static IMAGE: OnceLock<TestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("bootfleet-image-").tempdir().unwrap();
        let (kernel_src, version) = newest_kernel().expect("a kernel in /boot (linux-image-amd64)");
        let kernel = dir.path().join("vmlinuz");
        std::fs::copy(&kernel_src, &kernel).unwrap();
        let tree = dir.path().join("initramfs");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::create_dir_all(tree.join("m")).unwrap();
        std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
        let mut loads = String::new();
        for (i, module) in modules_in_order(&version, &["virtio_pci", "virtio_net"]).iter().enumerate() {
            let name = format!("{i:02}.ko");
            let bytes = std::fs::read(module).unwrap();
            // Debian may ship compressed modules; busybox insmod wants them plain.
            let plain = match module.extension().and_then(|e| e.to_str()) {
                Some("xz") => Command::new("xz").args(["-dc"]).arg(module).output().unwrap().stdout,
                Some("zst") => Command::new("zstd").args(["-dc"]).arg(module).output().unwrap().stdout,
                _ => bytes,
            };
            std::fs::write(tree.join("m").join(&name), plain).unwrap();
            loads.push_str(&format!("insmod /m/{name}\n"));
        }
        std::fs::write(
            tree.join("init"),
            format!(
                "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmkdir -p /proc /sys /dev\n\
                 mount -t proc proc /proc\nmount -t sysfs sysfs /sys\n{loads}sleep 1\n\
                 for n in /sys/class/net/*; do [ \"${{n##*/}}\" = lo ] || mac=$(cat $n/address); done\n\
                 echo \"{MARKER} mac=$mac cmdline=$(cat /proc/cmdline)\"\npoweroff -f\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(tree.join("init"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let initrd = dir.path().join("initrd.gz");
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}", tree.display(), initrd.display())))
        .unwrap();
        TestImage { _dir: dir, kernel, initrd }
    })
}

/// `kvm` if a guest really runs under KVM here, else `tcg`.
fn accelerator() -> &'static str {
    static ACCEL: OnceLock<&'static str> = OnceLock::new();
    ACCEL.get_or_init(|| {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("qemu: /dev/kvm missing; software emulation (tcg)");
            return "tcg";
        }
        let image = test_image();
        let serial = image._dir.path().join("kvm-probe.serial");
        let _ = Command::new("timeout")
            .args([
                "20",
                "qemu-system-x86_64",
                "-accel",
                "kvm",
                "-m",
                "256",
                "-display",
                "none",
                "-no-reboot",
                "-monitor",
                "none",
            ])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1", "-serial"])
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let works = std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains(MARKER);
        eprintln!(
            "qemu: KVM {}",
            if works {
                "works; using it"
            } else {
                "present but unusable; software emulation (tcg)"
            }
        );
        if works {
            "kvm"
        } else {
            "tcg"
        }
    })
}

/// The boot LAN: a namespace with a bridge, taps, bootfleet, maybe dnsmasq.
struct BootLan {
    dir: tempfile::TempDir,
    server: Option<Child>,
    others: Vec<Child>,
    taps: usize,
}

fn ns_ip(args: &[&str]) {
    let mut all = vec!["-n", NS];
    all.extend_from_slice(args);
    run(Command::new("ip").args(&all)).unwrap();
}

impl BootLan {
    fn new() -> Self {
        // A namespace left by an interrupted run goes first.
        let _ = Command::new("ip")
            .args(["netns", "del", NS])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", NS])).unwrap();
        ns_ip(&["link", "add", "br0", "type", "bridge"]);
        ns_ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "br0"]);
        ns_ip(&["link", "set", "br0", "up"]);
        ns_ip(&["link", "set", "lo", "up"]);
        let dir = tempfile::Builder::new()
            .prefix("bootfleet-lan-")
            .tempdir()
            .unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(boot.join("img")).unwrap();
        let image = test_image();
        std::fs::copy(&image.kernel, boot.join("img/vmlinuz")).unwrap();
        std::fs::copy(&image.initrd, boot.join("img/initrd.gz")).unwrap();
        std::fs::copy("/usr/lib/ipxe/ipxe.efi", boot.join("ipxe.efi")).unwrap();
        std::fs::copy("/usr/lib/ipxe/undionly.kpxe", boot.join("undionly.kpxe")).unwrap();
        BootLan {
            dir,
            server: None,
            others: Vec::new(),
            taps: 0,
        }
    }

    fn boot_dir(&self) -> PathBuf {
        self.dir.path().join("boot")
    }

    fn start(&mut self, dhcp: &[&str]) {
        self.stop();
        let log = self.dir.path().join("server.log");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                NS,
                env!("CARGO_BIN_EXE_bootfleet"),
                "serve",
                "--root",
            ])
            .arg(self.boot_dir())
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .args([
                "--tftp-listen",
                &format!("{SERVER_IP}:69"),
                "--http-listen",
                &format!("{SERVER_IP}:80"),
            ])
            .args(["--dhcp-interface", "br0"])
            .args(dhcp)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("DHCP listening")
        {
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                std::fs::read_to_string(self.dir.path().join("server.err")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Powers on a machine; returns the QEMU process and its serial log.
    fn power_on(&mut self, mac: &str, firmware: Firmware) -> Machine {
        let tap = format!("tap{}", self.taps);
        self.taps += 1;
        ns_ip(&["tuntap", "add", &tap, "mode", "tap"]);
        ns_ip(&["link", "set", &tap, "master", "br0"]);
        ns_ip(&["link", "set", &tap, "up"]);
        let serial = self.dir.path().join(format!("{tap}.serial"));
        let mut command = Command::new("timeout");
        command
            .args([
                "600",
                "ip",
                "netns",
                "exec",
                NS,
                "qemu-system-x86_64",
                "-accel",
                accelerator(),
                "-m",
                "512",
            ])
            .args(["-display", "none", "-no-reboot", "-monitor", "none"])
            .args([
                "-smbios",
                &format!(
                    "type=1,manufacturer=bootfleet test,serial=SN-{}",
                    mac[9..].replace(':', "-").to_uppercase()
                ),
            ])
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            ]);
        match firmware {
            Firmware::BiosIpxe => {
                command.args([
                    "-boot",
                    "n",
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac}"),
                ]);
            }
            Firmware::UefiPxe | Firmware::UefiIpxe => {
                let vars = self.dir.path().join(format!("{tap}.vars.fd"));
                std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
                command
                    .args([
                        "-drive",
                        "if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd",
                    ])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,file={}", vars.display()),
                    ])
                    .args([
                        "-device",
                        &format!(
                            "virtio-net-pci,netdev=n0,mac={mac},bootindex=1{}",
                            // romfile= empty: the firmware's own PXE client
                            // instead of the iPXE ROM's driver.
                            if matches!(firmware, Firmware::UefiPxe) {
                                ",romfile="
                            } else {
                                ""
                            }
                        ),
                    ]);
            }
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Machine {
            mac: mac.to_string(),
            firmware,
            serial,
            child,
            started: Instant::now(),
            powered_on_ms: epoch_ms(),
        }
    }

    /// The boot events bootfleet recorded for `mac` since `since_ms`, one
    /// line each, oldest first, with their time after `since_ms`.
    fn timeline(&self, mac: &str, since_ms: u64) -> Vec<String> {
        let events: Vec<serde_json::Value> =
            serde_json::from_str(&self.api(&format!("/api/v1/events?mac={mac}")))
                .unwrap_or_default();
        let mut events: Vec<(u64, String)> = events
            .iter()
            .filter_map(|event| {
                let at = event["at_ms"].as_u64()?;
                (at >= since_ms).then(|| {
                    (
                        at,
                        format!(
                            "{:>7} {:<7} {:<4} {} ({})",
                            format!("+{:.1}s", (at - since_ms) as f64 / 1000.0),
                            event["phase"].as_str().unwrap_or("?"),
                            event["transport"].as_str().unwrap_or("?"),
                            event["detail"].as_str().unwrap_or(""),
                            event["status"]
                        ),
                    )
                })
            })
            .collect();
        events.sort();
        events.into_iter().map(|(_, line)| line).collect()
    }

    fn api(&self, path: &str) -> String {
        let output = Command::new("ip")
            .args([
                "netns",
                "exec",
                NS,
                "curl",
                "-s",
                "--max-time",
                "5",
                &format!("http://{SERVER_IP}{path}"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for BootLan {
    fn drop(&mut self) {
        self.stop();
        for mut child in self.others.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Any QEMU still running in the namespace goes with it.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns pids {NS} | xargs -r kill -9"))
            .status();
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

#[derive(Clone, Copy, Debug)]
enum Firmware {
    /// SeaBIOS with the iPXE NIC ROM (`ipxe-qemu`).
    BiosIpxe,
    /// OVMF with its own PXE client: TFTP `ipxe.efi`, then iPXE.
    UefiPxe,
    /// OVMF with the iPXE NIC ROM's UEFI driver.
    UefiIpxe,
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What one machine's boot showed.
struct Booted {
    cmdline: String,
    /// Boot events bootfleet recorded for the machine, phase by phase.
    timeline: Vec<String>,
}

impl Booted {
    /// Whether bootfleet recorded `phase` for this machine.
    fn reached(&self, phase: &str) -> bool {
        self.timeline
            .iter()
            .any(|line| line.split_whitespace().nth(1) == Some(phase))
    }
}

struct Machine {
    mac: String,
    firmware: Firmware,
    serial: PathBuf,
    child: Child,
    started: Instant,
    powered_on_ms: u64,
}

impl Machine {
    /// Waits for the marker line; prints the time from power-on to it and
    /// the machine's boot events, and says at which step a machine that
    /// did not boot stopped.
    fn booted(mut self, lan: &BootLan) -> Booted {
        let mut marker_after = None;
        let status = loop {
            let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if marker_after.is_none() && serial.contains(MARKER) {
                marker_after = Some(self.started.elapsed());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let timeline = lan.timeline(&self.mac, self.powered_on_ms);
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let line = serial.lines().find(|l| l.starts_with(MARKER));
        let (Some(line), Some(after)) = (line, marker_after) else {
            panic!(
                "{} ({:?}) did not boot (QEMU {status}); it stopped after the last step below.\n\
                 boot events:\n{}\nserial console:\n{}\nserver log:\n{}",
                self.mac,
                self.firmware,
                timeline.join("\n"),
                tail(&serial),
                tail(&lan.log())
            )
        };
        eprintln!(
            "qemu: {} {:?}: power-on to marker {:.1} s\n  {}",
            self.mac,
            self.firmware,
            after.as_secs_f64(),
            timeline.join("\n  ")
        );
        let mac = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("mac="))
            .unwrap_or("");
        assert_eq!(mac, self.mac, "the marker reports the NIC's MAC: {line}");
        Booted {
            cmdline: line
                .split_once("cmdline=")
                .map(|(_, c)| c.to_string())
                .unwrap_or_default(),
            timeline,
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn tools_present() -> bool {
    let tools = ["qemu-system-x86_64", "cpio", "modinfo", "curl", "dnsmasq"];
    let all = tools.iter().all(|t| have_tool(t));
    let files = [
        "/usr/lib/ipxe/ipxe.efi",
        "/usr/lib/ipxe/qemu/efi-virtio.rom",
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/bin/busybox",
    ];
    let missing: Vec<&&str> = files.iter().filter(|f| !Path::new(f).exists()).collect();
    if !missing.is_empty() {
        let message = format!("REQUIRED FILES MISSING: {missing:?} (packages ipxe, ipxe-qemu, ovmf, busybox-static); install with tests/run-all.sh");
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        eprintln!("\n*** SKIPPED: {message} ***\n");
    }
    all && missing.is_empty() && newest_kernel().is_some()
}

const INVENTORY: &str = r#"
[unknown]
policy = "wait"
poll_seconds = 3

[images.alpha]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=alpha"

[images.beta]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=beta"

[images.over-tftp]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=tftp"
transport = "tftp"

[machines."52:54:00:b0:00:01"]
image = "alpha"
cmdline_append = "bootfleet.node=one"

[machines."52:54:00:b0:00:02"]
image = "beta"
cmdline_append = "bootfleet.node=two"

[machines."52:54:00:b0:00:03"]
image = "over-tftp"
cmdline_append = "bootfleet.node=three"

[machines."52:54:00:b0:00:10"]
image = "alpha"
cmdline_append = "bootfleet.node=uefi"

[machines."52:54:00:b0:00:11"]
image = "alpha"
cmdline_append = "bootfleet.node=uefi-ipxe"

[machines."52:54:00:b0:00:20"]
image = "beta"
cmdline_append = "bootfleet.node=proxied"
"#;

#[test]
fn machines_boot_end_to_end_through_bootfleet_alone() {
    if !can_make_namespaces() || !tools_present() {
        return;
    }
    let mut lan = BootLan::new();
    std::fs::write(lan.boot_dir().join("inventory.toml"), INVENTORY).unwrap();
    // The classic layout: one machine with its own .gpxe script.
    std::fs::write(
        lan.boot_dir().join("52:54:00:b0:00:04.gpxe"),
        "#!gpxe\nkernel http://${next-server}/img/vmlinuz console=ttyS0 quiet panic=-1 bootfleet.static=yes\n\
         initrd http://${next-server}/img/initrd.gz\nboot\n",
    )
    .unwrap();
    lan.start(&[
        "--dhcp-mode",
        "full",
        "--dhcp-range",
        "10.99.0.100-10.99.0.200",
    ]);

    // Seven machines powered on at the same moment: two BIOS machines with
    // two images, one whose image comes over TFTP, one with a static
    // .gpxe, one unknown that waits for an assignment, and two UEFI ones
    // (firmware PXE → TFTP ipxe.efi → iPXE; iPXE ROM driver).
    let stranger = "52:54:00:b0:00:05";
    let machines: Vec<Machine> = [
        ("52:54:00:b0:00:01", Firmware::BiosIpxe),
        ("52:54:00:b0:00:02", Firmware::BiosIpxe),
        ("52:54:00:b0:00:03", Firmware::BiosIpxe),
        ("52:54:00:b0:00:04", Firmware::BiosIpxe),
        (stranger, Firmware::BiosIpxe),
        ("52:54:00:b0:00:10", Firmware::UefiPxe),
        ("52:54:00:b0:00:11", Firmware::UefiIpxe),
    ]
    .into_iter()
    .map(|(mac, firmware)| lan.power_on(mac, firmware))
    .collect();

    // The unknown machine shows up as discovered; then it is assigned,
    // with no restart of bootfleet.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !lan.api("/api/v1/discovered").contains(stranger) {
        assert!(
            Instant::now() < deadline,
            "unknown machine never discovered\n{}",
            tail(&lan.log())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let discovered = lan.api("/api/v1/discovered");
    assert!(
        discovered.contains("\"platform\": \"pcbios\""),
        "facts recorded: {discovered}"
    );
    assert!(
        discovered.contains("\"serial\": \"SN-B0-00-05\""),
        "facts recorded: {discovered}"
    );
    std::fs::write(
        lan.boot_dir().join("inventory.toml"),
        format!("{INVENTORY}\n[machines.\"{stranger}\"]\nimage = \"beta\"\ncmdline_append = \"bootfleet.node=five\"\n"),
    )
    .unwrap();

    // Each machine booted its own image with its own command line, and
    // bootfleet saw every step of its chain.
    for machine in machines {
        let mac = machine.mac.clone();
        let firmware = machine.firmware;
        let booted = machine.booted(&lan);
        let expected: &[&str] = match &mac[12..] {
            "00:01" => &["bootfleet.image=alpha", "bootfleet.node=one"],
            "00:02" => &["bootfleet.image=beta", "bootfleet.node=two"],
            "00:03" => &["bootfleet.image=tftp", "bootfleet.node=three"],
            "00:04" => &["bootfleet.static=yes"],
            "00:05" => &["bootfleet.image=beta", "bootfleet.node=five"],
            "00:10" => &["bootfleet.image=alpha", "bootfleet.node=uefi"],
            _ => &["bootfleet.image=alpha", "bootfleet.node=uefi-ipxe"],
        };
        for needle in expected {
            assert!(
                booted.cmdline.contains(needle),
                "{mac}: {needle} missing from {}",
                booted.cmdline
            );
        }
        for phase in ["dhcp", "chain", "script", "kernel", "initrd"] {
            assert!(
                booted.reached(phase),
                "{mac} ({firmware:?}): no {phase} event:\n{}",
                booted.timeline.join("\n")
            );
        }
        if mac.ends_with("00:03") {
            assert!(
                booted.timeline.iter().any(|l| l.contains("kernel  tftp")),
                "kernel over TFTP: {}",
                booted.timeline.join("\n")
            );
        }
        if matches!(firmware, Firmware::UefiPxe) {
            assert!(
                booted.timeline.iter().any(|l| l.contains("UefiX64")),
                "the firmware's PXE request was seen as UEFI x64: {}",
                booted.timeline.join("\n")
            );
            assert!(
                booted
                    .timeline
                    .iter()
                    .any(|l| l.contains("loader  tftp ipxe.efi (200)")),
                "the firmware fetched ipxe.efi over TFTP: {}",
                booted.timeline.join("\n")
            );
        }
    }

    // ProxyDHCP: dnsmasq gives the addresses, bootfleet only the boot answer.
    lan.stop();
    let dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            NS,
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=br0",
            "--bind-interfaces",
        ])
        .args([
            "--dhcp-range=10.99.0.50,10.99.0.60,1h",
            "--user=root",
            "--pid-file=",
            &format!(
                "--dhcp-leasefile={}",
                lan.dir.path().join("dnsmasq.leases").display()
            ),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lan.others.push(dnsmasq);
    std::thread::sleep(Duration::from_millis(500));
    lan.start(&["--dhcp-mode", "proxy"]);
    let booted = lan
        .power_on("52:54:00:b0:00:20", Firmware::BiosIpxe)
        .booted(&lan);
    assert!(
        booted.cmdline.contains("bootfleet.image=beta")
            && booted.cmdline.contains("bootfleet.node=proxied"),
        "{}",
        booted.cmdline
    );
    assert!(
        booted.timeline.iter().any(|l| l.contains("proxy")),
        "bootfleet answered as a proxy: {}",
        booted.timeline.join("\n")
    );
    for phase in ["dhcp", "chain", "script", "kernel", "initrd"] {
        assert!(
            booted.reached(phase),
            "proxied machine: no {phase} event:\n{}",
            booted.timeline.join("\n")
        );
    }
    let leases = std::fs::read_to_string(lan.dir.path().join("dnsmasq.leases")).unwrap_or_default();
    assert!(
        leases.contains("52:54:00:b0:00:20"),
        "dnsmasq gave the address: {leases:?}"
    );
}
