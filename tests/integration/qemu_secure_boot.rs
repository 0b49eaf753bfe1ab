//! Trusted boot chains end to end in QEMU (OVMF, TCG or KVM):
//!
//! * **UEFI Secure Boot** on (OVMF's SMM build with Microsoft's keys
//!   enrolled): the firmware's PXE client fetches Debian's signed
//!   `shimx64.efi`, shim fetches the signed GRUB network image beside it,
//!   GRUB reads `grub/grub.cfg` (bootfleet answers it with a config that
//!   loads the machine's own by MAC), and loads Debian's signed kernel and
//!   the initrd over TFTP. The kernel says Secure Boot is on and locks
//!   itself down; the machine checks in with its per-boot token. The same
//!   chain with a tampered kernel is refused by shim's verifier in GRUB,
//!   and the machine's timeline says so (a kernel event with status 403).
//! * **UEFI HTTP boot**: OVMF's HTTP boot client (vendor class
//!   `HTTPClient`, architecture 16) gets an `http://` URL for iPXE, in full
//!   mode and as a ProxyDHCP beside dnsmasq, and boots its per-MAC image
//!   with no TFTP at all.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::qemu_lan::*;

/// Secure Boot on, signed kernel: boots.
const SIGNED: &str = "52:54:00:5b:00:01";
/// Secure Boot on, the kernel with one byte changed: refused.
const TAMPERED: &str = "52:54:00:5b:00:02";
/// UEFI HTTP boot, full mode.
const HTTP_FULL: &str = "52:54:00:5b:00:03";
/// UEFI HTTP boot beside dnsmasq (ProxyDHCP).
const HTTP_PROXY: &str = "52:54:00:5b:00:04";

fn inventory() -> String {
    // No `quiet` for Secure Boot: the kernel's Secure Boot lines are the proof.
    let images = r#"
[images.signed]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 panic=-1 bootfleet.image=signed"
secure_boot = true

[images.tampered]
kernel = "img/vmlinuz-tampered"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 panic=-1 bootfleet.image=tampered"
secure_boot = true

[images.http]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=http"
"#;
    with_machines(
        images,
        &[
            (SIGNED, "signed"),
            (TAMPERED, "tampered"),
            (HTTP_FULL, "http"),
            (HTTP_PROXY, "http"),
        ],
    )
}

