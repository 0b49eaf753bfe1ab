//! UDP generic segmentation offload (`UDP_SEGMENT`, Linux 4.18+): a window
//! of TFTP DATA blocks leaves in one `sendmsg` whose iovecs alternate
//! 4-byte headers and slices of the mmapped file, and the kernel (or the
//! NIC) cuts it into datagrams of one size (the last may be shorter). One
//! system call and one trip down the UDP/IP stack per window instead of
//! one per block, and no copy of the payload in user space.
//!
//! Used by the epoll engine's unicast transfers and by multicast sessions
//! ([`DataSender`]); the io_uring engine lays out its own message headers
//! for its submission ring but shares [`set_segment_size`] and the limits.
//! Written by hand: the crates that wrap `UDP_SEGMENT` (quinn-udp) send one
//! contiguous buffer, which would mean copying every block into it first.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddrV4;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

use crate::proto::tftp::packet;

/// The kernel segments at most 64 datagrams per GSO send.
pub const MAX_SEGMENTS: usize = 64;
/// Bytes per GSO send, below the 64 KiB IP limit.
pub const MAX_BYTES: usize = 60_000;

/// Room for one `UDP_SEGMENT` control message (`CMSG_SPACE(2)` = 24 bytes),
/// aligned as `cmsghdr` requires.
pub type SegmentControl = [u64; 4];

/// Whether GSO sends still work here: cleared, once for the process, the
/// first time the kernel refuses one (`EINVAL` from a kernel without
/// `UDP_SEGMENT`, `EIO` from a route whose device cannot checksum for it).
static GSO_WORKS: AtomicBool = AtomicBool::new(true);

/// How many blocks of `segment` bytes (header included) one send carries.
pub fn blocks_per_send(segment: usize) -> usize {
    (MAX_BYTES / segment.max(1)).clamp(1, MAX_SEGMENTS)
}

/// Points `msg`'s control data at `buffer`, holding `UDP_SEGMENT` =
/// `segment` (the size of every datagram but the last).
///
/// # Safety
/// `buffer` must stay valid and unmoved for as long as the kernel may read
/// `msg` (until `sendmsg` returns, or an io_uring send completes).
pub unsafe fn set_segment_size(msg: &mut libc::msghdr, buffer: &mut SegmentControl, segment: u16) {
    let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
    msg.msg_control = buffer.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the buffer is 32 bytes, more than `space`, and 8-byte
    // aligned; CMSG_FIRSTHDR of a control area that large is non-null.
    let cmsg = libc::CMSG_FIRSTHDR(msg);
    (*cmsg).cmsg_level = libc::SOL_UDP;
    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
}

