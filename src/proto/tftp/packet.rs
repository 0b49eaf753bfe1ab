//! TFTP wire codec (RFC 1350 §5, RFC 2347 §2 for options and OACK).
//!
//! [`Packet::parse`] is the one entry point for untrusted bytes: after it, no
//! code indexes wire data. Decoding borrows from the datagram; encoding appends
//! to a caller's buffer so that the hot path allocates nothing.
//!
//! ```text
//!  RRQ/WRQ  | 01/02 | filename | 0 | mode | 0 | opt1 | 0 | value1 | 0 | ...
//!  DATA     | 03    | block #  | data (0..=blksize bytes)
//!  ACK      | 04    | block #
//!  ERROR    | 05    | code     | message | 0
//!  OACK     | 06    | opt1 | 0 | value1 | 0 | ...
//! ```

use std::fmt;

/// Opcodes (RFC 1350 §5, RFC 2347 §2).
pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Length of the DATA header: opcode and block number.
pub const DATA_HEADER_LEN: usize = 4;

/// A request may carry at most this many options; real firmware sends at most
/// five (blksize, tsize, timeout, windowsize, multicast). More is hostile.
pub const MAX_OPTIONS: usize = 16;

/// Transfer mode of a request (RFC 1350 §1). `mail` is obsolete and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        }
    }
}

/// Error codes (RFC 1350 Appendix, RFC 2347 §2 for code 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    DiskFull = 3,
    IllegalOperation = 4,
    UnknownTransferId = 5,
    FileExists = 6,
    NoSuchUser = 7,
    OptionNegotiation = 8,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request<'a> {
    /// Raw file name bytes; the path resolver decides what is acceptable.
    pub filename: &'a [u8],
    pub mode: Mode,
    /// Options in the order the client sent them, names as sent (compare
    /// case-insensitively, RFC 2347 §2).
    pub options: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    /// The value of option `name` (case-insensitive), if the client sent it.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// One decoded TFTP datagram, borrowing from the buffer it was parsed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, payload: &'a [u8] },
    Ack { block: u16 },
    Error { code: u16, message: &'a str },
    Oack { options: Vec<(&'a str, &'a str)> },
}

/// Why a datagram is not a valid TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("datagram of {0} bytes is too short for a TFTP packet")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("{0} is not terminated by a NUL byte")]
    Unterminated(&'static str),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("unsupported transfer mode {0:?} (use octet or netascii)")]
    BadMode(String),
    #[error("empty file name")]
    EmptyFilename,
    #[error("option {0:?} has no value")]
    OptionWithoutValue(String),
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("{0} bytes of trailing garbage")]
    Trailing(usize),
}

impl<'a> Packet<'a> {
    /// Decodes one datagram. Never panics, whatever the bytes.
    pub fn parse(buf: &'a [u8]) -> Result<Self, PacketError> {
        if buf.len() < 2 {
            return Err(PacketError::TooShort(buf.len()));
        }
        let opcode = u16::from_be_bytes([buf[0], buf[1]]);
        let body = &buf[2..];
        match opcode {
            OP_RRQ | OP_WRQ => {
                let request = parse_request(body)?;
                Ok(if opcode == OP_RRQ {
                    Packet::Rrq(request)
                } else {
                    Packet::Wrq(request)
                })
            }
            OP_DATA => {
                let (block, payload) = split_block(buf, body)?;
                Ok(Packet::Data { block, payload })
            }
            OP_ACK => {
                let (block, rest) = split_block(buf, body)?;
                // Some clients pad ACKs; RFC 1350 does not forbid it and
                // refusing them would stall a transfer for nothing.
                let _ = rest;
                Ok(Packet::Ack { block })
            }
            OP_ERROR => {
                let (code, rest) = split_block(buf, body)?;
                // A missing NUL after the message is tolerated: the message is
                // only ever logged.
                let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
                let message = std::str::from_utf8(&rest[..end]).unwrap_or("<message not UTF-8>");
                Ok(Packet::Error { code, message })
            }
            OP_OACK => {
                let mut fields = Fields::new(body);
                let options = parse_options(&mut fields)?;
                Ok(Packet::Oack { options })
            }
            other => Err(PacketError::UnknownOpcode(other)),
        }
    }
}

fn split_block<'a>(whole: &[u8], body: &'a [u8]) -> Result<(u16, &'a [u8]), PacketError> {
    match body {
        [hi, lo, rest @ ..] => Ok((u16::from_be_bytes([*hi, *lo]), rest)),
        _ => Err(PacketError::TooShort(whole.len())),
    }
}

