//! bootfleet — a network-boot server for fleets of diskless machines.
//!
//! Crate map (see `DESIGN.md` in the shared design notes for the reasons):
//!
//! * [`proto`] — sans-I/O protocol cores: TFTP, HTTP request heads and
//!   range planning (DHCP comes with its issue).
//! * [`boot`] — what a machine boots: MAC addresses, the MAC router,
//!   script templates, boot events.
//! * [`inventory`] — images, machines and assignments as an immutable
//!   snapshot (today from `inventory.toml`).
//! * [`config`] — the TOML file format and the validated runtime configuration.
//! * [`cache`] — the mmapped file cache every transfer reads from.
//! * [`limit`] — token buckets per key (DHCP clients, new MACs per address).
//! * [`server`] — protocol drivers that are independent of the I/O backend:
//!   TFTP admission and limits, the HTTP file and script service, path safety.
//! * [`store`] — the inventory database (SQLite) behind the control panel.
//! * [`panel`] — the REST API and web panel, on their own listener.
//! * [`engine`] — the only place with socket syscalls: io_uring workers and
//!   the epoll (tokio) fallback, chosen at start-up.

pub mod app;
pub mod boot;
pub mod cache;
pub mod config;
pub mod durable;
pub mod engine;
pub mod inventory;
pub mod limit;
pub mod panel;
pub mod proto;
pub mod server;
pub mod shutdown;
pub mod store;
