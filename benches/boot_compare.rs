//! Boot time side by side: the same QEMU machines powered on against
//! bootfleet and against the stack most sites run today (dnsmasq for DHCP
//! and TFTP, nginx serving the same per-MAC scripts and images as static
//! files), one machine at a time, on the boot LAN of the end-to-end test
//! (`tests/integration/qemu_lan.rs`, shared here by `#[path]`).
//!
//! Three setups, interleaved run by run so that drift in the machine's
//! speed touches all of them alike:
//! * `bootfleet`: as shipped in full mode, answering IPv6 router
//!   solicitations so iPXE does not wait for IPv6;
//! * `bootfleet, RA off`: the same with `answer_router_solicitations =
//!   false`, the like-for-like comparison with the reference;
//! * `dnsmasq + nginx`: the reference, with dnsmasq's defaults.
//!
//! The figure is the time from power-on to the marker line the booted
//! image prints. Results go into `docs/benchmarks.md` between the
//! `boot-compare` markers.
//!
//! `sudo env "PATH=$PATH" cargo bench --bench boot_compare -- --reps 3`
//!
//! With `--chains`, instead: bootfleet alone, one UEFI x64 machine booting
//! the same image through each boot chain it offers, interleaved the same
//! way, into the `chain-compare` markers: UEFI PXE → iPXE → HTTP (the
//! plain chain), UEFI HTTP boot → iPXE → HTTP (no TFTP), Secure Boot:
//! UEFI PXE → signed shim → signed GRUB → kernel and initrd over TFTP, and
//! HTTPS: UEFI PXE → `snponly.efi` built by `bootfleet ipxe build --trust`
//! with the server's CA → script, kernel and initrd over HTTPS.
//!
//! `sudo env "PATH=$PATH" cargo bench --bench boot_compare -- --chains --reps 3`

#[allow(dead_code)]
#[path = "../tests/integration/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/integration/qemu_lan.rs"]
mod qemu_lan;

use std::path::PathBuf;

use qemu_lan::{BootLan, Firmware, FULL_DHCP, SERVER_IP};

const BIOS_MAC: &str = "52:54:00:b0:00:01";
const UEFI_MAC: &str = "52:54:00:b0:00:10";

const INVENTORY: &str = r#"
[images.alpha]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=alpha"

[machines."52:54:00:b0:00:01"]
image = "alpha"

