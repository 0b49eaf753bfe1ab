//! The original write-up's methods 2 and 4, end to end in QEMU, with iPXE
//! built for the server by `bootfleet ipxe build` from upstream source
//! ([`ipxe_source`]):
//!
//! * **Method 2, iPXE in the NIC's option ROM** with an embedded script
//!   (`dhcp`, then `chain http://SERVER/boot/${netX/mac}.ipxe`): a BIOS
//!   machine whose virtio-net ROM is that build boots its per-MAC image,
//!   bootfleet answering its DHCP with an address and no boot file (and
//!   no TFTP at all); the script's first server is down, so it boots from
//!   its fallback. A second machine with the same ROM boots the classic
//!   per-MAC `xx:xx:xx:xx:xx:xx.gpxe` file the same way.
//! * **Method 4, an embedded-script iPXE chainloaded from PXE**: UEFI
//!   firmware's own PXE client (OVMF, no iPXE ROM) fetches `snponly.efi`
//!   built with the script; a BIOS machine's iPXE ROM, standing in for PXE
//!   firmware as the acceptance harness does, fetches `undionly.kpxe` built
//!   with it (a quirk with `also_ipxe`). Each script fetches
//!   `http://${next-server}/boot/${netX/mac}.ipxe`, and the chainloaded
//!   iPXE gets no boot file, so there is no loop.

use std::path::Path;
use std::process::Command;

use crate::common::*;
use crate::qemu_lan::*;

const INVENTORY: &str = r#"
[images.m]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=m"
"#;

/// Method 2: the NIC ROM with the script, an inventory machine.
const ROM: &str = "52:54:00:e2:00:01";
/// Method 2: the same ROM, the classic `.gpxe` file.
const ROM_GPXE: &str = "52:54:00:e2:00:02";
/// Method 4: OVMF's PXE → `snponly.efi` with the script.
const UEFI_CHAIN: &str = "52:54:00:e4:00:01";
/// Method 4: an iPXE ROM as the PXE firmware → `undionly.kpxe` with it.
const BIOS_CHAIN: &str = "52:54:00:e4:00:02";

/// `bootfleet ipxe build` into `out` (relative to the boot directory).
fn ipxe_build(source: &Path, lan: &BootLan, out: &str, servers: &[&str], targets: &[&str]) {
    ipxe_build_trusting(source, lan, out, servers, targets, None);
}

/// [`ipxe_build`] with `--trust CA` when given.
fn ipxe_build_trusting(
    source: &Path,
    lan: &BootLan,
    out: &str,
    servers: &[&str],
    targets: &[&str],
    trust: Option<&Path>,
) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bootfleet"));
    if let Some(ca) = trust {
        command.arg("ipxe").arg("build").arg("--trust").arg(ca);
        command.args(["--source"]);
    } else {
        command.args(["ipxe", "build", "--source"]);
    }
    command
        .arg(source)
        .arg("--out")
        .arg(lan.boot_dir().join(out));
    for server in servers {
        command.args(["--server", server]);
    }
    for target in targets {
        command.args(["--target", target]);
    }
    let started = std::time::Instant::now();
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bootfleet ipxe build failed:\n{}",
        tail(&stderr)
    );
    eprintln!(
        "ipxe build {out} {targets:?}: {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        stderr.contains("multicast TFTP fix"),
        "the build says what it did about the fix: {}",
        tail(&stderr)
    );
    let checked = Command::new("sha256sum")
        .args(["--check", "--quiet", "SHA256SUMS"])
        .current_dir(lan.boot_dir().join(out))
        .output()
        .unwrap();
    assert!(checked.status.success(), "{out}/SHA256SUMS");
}

