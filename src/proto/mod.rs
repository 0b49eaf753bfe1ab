//! Sans-I/O protocol cores.
//!
//! Everything below this module is plain data in, plain data out: bytes and
//! `now` go in, datagrams, deadlines and outcomes come out. Nothing here reads
//! the clock, touches a socket, opens a file or spawns. The drivers in
//! [`crate::server`] and the backends in [`crate::engine`] own all of that,
//! which is what lets these cores be tested with byte vectors, property tests,
//! fuzzers and deterministic loss simulations.

pub mod dhcp;
pub mod http;
pub mod mac;
pub mod ndp;
pub mod path;
pub mod pe;
pub mod tftp;

pub use mac::{Mac, MacError, PxelinuxConfig};

/// `bytes` as lower-case hexadecimal (SHA-256 digests, token hashes).
pub fn lower_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
