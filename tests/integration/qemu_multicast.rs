//! Real iPXE fetches its kernel and initrd by RFC 2090 multicast TFTP
//! (`tftm://`) from bootfleet and boots: QEMU machines, BIOS (iPXE as the
//! NIC's option ROM) and UEFI (the firmware's PXE client, then
//! `ipxe.efi`) mixed, on a boot LAN of [`crate::qemu_lan`], with the
//! multicast-fixed iPXE build ([`patched_ipxe`]).
//!
//! Four machines powered on together share one data stream per file: the
//! bytes bootfleet sends to multicast groups (an nftables counter on the
//! namespace's output) stay within 1.2 times one copy of the kernel and
//! initrd. A fifth machine powered on 5 s late joins and completes, and a
//! sixth pulled from the wall in the middle of its transfer stalls nobody.
//! Each machine's kernel and initrd events name the group and when the
//! machine became the session's master.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::qemu_lan::*;

const INVENTORY: &str = r#"
[images.mc]
kernel = "img/vmlinuz"
initrds = ["img/initrd.gz"]
cmdline = "console=ttyS0 quiet panic=-1 bootfleet.image=mc"
transport = "multicast"
"#;

/// Together: BIOS and UEFI mixed.
const TOGETHER: [(&str, Firmware); 4] = [
    ("52:54:00:d0:00:01", Firmware::BiosIpxe),
    ("52:54:00:d0:00:02", Firmware::UefiPxe),
    ("52:54:00:d0:00:03", Firmware::BiosIpxe),
    ("52:54:00:d0:00:04", Firmware::UefiPxe),
];
const LATE: &str = "52:54:00:d0:00:05";
const PULLED: &str = "52:54:00:d0:00:06";

/// Bytes the namespace has sent to multicast groups, by the nftables
/// counter [`count_multicast`] set up.
fn multicast_bytes() -> u64 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", NS, "nft", "-j", "list", "table", "ip", "bfmc",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    listed["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|item| {
            item["rule"]["expr"]
                .as_array()?
                .iter()
                .find_map(|e| e["counter"]["bytes"].as_u64())
        })
        .expect("the multicast counter")
}

fn count_multicast() {
    run(Command::new("ip").args([
        "netns",
        "exec",
        NS,
        "nft",
        "add table ip bfmc; \
         add chain ip bfmc out { type filter hook output priority 0; }; \
         add rule ip bfmc out ip daddr 224.0.0.0/4 counter",
    ]))
    .unwrap();
}

#[test]
fn ipxe_machines_boot_their_kernel_and_initrd_by_multicast_together() {
    if !can_make_namespaces() || !tools_present() || !have_tool("nft") {
        return;
    }
    let Some(ipxe) = patched_ipxe() else {
        return;
    };
    let mut lan = BootLan::new();
    lan.use_patched_ipxe(&ipxe);
    lan.enable_multicast();
    count_multicast();
    let machines: Vec<(&str, &str)> = TOGETHER
        .iter()
        .map(|(mac, _)| *mac)
        .chain([LATE, PULLED])
        .map(|mac| (mac, "mc"))
        .collect();
    let inventory = with_machines(INVENTORY, &machines);
    std::fs::write(lan.boot_dir().join("inventory.toml"), inventory).unwrap();
    let config = lan.dir.path().join("bootfleet.toml");
    // Machines powered on together reach their kernel seconds apart (UEFI
    // firmware is slower than SeaBIOS): a session's first block waits for
    // them, as an operator would set it for a power-on storm.
    std::fs::write(
        &config,
        format!(
            "[tftp]\nmulticast_groups = \"239.255.66.1-239.255.66.20\"\n\
             multicast_interface = \"{SERVER_IP}\"\nmulticast_gather_ms = 15000\n"
        ),
    )
    .unwrap();
    lan.start_with_checkin(Some(&config));

    let mut machines: Vec<Machine> = TOGETHER
        .iter()
        .map(|(mac, firmware)| lan.power_on(mac, *firmware))
        .collect();
    let pulled = lan.power_on(PULLED, Firmware::BiosIpxe);
    let pulled_on_ms = epoch_ms();
    std::thread::sleep(Duration::from_secs(5));
    machines.push(lan.power_on(LATE, Firmware::BiosIpxe));

    // The sixth machine is switched off once its kernel session runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !lan.log().contains("multicast session started") {
        assert!(
            Instant::now() < deadline,
            "no multicast session:\n{}",
            tail(&lan.log())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    pulled.kill();

    let booted: Vec<(String, Booted)> = machines
        .into_iter()
        .map(|machine| (machine.mac.clone(), machine.booted(&lan)))
        .collect();
    let sent = multicast_bytes();
    let boot = lan.boot_dir();
    let one_copy = std::fs::metadata(boot.join("img/vmlinuz")).unwrap().len()
        + std::fs::metadata(boot.join("img/initrd.gz")).unwrap().len();
    let mut took_over = std::collections::HashMap::new();
    for (mac, booted) in &booted {
        let node = format!("bootfleet.node={}", &mac[12..].replace(':', ""));
        for wanted in ["bootfleet.image=mc", &node, "bootfleet.token="] {
            assert!(booted.cmdline.contains(wanted), "{mac}: {}", booted.cmdline);
        }
        for phase in ["kernel", "initrd"] {
            let line = booted
                .timeline
                .iter()
                .find(|l| l.split_whitespace().nth(1) == Some(phase))
                .unwrap_or_else(|| panic!("{mac}: no {phase} event: {:#?}", booted.timeline));
            // Completed, not timed out: a member iPXE leaves silently once
            // it holds the file still counts as served.
            assert!(
                line.contains("multicast 239.255.66.") && line.ends_with("(200)"),
                "{mac}: {line}"
            );
            // Every member paced the group in turn (to be sent what it
            // lacked and confirm it): the events say when each took over.
            assert!(line.contains(", master "), "{mac}: {line}");
            if line.contains("master after") {
                *took_over.entry(phase).or_insert(0) += 1;
            }
        }
    }
    // At most one machine per file started its session; the others became
    // master when the one before them was done: master changes.
    for phase in ["kernel", "initrd"] {
        assert!(
            took_over.get(phase).copied().unwrap_or(0) >= booted.len() - 1,
            "{phase}: {took_over:?}"
        );
    }
    let log = lan.log();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("multicast session ended"))
        .collect();
    eprintln!(
        "multicast: {} bytes to groups for {} bytes of kernel and initrd ({:.2}x), sessions:\n  {}",
        sent,
        one_copy,
        sent as f64 / one_copy as f64,
        sessions.join("\n  ")
    );
    assert!(
        sessions.iter().any(|l| l.contains("img/vmlinuz"))
            && sessions.iter().any(|l| l.contains("img/initrd.gz")),
        "{log}"
    );
    // The pulled machine got no further than its kernel: no initrd, no
    // check-in. (Its kernel session counts it among the members presumed
    // complete: silent when made master after every block went out, as
    // iPXE is once it holds the file; the missing check-in is what tells.)
    let pulled_timeline = lan.timeline(PULLED, pulled_on_ms);
    assert!(
        !pulled_timeline
            .iter()
            .any(|l| [Some("initrd"), Some("checkin")].contains(&l.split_whitespace().nth(1))),
        "{pulled_timeline:#?}"
    );
    // Five machines booted, and the groups carried a little more than
    // one copy (the late machine's missed blocks are sent again), not five.
    assert!(
        (sent as f64) <= 1.2 * one_copy as f64 * 1.05,
        "{sent} bytes to the groups for {one_copy} bytes of files"
    );
}
