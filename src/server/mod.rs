//! Protocol services that do not depend on the I/O backend: what to answer,
//! whom to admit, what to record. The engines ([`crate::engine`]) own the
//! sockets and call in here; the protocol cores below are
//! [`crate::proto`].

pub mod dhcp;
pub mod http;
pub mod multicast;
pub mod paths;
pub mod tftp;