[machines."52:54:00:b0:00:10"]
image = "alpha"
"#;

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Bootfleet,
    BootfleetNoRa,
    Reference,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Bootfleet => "bootfleet",
            Setup::BootfleetNoRa => "bootfleet, RA off",
            Setup::Reference => "dnsmasq + nginx",
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn main() {
    let mut reps = 3usize;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/benchmarks.md");
    let mut chains = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => reps = args.next().and_then(|n| n.parse().ok()).expect("--reps N"),
            "--out" => out = PathBuf::from(args.next().expect("--out FILE")),
            "--chains" => chains = true,
            "--bench" => {} // added by `cargo bench`
            other => panic!("unknown argument {other:?}; use --reps N, --out FILE and --chains"),
        }
    }
    assert!(
        common::can_make_namespaces() && qemu_lan::tools_present(),
        "run as root with the test tools installed (tests/run-all.sh installs them)"
    );
    if chains {
        return compare_chains(reps, &out);
    }
    assert!(
        std::path::Path::new("/usr/sbin/nginx").exists(),
        "nginx is needed for the reference stack: apt-get install nginx-light"
    );

    let mut lan = BootLan::new();
    std::fs::write(lan.boot_dir().join("inventory.toml"), INVENTORY).unwrap();
    let no_ra = lan.dir.path().join("no-ra.toml");
    std::fs::write(&no_ra, "[dhcp]\nanswer_router_solicitations = false\n").unwrap();
    let no_ra = no_ra.display().to_string();
    let full = FULL_DHCP;

    // The reference serves exactly what bootfleet renders, as static files.
    lan.start(&full);
    let mut scripts = vec![("boot.ipxe".to_string(), lan.api("/boot.ipxe"))];
    for mac in [BIOS_MAC, UEFI_MAC] {
        let script = lan.api(&format!("/boot/{mac}.ipxe"));
        assert!(script.contains("bootfleet.image=alpha"), "{script}");
        scripts.push((format!("boot/{mac}.ipxe"), script));
    }
    lan.stop();

    let setups = [Setup::Bootfleet, Setup::BootfleetNoRa, Setup::Reference];
    let machines = [
        (Firmware::BiosIpxe, BIOS_MAC),
        (Firmware::UefiPxe, UEFI_MAC),
    ];
    let mut seconds = vec![vec![Vec::new(); setups.len()]; machines.len()];
    for rep in 0..reps {
        for (s, &setup) in setups.iter().enumerate() {
            match setup {
                Setup::Bootfleet => lan.start(&full),
                Setup::BootfleetNoRa => {
                    let mut args = vec!["--config", no_ra.as_str()];
                    args.extend_from_slice(&full);
                    lan.start(&args);
                }
                Setup::Reference => lan.start_reference(&scripts),
            }
            for (m, &(firmware, mac)) in machines.iter().enumerate() {
                let booted = lan.power_on(mac, firmware).booted(&lan);
                assert!(
                    booted.cmdline.contains("bootfleet.image=alpha"),
                    "{} booted something else: {}",
                    setup.name(),
                    booted.cmdline
                );
                eprintln!(
                    "run {}/{reps}: {:?} via {}: {:.1} s",
                    rep + 1,
                    firmware,
                    setup.name(),
                    booted.seconds
                );
                seconds[m][s].push(booted.seconds);
            }
            lan.stop();
            lan.stop_others();
        }
    }

    let command =
        format!("sudo env \"PATH=$PATH\" cargo bench --bench boot_compare -- --reps {reps}");
    let mut section = vec![
        "<!-- boot-compare:begin -->".to_string(),
        "## Boot time: bootfleet against dnsmasq + nginx".to_string(),
        String::new(),
        format!("Command: `{command}` (generated; do not edit by hand)."),
        String::new(),
        format!(
            "One QEMU machine at a time ({}), power-on to the marker line of the booted image; \
             median, fastest and slowest of {reps} runs per setup, setups interleaved. Server at {SERVER_IP} \
             on a bridge in a namespace.",
            qemu_lan::accelerator()
        ),
        String::new(),
        "| machine | setup | median s | min s | max s | median vs dnsmasq + nginx |".to_string(),
        "|---|---|---:|---:|---:|---:|".to_string(),
    ];
    for (m, &(firmware, _)) in machines.iter().enumerate() {
        let reference = median(&seconds[m][2]);
        for (s, setup) in setups.iter().enumerate() {
            let runs = &seconds[m][s];
            let med = median(runs);
            let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = runs.iter().copied().fold(0.0, f64::max);
            section.push(format!(
                "| {firmware:?} | {} | {med:.1} | {min:.1} | {max:.1} | {:+.0}% |",
                setup.name(),
                (med / reference - 1.0) * 100.0
            ));
        }
    }
    section.push("<!-- boot-compare:end -->".to_string());
    write_section(&out, "boot-compare", &section.join("\n"));
}

/// Puts `section` (which begins and ends with its `marker` comments) into
/// `out` in place of the previous one, or at the end.
fn write_section(out: &std::path::Path, marker: &str, section: &str) {
    println!("{section}");
    let (begin_marker, end_marker) = (
        format!("<!-- {marker}:begin -->"),
        format!("<!-- {marker}:end -->"),
    );
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let text = match (text.find(&begin_marker), text.find(&end_marker)) {
        (Some(begin), Some(end)) => format!(
            "{}{section}{}",
            &text[..begin],
            &text[end + end_marker.len()..]
        ),
        _ => format!("{text}\n{section}\n"),
    };
    std::fs::write(out, text).unwrap();
}

