//! Real machines boot end to end through bootfleet alone (DHCP, TFTP,
//! HTTP) on a boot LAN of [`crate::qemu_lan`]: BIOS and UEFI machines with
//! their own images and command lines, an image over TFTP, the classic
//! static per-MAC `.gpxe`, an unknown machine adopted without a restart,
//! and ProxyDHCP beside dnsmasq. Each machine is checked for its own MAC,
//! its own command line and every step of its boot as bootfleet recorded
//! it; the time from power-on to the marker and that timeline are printed.

use crate::common::*;
use crate::qemu_lan::*;
use std::time::{Duration, Instant};

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
    lan.start(&FULL_DHCP);

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
    // with no restart of bootfleet. It is listed from its chain-script
    // fetch on, and its facts arrive with its own script request a moment
    // later: wait for that request before reading them.
    let deadline = Instant::now() + Duration::from_secs(300);
    let discovered: serde_json::Value = loop {
        let listed: serde_json::Value =
            serde_json::from_str(&lan.api("/api/v1/discovered")).unwrap();
        let asked_for_script =
            listed.as_array().unwrap().iter().any(|m| {
                m["mac"] == stranger && m["facts"].as_object().is_some_and(|f| !f.is_empty())
            });
        if asked_for_script {
            break listed;
        }
        assert!(
            Instant::now() < deadline,
            "unknown machine never discovered with its facts: {listed}\n{}",
            tail(&lan.log())
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let facts = &discovered
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mac"] == stranger)
        .unwrap()["facts"];
    assert_eq!(facts["platform"], "pcbios", "facts recorded: {discovered}");
    assert_eq!(
        facts["serial"], "SN-B0-00-05",
        "facts recorded: {discovered}"
    );
    // The operator adopts it through the control panel's API (the
    // inventory file was imported into the database at start-up).
    let adopted = lan.api_send(
        "PUT",
        &format!("/api/v1/machines/{stranger}"),
        Some(r#"{"image": "beta", "cmdline_append": "bootfleet.node=five"}"#),
    );
    assert!(adopted.contains(r#""image":"beta""#), "{adopted}");

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
            // OVMF asks for a window of 4 blocks (RFC 7440).
            assert!(
                booted
                    .timeline
                    .iter()
                    .any(|l| l.contains("loader  tftp ipxe.efi (blksize ")
                        && l.contains(", windowsize 4) (200)")),
                "the firmware fetched ipxe.efi over TFTP with windowsize 4: {}",
                booted.timeline.join("\n")
            );
        }
    }

    // ProxyDHCP: dnsmasq gives the addresses, bootfleet only the boot answer.
    lan.stop();
    lan.start_address_server();
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
