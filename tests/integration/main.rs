//! Integration tests: one binary (see STYLE.md). Real clients against a real
//! server on loopback, a lossy link and DHCP clients inside network
//! namespaces, and QEMU machines booting end to end on a bridge.

mod architecture;
mod cli;
mod common;
mod dhcp_namespace;
mod hostile;
mod http;
mod lossy_namespace;
mod multicast;
mod operability;
mod qemu_boot;
mod qemu_ipxe_methods;
// Shared with benches/boot_compare.rs, which uses the parts the test does not
// (the reference stack, boot times).
mod panel;
mod panel_browser;
mod postgres;
mod power;
#[allow(dead_code)]
mod qemu_lan;
mod qemu_multicast;
mod qemu_secure_boot;
mod real_clients;
mod router;
mod scale_out;
mod shared_leases;
mod systemd;
mod uploads;
mod workers;
