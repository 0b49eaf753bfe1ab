//! The netascii transform (RFC 1350 §1, RFC 764): on the wire a line ends in
//! CR LF and a bare CR is sent as CR NUL.
//!
//! Netascii transfers are rare (boot firmware always asks for octet), so the
//! server converts the whole file once when the request arrives instead of
//! converting block by block; `tsize` then reports the converted length, as
//! RFC 2349 §4 asks.

/// Converts local text (LF line ends) into netascii.
pub fn encode(input: &[u8]) -> Vec<u8> {
    let extra = input.iter().filter(|&&b| b == b'\n' || b == b'\r').count();
    let mut out = Vec::with_capacity(input.len() + extra);
    for &b in input {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// Converts netascii back to local text (used by clients and tests).
pub fn decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut bytes = input.iter().peekable();
    while let Some(&b) = bytes.next() {
        if b == b'\r' {
            match bytes.peek() {
                Some(b'\n') => {
                    out.push(b'\n');
                    bytes.next();
                }
                Some(0) => {
                    out.push(b'\r');
                    bytes.next();
                }
                _ => out.push(b'\r'),
            }
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn line_ends_and_bare_cr() {
        assert_eq!(encode(b"a\nb\rc"), b"a\r\nb\r\0c");
        assert_eq!(decode(b"a\r\nb\r\0c"), b"a\nb\rc");
        assert_eq!(encode(b""), b"");
    }

    proptest! {
        #[test]
        fn round_trips(input in proptest::collection::vec(any::<u8>(), 0..400)) {
            prop_assert_eq!(decode(&encode(&input)), input);
        }
    }
}
