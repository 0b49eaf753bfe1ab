//! bootfleet — a network-boot server for fleets of diskless machines.
//!
//! Crate map, lowest layer first; a module imports only from its own
//! layer and those below it (`tests/integration/architecture.rs` checks
//! this, and `docs/architecture.md` draws it with one boot's path):
//!
//! * [`proto`] — sans-I/O protocol cores: MAC addresses, safe file names,
//!   TFTP (read, write, RFC 2090 multicast), DHCPv4 request parsing and
//!   reply addressing, IPv6 router advertisements, HTTP request heads,
//!   range planning and the connection state machine. Also at the bottom:
//!   [`limit`] (token buckets), [`shutdown`] (the stop signal), [`durable`]
//!   (directory syncs), [`cache`] (the mmapped file cache) and [`metrics`]
//!   (sharded counters the data plane bumps and a scrape sums).
//! * [`inventory`] — images, machines and assignments as an immutable
//!   snapshot, and the checks every field passes wherever it comes from.
//! * [`boot`] — what a machine boots: the MAC router, script templates,
//!   boot events, and the hooks ([`boot::hooks`]) the file services call.
//!   [`config`] — the TOML file format and the validated runtime
//!   configuration — sits beside it.
//! * [`server`] — protocol services independent of the I/O backend: DHCP
//!   decisions, leases and their journal; TFTP admission and transfers;
//!   the HTTP file and script service; path safety. [`store`] — the
//!   inventory database (SQLite or PostgreSQL) — sits beside it, with
//!   [`power`] (BMC power actions) and [`ipxe`] (`bootfleet ipxe build`).
//! * [`engine`] — the only place with socket system calls: io_uring
//!   workers and the epoll (tokio) fallback, chosen at start-up, and the
//!   DHCP and router-advertisement sockets.
//! * [`panel`] — the REST API and web panel, on their own listener.
//! * [`app`] — a running server assembled from a configuration.

pub mod app;
pub mod boot;
pub mod cache;
pub mod config;
pub mod durable;
pub mod engine;
pub mod inventory;
pub mod ipxe;
pub mod limit;
pub mod metrics;
pub mod panel;
pub mod power;
pub mod proto;
pub mod seal;
pub mod server;
pub mod shutdown;
pub mod store;