#[test]
fn ipxe_in_the_nic_rom_and_chainloaded_with_an_embedded_script_boot_by_mac() {
    if !can_make_namespaces() || !tools_present() || !have_tool("make") || !have_tool("gcc") {
        return;
    }
    let Some(source) = ipxe_source() else {
        return;
    };
    let mut lan = BootLan::new();
    // Method 2: a fixed server list; the first is down, the second is this
    // server. Method 4: whichever server answered DHCP.
    ipxe_build(
        &source,
        &lan,
        "ipxe-rom",
        &["http://10.99.0.9", &format!("http://{SERVER_IP}")],
        &["1af41000.rom"],
    );
    ipxe_build(
        &source,
        &lan,
        "ipxe",
        &["http://${next-server}"],
        &["undionly.kpxe", "snponly.efi"],
    );
    let script = std::fs::read_to_string(lan.boot_dir().join("ipxe-rom/bootfleet.ipxe")).unwrap();
    assert!(script.contains("chain --autofree http://10.99.0.9/boot/${netX/mac}.ipxe"));
    let tree_fixed = std::fs::read_to_string(source.join("src/net/udp/tftp.c")).unwrap();
    assert!(tree_fixed.contains("memset ( &socket, 0, sizeof ( socket ) );"));

    let inventory = with_machines(
        INVENTORY,
        &[(ROM, "m"), (UEFI_CHAIN, "m"), (BIOS_CHAIN, "m")],
    );
    std::fs::write(lan.boot_dir().join("inventory.toml"), inventory).unwrap();
    std::fs::write(
        lan.boot_dir().join(format!("{ROM_GPXE}.gpxe")),
        "#!gpxe\nkernel http://${next-server}/img/vmlinuz console=ttyS0 quiet panic=-1 bootfleet.static=gpxe\n\
         initrd http://${next-server}/img/initrd.gz\nboot\n",
    )
    .unwrap();
    let config = lan.dir.path().join("bootfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[dhcp]\nuefi_x64 = \"ipxe/snponly.efi\"\n\
             [[dhcp.quirks]]\nmac_prefix = \"{}\"\nboot_file = \"ipxe/undionly.kpxe\"\nalso_ipxe = true\n",
            &BIOS_CHAIN
        ),
    )
    .unwrap();
    let rom = lan.boot_dir().join("ipxe-rom/1af41000.rom");
    lan.set_nic_rom(ROM, &rom);
    lan.set_nic_rom(ROM_GPXE, &rom);
    lan.start_with_checkin(Some(&config));
    // The panel's Images page lists the loaders built into the boot
    // directory's ipxe/, with the SHA-256 the command printed.
    let listed: serde_json::Value = serde_json::from_str(&lan.api("/api/v1/ipxe")).unwrap();
    let names: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["undionly.kpxe", "snponly.efi", "bootfleet.ipxe"],
        "{listed}"
    );
    assert!(listed["script"]
        .as_str()
        .unwrap()
        .contains("${next-server}"));

    let machines = [
        lan.power_on(ROM, Firmware::BiosIpxe),
        lan.power_on(ROM_GPXE, Firmware::BiosIpxe),
        lan.power_on(UEFI_CHAIN, Firmware::UefiPxe),
        lan.power_on(BIOS_CHAIN, Firmware::BiosIpxe),
    ];
    let booted: Vec<(String, Booted)> = machines
        .into_iter()
        .map(|machine| (machine.mac.clone(), machine.booted(&lan)))
        .collect();
    for (mac, booted) in &booted {
        let dhcp: Vec<&String> = booted
            .timeline
            .iter()
            .filter(|l| l.split_whitespace().nth(1) == Some("dhcp"))
            .collect();
        let files: Vec<&String> = booted
            .timeline
            .iter()
            .filter(|l| l.split_whitespace().nth(2) == Some("tftp"))
            .collect();
        // Whatever its first stage, the iPXE with the script got an address
        // with no boot file.
        assert!(
            dhcp.iter()
                .any(|l| l.contains("ack 10.99.0.") && l.contains("own script")),
            "{mac}: {dhcp:#?}"
        );
        if *mac == ROM_GPXE {
            assert!(
                booted.cmdline.contains("bootfleet.static=gpxe"),
                "{mac}: {}",
                booted.cmdline
            );
            assert!(booted.reached("script"), "{mac}: {:#?}", booted.timeline);
            continue;
        }
        let node = format!("bootfleet.node={}", &mac[12..].replace(':', ""));
        for wanted in ["bootfleet.image=m", &node, "bootfleet.token="] {
            assert!(booted.cmdline.contains(wanted), "{mac}: {}", booted.cmdline);
        }
        for phase in ["script", "kernel", "initrd", "checkin"] {
            assert!(
                booted.reached(phase),
                "{mac}: no {phase}: {:#?}\n{}",
                booted.timeline,
                tail(&booted.serial)
            );
        }
        match mac.as_str() {
            // Method 2: nothing by TFTP, no boot file ever answered.
            ROM => {
                assert!(files.is_empty(), "{mac}: {files:#?}");
                assert!(
                    !dhcp.iter().any(|l| l.contains(" boot ")),
                    "{mac}: {dhcp:#?}"
                );
            }
            // Method 4: the firmware fetched the built loader by TFTP.
            UEFI_CHAIN => assert!(
                files.iter().any(|l| l.contains("ipxe/snponly.efi")),
                "{mac}: {:#?}",
                booted.timeline
            ),
            BIOS_CHAIN => assert!(
                files.iter().any(|l| l.contains("ipxe/undionly.kpxe")),
                "{mac}: {:#?}",
                booted.timeline
            ),
            _ => unreachable!(),
        }
    }
}

