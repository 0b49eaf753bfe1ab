//! bootfleet — a network-boot server for fleets of diskless machines.
//!
//! Crate map (see `DESIGN.md` in the shared design notes for the reasons):
//!
//! * [`proto`] — sans-I/O protocol cores: TFTP, and HTTP range planning
//!   (the HTTP server and DHCP come with their issues).
//! * [`boot`] — what a machine boots: MAC addresses in every spelling and
//!   pxelinux's file names (the MAC router grows here).
//! * [`config`] — the TOML file format and the validated runtime configuration.
//! * [`cache`] — the mmapped file cache every transfer reads from.
//! * [`server`] — protocol drivers that are independent of the I/O backend:
//!   request admission, path resolution, limits, generated files.
//! * [`engine`] — the only place with socket syscalls: io_uring workers and
//!   the epoll (tokio) fallback, chosen at start-up.

pub mod boot;
pub mod cache;
pub mod config;
pub mod engine;
pub mod proto;
pub mod server;
