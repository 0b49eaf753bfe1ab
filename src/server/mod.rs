//! Protocol drivers that do not depend on the I/O backend.

pub mod dhcp;
pub mod http;
pub mod multicast;
pub mod paths;
pub mod tftp;
