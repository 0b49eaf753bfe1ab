//! Option negotiation for read requests.
//!
//! * RFC 2347 — the server acknowledges only options it understands, in an
//!   OACK; unknown options are silently ignored; no acknowledged option at all
//!   means no OACK and the transfer starts with DATA 1.
//! * RFC 2348 — `blksize` 8..=65464; a larger request is answered with a
//!   smaller value (here also clamped to the configured maximum, which keeps
//!   datagrams within the boot LAN's MTU); a smaller one is ignored.
//! * RFC 2349 — `timeout` 1..=255 seconds, echoed and used as the
//!   retransmission interval; `tsize` answered with the file's size.
//! * RFC 7440 — `windowsize` 1..=65535, clamped to the configured maximum.

use std::time::Duration;

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Block size without the option (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;

/// What the server is willing to grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationLimits {
    /// Upper bound for `blksize` (8..=65464).
    pub max_blksize: u16,
    /// Upper bound for `windowsize` (≥ 1).
    pub max_windowsize: u16,
}

impl Default for NegotiationLimits {
    fn default() -> Self {
        Self {
            max_blksize: 1468,
            max_windowsize: 64,
        }
    }
}

/// The outcome of negotiation: the parameters of the transfer and the OACK
/// to send (empty when no option was acknowledged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// Retransmission interval the client asked for, if any.
    pub timeout: Option<Duration>,
    /// Acknowledged options, in the client's order, with the granted values.
    pub oack: Vec<(&'static str, String)>,
}

/// Negotiates a read request's options for a file of `size` bytes.
///
/// `options` are the request's (name, value) pairs as sent; names compare
/// case-insensitively and a repeated option counts once (the first).
pub fn negotiate(options: &[(&str, &str)], size: u64, limits: NegotiationLimits) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: None,
        oack: Vec::new(),
    };
    let max_blksize = limits.max_blksize.clamp(8, MAX_BLKSIZE);
    let max_window = limits.max_windowsize.max(1);
    for (index, (name, value)) in options.iter().enumerate() {
        let first = !options[..index]
            .iter()
            .any(|(earlier, _)| earlier.eq_ignore_ascii_case(name));
        if !first {
            continue;
        }
        let Ok(number) = value.trim().parse::<u64>() else {
            continue; // RFC 2347: an option the server cannot honour is ignored.
        };
        if name.eq_ignore_ascii_case("blksize") {
            if number >= 8 {
                n.blksize = number.min(u64::from(max_blksize)) as u16;
                n.oack.push(("blksize", n.blksize.to_string()));
            }
        } else if name.eq_ignore_ascii_case("windowsize") {
            if (1..=65535).contains(&number) {
                n.windowsize = number.min(u64::from(max_window)) as u16;
                n.oack.push(("windowsize", n.windowsize.to_string()));
            }
        } else if name.eq_ignore_ascii_case("timeout") {
            if (1..=255).contains(&number) {
                n.timeout = Some(Duration::from_secs(number));
                n.oack.push(("timeout", number.to_string()));
            }
        } else if name.eq_ignore_ascii_case("tsize") {
            n.oack.push(("tsize", size.to_string()));
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_blksize: u16, max_windowsize: u16) -> NegotiationLimits {
        NegotiationLimits {
            max_blksize,
            max_windowsize,
        }
    }

    #[test]
    fn no_options_means_no_oack_and_rfc1350_defaults() {
        let n = negotiate(&[], 10, NegotiationLimits::default());
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, None));
        assert!(n.oack.is_empty());
    }

    #[test]
    fn ipxe_request_gets_blksize_and_tsize() {
        let n = negotiate(
            &[("blksize", "1432"), ("tsize", "0")],
            70_000,
            NegotiationLimits::default(),
        );
        assert_eq!(n.blksize, 1432);
        assert_eq!(
            n.oack,
            vec![("blksize", "1432".into()), ("tsize", "70000".into())]
        );
    }

    #[test]
    fn uefi_windowsize_and_clamping() {
        let n = negotiate(
            &[("BlkSize", "65464"), ("windowsize", "4"), ("timeout", "3")],
            1,
            limits(1468, 64),
        );
        assert_eq!((n.blksize, n.windowsize), (1468, 4));
        assert_eq!(n.timeout, Some(Duration::from_secs(3)));
        let n = negotiate(&[("windowsize", "1000")], 1, limits(1468, 16));
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.oack, vec![("windowsize", "16".into())]);
    }

    #[test]
    fn invalid_values_are_ignored_not_fatal() {
        let n = negotiate(
            &[
                ("blksize", "7"),
                ("timeout", "0"),
                ("timeout", "5"),
                ("windowsize", "0"),
                ("tsize", "x"),
                ("multicast", ""),
                ("utimeout", "1000"),
            ],
            1,
            NegotiationLimits::default(),
        );
        assert_eq!(n.blksize, 512);
        assert!(n.oack.is_empty(), "{:?}", n.oack);
    }

    #[test]
    fn blksize_above_rfc_maximum_is_answered_with_the_maximum() {
        let n = negotiate(&[("blksize", "99999999999")], 1, limits(65464, 1));
        assert_eq!(n.blksize, 65464);
    }
}
