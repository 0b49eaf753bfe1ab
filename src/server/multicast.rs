//! What the TFTP service hands to RFC 2090 multicast sessions: a read
//! request that asked for the `multicast` option, checked and opened like
//! any other ([`Join`]), and the sessions that take it
//! ([`MulticastSessions`]). The sessions' sockets and their driver are the
//! engine's ([`crate::engine::multicast`]); their protocol core is
//! [`crate::proto::tftp::multicast`].

use std::net::SocketAddr;
use std::sync::Arc;

use crate::cache::FileData;

/// A read request that asked for multicast.
#[derive(Debug)]
pub struct Join {
    pub name: String,
    pub data: Arc<FileData>,
    pub peer: SocketAddr,
    pub blksize: u16,
    pub windowsize: u16,
    /// Options granted besides `multicast` (blksize, tsize...), for its OACK.
    pub options: Vec<(&'static str, String)>,
}

/// The multicast sessions a read request can join.
pub trait MulticastSessions: Send + Sync {
    /// Adds `join` to its file's session, starting one if needed. Gives the
    /// request back when it cannot be served by multicast (no group free,
    /// no socket): the caller then serves it by unicast.
    fn join(&self, join: Join) -> Result<(), Box<Join>>;
}