/// The boot chains of one UEFI x64 machine, each booting the same image
/// from bootfleet (`--chains`).
fn compare_chains(reps: usize, out: &std::path::Path) {
    const PLAIN: &str = "52:54:00:c0:00:01";
    const HTTP: &str = "52:54:00:c0:00:02";
    const SECURE: &str = "52:54:00:c0:00:03";
    const HTTPS: &str = "52:54:00:c0:00:04";
    let chain = qemu_lan::secure_boot_chain()
        .expect("Debian's signed shim and GRUB: tests/secureboot/fetch.sh");
    let ipxe =
        qemu_lan::ipxe_source().expect("an iPXE source tree: tests/ipxe/build.sh --source-only");
    let mut lan = BootLan::new();
    let boot = lan.boot_dir();
    std::fs::create_dir_all(boot.join("secureboot")).unwrap();
    for file in ["shimx64.efi", "grubx64.efi"] {
        std::fs::copy(chain.join(file), boot.join("secureboot").join(file)).unwrap();
    }
    let mut inventory = String::from(
        "[images.alpha]\nkernel = \"img/vmlinuz\"\ninitrds = [\"img/initrd.gz\"]\n\
         cmdline = \"console=ttyS0 quiet panic=-1 bootfleet.image=alpha\"\n\
         [images.signed]\nkernel = \"img/vmlinuz\"\ninitrds = [\"img/initrd.gz\"]\n\
         cmdline = \"console=ttyS0 quiet panic=-1 bootfleet.image=alpha\"\nsecure_boot = true\n",
    );
    for (mac, image) in [
        (PLAIN, "alpha"),
        (HTTP, "alpha"),
        (SECURE, "signed"),
        (HTTPS, "alpha"),
    ] {
        inventory.push_str(&format!("[machines.\"{mac}\"]\nimage = \"{image}\"\n"));
    }
    std::fs::write(boot.join("inventory.toml"), inventory).unwrap();
    let config = lan.dir.path().join("https.toml");
    std::fs::write(
        &config,
        format!(
            "[http]\ntls_listen = \"{SERVER_IP}:443\"\n\
             [[dhcp.quirks]]\nmac_prefix = \"{HTTPS}\"\nboot_file = \"ipxe-https/snponly.efi\"\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let mut arguments = vec!["--config", config.as_str()];
    arguments.extend_from_slice(&FULL_DHCP);
    lan.start(&arguments);
    // iPXE that trusts the CA the server made at its start, and fetches by
    // HTTPS from whichever server answered its DHCP.
    let built = std::process::Command::new(env!("CARGO_BIN_EXE_bootfleet"))
        .args(["ipxe", "build", "--source"])
        .arg(&ipxe)
        .arg("--out")
        .arg(boot.join("ipxe-https"))
        .args([
            "--server",
            "https://${next-server}",
            "--target",
            "snponly.efi",
            "--trust",
        ])
        .arg(lan.dir.path().join("state/https-ca.crt"))
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let chains = [
        ("UEFI PXE → iPXE → HTTP (plain)", Firmware::UefiPxe, PLAIN),
        ("UEFI HTTP boot → iPXE → HTTP", Firmware::UefiHttp, HTTP),
        (
            "Secure Boot: UEFI PXE → shim → GRUB → TFTP",
            Firmware::UefiSecureBoot,
            SECURE,
        ),
        (
            "HTTPS: UEFI PXE → iPXE with the server's CA → HTTPS",
            Firmware::UefiPxe,
            HTTPS,
        ),
    ];
    let mut seconds = vec![Vec::new(); chains.len()];
    for rep in 0..reps {
        for (c, &(name, firmware, mac)) in chains.iter().enumerate() {
            let booted = lan.power_on(mac, firmware).booted(&lan);
            assert!(
                booted.cmdline.contains("bootfleet.image=alpha"),
                "{name}: {}",
                booted.cmdline
            );
            eprintln!("run {}/{reps}: {name}: {:.1} s", rep + 1, booted.seconds);
            seconds[c].push(booted.seconds);
        }
    }
    lan.stop();
    let command = format!(
        "sudo env \"PATH=$PATH\" cargo bench --bench boot_compare -- --chains --reps {reps}"
    );
    let plain = median(&seconds[0]);
    let mut section = vec![
        "<!-- chain-compare:begin -->".to_string(),
        "## Boot time by boot chain (UEFI x64, bootfleet)".to_string(),
        String::new(),
        format!("Command: `{command}` (generated; do not edit by hand)."),
        String::new(),
        format!(
            "One QEMU machine at a time ({}), power-on to the marker line of the booted image (the same \
             kernel and initrd, signed by Debian); median, fastest and slowest of {reps} runs per chain, \
             chains interleaved. The Secure Boot machine is OVMF's SMM build with Microsoft's keys on q35 \
             (Secure Boot needs both); the others are OVMF without Secure Boot on QEMU's default machine.",
            qemu_lan::accelerator()
        ),
        String::new(),
        "| chain | median s | min s | max s | median vs plain |".to_string(),
        "|---|---:|---:|---:|---:|".to_string(),
    ];
    for (c, &(name, _, _)) in chains.iter().enumerate() {
        let runs = &seconds[c];
        let med = median(runs);
        let min = runs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = runs.iter().copied().fold(0.0, f64::max);
        section.push(format!(
            "| {name} | {med:.1} | {min:.1} | {max:.1} | {:+.0}% |",
            (med / plain - 1.0) * 100.0
        ));
    }
    section.push("<!-- chain-compare:end -->".to_string());
    write_section(out, "chain-compare", &section.join("\n"));
}
