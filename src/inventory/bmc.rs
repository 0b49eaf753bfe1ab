//! A machine's baseboard management controller (BMC) as the inventory
//! knows it: protocol, address, user and, for Redfish, the system's path.
//! The password or key is not here: the store keeps it sealed (see
//! `crate::seal`), and nothing that lists machines ever returns it.
//!
//! Operators write a BMC as a URL, the way `ipmitool` and Redfish tools
//! name them:
//!
//! * `ipmi://USER:PASS@HOST[:PORT]` — IPMI 2.0 over LAN (RMCP+, UDP 623);
//! * `redfish://USER:PASS@HOST[:PORT]/redfish/v1/Systems/ID` — Redfish over
//!   HTTPS (443); `redfish+http://…` for a BMC (or an emulator) without TLS.
//!
//! `PASS` may be left out and given apart (a file or standard input), so
//! that it never sits in a shell history; `?verify=false` accepts a BMC's
//! self-signed certificate. An IPMI BMC that also wants its K_g key (the
//! BMC-wide key of IPMI 2.0's RMCP+ session set-up) gets it apart too,
//! never in the URL ([`parse_kg_key`]).

use serde::{Deserialize, Serialize};

/// How bootfleet talks to a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BmcProtocol {
    /// IPMI 2.0 over LAN (RMCP+).
    Ipmi,
    /// Redfish over HTTPS.
    Redfish,
    /// Redfish over plain HTTP (emulators, BMCs on an isolated network).
    RedfishHttp,
}

impl BmcProtocol {
    pub fn scheme(self) -> &'static str {
        match self {
            BmcProtocol::Ipmi => "ipmi",
            BmcProtocol::Redfish => "redfish",
            BmcProtocol::RedfishHttp => "redfish+http",
        }
    }

    /// The port a BMC of this protocol listens on unless told otherwise.
    pub fn default_port(self) -> u16 {
        match self {
            BmcProtocol::Ipmi => 623,
            BmcProtocol::Redfish => 443,
            BmcProtocol::RedfishHttp => 80,
        }
    }

    pub fn is_redfish(self) -> bool {
        matches!(self, BmcProtocol::Redfish | BmcProtocol::RedfishHttp)
    }
}

/// Where a machine's BMC is and who to log in as (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BmcTarget {
    pub protocol: BmcProtocol,
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Redfish: the system's resource, e.g. `/redfish/v1/Systems/1`;
    /// empty for IPMI.
    #[serde(default)]
    pub system: String,
    /// Redfish over HTTPS: check the BMC's certificate (against the
    /// configured CA file, or the public roots). `false` accepts any.
    #[serde(default = "yes")]
    pub verify_tls: bool,
}

fn yes() -> bool {
    true
}

impl std::fmt::Display for BmcTarget {
    /// The URL again, without the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "{}://{}@{}:{}{}",
            self.protocol.scheme(),
            percent_encoding::utf8_percent_encode(&self.user, USERINFO),
            host,
            self.port,
            self.system
        )?;
        if self.protocol == BmcProtocol::Redfish && !self.verify_tls {
            f.write_str("?verify=false")?;
        }
        Ok(())
    }
}

/// Characters escaped in a user name written back into a URL.
const USERINFO: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A parsed BMC URL: where, and the password when the URL carried one;
/// and the IPMI K_g key when one was given apart (`Debug` leaves both out).
#[derive(Clone, PartialEq, Eq)]
pub struct BmcUrl {
    pub target: BmcTarget,
    pub password: Option<String>,
    /// As the operator wrote it ([`parse_kg_key`]); never part of the URL.
    pub kg_key: Option<String>,
}

impl std::fmt::Debug for BmcUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |secret: &Option<String>| if secret.is_some() { "***" } else { "none" };
        write!(
            f,
            "BmcUrl({}, password: {}, kg: {})",
            self.target,
            shown(&self.password),
            shown(&self.kg_key)
        )
    }
}

/// The longest IPMI K_g key, in bytes (IPMI 2.0, 22.25: 20 bytes, padded
/// with zeros).
pub const MAX_KG_KEY: usize = 20;

/// Parses an IPMI K_g key as operators write it (as `ipmitool` takes it):
/// its characters (`-k KEY`), or `0x` and hexadecimal digits (`-y HEX`),
/// 1 to [`MAX_KG_KEY`] bytes. Returns the key's bytes, trailing zero
/// padding taken off. A zero byte before the end is refused: `ipmitool`
/// reads the key from its environment (`-K`) as a C string, and its only
/// other ways in are its command line, which other local users can read.
pub fn parse_kg_key(text: &str) -> Result<Vec<u8>, String> {
    let bytes = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => {
            if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(
                    "the K_g key after 0x must be pairs of hexadecimal digits (up to 40 of them)"
                        .into(),
                );
            }
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("checked hex digits"))
                .collect()
        }
        None => {
            if text.chars().any(char::is_control) {
                return Err("the K_g key contains a control character (write a binary key as 0x and hex digits)".into());
            }
            text.as_bytes().to_vec()
        }
    };
    let key = bytes
        .iter()
        .rposition(|b| *b != 0)
        .map_or(&bytes[..0], |last| &bytes[..=last]);
    if key.is_empty() || key.len() > MAX_KG_KEY {
        return Err(format!(
            "the K_g key must be 1 to {MAX_KG_KEY} bytes, not all zero"
        ));
    }
    if key.contains(&0) {
        return Err(
            "the K_g key has a zero byte before its end, which ipmitool cannot be given safely"
                .into(),
        );
    }
    Ok(key.to_vec())
}