/// Sends runs of DATA blocks from one socket, by GSO where the kernel
/// takes it, one `sendmsg` per datagram where not. Keeps its buffers
/// between sends.
#[derive(Default)]
pub struct DataSender {
    headers: Vec<[u8; packet::DATA_HEADER_LEN]>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs only ever point into memory borrowed for the length
// of one `send` call, and are cleared before it returns.
unsafe impl Send for DataSender {}

impl DataSender {
    /// Sends `blocks` (wire block number, payload), every payload but the
    /// last `segment - 4` bytes long, as DATA datagrams on non-blocking
    /// socket `fd`, to `to` or (`None`) to its connected peer. Returns how
    /// many blocks went out: fewer than given when the socket's buffer
    /// filled (send the rest when it is writable) or an error came after
    /// some went; an error only when none went.
    pub fn send(
        &mut self,
        fd: RawFd,
        to: Option<SocketAddrV4>,
        blocks: &[(u16, &[u8])],
        segment: usize,
    ) -> io::Result<usize> {
        let mut sent = 0;
        while sent < blocks.len() {
            let gso = GSO_WORKS.load(Ordering::Relaxed) && blocks.len() - sent > 1;
            let count = if gso {
                blocks_per_send(segment).min(blocks.len() - sent)
            } else {
                1
            };
            match self.send_one(fd, to, &blocks[sent..sent + count], gso.then_some(segment)) {
                Ok(()) => sent += count,
                Err(error)
                    if gso && matches!(error.raw_os_error(), Some(libc::EINVAL | libc::EIO)) =>
                {
                    if GSO_WORKS.swap(false, Ordering::Relaxed) {
                        warn!(%error, "UDP GSO send failed; sending TFTP datagrams one by one from now on");
                    }
                }
                Err(error) if sent == 0 => return Err(error),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    /// [`Self::send`] on a tokio socket, waiting for room in its buffer
    /// as often as needed, until every block went.
    pub async fn send_all(
        &mut self,
        socket: &tokio::net::UdpSocket,
        to: Option<SocketAddrV4>,
        blocks: &[(u16, &[u8])],
        segment: usize,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        let mut sent = 0;
        while sent < blocks.len() {
            let rest = &blocks[sent..];
            sent += socket
                .async_io(tokio::io::Interest::WRITABLE, || {
                    self.send(fd, to, rest, segment)
                })
                .await?;
        }
        Ok(())
    }

    /// One `sendmsg` of `blocks`, segmented by `segment` when given.
    fn send_one(
        &mut self,
        fd: RawFd,
        to: Option<SocketAddrV4>,
        blocks: &[(u16, &[u8])],
        segment: Option<usize>,
    ) -> io::Result<()> {
        self.headers.clear();
        self.iovecs.clear();
        self.headers
            .extend(blocks.iter().map(|&(block, _)| packet::data_header(block)));
        for (header, &(_, payload)) in self.headers.iter().zip(blocks) {
            self.iovecs.push(libc::iovec {
                iov_base: header.as_ptr() as *mut libc::c_void,
                iov_len: header.len(),
            });
            self.iovecs.push(libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            });
        }
        let mut address = to.map(sockaddr_v4);
        let mut control: SegmentControl = [0; 4];
        // SAFETY: all-zero is a valid msghdr.
        let mut msg: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
        msg.msg_iov = self.iovecs.as_mut_ptr();
        msg.msg_iovlen = self.iovecs.len();
        if let Some(address) = address.as_mut() {
            msg.msg_name = (address as *mut libc::sockaddr_in).cast();
            msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        }
        if let Some(segment) = segment {
            // SAFETY: `control` lives until after the sendmsg below.
            unsafe { set_segment_size(&mut msg, &mut control, segment as u16) };
        }
        // SAFETY: every pointer in `msg` (iovecs, the headers and payloads
        // they point at, address, control) is valid for this call.
        let result = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
        self.iovecs.clear();
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn sockaddr_v4(address: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: address.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*address.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A window sent in one GSO send arrives as the datagrams it stands
    /// for, connected or addressed, the last one short.
    #[test]
    fn a_window_arrives_as_one_datagram_per_block() {
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let std::net::SocketAddr::V4(to) = receiver.local_addr().unwrap() else {
            unreachable!()
        };
        let file: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let blksize = 1468;
        let blocks: Vec<(u16, &[u8])> = file
            .chunks(blksize)
            .enumerate()
            .map(|(i, chunk)| (i as u16 + 1, chunk))
            .collect();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut data = DataSender::default();
        for connected in [false, true] {
            let to_arg = if connected {
                sender.connect(to).unwrap();
                None
            } else {
                Some(to)
            };
            let sent = data
                .send(sender.as_raw_fd(), to_arg, &blocks, blksize + 4)
                .unwrap();
            assert_eq!(sent, blocks.len());
            let mut buf = [0u8; 2048];
            for (number, payload) in &blocks {
                let len = receiver.recv(&mut buf).unwrap();
                assert_eq!(&buf[..4], &packet::data_header(*number));
                assert_eq!(&buf[4..len], *payload, "block {number}");
            }
        }
    }

    #[test]
    fn sends_stay_under_the_kernels_limits() {
        assert_eq!(blocks_per_send(1472), 40);
        assert_eq!(blocks_per_send(516), 64);
        assert_eq!(blocks_per_send(65_468), 1);
        assert_eq!(blocks_per_send(0), MAX_SEGMENTS);
    }
}
