//! Check-in: how a booted OS tells bootfleet it came up.
//!
//! Every boot config bootfleet renders for an assigned image (iPXE,
//! pxelinux, GRUB) ends its kernel command line with
//!
//! ```text
//! bootfleet.checkin=http://10.0.0.1:9090/api/v1/checkin bootfleet.mac=52:54:00:12:34:56 bootfleet.token=1733580000000-4f2a…
//! ```
//!
//! and the hook in `contrib/checkin/` (initramfs-tools, dracut, a systemd
//! unit) posts `{"mac": …, "token": …}` there once the OS is up. The token
//! is made anew for each config served (so each boot has its own): the time
//! it was issued and an HMAC of the MAC and that time under the operator's
//! key file ([`crate::seal::SealKey::sign`]), so any server holding the key
//! verifies it, and a restart forgets nothing. A token is accepted for
//! [`TOKEN_LIFETIME`] after it was issued.

use std::time::Duration;

use crate::proto::Mac;
use crate::seal::SealKey;

/// Written where the token goes when a config is rendered (and cached);
/// replaced by a fresh token each time the config is served.
pub const TOKEN_MARKER: &str = "BOOTFLEET_CHECKIN_TOKEN";

/// How long after it was issued a token is accepted.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// Where booted machines reach the check-in endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckinUrl {
    /// The operator's `[power] checkin_url`, or the panel's own address.
    Fixed(String),
    /// The panel listens on every address: the host the machine fetched
    /// its script from, on the panel's port.
    SameHost { scheme: &'static str, port: u16 },
}

/// Issues and verifies check-in tokens.
#[derive(Debug, Clone)]
pub struct Checkin {
    key: SealKey,
    url: CheckinUrl,
}

/// Why a check-in was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CheckinError {
    #[error("the token is not one bootfleet issued (malformed)")]
    Malformed,
    #[error("the token was not issued for this machine, or by a server with this key file")]
    Forged,
    #[error("the token has expired; the machine must boot through bootfleet again")]
    Expired,
    #[error("this server does not take check-ins (no key file, or no check-in URL machines can reach; see [power] in the configuration)")]
    Disabled,
}

impl Checkin {
    pub fn new(key: SealKey, url: CheckinUrl) -> Self {
        Self { key, url }
    }

    /// The check-in URL for a machine that asked `base_url` (the boot
    /// server's address as the machine used it; empty for TFTP loader
    /// configs), or `None` when it cannot be known.
    pub fn url_for(&self, base_url: &str) -> Option<String> {
        match &self.url {
            CheckinUrl::Fixed(url) => Some(format!("{}/api/v1/checkin", url.trim_end_matches('/'))),
            CheckinUrl::SameHost { scheme, port } => {
                let host = host_of(base_url);
                (!host.is_empty()).then(|| format!("{scheme}://{host}:{port}/api/v1/checkin"))
            }
        }
    }

    /// The words added to a kernel command line, the token left as
    /// [`TOKEN_MARKER`].
    pub fn cmdline_words(&self, mac: Mac, base_url: &str) -> Option<String> {
        let url = self.url_for(base_url)?;
        Some(format!(
            "bootfleet.checkin={url} bootfleet.mac={mac} bootfleet.token={TOKEN_MARKER}"
        ))
    }

    /// A fresh token for `mac`, issued at `now_ms`.
    pub fn token(&self, mac: Mac, now_ms: u64) -> String {
        let signature = self.key.sign(message(mac, now_ms).as_bytes());
        format!("{now_ms}-{}", &signature[..32])
    }

    /// `body` with every [`TOKEN_MARKER`] replaced by a fresh token.
    pub fn stamp(&self, body: Vec<u8>, mac: Mac, now_ms: u64) -> Vec<u8> {
        let marker = TOKEN_MARKER.as_bytes();
        let Some(first) = body.windows(marker.len()).position(|w| w == marker) else {
            return body;
        };
        let token = self.token(mac, now_ms);
        let mut stamped = Vec::with_capacity(body.len() + token.len());
        let mut rest = &body[..];
        let mut at = Some(first);
        while let Some(index) = at {
            stamped.extend_from_slice(&rest[..index]);
            stamped.extend_from_slice(token.as_bytes());
            rest = &rest[index + marker.len()..];
            at = rest.windows(marker.len()).position(|w| w == marker);
        }
        stamped.extend_from_slice(rest);
        stamped
    }

