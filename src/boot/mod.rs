//! Everything that decides what a machine boots. (The MAC address itself,
//! in every spelling, is wire data: [`crate::proto::mac`].)
//!
//! * [`script`] — the `/boot.ipxe` chain script and the operators' static
//!   per-MAC scripts (the classic `xx:xx:xx:xx:xx:xx.gpxe` layout);
//! * [`render`] — the minijinja templates scripts and loader configs are
//!   rendered from;
//! * [`router`] — the MAC router: inventory snapshot → each machine's
//!   script, pxelinux/GRUB configs over TFTP, fetches → boot events. Its
//!   parts: `current` (the snapshot in use, swapped atomically),
//!   [`policy`] (the pure decision: MAC + menu choice + snapshot → what it
//!   boots), [`seen`] (machines that asked, discovered ones), [`clients`]
//!   (which machine each client address is) and [`ledger`] (one-shot
//!   assignments, written off the data plane);
//! * [`events`] — the boot events every script, kernel and initrd makes;
//! * [`hooks`] — the traits through which the file services ask for
//!   generated files and report finished transfers.

pub mod checkin;
pub mod clients;
mod current;
pub mod events;
pub mod hooks;
pub mod ledger;
pub mod policy;
pub mod render;
pub mod router;
pub mod script;
pub mod seen;

pub use router::{FileServed, Router};
pub use seen::SeenMachine;

/// Most machines (and client addresses) remembered as seen: a spray of
/// random MACs cannot grow memory without bound.
const MAX_SEEN: usize = 100_000;
pub use script::{chain_script, find_static_script, StaticScript};
