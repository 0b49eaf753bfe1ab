//! Everything that decides what a machine boots.
//!
//! Today:
//! * [`mac`] — the MAC address in every spelling firmware and operators use,
//!   and pxelinux's configuration-name rules;
//! * [`script`] — the `/boot.ipxe` chain script and the operators' static
//!   per-MAC scripts (the classic `xx:xx:xx:xx:xx:xx.gpxe` layout).
//!
//! The MAC → script router, templates and the unknown-machine policy (the
//! HTTP/router issue) build on these.

pub mod mac;
pub mod script;

pub use mac::{Mac, MacError, PxelinuxConfig};
pub use script::{chain_script, find_static_script, StaticScript};
