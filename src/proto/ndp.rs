//! IPv6 Router Solicitations answered with a Router Advertisement that
//! says "no IPv6 here" (RFC 4861 §4.1, §4.2, §6.2.6), sans-I/O.
//!
//! Why a boot server speaks NDP at all: iPXE configures a NIC by running
//! DHCPv4 and IPv6 autoconfiguration side by side and waits for both. On an
//! IPv4-only boot LAN no router ever answers its Router Solicitations, so
//! every iPXE instance sits out the solicitation timeout (about 15 s with
//! Debian's build, measured in `docs/benchmarks.md`) before it even asks
//! for its script. iPXE ends that wait at the first advertisement whose M
//! and O flags are clear (`ipv6conf_rx_router_advertisement` in its ndp.c),
//! so bootfleet answers with exactly that: router lifetime 0 (not a default
//! router), no prefixes, no flags. Hosts take nothing from it but "no
//! stateful configuration here".
//!
//! The two messages are 8 and 24 bytes of fixed layout; a crate such as
//! smoltcp or pnet would bring a whole packet library for them, so they are
//! read and written here with named offsets. The kernel fills in the
//! ICMPv6 checksum of raw ICMPv6 sockets (RFC 3542 §3.1), so it is left 0.

use std::time::{Duration, Instant};

/// ICMPv6 type of a Router Solicitation.
pub const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 type of a Router Advertisement.
pub const ROUTER_ADVERTISEMENT: u8 = 134;
/// The hop limit every NDP message is sent with and must arrive with.
pub const NDP_HOP_LIMIT: u32 = 255;

/// Fewest time between two advertisements on one link. RFC 4861 asks
/// routers for 3 s between *multicast* answers; an advertisement that only
/// ends iPXE's wait is worth sending sooner, and one per 100 ms still
/// answers a power-on storm of any size (each advertisement reaches every
/// machine soliciting at that moment) at no real cost to the link.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Offsets in an ICMPv6 message (the IPv6 header is not part of what a raw
/// ICMPv6 socket reads or writes).
mod offset {
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    // 2..4: checksum, filled in by the kernel.
    pub const CUR_HOP_LIMIT: usize = 4;
    pub const FLAGS: usize = 5;
    pub const ROUTER_LIFETIME: usize = 6;
    // 8..12 reachable time, 12..16 retransmit timer: 0, unspecified.
    pub const OPTIONS: usize = 16;
}

/// NDP option type of a source link-layer address.
const OPTION_SOURCE_LINK_ADDRESS: u8 = 1;

/// Whether `message` (an ICMPv6 message as a raw socket reads it) is a
/// well-formed Router Solicitation: type 133, code 0, at least 8 bytes, and
/// options whose lengths are non-zero and fit (§6.1.1).
pub fn is_router_solicitation(message: &[u8]) -> bool {
    if message.len() < 8
        || message[offset::TYPE] != ROUTER_SOLICITATION
        || message[offset::CODE] != 0
    {
        return false;
    }
    let mut options = &message[8..];
    while !options.is_empty() {
        let Some(&units) = options.get(1) else {
            return false;
        };
        let length = usize::from(units) * 8;
        if length == 0 || length > options.len() {
            return false;
        }
        options = &options[length..];
    }
    true
}

/// A Router Advertisement that ends a host's autoconfiguration wait and
/// configures nothing: lifetime 0, flags M and O clear, no prefix; with the
/// sender's link-layer address when known, so receivers need not resolve it.
pub fn router_advertisement(link_address: Option<[u8; 6]>) -> Vec<u8> {
    let mut message = vec![0u8; offset::OPTIONS];
    message[offset::TYPE] = ROUTER_ADVERTISEMENT;
    message[offset::CODE] = 0;
    message[offset::CUR_HOP_LIMIT] = 0;
    message[offset::FLAGS] = 0;
    // Router lifetime 0: not a default router (§4.2).
    message[offset::ROUTER_LIFETIME..offset::ROUTER_LIFETIME + 2]
        .copy_from_slice(&0u16.to_be_bytes());
    if let Some(mac) = link_address {
        message.extend_from_slice(&[OPTION_SOURCE_LINK_ADDRESS, 1]);
        message.extend_from_slice(&mac);
    }
    message
}

/// When to advertise on one link: at once for a solicitation after a quiet
/// [`MIN_INTERVAL`], otherwise once at the end of it for every solicitation
/// that arrived meanwhile.
#[derive(Debug, Default)]
pub struct Pacer {
    last_sent: Option<Instant>,
    pending: bool,
}

impl Pacer {
    /// A solicitation arrived.
    pub fn solicited(&mut self) {
        self.pending = true;
    }

    /// Whether to send an advertisement at `now`; if so, it counts as sent.
    pub fn poll_transmit(&mut self, now: Instant) -> bool {
        let due = self.pending
            && self
                .last_sent
                .is_none_or(|last| now.saturating_duration_since(last) >= MIN_INTERVAL);
        if due {
            self.pending = false;
            self.last_sent = Some(now);
        }
        due
    }

    /// When to call [`Pacer::poll_transmit`] again: the end of the quiet
    /// interval, while a solicitation waits for it.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.pending {
            self.last_sent.map(|last| last + MIN_INTERVAL)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Router Solicitation as iPXE sends it: type 133, code 0, checksum,
    /// 4 reserved bytes, and its source link-layer address option.
    const IPXE_SOLICITATION: [u8; 16] = [
        133, 0, 0x7a, 0x1c, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0x00, 0xb0, 0x00, 0x01,
    ];

    #[test]
    fn solicitations_are_recognised_and_malformed_ones_refused() {
        assert!(is_router_solicitation(&IPXE_SOLICITATION));
        assert!(is_router_solicitation(&IPXE_SOLICITATION[..8]));
        // Every truncation inside the option, another type, another code.
        for cut in 9..IPXE_SOLICITATION.len() {
            assert!(!is_router_solicitation(&IPXE_SOLICITATION[..cut]), "{cut}");
        }
        for cut in 0..8 {
            assert!(!is_router_solicitation(&IPXE_SOLICITATION[..cut]), "{cut}");
        }
        let mut other = IPXE_SOLICITATION;
        other[0] = ROUTER_ADVERTISEMENT;
        assert!(!is_router_solicitation(&other));
        other = IPXE_SOLICITATION;
        other[1] = 1;
        assert!(!is_router_solicitation(&other));
        // An option of length 0 would loop forever in a careless reader.
        other = IPXE_SOLICITATION;
        other[9] = 0;
        assert!(!is_router_solicitation(&other));
    }

    #[test]
    fn advertisement_configures_nothing() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        assert_eq!(
            router_advertisement(Some(mac)),
            [134, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 0, 0, 0, 0, 1]
        );
        assert_eq!(router_advertisement(None).len(), 16);
    }

    #[test]
    fn pacer_answers_at_once_then_once_per_interval() {
        let start = Instant::now();
        let mut pacer = Pacer::default();
        assert!(!pacer.poll_transmit(start), "nothing asked, nothing sent");
        pacer.solicited();
        assert!(pacer.poll_transmit(start));
        assert_eq!(pacer.poll_timeout(), None);
        // A burst right after: one advertisement at the end of the interval.
        for _ in 0..1000 {
            pacer.solicited();
        }
        let soon = start + MIN_INTERVAL / 2;
        assert!(!pacer.poll_transmit(soon));
        assert_eq!(pacer.poll_timeout(), Some(start + MIN_INTERVAL));
        assert!(pacer.poll_transmit(start + MIN_INTERVAL));
        assert!(!pacer.poll_transmit(start + MIN_INTERVAL * 5));
    }
}
