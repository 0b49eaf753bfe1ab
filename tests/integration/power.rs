//! Power control through real BMC emulators, on the boot LAN of
//! [`crate::qemu_lan`]:
//!
//! * IPMI: OpenIPMI's `ipmi_sim` is the BMC of two QEMU machines (QEMU's
//!   `ipmi-bmc-extern`, so the BMC's power commands start and stop the
//!   VM); bootfleet, driven by its own command line, powers both on over
//!   IPMI-over-LAN; they netboot their image, run the check-in hook the
//!   repository ships, and are shown booted.
//! * Redfish: sushy-tools' emulator with its libvirt backend, libvirtd
//!   run inside the LAN's namespace so that its QEMU machines sit on the
//!   LAN's bridge: bootfleet sets a one-time PXE boot and powers two
//!   domains on; they netboot and check in.
//!
//! Both also check what an operator sees when a BMC is wrong: a bad
//! password, a BMC that does not answer, each failing alone.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::qemu_lan::*;

const INVENTORY: &str = r#"
[images.alpha]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1"

[machines."52:54:00:c0:00:01"]
image = "alpha"

[machines."52:54:00:c0:00:02"]
image = "alpha"

[machines."52:54:00:c0:00:03"]
image = "alpha"

[machines."52:54:00:c0:00:04"]
image = "alpha"

[machines."52:54:00:c0:00:05"]
image = "alpha"

[machines."52:54:00:c0:00:11"]
image = "alpha"

[machines."52:54:00:c0:00:12"]
image = "alpha"

[machines."52:54:00:c0:00:13"]
image = "alpha"

[machines."52:54:00:c0:00:14"]
image = "alpha"

[machines."52:54:00:c0:00:15"]
image = "alpha"
"#;

/// Runs `bootfleet ARGS` inside the LAN's namespace against its panel,
/// with `stdin`; (success, stdout, stderr).
fn cli(lan: &BootLan, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", NS, env!("CARGO_BIN_EXE_bootfleet")])
        .args(args)
        .env("BOOTFLEET_URL", format!("http://{PANEL}"))
        .env("BOOTFLEET_TOKEN", lan.token())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    eprintln!("$ bootfleet {}\n{out}{err}", args.join(" "));
    (output.status.success(), out, err)
}

/// `bootfleet machines set MAC --bmc URL`, the password on standard input
/// when given, and `--bmc-kg-file` when given.
fn set_bmc(
    lan: &BootLan,
    mac: &str,
    url: &str,
    password: Option<&str>,
    kg_file: Option<&Path>,
) -> (bool, String, String) {
    let kg_file = kg_file.map(|f| f.display().to_string());
    let mut arguments = vec!["machines", "set", mac, "--bmc", url];
    if password.is_some() {
        arguments.push("--bmc-password-stdin");
    }
    if let Some(file) = &kg_file {
        arguments.extend(["--bmc-kg-file", file]);
    }
    cli(lan, &arguments, &format!("{}\n", password.unwrap_or("")))
}