    /// Checks a token `mac` sent at `now_ms`; the time it was issued.
    pub fn verify(&self, mac: Mac, token: &str, now_ms: u64) -> Result<u64, CheckinError> {
        let (issued, signature) = token.split_once('-').ok_or(CheckinError::Malformed)?;
        let issued: u64 = issued.parse().map_err(|_| CheckinError::Malformed)?;
        if signature.len() != 32 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(CheckinError::Malformed);
        }
        let expected = self.key.sign(message(mac, issued).as_bytes());
        // Compared in constant time: the first 128 bits of the HMAC.
        let same = expected.as_bytes()[..32]
            .iter()
            .zip(signature.as_bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b.to_ascii_lowercase()))
            == 0;
        if !same {
            return Err(CheckinError::Forged);
        }
        let lifetime = TOKEN_LIFETIME.as_millis() as u64;
        // A minute of clock difference between servers is forgiven.
        if issued > now_ms + 60_000 || now_ms.saturating_sub(issued) > lifetime {
            return Err(CheckinError::Expired);
        }
        Ok(issued)
    }
}

/// `10.0.0.1` from `http://10.0.0.1:8080` (brackets kept for IPv6).
pub(super) fn host_of(base_url: &str) -> &str {
    let rest = base_url.split_once("://").map_or(base_url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    if authority.starts_with('[') {
        return authority
            .split(']')
            .next()
            .map_or(authority, |h| &authority[..h.len() + 1]);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn message(mac: Mac, issued_ms: u64) -> String {
    format!("bootfleet check-in {mac} {issued_ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkin(url: CheckinUrl) -> (Checkin, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = SealKey::load_or_create(&dir.path().join("k")).unwrap();
        (Checkin::new(key, url), dir)
    }

    const MAC: Mac = Mac([0x52, 0x54, 0, 0, 0, 1]);

    #[test]
    fn a_token_checks_in_its_own_machine_only_and_expires() {
        let (checkin, _dir) = checkin(CheckinUrl::Fixed("http://10.0.0.1:9090/".into()));
        let now = 1_800_000_000_000;
        let token = checkin.token(MAC, now);
        assert_eq!(checkin.verify(MAC, &token, now + 1000), Ok(now));
        assert_eq!(
            checkin.verify(Mac([0x52, 0x54, 0, 0, 0, 2]), &token, now),
            Err(CheckinError::Forged)
        );
        let lifetime = TOKEN_LIFETIME.as_millis() as u64;
        assert_eq!(
            checkin.verify(MAC, &token, now + lifetime + 1),
            Err(CheckinError::Expired)
        );
        assert_eq!(checkin.verify(MAC, "x", now), Err(CheckinError::Malformed));
        assert_eq!(
            checkin.verify(MAC, "1-zz", now),
            Err(CheckinError::Malformed)
        );
        let forged = format!("{}-{}", now + 1, &token[token.len() - 32..]);
        assert_eq!(checkin.verify(MAC, &forged, now), Err(CheckinError::Forged));
    }

    #[test]
    fn every_marker_is_stamped_with_one_fresh_token() {
        let (checkin, _dir) = checkin(CheckinUrl::SameHost {
            scheme: "http",
            port: 9090,
        });
        let words = checkin.cmdline_words(MAC, "http://10.0.0.1:8080").unwrap();
        assert_eq!(
            words,
            format!("bootfleet.checkin=http://10.0.0.1:9090/api/v1/checkin bootfleet.mac={MAC} bootfleet.token={TOKEN_MARKER}")
        );
        assert_eq!(checkin.cmdline_words(MAC, ""), None, "no host to name");
        let body = format!("kernel x {words}\necho {TOKEN_MARKER}\n").into_bytes();
        let stamped = String::from_utf8(checkin.stamp(body, MAC, 5)).unwrap();
        assert!(!stamped.contains(TOKEN_MARKER));
        let token = checkin.token(MAC, 5);
        assert_eq!(stamped.matches(&token).count(), 2, "{stamped}");
    }
}
