//! A boot LAN with real machines, shared by the end-to-end test
//! (`qemu_boot`) and the boot-time benchmark (`benches/boot_compare.rs`):
//! a network namespace the harness makes and removes, a bridge with one tap
//! per QEMU virtual machine, bootfleet (or the reference dnsmasq + nginx
//! stack) serving on it, and the machines' firmware: SeaBIOS with the iPXE
//! NIC ROM (`ipxe-qemu`), UEFI (OVMF) with its own PXE client fetching
//! Debian's `ipxe.efi` over TFTP, and UEFI with the iPXE ROM's driver.
//!
//! The image is built here: Debian's kernel (`linux-image-amd64`) and a
//! busybox initramfs whose init loads the NIC driver, prints one marker
//! line with the MAC address read from the NIC and `/proc/cmdline`, and
//! powers off.
//!
//! KVM is used when it actually works and software emulation otherwise:
//! `/dev/kvm` can open and still not run a guest (nested virtualisation
//! without the CPU features, as on this project's CI machines), so the
//! harness boots its image directly (`-kernel`) under KVM once and keeps KVM
//! only if the marker line appears within 20 seconds.
//!
//! Everything is removed when the [`BootLan`] is dropped, also when a test
//! fails; a namespace left by an interrupted run is removed at the start of
//! the next.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::*;

pub const NS: &str = "bfqemu";
pub const SERVER_IP: &str = "10.99.0.1";
/// The control panel, on the namespace's loopback (never on the boot LAN).
pub const PANEL: &str = "127.0.0.1:9090";
pub const MARKER: &str = "BOOTFLEET-BOOTED";
/// bootfleet as the LAN's only DHCP server, leasing from this range.
pub const FULL_DHCP: [&str; 4] = [
    "--dhcp-mode",
    "full",
    "--dhcp-range",
    "10.99.0.100-10.99.0.200",
];
/// Printed by the test image after it ran the check-in hook (`rc=0`: it
/// checked in), when its command line carried a check-in URL.
pub const CHECKED_IN: &str = "BOOTFLEET-CHECKIN";

/// The kernel and the marker initramfs, built once per run.
struct TestImage {
    _dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
}

/// The newest kernel in `/boot` and its version.
pub fn newest_kernel() -> Option<(PathBuf, String)> {
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
                 mount -t proc proc /proc\nmount -t sysfs sysfs /sys\nmount -t devtmpfs dev /dev\n{loads}sleep 1\n\
                 for n in /sys/class/net/*; do [ \"${{n##*/}}\" = lo ] || {{ mac=$(cat $n/address); nic=${{n##*/}}; }}; done\n\
                 echo \"{MARKER} mac=$mac cmdline=$(cat /proc/cmdline)\"\n\
                 case \"$(cat /proc/cmdline)\" in *bootfleet.checkin=*)\n\
                 ip link set $nic up; udhcpc -i $nic -q -n -t 10 -s /bin/udhcpc.script >/dev/null 2>&1\n\
                 BOOTFLEET_CHECKIN_DELAY=1 /bin/bootfleet-checkin; echo \"{CHECKED_IN} rc=$?\";; esac\n\
                 poweroff -f\n"
            ),
        )
        .unwrap();
        // The check-in hook as the repository ships it, and what udhcpc
        // runs to put the leased address on the NIC.
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/checkin/bootfleet-checkin"),
            tree.join("bin/bootfleet-checkin"),
        )
        .unwrap();
        std::fs::write(
            tree.join("bin/udhcpc.script"),
            "#!/bin/busybox sh\ncase \"$1\" in bound|renew) ifconfig $interface $ip netmask ${subnet:-255.255.255.0} up;; esac\n",
        )
        .unwrap();
        for script in ["init", "bin/udhcpc.script", "bin/bootfleet-checkin"] {
            std::fs::set_permissions(tree.join(script), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let initrd = dir.path().join("initrd.gz");
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("cd {} && find . | cpio -o -H newc 2>/dev/null | gzip -1 > {}", tree.display(), initrd.display())))
        .unwrap();
        TestImage { _dir: dir, kernel, initrd }
    })
}