/// `command` as one shell line (each word single-quoted).
fn shell_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| format!("'{}'", word.to_string_lossy().replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts an `ipmi_sim` BMC in the LAN's namespace: IPMI over LAN on
/// 127.0.0.1:`lan_port` (user `admin`, password `s3cret`), and the VM
/// link on `vm_port` that QEMU's `ipmi-bmc-extern` connects to; powering
/// on runs `machine` (with that link added). With `kg_key`, the BMC wants
/// that K_g key in every session's set-up.
fn start_ipmi_sim(
    lan: &mut BootLan,
    name: &str,
    (lan_port, vm_port): (u16, u16),
    kg_key: Option<&str>,
    machine: Command,
) {
    let dir = lan.dir.path().join(name);
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let mut machine = machine;
    machine.args([
        "-chardev",
        &format!("socket,id=ipmi0,host=127.0.0.1,port={vm_port},reconnect=1"),
        "-device",
        "ipmi-bmc-extern,chardev=ipmi0,id=bmc0",
        "-device",
        "isa-ipmi-kcs,bmc=bmc0",
    ]);
    let start = shell_line(&machine).replace('"', "\\\"");
    let kg_line = kg_key.map_or(String::new(), |kg| format!("    bmc_key \"{kg}\"\n"));
    std::fs::write(
        dir.join("lan.conf"),
        format!(
            "name \"{name}\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 {lan_port}\n    priv_limit admin\n\
             \x20   allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
             \x20   allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
             \x20   guid a123456789abcdefa123456789abcdef\n{kg_line}  endlan\n\
             \x20 serial 15 127.0.0.1 {vm_port} codec VM\n  startcmd \"{start}\"\n  startnow false\n\
             \x20 poweroff_wait 5\n  kill_wait 5\n\
             \x20 user 2 true \"admin\" \"s3cret\" admin 10 none md2 md5 straight\n"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("bmc.emu"),
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
    )
    .unwrap();
    let conf = dir.join("lan.conf").display().to_string();
    let emu = dir.join("bmc.emu").display().to_string();
    let state = dir.join("state").display().to_string();
    lan.spawn_other(
        "/usr/bin/ipmi_sim",
        &["-c", &conf, "-f", &emu, "-s", &state, "-n"],
    );
}

fn ipmi_tools_present() -> bool {
    let present = have_tool("ipmi_sim") && have_tool("ipmitool");
    if !present {
        let message = "REQUIRED TOOLS MISSING: ipmi_sim and ipmitool (Debian openipmi, ipmitool); install with tests/run-all.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
    }
    present
}

/// Asserts that `bootfleet power`'s line for each MAC says what is expected.
fn assert_machine_lines(out: &str, expected: &[(&str, &str)]) {
    for (mac, says) in expected {
        let line = out
            .lines()
            .find(|l| l.starts_with(mac))
            .unwrap_or_else(|| panic!("no line for {mac} in {out}"));
        assert!(line.contains(says), "{out}");
    }
}

/// Waits for each machine's hook to check in (within a minute), and
/// asserts it did and the panel shows it booted; each one's console and
/// machine record.
fn booted_and_checked_in(
    lan: &BootLan,
    macs: &[&str],
    serials: &[std::path::PathBuf],
) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    macs.iter()
        .zip(serials)
        .map(|(mac, serial)| {
            let console = wait_for_checkin(lan, serial, mac, deadline);
            assert!(console.contains(&format!("{CHECKED_IN} rc=0")), "{console}");
            let machine = lan.api(&format!("/api/v1/machines/{mac}"));
            assert!(machine.contains(r#""state":"booted""#), "{machine}");
            (console, machine)
        })
        .collect()
}

/// Waits until the machine's serial console shows the check-in result.
fn wait_for_checkin(lan: &BootLan, serial: &Path, mac: &str, deadline: Instant) -> String {
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        if text.contains(CHECKED_IN) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{mac} never ran its check-in hook.\nserial:\n{}\nserver log:\n{}",
            tail(&text),
            tail(&lan.log())
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The K_g key of the second IPMI BMC.
const RACK_KG: &str = "rack3-kg-key";

#[test]
fn ipmi_sim_bmcs_power_on_machines_that_netboot_and_check_in() {
    if !can_make_namespaces() || !tools_present() || !ipmi_tools_present() {
        return;
    }
    let mut lan = BootLan::new();
    std::fs::write(lan.boot_dir().join("inventory.toml"), INVENTORY).unwrap();
    lan.start_with_checkin(None);
    let macs = ["52:54:00:c0:00:01", "52:54:00:c0:00:02"];
    let mut serials = Vec::new();
    for (i, mac) in macs.iter().enumerate() {
        let (machine, serial) = lan.machine_command(mac, Firmware::BiosIpxe);
        serials.push(serial);
        let port = 9623 + i as u16;
        // The second BMC wants a K_g key too, given from a file.
        let kg = (i == 1).then_some(RACK_KG);
        start_ipmi_sim(
            &mut lan,
            &format!("bmc{i}"),
            (port, 9002 + i as u16),
            kg,
            machine,
        );
        let url = format!("ipmi://admin@127.0.0.1:{port}");
        let kg_file = lan.dir.path().join("rack.kg");
        std::fs::write(&kg_file, format!("{RACK_KG}\n")).unwrap();
        // The password on standard input, as an operator would give it.
        let kg_file = kg.map(|_| kg_file.as_path());
        let (ok, out, err) = set_bmc(&lan, mac, &url, Some("s3cret"), kg_file);
        assert!(ok, "{out}{err}");
        assert!(
            out.contains(&format!("bmc\tipmi://admin@127.0.0.1:{port}")),
            "{out}"
        );
    }
    // A wrong password and a BMC nobody answers at: each fails alone.
    let (ok, _, err) = set_bmc(
        &lan,
        "52:54:00:c0:00:03",
        "ipmi://admin:wrong@127.0.0.1:9623",
        None,
        None,
    );
    assert!(ok, "{err}");
    let (ok, _, err) = set_bmc(
        &lan,
        "52:54:00:c0:00:04",
        "ipmi://admin:s3cret@127.0.0.1:9699",
        None,
        None,
    );
    assert!(ok, "{err}");
    // The right password for the K_g BMC, but no K_g key.
    let (ok, _, err) = set_bmc(
        &lan,
        "52:54:00:c0:00:05",
        "ipmi://admin:s3cret@127.0.0.1:9624",
        None,
        None,
    );
    assert!(ok, "{err}");

    // Never in the API, never in the database in the clear.
    let listed = lan.api("/api/v1/machines");
    assert!(
        listed.contains("ipmi://admin@127.0.0.1:9623") && !listed.contains("s3cret"),
        "{listed}"
    );
    let database = std::fs::read(lan.dir.path().join("state/bootfleet.db")).unwrap();
    assert!(
        !database.windows(6).any(|w| w == b"s3cret"),
        "the BMC password is in the database in the clear"
    );
    assert!(
        !database
            .windows(RACK_KG.len())
            .any(|w| w == RACK_KG.as_bytes()),
        "the K_g key is in the database in the clear"
    );

    let started = Instant::now();
    let (ok, out, err) = cli(
        &lan,
        &[
            "power",
            "on",
            macs[0],
            macs[1],
            "52:54:00:c0:00:03",
            "52:54:00:c0:00:04",
            "52:54:00:c0:00:05",
            "--waves",
            "all",
            "--deadline",
            "300",
        ],
        "",
    );
    eprintln!(
        "power on to the last check-in: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!ok, "three of the five BMCs cannot work: {out}{err}");
    assert!(err.contains("3 machine(s) failed"), "{err}");
    assert_machine_lines(
        &out,
        &[
            (macs[0], "\tup\tchecked in"),
            (macs[1], "\tup\tchecked in"),
            ("52:54:00:c0:00:03", "refused the user name or password"),
            ("52:54:00:c0:00:04", "is unreachable"),
            ("52:54:00:c0:00:05", "wants a K_g key"),
        ],
    );
    for (console, machine) in booted_and_checked_in(&lan, &macs, &serials) {
        assert!(console.contains("bootfleet.token="), "{console}");
        assert!(
            machine.contains(r#""phase":"power""#) && machine.contains(r#""phase":"checkin""#),
            "{machine}"
        );
    }
    let audit = lan.api("/api/v1/audit");
    assert!(
        audit.contains("power.on")
            && !audit.contains("s3cret")
            && !audit.contains("wrong")
            && !audit.contains(RACK_KG),
        "{audit}"
    );
}

fn redfish_tools_present() -> bool {
    let tools = ["libvirtd", "virtlogd", "virsh", "sushy-emulator"];
    let bcrypt = Command::new("python3")
        .args(["-c", "import bcrypt"])
        .status()
        .is_ok_and(|s| s.success());
    let present = tools.iter().all(|t| have_tool(t)) && bcrypt;
    if !present {
        let message = "REQUIRED TOOLS MISSING: libvirtd, virtlogd, virsh (Debian libvirt-daemon-system) and sushy-emulator with bcrypt (PyPI sushy-tools, libvirt-python, bcrypt); install with tests/run-all.sh";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
    }
    present
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap()
}

/// libvirt domains the test defined; destroyed and undefined when dropped
/// (also when the test fails), and before the test, in case an
/// interrupted run left them.
struct Domains(Vec<String>);

impl Domains {
    fn remove(names: &[String]) {
        for name in names {
            let _ = virsh(&["destroy", name]);
            let _ = virsh(&["undefine", name, "--nvram"]);
            let _ = virsh(&["undefine", name]);
        }
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        Domains::remove(&self.0);
    }
}

/// A libvirt domain on the LAN's bridge, booting from its disk (it has
/// none) until a one-time PXE boot is set; its serial console to `serial`.
fn domain_xml(name: &str, mac: &str, serial: &Path) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os><on_reboot>destroy</on_reboot>\
         <devices><interface type='bridge'><source bridge='br0'/><mac address='{mac}'/><model type='virtio'/></interface>\
         <serial type='file'><source path='{}'/><target port='0'/></serial></devices>\
         <seclabel type='none'/></domain>",
        serial.display()
    )
}

/// Waits until `check` holds (polling), or panics with `what`.
fn wait_until(what: &str, seconds: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn sushy_tools_redfish_boots_libvirt_machines_once_from_pxe_and_they_check_in() {
    if !can_make_namespaces() || !tools_present() || !redfish_tools_present() {
        return;
    }
    let mut lan = BootLan::new();
    let dir = lan.dir.path().to_path_buf();
    // QEMU under libvirt writes the serial logs here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(lan.boot_dir().join("inventory.toml"), INVENTORY).unwrap();
    let config = dir.join("bootfleet.toml");
    std::fs::write(&config, "[power]\ntimeout_seconds = 5\n").unwrap();
    lan.start_with_checkin(Some(&config));
    // libvirtd inside the namespace: its machines' taps join the LAN's bridge.
    lan.spawn_other("/usr/sbin/virtlogd", &[]);
    lan.spawn_other("/usr/sbin/libvirtd", &[]);
    wait_until("libvirtd did not start", 30, || {
        virsh(&["list"]).status.success()
    });
    let names: Vec<String> = ["bf-redfish-1", "bf-redfish-2"].map(String::from).to_vec();
    Domains::remove(&names);
    let _domains = Domains(names.clone());
    let macs = ["52:54:00:c0:00:11", "52:54:00:c0:00:12"];
    let mut systems = Vec::new();
    let mut serials = Vec::new();
    for (name, mac) in names.iter().zip(macs) {
        let serial = dir.join(format!("{name}.serial"));
        let xml = dir.join(format!("{name}.xml"));
        std::fs::write(&xml, domain_xml(name, mac, &serial)).unwrap();
        let defined = virsh(&["define", &xml.display().to_string()]);
        assert!(
            defined.status.success(),
            "{}",
            String::from_utf8_lossy(&defined.stderr)
        );
        let uuid = String::from_utf8(virsh(&["domuuid", name]).stdout)
            .unwrap()
            .trim()
            .to_string();
        systems.push(format!("/redfish/v1/Systems/{uuid}"));
        serials.push(serial);
    }
    // The emulator, with HTTP Basic users (bcrypt, as sushy-tools wants).
    let htpasswd = Command::new("python3")
        .args(["-c", "import bcrypt; print('admin:' + bcrypt.hashpw(b'redfish-pw', bcrypt.gensalt(rounds=4)).decode())"])
        .output()
        .unwrap();
    std::fs::write(dir.join("htpasswd"), &htpasswd.stdout).unwrap();
    std::fs::write(
        dir.join("emulator.conf"),
        format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\nSUSHY_EMULATOR_LISTEN_PORT = 8000\n\
             SUSHY_EMULATOR_LIBVIRT_URI = 'qemu:///system'\nSUSHY_EMULATOR_AUTH_FILE = '{}'\n",
            dir.join("htpasswd").display()
        ),
    )
    .unwrap();
    let emulator_conf = dir.join("emulator.conf").display().to_string();
    lan.spawn_other("sushy-emulator", &["--config", &emulator_conf]);
    // A BMC that accepts the connection and never answers.
    lan.spawn_other(
        "python3",
        &["-c", "import socket,time\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',8098));s.listen(8)\nheld=[]\nwhile True: held.append(s.accept())"],
    );
    wait_until("sushy-emulator did not start", 30, || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                NS,
                "curl",
                "-sf",
                "-o",
                "/dev/null",
                "-u",
                "admin:redfish-pw",
            ])
            .arg("http://127.0.0.1:8000/redfish/v1/Systems")
            .status()
            .is_ok_and(|s| s.success())
    });

    for (mac, system) in macs.iter().zip(&systems) {
        let url = format!("redfish+http://admin@127.0.0.1:8000{system}");
        let (ok, out, err) = set_bmc(&lan, mac, &url, Some("redfish-pw"), None);
        assert!(ok, "{out}{err}");
    }
    for (mac, url) in [
        (
            "52:54:00:c0:00:13",
            format!("redfish+http://admin:wrong@127.0.0.1:8000{}", systems[0]),
        ),
        (
            "52:54:00:c0:00:14",
            "redfish+http://admin:x@127.0.0.1:8099/redfish/v1/Systems/1".to_string(),
        ),
        (
            "52:54:00:c0:00:15",
            "redfish+http://admin:x@127.0.0.1:8098/redfish/v1/Systems/1".to_string(),
        ),
    ] {
        let (ok, out, err) = set_bmc(&lan, mac, &url, None, None);
        assert!(ok, "{out}{err}");
    }
    // Redfish has no K_g key: one given is refused, not kept unused.
    let kg_file = lan.dir.path().join("redfish.kg");
    std::fs::write(&kg_file, "kg\n").unwrap();
    let url = format!("redfish+http://admin:x@127.0.0.1:8000{}", systems[0]);
    let (ok, _, err) = set_bmc(&lan, "52:54:00:c0:00:13", &url, None, Some(&kg_file));
    assert!(!ok && err.contains("IPMI BMCs only"), "{err}");

    let started = Instant::now();
    let all = [
        "52:54:00:c0:00:11",
        "52:54:00:c0:00:12",
        "52:54:00:c0:00:13",
        "52:54:00:c0:00:14",
        "52:54:00:c0:00:15",
    ];
    let mut args = vec!["power", "on"];
    args.extend(all);
    args.extend(["--waves", "all", "--boot", "pxe", "--deadline", "300"]);
    let (ok, out, err) = cli(&lan, &args, "");
    eprintln!(
        "power on to the last check-in: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!ok && err.contains("3 machine(s) failed"), "{out}{err}");
    assert_machine_lines(
        &out,
        &[
            (macs[0], "\tup\tchecked in"),
            (macs[1], "\tup\tchecked in"),
            ("52:54:00:c0:00:13", "refused the user name or password"),
            ("52:54:00:c0:00:14", "is unreachable"),
            ("52:54:00:c0:00:15", "did not answer within 5 s"),
        ],
    );
    booted_and_checked_in(&lan, &macs, &serials);
    // The one-time boot was set through Redfish: the emulator made the
    // network interface the domain's first boot device.
    let xml = String::from_utf8(virsh(&["dumpxml", "--inactive", &names[0]]).stdout).unwrap();
    let interface = xml
        .split("<interface")
        .nth(1)
        .and_then(|rest| rest.split("</interface>").next())
        .unwrap_or_default();
    assert!(interface.contains("<boot order='1'/>"), "{xml}");
}

/// A namespace with a simulated fleet (`bootfleet-loadtest storm
/// --power-via redfish --power-waves operator`: machines that boot only
/// when their BMC is told to) and bootfleet, its panel reachable from this
/// namespace over a veth pair the test makes; removed when dropped.
struct SimulatedFleet {
    ns: String,
    dir: tempfile::TempDir,
    server: std::process::Child,
    /// The panel, as this namespace reaches it.
    panel: String,
}

impl SimulatedFleet {
    const MACHINES: usize = 20;

    fn start() -> Self {
        let ns = format!("bfpowerui{}", std::process::id() % 100_000);
        let veth = format!("bfpu{}", std::process::id() % 100_000);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &veth])
            .stderr(Stdio::null())
            .status();
        for args in [
            vec!["netns", "add", &ns],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec![
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
            vec!["addr", "add", "10.201.0.1/30", "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec!["-n", &ns, "addr", "add", "10.201.0.2/30", "dev", "eth0"],
            vec!["-n", &ns, "link", "set", "eth0", "up"],
        ] {
            run(Command::new("ip").args(&args)).unwrap();
        }
        let dir = tempfile::Builder::new()
            .prefix("bootfleet-powerui-")
            .tempdir()
            .unwrap();
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(boot.join("img")).unwrap();
        std::fs::write(boot.join("undionly.kpxe"), pattern(70_000, 1)).unwrap();
        std::fs::write(boot.join("img/vmlinuz"), pattern(1 << 20, 2)).unwrap();
        std::fs::write(boot.join("img/initrd.gz"), pattern(2 << 20, 3)).unwrap();
        let mut inventory = String::from(
            "[images.node]\nkernel = \"img/vmlinuz\"\ninitrds = [\"img/initrd.gz\"]\n\n",
        );
        for i in 0..Self::MACHINES {
            inventory.push_str(&format!(
                "[machines.\"{}\"]\nimage = \"node\"\n",
                sim_mac(i)
            ));
        }
        std::fs::write(boot.join("inventory.toml"), inventory).unwrap();
        let config = dir.path().join("bootfleet.toml");
        std::fs::write(
            &config,
            "[dhcp]\nmax_requests_per_second_per_source = 10000000\n[power]\ncheckin_url = \"http://127.0.0.1:9090\"\n",
        )
        .unwrap();
        let log = dir.path().join("server.log");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                env!("CARGO_BIN_EXE_bootfleet"),
                "serve",
                "--config",
            ])
            .arg(&config)
            .arg("--root")
            .arg(&boot)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args([
                "--tftp-listen",
                "127.0.0.1:69",
                "--http-listen",
                "127.0.0.1:80",
                "--panel-listen",
                "0.0.0.0:9090",
            ])
            .args([
                "--dhcp-mode",
                "full",
                "--dhcp-interface",
                "lo",
                "--dhcp-range",
                "127.1.0.10-127.1.255.250/16",
            ])
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("server.err")).unwrap(),
            ))
            .spawn()
            .unwrap();
        wait_for_log(
            &log,
            &["DHCP listening", "control panel and API listening"],
            &dir.path().join("server.err"),
        );
        SimulatedFleet {
            ns,
            dir,
            server,
            panel: "http://10.201.0.2:9090".into(),
        }
    }

    /// The simulated machines, waiting for their BMCs (the process).
    fn machines(&self, token: &str) -> std::process::Child {
        let loadtest =
            Path::new(env!("CARGO_BIN_EXE_bootfleet")).with_file_name("bootfleet-loadtest");
        assert!(
            loadtest.exists(),
            "{} is missing: cargo build --release --workspace",
            loadtest.display()
        );
        Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(loadtest)
            .args([
                "storm",
                "--server",
                "127.0.0.1",
                "--machines",
                &Self::MACHINES.to_string(),
                "--root",
            ])
            .arg(self.dir.path().join("boot"))
            .args([
                "--power-via",
                "redfish",
                "--power-waves",
                "operator",
                "--token",
                token,
            ])
            .args(["--time-limit", "120", "--json"])
            .arg(self.dir.path().join("storm.json"))
            .stdout(Stdio::from(
                std::fs::File::create(self.dir.path().join("storm.out")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("storm.err")).unwrap(),
            ))
            .spawn()
            .unwrap()
    }
}

