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
            Firmware::UefiPxe => {
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
                    // romfile= empty: the firmware's own PXE client, not iPXE's ROM.
                    .args([
                        "-device",
                        &format!("virtio-net-pci,netdev=n0,mac={mac},romfile=,bootindex=1"),
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
            serial,
            child,
        }
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

#[derive(Clone, Copy)]
enum Firmware {
    BiosIpxe,
    UefiPxe,
}

struct Machine {
    mac: String,
    serial: PathBuf,
    child: Child,
}

impl Machine {
    /// Waits for the marker line and returns the booted command line.
    fn booted(mut self, lan: &BootLan) -> String {
        let status = self.child.wait().unwrap();
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        let line = serial
            .lines()
            .find(|l| l.starts_with(MARKER))
            .unwrap_or_else(|| {
                panic!(
                    "{} did not boot ({status}); serial console:\n{}\nserver log:\n{}",
                    self.mac,
                    tail(&serial),
                    tail(&lan.log())
                )
            });
        let mac = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("mac="))
            .unwrap_or("");
        assert_eq!(mac, self.mac, "the marker reports the NIC's MAC: {line}");
        line.split_once("cmdline=")
            .map(|(_, c)| c.to_string())
            .unwrap_or_default()
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

    // Five machines powered on at the same moment: two images, one over
    // TFTP, one static .gpxe, one unknown that waits for an assignment.
    let stranger = "52:54:00:b0:00:05";
    let machines: Vec<Machine> = [
        "52:54:00:b0:00:01",
        "52:54:00:b0:00:02",
        "52:54:00:b0:00:03",
        "52:54:00:b0:00:04",
        stranger,
    ]
    .iter()
    .map(|mac| lan.power_on(mac, Firmware::BiosIpxe))
    .collect();
    let mut machines = machines.into_iter();
    let (one, two, three, four, five) = (
        machines.next().unwrap(),
        machines.next().unwrap(),
        machines.next().unwrap(),
        machines.next().unwrap(),
        machines.next().unwrap(),
    );

    // The unknown machine shows up as discovered; then it is assigned.
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

    let cmdline = one.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=alpha") && cmdline.contains("bootfleet.node=one"),
        "{cmdline}"
    );
    let cmdline = two.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=beta") && cmdline.contains("bootfleet.node=two"),
        "{cmdline}"
    );
    let cmdline = three.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=tftp") && cmdline.contains("bootfleet.node=three"),
        "{cmdline}"
    );
    let cmdline = four.booted(&lan);
    assert!(cmdline.contains("bootfleet.static=yes"), "{cmdline}");
    let cmdline = five.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=beta") && cmdline.contains("bootfleet.node=five"),
        "{cmdline}"
    );
    let events = lan.api("/api/v1/events?mac=52:54:00:b0:00:03");
    assert!(
        events.contains("\"transport\": \"tftp\"") && events.contains("\"phase\": \"kernel\""),
        "kernel over TFTP: {events}"
    );

    // UEFI: the firmware's own PXE client → TFTP ipxe.efi → iPXE → HTTP.
    let uefi = lan.power_on("52:54:00:b0:00:10", Firmware::UefiPxe);
    let cmdline = uefi.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=alpha") && cmdline.contains("bootfleet.node=uefi"),
        "{cmdline}"
    );
    let events = lan.api("/api/v1/events?mac=52:54:00:b0:00:10");
    assert!(
        events.contains("UefiX64") && events.contains("ipxe.efi"),
        "firmware was given ipxe.efi: {events}"
    );

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
            "--dhcp-leasefile=/dev/null",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    lan.others.push(dnsmasq);
    std::thread::sleep(Duration::from_millis(500));
    lan.start(&["--dhcp-mode", "proxy"]);
    let proxied = lan.power_on("52:54:00:b0:00:20", Firmware::BiosIpxe);
    let cmdline = proxied.booted(&lan);
    assert!(
        cmdline.contains("bootfleet.image=beta") && cmdline.contains("bootfleet.node=proxied"),
        "{cmdline}"
    );
    let events = lan.api("/api/v1/events?mac=52:54:00:b0:00:20");
    assert!(
        events.contains("proxy"),
        "bootfleet answered as a proxy: {events}"
    );
}