/// Waits (at most `limit`) for an event on `mac`'s timeline that `wanted`
/// accepts; returns the timeline.
fn wait_for_event(
    lan: &BootLan,
    mac: &str,
    since_ms: u64,
    limit: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let timeline = lan.timeline(mac, since_ms);
        if timeline.iter().any(|line| wanted(line)) || Instant::now() > deadline {
            return timeline;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn assert_http_only(booted: &Booted, what: &str) {
    assert!(
        booted
            .timeline
            .iter()
            .any(|l| l.contains("dhcp") && l.contains("http://10.99.0.1/ipxe.efi (HttpX64)")),
        "{what}: bootfleet answered the HTTP boot client with a URL:\n{}",
        booted.timeline.join("\n")
    );
    assert!(
        booted
            .timeline
            .iter()
            .any(|l| l.contains("loader  http ipxe.efi")),
        "{what}: the firmware fetched iPXE over HTTP:\n{}",
        booted.timeline.join("\n")
    );
    let tftp: Vec<&String> = booted
        .timeline
        .iter()
        .filter(|l| l.split_whitespace().nth(2) == Some("tftp"))
        .collect();
    assert!(tftp.is_empty(), "{what}: no TFTP at all: {tftp:?}");
    for phase in ["script", "kernel", "initrd", "checkin"] {
        assert!(
            booted.reached(phase),
            "{what}: no {phase} event:\n{}",
            booted.timeline.join("\n")
        );
    }
}

#[test]
fn secure_boot_through_signed_shim_and_grub_and_uefi_http_boot() {
    if !can_make_namespaces() || !tools_present() {
        return;
    }
    let Some(chain) = secure_boot_chain() else {
        return;
    };
    let mut lan = BootLan::new();
    let boot = lan.boot_dir();
    std::fs::create_dir_all(boot.join("secureboot")).unwrap();
    for file in ["shimx64.efi", "grubx64.efi"] {
        std::fs::copy(chain.join(file), boot.join("secureboot").join(file)).unwrap();
    }
    let mut tampered = std::fs::read(boot.join("img/vmlinuz")).unwrap();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0xff;
    std::fs::write(boot.join("img/vmlinuz-tampered"), tampered).unwrap();
    std::fs::write(boot.join("inventory.toml"), inventory()).unwrap();
    lan.start_with_checkin(None);

    let since = epoch_ms();
    let refused = lan.power_on(TAMPERED, Firmware::UefiSecureBoot);
    let signed = lan.power_on(SIGNED, Firmware::UefiSecureBoot);
    let http = lan.power_on(HTTP_FULL, Firmware::UefiHttp);

    let booted = signed.booted(&lan);
    assert!(
        booted.cmdline.contains("bootfleet.image=signed")
            && booted.cmdline.contains("bootfleet.node=0001"),
        "{}",
        booted.cmdline
    );
    for proof in [
        "secureboot: Secure boot enabled",
        "Kernel is locked down from EFI Secure Boot",
    ] {
        assert!(
            booted.serial.contains(proof),
            "the kernel says {proof:?}:\n{}",
            tail(&booted.serial)
        );
    }
    for step in [
        "loader  tftp secureboot/shimx64.efi",
        "loader  tftp secureboot/grubx64.efi",
        "loader-config tftp grub/grub.cfg (200)",
        &format!("loader-config tftp grub/grub.cfg-01-{SIGNED}"),
        "kernel  tftp img/vmlinuz",
        "initrd  tftp img/initrd.gz",
        "checkin",
    ] {
        assert!(
            booted.timeline.iter().any(|l| l.contains(step)),
            "Secure Boot chain: no {step:?} on the timeline:\n{}",
            booted.timeline.join("\n")
        );
    }
    assert!(
        booted
            .timeline
            .iter()
            .any(|l| l.contains("boot secureboot/shimx64.efi (UefiX64)")),
        "DHCP named shim for the image marked secure_boot:\n{}",
        booted.timeline.join("\n")
    );

    // The tampered kernel: shim's verifier in GRUB refuses it, and the
    // timeline says where the boot stopped.
    let timeline = wait_for_event(&lan, TAMPERED, since, Duration::from_secs(180), |l| {
        l.contains("refused by the Secure Boot chain")
    });
    let serial = refused.serial();
    refused.kill();
    assert!(
        timeline.iter().any(|l| l
            .contains("kernel  tftp img/vmlinuz-tampered refused by the Secure Boot chain")
            && l.ends_with("(403)")),
        "the refused kernel is a failed kernel event:\n{}\nserial:\n{}",
        timeline.join("\n"),
        tail(&serial)
    );
    assert!(
        serial.contains("bad shim signature"),
        "GRUB says why:\n{}",
        tail(&serial)
    );
    assert!(!serial.contains(MARKER), "the tampered kernel never ran");
    assert!(
        !timeline
            .iter()
            .any(|l| l.contains("initrd") || l.contains("checkin")),
        "nothing after the refusal:\n{}",
        timeline.join("\n")
    );
    // The panel shows the machine failed at its kernel (events reach the
    // inventory in batches).
    let deadline = Instant::now() + Duration::from_secs(10);
    let machine = loop {
        let machine: serde_json::Value =
            serde_json::from_str(&lan.api(&format!("/api/v1/machines/{TAMPERED}"))).unwrap();
        if machine["state"] == "failed" || Instant::now() > deadline {
            break machine;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        machine["failure"]
            .as_str()
            .is_some_and(|f| f.starts_with("failed at kernel: 403")),
        "the panel says where the boot stopped: {machine}"
    );

    let booted = http.booted(&lan);
    assert!(
        booted.cmdline.contains("bootfleet.image=http"),
        "{}",
        booted.cmdline
    );
    assert_http_only(&booted, "HTTP boot, full mode");

    // UEFI HTTP boot through a ProxyDHCP answer: dnsmasq gives the address.
    lan.stop();
    lan.start_address_server();
    lan.start_with_panel("0.0.0.0:9090", &["--dhcp-mode", "proxy"]);
    let booted = lan.power_on(HTTP_PROXY, Firmware::UefiHttp).booted(&lan);
    assert_http_only(&booted, "HTTP boot, ProxyDHCP");
    assert!(
        booted.timeline.iter().any(|l| l.contains("proxy")),
        "bootfleet answered as a proxy:\n{}",
        booted.timeline.join("\n")
    );
    let leases = std::fs::read_to_string(lan.dir.path().join("dnsmasq.leases")).unwrap_or_default();
    assert!(
        leases.contains(HTTP_PROXY),
        "dnsmasq gave the address: {leases:?}"
    );
}