/// `kvm` if a guest really runs under KVM here, else `tcg`.
pub fn accelerator() -> &'static str {
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
pub struct BootLan {
    pub dir: tempfile::TempDir,
    server: Option<Child>,
    /// Other servers on the LAN (dnsmasq, nginx), stopped with it.
    pub others: Vec<Child>,
    taps: usize,
    /// An admin API token for the control panel (made on first start).
    token: Option<String>,
    /// The iPXE option ROM BIOS machines' NICs carry instead of
    /// `ipxe-qemu`'s ([`Self::use_patched_ipxe`]).
    nic_rom: Option<PathBuf>,
    /// ROMs of single machines, by MAC ([`Self::set_nic_rom`]).
    nic_roms: std::collections::HashMap<String, PathBuf>,
    /// One boot LAN at a time: the tests that use one run in parallel
    /// threads of one binary, and the namespace has one name.
    _exclusive: std::sync::MutexGuard<'static, ()>,
}

static ONE_LAN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Kills whatever still runs in the LAN's namespace (QEMU, servers) and
/// removes it.
fn remove_namespace() {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!("ip netns pids {NS} 2>/dev/null | xargs -r kill -9"))
        .status();
    let _ = Command::new("ip")
        .args(["netns", "del", NS])
        .stderr(Stdio::null())
        .status();
}

fn ns_ip(args: &[&str]) {
    let mut all = vec!["-n", NS];
    all.extend_from_slice(args);
    run(Command::new("ip").args(&all)).unwrap();
}

