//! Integration tests: one binary (see STYLE.md). Real clients against a real
//! server on loopback, and a lossy link inside network namespaces.

mod common;
mod dhcp_namespace;
mod hostile;
mod http;
mod lossy_namespace;
mod qemu_boot;
mod real_clients;
mod router;
mod uploads;