/// Iterates NUL-terminated fields of a request body.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(rest: &'a [u8]) -> Self {
        Self { rest }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn next_bytes(&mut self, what: &'static str) -> Result<&'a [u8], PacketError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(PacketError::Unterminated(what))?;
        let (field, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        Ok(field)
    }

    fn next_str(&mut self, what: &'static str) -> Result<&'a str, PacketError> {
        std::str::from_utf8(self.next_bytes(what)?).map_err(|_| PacketError::NotUtf8(what))
    }
}

fn parse_request(body: &[u8]) -> Result<Request<'_>, PacketError> {
    let mut fields = Fields::new(body);
    let filename = fields.next_bytes("file name")?;
    if filename.is_empty() {
        return Err(PacketError::EmptyFilename);
    }
    let mode_str = fields.next_str("mode")?;
    let mode = if mode_str.eq_ignore_ascii_case("octet") {
        Mode::Octet
    } else if mode_str.eq_ignore_ascii_case("netascii") {
        Mode::Netascii
    } else {
        return Err(PacketError::BadMode(mode_str.chars().take(32).collect()));
    };
    let options = parse_options(&mut fields)?;
    Ok(Request {
        filename,
        mode,
        options,
    })
}

fn parse_options<'a>(fields: &mut Fields<'a>) -> Result<Vec<(&'a str, &'a str)>, PacketError> {
    let mut options = Vec::new();
    while !fields.is_empty() {
        // Some clients pad requests with NUL bytes after the last option.
        if fields.rest.iter().all(|&b| b == 0) {
            break;
        }
        let name = fields.next_str("option name")?;
        let value = fields
            .next_str("option value")
            .map_err(|_| PacketError::OptionWithoutValue(name.chars().take(32).collect()))?;
        if options.len() == MAX_OPTIONS {
            return Err(PacketError::TooManyOptions);
        }
        options.push((name, value));
    }
    Ok(options)
}

/// The 4-byte header of DATA block `block`.
pub fn data_header(block: u16) -> [u8; DATA_HEADER_LEN] {
    let [hi, lo] = block.to_be_bytes();
    [0, OP_DATA as u8, hi, lo]
}

/// Appends an ACK.
pub fn encode_ack(block: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_ACK.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

/// Appends a DATA packet (used by clients and tests; the server sends the
/// header and a slice of the file cache without copying).
pub fn encode_data(block: u16, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&data_header(block));
    out.extend_from_slice(payload);
}

/// Appends an ERROR packet. The message is cut at 255 bytes and any NUL in it
/// dropped, so a hostile file name echoed into it cannot break the framing.
pub fn encode_error(code: ErrorCode, message: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&(code as u16).to_be_bytes());
    out.extend(message.bytes().filter(|&b| b != 0).take(255));
    out.push(0);
}

/// Appends an OACK carrying `options`.
pub fn encode_oack<N: AsRef<str>, V: AsRef<str>>(options: &[(N, V)], out: &mut Vec<u8>) {
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    for (name, value) in options {
        out.extend_from_slice(name.as_ref().as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_ref().as_bytes());
        out.push(0);
    }
}

/// Appends a read request (clients, tests and the load tester).
pub fn encode_rrq(filename: &str, mode: Mode, options: &[(&str, &str)], out: &mut Vec<u8>) {
    encode_request(OP_RRQ, filename, mode, options, out)
}

/// Appends a write request.
pub fn encode_wrq(filename: &str, mode: Mode, options: &[(&str, &str)], out: &mut Vec<u8>) {
    encode_request(OP_WRQ, filename, mode, options, out)
}

fn encode_request(
    opcode: u16,
    filename: &str,
    mode: Mode,
    options: &[(&str, &str)],
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&opcode.to_be_bytes());
    out.extend_from_slice(filename.as_bytes());
    out.push(0);
    out.extend_from_slice(mode.as_str().as_bytes());
    out.push(0);
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

