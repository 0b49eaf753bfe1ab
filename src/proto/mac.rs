//! MAC addresses as operators, firmware and bootloaders spell them.
//!
//! A machine is known by its MAC address, and every tool writes it
//! differently: `52:54:00:12:34:56` (iPXE's `${net0/mac}`, the classic
//! per-MAC `.gpxe` files), `52%3A54%3A00…` (the same, URL-encoded by iPXE in
//! a URL), `52-54-00-12-34-56` (Windows, pxelinux), `525400123456` (bare
//! hex), `5254.0012.3456` (Cisco), in either case. [`Mac::parse`] accepts all
//! of them; [`Display`](std::fmt::Display) writes the canonical lower-case
//! colon form.
//!
//! pxelinux asks TFTP for its configuration in a fixed order (the pxelinux
//! documentation, "Configuration"): `pxelinux.cfg/01-<mac with hyphens>`
//! (01 is the ARP hardware type of Ethernet), then the client's IPv4 address
//! in upper-case hex, shortened one digit at a time, then `default`.
//! [`pxelinux_config_names`] lists that order and [`PxelinuxConfig::parse`]
//! reads a requested name back, so a generated-file seam can answer it.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address ({why}); write it as 52:54:00:12:34:56")]
pub struct MacError {
    input: String,
    why: &'static str,
}

impl Mac {
    /// Parses any common spelling (see the module documentation).
    pub fn parse(input: &str) -> Result<Self, MacError> {
        let error = |why| MacError {
            input: input.chars().take(64).collect(),
            why,
        };
        let trimmed = input.trim();
        // Every script request is parsed here: no allocation unless the
        // MAC arrives percent-encoded.
        let decoded = if trimmed.contains('%') {
            std::borrow::Cow::Owned(percent_decode_separators(trimmed))
        } else {
            std::borrow::Cow::Borrowed(trimmed)
        };
        let text = decoded.as_bytes();
        // Which positions hold a separator, and which one.
        let (separator, is_separator): (u8, fn(usize) -> bool) = match text.len() {
            // 52:54:00:12:34:56 or 52-54-00-12-34-56
            17 => {
                if text[2] != b':' && text[2] != b'-' {
                    return Err(error("unknown separator"));
                }
                (text[2], |i| i % 3 == 2)
            }
            // 5254.0012.3456
            14 => (b'.', |i| i == 4 || i == 9),
            12 => (0, |_| false),
            _ => return Err(error("wrong length")),
        };
        let mut digits = [0u8; 12];
        let mut count = 0;
        for (i, &byte) in text.iter().enumerate() {
            if text.len() != 12 && is_separator(i) != (byte == separator) {
                return Err(error(if text.len() == 14 {
                    "expected three groups of four hex digits"
                } else {
                    "expected six groups of two hex digits"
                }));
            }
            if !is_separator(i) {
                digits[count] = match byte {
                    b'0'..=b'9' => byte - b'0',
                    b'a'..=b'f' => byte - b'a' + 10,
                    b'A'..=b'F' => byte - b'A' + 10,
                    _ => return Err(error("not hex")),
                };
                count += 1;
            }
        }
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = digits[2 * i] << 4 | digits[2 * i + 1];
        }
        Ok(Mac(bytes))
    }

    /// `52-54-00-12-34-56`.
    pub fn hyphenated(&self) -> String {
        String::from_utf8_lossy(&self.spelled(b'-')).into_owned()
    }

    /// `01-52-54-00-12-34-56`, pxelinux's per-machine file name.
    pub fn pxelinux_name(&self) -> String {
        format!("01-{}", self.hyphenated())
    }

    /// The six bytes in lower-case hex with `separator` between them, on
    /// the stack: a MAC is written on every script request, so this is
    /// kept free of `format!`.
    fn spelled(&self, separator: u8) -> [u8; 17] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [separator; 17];
        for (i, byte) in self.0.iter().enumerate() {
            text[3 * i] = HEX[usize::from(byte >> 4)];
            text[3 * i + 1] = HEX[usize::from(byte & 0x0f)];
        }
        text
    }
}

/// Only the separators iPXE encodes are decoded; anything else stays and is
/// then refused as not hex.
fn percent_decode_separators(input: &str) -> String {
    input
        .replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%2D", "-")
        .replace("%2d", "-")
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.spelled(b':');
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// As text (`aa:bb:cc:dd:ee:ff`), in JSON and every other format.
impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Mac::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, MacError> {
        Mac::parse(s)
    }
}

/// The names pxelinux requests, in its order, for a machine with this MAC
/// and IPv4 address (without the `pxelinux.cfg/` directory).
pub fn pxelinux_config_names(mac: Mac, ip: Ipv4Addr) -> Vec<String> {
    let hex = format!("{:08X}", u32::from(ip));
    let mut names = vec![mac.pxelinux_name()];
    names.extend((1..=8).rev().map(|len| hex[..len].to_string()));
    names.push("default".into());
    names
}