/// `tests/ipxe/build.sh` keeps an iPXE source only when its files are the
/// pinned commit's: an archive with one byte changed in one file is
/// refused, whatever its name, and the real one is kept. (The download
/// from GitHub, for machines without `../shared/ipxe`, goes through the
/// same check; this machine cannot reach GitHub to test the download.)
#[test]
fn the_ipxe_source_is_kept_only_when_it_is_the_pinned_commit() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let name = "ipxe-src-0ab2277c40f1.tar.gz";
    let Some(archive) = [
        repo.join("../shared/ipxe").join(name),
        repo.join("target/ipxe").join(name),
    ]
    .into_iter()
    .find(|a| a.is_file()) else {
        let message = "REQUIRED FILES MISSING: the iPXE source archive (../shared/ipxe, or the \
                       one tests/ipxe/build.sh --source-only downloads into target/ipxe)";
        if std::env::var_os("CI").is_some() {
            panic!("{message}");
        }
        note_skipped(message);
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let unpacked = work.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&unpacked))
    .unwrap();
    let tftp = unpacked.join("ipxe-0ab2277c40f1/src/net/udp/tftp.c");
    let mut text = std::fs::read(&tftp).unwrap();
    text[100] ^= 1;
    std::fs::write(&tftp, text).unwrap();
    let tampered = work.path().join("ipxe-src-0ab2277c40f1.tar.gz");
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tampered)
        .arg("-C")
        .arg(&unpacked)
        .arg("ipxe-0ab2277c40f1"))
    .unwrap();
    let build = |archive: &Path, out: &Path| {
        Command::new(repo.join("tests/ipxe/build.sh"))
            .arg("--source-only")
            .env("BOOTFLEET_IPXE_ARCHIVE", archive)
            .env("BOOTFLEET_IPXE_OUT", out)
            .output()
            .unwrap()
    };
    let refused = build(&tampered, &work.path().join("out-tampered"));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not commit 0ab2277c40f1"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!work.path().join("out-tampered/src-0ab2277c40f1").exists());
    let kept = build(&archive, &work.path().join("out"));
    assert!(
        kept.status.success(),
        "{}",
        String::from_utf8_lossy(&kept.stderr)
    );
    assert!(work
        .path()
        .join("out/src-0ab2277c40f1/src/net/udp/tftp.c")
        .is_file());
}