impl fmt::Display for Packet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Packet::Rrq(r) => write!(f, "RRQ {:?}", String::from_utf8_lossy(r.filename)),
            Packet::Wrq(r) => write!(f, "WRQ {:?}", String::from_utf8_lossy(r.filename)),
            Packet::Data { block, payload } => write!(f, "DATA {block} ({} bytes)", payload.len()),
            Packet::Ack { block } => write!(f, "ACK {block}"),
            Packet::Error { code, message } => write!(f, "ERROR {code} {message:?}"),
            Packet::Oack { options } => write!(f, "OACK {options:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_rfc2347_example_request() {
        // RFC 2347 §2 example: RRQ "foobar" octet blksize 1428.
        let bytes = b"\x00\x01foobar\x00octet\x00blksize\x001428\x00";
        let Packet::Rrq(r) = Packet::parse(bytes).unwrap() else {
            panic!("not an RRQ")
        };
        assert_eq!(r.filename, b"foobar");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.options, vec![("blksize", "1428")]);
        assert_eq!(r.option("BLKSIZE"), Some("1428"));
    }

    #[test]
    fn parses_ipxe_style_request_with_mixed_case_mode() {
        let bytes = b"\x00\x01undionly.kpxe\x00OCTET\x00blksize\x001432\x00tsize\x000\x00";
        let Packet::Rrq(r) = Packet::parse(bytes).unwrap() else {
            panic!("not an RRQ")
        };
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(r.option("tsize"), Some("0"));
    }

    #[test]
    fn decodes_the_other_kinds() {
        assert_eq!(
            Packet::parse(b"\x00\x03\x00\x07abc").unwrap(),
            Packet::Data {
                block: 7,
                payload: b"abc"
            }
        );
        assert_eq!(
            Packet::parse(b"\x00\x04\xff\xff").unwrap(),
            Packet::Ack { block: 65535 }
        );
        assert_eq!(
            Packet::parse(b"\x00\x05\x00\x01nope\x00").unwrap(),
            Packet::Error {
                code: 1,
                message: "nope"
            }
        );
        assert_eq!(
            Packet::parse(b"\x00\x06tsize\x0010\x00").unwrap(),
            Packet::Oack {
                options: vec![("tsize", "10")]
            }
        );
    }

    #[test]
    fn refuses_malformed_requests() {
        assert_eq!(Packet::parse(b""), Err(PacketError::TooShort(0)));
        assert_eq!(Packet::parse(b"\x00"), Err(PacketError::TooShort(1)));
        assert_eq!(
            Packet::parse(b"\x00\x09"),
            Err(PacketError::UnknownOpcode(9))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01file"),
            Err(PacketError::Unterminated("file name"))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01\x00octet\x00"),
            Err(PacketError::EmptyFilename)
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00mail\x00"),
            Err(PacketError::BadMode("mail".into()))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00octet\x00blksize\x00"),
            Err(PacketError::OptionWithoutValue("blksize".into()))
        );
        assert_eq!(
            Packet::parse(b"\x00\x01f\x00\xffoctet\x00"),
            Err(PacketError::NotUtf8("mode"))
        );
        assert_eq!(
            Packet::parse(b"\x00\x04\x00"),
            Err(PacketError::TooShort(3))
        );
        let mut many = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..=MAX_OPTIONS {
            many.extend_from_slice(format!("o{i}\x00v\x00").as_bytes());
        }
        assert_eq!(Packet::parse(&many), Err(PacketError::TooManyOptions));
    }

    #[test]
    fn tolerates_nul_padding_after_options() {
        let bytes = b"\x00\x01f\x00octet\x00tsize\x000\x00\x00\x00\x00";
        assert!(matches!(Packet::parse(bytes), Ok(Packet::Rrq(_))));
    }

    #[test]
    fn every_truncation_of_a_valid_request_is_an_error_or_a_shorter_request() {
        let mut full = Vec::new();
        encode_rrq(
            "pxelinux.0",
            Mode::Octet,
            &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "8")],
            &mut full,
        );
        for len in 0..full.len() {
            // Never panics; cut inside a field must not parse as the full request.
            if let Ok(Packet::Rrq(r)) = Packet::parse(&full[..len]) {
                assert!(r.options.len() < 3);
            }
        }
        assert!(Packet::parse(&full).is_ok());
    }

    #[test]
    fn encoders_append_without_touching_what_is_there() {
        let mut out = vec![0xAA; 3];
        encode_ack(0x0102, &mut out);
        assert_eq!(out, [0xAA, 0xAA, 0xAA, 0, 4, 1, 2]);
        let mut out = vec![0xAA];
        encode_error(ErrorCode::FileNotFound, "no\0such", &mut out);
        assert_eq!(out, b"\xAA\x00\x05\x00\x01nosuch\x00");
        let mut out = vec![0xAA];
        encode_oack(&[("blksize", "1432")], &mut out);
        assert_eq!(out, b"\xAA\x00\x06blksize\x001432\x00");
        assert_eq!(data_header(0xfffe), [0, 3, 0xff, 0xfe]);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = Packet::parse(&bytes);
        }

        #[test]
        fn request_round_trips(
            name in "[a-zA-Z0-9./_-]{1,64}",
            netascii in any::<bool>(),
            blksize in 8u32..65464,
            window in 1u32..65535,
        ) {
            let mode = if netascii { Mode::Netascii } else { Mode::Octet };
            let (b, w) = (blksize.to_string(), window.to_string());
            let mut out = Vec::new();
            encode_rrq(&name, mode, &[("blksize", &b), ("windowsize", &w)], &mut out);
            let parsed = Packet::parse(&out).unwrap();
            prop_assert_eq!(parsed, Packet::Rrq(Request {
                filename: name.as_bytes(),
                mode,
                options: vec![("blksize", b.as_str()), ("windowsize", w.as_str())],
            }));
        }

        #[test]
        fn data_and_ack_round_trip(block in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
            let mut out = Vec::new();
            encode_data(block, &payload, &mut out);
            prop_assert_eq!(Packet::parse(&out).unwrap(), Packet::Data { block, payload: &payload });
            let mut out = Vec::new();
            encode_ack(block, &mut out);
            prop_assert_eq!(Packet::parse(&out).unwrap(), Packet::Ack { block });
        }
    }
}