/// What a requested `pxelinux.cfg/` name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PxelinuxConfig {
    /// `01-aa-bb-cc-dd-ee-ff`: this machine's own file.
    Mac(Mac),
    /// An upper-case hex prefix of the client's IPv4 address (1 to 8 digits).
    IpPrefix(String),
    /// `default`.
    Default,
}

impl PxelinuxConfig {
    /// Reads a name requested under `pxelinux.cfg/` (the directory already
    /// stripped); `None` for anything pxelinux does not ask for.
    pub fn parse(name: &str) -> Option<Self> {
        if name == "default" {
            return Some(PxelinuxConfig::Default);
        }
        if let Some(rest) = name.strip_prefix("01-") {
            if rest.len() == 17 && rest.as_bytes()[2] == b'-' {
                return Mac::parse(rest).ok().map(PxelinuxConfig::Mac);
            }
        }
        let upper_hex = |b: u8| b.is_ascii_digit() || (b'A'..=b'F').contains(&b);
        if (1..=8).contains(&name.len()) && name.bytes().all(upper_hex) {
            return Some(PxelinuxConfig::IpPrefix(name.to_string()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAC: Mac = Mac([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);

    #[test]
    fn every_common_spelling_parses_to_the_same_address() {
        for spelling in [
            "52:54:00:ab:cd:ef",
            "52:54:00:AB:CD:EF",
            "52-54-00-ab-cd-ef",
            "525400abcdef",
            "525400ABCDEF",
            "5254.00ab.cdef",
            "52%3A54%3A00%3Aab%3Acd%3Aef",
            "52%3a54%3a00%3aab%3acd%3aef",
            " 52:54:00:ab:cd:ef\n",
        ] {
            assert_eq!(Mac::parse(spelling), Ok(MAC), "{spelling:?}");
        }
        assert_eq!(MAC.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(MAC.pxelinux_name(), "01-52-54-00-ab-cd-ef");
    }

    #[test]
    fn malformed_addresses_are_refused_with_a_hint() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "52:54-00:ab:cd:ef",
            "52;54;00;ab;cd;ef",
            "5254.00ab.cdeg",
            "zz:54:00:ab:cd:ef",
            "+2:54:00:ab:cd:ef",
            "525400abcde",
            "52%2054%2000%20ab%20cd%20ef",
            "ab:cd:ef:01:02:0é",
            "52:5:400:ab:cd:ef",
            "52::4:00:ab:cd:ef",
            "5254.00ab-cdef",
            "525400ab\0cde",
        ] {
            let error = Mac::parse(bad).unwrap_err().to_string();
            assert!(error.contains("52:54:00:12:34:56"), "{bad:?}: {error}");
        }
    }

    #[test]
    fn pxelinux_order_and_its_reading() {
        let names = pxelinux_config_names(MAC, Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(
            names,
            vec![
                "01-52-54-00-ab-cd-ef",
                "C0A8010A",
                "C0A8010",
                "C0A801",
                "C0A80",
                "C0A8",
                "C0A",
                "C0",
                "C",
                "default"
            ]
        );
        assert_eq!(
            PxelinuxConfig::parse("01-52-54-00-ab-cd-ef"),
            Some(PxelinuxConfig::Mac(MAC))
        );
        assert_eq!(
            PxelinuxConfig::parse("C0A801"),
            Some(PxelinuxConfig::IpPrefix("C0A801".into()))
        );
        assert_eq!(
            PxelinuxConfig::parse("default"),
            Some(PxelinuxConfig::Default)
        );
        for other in [
            "c0a801",
            "01-52:54:00:ab:cd:ef",
            "C0A8010A0",
            "menu.c32",
            "01-zz-54-00-ab-cd-ef",
        ] {
            assert_eq!(PxelinuxConfig::parse(other), None, "{other:?}");
        }
    }

    proptest! {
        #[test]
        fn every_written_form_reads_back(bytes in any::<[u8; 6]>()) {
            let mac = Mac(bytes);
            prop_assert_eq!(Mac::parse(&mac.to_string()), Ok(mac));
            prop_assert_eq!(Mac::parse(&mac.hyphenated()), Ok(mac));
            prop_assert_eq!(Mac::parse(&mac.to_string().to_uppercase().replace(':', "")), Ok(mac));
            prop_assert_eq!(Mac::parse(&mac.to_string().replace(':', "%3A")), Ok(mac));
            prop_assert_eq!(PxelinuxConfig::parse(&mac.pxelinux_name()), Some(PxelinuxConfig::Mac(mac)));
        }

        #[test]
        fn parse_never_panics(input in ".{0,40}") {
            let _ = Mac::parse(&input);
            let _ = PxelinuxConfig::parse(&input);
        }
    }
}