/// Issue 24: iPXE built with this server's CA (`bootfleet ipxe build
/// --trust STATE/https-ca.crt`) fetches its script, kernel and initrd over
/// HTTPS from bootfleet's `[http] tls_listen`, verifying the server; the
/// same iPXE built to trust another CA refuses the server and fetches
/// nothing. Both are `snponly.efi` chainloaded by OVMF's PXE (method 4).
#[test]
fn ipxe_with_the_servers_ca_boots_over_https_and_refuses_a_server_it_does_not_trust() {
    const TRUSTING: &str = "52:54:00:e5:00:01";
    const UNTRUSTING: &str = "52:54:00:e5:00:02";
    if !can_make_namespaces() || !tools_present() || !have_tool("make") || !have_tool("openssl") {
        return;
    }
    let Some(source) = ipxe_source() else {
        return;
    };
    let mut lan = BootLan::new();
    let inventory = with_machines(INVENTORY, &[(TRUSTING, "m"), (UNTRUSTING, "m")]);
    std::fs::write(lan.boot_dir().join("inventory.toml"), inventory).unwrap();
    let config = lan.dir.path().join("bootfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\ntls_listen = \"{SERVER_IP}:443\"\n\
             [dhcp]\nuefi_x64 = \"ipxe-https/snponly.efi\"\n\
             [[dhcp.quirks]]\nmac_prefix = \"{UNTRUSTING}\"\nboot_file = \"ipxe-other/snponly.efi\"\n"
        ),
    )
    .unwrap();
    // The server makes its CA at its first start; the builds embed it (or
    // another one, made here).
    lan.start_with_checkin(Some(&config));
    let ca = lan.dir.path().join("state/https-ca.crt");
    assert!(ca.is_file(), "bootfleet keeps its CA at {}", ca.display());
    let (other, _) = self_signed_certificate(lan.dir.path(), "/CN=some other CA", &[]);
    let servers = ["https://${next-server}"];
    ipxe_build_trusting(
        &source,
        &lan,
        "ipxe-https",
        &servers,
        &["snponly.efi"],
        Some(&ca),
    );
    ipxe_build_trusting(
        &source,
        &lan,
        "ipxe-other",
        &servers,
        &["snponly.efi"],
        Some(&other),
    );

    let since = epoch_ms();
    let refusing = lan.power_on(UNTRUSTING, Firmware::UefiPxe);
    let booted = lan.power_on(TRUSTING, Firmware::UefiPxe).booted(&lan);
    for wanted in [
        "bootfleet.image=m",
        "bootfleet.node=0001",
        "bootfleet.token=",
    ] {
        assert!(booted.cmdline.contains(wanted), "{}", booted.cmdline);
    }
    for fetched in [
        format!("https://{SERVER_IP}/boot/"),
        format!("https://{SERVER_IP}/img/vmlinuz"),
        format!("https://{SERVER_IP}/img/initrd.gz"),
    ] {
        assert!(
            booted.serial.contains(&fetched),
            "iPXE fetched {fetched}:\n{}",
            tail(&booted.serial)
        );
    }
    for phase in ["script", "kernel", "initrd", "checkin"] {
        assert!(booted.reached(phase), "no {phase}: {:#?}", booted.timeline);
    }
    for fetch in [
        "script  https",
        "kernel  https img/vmlinuz",
        "initrd  https img/initrd.gz",
    ] {
        assert!(
            booted.timeline.iter().any(|l| l.contains(fetch)),
            "the timeline says {fetch:?}: {:#?}",
            booted.timeline
        );
    }
    assert!(
        booted
            .timeline
            .iter()
            .any(|l| l.contains("tftp ipxe-https/snponly.efi")),
        "{:#?}",
        booted.timeline
    );

    // The iPXE that trusts another CA: its TLS handshake fails, and it
    // never gets a script from this server.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let serial = loop {
        let serial = refusing.serial();
        if serial.contains("Permission denied") || std::time::Instant::now() > deadline {
            break serial;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    refusing.kill();
    assert!(
        serial.contains(&format!("https://{SERVER_IP}/boot/"))
            && serial.contains("Permission denied"),
        "iPXE refuses a server it does not trust:\n{}",
        tail(&serial)
    );
    let timeline = lan.timeline(UNTRUSTING, since);
    assert!(
        timeline
            .iter()
            .any(|l| l.contains("tftp ipxe-other/snponly.efi")),
        "{timeline:#?}"
    );
    assert!(
        !timeline.iter().any(|l| {
            let phase = l.split_whitespace().nth(1);
            phase == Some("script") || phase == Some("kernel")
        }),
        "nothing served to it over HTTPS: {timeline:#?}"
    );
}