impl BootLan {
    pub fn new() -> Self {
        let exclusive = ONE_LAN_AT_A_TIME
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // A namespace left by an interrupted run goes first, with the
        // machines and servers still running in it.
        remove_namespace();
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
            token: None,
            nic_rom: None,
            nic_roms: Default::default(),
            _exclusive: exclusive,
        }
    }

    pub fn boot_dir(&self) -> PathBuf {
        self.dir.path().join("boot")
    }

    /// Machines get the multicast-fixed iPXE of `bin` ([`patched_ipxe`]):
    /// BIOS machines as their NIC's option ROM, UEFI ones as the
    /// `ipxe.efi` their firmware fetches; `undionly.kpxe` too.
    pub fn use_patched_ipxe(&mut self, bin: &Path) {
        for loader in ["ipxe.efi", "undionly.kpxe"] {
            std::fs::copy(bin.join(loader), self.boot_dir().join(loader)).unwrap();
        }
        self.nic_rom = Some(bin.join("1af41000.rom"));
    }

    /// The BIOS machine `mac`'s NIC carries `rom` as its option ROM (an
    /// iPXE flashed into the NIC: the write-up's method 2).
    pub fn set_nic_rom(&mut self, mac: &str, rom: &Path) {
        self.nic_roms.insert(mac.to_string(), rom.to_path_buf());
    }

    /// Lets RFC 2090 multicast reach the machines: groups routed over the
    /// bridge, and no IGMP snooping (iPXE sends no joins).
    pub fn enable_multicast(&mut self) {
        ns_ip(&[
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ns_ip(&["route", "add", "224.0.0.0/4", "dev", "br0"]);
    }

    pub fn start(&mut self, dhcp: &[&str]) {
        self.start_with_panel(PANEL, dhcp);
    }

    /// [`Self::start`] with the panel on `panel` (e.g. every address of
    /// the namespace, so that booted machines can check in on the bridge;
    /// the API is still called on [`PANEL`]).
    pub fn start_with_panel(&mut self, panel: &str, dhcp: &[&str]) {
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
            .args(["--panel-listen", panel])
            .args(dhcp)
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.server = Some(child);
        wait_for_log(
            &log,
            &["DHCP listening"],
            &self.dir.path().join("server.err"),
        );
        if self.token.is_none() {
            // The real command line, on the server's database file.
            let output = Command::new(env!("CARGO_BIN_EXE_bootfleet"))
                .args([
                    "tokens",
                    "add",
                    "qemu-test",
                    "--scope",
                    "admin",
                    "--state-dir",
                ])
                .arg(self.dir.path().join("state"))
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            self.token = Some(String::from_utf8(output.stdout).unwrap().trim().to_string());
        }
    }

    /// bootfleet with [`FULL_DHCP`], `config` if given, and the panel on
    /// every address of the namespace, so that booted machines can check
    /// in on the bridge (the tests still call it on [`PANEL`]).
    pub fn start_with_checkin(&mut self, config: Option<&Path>) {
        let config = config.map(|c| c.display().to_string());
        let mut arguments: Vec<&str> = FULL_DHCP.to_vec();
        if let Some(config) = &config {
            arguments.extend(["--config", config]);
        }
        self.start_with_panel("0.0.0.0:9090", &arguments);
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// dnsmasq as the LAN's DHCP server for addresses only (10.99.0.50-60,
    /// leases in `dnsmasq.leases` in the LAN's directory), for bootfleet
    /// in proxy mode beside it.
    pub fn start_address_server(&mut self) {
        let leases = format!(
            "--dhcp-leasefile={}",
            self.dir.path().join("dnsmasq.leases").display()
        );
        self.spawn_other(
            "dnsmasq",
            &[
                "-k",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--dhcp-range=10.99.0.50,10.99.0.60,1h",
                "--user=root",
                "--pid-file=",
                &leases,
            ],
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Starts `program` inside the LAN's namespace as one of its other
    /// servers (output to `NAME.log` in the LAN's directory).
    pub fn spawn_other(&mut self, program: &str, args: &[&str]) {
        let name = Path::new(program)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", NS, program])
            .args(args)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.others.push(child);
    }

    /// Stops the other servers.
    pub fn stop_others(&mut self) {
        for mut child in self.others.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The stack most sites run today, for comparison: dnsmasq (DHCP with
    /// the same boot answers, and TFTP) and nginx serving the boot files
    /// and `scripts` (path, body) as static files, as in the classic
    /// per-MAC layout; nginx runs as one process (no master), so that
    /// stopping it frees port 80. bootfleet is stopped first.
    pub fn start_reference(&mut self, scripts: &[(String, String)]) {
        self.stop();
        let dir = self.dir.path().to_path_buf();
        let web = dir.join("reference-web");
        std::fs::create_dir_all(web.join("boot")).unwrap();
        for (path, body) in scripts {
            std::fs::write(web.join(path), body).unwrap();
        }
        let _ = std::os::unix::fs::symlink(self.boot_dir().join("img"), web.join("img"));
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\nmaster_process off;\ndaemon off;\nerror_log stderr;\npid {dir}/nginx.pid;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ sendfile on; tcp_nopush on; access_log off; default_type application/octet-stream;\n\
                 types {{ text/plain ipxe; }}\n\
                 server {{ listen {SERVER_IP}:80; root {web}; location / {{ }} }} }}\n",
                dir = dir.display(),
                web = web.display()
            ),
        )
        .unwrap();
        let conf = conf.display().to_string();
        let prefix = dir.display().to_string();
        self.spawn_other("/usr/sbin/nginx", &["-c", &conf, "-p", &prefix]);
        let tftp_root = format!("--tftp-root={}", self.boot_dir().display());
        let leases = format!(
            "--dhcp-leasefile={}",
            dir.join("reference.leases").display()
        );
        let script_url = format!("--dhcp-boot=tag:ipxe,http://{SERVER_IP}/boot.ipxe");
        self.spawn_other(
            "dnsmasq",
            &[
                "-k",
                "--conf-file=/dev/null",
                "--port=0",
                "--interface=br0",
                "--bind-interfaces",
                "--dhcp-range=10.99.0.100,10.99.0.200,1h",
                "--enable-tftp",
                &tftp_root,
                "--dhcp-userclass=set:ipxe,iPXE",
                "--dhcp-match=set:efi64,option:client-arch,7",
                &script_url,
                "--dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi",
                "--dhcp-boot=tag:!ipxe,tag:!efi64,undionly.kpxe",
                "--user=root",
                "--pid-file=",
                &leases,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.api("/boot.ipxe").starts_with("#!ipxe") {
            assert!(Instant::now() < deadline, "reference stack did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Powers on a machine; returns the QEMU process and its serial log.
    pub fn power_on(&mut self, mac: &str, firmware: Firmware) -> Machine {
        let (mut command, serial) = self.machine_command(mac, firmware);
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

    /// The command that runs a machine on a new tap of the bridge (in
    /// the namespace, for at most 10 minutes), and its serial log.
    pub fn machine_command(&mut self, mac: &str, firmware: Firmware) -> (Command, PathBuf) {
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
                let rom = self
                    .nic_roms
                    .get(mac)
                    .or(self.nic_rom.as_ref())
                    .map_or(String::new(), |rom| format!(",romfile={}", rom.display()));
                command.args([
                    "-boot",
                    "n",
                    "-device",
                    &format!("virtio-net-pci,netdev=n0,mac={mac}{rom}"),
                ]);
            }
            Firmware::UefiPxe
            | Firmware::UefiIpxe
            | Firmware::UefiSecureBoot
            | Firmware::UefiHttp => {
                let vars = self.dir.path().join(format!("{tap}.vars.fd"));
                // Secure Boot: the SMM build with Microsoft's keys enrolled
                // (Debian's shim is signed by its UEFI CA), on q35 with SMM,
                // whose flash only SMM may write.
                let (code, vars_template) = if matches!(firmware, Firmware::UefiSecureBoot) {
                    command.args([
                        "-machine",
                        "q35,smm=on",
                        "-global",
                        "driver=cfi.pflash01,property=secure,value=on",
                    ]);
                    ("OVMF_CODE_4M.ms.fd", "OVMF_VARS_4M.ms.fd")
                } else {
                    ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd")
                };
                if matches!(firmware, Firmware::UefiHttp) {
                    // OVMF tries PXE over IPv4, then IPv6, then HTTP boot:
                    // without the PXE entries, its HTTP boot client runs.
                    command.args([
                        "-fw_cfg",
                        "name=opt/org.tianocore/IPv4PXESupport,string=n",
                        "-fw_cfg",
                        "name=opt/org.tianocore/IPv6PXESupport,string=n",
                    ]);
                }
                std::fs::copy(format!("/usr/share/OVMF/{vars_template}"), &vars).unwrap();
                command
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/{code}"),
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
                            if !matches!(firmware, Firmware::UefiIpxe) {
                                ",romfile="
                            } else {
                                ""
                            }
                        ),
                    ]);
            }
        }
        (command, serial)
    }

    /// The boot events bootfleet recorded for `mac` since `since_ms`, one
    /// line each, oldest first, with their time after `since_ms`.
    pub fn timeline(&self, mac: &str, since_ms: u64) -> Vec<String> {
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

    /// GETs `path`: `/api/…` from the control panel (with the admin
    /// token), anything else from the data plane.
    pub fn api(&self, path: &str) -> String {
        self.api_send("GET", path, None)
    }

    /// Calls the control panel's API (or the data plane, for other paths)
    /// from inside the LAN's namespace.
    /// The admin API token (once the server was started).
    pub fn token(&self) -> &str {
        self.token.as_deref().expect("the server was started")
    }

    pub fn api_send(&self, method: &str, path: &str, body: Option<&str>) -> String {
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            NS,
            "curl",
            "-s",
            "--max-time",
            "5",
            "-X",
            method,
        ]);
        if path.starts_with("/api/") {
            let token = self.token.as_deref().expect("the server was started");
            command
                .args(["-H", &format!("Authorization: Bearer {token}")])
                .arg(format!("http://{PANEL}{path}"));
        } else {
            command.arg(format!("http://{SERVER_IP}{path}"));
        }
        if let Some(body) = body {
            command.args(["-H", "Content-Type: application/json", "--data", body]);
        }
        let output = command.output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for BootLan {
    fn drop(&mut self) {
        self.stop();
        self.stop_others();
        remove_namespace();
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Firmware {
    /// SeaBIOS with the iPXE NIC ROM (`ipxe-qemu`).
    BiosIpxe,
    /// OVMF with its own PXE client: TFTP `ipxe.efi`, then iPXE.
    UefiPxe,
    /// OVMF with the iPXE NIC ROM's UEFI driver.
    UefiIpxe,
    /// OVMF with Secure Boot on (Microsoft's keys enrolled) and its own
    /// PXE client.
    UefiSecureBoot,
    /// OVMF's UEFI HTTP boot client (its PXE boot options turned off).
    UefiHttp,
}

pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What one machine's boot showed.
pub struct Booted {
    pub cmdline: String,
    /// Seconds from power-on to the marker line.
    pub seconds: f64,
    /// Boot events bootfleet recorded for the machine, phase by phase.
    pub timeline: Vec<String>,
    /// Its serial console, whole.
    pub serial: String,
}

impl Booted {
    /// Whether bootfleet recorded `phase` for this machine.
    pub fn reached(&self, phase: &str) -> bool {
        self.timeline
            .iter()
            .any(|line| line.split_whitespace().nth(1) == Some(phase))
    }
}

pub struct Machine {
    pub mac: String,
    pub firmware: Firmware,
    serial: PathBuf,
    child: Child,
    started: Instant,
    powered_on_ms: u64,
}

impl Machine {
    /// Its serial console so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Pulls the plug: SIGTERM to `timeout`, which hands it to QEMU (a
    /// SIGKILL would end `timeout` alone).
    pub fn kill(mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// Waits for the marker line; prints the time from power-on to it and
    /// the machine's boot events, and says at which step a machine that
    /// did not boot stopped.
    pub fn booted(mut self, lan: &BootLan) -> Booted {
        let mut marker_after = None;
        let status = loop {
            // Whether it exited, asked before the console is read: a
            // machine that prints the marker and powers off between the two
            // is still seen to have printed it.
            let exited = self.child.try_wait().unwrap();
            let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if marker_after.is_none() && serial.contains(MARKER) {
                marker_after = Some(self.started.elapsed());
            }
            if let Some(status) = exited {
                break status;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let serial = std::fs::read_to_string(&self.serial).unwrap_or_default();
        // The server records a check-in a moment after answering it: a
        // machine that says it checked in and powered off at once may be
        // ahead of its event.
        let mut timeline = lan.timeline(&self.mac, self.powered_on_ms);
        let checked_in = serial.contains(&format!("{CHECKED_IN} rc=0"));
        let patience = Instant::now() + Duration::from_secs(5);
        while checked_in
            && Instant::now() < patience
            && !timeline
                .iter()
                .any(|l| l.split_whitespace().nth(1) == Some("checkin"))
        {
            std::thread::sleep(Duration::from_millis(200));
            timeline = lan.timeline(&self.mac, self.powered_on_ms);
        }
        // The marker may follow the loader's last screen codes on its line
        // (GRUB's, with a quiet kernel).
        let line = serial
            .lines()
            .find_map(|l| l.find(MARKER).map(|at| &l[at..]));
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
            seconds: after.as_secs_f64(),
            cmdline: line
                .split_once("cmdline=")
                .map(|(_, c)| c.to_string())
                .unwrap_or_default(),
            timeline,
            serial,
        }
    }
}

/// The multicast-fixed iPXE builds (`1af41000.rom`, `ipxe.efi`,
/// `undionly.kpxe`, checked against their `SHA256SUMS`): from
/// `BOOTFLEET_IPXE_BIN`, else `../shared/ipxe/bin` beside the repository,
/// else `target/ipxe/bin` as `tests/ipxe/build.sh` leaves them. Every
/// iPXE build before the fix drops multicast TFTP data, so the multicast
/// boot tests need one of these; without one they say so loudly (and fail
/// in CI).
pub fn patched_ipxe() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        std::env::var_os("BOOTFLEET_IPXE_BIN").map(PathBuf::from),
        Some(repo.join("../shared/ipxe/bin")),
        Some(repo.join("target/ipxe/bin")),
    ];
    let found = candidates.into_iter().flatten().find(|bin| {
        ["1af41000.rom", "ipxe.efi", "undionly.kpxe", "SHA256SUMS"]
            .iter()
            .all(|f| bin.join(f).is_file())
    });
    let Some(bin) = found else {
        let message = "REQUIRED FILES MISSING: the multicast-fixed iPXE (../shared/ipxe/bin, \
                       BOOTFLEET_IPXE_BIN, or build it with tests/ipxe/build.sh)";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
        return None;
    };
    let checked = Command::new("sha256sum")
        .args(["--check", "--quiet", "--ignore-missing", "SHA256SUMS"])
        .current_dir(&bin)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "the iPXE builds in {} do not match their SHA256SUMS: {}",
        bin.display(),
        String::from_utf8_lossy(&checked.stdout)
    );
    Some(bin)
}

/// An upstream iPXE source tree for `bootfleet ipxe build`:
/// `BOOTFLEET_IPXE_SRC`, else the checked tree `tests/ipxe/build.sh
/// --source-only` keeps in `target/ipxe` (from `../shared/ipxe`, or
/// downloaded and checked). Without one the tests say so loudly (and fail
/// in CI).
pub fn ipxe_source() -> Option<PathBuf> {
    if let Some(tree) = std::env::var_os("BOOTFLEET_IPXE_SRC") {
        return Some(PathBuf::from(tree));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(repo.join("tests/ipxe/build.sh"))
        .arg("--source-only")
        .output()
        .unwrap();
    if !output.status.success() {
        let message = format!(
            "REQUIRED FILES MISSING: no iPXE source tree (BOOTFLEET_IPXE_SRC, or \
             tests/ipxe/build.sh --source-only: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(&message);
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8(output.stdout).unwrap().trim(),
    ))
}

/// Debian's signed shim and GRUB network image (`shimx64.efi`,
/// `grubx64.efi`): from `BOOTFLEET_SECUREBOOT_DIR`, else as
/// `tests/secureboot/fetch.sh` unpacks them from the archive into
/// `target/secureboot`. Without them the tests say so loudly (and fail in
/// CI).
pub fn secure_boot_chain() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BOOTFLEET_SECUREBOOT_DIR") {
        return Some(PathBuf::from(dir));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(repo.join("tests/secureboot/fetch.sh"))
        .output()
        .unwrap();
    if !output.status.success() {
        let message = format!(
            "REQUIRED FILES MISSING: Debian's signed shim and GRUB (BOOTFLEET_SECUREBOOT_DIR, or \
             tests/secureboot/fetch.sh: {})",
            tail(&String::from_utf8_lossy(&output.stderr))
        );
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(&message);
        return None;
    }
    Some(PathBuf::from(
        String::from_utf8(output.stdout).unwrap().trim(),
    ))
}

/// `inventory` with each of `machines` (MAC, image) listed and assigned
/// its image, its command line marked `bootfleet.node=` and the MAC's last
/// two bytes, so that a booted machine shows it got its own config.
pub fn with_machines(inventory: &str, machines: &[(&str, &str)]) -> String {
    let mut inventory = inventory.to_string();
    for (mac, image) in machines {
        inventory.push_str(&format!(
            "\n[machines.\"{mac}\"]\nimage = \"{image}\"\ncmdline_append = \"bootfleet.node={}\"\n",
            &mac[12..].replace(':', "")
        ));
    }
    inventory
}

pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub fn tools_present() -> bool {
    let tools = ["qemu-system-x86_64", "cpio", "modinfo", "curl", "dnsmasq"];
    let all = tools.iter().all(|t| have_tool(t));
    let files = [
        "/usr/lib/ipxe/ipxe.efi",
        "/usr/lib/ipxe/qemu/efi-virtio.rom",
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_CODE_4M.ms.fd",
        "/bin/busybox",
    ];
    let missing: Vec<&&str> = files.iter().filter(|f| !Path::new(f).exists()).collect();
    if !missing.is_empty() {
        let message = format!("REQUIRED FILES MISSING: {missing:?} (packages ipxe, ipxe-qemu, ovmf, busybox-static); install with tests/run-all.sh");
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(&message);
    }
    all && missing.is_empty() && newest_kernel().is_some()
}
