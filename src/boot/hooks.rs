//! The seams between the file services and boot policy.
//!
//! The TFTP service (and the multicast sessions) ask a [`FileGenerator`] for
//! names that are answered from memory (pxelinux and GRUB configs rendered
//! per MAC) and tell every [`TransferObserver`] about each read that ended,
//! which is how loaders, kernels and initrds fetched over TFTP become boot
//! events. The traits live here, with the policy that implements them, so
//! that `server/` depends on `boot/` and never the other way round.

use std::net::SocketAddr;
use std::time::Duration;

/// Answers some file names from memory instead of the disk: the seam through
/// which the MAC router serves `pxelinux.cfg/01-<mac>` and GRUB configs.
pub trait FileGenerator: Send + Sync {
    /// Contents for `name` (a safe path relative to the root, without a
    /// leading `/`) requested by `client`, or `None` to fall through to the
    /// next generator and finally the disk.
    fn generate(&self, name: &str, client: SocketAddr) -> Option<Vec<u8>>;

    /// Whether [`Self::generate`] for `name` may touch the file system: an
    /// engine thread that must not block hands such a request to one that
    /// may. By default every name may.
    fn may_block(&self, name: &str) -> bool {
        let _ = name;
        true
    }
}

/// A read transfer that ended, or a read request that was refused, as
/// [`TransferObserver`]s are told of it.
#[derive(Debug)]
pub struct FinishedRead<'a> {
    /// The file, relative to the root.
    pub name: &'a str,
    pub peer: SocketAddr,
    /// Bytes sent: the whole file when `complete`, otherwise 0.
    pub bytes: u64,
    pub elapsed: Duration,
    /// The client acknowledged the last block.
    pub complete: bool,
    /// How it ended, as an HTTP status (see
    /// [`crate::boot::events::failure_cause`]): 200 complete, 404 refused
    /// because the file is missing, 408 the client went silent...
    pub status: u16,
    /// Negotiated block and window size (RFC 2348, RFC 7440): how the
    /// client asked for the file, which is where firmware differs.
    pub blksize: u16,
    pub windowsize: u16,
    /// For a multicast (RFC 2090) member, its part in the session.
    pub multicast: Option<MulticastPart>,
}

/// A member's part in a multicast TFTP session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MulticastPart {
    /// The group the session sent to.
    pub group: SocketAddr,
    /// How long after joining it was made master (paced the group with its
    /// ACKs; zero for the machine that started the session), or `None`
    /// when it only listened.
    pub master_after: Option<std::time::Duration>,
}

/// Told about every read transfer that ends (size queries aside) and every
/// read request refused after its name was checked: how loaders, kernels
/// and initrds fetched over TFTP become boot events, failures included.
pub trait TransferObserver: Send + Sync {
    fn read_finished(&self, read: &FinishedRead<'_>);
}