/// Longest user name or password accepted (BMCs allow 16 to 20 bytes for
/// IPMI, a few hundred for Redfish).
pub const MAX_CREDENTIAL: usize = 256;

/// Parses `ipmi://USER[:PASS]@HOST[:PORT]` or
/// `redfish[+http]://USER[:PASS]@HOST[:PORT]/redfish/v1/Systems/ID[?verify=false]`.
pub fn parse_bmc_url(text: &str) -> Result<BmcUrl, String> {
    let fail = |why: &str| {
        format!(
            "BMC {}: {why} (write ipmi://USER:PASS@HOST[:PORT] or redfish://USER:PASS@HOST[:PORT]/redfish/v1/Systems/ID)",
            redact_bmc_url(text)
        )
    };
    let Some((scheme, rest)) = text.split_once("://") else {
        return Err(fail("not a URL"));
    };
    let protocol = match scheme.to_ascii_lowercase().as_str() {
        "ipmi" => BmcProtocol::Ipmi,
        "redfish" | "redfish+https" => BmcProtocol::Redfish,
        "redfish+http" => BmcProtocol::RedfishHttp,
        _ => return Err(fail("the scheme is not ipmi, redfish or redfish+http")),
    };
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let Some((userinfo, location)) = rest.rsplit_once('@') else {
        return Err(fail("it names no user (USER@HOST)"));
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "its user or password is not UTF-8 once decoded".to_string())
    };
    let user = decode(user).map_err(|why| fail(&why))?;
    let password = password.map(decode).transpose().map_err(|why| fail(&why))?;
    let (authority, system) = match location.find('/') {
        Some(slash) => location.split_at(slash),
        None => (location, ""),
    };
    let (host, port) = split_host_port(authority).map_err(|why| fail(&why))?;
    let verify_tls = match query {
        "" | "verify=true" => true,
        "verify=false" => false,
        _ => return Err(fail("the only option is ?verify=false")),
    };
    let target = BmcTarget {
        protocol,
        host,
        port: port.unwrap_or(protocol.default_port()),
        user,
        system: system.trim_end_matches('/').to_string(),
        verify_tls,
    };
    check_target(&target).map_err(|why| fail(&why))?;
    if let Some(password) = &password {
        check_secret(password).map_err(|why| fail(&why))?;
    }
    Ok(BmcUrl {
        target,
        password,
        kg_key: None,
    })
}

fn split_host_port(authority: &str) -> Result<(String, Option<u16>), String> {
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (host, after) = inner
            .split_once(']')
            .ok_or("its IPv6 address has no closing ']'")?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = port
        .map(|p| match p.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(format!("port {p:?} is not a number from 1 to 65535")),
        })
        .transpose()?;
    Ok((host.to_string(), port))
}

/// The first line of a password or key file, without its line ending.
pub fn read_secret_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

/// Checks that `kg_key` is a K_g key ([`parse_kg_key`]) and that the BMC
/// speaks IPMI, the only protocol that has one.
pub fn check_kg_for(target: &BmcTarget, kg_key: &str) -> Result<(), String> {
    if target.protocol != BmcProtocol::Ipmi {
        return Err("a K_g key is for IPMI BMCs only (Redfish has none)".into());
    }
    parse_kg_key(kg_key).map(drop)
}

/// Checks what a BMC target holds: a host of name characters, a user and
/// a system path free of control characters, a Redfish system path under
/// `/redfish/v1/`.
pub fn check_target(target: &BmcTarget) -> Result<(), String> {
    let host_ok = !target.host.is_empty()
        && target.host.len() <= 253
        && target
            .host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.:_%".contains(c));
    if !host_ok {
        return Err(format!(
            "host {:?} is not a host name or address",
            target.host
        ));
    }
    if target.user.is_empty() || target.user.len() > MAX_CREDENTIAL {
        return Err(format!("the user name must be 1 to {MAX_CREDENTIAL} bytes"));
    }
    if target.user.chars().any(char::is_control) {
        return Err("the user name contains a control character".into());
    }
    if target.protocol.is_redfish() {
        let path_ok = target.system.starts_with("/redfish/v1/Systems/")
            && target.system.len() > "/redfish/v1/Systems/".len()
            && target.system.len() <= 512
            && target
                .system
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/-._~%".contains(c))
            && !target.system.split('/').any(|part| part == "..");
        if !path_ok {
            return Err(format!(
                "the Redfish system {:?} must be a path like /redfish/v1/Systems/1",
                target.system
            ));
        }
    } else if !target.system.is_empty() {
        return Err("an IPMI BMC takes no path".into());
    }
    Ok(())
}