impl Drop for SimulatedFleet {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.server.id().to_string())
            .status();
        let _ = self.server.wait();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns pids {} 2>/dev/null | xargs -r kill -9",
                self.ns
            ))
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The loadtest's MAC of machine `index`.
fn sim_mac(index: usize) -> String {
    let n = (index as u32).to_be_bytes();
    format!("02:bf:{:02x}:{:02x}:{:02x}:{:02x}", n[0], n[1], n[2], n[3])
}

#[test]
fn an_operator_powers_a_pool_on_in_the_browser_and_watches_it_boot() {
    use crate::panel_browser::{click, flash, have_browser, log_in, open, shot, Driver};
    use fantoccini::Locator;
    if !can_make_namespaces() || !have_browser() {
        return;
    }
    let fleet = SimulatedFleet::start();
    let state = fleet.dir.path().join("state");
    crate::panel::add_user(&state, "olga", "assign");
    let token = crate::panel::add_token(&state, "setup", "admin");
    let mut machines = fleet.machines(&token);
    // The BMCs are set once the simulated fleet is up; then the rack's pool.
    let out = fleet.dir.path().join("storm.err");
    wait_until("the simulated BMCs were never set", 60, || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("BMCs set in the panel")
    });
    let members: Vec<String> = (0..SimulatedFleet::MACHINES).map(sim_mac).collect();
    let put = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            "-H",
            &format!("Authorization: Bearer {token}"),
        ])
        .args(["-H", "Content-Type: application/json", "--data"])
        .arg(serde_json::json!({ "members": members }).to_string())
        .arg(format!("{}/api/v1/pools/rack-a", fleet.panel))
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );

    let driver = Driver::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let base = fleet.panel.clone();
    runtime.block_on(async {
        let client = driver.browser().await;
        log_in(&client, &base, "olga").await;
        open(
            &client,
            &base,
            "#/pools",
            "button[data-pool-power='rack-a']",
        )
        .await;
        client
            .find(Locator::Css("#pool-waves"))
            .await
            .unwrap()
            .select_by_value("adaptive")
            .await
            .unwrap();
        click(&client, "button[data-pool-power='rack-a']").await;
        flash(&client, "power job 1: on 20 machine(s)").await;
        // The job's page follows it to the end.
        client
            .wait()
            .for_element(Locator::Css("#power-machines"))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // Read in one script: the page re-renders every second, and an
            // element found a moment before may be gone when it is read.
            let read = client
                .execute(
                    "return [document.querySelector('.job-status').textContent, \
                     document.querySelector('#job-stages').textContent]",
                    vec![],
                )
                .await
                .unwrap();
            let status = read[0].as_str().unwrap_or_default().to_string();
            let stages = read[1].as_str().unwrap_or_default().to_string();
            if status == "done" {
                assert_eq!(stages, "up 20", "every machine checked in");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the job never ended: {status}: {stages}"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let rows = client
            .find_all(Locator::Css("#power-machines tr[data-stage='up']"))
            .await
            .unwrap();
        assert_eq!(rows.len(), 20);
        shot(&client, "power").await;
        client.close().await.unwrap();
    });
    let status = machines.wait().unwrap();
    let printed = std::fs::read_to_string(fleet.dir.path().join("storm.out")).unwrap_or_default();
    assert!(status.success(), "{printed}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fleet.dir.path().join("storm.json")).unwrap())
            .unwrap();
    assert_eq!(report["booted"], SimulatedFleet::MACHINES, "{printed}");
}
