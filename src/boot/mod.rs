//! Everything that decides what a machine boots.
//!
//! Today: [`mac`], the MAC address in every spelling firmware and operators
//! use, and pxelinux's configuration-name rules. The MAC → script router,
//! templates and the unknown-machine policy (the HTTP/router issue) build on
//! it.

pub mod mac;

pub use mac::{Mac, MacError, PxelinuxConfig};