/// Checks a BMC password or key: 1 to [`MAX_CREDENTIAL`] bytes, no
/// control characters (a trailing newline from a file is taken off by the
/// caller first).
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.is_empty() || secret.len() > MAX_CREDENTIAL {
        return Err(format!("the password must be 1 to {MAX_CREDENTIAL} bytes"));
    }
    if secret.chars().any(char::is_control) {
        return Err("the password contains a control character".into());
    }
    Ok(())
}

/// `text` with any password in it replaced by `***`, for messages.
pub fn redact_bmc_url(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.chars().filter(|c| !c.is_control()).take(200).collect();
    };
    let redacted = match rest.rsplit_once('@') {
        Some((userinfo, location)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{location}"),
            None => text.to_string(),
        },
        None => text.to_string(),
    };
    redacted
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipmi_and_redfish_urls_parse_with_their_default_ports() {
        let ipmi = parse_bmc_url("ipmi://admin:s3cret@10.0.0.5").unwrap();
        assert_eq!(ipmi.target.protocol, BmcProtocol::Ipmi);
        assert_eq!(ipmi.target.port, 623);
        assert_eq!(ipmi.target.user, "admin");
        assert_eq!(ipmi.password.as_deref(), Some("s3cret"));
        assert_eq!(ipmi.target.to_string(), "ipmi://admin@10.0.0.5:623");

        let redfish = parse_bmc_url(
            "redfish://root:p%40ss@bmc-7.rack:8443/redfish/v1/Systems/1?verify=false",
        )
        .unwrap();
        assert_eq!(redfish.target.protocol, BmcProtocol::Redfish);
        assert_eq!(redfish.target.port, 8443);
        assert_eq!(redfish.target.system, "/redfish/v1/Systems/1");
        assert!(!redfish.target.verify_tls);
        assert_eq!(redfish.password.as_deref(), Some("p@ss"));
        assert_eq!(
            redfish.target.to_string(),
            "redfish://root@bmc-7.rack:8443/redfish/v1/Systems/1?verify=false"
        );

        let plain = parse_bmc_url("redfish+http://u@[::1]:8000/redfish/v1/Systems/vm-1").unwrap();
        assert_eq!(plain.target.host, "::1");
        assert_eq!(plain.password, None);
        assert_eq!(
            plain.target.to_string(),
            "redfish+http://u@[::1]:8000/redfish/v1/Systems/vm-1"
        );
    }

    #[test]
    fn kg_keys_are_text_or_hex_and_never_hold_a_zero_inside() {
        assert_eq!(parse_kg_key("kgsecret").unwrap(), b"kgsecret");
        assert_eq!(parse_kg_key("0x6b6701").unwrap(), b"kg\x01");
        // Zero padding to the full 20 bytes is how BMCs show keys.
        assert_eq!(
            parse_kg_key(&format!("0x6b67{}", "00".repeat(18))).unwrap(),
            b"kg"
        );
        for (bad, why) in [
            ("", "1 to 20"),
            ("0x", "pairs"),
            ("0x6b6", "pairs"),
            ("0xzz", "pairs"),
            ("0x0000", "not all zero"),
            ("0x6b006b", "zero byte"),
            ("a\tb", "control"),
            ("abcdefghijklmnopqrstu", "1 to 20"),
        ] {
            let error = parse_kg_key(bad).unwrap_err();
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[test]
    fn bad_urls_say_what_to_write_and_never_echo_the_password() {
        for (url, why) in [
            ("http://a:b@host", "scheme"),
            ("ipmi://host", "no user"),
            ("ipmi://a:b@host:0", "port"),
            ("ipmi://a:b@host:99999", "port"),
            ("ipmi://a:b@ho st", "host"),
            ("ipmi://a:b@host/redfish/v1/Systems/1", "no path"),
            ("redfish://a:b@host", "/redfish/v1/Systems/1"),
            (
                "redfish://a:b@host/redfish/v1/Systems/../../x",
                "/redfish/v1/Systems/1",
            ),
            ("redfish://a:b@host/redfish/v1/Systems/1?x=1", "option"),
            ("ipmi://a:p%0Aw@host", "control"),
            ("ipmi://a%07:b@host", "control"),
        ] {
            let error = parse_bmc_url(url).unwrap_err();
            assert!(error.contains(why), "{url}: {error}");
            assert!(
                !error.contains(":b@"),
                "{url}: the password leaked: {error}"
            );
        }
    }
}
